//! Hand-written and live devices across a real socket.
//!
//! - Hand-written (`RawDevice`) state arrives byte for byte, instances routed apart;
//!   its vmdesc entry has QEMU's old-style shape.
//! - A loader that reads too little or too much fails with `RawBodyEnd` at the offset
//!   where it stopped; a stream cut anywhere in the section fails at the cut; no panic.
//! - A live device (`LiveDevice`) whose emulation keeps dirtying its memory while the
//!   guest runs arrives identical; its pending bytes hold the switchover off until
//!   they drop.
//! - Cancel and refusals: the live device gets its cleanup call, refusals name the
//!   device, the guest runs again.
//!
//! Tests take a lock so they run one at a time: some bound times, and the machine is small.

mod common;

use common::serial;

use engine::error::{report, Origin};
use engine::incoming::{Incoming, IncomingError, IncomingReport};
use engine::info::MigrationInfo;
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::{EngineError, Outgoing};
use engine::state::MigrationStatus;
use engine::vm::{LiveDevice, RawDevice, VmParts};
use engine::vm::{VcpuControl, VmmError};
use savevm_format::{find_trailing_vmdesc, to_qemu_json, ErrorKind, PageSink, RamBlock, SectionKind};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use testkit::synthetic::{SyntheticGuest, SyntheticVcpus};
use transports::{connect, CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};

const RAM: usize = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Mem(Vec<u8>);

impl PageSink for Mem {
    fn page_mut(&mut self, _: &RamBlock, off: u64) -> Option<savevm_format::PageSlot<'_>> {
        (self.0.get_mut(off as usize..off as usize + 4096)).map(savevm_format::PageSlot::from)
    }
}

/// Destination vCPUs: never asked for anything (no autostart).
struct DestVcpus;

impl VcpuControl for DestVcpus {}

fn sock(name: &str) -> MigrationUri {
    common::sock("devices", name)
}

fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

// ------------------------------------------------------------ a hand-written device

/// What a hand-written device's loader received: section version and payload.
type Loaded = Arc<Mutex<Option<(u32, Vec<u8>)>>>;

/// A hand-written device: a be32 length, then its bytes. Its loader reads `skew`
/// bytes more (or fewer) than announced, or refuses.
struct Blob {
    idstr: &'static str,
    instance: u32,
    data: Vec<u8>,
    loaded: Loaded,
    skew: i64,
    refuse: bool,
}

impl Blob {
    fn new(idstr: &'static str, instance: u32, data: Vec<u8>) -> Self {
        Blob { idstr, instance, data, loaded: Default::default(), skew: 0, refuse: false }
    }

    fn loaded(&self) -> Option<(u32, Vec<u8>)> {
        lock(&self.loaded).clone()
    }
}

impl RawDevice for Blob {
    fn idstr(&self) -> &str {
        self.idstr
    }
    fn instance_id(&self) -> u32 {
        self.instance
    }
    fn version(&self) -> u32 {
        4
    }
    fn save_state(&mut self, out: &mut dyn Write) -> Result<(), VmmError> {
        if self.refuse {
            return Err("DMA in flight".into());
        }
        out.write_all(&(self.data.len() as u32).to_be_bytes()).map_err(|e| e.to_string())?;
        out.write_all(&self.data).map_err(VmmError::from)
    }
    fn load_state(&mut self, version: u32, input: &mut dyn Read) -> Result<(), VmmError> {
        if self.refuse {
            return Err("unsupported revision".into());
        }
        let mut len = [0u8; 4];
        input.read_exact(&mut len).map_err(|e| e.to_string())?;
        let n = u32::from_be_bytes(len) as i64 + self.skew;
        if !(0..=1 << 20).contains(&n) {
            return Err(format!("length {n} out of range").into());
        }
        let mut v = vec![0u8; n as usize];
        input.read_exact(&mut v).map_err(|e| e.to_string())?;
        *lock(&self.loaded) = Some((version, v));
        Ok(())
    }
}

// ------------------------------------------------------------ a live device

