//! Cancel and failure injection on the source, in every state and mid-pass:
//! before the run, in `setup`, in `active` during a slow rate-limited pass, at
//! switchover (guest stopped, final sync), in `device`, in the middle of the END
//! section to a slow destination, against a destination that never reads, and a
//! destination process killed mid-pass. Each time the run returns promptly
//! (`cancelled` within 1 s of the cancel, `failed` about a second after the kill),
//! the guest runs and writes again, the destination never sees a complete stream,
//! and the notified states are a legal source walk.
//!
//! Tests take a lock so they run one at a time: their timing bounds matter and the
//! machine is small.

mod common;

use common::RunResult;

use common::{serial, states, wait_for};
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::{EngineError, GuestRegion, Outgoing};
use engine::state::{MigrationStatus as S, Notification, Role};
use savevm_format::{Decoder, Event};
use std::io::Read;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use testkit::check_sequence;
use testkit::synthetic::{SyntheticGuest, SyntheticVcpus};
use transports::{connect, CancelToken, Channel, Listener, MigrationReader, MigrationUri, RateLimit};

const MIB: usize = 1 << 20;

/// How the in-process destination reads.
enum Mode {
    /// As fast as it can.
    Normal,
    /// At most this many bytes/s.
    Slow(u64),
    /// Accept, then read nothing until told (or the sender is dropped).
    Stall(mpsc::Receiver<()>),
}

/// What the destination saw.
#[derive(Debug)]
struct Seen {
    eof: bool,
    bytes: u64,
    error: Option<String>,
}

/// A reader that keeps to `rate` bytes/s.
struct Slow<R> {
    inner: R,
    rate: u64,
    start: Instant,
    n: u64,
}

impl<R: Read> Read for Slow<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let due = self.start + Duration::from_secs_f64(self.n as f64 / self.rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let max = out.len().min(64 << 10);
        let n = self.inner.read(&mut out[..max])?;
        self.n += n as u64;
        Ok(n)
    }
}

fn destination(listener: Listener, mode: Mode) -> JoinHandle<Seen> {
    std::thread::spawn(move || {
        let ch = match listener.accept() {
            Ok(ch) => ch,
            Err(e) => return Seen { eof: false, bytes: 0, error: Some(e.to_string()) },
        };
        let rate = RateLimit::new(0);
        let reader = MigrationReader::new(ch, rate.clone());
        let input: Box<dyn Read> = match mode {
            Mode::Normal => Box::new(reader),
            Mode::Slow(bps) => Box::new(Slow { inner: reader, rate: bps, start: Instant::now(), n: 0 }),
            Mode::Stall(go) => {
                let _ = go.recv();
                Box::new(reader)
            }
        };
        let mut d = Decoder::new(input);
        let mut eof = false;
        let error = loop {
            match d.next() {
                Ok(Some(ev)) => eof |= matches!(ev, Event::Eof),
                Ok(None) => break None,
                Err(e) => break Some(e.to_string()),
            }
        };
        Seen { eof, bytes: rate.total_bytes(), error }
    })
}

fn sock(name: &str) -> MigrationUri {
    common::sock("fail", name)
}

struct Rig {
    guest: SyntheticGuest,
    region: GuestRegion,
    out: Outgoing,
    notes: crossbeam_channel::Receiver<Notification>,
    ch: Option<Channel>,
    dst: Option<JoinHandle<Seen>>,
}

fn unix(name: &str, mode: Mode, token: &CancelToken) -> (Channel, Option<JoinHandle<Seen>>) {
    let uri = sock(name);
    let listener = Listener::bind(&uri, &CancelToken::new().expect("token")).expect("listen");
    let dst = destination(listener, mode);
    (connect(&uri, token).expect("connect"), Some(dst))
}

/// A guest of `len` bytes (every page holding data when `data`, else zero), one
/// writer at `rate` bytes/s, and its migration connected to `dst`: an in-process
/// destination on a unix socket reading in `mode`, or an `exec:` command.
fn rig(len: usize, data: bool, rate: u64, params: MigrationParameters, caps: MigrationCapabilities, dst: Dst) -> Rig {
    let mut guest = SyntheticGuest::new(len, |p, page| page.fill(if data { p as u8 | 1 } else { 0 }));
    guest.start(1, rate, len as u64 ^ rate);
    let region = guest.region("pc.ram").expect("region");
    let out = Outgoing::new(SharedParameters::new(params).expect("params"), caps).expect("outgoing");
    let notes = out.state().subscribe();
    // As the CLI does, the channel shares the migration's token: a cancel also
    // shuts the socket down (or kills the command) and wakes blocked I/O.
    let (ch, dst) = match dst {
        Dst::Unix(name, mode) => unix(name, mode, out.cancel()),
        Dst::UnixOtherToken(name, mode, token) => unix(name, mode, &token),
        Dst::Exec(cmd) => (connect(&MigrationUri::Exec(cmd), out.cancel()).expect("spawn"), None),
    };
    Rig { guest, region, out, notes, ch: Some(ch), dst }
}

