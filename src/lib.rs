//! qmig: a live-migration engine that speaks QEMU's migration stream.
//!
//! This library is the embedding facade: the wire format lives in
//! [`savevm_format`], channels in [`transports`], policy in [`engine`];
//! [`analyze`], [`ramfile`], [`send`], [`recv`] and [`compress`] are the library side of the
//! CLI commands; [`qmp`] is a QMP server in QEMU's framing and `vm` (feature
//! `kvm`) the VM behind `qmig vm`. The CLI itself (`src/main.rs`, with its `demo`) and the test
//! support (the `testkit` crate) are not part of it.

pub mod analyze;
pub mod compress;
pub mod control;
mod error;
pub mod qmp;
pub mod ramfile;
pub mod recv;
pub mod send;
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
pub mod vm;
pub mod watch;

pub use error::{Error, Result};

pub use engine;
pub use savevm_format;
pub use transports;
