//! Numeric constants of QEMU's stream, named as in QEMU (`migration/savevm.c`,
//! `migration/ram.c`, `migration/migration.h`).

/// `QEVM`, the stream magic.
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
/// The only stream version QEMU accepts.
pub const QEMU_VM_FILE_VERSION: u32 = 3;

/// End of the device part of the stream.
pub const QEMU_VM_EOF: u8 = 0x00;
/// Section with idstr, first part of a live handler.
pub const QEMU_VM_SECTION_START: u8 = 0x01;
/// Section without idstr, iteration of a live handler.
pub const QEMU_VM_SECTION_PART: u8 = 0x02;
/// Section without idstr, last part of a live handler.
pub const QEMU_VM_SECTION_END: u8 = 0x03;
/// Section with idstr, whole device state.
pub const QEMU_VM_SECTION_FULL: u8 = 0x04;
/// Subsection marker inside a vmstate body.
pub const QEMU_VM_SUBSECTION: u8 = 0x05;
/// JSON device description after EOF.
pub const QEMU_VM_VMDESCRIPTION: u8 = 0x06;
/// Configuration record after the header.
pub const QEMU_VM_CONFIGURATION: u8 = 0x07;
/// Command record.
pub const QEMU_VM_COMMAND: u8 = 0x08;
/// Section footer marker.
pub const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;

/// RAM record flags (`RAM_SAVE_FLAG_*`), in the low bits of the be64 record header.
pub mod ram_flags {
    /// Obsolete full-page flag; never valid.
    pub const FULL: u64 = 0x001;
    /// Page of one repeated byte (zero page).
    pub const ZERO: u64 = 0x002;
    /// Block list; the offset bits carry the total RAM size.
    pub const MEM_SIZE: u64 = 0x004;
    /// Raw page.
    pub const PAGE: u64 = 0x008;
    /// End of section body.
    pub const EOS: u64 = 0x010;
    /// Same block as the previous record on this channel.
    pub const CONTINUE: u64 = 0x020;
    /// XBZRLE delta page.
    pub const XBZRLE: u64 = 0x040;
    /// RDMA hook.
    pub const HOOK: u64 = 0x080;
    /// zlib-compressed page (7.2 `compress` capability).
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// Multifd flush (QEMU 8.0 and later; 7.2 rejects it).
    pub const MULTIFD_FLUSH: u64 = 0x200;
}

/// `ENCODING_FLAG_XBZRLE`, the byte after an XBZRLE record header.
pub const ENCODING_FLAG_XBZRLE: u8 = 0x01;

/// The RAM handler's idstr.
pub const RAM_IDSTR: &str = "ram";
/// The RAM handler's section version.
pub const RAM_VERSION: u32 = 4;
