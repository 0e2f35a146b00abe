//! Test support for qmig, kept out of the product crates: a dev-dependency of
//! the tests and benches (and used by the CLI's `demo`).
//!
//! - [`synthetic`]: a guest of writer threads dirtying its RAM at a set rate.
//! - [`pattern`]: the deterministic guest RAM fill patterns of the QEMU 7.2 test data.
//! - [`qemu`]: a `qemu-system-x86_64` launcher over `qmig-control`'s QMP client (re-exported there).
//! - [`state`]: [`check_sequence`](state::check_sequence) over state notifications.
//! - [`alloc_guard`]: a counting global allocator that aborts on runaway allocations.
//! - `netfault` (Linux): network namespaces joined by a veth pair (rate, cut) and a fault-injecting TCP proxy.
//! - [`rng`] holds the SplitMix64 generator.
//! - [`streams`]: hand-built streams (any target page size) for destination tests.
//! - `tls` (feature `tls`): test PKIs in QEMU's x509 credentials layout.
//! - `kvm_or_skip` (feature `kvm`): the KVM skip rule of the KVM tests.

#![warn(missing_docs)]

pub mod alloc_guard;
#[cfg(target_os = "linux")]
pub mod netfault;
pub mod pattern;
pub mod qemu;
pub mod rng;
pub mod state;
pub mod streams;
pub mod synthetic;
#[cfg(feature = "tls")]
pub mod tls;

pub use alloc_guard::AllocGuard;
pub use rng::{splitmix64, SplitMix64};
pub use state::check_sequence;

/// For tests: `true` when KVM is usable; otherwise prints `SKIP <test>: <reason>`
/// and returns `false`, except under `CI=true` on a machine that has `/dev/kvm`,
/// where an unusable KVM is a failure (panics with the reason).
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
pub fn kvm_or_skip(test: &str) -> bool {
    let Some(why) = minivmm::kvm_unavailable() else { return true };
    if std::env::var("CI").as_deref() == Ok("true") && std::path::Path::new("/dev/kvm").exists() {
        panic!("{test}: /dev/kvm exists but is unusable under CI=true: {why}");
    }
    println!("SKIP {test}: {why}");
    false
}
