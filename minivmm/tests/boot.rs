//! The guest boots on KVM, counts, writes its working set at the set rate, and its
//! checksum holds; stop/resume and the dirty log work on their own.

use engine::dirty::DirtySource;
use engine::vm::VcpuControl;
use minivmm::layout::Layout;
use minivmm::{GuestConfig, Vm};
use std::time::Duration;

#[test]
fn guest_runs_and_keeps_its_checksum() {
    if !testkit::kvm_or_skip("guest_runs_and_keeps_its_checksum") {
        return;
    }
    for layout in [Layout::one_slot(64 << 20).unwrap(), Layout::pc_split(256 << 20).unwrap()] {
        let mut vm = Vm::new(layout.clone()).unwrap();
        vm.boot(GuestConfig { working_set: 32 << 20, dirty_rate: 16 << 20, seed: 7 }).unwrap();
        let c0 = vm.control().unwrap();
        assert_eq!(c0.counter, 0);
        assert_eq!(vm.working_set_sum().unwrap(), c0.checksum);
        let mut v = vm.vcpus();
        let t0 = std::time::Instant::now();
        v.resume().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let (c1, ok) = vm.stop_and_check().unwrap();
        let ran = t0.elapsed().as_secs_f64();
        assert!(ok, "checksum after 300 ms ({layout:?})");
        assert!(c1.counter > 1000, "counter {}", c1.counter);
        // 16 MiB/s = 4096 pages/s: ~1200 writes in 300 ms, never more; fewer when the host is busy.
        let most = (ran * 4096.0 * 1.02) as u64 + 2;
        assert!(c1.writes > 100 && c1.writes <= most, "writes {} in {ran:.3} s (at most {most})", c1.writes);
        // Stopped means stopped.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(vm.control().unwrap().counter, c1.counter);
        v.resume().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let (c2, ok) = vm.stop_and_check().unwrap();
        assert!(ok && c2.counter > c1.counter);
    }
}

#[test]
fn dirty_log_reports_guest_writes_in_both_slots() {
    if !testkit::kvm_or_skip("dirty_log_reports_guest_writes_in_both_slots") {
        return;
    }
    let layout = Layout::pc_split(256 << 20).unwrap();
    let mut vm = Vm::new(layout).unwrap();
    vm.boot(GuestConfig { working_set: 64 << 20, dirty_rate: 64 << 20, seed: 3 }).unwrap();
    let mut log = vm.dirty_log();
    log.start().unwrap();
    let pages = (256u64 << 20) / 4096;
    let mut bits = vec![0u64; pages.div_ceil(64) as usize];
    log.sync(&mut bits).unwrap();
    let mut v = vm.vcpus();
    v.resume().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    v.stop().unwrap();
    bits.fill(0);
    log.sync(&mut bits).unwrap();
    let low = engine::dirty::count_bits(&bits[..(192 << 20) / 4096 / 64]);
    let high = engine::dirty::count_bits(&bits[(192 << 20) / 4096 / 64..]);
    let writes = vm.control().unwrap().writes;
    assert!(low > 100 && high > 100, "dirty pages low {low} high {high} (writes {writes})");
    assert!(low + high <= writes + 2, "more pages dirty ({}) than writes ({writes}) + control page", low + high);
    // Nothing ran since: the next sync is empty.
    bits.fill(0);
    log.sync(&mut bits).unwrap();
    assert_eq!(engine::dirty::count_bits(&bits), 0);
    log.stop().unwrap();
}
