//! Live pre-copy of process memory tracked only by userfaultfd write-protection:
//! the guest's writer never marks a bitmap; the engine harvests the kernel's
//! write-protect state at every sync, and the destination still ends equal to the
//! source at stop.

use engine::dirty::UffdWriteProtect;
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::{GuestRegion, Outgoing};
use engine::vm::VmParts;
use engine::vm::{VcpuControl, VmmError};
use savevm_format::{Decoder, Event, PageSink, RamBlock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use transports::{connect, CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

const LEN: usize = 32 << 20;
const HOT: usize = 1 << 20;

/// A writer thread standing in for a vCPU: writes words at random, marks nothing.
struct Writer {
    run: Arc<AtomicBool>,
    parked: Arc<AtomicBool>,
}

impl VcpuControl for Writer {
    fn stop(&mut self) -> Result<(), VmmError> {
        self.run.store(false, Ordering::SeqCst);
        while !self.parked.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        self.run.store(true, Ordering::SeqCst);
        Ok(())
    }
}

struct Mem(Vec<u8>);

impl PageSink for Mem {
    fn page_mut(&mut self, _: &RamBlock, off: u64) -> Option<savevm_format::PageSlot<'_>> {
        (self.0.get_mut(off as usize..off as usize + 4096)).map(savevm_format::PageSlot::from)
    }
}

#[test]
fn uffd_tracked_guest_arrives_identical() {
    if let Err(e) = UffdWriteProtect::probe() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "userfaultfd write-protect unavailable under CI: {e}");
        eprintln!("skipped: userfaultfd write-protect unavailable: {e}");
        return;
    }
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), LEN)]).expect("guest memory");
    let Some(region) = mem.iter().next() else { panic!("one region") };
    let host = region.get_host_address(MemoryRegionAddress(0)).expect("host address");
    // Half the pages start non-zero.
    for p in (0..LEN / 4096).step_by(2) {
        // SAFETY: in bounds of the 32 MiB mapping; no other thread runs yet.
        unsafe { host.add(p * 4096).cast::<u64>().write_volatile(p as u64 + 1) };
    }
    // SAFETY: `mem` outlives the migration and the tracker.
    let mut uffd = unsafe { UffdWriteProtect::new(host, LEN) }.expect("uffd");
    // SAFETY: as above.
    let guest = unsafe { GuestRegion::new("mem", host, LEN) }.expect("region");

    let (run, parked, quit, writes) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let base = host as usize;
    let writer = {
        let (run, parked, quit, writes) = (run.clone(), parked.clone(), quit.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut s = 0x1234_5678u64;
            while !quit.load(Ordering::SeqCst) {
                if !run.load(Ordering::SeqCst) {
                    parked.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                parked.store(false, Ordering::SeqCst);
                for _ in 0..16 {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    // A 1 MiB working set, so the dirty set fits the downtime limit.
                    let word = (s >> 16) as usize % (HOT / 8);
                    // SAFETY: an aligned word inside the mapping, which outlives this thread.
                    unsafe { ((base + word * 8) as *mut u64).write_volatile(s) };
                    writes.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    };

    let uri = MigrationUri::Unix(std::env::temp_dir().join(format!("qmig-uffd-live-{}.sock", std::process::id())));
    let cancel = CancelToken::new().expect("token");
    let listener = Listener::bind(&uri, &cancel).expect("listen");
    let dst = std::thread::spawn(move || {
        let ch = listener.accept().expect("accept");
        let mut d = Decoder::new(MigrationReader::new(ch, RateLimit::new(0)));
        let mut m = Mem(vec![0xa5; LEN]);
        let mut eof = false;
        while let Some(ev) = d.next_with(&mut m).expect("decode") {
            eof |= matches!(ev, Event::Eof);
        }
        assert!(eof);
        m.0
    });
    let params = MigrationParameters { max_bandwidth: 32 << 20, downtime_limit: 100, ..Default::default() };
    let out =
        Outgoing::new(SharedParameters::new(params).expect("params"), MigrationCapabilities::default()).expect("out");
    let ch = connect(&uri, &cancel).expect("connect");
    let mut vcpus = Writer { run, parked };
    // userfaultfd write-protect is the only dirty source: no bitmap besides it.
    let mut ram = [engine::memory::RamRegion::new(&guest).with_dirty(&mut uffd)];
    let info = out.run_vm(ch, &mut ram, &mut vcpus, &mut VmParts::default()).expect("migration");
    drop(ram);
    let got = dst.join().expect("destination");
    // Stopped: the source's memory now is its memory at stop.
    for p in 0..LEN / 4096 {
        let mut page = [0u8; 4096];
        guest.page(p as u64).copy_to(&mut page[..]);
        assert!(got[p * 4096..(p + 1) * 4096] == page, "page {p} differs");
    }
    assert!(info.dirty_sync_count >= 3, "{info:?}");
    assert!(writes.load(Ordering::Relaxed) > 1000, "the guest wrote during the migration");
    quit.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    eprintln!(
        "uffd live: {} syncs, {} writes, downtime {:?}",
        info.dirty_sync_count,
        writes.load(Ordering::Relaxed),
        info.downtime
    );
}
