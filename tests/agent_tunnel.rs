//! Tunnelled migration through the agents (`qmig migrate --p2p --tunnelled`): the
//! source VM migrates to a unix socket of its agent, which relays the stream over a
//! data connection to the destination agent, which relays it into the destination
//! VM's incoming unix socket.
//!
//! - A running `qmig vm` KVM guest migrates tunnelled (its counter goes on, its
//!   checksum intact), and a paused `-machine none` QEMU 7.2 guest with a known RAM
//!   pattern (destination RAM byte-exact); `--tunnelled` without `--p2p`, and with
//!   `--postcopy`, is refused before anything starts.
//! - `migrate-cancel` ends a tunnelled migration blocked on a full pipe (the
//!   destination VM stopped with SIGSTOP reads nothing, so every buffer on the way
//!   fills) within a second: the source VM runs on, the destination VM is gone, and
//!   `qmig migrate` prints one line naming the phase.

#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

mod common;

use common::agent_ops::{
    counted_past, define, guest, names, one_copy, spawn_migrate, vm_pid, wait_exit, BUSY_VM, SMALL_VM,
};
use common::agents::{host_uuid, migrate, migrate_ok, run_ok, AgentProc};
use common::{one_line_error, qemu_or_skip, TestDir};
use serde_json::json;
use std::time::{Duration, Instant};
use testkit::pattern::{generate, Pattern};

const MIB: usize = 1 << 20;

#[test]
fn tunnelled_qmig_vm_and_qemu() {
    if !testkit::kvm_or_skip("tunnelled_qmig_vm_and_qemu") || qemu_or_skip("tunnelled_qmig_vm_and_qemu").is_none() {
        return;
    }
    let dir = TestDir::new("agent-tunnel");
    let a = AgentProc::start(&dir, "host-a", &host_uuid(31));
    let b = AgentProc::start(&dir, "host-b", &host_uuid(32));

    // qmig vm -> qmig vm, live, through the tunnel.
    define(&dir, &a, "g1", "vm", "64M", SMALL_VM);
    let before = counted_past(&dir, &a, "g1", 0);
    let v = migrate_ok(&dir, "g1", &a, &b, &["--p2p", "--tunnelled", "--live"]);
    assert_eq!(v["source"]["statistics"]["status"], "completed", "{v}");
    let (after, ok) = guest(&dir, &b, "g1");
    assert!(ok, "checksum intact on host-b");
    assert!(after > before, "the counter went on: {before} -> {after}");
    one_copy(&dir, "g1", &b, &a);
    // The URI the source was given is the tunnel's, not a VM's socket.
    let job = a.job_record("g1").expect("source job");
    assert!(job["uri"].as_str().is_some_and(|u| u.starts_with("tunnel:")), "{job}");
    assert_eq!(job["flags"]["transport"], "tunnelled");
    assert!(!a.state_dir.join("vms/g1").exists(), "the source's tunnel socket went with the VM");

    // Refused before anything starts: --tunnelled without --p2p (the CLI), with --postcopy (Begin3).
    let r = migrate(&dir, "g1", &b, &a, &["--tunnelled"]);
    assert!(!r.status.success() && r.stderr.contains("--p2p"), "{}", r.stderr);
    let r = migrate(&dir, "g1", &b, &a, &["--p2p", "--tunnelled", "--postcopy"]);
    one_line_error("tunnelled postcopy", r.status.code(), &r.stderr, &["qmig: migrate: begin3 failed:", "postcopy"]);
    assert_eq!(b.vm(&dir, "g1").expect("g1 stays")["job"], serde_json::Value::Null);
    run_ok(&dir, &["destroy", "g1", "--on", &b.addr]);

    // QEMU 7.2 -> QEMU 7.2, paused -machine none, RAM byte-exact through the tunnel.
    let pattern = generate(Pattern::Mixed { every: 4 }, 11, 64 * MIB);
    std::fs::write(a.state_dir.join("m1.ram"), &pattern).expect("source RAM file");
    let backend = "memory-backend-file,id=mem,size=64M,mem-path=%STATE%/m1.ram,share=on";
    define(&dir, &a, "m1", "qemu", "64M", &["-machine", "none,memory-backend=mem", "-object", backend, "-S"]);
    let v = migrate_ok(&dir, "m1", &a, &b, &["--p2p", "--tunnelled"]);
    assert_eq!(v["destination"]["statistics"]["status"], "completed", "{v}");
    let dest = std::fs::read(b.state_dir.join("m1.ram")).expect("destination RAM file");
    common::assert_same_ram("destination RAM (tunnelled)", &dest, &pattern);
    assert!(!names(&dir, &a).contains(&"m1".to_string()));
    assert!(b.vm(&dir, "m1").is_some());
}

