//! Helpers shared by the integration tests: unique temp dirs, the QEMU skip rule,
//! running the `qmig` binary with a time limit, and byte-for-byte file comparison.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use testkit::qemu::qemu_binary;

pub mod agent_ops;
pub mod agents;

/// Returns the QEMU binary, or `None` after printing the skip line.
///
/// Panics when QEMU is missing and the environment variable `CI` is `true`:
/// interop tests must not be skipped silently in CI.
pub fn qemu_or_skip(test: &str) -> Option<PathBuf> {
    if let Some(p) = qemu_binary() {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: qemu-system-x86_64 not found on PATH, and CI=true forbids skipping");
    }
    eprintln!("{test}: skipped: qemu-system-x86_64 not found");
    None
}

/// A per-test directory (on /dev/shm when available), removed on drop.
///
/// Set `QMIG_KEEP_TEST_DIRS=1` to keep it for inspection.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `<base>/qmig-test-<pid>-<name>`, replacing any leftover of the same name.
    pub fn new(name: &str) -> TestDir {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let path = base.join(format!("qmig-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot create test dir {}: {e}", path.display()));
        TestDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("QMIG_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping test dir {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Output of one `qmig` run.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub command: String,
}

/// Runs the `qmig` binary with `args`, killing it after `limit`; stdout/stderr go through files in `dir`.
pub fn run_qmig(dir: &TestDir, args: &[&str], limit: Duration) -> Run {
    let exe = env!("CARGO_BIN_EXE_qmig");
    let command = format!("{exe} {}", args.join(" "));
    let out_path = dir.join("qmig.stdout");
    let err_path = dir.join("qmig.stderr");
    let out = fs::File::create(&out_path).expect("create qmig stdout file");
    let err = fs::File::create(&err_path).expect("create qmig stderr file");
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for qmig") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command}: still running after {limit:?}, killed; stderr: {}",
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = String::from_utf8_lossy(&fs::read(&out_path).unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default()).into_owned();
    Run { status, stdout, stderr, command }
}

/// Like [`run_qmig`], but panics with the command, status and stderr unless it succeeded.
pub fn run_qmig_ok(dir: &TestDir, args: &[&str], limit: Duration) -> Run {
    let r = run_qmig(dir, args, limit);
    assert!(
        r.status.success(),
        "{} failed ({}).\nstderr:\n{}\nstdout (first 2000 bytes):\n{}",
        r.command,
        r.status,
        r.stderr,
        &r.stdout[..r.stdout.len().min(2000)]
    );
    r
}

/// Single-quotes `p` for `/bin/sh` (QEMU runs `exec:` URIs through the shell).
pub fn shell_quote(p: &Path) -> String {
    let s = p.to_str().expect("test paths are UTF-8");
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Asserts that two RAM images are identical, naming the first differing page and the count.
pub fn assert_same_ram(what: &str, actual: &[u8], expected: &[u8]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length {} instead of {}", actual.len(), expected.len());
    if actual == expected {
        return;
    }
    let mut differing = 0usize;
    let mut first = None;
    for (i, (a, e)) in actual.chunks(4096).zip(expected.chunks(4096)).enumerate() {
        if a != e {
            differing += 1;
            first.get_or_insert((i, e.iter().all(|&b| b == 0), a.iter().all(|&b| b == 0)));
        }
    }
    let (page, exp_zero, act_zero) = first.expect("some page differs");
    panic!(
        "{what}: {differing} of {} pages differ; first is page {page} (offset {:#x}), \
         expected {} page, got {} page",
        expected.len() / 4096,
        page * 4096,
        if exp_zero { "an all-zero" } else { "a non-zero" },
        if act_zero { "an all-zero" } else { "a non-zero" },
    );
}

/// The `qmig` binary under test.
pub fn qmig_exe() -> &'static str {
    env!("CARGO_BIN_EXE_qmig")
}

/// A test path as the `&str` a command line takes (test paths are UTF-8).
pub fn utf8(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A `qmig` process in the background (`recv` mostly), its stdout read line by line.
pub struct BackgroundQmig {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Drop for BackgroundQmig {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl BackgroundQmig {
    /// Starts `qmig recv ARGS` (stderr to a file in `dir`).
    pub fn recv(dir: &TestDir, args: &[&str]) -> BackgroundQmig {
        let stderr = dir.join("recv.stderr");
        let mut child = Command::new(qmig_exe())
            .arg("recv")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for l in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        BackgroundQmig { child, lines, stderr }
    }

    /// The `{"listening": URI}` line's URI.
    pub fn listening(&self, limit: Duration) -> String {
        let l = self.lines.recv_timeout(limit).unwrap_or_else(|_| panic!("recv did not listen: {}", self.stderr()));
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        v["listening"].as_str().unwrap().to_string()
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (killing it after `limit`): exit code, last stdout line, stderr.
    pub fn wait(mut self, limit: Duration) -> (Option<i32>, String, String) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("qmig still running after {limit:?}: {}", self.stderr());
            }
            thread::sleep(Duration::from_millis(10));
        };
        let mut last = String::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            last = l;
        }
        (status.code(), last, self.stderr())
    }
}

/// The one error line a failed qmig printed on stderr, checked to be one line naming each of `needles`.
pub fn one_line_error(what: &str, status: Option<i32>, stderr: &str, needles: &[&str]) -> String {
    assert_ne!(status, Some(0), "{what}: qmig succeeded; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: expected one error line, got: {stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{what}: error line lacks '{n}': {}", lines[0]);
    }
    lines[0].to_string()
}
