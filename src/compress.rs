//! Compressed save and restore (`--compress zstd[:LEVEL]`): the whole migration
//! stream as one standard zstd frame, written by the `zstd` crate's multi-threaded
//! encoder, so `zstd -dc FILE` gives back the plain stream QEMU 7.2 loads; `recv`
//! recognises the frame by its magic number and decodes it.

use crate::error::{Error, Result};
use engine::source::{EngineError, PageWriter};
use std::io::{self, Write};
use transports::MigrationWriter;
use vm_memory::VolatileSlice;

/// The magic number that starts a zstd frame (RFC 8878), as it is on disk.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The level used for `--compress zstd` without one (QEMU's `multifd-zstd-level` default).
pub const DEFAULT_LEVEL: i32 = 1;

/// `--compress zstd[:LEVEL]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// The zstd level (1..=19; higher is smaller and slower).
    pub level: i32,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let level = match s.split_once(':') {
            None if s == "zstd" => DEFAULT_LEVEL,
            Some(("zstd", l)) => l
                .parse::<i32>()
                .ok()
                .filter(|l| (1..=19).contains(l))
                .ok_or_else(|| format!("'{s}': the zstd level must be an integer from 1 to 19"))?,
            _ => return Err(format!("'{s}': expected zstd or zstd:LEVEL")),
        };
        Ok(Compression { level })
    }
}

/// A stream written through a zstd encoder onto a channel's writer: one frame for
/// the whole stream. Guest pages are copied into the encoder (it keeps its input
/// until a worker compresses it), so nothing is sent in place.
pub struct ZstdPageWriter<'g> {
    enc: zstd::stream::write::Encoder<'static, MigrationWriter<'g>>,
    /// Uncompressed bytes written so far.
    written: u64,
    page: Box<[u8; savevm_format::TARGET_PAGE_SIZE]>,
}

impl<'g> ZstdPageWriter<'g> {
    /// Compress at `c.level` onto `w`, with one worker per CPU.
    pub fn new(w: MigrationWriter<'g>, c: Compression) -> Result<Self> {
        let mut enc = zstd::stream::write::Encoder::new(w, c.level).map_err(Error::Io)?;
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        enc.multithread(workers).map_err(Error::Io)?;
        // `zstd -dc` and our reader check it: a corrupted file is an error, not bad RAM.
        enc.include_checksum(true).map_err(Error::Io)?;
        Ok(ZstdPageWriter { enc, written: 0, page: Box::new([0u8; savevm_format::TARGET_PAGE_SIZE]) })
    }
}

impl Write for ZstdPageWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.enc.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        // Flushing mid-frame would end a block early for nothing: the file is read whole.
        Ok(())
    }
}

impl<'g> PageWriter<'g> for ZstdPageWriter<'g> {
    fn write_page(&mut self, page: VolatileSlice<'g>) -> io::Result<()> {
        let n = page.len().min(self.page.len());
        page.copy_to(&mut self.page[..n]);
        self.enc.write_all(&self.page[..n])?;
        self.written += n as u64;
        Ok(())
    }
    fn flush_now(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn bytes_sent(&self) -> u64 {
        self.written
    }
    fn close(self) -> std::result::Result<(), EngineError> {
        let w = self.enc.finish()?;
        Ok(w.close()?)
    }
}

/// What a compressed save reports (`"zstd"` in the statistics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompressedStats {
    /// The level.
    pub level: i32,
    /// Bytes of the stream before compression.
    pub stream_size: u64,
    /// Bytes written (the zstd frame).
    pub compressed_size: u64,
    /// Seconds the whole save or restore took.
    pub secs: f64,
}

impl CompressedStats {
    /// `{"level"?, "stream-size", "compressed-size", "ratio", "gib-per-s"}` (GiB/s of
    /// the uncompressed stream over the whole run); the level is unknown on restore.
    pub fn to_json(&self) -> serde_json::Value {
        let ratio = if self.compressed_size > 0 { self.stream_size as f64 / self.compressed_size as f64 } else { 0.0 };
        let gibs = if self.secs > 0.0 { self.stream_size as f64 / self.secs / (1u64 << 30) as f64 } else { 0.0 };
        let mut v = serde_json::json!({
            "stream-size": self.stream_size,
            "compressed-size": self.compressed_size,
            "ratio": (ratio * 1000.0).round() / 1000.0,
            "gib-per-s": (gibs * 1000.0).round() / 1000.0,
        });
        if self.level > 0 {
            v["level"] = self.level.into();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_levels() {
        assert_eq!("zstd".parse(), Ok(Compression { level: DEFAULT_LEVEL }));
        assert_eq!("zstd:9".parse(), Ok(Compression { level: 9 }));
        assert!("zstd:0".parse::<Compression>().is_err());
        assert!("zstd:x".parse::<Compression>().is_err());
        assert!("gzip".parse::<Compression>().is_err());
    }
}
