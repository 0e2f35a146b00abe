//! The control plane end to end: `qmig agent` processes (two hosts on one machine
//! through `--host-uuid`) driving real QEMU 7.2 and `qmig vm` VMs with libvirt's
//! v3 protocol.
//!
//! - A paused `-machine none` QEMU guest with a known RAM pattern migrates (not
//!   live) and its destination RAM file is byte-exact, and back over multifd with
//!   zstd, byte-exact again; then the refusals: the
//!   same host UUID, a cookie missing a required field, `--postcopy` on a QEMU
//!   whose RAM userfaultfd cannot serve, an unknown VM. Each failing `migrate`
//!   prints one line naming the phase and leaves exactly one copy running.
//! - A running q35 + KVM QEMU guest (busy-bios.bin) and a running `qmig vm` KVM
//!   guest migrate live (direct); the QMP event sequences the agents saw for the
//!   two are equal; postcopy with multifd is refused in Begin3; the `qmig vm`
//!   comes back with `--p2p` and goes again with `--p2p --parallel 2 --compressed`
//!   (multifd, zstd; `multifd-bytes` in its statistics), its counter going on
//!   and its checksum intact each time.
//! - `migrate-setspeed` mid-run shows in the next windows' throughput, then
//!   `migrate-cancel` ends the migration with the source running on; then the
//!   same guest migrates with postcopy, running on the destination before the end.

#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

mod common;

use common::agent_ops::{define, guest, names, SMALL_VM as VM_ARGS};
use common::agents::{host_uuid, migrate, migrate_ok, run_ok, without_passes, AgentProc};
use common::{one_line_error, qemu_or_skip, TestDir};
use qmig_control::rpc::ErrorClass;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use testkit::pattern::{generate, Pattern};

const MIB: usize = 1 << 20;

