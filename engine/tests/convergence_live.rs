//! The integration layer of the convergence policy (the rules themselves are
//! tested on simulated time in `convergence.rs`): a synthetic guest dirtying memory
//! while an in-process destination decodes the stream over a unix socket, with
//! `auto-converge`: the driver sets the guest's throttle at each step the core
//! takes, `query-migrate` shows it, subscribers are told, the migration completes
//! with the destination equal to the source at stop, and the throttle is lifted.

mod common;

use common::RunResult;

use common::{states, wait_for};
use engine::dirty::DirtyBitmap;
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::{GuestRegion, Outgoing};
use engine::state::{MigrationStatus as S, Notification, Role};
use savevm_format::{Decoder, Event, PageSink, RamBlock};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use testkit::check_sequence;
use testkit::synthetic::{SyntheticGuest, SyntheticVcpus};
use transports::{connect, CancelToken, Channel, Listener, MigrationReader, MigrationUri, RateLimit};

const MIB: usize = 1 << 20;

struct Mem(Vec<u8>);

impl PageSink for Mem {
    fn page_mut(&mut self, _: &RamBlock, off: u64) -> Option<savevm_format::PageSlot<'_>> {
        (self.0.get_mut(off as usize..off as usize + 4096)).map(savevm_format::PageSlot::from)
    }
}

/// Receive one stream into memory: the RAM if it ended with EOF, else why not.
fn destination(listener: Listener, len: usize) -> JoinHandle<Result<Vec<u8>, String>> {
    std::thread::spawn(move || {
        let ch = listener.accept().map_err(|e| e.to_string())?;
        let mut d = Decoder::new(MigrationReader::new(ch, RateLimit::new(0)));
        let mut mem = Mem(vec![0xa5; len]);
        let mut eof = false;
        while let Some(ev) = d.next_with(&mut mem).map_err(|e| e.to_string())? {
            eof |= matches!(ev, Event::Eof);
        }
        if eof {
            Ok(mem.0)
        } else {
            Err("the stream ended without EOF".into())
        }
    })
}

fn sock(name: &str) -> MigrationUri {
    common::sock("conv", name)
}

/// A guest, its migration, a destination thread, and the connected channel.
struct Rig {
    guest: SyntheticGuest,
    region: GuestRegion,
    dirty: Vec<Arc<DirtyBitmap>>,
    out: Outgoing,
    notes: crossbeam_channel::Receiver<Notification>,
    dst: Option<JoinHandle<Result<Vec<u8>, String>>>,
    ch: Option<Channel>,
    len: usize,
}

/// `len` bytes of RAM, zero but for the first `data` bytes (so the bulk pass is
/// cheap and mostly dirtied pages cost bandwidth, yet it lasts past the first
/// 100 ms bandwidth window: QEMU 7.2 completes at once when nothing is pending
/// before any threshold exists), one writer dirtying `rate` bytes/s.
fn rig(
    name: &str,
    len: usize,
    data: usize,
    rate: u64,
    params: MigrationParameters,
    caps: MigrationCapabilities,
) -> Rig {
    let data_pages = (data / 4096) as u64;
    let mut guest = SyntheticGuest::new(len, |p, page| {
        page.fill(0);
        if p < data_pages {
            page.fill(p as u8 | 1);
        }
    });
    guest.start(1, rate, 0x5eed ^ len as u64);
    let region = guest.region("pc.ram").expect("region");
    let dirty = vec![guest.dirty()];
    let out = Outgoing::new(SharedParameters::new(params).expect("params"), caps).expect("outgoing");
    let notes = out.state().subscribe();
    let uri = sock(name);
    let listener = Listener::bind(&uri, &CancelToken::new().expect("token")).expect("listen");
    let dst = destination(listener, len);
    // As the CLI does: the channel shares the migration's token, so a cancel also
    // wakes I/O blocked on the socket.
    let ch = connect(&uri, out.cancel()).expect("connect");
    Rig { guest, region, dirty, out, notes, dst: Some(dst), ch: Some(ch), len }
}

impl Rig {
    /// Run the migration on a scoped thread while `watch` observes it from this one.
    fn run_watched<T>(&mut self, watch: impl FnOnce(&Outgoing, &SyntheticVcpus) -> T) -> (RunResult, T) {
        let ch = self.ch.take().expect("channel");

        common::run_watched(&self.out, ch, &self.region, &self.dirty, &self.guest, watch)
    }

    fn notifications(&self) -> Vec<Notification> {
        self.notes.try_iter().collect()
    }

