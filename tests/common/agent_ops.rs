//! Operations on agent-run VMs shared by the tunnel and fault tests: define a VM, read
//! a `qmig vm` guest's counter and checksum from `list`, run `qmig migrate` in the
//! background, and the one-running-copy check.

use super::agents::{run_ok, AgentProc, AGENT_T};
use super::{qmig_exe, TestDir};
use serde_json::Value;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `qmig vm` arguments of a small guest: one slot, an 8 MiB working set written at 16 MiB/s.
pub const SMALL_VM: &[&str] = &["--slots", "1", "--working-set", "8M", "--dirty-rate", "16"];

/// A guest no migration under 16 MiB/s converges for: 32 MiB dirtied at 64 MiB/s.
pub const BUSY_VM: &[&str] = &["--slots", "1", "--working-set", "32M", "--dirty-rate", "64"];

/// `qmig define NAME --on A --kind KIND --ram-size SIZE -- EXTRA...`; its JSON line.
pub fn define(dir: &TestDir, a: &AgentProc, name: &str, kind: &str, ram: &str, extra: &[&str]) -> Value {
    let mut args = vec!["define", name, "--on", &a.addr, "--kind", kind, "--ram-size", ram, "--"];
    args.extend_from_slice(extra);
    serde_json::from_str(run_ok(dir, &args).stdout.trim()).expect("define prints JSON")
}

/// The names `list` shows on `a`.
pub fn names(dir: &TestDir, a: &AgentProc) -> Vec<String> {
    a.list(dir).iter().filter_map(|v| v["name"].as_str().map(String::from)).collect()
}

/// The names of the VMs `list` shows `running` on `a`.
pub fn running(dir: &TestDir, a: &AgentProc) -> Vec<String> {
    a.list(dir)
        .iter()
        .filter(|v| v["state"] == "running")
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect()
}

/// A running `qmig vm` guest's `(counter, checksum_ok)` from `list` on `a`.
pub fn guest(dir: &TestDir, a: &AgentProc, name: &str) -> (u64, bool) {
    let v = a.vm(dir, name).unwrap_or_else(|| panic!("{name} not on {}", a.hostname));
    assert_eq!(v["state"], "running", "{v}");
    (v["counter"].as_u64().expect("counter"), v["checksum_ok"] == true)
}

/// Waits until guest `name` on `a` has counted past `past`; its counter (checksum checked).
pub fn counted_past(dir: &TestDir, a: &AgentProc, name: &str, past: u64) -> u64 {
    let t0 = Instant::now();
    loop {
        let (c, ok) = guest(dir, a, name);
        assert!(ok, "{name} on {}: checksum", a.hostname);
        if c > past {
            return c;
        }
        assert!(t0.elapsed() < AGENT_T, "{name} on {} does not count past {past}", a.hostname);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Exactly one running copy of `name`: on `runs`, and neither listed on `not` nor left in its state dir.
pub fn one_copy(dir: &TestDir, name: &str, runs: &AgentProc, not: &AgentProc) {
    assert!(running(dir, runs).contains(&name.to_string()), "{name} runs on {}", runs.hostname);
    assert!(!names(dir, not).contains(&name.to_string()), "{name} is gone from {}", not.hostname);
    assert!(!not.state_dir.join("vms").join(name).exists(), "{name}'s VM dir is gone from {}", not.hostname);
}

/// `qmig migrate NAME --from A --to B EXTRA...` started in the background, stderr to `DIR/STDERR`.
pub fn spawn_migrate(
    dir: &TestDir,
    name: &str,
    from: &AgentProc,
    to: &AgentProc,
    extra: &[&str],
    stderr: &str,
) -> Child {
    let err = std::fs::File::create(dir.join(stderr)).expect("stderr file");
    Command::new(qmig_exe())
        .args(["migrate", name, "--from", &from.addr, "--to", &to.addr])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("start qmig migrate")
}

/// Waits for `child` to end (at most `limit`).
pub fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("qmig migrate did not end in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `name`'s job on source agent `a` streams (`perform3`, `active`); its jobinfo.
pub fn wait_streaming(a: &AgentProc, name: &str) -> Value {
    let t0 = Instant::now();
    loop {
        if let Ok(j) = a.call("jobinfo", serde_json::json!({ "name": name })) {
            if j["phase"] == "perform3" && j["statistics"]["status"] == "active" {
                return j;
            }
        }
        assert!(t0.elapsed() < AGENT_T, "the migration of {name} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid of VM `name` recorded in `a`'s state dir.
pub fn vm_pid(a: &AgentProc, name: &str) -> i32 {
    let b = std::fs::read(a.state_dir.join("vms").join(name).join("run.json")).expect("run.json");
    let v: Value = serde_json::from_slice(&b).expect("run.json is JSON");
    v["pid"].as_i64().expect("pid") as i32
}