enum Dst {
    /// An in-process destination on a unix socket, the channel on the migration's token.
    Unix(&'static str, Mode),
    /// The same with the channel on another token.
    UnixOtherToken(&'static str, Mode, CancelToken),
    /// An `exec:` command.
    Exec(String),
}

impl Rig {
    /// Run the migration on a scoped thread while `watch` drives it from this one.
    fn run_watched<T>(&mut self, watch: impl FnOnce(&Outgoing, &SyntheticVcpus) -> T) -> (RunResult, T) {
        let ch = self.ch.take().expect("channel");
        let dirty = vec![self.guest.dirty()];
        common::run_watched(&self.out, ch, &self.region, &dirty, &self.guest, watch)
    }

    fn notifications(&self) -> Vec<Notification> {
        self.notes.try_iter().collect()
    }

    /// The guest runs and its writer makes progress.
    fn assert_guest_running(&self, vcpus: &SyntheticVcpus, what: &str) {
        assert!(vcpus.running(), "{what}: guest resumed");
        assert_eq!(vcpus.throttle(), 0, "{what}: no throttle left");
        let w0 = self.guest.writes();
        let t0 = Instant::now();
        while self.guest.writes() == w0 {
            assert!(t0.elapsed() < Duration::from_secs(2), "{what}: the guest does not write");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The common end of a cancelled run.
    fn assert_cancelled(&mut self, what: &str, res: RunResult, cancelled_at: Instant, path: &[S]) {
        let took = cancelled_at.elapsed();
        let (res, vcpus) = res;
        eprintln!("{what}: run returned {took:?} after the cancel");
        assert!(matches!(res, Err(EngineError::Cancelled)), "{what}: {res:?}");
        assert!(took < Duration::from_secs(1), "{what}: run returned {took:?} after the cancel");
        assert_eq!(self.out.state().status(), S::Cancelled, "{what}");
        let info = self.out.info().get();
        assert_eq!(info.status, S::Cancelled, "{what}");
        assert_eq!(info.error_desc, None, "{what}: a cancel is not an error");
        self.assert_guest_running(&vcpus, what);
        let seen = self.notifications();
        assert_eq!(check_sequence(Role::Source, &seen), Ok(()), "{what}: {seen:?}");
        assert_eq!(states(&seen), path, "{what}");
        if let Some(dst) = self.dst.take() {
            let got = dst.join().expect("destination thread");
            eprintln!("{what}: destination read {} bytes, then {:?}", got.bytes, got.error);
            assert!(!got.eof, "{what}: the destination saw a complete stream");
        }
    }
}

fn unlimited() -> MigrationParameters {
    MigrationParameters { max_bandwidth: 0, ..Default::default() }
}

/// A slow bulk pass: 32 MiB of data at `bw` bytes/s.
fn slow(bw: u64) -> MigrationParameters {
    MigrationParameters { max_bandwidth: bw, ..Default::default() }
}

const SETUP_PATH: &[S] = &[S::Setup, S::Cancelling, S::Cancelled];
const ACTIVE_PATH: &[S] = &[S::Setup, S::Active, S::Cancelling, S::Cancelled];

#[test]
fn cancel_before_the_run_ends_cancelled_in_setup() {
    let _serial = serial();
    let mut rig = rig(4 * MIB, true, 4 << 20, unlimited(), Default::default(), Dst::Unix("pre", Mode::Normal));
    let at = Instant::now();
    rig.out.cancel().cancel();
    let res = rig.run_watched(|_, _| ()).0;
    rig.assert_cancelled("cancel before run", res, at, SETUP_PATH);
}

#[test]
fn cancel_in_setup_ends_cancelled() {
    let _serial = serial();
    let mut rig = rig(4 * MIB, true, 4 << 20, unlimited(), Default::default(), Dst::Unix("setup", Mode::Normal));
    // Injected on the migration thread the moment it enters setup.
    let (token, at) = (rig.out.cancel().clone(), Arc::new(Mutex::new(None)));
    let when = at.clone();
    rig.out.state().on_notify(move |n| {
        if matches!(n, Notification::State { to: S::Setup, .. }) {
            *when.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            token.cancel();
        }
    });
    let res = rig.run_watched(|_, _| ()).0;
    let at = at.lock().unwrap_or_else(|e| e.into_inner()).expect("setup was notified");
    rig.assert_cancelled("cancel in setup", res, at, SETUP_PATH);
}

#[test]
fn cancel_mid_pass_in_active() {
    let _serial = serial();
    // 32 MiB of data at 4 MiB/s: the bulk pass lasts 8 s.
    let mut rig = rig(32 * MIB, true, 4 << 20, slow(4 << 20), Default::default(), Dst::Unix("pass", Mode::Normal));
    let (res, (at, mid)) = rig.run_watched(|out, probe| {
        wait_for("pages sent", Duration::from_secs(5), || out.info().get().normal >= 512);
        let mid = out.info().get();
        assert_eq!(mid.status, S::Active);
        assert_eq!(mid.dirty_sync_count, 1, "still in the bulk pass");
        assert!(probe.running());
        let at = Instant::now();
        out.cancel().cancel();
        (at, mid)
    });
    let end = rig.out.info().get();
    eprintln!(
        "mid-pass: cancelled after {} pages, {} bytes; {} pages at the end",
        mid.normal, mid.transferred, end.normal
    );
    assert!(end.normal < rig.guest.pages() / 2, "the pass was cut short ({} pages)", end.normal);
    rig.assert_cancelled("cancel mid-pass", res, at, ACTIVE_PATH);
}

#[test]
fn cancel_at_switchover_with_the_guest_stopped() {
    let _serial = serial();
    let mut rig = rig(8 * MIB, true, 8 << 20, unlimited(), Default::default(), Dst::Unix("switch", Mode::Normal));
    // At the final sync (guest stopped), before the END section goes out.
    let probe = rig.guest.vcpus();
    let (token, at) = (rig.out.cancel().clone(), Arc::new(Mutex::new(None)));
    let when = at.clone();
    rig.out.state().on_notify(move |n| {
        if matches!(n, Notification::Pass { .. }) && !probe.running() {
            *when.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            token.cancel();
        }
    });
    let res = rig.run_watched(|_, _| ()).0;
    let at = at.lock().unwrap_or_else(|e| e.into_inner()).expect("the final sync ran with the guest stopped");
    rig.assert_cancelled("cancel at switchover", res, at, ACTIVE_PATH);
}

#[test]
fn cancel_in_device_state() {
    let _serial = serial();
    let caps = MigrationCapabilities { pause_before_switchover: true, ..Default::default() };
    let mut rig = rig(8 * MIB, true, 8 << 20, unlimited(), caps, Dst::Unix("device", Mode::Normal));
    let (token, at) = (rig.out.cancel().clone(), Arc::new(Mutex::new(None)));
    let when = at.clone();
    rig.out.state().on_notify(move |n| {
        if matches!(n, Notification::State { to: S::Device, .. }) {
            *when.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            token.cancel();
        }
    });
    let res = rig
        .run_watched(|out, probe| {
            wait_for("pre-switchover", Duration::from_secs(10), || out.state().status() == S::PreSwitchover);
            assert!(!probe.running(), "stopped in pre-switchover");
            out.continue_switchover().expect("continue");
        })
        .0;
    let at = at.lock().unwrap_or_else(|e| e.into_inner()).expect("device was notified");
    rig.assert_cancelled(
        "cancel in device",
        res,
        at,
        &[S::Setup, S::Active, S::PreSwitchover, S::Device, S::Cancelling, S::Cancelled],
    );
}

#[test]
fn cancel_mid_end_section_to_a_slow_destination() {
    let _serial = serial();
    // A downtime limit so large that the first decision after the bulk pass switches
    // over; the guest dirties most of its RAM during that pass, and the destination
    // takes the END section at 8 MB/s, so it lasts seconds.
    let params = MigrationParameters { max_bandwidth: 16 << 20, downtime_limit: 100_000, ..Default::default() };
    let mut rig = rig(32 * MIB, true, 32 << 20, params, Default::default(), Dst::Unix("end", Mode::Slow(8_000_000)));
    let (res, at) = rig.run_watched(|out, probe| {
        wait_for("switchover", Duration::from_secs(10), || !probe.running());
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(out.state().status(), S::Active, "still sending the END section");
        assert!(!probe.running());
        let sent = out.rate().total_bytes();
        let left = out.info().get().remaining;
        assert!(left > MIB as u64, "mid-END: {left} bytes of the END section still to send");
        eprintln!("mid-END: cancel after {sent} bytes, {left} left");
        let at = Instant::now();
        out.cancel().cancel();
        at
    });
    rig.assert_cancelled("cancel mid-END", res, at, ACTIVE_PATH);
}

#[test]
fn cancel_while_the_destination_never_reads() {
    let _serial = serial();
    let (go, wait) = mpsc::channel();
    let mut rig =
        rig(32 * MIB, true, 4 << 20, slow(32 << 20), Default::default(), Dst::Unix("stall", Mode::Stall(wait)));
    let (res, at) = rig.run_watched(|out, probe| {
        wait_for("active", Duration::from_secs(5), || out.state().status() == S::Active);
        // Blocked: no byte goes out for 300 ms.
        let t0 = Instant::now();
        let mut last = (out.rate().total_bytes(), Instant::now());
        while last.1.elapsed() < Duration::from_millis(300) {
            assert!(t0.elapsed() < Duration::from_secs(5), "the source never blocked");
            std::thread::sleep(Duration::from_millis(10));
            let now = out.rate().total_bytes();
            if now != last.0 {
                last = (now, Instant::now());
            }
        }
        eprintln!("stalled: the source blocked after {} bytes", last.0);
        assert_eq!(out.state().status(), S::Active);
        assert!(probe.running());
        let at = Instant::now();
        out.cancel().cancel();
        at
    });
    let _ = go.send(());
    rig.assert_cancelled("cancel against a stalled destination", res, at, ACTIVE_PATH);
}

/// Pid of the process whose command line contains `marker` (not us).
fn find_process(marker: &str) -> Option<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        (pid != me && cmdline.windows(marker.len()).any(|w| w == marker.as_bytes())).then_some(pid)
    })
}

#[test]
fn destination_process_killed_mid_pass_fails_promptly() {
    let _serial = serial();
    // The destination is another process: a shell reading the stream through `cat`
    // (its command line carries a marker so we can find and kill it).
    let marker = format!("qmig-killed-destination-{}", std::process::id());
    let cmd = format!("cat > /dev/null; : {marker}");
    let mut rig = rig(32 * MIB, true, 4 << 20, slow(4 << 20), Default::default(), Dst::Exec(cmd));
    let (res, (killed_at, pid)) = rig.run_watched(|out, probe| {
        wait_for("pages sent", Duration::from_secs(5), || out.info().get().normal >= 512);
        assert_eq!(out.info().get().dirty_sync_count, 1, "mid bulk pass");
        let pid = find_process(&marker).expect("the destination process");
        // Its whole process group (the shell and cat), as a crash or OOM kill would.
        // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
        assert_eq!(unsafe { libc::kill(-pid, libc::SIGKILL) }, 0, "kill");
        let at = Instant::now();
        assert!(probe.running(), "the guest runs during the pass");
        (at, pid)
    });
    let took = killed_at.elapsed();
    let (res, vcpus) = res;
    eprintln!("killed destination: run returned {took:?} after the kill: {res:?}");
    let err = match res {
        Err(EngineError::Cancelled) => panic!("a dead destination is a failure, not a cancel"),
        Err(e) => e,
        Ok(i) => panic!("completed without a destination: {i:?}"),
    };
    assert!(took < Duration::from_millis(1500), "failed {took:?} after the kill");
    assert_eq!(rig.out.state().status(), S::Failed);
    let info = rig.out.info().get();
    assert_eq!(info.status, S::Failed);
    // error-desc is the error with its causes, each once; a dead peer is the peer's failure.
    assert_eq!(info.error_desc.as_deref(), Some(engine::error::report(&err).as_str()));
    assert_eq!(err.origin(), engine::error::Origin::Peer, "{err}");
    rig.assert_guest_running(&vcpus, "killed destination");
    let seen = rig.notifications();
    assert_eq!(check_sequence(Role::Source, &seen), Ok(()), "{seen:?}");
    assert_eq!(states(&seen), [S::Setup, S::Active, S::Failed]);
    // The command was reaped: no zombie left behind.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "destination process {pid} not reaped");
}

/// A stalled destination with the channel connected on another token than the
/// migration's (as `engine/tests/precopy.rs` does): the cancel should still end
/// the run within 1 s. It does not: the writer stays blocked in `poll` on the
/// channel's token, which nobody cancels (the watcher below cancels it after 2 s
/// so that the test ends).
#[test]
fn cancel_with_a_channel_on_another_token() {
    let _serial = serial();
    let (go, wait) = mpsc::channel();
    let other = CancelToken::new().expect("token");
    let dst = Dst::UnixOtherToken("other", Mode::Stall(wait), other.clone());
    let mut rig = rig(32 * MIB, true, 4 << 20, slow(32 << 20), Default::default(), dst);
    let (res, at) = rig.run_watched(move |out, _| {
        wait_for("active", Duration::from_secs(5), || out.state().status() == S::Active);
        let mut last = (out.rate().total_bytes(), Instant::now());
        while last.1.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(10));
            let now = out.rate().total_bytes();
            if now != last.0 {
                last = (now, Instant::now());
            }
        }
        let at = Instant::now();
        out.cancel().cancel();
        // Unblock the writer if the engine did not, so that the test ends either way.
        while !out.state().status().is_terminal() && at.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        other.cancel();
        at
    });
    let _ = go.send(());
    rig.assert_cancelled("cancel with the channel on another token", res, at, ACTIVE_PATH);
}
