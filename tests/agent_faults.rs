//! Faults, one per phase of libvirt's v3 protocol (issue 12, test 3), with `qmig vm`
//! KVM guests between two agents. Each ends with exactly one running copy of the VM
//! (checked with `list` on both agents), the other side cleaned up, and `qmig migrate`
//! printing one line naming the phase:
//!
//! - the destination refuses in Prepare3 (after starting its incoming VM);
//! - the destination VM is killed during Perform3;
//! - the client of a direct migration is SIGKILLed during Perform3: the destination kills
//!   its incoming VM (its Prepare3 connection closed), the source agent resumes at once;
//! - the source agent dies right after Perform3 (`perform3_done` recorded) and is
//!   restarted: recovery asks the destination, which gave up, and resumes the VM;
//! - the destination agent dies before Finish3 and is restarted: recovery kills its
//!   incoming VM (phase `prepare`), the source having resumed in Confirm3;
//! - the p2p shape, the source agent dying after Perform3 and, SIGKILLed, during Perform3:
//!   the destination agent sees the connection that ran Prepare3 close and kills its
//!   incoming VM at once (libvirt's auto-destroy), the client names the exact phase the
//!   source agent was lost in (it announced it), the restarted source agent resumes the VM;
//! - Finish3 failing right after the guest resumed on the destination in postcopy: the
//!   destination keeps it, Confirm3 (cancelled) leaves the source paused (no way back).
//!
//! And with QEMU 7.2 VMs (`-machine none` with a RAM pattern), the source agent dying
//! after Perform3 and restarted: once where the destination gave up (recovery resumes the
//! source), once where Finish3 had taken over (recovery quits the source): one running VM,
//! the right one, its RAM intact, the job records ended.
//!
//! The instants that cannot be hit from outside use the agents' test-only fault file
//! (`STATE/x-fault`: `fail-at POINT` / `exit-at POINT`).

#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

mod common;

use common::agent_ops::{
    counted_past, define, guest, names, one_copy, spawn_migrate, vm_pid, wait_exit, wait_streaming, SMALL_VM,
};
use common::agents::{host_uuid, migrate, run_ok, AgentProc, AGENT_T};
use common::{one_line_error, qemu_or_skip, TestDir};
use std::time::{Duration, Instant};
use testkit::pattern::{generate, Pattern};

