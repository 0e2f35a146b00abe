//! Errors of the transports crate.

use std::path::PathBuf;
use std::process::ExitStatus;

/// A transport failure, naming the URI, file or command concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The URI does not parse.
    #[error(transparent)]
    Uri(#[from] crate::uri::UriError),
    /// Connecting (or opening the outgoing side) failed.
    #[error("cannot connect to {uri}")]
    Connect {
        /// The URI.
        uri: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Listening failed.
    #[error("cannot listen on {uri}")]
    Listen {
        /// The URI.
        uri: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Accepting (or opening the incoming side) failed.
    #[error("cannot accept on {uri}")]
    Accept {
        /// The URI.
        uri: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An `exec:` command could not be started.
    #[error("cannot run '{command}'")]
    Spawn {
        /// The command.
        command: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An `exec:` command failed.
    #[error("command '{command}' failed ({status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Exec {
        /// The command.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// The last line it printed on stderr.
        stderr: String,
    },
    /// The channel has no reverse direction for a return path (`exec:`, `file:`, an
    /// `fd:` that is not a socket), or it could not be duplicated.
    #[error("{uri}: no return path: {why}")]
    NoReturnPath {
        /// The channel's URI or peer.
        uri: String,
        /// Why.
        why: String,
    },
    /// The channel failed while being closed (its last bytes, or a cancel while
    /// waiting for an `exec:` command); `peer` names the other end.
    #[error("migration channel to {peer}")]
    Channel {
        /// The peer (address, URI or command).
        peer: String,
        /// The cause.
        source: std::io::Error,
    },
    /// TLS failed: credentials, options, or the handshake (naming the cause).
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A `file:` could not be opened.
    #[error("{}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl TransportError {
    /// True when the failure is a cancellation.
    pub fn is_cancelled(&self) -> bool {
        match self {
            TransportError::Connect { source, .. }
            | TransportError::Listen { source, .. }
            | TransportError::Accept { source, .. }
            | TransportError::Channel { source, .. }
            | TransportError::File { source, .. } => crate::cancel::is_cancelled(source),
            _ => false,
        }
    }
}

/// A read or write on a socket channel that made no progress for the channel's
/// io timeout (see [`ChannelOptions::io_timeout`](crate::ChannelOptions::io_timeout)),
/// inside an `io::Error` of kind `TimedOut`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no {what} progress for {} s (io-timeout): the peer or the link is gone", fmt_secs(*timeout))]
pub struct NoProgress {
    /// `read` or `write`.
    pub what: &'static str,
    /// The io timeout that expired.
    pub timeout: std::time::Duration,
}

fn fmt_secs(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s:.1}")
    }
}

/// True when `e` is (or wraps) a [`NoProgress`] timeout.
pub fn is_no_progress(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<NoProgress>())
}
