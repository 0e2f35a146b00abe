//! Devices, block devices and blockers across a live migration: the device state
//! arrives intact; on the destination, block caches are invalidated after all
//! state is loaded and before the guest resumes (recorded order); an
//! invalidation failure leaves the guest stopped and the state failed; a
//! blocker fails the migration at start with its reason.

use engine::incoming::{Incoming, IncomingError};
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::{EngineError, Outgoing};
use engine::state::{MigrationStatus, Role};
use engine::vm::{BlockDevice, DeviceHandler, MigrationBlocker, VmParts};
use engine::vm::{VcpuControl, VmmError};
use savevm_format::vmstate::{Kind, Needed, State, Value, Vmsd};
use savevm_format::{PageSink, RamBlock};
use std::sync::{Arc, Mutex};
use testkit::check_sequence;
use testkit::synthetic::SyntheticGuest;
use transports::{connect, CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};

type Log = Arc<Mutex<Vec<String>>>;

fn push(log: &Log, s: String) {
    log.lock().unwrap_or_else(|e| e.into_inner()).push(s);
}

fn entries(log: &Log) -> Vec<String> {
    log.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn serial_vmsd() -> Arc<Vmsd> {
    let fifo = Vmsd::new("serial/fifo", 1, 1).field("depth", Kind::Uint(1));
    Arc::new(
        Vmsd::new("serial", 3, 1)
            .field("divider", Kind::Uint(2))
            .field("lsr", Kind::Uint(1))
            .field_v("scratch", Kind::Buffer(4), 2)
            .field("timer", Kind::Timer)
            .subsection(fifo, Needed::IfPresent),
    )
}

fn serial_state() -> State {
    let mut s = State::default();
    s.set("divider", Value::Uint(12));
    s.set("lsr", Value::Uint(0x60));
    s.set("scratch", Value::Bytes(vec![1, 2, 3, 4]));
    s.set("timer", Value::Timer(Some(123456789)));
    let mut f = State::default();
    f.set("depth", Value::Uint(16));
    s.subsections.push(savevm_format::vmstate::SubsectionState { name: "serial/fifo".into(), version: 1, state: f });
    s
}

struct Serial {
    log: Log,
    state: Option<State>,
}

impl DeviceHandler for Serial {
    fn idstr(&self) -> &str {
        "serial"
    }
    fn vmsd(&self) -> Arc<Vmsd> {
        serial_vmsd()
    }
    fn save(&mut self) -> Result<State, VmmError> {
        push(&self.log, "save serial".into());
        Ok(serial_state())
    }
    fn load(&mut self, version: u32, state: State) -> Result<(), VmmError> {
        push(&self.log, format!("load serial v{version}"));
        self.state = Some(state);
        Ok(())
    }
}

struct Disk {
    log: Log,
    fail_invalidate: bool,
}

impl BlockDevice for Disk {
    fn name(&self) -> String {
        "disk0".into()
    }
    fn inactivate(&mut self) -> Result<(), VmmError> {
        push(&self.log, "inactivate disk0".into());
        Ok(())
    }
    fn activate(&mut self) -> Result<(), VmmError> {
        push(&self.log, "activate disk0".into());
        Ok(())
    }
    fn invalidate_cache(&mut self) -> Result<(), VmmError> {
        push(&self.log, "invalidate disk0".into());
        if self.fail_invalidate {
            Err("disk0: image locked by another process".into())
        } else {
            Ok(())
        }
    }
}

/// Destination vCPUs: only record.
struct DestVcpus(Log);

impl VcpuControl for DestVcpus {
    fn resume(&mut self) -> Result<(), VmmError> {
        push(&self.0, "resume".into());
        Ok(())
    }
}

struct Mem(Vec<u8>);

impl PageSink for Mem {
    fn page_mut(&mut self, _: &RamBlock, off: u64) -> Option<savevm_format::PageSlot<'_>> {
        (self.0.get_mut(off as usize..off as usize + 4096)).map(savevm_format::PageSlot::from)
    }
}

fn uri(name: &str) -> MigrationUri {
    MigrationUri::Unix(std::env::temp_dir().join(format!("qmig-handover-{}-{name}.sock", std::process::id())))
}

/// What one handover produced.
struct Handover {
    result: Result<engine::incoming::IncomingReport, IncomingError>,
    src: Vec<String>,
    dst: Vec<String>,
    state: Option<State>,
    incoming: Incoming,
}

