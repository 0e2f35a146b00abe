//! qmig: a live-migration engine that speaks QEMU's migration stream.
//!
//! This root crate is the embedding facade and the home of the CLI. The wire
//! format lives in [`savevm_format`], channels in [`transports`], policy in
//! [`engine`]. [`analyze`] and [`save`] are the library side of the CLI commands.

pub mod analyze;
mod error;
pub mod ramfile;
pub mod recv;
pub mod send;

pub use error::{Error, Result};

pub use engine;
pub use savevm_format;
pub use transports;
