//! Migration URIs in QEMU's syntax: `tcp:HOST:PORT`, `unix:PATH`, `fd:N`,
//! `exec:COMMAND`, `file:PATH[,offset=N]`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A parsed migration URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// `tcp:HOST:PORT`; HOST is an IPv4 address, `[v6]` or a host name. Port 0 on
    /// the listening side picks a free port.
    Tcp {
        /// Host without brackets.
        host: String,
        /// Port.
        port: u16,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `fd:N`: an inherited file descriptor.
    Fd(i32),
    /// `exec:COMMAND`, run with `/bin/sh -c`.
    Exec(String),
    /// `file:PATH[,offset=N]`.
    File {
        /// The file.
        path: PathBuf,
        /// Byte offset where the stream starts.
        offset: u64,
    },
}

/// Why a URI did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid migration URI '{uri}': {why}")]
pub struct UriError {
    /// The URI as given.
    pub uri: String,
    /// What is wrong.
    pub why: String,
}

impl FromStr for MigrationUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, UriError> {
        let bad = |why: &str| UriError { uri: s.to_string(), why: why.to_string() };
        let (scheme, rest) =
            s.split_once(':').ok_or_else(|| bad("expected SCHEME:..., with tcp, unix, fd, exec or file"))?;
        match scheme {
            "tcp" => {
                let (host, port) = if let Some(r) = rest.strip_prefix('[') {
                    let (h, p) = r.split_once("]:").ok_or_else(|| bad("expected tcp:[V6ADDR]:PORT"))?;
                    (h, p)
                } else {
                    rest.rsplit_once(':').ok_or_else(|| bad("expected tcp:HOST:PORT"))?
                };
                if host.is_empty() {
                    return Err(bad("empty host"));
                }
                if host.contains(':') && !rest.starts_with('[') {
                    return Err(bad("IPv6 addresses need brackets: tcp:[::1]:PORT"));
                }
                let port = port.parse::<u16>().map_err(|_| bad("port is not a number in 0..65535"))?;
                Ok(MigrationUri::Tcp { host: host.to_string(), port })
            }
            "unix" => {
                if rest.is_empty() {
                    return Err(bad("empty socket path"));
                }
                Ok(MigrationUri::Unix(PathBuf::from(rest)))
            }
            "fd" => {
                let n = rest
                    .parse::<i32>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| bad("fd:N needs a non-negative descriptor number"))?;
                Ok(MigrationUri::Fd(n))
            }
            "exec" => {
                if rest.trim().is_empty() {
                    return Err(bad("empty command"));
                }
                Ok(MigrationUri::Exec(rest.to_string()))
            }
            "file" => {
                let (path, offset) = match rest.rsplit_once(",offset=") {
                    Some((p, o)) => (p, parse_size(o).ok_or_else(|| bad("offset is not a number"))?),
                    None => (rest, 0),
                };
                if path.is_empty() {
                    return Err(bad("empty file path"));
                }
                Ok(MigrationUri::File { path: PathBuf::from(path), offset })
            }
            _ => Err(bad("unknown scheme (expected tcp, unix, fd, exec or file)")),
        }
    }
}

/// A decimal or `0x` hexadecimal number.
fn parse_size(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            MigrationUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationUri::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationUri::Fd(n) => write!(f, "fd:{n}"),
            MigrationUri::Exec(c) => write!(f, "exec:{c}"),
            MigrationUri::File { path, offset: 0 } => write!(f, "file:{}", path.display()),
            MigrationUri::File { path, offset } => write!(f, "file:{},offset={offset}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<MigrationUri, UriError> {
        s.parse()
    }

    #[test]
    fn parses_qemu_syntax() {
        assert_eq!(p("tcp:127.0.0.1:4444"), Ok(MigrationUri::Tcp { host: "127.0.0.1".into(), port: 4444 }));
        assert_eq!(p("tcp:[::1]:0"), Ok(MigrationUri::Tcp { host: "::1".into(), port: 0 }));
        assert_eq!(p("tcp:localhost:80"), Ok(MigrationUri::Tcp { host: "localhost".into(), port: 80 }));
        assert_eq!(p("unix:/tmp/m.sock"), Ok(MigrationUri::Unix("/tmp/m.sock".into())));
        assert_eq!(p("fd:3"), Ok(MigrationUri::Fd(3)));
        assert_eq!(p("exec:cat > /tmp/x"), Ok(MigrationUri::Exec("cat > /tmp/x".into())));
        assert_eq!(p("file:/tmp/s,offset=0x1000"), Ok(MigrationUri::File { path: "/tmp/s".into(), offset: 4096 }));
        assert_eq!(p("file:/tmp/s"), Ok(MigrationUri::File { path: "/tmp/s".into(), offset: 0 }));
        for s in ["tcp:[::1]:0", "tcp:h:1", "unix:/a", "fd:4", "exec:true", "file:/x,offset=9"] {
            assert_eq!(p(s).map(|u| u.to_string()), Ok(s.to_string()));
        }
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "",
            "tcp",
            "tcp:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "tcp:h:x",
            "tcp:::1:80",
            "tcp:[::1]80",
            "unix:",
            "fd:",
            "fd:-1",
            "fd:x",
            "exec:",
            "exec:  ",
            "file:",
            "file:/x,offset=z",
            "rdma:h:1",
            "http://x",
        ] {
            let e = p(s).expect_err(s);
            assert!(e.to_string().starts_with(&format!("invalid migration URI '{s}'")), "{e}");
        }
    }
}
