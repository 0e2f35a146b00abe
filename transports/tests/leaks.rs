//! No thread, descriptor or child process outlives a migration, cancelled or
//! not. One test only in this binary: it counts `/proc/self/fd` and
//! `/proc/self/task`, which every test of a binary shares.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};
use transports::{
    connect, is_cancelled, CancelToken, Listener, MigrationReader, MigrationUri, MigrationWriter, RateLimit,
};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn fds() -> usize {
    count("/proc/self/fd")
}

fn threads() -> usize {
    count("/proc/self/task")
}

/// Our child processes, from /proc (pid, state, cmdline).
fn children() -> Vec<(i32, String)> {
    let me = std::process::id().to_string();
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        if rest[1] == me {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            out.push((pid, format!("{} {}", rest[0], String::from_utf8_lossy(&cmd).replace('\0', " "))));
        }
    }
    out
}

fn pages() -> &'static [u8] {
    static RAM: OnceLock<Vec<u8>> = OnceLock::new();
    RAM.get_or_init(|| vec![0x5a; 8 << 20])
}

fn sock_path(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    std::env::temp_dir().join(format!("qmig-leaks-{tag}-{}-{nanos}.sock", std::process::id()))
}

/// Send pages until blocked, then cancel from another thread and close.
fn blocked_then_cancelled(uri: &MigrationUri) {
    let token = CancelToken::new().unwrap();
    let ch = connect(uri, &token).expect("connect");
    let rate = RateLimit::new(0);
    let canceller = {
        let (rate, token) = (rate.clone(), token.clone());
        thread::spawn(move || {
            let mut last = u64::MAX;
            while rate.total_bytes() != last {
                last = rate.total_bytes();
                thread::sleep(Duration::from_millis(150));
            }
            token.cancel();
        })
    };
    let mut w = MigrationWriter::new(ch, rate);
    let e = 'out: loop {
        for p in pages().chunks_exact(savevm_format::TARGET_PAGE_SIZE) {
            if let Err(e) = w.write_borrowed(p) {
                break 'out e;
            }
        }
    };
    assert!(is_cancelled(&e), "{uri}: {e:?}");
    assert!(w.close().expect_err("close after cancel").is_cancelled());
    canceller.join().unwrap();
}

/// A whole migration that completes, over `uri`, with a token that outlives it.
fn completed(uri: MigrationUri, token: &CancelToken) {
    let l = Listener::bind(&uri, token).unwrap();
    let uri = l.local_uri().clone();
    let dest = thread::spawn(move || {
        let mut r = MigrationReader::new(l.accept().unwrap(), RateLimit::new(0));
        let mut all = vec![];
        r.read_to_end(&mut all).unwrap();
        r.into_channel().finish().unwrap();
        all.len()
    });
    let mut w = MigrationWriter::new(connect(&uri, token).unwrap(), RateLimit::new(0));
    w.write_all(&pages()[..3 << 20]).unwrap();
    w.close().unwrap();
    assert_eq!(dest.join().unwrap(), 3 << 20);
}

fn scenario(live: &CancelToken) {
    // Completed migrations while a long-lived token stays uncancelled.
    completed("tcp:127.0.0.1:0".parse().unwrap(), live);
    completed(MigrationUri::Unix(sock_path("ok")), live);
    let mut w =
        MigrationWriter::new(connect(&"exec:cat >/dev/null".parse().unwrap(), live).unwrap(), RateLimit::new(0));
    w.write_all(&pages()[..1 << 20]).unwrap();
    w.close().unwrap();
    // A failed one: the destination drops its channel; the source sees the
    // connection end (and does not wait forever, with `live` never cancelled).
    {
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap(), live).unwrap();
        let uri = l.local_uri().clone();
        let dest = thread::spawn(move || drop(l.accept().unwrap()));
        let mut w = MigrationWriter::new(connect(&uri, live).unwrap(), RateLimit::new(0));
        dest.join().unwrap();
        let t = Instant::now();
        let e = loop {
            if let Err(e) = w.write_borrowed(pages()) {
                break e;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "writing into a dropped destination");
        };
        assert!(!is_cancelled(&e), "{e:?}");
    }

    // Cancelled ones: writer blocked on tcp, unix and exec; reader blocked; accept blocked.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let peer = thread::spawn(move || l.accept().map(|(s, _)| s));
    blocked_then_cancelled(&MigrationUri::Tcp { host: "127.0.0.1".into(), port });
    drop(peer.join().unwrap());
    let path = sock_path("peer");
    let l = UnixListener::bind(&path).unwrap();
    let peer = thread::spawn(move || l.accept().map(|(s, _)| s));
    blocked_then_cancelled(&MigrationUri::Unix(path.clone()));
    drop(peer.join().unwrap());
    let _ = std::fs::remove_file(&path);
    blocked_then_cancelled(&"exec:sleep 30; true".parse().unwrap());

    let token = CancelToken::new().unwrap();
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap(), &token).unwrap();
    let MigrationUri::Tcp { port, .. } = *l.local_uri() else { unreachable!() };
    let dest = thread::spawn(move || {
        let mut r = MigrationReader::new(l.accept().unwrap(), RateLimit::new(0));
        let mut b = [0u8; 64];
        r.read(&mut b)
    });
    let mut src = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    src.write_all(b"QEVM").unwrap();
    thread::sleep(Duration::from_millis(200));
    token.cancel();
    assert_eq!(dest.join().unwrap().unwrap(), 4);
    drop(src);

    let token = CancelToken::new().unwrap();
    let l = Listener::bind(&MigrationUri::Unix(sock_path("accept")), &token).unwrap();
    let dest = thread::spawn(move || l.accept().map(|_| ()));
    thread::sleep(Duration::from_millis(200));
    token.cancel();
    assert!(dest.join().unwrap().expect_err("accepted nobody").is_cancelled());
}

#[test]
fn no_thread_fd_or_child_leaks() {
    pages();
    // A hang is a failure too (e.g. a write into a dropped destination that never fails).
    thread::spawn(|| {
        thread::sleep(Duration::from_secs(60));
        eprintln!("no_thread_fd_or_child_leaks: hung for 60 s");
        std::process::exit(101);
    });
    let live = CancelToken::new().unwrap();
    // Warm up once (lazily created runtime state), then let its threads go.
    scenario(&live);
    thread::sleep(Duration::from_millis(300));
    let (fd0, th0) = (fds(), threads());
    assert_eq!(children(), vec![], "children before");
    for _ in 0..3 {
        scenario(&live);
    }
    // Joined threads and reaped children may still be listed for a moment.
    let t = Instant::now();
    while (fds() > fd0 || threads() > th0 || !children().is_empty()) && t.elapsed() < Duration::from_secs(3) {
        thread::sleep(Duration::from_millis(20));
    }
    let (fd1, th1, kids) = (fds(), threads(), children());
    eprintln!("fds {fd0} -> {fd1}, threads {th0} -> {th1}, children {kids:?}");
    assert_eq!(fd1, fd0, "descriptors leaked");
    assert_eq!(th1, th0, "threads leaked");
    assert_eq!(kids, vec![], "children left");
    assert!(!live.is_cancelled());
}
