//! The source with capability `return-path`, over real unix sockets, against the
//! engine's own destination (and hand-made ones): `completed` only after the
//! destination's SHUT(0); SHUT(1) from a destination whose device refuses its state
//! fails the source and resumes its guest; a destination gone after EOF or silent
//! fails it within a bound; cancel while waiting for SHUT works within a second;
//! `file:` is refused at start; OPEN_RETURN_PATH and PING 1 sit where QEMU 7.2
//! puts them (byte-compared with a 7.2 stream).

mod common;

use common::serial;
use engine::incoming::{Incoming, IncomingReport, ReturnPathOpener};
use engine::info::ReturnPathInfo;
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::return_path::ReturnPathError;
use engine::source::{EngineError, Outgoing};
use engine::state::MigrationStatus;
use engine::vm::{RawDevice, VmParts};
use engine::vm::{VcpuControl, VmmError};
use savevm_format::{Decoder, Event, PageSink, RamBlock};
use std::io::{Read, Write};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use testkit::synthetic::SyntheticGuest;
use transports::{connect, CancelToken, Channel, Listener, MigrationReader, MigrationUri, RateLimit};

const LEN: usize = 1 << 20;

struct Mem(Vec<u8>);

impl PageSink for Mem {
    fn page_mut(&mut self, _: &RamBlock, off: u64) -> Option<savevm_format::PageSlot<'_>> {
        (self.0.get_mut(off as usize..off as usize + 4096)).map(savevm_format::PageSlot::from)
    }
}

/// The source's vCPUs: every call recorded.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<&'static str>>>);

impl Calls {
    fn get(&self) -> Vec<&'static str> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn push(&self, c: &'static str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(c);
    }
}

impl VcpuControl for Calls {
    fn stop(&mut self) -> Result<(), VmmError> {
        self.push("stop");
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        self.push("resume");
        Ok(())
    }
    fn set_throttle(&mut self, _: u8) -> Result<(), VmmError> {
        Ok(())
    }
}

struct NoVcpus;
impl VcpuControl for NoVcpus {}

/// A hand-written device of 16 bytes; its loader refuses when `refuse`.
struct Dev {
    refuse: bool,
}

impl RawDevice for Dev {
    fn idstr(&self) -> &str {
        "testdev"
    }
    fn version(&self) -> u32 {
        1
    }
    fn save_state(&mut self, out: &mut dyn Write) -> Result<(), VmmError> {
        Ok(out.write_all(&[0x5a; 16])?)
    }
    fn load_state(&mut self, _: u32, input: &mut dyn Read) -> Result<(), VmmError> {
        let mut b = [0u8; 16];
        input.read_exact(&mut b)?;
        if self.refuse {
            return Err("refused by the test".into());
        }
        Ok(())
    }
}

/// A return-path writer that holds SHUT back for `delay`, telling `held` when it starts.
struct SlowShut {
    inner: transports::ReturnPath,
    delay: Duration,
    held: mpsc::Sender<()>,
}

