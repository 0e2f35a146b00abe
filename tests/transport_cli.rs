//! `qmig send` / `qmig recv` over every migration URI, between two qmig processes:
//! RAM compared byte for byte and the `query-migrate` statistics checked on both
//! sides; bad URIs, unreachable peers, failing commands, missing, truncated and
//! mismatched input as one-line errors; and SIGINT / SIGTERM cancelling a send or
//! a recv that is blocked (full socket, stalled peer, accept, a command that never
//! reads) within a second, with status 130 / 143 and one line.

mod common;

use common::{assert_same_ram, shell_quote, TestDir};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use testkit::pattern::{self, Pattern};

const PAGE: usize = savevm_format::TARGET_PAGE_SIZE;
/// RAM of the round trips: 24 MiB, one random page in three, the rest zero.
const RAM_SIZE: usize = 24 << 20;
/// Most a successful or failing run may take.
const LIMIT: Duration = Duration::from_secs(10);
/// Most a cancelled run may take after its signal.
const CANCEL_LIMIT: Duration = Duration::from_secs(1);

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_qmig")
}

fn s(p: &Path) -> String {
    p.to_str().expect("test paths are UTF-8").to_string()
}

/// `qmig ARGS` with stdin closed and backtraces on (so a panic would show).
fn qmig(args: &[&str]) -> Command {
    let mut c = Command::new(exe());
    c.args(args).stdin(Stdio::null()).env("RUST_BACKTRACE", "1");
    c
}

/// `qmig ARGS` run through `/bin/sh` so that descriptor `n` of qmig is `fd`
/// (handed to the shell as its stdin; qmig's own stdin is /dev/null).
fn qmig_with_fd(args: &[&str], n: u32, fd: OwnedFd) -> Command {
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg(format!("exec \"$0\" \"$@\" {n}<&0 0</dev/null"))
        .arg(exe())
        .args(args)
        .stdin(Stdio::from(fd))
        .env("RUST_BACKTRACE", "1");
    c
}

/// A running process whose stdout lines and stderr are collected by threads.
struct Proc {
    what: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Option<JoinHandle<String>>,
}

/// How a process ended.
struct Out {
    what: String,
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl Proc {
    /// Spawn `cmd` (consumed, so descriptors it was given are closed here).
    fn spawn(what: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: cannot spawn: {e}"));
        drop(cmd);
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                match l {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let mut err = child.stderr.take().expect("stderr");
        let stderr = Some(thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        }));
        Proc { what: what.to_string(), child, lines, seen: Vec::new(), stderr }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// The next stdout line, waiting at most `limit`.
    fn next_line(&mut self, limit: Duration) -> String {
        match self.lines.recv_timeout(limit) {
            Ok(l) => {
                self.seen.push(l.clone());
                l
            }
            Err(e) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let err = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
                panic!("{}: no stdout line ({e:?}); stdout so far {:?}; stderr: {err}", self.what, self.seen)
            }
        }
    }

