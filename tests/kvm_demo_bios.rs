//! `qmig demo --kvm --bios FILE`: the fixtures' busy-bios.bin (the firmware QEMU
//! runs in the XBZRLE bench) booted by minivmm from KVM's reset state, migrated
//! live with XBZRLE to `qmig kvm-dest`: RAM equal at arrival, the guest writing on
//! at the destination, XBZRLE pages sent.

#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

mod common;

use common::TestDir;
use std::process::Command;

const BIOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/busy-bios.bin");

#[test]
fn firmware_guest_migrates_live_with_xbzrle() {
    if !testkit::kvm_or_skip("firmware_guest_migrates_live_with_xbzrle") {
        return;
    }
    let dir = TestDir::new("kvm-demo-bios");
    let stats = dir.join("stats.json");
    let out = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(["demo", "--kvm", "--bios", BIOS, "--ram-size", "16M", "--xbzrle"])
        // Slow enough for several passes over the loop's 128 pages.
        .args(["--max-bandwidth", "4M", "--downtime-limit", "1", "--timeout", "60", "--timeout-action", "switchover"])
        .args(["--stats-json", &stats.to_string_lossy()])
        .output()
        .expect("run qmig demo --kvm --bios");
    assert!(out.status.success(), "demo --bios failed: {}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).expect("stats file")).expect("stats JSON");
    let g = &s["guest"];
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(g["ram_equal_at_stop"], true, "{s}");
    assert_eq!(g["ram_digest_at_stop"], g["ram_digest_on_arrival"], "{s}");
    // The loop's counter is what arrived, and it moved on at the destination.
    assert_eq!(g["probe_word_on_arrival"], g["probe_word_at_stop"], "{s}");
    assert_eq!(g["ran_on_destination"], true, "{s}");
    assert_ne!(g["probe_word_after_run"], g["probe_word_on_arrival"], "{s}");
    assert!(g["ran_on_destination_ms"].as_u64().unwrap_or(0) >= 1000, "{s}");
    assert!(s["xbzrle-cache"]["pages"].as_u64().unwrap_or(0) > 0, "{s}");
    assert!(s["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) > 1, "{s}");
    // The demo program's options mean nothing to a firmware guest: refused.
    for extra in [["--working-set", "1M"], ["--dirty-rate", "8"], ["--vcpus", "2"], ["--slots", "2"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_qmig"))
            .args(["demo", "--kvm", "--bios", BIOS, "--ram-size", "16M"])
            .args(extra)
            .output()
            .expect("run qmig demo");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("--bios") && err.contains(extra[0]), "{extra:?}: {err}");
    }
}
