//! Guest RAM blocks backed by files mapped with memmap2: read-only sources for
//! `save`, and sparse, writable images for `analyze --extract-ram`.

use crate::error::{Error, Result};
use memmap2::{Mmap, MmapMut};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Parse `NAME=PATH` (the `--ram` / `--extract-ram` argument form).
pub fn parse_name_path(s: &str) -> Result<(String, PathBuf)> {
    match s.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() && n.len() <= 255 => Ok((n.to_string(), PathBuf::from(p))),
        _ => Err(Error::Usage(format!("expected NAME=PATH (name of at most 255 bytes), got '{s}'"))),
    }
}

/// A read-only mapping of a guest RAM file.
pub struct RamFile {
    /// RAM block name.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    map: Option<Mmap>,
}

impl RamFile {
    /// Map `path` read-only; its length must be a positive multiple of 4 KiB.
    pub fn open(name: &str, path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::file(path, e))?;
        let len = f.metadata().map_err(|e| Error::file(path, e))?.len();
        if len == 0 || len % 4096 != 0 {
            return Err(Error::Usage(format!(
                "{}: RAM file length {len} is not a positive multiple of 4096",
                path.display()
            )));
        }
        // SAFETY: the mapping is read-only and only read through `bytes()`; if another
        // process truncates the file meanwhile we may fault, as QEMU would.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::file(path, e))?;
        Ok(RamFile { name: name.to_string(), path: path.to_path_buf(), map: Some(map) })
    }

    /// The block's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// A writable RAM image: a file of the block's length, created sparse and mapped shared.
pub struct RamImage {
    /// The file.
    pub path: PathBuf,
    map: MmapMut,
    /// One bit per page still known to be zero (a file we created sparse), so a ZERO
    /// record needs no access at all: reading a hole of a tmpfs file allocates a page.
    known_zero: Option<Vec<u64>>,
}

impl RamImage {
    /// Create (or truncate) `path` with `len` bytes, all zero and sparse, and map it.
    pub fn create(path: &Path, len: u64) -> Result<Self> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::file(path, e))?;
        f.set_len(len).map_err(|e| Error::file(path, e))?;
        // SAFETY: we just created and truncated the file and hold the only handle we
        // know of; it is mapped shared so writes land in the file.
        let map = unsafe { MmapMut::map_mut(&f) }.map_err(|e| Error::file(path, e))?;
        let known_zero = Some(vec![u64::MAX; (len / 4096).div_ceil(64) as usize]);
        Ok(RamImage { path: path.to_path_buf(), map, known_zero })
    }

    /// Page `offset` for writing: it is no longer known to be zero.
    fn page_for_write(&mut self, offset: u64) -> Option<&mut [u8]> {
        let o = usize::try_from(offset).ok()?;
        let page = self.map.get_mut(o..o + 4096)?;
        if let Some(k) = &mut self.known_zero {
            let p = (offset / 4096) as usize;
            k[p / 64] &= !(1u64 << (p % 64));
        }
        Some(page)
    }

    fn is_known_zero(&self, offset: u64) -> bool {
        let p = (offset / 4096) as usize;
        self.known_zero.as_ref().is_some_and(|k| k.get(p / 64).is_some_and(|w| w & (1u64 << (p % 64)) != 0))
    }

    /// The image's bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// Flush to the file.
    pub fn flush(&self) -> Result<()> {
        self.map.flush().map_err(|e| Error::file(&self.path, e))
    }
}

impl RamImage {
    /// Map an existing destination RAM file of exactly `len` bytes, or create it
    /// (sparse) when it does not exist.
    pub fn open_or_create(name: &str, path: &Path, len: u64) -> Result<Self> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(path, len),
            Err(e) => Err(Error::file(path, e)),
            Ok(m) if m.len() != len => Err(Error::Usage(format!(
                "size mismatch: RAM block '{name}' is {len:#x} bytes in the stream but {} is {:#x}",
                path.display(),
                m.len()
            ))),
            Ok(_) => {
                let f = OpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::file(path, e))?;
                // SAFETY: a shared writable mapping of a file of the checked length; we are
                // its only writer for the duration of the migration, as QEMU is for its RAM.
                let map = unsafe { MmapMut::map_mut(&f) }.map_err(|e| Error::file(path, e))?;
                Ok(RamImage { path: path.to_path_buf(), map, known_zero: None })
            }
        }
    }
}

