//! The return path against a real QEMU 7.2 source migrating into `qmig recv`
//! (issue 10): QEMU with capability `return-path` opens it (OPEN_RETURN_PATH, PING 1)
//! and completes only after the destination's SHUT(0).
//!
//! - `return-path` over unix and tcp: a paused 32 MiB `-machine none` guest; both
//!   ends `completed`, recv's stats show PONG 1 and SHUT 0, RAM exact.
//! - `postcopy-ram` (which opens the return path and sends POSTCOPY_ADVISE): recv
//!   without --postcopy refuses it (as QEMU 7.2 without the capability), so both ends fail: recv exits 1 naming
//!   postcopy-ram, QEMU's `query-migrate` says `failed`.
//! - A destination load failure (recv's RAM file of another size) with
//!   `return-path`: recv exits 1 with QEMU's "Size mismatch", QEMU ends `failed`;
//!   the same after the whole stream (RAM file on a 4 MiB tmpfs): SHUT(1).
//! - `multifd` into a recv without `--multifd`: recv sees a multifd channel
//!   connect and both ends fail (recv says to pass `--multifd N`).
//! - Our source-side reader (`engine::return_path`) against a QEMU 7.2
//!   destination: PONGs then SHUT 0; a destination that fails closes the path.
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
use serde_json::Value;
use testkit::pattern::{self, Pattern, PAGE_SIZE};
use testkit::qemu::{QemuConfig, QemuProcess};

const RAM_LEN: u64 = 32 << 20;
const PAGES: u64 = RAM_LEN / PAGE_SIZE as u64;
/// Random pages where p % 4 == 0, zero pages elsewhere.
const GUEST: Pattern = Pattern::Mixed { every: 4 };
const LIMIT: Duration = Duration::from_secs(20);
const QUIT_LIMIT: Duration = Duration::from_secs(5);

/// A `qmig recv` in the background, stdout read line by line; killed on drop.
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
            .args(["recv", "--ram", &ram, "--from", from])
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

    /// The URI from recv's `{"listening": URI}` line.
    fn listening(&mut self) -> String {
        let line =
            self.lines.recv_timeout(LIMIT).unwrap_or_else(|e| panic!("no listening line ({e}): {}", self.stderr()));
        let v: Value = serde_json::from_str(&line).expect("listening line is JSON");
        v["listening"].as_str().expect("listening URI").to_string()
    }

    /// Exit status (killed after LIMIT) and the stdout lines after `listening`.
    fn wait(&mut self) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + LIMIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for qmig recv") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("qmig recv still running after {LIMIT:?}, killed; stderr: {}", self.stderr());
            }
            thread::sleep(Duration::from_millis(10));
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

/// A paused source QEMU with `caps` on, migrating to a `qmig recv` on `from`
/// (`dst_prefill`: an existing destination file to map). Returns the source's
/// final `query-migrate`, recv's exit status, stdout lines and stderr, and the
/// source RAM; QEMU is quit.
struct Outcome {
    source: Value,
    qemu_stderr: String,
    status: ExitStatus,
    lines: Vec<String>,
    recv_stderr: String,
    ram: Vec<u8>,
    dst: PathBuf,
    _dir: TestDir,
}

fn migrate(
    name: &str,
    seed: u64,
    caps: &[&str],
    from: impl FnOnce(&TestDir) -> String,
    dst_len: Option<u64>,
) -> Outcome {
    migrate_to(name, seed, caps, from, dst_len, None)
}

