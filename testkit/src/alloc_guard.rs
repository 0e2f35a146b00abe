//! A global allocator for tests and fuzz targets that counts live heap bytes
//! and their peak, and aborts on an allocation the input did not justify.
//!
//! Without a sanitizer libFuzzer cannot see single allocations
//! (`-malloc_limit_mb` needs the sanitizer's malloc hooks), and a zeroed
//! `vec![0; huge]` is lazily mapped so `-rss_limit_mb` may never trip either;
//! a test binary under the guard fails fast instead of taking the machine's
//! memory. Install it with
//! `#[global_allocator] static GUARD: AllocGuard = AllocGuard::new(max_alloc, max_live);`.
//!
//! This file uses only `std` so that the fuzz crate, which is not part of the
//! workspace, includes it as a module (`#[path]`) instead of keeping a copy.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counting allocator with a limit on single allocations and on live bytes.
pub struct AllocGuard {
    max_alloc: usize,
    max_live: usize,
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl AllocGuard {
    /// A guard aborting on any single allocation above `max_alloc` bytes or
    /// more than `max_live` bytes live at once.
    pub const fn new(max_alloc: usize, max_live: usize) -> Self {
        AllocGuard { max_alloc, max_live, live: AtomicUsize::new(0), peak: AtomicUsize::new(0) }
    }

    /// A guard that only counts.
    pub const fn counting() -> Self {
        Self::new(usize::MAX, usize::MAX)
    }

    /// Heap bytes live now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Highest live total since the last [`reset_peak`](Self::reset_peak).
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Restart the peak at the current live total, which it returns: a test's
    /// own peak is then `peak() - reset_peak()`.
    pub fn reset_peak(&self) -> usize {
        let live = self.live();
        self.peak.store(live, Ordering::Relaxed);
        live
    }

    fn check(&self, size: usize) {
        let live = self.live.fetch_add(size, Ordering::Relaxed).saturating_add(size);
        self.peak.fetch_max(live, Ordering::Relaxed);
        if size > self.max_alloc || live > self.max_live {
            // No allocation from here on: write the message by hand and abort,
            // so libFuzzer records the input as a crash.
            let msg: &[u8] = if size > self.max_alloc {
                b"alloc_guard: single allocation above the limit\n"
            } else {
                b"alloc_guard: live allocations above the limit\n"
            };
            // SAFETY: `msg` is a valid buffer of `msg.len()` bytes; fd 2 is
            // stderr, and a failed write is harmless since we abort next.
            unsafe {
                libc_write(2, msg.as_ptr(), msg.len());
            }
            std::process::abort();
        }
    }
}

extern "C" {
    #[link_name = "write"]
    fn libc_write(fd: i32, buf: *const u8, n: usize) -> isize;
}

// SAFETY: every call is forwarded unchanged to the system allocator; the guard
// only counts sizes and aborts, it never hands out memory of its own.
unsafe impl GlobalAlloc for AllocGuard {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        self.check(l.size());
        // SAFETY: the caller's layout has a non-zero size (GlobalAlloc contract),
        // passed on as is.
        unsafe { System.alloc(l) }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        self.check(l.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        self.live.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` through this guard with layout `l`.
        unsafe { System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        self.live.fetch_sub(l.size(), Ordering::Relaxed);
        self.check(new);
        // SAFETY: `p` was allocated by `System` through this guard with layout
        // `l`; `new` is the caller's valid new size.
        unsafe { System.realloc(p, l, new) }
    }
}
