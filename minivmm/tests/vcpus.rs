//! A 2- and a 4-vCPU KVM guest migrated live over a unix socket: every vCPU's
//! counter continues on the destination with its checksum intact, and each
//! vCPU's full state (registers, CPUID, MSRs, FPU, XSAVE, XCRs, local APIC,
//! debug registers, events) loaded on the destination equals the source's at stop,
//! with per-vCPU marks (an MSR, XMM0, DR0, a CPUID leaf) that only a loaded state carries.

use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::Outgoing;
use engine::state::MigrationStatus;
use engine::vm::VcpuControl;
use minivmm::cpu::CpuState;
use minivmm::layout::Layout;
use minivmm::{GuestConfig, Vm};
use std::time::Duration;
use transports::{CancelToken, Listener, MigrationUri};

fn sock(name: &str) -> MigrationUri {
    let p = std::env::temp_dir().join(format!("minivmm-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    MigrationUri::Unix(p)
}

fn states(vm: &Vm) -> Vec<CpuState> {
    vm.cpu_devices().iter().map(|d| d.state().unwrap()).collect()
}

/// The state that must arrive unchanged (the TSC runs on while stopped: compared apart).
fn assert_same(i: usize, src: &CpuState, dst: &CpuState) {
    assert_eq!(src.regs, dst.regs, "vCPU {i}: registers");
    assert_eq!(src.sregs, dst.sregs, "vCPU {i}: special registers");
    assert_eq!(src.cpuid, dst.cpuid, "vCPU {i}: CPUID");
    assert_eq!(src.msrs, dst.msrs, "vCPU {i}: MSRs");
    assert_eq!(src.mtrr_def_type, dst.mtrr_def_type, "vCPU {i}: MTRRdefType");
    assert_eq!(src.tsc_khz, dst.tsc_khz, "vCPU {i}: TSC frequency");
    assert_eq!(src.mp_state, dst.mp_state, "vCPU {i}: mp_state");
    assert_eq!(src.fpu, dst.fpu, "vCPU {i}: FPU");
    assert!(src.xsave == dst.xsave, "vCPU {i}: XSAVE area");
    assert_eq!(src.xcrs, dst.xcrs, "vCPU {i}: XCRs");
    assert!(src.lapic == dst.lapic, "vCPU {i}: local APIC");
    assert_eq!(src.debugregs, dst.debugregs, "vCPU {i}: debug registers");
    assert_eq!(src.events, dst.events, "vCPU {i}: events");
    assert!(dst.tsc >= src.tsc, "vCPU {i}: TSC {} -> {}", src.tsc, dst.tsc);
}

const MSR_LSTAR: u32 = 0xc000_0082;
/// Where XMM0 lies in the XSAVE area (the legacy FXSAVE region).
const XMM0: std::ops::Range<usize> = 160..176;

/// Marks that only a loaded state can carry: an MSR, XMM0 (the guest program uses
/// no SSE), a debug register and a CPUID leaf the program never reads, per vCPU.
fn mark(i: usize, c: &mut CpuState) {
    let lstar = 0xffff_ffff_8100_0000 + 0x1000 * i as u64;
    let m = c.msrs.iter_mut().find(|(index, _)| *index == MSR_LSTAR).expect("LSTAR is saveable");
    m.1 = lstar;
    let xmm = [0xa0 + i as u8; 16];
    c.xsave[XMM0].copy_from_slice(&xmm);
    // XSTATE_BV (the XSAVE header's first word): the SSE component is live, not in its init state.
    c.xsave[512] |= 1 << 1;
    c.fpu.xmm[0] = xmm;
    c.debugregs.db[0] = 0x4000 + i as u64;
    if let Some(leaf6) = c.cpuid.iter_mut().find(|e| e.function == 6) {
        leaf6.ebx = 0x5a00 + i as u32;
    }
}

fn assert_marked(i: usize, c: &CpuState) {
    assert!(c.msrs.contains(&(MSR_LSTAR, 0xffff_ffff_8100_0000 + 0x1000 * i as u64)), "vCPU {i}: LSTAR");
    assert_eq!(c.xsave[XMM0], [0xa0 + i as u8; 16], "vCPU {i}: XMM0 in the XSAVE area");
    assert_eq!(c.fpu.xmm[0], [0xa0 + i as u8; 16], "vCPU {i}: XMM0");
    assert_eq!(c.debugregs.db[0], 0x4000 + i as u64, "vCPU {i}: DR0");
    if let Some(leaf6) = c.cpuid.iter().find(|e| e.function == 6) {
        assert_eq!(leaf6.ebx, 0x5a00 + i as u32, "vCPU {i}: CPUID leaf 6");
    }
}

fn migrate_vcpus(n: usize, seed: u64) {
    let layout = Layout::pc_split(320 << 20).unwrap();
    let mut src = Vm::with_vcpus(layout.clone(), n).unwrap();
    assert_eq!(src.vcpu_count(), n);
    src.boot(GuestConfig { working_set: 64 << 20, dirty_rate: 32 << 20, seed }).unwrap();
    // Before the first run (CPUID can change only then): each vCPU gets its marks.
    for (i, d) in src.cpu_devices().iter().enumerate() {
        let mut c = d.state().unwrap();
        mark(i, &mut c);
        d.set_state(&c).unwrap();
        assert_marked(i, &d.state().unwrap());
    }
    src.vcpus().resume().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let uri = sock(&format!("vcpus{n}"));
    let listener = Listener::bind(&uri, &CancelToken::new().unwrap()).unwrap();
    let dst = std::thread::spawn(move || {
        let mut dst = Vm::with_vcpus(layout, n).unwrap();
        let ch = listener.accept().unwrap();
        let report = minivmm::migrate::migrate_in(&mut dst, ch, false).unwrap();
        assert_eq!(report.devices, n, "one cpu section per vCPU");
        dst
    });
    let params = MigrationParameters { max_bandwidth: 256 << 20, ..Default::default() };
    let out = Outgoing::new(SharedParameters::new(params).unwrap(), MigrationCapabilities::default()).unwrap();
    let ch = transports::connect(&uri, out.cancel()).unwrap();
    let info = minivmm::migrate::migrate_out(&src, &out, ch).unwrap();
    assert_eq!(info.status, MigrationStatus::Completed);
    let dst = dst.join().unwrap();
    assert!(src.vcpus().is_parked());
    assert!(src.ram_equals(&dst), "destination RAM equals source RAM at stop");

    // Full state: what the destination loaded is what the source had at stop.
    let (before, after) = (states(&src), states(&dst));
    assert_eq!(after.len(), n);
    for (i, (s, d)) in before.iter().zip(&after).enumerate() {
        assert_same(i, s, d);
        assert_marked(i, d);
        assert!(s.msrs.len() > 10, "vCPU {i}: KVM's saveable MSRs travel ({})", s.msrs.len());
        assert_eq!(s.regs.rbx, minivmm::guest::ctrl_addr(i), "vCPU {i} runs on its own control block");
        let apic_id = u32::from_le_bytes([s.lapic[0x20], s.lapic[0x21], s.lapic[0x22], s.lapic[0x23]]) >> 24;
        assert_eq!(apic_id, i as u32, "vCPU {i}: its own local APIC");
        let leaf1 = s.cpuid.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, i as u32, "vCPU {i}: CPUID names its APIC id");
    }

    let at_stop: Vec<_> = (0..n).map(|i| src.control_of(i).unwrap()).collect();
    assert!(at_stop.iter().all(|c| c.counter > 0 && c.writes > 0), "every vCPU ran: {at_stop:?}");
    dst.vcpus().resume().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let on_dst = dst.stop_and_check_all().unwrap();
    assert_eq!(on_dst.len(), n);
    for (i, ((c, ok), s)) in on_dst.iter().zip(&at_stop).enumerate() {
        assert!(ok, "vCPU {i}: checksum intact on the destination");
        assert!(c.counter > s.counter, "vCPU {i}: counter {} -> {}", s.counter, c.counter);
        assert!(c.writes > s.writes, "vCPU {i}: writes {} -> {}", s.writes, c.writes);
    }
    assert!(dst.vcpus().error().is_none(), "{:?}", dst.vcpus().error());
}

#[test]
fn two_vcpus_migrate_with_every_counter_and_their_full_state() {
    if !testkit::kvm_or_skip("two_vcpus_migrate_with_every_counter_and_their_full_state") {
        return;
    }
    migrate_vcpus(2, 5);
}

#[test]
fn four_vcpus_migrate_with_every_counter_and_their_full_state() {
    if !testkit::kvm_or_skip("four_vcpus_migrate_with_every_counter_and_their_full_state") {
        return;
    }
    migrate_vcpus(4, 6);
}

#[test]
fn vcpu_count_is_checked() {
    if !testkit::kvm_or_skip("vcpu_count_is_checked") {
        return;
    }
    let layout = Layout::one_slot(64 << 20).unwrap();
    assert!(Vm::with_vcpus(layout.clone(), 0).is_err());
    assert!(Vm::with_vcpus(layout.clone(), minivmm::guest::MAX_VCPUS + 1).is_err());
    // A working set too small to give every vCPU a page is refused at boot.
    let mut vm = Vm::with_vcpus(layout, 4).unwrap();
    assert!(vm.boot(GuestConfig { working_set: 4096, dirty_rate: 0, seed: 1 }).is_err());
}

#[test]
fn throttle_and_stop_act_on_every_vcpu() {
    if !testkit::kvm_or_skip("throttle_and_stop_act_on_every_vcpu") {
        return;
    }
    let mut vm = Vm::with_vcpus(Layout::one_slot(64 << 20).unwrap(), 2).unwrap();
    vm.boot(GuestConfig { working_set: 8 << 20, dirty_rate: 0, seed: 2 }).unwrap();
    let mut v = vm.vcpus();
    let counters = |vm: &Vm| -> Vec<u64> { vm.controls().unwrap().iter().map(|c| c.counter).collect() };
    let run = |vm: &Vm, v: &mut minivmm::Vcpus| {
        let a = counters(vm);
        v.resume().unwrap();
        std::thread::sleep(Duration::from_millis(400));
        v.stop().unwrap();
        let b = counters(vm);
        a.iter().zip(&b).map(|(a, b)| b - a).collect::<Vec<_>>()
    };
    let free = run(&vm, &mut v);
    v.set_throttle(90).unwrap();
    let throttled = run(&vm, &mut v);
    for (i, (f, t)) in free.iter().zip(&throttled).enumerate() {
        assert!(*f > 0, "vCPU {i} ran");
        assert!(*t * 2 < *f, "vCPU {i} throttled to 10 %: {t} iterations against {f} unthrottled");
    }
    // Stopped means every vCPU stopped.
    let c = counters(&vm);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(counters(&vm), c);
    assert!(v.is_parked());
}

#[test]
fn a_destination_with_fewer_vcpus_refuses_the_stream() {
    if !testkit::kvm_or_skip("a_destination_with_fewer_vcpus_refuses_the_stream") {
        return;
    }
    let layout = Layout::one_slot(64 << 20).unwrap();
    let mut src = Vm::with_vcpus(layout.clone(), 2).unwrap();
    src.boot(GuestConfig { working_set: 8 << 20, dirty_rate: 8 << 20, seed: 4 }).unwrap();
    src.vcpus().resume().unwrap();
    let uri = sock("fewer");
    let listener = Listener::bind(&uri, &CancelToken::new().unwrap()).unwrap();
    let dst = std::thread::spawn(move || {
        let mut dst = Vm::with_vcpus(layout, 1).unwrap();
        let ch = listener.accept().unwrap();
        let r = minivmm::migrate::migrate_in(&mut dst, ch, true);
        (r.map(|_| ()).map_err(|e| engine::error::report(&e)), dst.vcpus().is_parked())
    });
    let out =
        Outgoing::new(SharedParameters::new(MigrationParameters::default()).unwrap(), MigrationCapabilities::default())
            .unwrap();
    let ch = transports::connect(&uri, out.cancel()).unwrap();
    let _ = minivmm::migrate::migrate_out(&src, &out, ch);
    let (r, parked) = dst.join().unwrap();
    let e = r.expect_err("a second cpu instance has nowhere to go");
    eprintln!("destination: {e}");
    assert!(e.contains("cpu' instance 1"), "{e}");
    assert!(parked, "the destination never ran the guest");
}
