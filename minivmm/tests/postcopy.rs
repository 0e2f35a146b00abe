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
