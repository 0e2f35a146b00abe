//! The RAM section (`ram`, version 4): block list, record headers and payloads.

use crate::error::EncodeError;
use crate::wire::ram_flags;
use std::io::Write;

/// One RAM block as listed in the MEM_SIZE record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    /// Position in the block list (0-based).
    pub index: usize,
    /// RAMBlock idstr, e.g. `mem`, `pc.ram`, `/rom@etc/acpi/tables`.
    pub name: String,
    /// `used_length` in bytes.
    pub length: u64,
    /// Host page size, present only for postcopy hugepage blocks.
    pub page_size: Option<u64>,
    /// Guest-physical address, present only with `x-ignore-shared`.
    pub gpa: Option<u64>,
}

impl RamBlock {
    /// A plain block (no page-size or GPA field) for writing.
    pub fn new(index: usize, name: impl Into<String>, length: u64) -> Self {
        RamBlock { index, name: name.into(), length, page_size: None, gpa: None }
    }
}

/// Kind of a RAM record, from its flags (CONTINUE stripped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// MEM_SIZE block list.
    MemSize,
    /// Zero (fill) page.
    Zero,
    /// Raw page.
    Page,
    /// XBZRLE page.
    Xbzrle,
    /// zlib-compressed page.
    Compressed,
    /// End of section.
    Eos,
    /// Multifd flush (newest QEMU).
    MultifdFlush,
    /// RDMA hook.
    Hook,
}

impl RecordKind {
    /// Classify `flags` the way QEMU's `ram_load_precopy` does; `None` if invalid.
    pub fn from_flags(flags: u64) -> Option<RecordKind> {
        use ram_flags::*;
        let cont = flags & CONTINUE != 0;
        let k = match flags & !CONTINUE {
            MEM_SIZE => RecordKind::MemSize,
            ZERO => RecordKind::Zero,
            PAGE => RecordKind::Page,
            XBZRLE => RecordKind::Xbzrle,
            COMPRESS_PAGE => RecordKind::Compressed,
            EOS => RecordKind::Eos,
            MULTIFD_FLUSH => RecordKind::MultifdFlush,
            HOOK => RecordKind::Hook,
            _ => return None,
        };
        // CONTINUE only modifies records that name a block.
        if cont && !k.names_block() {
            return None;
        }
        Some(k)
    }

    /// Records that carry a block name unless CONTINUE is set.
    pub fn names_block(self) -> bool {
        matches!(self, RecordKind::Zero | RecordKind::Page | RecordKind::Xbzrle | RecordKind::Compressed)
    }
}

/// Largest record header: be64 + length byte + 255-byte name.
pub const MAX_RECORD_HEADER: usize = 8 + 1 + 255;

/// Build a page record header (`be64 offset|flags`, then the block name when
/// `block` is `Some`, i.e. when CONTINUE is not set) into `buf`; returns its length.
///
/// `flags` must be one of ZERO, PAGE, XBZRLE, COMPRESS_PAGE; CONTINUE is added
/// when `block` is `None`.
pub fn record_header(
    buf: &mut [u8; MAX_RECORD_HEADER],
    offset: u64,
    flags: u64,
    block: Option<&str>,
) -> Result<usize, EncodeError> {
    let flags = if block.is_none() { flags | ram_flags::CONTINUE } else { flags };
    buf[..8].copy_from_slice(&(offset | flags).to_be_bytes());
    match block {
        None => Ok(8),
        Some(name) => {
            let n = name.len();
            buf[8] = u8::try_from(n).map_err(|_| EncodeError::NameTooLong(name.to_string()))?;
            buf[9..9 + n].copy_from_slice(name.as_bytes());
            Ok(9 + n)
        }
    }
}

/// Write the MEM_SIZE record and block list (the body of the RAM START section, before EOS); returns its length.
pub fn write_block_list<W: Write>(w: &mut W, blocks: &[RamBlock]) -> Result<u64, EncodeError> {
    let total: u64 = blocks.iter().map(|b| b.length).sum();
    w.write_all(&(total | ram_flags::MEM_SIZE).to_be_bytes())?;
    let mut n = 8u64;
    for b in blocks {
        let len = b.name.len();
        w.write_all(&[u8::try_from(len).map_err(|_| EncodeError::NameTooLong(b.name.clone()))?])?;
        w.write_all(b.name.as_bytes())?;
        w.write_all(&b.length.to_be_bytes())?;
        n += 1 + len as u64 + 8;
        if let Some(ps) = b.page_size {
            w.write_all(&ps.to_be_bytes())?;
            n += 8;
        }
        if let Some(gpa) = b.gpa {
            w.write_all(&gpa.to_be_bytes())?;
            n += 8;
        }
    }
    Ok(n)
}

/// True when every byte of `page` is zero (64 bytes at a time, vectorised).
pub fn is_zero_page(page: &[u8]) -> bool {
    let (chunks, tail) = page.as_chunks::<64>();
    chunks.iter().all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0) && tail.iter().all(|&b| b == 0)
}
