//! What the engine's integration tests share: one-at-a-time execution, socket
//! paths, and a guard that cancels a migration when a test fails mid-way.

#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};
use transports::{CancelToken, MigrationUri};

static SERIAL: Mutex<()> = Mutex::new(());

/// Run timing-sensitive tests of one binary one at a time (the machine is small).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A unix socket path unique to this test process, `prefix` and `name`.
pub fn sock(prefix: &str, name: &str) -> MigrationUri {
    MigrationUri::Unix(std::env::temp_dir().join(format!("qmig-{prefix}-{}-{name}.sock", std::process::id())))
}

/// Cancels the migration when dropped (unless taken), so a failed assertion never
/// leaves a migration thread running inside a scope (which would hang the test).
pub struct CancelOnDrop(pub Option<CancelToken>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.cancel();
        }
    }
}

/// A run's outcome and the vCPUs it drove.
pub type RunResult =
    (Result<engine::info::MigrationInfo, engine::source::EngineError>, testkit::synthetic::SyntheticVcpus);

/// Run `out` over `ch` for `guest`'s `region` on a scoped thread while `watch`
/// observes or drives it from this one; a panic in `watch` cancels the run.
pub fn run_watched<T>(
    out: &engine::source::Outgoing,
    ch: transports::Channel,
    region: &engine::source::GuestRegion,
    dirty: &[std::sync::Arc<engine::dirty::DirtyBitmap>],
    guest: &testkit::synthetic::SyntheticGuest,
    watch: impl FnOnce(&engine::source::Outgoing, &testkit::synthetic::SyntheticVcpus) -> T,
) -> (RunResult, T) {
    let mut vcpus = guest.vcpus();
    let probe = guest.vcpus();
    std::thread::scope(|s| {
        let runner = s.spawn(move || {
            let r = out.run(ch, &mut [engine::memory::RamRegion::new(region).with_dirty(dirty[0].clone())], &mut vcpus);
            (r, vcpus)
        });
        let mut guard = CancelOnDrop(Some(out.cancel().clone()));
        let t = watch(out, &probe);
        guard.0 = None;
        (runner.join().expect("migration thread"), t)
    })
}

/// The states in `seen`'s transitions, in order.
pub fn states(seen: &[engine::state::Notification]) -> Vec<engine::state::MigrationStatus> {
    seen.iter()
        .filter_map(|n| if let engine::state::Notification::State { to, .. } = n { Some(*to) } else { None })
        .collect()
}

/// Poll `cond` every 2 ms until it holds; fail the test after `limit`.
pub fn wait_for(what: &str, limit: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