impl Write for SlowShut {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if b.starts_with(&[0, 1, 0, 4]) {
            let _ = self.held.send(());
            std::thread::sleep(self.delay);
        }
        self.inner.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn sock(name: &str) -> MigrationUri {
    common::sock("rpsrc", name)
}

fn guest() -> SyntheticGuest {
    SyntheticGuest::new(LEN, |p, page| {
        page.fill(0);
        if p % 2 == 0 {
            page[..8].copy_from_slice(&(p * 7 + 1).to_le_bytes());
        }
    })
}

fn outgoing(caps: MigrationCapabilities) -> Outgoing {
    let p = MigrationParameters { max_bandwidth: 0, ..Default::default() };
    Outgoing::new(SharedParameters::new(p).expect("params"), caps).expect("outgoing")
}

fn rp_caps() -> MigrationCapabilities {
    MigrationCapabilities { return_path: true, ..Default::default() }
}

/// The engine's destination on `uri`, answering the return path; `refuse`: its
/// device refuses; `shut_delay`: SHUT held back that long (`held` told when).
fn engine_destination(
    uri: &MigrationUri,
    refuse: bool,
    mut shut_delay: Option<(Duration, mpsc::Sender<()>)>,
) -> JoinHandle<(Result<IncomingReport, String>, Vec<u8>)> {
    let token = CancelToken::new().expect("token");
    let listener = Listener::bind(uri, &token).expect("listen");
    std::thread::spawn(move || {
        let _token = token;
        let ch = listener.accept().expect("accept");
        let mut path = Some(ch.return_path());
        let open: ReturnPathOpener<'_> = Box::new(move || match path.take() {
            Some(Ok(rp)) => Ok(match shut_delay.take() {
                Some((delay, held)) => Box::new(SlowShut { inner: rp, delay, held }) as Box<dyn Write + Send>,
                None => Box::new(rp),
            }),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("taken".into()),
        });
        let mut mem = Mem(vec![0; LEN]);
        let mut dev = Dev { refuse };
        let mut vm = VmParts { raw_devices: vec![&mut dev], ..Default::default() };
        let reader = MigrationReader::new(ch, RateLimit::new(0));
        let r = Incoming::new(false).run_with_return_path(reader, &mut mem, &mut vm, &mut NoVcpus, open);
        (r.map_err(|e| engine::error::report(&e)), mem.0)
    })
}

/// A destination that reads the stream to its EOF record, tells `eof`, then keeps
/// the connection open for `hold` (sending nothing back) and closes it.
fn silent_destination(uri: &MigrationUri, eof: mpsc::Sender<()>, hold: Duration) -> JoinHandle<()> {
    let token = CancelToken::new().expect("token");
    let listener = Listener::bind(uri, &token).expect("listen");
    std::thread::spawn(move || {
        let _token = token;
        let ch: Channel = listener.accept().expect("accept");
        let keep = ch.return_path().expect("socket");
        let mut d = Decoder::new(MigrationReader::new(ch, RateLimit::new(0)));
        let mut mem = Mem(vec![0; LEN]);
        while let Ok(Some(ev)) = d.next_with(&mut mem) {
            if let Event::Eof = ev {
                break;
            }
        }
        let _ = eof.send(());
        std::thread::sleep(hold);
        drop(d);
        drop(keep);
    })
}

/// Run the source (with the device) to `uri` on this thread.
#[allow(clippy::let_and_return)]
fn source(out: &Outgoing, uri: &MigrationUri, calls: &mut Calls) -> Result<engine::info::MigrationInfo, EngineError> {
    let g = guest();
    let region = g.region("mem").expect("region");
    let ch = connect(uri, out.cancel()).expect("connect");
    let mut dev = Dev { refuse: false };
    let mut vm = VmParts { raw_devices: vec![&mut dev], ..Default::default() };
    // A named result: the temporary region array must not outlive `region` (tail-expression drop order).
    let r = out.run_vm(ch, &mut [engine::memory::RamRegion::new(&region)], calls, &mut vm);
    r
}

fn expected_ram() -> Vec<u8> {
    let g = guest();
    let mut v = vec![0u8; LEN];
    for p in 0..g.pages() {
        g.read_page(p, &mut v[p as usize * 4096..(p as usize + 1) * 4096]);
    }
    v
}