    /// The URI of recv's `{"listening": URI}` first line.
    fn listening(&mut self) -> String {
        let line = self.next_line(LIMIT);
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", self.what));
        let obj = v.as_object().unwrap_or_else(|| panic!("{}: not an object: {line}", self.what));
        assert_eq!(obj.len(), 1, "{}: listening line has other keys: {line}", self.what);
        v["listening"].as_str().unwrap_or_else(|| panic!("{}: no 'listening': {line}", self.what)).to_string()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Wait for the exit (killing it and panicking after `limit`); returns the time it took.
    fn wait(mut self, limit: Duration) -> (Out, Duration) {
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let err = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
                panic!("{}: still running after {limit:?}, killed; stderr: {err}", self.what);
            }
            thread::sleep(Duration::from_millis(2));
        };
        let took = start.elapsed();
        let mut stdout = std::mem::take(&mut self.seen);
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            stdout.push(l);
        }
        let stderr = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        (Out { what: std::mem::take(&mut self.what), status, stdout, stderr }, took)
    }

    fn finish(self) -> Out {
        self.wait(LIMIT).0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A failed assertion must not leave a qmig behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Out {
    /// Exit 0, nothing on stderr, and the final statistics line (the last stdout line).
    fn stats(&self) -> Value {
        assert!(
            self.status.success(),
            "{} failed ({}): stderr: {}\nstdout: {:?}",
            self.what,
            self.status,
            self.stderr,
            self.stdout
        );
        assert!(self.stderr.is_empty(), "{}: unexpected stderr: {}", self.what, self.stderr);
        let last = self.stdout.last().unwrap_or_else(|| panic!("{}: no stdout", self.what));
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{}: last line not JSON ({e}): {last}", self.what))
    }

    /// Exit status `code`, exactly one line on stderr containing every needle,
    /// no panic, and no stdout line reporting a completed migration.
    fn one_line_error(&self, code: i32, needles: &[&str]) -> &str {
        let err = self.stderr.as_str();
        assert_eq!(self.status.code(), Some(code), "{}: status {}; stderr: {err}", self.what, self.status);
        assert_eq!(err.lines().count(), 1, "{}: one stderr line expected, got: {err:?}", self.what);
        assert!(err.ends_with('\n'), "{}: stderr line not terminated: {err:?}", self.what);
        assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{}: {err}", self.what);
        for n in needles {
            assert!(err.contains(n), "{}: '{n}' missing from stderr: {err}", self.what);
        }
        for l in &self.stdout {
            assert!(!l.contains("completed"), "{}: a failed run reported completion: {l}", self.what);
            assert!(l.contains("\"listening\""), "{}: unexpected stdout line: {l}", self.what);
        }
        err
    }
}

/// A RAM file of `len` bytes: pattern `mixed3` (pages 0, 3, 6... random) with a
/// byte set in the last page so it is neither zero nor patterned.
fn make_ram(dir: &TestDir, name: &str, seed: u64, len: usize) -> (PathBuf, Vec<u8>) {
    let mut bytes = pattern::generate(Pattern::Mixed { every: 3 }, seed, len);
    bytes[len - 1] = 0x5a;
    let p = dir.join(name);
    fs::write(&p, &bytes).expect("write RAM file");
    (p, bytes)
}

/// The statistics line of either side of a complete migration of `ram`.
fn check_stats(side: &str, st: &Value, ram: &[u8]) {
    let pages = (ram.len() / PAGE) as u64;
    let zero = ram.chunks(PAGE).filter(|p| p.iter().all(|&b| b == 0)).count() as u64;
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{side}: '{k}' is not a number in {st}"));
    assert_eq!(st["status"], "completed", "{side}: {st}");
    let total_time = u(st, "total-time");
    if side.ends_with("send") {
        // setup-time is the source's; recv reports destination fields only.
        assert!(u(st, "setup-time") <= total_time, "{side}: setup-time > total-time in {st}");
    } else {
        assert!(st.get("setup-time").is_none(), "{side}: no source-side fields in {st}");
    }
    let r = &st["ram"];
    assert_eq!(u(r, "total"), ram.len() as u64, "{side}: ram.total in {st}");
    let (dup, normal) = (u(r, "duplicate"), u(r, "normal"));
    assert_eq!(dup + normal, pages, "{side}: duplicate + normal != pages in {st}");
    assert_eq!(dup, zero, "{side}: ram.duplicate is not the number of zero pages in {st}");
    assert_eq!(u(r, "normal-bytes"), normal * PAGE as u64, "{side}: ram.normal-bytes in {st}");
    assert!(u(r, "transferred") >= normal * PAGE as u64, "{side}: transferred < normal-bytes in {st}");
    assert!(r["mbps"].as_f64().is_some_and(|m| m >= 0.0), "{side}: ram.mbps in {st}");
}

/// Both sides completed, reported the same stream, and DST holds SRC's bytes.
fn check_migration(what: &str, sent: &Out, received: &Out, dst: &Path, ram: &[u8]) -> u64 {
    let (ss, rs) = (sent.stats(), received.stats());
    check_stats(&format!("{what}: send"), &ss, ram);
    check_stats(&format!("{what}: recv"), &rs, ram);
    for k in ["transferred", "duplicate", "normal"] {
        assert_eq!(ss["ram"][k], rs["ram"][k], "{what}: ram.{k} differs between send {ss} and recv {rs}");
    }
    assert_same_ram(what, &fs::read(dst).expect("read destination RAM"), ram);
    // The return path (on by default on sockets): send completed after recv's SHUT(0).
    if ss["return-path"].is_null() {
        assert!(rs["return-path"].is_null(), "{what}: recv answered a return path send did not open: {rs}");
    } else {
        assert_eq!(ss["return-path"], serde_json::json!({"pongs": 1, "shut": 0}), "{what}: send {ss}");
        assert_eq!(rs["return-path"]["shut"], 0, "{what}: recv {rs}");
        assert_eq!(rs["return-path"]["pongs"], 1, "{what}: recv {rs}");
    }
    ss["ram"]["transferred"].as_u64().expect("transferred")
}

/// Whether send used a return path.
fn used_return_path(sent: &Out) -> bool {
    !sent.stats()["return-path"].is_null()
}

/// recv listening on `listen`, send to the URI it printed.
fn listening_round_trip(dir: &TestDir, listen: &str, check_uri: impl Fn(&str)) {
    listening_round_trip_with(dir, listen, &[], check_uri);
}

/// [`listening_round_trip`] with `extra` send arguments; returns send's output.
fn listening_round_trip_with(dir: &TestDir, listen: &str, extra: &[&str], check_uri: impl Fn(&str)) -> Out {
    let (src, ram) = make_ram(dir, "src.bin", 1, RAM_SIZE);
    let dst = dir.join("dst.bin");
    let mut recv = Proc::spawn("recv", qmig(&["recv", "--ram", &format!("mem={}", s(&dst)), "--from", listen]));
    let uri = recv.listening();
    check_uri(&uri);
    let mut args = vec!["send", "--ram"];
    let ram_arg = format!("mem={}", s(&src));
    args.extend([ram_arg.as_str(), "--to", &uri]);
    args.extend(extra);
    let send = Proc::spawn(&format!("send to {uri}"), qmig(&args));
    let sent = send.finish();
    let received = recv.finish();
    assert_eq!(received.stdout.len(), 2, "recv prints the listening line and the stats: {:?}", received.stdout);
    check_migration(listen, &sent, &received, &dst, &ram);
    assert_eq!(used_return_path(&sent), !extra.contains(&"--no-return-path"), "{listen}: return path on sockets");
    sent
}

#[test]
fn unix_without_return_path() {
    let dir = TestDir::new("tcli-unix-norp");
    let listen = format!("unix:{}", s(&dir.join("m.sock")));
    listening_round_trip_with(&dir, &listen, &["--no-return-path"], |_| {});
}

#[test]
fn return_path_asked_on_file_or_exec_is_refused() {
    let dir = TestDir::new("tcli-rp-file");
    let (src, _) = make_ram(&dir, "src.bin", 4, 1 << 20);
    let stream = dir.join("s.mig");
    let ram = format!("mem={}", s(&src));
    for to in [format!("file:{}", s(&stream)), format!("exec:cat > {}", shell_quote(&stream))] {
        let out =
            Proc::spawn("send --return-path", qmig(&["send", "--ram", &ram, "--to", &to, "--return-path"])).finish();
        out.one_line_error(1, &["--return-path", "one direction"]);
    }
    assert!(!stream.exists(), "nothing was written");
}

#[test]
fn tcp_ipv4_round_trip() {
    let dir = TestDir::new("tcli-tcp4");
    listening_round_trip(&dir, "tcp:127.0.0.1:0", |uri| {
        let port = uri.strip_prefix("tcp:127.0.0.1:").unwrap_or_else(|| panic!("listening on {uri}"));
        assert!(port.parse::<u16>().is_ok_and(|p| p != 0), "port 0 was not replaced: {uri}");
    });
}

#[test]
fn tcp_ipv6_round_trip() {
    if let Err(e) = TcpListener::bind("[::1]:0") {
        eprintln!("tcp_ipv6_round_trip: skipped: cannot bind [::1]: {e}");
        return;
    }
    let dir = TestDir::new("tcli-tcp6");
    listening_round_trip(&dir, "tcp:[::1]:0", |uri| {
        let port = uri.strip_prefix("tcp:[::1]:").unwrap_or_else(|| panic!("listening on {uri}"));
        assert!(port.parse::<u16>().is_ok_and(|p| p != 0), "port 0 was not replaced: {uri}");
    });
}

#[test]
fn unix_round_trip() {
    let dir = TestDir::new("tcli-unix");
    let sock = dir.join("m.sock");
    let listen = format!("unix:{}", s(&sock));
    listening_round_trip(&dir, &listen, |uri| assert_eq!(uri, listen));
    assert!(!sock.exists(), "the socket file is removed when recv is done");
}

/// send `--to fd:5` writing to `send_end`, recv `--from fd:3` reading `recv_end`: both inherit their descriptor.
fn fd_round_trip(dir: &TestDir, what: &str, send_end: OwnedFd, recv_end: OwnedFd) {
    let (src, ram) = make_ram(dir, "src.bin", 2, RAM_SIZE);
    let dst = dir.join("dst.bin");
    let recv = Proc::spawn(
        &format!("{what}: recv --from fd:3"),
        qmig_with_fd(&["recv", "--ram", &format!("mem={}", s(&dst)), "--from", "fd:3"], 3, recv_end),
    );
    let send = Proc::spawn(
        &format!("{what}: send --to fd:5"),
        qmig_with_fd(&["send", "--ram", &format!("mem={}", s(&src)), "--to", "fd:5"], 5, send_end),
    );
    // Only the children hold the descriptors now: each sees the other's end close.
    let sent = send.finish();
    let received = recv.finish();
    assert_eq!(received.stdout.len(), 1, "{what}: fd: prints no listening line: {:?}", received.stdout);
    check_migration(what, &sent, &received, &dst, &ram);
    assert_eq!(used_return_path(&sent), what.contains("socket"), "{what}: a return path only on a socket");
}

#[test]
fn fd_socketpair_round_trip() {
    let dir = TestDir::new("tcli-fd-sock");
    let (a, b) = UnixStream::pair().expect("socketpair");
    fd_round_trip(&dir, "fd socketpair", a.into(), b.into());
}

#[test]
fn fd_pipe_round_trip() {
    let dir = TestDir::new("tcli-fd-pipe");
    let (r, w) = std::io::pipe().expect("pipe");
    fd_round_trip(&dir, "fd pipe", w.into(), r.into());
}

#[test]
fn exec_round_trip_through_a_file() {
    let dir = TestDir::new("tcli-exec");
    let (src, ram) = make_ram(&dir, "src.bin", 3, RAM_SIZE);
    let (dst, stream) = (dir.join("dst.bin"), dir.join("s.mig"));
    let to = format!("exec:cat > {}", shell_quote(&stream));
    let sent =
        Proc::spawn("send exec:cat >", qmig(&["send", "--ram", &format!("mem={}", s(&src)), "--to", &to])).finish();
    assert_eq!(sent.stdout.len(), 1, "send prints one line: {:?}", sent.stdout);
    let from = format!("exec:cat {}", shell_quote(&stream));
    let received =
        Proc::spawn("recv exec:cat", qmig(&["recv", "--ram", &format!("mem={}", s(&dst)), "--from", &from])).finish();
    assert_eq!(received.stdout.len(), 1, "exec: prints no listening line: {:?}", received.stdout);
    let transferred = check_migration("exec", &sent, &received, &dst, &ram);
    assert_eq!(fs::metadata(&stream).expect("stream").len(), transferred, "the command got every byte");
}

#[test]
fn exec_into_a_receiving_qmig() {
    let dir = TestDir::new("tcli-exec-recv");
    let (src, ram) = make_ram(&dir, "src.bin", 4, RAM_SIZE);
    let (dst, recv_stats) = (dir.join("dst.bin"), dir.join("recv.json"));
    let to = format!(
        "exec:{} recv --ram mem={} --from fd:0 > {}",
        shell_quote(Path::new(exe())),
        shell_quote(&dst),
        shell_quote(&recv_stats)
    );
    let sent =
        Proc::spawn("send exec:qmig recv", qmig(&["send", "--ram", &format!("mem={}", s(&src)), "--to", &to])).finish();
    // The inner recv's stdout went to a file: it must hold exactly its stats line.
    let text = fs::read_to_string(&recv_stats).expect("inner recv stats");
    let received = Out {
        what: "inner recv --from fd:0".into(),
        status: sent.status, // send succeeded only if the command exited 0
        stdout: text.lines().map(str::to_string).collect(),
        stderr: String::new(),
    };
    assert_eq!(received.stdout.len(), 1, "inner recv stdout: {text}");
    check_migration("exec qmig recv", &sent, &received, &dst, &ram);
}

#[test]
fn file_round_trip_with_and_without_offset() {
    let dir = TestDir::new("tcli-file");
    let (src, ram) = make_ram(&dir, "src.bin", 5, RAM_SIZE);
    let ram_arg = format!("mem={}", s(&src));

    let stream = dir.join("s.mig");
    let to = format!("file:{}", s(&stream));
    let sent = Proc::spawn("send file:", qmig(&["send", "--ram", &ram_arg, "--to", &to])).finish();
    let dst = dir.join("dst.bin");
    let received =
        Proc::spawn("recv file:", qmig(&["recv", "--ram", &format!("mem={}", s(&dst)), "--from", &to])).finish();
    assert_eq!(received.stdout.len(), 1, "file: prints no listening line: {:?}", received.stdout);
    let transferred = check_migration("file", &sent, &received, &dst, &ram);
    let plain = fs::read(&stream).expect("stream");
    assert_eq!(plain.len() as u64, transferred);
    assert_eq!(&plain[..4], b"QEVM");

    // With an offset the stream starts there; what precedes it is kept (QEMU truncates the file to the offset).
    let stream = dir.join("o.mig");
    let header = vec![0xa5u8; 4096];
    fs::write(&stream, [header.as_slice(), &[0xeeu8; 100_000]].concat()).expect("pre-existing file");
    let to = format!("file:{},offset=4096", s(&stream));
    let sent = Proc::spawn("send file:,offset", qmig(&["send", "--ram", &ram_arg, "--to", &to])).finish();
    let dst = dir.join("dst-offset.bin");
    let received =
        Proc::spawn("recv file:,offset", qmig(&["recv", "--ram", &format!("mem={}", s(&dst)), "--from", &to])).finish();
    let transferred = check_migration("file offset", &sent, &received, &dst, &ram);
    let bytes = fs::read(&stream).expect("stream");
    assert_eq!(bytes.len() as u64, 4096 + transferred, "offset + stream, old tail gone");
    assert!(bytes[..4096] == header[..], "the bytes before the offset are kept");
    // Not compared with `plain` byte for byte: how pages fall into sections depends on timing.
    assert_eq!(&bytes[4096..4100], b"QEVM", "the stream starts at the offset");
}

/// Run `qmig ARGS` to its end.
fn run(what: &str, args: &[&str]) -> Out {
    Proc::spawn(what, qmig(args)).finish()
}

#[test]
fn malformed_uris_are_one_line_errors() {
    let dir = TestDir::new("tcli-bad-uri");
    let (src, _) = make_ram(&dir, "src.bin", 6, 64 << 10);
    let dst = dir.join("dst.bin");
    for uri in ["tcp:nohost", "tcp:h:99999", "bogus:x", "fd:x", "tcp:[::1]80", "unix:", "exec:", "file:"] {
        let needle = format!("invalid migration URI '{uri}'");
        run(&format!("send --to {uri}"), &["send", "--ram", &format!("mem={}", s(&src)), "--to", uri])
            .one_line_error(1, &[&needle]);
        run(&format!("recv --from {uri}"), &["recv", "--ram", &format!("mem={}", s(&dst)), "--from", uri])
            .one_line_error(1, &[&needle]);
    }
    // The reasons are specific.
    let send = |uri: &str| run(uri, &["send", "--ram", &format!("mem={}", s(&src)), "--to", uri]);
    send("tcp:h:99999").one_line_error(1, &["port"]);
    send("bogus:x").one_line_error(1, &["unknown scheme"]);
    send("fd:x").one_line_error(1, &["descriptor"]);
    send("tcp:nohost").one_line_error(1, &["tcp:HOST:PORT"]);
    assert!(!dst.exists(), "no destination file for a URI that does not parse");
}

#[test]
fn unreachable_peers_are_one_line_errors() {
    let dir = TestDir::new("tcli-unreachable");
    let (src, _) = make_ram(&dir, "src.bin", 7, 64 << 10);
    let ram_arg = format!("mem={}", s(&src));
    // A port that was just free: nothing listens on it.
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let uri = format!("tcp:127.0.0.1:{port}");
    run("send to a closed port", &["send", "--ram", &ram_arg, "--to", &uri])
        .one_line_error(1, &["qmig: error: peer: cannot connect", &uri, "refused"]);
    let sock = dir.join("nobody.sock");
    let uri = format!("unix:{}", s(&sock));
    run("send to a missing socket", &["send", "--ram", &ram_arg, "--to", &uri])
        .one_line_error(1, &["cannot connect", &uri]);
    run("send to a closed fd", &["send", "--ram", &ram_arg, "--to", "fd:77"]).one_line_error(1, &["fd 77 is not open"]);
    run("recv from a closed fd", &["recv", "--ram", &format!("mem={}", s(&dir.join("d.bin"))), "--from", "fd:77"])
        .one_line_error(1, &["fd 77 is not open"]);
}

#[test]
fn failing_commands_are_one_line_errors() {
    let dir = TestDir::new("tcli-exec-fail");
    let (src, _) = make_ram(&dir, "src.bin", 8, RAM_SIZE);
    // As destination: the command exits at once, so the writes hit a broken pipe;
    // the message must name the command and say it failed, not just EPIPE.
    let out = run("send --to exec:exit 1", &["send", "--ram", &format!("mem={}", s(&src)), "--to", "exec:exit 1"]);
    out.one_line_error(1, &["qmig: error: peer: ", "'exit 1'", "failed"]);
    // As source: the exit status and the command's last stderr line.
    let dst = dir.join("dst.bin");
    let out = run(
        "recv --from exec:echo oops; exit 1",
        &["recv", "--ram", &format!("mem={}", s(&dst)), "--from", "exec:echo oops >&2; exit 1"],
    );
    out.one_line_error(1, &["exit status: 1", "oops"]);
    assert!(!dst.exists(), "no destination RAM for a stream that never started");
    // A command that cannot be found fails the same way (sh reports 127).
    let out = run(
        "recv --from exec:missing command",
        &["recv", "--ram", &format!("mem={}", s(&dst)), "--from", "exec:/nonexistent/qmig-no-such-command"],
    );
    out.one_line_error(1, &["127", "qmig-no-such-command"]);
}

#[test]
fn missing_truncated_and_mismatched_input_are_one_line_errors() {
    let dir = TestDir::new("tcli-bad-input");
    let dst = dir.join("dst.bin");
    let dst_arg = format!("mem={}", s(&dst));
    run("recv missing file", &["recv", "--ram", &dst_arg, "--from", "file:/nonexistent/qmig-stream.mig"])
        .one_line_error(1, &["qmig: error: local: /nonexistent/qmig-stream.mig: No such file"]);

    let (src, _) = make_ram(&dir, "src.bin", 9, 4 << 20);
    let stream = dir.join("s.mig");
    run("save", &["send", "--ram", &format!("mem={}", s(&src)), "--to", &format!("file:{}", s(&stream))]).stats();
    let full = fs::read(&stream).expect("stream");
    let cut = dir.join("cut.mig");
    fs::write(&cut, &full[..full.len() / 2]).expect("cut");
    let at = format!("at byte {}", full.len() / 2);
    run("recv truncated", &["recv", "--ram", &dst_arg, "--from", &format!("file:{}", s(&cut))])
        .one_line_error(1, &[&format!("qmig: error: peer: {at}"), "stream ends"]);
    // Cut just before the EOF record's end: every page arrived, but the stream is not complete.
    let eof_cut = dir.join("eof-cut.mig");
    let vmdesc_at = full.windows(8).rposition(|w| w == b"{\"page_s").unwrap_or(full.len());
    fs::write(&eof_cut, &full[..vmdesc_at.saturating_sub(6)]).expect("cut");
    run("recv without EOF", &["recv", "--ram", &dst_arg, "--from", &format!("file:{}", s(&eof_cut))])
        .one_line_error(1, &[]);

    // A destination file of another size is refused and left alone.
    let small = dir.join("small.bin");
    fs::write(&small, [7u8; 8192]).expect("small");
    run(
        "recv size mismatch",
        &["recv", "--ram", &format!("mem={}", s(&small)), "--from", &format!("file:{}", s(&stream))],
    )
    .one_line_error(1, &["qmig: error: VMM: ", "size mismatch", "'mem'", "0x400000", "0x2000"]);
    assert_eq!(fs::read(&small).expect("small"), vec![7u8; 8192], "mismatched destination untouched");
    // A block the command line does not map.
    run(
        "recv unknown block",
        &["recv", "--ram", &format!("other={}", s(&dst)), "--from", &format!("file:{}", s(&stream))],
    )
    .one_line_error(1, &["'mem'"]);
}

// ---- signals ----------------------------------------------------------------

/// Send `sig` to `p` and wait for its exit; returns the output and the time from the signal.
fn signal_and_wait(p: Proc, sig: Signal) -> (Out, Duration) {
    kill(p.pid(), sig).expect("kill");
    p.wait(Duration::from_secs(5))
}

fn assert_cancelled(out: &Out, took: Duration, sig: Signal) {
    let (code, name) = match sig {
        Signal::SIGINT => (130, "SIGINT"),
        Signal::SIGTERM => (143, "SIGTERM"),
        _ => unreachable!(),
    };
    assert!(took < CANCEL_LIMIT, "{}: exited {took:?} after {name} (limit {CANCEL_LIMIT:?})", out.what);
    out.one_line_error(code, &["cancelled", name]);
}

/// Accept one connection on `l` within `limit`.
fn accept_within(l: &TcpListener, limit: Duration) -> TcpStream {
    l.set_nonblocking(true).expect("nonblocking");
    let start = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => return s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed() < limit => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("no connection within {limit:?}: {e}"),
        }
    }
}

