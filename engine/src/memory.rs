//! Guest RAM as the engine sees it: regions of memory the guest writes while they
//! are read, handed out only as volatile views (vm-memory's [`VolatileSlice`]),
//! never as `&[u8]`, and each region with the dirty sources that report its writes.

use crate::dirty::DirtySource;
use std::ptr::NonNull;
use vm_memory::VolatileSlice;

/// Target page size: [`savevm_format::TARGET_PAGE_SIZE`].
pub const PAGE: usize = savevm_format::TARGET_PAGE_SIZE;

/// A RAM region of the guest, read by the engine while the guest runs.
#[derive(Debug)]
pub struct GuestRegion {
    name: String,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory that `GuestRegion::new`'s contract keeps mapped;
// the engine reads it only through volatile accesses (concurrent guest writes are what
// dirty tracking is for), so sending the handle to another thread is sound.
unsafe impl Send for GuestRegion {}
// SAFETY: as above; shared access only forms volatile views, never references.
unsafe impl Sync for GuestRegion {}

impl GuestRegion {
    /// Region `name` of `len` bytes (a positive multiple of 4096) at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped and readable for the region's lifetime. The
    /// guest may write it at any time; pages it writes after being sent must be
    /// reported by one of the region's dirty sources (write first, then mark).
    pub unsafe fn new(name: impl Into<String>, ptr: *mut u8, len: usize) -> Option<Self> {
        let ptr = NonNull::new(ptr)?;
        (len > 0 && len.is_multiple_of(PAGE)).then(|| GuestRegion { name: name.into(), ptr, len })
    }

    /// RAM block name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty region (never: `new` refuses them).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        (self.len / PAGE) as u64
    }

    /// `len` bytes at `offset` as a volatile view, or `None` when the range is not
    /// inside the region.
    pub fn slice(&self, offset: u64, len: usize) -> Option<VolatileSlice<'_>> {
        let off = usize::try_from(offset).ok()?;
        if off.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: `off + len <= self.len` (checked above), so the view lies inside the
        // range `new`'s contract keeps mapped for the region's lifetime; VolatileSlice
        // only accesses it with volatile reads and writes.
        Some(unsafe { VolatileSlice::new(self.ptr.as_ptr().add(off), len) })
    }

    /// Page `p` (clamped to the last page) as a volatile view: its bytes may change
    /// under the reader while the guest runs.
    pub fn page(&self, p: u64) -> VolatileSlice<'_> {
        let off = usize::try_from(p).unwrap_or(usize::MAX).min(self.len / PAGE - 1) * PAGE;
        // SAFETY: `off + PAGE <= len` (clamped above) and the range is mapped for the
        // region's lifetime per `new`'s contract; VolatileSlice only ever accesses it
        // with volatile reads and writes, which is what memory shared with a running
        // guest requires.
        unsafe { VolatileSlice::new(self.ptr.as_ptr().add(off), PAGE) }
    }
}

/// True when every byte of `page` is zero, read with volatile loads (16 bytes at a
/// time on x86_64 for aligned pages, so the scan stays memory bound).
pub fn is_zero(page: &VolatileSlice<'_>) -> bool {
    let guard = page.ptr_guard();
    let (ptr, len) = (guard.as_ptr(), page.len());
    #[cfg(target_arch = "x86_64")]
    if ptr.align_offset(16) == 0 && len.is_multiple_of(64) {
        use std::arch::x86_64::{__m128i, _mm_cmpeq_epi8, _mm_movemask_epi8, _mm_or_si128, _mm_setzero_si128};
        let p = ptr.cast::<__m128i>();
        for k in (0..len / 16).step_by(4) {
            // SAFETY: `p` is 16-byte aligned (checked above) and `k + 3 < len / 16`, so the
            // four loads lie inside the view, which its constructor guarantees is mapped;
            // volatile loads are how memory a running guest writes may be read. SSE2 is
            // part of the x86_64 baseline.
            let nonzero = unsafe {
                let a = std::ptr::read_volatile(p.add(k));
                let b = std::ptr::read_volatile(p.add(k + 1));
                let c = std::ptr::read_volatile(p.add(k + 2));
                let d = std::ptr::read_volatile(p.add(k + 3));
                let acc = _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d));
                _mm_movemask_epi8(_mm_cmpeq_epi8(acc, _mm_setzero_si128())) != 0xffff
            };
            if nonzero {
                return false;
            }
        }
        return true;
    }
    slow_is_zero(ptr, len)
}

/// Byte-wise volatile zero check (unaligned views, other architectures).
fn slow_is_zero(ptr: *const u8, len: usize) -> bool {
    (0..len).all(|i| {
        // SAFETY: `i < len`: inside a view the caller got from a VolatileSlice.
        unsafe { std::ptr::read_volatile(ptr.add(i)) == 0 }
    })
}

/// One guest RAM region in a migration, with the sources that report the pages
/// the guest (or the VMM) writes while it is sent: KVM's dirty log, userfaultfd
/// write-protect, a [`DirtyBitmap`](crate::dirty::DirtyBitmap) the VMM marks
/// (`Arc<DirtyBitmap>` is a source), or several of them ORed together.
pub struct RamRegion<'a> {
    memory: &'a GuestRegion,
    pub(crate) dirty: Vec<Box<dyn DirtySource + 'a>>,
}

impl std::fmt::Debug for RamRegion<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RamRegion({}, {} dirty sources)", self.memory.name(), self.dirty.len())
    }
}

impl<'a> RamRegion<'a> {
    /// `memory` with no dirty source yet (a stopped guest needs none).
    pub fn new(memory: &'a GuestRegion) -> Self {
        RamRegion { memory, dirty: Vec::new() }
    }

    /// Add a dirty source (`&mut KvmDirtyLog`, `Arc<DirtyBitmap>`, ...) for this region.
    pub fn with_dirty(mut self, source: impl DirtySource + 'a) -> Self {
        self.dirty.push(Box::new(source));
        self
    }

    /// The region's memory.
    pub fn memory(&self) -> &'a GuestRegion {
        self.memory
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check_sees_every_byte() {
        let mut buf = vec![0u8; PAGE * 2];
        let base = buf.as_mut_ptr();
        // SAFETY: `buf` outlives the region and is not otherwise accessed while it is read.
        let r = unsafe { GuestRegion::new("t", base, PAGE * 2) }.expect("region");
        assert!(is_zero(&r.page(0)) && is_zero(&r.page(1)));
        for i in [0usize, 1, 15, 16, 63, 64, 4000, 4095] {
            r.page(1).copy_from(&[0u8; PAGE]);
            let one = [1u8];
            r.page(1).subslice(i, 1).expect("in range").copy_from(&one);
            assert!(!is_zero(&r.page(1)), "byte {i}");
            assert!(is_zero(&r.page(0)));
        }
        // An unaligned view takes the byte-wise path and still decides right.
        let v = r.page(0).subslice(1, 100).expect("in range");
        assert!(is_zero(&v));
        v.subslice(99, 1).expect("in range").copy_from(&[7u8]);
        assert!(!is_zero(&v));
        drop(r);
        assert_eq!(buf[100], 7);
    }
}
