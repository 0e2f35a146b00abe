//! The agent's state dir: what survives a restart of the agent.
//!
//! Layout (`DIR` is `--state-dir`):
//! - `DIR/vms/NAME/def.json`: the VM's definition ([`VmDef`]);
//! - `DIR/vms/NAME/run.json`: its live process ([`Runtime`]: pid, QMP socket), removed when it stops;
//! - `DIR/vms/NAME/qmp.sock`, `DIR/vms/NAME/stderr.log`: its QMP socket and its standard error;
//! - `DIR/jobs/NAME.json`: the migration job of VM NAME ([`JobRecord`]), its phase
//!   written before each action of that phase.
//!
//! Every file is written atomically: to a temporary name, synced, then renamed.

use crate::migrate::MigrateFlags;
use crate::rpc::RpcError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// The kind of VM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `qemu-system-x86_64` (QEMU 7.2).
    Qemu,
    /// `qmig vm` (minivmm's KVM guest).
    Vm,
}

impl Kind {
    /// `qemu` or `vm`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Qemu => "qemu",
            Kind::Vm => "vm",
        }
    }

    /// Parses `qemu` or `vm`.
    pub fn parse(s: &str) -> Result<Kind, RpcError> {
        match s {
            "qemu" => Ok(Kind::Qemu),
            "vm" => Ok(Kind::Vm),
            _ => Err(RpcError::invalid(format!("kind '{s}': expected qemu or vm"))),
        }
    }
}

/// A VM's definition, as recorded and as sent in Begin's description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmDef {
    /// The VM's name (unique on an agent).
    pub name: String,
    /// QEMU or `qmig vm`.
    pub kind: Kind,
    /// The VM's UUID (QEMU's `-uuid`).
    pub uuid: String,
    /// RAM in bytes (`-m` / `--ram-size`).
    pub ram_size: u64,
    /// Extra command-line arguments, before `%STATE%` substitution.
    #[serde(default)]
    pub extra_args: Vec<String>,
}

/// The live process of a VM, recorded so a restarted agent can reattach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Runtime {
    /// Process id.
    pub pid: u32,
    /// The QMP socket.
    pub qmp: PathBuf,
    /// Started as a migration destination (`-incoming defer`).
    pub incoming: bool,
}

/// Which end of a migration a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The source (Begin, Perform, Confirm).
    Source,
    /// The destination (Prepare, Finish).
    Destination,
}

/// A job's phase, by libvirt's names (`qemuMigrationJobPhase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Source: describing the VM, checking the options.
    Begin3,
    /// Source: migrating (caps and parameters set, `migrate` issued, waiting).
    Perform3,
    /// Source: the migration completed; waiting for Confirm.
    Perform3Done,
    /// Source: the destination took over; stopping the source VM.
    Confirm3,
    /// Source: the migration failed; resuming the source VM.
    Confirm3Cancelled,
    /// Destination: starting the incoming VM.
    Prepare,
    /// Destination: finishing (resume the VM, or kill it).
    Finish3,
}

impl Phase {
    /// Every phase, in libvirt's order (source, then destination).
    pub const ALL: [Phase; 7] = [
        Phase::Begin3,
        Phase::Perform3,
        Phase::Perform3Done,
        Phase::Confirm3,
        Phase::Confirm3Cancelled,
        Phase::Prepare,
        Phase::Finish3,
    ];

    /// libvirt's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Begin3 => "begin3",
            Phase::Perform3 => "perform3",
            Phase::Perform3Done => "perform3_done",
            Phase::Confirm3 => "confirm3",
            Phase::Confirm3Cancelled => "confirm3_cancelled",
            Phase::Prepare => "prepare",
            Phase::Finish3 => "finish3",
        }
    }
}