const CHUNK: usize = 1024;
const CHUNKS: usize = 256;
const END_MARK: u32 = u32::MAX;

/// The device's own memory (say a NIC's descriptor rings) and its dirty log, one bit per chunk.
struct DevMem {
    buf: Vec<u8>,
    dirty: Vec<bool>,
    writes: u64,
}

/// The device emulation: a thread writing the device memory while the guest runs.
struct EmuCtl {
    mem: Mutex<DevMem>,
    run: AtomicBool,
    quit: AtomicBool,
}

impl EmuCtl {
    /// Stop writing; no write happens after this returns (the flag is checked under the lock).
    fn stop(&self) {
        let _m = lock(&self.mem);
        self.run.store(false, Ordering::SeqCst);
    }

    fn writes(&self) -> u64 {
        lock(&self.mem).writes
    }
}

struct Emulation {
    ctl: Arc<EmuCtl>,
    thread: Option<JoinHandle<()>>,
}

impl Emulation {
    /// Device memory filled from `seed`, rewritten one chunk every `every` while running.
    fn start(seed: u64, every: Duration) -> Self {
        let ctl = Arc::new(EmuCtl {
            mem: Mutex::new(DevMem { buf: bytes(seed, CHUNKS * CHUNK), dirty: vec![false; CHUNKS], writes: 0 }),
            run: AtomicBool::new(true),
            quit: AtomicBool::new(false),
        });
        let c = ctl.clone();
        let thread = std::thread::spawn(move || {
            let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            while !c.quit.load(Ordering::SeqCst) {
                {
                    let mut m = lock(&c.mem);
                    if c.run.load(Ordering::SeqCst) {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        let chunk = (s >> 8) as usize % CHUNKS;
                        let at = chunk * CHUNK + (s >> 32) as usize % (CHUNK - 8);
                        m.writes += 1;
                        let w = m.writes;
                        m.buf[at..at + 8].copy_from_slice(&(w ^ s).to_le_bytes());
                        m.dirty[chunk] = true;
                    }
                }
                std::thread::sleep(every);
            }
        });
        Emulation { ctl, thread: Some(thread) }
    }
}

