//! One multifd channel (initial packet, then page packets with raw, zlib or zstd
//! payloads) from arbitrary bytes: read every packet until a clean end or a typed error.
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

#[path = "../harness/decode_multifd_channel.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::run(data));
