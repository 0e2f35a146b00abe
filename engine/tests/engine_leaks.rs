//! A cancelled migration leaves nothing behind: the process has the same threads
//! and file descriptors as before, and no child process (an `exec:` destination
//! is killed and reaped). Alone in its test binary, so no other test's threads or
//! descriptors are counted.

use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::{EngineError, Outgoing};
use engine::state::MigrationStatus as S;
use savevm_format::Decoder;
use std::time::{Duration, Instant};
use testkit::synthetic::SyntheticGuest;
use transports::{connect, CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Threads, open fds, and child processes of this process.
fn census() -> (usize, usize, Vec<i32>) {
    let me = std::process::id().to_string();
    let children = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                    let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                    // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
                    let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
                    (ppid == me).then_some(pid)
                })
                .collect()
        })
        .unwrap_or_default();
    (count("/proc/self/task"), count("/proc/self/fd"), children)
}

/// Wait (up to 2 s) for exited threads to leave /proc, then compare.
fn assert_back_to(before: &(usize, usize, Vec<i32>), what: &str) {
    let t0 = Instant::now();
    loop {
        let now = census();
        if now == *before {
            return;
        }
        if t0.elapsed() > Duration::from_secs(2) {
            let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| std::fs::read_link(e.path()).ok())
                        .map(|p| p.display().to_string())
                        .collect()
                })
                .unwrap_or_default();
            panic!("{what}: (threads, fds, children) {before:?} before, {now:?} after; fds now {fds:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Migrate a 16 MiB guest slowly to `uri` (a unix socket with an in-process
/// destination, or an exec: command), cancel mid-pass, and tear everything down.
fn cancelled_migration(uri: MigrationUri) {
    let mut guest = SyntheticGuest::new(16 << 20, |p, page| page.fill(p as u8 | 1));
    guest.start(1, 4 << 20, 3);
    let region = guest.region("pc.ram").expect("region");
    let dirty = [guest.dirty()];
    let params = MigrationParameters { max_bandwidth: 4 << 20, ..Default::default() };
    let out = Outgoing::new(SharedParameters::new(params).expect("params"), MigrationCapabilities::default())
        .expect("outgoing");
    let dst = match &uri {
        MigrationUri::Unix(_) => {
            let listener = Listener::bind(&uri, &CancelToken::new().expect("token")).expect("listen");
            Some(std::thread::spawn(move || {
                let ch = listener.accept().expect("accept");
                let mut d = Decoder::new(MigrationReader::new(ch, RateLimit::new(0)));
                while let Ok(Some(_)) = d.next() {}
            }))
        }
        _ => None,
    };
    let ch = connect(&uri, out.cancel()).expect("connect");
    let mut vcpus = guest.vcpus();
    let o = out.clone();
    let canceller = std::thread::spawn(move || {
        let t0 = Instant::now();
        while o.info().get().normal < 256 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        o.cancel().cancel();
    });
    let res = out.run(ch, &mut [engine::memory::RamRegion::new(&region).with_dirty(dirty[0].clone())], &mut vcpus);
    canceller.join().expect("canceller");
    assert!(matches!(res, Err(EngineError::Cancelled)), "{uri}: {res:?}");
    assert_eq!(out.state().status(), S::Cancelled);
    assert!(vcpus.running());
    if let Some(d) = dst {
        d.join().expect("destination");
    }
    drop(out);
    guest.shutdown();
}

struct NoVcpus;
impl engine::vm::VcpuControl for NoVcpus {}

struct Mem(Vec<u8>);
impl savevm_format::PageSink for Mem {
    fn page_mut(&mut self, _: &savevm_format::RamBlock, offset: u64) -> Option<savevm_format::PageSlot<'_>> {
        let o = offset as usize;
        self.0.get_mut(o..o + 4096).map(savevm_format::PageSlot::from)
    }
}