#[test]
fn completed_only_after_the_destinations_shut_0() {
    let _s = serial();
    let uri = sock("delayed");
    let (held_tx, held) = mpsc::channel();
    let delay = Duration::from_millis(800);
    let dst = engine_destination(&uri, false, Some((delay, held_tx)));
    let out = outgoing(rp_caps());
    let mut calls = Calls::default();
    let (res, status_while_held) = std::thread::scope(|s| {
        let run = s.spawn(|| source(&out, &uri, &mut calls));
        let mut guard = common::CancelOnDrop(Some(out.cancel().clone()));
        held.recv_timeout(Duration::from_secs(10)).expect("the destination gets to its SHUT");
        // The destination loaded everything and holds SHUT(0) back: not completed yet.
        std::thread::sleep(Duration::from_millis(300));
        let st = out.state().status();
        guard.0 = None;
        (run.join().expect("source thread"), st)
    });
    assert_eq!(status_while_held, MigrationStatus::Active);
    let info = res.expect("completed");
    assert_eq!(info.status, MigrationStatus::Completed);
    assert_eq!(info.return_path, Some(ReturnPathInfo { pongs: 1, shut: Some(0), error: None }));
    assert!(info.downtime.is_some_and(|d| d >= delay / 2), "downtime {:?} covers the wait", info.downtime);
    assert_eq!(calls.get(), vec!["stop"], "the guest stays stopped");
    let json = info.to_json();
    assert_eq!(json["return-path"]["shut"], 0);
    let (rep, ram) = dst.join().expect("destination thread");
    let rep = rep.expect("destination loaded");
    assert_eq!((rep.return_path.pongs, rep.return_path.shut), (1, Some(0)));
    assert!(ram == expected_ram(), "destination RAM differs");
}

#[test]
fn without_the_capability_nothing_changes() {
    let _s = serial();
    let uri = sock("off");
    let dst = engine_destination(&uri, false, None);
    let out = outgoing(MigrationCapabilities::default());
    let info = source(&out, &uri, &mut Calls::default()).expect("completed");
    assert_eq!(info.return_path, None);
    assert!(info.to_json().get("return-path").is_none());
    let rep = dst.join().expect("destination thread").0.expect("loaded");
    assert!(!rep.return_path.requested);
}

