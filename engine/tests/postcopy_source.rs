//! The source's postcopy over real unix sockets, against a hand-made destination
//! that decodes the stream and talks back on the return path as QEMU 7.2's does
//! (PONGs, page requests, SHUT):
//!
//! - the wire in QEMU 7.2's order: OPEN_RETURN_PATH, PING 1, POSTCOPY_ADVISE
//!   (4096, 4096), then at the switch the discards, PING 2, the PACKAGED blob
//!   (LISTEN, devices, PING 3, RUN), PING 4, pages, EOF and no vmdesc; the
//!   prologue, PING 2 + package + PING 4, and the end byte-identical to QEMU 7.2's
//!   postcopy fixture;
//! - page requests sent once the guest "runs" are served ahead of the background
//!   pages, in arrival order, and counted in `ram.postcopy-requests`;
//! - a live guest: pages sent and then dirtied before the switch are discarded
//!   and sent again; the destination ends equal to the guest at stop;
//! - a request outside every block fails the migration with the return path's
//!   byte offset, and the guest stays stopped (it cannot resume in postcopy);
//! - `start_postcopy` refused without `postcopy-ram` or before the start;
//! - under a tiny `max-postcopy-bandwidth`, a request is served at once, not at the
//!   next rate-limit window (QEMU 7.2's `postcopy_has_request()` bypass).

mod common;

use common::serial;
use engine::memory::RamRegion;
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::{EngineError, Outgoing, StartPostcopyError};
use engine::state::MigrationStatus;
use engine::vm::{VcpuControl, VmmError};
use savevm_format::{Command, Decoder, Event, PageSink, RamBlock, RpMessage};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use testkit::synthetic::SyntheticGuest;
use transports::{connect, CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};

const PAGE: u64 = 4096;

/// The destination's RAM and which pages it holds.
struct Mem {
    ram: Vec<u8>,
    have: Vec<bool>,
    /// Pages in the order they arrived after POSTCOPY_RUN.
    after_run: Vec<u64>,
    running: bool,
}

impl PageSink for Mem {
    fn page_mut(&mut self, _: &RamBlock, off: u64) -> Option<savevm_format::PageSlot<'_>> {
        let p = (off / PAGE) as usize;
        *self.have.get_mut(p)? = true;
        if self.running {
            self.after_run.push(p as u64);
        }
        self.ram.get_mut(p * PAGE as usize..(p + 1) * PAGE as usize).map(savevm_format::PageSlot::from)
    }
}

/// What the hand-made destination saw.
#[derive(Debug, Default)]
struct Seen {
    /// Command names in order (`PACKAGE_END` where the blob ended, `EOF`, `VMDESC`).
    commands: Vec<String>,
    advise: Option<(u64, u64)>,
    /// Discarded pages that had arrived before the discard (sent, then dirtied).
    discarded_held: u64,
    discarded: u64,
    /// Pages received before the requests were sent (after RUN).
    before_requests: usize,
    after_run: Vec<u64>,
    ram: Vec<u8>,
    error: Option<String>,
}

fn send(rp: &mut impl Write, m: RpMessage) {
    let _ = rp.write_all(&m.encode());
    let _ = rp.flush();
}

/// A destination on `uri` of `len` bytes of RAM that answers PINGs and, at
/// POSTCOPY_RUN, sends `requests` (block, start, len) (REQ_PAGES_ID when the
/// block changes, else REQ_PAGES); SHUT(0) after EOF.
fn destination(uri: &MigrationUri, len: usize, requests: Vec<(&'static str, u64, u32)>) -> JoinHandle<Seen> {
    destination_with(uri, len, requests, Fail::No)
}

/// How [`destination_with`] fails.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fail {
    No,
    /// It refuses the package's device state: SHUT(1), then it closes.
    Refuse,
    /// It goes away (as if killed) once the guest runs: both directions closed.
    Vanish,
}