impl Drop for Emulation {
    fn drop(&mut self) {
        self.ctl.quit.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The guest's vCPUs and the device emulation stop and resume together.
struct Vcpus {
    guest: SyntheticVcpus,
    emu: Arc<EmuCtl>,
}

impl VcpuControl for Vcpus {
    fn stop(&mut self) -> Result<(), VmmError> {
        self.guest.stop()?;
        self.emu.stop();
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        self.emu.run.store(true, Ordering::SeqCst);
        self.guest.resume()
    }
    fn set_throttle(&mut self, p: u8) -> Result<(), VmmError> {
        self.guest.set_throttle(p)
    }
}

#[derive(Default)]
struct LogStats {
    parts: AtomicU64,
    chunks: AtomicU64,
    cleanups: AtomicU64,
}

/// Source side of the live device: START = geometry, PART/END = dirty chunks
/// (be32 index + bytes) up to an end mark. While `hold` is set it reports 1 GiB pending.
struct LogSource {
    emu: Arc<EmuCtl>,
    hold: Arc<AtomicBool>,
    stats: Arc<LogStats>,
    refuse_setup: bool,
}

impl LogSource {
    fn send_dirty(&self, out: &mut dyn Write, max: usize) -> Result<(), String> {
        let batch: Vec<(u32, Vec<u8>)> = {
            let mut m = lock(&self.emu.mem);
            let mut v = Vec::new();
            for c in 0..CHUNKS {
                if v.len() == max {
                    break;
                }
                if m.dirty[c] {
                    m.dirty[c] = false;
                    v.push((c as u32, m.buf[c * CHUNK..(c + 1) * CHUNK].to_vec()));
                }
            }
            v
        };
        for (i, data) in &batch {
            out.write_all(&i.to_be_bytes()).map_err(|e| e.to_string())?;
            out.write_all(data).map_err(|e| e.to_string())?;
        }
        out.write_all(&END_MARK.to_be_bytes()).map_err(|e| e.to_string())?;
        self.stats.chunks.fetch_add(batch.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}

impl LiveDevice for LogSource {
    fn idstr(&self) -> &str {
        "0000:00:03.0/dirty-log"
    }
    fn version(&self) -> u32 {
        2
    }
    fn save_setup(&mut self, out: &mut dyn Write) -> Result<(), VmmError> {
        if self.refuse_setup {
            return Err("no dirty logging on this host".into());
        }
        lock(&self.emu.mem).dirty.fill(true);
        out.write_all(&(CHUNKS as u32).to_be_bytes()).map_err(|e| e.to_string())?;
        out.write_all(&(CHUNK as u32).to_be_bytes()).map_err(VmmError::from)
    }
    fn pending(&mut self) -> u64 {
        if self.hold.load(Ordering::SeqCst) {
            return 1 << 30;
        }
        lock(&self.emu.mem).dirty.iter().filter(|d| **d).count() as u64 * CHUNK as u64
    }
    fn save_iterate(&mut self, out: &mut dyn Write) -> Result<(), VmmError> {
        self.stats.parts.fetch_add(1, Ordering::SeqCst);
        Ok(self.send_dirty(out, 32)?)
    }
    fn save_complete(&mut self, out: &mut dyn Write) -> Result<(), VmmError> {
        Ok(self.send_dirty(out, usize::MAX)?)
    }
    fn save_cleanup(&mut self) {
        self.stats.cleanups.fetch_add(1, Ordering::SeqCst);
    }
}

/// Destination side of the live device.
#[derive(Default)]
struct LogDest {
    buf: Arc<Mutex<Vec<u8>>>,
    kinds: Arc<Mutex<Vec<SectionKind>>>,
}

fn be32(input: &mut dyn Read) -> Result<u32, String> {
    let mut b = [0u8; 4];
    input.read_exact(&mut b).map_err(|e| e.to_string())?;
    Ok(u32::from_be_bytes(b))
}

impl LiveDevice for LogDest {
    fn idstr(&self) -> &str {
        "0000:00:03.0/dirty-log"
    }
    fn version(&self) -> u32 {
        2
    }
    fn load_state(&mut self, kind: SectionKind, version: u32, input: &mut dyn Read) -> Result<(), VmmError> {
        if version != 2 {
            return Err(format!("version {version}").into());
        }
        lock(&self.kinds).push(kind);
        let mut buf = lock(&self.buf);
        if kind == SectionKind::Start {
            let (n, size) = (be32(input)?, be32(input)?);
            if (n as usize, size as usize) != (CHUNKS, CHUNK) {
                return Err(format!("geometry {n} x {size}").into());
            }
            *buf = vec![0; CHUNKS * CHUNK];
            return Ok(());
        }
        loop {
            let i = be32(input)?;
            if i == END_MARK {
                return Ok(());
            }
            let slot = buf.get_mut(i as usize * CHUNK..(i as usize + 1) * CHUNK).ok_or(format!("chunk {i}"))?;
            input.read_exact(slot).map_err(|e| e.to_string())?;
        }
    }
}

// ------------------------------------------------------------ plumbing

struct Run {
    src: Result<MigrationInfo, EngineError>,
    dst: Result<IncomingReport, IncomingError>,
}

fn outgoing(max_bandwidth: u64) -> Outgoing {
    outgoing_with(MigrationParameters { max_bandwidth, ..Default::default() })
}

fn outgoing_with(p: MigrationParameters) -> Outgoing {
    Outgoing::new(SharedParameters::new(p).expect("params"), MigrationCapabilities::default()).expect("outgoing")
}

/// Migrate `guest` with `src` devices to an in-process destination with the given devices.
fn migrate(
    name: &str,
    out: &Outgoing,
    guest: &SyntheticGuest,
    vcpus: &mut dyn VcpuControl,
    src: &mut VmParts<'_>,
    mut dst_raw: Vec<Box<dyn RawDevice>>,
    mut dst_live: Vec<Box<dyn LiveDevice>>,
) -> Run {
    let region = guest.region("mem").expect("region");
    let cancel = CancelToken::new().expect("token");
    let listener = Listener::bind(&sock(name), &cancel).expect("listen");
    let dst = std::thread::spawn(move || {
        let ch = listener.accept().expect("accept");
        let mut vm = VmParts {
            raw_devices: dst_raw.iter_mut().map(|d| -> &mut dyn RawDevice { d.as_mut() }).collect(),
            live_devices: dst_live.iter_mut().map(|d| -> &mut dyn LiveDevice { d.as_mut() }).collect(),
            ..Default::default()
        };
        let mut mem = Mem(vec![0; RAM]);
        Incoming::new(false).run(MigrationReader::new(ch, RateLimit::new(0)), &mut mem, &mut vm, &mut DestVcpus)
    });
    let ch = connect(&sock(name), &cancel).expect("connect");
    let src = out.run_vm(ch, &mut [engine::memory::RamRegion::new(&region).with_dirty(guest.dirty())], vcpus, src);
    let dst = dst.join().expect("destination thread");
    Run { src, dst }
}

/// The stream a migration of an idle guest with `src` devices writes.
fn capture(name: &str, src: &mut VmParts<'_>) -> Vec<u8> {
    let guest = SyntheticGuest::new(RAM, |p, page| page.fill(p as u8));
    let region = guest.region("mem").expect("region");
    let cancel = CancelToken::new().expect("token");
    let listener = Listener::bind(&sock(name), &cancel).expect("listen");
    let dst = std::thread::spawn(move || {
        let ch = listener.accept().expect("accept");
        let mut v = Vec::new();
        MigrationReader::new(ch, RateLimit::new(0)).read_to_end(&mut v).expect("read stream");
        v
    });
    let ch = connect(&sock(name), &cancel).expect("connect");
    outgoing(0)
        .run_vm(ch, &mut [engine::memory::RamRegion::new(&region).with_dirty(guest.dirty())], &mut guest.vcpus(), src)
        .expect("source");
    dst.join().expect("destination thread")
}

/// Offset of the body of FULL section `id` named `idstr` in `stream`.
fn full_body(stream: &[u8], id: u32, idstr: &str) -> usize {
    let mut head = vec![4u8];
    head.extend_from_slice(&id.to_be_bytes());
    head.push(idstr.len() as u8);
    head.extend_from_slice(idstr.as_bytes());
    let at = stream.windows(head.len()).position(|w| w == head).expect("section in stream");
    at + head.len() + 8
}

/// Load `stream` with one hand-written device `rtc` reading with `skew`.
fn load_with(stream: &[u8], skew: i64) -> (Result<IncomingReport, IncomingError>, Blob) {
    let mut rtc = Blob { skew, ..Blob::new("rtc", 0, vec![]) };
    let mut vm = VmParts { raw_devices: vec![&mut rtc], ..Default::default() };
    let r = Incoming::new(false).run(stream, &mut Mem(vec![0; RAM]), &mut vm, &mut DestVcpus);
    (r, rtc)
}

// ------------------------------------------------------------ tests

#[test]
fn raw_devices_round_trip_byte_for_byte() {
    let _s = serial();
    let mut guest = SyntheticGuest::new(RAM, |p, page| page.fill(p as u8));
    guest.start(1, 2 << 20, 7);
    let big = bytes(1, 3000);
    let (mut a, mut b, mut c) = (
        Blob::new("rtc", 0, big.clone()),
        Blob::new("rtc", 1, b"second instance".to_vec()),
        Blob::new("fw", 0, vec![]),
    );
    let (da, db, dc) = (Blob::new("rtc", 0, vec![]), Blob::new("rtc", 1, vec![]), Blob::new("fw", 0, vec![]));
    let seen = [da.loaded.clone(), db.loaded.clone(), dc.loaded.clone()];
    let mut vm = VmParts { raw_devices: vec![&mut a, &mut b, &mut c], ..Default::default() };
    let out = outgoing(0);
    let mut vcpus = guest.vcpus();
    let run = migrate("raw", &out, &guest, &mut vcpus, &mut vm, vec![Box::new(da), Box::new(db), Box::new(dc)], vec![]);
    run.src.expect("source");
    let report = run.dst.expect("destination");
    assert_eq!(report.devices, 3);
    let got: Vec<_> = seen.iter().map(|s| lock(s).clone()).collect();
    assert_eq!(got, [Some((4, big)), Some((4, b"second instance".to_vec())), Some((4, vec![]))]);
}

#[test]
fn raw_loaders_that_misread_fail_where_the_footer_was_expected() {
    let _s = serial();
    let mut rtc = Blob::new("rtc", 0, bytes(2, 100));
    let stream = capture("misread", &mut VmParts { raw_devices: vec![&mut rtc], ..Default::default() });
    let body = full_body(&stream, 5, "rtc") as u64;
    let (ok, dev) = load_with(&stream, 0);
    ok.expect("exact loader");
    assert_eq!(dev.loaded(), Some((4, bytes(2, 100))));
    for skew in [-1i64, -40, -100, 1, 7, 60] {
        let (r, _) = load_with(&stream, skew);
        let read = (4 + 100 + skew) as u64;
        match r {
            Err(IncomingError::Stream(e)) => {
                assert!(matches!(e.kind, ErrorKind::RawBodyEnd { read: n, .. } if n == read), "skew {skew}: {e}");
                assert_eq!(e.offset, body + read, "skew {skew}: {e}");
                assert_eq!(e.section.as_deref(), Some("rtc"), "skew {skew}: {e}");
            }
            other => panic!("skew {skew}: {other:?}"),
        }
    }
}

#[test]
fn a_raw_section_cut_anywhere_fails_at_the_cut() {
    let _s = serial();
    let mut rtc = Blob::new("rtc", 0, bytes(3, 100));
    let stream = capture("cut", &mut VmParts { raw_devices: vec![&mut rtc], ..Default::default() });
    let body = full_body(&stream, 5, "rtc");
    let section = body - (1 + 4 + 1 + 3 + 4 + 4);
    let footer_end = body + 104 + 5;
    for cut in section..footer_end {
        match load_with(&stream[..cut], 0).0 {
            Err(IncomingError::Stream(e)) => {
                assert!(e.is_truncation(), "cut {cut}: {e}");
                assert_eq!(e.offset, cut as u64, "cut {cut}: {e}");
            }
            other => panic!("cut {cut}: {other:?}"),
        }
    }
}

#[test]
fn vmdesc_of_raw_devices_has_qemus_old_style_shape() {
    let _s = serial();
    let mut rtc = Blob::new("rtc", 0, bytes(4, 100));
    let mut fw = Blob::new("fw", 2, vec![]);
    let stream = capture("vmdesc", &mut VmParts { raw_devices: vec![&mut rtc, &mut fw], ..Default::default() });
    let (vmdesc, _) = find_trailing_vmdesc(&stream).expect("vmdesc");
    let devs = vmdesc["devices"].as_array().expect("devices");
    let names: Vec<&str> = devs.iter().filter_map(|d| d["name"].as_str()).collect();
    assert_eq!(names, ["timer", "rtc", "fw", "globalstate"]);
    assert_eq!(
        to_qemu_json(&devs[1]),
        r#"{"name": "rtc", "instance_id": 0, "size": 104, "fields": [{"name": "data", "size": 104, "type": "buffer"}]}"#
    );
    assert_eq!(
        to_qemu_json(&devs[2]),
        r#"{"name": "fw", "instance_id": 2, "size": 4, "fields": [{"name": "data", "size": 4, "type": "buffer"}]}"#
    );
}

/// A live device dirtied by its emulation during the migration; returns what the
/// destination holds and what the source held at stop, with the source's stats.
struct LiveRun {
    run: Run,
    src_mem: Vec<u8>,
    dst_mem: Vec<u8>,
    kinds: Vec<SectionKind>,
    stats: Arc<LogStats>,
    writes: u64,
}

fn live_migration(name: &str, out: &Outgoing, hold: Arc<AtomicBool>) -> LiveRun {
    let mut guest = SyntheticGuest::new(RAM, |p, page| page.fill(p as u8 ^ 0x5a));
    guest.start(1, 256 << 10, 11);
    let emu = Emulation::start(5, Duration::from_millis(1));
    let stats = Arc::new(LogStats::default());
    let mut dev = LogSource { emu: emu.ctl.clone(), hold, stats: stats.clone(), refuse_setup: false };
    let dst = LogDest::default();
    let (dst_buf, kinds) = (dst.buf.clone(), dst.kinds.clone());
    let mut vcpus = Vcpus { guest: guest.vcpus(), emu: emu.ctl.clone() };
    let mut vm = VmParts { live_devices: vec![&mut dev], ..Default::default() };
    let run = migrate(name, out, &guest, &mut vcpus, &mut vm, vec![], vec![Box::new(dst)]);
    let src_mem = lock(&emu.ctl.mem).buf.clone();
    let writes = emu.ctl.writes();
    let dst_mem = lock(&dst_buf).clone();
    let kinds = lock(&kinds).clone();
    LiveRun { run, src_mem, dst_mem, kinds, stats, writes }
}

#[test]
fn a_live_device_dirtied_during_migration_arrives_identical() {
    let _s = serial();
    // 8 MiB/s x 10 ms is about 84 KB: the device's 256 KiB must go over several PARTs.
    let out = outgoing_with(MigrationParameters { max_bandwidth: 8 << 20, downtime_limit: 10, ..Default::default() });
    // Hold the switchover for 300 ms so the emulation (one write per ms, fewer on a
    // busy host) rewrites chunks that were already sent.
    let hold = Arc::new(AtomicBool::new(true));
    let h = hold.clone();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        h.store(false, Ordering::SeqCst);
    });
    let r = live_migration("live", &out, hold);
    releaser.join().expect("releaser");
    r.run.src.expect("source");
    let report = r.run.dst.expect("destination");
    assert!(r.src_mem == r.dst_mem, "device memory differs at the destination");
    let parts = r.stats.parts.load(Ordering::SeqCst);
    // 256 KiB less what fits in 84 KB, at 32 KiB per PART.
    assert!(parts >= 5, "{parts} PART sections");
    let chunks = r.stats.chunks.load(Ordering::SeqCst);
    assert!(chunks > CHUNKS as u64, "chunks rewritten during the migration were sent again ({chunks} sent)");
    assert!(r.writes > 0);
    assert_eq!(r.stats.cleanups.load(Ordering::SeqCst), 1);
    assert_eq!(r.kinds.first(), Some(&SectionKind::Start));
    assert_eq!(r.kinds.last(), Some(&SectionKind::End));
    assert_eq!(r.kinds.iter().filter(|k| **k == SectionKind::Part).count() as u64, parts);
    assert_eq!(report.live_sections, parts + 2);
    assert_eq!(out.state().status(), MigrationStatus::Completed);
}

#[test]
fn pending_device_bytes_hold_off_the_switchover() {
    let _s = serial();
    // 32 MiB/s x 300 ms is about 10 MB: 1 GiB pending can never fit.
    let out = outgoing(32 << 20);
    let hold = Arc::new(AtomicBool::new(true));
    let (o, h) = (out.clone(), hold.clone());
    // Taken before the watcher starts its 1.5 s, so `released - start` is at least that.
    let start = Instant::now();
    let watcher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        let status = o.state().status();
        h.store(false, Ordering::SeqCst);
        (status, Instant::now())
    });
    let r = live_migration("hold", &out, hold);
    let done = Instant::now();
    let (status, released) = watcher.join().expect("watcher");
    let info = r.run.src.expect("source");
    r.run.dst.expect("destination");
    assert_eq!(status, MigrationStatus::Active, "no switchover while 1 GiB is pending");
    assert!(done > released && released - start >= Duration::from_millis(1500));
    assert!(done - released < Duration::from_secs(3), "switchover {:?} after the release", done - released);
    // The migration started after `start` (setup under load may take a while), so only an upper bound holds.
    assert!(info.total_time <= done - start, "total-time {:?} longer than the run", info.total_time);
    assert!(r.src_mem == r.dst_mem, "device memory differs at the destination");
    assert!(r.stats.parts.load(Ordering::SeqCst) >= 5);
}

