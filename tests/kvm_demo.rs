//! `qmig demo --kvm`: a real guest on KVM migrated live between two qmig
//! processes (this VMM and `qmig kvm-dest`) with KVM's dirty log: the
//! destination's RAM equals the source's at stop, the guest resumes there and
//! its counter goes on from where it stopped with its own checksum intact.

#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

mod common;

use common::TestDir;
use std::process::Command;

fn kvm_demo(dir: &TestDir, args: &[&str]) -> serde_json::Value {
    let stats = dir.join("kvm-stats.json");
    let out = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(["demo", "--kvm", "--downtime-limit", "300"])
        .args(["--stats-json", &stats.to_string_lossy()])
        .args(args)
        .output()
        .expect("run qmig demo --kvm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo --kvm {args:?} failed: {err}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).expect("stats file")).expect("stats JSON");
    let g = &s["guest"];
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(g["kind"], "kvm");
    assert_eq!(g["checksum_ok"], true, "{s}");
    assert_eq!(g["ram_equal_at_stop"], true, "{s}");
    let (n, m) = (g["counter_at_stop"].as_u64().unwrap_or(0), g["counter_on_destination"].as_u64().unwrap_or(0));
    assert!(n > 0 && m > n, "the guest ran on the destination: {n} -> {m}");
    assert!(g["ran_on_destination_ms"].as_u64().unwrap_or(0) >= 1000, "{s}");
    assert!(s["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) > 1, "{s}");
    s
}

#[test]
fn kvm_guest_migrates_live_between_processes() {
    if !testkit::kvm_or_skip("kvm_guest_migrates_live_between_processes") {
        return;
    }
    let dir = TestDir::new("kvm-demo");
    // Two slots (the default), several seeds and dirty rates, a bandwidth cap so it takes passes.
    for (seed, rate) in [("1", "16"), ("2", "64"), ("3", "256")] {
        let s = kvm_demo(&dir, &["--ram-size", "512M", "--working-set", "128M", "--seed", seed, "--dirty-rate", rate]);
        assert_eq!(s["guest"]["slots"], 2);
        assert!(s["guest"]["writes_at_stop"].as_u64().unwrap_or(0) > 0, "{s}");
        assert_eq!(s["ram"]["total"], 512u64 << 20);
    }
}

#[test]
fn kvm_guest_one_slot_over_tcp() {
    if !testkit::kvm_or_skip("kvm_guest_one_slot_over_tcp") {
        return;
    }
    let dir = TestDir::new("kvm-demo-tcp");
    let s = kvm_demo(
        &dir,
        &[
            "--slots",
            "1",
            "--ram-size",
            "256M",
            "--working-set",
            "64M",
            "--uri",
            "tcp:127.0.0.1:0",
            "--dirty-rate",
            "32",
        ],
    );
    assert_eq!(s["guest"]["slots"], 1);
}

#[test]
fn kvm_guest_refuses_a_qemu_destination() {
    let out = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(["demo", "--kvm", "--dest", "qemu"])
        .output()
        .expect("run qmig demo");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dest qmig"), "{err}");
}
