//! See `fuzz/harness/incoming_guest.rs`: the whole incoming path into a real sink, checked
//! against a reference model after every input.
#![no_main]

// The workspace's allocation guard, included by path (this crate is outside the
// workspace): it aborts on any single allocation above 128 MiB or more than 1 GiB
// live, and measures each load's heap growth for the harness.
#[allow(dead_code)]
#[path = "../../testkit/src/alloc_guard.rs"]
mod alloc_guard;
#[global_allocator]
static GUARD: alloc_guard::AllocGuard = alloc_guard::AllocGuard::new(128 << 20, 1 << 30);

use libfuzzer_sys::fuzz_target;

#[path = "../harness/incoming_guest.rs"]
mod harness;

impl harness::Meter for alloc_guard::AllocGuard {
    fn reset_peak(&self) -> usize {
        alloc_guard::AllocGuard::reset_peak(self)
    }
    fn peak(&self) -> usize {
        alloc_guard::AllocGuard::peak(self)
    }
}

fuzz_target!(|data: &[u8]| {
    harness::run(data, &GUARD);
});
