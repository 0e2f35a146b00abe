//! Cancellation: every blocking wait (a write into a peer that stopped reading,
//! a read from a peer that sends nothing, an accept nobody answers, an `exec:`
//! command that never reads or never exits) returns a cancelled error within
//! 1 s of `CancelToken::cancel()` from another thread, and what follows a cancel
//! (`finish`, `close`) never waits on the peer (libvirt's migrate_cancel
//! deadlock: a flush into a socket nobody reads while the reader waits for the
//! cancel to finish).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::IntoRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};
use transports::{
    connect, is_cancelled, CancelToken, Listener, MigrationReader, MigrationUri, MigrationWriter, RateLimit,
};

const PAGE: usize = savevm_format::TARGET_PAGE_SIZE;
/// How soon a cancel must take effect.
const PROMPT: Duration = Duration::from_secs(1);

fn pages() -> &'static [u8] {
    static RAM: OnceLock<Vec<u8>> = OnceLock::new();
    RAM.get_or_init(|| (0..8usize << 20).map(|i| (i / PAGE * 7) as u8).collect())
}

fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("qmig-cancel-{tag}-{}-{nanos}", std::process::id())
}

fn sock_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}.sock", unique(tag)))
}

/// Run `f` on a thread; its result, or a panic naming `what` if it takes longer than `limit`.
fn within<T: Send + 'static>(what: &str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what}: still blocked after {limit:?}"))
}

/// Wait until `rate.total_bytes()` stops moving for 200 ms (the writer is blocked).
fn until_stalled(rate: &RateLimit) -> u64 {
    let give_up = Instant::now() + Duration::from_secs(10);
    let mut last = rate.total_bytes();
    loop {
        thread::sleep(Duration::from_millis(200));
        let now = rate.total_bytes();
        if now == last && now > 0 {
            return now;
        }
        assert!(Instant::now() < give_up, "the writer never blocked ({now} bytes sent)");
        last = now;
    }
}

/// A peer that accepts (tcp or unix) and reads nothing until told to; then it
/// drains to end of stream (or reset) and reports when that happened.
struct Peer {
    uri: MigrationUri,
    go: mpsc::Sender<()>,
    done: mpsc::Receiver<(u64, Instant)>,
}

fn silent_peer(unix: bool) -> Peer {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let drain = move |mut s: Box<dyn Read + Send>| {
        let _ = go_rx.recv();
        let (mut n, mut buf) = (0u64, vec![0u8; 1 << 20]);
        while let Ok(k @ 1..) = s.read(&mut buf) {
            n += k as u64;
        }
        let _ = done_tx.send((n, Instant::now()));
    };
    let uri = if unix {
        let path = sock_path("peer");
        let l = UnixListener::bind(&path).unwrap();
        let p = path.clone();
        thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let _ = std::fs::remove_file(&p);
            drain(Box::new(s));
        });
        MigrationUri::Unix(path)
    } else {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            drain(Box::new(s));
        });
        MigrationUri::Tcp { host: "127.0.0.1".into(), port }
    };
    Peer { uri, go: go_tx, done: done_rx }
}

/// How a scenario ends the writer after the cancel.
#[derive(Clone, Copy, Debug)]
enum End {
    Finish,
    Close,
}

/// A writer sending pages as fast as it can; returns the error that stopped it,
/// when it returned, and the writer itself.
fn spawn_writer(
    ch: transports::Channel,
    rate: RateLimit,
) -> mpsc::Receiver<(std::io::Error, Instant, MigrationWriter<'static>)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut w = MigrationWriter::new(ch, rate);
        let e = 'out: loop {
            for p in pages().chunks_exact(PAGE) {
                if let Err(e) = w.write_borrowed(p) {
                    break 'out e;
                }
            }
        };
        let _ = tx.send((e, Instant::now(), w));
    });
    rx
}