/// Destination RAM as a [`PageSink`](savevm_format::PageSink): one mapped image per
/// block index (`None` for blocks not kept), so pages are read straight into the
/// files. The images are set up when the stream's block list arrives.
#[derive(Default)]
pub struct ImageSink {
    images: Vec<Option<RamImage>>,
    targets: Vec<(String, PathBuf)>,
    every_block: bool,
    total: u64,
}

impl ImageSink {
    /// A destination: every block of the stream needs a file among `targets`
    /// (opened if it exists with the right length, else created).
    pub fn destination(targets: Vec<(String, PathBuf)>) -> Self {
        ImageSink { targets, every_block: true, ..Default::default() }
    }

    /// An extraction: only the blocks named in `targets` are kept (files created).
    pub fn extract(targets: Vec<(String, PathBuf)>) -> Self {
        ImageSink { targets, every_block: false, ..Default::default() }
    }

    /// Sum of the stream's block lengths (once the block list arrived).
    pub fn total(&self) -> u64 {
        self.total
    }

    fn setup(&mut self, blocks: &[savevm_format::RamBlock]) -> Result<()> {
        let mut images = Vec::with_capacity(blocks.len());
        for b in blocks {
            let target = self.targets.iter().find(|(n, _)| n == &b.name);
            images.push(match (target, self.every_block) {
                (Some((_, p)), true) => Some(RamImage::open_or_create(&b.name, p, b.length)?),
                (Some((_, p)), false) => Some(RamImage::create(p, b.length)?),
                (None, true) => {
                    return Err(Error::Usage(format!(
                        "the stream has RAM block '{}' but no --ram {}=PATH was given",
                        b.name, b.name
                    )))
                }
                (None, false) => None,
            });
        }
        self.total = blocks.iter().map(|b| b.length).sum();
        self.images = images;
        Ok(())
    }

    /// True when block `index` has an image.
    pub fn has(&self, index: usize) -> bool {
        matches!(self.images.get(index), Some(Some(_)))
    }

    /// Flush every image to its file.
    pub fn flush(&self) -> Result<()> {
        self.images.iter().flatten().try_for_each(RamImage::flush)
    }

    fn image(&mut self, index: usize) -> Option<&mut RamImage> {
        self.images.get_mut(index)?.as_mut()
    }
}

impl savevm_format::PageSink for ImageSink {
    fn ram_blocks(&mut self, blocks: &[savevm_format::RamBlock]) -> std::result::Result<(), String> {
        self.setup(blocks).map_err(|e| e.to_string())
    }

    fn page_mut(&mut self, block: &savevm_format::RamBlock, offset: u64) -> Option<&mut [u8]> {
        self.image(block.index)?.page_for_write(offset)
    }

    fn fill_page(&mut self, block: &savevm_format::RamBlock, offset: u64, fill: u8) {
        let Some(img) = self.image(block.index) else { return };
        if fill == 0 && img.is_known_zero(offset) {
            return;
        }
        if let Some(page) = img.page_for_write(offset) {
            if fill != 0 || !savevm_format::ram::is_zero_page(page) {
                page.fill(fill);
            }
        }
    }

    fn discard(&mut self, block: &savevm_format::RamBlock, start: u64, len: u64) {
        if let Some(img) = self.image(block.index) {
            img.known_zero = None; // conservative: the range is zeroed below
            if let Some(r) = img.bytes_mut().get_mut(start as usize..(start + len) as usize) {
                r.fill(0);
            }
        }
    }
}
