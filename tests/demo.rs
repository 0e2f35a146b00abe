//! `qmig demo`: a live migration of a dirtying guest, verified at stop, into a
//! qmig process and into a real QEMU 7.2.

mod common;

use common::{qemu_or_skip, TestDir};
use std::process::Command;

fn demo(dir: &TestDir, extra: &[&str]) -> serde_json::Value {
    let stats = dir.join("stats.json");
    let out = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args([
            "demo",
            "--ram-size",
            "64M",
            "--dirty-rate",
            "32",
            "--max-bandwidth",
            "67108864",
            "--downtime-limit",
            "50",
        ])
        .args(["--stats-json", &stats.to_string_lossy()])
        .args(extra)
        .output()
        .expect("run qmig demo");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {err}");
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats on stdout");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).expect("stats file")).expect("stats file JSON");
    assert_eq!(printed, file, "--stats-json writes what is printed");
    assert_eq!(file["status"], "completed");
    assert_eq!(file["verified"], true);
    assert!(file["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) > 1, "{file}");
    assert!(file["downtime"].is_u64() && file["ram"]["total"] == 64 << 20, "{file}");
    file
}

#[test]
fn demo_to_qmig_verifies() {
    let dir = TestDir::new("demo-qmig");
    let s = demo(&dir, &["--guest", "synthetic"]);
    assert_eq!(s["destination"]["kind"], "qmig");
    assert_eq!(s["destination"]["stats"]["status"], "completed");
    // The return path is on by default: recv's SHUT(0) completed the source.
    assert_eq!(s["return-path"], serde_json::json!({"pongs": 1, "shut": 0}), "{s}");
    assert_eq!(s["destination"]["stats"]["return-path"]["shut"], 0, "{s}");
    let s = demo(&dir, &["--guest", "synthetic", "--uri", "tcp:127.0.0.1:0", "--seed", "7", "--vcpus", "2"]);
    assert_eq!(s["destination"]["stats"]["ram"]["total"], 64 << 20);
    let s = demo(&dir, &["--guest", "synthetic", "--no-return-path"]);
    assert!(s["return-path"].is_null() && s["destination"]["stats"]["return-path"].is_null(), "{s}");
}

#[test]
fn demo_to_qemu_verifies() {
    if qemu_or_skip("demo_to_qemu_verifies").is_none() {
        return;
    }
    let dir = TestDir::new("demo-qemu");
    let s = demo(&dir, &["--dest", "qemu"]);
    assert_eq!(s["destination"]["kind"], "qemu");
    assert_eq!(s["destination"]["status"], "completed");
    assert_eq!(s["destination"]["runstate"], "paused", "a running source leaves a -S destination paused");
    assert_eq!(s["return-path"], serde_json::json!({"pongs": 1, "shut": 0}), "QEMU's SHUT(0): {s}");
}

/// `qmig demo --postcopy` with the synthetic guest: its writers dirty faster than
/// 8 MiB/s lets pre-copy converge, the switch comes mid-first-pass, `qmig recv`
/// faults pages in (`--postcopy-touch`) while the rest arrives, and its RAM equals
/// what the source's writers last wrote (they stop at the switch).
#[test]
fn demo_synthetic_postcopy_verifies() {
    let dir = TestDir::new("demo-postcopy");
    let stats = dir.join("stats.json");
    let out = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(["demo", "--guest", "synthetic", "--ram-size", "32M", "--dirty-rate", "32"])
        .args(["--max-bandwidth", "8388608", "--postcopy", "--postcopy-after", "0.5"])
        .args(["--stats-json", &stats.to_string_lossy()])
        .output()
        .expect("run qmig demo");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {err}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).expect("stats file")).expect("stats file JSON");
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["verified"], true, "{s}");
    let d = &s["destination"]["stats"];
    assert_eq!(d["status"], "completed", "{s}");
    assert!(d["postcopy"].is_object(), "the destination ran postcopy: {s}");
    // Switched mid-first-pass (32 MiB at 8 MiB/s is 4 s): most pages went in postcopy.
    assert!(s["ram"]["postcopy-bytes"].as_u64().unwrap_or(0) > 8 << 20, "{s}");
    assert_eq!(s["ram"]["postcopy-requests"], d["postcopy"]["requests"], "{s}");
}

/// A live, dirtying guest with multifd (several passes, a SYNC before each EOS) into
/// QEMU 7.2 and into a qmig process: verified at stop.
#[test]
fn demo_with_multifd_verifies() {
    let dir = TestDir::new("demo-multifd");
    let s = demo(&dir, &["--guest", "synthetic", "--multifd", "2", "--multifd-compression", "zlib"]);
    assert_eq!(s["destination"]["stats"]["status"], "completed", "{s}");
    if qemu_or_skip("demo_with_multifd_verifies").is_none() {
        return;
    }
    let s = demo(&dir, &["--dest", "qemu", "--multifd", "4", "--multifd-compression", "zstd"]);
    assert_eq!(s["destination"]["status"], "completed", "{s}");
}