/// [`destination`], failing as `fail` says.
fn destination_with(
    uri: &MigrationUri,
    len: usize,
    requests: Vec<(&'static str, u64, u32)>,
    fail: Fail,
) -> JoinHandle<Seen> {
    let token = CancelToken::new().expect("token");
    let listener = Listener::bind(uri, &token).expect("listen");
    std::thread::spawn(move || {
        let _token = token;
        let ch = listener.accept().expect("accept");
        let mut rp = ch.return_path().expect("return path");
        let mut d = Decoder::new(MigrationReader::new(ch, RateLimit::new(0)));
        let pages = len / PAGE as usize;
        let mut mem = Mem { ram: vec![0; len], have: vec![false; pages], after_run: vec![], running: false };
        let mut seen = Seen::default();
        loop {
            let ev = match d.next_with(&mut mem) {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => {
                    seen.error = Some(e.to_string());
                    break;
                }
            };
            match ev {
                Event::Command(c) => {
                    seen.commands.push(c.name().to_string());
                    match c {
                        Command::Ping(v) => send(&mut rp, RpMessage::Pong(v)),
                        Command::PostcopyAdvise(a) => seen.advise = a,
                        Command::PostcopyRamDiscard { ranges, .. } => {
                            for (start, n) in ranges {
                                for p in start / PAGE..(start + n) / PAGE {
                                    let p = p as usize;
                                    seen.discarded += 1;
                                    if std::mem::take(&mut mem.have[p]) {
                                        seen.discarded_held += 1;
                                    }
                                    mem.ram[p * PAGE as usize..(p + 1) * PAGE as usize].fill(0);
                                }
                            }
                        }
                        Command::PostcopyRun if fail == Fail::Vanish => {
                            seen.error = Some("vanished".into());
                            return seen;
                        }
                        Command::PostcopyRun => {
                            mem.running = true;
                            seen.before_requests = mem.after_run.len();
                            let mut last = None;
                            for &(block, start, len) in &requests {
                                let m = if last == Some(block) {
                                    RpMessage::ReqPages { start, len }
                                } else {
                                    RpMessage::ReqPagesId { start, len, block: block.into() }
                                };
                                last = Some(block);
                                send(&mut rp, m);
                            }
                        }
                        _ => {}
                    }
                }
                Event::PackageEnd => seen.commands.push("PACKAGE_END".into()),
                // In the package, after LISTEN: the devices' state is refused.
                Event::SectionStart(h)
                    if fail == Fail::Refuse
                        && h.idstr == "globalstate"
                        && seen.commands.iter().any(|c| c == "POSTCOPY_LISTEN") =>
                {
                    seen.error = Some("refused the device state".into());
                    send(&mut rp, RpMessage::Shut(1));
                    break;
                }
                Event::Eof => {
                    seen.commands.push("EOF".into());
                    // A postcopy stream has no vmdesc: the next read must find the end.
                    if let Ok(Some(Event::VmDescription(_))) = d.next_with(&mut mem) {
                        seen.commands.push("VMDESC".into());
                    }
                    let missing = mem.have.iter().filter(|h| !**h).count();
                    if missing == 0 {
                        send(&mut rp, RpMessage::Shut(0));
                    } else {
                        seen.error = Some(format!("{missing} pages never arrived"));
                        send(&mut rp, RpMessage::Shut(1));
                    }
                    break;
                }
                _ => {}
            }
        }
        seen.after_run = mem.after_run;
        seen.ram = mem.ram;
        // Keep the connection until the source has read SHUT and closed its side.
        let mut sink = [0u8; 64];
        let mut inner = d.into_inner();
        let _ = std::io::Read::read(&mut inner, &mut sink);
        seen
    })
}

/// The source's vCPUs: every call recorded.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<&'static str>>>);

impl Calls {
    fn get(&self) -> Vec<&'static str> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl VcpuControl for Calls {
    fn stop(&mut self) -> Result<(), VmmError> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push("stop");
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push("resume");
        Ok(())
    }
    fn set_throttle(&mut self, _: u8) -> Result<(), VmmError> {
        Ok(())
    }
}