#[test]
fn a_device_refused_on_the_destination_fails_the_source_and_resumes_its_guest() {
    let _s = serial();
    let uri = sock("refused");
    let dst = engine_destination(&uri, true, None);
    let out = outgoing(rp_caps());
    let mut calls = Calls::default();
    let e = source(&out, &uri, &mut calls).expect_err("must not complete");
    match &e {
        EngineError::ReturnPath { error: ReturnPathError::Shut(1), resumed: true, .. } => {}
        other => panic!("expected SHUT(1) with the guest resumed, got {other:?}: {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("SHUT 1") && msg.contains("resumed"), "{msg}");
    assert_eq!(out.state().status(), MigrationStatus::Failed);
    assert_eq!(calls.get(), vec!["stop", "resume"]);
    let info = out.info().get();
    assert_eq!(info.error_desc.as_deref(), Some(msg.as_str()));
    assert_eq!(info.return_path.as_ref().and_then(|r| r.shut), Some(1));
    let (r, _) = dst.join().expect("destination thread");
    assert!(r.expect_err("destination fails").contains("refused by the test"));
}

#[test]
fn a_destination_gone_after_eof_fails_promptly_and_resumes() {
    let _s = serial();
    let uri = sock("gone");
    let (eof_tx, eof) = mpsc::channel();
    let dst = silent_destination(&uri, eof_tx, Duration::ZERO);
    let out = outgoing(rp_caps());
    let mut calls = Calls::default();
    let t0 = Instant::now();
    let e = source(&out, &uri, &mut calls).expect_err("must not complete");
    eof.recv_timeout(Duration::from_secs(1)).expect("the destination saw EOF");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    match &e {
        EngineError::ReturnPath { error: ReturnPathError::Closed { .. }, after_eof: true, resumed: true } => {}
        other => panic!("expected a closed return path after EOF, got {other:?}"),
    }
    assert!(e.to_string().contains("did not confirm"), "{e}");
    assert_eq!(out.state().status(), MigrationStatus::Failed);
    assert_eq!(calls.get(), vec!["stop", "resume"]);
    dst.join().expect("destination thread");
}

#[test]
fn a_silent_destination_fails_after_the_shut_timeout() {
    let _s = serial();
    let uri = sock("silent");
    let (eof_tx, eof) = mpsc::channel();
    let dst = silent_destination(&uri, eof_tx, Duration::from_secs(3));
    let out = outgoing(rp_caps()).with_shut_timeout(Duration::from_millis(400));
    let mut calls = Calls::default();
    let t0 = Instant::now();
    let e = source(&out, &uri, &mut calls).expect_err("must not complete");
    eof.recv_timeout(Duration::from_secs(1)).expect("the destination saw EOF");
    assert!(t0.elapsed() < Duration::from_secs(3), "took {:?}", t0.elapsed());
    match &e {
        EngineError::ReturnPath { error: ReturnPathError::NoShut { .. }, after_eof: true, resumed: true } => {}
        other => panic!("expected no SHUT in time, got {other:?}"),
    }
    assert_eq!(out.state().status(), MigrationStatus::Failed);
    assert_eq!(calls.get(), vec!["stop", "resume"]);
    dst.join().expect("destination thread");
}

#[test]
fn cancel_while_waiting_for_shut_ends_within_a_second() {
    let _s = serial();
    let uri = sock("cancel");
    let (eof_tx, eof) = mpsc::channel();
    let dst = silent_destination(&uri, eof_tx, Duration::from_secs(3));
    let out = outgoing(rp_caps());
    let mut calls = Calls::default();
    let (res, took) = std::thread::scope(|s| {
        let run = s.spawn(|| source(&out, &uri, &mut calls));
        let mut guard = common::CancelOnDrop(Some(out.cancel().clone()));
        eof.recv_timeout(Duration::from_secs(10)).expect("the destination saw EOF");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(out.state().status(), MigrationStatus::Active, "waiting for SHUT");
        let t0 = Instant::now();
        out.cancel().cancel();
        let r = run.join().expect("source thread");
        guard.0 = None;
        (r, t0.elapsed())
    });
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    assert!(matches!(res, Err(EngineError::Cancelled)), "{res:?}");
    assert_eq!(out.state().status(), MigrationStatus::Cancelled);
    assert_eq!(calls.get(), vec!["stop", "resume"]);
    dst.join().expect("destination thread");
}

#[test]
fn file_is_refused_at_start() {
    let _s = serial();
    let path = std::env::temp_dir().join(format!("qmig-rpsrc-{}.mig", std::process::id()));
    let uri = MigrationUri::File { path: path.clone(), offset: 0 };
    let out = outgoing(rp_caps());
    let mut calls = Calls::default();
    let e = source(&out, &uri, &mut calls).expect_err("refused");
    let _ = std::fs::remove_file(&path);
    assert!(matches!(e, EngineError::NoReturnPath(_)), "{e:?}");
    assert!(e.to_string().starts_with("capability return-path: "), "{e}");
    assert_eq!(out.state().status(), MigrationStatus::Failed);
    assert!(calls.get().is_empty(), "the guest was never stopped");
}

#[test]
fn open_return_path_and_ping_1_follow_the_configuration_as_in_qemu_7_2() {
    let _s = serial();
    let uri = sock("layout");
    let token = CancelToken::new().expect("token");
    let listener = Listener::bind(&uri, &token).expect("listen");
    // A raw destination: the whole stream, then PONG(1) and SHUT(0).
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
        for m in [savevm_format::RpMessage::Pong(1), savevm_format::RpMessage::Shut(0)] {
            m.write_to(&mut rp).expect("write return path");
        }
        stream
    });
    let out = outgoing(rp_caps());
    let info = source(&out, &uri, &mut Calls::default()).expect("completed");
    assert_eq!(info.return_path, Some(ReturnPathInfo { pongs: 1, shut: Some(0), error: None }));
    let ours = dst.join().expect("destination thread");
    // QEMU 7.2's own postcopy-advise stream: header, configuration "none",
    // OPEN_RETURN_PATH, PING 1, then (ours) RAM's START where QEMU has its ADVISE.
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/postcopy-advise-none-8m-mixed32-s2.mig");
    let qemu = std::fs::read(fixture).expect("fixture");
    let n = 8 + 9 + 5 + 9;
    assert_eq!(ours[..n], qemu[..n], "the stream's start differs from QEMU 7.2's");
    assert_eq!(ours[n], 0x01, "RAM's START section follows PING 1");
}
