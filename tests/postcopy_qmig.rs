//! qmig -> qmig postcopy: `qmig send --postcopy --postcopy-after 0` into
//! `qmig recv --postcopy --postcopy-touch` over a unix socket: both complete, the
//! page requests recv sent are the ones send served, and the RAM is exact.

mod common;

use common::{assert_same_ram, run_qmig_ok, utf8, TestDir};
use serde_json::Value;
use std::process::{Child, Command, Stdio};
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
    wait_for_socket(&sock);
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

/// Wait (up to 30 s) for recv's listening socket file: recv binds before it prints.
fn wait_for_socket(sock: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `recv --postcopy` (plus `--postcopy-touch` if `touch`) and `send --postcopy
/// --postcopy-after 0 --max-postcopy-bandwidth 1M` over a unix socket, returned once
/// send's control socket says `postcopy-active` (16 MiB at 1 MiB/s: it stays so for
/// ~16 s). `piped` says which of the two gets piped stdout/stderr (the one whose
/// output the test reads); the other's go to /dev/null.
fn both_in_postcopy(dir: &TestDir, seed: u64, touch: bool, piped: &str) -> (Child, Child) {
    let (src, dst, sock, ctl) = (dir.join("src.ram"), dir.join("dst.ram"), dir.join("mig.sock"), dir.join("ctl.sock"));
    std::fs::write(&src, pattern::generate(Pattern::Mixed { every: 3 }, seed, RAM_LEN)).expect("source RAM");
    let uri = format!("unix:{}", utf8(&sock));
    let io = |who: &str| if who == piped { (Stdio::piped(), Stdio::piped()) } else { (Stdio::null(), Stdio::null()) };
    let (out, err) = io("recv");
    let recv = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(["recv", "--ram", &format!("mem={}", utf8(&dst)), "--from", &uri, "--postcopy"])
        .args(touch.then_some("--postcopy-touch"))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("run qmig recv");
    wait_for_socket(&sock);
    let control = format!("unix:{}", utf8(&ctl));
    let src_arg = format!("mem={}", utf8(&src));
    let (out, err) = io("send");
    let send = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(["send", "--ram", &src_arg, "--to", &uri, "--postcopy", "--postcopy-after", "0"])
        .args(["--max-postcopy-bandwidth", "1M", "--control", &control])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("run qmig send");
    let deadline = Instant::now() + Duration::from_secs(30);
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
    (recv, send)
}

/// The destination process SIGKILLed while the source is in `postcopy-active`:
/// `qmig send` fails promptly (the lost return path and socket end it), says the
/// guest stays stopped, and does not hang.
#[test]
fn recv_sigkilled_in_postcopy_fails_send_promptly() {
    let dir = TestDir::new("postcopy-kill-dest");
    let (mut recv, send) = both_in_postcopy(&dir, 0x9c_0004, false, "send");
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
    let (recv, mut send) = both_in_postcopy(&dir, 0x9c_0005, true, "recv");
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
