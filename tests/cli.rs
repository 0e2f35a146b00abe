//! The CLI contract: `qmig analyze` JSON shape, `--extract-ram`, `qmig save`, and
//! errors as exit status 1 with one line on stderr naming the offset and cause.

mod common;

use common::TestDir;
use std::path::Path;
use std::process::{Command, Output};

fn qmig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qmig")).args(args).env("RUST_BACKTRACE", "1").output().expect("run qmig")
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Exit status 1, nothing on stdout, exactly one line on stderr, no panic or backtrace.
fn assert_one_line_error(out: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(out.stdout.is_empty(), "stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    for n in needles {
        assert!(err.contains(n), "'{n}' missing from: {err}");
    }
    err
}

#[test]
fn analyze_prints_the_documented_json() {
    let out = qmig(&["analyze", &fixture("q35-kvm-64m.mig")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["header"]["version"], 3);
    assert_eq!(doc["configuration"]["name"], "pc-q35-7.2");
    let sections = doc["sections"].as_array().expect("sections");
    assert_eq!(sections.len(), 33);
    assert_eq!(sections[0]["kind"], "start");
    assert_eq!(sections[0]["name"], "ram");
    assert_eq!(sections[3]["kind"], "full");
    assert_eq!(sections[3]["name"], "timer");
    assert!(sections.iter().all(|s| s["id"].is_u64() && s["instance_id"].is_u64() && s["version"].is_u64()));
    let blocks = doc["ram"]["blocks"].as_array().expect("blocks");
    assert_eq!(blocks[0]["name"], "pc.ram");
    assert_eq!(blocks[0]["length"], 64 << 20);
    let total: u64 = blocks.iter().map(|b| b["pages"]["zero"].as_u64().unwrap_or(0)).sum();
    assert_eq!(total, 16463);
    assert_eq!(doc["devices"]["globalstate"]["runstate"], "prelaunch");
    assert!(doc["devices"]["dma (1)"].is_object(), "second instance keyed 'NAME (1)'");
    let cpu = doc["devices"]["cpu"].as_object().expect("cpu decoded from the vmdesc");
    assert!(cpu.len() > 50, "cpu has {} entries", cpu.len());
    assert_eq!(doc["vmdesc"]["devices"].as_array().map(Vec::len), Some(30));
}

#[test]
fn save_then_analyze_extracts_the_same_ram() {
    let dir = TestDir::new("cli-save");
    let ram = dir.path().join("ram.bin");
    let mut bytes = testkit::pattern::generate(testkit::pattern::Pattern::Mixed { every: 3 }, 9, 4 << 20);
    bytes[5] = 1; // a page 0 with one byte set
    std::fs::write(&ram, &bytes).expect("write ram");
    let stream = dir.path().join("s.mig");
    let out = qmig(&["save", "--ram", &format!("mem={}", ram.display()), "--out", &stream.to_string_lossy()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    assert_eq!(stats["status"], "completed");
    assert_eq!(stats["ram"]["total"], 4 << 20);
    let img = dir.path().join("img.bin");
    let out = qmig(&["analyze", &stream.to_string_lossy(), "--extract-ram", &format!("mem={}", img.display())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["ram"]["blocks"][0]["pages"]["normal"], stats["ram"]["normal"]);
    assert_eq!(doc["ram"]["blocks"][0]["pages"]["zero"], stats["ram"]["duplicate"]);
    assert!(std::fs::read(&img).expect("image") == bytes, "extracted RAM differs");
}

#[test]
fn truncated_stream_is_one_line_with_offset() {
    let dir = TestDir::new("cli-trunc");
    let full = std::fs::read(fixture("precopy-none-16m-mixed32-s1.mig")).expect("fixture");
    let cut = dir.path().join("cut.mig");
    std::fs::write(&cut, &full[..100_000]).expect("write");
    let out = qmig(&["analyze", &cut.to_string_lossy()]);
    assert_one_line_error(&out, &["at byte 100000", "section 'ram'", "stream ends inside a page"]);
}

/// A hand-written device for the engine: its bytes as they are.
struct Blob(Vec<u8>);

impl engine::vm::RawDevice for Blob {
    fn idstr(&self) -> &str {
        "0000:00:1f.0/acpi-raw"
    }
    fn version(&self) -> u32 {
        3
    }
    fn save_state(&mut self, out: &mut dyn std::io::Write) -> Result<(), engine::vm::VmmError> {
        out.write_all(&self.0).map_err(engine::vm::VmmError::from)
    }
}

#[test]
fn analyze_decodes_a_hand_written_device_from_its_vmdesc_size() {
    use engine::params::{MigrationCapabilities, SharedParameters};
    use std::io::Read;
    use transports::{connect, CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};
    // The engine migrates an idle guest with the device; the stream is kept.
    let dir = TestDir::new("cli-raw");
    let guest = testkit::synthetic::SyntheticGuest::new(1 << 20, |p, page| page.fill(p as u8));
    let region = guest.region("mem").expect("region");
    let uri = MigrationUri::Unix(dir.path().join("s.sock"));
    let cancel = CancelToken::new().expect("token");
    let listener = Listener::bind(&uri, &cancel).expect("listen");
    let dst = std::thread::spawn(move || {
        let mut v = Vec::new();
        let ch = listener.accept().expect("accept");
        MigrationReader::new(ch, RateLimit::new(0)).read_to_end(&mut v).expect("read");
        v
    });
    let body: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
    let mut dev = Blob(body.clone());
    let mut vm = engine::vm::VmParts { raw_devices: vec![&mut dev], ..Default::default() };
    let out =
        engine::source::Outgoing::new(SharedParameters::default(), MigrationCapabilities::default()).expect("outgoing");
    let ch = connect(&uri, &cancel).expect("connect");
    out.run_vm(
        ch,
        &mut [engine::memory::RamRegion::new(&region).with_dirty(guest.dirty())],
        &mut guest.vcpus(),
        &mut vm,
    )
    .expect("migrate");
    let stream = dst.join().expect("destination");
    let file = dir.path().join("raw.mig");
    std::fs::write(&file, &stream).expect("write");

    let out = qmig(&["analyze", &file.to_string_lossy()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    // As analyze-migration.py: the body is the vmdesc's `data` buffer of the recorded size.
    assert_eq!(
        doc["devices"]["0000:00:1f.0/acpi-raw"],
        serde_json::json!({"data": savevm_format::vmstate::hex(&body)})
    );
    let names: Vec<&str> =
        doc["sections"].as_array().expect("sections").iter().filter_map(|s| s["name"].as_str()).collect();
    assert!(names.contains(&"0000:00:1f.0/acpi-raw"), "{names:?}");
    assert_eq!(doc["eof"], true);

    // Without the vmdesc nothing says how long the body is: a typed one-line error.
    let (_, eof) = savevm_format::find_trailing_vmdesc(&stream).expect("vmdesc");
    let cut = dir.path().join("novmdesc.mig");
    std::fs::write(&cut, &stream[..eof]).expect("write");
    assert_one_line_error(
        &qmig(&["analyze", &cut.to_string_lossy()]),
        &["section '0000:00:1f.0/acpi-raw'", "no description for device '0000:00:1f.0/acpi-raw'"],
    );
}

#[test]
fn device_without_description_names_its_section() {
    // A q35 stream cut right after EOF: no vmdesc to decode devices from.
    let dir = TestDir::new("cli-nodesc");
    let full = std::fs::read(fixture("q35-kvm-64m.mig")).expect("fixture");
    let cut = dir.path().join("novmdesc.mig");
    std::fs::write(&cut, &full[..390_324]).expect("write");
    let out = qmig(&["analyze", &cut.to_string_lossy()]);
    assert_one_line_error(&out, &["section 'cpu_common'", "no description for device 'cpu_common'"]);
}

#[test]
fn bad_arguments_and_files_are_one_line() {
    let dir = TestDir::new("cli-bad");
    assert_one_line_error(&qmig(&["analyze", "/nonexistent/stream.mig"]), &["/nonexistent/stream.mig", "No such file"]);
    let img = dir.path().join("x.bin");
    assert_one_line_error(
        &qmig(&[
            "analyze",
            &fixture("precopy-none-16m-mixed32-s1.mig"),
            "--extract-ram",
            &format!("nope={}", img.display()),
        ]),
        &["RAM block 'nope' is not in the stream", "mem"],
    );
    assert_one_line_error(
        &qmig(&["analyze", &fixture("precopy-none-16m-mixed32-s1.mig"), "--extract-ram", "noequals"]),
        &["NAME=PATH"],
    );
    let odd = dir.path().join("odd.bin");
    std::fs::write(&odd, [1u8; 1000]).expect("write");
    assert_one_line_error(
        &qmig(&[
            "save",
            "--ram",
            &format!("mem={}", odd.display()),
            "--out",
            &dir.path().join("o.mig").to_string_lossy(),
        ]),
        &["not a positive multiple of 4096"],
    );
    assert_one_line_error(&qmig(&["send", "--ram", "mem=x"]), &["--to <URI>", "not provided"]);
    assert_one_line_error(&qmig(&["frobnicate"]), &["unrecognized subcommand 'frobnicate'"]);
    let garbage = dir.path().join("garbage.mig");
    std::fs::write(&garbage, b"this is not a migration stream").expect("write");
    assert_one_line_error(&qmig(&["analyze", &garbage.to_string_lossy()]), &["at byte 0", "not a migration stream"]);
    assert!(!Path::new(&img).exists(), "no image is created for a block the stream lacks");
}

#[test]
fn send_and_recv_write_stats_json() {
    let dir = TestDir::new("cli-stats");
    let ram = dir.path().join("ram.bin");
    std::fs::write(&ram, testkit::pattern::generate(testkit::pattern::Pattern::Mixed { every: 2 }, 4, 2 << 20))
        .expect("ram");
    let stream = dir.path().join("s.mig");
    let stats = dir.path().join("send.json");
    let out = qmig(&[
        "send",
        "--ram",
        &format!("mem={}", ram.display()),
        "--to",
        &format!("file:{}", stream.display()),
        "--max-bandwidth",
        "0",
        "--stats-json",
        &stats.to_string_lossy(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout JSON");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).expect("stats")).expect("JSON");
    assert_eq!(printed, written);
    assert_eq!(written["status"], "completed");
    assert!(written["downtime"].is_u64() && written["ram"]["dirty-sync-count"].as_u64() >= Some(2), "{written}");
    assert_eq!(written["ram"]["normal"].as_u64().unwrap_or(0) + written["ram"]["duplicate"].as_u64().unwrap_or(0), 512);
    let dst = dir.path().join("dst.bin");
    let rstats = dir.path().join("recv.json");
    let out = qmig(&[
        "recv",
        "--ram",
        &format!("mem={}", dst.display()),
        "--from",
        &format!("file:{}", stream.display()),
        "--stats-json",
        &rstats.to_string_lossy(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&rstats).expect("stats")).expect("JSON");
    assert_eq!(r["ram"]["normal"], written["ram"]["normal"]);
    assert!(std::fs::read(&dst).expect("dst") == std::fs::read(&ram).expect("src"));
}

/// One JSON object on stdout (a pipe here, not a terminal: no progress bar, no human line).
fn one_json_line(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().count(), 1, "stdout not a terminal: the JSON line only, got {text:?}");
    serde_json::from_str(&text).expect("stdout is one JSON line")
}

#[test]
fn demo_defaults_fit_a_256m_guest_and_max_bandwidth_takes_suffixes() {
    // The KVM guest where /dev/kvm works (else the synthetic one): the default
    // working set shrinks to fit, and the output says so.
    let out = qmig(&["demo", "--ram-size", "256M", "--max-bandwidth", "64M"]);
    let s = one_json_line(&out);
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["ram"]["total"], 256u64 << 20);
    let err = String::from_utf8_lossy(&out.stderr);
    if s["guest"]["kind"] == "kvm" {
        assert_eq!(s["guest"]["working-set"], 64u64 << 20, "{s}");
        assert!(err.contains("working set 64 MiB"), "the shrink is said: {err}");
    }
    // 64M = 64 MiB/s: the migration's bandwidth never went above it by much.
    let secs = s["total-time"].as_u64().unwrap_or(0) as f64 / 1000.0;
    let bytes = s["ram"]["precopy-bytes"].as_u64().unwrap_or(0) as f64;
    assert!(bytes / secs < 80.0 * (1 << 20) as f64, "{} B/s over {secs} s", bytes / secs);
    let bad = qmig(&["demo", "--guest", "synthetic", "--max-bandwidth", "12Q"]);
    assert_one_line_error(&bad, &["--max-bandwidth", "12Q"]);
}

#[test]
fn send_and_recv_print_only_their_json_line_when_stdout_is_not_a_terminal() {
    let dir = TestDir::new("cli-pipe");
    let ram = dir.path().join("mem.ram");
    std::fs::write(&ram, testkit::pattern::generate(testkit::pattern::Pattern::Mixed { every: 2 }, 5, 4 << 20))
        .expect("ram");
    let stream = dir.path().join("s.mig");
    let out =
        qmig(&["send", "--ram", &format!("mem={}", ram.display()), "--to", &format!("file:{}", stream.display())]);
    let s = one_json_line(&out);
    assert_eq!(s["status"], "completed");
    assert!(out.stderr.is_empty(), "no progress on a pipe: {}", String::from_utf8_lossy(&out.stderr));
    // send has no knobs for convergence: its guest never runs.
    let refused = qmig(&["send", "--ram", "mem=x", "--to", "file:y", "--downtime-limit", "100"]);
    assert_one_line_error(&refused, &["--downtime-limit"]);
    let dst = dir.path().join("dst.ram");
    let out =
        qmig(&["recv", "--ram", &format!("mem={}", dst.display()), "--from", &format!("file:{}", stream.display())]);
    let r = one_json_line(&out);
    assert_eq!(r["status"], "completed");
    assert_eq!(r["ram"]["total"], 4u64 << 20);
    // Destination fields only: nothing a destination cannot know, as zeros.
    for absent in ["setup-time", "downtime", "expected-downtime"] {
        assert!(r.get(absent).is_none(), "{absent} in {r}");
    }
    for absent in ["dirty-sync-count", "dirty-pages-rate", "remaining", "pages-per-second", "precopy-bytes"] {
        assert!(r["ram"].get(absent).is_none(), "ram.{absent} in {r}");
    }
    assert!(std::fs::read(&dst).expect("dst") == std::fs::read(&ram).expect("src"));
}

#[test]
fn timeout_switches_over_or_cancels_a_migration_that_does_not_converge() {
    // 64 MiB dirtied at 256 MiB/s over 16 MiB/s: never converges on its own.
    let args = ["demo", "--guest", "synthetic", "--ram-size", "64M", "--dirty-rate", "256", "--max-bandwidth", "16M"];
    let t0 = std::time::Instant::now();
    let out = qmig(&[&args[..], &["--timeout", "2", "--timeout-action", "switchover"]].concat());
    let s = one_json_line(&out);
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["timeout"], serde_json::json!({"secs": 2.0, "action": "switchover", "fired": true}), "{s}");
    assert!(s["total-time"].as_u64().unwrap_or(0) >= 2000, "{s}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(30));
    let out = qmig(&[&args[..], &["--timeout", "2"]].concat());
    assert_one_line_error(&out, &["--timeout 2", "cancel", "migration cancelled"]);
    // A migration that ends first: the deadline is reported, not fired.
    let out = qmig(&["demo", "--guest", "synthetic", "--ram-size", "32M", "--dirty-rate", "0", "--timeout", "60"]);
    let s = one_json_line(&out);
    assert_eq!(s["timeout"]["fired"], false, "{s}");
}

#[test]
fn log_writes_the_engines_tracing_to_stderr_only() {
    let dir = TestDir::new("cli-log");
    let ram = dir.path().join("mem.ram");
    std::fs::write(&ram, vec![3u8; 1 << 20]).expect("ram");
    let stream = dir.path().join("s.mig");
    let out = qmig(&[
        "send",
        "--log",
        "debug",
        "--ram",
        &format!("mem={}", ram.display()),
        "--to",
        &format!("file:{}", stream.display()),
    ]);
    one_json_line(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("switchover") && err.contains("migration completed"), "{err}");
    assert!(err.contains("setup done"), "debug events too: {err}");
}
