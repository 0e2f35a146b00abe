//! `qmig demo --kvm`: a real guest on KVM migrated live between two qmig
//! processes (this VMM and `qmig kvm-dest`) with KVM's dirty log: the
//! destination's RAM equals the source's at stop, the guest resumes there and
//! its counter goes on from where it stopped with its own checksum intact; the
//! source completes only after kvm-dest's SHUT(0) on the return path.

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
    // The return path is on between qmig peers: kvm-dest's SHUT(0) completed the source.
    assert_eq!(s["return-path"], serde_json::json!({"pongs": 1, "shut": 0}), "{s}");
    assert_eq!(s["destination"]["return-path"]["shut"], 0, "{s}");
    let vcpus = g["vcpus"].as_array().expect("guest.vcpus is a list");
    assert!(!vcpus.is_empty(), "{s}");
    for (i, v) in vcpus.iter().enumerate() {
        assert_eq!(v["vcpu"], i, "{s}");
        assert_eq!(v["checksum_ok"], true, "vCPU {i}: {s}");
        let (n, m) = (v["counter_at_stop"].as_u64().unwrap_or(0), v["counter_on_destination"].as_u64().unwrap_or(0));
        assert!(n > 0 && m > n, "vCPU {i} ran on the destination: {n} -> {m}");
    }
    assert_eq!(vcpus[0]["counter_at_stop"], g["counter_at_stop"], "the top-level counter is vCPU 0's");
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
fn kvm_guest_with_several_vcpus_migrates_every_counter() {
    if !testkit::kvm_or_skip("kvm_guest_with_several_vcpus_migrates_every_counter") {
        return;
    }
    let dir = TestDir::new("kvm-demo-vcpus");
    for n in ["2", "4"] {
        let s = kvm_demo(
            &dir,
            &["--vcpus", n, "--ram-size", "512M", "--working-set", "128M", "--dirty-rate", "32", "--seed", n],
        );
        assert_eq!(s["guest"]["vcpus"].as_array().map(|v| v.len().to_string()), Some(n.to_string()), "{s}");
        assert_eq!(s["destination"]["vcpus"].as_array().map(|v| v.len().to_string()), Some(n.to_string()), "{s}");
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

#[test]
fn kvm_guest_migrates_live_with_multifd_zstd() {
    if !testkit::kvm_or_skip("kvm_guest_migrates_live_with_multifd_zstd") {
        return;
    }
    let dir = TestDir::new("kvm-demo-multifd");
    // Two zstd channels; the bandwidth cap makes it take several passes (a SYNC per pass).
    let s = kvm_demo(
        &dir,
        &[
            "--multifd",
            "2",
            "--multifd-compression",
            "zstd",
            "--slots",
            "1",
            "--ram-size",
            "64M",
            "--working-set",
            "16M",
            "--dirty-rate",
            "16",
            "--max-bandwidth",
            "32M",
        ],
    );
    assert_eq!(s["ram"]["total"], 64u64 << 20, "{s}");
    assert!(s["ram"]["normal"].as_u64().unwrap_or(0) > 0, "{s}");
}
