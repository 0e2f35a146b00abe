//! Who caused a failure ([`Origin`]) and how to print an error with its causes
//! ([`report`]). Every error type of the engine prints its own context only and
//! returns its cause as [`source`](std::error::Error::source), so a report walks
//! the chain once and prints each cause once.

use std::fmt;

/// Who caused a migration failure (as h2 tells the user, the library and the remote apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// This side: setup, encoding, the state machine, a bad URI or local file.
    Local,
    /// The other side: the channel or stream failed, or the peer sent something bad.
    Peer,
    /// The VMM: one of its trait implementations (devices, vCPUs, dirty sources,
    /// RAM sink) refused, or a blocker is registered.
    Vmm,
    /// The migration was cancelled.
    Cancel,
}

impl Origin {
    /// The name printed by the CLI: `local`, `peer`, `VMM` or `cancel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Local => "local",
            Origin::Peer => "peer",
            Origin::Vmm => "VMM",
            Origin::Cancel => "cancel",
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `e` and its chain of causes on one line, `a: b: c`, each printed once. Control
/// characters (from names the stream chose: block names, idstrs) are escaped, so
/// the line cannot be split or carry terminal sequences.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    escape_controls(&report_raw(e))
}

/// `s` with every control character written as a Rust escape (`\n`, `\u{1b}`).
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn report_raw(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // A cause that some wrapper already printed in its own message is not repeated.
        if !text.is_empty() && !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
