//! One VM process: a QEMU 7.2 or a `qmig vm`, started by the agent (or found
//! again after the agent restarted) and driven over its QMP socket.
//!
//! The process runs in its own process group and outlives the agent, as a
//! libvirt domain outlives libvirtd; the agent finds it again from
//! `run.json` (pid + QMP socket). The agent keeps one QMP connection per VM
//! (QEMU serves one client at a time), and logs the events it sees on it.

use crate::qmp::{QemuError, Qmp};
use crate::rpc::{ErrorClass, RpcError};
use crate::state::{Kind, Runtime, StateDir, VmDef};
use serde_json::Value;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What `%STATE%` stands for in a VM's extra arguments: the agent's state dir.
pub const STATE_PLACEHOLDER: &str = "%STATE%";

/// Time allowed for a new VM's QMP socket to answer, and for each QMP reply.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The programs the agent starts VMs with.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The `qmig` executable (for `qmig vm`).
    pub qmig: PathBuf,
}

/// A size for QEMU's `-m`: `64M`, or `12345B` when not a MiB multiple.
pub fn size_arg(len: u64) -> String {
    if len != 0 && len.is_multiple_of(1 << 20) {
        format!("{}M", len >> 20)
    } else {
        format!("{len}B")
    }
}

/// `def`'s extra arguments with `%STATE%` replaced by `state_root`.
pub fn substituted_args(def: &VmDef, state_root: &Path) -> Vec<String> {
    let root = state_root.to_string_lossy();
    def.extra_args.iter().map(|a| a.replace(STATE_PLACEHOLDER, &root)).collect()
}

/// The command line (without the program) of `def`'s process, QMP at `qmp`; `incoming`
/// adds `-S` and `-incoming defer` (the destination of a migration waits, stopped).
pub fn command_args(def: &VmDef, state_root: &Path, qmp: &Path, incoming: bool) -> Vec<String> {
    let qmp = format!("unix:{},server=on,wait=off", qmp.display());
    let mut a: Vec<String> = match def.kind {
        Kind::Qemu => ["-name", &def.name, "-uuid", &def.uuid, "-m", &size_arg(def.ram_size), "-nodefaults"]
            .into_iter()
            .chain(["-display", "none", "-qmp", &qmp])
            .map(String::from)
            .collect(),
        Kind::Vm => ["vm", "--qmp", &qmp, "--ram-size", &def.ram_size.to_string(), "--name", &def.name]
            .into_iter()
            .chain(["--uuid", &def.uuid])
            .map(String::from)
            .collect(),
    };
    a.extend(substituted_args(def, state_root));
    if incoming {
        let inc = if def.kind == Kind::Qemu { "-incoming" } else { "--incoming" };
        a.extend(["-S".to_string(), inc.to_string(), "defer".to_string()]);
    }
    a
}

/// A VM's process and its QMP connection.
#[derive(Debug)]
pub struct VmProc {
    def: VmDef,
    pid: u32,
    qmp_path: PathBuf,
    stderr_path: PathBuf,
    incoming: bool,
    /// Set when this agent started the process (it reaps it).
    child: Mutex<Option<Child>>,
    qmp: Mutex<Option<Qmp>>,
    events: Mutex<Vec<Value>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A QMP failure of VM `vm` running `cmd` as an RPC error.
pub fn qmp_error(vm: &str, cmd: &str, e: QemuError) -> RpcError {
    let class = match &e {
        QemuError::Command { .. } => ErrorClass::OperationFailed,
        _ => ErrorClass::SystemError,
    };
    let desc = match e {
        QemuError::Command { desc, .. } => desc,
        other => other.to_string(),
    };
    RpcError::new(class, format!("VM {vm}: {cmd}: {desc}"))
}

impl VmProc {
    /// Starts `def`'s process (`incoming`: as a migration destination) and connects to its QMP.
    pub fn spawn(def: &VmDef, dir: &StateDir, bin: &Binaries, incoming: bool) -> Result<VmProc, RpcError> {
        let vm_dir = dir.vm_dir(&def.name);
        std::fs::create_dir_all(&vm_dir).map_err(|e| RpcError::system(vm_dir.display(), e))?;
        let qmp_path = vm_dir.join("qmp.sock");
        let _ = std::fs::remove_file(&qmp_path);
        let stderr_path = vm_dir.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| RpcError::system(stderr_path.display(), e))?;
        let program = match def.kind {
            Kind::Qemu => &bin.qemu,
            Kind::Vm => &bin.qmig,
        };
        let args = command_args(def, dir.root(), &qmp_path, incoming);
        tracing::info!(vm = %def.name, program = %program.display(), args = ?args, "starting VM");
        let child = Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .map_err(|e| RpcError::system(format!("VM {}: cannot start {}", def.name, program.display()), e))?;
        let p = VmProc {
            def: def.clone(),
            pid: child.id(),
            qmp_path: qmp_path.clone(),
            stderr_path,
            incoming,
            child: Mutex::new(Some(child)),
            qmp: Mutex::new(None),
            events: Mutex::new(vec![]),
        };
        dir.save_runtime(&def.name, &Runtime { pid: p.pid, qmp: qmp_path.clone(), incoming })?;
        let connected = Qmp::connect_checked(&qmp_path, QMP_TIMEOUT, &mut || match p.try_exit() {
            None => Ok(()),
            Some(status) => Err(QemuError::Protocol(format!("the process exited ({status})"))),
        });
        match connected {
            Ok(q) => {
                *lock(&p.qmp) = Some(q);
                Ok(p)
            }
            Err(e) => {
                p.kill();
                dir.remove_runtime(&def.name);
                Err(RpcError::failed(format!("VM {}: did not come up: {e}; stderr: {}", def.name, p.stderr_tail())))
            }
        }
    }

