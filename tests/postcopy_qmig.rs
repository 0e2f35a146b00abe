//! qmig -> qmig postcopy: `qmig send --postcopy --postcopy-after 0` into
//! `qmig recv --postcopy --postcopy-touch` over a unix socket: both complete, the
//! page requests recv sent are the ones send served, and the RAM is exact.

mod common;

use common::{assert_same_ram, run_qmig_ok, utf8, TestDir};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testkit::pattern::{self, Pattern};

const RAM_LEN: usize = 16 << 20;

/// Runs send (`--postcopy` plus `extra`) into `recv --postcopy --postcopy-touch`;
/// returns both statistics lines after checking both completed and the RAM.
fn migrate(name: &str, extra: &[&str]) -> (Value, Value) {
    let dir = TestDir::new(name);
    let (src, dst, sock) = (dir.join("src.ram"), dir.join("dst.ram"), dir.join("mig.sock"));
    let ram = pattern::generate(Pattern::Mixed { every: 3 }, 0x9c_0003, RAM_LEN);
    std::fs::write(&src, &ram).expect("write source RAM");
    let uri = format!("unix:{}", utf8(&sock));
    let recv_out = std::fs::File::create(dir.join("recv.out")).expect("recv stdout file");
    let recv_err = std::fs::File::create(dir.join("recv.err")).expect("recv stderr file");
    let ram_arg = format!("mem={}", utf8(&dst));
    let mut recv = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(["recv", "--ram", &ram_arg, "--from", &uri, "--postcopy", "--postcopy-touch"])
        .stdin(Stdio::null())
        .stdout(recv_out)
        .stderr(recv_err)
        .spawn()
        .expect("run qmig recv");
    // recv binds before it prints; wait for the socket file.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !sock.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Postcopy from the start: nearly every page comes after RUN, while the touch thread faults.
    let src_arg = format!("mem={}", utf8(&src));
    let mut args = vec!["send", "--ram", &src_arg, "--to", &uri, "--postcopy", "--max-bandwidth", "4M"];
    args.extend_from_slice(extra);
    let send = run_qmig_ok(&dir, &args, Duration::from_secs(60));
    let status = recv.wait().expect("wait for recv");
    let recv_err = std::fs::read_to_string(dir.join("recv.err")).unwrap_or_default();
    assert!(status.success(), "recv: {status} {recv_err}");
    let sent: Value = serde_json::from_str(send.stdout.lines().last().expect("send stats")).expect("send JSON");
    let out = std::fs::read_to_string(dir.join("recv.out")).expect("recv stdout");
    let got: Value = serde_json::from_str(out.lines().last().expect("recv stats")).expect("recv JSON");
    assert_eq!(sent["status"], "completed", "{sent}");
    assert_eq!(got["status"], "completed", "{got}");
    assert_eq!(got["return-path"]["shut"], 0, "{got}");
    assert_same_ram(name, &std::fs::read(&dst).expect("read received RAM"), &ram);
    (sent, got)
}

#[test]
fn qmig_send_postcopy_into_qmig_recv_postcopy() {
    let (sent, got) = migrate("postcopy-qmig", &["--postcopy-after", "0"]);
    let requests = got["postcopy"]["requests"].as_u64().unwrap_or(0);
    assert!(requests > 0, "recv's touch thread faulted: {got}");
    assert_eq!(sent["ram"]["postcopy-requests"].as_u64(), Some(requests), "send {sent}\nrecv {got}");
    assert!(sent["ram"]["postcopy-bytes"].as_u64().unwrap_or(0) > 0, "{sent}");
}

/// `postcopy-ram` on both ends but never started: pre-copy completes as usual.
#[test]
fn postcopy_capability_without_the_switch_completes_by_precopy() {
    let (sent, got) = migrate("postcopy-qmig-nostart", &[]);
    assert!(got["postcopy"].is_null(), "{got}");
    assert_eq!(sent["ram"]["postcopy-bytes"], 0, "{sent}");
}

