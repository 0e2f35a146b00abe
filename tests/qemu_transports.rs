//! Transport interop against a real `qemu-system-x86_64` (7.2): live migrations
//! between QEMU and the `qmig` binary over every transport both sides support.
//!
//! - QEMU -> `qmig recv`: QEMU `migrate`s a paused 64 MiB `-machine none` guest
//!   to a `qmig recv` listening on tcp (port 0, the picked port read from recv's
//!   `{"listening": URI}` line) and unix, and to `exec:qmig recv ... --from fd:0`
//!   (QEMU writes the stream to the command's stdin). QEMU must report
//!   `completed`, recv must exit 0 with a `completed` stats line that agrees with
//!   QEMU's page counts, and the received RAM file must equal the source's.
//! - `qmig send` -> QEMU: a QEMU started with `-incoming defer` listens after
//!   `migrate-incoming` on tcp (a free port) or unix; `qmig send` connects (retried
//!   while QEMU is not listening yet). QEMU must report `completed` and runstate
//!   `prelaunch`, send must exit 0, and the destination RAM file (pre-filled with
//!   other data, so zero pages must be written too) must equal the source's.
//!   Over these sockets `send` opens the return path (on by default): QEMU answers
//!   PING 1 and sends SHUT(0), which `send` waits for before `completed`; also
//!   with QEMU's own `return-path` capability set on the destination.
//!
//! Without QEMU the tests print `skipped: qemu-system-x86_64 not found` and pass,
//! except when `CI=true`, where they fail.

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_same_ram, qemu_or_skip, qmig_exe, run_qmig, shell_quote, utf8, Run, TestDir};
use serde_json::{json, Value};
use testkit::pattern::{self, Pattern, PAGE_SIZE};
use testkit::qemu::{expect_completed, QemuConfig, QemuError, QemuProcess};

const RAM_LEN: u64 = 64 << 20;
const PAGES: u64 = RAM_LEN / PAGE_SIZE as u64;
/// Random pages where p % 4 == 0, zero pages elsewhere.
const GUEST: Pattern = Pattern::Mixed { every: 4 };
const MIGRATION_LIMIT: Duration = Duration::from_secs(20);
const QMIG_LIMIT: Duration = Duration::from_secs(20);
const QUIT_LIMIT: Duration = Duration::from_secs(5);
/// How long `qmig send` keeps retrying while the destination QEMU is not listening yet.
const CONNECT_RETRY: Duration = Duration::from_secs(5);

/// Writes the source guest's RAM file and returns its content.
fn write_source_ram(path: &Path, seed: u64) -> Vec<u8> {
    let ram = pattern::generate(GUEST, seed, RAM_LEN as usize);
    fs::write(path, &ram).expect("write source RAM file");
    ram
}

/// Parses a stats line and checks it says `completed` with the guest's page counts.
fn check_stats(who: &str, line: &str) -> Value {
    check_stats_min(who, line, 0)
}

/// Like [`check_stats`], also requiring `ram.transferred >= min_transferred`.
fn check_stats_min(who: &str, line: &str, min_transferred: u64) -> Value {
    let v: Value = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("{who}: final stdout line is not JSON ({e}): {line:?}"));
    assert_eq!(v["status"].as_str(), Some("completed"), "{who} stats: {v}");
    let normal = pattern::nonzero_pages(GUEST, PAGES);
    assert_eq!(v["ram"]["total"].as_u64(), Some(RAM_LEN), "{who} stats: {v}");
    assert_eq!(v["ram"]["normal"].as_u64(), Some(normal), "{who} stats: {v}");
    assert_eq!(v["ram"]["duplicate"].as_u64(), Some(PAGES - normal), "{who} stats: {v}");
    assert_eq!(v["ram"]["normal-bytes"].as_u64(), Some(normal * PAGE_SIZE as u64), "{who} stats: {v}");
    let transferred = v["ram"]["transferred"].as_u64().unwrap_or(0);
    let min = min_transferred.max(normal * PAGE_SIZE as u64);
    assert!(transferred >= min, "{who}: transferred {transferred} bytes, expected at least {min}: {v}");
    v
}

