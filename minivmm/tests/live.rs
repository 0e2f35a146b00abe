//! A KVM guest migrated live between two VMs over a real unix socket: the
//! destination's RAM equals the source's at stop, the guest resumes there and
//! keeps counting with its checksum intact; a cancelled migration leaves it
//! running on the source.

use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::{EngineError, Outgoing};
use engine::state::MigrationStatus;
use engine::vm::VcpuControl;
use minivmm::layout::Layout;
use minivmm::{GuestConfig, Vm};
use std::time::Duration;
use transports::{CancelToken, Listener, MigrationUri};

fn sock(name: &str) -> MigrationUri {
    let p = std::env::temp_dir().join(format!("minivmm-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    MigrationUri::Unix(p)
}

fn outgoing(params: MigrationParameters) -> Outgoing {
    Outgoing::new(SharedParameters::new(params).unwrap(), MigrationCapabilities::default()).unwrap()
}

/// Migrate a running guest; returns (source VM, destination VM not yet resumed, info).
fn migrate(
    layout: Layout,
    cfg: GuestConfig,
    name: &str,
    params: MigrationParameters,
) -> (Vm, Vm, engine::info::MigrationInfo) {
    let mut src = Vm::new(layout.clone()).unwrap();
    src.boot(cfg).unwrap();
    src.vcpus().resume().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let uri = sock(name);
    let listener = Listener::bind(&uri, &CancelToken::new().unwrap()).unwrap();
    let dst = std::thread::spawn(move || {
        let mut dst = Vm::new(layout).unwrap();
        let ch = listener.accept().unwrap();
        let report = minivmm::migrate::migrate_in(&mut dst, ch, false).unwrap();
        assert_eq!(report.devices, 1, "the cpu section was loaded");
        assert!(!report.resumed);
        dst
    });
    let out = outgoing(params);
    let ch = transports::connect(&uri, out.cancel()).unwrap();
    let info = minivmm::migrate::migrate_out(&src, &out, ch).unwrap();
    let dst = dst.join().unwrap();
    (src, dst, info)
}

#[test]
fn guest_migrates_live_and_runs_on() {
    if !testkit::kvm_or_skip("guest_migrates_live_and_runs_on") {
        return;
    }
    let cases = [
        (Layout::one_slot(128 << 20).unwrap(), 16u64 << 20, 1u64),
        (Layout::pc_split(320 << 20).unwrap(), 64 << 20, 2),
        (Layout::pc_split(512 << 20).unwrap(), 128 << 20, 3),
    ];
    for (layout, rate, seed) in cases {
        let cfg = GuestConfig { working_set: 96 << 20, dirty_rate: rate, seed };
        let params = MigrationParameters { max_bandwidth: 256 << 20, ..Default::default() };
        let (src, dst, info) = migrate(layout.clone(), cfg, &format!("live{seed}"), params);
        assert_eq!(info.status, MigrationStatus::Completed);
        assert!(info.dirty_sync_count > 1, "several passes ({layout:?}): {}", info.dirty_sync_count);
        // The source stopped for good at switchover: its RAM is the guest at stop.
        let at_stop = src.control().unwrap();
        assert!(src.vcpus().is_parked());
        assert!(src.ram_equals(&dst), "destination RAM equals source RAM at stop ({layout:?})");
        // The guest may have stopped mid-write: its registers finish it on the destination.
        dst.vcpus().resume().unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        let (on_dst, ok) = dst.stop_and_check().unwrap();
        assert!(ok, "checksum consistent on the destination ({layout:?})");
        assert!(on_dst.counter > at_stop.counter, "counter {} -> {}", at_stop.counter, on_dst.counter);
        assert!(on_dst.writes > at_stop.writes || rate == 0);
        assert!(dst.vcpus().error().is_none());
    }
}

#[test]
fn cancel_mid_migration_leaves_the_guest_running_on_the_source() {
    if !testkit::kvm_or_skip("cancel_mid_migration_leaves_the_guest_running_on_the_source") {
        return;
    }
    let layout = Layout::pc_split(512 << 20).unwrap();
    let mut src = Vm::new(layout.clone()).unwrap();
    src.boot(GuestConfig { working_set: 128 << 20, dirty_rate: 32 << 20, seed: 9 }).unwrap();
    src.vcpus().resume().unwrap();
    let uri = sock("cancel");
    let listener = Listener::bind(&uri, &CancelToken::new().unwrap()).unwrap();
    let dst = std::thread::spawn(move || {
        let mut dst = Vm::new(layout).unwrap();
        let ch = listener.accept().unwrap();
        let r = minivmm::migrate::migrate_in(&mut dst, ch, true);
        // Whatever RAM arrived, the vCPU must not have run: its counter stays put.
        let c1 = dst.control().unwrap().counter;
        std::thread::sleep(Duration::from_millis(100));
        (r.is_err(), dst.vcpus().is_parked(), c1 == dst.control().unwrap().counter)
    });
    // Slow enough that the cancel lands mid-pass.
    let out = outgoing(MigrationParameters { max_bandwidth: 64 << 20, ..Default::default() });
    let ch = transports::connect(&uri, out.cancel()).unwrap();
    let cancel = out.cancel().clone();
    let info = out.info().clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        let s = info.get().status;
        cancel.cancel();
        s
    });
    let r = minivmm::migrate::migrate_out(&src, &out, ch);
    let status_at_cancel = canceller.join().unwrap();
    assert!(matches!(r, Err(EngineError::Cancelled)), "{r:?}");
    assert_eq!(status_at_cancel, MigrationStatus::Active);
    assert_eq!(out.info().get().status, MigrationStatus::Cancelled);
    let (dst_failed, dst_parked, dst_still) = dst.join().unwrap();
    assert!(dst_failed && dst_parked && dst_still, "the destination never started the guest");
    // The source guest runs on.
    assert!(!src.vcpus().is_parked());
    let c1 = src.control().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (c2, ok) = src.stop_and_check().unwrap();
    assert!(ok && c2.counter > c1.counter && c2.writes > c1.writes);
}