/// The destination process SIGKILLed while the source is in `postcopy-active`:
/// `qmig send` fails promptly (the lost return path and socket end it), says the
/// guest stays stopped, and does not hang.
#[test]
fn recv_sigkilled_in_postcopy_fails_send_promptly() {
    let dir = TestDir::new("postcopy-kill-dest");
    let (src, dst, sock, ctl) = (dir.join("src.ram"), dir.join("dst.ram"), dir.join("mig.sock"), dir.join("ctl.sock"));
    std::fs::write(&src, pattern::generate(Pattern::Mixed { every: 3 }, 0x9c_0004, RAM_LEN)).expect("source RAM");
    let uri = format!("unix:{}", utf8(&sock));
    let mut recv = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(["recv", "--ram", &format!("mem={}", utf8(&dst)), "--from", &uri, "--postcopy"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run qmig recv");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // 16 MiB at 1 MiB/s in postcopy: it stays postcopy-active for ~16 s.
    let control = format!("unix:{}", utf8(&ctl));
    let src_arg = format!("mem={}", utf8(&src));
    let send = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(["send", "--ram", &src_arg, "--to", &uri, "--postcopy", "--postcopy-after", "0"])
        .args(["--max-postcopy-bandwidth", "1M", "--control", &control])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qmig send");
    // Wait for postcopy-active on the source's control socket.
    let mut active = false;
    while Instant::now() < deadline {
        let q = Command::new(env!("CARGO_BIN_EXE_qmig"))
            .args(["query-migrate", "--control", &control])
            .output()
            .expect("query-migrate");
        let v: Value = serde_json::from_slice(&q.stdout).unwrap_or(Value::Null);
        if v["status"] == "postcopy-active" {
            active = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(active, "send never reached postcopy-active");
    recv.kill().expect("SIGKILL recv");
    let killed = Instant::now();
    let _ = recv.wait();
    let out = send.wait_with_output().expect("send ends");
    let took = killed.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("send failed {took:?} after the kill: {err}");
    assert!(!out.status.success(), "send must fail: {err}");
    assert!(err.contains("postcopy") && err.contains("stays stopped"), "{err}");
    assert!(!err.contains("resumed on the source"), "never resumed after the switch: {err}");
    // Within a second or so; generous for a loaded machine.
    assert!(took < Duration::from_secs(5), "send took {took:?} to fail");
}

/// The source process SIGKILLed while in `postcopy-active`: `qmig recv` (whose
/// guest RAM is now partly on the dead source) fails promptly with a clear
/// error, never reports completed, and does not hang.
#[test]
fn send_sigkilled_in_postcopy_fails_recv_promptly() {
    let dir = TestDir::new("postcopy-kill-src");
    let (src, dst, sock, ctl) = (dir.join("src.ram"), dir.join("dst.ram"), dir.join("mig.sock"), dir.join("ctl.sock"));
    std::fs::write(&src, pattern::generate(Pattern::Mixed { every: 3 }, 0x9c_0005, RAM_LEN)).expect("source RAM");
    let uri = format!("unix:{}", utf8(&sock));
    let recv = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(["recv", "--ram", &format!("mem={}", utf8(&dst)), "--from", &uri, "--postcopy", "--postcopy-touch"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qmig recv");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // 16 MiB at 1 MiB/s in postcopy: it stays postcopy-active for ~16 s.
    let control = format!("unix:{}", utf8(&ctl));
    let src_arg = format!("mem={}", utf8(&src));
    let mut send = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(["send", "--ram", &src_arg, "--to", &uri, "--postcopy", "--postcopy-after", "0"])
        .args(["--max-postcopy-bandwidth", "1M", "--control", &control])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run qmig send");
    let mut active = false;
    while Instant::now() < deadline {
        let q = Command::new(env!("CARGO_BIN_EXE_qmig"))
            .args(["query-migrate", "--control", &control])
            .output()
            .expect("query-migrate");
        let v: Value = serde_json::from_slice(&q.stdout).unwrap_or(Value::Null);
        if v["status"] == "postcopy-active" {
            active = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(active, "send never reached postcopy-active");
    send.kill().expect("SIGKILL send");
    let killed = Instant::now();
    let _ = send.wait();
    let out = recv.wait_with_output().expect("recv ends");
    let took = killed.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("recv failed {took:?} after the kill: {err}");
    assert!(!out.status.success(), "recv must fail: {err}");
    assert!(!stdout.contains("\"completed\""), "never completed: {stdout}");
    assert!(!err.trim().is_empty(), "recv says why");
    // Within a second or so; generous for a loaded machine.
    assert!(took < Duration::from_secs(5), "recv took {took:?} to fail");
}