/// A RAM file of random pages, written in pieces.
fn random_ram(path: &Path, len: usize) {
    let mut f = fs::File::create(path).expect("create");
    let mut buf = vec![0u8; 4 << 20];
    for (i, first) in (0..len / PAGE).step_by(buf.len() / PAGE).enumerate() {
        pattern::fill_from(Pattern::Random, 10 + i as u64, first as u64, &mut buf);
        f.write_all(&buf).expect("write");
    }
}

#[test]
fn send_blocked_on_a_peer_that_never_reads_is_cancelled_by_sigint_and_sigterm() {
    let dir = TestDir::new("tcli-sig-send");
    // Far more than loopback socket buffers hold.
    let src = dir.join("big.bin");
    random_ram(&src, 256 << 20);
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let uri = format!("tcp:127.0.0.1:{}", l.local_addr().expect("addr").port());
        let mut send = Proc::spawn(
            &format!("send to a peer that never reads, {sig}"),
            qmig(&["send", "--ram", &format!("mem={}", s(&src)), "--to", &uri]),
        );
        let _peer = accept_within(&l, LIMIT);
        thread::sleep(Duration::from_millis(500));
        assert!(send.running(), "send finished although its peer never read");
        let (out, took) = signal_and_wait(send, sig);
        assert_cancelled(&out, took, sig);
        assert!(out.stdout.is_empty(), "no stats from a cancelled send: {:?}", out.stdout);
    }
}