fn migrate_to(
    name: &str,
    seed: u64,
    caps: &[&str],
    from: impl FnOnce(&TestDir) -> String,
    dst_len: Option<u64>,
    dst_at: Option<PathBuf>,
) -> Outcome {
    let dir = TestDir::new(name);
    let src = dir.join("src.ram");
    let dst = dst_at.unwrap_or_else(|| dir.join("dst.ram"));
    let ram = pattern::generate(GUEST, seed, RAM_LEN as usize);
    fs::write(&src, &ram).expect("write source RAM");
    if let Some(len) = dst_len {
        File::create(&dst).and_then(|f| f.set_len(len)).expect("create destination file");
    }
    let mut recv = Recv::spawn(&dir, &dst, &from(&dir));
    let uri = recv.listening();
    let mut qemu = QemuProcess::start(&QemuConfig::new().ram("mem", &src, RAM_LEN)).expect("start source QEMU");
    let list: Vec<(&str, bool)> = caps.iter().map(|c| (*c, true)).collect();
    qemu.qmp().and_then(|q| q.set_capabilities(&list)).expect("set capabilities");
    qemu.migrate(&uri).unwrap_or_else(|e| panic!("{name}: migrate {uri}: {e}\nQEMU stderr: {}", qemu.stderr()));
    let source = qemu.wait_migration(LIMIT).unwrap_or_else(|e| {
        panic!("{name}: source never ended: {e}\nQEMU: {}\nrecv: {}", qemu.stderr(), recv.stderr())
    });
    let (status, lines) = recv.wait();
    let recv_stderr = recv.stderr();
    let qemu_stderr = qemu.stderr();
    qemu.quit(QUIT_LIMIT).expect("quit source QEMU");
    Outcome { source, qemu_stderr, status, lines, recv_stderr, ram, dst, _dir: dir }
}

fn both_complete(name: &str, o: &Outcome) {
    assert_eq!(
        o.source["status"].as_str(),
        Some("completed"),
        "{name}: source {:#}\nQEMU stderr: {}\nrecv stderr: {}",
        o.source,
        o.qemu_stderr,
        o.recv_stderr
    );
    assert!(o.status.success(), "{name}: recv exited {}: {}", o.status, o.recv_stderr);
    assert!(o.qemu_stderr.trim().is_empty(), "{name}: QEMU complained: {}", o.qemu_stderr);
    let stats: Value = serde_json::from_str(o.lines.last().expect("stats line")).expect("stats JSON");
    assert_eq!(stats["status"], "completed", "{stats}");
    let normal = pattern::nonzero_pages(GUEST, PAGES);
    assert_eq!(stats["ram"]["normal"].as_u64(), Some(normal), "{stats}");
    assert_eq!(stats["ram"]["duplicate"].as_u64(), Some(PAGES - normal), "{stats}");
    // QEMU 7.2 precopy with return-path: OPEN_RETURN_PATH, PING 1 -> PONG 1, then SHUT 0.
    let rp = &stats["return-path"];
    assert_eq!(rp["requested"], true, "{stats}");
    assert_eq!(rp["opened"], true, "{stats}");
    assert_eq!(rp["pongs"], 1, "{stats}");
    assert_eq!(rp["shut"], 0, "{stats}");
    let got = fs::read(&o.dst).expect("read received RAM");
    assert_same_ram(&format!("{name}: RAM received by qmig recv"), &got, &o.ram);
}

#[test]
fn qemu_return_path_to_recv_over_unix() {
    const NAME: &str = "qemu_rp_unix";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let o = migrate(NAME, 0x7e7_0001, &["return-path"], |d| format!("unix:{}", utf8(&d.join("mig.sock"))), None);
    both_complete(NAME, &o);
}

#[test]
fn qemu_return_path_to_recv_over_tcp() {
    const NAME: &str = "qemu_rp_tcp";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let o = migrate(NAME, 0x7e7_0002, &["return-path", "events"], |_| "tcp:127.0.0.1:0".into(), None);
    both_complete(NAME, &o);
}

fn both_fail(name: &str, o: &Outcome, recv_says: &str) {
    assert_eq!(
        o.source["status"].as_str(),
        Some("failed"),
        "{name}: source {:#}\nQEMU stderr: {}\nrecv stderr: {}",
        o.source,
        o.qemu_stderr,
        o.recv_stderr
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "{name}: recv exit {}; stdout {:?}; stderr {}",
        o.status,
        o.lines,
        o.recv_stderr
    );
    assert!(o.lines.is_empty(), "{name}: recv printed stats after failing: {:?}", o.lines);
    assert!(o.recv_stderr.contains(recv_says), "{name}: recv stderr should say {recv_says:?}: {}", o.recv_stderr);
    assert_eq!(o.recv_stderr.trim().lines().count(), 1, "{name}: one error line: {}", o.recv_stderr);
    eprintln!("{name}: source {}; recv: {}", o.source, o.recv_stderr.trim());
}