/// A 4 MiB guest migrated with the return path to the engine's own destination in
/// this process (`completed` after its SHUT(0)); or, with `fail`, to a destination
/// that reads a little and hangs up (the source fails).
fn migration_to_engine_destination(uri: MigrationUri, fail: bool) {
    const LEN: usize = 4 << 20;
    let mut guest = SyntheticGuest::new(LEN, |p, page| page.fill(p as u8 | 1));
    let region = guest.region("mem").expect("region");
    let token = CancelToken::new().expect("token");
    let listener = Listener::bind(&uri, &token).expect("listen");
    let dst = std::thread::spawn(move || {
        let _token = token;
        let ch = listener.accept().expect("accept");
        if fail {
            let mut r = MigrationReader::new(ch, RateLimit::new(0));
            let mut head = [0u8; 64 << 10];
            let _ = std::io::Read::read_exact(&mut r, &mut head);
            return None;
        }
        let mut path = Some(ch.return_path());
        let open: engine::incoming::ReturnPathOpener<'_> = Box::new(move || match path.take() {
            Some(Ok(rp)) => Ok(Box::new(rp) as Box<dyn std::io::Write + Send>),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("taken".into()),
        });
        let mut mem = Mem(vec![0; LEN]);
        let reader = MigrationReader::new(ch, RateLimit::new(0));
        let r = engine::incoming::Incoming::new(false).run_with_return_path(
            reader,
            &mut mem,
            &mut Default::default(),
            &mut NoVcpus,
            open,
        );
        Some(r.map_err(|e| engine::error::report(&e)).map(|_| mem.0))
    });
    let caps = MigrationCapabilities { return_path: true, ..Default::default() };
    let out =
        Outgoing::new(SharedParameters::new(MigrationParameters::default()).expect("params"), caps).expect("outgoing");
    let ch = connect(&uri, out.cancel()).expect("connect");
    let mut vcpus = guest.vcpus();
    let res = out.run(ch, &mut [engine::memory::RamRegion::new(&region)], &mut vcpus);
    let got = dst.join().expect("destination");
    if fail {
        assert!(res.is_err(), "{uri}: the source must fail when the destination hangs up");
        assert_eq!(out.state().status(), S::Failed);
    } else {
        assert!(res.is_ok(), "{uri}: {:?}", res.err().map(|e| engine::error::report(&e)));
        assert_eq!(out.state().status(), S::Completed);
        let ram = got.expect("destination ran").expect("destination loaded");
        assert!(ram.chunks(4096).enumerate().all(|(p, page)| page.iter().all(|&b| b == p as u8 | 1)));
    }
    drop(out);
    guest.shutdown();
}

/// A multifd source (2 channels) into a destination that accepts every connection
/// and never reads, cancelled once active (the sender threads blocked in writes).
fn cancelled_multifd_migration(uri: MigrationUri) {
    let token = CancelToken::new().expect("token");
    let listener = Listener::bind(&uri, &token).expect("bind");
    let mut guest = SyntheticGuest::new(16 << 20, |p, b| b.fill((p % 251) as u8 + 1));
    let region = guest.region("mem").expect("region");
    let params = SharedParameters::new(MigrationParameters { max_bandwidth: 0, ..Default::default() }).expect("params");
    let caps = MigrationCapabilities { multifd: true, ..Default::default() };
    let out = Outgoing::new(params, caps).expect("outgoing");
    let ch = connect(&uri, out.cancel()).expect("main");
    let chans: Vec<_> = (0..2).map(|_| connect(&uri, out.cancel()).expect("channel")).collect();
    let held: Vec<_> = (0..3).map(|_| listener.accept_another().expect("accept")).collect();
    let mut vcpus = guest.vcpus();
    let r = std::thread::scope(|s| {
        let run = s.spawn(|| {
            let mut ram = [engine::memory::RamRegion::new(&region)];
            out.run_multifd(ch, chans, &mut ram, &mut vcpus, &mut Default::default())
        });
        let t0 = Instant::now();
        while out.info().get().status != S::Active && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(5));
        }
        out.cancel().cancel();
        run.join().expect("migration thread")
    });
    drop(held);
    drop(listener);
    assert!(matches!(r, Err(EngineError::Cancelled)), "{:?}", r.err().map(|e| engine::error::report(&e)));
    drop(out);
    guest.shutdown();
}