/// Block a writer on `ch`, cancel it, and end it with `end`: everything returns
/// within [`PROMPT`] and reports a cancel.
fn cancel_blocked_writer(what: &str, ch: transports::Channel, token: &CancelToken, end: End) {
    let rate = RateLimit::new(0);
    let done = spawn_writer(ch, rate.clone());
    let sent = until_stalled(&rate);
    let t = Instant::now();
    let token2 = token.clone();
    within(&format!("{what}: cancel()"), PROMPT, move || token2.cancel());
    let (e, returned, w) = done.recv_timeout(PROMPT * 2).unwrap_or_else(|_| panic!("{what}: write still blocked"));
    let took = returned.saturating_duration_since(t);
    eprintln!("{what}: blocked after {sent} bytes; write returned {took:?} after cancel: {e}");
    assert!(took < PROMPT, "{what}: write returned {took:?} after cancel");
    assert!(is_cancelled(&e), "{what}: {e:?} is not a cancel");
    // The libvirt case: nothing after a cancel flushes into a socket nobody reads.
    let t = Instant::now();
    match end {
        End::Finish => {
            let r = within(&format!("{what}: finish()"), PROMPT, move || w.finish().map(|_| ()).map_err(|(_, e)| e));
            let e = r.expect_err("finish after cancel succeeded");
            assert!(is_cancelled(&e), "{what}: finish: {e:?} is not a cancel");
        }
        End::Close => {
            let r = within(&format!("{what}: close()"), PROMPT, move || w.close());
            let e = r.expect_err("close after cancel succeeded");
            assert!(e.is_cancelled(), "{what}: close: {e:?} is not a cancel");
        }
    }
    eprintln!("{what}: {end:?} returned in {:?}", t.elapsed());
}

/// Writer to a tcp/unix peer that never reads: cancel, and the peer sees the
/// connection end at once (the socket is shut down by the cancel itself, before
/// anything waits on the peer).
fn socket_writer(unix: bool, end: End) {
    let what = format!("{} writer ({end:?})", if unix { "unix" } else { "tcp" });
    let peer = silent_peer(unix);
    let token = CancelToken::new().unwrap();
    let ch = connect(&peer.uri, &token).expect("connect");
    let rate = RateLimit::new(0);
    let done = spawn_writer(ch, rate.clone());
    until_stalled(&rate);
    let t = Instant::now();
    token.cancel();
    let (e, returned, w) = done.recv_timeout(PROMPT * 2).unwrap_or_else(|_| panic!("{what}: write still blocked"));
    assert!(returned - t < PROMPT, "{what}: write returned {:?} after cancel", returned - t);
    assert!(is_cancelled(&e), "{what}: {e:?}");
    // The writer (and its channel) still exist: the peer must nevertheless see the end.
    peer.go.send(()).unwrap();
    let (got, eof) = peer.done.recv_timeout(PROMPT * 2).unwrap_or_else(|_| panic!("{what}: peer never saw the end"));
    eprintln!("{what}: peer drained {got} bytes then saw the end {:?} after cancel", eof - t);
    assert!(eof - t < PROMPT + Duration::from_millis(500), "{what}: peer saw the end {:?} after cancel", eof - t);
    assert!(got <= rate.total_bytes(), "peer got more than was sent");
    drop(w);
    // And the same again through finish / close on a fresh connection.
    let peer = silent_peer(unix);
    let token = CancelToken::new().unwrap();
    let ch = connect(&peer.uri, &token).expect("connect");
    cancel_blocked_writer(&what, ch, &token, end);
}

#[test]
fn tcp_writer_peer_not_reading() {
    socket_writer(false, End::Finish);
    socket_writer(false, End::Close);
}

#[test]
fn unix_writer_peer_not_reading() {
    socket_writer(true, End::Finish);
    socket_writer(true, End::Close);
}

/// `fd:` with a pipe nobody reads (libvirt's case: it passes an fd to its iohelper).
#[test]
fn fd_pipe_writer_not_read() {
    for end in [End::Finish, End::Close] {
        let (r, w) = nix::unistd::pipe().unwrap();
        let token = CancelToken::new().unwrap();
        let ch = connect(&format!("fd:{}", w.into_raw_fd()).parse().unwrap(), &token).expect("fd:");
        cancel_blocked_writer(&format!("fd: pipe writer ({end:?})"), ch, &token, end);
        drop(r);
    }
}