#[test]
fn qemu_paused_ram_exact_and_refusals() {
    if qemu_or_skip("qemu_paused_ram_exact_and_refusals").is_none() {
        return;
    }
    let dir = TestDir::new("agent-qemu-paused");
    let a = AgentProc::start(&dir, "host-a", &host_uuid(1));
    let b = AgentProc::start(&dir, "host-b", &host_uuid(2));
    let pattern = generate(Pattern::Mixed { every: 4 }, 7, 64 * MIB);
    std::fs::write(a.state_dir.join("m1.ram"), &pattern).expect("source RAM file");
    let backend = "memory-backend-file,id=mem,size=64M,mem-path=%STATE%/m1.ram,share=on";
    define(&dir, &a, "m1", "qemu", "64M", &["-machine", "none,memory-backend=mem", "-object", backend, "-S"]);
    assert_eq!(a.vm(&dir, "m1").expect("listed")["state"], "prelaunch");

    let v = migrate_ok(&dir, "m1", &a, &b, &["--direct"]);
    assert_eq!(v["source"]["statistics"]["status"], "completed", "{v}");
    assert_eq!(v["destination"]["hostname"], "host-b");
    // The destination's copy landed in its own state dir (%STATE%), byte-exact; it stays paused.
    let dest = std::fs::read(b.state_dir.join("m1.ram")).expect("destination RAM file");
    common::assert_same_ram("destination RAM", &dest, &pattern);
    let m1 = b.vm(&dir, "m1").expect("m1 on host-b");
    assert!(matches!(m1["state"].as_str(), Some("prelaunch" | "paused")), "{m1}");
    assert!(!names(&dir, &a).contains(&"m1".to_string()), "the source VM is gone");
    // The phases each agent recorded, by libvirt's names.
    let src_job = a.job_record("m1").expect("source job record");
    assert_eq!((src_job["phase"].as_str(), src_job["finished"].as_bool()), (Some("confirm3"), Some(true)));
    let dst_job = b.job_record("m1").expect("destination job record");
    assert_eq!((dst_job["phase"].as_str(), dst_job["role"].as_str()), (Some("finish3"), Some("destination")));

    // Back with multifd, 2 channels, zstd (QEMU on both ends), into a fresh file on host-a.
    std::fs::remove_file(a.state_dir.join("m1.ram")).expect("old source RAM file");
    migrate_ok(&dir, "m1", &b, &a, &["--parallel", "2", "--compressed"]);
    let back = std::fs::read(a.state_dir.join("m1.ram")).expect("RAM file back on host-a");
    common::assert_same_ram("RAM back over multifd+zstd", &back, &pattern);
    migrate_ok(&dir, "m1", &a, &b, &[]);

    // Refused: a destination with the source's host UUID (another agent claiming host-b's identity).
    let twin = AgentProc::start(&dir, "host-b-twin", &host_uuid(2));
    let r = migrate(&dir, "m1", &b, &twin, &[]);
    one_line_error("same host", r.status.code(), &r.stderr, &["qmig: migrate: prepare3 failed:", "same host"]);
    assert_eq!(names(&dir, &b), ["m1"]);
    assert!(names(&dir, &twin).is_empty());
    assert!(matches!(b.vm(&dir, "m1").expect("m1")["state"].as_str(), Some("prelaunch" | "paused")));
    assert_eq!(b.vm(&dir, "m1").expect("m1")["job"], Value::Null);

    // Refused: a cookie without a required field, by the field's name; nothing started.
    let begin = json!({"host-uuid": host_uuid(9), "hostname": "x", "name": "m9", "memory": 1 << 26});
    let desc =
        json!({"name": "m9", "kind": "qemu", "uuid": "11111111-1111-4111-8111-111111111111", "ram-size": 1 << 26});
    let e = a.call("prepare3", json!({"description": desc, "cookie": begin})).expect_err("no uuid");
    assert_eq!(e.class, ErrorClass::InvalidArg);
    assert!(e.desc.contains("'uuid'"), "{e}");
    assert!(names(&dir, &a).is_empty());

    // Refused before anything starts: postcopy for a QEMU whose RAM is a file on a
    // filesystem userfaultfd cannot serve (the build dir, not tmpfs).
    let disk =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("agent-m2-{}.ram", std::process::id()));
    let on_tmpfs = nix::sys::statfs::statfs(disk.parent().expect("dir"))
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(true);
    if on_tmpfs {
        println!("SKIP postcopy refusal: {} is on tmpfs", disk.display());
    } else {
        let backend = format!("memory-backend-file,id=mem,size=16M,mem-path={},share=on", disk.display());
        define(&dir, &a, "m2", "qemu", "16M", &["-machine", "none,memory-backend=mem", "-object", &backend, "-S"]);
        let r = migrate(&dir, "m2", &a, &b, &["--postcopy"]);
        one_line_error("postcopy", r.status.code(), &r.stderr, &["qmig: migrate: begin3 failed:", "userfaultfd"]);
        let m2 = a.vm(&dir, "m2").expect("m2 stays");
        assert_eq!((m2["state"].as_str(), &m2["job"]), (Some("prelaunch"), &Value::Null));
        assert!(a.job_record("m2").is_none(), "no job was started");
        run_ok(&dir, &["destroy", "m2", "--on", &a.addr]);
        let _ = std::fs::remove_file(&disk);
    }

    // Refused: an unknown VM.
    let r = migrate(&dir, "nosuch", &a, &b, &[]);
    one_line_error("unknown VM", r.status.code(), &r.stderr, &["qmig: migrate: begin3 failed:", "nosuch"]);
    assert_eq!(names(&dir, &b), ["m1"]);

    // A restarted agent finds its VM again (pid + QMP socket from its state dir) and its last job.
    let mut b = b;
    let before = b.vm(&dir, "m1").expect("m1");
    b.restart();
    assert_eq!(b.vm(&dir, "m1").expect("m1 after the restart"), before);
    // Its last job: the source side of the refused same-host attempt, cancelled in Confirm3.
    let j = b.call("jobinfo", json!({"name": "m1"})).expect("jobinfo");
    assert_eq!(
        (j["role"].as_str(), j["phase"].as_str(), j["finished"].as_bool()),
        (Some("source"), Some("confirm3_cancelled"), Some(true)),
        "{j}"
    );
    run_ok(&dir, &["destroy", "m1", "--on", &b.addr]);
    assert!(names(&dir, &b).is_empty());
    assert!(!b.state_dir.join("vms/m1").exists(), "destroy forgets the VM");
}

