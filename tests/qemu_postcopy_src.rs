//! Postcopy and pause-before-switchover on the source side against QEMU 7.2
//! (issue 10):
//!
//! - `qmig send --postcopy --postcopy-after 0` into a QEMU 7.2 `-machine none`
//!   destination with `postcopy-ram`: QEMU takes the advise, the discards, the
//!   package (LISTEN, devices, RUN), the background pages and EOF, completes, and
//!   its RAM equals ours byte for byte; the stats split the bytes.
//! - A live, dirtying synthetic guest sent by the library into QEMU with postcopy
//!   started mid-way: pages dirtied after they were sent are discarded and sent
//!   again; QEMU's RAM equals the guest's at stop.
//! - QEMU 7.2 source with `pause-before-switchover` into `qmig recv`: held in
//!   `pre-switchover`, continued with QMP's `migrate-continue`; RAM exact.
//! - `qmig send --pause-before-switchover --control unix:PATH` into QEMU: held in
//!   `pre-switchover` (seen over the control socket), continued by
//!   `qmig migrate-continue --control unix:PATH`; and the same with `--postcopy`.
//! - `qmig send --postcopy` switched by `qmig migrate-start-postcopy` mid-pass.
//!
//! Without QEMU the tests print a skip line and pass, except with `CI=true`.

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_same_ram, qemu_or_skip, qmig_exe, run_qmig, utf8, TestDir};
use serde_json::Value;
use testkit::pattern::{self, Pattern};
use testkit::qemu::{QemuConfig, QemuProcess};

const RAM_LEN: u64 = 16 << 20;
const GUEST: Pattern = Pattern::Mixed { every: 4 };
const LIMIT: Duration = Duration::from_secs(30);

/// A QEMU 7.2 destination on `dir/in.sock` with `caps`, its RAM file `dir/dst.ram`.
fn qemu_destination(dir: &TestDir, caps: &[&str]) -> (QemuProcess, String) {
    let dst = dir.join("dst.ram");
    File::create(&dst).and_then(|f| f.set_len(RAM_LEN)).expect("create destination RAM");
    let mut qemu =
        QemuProcess::start(&QemuConfig::new().ram("mem", &dst, RAM_LEN).incoming(true)).expect("start destination");
    let list: Vec<(&str, bool)> = caps.iter().map(|c| (*c, true)).collect();
    qemu.qmp().and_then(|q| q.set_capabilities(&list)).expect("destination capabilities");
    let uri = format!("unix:{}", utf8(&dir.join("in.sock")));
    qemu.migrate_incoming(&uri).expect("migrate-incoming");
    (qemu, uri)
}