/// A destination blocked reading from a source that connected but sends
/// nothing (after a few bytes), over tcp and unix; and the source sees the end.
#[test]
fn reader_peer_stalls() {
    for unix in [false, true] {
        let what = if unix { "unix reader" } else { "tcp reader" };
        let token = CancelToken::new().unwrap();
        let uri = if unix { MigrationUri::Unix(sock_path("reader")) } else { "tcp:127.0.0.1:0".parse().unwrap() };
        let l = Listener::bind(&uri, &token).unwrap();
        let uri = l.local_uri().clone();
        let mut src: Box<dyn ReadWrite> = match &uri {
            MigrationUri::Unix(p) => Box::new(UnixStream::connect(p).unwrap()),
            MigrationUri::Tcp { port, .. } => Box::new(TcpStream::connect(("127.0.0.1", *port)).unwrap()),
            _ => unreachable!(),
        };
        src.write_all(b"QEVM\0\0\0\x03").unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let ch = l.accept().expect("accept");
            let mut r = MigrationReader::new(ch, RateLimit::new(0));
            let mut head = [0u8; 8];
            r.read_exact(&mut head).expect("header");
            let mut more = [0u8; PAGE];
            let res = r.read(&mut more);
            let _ = tx.send((res, Instant::now(), head, r));
        });
        thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        token.cancel();
        let (res, returned, head, r) = rx.recv_timeout(PROMPT * 2).unwrap_or_else(|_| panic!("{what}: still blocked"));
        assert_eq!(&head, b"QEVM\0\0\0\x03");
        let e = res.expect_err("read returned data nobody sent");
        eprintln!("{what}: read returned {:?} after cancel: {e}", returned - t);
        assert!(returned - t < PROMPT, "{what}: read returned {:?} after cancel", returned - t);
        assert!(is_cancelled(&e), "{what}: {e:?}");
        // Shut down by the cancel: the source's read sees the end though `r` lives.
        let eof = within(&format!("{what}: source sees the end"), PROMPT, move || {
            let mut b = [0u8; 16];
            src.read(&mut b).map_err(|e| e.kind())
        });
        assert!(matches!(eof, Ok(0) | Err(_)), "{what}: source read {eof:?}");
        let t = Instant::now();
        within(&format!("{what}: finish"), PROMPT, move || r.into_channel().finish()).expect("finish");
        assert!(t.elapsed() < PROMPT);
    }
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

/// `Listener::accept` with nobody connecting.
#[test]
fn accept_nobody_connects() {
    for uri in ["tcp:127.0.0.1:0".parse().unwrap(), MigrationUri::Unix(sock_path("accept"))] {
        let token = CancelToken::new().unwrap();
        let l = Listener::bind(&uri, &token).unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let r = l.accept();
            let _ = tx.send((r.map(|_| ()), Instant::now()));
        });
        thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        token.cancel();
        let (r, returned) = rx.recv_timeout(PROMPT * 2).unwrap_or_else(|_| panic!("{uri}: accept still blocked"));
        let e = r.expect_err("accepted nobody");
        eprintln!("accept {uri}: returned {:?} after cancel: {e}", returned - t);
        assert!(returned - t < PROMPT, "accept {uri}: {:?}", returned - t);
        assert!(e.is_cancelled(), "accept {uri}: {e:?}");
        if let MigrationUri::Unix(p) = &uri {
            assert!(!p.exists(), "the listener's socket file is left behind");
        }
    }
}

/// Processes (pid, state, ppid, cmdline) whose command line contains `marker`.
fn procs_with(marker: &str) -> Vec<(i32, char, i32, String)> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains(marker) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // "pid (comm) S ppid ...": split after the last ')'.
        let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        out.push((pid, rest[0].chars().next().unwrap(), rest[1].parse().unwrap(), cmd));
    }
    out
}

