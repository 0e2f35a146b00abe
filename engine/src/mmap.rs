//! Guest memory from vm-memory (feature `vm-memory`): a VMM that keeps its RAM in
//! a [`GuestMemoryMmap`] hands it to the engine without writing `unsafe`, and a
//! VMM whose device emulation records its own writes in vm-memory's
//! [`AtomicBitmap`] (as Cloud Hypervisor's virtio queues do) gets those marks
//! harvested at every sync.
//!
//! ```
//! use engine::mmap::MmapRam;
//! use std::sync::Arc;
//! use vm_memory::bitmap::AtomicBitmap;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let mem: Arc<GuestMemoryMmap<AtomicBitmap>> = Arc::new(GuestMemoryMmap::from_ranges(&[
//!     (GuestAddress(0), 2 << 20),
//!     (GuestAddress(4 << 20), 2 << 20),
//! ])?);
//! // Writes through vm-memory's accessors mark the region's bitmap.
//! mem.write_obj(7u64, GuestAddress(4 << 20))?;
//! let ram = MmapRam::new(mem.clone(), |i| format!("ram{i}"))?;
//! let regions = ram.tracked(); // each region with its AtomicBitmap as a dirty source
//! assert_eq!(regions.len(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::dirty::{DirtyError, DirtySource};
use crate::memory::{GuestRegion, RamRegion, PAGE};
use std::sync::Arc;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

/// Why a `GuestMemoryMmap` cannot be migrated as it is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MmapRamError {
    /// A region's length is not a positive multiple of the 4 KiB target page.
    #[error("guest memory region {index} is {len} bytes, not a positive multiple of {PAGE}")]
    RegionSize {
        /// The region's index in the memory.
        index: usize,
        /// Its length.
        len: u64,
    },
    /// A region has no host mapping (vm-memory refused its host address).
    #[error("guest memory region {index} has no host address")]
    NoHostAddress {
        /// The region's index in the memory.
        index: usize,
    },
    /// A region's dirty bitmap does not have one bit per 4 KiB page.
    #[error("the dirty bitmap of guest memory region {index} covers {bits} pages, the region has {pages}")]
    BitmapSize {
        /// The region's index.
        index: usize,
        /// Bits in its bitmap.
        bits: usize,
        /// 4 KiB pages in the region.
        pages: u64,
    },
}

/// The RAM of a vm-memory [`GuestMemoryMmap`] as engine regions: holding the memory
/// keeps every mapping alive for as long as the regions can be used, so building
/// them needs no `unsafe` from the VMM.
pub struct MmapRam<B: Bitmap + 'static = ()> {
    mem: Arc<GuestMemoryMmap<B>>,
    regions: Vec<GuestRegion>,
}

impl<B: Bitmap + 'static> std::fmt::Debug for MmapRam<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmapRam").field("regions", &self.regions).finish()
    }
}

impl<B: Bitmap + 'static> MmapRam<B> {
    /// Every region of `mem`, in order, as RAM block `name(index)`.
    pub fn new(mem: Arc<GuestMemoryMmap<B>>, name: impl Fn(usize) -> String) -> Result<Self, MmapRamError> {
        let mut regions = Vec::new();
        for (index, r) in mem.iter().enumerate() {
            let len = r.len();
            let size = usize::try_from(len).ok().filter(|l| *l > 0 && l.is_multiple_of(PAGE));
            let size = size.ok_or(MmapRamError::RegionSize { index, len })?;
            let host = r.get_host_address(MemoryRegionAddress(0)).map_err(|_| MmapRamError::NoHostAddress { index })?;
            // SAFETY: the mapping of `size` bytes at `host` belongs to `mem`, which this
            // value holds (an `Arc`) for as long as the region lives: the regions are
            // only lent out by reference to `self`. The guest writing it concurrently
            // is what the dirty sources report.
            let region = unsafe { GuestRegion::new(name(index), host, size) };
            regions.push(region.ok_or(MmapRamError::RegionSize { index, len })?);
        }
        Ok(MmapRam { mem, regions })
    }

    /// The regions, in the memory's order.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// The regions with no dirty source yet (add KVM's log and others with
    /// [`RamRegion::with_dirty`]).
    pub fn ram(&self) -> Vec<RamRegion<'_>> {
        self.regions.iter().map(RamRegion::new).collect()
    }

    /// The memory the regions map.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap<B>> {
        &self.mem
    }
}

impl MmapRam<AtomicBitmap> {
    /// The regions, each with its vm-memory [`AtomicBitmap`] as a dirty source (the
    /// writes the VMM makes through vm-memory's accessors); add KVM's log for the
    /// guest's own writes with [`RamRegion::with_dirty`].
    pub fn tracked(&self) -> Vec<RamRegion<'_>> {
        self.regions
            .iter()
            .zip(self.mem.iter())
            .map(|(g, r)| RamRegion::new(g).with_dirty(AtomicBitmapSource::new(vm_memory::MmapRegion::bitmap(r))))
            .collect()
    }

    /// Check that every region's bitmap has one bit per 4 KiB page (vm-memory sizes
    /// it by the host page size, 4 KiB on x86).
    pub fn check_bitmaps(&self) -> Result<(), MmapRamError> {
        for (index, (g, r)) in self.regions.iter().zip(self.mem.iter()).enumerate() {
            let bits = vm_memory::MmapRegion::bitmap(r).len();
            if bits as u64 != g.pages() {
                return Err(MmapRamError::BitmapSize { index, bits, pages: g.pages() });
            }
        }
        Ok(())
    }
}

/// vm-memory's [`AtomicBitmap`] (one bit per page of a region) as a dirty source.
/// Each sync takes the marks with vm-memory's `get_and_reset`, which returns them
/// in a new vector: one allocation per sync, the one exception to the engine's
/// no-allocation rule for sources (vm-memory offers no drain into a buffer).
#[derive(Debug, Clone, Copy)]
pub struct AtomicBitmapSource<'a> {
    bitmap: &'a AtomicBitmap,
}

impl<'a> AtomicBitmapSource<'a> {
    /// A source over `bitmap`.
    pub fn new(bitmap: &'a AtomicBitmap) -> Self {
        AtomicBitmapSource { bitmap }
    }
}

impl DirtySource for AtomicBitmapSource<'_> {
    /// Marks made before the migration are covered by the bulk pass: dropped.
    fn start(&mut self) -> Result<(), DirtyError> {
        self.bitmap.reset();
        Ok(())
    }

    fn sync(&mut self, out: &mut [u64]) -> Result<(), DirtyError> {
        for (o, w) in out.iter_mut().zip(self.bitmap.get_and_reset()) {
            *o |= w;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        Ok(())
    }
}