/// Migrate a small live guest with a serial device and a disk.
fn handover(name: &str, fail_invalidate: bool) -> Handover {
    let len = 8 << 20;
    let mut guest = SyntheticGuest::new(len, |p, page| page.fill(p as u8));
    guest.start(1, 8 << 20, 3);
    let region = guest.region("mem").expect("region");
    let src_log: Log = Default::default();
    let dst_log: Log = Default::default();
    let cancel = CancelToken::new().expect("token");
    let listener = Listener::bind(&uri(name), &cancel).expect("listen");
    let incoming = Incoming::new(true);
    let inc = incoming.clone();
    let dl = dst_log.clone();
    let dst = std::thread::spawn(move || {
        let ch = listener.accept().expect("accept");
        let mut serial = Serial { log: dl.clone(), state: None };
        let mut disk = Disk { log: dl.clone(), fail_invalidate };
        let mut vm = VmParts { devices: vec![&mut serial], blocks: vec![&mut disk], ..Default::default() };
        let mut mem = Mem(vec![0; len]);
        let r = inc.run(MigrationReader::new(ch, RateLimit::new(0)), &mut mem, &mut vm, &mut DestVcpus(dl));
        (r, serial.state)
    });
    let params = SharedParameters::new(MigrationParameters { max_bandwidth: 0, ..Default::default() }).expect("params");
    let out = Outgoing::new(params, MigrationCapabilities::default()).expect("outgoing");
    let mut serial = Serial { log: src_log.clone(), state: None };
    let mut disk = Disk { log: src_log.clone(), fail_invalidate: false };
    let mut vm = VmParts { devices: vec![&mut serial], blocks: vec![&mut disk], ..Default::default() };
    let ch = connect(&uri(name), &cancel).expect("connect");
    let mut vcpus = guest.vcpus();
    out.run_vm(ch, &mut [engine::memory::RamRegion::new(&region).with_dirty(guest.dirty())], &mut vcpus, &mut vm)
        .expect("source");
    let (r, state) = dst.join().expect("destination thread");
    Handover { result: r, src: entries(&src_log), dst: entries(&dst_log), state, incoming }
}

#[test]
fn device_state_arrives_and_caches_are_invalidated_before_resume() {
    let Handover { result, src, dst, state, incoming } = handover("ok", false);
    let report = result.expect("incoming");
    assert_eq!(src, ["save serial", "inactivate disk0"], "source order");
    assert_eq!(dst, ["load serial v3", "invalidate disk0", "resume"], "destination order");
    assert_eq!(state, Some(serial_state()), "device state intact");
    assert_eq!(report.runstate.as_deref(), Some("running"));
    assert!(report.resumed);
    assert_eq!(incoming.state.status(), MigrationStatus::Completed);
}

#[test]
fn failed_invalidation_leaves_the_guest_stopped() {
    let Handover { result, dst, incoming, .. } = handover("inval", true);
    let e = result.expect_err("invalidation failure must fail the migration");
    assert_eq!(e.origin(), engine::error::Origin::Vmm);
    assert_eq!(
        engine::error::report(&e),
        "block device 'disk0' (invalidate cache): disk0: image locked by another process"
    );
    assert_eq!(dst, ["load serial v3", "invalidate disk0"], "no resume after a failed invalidation");
    assert_eq!(incoming.state.status(), MigrationStatus::Failed);
}

#[test]
fn a_blocker_fails_the_migration_at_start() {
    let guest = SyntheticGuest::new(1 << 20, |_, p| p.fill(0));
    let region = guest.region("mem").expect("region");
    let cancel = CancelToken::new().expect("token");
    let listener = Listener::bind(&uri("blocked"), &cancel).expect("listen");
    let ch = connect(&uri("blocked"), &cancel).expect("connect");
    let out = Outgoing::new(SharedParameters::default(), MigrationCapabilities::default()).expect("outgoing");
    let notes = out.state().subscribe();
    let mut vm = VmParts {
        blockers: vec![MigrationBlocker { reason: "device 'vfio0' does not support migration".into() }],
        ..Default::default()
    };
    let mut vcpus = guest.vcpus();
    let e = out
        .run_vm(ch, &mut [engine::memory::RamRegion::new(&region).with_dirty(guest.dirty())], &mut vcpus, &mut vm)
        .expect_err("blocked");
    assert!(matches!(&e, EngineError::Blocked(r) if r.contains("vfio0")), "{e}");
    assert_eq!(e.origin(), engine::error::Origin::Vmm);
    assert_eq!(out.state().status(), MigrationStatus::Failed);
    assert_eq!(
        out.info().get().error_desc.as_deref(),
        Some("migration is blocked: device 'vfio0' does not support migration")
    );
    assert_eq!(check_sequence(Role::Source, &notes.try_iter().collect::<Vec<_>>()), Ok(()));
    drop(listener);
}

#[test]
fn default_traits_refuse() {
    struct Nothing;
    impl VcpuControl for Nothing {}
    struct NoDisk;
    impl BlockDevice for NoDisk {
        fn name(&self) -> String {
            "d".into()
        }
    }
    assert!(Nothing.stop().is_err() && Nothing.resume().is_err() && Nothing.set_throttle(10).is_err());
    assert!(NoDisk.inactivate().is_err() && NoDisk.invalidate_cache().is_err() && NoDisk.activate().is_err());
}