#[test]
fn recv_with_a_stalled_peer_is_cancelled_by_sigint() {
    let dir = TestDir::new("tcli-sig-recv");
    let (src, _) = make_ram(&dir, "src.bin", 11, 1 << 20);
    let stream = dir.join("s.mig");
    run("save", &["send", "--ram", &format!("mem={}", s(&src)), "--to", &format!("file:{}", s(&stream))]).stats();
    let head = fs::read(&stream).expect("stream")[..100].to_vec();
    let dst = dir.join("dst.bin");
    let mut recv = Proc::spawn(
        "recv from a stalled peer",
        qmig(&["recv", "--ram", &format!("mem={}", s(&dst)), "--from", "tcp:127.0.0.1:0"]),
    );
    let uri = recv.listening();
    let mut peer = TcpStream::connect(uri.strip_prefix("tcp:").expect("tcp")).expect("connect");
    peer.write_all(&head).expect("first 100 bytes");
    thread::sleep(Duration::from_millis(300));
    assert!(recv.running(), "recv ended on a stream that stalled after 100 bytes");
    let (out, took) = signal_and_wait(recv, Signal::SIGINT);
    assert_cancelled(&out, took, Signal::SIGINT);
    assert_eq!(out.stdout.len(), 1, "only the listening line, no stats: {:?}", out.stdout);
    // The connection was shut down: the peer sees the end of it.
    peer.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let mut b = [0u8; 16];
    match peer.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        r => panic!("peer still connected after recv was cancelled: {r:?}"),
    }
}