#[test]
fn qemu_postcopy_ram_to_recv_fails_on_both_ends() {
    const NAME: &str = "qemu_rp_postcopy";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let o = migrate(NAME, 0x7e7_0003, &["postcopy-ram"], |d| format!("unix:{}", utf8(&d.join("mig.sock"))), None);
    both_fail(NAME, &o, "postcopy-ram");
}

#[test]
fn qemu_return_path_destination_failure_fails_the_source() {
    const NAME: &str = "qemu_rp_dest_fails";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    // The destination file exists with half the guest's size: recv refuses the block list.
    let sock = |d: &TestDir| format!("unix:{}", utf8(&d.join("mig.sock")));
    let o = migrate(NAME, 0x7e7_0004, &["return-path"], sock, Some(RAM_LEN / 2));
    both_fail(NAME, &o, "ize mismatch");
}

/// A tmpfs too small for the guest, mounted for one test (root only); unmounted on drop.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    fn mount(name: &str, size: &str) -> Option<SmallTmpfs> {
        let p = std::env::temp_dir().join(format!("qmig-{name}-{}", std::process::id()));
        fs::create_dir_all(&p).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&p)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Some(SmallTmpfs(p))
        } else {
            let _ = fs::remove_dir(&p);
            None
        }
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

#[test]
fn qemu_return_path_failure_after_the_whole_stream_fails_the_source() {
    const NAME: &str = "qemu_rp_late_failure";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    // The destination file lives on a 4 MiB tmpfs: the guest's 8 MiB of data pages
    // cannot all land, which recv learns when it flushes the file after EOF, with the
    // whole stream read and QEMU waiting on the return path: only SHUT(1) tells it.
    let Some(fs_small) = SmallTmpfs::mount(NAME, "4m") else {
        eprintln!("SKIP {NAME}: cannot mount a tmpfs (not root?)");
        return;
    };
    let sock = |d: &TestDir| format!("unix:{}", utf8(&d.join("mig.sock")));
    let o = migrate_to(NAME, 0x7e7_0005, &["return-path"], sock, None, Some(fs_small.0.join("dst.ram")));
    both_fail(NAME, &o, "No space left on device");
}

#[test]
fn qemu_multifd_to_recv_fails_on_both_ends() {
    const NAME: &str = "qemu_rp_multifd";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let sock = |d: &TestDir| format!("unix:{}", utf8(&d.join("mig.sock")));
    let o = migrate(NAME, 0x7e7_0006, &["return-path", "multifd"], sock, None);
    both_fail(NAME, &o, "multifd");
}

/// How the return path ended, its events, the destination QEMU, the guest RAM, the test dir.
type ToQemu = (
    Option<Result<(), engine::return_path::ReturnPathError>>,
    Vec<engine::return_path::RpEvent>,
    QemuProcess,
    Vec<u8>,
    TestDir,
);