/// Nothing of the command is left: the shell (our child) is reaped, and the
/// command it ran is dead. (That one is the shell's child: once both are killed
/// it is re-parented, and reaping it is then init's job: PID 1 of some
/// sandboxes never does, so a zombie whose parent is not us is accepted.)
fn assert_command_gone(what: &str, marker: &str) {
    let me = std::process::id() as i32;
    let give_up = Instant::now() + Duration::from_secs(2);
    loop {
        let left: Vec<_> = procs_with(marker).into_iter().filter(|p| p.1 != 'Z' || p.2 == me).collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < give_up, "{what}: left behind (pid, state, ppid, cmdline): {left:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// `exec:` whose command never reads its stdin: the writer blocks on the pipe;
/// cancel kills the command, and after `finish`/`close` it is reaped.
#[test]
fn exec_command_never_reads() {
    for end in [End::Finish, End::Close] {
        // The marker is sleep's own argument, so both sh's and sleep's command lines hold it.
        let marker = format!(
            "30.{}{}{}",
            std::process::id(),
            end as u8,
            std::time::UNIX_EPOCH.elapsed().unwrap().subsec_nanos()
        );
        // `; true` keeps sh as the parent of sleep: both must go.
        let uri: MigrationUri = format!("exec:sleep {marker}; true").parse().unwrap();
        let token = CancelToken::new().unwrap();
        let ch = connect(&uri, &token).expect("exec");
        let give_up = Instant::now() + Duration::from_secs(5);
        while procs_with(&marker).len() < 2 {
            assert!(Instant::now() < give_up, "sh and sleep never both ran: {:?}", procs_with(&marker));
            thread::sleep(Duration::from_millis(10));
        }
        cancel_blocked_writer(&format!("exec writer ({end:?})"), ch, &token, end);
        assert_command_gone("exec writer", &marker);
    }
}

/// `exec:` whose command reads everything but then never exits: `close` waits
/// for it (as it should, to check its status), and a cancel from another thread
/// must end that wait too: `cancel()` itself returns at once, `close` within 1 s.
#[test]
fn exec_command_never_exits() {
    let marker = format!("30.{}{}", std::process::id(), std::time::UNIX_EPOCH.elapsed().unwrap().subsec_nanos());
    let uri: MigrationUri = format!("exec:cat >/dev/null; sleep {marker}").parse().unwrap();
    let token = CancelToken::new().unwrap();
    let ch = connect(&uri, &token).expect("exec");
    let mut w = MigrationWriter::new(ch, RateLimit::new(0));
    w.write_all(&pages()[..1 << 20]).unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let r = w.close();
        let _ = tx.send((r, Instant::now()));
    });
    // close() is now waiting for `sleep`.
    thread::sleep(Duration::from_millis(500));
    assert!(rx.try_recv().is_err(), "close did not wait for the command");
    let t = Instant::now();
    let token2 = token.clone();
    within("cancel() while close waits for the command", PROMPT, move || token2.cancel());
    let (r, returned) = rx.recv_timeout(PROMPT * 2).expect("close still waiting for the command after cancel");
    let e = r.expect_err("close of a killed command succeeded");
    eprintln!("exec close: returned {:?} after cancel: {e}", returned - t);
    assert!(returned - t < PROMPT);
    assert!(e.is_cancelled(), "{e:?}");
    assert_command_gone("exec never exits", &marker);
}

/// A cancel before anything is sent: every operation fails at once, nothing is sent.
#[test]
fn cancelled_before_start() {
    let peer = silent_peer(false);
    let token = CancelToken::new().unwrap();
    let ch = connect(&peer.uri, &token).expect("connect");
    token.cancel();
    let mut w = MigrationWriter::new(ch, RateLimit::new(0));
    w.write_all(b"QEVM").unwrap(); // buffered
    let e = w.flush().expect_err("flush after cancel");
    assert!(is_cancelled(&e));
    assert_eq!(w.rate_limit().total_bytes(), 0);
    let e = w.close().expect_err("close after cancel");
    assert!(e.is_cancelled(), "{e:?}");
    peer.go.send(()).unwrap();
    let (got, _) = peer.done.recv_timeout(PROMPT).expect("peer sees the end");
    assert_eq!(got, 0);
}