/// A postcopy source (switching at once) of a 4 MiB guest into a destination
/// thread that decodes the stream and answers PINGs; it acknowledges the end
/// with SHUT(0) or, with `vanish`, goes away when the guest would run there
/// (the source fails: its guest stays stopped).
fn postcopy_migration(uri: MigrationUri, vanish: bool) {
    use savevm_format::{Command, Event, RpMessage};
    const LEN: usize = 4 << 20;
    let mut guest = SyntheticGuest::new(LEN, |p, page| page.fill(p as u8 | 1));
    let region = guest.region("mem").expect("region");
    let token = CancelToken::new().expect("token");
    let listener = Listener::bind(&uri, &token).expect("listen");
    let dst = std::thread::spawn(move || {
        let _token = token;
        let ch = listener.accept().expect("accept");
        let mut rp = ch.return_path().expect("return path");
        let mut send = |m: RpMessage| {
            let _ = std::io::Write::write_all(&mut rp, &m.encode());
        };
        let mut d = Decoder::new(MigrationReader::new(ch, RateLimit::new(0)));
        let mut mem = Mem(vec![0; LEN]);
        while let Ok(Some(ev)) = d.next_with(&mut mem) {
            match ev {
                Event::Command(Command::Ping(v)) => send(RpMessage::Pong(v)),
                Event::Command(Command::PostcopyRun) if vanish => return,
                Event::Eof => {
                    send(RpMessage::Shut(0));
                    break;
                }
                _ => {}
            }
        }
        // Until the source has read SHUT and closed its side.
        let mut inner = d.into_inner();
        let _ = std::io::Read::read(&mut inner, &mut [0u8; 64]);
    });
    let bw = if vanish { 1 << 20 } else { 0 };
    let params = MigrationParameters { max_bandwidth: 0, max_postcopy_bandwidth: bw, ..Default::default() };
    let caps = MigrationCapabilities { postcopy_ram: true, ..Default::default() };
    let out = Outgoing::new(SharedParameters::new(params).expect("params"), caps)
        .expect("outgoing")
        .with_postcopy_after(Duration::ZERO);
    let ch = connect(&uri, out.cancel()).expect("connect");
    let mut vcpus = guest.vcpus();
    let res = out.run(ch, &mut [engine::memory::RamRegion::new(&region)], &mut vcpus);
    dst.join().expect("destination");
    let want = if vanish { S::Failed } else { S::Completed };
    assert_eq!(out.state().status(), want, "{:?}", res.err().map(|e| engine::error::report(&e)));
    drop(out);
    guest.shutdown();
}

/// One test (this binary's only one): cancel, success and failure (pre-copy,
/// multifd, postcopy), each back to
/// the census taken before.
#[test]
fn migrations_leave_no_threads_fds_or_children() {
    let before = census();
    let sock = |n: &str| std::env::temp_dir().join(format!("qmig-leaks-{}-{n}.sock", std::process::id()));
    cancelled_migration(MigrationUri::Unix(sock("cancel")));
    assert_back_to(&before, "unix: cancel mid-pass");
    cancelled_migration(MigrationUri::Exec("cat > /dev/null".into()));
    assert_back_to(&before, "exec: cancel mid-pass");
    migration_to_engine_destination(MigrationUri::Unix(sock("ok")), false);
    assert_back_to(&before, "unix: completed with the return path");
    migration_to_engine_destination(MigrationUri::Unix(sock("fail")), true);
    assert_back_to(&before, "unix: destination hung up");
    cancelled_multifd_migration(MigrationUri::Unix(sock("multifd")));
    assert_back_to(&before, "unix: multifd cancelled");
    postcopy_migration(MigrationUri::Unix(sock("postcopy")), false);
    assert_back_to(&before, "unix: postcopy completed");
    postcopy_migration(MigrationUri::Unix(sock("postcopy-lost")), true);
    assert_back_to(&before, "unix: destination lost in postcopy");
}
