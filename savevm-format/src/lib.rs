//! # savevm-format
//!
//! QEMU's migration stream ("savevm" format, `QEVM` version 3), read and written
//! byte-exact with QEMU 7.2. Nothing here knows about sockets, but the crate is
//! not sans-IO: the [`Decoder`] is a *blocking pull decoder* over a
//! [`Read`](std::io::Read). Each call to [`Decoder::next`] reads exactly the
//! bytes its event needs and blocks in `read` until they are there (a short read
//! is simply retried; the end of the input mid-record is
//! [`ErrorKind::UnexpectedEof`]). An event loop therefore cannot push bytes in
//! chunk by chunk as they arrive: give the decoder its own thread with a
//! blocking reader (a socket, a pipe, a file) or a buffer that already holds the
//! stream. The writer ([`StreamWriter`]) writes to any `Write`.
//!
//! Features: `zstd` (default) decodes zstd-compressed multifd channels; without
//! it such a channel is a typed error and the zstd C library is not built.
//!
//! - [`Decoder`]: a pull decoder yielding [`Event`]s (header, configuration,
//!   sections, RAM records, device state, commands, EOF, vmdesc) from any `Read`,
//!   with bounded memory and typed errors carrying the byte offset and section;
//!   section bodies only their owner can parse (hand-written devices, live
//!   handlers other than RAM) go to the caller's loader ([`Decoder::register_raw`]).
//! - [`StreamWriter`]: the writer, and [`write_stopped_guest`] for a whole stream.
//! - [`vmstate`]: declarative device descriptions that encode, decode and describe
//!   themselves in vmdesc JSON; [`builtin`] has QEMU's `timer` and `globalstate`.
//! - [`command`]: `MIG_CMD_*` commands and `MIG_RP_MSG_*` return-path messages.
//! - [`xbzrle`]: XBZRLE page deltas; [`multifd`]: multifd channel packets.
//!
//! ```
//! use savevm_format::{write_stopped_guest, Decoder, Event, StoppedGuest};
//! let ram = vec![0u8; 8 * 4096];
//! let (stream, _) = write_stopped_guest(Vec::new(), &[("mem", &ram)], &StoppedGuest::default())?;
//! let mut d = Decoder::new(&stream[..]);
//! let mut zero = 0;
//! while let Some(ev) = d.next()? {
//!     if let Event::ZeroPage { .. } = ev { zero += 1 }
//! }
//! assert_eq!(zero, 8);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![warn(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap, clippy::cast_lossless)]

pub mod builtin;
pub mod command;
mod decoder;
mod error;
mod input;
pub mod multifd;
pub mod ram;
pub mod vmstate;
pub mod wire;
mod writer;
pub mod xbzrle;

/// QEMU's `TARGET_PAGE_SIZE` on x86-64: the page size of RAM records unless a
/// stream's configuration says otherwise (`target-page-bits`).
pub const TARGET_PAGE_SIZE: usize = 4096;

pub use command::{Command, RpMessage, RpReader};
pub use decoder::{
    find_trailing_vmdesc, Configuration, Decoder, DescriptionSource, Event, Limits, NoSink, PageSink, PageSlot,
    RawBody, SectionHeader, SectionKind,
};
pub use error::{EncodeError, Error, ErrorKind, Result};
pub use ram::RamBlock;
pub use writer::{
    section_ids, to_qemu_json, write_guest_epilogue, write_guest_prologue, write_guest_prologue_with,
    write_stopped_guest, BodyWriter, RamStats, StoppedGuest, StreamWriter,
};
