//! `qmig send`'s control socket between qmig processes (no QEMU needed): a send
//! held by `--pause-before-switchover` answers `qmig query-migrate`, refuses
//! `qmig migrate-start-postcopy` without `--postcopy` (QEMU's message), and goes on
//! at `qmig migrate-continue` into `qmig recv` (RAM exact); the flags' refusals
//! (`--postcopy` without a socket, `--pause-before-switchover` without `--control`,
//! a control socket that is not there).

mod common;

use common::{assert_same_ram, qmig_exe, run_qmig, utf8, TestDir};
use serde_json::Value;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use testkit::pattern::{self, Pattern};

const LEN: usize = 8 << 20;
const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn a_held_send_is_queried_refuses_postcopy_and_continues_into_recv() {
    let dir = TestDir::new("send_control");
    let src = dir.join("src.ram");
    let dst = dir.join("dst.ram");
    let ram = pattern::generate(Pattern::Mixed { every: 3 }, 0x5c_0001, LEN);
    fs::write(&src, &ram).expect("write source RAM");
    let mut recv = Command::new(qmig_exe())
        .args(["recv", "--ram", &format!("mem={}", utf8(&dst)), "--from", "tcp:127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(dir.join("recv.stderr")).expect("stderr"))
        .spawn()
        .expect("recv");
    let mut lines = BufReader::new(recv.stdout.take().expect("stdout")).lines();
    let first: Value = serde_json::from_str(&lines.next().expect("line").expect("read")).expect("JSON");
    let uri = first["listening"].as_str().expect("uri").to_string();
    let control = format!("unix:{}", utf8(&dir.join("ctl.sock")));
    let mut send = Command::new(qmig_exe())
        .args(["send", "--ram", &format!("mem={}", utf8(&src)), "--to", &uri])
        .args(["--pause-before-switchover", "--control", &control])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(dir.join("send.stderr")).expect("stderr"))
        .spawn()
        .expect("send");
    let ctl = TestDir::new("send_control_ctl");
    let status = || {
        let r = run_qmig(&ctl, &["query-migrate", "--control", &control], LIMIT);
        serde_json::from_str::<Value>(r.stdout.trim()).map(|v| v["status"].as_str().unwrap_or("").to_owned())
    };
    let t0 = Instant::now();
    while status().ok().as_deref() != Some("pre-switchover") {
        assert!(
            t0.elapsed() < LIMIT,
            "never held: {}",
            fs::read_to_string(dir.join("send.stderr")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let r = run_qmig(&ctl, &["migrate-start-postcopy", "--control", &control], LIMIT);
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("Enable postcopy with migrate_set_capability"), "{}", r.stderr);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(status().ok().as_deref(), Some("pre-switchover"), "still held");
    let r = run_qmig(&ctl, &["migrate-continue", "--control", &control], LIMIT);
    assert!(r.status.success(), "{}", r.stderr);
    let t0 = Instant::now();
    let code = loop {
        if let Some(c) = send.try_wait().expect("wait send") {
            break c;
        }
        assert!(t0.elapsed() < LIMIT, "send never ended");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "{}", fs::read_to_string(dir.join("send.stderr")).unwrap_or_default());
    assert!(recv.wait().expect("recv").success());
    assert!(!dir.join("ctl.sock").exists(), "the socket is removed at the end");
    assert_same_ram("recv after a held send", &fs::read(&dst).expect("read"), &ram);
}

#[test]
fn the_flags_refuse_what_cannot_work() {
    let dir = TestDir::new("send_control_refusals");
    let src = dir.join("src.ram");
    fs::write(&src, vec![0u8; 1 << 20]).expect("write");
    let ram = format!("mem={}", utf8(&src));
    let out = format!("file:{}", utf8(&dir.join("out.mig")));
    let r = run_qmig(&dir, &["send", "--ram", &ram, "--to", &out, "--postcopy"], LIMIT);
    assert_eq!(r.status.code(), Some(1));
    assert!(r.stderr.contains("--postcopy needs a socket"), "{}", r.stderr);
    let r = run_qmig(&dir, &["send", "--ram", &ram, "--to", &out, "--pause-before-switchover"], LIMIT);
    assert_eq!(r.status.code(), Some(1));
    assert!(r.stderr.contains("--control"), "{}", r.stderr);
    let r = run_qmig(&dir, &["send", "--ram", &ram, "--to", &out, "--postcopy-after", "1"], LIMIT);
    assert_eq!(r.status.code(), Some(1), "--postcopy-after needs --postcopy");
    let gone = format!("unix:{}", utf8(&dir.join("nothing.sock")));
    let r = run_qmig(&dir, &["migrate-continue", "--control", &gone], LIMIT);
    assert_eq!(r.status.code(), Some(1));
    assert!(r.stderr.contains("nothing.sock"), "{}", r.stderr);
}