/// Wait for the destination QEMU to end its incoming migration; its final status.
fn destination_status(qemu: &mut QemuProcess) -> String {
    let deadline = Instant::now() + LIMIT;
    loop {
        let st = qemu.query_migrate().ok().and_then(|v| v["status"].as_str().map(str::to_owned));
        match st.as_deref() {
            Some("completed" | "failed") => return st.unwrap_or_default(),
            _ if Instant::now() > deadline => panic!("destination still {st:?} after {LIMIT:?}: {}", qemu.stderr()),
            _ => thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn src_file(dir: &TestDir, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let src = dir.join("src.ram");
    let ram = pattern::generate(GUEST, seed, RAM_LEN as usize);
    fs::write(&src, &ram).expect("write source RAM");
    (src, ram)
}

#[test]
fn send_postcopy_into_qemu_completes_with_exact_ram() {
    const NAME: &str = "pcsrc_send_postcopy";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let dir = TestDir::new(NAME);
    let (src, ram) = src_file(&dir, 0x9c_0001);
    let (mut qemu, uri) = qemu_destination(&dir, &["postcopy-ram"]);
    let ram_arg = format!("mem={}", utf8(&src));
    let stats = dir.join("stats.json");
    // A slow link, so the switch lands at once with nearly every page still to send.
    let r = run_qmig(
        &dir,
        &[
            "send",
            "--ram",
            &ram_arg,
            "--to",
            &uri,
            "--postcopy",
            "--postcopy-after",
            "0",
            "--max-bandwidth",
            "64M",
            "--stats-json",
            utf8(&stats),
        ],
        LIMIT,
    );
    assert!(r.status.success(), "{}: {}\nQEMU: {}", r.command, r.stderr, qemu.stderr());
    assert_eq!(destination_status(&mut qemu), "completed", "QEMU: {}", qemu.stderr());
    let st: Value = serde_json::from_str(fs::read_to_string(&stats).expect("stats").trim()).expect("stats JSON");
    assert_eq!(st["status"], "completed", "{st}");
    let ram_st = &st["ram"];
    let (pre, down, post, total) = (
        ram_st["precopy-bytes"].as_u64().unwrap_or(0),
        ram_st["downtime-bytes"].as_u64().unwrap_or(0),
        ram_st["postcopy-bytes"].as_u64().unwrap_or(0),
        ram_st["transferred"].as_u64().unwrap_or(0),
    );
    // Started at once: the pages went in postcopy; the switch carried the discards
    // and the package; the three add up to what was sent.
    assert!(post > RAM_LEN / 8, "postcopy-bytes {post}: {st}");
    assert!(down > 0, "downtime-bytes: {st}");
    assert_eq!(pre + down + post, total, "{st}");
    assert_eq!(ram_st["postcopy-requests"], 0, "a -machine none QEMU never faults: {st}");
    assert_eq!(st["return-path"]["shut"], 0, "{st}");
    // After postcopy the destination is paused (its source never ran: -S).
    let got = fs::read(dir.join("dst.ram")).expect("read destination RAM");
    assert_same_ram("QEMU's RAM after postcopy", &got, &ram);
    qemu.quit(Duration::from_secs(5)).expect("quit destination");
}

#[test]
fn live_guest_postcopy_into_qemu_discards_dirtied_pages() {
    use qmig::engine::memory::RamRegion;
    use qmig::engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
    use qmig::engine::source::Outgoing;
    use qmig::engine::state::MigrationStatus;
    use testkit::synthetic::SyntheticGuest;
    const NAME: &str = "pcsrc_live_postcopy";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let dir = TestDir::new(NAME);
    let (mut qemu, uri) = qemu_destination(&dir, &["postcopy-ram"]);
    let mut guest = SyntheticGuest::new(RAM_LEN as usize, |p, page| pattern::fill_from(GUEST, 7, p, page));
    let region = guest.region("mem").expect("region");
    // 16 MiB at 8 MiB/s: the first pass takes 2 s; the guest dirties 4 MiB/s meanwhile.
    guest.start(1, 4 << 20, 3);
    let params = MigrationParameters { max_bandwidth: 8 << 20, ..Default::default() };
    let caps = MigrationCapabilities { postcopy_ram: true, ..Default::default() };
    let out = Outgoing::new(SharedParameters::new(params).expect("params"), caps).expect("outgoing");
    let token = out.cancel().clone();
    let uri_p: qmig::transports::MigrationUri = uri.parse().expect("uri");
    let ch = qmig::transports::connect(&uri_p, &token).expect("connect to QEMU");
    let mut vcpus = guest.vcpus();
    let dirty = guest.dirty();
    let info = thread::scope(|s| {
        let run = s.spawn(|| out.run(ch, &mut [RamRegion::new(&region).with_dirty(dirty)], &mut vcpus));
        // Postcopy once a good part of the first pass went out (pages sent, then dirtied).
        let t0 = Instant::now();
        while out.info().get().normal + out.info().get().duplicate < 1500 && t0.elapsed() < LIMIT {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(out.state().status(), MigrationStatus::Active);
        out.start_postcopy().expect("start postcopy");
        run.join().expect("migration thread")
    })
    .unwrap_or_else(|e| panic!("{}\nQEMU: {}", qmig::engine::error::report(&e), qemu.stderr()));
    assert_eq!(info.status, MigrationStatus::Completed);
    assert!(info.postcopy_bytes > 0 && info.precopy_bytes > 0 && info.downtime_bytes > 0, "{:?}", info.to_json());
    // Some pages went twice (sent, dirtied, discarded, sent again): QEMU places a
    // postcopy page only where there is none, so its completing shows the discards.
    assert!(info.normal + info.duplicate > RAM_LEN / 4096, "{:?}", info.to_json());
    assert_eq!(destination_status(&mut qemu), "completed", "QEMU: {}", qemu.stderr());
    assert!(guest.writes() > 0);
    let mut expect = vec![0u8; RAM_LEN as usize];
    for (p, page) in expect.chunks_mut(4096).enumerate() {
        guest.read_page(p as u64, page);
    }
    guest.shutdown();
    let got = fs::read(dir.join("dst.ram")).expect("read destination RAM");
    assert_same_ram("QEMU's RAM after a live postcopy", &got, &expect);
    qemu.quit(Duration::from_secs(5)).expect("quit destination");
}

/// A `qmig recv` in the background whose stdout lines are collected.
fn spawn_recv(dir: &TestDir, dst: &std::path::Path) -> (Child, std::sync::mpsc::Receiver<String>) {
    let err = File::create(dir.join("recv.stderr")).expect("recv stderr");
    let mut child = Command::new(qmig_exe())
        .args(["recv", "--ram", &format!("mem={}", utf8(dst)), "--from", "tcp:127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .expect("run qmig recv");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Wait until `status()` says `want` (or panic after LIMIT with `what`).
fn wait_for(what: &str, want: &str, mut status: impl FnMut() -> String) {
    let t0 = Instant::now();
    loop {
        let st = status();
        if st == want {
            return;
        }
        assert!(t0.elapsed() < LIMIT, "{what}: still {st:?}, waiting for {want:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn qemu_source_pause_before_switchover_into_recv() {
    const NAME: &str = "pcsrc_qemu_pause";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let dir = TestDir::new(NAME);
    let (src, ram) = src_file(&dir, 0x9c_0003);
    let dst = dir.join("dst.ram");
    let (mut recv, lines) = spawn_recv(&dir, &dst);
    let listening: Value =
        serde_json::from_str(&lines.recv_timeout(LIMIT).expect("listening line")).expect("listening JSON");
    let uri = listening["listening"].as_str().expect("uri").to_string();
    let mut qemu = QemuProcess::start(&QemuConfig::new().ram("mem", &src, RAM_LEN)).expect("source QEMU");
    qemu.qmp().and_then(|q| q.set_capabilities(&[("pause-before-switchover", true)])).expect("caps");
    qemu.migrate(&uri).expect("migrate");
    fn status(q: &mut QemuProcess) -> String {
        q.query_migrate().ok().and_then(|v| v["status"].as_str().map(str::to_owned)).unwrap_or_default()
    }
    wait_for("QEMU source", "pre-switchover", || status(&mut qemu));
    // Held: it stays there, and recv has not finished.
    thread::sleep(Duration::from_millis(700));
    assert_eq!(status(&mut qemu), "pre-switchover");
    assert!(matches!(recv.try_wait(), Ok(None)), "recv ended while the source was held");
    qemu.execute("migrate-continue", Some(serde_json::json!({"state": "pre-switchover"}))).expect("migrate-continue");
    let info = qemu.wait_migration(LIMIT).expect("source ends");
    assert_eq!(info["status"], "completed", "{info}");
    let t0 = Instant::now();
    let code = loop {
        if let Some(s) = recv.try_wait().expect("wait recv") {
            break s;
        }
        assert!(t0.elapsed() < LIMIT, "recv did not end");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "recv: {}", fs::read_to_string(dir.join("recv.stderr")).unwrap_or_default());
    assert_same_ram("recv's RAM after pause-before-switchover", &fs::read(&dst).expect("read"), &ram);
    qemu.quit(Duration::from_secs(5)).expect("quit source");
}

/// `qmig send --pause-before-switchover --control` into QEMU (plus `extra` flags):
/// held, then continued by `qmig migrate-continue`; returns the send's stats.
fn send_paused_into_qemu(name: &str, seed: u64, caps: &[&str], extra: &[&str], held_in: &str) -> Value {
    let dir = TestDir::new(name);
    let (src, ram) = src_file(&dir, seed);
    let (mut qemu, uri) = qemu_destination(&dir, caps);
    let control = format!("unix:{}", utf8(&dir.join("control.sock")));
    let stats = dir.join("stats.json");
    let ram_arg = format!("mem={}", utf8(&src));
    let mut args = vec![
        "send",
        "--ram",
        &ram_arg,
        "--to",
        &uri,
        "--pause-before-switchover",
        "--control",
        &control,
        "--stats-json",
        utf8(&stats),
    ];
    args.extend_from_slice(extra);
    let err = File::create(dir.join("send.stderr")).expect("send stderr");
    let mut send = Command::new(qmig_exe())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("send");
    let send_err = || fs::read_to_string(dir.join("send.stderr")).unwrap_or_default();
    let ctl_dir = TestDir::new(&format!("{name}-ctl"));
    let query = || {
        let r = run_qmig(&ctl_dir, &["query-migrate", "--control", &control], LIMIT);
        serde_json::from_str::<Value>(r.stdout.trim())
            .map(|v| v["status"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    wait_for(name, held_in, query);
    thread::sleep(Duration::from_millis(700));
    assert_eq!(query(), held_in, "{name}: stays held");
    assert!(matches!(send.try_wait(), Ok(None)), "{name}: send ended while held: {}", send_err());
    let r = run_qmig(&ctl_dir, &["migrate-continue", "--control", &control], LIMIT);
    assert!(r.status.success(), "{name}: migrate-continue: {}", r.stderr);
    // A second continue is refused: the migration is no longer held.
    let again = run_qmig(&ctl_dir, &["migrate-continue", "--control", &control], LIMIT);
    assert!(!again.status.success(), "{name}: a second migrate-continue succeeded");
    let t0 = Instant::now();
    let code = loop {
        if let Some(s) = send.try_wait().expect("wait send") {
            break s;
        }
        assert!(t0.elapsed() < LIMIT, "{name}: send did not end: {}", send_err());
        thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "{name}: send: {}\nQEMU: {}", send_err(), qemu.stderr());
    assert_eq!(destination_status(&mut qemu), "completed", "{name}: QEMU: {}", qemu.stderr());
    assert!(!dir.join("control.sock").exists(), "{name}: the control socket is removed");
    assert_same_ram(name, &fs::read(dir.join("dst.ram")).expect("read"), &ram);
    qemu.quit(Duration::from_secs(5)).expect("quit destination");
    serde_json::from_str(fs::read_to_string(&stats).expect("stats").trim()).expect("stats JSON")
}

#[test]
fn send_pause_before_switchover_into_qemu_continued_by_a_second_command() {
    const NAME: &str = "pcsrc_send_pause";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let st = send_paused_into_qemu(NAME, 0x9c_0004, &[], &[], "pre-switchover");
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["ram"]["postcopy-bytes"], 0, "{st}");
}

#[test]
fn send_postcopy_with_pause_before_switchover_into_qemu() {
    const NAME: &str = "pcsrc_send_pause_postcopy";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let extra = ["--postcopy", "--postcopy-after", "0", "--max-bandwidth", "32M"];
    let st = send_paused_into_qemu(NAME, 0x9c_0005, &["postcopy-ram"], &extra, "pre-switchover");
    assert_eq!(st["status"], "completed", "{st}");
    assert!(st["ram"]["postcopy-bytes"].as_u64().unwrap_or(0) > 0, "{st}");
}

#[test]
fn send_postcopy_started_by_a_second_command_into_qemu() {
    const NAME: &str = "pcsrc_send_start_cmd";
    if qemu_or_skip(NAME).is_none() {
        return;
    }
    let dir = TestDir::new(NAME);
    let (src, ram) = src_file(&dir, 0x9c_0006);
    let (mut qemu, uri) = qemu_destination(&dir, &["postcopy-ram"]);
    let control = format!("unix:{}", utf8(&dir.join("control.sock")));
    let stats = dir.join("stats.json");
    // 16 MiB at 2 MiB/s: pre-copy alone would take 8 s.
    let err = File::create(dir.join("send.stderr")).expect("send stderr");
    let mut send = Command::new(qmig_exe())
        .args(["send", "--ram", &format!("mem={}", utf8(&src)), "--to", &uri, "--postcopy"])
        .args(["--max-bandwidth", "2M", "--control", &control, "--stats-json", utf8(&stats)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("send");
    let ctl = TestDir::new(&format!("{NAME}-ctl"));
    let query = || {
        let r = run_qmig(&ctl, &["query-migrate", "--control", &control], LIMIT);
        serde_json::from_str::<Value>(r.stdout.trim()).unwrap_or(Value::Null)
    };
    wait_for(NAME, "active", || query()["status"].as_str().unwrap_or("").to_owned());
    let t0 = Instant::now();
    let r = run_qmig(&ctl, &["migrate-start-postcopy", "--control", &control], LIMIT);
    assert!(r.status.success(), "{}", r.stderr);
    let code = loop {
        if let Some(c) = send.try_wait().expect("wait send") {
            break c;
        }
        assert!(t0.elapsed() < LIMIT, "send never ended");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "{}", fs::read_to_string(dir.join("send.stderr")).unwrap_or_default());
    assert_eq!(destination_status(&mut qemu), "completed", "QEMU: {}", qemu.stderr());
    let st: Value = serde_json::from_str(fs::read_to_string(&stats).expect("stats").trim()).expect("stats JSON");
    let bytes = |k: &str| st["ram"][k].as_u64().unwrap_or(0);
    assert!(bytes("precopy-bytes") > 0 && bytes("postcopy-bytes") > bytes("precopy-bytes"), "{st}");
    assert_same_ram(NAME, &fs::read(dir.join("dst.ram")).expect("read"), &ram);
    qemu.quit(Duration::from_secs(5)).expect("quit destination");
}
