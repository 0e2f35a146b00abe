//! A global allocator for the fuzz targets that turns a huge allocation into a
//! crash. Without a sanitizer libFuzzer cannot see single allocations
//! (`-malloc_limit_mb` needs the sanitizer's malloc hooks), and a zeroed
//! `vec![0; huge]` is lazily mapped so `-rss_limit_mb` may never trip either.
//! Inputs are at most a few MiB, so no decoder allocation legitimately needs
//! more than `MAX_ALLOC` at once, or more than `MAX_LIVE` in total.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Largest single allocation.
pub const MAX_ALLOC: usize = 128 << 20;
/// Largest total of live allocations.
pub const MAX_LIVE: usize = 1 << 30;

pub struct Guard;

static LIVE: AtomicUsize = AtomicUsize::new(0);

fn check(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    if size > MAX_ALLOC || live > MAX_LIVE {
        // No allocation from here on: write the message by hand and abort, so
        // libFuzzer records the input as a crash.
        let msg: &[u8] = if size > MAX_ALLOC {
            b"alloc_guard: single allocation above MAX_ALLOC\n"
        } else {
            b"alloc_guard: live allocations above MAX_LIVE\n"
        };
        unsafe {
            libc_write(2, msg.as_ptr(), msg.len());
        }
        std::process::abort();
    }
}

extern "C" {
    #[link_name = "write"]
    fn libc_write(fd: i32, buf: *const u8, n: usize) -> isize;
}

unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        check(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        check(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        check(new);
        System.realloc(p, l, new)
    }
}
