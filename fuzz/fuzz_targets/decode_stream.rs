//! Whole-stream decoding of arbitrary bytes: every failure must be a typed
//! `Error`; a panic, a hang or a huge allocation is a bug.
//!
//! The input is decoded twice, once into a bounded in-memory `PageSink` and once
//! with no sink (`next()`), and both runs must yield the same events and the same
//! final result. A vmdesc found at the end of the input (`find_trailing_vmdesc`)
//! is handed to both decoders first, so vmdesc-driven device decoding is fuzzed too
//! (when the record's length no longer matches, the JSON after the last
//! `0x06, be32, '{'` is tried instead).
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

#[path = "../harness/decode_stream.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::run(data));
