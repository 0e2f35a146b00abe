//! XBZRLE: decoding arbitrary deltas onto a page never panics and never writes
//! past it; `encode(old, new)` followed by `decode` onto a copy of `old` gives `new`.
#![no_main]

// The workspace's allocation guard, included by path (this crate is outside the
// workspace): inputs are at most a few MiB, so no decoder allocation needs more
// than 128 MiB at once or 1 GiB in total.
#[allow(dead_code)]
#[path = "../../testkit/src/alloc_guard.rs"]
mod alloc_guard;
#[global_allocator]
static GUARD: alloc_guard::AllocGuard = alloc_guard::AllocGuard::new(128 << 20, 1 << 30);

use libfuzzer_sys::fuzz_target;

#[path = "../harness/xbzrle.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::run(data));