#[test]
fn recv_waiting_for_a_connection_is_cancelled_by_sigterm_and_sigint() {
    let dir = TestDir::new("tcli-sig-accept");
    let dst = dir.join("dst.bin");
    let sock = dir.join("m.sock");
    for (listen, sig) in
        [("tcp:127.0.0.1:0".to_string(), Signal::SIGTERM), (format!("unix:{}", s(&sock)), Signal::SIGINT)]
    {
        let mut recv = Proc::spawn(
            &format!("recv waiting on {listen}, {sig}"),
            qmig(&["recv", "--ram", &format!("mem={}", s(&dst)), "--from", &listen]),
        );
        let uri = recv.listening();
        thread::sleep(Duration::from_millis(200));
        assert!(recv.running(), "recv on {uri} ended with nobody connecting");
        let (out, took) = signal_and_wait(recv, sig);
        assert_cancelled(&out, took, sig);
        assert_eq!(out.stdout.len(), 1, "only the listening line: {:?}", out.stdout);
        if let Some(addr) = uri.strip_prefix("tcp:") {
            assert!(TcpStream::connect(addr).is_err(), "{uri} still accepts connections");
        }
    }
    assert!(!sock.exists(), "the unix socket file is removed on cancel");
    assert!(!dst.exists(), "no destination RAM without a stream");
}