    /// Finds `def`'s recorded process again: `None` when it is gone (or the pid is another program's).
    pub fn reattach(def: &VmDef, rt: &Runtime, dir: &StateDir) -> Option<VmProc> {
        let p = VmProc {
            def: def.clone(),
            pid: rt.pid,
            qmp_path: rt.qmp.clone(),
            stderr_path: dir.vm_dir(&def.name).join("stderr.log"),
            incoming: rt.incoming,
            child: Mutex::new(None),
            qmp: Mutex::new(None),
            events: Mutex::new(vec![]),
        };
        if !p.alive() {
            return None;
        }
        match Qmp::connect(&p.qmp_path, Duration::from_secs(5)) {
            Ok(q) => *lock(&p.qmp) = Some(q),
            // Reconnected on the next command.
            Err(e) => tracing::warn!(vm = %def.name, error = %e, "reattached VM: QMP not answering yet"),
        }
        Some(p)
    }

    /// The definition.
    pub fn def(&self) -> &VmDef {
        &self.def
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Started as a migration destination.
    pub fn incoming(&self) -> bool {
        self.incoming
    }

    fn try_exit(&self) -> Option<std::process::ExitStatus> {
        lock(&self.child).as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether the process still runs (a zombie or a reused pid does not count).
    pub fn alive(&self) -> bool {
        if let Some(c) = lock(&self.child).as_mut() {
            return matches!(c.try_wait(), Ok(None));
        }
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        if stat.is_empty() || matches!(state, Some("Z" | "X")) {
            return false;
        }
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        let needle = self.qmp_path.to_string_lossy();
        String::from_utf8_lossy(&cmdline).contains(needle.as_ref())
    }

    /// The last lines the process wrote to its standard error (for error messages).
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read(&self.stderr_path).map(|b| String::from_utf8_lossy(&b).into_owned());
        let text = text.unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
        if tail.is_empty() {
            "(empty)".into()
        } else {
            tail
        }
    }

    /// Runs a QMP command (connecting first if needed); the events seen meanwhile are logged.
    pub fn execute(&self, cmd: &str, args: Option<Value>) -> Result<Value, RpcError> {
        let mut g = lock(&self.qmp);
        if g.is_none() {
            if !self.alive() {
                return Err(RpcError::failed(format!(
                    "VM {}: the process has exited; stderr: {}",
                    self.def.name,
                    self.stderr_tail()
                )));
            }
            *g = Some(Qmp::connect(&self.qmp_path, QMP_TIMEOUT).map_err(|e| qmp_error(&self.def.name, cmd, e))?);
        }
        let Some(q) = g.as_mut() else {
            return Err(RpcError::new(ErrorClass::InternalError, "QMP connection vanished"));
        };
        let r = q.execute(cmd, args);
        lock(&self.events).extend(q.take_events());
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if !matches!(e, QemuError::Command { .. }) {
                    *g = None;
                }
                let dead = !self.alive();
                let mut err = qmp_error(&self.def.name, cmd, e);
                if dead {
                    err = RpcError::failed(format!(
                        "{}; the process has exited; stderr: {}",
                        err.desc,
                        self.stderr_tail()
                    ));
                }
                Err(err)
            }
        }
    }

    /// Returns and clears the events logged so far.
    pub fn take_events(&self) -> Vec<Value> {
        std::mem::take(&mut *lock(&self.events))
    }

    /// Waits up to `timeout` for the process to end; whether it did.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            if !self.alive() {
                return true;
            }
            if t0.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process (SIGKILL) and waits for it to be gone.
    pub fn kill(&self) {
        *lock(&self.qmp) = None;
        if let Some(mut c) = lock(&self.child).take() {
            let _ = c.kill();
            let _ = c.wait();
            return;
        }
        if self.alive() {
            let pid = nix::unistd::Pid::from_raw(self.pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            self.wait_exit(Duration::from_secs(10));
        }
    }

    /// `quit` over QMP, then SIGKILL if it has not ended within `timeout`.
    pub fn quit(&self, timeout: Duration) {
        // QEMU may close the socket before or after replying: both are fine.
        let _ = self.execute("quit", None);
        if !self.wait_exit(timeout) {
            tracing::warn!(vm = %self.def.name, "VM did not quit in time; killing it");
        }
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines() {
        let def = VmDef {
            name: "g".into(),
            kind: Kind::Qemu,
            uuid: "u".into(),
            ram_size: 64 << 20,
            extra_args: vec!["-machine".into(), "none".into(), "mem-path=%STATE%/g.ram".into()],
        };
        let a = command_args(&def, Path::new("/s"), Path::new("/s/q"), true).join(" ");
        assert_eq!(
            a,
            "-name g -uuid u -m 64M -nodefaults -display none -qmp unix:/s/q,server=on,wait=off \
             -machine none mem-path=/s/g.ram -S -incoming defer"
        );
        let def = VmDef { kind: Kind::Vm, extra_args: vec!["--slots".into(), "1".into()], ..def };
        let a = command_args(&def, Path::new("/s"), Path::new("/s/q"), false).join(" ");
        assert_eq!(a, "vm --qmp unix:/s/q,server=on,wait=off --ram-size 67108864 --name g --uuid u --slots 1");
        assert_eq!(size_arg(4097), "4097B");
    }
}
