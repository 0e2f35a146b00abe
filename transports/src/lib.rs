//! # transports
//!
//! Moves a migration stream over the channels QEMU's users use, in both
//! directions: `tcp:`, `unix:`, `fd:`, `exec:` and `file:` URIs
//! ([`MigrationUri`]), behind a buffered, vectored, rate-limited writer and a
//! buffered reader ([`MigrationWriter`], [`MigrationReader`], QEMU's QEMUFile).
//! Every blocking wait also watches a [`CancelToken`], so another thread can
//! cancel at any moment: a writer blocked on a full socket or a reader on an
//! empty one returns a [`Cancelled`] error at once, sockets are shut down and
//! `exec:` children killed and reaped. Socket channels can carry TLS with QEMU's
//! x509 credentials ([`tls`], on rustls). Nothing here knows about RAM.
//!
//! ```no_run
//! use transports::{connect, CancelToken, MigrationWriter, RateLimit};
//! use std::io::Write;
//! let cancel = CancelToken::new()?;
//! let ch = connect(&"unix:/tmp/migrate.sock".parse()?, &cancel)?;
//! let rate = RateLimit::new(64 << 20); // max-bandwidth, bytes/s
//! let page = vec![0x41u8; 4096];
//! let mut w = MigrationWriter::new(ch, rate.clone());
//! w.write_all(b"QEVM")?;          // copied into the buffer
//! w.write_borrowed(&page)?;       // sent in place with writev
//! rate.set_max_bandwidth(0);      // from any thread: lift the limit
//! w.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

mod cancel;
mod channel;
mod error;
mod ratelimit;
mod stream;
pub mod tls;
mod uri;

pub use cancel::{is_cancelled, CancelToken, Cancelled};
pub use channel::{
    connect, connect_with, Channel, ChannelOptions, Direction, Listener, ReturnPath, DEFAULT_IO_TIMEOUT,
};
pub use error::{is_no_progress, NoProgress, TransportError};
pub use ratelimit::{Pacer, RateLimit, WINDOW};
pub use stream::{MigrationReader, MigrationWriter};
pub use tls::{TlsAuthz, TlsClient, TlsError, TlsParams, TlsServer};
pub use uri::{MigrationUri, UriError};