/// Checks QEMU's final source `query-migrate` against the guest pattern.
fn check_source_info(info: &Value) {
    let normal = pattern::nonzero_pages(GUEST, PAGES);
    assert_eq!(info["ram"]["normal"].as_u64(), Some(normal), "source query-migrate: {info:#}");
    assert_eq!(info["ram"]["duplicate"].as_u64(), Some(PAGES - normal), "source query-migrate: {info:#}");
}

/// A `qmig recv` running in the background, stdout read line by line; killed on drop.
struct BackgroundRecv {
    child: Child,
    lines: mpsc::Receiver<String>,
    reader: Option<thread::JoinHandle<()>>,
    stderr_path: PathBuf,
    command: String,
}

impl BackgroundRecv {
    fn spawn(dir: &TestDir, args: &[&str]) -> BackgroundRecv {
        let command = format!("{} {}", qmig_exe(), args.join(" "));
        let stderr_path = dir.join("recv.stderr");
        let err = File::create(&stderr_path).expect("create recv stderr file");
        let mut child = Command::new(qmig_exe())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
        let out = child.stdout.take().expect("recv stdout pipe");
        let (tx, lines) = mpsc::channel();
        let reader = thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        BackgroundRecv { child, lines, reader: Some(reader), stderr_path, command }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The first stdout line, `{"listening":"URI"}`; returns URI.
    fn listening(&mut self, limit: Duration) -> String {
        let line = match self.lines.recv_timeout(limit) {
            Ok(l) => l,
            Err(e) => {
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "{}: no listening line within {limit:?} ({e}; exit status {status:?}); stderr: {}",
                    self.command,
                    self.stderr()
                )
            }
        };
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{}: first stdout line is not JSON ({e}): {line:?}", self.command));
        v["listening"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: first stdout line has no \"listening\" string: {line}", self.command))
            .to_string()
    }

    /// Waits for exit (killing it after `limit`); returns the status and the remaining stdout lines.
    fn wait(&mut self, limit: Duration) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for qmig recv") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{}: still running after {limit:?}, killed; stderr: {}", self.command, self.stderr());
            }
            thread::sleep(Duration::from_millis(10));
        };
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        (status, self.lines.try_iter().collect())
    }
}

