//! Return-path messages (destination to source): `RpReader` over the input until a
//! clean end or an error, reading the bitmap after each RECV_BITMAP. Every message
//! (with UTF-8 names) re-encodes to a message that decodes to itself; errors lie inside the input; the
//! reader always makes progress.
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

#[path = "../harness/decode_return_path.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::run(data));
