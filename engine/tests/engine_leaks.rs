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

#[test]
fn a_cancelled_migration_leaves_no_threads_fds_or_children() {
    let before = census();
    let sock = std::env::temp_dir().join(format!("qmig-leaks-{}.sock", std::process::id()));
    cancelled_migration(MigrationUri::Unix(sock));
    assert_back_to(&before, "unix: cancel mid-pass");
    cancelled_migration(MigrationUri::Exec("cat > /dev/null".into()));
    assert_back_to(&before, "exec: cancel mid-pass");
}