#[test]
fn cancel_ends_a_tunnelled_migration_on_a_full_pipe() {
    if !testkit::kvm_or_skip("cancel_ends_a_tunnelled_migration_on_a_full_pipe") {
        return;
    }
    let dir = TestDir::new("agent-tunnel-cancel");
    let a = AgentProc::start(&dir, "host-a", &host_uuid(33));
    let b = AgentProc::start(&dir, "host-b", &host_uuid(34));
    define(&dir, &a, "g2", "vm", "64M", BUSY_VM);
    counted_past(&dir, &a, "g2", 0);
    let mut mig = spawn_migrate(&dir, "g2", &a, &b, &["--p2p", "--tunnelled", "--live", "--bandwidth", "8"], "m.err");
    common::agent_ops::wait_streaming(&a, "g2");
    // The destination VM stops reading: SIGSTOP. Its socket, the relays' buffers and the
    // TCP connection fill; then the source VM's writes block.
    let pid = nix::unistd::Pid::from_raw(vm_pid(&b, "g2"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP the destination VM");
    let transferred = || {
        let j = a.call("jobinfo", json!({"name": "g2"})).expect("jobinfo");
        assert_eq!(
            (j["phase"].as_str(), j["statistics"]["status"].as_str()),
            (Some("perform3"), Some("active")),
            "{j}"
        );
        j["statistics"]["ram"]["transferred"].as_u64().expect("transferred")
    };
    let t0 = Instant::now();
    let mut last = transferred();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = transferred();
        if now == last {
            break;
        }
        last = now;
        assert!(t0.elapsed() < Duration::from_secs(120), "the pipe never filled ({now} bytes sent)");
    }
    // The relay carried the stream so far (jobinfo's tunnel byte counts).
    let j = a.call("jobinfo", json!({"name": "g2"})).expect("jobinfo");
    assert!(j["tunnel"]["forward-bytes"].as_u64().is_some_and(|n| n > 0), "{j}");
    // Full: nothing moves. Cancel: the tunnel closes first, then the VM's migrate_cancel.
    let t1 = Instant::now();
    run_ok(&dir, &["migrate-cancel", "g2", "--on", &a.addr]);
    let ended = loop {
        let j = a.call("jobinfo", json!({"name": "g2"})).expect("jobinfo");
        let status = j["statistics"]["status"].as_str().unwrap_or("").to_string();
        if j["phase"] != "perform3" || matches!(status.as_str(), "failed" | "cancelled") {
            break t1.elapsed();
        }
        assert!(t1.elapsed() < Duration::from_secs(60), "the migration does not end: {j}");
        std::thread::sleep(Duration::from_millis(10));
    };
    println!("migrate-cancel on a full pipe: the source's migration ended after {ended:?}");
    assert!(ended < Duration::from_secs(1), "the source's migration ended only after {ended:?}");
    let status = wait_exit(&mut mig, Duration::from_secs(60));
    let err = std::fs::read_to_string(dir.join("m.err")).unwrap_or_default();
    one_line_error("cancel", status.code(), &err, &["qmig: migrate: perform3 failed:"]);
    // The source runs on, its guest intact; the stopped destination VM was killed.
    let (c, _) = guest(&dir, &a, "g2");
    counted_past(&dir, &a, "g2", c);
    one_copy(&dir, "g2", &a, &b);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.contains(") Z")
        },
        "the destination VM process is gone"
    );
    assert_eq!(a.job_record("g2").expect("job")["phase"], "confirm3_cancelled");
}