#[test]
fn cancel_with_a_live_device_cleans_it_up() {
    let _s = serial();
    let out = outgoing(32 << 20);
    let o = out.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        o.cancel().cancel();
    });
    let r = live_migration("cancel", &out, Arc::new(AtomicBool::new(true)));
    canceller.join().expect("canceller");
    assert!(matches!(r.run.src, Err(EngineError::Cancelled)), "{:?}", r.run.src);
    assert!(r.run.dst.is_err(), "the destination must not complete");
    assert_eq!(r.stats.cleanups.load(Ordering::SeqCst), 1);
    assert_eq!(out.state().status(), MigrationStatus::Cancelled);
}

#[test]
fn refusals_name_the_device_and_live_devices_are_cleaned_up() {
    let _s = serial();
    // A live device refusing its setup.
    let mut guest = SyntheticGuest::new(RAM, |_, page| page.fill(1));
    guest.start(1, 1 << 20, 3);
    let emu = Emulation::start(9, Duration::from_millis(1));
    let stats = Arc::new(LogStats::default());
    let mut dev =
        LogSource { emu: emu.ctl.clone(), hold: Default::default(), stats: stats.clone(), refuse_setup: true };
    let mut vcpus = Vcpus { guest: guest.vcpus(), emu: emu.ctl.clone() };
    let out = outgoing(0);
    let mut vm = VmParts { live_devices: vec![&mut dev], ..Default::default() };
    let run = migrate("refuse-live", &out, &guest, &mut vcpus, &mut vm, vec![], vec![Box::new(LogDest::default())]);
    match run.src {
        Err(e @ EngineError::Vmm(_)) => {
            assert_eq!(e.origin(), Origin::Vmm);
            assert_eq!(report(&e), "device '0000:00:03.0/dirty-log': no dirty logging on this host");
        }
        other => panic!("{other:?}"),
    }
    assert!(run.dst.is_err());
    assert_eq!(stats.cleanups.load(Ordering::SeqCst), 1, "cleanup after a failed setup");
    assert_eq!(out.state().status(), MigrationStatus::Failed);

    // A hand-written device refusing to save, at switchover: the guest runs again.
    let mut rtc = Blob { refuse: true, ..Blob::new("rtc", 1, vec![1, 2, 3]) };
    let out = outgoing(0);
    let mut vm = VmParts { raw_devices: vec![&mut rtc], ..Default::default() };
    let run =
        migrate("refuse-save", &out, &guest, &mut vcpus, &mut vm, vec![Box::new(Blob::new("rtc", 1, vec![]))], vec![]);
    match run.src {
        Err(e @ EngineError::Vmm(_)) => assert_eq!(report(&e), "device 'rtc' instance 1: DMA in flight"),
        other => panic!("{other:?}"),
    }
    assert!(vcpus.guest.running() && vcpus.emu.run.load(Ordering::SeqCst), "the guest runs again");

    // A hand-written device refusing its state on the destination.
    let mut rtc = Blob::new("rtc", 0, vec![9; 10]);
    let out = outgoing(0);
    let mut vm = VmParts { raw_devices: vec![&mut rtc], ..Default::default() };
    let dst = Blob { refuse: true, ..Blob::new("rtc", 0, vec![]) };
    let run = migrate("refuse-load", &out, &guest, &mut vcpus, &mut vm, vec![Box::new(dst)], vec![]);
    run.src.expect("the source completes");
    match run.dst {
        Err(e @ IncomingError::Vmm(_)) => {
            assert_eq!(e.origin(), Origin::Vmm);
            let m = report(&e);
            assert!(m.starts_with("device 'rtc' (full section at byte "), "{m}");
            assert!(m.ends_with(": unsupported revision"), "{m}");
        }
        other => panic!("{other:?}"),
    }
}
