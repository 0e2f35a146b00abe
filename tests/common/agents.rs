//! Host agents for the control-plane tests: `qmig agent` processes (two on one
//! machine are two hosts through `--host-uuid`), the client commands run against
//! them, and cleanup of every VM an agent started (VMs outlive their agent, as
//! libvirt domains do, so dropping an [`AgentProc`] kills them by their recorded pid).

use super::{qmig_exe, run_qmig, Run, TestDir};
use qmig_control::rpc::{Client, RpcError};
use serde_json::Value;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Time allowed for an agent to listen, and for one client command.
pub const AGENT_T: Duration = Duration::from_secs(120);

/// A host UUID for test host number `n`.
pub fn host_uuid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

/// A running `qmig agent`.
pub struct AgentProc {
    child: Option<Child>,
    /// Its address, `tcp:127.0.0.1:PORT`.
    pub addr: String,
    /// Its state dir.
    pub state_dir: PathBuf,
    /// Its host UUID.
    pub host_uuid: String,
    /// Its hostname.
    pub hostname: String,
    stderr: PathBuf,
}

impl AgentProc {
    /// Starts agent `name` (state dir `dir/name`, hostname `name`) with host UUID `uuid` on a free port.
    pub fn start(dir: &TestDir, name: &str, uuid: &str) -> AgentProc {
        let mut a = AgentProc {
            child: None,
            addr: "tcp:127.0.0.1:0".into(),
            state_dir: dir.join(name),
            host_uuid: uuid.into(),
            hostname: name.into(),
            stderr: dir.join(&format!("{name}.agent.stderr")),
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&self.stderr).expect("agent stderr");
        let mut child = Command::new(qmig_exe())
            .args(["--log", "info", "agent", "--listen", &self.addr, "--state-dir"])
            .arg(&self.state_dir)
            .args(["--host-uuid", &self.host_uuid, "--hostname", &self.hostname])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start qmig agent");
        let out = child.stdout.take().expect("agent stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(AGENT_T).unwrap_or_default();
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("agent {} did not listen: {line:?}; stderr: {}", self.hostname, self.stderr()));
        self.addr = v["listening"].as_str().expect("listening address").to_string();
        self.child = Some(child);
    }

    /// The agent's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Kills the agent process only (SIGKILL); its VMs run on.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the agent and starts it again on the same address and state dir.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// An RPC connection to it.
    pub fn client(&self) -> Client {
        Client::connect(&self.addr, AGENT_T).unwrap_or_else(|e| panic!("connect to {}: {e}", self.addr))
    }

    /// Runs one RPC call.
    pub fn call(&self, call: &str, args: Value) -> Result<Value, RpcError> {
        self.client().call(call, args)
    }

    /// `qmig list --on` this agent: the VMs by name.
    pub fn list(&self, dir: &TestDir) -> Vec<Value> {
        let r = run_ok(dir, &["list", "--on", &self.addr]);
        r.stdout.lines().map(|l| serde_json::from_str(l).expect("list line is JSON")).collect()
    }

    /// VM `name` in `qmig list`, if listed.
    pub fn vm(&self, dir: &TestDir, name: &str) -> Option<Value> {
        self.list(dir).into_iter().find(|v| v["name"] == name)
    }

    /// The job record `DIR/jobs/NAME.json`.
    pub fn job_record(&self, name: &str) -> Option<Value> {
        let b = std::fs::read(self.state_dir.join("jobs").join(format!("{name}.json"))).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Kills every VM process recorded in the state dir.
    pub fn kill_vms(&self) {
        kill_recorded_vms(&self.state_dir);
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
        self.kill_vms();
    }
}

/// SIGKILLs the processes recorded in `STATE/vms/*/run.json` (those whose command line names their QMP socket).
pub fn kill_recorded_vms(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir.join("vms")) else { return };
    for e in entries.flatten() {
        let Ok(b) = std::fs::read(e.path().join("run.json")) else { continue };
        let Ok(rt) = serde_json::from_slice::<Value>(&b) else { continue };
        let (Some(pid), Some(qmp)) = (rt["pid"].as_u64(), rt["qmp"].as_str()) else { continue };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(qmp) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Runs a client command; panics unless it succeeded.
pub fn run_ok(dir: &TestDir, args: &[&str]) -> Run {
    super::run_qmig_ok(dir, args, AGENT_T)
}

/// Runs `qmig migrate NAME --from A --to B EXTRA...` (it may fail).
pub fn migrate(dir: &TestDir, name: &str, from: &AgentProc, to: &AgentProc, extra: &[&str]) -> Run {
    let mut args = vec!["migrate", name, "--from", &from.addr, "--to", &to.addr];
    args.extend_from_slice(extra);
    run_qmig(dir, &args, AGENT_T)
}

/// Like [`migrate`], panicking unless it completed; its summary line.
pub fn migrate_ok(dir: &TestDir, name: &str, from: &AgentProc, to: &AgentProc, extra: &[&str]) -> Value {
    let r = migrate(dir, name, from, to, extra);
    assert!(r.status.success(), "{} failed ({}): {}", r.command, r.status, r.stderr);
    let v: Value = serde_json::from_str(r.stdout.trim()).expect("migrate prints one JSON line");
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["phases"], serde_json::json!(["begin3", "prepare3", "perform3", "finish3", "confirm3"]));
    v
}

/// An event list without `MIGRATION_PASS` (how many passes a migration takes is the guest's doing).
pub fn without_passes(events: &Value) -> Vec<String> {
    events
        .as_array()
        .map(|l| l.iter().filter_map(Value::as_str).filter(|e| *e != "MIGRATION_PASS").map(String::from).collect())
        .unwrap_or_default()
}