/// Without any cancel, dropping a channel closes it, even while its token
/// lives on (a token may outlive many channels: one per attempt): the peer
/// sees end of stream rather than waiting forever.
#[test]
fn dropped_writer_closes_while_token_lives() {
    let token = CancelToken::new().unwrap();
    for unix in [false, true] {
        let peer = silent_peer(unix);
        let ch = connect(&peer.uri, &token).expect("connect");
        let mut w = MigrationWriter::new(ch, RateLimit::new(0));
        w.write_all(b"QEVM\0\0\0\x03").unwrap();
        w.flush().unwrap();
        drop(w);
        peer.go.send(()).unwrap();
        let (got, _) = peer.done.recv_timeout(PROMPT).unwrap_or_else(|_| {
            panic!("{}: the peer never saw the end of a dropped writer", if unix { "unix" } else { "tcp" })
        });
        assert_eq!(got, 8);
    }
    assert!(!token.is_cancelled());
}

/// The error and its causes, `a: b: c` (as the CLI prints it).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut c = e.source();
    while let Some(s) = c {
        out = format!("{out}: {s}");
        c = s.source();
    }
    out
}

/// Each blocking operation's error after a cancel says so: `is_cancelled` holds,
/// "migration cancelled" is printed once along the error's source chain, and the
/// error names what was cancelled (an accept, a read, a write, closing the
/// channel; closing is not reported as a failed connect).
#[test]
fn every_blocking_op_reports_the_cancel() {
    let once = |what: &str, text: &str| {
        assert_eq!(text.matches("migration cancelled").count(), 1, "{what}: {text}");
        assert!(!text.starts_with("cannot connect"), "{what}: {text}");
    };
    // connect and accept on a cancelled token, tcp and unix.
    for uri in ["tcp:127.0.0.1:0".parse().unwrap(), MigrationUri::Unix(sock_path("cancelled-accept"))] {
        let token = CancelToken::new().unwrap();
        let l = Listener::bind(&uri, &token).unwrap();
        token.cancel();
        let e = connect(l.local_uri(), &token).expect_err("connect with a cancelled token");
        assert!(e.is_cancelled(), "connect {uri}: {e:?}");
        assert_eq!(chain(&e).matches("migration cancelled").count(), 1, "{}", chain(&e));
        let e = within("accept on a cancelled token", PROMPT, move || l.accept().map(|_| ())).expect_err("accept");
        assert!(e.is_cancelled(), "accept {uri}: {e:?}");
        once("accept", &chain(&e));
        assert!(chain(&e).starts_with("cannot accept on"), "{}", chain(&e));
    }
    // read, write and close of a socket channel.
    let peer = silent_peer(true);
    let token = CancelToken::new().unwrap();
    let ch = connect(&peer.uri, &token).unwrap();
    token.cancel();
    let mut w = MigrationWriter::new(ch, RateLimit::new(0));
    w.write_all(&pages()[..1 << 20]).expect_err("write after cancel");
    let e = w.flush().expect_err("flush after cancel");
    assert!(is_cancelled(&e), "{e:?}");
    once("write", &chain(&e));
    let e = w.close().expect_err("close after cancel");
    assert!(e.is_cancelled(), "{e:?}");
    once("close", &chain(&e));
    peer.go.send(()).unwrap();

    let token = CancelToken::new().unwrap();
    let l = Listener::bind(&MigrationUri::Unix(sock_path("cancelled-read")), &token).unwrap();
    let _src = UnixStream::connect(match l.local_uri() {
        MigrationUri::Unix(p) => p,
        _ => unreachable!(),
    })
    .unwrap();
    let ch = l.accept().unwrap();
    token.cancel();
    let mut r = MigrationReader::new(ch, RateLimit::new(0));
    let e = r.read(&mut [0u8; 16]).expect_err("read after cancel");
    assert!(is_cancelled(&e), "{e:?}");
    once("read", &chain(&e));

    // close of an `exec:` command (killed by the cancel): the cancel, not its exit status.
    let token = CancelToken::new().unwrap();
    let ch = connect(&"exec:cat >/dev/null".parse().unwrap(), &token).unwrap();
    token.cancel();
    let w = MigrationWriter::new(ch, RateLimit::new(0));
    let e = within("close of a cancelled exec", PROMPT * 2, move || w.close()).expect_err("exec close");
    assert!(e.is_cancelled(), "{e:?}");
    once("exec close", &chain(&e));
}
