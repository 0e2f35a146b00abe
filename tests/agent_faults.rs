//! Faults, one per phase of libvirt's v3 protocol (issue 12, test 3), with `qmig vm`
//! KVM guests between two agents. Each ends with exactly one running copy of the VM
//! (checked with `list` on both agents), the other side cleaned up, and `qmig migrate`
//! printing one line naming the phase:
//!
//! - the destination refuses in Prepare3 (after starting its incoming VM);
//! - the destination VM is killed during Perform3;
//! - the source agent dies right after Perform3 (`perform3_done` recorded) and is
//!   restarted: recovery asks the destination, which gave up, and resumes the VM;
//! - the same in the p2p shape: the restarted source agent finds the destination still
//!   waiting, cancels it (Finish3, cancelled: it kills its VM) and resumes the VM;
//! - the destination agent dies before Finish3 and is restarted: recovery kills its
//!   incoming VM (phase `prepare`), the source having resumed in Confirm3.
//!
//! The instants that cannot be hit from outside use the agents' test-only fault file
//! (`STATE/x-fault`: `fail-at POINT` / `exit-at POINT`).

#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

mod common;

use common::agent_ops::{
    counted_past, define, guest, one_copy, spawn_migrate, vm_pid, wait_exit, wait_streaming, SMALL_VM,
};
use common::agents::{host_uuid, migrate, AgentProc};
use common::{one_line_error, TestDir};
use std::time::Duration;

/// Arms agent `a`'s fault file.
fn arm(a: &AgentProc, fault: &str) {
    std::fs::write(a.state_dir.join("x-fault"), fault).expect("fault file");
}

#[test]
fn one_fault_per_phase_leaves_one_running_copy() {
    if !testkit::kvm_or_skip("one_fault_per_phase_leaves_one_running_copy") {
        return;
    }
    let dir = TestDir::new("agent-faults");
    let mut a = AgentProc::start(&dir, "host-a", &host_uuid(41));
    let mut b = AgentProc::start(&dir, "host-b", &host_uuid(42));
    define(&dir, &a, "g", "vm", "64M", SMALL_VM);
    let mut count = counted_past(&dir, &a, "g", 0);

    // 1. The destination refuses in Prepare3, its incoming VM already started: killed, forgotten.
    arm(&b, "fail-at prepare");
    let r = migrate(&dir, "g", &a, &b, &["--live", "--bandwidth", "1024"]);
    one_line_error("prepare refusal", r.status.code(), &r.stderr, &["qmig: migrate: prepare3 failed:", "x-fault"]);
    one_copy(&dir, "g", &a, &b);
    count = counted_past(&dir, &a, "g", count);
    assert_eq!(b.job_record("g").expect("destination job")["finished"], true);

    // 2. The destination VM is killed during Perform3: Finish3 cleans up, Confirm3 resumes the source.
    let mut mig = spawn_migrate(&dir, "g", &a, &b, &["--live", "--bandwidth", "1"], "m2.err");
    wait_streaming(&a, "g");
    let pid = nix::unistd::Pid::from_raw(vm_pid(&b, "g"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the destination VM");
    let status = wait_exit(&mut mig, Duration::from_secs(120));
    let err = std::fs::read_to_string(dir.join("m2.err")).unwrap_or_default();
    one_line_error("destination VM killed", status.code(), &err, &["qmig: migrate: perform3 failed:"]);
    one_copy(&dir, "g", &a, &b);
    count = counted_past(&dir, &a, "g", count);
    assert_eq!(a.job_record("g").expect("source job")["phase"], "confirm3_cancelled");

    // (A VM keeps the max-bandwidth of its last migration: the next ones give their own.)
    // 3. The source agent dies right after Perform3 completed: the client cancels Finish3
    //    (the destination kills its VM); the restarted source agent finds its job in
    //    perform3_done, asks the destination (it did not take over) and resumes the VM.
    arm(&a, "exit-at perform3_done");
    let r = migrate(&dir, "g", &a, &b, &["--live", "--bandwidth", "1024"]);
    one_line_error("source agent died", r.status.code(), &r.stderr, &["qmig: migrate: perform3 failed:"]);
    a.restart();
    let job = a.job_record("g").expect("source job");
    assert_eq!((job["phase"].as_str(), job["finished"].as_bool()), (Some("confirm3_cancelled"), Some(true)), "{job}");
    assert!(job["error"].as_str().is_some_and(|e| e.contains("restarted in phase perform3_done")), "{job}");
    one_copy(&dir, "g", &a, &b);
    let (c, ok) = guest(&dir, &a, "g");
    assert!(ok && c >= count, "the guest goes on after recovery: {count} -> {c}");
    count = counted_past(&dir, &a, "g", c);

    // 4. The destination agent dies before Finish3: the client's Finish3 fails, Confirm3
    //    (cancelled) resumes the source; the restarted destination agent finds its job
    //    in prepare and kills the incoming VM.
    arm(&b, "exit-at finish3");
    let r = migrate(&dir, "g", &a, &b, &["--live", "--bandwidth", "1024"]);
    one_line_error("destination agent died", r.status.code(), &r.stderr, &["qmig: migrate: finish3 failed:"]);
    assert!(b.state_dir.join("vms/g").exists(), "the incoming VM outlived its agent");
    b.restart();
    let job = b.job_record("g").expect("destination job");
    assert_eq!((job["phase"].as_str(), job["finished"].as_bool()), (Some("prepare"), Some(true)), "{job}");
    assert!(job["error"].as_str().is_some_and(|e| e.contains("incoming VM was killed")), "{job}");
    one_copy(&dir, "g", &a, &b);
    count = counted_past(&dir, &a, "g", count);

    // 3'. The same in the p2p shape: the source agent drove the destination, so nobody
    //     tells the destination to give up; the restarted source agent finds it still
    //     waiting in prepare, sends it Finish3 (cancelled), which kills its VM, and resumes.
    arm(&a, "exit-at perform3_done");
    let r = migrate(&dir, "g", &a, &b, &["--live", "--p2p", "--bandwidth", "1024"]);
    // The client names the last phase it saw the source agent in (if it polled one in time).
    one_line_error(
        "p2p source agent died",
        r.status.code(),
        &r.stderr,
        &["qmig: migrate:", "the source agent was lost"],
    );
    assert_eq!(b.job_record("g").expect("destination job")["finished"], false, "the destination still waits");
    a.restart();
    let job = b.job_record("g").expect("destination job");
    assert_eq!((job["phase"].as_str(), job["finished"].as_bool()), (Some("finish3"), Some(true)), "{job}");
    one_copy(&dir, "g", &a, &b);
    counted_past(&dir, &a, "g", count);
}