#[test]
fn live_qemu_and_qmig_vm_same_events_direct_and_p2p() {
    if !testkit::kvm_or_skip("live_qemu_and_qmig_vm_same_events_direct_and_p2p")
        || qemu_or_skip("live_qemu_and_qmig_vm_same_events_direct_and_p2p").is_none()
    {
        return;
    }
    let dir = TestDir::new("agent-live");
    let a = AgentProc::start(&dir, "host-a", &host_uuid(11));
    let b = AgentProc::start(&dir, "host-b", &host_uuid(12));
    let bios = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/busy-bios.bin");
    define(&dir, &a, "q1", "qemu", "64M", &["-machine", "q35", "-accel", "kvm", "-bios", bios]);
    define(&dir, &a, "g1", "vm", "64M", VM_ARGS);
    assert_eq!(a.vm(&dir, "q1").expect("q1")["state"], "running");

    let q = migrate_ok(&dir, "q1", &a, &b, &["--live"]);
    assert_eq!(b.vm(&dir, "q1").expect("q1 on host-b")["state"], "running", "QEMU runs on the destination");

    // Let the guest count a while, then migrate it live.
    let t0 = Instant::now();
    let (before, ok) = loop {
        let (c, ok) = guest(&dir, &a, "g1");
        if c > 0 || t0.elapsed() > Duration::from_secs(60) {
            break (c, ok);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(ok && before > 0, "the guest runs on the source: counter {before}, checksum {ok}");
    let g = migrate_ok(&dir, "g1", &a, &b, &["--live", "--direct"]);
    let (after, ok) = guest(&dir, &b, "g1");
    assert!(ok, "checksum intact on host-b");
    assert!(after > before, "the counter went on: {before} -> {after}");
    assert!(!names(&dir, &a).contains(&"g1".to_string()));

    // The event sequences the agents saw: equal for QEMU 7.2 and qmig vm.
    for side in ["source", "destination"] {
        let (qe, ge) = (&q[side]["events"], &g[side]["events"]);
        assert_eq!(without_passes(qe), without_passes(ge), "{side} events: QEMU {qe} vs qmig vm {ge}");
    }
    assert_eq!(
        without_passes(&g["source"]["events"]),
        ["MIGRATION:setup", "MIGRATION:active", "STOP", "MIGRATION:completed"]
    );
    assert_eq!(
        without_passes(&g["destination"]["events"]),
        ["MIGRATION:setup", "MIGRATION:active", "MIGRATION:completed", "RESUME"]
    );
    assert!(g["source"]["events"].as_array().is_some_and(|l| l.iter().any(|e| e == "MIGRATION_PASS")));
    assert!(q["source"]["events"].as_array().is_some_and(|l| l.iter().any(|e| e == "MIGRATION_PASS")));

    // Refused before anything starts: postcopy with multifd (as QEMU refuses the pair).
    let r = migrate(&dir, "g1", &b, &a, &["--postcopy", "--parallel", "2"]);
    one_line_error(
        "postcopy + multifd on qmig vm",
        r.status.code(),
        &r.stderr,
        &["qmig: migrate: begin3 failed:", "Postcopy is not yet compatible with multifd"],
    );
    assert_eq!(b.vm(&dir, "g1").expect("g1 stays")["job"], Value::Null);

    // Back with p2p: this client talks to host-b only.
    let p = migrate_ok(&dir, "g1", &b, &a, &["--p2p", "--live"]);
    assert_eq!(p["destination"]["hostname"], "host-a");
    let (back, ok) = guest(&dir, &a, "g1");
    assert!(ok, "checksum intact back on host-a");
    assert!(back > after, "the counter went on: {after} -> {back}");
    assert!(!names(&dir, &b).contains(&"g1".to_string()));
    assert_eq!(names(&dir, &b), ["q1"]);

    // And over again with p2p over multifd (libvirt's --parallel --compressed: 2 channels, zstd).
    let m = migrate_ok(&dir, "g1", &a, &b, &["--p2p", "--live", "--parallel", "2", "--compressed"]);
    let (moved, ok) = guest(&dir, &b, "g1");
    assert!(ok, "checksum intact on host-b after multifd");
    assert!(moved > back, "the counter went on: {back} -> {moved}");
    assert!(!names(&dir, &a).contains(&"g1".to_string()));
    let mf = m["source"]["statistics"]["ram"]["multifd-bytes"].as_u64().unwrap_or(0);
    assert!(mf > 0, "the source's statistics count multifd bytes: {m}");
    let j = a.call("jobinfo", json!({"name": "g1"})).expect("jobinfo");
    assert_eq!((&j["flags"]["parallel"], &j["flags"]["compressed"]), (&json!(2), &json!(true)), "{j}");
    assert!(j["statistics"]["ram"]["multifd-bytes"].as_u64().is_some_and(|b| b > 0), "{j}");
}

/// `ram.transferred` of `name`'s running migration (jobinfo on the source agent) and when it was read.
fn transferred(a: &AgentProc, name: &str) -> (u64, Instant) {
    let j = a.call("jobinfo", json!({ "name": name })).expect("jobinfo");
    assert_eq!(j["phase"], "perform3", "{j}");
    (j["statistics"]["ram"]["transferred"].as_u64().expect("transferred"), Instant::now())
}

fn rate(a: (u64, Instant), b: (u64, Instant)) -> f64 {
    (b.0.saturating_sub(a.0)) as f64 / b.1.duration_since(a.1).as_secs_f64()
}

#[test]
fn setspeed_shows_in_throughput_then_cancel() {
    if !testkit::kvm_or_skip("setspeed_shows_in_throughput_then_cancel") {
        return;
    }
    let dir = TestDir::new("agent-speed");
    let a = AgentProc::start(&dir, "host-a", &host_uuid(21));
    let b = AgentProc::start(&dir, "host-b", &host_uuid(22));
    // A guest dirtying 32 MiB at 64 MiB/s: no migration under 16 MiB/s converges.
    define(&dir, &a, "g2", "vm", "64M", &["--slots", "1", "--working-set", "32M", "--dirty-rate", "64"]);
    let stderr = std::fs::File::create(dir.join("migrate.stderr")).expect("stderr file");
    let mut mig = std::process::Command::new(common::qmig_exe())
        .args(["migrate", "g2", "--from", &a.addr, "--to", &b.addr, "--live", "--bandwidth", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start qmig migrate");
    // Wait until the migration streams.
    let t0 = Instant::now();
    loop {
        if let Ok(j) = a.call("jobinfo", json!({"name": "g2"})) {
            if j["phase"] == "perform3" && j["statistics"]["status"] == "active" {
                break;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the migration did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s0 = transferred(&a, "g2");
    std::thread::sleep(Duration::from_millis(1000));
    let s1 = transferred(&a, "g2");
    let slow = rate(s0, s1);
    run_ok(&dir, &["migrate-setspeed", "g2", "16M", "--on", &a.addr]);
    let s2 = transferred(&a, "g2");
    std::thread::sleep(Duration::from_millis(300));
    let s3 = transferred(&a, "g2");
    let fast = rate(s2, s3);
    println!("throughput: {slow:.0} B/s at 1 MiB/s, {fast:.0} B/s in the 300 ms after setspeed 16M");
    assert!(slow < 3.0 * MIB as f64, "at 1 MiB/s the source sent {slow:.0} B/s");
    assert!(fast > 4.0 * slow.max(MIB as f64 / 4.0), "after setspeed 16M: {fast:.0} B/s (before {slow:.0} B/s)");
    let params_bw = a.call("jobinfo", json!({"name": "g2"})).expect("jobinfo")["flags"]["bandwidth"].clone();
    assert_eq!(params_bw, 16);

    // Cancel: the migration fails in perform3, the source runs on, the destination is cleaned up.
    run_ok(&dir, &["migrate-cancel", "g2", "--on", &a.addr]);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = mig.try_wait().expect("wait") {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "migrate did not end after migrate-cancel");
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(dir.join("migrate.stderr")).unwrap_or_default();
    one_line_error("cancel", status.code(), &err, &["qmig: migrate: perform3 failed:", "cancelled"]);
    let (_, ok) = guest(&dir, &a, "g2");
    assert!(ok, "checksum intact on the source");
    assert!(names(&dir, &b).is_empty(), "the destination VM is gone");
    let job = a.job_record("g2").expect("job record");
    assert_eq!(job["phase"], "confirm3_cancelled");
    // As libvirt's qemuMigrationParamsReset: the parameters the job set (max-bandwidth
    // 1 MiB/s, then 16 MiB/s by setspeed) are back to what the VM had before it.
    let saved = job["saved-parameters"]["max-bandwidth"].as_u64().expect("saved max-bandwidth");
    assert_ne!(saved, MIB as u64, "{job}");
    let mut qmp = testkit::qemu::Qmp::connect(a.state_dir.join("vms/g2/qmp.sock"), Duration::from_secs(30))
        .expect("a second QMP client on the source VM");
    let now = qmp.execute("query-migrate-parameters", None).expect("query-migrate-parameters");
    assert_eq!(now["max-bandwidth"].as_u64(), Some(saved), "restored after the cancel: {now}");
    drop(qmp);

    // Postcopy: Perform ends at the switch, Finish starts the guest on host-b while its
    // pages still arrive (RESUME before `completed`), Confirm waits for the end.
    // The background pages at 8 MiB/s: the rest of RAM takes seconds after the switch,
    // so Finish's `cont` comes before `completed` even on an idle machine.
    let v = migrate_ok(&dir, "g2", &a, &b, &["--live", "--postcopy", "--bandwidth", "16", "--postcopy-bandwidth", "8"]);
    let dst: Vec<String> = without_passes(&v["destination"]["events"]);
    assert_eq!(
        dst,
        ["MIGRATION:setup", "MIGRATION:active", "MIGRATION:postcopy-active", "RESUME", "MIGRATION:completed"],
        "{v}"
    );
    assert_eq!(v["source"]["statistics"]["status"], "completed", "{v}");
    let (_, ok) = guest(&dir, &b, "g2");
    assert!(ok, "checksum intact after postcopy");
    assert!(names(&dir, &a).is_empty());
}