/// A migration job as recorded in `DIR/jobs/NAME.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobRecord {
    /// The VM's name.
    pub name: String,
    /// Source or destination.
    pub role: Role,
    /// The current phase (written before its action).
    pub phase: Phase,
    /// The options of the migration.
    pub flags: MigrateFlags,
    /// The migration URI (Prepare's answer).
    #[serde(default)]
    pub uri: Option<String>,
    /// The peer agent (`tcp:HOST:PORT`) when this agent drives it (p2p).
    #[serde(default)]
    pub peer: Option<String>,
    /// The other side's host UUID, once known.
    #[serde(default)]
    pub peer_host_uuid: Option<String>,
    /// Source: the VM was running at Begin (Confirm's cancel resumes it only then).
    #[serde(default)]
    pub was_running: bool,
    /// Source: the VM's migration parameters before this job changed them (`max-bandwidth`,
    /// ...), put back when the migration fails or is cancelled, as libvirt's
    /// `qemuMigrationParamsReset` does (the next migration must not inherit them).
    #[serde(default)]
    pub saved_parameters: Option<Value>,
    /// The last `query-migrate` statistics seen.
    #[serde(default)]
    pub statistics: Option<Value>,
    /// The QMP events seen in this job (`NAME` or `MIGRATION:STATUS`).
    #[serde(default)]
    pub events: Vec<String>,
    /// The job is over (successfully or not); kept for `jobinfo`.
    #[serde(default)]
    pub finished: bool,
    /// Why it failed, if it did.
    #[serde(default)]
    pub error: Option<String>,
}

/// A live job: its record, persisted on every change.
#[derive(Debug)]
pub struct Job {
    dir: StateDir,
    rec: Mutex<JobRecord>,
}

impl Job {
    /// A new job, written at once.
    pub fn create(dir: &StateDir, rec: JobRecord) -> Result<Arc<Job>, RpcError> {
        dir.save_job(&rec)?;
        Ok(Arc::new(Job { dir: dir.clone(), rec: Mutex::new(rec) }))
    }

    /// A job loaded from the state dir (as it was).
    pub fn loaded(dir: &StateDir, rec: JobRecord) -> Arc<Job> {
        Arc::new(Job { dir: dir.clone(), rec: Mutex::new(rec) })
    }

    fn lock(&self) -> MutexGuard<'_, JobRecord> {
        self.rec.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `phase` in the state dir; call it BEFORE acting on the phase.
    pub fn set_phase(&self, phase: Phase) -> Result<(), RpcError> {
        self.update(|r| r.phase = phase)
    }

    /// Changes the record and writes it.
    pub fn update(&self, f: impl FnOnce(&mut JobRecord)) -> Result<(), RpcError> {
        let mut r = self.lock();
        f(&mut r);
        self.dir.save_job(&r)
    }

    /// Marks the job over (with `error` if it failed) and writes it.
    pub fn finish(&self, error: Option<String>) -> Result<(), RpcError> {
        self.update(|r| {
            r.finished = true;
            r.error = error;
        })
    }

    /// A copy of the record.
    pub fn record(&self) -> JobRecord {
        self.lock().clone()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.lock().phase
    }
}

/// The state dir.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> RpcError {
    RpcError::system(path.display(), e)
}

impl StateDir {
    /// Opens (creating) the state dir at `root` (made absolute).
    pub fn open(root: &Path) -> Result<StateDir, RpcError> {
        let root = std::path::absolute(root).map_err(|e| file_err(root, e))?;
        for d in [root.join("vms"), root.join("jobs")] {
            std::fs::create_dir_all(&d).map_err(|e| file_err(&d, e))?;
        }
        Ok(StateDir { root })
    }