fn guest(len: usize) -> SyntheticGuest {
    SyntheticGuest::new(len, |p, page| {
        page.fill(0);
        page[..8].copy_from_slice(&(p * 7 + 1).to_le_bytes());
    })
}

fn image(g: &SyntheticGuest) -> Vec<u8> {
    let mut v = vec![0u8; g.pages() as usize * PAGE as usize];
    for (p, page) in v.chunks_mut(PAGE as usize).enumerate() {
        g.read_page(p as u64, page);
    }
    v
}

fn postcopy_out(max_bandwidth: u64, max_postcopy_bandwidth: u64) -> Outgoing {
    let p = MigrationParameters { max_bandwidth, max_postcopy_bandwidth, ..Default::default() };
    let caps = MigrationCapabilities { postcopy_ram: true, ..Default::default() };
    Outgoing::new(SharedParameters::new(p).expect("params"), caps).expect("outgoing")
}

#[test]
fn requested_pages_are_served_ahead_of_background_pages_in_qemus_wire_order() {
    let _s = serial();
    const LEN: usize = 2 << 20; // 512 pages
    let uri = common::sock("pcsrc", "requests");
    let requests = vec![("mem", 511 * PAGE, 4096), ("mem", 400 * PAGE, 4096), ("mem", 300 * PAGE, 4096)];
    let dst = destination(&uri, LEN, requests);
    let g = guest(LEN);
    let region = g.region("mem").expect("region");
    // Background pages at 1 MiB/s (256 pages/s): the scan alone would need 1-2 s to
    // reach pages 300-511.
    let out = postcopy_out(0, 1 << 20).with_postcopy_after(Duration::ZERO);
    let mut calls = Calls::default();
    let ch = connect(&uri, out.cancel()).expect("connect");
    let t0 = Instant::now();
    let info = out.run(ch, &mut [RamRegion::new(&region)], &mut calls).expect("postcopy completes");
    let seen = dst.join().expect("destination");
    assert_eq!(seen.error, None);
    assert_eq!(info.status, MigrationStatus::Completed);
    assert_eq!(info.postcopy_requests, 3, "{:?}", info.to_json());
    assert_eq!(info.to_json()["ram"]["postcopy-requests"], 3);
    assert!(info.postcopy_bytes >= LEN as u64, "{:?}", info.to_json());
    assert_eq!(info.precopy_bytes + info.downtime_bytes + info.postcopy_bytes, info.transferred);
    assert_eq!(calls.get(), vec!["stop"], "stopped at the switch, never resumed");
    assert_eq!(seen.advise, Some((4096, 4096)));
    let c: Vec<&str> = seen.commands.iter().map(String::as_str).collect();
    assert_eq!(
        c,
        [
            "OPEN_RETURN_PATH",
            "PING",
            "POSTCOPY_ADVISE",
            "POSTCOPY_RAM_DISCARD",
            "PING",
            "PACKAGED",
            "POSTCOPY_LISTEN",
            "PING",
            "POSTCOPY_RUN",
            "PACKAGE_END",
            "PING",
            "EOF"
        ],
        "QEMU 7.2's order; no vmdesc after a postcopy EOF"
    );
    // Started at once: every page was still to send, so all were discarded.
    assert_eq!(seen.discarded, 512);
    // The requests' pages came in request order, each long before the background
    // scan would have reached it.
    let pos = |p: u64| seen.after_run.iter().position(|&q| q == p).expect("requested page arrived");
    let (a, b, c) = (pos(511), pos(400), pos(300));
    eprintln!("requested pages at positions {a} {b} {c}; {} pages before the requests", seen.before_requests);
    assert!(a < b && b < c, "in request order: {a} {b} {c}");
    assert!(c < seen.before_requests + 100, "served ahead: positions {a} {b} {c}, {} before", seen.before_requests);
    assert_eq!(seen.after_run.len(), 512, "each page sent once");
    assert!(seen.ram == image(&g), "destination RAM differs");
    assert!(t0.elapsed() < Duration::from_secs(20));
}

