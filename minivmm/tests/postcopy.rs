//! A KVM guest migrated by postcopy between two VMs over a unix socket: it dirties
//! faster than `max-bandwidth` lets pre-copy converge, the source switches to
//! postcopy, the destination's vCPUs run from POSTCOPY_RUN on while pages arrive,
//! faulting through KVM into the userfaultfd (page requests > 0); at the end the
//! counter went on from where it stopped and the guest's checksum holds.

use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::postcopy_dest::PostcopyOptions;
use engine::source::Outgoing;
use engine::state::MigrationStatus;
use engine::vm::VcpuControl;
use minivmm::layout::Layout;
use minivmm::{GuestConfig, Vm};
use std::time::Duration;
use transports::{CancelToken, Listener, MigrationUri};

#[test]
fn kvm_guest_runs_on_the_destination_during_postcopy() {
    const NAME: &str = "kvm_guest_runs_on_the_destination_during_postcopy";
    if !testkit::kvm_or_skip(NAME) {
        return;
    }
    let layout = Layout::one_slot(64 << 20).unwrap();
    let mut src = Vm::new(layout.clone()).unwrap();
    src.boot(GuestConfig { working_set: 32 << 20, dirty_rate: 64 << 20, seed: 11 }).unwrap();
    src.vcpus().resume().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let p = std::env::temp_dir().join(format!("minivmm-{}-postcopy.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    let uri = MigrationUri::Unix(p);
    let listener = Listener::bind(&uri, &CancelToken::new().unwrap()).unwrap();
    let dst = std::thread::spawn(move || {
        let mut dst = Vm::new(layout).unwrap();
        let ch = listener.accept().unwrap();
        let r = minivmm::migrate::migrate_in_postcopy(&mut dst, ch, true, PostcopyOptions::default());
        (dst, r)
    });
    // 16 MiB/s cannot keep up with 64 MiB/s of dirtying: pre-copy would never end.
    let params =
        MigrationParameters { max_bandwidth: 16 << 20, max_postcopy_bandwidth: 16 << 20, ..Default::default() };
    let caps = MigrationCapabilities { postcopy_ram: true, ..Default::default() };
    let out = Outgoing::new(SharedParameters::new(params).unwrap(), caps)
        .unwrap()
        .with_postcopy_after(Duration::from_millis(300));
    let ch = transports::connect(&uri, out.cancel()).unwrap();
    let info = minivmm::migrate::migrate_out(&src, &out, ch).unwrap();
    let (dst, r) = dst.join().unwrap();
    let report = r.unwrap_or_else(|e| panic!("destination: {}", engine::error::report(&e)));
    assert_eq!(info.status, MigrationStatus::Completed);
    let pc = report.postcopy.expect("the destination went through postcopy");
    assert!(report.resumed, "the vCPUs ran from POSTCOPY_RUN on");
    assert!(pc.requests > 0 && info.postcopy_requests > 0, "vCPU faults became page requests: {pc:?} {info:?}");
    assert!(!pc.latencies_us.is_empty());
    // The source stopped for good at the switch.
    let at_stop = src.control().unwrap();
    assert!(src.vcpus().is_parked());
    std::thread::sleep(Duration::from_millis(300));
    let (on_dst, ok) = dst.stop_and_check().unwrap();
    assert!(ok, "the guest's checksum of its working set holds on the destination");
    assert!(on_dst.counter > at_stop.counter, "counter {} -> {}", at_stop.counter, on_dst.counter);
    assert!(dst.vcpus().error().is_none());
    eprintln!(
        "{NAME}: requests {} (source {}), latency median {:?} p99 {:?} max {:?} us, postcopy {:?}, counter {} -> {}",
        pc.requests,
        info.postcopy_requests,
        pc.latency_quantile(0.5),
        pc.latency_quantile(0.99),
        pc.latencies_us.last(),
        pc.postcopy_time,
        at_stop.counter,
        on_dst.counter
    );
}

/// The destination gone during postcopy (its socket closed both ways, as a killed
/// process's is): the source fails without hanging, and its guest stays stopped
/// (its newest state was on the destination).
#[test]
fn destination_lost_during_postcopy_fails_the_source() {
    const NAME: &str = "destination_lost_during_postcopy_fails_the_source";
    if !testkit::kvm_or_skip(NAME) {
        return;
    }
    let layout = Layout::one_slot(64 << 20).unwrap();
    let mut src = Vm::new(layout.clone()).unwrap();
    src.boot(GuestConfig { working_set: 32 << 20, dirty_rate: 64 << 20, seed: 12 }).unwrap();
    src.vcpus().resume().unwrap();
    let p = std::env::temp_dir().join(format!("minivmm-{}-postcopy-lost.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    let uri = MigrationUri::Unix(p);
    let listener = Listener::bind(&uri, &CancelToken::new().unwrap()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let dst = std::thread::spawn(move || {
        let mut dst = Vm::new(layout).unwrap();
        let ch = listener.accept().unwrap();
        // A second handle on the same socket, to close it under the loader.
        tx.send(ch.return_path().unwrap()).unwrap();
        minivmm::migrate::migrate_in_postcopy(&mut dst, ch, true, PostcopyOptions::default()).is_err()
    });
    // Slow postcopy: it is still running when the destination goes away.
    let params = MigrationParameters { max_bandwidth: 16 << 20, max_postcopy_bandwidth: 2 << 20, ..Default::default() };
    let caps = MigrationCapabilities { postcopy_ram: true, ..Default::default() };
    let out = Outgoing::new(SharedParameters::new(params).unwrap(), caps)
        .unwrap()
        .with_postcopy_after(Duration::from_millis(200));
    let ch = transports::connect(&uri, out.cancel()).unwrap();
    let info = out.info().clone();
    let killer = std::thread::spawn(move || {
        let sock = rx.recv().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while info.get().status != MigrationStatus::PostcopyActive && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(200));
        let _ = sock.shutdown(std::net::Shutdown::Both);
        std::time::Instant::now()
    });
    let r = minivmm::migrate::migrate_out(&src, &out, ch);
    let ended = std::time::Instant::now();
    let killed_at = killer.join().unwrap();
    assert!(r.is_err(), "the source must not complete: {r:?}");
    assert_eq!(out.info().get().status, MigrationStatus::Failed);
    let took = ended.saturating_duration_since(killed_at);
    assert!(took < Duration::from_secs(5), "the source took {took:?} to fail");
    assert!(dst.join().unwrap(), "the destination failed too");
    assert!(src.vcpus().is_parked(), "in postcopy the source guest stays stopped");
    eprintln!(
        "{NAME}: source failed {took:?} after the destination went: {}",
        r.err().map(|e| e.to_string()).unwrap_or_default()
    );
}
