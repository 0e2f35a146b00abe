//! The incoming side's guest memory: a [`PageSink`] that writes incoming pages
//! straight into the guest's [`GuestRegion`]s (volatile copies only), as QEMU's
//! destination does into its RAM blocks.
//!
//! The stream's block list is checked against the regions before any page (QEMU's
//! "Unknown ramblock" and "Length mismatch" refusals): every block must be a region
//! of the same name and length, so a stream can neither name memory the guest does
//! not have nor make the destination set up more than the guest's own RAM. Pages
//! are placed at the stream's target page size (`configuration/target-page-bits`,
//! 1 KiB to 64 KiB), whatever the host's page size. It is a pre-copy sink
//! ([`Incoming::run`](crate::incoming::Incoming::run), where postcopy stays off, so
//! no discard reaches it); postcopy needs a `PostcopySink` (host memory for userfaultfd).

use crate::memory::GuestRegion;
use savevm_format::{PageSink, PageSlot, RamBlock};

/// Incoming pages into the guest's regions (see the module documentation).
#[derive(Debug)]
pub struct GuestSink<'a> {
    regions: &'a [GuestRegion],
    /// Region of each stream block, by block index (set by the block list).
    placed: Vec<usize>,
    /// The stream's target page size.
    tps: usize,
}

impl<'a> GuestSink<'a> {
    /// A sink over `regions` (RAM block names are the regions' names).
    pub fn new(regions: &'a [GuestRegion]) -> Self {
        GuestSink { regions, placed: Vec::new(), tps: savevm_format::TARGET_PAGE_SIZE }
    }

    /// The stream's target page size (4096 until the stream says otherwise).
    pub fn page_size(&self) -> usize {
        self.tps
    }

    fn region(&self, block: &RamBlock) -> Option<&'a GuestRegion> {
        let regions: &'a [GuestRegion] = self.regions;
        regions.get(*self.placed.get(block.index)?)
    }
}

impl PageSink for GuestSink<'_> {
    fn target_page_size(&mut self, tps: u64) -> Result<(), String> {
        // The decoder accepts 1 KiB..64 KiB; block lengths are multiples of it (checked
        // by the decoder) and equal to the regions' (checked below).
        self.tps = usize::try_from(tps).map_err(|_| format!("target page size {tps} bytes"))?;
        Ok(())
    }

    fn ram_blocks(&mut self, blocks: &[RamBlock]) -> Result<(), String> {
        let mut placed = Vec::with_capacity(blocks.len());
        for b in blocks {
            let Some(i) = self.regions.iter().position(|r| r.name() == b.name) else {
                return Err(format!(
                    "Unknown ramblock \"{}\" ({:#x} bytes): this guest's RAM is {}",
                    b.name.escape_debug(),
                    b.length,
                    self.describe()
                ));
            };
            let len = self.regions[i].len() as u64;
            if len != b.length {
                return Err(format!(
                    "Length mismatch: RAM block \"{}\" is {:#x} bytes in the stream, {len:#x} in this guest",
                    b.name.escape_debug(),
                    b.length
                ));
            }
            placed.push(i);
        }
        self.placed = placed;
        Ok(())
    }

    fn page_mut(&mut self, block: &RamBlock, offset: u64) -> Option<PageSlot<'_>> {
        let tps = self.tps;
        self.region(block)?.slice(offset, tps).map(PageSlot::Guest)
    }
}

impl GuestSink<'_> {
    fn describe(&self) -> String {
        let r: Vec<String> =
            self.regions.iter().map(|r| format!("\"{}\" ({:#x} bytes)", r.name().escape_debug(), r.len())).collect();
        if r.is_empty() {
            "empty".into()
        } else {
            r.join(", ")
        }
    }
}