#[test]
fn a_live_guests_pages_dirtied_after_sending_are_discarded_and_sent_again() {
    let _s = serial();
    const LEN: usize = 4 << 20; // 1024 pages
    let uri = common::sock("pcsrc", "live");
    let dst = destination(&uri, LEN, vec![("mem", 1000 * PAGE, 4096)]);
    let mut g = guest(LEN);
    let region = g.region("mem").expect("region");
    // 4 MiB at 4 MiB/s: the first pass takes a second; the guest dirties 2 MiB/s.
    g.start(1, 2 << 20, 5);
    let out = postcopy_out(4 << 20, 0);
    let ch = connect(&uri, out.cancel()).expect("connect");
    let mut vcpus = g.vcpus();
    let dirty = g.dirty();
    let info = std::thread::scope(|s| {
        let run = s.spawn(|| out.run(ch, &mut [RamRegion::new(&region).with_dirty(dirty)], &mut vcpus));
        let mut guard = common::CancelOnDrop(Some(out.cancel().clone()));
        let t0 = Instant::now();
        while out.info().get().normal < 500 && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(5));
        }
        out.start_postcopy().expect("start postcopy");
        guard.0 = None;
        run.join().expect("migration thread")
    })
    .expect("postcopy completes");
    let seen = dst.join().expect("destination");
    assert_eq!(seen.error, None);
    assert_eq!(info.status, MigrationStatus::Completed);
    assert!(seen.discarded_held > 0, "pages sent then dirtied were discarded: {seen:?}");
    assert!(seen.discarded > seen.discarded_held, "and the pages never sent");
    assert!(info.precopy_bytes > 0 && info.postcopy_bytes > 0, "{:?}", info.to_json());
    assert_eq!(info.postcopy_requests, 1);
    let expect = image(&g);
    g.shutdown();
    assert!(seen.ram == expect, "destination differs from the guest at stop");
}

#[test]
fn postcopy_after_starts_at_the_end_of_the_first_pass_when_that_is_sooner() {
    let _s = serial();
    const LEN: usize = 2 << 20; // 512 pages: the first pass takes about 0.5 s
    let uri = common::sock("pcsrc", "after");
    let dst = destination(&uri, LEN, vec![]);
    let mut g = guest(LEN);
    let region = g.region("mem").expect("region");
    // A guest pre-copy cannot converge with (downtime-limit 1 ms), and a delay far
    // longer than the first pass: postcopy starts when the first pass is done.
    g.start(1, 8 << 20, 9);
    let p = MigrationParameters { max_bandwidth: 4 << 20, downtime_limit: 1, ..Default::default() };
    let caps = MigrationCapabilities { postcopy_ram: true, ..Default::default() };
    let out = Outgoing::new(SharedParameters::new(p).expect("params"), caps)
        .expect("outgoing")
        .with_postcopy_after(Duration::from_secs(60));
    let ch = connect(&uri, out.cancel()).expect("connect");
    let mut vcpus = g.vcpus();
    let dirty = g.dirty();
    let t0 = Instant::now();
    let info = out.run(ch, &mut [RamRegion::new(&region).with_dirty(dirty)], &mut vcpus).expect("completes");
    let seen = dst.join().expect("destination");
    assert_eq!(seen.error, None);
    assert!(t0.elapsed() < Duration::from_secs(20), "not the 60 s delay: {:?}", t0.elapsed());
    assert!(info.postcopy_bytes > 0, "{:?}", info.to_json());
    assert!(info.precopy_bytes >= LEN as u64, "the first pass went out before the switch: {:?}", info.to_json());
    let expect = image(&g);
    g.shutdown();
    assert!(seen.ram == expect, "destination differs from the guest at stop");
}