/// Our source's return-path reader ([`engine::return_path::SourceReturnPath`])
/// against a QEMU 7.2 destination: a stopped-guest stream with OPEN_RETURN_PATH and
/// PINGs after the configuration (as QEMU's source sends them) and `extra` bytes
/// after the PINGs. Returns how the return path ended, its events, and QEMU.
fn to_qemu_destination(name: &str, seed: u64, extra: &[u8]) -> ToQemu {
    use savevm_format::{write_stopped_guest, Command as Cmd, RamBlock, StoppedGuest};
    let dir = TestDir::new(name);
    let dst = dir.join("dst.ram");
    let sock = dir.join("in.sock");
    let ram = pattern::generate(GUEST, seed, RAM_LEN as usize);
    File::create(&dst).and_then(|f| f.set_len(RAM_LEN)).expect("create destination RAM");
    let mut qemu =
        QemuProcess::start(&QemuConfig::new().ram("mem", &dst, RAM_LEN).incoming(true)).expect("start destination");
    qemu.migrate_incoming(&format!("unix:{}", utf8(&sock))).expect("migrate-incoming");
    let token = transports::CancelToken::new().expect("token");
    let uri: transports::MigrationUri = format!("unix:{}", utf8(&sock)).parse().expect("uri");
    let deadline = Instant::now() + LIMIT;
    let ch = loop {
        match transports::connect(&uri, &token) {
            Ok(ch) => break ch,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{name}: connect to QEMU: {e}"),
        }
    };
    let (stream, _) = write_stopped_guest(Vec::new(), &[("mem", &ram)], &StoppedGuest::default()).expect("stream");
    let at = 8 + 1 + 4 + "none".len();
    let mut bytes = stream[..at].to_vec();
    for c in [Cmd::OpenReturnPath, Cmd::Ping(1), Cmd::Ping(0x1234_5678)] {
        bytes.extend(c.encode());
    }
    bytes.extend_from_slice(extra);
    bytes.extend_from_slice(&stream[at..]);
    let blocks = vec![RamBlock::new(0, "mem", RAM_LEN)];
    let rp = engine::return_path::SourceReturnPath::spawn(ch.return_path().expect("return path"), blocks, 4096, token)
        .expect("reader");
    let mut off = 0;
    while off < bytes.len() {
        match ch.write_vectored(&[std::io::IoSlice::new(&bytes[off..])]) {
            Ok(n) => off += n,
            Err(_) => break, // the destination gave up; its return path says how
        }
    }
    let end = rp.wait_end(LIMIT);
    let events = rp.events().try_iter().collect();
    drop(ch);
    (end, events, qemu, ram, dir)
}

#[test]
fn qemu_destination_pongs_and_shuts_to_our_return_path_reader() {
    const NAME: &str = "qemu_rp_reader_ok";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let (end, events, mut qemu, ram, dir) = to_qemu_destination(NAME, 0x7e7_0007, &[]);
    assert_eq!(end, Some(Ok(())), "{NAME}: QEMU stderr: {}", qemu.stderr());
    use engine::return_path::RpEvent;
    assert_eq!(events, vec![RpEvent::Pong(1), RpEvent::Pong(0x1234_5678)]);
    let info = qemu.wait_migration(LIMIT).expect("destination status");
    assert_eq!(info["status"], "completed", "{info}");
    qemu.quit(QUIT_LIMIT).expect("quit destination");
    assert_same_ram(NAME, &fs::read(dir.join("dst.ram")).expect("read RAM"), &ram);
}

#[test]
fn qemu_destination_failing_ends_our_return_path_reader() {
    const NAME: &str = "qemu_rp_reader_fail";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    // MIG_CMD 0x63: QEMU 7.2 fails the load and exits (no SHUT): the path closes.
    let bad = [0x08, 0x00, 0x63, 0x00, 0x00];
    let (end, events, mut qemu, _, _dir) = to_qemu_destination(NAME, 0x7e7_0008, &bad);
    let e = end.expect("the reader ended").expect_err("not a success");
    eprintln!("{NAME}: return path ended: {e}; QEMU: {}", qemu.stderr().trim());
    use engine::return_path::{ReturnPathError, RpEvent};
    assert!(matches!(e, ReturnPathError::Closed { .. } | ReturnPathError::Decode { .. }), "{e:?}");
    assert_eq!(events, vec![RpEvent::Pong(1), RpEvent::Pong(0x1234_5678)]);
    assert!(qemu.stderr().contains("MIG_CMD 0x63 unknown"), "{}", qemu.stderr());
    let st = qemu.wait_exit(QUIT_LIMIT).expect("wait for QEMU");
    assert_eq!(st.and_then(|s| s.code()), Some(1));
}