impl Drop for BackgroundRecv {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Starts a paused source QEMU whose RAM is `ram_path`.
fn start_source(ram_path: &Path) -> QemuProcess {
    QemuProcess::start(&QemuConfig::new().ram("mem", ram_path, RAM_LEN)).expect("start source QEMU")
}

/// Waits for the source QEMU's migration to end and checks it `completed` with the guest's
/// counts; `peer` describes the receiving side for failure messages (e.g. recv's stderr).
fn source_completes(qemu: &mut QemuProcess, what: &str, peer: impl FnOnce() -> String) -> Value {
    let info = match qemu.wait_migration(MIGRATION_LIMIT).and_then(expect_completed) {
        Ok(info) => info,
        Err(e) => panic!("{what}: source migration: {e}\nQEMU stderr: {}\n{}", qemu.stderr(), peer()),
    };
    check_source_info(&info);
    info
}

/// QEMU migrates to a `qmig recv` listening on the URI `listen` returns (tcp or unix);
/// `expect_uri(from, announced)` checks the URI recv announces, which QEMU then `migrate`s to.
fn qemu_to_recv_socket(
    name: &str,
    seed: u64,
    listen: impl FnOnce(&TestDir) -> String,
    expect_uri: fn(&str, &str) -> bool,
) {
    if qemu_or_skip(name).is_none() {
        return;
    }
    let t0 = Instant::now();
    let dir = TestDir::new(name);
    let src = dir.join("src.ram");
    let dst = dir.join("dst.ram");
    let ram = write_source_ram(&src, seed);

    let from = listen(&dir);
    let ram_arg = format!("mem={}", utf8(&dst));
    let mut recv = BackgroundRecv::spawn(&dir, &["recv", "--ram", &ram_arg, "--from", &from]);
    let uri = recv.listening(QMIG_LIMIT);
    assert!(expect_uri(&from, &uri), "{name}: recv announced {uri:?} for --from {from}");

    let mut qemu = start_source(&src);
    let t_mig = Instant::now();
    qemu.migrate(&uri).unwrap_or_else(|e| panic!("{name}: migrate {uri}: {e}\nQEMU stderr: {}", qemu.stderr()));
    let info = source_completes(&mut qemu, name, || format!("qmig recv stderr: {}", recv.stderr()));
    let mig_time = t_mig.elapsed();
    let (status, lines) = recv.wait(QMIG_LIMIT);
    let recv_stderr = recv.stderr();
    assert!(status.success(), "{}: exited {status}; stderr: {recv_stderr}; stdout: {lines:?}", recv.command);
    assert_eq!(lines.len(), 1, "{name}: recv should print exactly one stats line after listening: {lines:?}");
    finish_qemu_to_recv(name, qemu, &info, &lines[0], &dst, &ram, t0, mig_time);
}

#[test]
fn qemu_migrates_to_qmig_recv_over_tcp() {
    qemu_to_recv_socket(
        "qemu_to_recv_tcp",
        0x7c9_0001,
        |_| "tcp:127.0.0.1:0".to_string(),
        |_, u| u.strip_prefix("tcp:127.0.0.1:").and_then(|p| p.parse::<u16>().ok()).is_some_and(|p| p != 0),
    );
}

#[test]
fn qemu_migrates_to_qmig_recv_over_unix() {
    let sock = |dir: &TestDir| format!("unix:{}", utf8(&dir.join("mig.sock")));
    qemu_to_recv_socket("qemu_to_recv_unix", 0x7c9_0002, sock, |from, u| u == from);
}

#[test]
fn qemu_migrates_to_qmig_recv_over_exec() {
    const NAME: &str = "qemu_to_recv_exec";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let t0 = Instant::now();
    let dir = TestDir::new(NAME);
    let src = dir.join("src.ram");
    // A directory name the shell must not split or unquote: proves the quoting.
    let odd = dir.join("dst dir's $HOME");
    fs::create_dir(&odd).expect("create destination dir");
    let dst = odd.join("dst.ram");
    let (out, err, rc) = (odd.join("recv.stdout"), odd.join("recv.stderr"), odd.join("recv.rc"));
    let ram = write_source_ram(&src, 0x7c9_0003);

    // QEMU runs `/bin/sh -c CMD` with the stream on stdin and stdout on /dev/null;
    // it waits for the command on close but ignores its exit status, so the
    // command records recv's stdout, stderr and exit status in files.
    let rc_tmp = odd.join("recv.rc.tmp");
    let cmd = format!(
        "{} recv --ram {} --from fd:0 >{} 2>{}; echo $? >{} && mv {} {}",
        shell_quote(Path::new(qmig_exe())),
        shell_quote(Path::new(&format!("mem={}", utf8(&dst)))),
        shell_quote(&out),
        shell_quote(&err),
        shell_quote(&rc_tmp),
        shell_quote(&rc_tmp),
        shell_quote(&rc),
    );
    let mut qemu = start_source(&src);
    let t_mig = Instant::now();
    qemu.migrate(&format!("exec:{cmd}"))
        .unwrap_or_else(|e| panic!("{NAME}: migrate: {e}\nQEMU stderr: {}", qemu.stderr()));
    let info = source_completes(&mut qemu, NAME, || {
        format!("qmig recv stderr: {}", fs::read_to_string(&err).unwrap_or_default())
    });
    let mig_time = t_mig.elapsed();

    let deadline = Instant::now() + QMIG_LIMIT;
    let code = loop {
        if let Ok(s) = fs::read_to_string(&rc) {
            break s.trim().to_string();
        }
        if Instant::now() >= deadline {
            panic!(
                "{NAME}: qmig recv did not finish within {QMIG_LIMIT:?} of QEMU completing; stderr: {}",
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let recv_stdout = fs::read_to_string(&out).unwrap_or_default();
    let recv_stderr = fs::read_to_string(&err).unwrap_or_default();
    assert_eq!(code, "0", "{NAME}: qmig recv exited {code}; stderr: {recv_stderr}; stdout: {recv_stdout}");
    let lines: Vec<&str> = recv_stdout.lines().collect();
    // No listening line for exec/fd: only the stats.
    assert_eq!(lines.len(), 1, "{NAME}: recv over fd:0 should print only its stats line: {recv_stdout:?}");
    finish_qemu_to_recv(NAME, qemu, &info, lines[0], &dst, &ram, t0, mig_time);
}

/// Common end of the QEMU -> qmig recv tests: recv's stats, a quiet QEMU, identical RAM.
#[allow(clippy::too_many_arguments)]
fn finish_qemu_to_recv(
    name: &str,
    qemu: QemuProcess,
    info: &Value,
    stats_line: &str,
    dst: &Path,
    ram: &[u8],
    t0: Instant,
    mig_time: Duration,
) {
    let stats = check_stats_min("qmig recv", stats_line, info["ram"]["transferred"].as_u64().unwrap_or(0));
    let qemu_stderr = qemu.stderr();
    qemu.quit(QUIT_LIMIT).expect("quit source QEMU");
    assert!(qemu_stderr.trim().is_empty(), "{name}: source QEMU complained: {qemu_stderr}");
    let got = fs::read(dst).expect("read received RAM");
    assert_same_ram(&format!("{name}: RAM received by qmig recv"), &got, ram);
    eprintln!(
        "{name}: ok in {:?} (migration {mig_time:?}; QEMU total-time {} ms; recv {})",
        t0.elapsed(),
        info["total-time"],
        stats
    );
}

/// A port that was free a moment ago (bound to 127.0.0.1:0, then released).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Whether a failed `qmig send` failed only because nothing was listening yet.
fn not_listening_yet(r: &Run) -> bool {
    r.stderr.contains("cannot connect")
        && (r.stderr.contains("refused") || r.stderr.contains("No such file") || r.stderr.contains("os error 111"))
}

/// `qmig send` to a QEMU destination started with `-incoming defer`; `incoming` runs
/// `migrate-incoming` (choosing the URI) and returns the URI for `send --to`.
fn send_to_qemu(name: &str, seed: u64, incoming: impl FnOnce(&TestDir, &mut QemuProcess) -> String) -> Option<Value> {
    qemu_or_skip(name)?;
    let t0 = Instant::now();
    let dir = TestDir::new(name);
    let src = dir.join("src.ram");
    let dst = dir.join("dst.ram");
    let ram = write_source_ram(&src, seed);
    // Other data in every page, so zero pages must be written by the stream too.
    fs::write(&dst, pattern::generate(Pattern::Random, seed ^ 0xbad, RAM_LEN as usize))
        .expect("write destination RAM file");

    let mut qemu = QemuProcess::start(&QemuConfig::new().ram("mem", &dst, RAM_LEN).incoming(true))
        .expect("start destination QEMU");
    let to = incoming(&dir, &mut qemu);

    let ram_arg = format!("mem={}", utf8(&src));
    let t_mig = Instant::now();
    let mut attempts = 0;
    let run = loop {
        attempts += 1;
        let r = run_qmig(&dir, &["send", "--ram", &ram_arg, "--to", &to], QMIG_LIMIT);
        if r.status.success() || !not_listening_yet(&r) || t_mig.elapsed() >= CONNECT_RETRY {
            break r;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert!(
        run.status.success(),
        "{} failed ({}) after {attempts} attempt(s); stderr: {}",
        run.command,
        run.status,
        run.stderr
    );
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{name}: send should print exactly one stats line: {:?}", run.stdout);
    let stats = check_stats("qmig send", lines[0]);

    let info = qemu
        .wait_migration(MIGRATION_LIMIT)
        .and_then(expect_completed)
        .unwrap_or_else(|e| panic!("{name}: destination QEMU did not complete: {e}\nQEMU stderr: {}", qemu.stderr()));
    let mig_time = t_mig.elapsed();
    let runstate = qemu.query_status().expect("query-status");
    assert_eq!(runstate, "prelaunch", "{name}: destination runstate (query-migrate: {info:#})");
    let qemu_stderr = qemu.stderr();
    qemu.quit(QUIT_LIMIT).expect("quit destination QEMU");
    assert!(qemu_stderr.trim().is_empty(), "{name}: destination QEMU complained: {qemu_stderr}");

    let loaded = fs::read(&dst).expect("read destination RAM");
    assert_same_ram(&format!("{name}: destination RAM after qmig send"), &loaded, &ram);
    eprintln!(
        "{name}: ok in {:?} (send attempts {attempts}, migration {mig_time:?}; send {stats}; QEMU dest {info})",
        t0.elapsed()
    );
    Some(stats)
}

/// A socket send turns the return path on; QEMU 7.2 answers PING 1 and sends SHUT(0)
/// once loaded, which is when our source reports `completed`.
fn assert_confirmed_by_qemu(name: &str, stats: &Value) {
    assert_eq!(stats["return-path"], json!({"pongs": 1, "shut": 0}), "{name}: send {stats}");
}

#[test]
fn qmig_send_fails_when_the_qemu_destination_fails() {
    let name = "send_rp_to_failing_qemu";
    if qemu_or_skip(name).is_none() {
        return;
    }
    let dir = TestDir::new(name);
    let (src, dst) = (dir.join("src.ram"), dir.join("dst.ram"));
    write_source_ram(&src, 0x7c9_0007);
    // The destination's RAM is a quarter of ours: QEMU 7.2 fails the load ("Size mismatch").
    fs::write(&dst, vec![0u8; RAM_LEN as usize / 4]).expect("write destination RAM file");
    let mut qemu = QemuProcess::start(&QemuConfig::new().ram("mem", &dst, RAM_LEN / 4).incoming(true))
        .expect("start destination QEMU");
    let to = format!("unix:{}", utf8(&dir.join("mig.sock")));
    qemu.migrate_incoming(&to).unwrap_or_else(|e| panic!("migrate-incoming {to}: {e}"));
    let ram_arg = format!("mem={}", utf8(&src));
    let run = run_qmig(&dir, &["send", "--ram", &ram_arg, "--to", &to], QMIG_LIMIT);
    assert_eq!(run.status.code(), Some(1), "{name}: send must fail; stdout {} stderr {}", run.stdout, run.stderr);
    assert!(!run.stdout.contains("completed"), "{name}: {}", run.stdout);
    assert_eq!(run.stderr.lines().count(), 1, "{name}: one line: {}", run.stderr);
    assert!(run.stderr.contains("destination"), "{name}: says the destination ended it: {}", run.stderr);
    let _ = qemu.wait_exit(QUIT_LIMIT);
    assert!(qemu.stderr().contains("Size mismatch"), "{name}: QEMU stderr: {}", qemu.stderr());
}

#[test]
fn qmig_send_with_return_path_to_qemu_with_return_path() {
    let name = "send_rp_to_qemu_rp";
    let stats = send_to_qemu(name, 0x7c9_0006, |dir, qemu| {
        // QEMU's own capability on the destination too (libvirt sets it on both ends).
        qemu.qmp()
            .and_then(|q| q.set_capabilities(&[("return-path", true)]))
            .unwrap_or_else(|e| panic!("migrate-set-capabilities return-path: {e}\nQEMU stderr: {}", qemu.stderr()));
        let uri = format!("unix:{}", utf8(&dir.join("mig.sock")));
        qemu.migrate_incoming(&uri)
            .unwrap_or_else(|e| panic!("migrate-incoming {uri}: {e}\nQEMU stderr: {}", qemu.stderr()));
        uri
    });
    if let Some(stats) = stats {
        assert_confirmed_by_qemu(name, &stats);
    }
}

#[test]
fn qmig_send_migrates_to_qemu_over_tcp() {
    let stats = send_to_qemu("send_to_qemu_tcp", 0x7c9_0004, |_, qemu| {
        // The port is free only until someone else binds it: try a few.
        let mut last = None;
        for _ in 0..5 {
            let uri = format!("tcp:127.0.0.1:{}", free_port());
            match qemu.migrate_incoming(&uri) {
                Ok(()) => return uri,
                Err(e @ QemuError::Command { .. }) => last = Some(e),
                Err(e) => panic!("migrate-incoming {uri}: {e}\nQEMU stderr: {}", qemu.stderr()),
            }
        }
        panic!("migrate-incoming on a free tcp port failed 5 times; last: {last:?}\nQEMU stderr: {}", qemu.stderr())
    });
    if let Some(stats) = stats {
        assert_confirmed_by_qemu("send_to_qemu_tcp", &stats);
    }
}

#[test]
fn qmig_send_migrates_to_qemu_over_unix() {
    let stats = send_to_qemu("send_to_qemu_unix", 0x7c9_0005, |dir, qemu| {
        let uri = format!("unix:{}", utf8(&dir.join("mig.sock")));
        qemu.migrate_incoming(&uri)
            .unwrap_or_else(|e| panic!("migrate-incoming {uri}: {e}\nQEMU stderr: {}", qemu.stderr()));
        uri
    });
    if let Some(stats) = stats {
        assert_confirmed_by_qemu("send_to_qemu_unix", &stats);
    }
}