#[test]
fn a_request_outside_every_block_fails_with_its_offset_and_the_guest_stays_stopped() {
    let _s = serial();
    const LEN: usize = 1 << 20;
    let uri = common::sock("pcsrc", "outside");
    let dst = destination(&uri, LEN, vec![("mem", LEN as u64, 4096)]);
    let g = guest(LEN);
    let region = g.region("mem").expect("region");
    let out = postcopy_out(0, 256 << 10).with_postcopy_after(Duration::ZERO);
    let mut calls = Calls::default();
    let ch = connect(&uri, out.cancel()).expect("connect");
    let t0 = Instant::now();
    let e = out.run(ch, &mut [RamRegion::new(&region)], &mut calls).expect_err("a protocol error");
    let seen = dst.join().expect("destination");
    assert!(t0.elapsed() < Duration::from_secs(10), "failed promptly");
    let text = engine::error::report(&e);
    assert!(matches!(e, EngineError::Postcopy(_)), "{text}");
    // PONG 1, 2 and 3 (8 bytes each) came before the request.
    assert!(text.contains("return path at byte 24"), "{text}");
    assert!(text.contains("out of range"), "{text}");
    assert!(text.contains("cannot resume on the source"), "{text}");
    assert_eq!(out.state().status(), MigrationStatus::Failed);
    assert_eq!(calls.get(), vec!["stop"], "in postcopy the guest is not resumed");
    let info = out.info().get();
    assert!(info.error_desc.is_some_and(|d| d.contains("byte 24")));
    assert!(seen.commands.contains(&"POSTCOPY_RUN".to_string()));
}

#[test]
fn a_destination_refusing_the_device_state_fails_the_source_which_keeps_the_guest_stopped() {
    let _s = serial();
    const LEN: usize = 1 << 20;
    let uri = common::sock("pcsrc", "refused");
    let dst = destination_with(&uri, LEN, vec![], Fail::Refuse);
    let g = guest(LEN);
    let region = g.region("mem").expect("region");
    let out = postcopy_out(0, 256 << 10).with_postcopy_after(Duration::ZERO);
    let mut calls = Calls::default();
    let ch = connect(&uri, out.cancel()).expect("connect");
    let e = out.run(ch, &mut [RamRegion::new(&region)], &mut calls).expect_err("the destination failed");
    let seen = dst.join().expect("destination");
    assert_eq!(seen.error.as_deref(), Some("refused the device state"));
    let text = engine::error::report(&e);
    assert!(text.contains("SHUT 1") && text.contains("cannot resume on the source"), "{text}");
    assert_eq!(out.state().status(), MigrationStatus::Failed, "never completed");
    assert_eq!(calls.get(), vec!["stop"], "the package went out: the guest is not resumed here");
}

#[test]
fn a_destination_lost_in_postcopy_fails_the_source_promptly_and_says_the_guest_stays_stopped() {
    let _s = serial();
    const LEN: usize = 4 << 20;
    let uri = common::sock("pcsrc", "vanish");
    let dst = destination_with(&uri, LEN, vec![], Fail::Vanish);
    let g = guest(LEN);
    let region = g.region("mem").expect("region");
    // Slow background pages: the loss is found while sending them.
    let out = postcopy_out(0, 1 << 20).with_postcopy_after(Duration::ZERO);
    let mut calls = Calls::default();
    let ch = connect(&uri, out.cancel()).expect("connect");
    let e = std::thread::scope(|s| {
        let run = s.spawn(|| out.run(ch, &mut [RamRegion::new(&region)], &mut calls));
        let seen = dst.join().expect("destination");
        assert_eq!(seen.error.as_deref(), Some("vanished"));
        let gone = Instant::now();
        let r = run.join().expect("migration thread");
        assert!(gone.elapsed() < Duration::from_secs(2), "failed {:?} after the loss", gone.elapsed());
        r
    })
    .expect_err("the destination is gone");
    let text = engine::error::report(&e);
    assert!(matches!(e, EngineError::Postcopy(_)), "{text}");
    assert!(text.contains("cannot resume on the source"), "{text}");
    assert_eq!(out.state().status(), MigrationStatus::Failed);
    assert_eq!(calls.get(), vec!["stop"]);
}

