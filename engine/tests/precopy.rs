//! Live pre-copy under a dirtying workload: the destination's RAM equals the
//! source's RAM at the moment of stop, every time, after several passes.

mod common;

use engine::dirty::DirtyBitmap;
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::Outgoing;
use engine::state::{MigrationStatus, Notification, Role};
use savevm_format::{Decoder, Event, PageSink, RamBlock};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::check_sequence;
use testkit::synthetic::SyntheticGuest;
use transports::{connect, CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};

struct Mem(Vec<u8>);

impl PageSink for Mem {
    fn page_mut(&mut self, _: &RamBlock, off: u64) -> Option<savevm_format::PageSlot<'_>> {
        (self.0.get_mut(off as usize..off as usize + 4096)).map(savevm_format::PageSlot::from)
    }
}

/// Receive one stream on `listener` into memory; returns (RAM, sections seen).
fn destination(listener: Listener, len: usize) -> std::thread::JoinHandle<Result<(Vec<u8>, u64), String>> {
    std::thread::spawn(move || {
        let ch = listener.accept().map_err(|e| e.to_string())?;
        let mut d = Decoder::new(MigrationReader::new(ch, RateLimit::new(0)));
        let mut mem = Mem(vec![0xa5; len]);
        let (mut eof, mut parts) = (false, 0u64);
        while let Some(ev) = d.next_with(&mut mem).map_err(|e| e.to_string())? {
            match ev {
                Event::Eof => eof = true,
                Event::SectionStart(h) if h.idstr == "ram" => parts += 1,
                _ => {}
            }
        }
        if !eof {
            return Err("no EOF".into());
        }
        Ok((mem.0, parts))
    })
}

fn sock(name: &str) -> MigrationUri {
    common::sock("engine", name)
}

fn migrate(seed: u64, len: usize, dirty_rate: u64, params: MigrationParameters, caps: MigrationCapabilities) {
    let mut guest = SyntheticGuest::new(len, |p, page| {
        page.fill(0);
        if p % 3 == 0 {
            page[..8].copy_from_slice(&(p ^ seed).to_le_bytes());
        }
    });
    guest.start(1, dirty_rate, seed);
    let region = guest.region("mem").expect("region");
    let dirty: Vec<Arc<DirtyBitmap>> = vec![guest.dirty()];
    let out = Outgoing::new(SharedParameters::new(params).expect("params"), caps).expect("outgoing");
    let notes = out.state().subscribe();
    let uri = sock(&format!("s{seed}"));
    let cancel = CancelToken::new().expect("token");
    let listener = Listener::bind(&uri, &cancel).expect("listen");
    let dst = destination(listener, len);
    let ch = connect(&uri, &cancel).expect("connect");
    let mut vcpus = guest.vcpus();
    let t0 = Instant::now();
    let info = out
        .run(ch, &mut [engine::memory::RamRegion::new(&region).with_dirty(dirty[0].clone())], &mut vcpus)
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let (got, ram_sections) = dst.join().expect("destination thread").expect("destination");
    assert_eq!(info.status, MigrationStatus::Completed);
    assert!(!vcpus.running(), "the guest stays stopped after completion");
    // The source is stopped: its RAM now is its RAM at the moment of stop.
    let mut page = vec![0u8; 4096];
    for p in 0..guest.pages() {
        guest.read_page(p, &mut page);
        let o = p as usize * 4096;
        assert!(got[o..o + 4096] == page[..], "seed {seed}: page {p} differs after {} writes", guest.writes());
    }
    let min_syncs = if dirty_rate > 0 { 4 } else { 2 };
    assert!(info.dirty_sync_count >= min_syncs, "seed {seed}: dirty-sync-count {}", info.dirty_sync_count);
    assert!(info.downtime.is_some());
    let seen: Vec<Notification> = notes.try_iter().collect();
    assert_eq!(check_sequence(Role::Source, &seen), Ok(()), "{seen:?}");
    eprintln!(
        "seed {seed}: {:?}, {} syncs, {} RAM sections, downtime {:?}, {} writes, {} normal / {} zero pages",
        t0.elapsed(),
        info.dirty_sync_count,
        ram_sections,
        info.downtime,
        guest.writes(),
        info.normal,
        info.duplicate
    );
}

#[test]
fn dirtying_guest_arrives_identical_several_seeds() {
    for seed in [1, 2, 3] {
        let params = MigrationParameters { max_bandwidth: 48 << 20, downtime_limit: 30, ..Default::default() };
        migrate(seed, 64 << 20, 24 << 20, params, MigrationCapabilities::default());
    }
}

#[test]
fn idle_guest_completes_in_one_pass() {
    let params = MigrationParameters { max_bandwidth: 0, ..Default::default() };
    migrate(9, 16 << 20, 0, params, MigrationCapabilities::default());
}

#[test]
fn cancel_resumes_the_guest() {
    let len = 64 << 20;
    let mut guest = SyntheticGuest::new(len, |_, page| page.fill(7));
    guest.start(1, 256 << 20, 5);
    let region = guest.region("mem").expect("region");
    let dirty = [guest.dirty()];
    // A dirty rate far above the bandwidth: it never converges on its own.
    let params = MigrationParameters { max_bandwidth: 8 << 20, downtime_limit: 10, ..Default::default() };
    let out =
        Outgoing::new(SharedParameters::new(params).expect("params"), MigrationCapabilities::default()).expect("out");
    let uri = sock("cancel");
    let cancel = CancelToken::new().expect("token");
    let listener = Listener::bind(&uri, &cancel).expect("listen");
    let dst = destination(listener, len);
    let ch = connect(&uri, &cancel).expect("connect");
    let handle = out.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        let t = Instant::now();
        handle.cancel().cancel();
        t
    });
    let mut vcpus = guest.vcpus();
    let res = out.run(ch, &mut [engine::memory::RamRegion::new(&region).with_dirty(dirty[0].clone())], &mut vcpus);
    let cancelled_at = canceller.join().expect("canceller");
    assert!(cancelled_at.elapsed() < Duration::from_secs(1), "run returned {:?} after cancel", cancelled_at.elapsed());
    assert!(matches!(res, Err(engine::source::EngineError::Cancelled)), "{res:?}");
    assert_eq!(out.state().status(), MigrationStatus::Cancelled);
    assert!(vcpus.running(), "guest resumed on the source");
    let w0 = guest.writes();
    std::thread::sleep(Duration::from_millis(100));
    assert!(guest.writes() > w0, "the guest keeps writing after the cancel");
    assert!(dst.join().expect("destination thread").is_err(), "the destination never sees a complete stream");
}