    /// The root (absolute): what `%STATE%` stands for in a VM's arguments.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of VM `name`.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.root.join("vms").join(name)
    }

    fn job_path(&self, name: &str) -> PathBuf {
        self.root.join("jobs").join(format!("{name}.json"))
    }

    /// Writes `v` to `path` atomically (temporary file, fsync, rename).
    pub fn write_atomic(path: &Path, v: &impl Serialize) -> Result<(), RpcError> {
        use std::io::Write;
        let text = serde_json::to_vec_pretty(v).map_err(|e| file_err(path, e))?;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| file_err(&tmp, e))?;
        f.write_all(&text).and_then(|()| f.sync_all()).map_err(|e| file_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
    }

    fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, RpcError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| file_err(path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(file_err(path, e)),
        }
    }

    /// Records a VM's definition (creating its directory).
    pub fn save_def(&self, def: &VmDef) -> Result<(), RpcError> {
        let d = self.vm_dir(&def.name);
        std::fs::create_dir_all(&d).map_err(|e| file_err(&d, e))?;
        Self::write_atomic(&d.join("def.json"), def)
    }

    /// Every recorded definition (a VM dir without a readable one is skipped with a warning).
    pub fn load_defs(&self) -> Vec<VmDef> {
        let dir = self.root.join("vms");
        let Ok(entries) = std::fs::read_dir(&dir) else { return vec![] };
        let mut out = vec![];
        for e in entries.flatten() {
            let p = e.path().join("def.json");
            match Self::read::<VmDef>(&p) {
                Ok(Some(d)) => out.push(d),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "skipping a VM definition"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Records VM `name`'s live process.
    pub fn save_runtime(&self, name: &str, rt: &Runtime) -> Result<(), RpcError> {
        Self::write_atomic(&self.vm_dir(name).join("run.json"), rt)
    }

    /// VM `name`'s recorded live process, if any.
    pub fn load_runtime(&self, name: &str) -> Result<Option<Runtime>, RpcError> {
        Self::read(&self.vm_dir(name).join("run.json"))
    }

    /// Forgets VM `name`'s live process.
    pub fn remove_runtime(&self, name: &str) {
        let _ = std::fs::remove_file(self.vm_dir(name).join("run.json"));
    }

    /// Forgets VM `name` entirely (definition, process record, socket, log).
    pub fn remove_vm(&self, name: &str) {
        let _ = std::fs::remove_dir_all(self.vm_dir(name));
    }

    /// Writes a job record.
    pub fn save_job(&self, rec: &JobRecord) -> Result<(), RpcError> {
        Self::write_atomic(&self.job_path(&rec.name), rec)
    }

    /// VM `name`'s job record, if any.
    pub fn load_job(&self, name: &str) -> Result<Option<JobRecord>, RpcError> {
        Self::read(&self.job_path(name))
    }

    /// Every job record.
    pub fn load_jobs(&self) -> Vec<JobRecord> {
        let dir = self.root.join("jobs");
        let Ok(entries) = std::fs::read_dir(&dir) else { return vec![] };
        let mut out = vec![];
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            match Self::read::<JobRecord>(&p) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "skipping a job record"),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_libvirts_and_records_round_trip() {
        let names: Vec<String> = Phase::ALL
            .iter()
            .map(|p| {
                let s = serde_json::to_value(p).expect("ser");
                assert_eq!(s, p.as_str());
                p.as_str().to_string()
            })
            .collect();
        assert_eq!(names.join(","), "begin3,perform3,perform3_done,confirm3,confirm3_cancelled,prepare,finish3");
        let root = std::env::temp_dir().join(format!("qmig-control-state-{}", std::process::id()));
        let dir = StateDir::open(&root).expect("open");
        let rec = JobRecord {
            saved_parameters: None,
            name: "g".into(),
            role: Role::Source,
            phase: Phase::Begin3,
            flags: MigrateFlags::default(),
            uri: None,
            peer: None,
            peer_host_uuid: None,
            was_running: true,
            statistics: None,
            events: vec![],
            finished: false,
            error: None,
        };
        let job = Job::create(&dir, rec).expect("create");
        job.set_phase(Phase::Perform3).expect("phase");
        let back = dir.load_job("g").expect("load").expect("present");
        assert_eq!(back.phase, Phase::Perform3);
        assert_eq!(dir.load_jobs().len(), 1);
        assert!(!dir.root().join("jobs/g.json.tmp").exists());
        let def = VmDef { name: "g".into(), kind: Kind::Vm, uuid: "u".into(), ram_size: 1, extra_args: vec![] };
        dir.save_def(&def).expect("def");
        assert_eq!(dir.load_defs(), vec![def]);
        let _ = std::fs::remove_dir_all(&root);
    }
}