#[test]
fn start_postcopy_is_refused_without_the_capability_or_before_the_start() {
    let p = SharedParameters::new(MigrationParameters::default()).expect("params");
    let plain = Outgoing::new(p.clone(), MigrationCapabilities::default()).expect("outgoing");
    assert_eq!(plain.start_postcopy(), Err(StartPostcopyError::NoCapability));
    assert!(StartPostcopyError::NoCapability.to_string().contains("Enable postcopy"));
    let pc = Outgoing::new(p, MigrationCapabilities { postcopy_ram: true, ..Default::default() }).expect("outgoing");
    assert_eq!(pc.start_postcopy(), Err(StartPostcopyError::NotStarted));
    assert!(MigrationCapabilities { postcopy_ram: true, ..Default::default() }.uses_return_path());
}

#[test]
fn the_prologue_and_the_package_are_byte_identical_to_qemu_7_2s() {
    let _s = serial();
    const LEN: usize = 8 << 20; // the fixture's guest: one 8 MiB block "mem"
    let uri = common::sock("pcsrc", "bytes");
    let token = CancelToken::new().expect("token");
    let listener = Listener::bind(&uri, &token).expect("listen");
    // A raw destination: the whole stream (the source closes its side after EOF),
    // then PONGs 1-4 and SHUT(0).
    let dst = std::thread::spawn(move || {
        let _token = token;
        let ch = listener.accept().expect("accept");
        let mut rp = ch.return_path().expect("socket");
        let mut stream = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match ch.read(&mut buf).expect("read") {
                0 => break,
                n => stream.extend_from_slice(&buf[..n]),
            }
        }
        for v in 1..=4 {
            send(&mut rp, RpMessage::Pong(v));
        }
        send(&mut rp, RpMessage::Shut(0));
        stream
    });
    let g = guest(LEN);
    let region = g.region("mem").expect("region");
    // QEMU's source in the fixture was started with -S: globalstate says prelaunch.
    let out = postcopy_out(0, 0).with_postcopy_after(Duration::ZERO).with_runstate("prelaunch");
    let ch = connect(&uri, out.cancel()).expect("connect");
    let info = out.run(ch, &mut [RamRegion::new(&region)], &mut Calls::default()).expect("completed");
    assert_eq!(info.status, MigrationStatus::Completed);
    let ours = dst.join().expect("destination");
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/postcopy-active-none-8m-mixed32-s3.mig");
    let qemu = std::fs::read(fixture).expect("fixture");
    // Header, configuration, OPEN_RETURN_PATH, PING 1, POSTCOPY_ADVISE, RAM's START.
    assert_eq!(ours[..102], qemu[..102], "the prologue differs from QEMU 7.2's");
    // PING 2, PACKAGED (LISTEN, timer, globalstate, PING 3, RUN), PING 4: QEMU's
    // bytes 105064..105292 (see tests/fixtures/README.md).
    let theirs = &qemu[105_064..105_292];
    let at = ours.windows(theirs.len()).position(|w| w == theirs);
    assert!(at.is_some(), "QEMU 7.2's PING 2 + package + PING 4 not found in our stream");
    let at = at.unwrap_or(0);
    // Right before them: our discards of block "mem" (version 0, the name, ranges).
    assert_eq!(ours[at - 27..at - 27 + 5], [0x08, 0x00, 0x06, 0x00, 0x16], "one POSTCOPY_RAM_DISCARD of 22 bytes");
    // The end: RAM's EOS and footer, EOF, no vmdesc.
    assert_eq!(ours[ours.len() - 14..], qemu[qemu.len() - 14..], "the stream's end differs");
}

