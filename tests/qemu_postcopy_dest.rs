//! Postcopy into `qmig recv` from a real QEMU 7.2 source (issue 10, destination side).
//!
//! - A paused 16 MiB `-machine none` guest, capabilities `postcopy-ram` and
//!   `return-path`, `max-bandwidth` low so the source is still in its first pass
//!   when `migrate-start-postcopy` arrives, `max-postcopy-bandwidth` low so the
//!   postcopy phase lasts long enough for `--postcopy-touch` to fault: QEMU's
//!   `query-migrate` shows `postcopy-requests` > 0, both ends complete, recv's
//!   stats carry the request count and latency, and the RAM is exact.
//! - The source SIGKILLed while postcopy is active: recv fails (exit 1, no stats)
//!   within about a second and never reports completed.
//!
//! Without QEMU the tests print `skipped: qemu-system-x86_64 not found` and pass,
//! except when `CI=true`, where they fail.

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_same_ram, qemu_or_skip, qmig_exe, utf8, TestDir};
use serde_json::{json, Value};
use testkit::pattern::{self, Pattern};
use testkit::qemu::{QemuConfig, QemuProcess};

const RAM_LEN: u64 = 16 << 20;
/// Random pages where p % 4 == 0 (4 MiB of data), zero pages elsewhere.
const GUEST: Pattern = Pattern::Mixed { every: 4 };
const LIMIT: Duration = Duration::from_secs(60);
const QUIT_LIMIT: Duration = Duration::from_secs(5);

/// A `qmig recv --postcopy --postcopy-touch` in the background; killed on drop.
struct Recv {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr_path: PathBuf,
}

impl Recv {
    fn spawn(dir: &TestDir, dst: &Path, from: &str) -> Recv {
        let stderr_path = dir.join("recv.stderr");
        let err = File::create(&stderr_path).expect("create recv stderr file");
        let ram = format!("mem={}", utf8(dst));
        let mut child = Command::new(qmig_exe())
            .args(["recv", "--ram", &ram, "--from", from, "--postcopy", "--postcopy-touch"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("run qmig recv");
        let out = child.stdout.take().expect("recv stdout pipe");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Recv { child, lines, stderr_path }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn listening(&mut self) -> String {
        let line =
            self.lines.recv_timeout(LIMIT).unwrap_or_else(|e| panic!("no listening line ({e}): {}", self.stderr()));
        let v: Value = serde_json::from_str(&line).expect("listening line is JSON");
        v["listening"].as_str().expect("listening URI").to_string()
    }

    /// Exit status (killed after `limit`) and the stdout lines after `listening`.
    fn wait(&mut self, limit: Duration) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for qmig recv") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("qmig recv still running after {limit:?}, killed; stderr: {}", self.stderr());
            }
            thread::sleep(Duration::from_millis(5));
        };
        let mut lines = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(1)) {
            lines.push(l);
        }
        (status, lines)
    }
}

impl Drop for Recv {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A paused source QEMU with `postcopy-ram` and `return-path`, throttled, migrating to
/// a `qmig recv --postcopy --postcopy-touch` over a unix socket, switched to postcopy
/// right after `migrate`.
fn start(dir: &TestDir, seed: u64, postcopy_bandwidth: u64) -> (QemuProcess, Recv, Vec<u8>, PathBuf) {
    let src = dir.join("src.ram");
    let dst = dir.join("dst.ram");
    let ram = pattern::generate(GUEST, seed, RAM_LEN as usize);
    fs::write(&src, &ram).expect("write source RAM");
    let mut recv = Recv::spawn(dir, &dst, &format!("unix:{}", utf8(&dir.join("mig.sock"))));
    let uri = recv.listening();
    let mut qemu = QemuProcess::start(&QemuConfig::new().ram("mem", &src, RAM_LEN)).expect("start source QEMU");
    let q = qemu.qmp().expect("QMP");
    q.set_capabilities(&[("postcopy-ram", true), ("return-path", true)]).expect("set capabilities");
    q.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": 2 << 20, "max-postcopy-bandwidth": postcopy_bandwidth })),
    )
    .expect("set parameters");
    qemu.migrate(&uri).unwrap_or_else(|e| panic!("migrate {uri}: {e}\nQEMU stderr: {}", qemu.stderr()));
    qemu.execute("migrate-start-postcopy", None)
        .unwrap_or_else(|e| panic!("migrate-start-postcopy: {e}\nQEMU stderr: {}", qemu.stderr()));
    (qemu, recv, ram, dst)
}