/// Processes whose command line contains `marker`.
fn pids_with_cmdline(marker: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(c) = fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&c).contains(marker) {
                v.push(pid);
            }
        }
    }
    v
}

/// (state, parent) of a live process from /proc/PID/stat; None once it is gone.
fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut it = rest.split(' ');
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((state, ppid))
}

fn children_of(parent: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if proc_state(pid).is_some_and(|(_, pp)| pp == parent) {
            v.push(pid);
        }
    }
    v
}

/// Gone, or a zombie waiting for a reaper that is not ours (e.g. a container's init).
fn is_dead(pid: i32) -> bool {
    proc_state(pid).is_none_or(|(st, _)| st == 'Z' || st == 'X')
}

#[test]
fn send_to_a_command_that_never_reads_is_cancelled_and_the_command_killed() {
    let dir = TestDir::new("tcli-sig-exec");
    let (src, _) = make_ram(&dir, "src.bin", 12, RAM_SIZE);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos();
    let marker = format!("QMIG_TCLI_MARKER_{}_{nanos}", std::process::id());
    let to = format!("exec:sleep 30; : {marker}");
    let mut send =
        Proc::spawn("send to exec:sleep 30", qmig(&["send", "--ram", &format!("mem={}", s(&src)), "--to", &to]));
    let qmig_pid = send.pid().as_raw();
    // Find the shell (marker in its command line, child of qmig) and its sleep.
    let start = Instant::now();
    let (shell, sleeps) = loop {
        let shells: Vec<i32> = pids_with_cmdline(&marker)
            .into_iter()
            .filter(|p| proc_state(*p).is_some_and(|(_, pp)| pp == qmig_pid))
            .collect();
        if let [sh] = shells[..] {
            let kids = children_of(sh);
            if !kids.is_empty() {
                break (sh, kids);
            }
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no 'sleep 30' child of qmig found (shells {shells:?})");
        thread::sleep(Duration::from_millis(10));
    };
    thread::sleep(Duration::from_millis(300));
    assert!(send.running(), "send finished although the command never reads");
    // The command does not inherit the SIGINT / SIGTERM that qmig blocks (dash blocks
    // every signal for an instant around its forks, hence the retries).
    for pid in std::iter::once(shell).chain(sleeps.iter().copied()) {
        let start = Instant::now();
        loop {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let blocked = status.lines().find_map(|l| l.strip_prefix("SigBlk:")).map(str::trim);
            let blocked = blocked.map(|b| u64::from_str_radix(b, 16).expect("SigBlk is hex"));
            if blocked.is_none_or(|b| b & (1 << 1 | 1 << 14) == 0) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "command {pid} keeps SIGINT/SIGTERM blocked: SigBlk {blocked:x?}\n{status}"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
    let (out, took) = signal_and_wait(send, Signal::SIGINT);
    assert_cancelled(&out, took, Signal::SIGINT);
    assert!(out.stdout.is_empty(), "no stats from a cancelled send: {:?}", out.stdout);
    // The shell was reaped by qmig; its sleep was killed with it (it may linger as
    // a zombie only if this system's init does not reap orphans).
    let start = Instant::now();
    while !(is_dead(shell) && sleeps.iter().all(|p| is_dead(*p))) {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the command survived qmig: shell {shell} {:?}, sleep {sleeps:?} {:?}",
            proc_state(shell),
            sleeps.iter().map(|p| proc_state(*p)).collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert!(proc_state(shell).is_none(), "qmig left its command's shell {shell} unreaped");
    assert!(pids_with_cmdline(&marker).is_empty(), "a process with the marker remains");
}
