//! Errors of the qmig facade and CLI.

use engine::error::Origin;
use engine::incoming::IncomingError;
use engine::source::EngineError;
use std::path::PathBuf;

/// What can go wrong in a qmig command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stream did not decode.
    #[error(transparent)]
    Format(#[from] savevm_format::Error),
    /// The stream could not be written.
    #[error(transparent)]
    Encode(#[from] savevm_format::EncodeError),
    /// A file could not be opened, created, mapped or written.
    #[error("{}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A transport failed (connect, listen, exec command...).
    #[error(transparent)]
    Transport(#[from] transports::TransportError),
    /// The migration channel failed.
    #[error("migration channel")]
    Io(#[source] std::io::Error),
    /// Cancelled (Ctrl-C, SIGTERM or the API).
    #[error("migration cancelled")]
    Cancelled,
    /// Bad arguments or a request the stream cannot satisfy.
    #[error("{0}")]
    Usage(String),
    /// A `recv` that failed after it opened or created RAM files: the error, then
    /// what is left of the destination.
    #[error("{report} ({note})")]
    Incomplete {
        /// The failure, on one line.
        report: String,
        /// What is left (`destination incomplete: ...`).
        note: String,
    },
    /// A control-plane command (`agent`, `define`, `migrate`, ...) failed; printed
    /// `qmig: COMMAND: MESSAGE` (for `migrate`, MESSAGE names the phase).
    #[error("{command}: {message}")]
    Control {
        /// The command.
        command: &'static str,
        /// What failed and why.
        message: String,
    },
    /// A migration (`send`, `recv`, `demo`, `kvm-dest`) failed; printed as who
    /// caused it (`local`, `peer`, `VMM`), then the engine's error and its causes.
    #[error("{origin}")]
    Migration {
        /// Who caused it.
        origin: Origin,
        /// The engine's (or transport's) error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// True for a cancellation, however it surfaced.
    pub fn is_cancelled(&self) -> bool {
        match self {
            Error::Cancelled => true,
            Error::Migration { origin, .. } => *origin == Origin::Cancel,
            Error::Io(e) => transports::is_cancelled(e),
            Error::Transport(t) => t.is_cancelled(),
            Error::Encode(savevm_format::EncodeError::Io(e)) => transports::is_cancelled(e),
            Error::Format(f) => matches!(&f.kind, savevm_format::ErrorKind::Io(e) if transports::is_cancelled(e)),
            _ => false,
        }
    }

    /// An outgoing migration's failure, with who caused it (a cancel is [`Error::Cancelled`]).
    pub fn outgoing(e: EngineError) -> Self {
        match e.origin() {
            Origin::Cancel => Error::Cancelled,
            origin => Error::Migration { origin, source: Box::new(e) },
        }
    }

    /// An incoming migration's failure, with who caused it (a cancel is [`Error::Cancelled`]).
    pub fn incoming(e: IncomingError) -> Self {
        match e.origin() {
            Origin::Cancel => Error::Cancelled,
            origin => Error::Migration { origin, source: Box::new(e) },
        }
    }

    /// A transport failure while setting up a migration (connect, listen, accept),
    /// with who caused it.
    pub fn transport(e: transports::TransportError) -> Self {
        Self::outgoing(EngineError::Transport(e))
    }

    /// The error and its causes on one line (`a: b: c`), as the CLI prints it.
    pub fn report(&self) -> String {
        engine::error::report(self)
    }

    /// Wrap an I/O error with the file it concerns.
    pub fn file(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::File { path: path.into(), source }
    }
}

/// Result alias of the facade.
pub type Result<T, E = Error> = std::result::Result<T, E>;