#[test]
fn a_request_is_served_at_once_under_a_tiny_postcopy_bandwidth_not_at_the_next_window() {
    let _s = serial();
    // 64 pages at max-postcopy-bandwidth 64 KiB/s: two background pages per 100 ms
    // window. The destination asks for 16 pages one after the other, each once the
    // previous one arrived. Waiting for the next window each time would take at
    // least 16 windows (1.6 s); QEMU 7.2 (and we) serve a request past the limit.
    const LEN: usize = 64 * PAGE as usize;
    const CHAIN: u64 = 16;
    let uri = common::sock("pcsrc", "latency");
    let token = CancelToken::new().expect("token");
    let listener = Listener::bind(&uri, &token).expect("listen");
    let dst = std::thread::spawn(move || {
        let _token = token;
        let ch = listener.accept().expect("accept");
        let mut rp = ch.return_path().expect("return path");
        let mut d = Decoder::new(MigrationReader::new(ch, RateLimit::new(0)));
        let mut mem =
            Mem { ram: vec![0; LEN], have: vec![false; LEN / PAGE as usize], after_run: vec![], running: false };
        // (page asked for, when), and the chain's span.
        let mut asked: Option<(u64, Instant)> = None;
        let (mut first, mut served, mut background_between) = (None, 0u64, 0u64);
        let mut span = None;
        let ask = |rp: &mut _, page: u64, first_ask: bool| {
            let m = if first_ask {
                RpMessage::ReqPagesId { start: page * PAGE, len: PAGE as u32, block: "mem".into() }
            } else {
                RpMessage::ReqPages { start: page * PAGE, len: PAGE as u32 }
            };
            send(rp, m);
            (page, Instant::now())
        };
        loop {
            let ev = d.next_with(&mut mem).expect("decodes");
            let Some(ev) = ev else { break };
            match ev {
                Event::Command(Command::Ping(v)) => send(&mut rp, RpMessage::Pong(v)),
                Event::Command(Command::PostcopyRun) => {
                    mem.running = true;
                    // The last pages: the background scan reaches them last.
                    asked = Some(ask(&mut rp, LEN as u64 / PAGE - 1, true));
                    first = asked.map(|a| a.1);
                }
                Event::Page { offset, .. } | Event::ZeroPage { offset, .. } if mem.running => {
                    let Some((want, _)) = asked else { continue };
                    if offset / PAGE != want {
                        background_between += 1;
                        continue;
                    }
                    served += 1;
                    if served == CHAIN {
                        span = first.map(|f| f.elapsed());
                        asked = None;
                    } else {
                        asked = Some(ask(&mut rp, want - 1, false));
                    }
                }
                Event::Eof => {
                    send(&mut rp, RpMessage::Shut(0));
                    break;
                }
                _ => {}
            }
        }
        let mut sink = [0u8; 64];
        let mut inner = d.into_inner();
        let _ = std::io::Read::read(&mut inner, &mut sink);
        (served, span, background_between, mem.ram)
    });
    let g = guest(LEN);
    let region = g.region("mem").expect("region");
    let out = postcopy_out(0, 64 << 10).with_postcopy_after(Duration::ZERO);
    let ch = connect(&uri, out.cancel()).expect("connect");
    let info = out.run(ch, &mut [RamRegion::new(&region)], &mut Calls::default()).expect("postcopy completes");
    let (served, span, between, ram) = dst.join().expect("destination");
    assert_eq!(info.status, MigrationStatus::Completed);
    assert_eq!(served, CHAIN);
    assert_eq!(info.postcopy_requests, CHAIN);
    let span = span.expect("chain done");
    eprintln!("{CHAIN} chained requests served in {span:?}, {between} background pages meanwhile");
    // Sixteen windows would be 1.6 s: allow 50 ms a round trip on a loaded machine.
    assert!(span < Duration::from_millis(800), "{CHAIN} requests took {span:?}");
    // Background pages kept to the limit meanwhile (two per window, plus slack).
    assert!(between <= 2 * (span.as_millis() as u64 / 100 + 2), "{between} background pages in {span:?}");
    assert!(ram == image(&g), "destination RAM differs");
}
