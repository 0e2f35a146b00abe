//! See `fuzz/harness/postcopy_dest.rs`: the postcopy destination (`Incoming::run_postcopy`
//! with userfaultfd, the fault thread and the touch thread) over the input as the main
//! stream, checked against a reference model after every input.
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

#[path = "../harness/postcopy_dest.rs"]
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
    assert!(harness::available(), "userfaultfd is unavailable here: this target cannot run");
    harness::run(data, &GUARD);
});
