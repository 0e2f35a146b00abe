//! Errors of the qmig facade and CLI.

use std::path::PathBuf;

/// What can go wrong in a qmig command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stream did not decode.
    #[error("{0}")]
    Format(#[from] savevm_format::Error),
    /// The stream could not be written.
    #[error("{0}")]
    Encode(#[from] savevm_format::EncodeError),
    /// A file could not be opened, created, mapped or written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A transport failed (connect, listen, exec command...).
    #[error("{0}")]
    Transport(#[from] transports::TransportError),
    /// The migration channel failed.
    #[error("migration channel: {0}")]
    Io(std::io::Error),
    /// Cancelled (Ctrl-C, SIGTERM or the API).
    #[error("migration cancelled")]
    Cancelled,
    /// Bad arguments or a request the stream cannot satisfy.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// True for a cancellation, however it surfaced.
    pub fn is_cancelled(&self) -> bool {
        match self {
            Error::Cancelled => true,
            Error::Io(e) => transports::is_cancelled(e),
            Error::Transport(t) => t.is_cancelled(),
            Error::Encode(savevm_format::EncodeError::Io(e)) => transports::is_cancelled(e),
            Error::Format(f) => matches!(&f.kind, savevm_format::ErrorKind::Io(e) if transports::is_cancelled(e)),
            _ => false,
        }
    }

    /// Wrap an I/O error with the file it concerns.
    pub fn file(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::File { path: path.into(), source }
    }
}

/// Result alias of the facade.
pub type Result<T, E = Error> = std::result::Result<T, E>;