#[test]
fn qemu_postcopy_to_recv_with_touch() {
    const NAME: &str = "qemu_pc_dst";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let dir = TestDir::new(NAME);
    // 4 MiB/s after the switch: the postcopy phase lasts about a second.
    let (mut qemu, mut recv, ram, dst) = start(&dir, 0x9c_0001, 4 << 20);
    let source = qemu
        .wait_migration(LIMIT)
        .unwrap_or_else(|e| panic!("source never ended: {e}\nQEMU: {}\nrecv: {}", qemu.stderr(), recv.stderr()));
    let (status, lines) = recv.wait(LIMIT);
    let qemu_stderr = qemu.stderr();
    qemu.quit(QUIT_LIMIT).expect("quit source QEMU");
    assert_eq!(
        source["status"].as_str(),
        Some("completed"),
        "source {source:#}\nQEMU stderr: {qemu_stderr}\nrecv stderr: {}",
        recv.stderr()
    );
    assert!(status.success(), "recv exited {status}: {}", recv.stderr());
    let requests = source["ram"]["postcopy-requests"].as_u64().unwrap_or(0);
    assert!(requests > 0, "QEMU served no page request: {source:#}");
    let stats: Value = serde_json::from_str(lines.last().expect("stats line")).expect("stats JSON");
    assert_eq!(stats["status"], "completed", "{stats}");
    let pc = &stats["postcopy"];
    let sent = pc["requests"].as_u64().unwrap_or(0);
    assert!(sent >= requests, "recv sent {sent} requests, QEMU counted {requests}: {stats}");
    assert_eq!(stats["ram"]["postcopy-requests"].as_u64(), Some(sent), "{stats}");
    let lat = &pc["request-latency-us"];
    assert!(lat["count"].as_u64().unwrap_or(0) > 0, "no request latency recorded: {stats}");
    let (median, p99, max) = (lat["median"].as_u64(), lat["p99"].as_u64(), lat["max"].as_u64());
    assert!(median.is_some() && median <= p99 && p99 <= max, "latency quantiles out of order: {stats}");
    assert!(pc["placed"].as_u64().unwrap_or(0) > 0, "no page placed after LISTEN: {stats}");
    assert_eq!(pc["rewritten"], 0, "tmpfs RAM is emptied at ADVISE: {stats}");
    let rp = &stats["return-path"];
    assert_eq!(rp["pongs"], 4, "PING 1..4 answered: {stats}");
    assert_eq!(rp["shut"], 0, "{stats}");
    let got = fs::read(&dst).expect("read received RAM");
    assert_same_ram("postcopy RAM received by qmig recv", &got, &ram);
    eprintln!("{NAME}: QEMU postcopy-requests {requests}; recv {}", serde_json::to_string(pc).unwrap_or_default());
}

#[test]
fn qemu_source_killed_during_postcopy_fails_recv() {
    const NAME: &str = "qemu_pc_dst_kill";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let dir = TestDir::new(NAME);
    // 512 KiB/s after the switch: postcopy would take seconds; the source dies in it.
    let (mut qemu, mut recv, _ram, _dst) = start(&dir, 0x9c_0002, 512 << 10);
    let deadline = Instant::now() + LIMIT;
    loop {
        let info = qemu.query_migrate().expect("query-migrate");
        let status = info["status"].as_str().unwrap_or("").to_string();
        if status == "postcopy-active" {
            break;
        }
        assert!(
            !testkit::qemu::is_terminal_status(&status) && Instant::now() < deadline,
            "source never reached postcopy-active: {info:#}\nrecv: {}",
            recv.stderr()
        );
        thread::sleep(Duration::from_millis(10));
    }
    // Let the destination get into its postcopy phase (pages, faults) first.
    thread::sleep(Duration::from_millis(300));
    assert!(matches!(recv.child.try_wait(), Ok(None)), "recv ended before the kill: {}", recv.stderr());
    qemu.kill().expect("kill source QEMU");
    let killed = Instant::now();
    let (status, lines) = recv.wait(Duration::from_secs(20));
    let took = killed.elapsed();
    assert_eq!(status.code(), Some(1), "recv exit {status}; stdout {lines:?}; stderr {}", recv.stderr());
    assert!(lines.is_empty(), "recv printed stats after its source died: {lines:?}");
    assert!(!recv.stderr().trim().is_empty(), "recv said nothing");
    // "About a second": generous on a loaded machine, but far from a hang.
    assert!(took < Duration::from_secs(5), "recv took {took:?} to fail after the source died");
    eprintln!("{NAME}: recv failed {took:?} after the kill: {}", recv.stderr().trim());
}