/// Waits (bounded) until `name` is no longer listed on `a`; how long it took.
fn wait_gone(dir: &TestDir, a: &AgentProc, name: &str) -> Duration {
    let t0 = Instant::now();
    while names(dir, a).contains(&name.to_string()) {
        assert!(t0.elapsed() < AGENT_T, "{name} is still on {} after {AGENT_T:?}", a.hostname);
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

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

    // 2'. The client of a direct migration SIGKILLed mid-Perform3: the destination sees the
    //     connection that ran Prepare3 close and kills its incoming VM; the source VM's
    //     migration fails, and its agent puts it back at once (libvirt's Perform3 failure
    //     path: no Confirm3 will come), ending the job.
    let mut mig = spawn_migrate(&dir, "g", &a, &b, &["--live", "--bandwidth", "1"], "m2b.err");
    wait_streaming(&a, "g");
    mig.kill().expect("SIGKILL qmig migrate");
    let _ = mig.wait();
    let took = wait_gone(&dir, &b, "g");
    println!("direct: the destination killed its incoming VM {took:?} after the client was SIGKILLed");
    let t0 = Instant::now();
    let job = loop {
        let job = a.job_record("g").expect("source job");
        if job["finished"] == true {
            break job;
        }
        assert!(t0.elapsed() < AGENT_T, "the source job does not end: {job}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(job["phase"], "confirm3_cancelled", "{job}");
    one_copy(&dir, "g", &a, &b);
    count = counted_past(&dir, &a, "g", count);

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

    // 3'. The same in the p2p shape: the source agent drove the destination over its own
    //     connection; when it dies that connection closes, and the destination kills the
    //     incoming VM Prepare3 started on it (libvirt's auto-destroy) without waiting for
    //     anyone. The client names the phase the agent announced last; the restarted
    //     source agent finds the destination gave up and resumes the VM.
    arm(&a, "exit-at perform3_done");
    let r = migrate(&dir, "g", &a, &b, &["--live", "--p2p", "--bandwidth", "1024"]);
    one_line_error(
        "p2p source agent died",
        r.status.code(),
        &r.stderr,
        &["qmig: migrate: perform3 failed: the source agent was lost"],
    );
    let took = wait_gone(&dir, &b, "g");
    println!("p2p: the destination killed its incoming VM {took:?} after the source agent died");
    let job = b.job_record("g").expect("destination job");
    assert_eq!((job["phase"].as_str(), job["finished"].as_bool()), (Some("prepare"), Some(true)), "{job}");
    assert!(job["error"].as_str().is_some_and(|e| e.contains("connection that ran Prepare3 closed")), "{job}");
    a.restart();
    assert!(a.job_record("g").expect("source job")["error"].as_str().is_some_and(|e| e.contains("resumed")));
    one_copy(&dir, "g", &a, &b);
    count = counted_past(&dir, &a, "g", count);

    // 3''. The p2p source agent SIGKILLed mid-Perform3 (the stream throttled to 1 MiB/s):
    //      the destination kills its incoming VM, so the source VM's migration fails and
    //      it runs on; the restarted source agent finds its job in perform3 and ends it.
    let mut mig = spawn_migrate(&dir, "g", &a, &b, &["--live", "--p2p", "--bandwidth", "1"], "m5.err");
    wait_streaming(&a, "g");
    a.kill();
    let status = wait_exit(&mut mig, Duration::from_secs(120));
    let err = std::fs::read_to_string(dir.join("m5.err")).unwrap_or_default();
    one_line_error(
        "p2p source agent killed",
        status.code(),
        &err,
        &["qmig: migrate: perform3 failed: the source agent was lost"],
    );
    let took = wait_gone(&dir, &b, "g");
    println!("p2p: the destination killed its incoming VM {took:?} after the source agent was SIGKILLed");
    a.restart();
    let job = a.job_record("g").expect("source job");
    assert_eq!((job["phase"].as_str(), job["finished"].as_bool()), (Some("confirm3_cancelled"), Some(true)), "{job}");
    assert!(job["error"].as_str().is_some_and(|e| e.contains("restarted in phase perform3")), "{job}");
    one_copy(&dir, "g", &a, &b);
    counted_past(&dir, &a, "g", count);

    // 5. Finish3 fails right after the guest resumed on host-b in postcopy (its background
    //    pages at 2 MiB/s still arriving for seconds). As libvirt: the destination does not
    //    kill the guest it runs (doKill = false), and Confirm3 (cancelled) neither cancels
    //    nor resumes the source after the switch: it leaves it paused (still in postcopy)
    //    or, if QEMU's migration completed meanwhile, forces success and quits it. Either
    //    way the guest runs on host-b only, whole.
    arm(&b, "fail-at finish3_resumed");
    // 4 MiB/s: below the guest's dirty rate (16 MiB/s), so precopy never converges and it switches.
    let r = migrate(&dir, "g", &a, &b, &["--live", "--postcopy", "--bandwidth", "4", "--postcopy-bandwidth", "2"]);
    one_line_error(
        "postcopy finish failed",
        r.status.code(),
        &r.stderr,
        &["qmig: migrate: finish3 failed:", "x-fault"],
    );
    let job = b.job_record("g").expect("destination job");
    assert!(job["error"].as_str().is_some_and(|e| e.contains("postcopy failed after the guest resumed here")), "{job}");
    let job = a.job_record("g").expect("source job");
    assert_eq!(job["finished"], true, "{job}");
    match a.vm(&dir, "g") {
        Some(v) => {
            assert!(job["error"].as_str().is_some_and(|e| e.contains("left paused")), "{job}");
            assert_ne!(v["state"], "running", "the source is not resumed after the switch: {v}");
            // It still serves the destination's missing pages: it goes only once QEMU's
            // migration completed (the operator's part, here the test's).
            let sock = a.state_dir.join("vms/g/qmp.sock");
            let mut qmp = testkit::qemu::Qmp::connect(sock, Duration::from_secs(30)).expect("QMP of the source VM");
            let t0 = Instant::now();
            loop {
                let m = qmp.execute("query-migrate", None).expect("query-migrate");
                if m["status"] == "completed" {
                    break;
                }
                assert!(m["status"].as_str().is_some_and(|s| s.starts_with("postcopy")), "{m}");
                assert!(t0.elapsed() < AGENT_T, "the postcopy migration does not complete: {m}");
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(qmp);
            run_ok(&dir, &["destroy", "g", "--on", &a.addr]);
        }
        None => assert_eq!((job["phase"].as_str(), &job["error"]), (Some("confirm3"), &serde_json::Value::Null)),
    }
    counted_past(&dir, &b, "g", 0);
    one_copy(&dir, "g", &b, &a);
}

const MIB: usize = 1 << 20;

/// Issue 12's recovery with QEMU 7.2 on both ends: a running `-machine none` guest whose
/// RAM is a file with a known pattern (%STATE%/q1.ram on each host), migrated not live
/// (paused first, as virsh), its source agent dying after Perform3.
#[test]
fn qemu_source_agent_killed_after_perform_recovers() {
    if qemu_or_skip("qemu_source_agent_killed_after_perform_recovers").is_none() {
        return;
    }
    let dir = TestDir::new("agent-faults-qemu");
    let mut a = AgentProc::start(&dir, "host-a", &host_uuid(43));
    let b = AgentProc::start(&dir, "host-b", &host_uuid(44));
    let pattern = generate(Pattern::Mixed { every: 4 }, 12, 16 * MIB);
    std::fs::write(a.state_dir.join("q1.ram"), &pattern).expect("source RAM file");
    let backend = "memory-backend-file,id=mem,size=16M,mem-path=%STATE%/q1.ram,share=on";
    define(&dir, &a, "q1", "qemu", "16M", &["-machine", "none,memory-backend=mem", "-object", backend]);
    assert_eq!(a.vm(&dir, "q1").expect("listed")["state"], "running");

    // 1. The source agent dies once the migration completed (perform3_done recorded, the
    //    source QEMU in postmigrate). The client's Finish3 (cancelled) makes the destination
    //    kill its VM. Restarted, the source agent asks the destination: it did not take over
    //    (its job ended with an error), so the migration is cancelled here and the source
    //    VM, running at Begin3, resumed (qemuProcessRecoverMigrationOut, perform3_done).
    arm(&a, "exit-at perform3_done");
    let r = migrate(&dir, "q1", &a, &b, &[]);
    one_line_error(
        "source agent died after Perform3",
        r.status.code(),
        &r.stderr,
        &["qmig: migrate: perform3 failed:"],
    );
    a.restart();
    let job = a.job_record("q1").expect("source job");
    assert_eq!((job["phase"].as_str(), job["finished"].as_bool()), (Some("confirm3_cancelled"), Some(true)), "{job}");
    assert!(job["error"].as_str().is_some_and(|e| e.contains("restarted in phase perform3_done")), "{job}");
    assert_eq!(b.job_record("q1").expect("destination job")["finished"], true);
    one_copy(&dir, "q1", &a, &b);
    common::assert_same_ram(
        "source RAM after recovery",
        &std::fs::read(a.state_dir.join("q1.ram")).expect("ram"),
        &pattern,
    );

    // 2. The source agent dies after Finish3 succeeded, before Confirm3: the destination runs
    //    the guest. Restarted, the source agent asks the destination (finished, no error:
    //    it took over) and quits its own VM; the job ends without an error.
    arm(&a, "exit-at confirm3");
    let r = migrate(&dir, "q1", &a, &b, &[]);
    one_line_error(
        "source agent died before Confirm3",
        r.status.code(),
        &r.stderr,
        &["qmig: migrate: confirm3 failed:"],
    );
    assert_eq!(b.vm(&dir, "q1").expect("q1 on host-b")["state"], "running");
    a.restart();
    let job = a.job_record("q1").expect("source job");
    assert_eq!((job["phase"].as_str(), job["finished"].as_bool()), (Some("confirm3"), Some(true)), "{job}");
    assert!(job["error"].is_null(), "{job}");
    one_copy(&dir, "q1", &b, &a);
    common::assert_same_ram("destination RAM", &std::fs::read(b.state_dir.join("q1.ram")).expect("ram"), &pattern);
}