    /// After completion (guest stopped): the destination holds the source's RAM.
    fn assert_destination_equal(&mut self) {
        let got = self.dst.take().expect("dst").join().expect("destination thread").expect("destination");
        assert_eq!(got.len(), self.len);
        let mut page = vec![0u8; 4096];
        let mut differ = vec![];
        for p in 0..self.guest.pages() {
            self.guest.read_page(p, &mut page);
            let o = p as usize * 4096;
            if got[o..o + 4096] != page[..] {
                differ.push(p);
            }
        }
        assert!(differ.is_empty(), "{} pages differ (first {:?}) after {} writes", differ.len(), differ.first(), {
            self.guest.writes()
        });
    }
}

#[test]
fn auto_converge_steps_the_throttle_and_completes() {
    // 64 MiB with one writer at 16 MiB/s (4096 page writes/s over a 4 MiB hot set and
    // the rest): about 15 MiB/s of distinct pages against 8 MiB/s of bandwidth. It
    // converges only once the throttle has cut the writer by about half.
    let params = MigrationParameters {
        max_bandwidth: 7 << 20,
        downtime_limit: 300,
        cpu_throttle_initial: 20,
        cpu_throttle_increment: 10,
        ..Default::default()
    };
    let caps = MigrationCapabilities { auto_converge: true, ..Default::default() };
    let mut rig = rig("auto", 64 * MIB, MIB, 19 << 20, params.clone(), caps);
    // The callback runs on the migration thread right after set_throttle: the
    // guest's own throttle must already be the announced one.
    let probe = rig.guest.vcpus();
    let steps: Arc<Mutex<Vec<(Instant, u8, u8)>>> = Arc::default();
    let log = steps.clone();
    rig.out.state().on_notify(move |n| {
        if let Notification::Throttle { percentage } = n {
            log.lock().unwrap_or_else(|e| e.into_inner()).push((Instant::now(), *percentage, probe.throttle()));
        }
    });
    let t0 = Instant::now();
    let ((res, vcpus), (active_at, reported)) = rig.run_watched(|out, _| {
        wait_for("active", Duration::from_secs(5), || out.state().status() == S::Active);
        let active_at = Instant::now();
        // cpu-throttle-percentage as query-migrate shows it while running.
        let mut reported = vec![];
        while !out.state().status().is_terminal() {
            assert!(active_at.elapsed() < Duration::from_secs(30), "no completion: {:?}", out.info().get());
            if let Some(p) = out.info().get().cpu_throttle_percentage {
                if reported.last() != Some(&p) {
                    reported.push(p);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (active_at, reported)
    });
    let info = res.unwrap_or_else(|e| panic!("auto-converge: {e}"));
    let steps = steps.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let pcts: Vec<u8> = steps.iter().map(|s| s.1).collect();
    let at: Vec<Duration> = steps.iter().map(|s| s.0.duration_since(active_at)).collect();
    eprintln!(
        "auto-converge: steps {pcts:?} at {at:?}; completed after {:?}, {} syncs, downtime {:?}, {} writes",
        t0.elapsed(),
        info.dirty_sync_count,
        info.downtime,
        rig.guest.writes()
    );
    let expect: Vec<u8> = (0..pcts.len())
        .map(|k| {
            (params.cpu_throttle_initial as usize + k * params.cpu_throttle_increment as usize)
                .min(params.max_cpu_throttle as usize) as u8
        })
        .collect();
    assert_eq!(pcts, expect, "initial, then + increment");
    assert!(pcts.len() >= 3, "it needs at least 20, 30, 40 to converge: {pcts:?}");
    for s in &steps {
        assert_eq!(s.1, s.2, "the guest's throttle follows each step");
    }
    // Two high periods of at least 1 s each per step.
    assert!(at[0] >= Duration::from_millis(1950), "first step after two periods: {at:?}");
    for w in at.windows(2) {
        assert!(w[1] - w[0] >= Duration::from_millis(1950), "steps two periods apart: {at:?}");
    }
    assert!(reported.iter().all(|p| pcts.contains(p)), "query-migrate showed {reported:?}, steps {pcts:?}");
    assert_eq!(reported.first(), pcts.first(), "query-migrate shows the throttle");
    assert_eq!(info.status, S::Completed);
    assert!(!vcpus.running(), "stopped after completion");
    assert_eq!(vcpus.throttle(), 0, "the throttle stops with the migration, as QEMU's cpu_throttle_stop()");
    assert_eq!(info.cpu_throttle_percentage, pcts.last().copied(), "the final figures show the last step");
    rig.assert_destination_equal();
    let seen = rig.notifications();
    assert_eq!(check_sequence(Role::Source, &seen), Ok(()), "{seen:?}");
    assert_eq!(states(&seen), [S::Setup, S::Active, S::Completed]);
    let throttles: Vec<u8> = seen
        .iter()
        .filter_map(|n| if let Notification::Throttle { percentage } = n { Some(*percentage) } else { None })
        .collect();
    assert_eq!(throttles, pcts, "subscribers see the same steps");
}
