//! The host agent (`qmig agent`, libvirtd's role): VMs by name, and the RPC
//! calls of the v3 migration protocol.
//!
//! Calls (arguments in `args`; see `docs/control-plane.md`):
//! - `host-info` -> `{host-uuid, hostname}`;
//! - `define {name, kind, ram-size, extra-args?, uuid?}` starts a VM -> `{name, uuid, kind, pid}`;
//! - `list` -> `[{name, kind, state, uuid, job, counter?, checksum_ok?}]`;
//! - `destroy {name}` kills a VM and forgets it;
//! - `begin3 {name, flags, peer?}` -> `{description, cookie}` (source);
//! - `prepare3 {description, cookie, flags}` -> `{uri, cookie}` (destination);
//! - `perform3 {name, uri, cookie, flags}` -> `{cookie}` (source);
//! - `finish3 {name, cookie, cancelled}` -> `{cookie}` (destination);
//! - `confirm3 {name, cookie, cancelled}` -> `{}` (source);
//! - `migrate {name, to, flags}`: the p2p shape, this agent driving the one at `to`;
//! - `migrate-setspeed {name, bandwidth}`, `migrate-cancel {name}`, `jobinfo {name}`.
//! - `tunnel {job, token}`: a tunnelled migration's data connection ([`crate::tunnel`]).

use crate::cookie::Cookie;
use crate::host::{parse_uuid, random_uuid, HostInfo};
use crate::migrate::{self, MigrateFlags, Transport};
use crate::recovery::fault_point;
use crate::rpc::{self, Args, ErrorClass, RpcError};
use crate::state::{Job, JobRecord, Kind, Phase, Role, StateDir, VmDef};
use crate::tunnel;
use crate::vmproc::{substituted_args, Binaries, VmProc};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often Perform and Finish poll `query-migrate`.
pub const POLL: Duration = Duration::from_millis(50);
/// How long Finish waits for the incoming migration to end after Perform returned.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a VM is given to `quit` before it is killed.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How an agent starts.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `tcp:HOST:PORT` to listen on (port 0 picks one).
    pub listen: String,
    /// The state dir.
    pub state_dir: PathBuf,
    /// `--host-uuid` (else derived from /etc/machine-id).
    pub host_uuid: Option<String>,
    /// `--hostname` (else the system's).
    pub hostname: Option<String>,
    /// The programs VMs are started with.
    pub binaries: Binaries,
}

/// A defined VM: its definition and, while it runs, its process.
#[derive(Debug, Clone)]
struct Entry {
    def: VmDef,
    proc: Option<Arc<VmProc>>,
}

/// One agent.
#[derive(Debug)]
pub struct Agent {
    host: HostInfo,
    dir: StateDir,
    address: String,
    bin: Binaries,
    vms: Mutex<BTreeMap<String, Entry>>,
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    /// The tunnels of tunnelled migrations, by VM name.
    tunnels: tunnel::Registry,
    /// Incoming VMs by name, with the RPC connection whose Prepare3 started them: when
    /// that connection closes before Finish3 began, the VM is killed (libvirt starts
    /// the incoming domain with `VIR_QEMU_PROCESS_START_AUTODESTROY` on that connection).
    prepared_on: Mutex<BTreeMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A VM name: letters, digits, `.`, `_`, `-` (it names a directory).
pub fn check_name(name: &str) -> Result<(), RpcError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RpcError::invalid(format!("VM name '{name}': use letters, digits, '.', '_' and '-' (at most 64)")))
    }
}

/// `NAME`, or `MIGRATION:STATUS` for a `MIGRATION` event.
pub fn event_name(e: &Value) -> String {
    let name = e["event"].as_str().unwrap_or("?");
    match e["data"]["status"].as_str() {
        Some(s) if name == "MIGRATION" => format!("{name}:{s}"),
        _ => name.to_string(),
    }
}

fn status_of(info: &Value) -> &str {
    info["status"].as_str().unwrap_or("none")
}

fn flags_arg(args: Args<'_>) -> Result<MigrateFlags, RpcError> {
    match args.get("flags") {
        None => Ok(MigrateFlags::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| RpcError::invalid(format!("argument 'flags': {e}"))),
    }
}

impl Agent {
    /// Opens the state dir, binds the listening socket, finds the recorded VMs
    /// again and loads the recorded jobs; serve with [`Agent::serve`].
    pub fn start(cfg: &AgentConfig) -> Result<(Arc<Agent>, TcpListener), RpcError> {
        let host = HostInfo::resolve(cfg.host_uuid.as_deref(), cfg.hostname.as_deref())?;
        let dir = StateDir::open(&cfg.state_dir)?;
        let (listener, address) = rpc::listen(&cfg.listen)?;
        let mut vms = BTreeMap::new();
        for def in dir.load_defs() {
            let proc = match dir.load_runtime(&def.name) {
                Ok(Some(rt)) => VmProc::reattach(&def, &rt, &dir).map(Arc::new),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(vm = %def.name, error = %e, "unreadable process record");
                    None
                }
            };
            if proc.is_none() {
                dir.remove_runtime(&def.name);
            }
            tracing::info!(vm = %def.name, running = proc.is_some(), "loaded VM");
            vms.insert(def.name.clone(), Entry { def, proc });
        }
        let jobs: BTreeMap<String, Arc<Job>> =
            dir.load_jobs().into_iter().map(|r| (r.name.clone(), Job::loaded(&dir, r))).collect();
        let agent = Arc::new(Agent {
            host,
            dir,
            address,
            bin: cfg.binaries.clone(),
            vms: Mutex::new(vms),
            jobs: Mutex::new(jobs),
            tunnels: tunnel::Registry::default(),
            prepared_on: Mutex::new(BTreeMap::new()),
        });
        let unfinished: Vec<Arc<Job>> = lock(&agent.jobs).values().filter(|j| !j.record().finished).cloned().collect();
        agent.on_restart(unfinished);
        Ok((agent, listener))
    }

    /// Serves the RPC on `listener` (returns only if accepting fails for good).
    pub fn serve(self: &Arc<Self>, listener: TcpListener) {
        rpc::serve(listener, Arc::new(Handler(self.clone())));
    }

    /// The address it listens on (`tcp:HOST:PORT`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Its host identity.
    pub fn host(&self) -> &HostInfo {
        &self.host
    }

    /// Its state dir.
    pub fn state_dir(&self) -> &StateDir {
        &self.dir
    }

    /// Hook: what to do with the jobs found unfinished at startup (the agent was
    /// killed or restarted mid-migration): libvirt's recovery table ([`crate::recovery`]).
    fn on_restart(&self, jobs: Vec<Arc<Job>>) {
        for j in jobs {
            let r = j.record();
            tracing::warn!(vm = %r.name, role = ?r.role, phase = r.phase.as_str(), "unfinished migration job found at startup");
            crate::recovery::recover(self, &j);
        }
    }

    /// VM `name`'s process, alive or not (recovery).
    pub(crate) fn proc_of(&self, name: &str) -> Option<Arc<VmProc>> {
        lock(&self.vms).get(name).and_then(|e| e.proc.clone())
    }

    /// Hook: refuses a transport this agent cannot run (checked in Begin and Prepare).
    fn check_transport(&self, flags: &MigrateFlags) -> Result<(), RpcError> {
        match flags.transport {
            Transport::Direct => Ok(()),
            Transport::Tunnelled => tunnel::check_flags(flags),
        }
    }

    /// Hook: the URI the destination VM listens on, set up in Prepare (`migrate-incoming`);
    /// the URI returned is what the source is told.
    fn incoming_uri(&self, job: &Job, vm: &VmProc, flags: &MigrateFlags) -> Result<String, RpcError> {
        match flags.transport {
            Transport::Direct => self.direct_incoming(vm),
            Transport::Tunnelled => tunnel::incoming(&self.tunnels, &job.record().name, vm, &self.dir),
        }
    }

    /// Hook: the URI the source VM migrates to in Perform, from the one Prepare returned.
    fn outgoing_uri(&self, job: &Job, uri: &str) -> Result<String, RpcError> {
        match job.record().flags.transport {
            Transport::Direct => Ok(uri.to_string()),
            Transport::Tunnelled => tunnel::outgoing(&self.tunnels, &job.record(), uri, &self.dir),
        }
    }

    /// Hook: runs before `migrate-cancel` asks the VM to cancel: closes the job's tunnel, if any, first.
    fn before_cancel(&self, job: &Job) {
        let name = job.record().name;
        if self.tunnels.close(&name) {
            tracing::info!(vm = %name, "migrate-cancel: tunnel closed");
        }
    }

    /// The host migration URIs name: the listening host, or the hostname when it listens on all addresses.
    fn migration_host(&self) -> String {
        let hostport = self.address.trim_start_matches("tcp:");
        let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
        if matches!(host, "0.0.0.0" | "[::]") {
            self.host.hostname.clone()
        } else {
            host.to_string()
        }
    }

    fn direct_incoming(&self, vm: &VmProc) -> Result<String, RpcError> {
        let host = self.migration_host();
        vm.execute("migrate-incoming", Some(json!({ "uri": format!("tcp:{host}:0") })))?;
        // The port the VM picked: query-migrate's socket-address.
        let t0 = Instant::now();
        loop {
            let info = vm.execute("query-migrate", None)?;
            if let Some(port) = info["socket-address"].as_array().and_then(|l| l.first()).and_then(|a| {
                a["port"].as_str().map(String::from).or_else(|| a["port"].as_u64().map(|p| p.to_string()))
            }) {
                return Ok(format!("tcp:{host}:{port}"));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(RpcError::failed(format!(
                    "VM {}: query-migrate shows no listening socket-address: {info}",
                    vm.def().name
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Runs one RPC call.
    pub fn dispatch(&self, call: &str, args: Args<'_>) -> Result<Value, RpcError> {
        self.dispatch_on(None, call, args)
    }

    /// Runs one RPC call that came on `conn` (`None`: from the agent itself, the p2p driver).
    pub fn dispatch_on(&self, conn: Option<&rpc::Conn<'_>>, call: &str, args: Args<'_>) -> Result<Value, RpcError> {
        match call {
            "host-info" => Ok(json!(self.host)),
            "define" => self.define(args),
            "list" => Ok(Value::Array(self.list())),
            "destroy" => self.destroy(args.str("name")?),
            "begin3" => self.begin3(args),
            "prepare3" => self.prepare3(args, conn.map(rpc::Conn::id)),
            "perform3" => self.perform3(args),
            "finish3" => self.finish3(args),
            "confirm3" => self.confirm3(args),
            "migrate" => self.migrate_p2p(args, conn),
            "migrate-setspeed" => self.setspeed(args),
            "migrate-cancel" => self.cancel(args.str("name")?),
            "jobinfo" => self.jobinfo(args.str("name")?),
            other => Err(RpcError::op_invalid(format!("unknown call '{other}'"))),
        }
    }

    fn no_domain(name: &str) -> RpcError {
        RpcError::new(ErrorClass::NoDomain, format!("Domain not found: no VM named '{name}'"))
    }

    /// VM `name`'s running process.
    fn vm(&self, name: &str) -> Result<Arc<VmProc>, RpcError> {
        match lock(&self.vms).get(name) {
            None => Err(Self::no_domain(name)),
            Some(Entry { proc: Some(p), .. }) if p.alive() => Ok(p.clone()),
            Some(_) => Err(RpcError::op_invalid(format!("VM '{name}' is not running"))),
        }
    }

    /// VM `name`'s job that is not over.
    fn active_job(&self, name: &str) -> Option<Arc<Job>> {
        lock(&self.jobs).get(name).filter(|j| !j.record().finished).cloned()
    }

    fn job_of(&self, name: &str, role: Role, call: &str) -> Result<Arc<Job>, RpcError> {
        match self.active_job(name) {
            Some(j) if j.record().role == role => Ok(j),
            Some(j) => Err(RpcError::op_invalid(format!(
                "{call}: VM '{name}''s migration job is the {:?} side, in phase {}",
                j.record().role,
                j.phase().as_str()
            ))),
            None => Err(RpcError::op_invalid(format!("{call}: VM '{name}' has no migration job"))),
        }
    }

    fn new_job(&self, rec: JobRecord) -> Result<Arc<Job>, RpcError> {
        let job = Job::create(&self.dir, rec)?;
        lock(&self.jobs).insert(job.record().name, job.clone());
        Ok(job)
    }

    /// Forgets VM `name` (its process must be gone).
    pub(crate) fn forget(&self, name: &str) {
        lock(&self.vms).remove(name);
        self.dir.remove_vm(name);
    }

    fn define(&self, args: Args<'_>) -> Result<Value, RpcError> {
        let name = args.str("name")?;
        check_name(name)?;
        let kind = Kind::parse(args.str("kind")?)?;
        let ram_size = args.u64("ram-size")?;
        if ram_size == 0 {
            return Err(RpcError::invalid("argument 'ram-size' must not be 0"));
        }
        let extra_args = match args.get("extra-args") {
            None => vec![],
            Some(v) => serde_json::from_value::<Vec<String>>(v.clone())
                .map_err(|_| RpcError::invalid("argument 'extra-args' must be an array of strings"))?,
        };
        let uuid = match args.opt_str("uuid")? {
            Some(u) => parse_uuid(u)?,
            None => random_uuid()?,
        };
        if let Some(e) = lock(&self.vms).get(name) {
            if e.proc.as_ref().is_some_and(|p| p.alive()) {
                return Err(RpcError::op_invalid(format!("VM '{name}' already exists and runs")));
            }
        }
        let def = VmDef { name: name.to_string(), kind, uuid, ram_size, extra_args };
        self.dir.save_def(&def)?;
        let proc = match VmProc::spawn(&def, &self.dir, &self.bin, false) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                self.dir.remove_vm(name);
                return Err(e);
            }
        };
        let pid = proc.pid();
        lock(&self.vms).insert(name.to_string(), Entry { def: def.clone(), proc: Some(proc) });
        Ok(json!({ "name": def.name, "uuid": def.uuid, "kind": def.kind, "pid": pid }))
    }

    fn list(&self) -> Vec<Value> {
        let entries: Vec<Entry> = lock(&self.vms).values().cloned().collect();
        entries
            .into_iter()
            .map(|e| {
                let job = self.active_job(&e.def.name).map(|j| j.phase().as_str());
                let mut v = json!({
                    "name": e.def.name, "kind": e.def.kind, "uuid": e.def.uuid, "state": "shutoff", "job": job,
                });
                if let Some(p) = e.proc.filter(|p| p.alive()) {
                    let state = p.execute("query-status", None).map(|s| s["status"].clone());
                    v["state"] = state.unwrap_or_else(|e| json!(format!("unknown ({e})")));
                    if e.def.kind == Kind::Vm {
                        let g = p.execute("x-qmig-query-guest", None).unwrap_or(Value::Null);
                        v["counter"] = g["counter"].clone();
                        v["checksum_ok"] = g["checksum_ok"].clone();
                    }
                }
                v
            })
            .collect()
    }

    fn destroy(&self, name: &str) -> Result<Value, RpcError> {
        let entry = lock(&self.vms).get(name).cloned().ok_or_else(|| Self::no_domain(name))?;
        if let Some(p) = entry.proc {
            p.kill();
        }
        self.forget(name);
        if let Some(j) = self.active_job(name) {
            j.finish(Some("the VM was destroyed".into()))?;
        }
        Ok(json!({}))
    }

    fn begin3(&self, args: Args<'_>) -> Result<Value, RpcError> {
        let name = args.str("name")?;
        let flags = flags_arg(args)?;
        let vm = self.vm(name)?;
        if let Some(j) = self.active_job(name) {
            return Err(RpcError::op_invalid(format!(
                "VM '{name}' already has a migration job in phase {}",
                j.phase().as_str()
            )));
        }
        self.check_transport(&flags)?;
        let def = vm.def().clone();
        let caps = vm.execute("query-migrate-capabilities", None)?;
        let params = vm.execute("query-migrate-parameters", None)?;
        let ram_files = match def.kind {
            Kind::Qemu => migrate::memory_backend_paths(&substituted_args(&def, self.dir.root())),
            Kind::Vm => vec![],
        };
        migrate::check_supported(name, &flags, &caps, &params, &ram_files)?;
        let running = vm.execute("query-status", None)?["status"] == "running";
        self.new_job(JobRecord {
            saved_parameters: None,
            name: name.to_string(),
            role: Role::Source,
            phase: Phase::Begin3,
            flags,
            uri: None,
            peer: args.opt_str("peer")?.map(String::from),
            peer_host_uuid: None,
            was_running: running,
            statistics: None,
            events: vec![],
            finished: false,
            error: None,
        })?;
        let mut cookie = Cookie::new(&self.host, name, &def.uuid, def.ram_size);
        cookie.kind = Some(def.kind.as_str().into());
        cookie.running = Some(running);
        Ok(json!({ "description": def, "cookie": cookie.to_json() }))
    }

    fn prepare3(&self, args: Args<'_>, conn: Option<u64>) -> Result<Value, RpcError> {
        let def: VmDef = serde_json::from_value(args.get("description").cloned().unwrap_or(Value::Null))
            .map_err(|e| RpcError::invalid(format!("the VM description is malformed: {e}")))?;
        check_name(&def.name)?;
        let cookie = Cookie::parse(args.get("cookie"), "begin3", &self.host)?;
        cookie.check_vm("begin3", &def.name, &def.uuid)?;
        let flags = flags_arg(args)?;
        self.check_transport(&flags)?;
        let name = def.name.clone();
        if lock(&self.vms).get(&name).is_some_and(|e| e.proc.as_ref().is_some_and(|p| p.alive())) {
            return Err(RpcError::op_invalid(format!("VM '{name}' already exists on {}", self.host.hostname)));
        }
        if let Some(j) = self.active_job(&name) {
            return Err(RpcError::op_invalid(format!(
                "VM '{name}' has a migration job in phase {}",
                j.phase().as_str()
            )));
        }
        let job = self.new_job(JobRecord {
            saved_parameters: None,
            name: name.clone(),
            role: Role::Destination,
            phase: Phase::Prepare,
            flags: flags.clone(),
            uri: None,
            peer: None,
            peer_host_uuid: Some(cookie.host_uuid.clone()),
            was_running: cookie.running.unwrap_or(false),
            statistics: None,
            events: vec![],
            finished: false,
            error: None,
        })?;
        let started = (|| {
            self.dir.save_def(&def)?;
            let vm = Arc::new(VmProc::spawn(&def, &self.dir, &self.bin, true)?);
            lock(&self.vms).insert(name.clone(), Entry { def: def.clone(), proc: Some(vm.clone()) });
            Ok::<_, RpcError>(vm)
        })();
        let result = started.and_then(|vm| {
            let r = (|| {
                fault_point(&self.dir, "prepare")?;
                vm.execute("migrate-set-capabilities", Some(flags.capabilities()))?;
                let mut params = flags.parameters();
                if let Some(o) = params.as_object_mut() {
                    o.remove("max-bandwidth");
                    o.remove("max-postcopy-bandwidth");
                }
                if params.as_object().is_some_and(|o| !o.is_empty()) {
                    vm.execute("migrate-set-parameters", Some(params))?;
                }
                let uri = self.incoming_uri(&job, &vm, &flags)?;
                job.update(|r| r.uri = Some(uri.clone()))?;
                Ok(uri)
            })();
            if r.is_err() {
                vm.kill();
            }
            r
        });
        match result {
            Ok(uri) => {
                if let Some(id) = conn {
                    lock(&self.prepared_on).insert(name.clone(), id);
                }
                let mut c = Cookie::new(&self.host, &name, &def.uuid, def.ram_size);
                c.kind = Some(def.kind.as_str().into());
                Ok(json!({ "uri": uri, "cookie": c.to_json() }))
            }
            Err(e) => {
                self.tunnels.close(&name);
                self.forget(&name);
                let _ = job.finish(Some(e.desc.clone()));
                Err(e)
            }
        }
    }

    fn perform3(&self, args: Args<'_>) -> Result<Value, RpcError> {
        let name = args.str("name")?;
        let uri = args.str("uri")?;
        let job = self.job_of(name, Role::Source, "perform3")?;
        if job.phase() != Phase::Begin3 {
            return Err(RpcError::op_invalid(format!(
                "perform3: VM '{name}''s job is in phase {}",
                job.phase().as_str()
            )));
        }
        let vm = self.vm(name)?;
        let def = vm.def().clone();
        let cookie = Cookie::parse(args.get("cookie"), "prepare3", &self.host)?;
        cookie.check_vm("prepare3", name, &def.uuid)?;
        let flags = job.record().flags;
        job.update(|r| {
            r.phase = Phase::Perform3;
            r.uri = Some(uri.to_string());
            r.peer_host_uuid = Some(cookie.host_uuid.clone());
        })?;
        vm.take_events();
        let result = self.run_migration(&job, &vm, &flags, uri);
        let events: Vec<String> = vm.take_events().iter().map(event_name).collect();
        job.update(|r| r.events.extend(events.iter().cloned()))?;
        let stats = match result {
            Ok(s) => s,
            Err(e) => {
                // As libvirt's qemuMigrationSrcPerformPhase: a failed Perform3 puts the source
                // back at once (the migration ended, the parameters reset, the VM resumed if
                // it ran) and ends the job, rather than waiting for a Confirm3 (cancelled)
                // that a lost client or driver never sends; a later one finds no job.
                self.tunnels.close(name);
                job.set_phase(Phase::Confirm3Cancelled)?;
                if let Err(re) = self.resume_source(name, &job) {
                    tracing::warn!(vm = name, error = %re, "perform3 failed and the source VM was not resumed");
                }
                let _ = job.finish(Some(e.desc.clone()));
                return Err(e);
            }
        };
        job.update(|r| {
            r.statistics = Some(stats.clone());
            r.phase = Phase::Perform3Done;
        })?;
        fault_point(&self.dir, "perform3_done")?;
        let mut c = Cookie::new(&self.host, name, &def.uuid, def.ram_size);
        c.statistics = Some(stats);
        c.events = Some(events);
        Ok(json!({ "cookie": c.to_json() }))
    }

    /// Perform's action: capabilities and parameters, `stop` unless live, `migrate`, wait.
    fn run_migration(&self, job: &Job, vm: &VmProc, flags: &MigrateFlags, uri: &str) -> Result<Value, RpcError> {
        vm.execute("migrate-set-capabilities", Some(flags.capabilities()))?;
        let params = flags.parameters();
        if let Some(o) = params.as_object().filter(|o| !o.is_empty()) {
            // Keep what these parameters were, to put back if the migration fails.
            let before = vm.execute("query-migrate-parameters", None)?;
            let saved: Map<String, Value> =
                o.keys().filter_map(|k| before.get(k).map(|v| (k.clone(), v.clone()))).collect();
            job.update(|r| r.saved_parameters = Some(Value::Object(saved)))?;
            vm.execute("migrate-set-parameters", Some(params))?;
        }
        if !flags.live && vm.execute("query-status", None)?["status"] == "running" {
            vm.execute("stop", None)?;
        }
        let out = self.outgoing_uri(job, uri)?;
        vm.execute("migrate", Some(json!({ "uri": out })))?;
        let mut switched = false;
        loop {
            let info = vm.execute("query-migrate", None)?;
            match status_of(&info) {
                "completed" => return Ok(info),
                s @ ("failed" | "cancelled") => {
                    let why = info["error-desc"].as_str().map(|d| format!(": {d}")).unwrap_or_default();
                    return Err(RpcError::failed(format!("VM {}: migration {s}{why}", vm.def().name)));
                }
                "active" if flags.postcopy && !switched && info["ram"]["dirty-sync-count"].as_u64() >= Some(2) => {
                    vm.execute("migrate-start-postcopy", None)?;
                    switched = true;
                }
                // As libvirt: Perform ends at the switch, so that Finish starts the guest on the
                // destination while its remaining pages arrive; Confirm waits for the end.
                "postcopy-active" => return Ok(info),
                _ => {}
            }
            std::thread::sleep(POLL);
        }
    }

    fn finish3(&self, args: Args<'_>) -> Result<Value, RpcError> {
        let name = args.str("name")?;
        let cancelled = args.flag("cancelled")?;
        let job = self.job_of(name, Role::Destination, "finish3")?;
        fault_point(&self.dir, "finish3")?;
        {
            // From here Finish3 decides the incoming VM's fate, not its Prepare3 connection.
            let mut bound = lock(&self.prepared_on);
            if job.record().finished {
                return Err(RpcError::op_invalid(format!("finish3: VM '{name}''s migration job is over")));
            }
            bound.remove(name);
            job.set_phase(Phase::Finish3)?;
        }
        let vm = lock(&self.vms).get(name).and_then(|e| e.proc.clone());
        // The guest ran here in postcopy: a failure from then on leaves the VM (libvirt's doKill = false).
        let resumed_in_postcopy = std::cell::Cell::new(false);
        let result = (|| {
            if cancelled {
                return Err(RpcError::failed("the source cancelled the migration"));
            }
            let vm = vm.clone().ok_or_else(|| RpcError::failed(format!("VM '{name}' is gone")))?;
            Cookie::parse(args.get("cookie"), "perform3", &self.host)?.check_vm("perform3", name, &vm.def().uuid)?;
            let t0 = Instant::now();
            let paused = job.record().flags.paused;
            let mut resumed = false;
            let info = loop {
                let info = vm.execute("query-migrate", None)?;
                match status_of(&info) {
                    "completed" => break info,
                    // Postcopy: the guest runs here from now on, faulting in what has not arrived yet.
                    "postcopy-active" if !paused && !resumed => {
                        vm.execute("cont", None)?;
                        resumed = true;
                        resumed_in_postcopy.set(true);
                        fault_point(&self.dir, "finish3_resumed")?;
                    }
                    s @ ("failed" | "cancelled") => {
                        return Err(RpcError::failed(format!("VM {name}: the incoming migration {s}")))
                    }
                    s if t0.elapsed() > FINISH_TIMEOUT => {
                        return Err(RpcError::failed(format!(
                            "VM {name}: the incoming migration is still {s} after {FINISH_TIMEOUT:?}"
                        )))
                    }
                    _ => std::thread::sleep(POLL),
                }
            };
            if !paused && !resumed && vm.execute("query-status", None)?["status"] != "running" {
                vm.execute("cont", None)?;
            }
            let events: Vec<String> = vm.take_events().iter().map(event_name).collect();
            job.update(|r| {
                r.statistics = Some(info.clone());
                r.events = events.clone();
            })?;
            let def = vm.def();
            let mut c = Cookie::new(&self.host, name, &def.uuid, def.ram_size);
            c.statistics = Some(info);
            c.events = Some(events);
            Ok(c)
        })();
        // The stream is over (completed, or the VM is being killed): the tunnel, if any, goes.
        self.tunnels.close(name);
        match result {
            Ok(c) => {
                job.finish(None)?;
                Ok(json!({ "cookie": c.to_json() }))
            }
            Err(e) if resumed_in_postcopy.get() => {
                // libvirt's qemuMigrationDstPostcopyFailed: the guest ran here and its source
                // cannot take it back; killing it would lose it. The VM stays for the operator.
                let desc =
                    format!("postcopy failed after the guest resumed here (the VM is left as it is): {}", e.desc);
                tracing::error!(vm = name, "finish3: {desc}");
                let _ = job.finish(Some(desc.clone()));
                Err(RpcError::new(e.class, desc))
            }
            Err(e) => {
                // The incoming VM never ran the guest: kill it, the source keeps (or resumes) it.
                if let Some(vm) = vm {
                    vm.kill();
                }
                self.forget(name);
                let _ = job.finish(Some(e.desc.clone()));
                if cancelled {
                    Ok(json!({ "cookie": null, "cancelled": true }))
                } else {
                    Err(e)
                }
            }
        }
    }

    fn confirm3(&self, args: Args<'_>) -> Result<Value, RpcError> {
        let name = args.str("name")?;
        let cancelled = args.flag("cancelled")?;
        let job = match self.job_of(name, Role::Source, "confirm3") {
            Ok(j) => j,
            // Begin never created a job: nothing to undo.
            Err(_) if cancelled => return Ok(json!({})),
            Err(e) => return Err(e),
        };
        fault_point(&self.dir, "confirm3")?;
        self.tunnels.close(name);
        let mut cancelled = cancelled;
        if cancelled {
            // libvirt's qemuMigrationSrcConfirmPhase: after a switch to postcopy there is no
            // way back; a migration QEMU reports completed succeeded whatever Finish3 said.
            let status =
                self.vm(name).and_then(|vm| vm.execute("query-migrate", None)).map(|i| status_of(&i).to_string());
            let r = job.record();
            let switched = r.statistics.as_ref().is_some_and(|s| status_of(s).starts_with("postcopy"))
                || r.events.iter().any(|e| e == "MIGRATION:postcopy-active");
            match cancelled_confirm(status.as_deref().unwrap_or("none"), switched) {
                CancelledConfirm::Resume => {}
                CancelledConfirm::ForceSuccess => {
                    tracing::warn!(
                        vm = name,
                        "confirm3: Finish3 failed, but the postcopy migration completed: forcing success"
                    );
                    cancelled = false;
                }
                CancelledConfirm::LeavePaused => {
                    job.set_phase(Phase::Confirm3Cancelled)?;
                    let why = "postcopy failed after the switch: the source VM is left paused (no way back)";
                    tracing::error!(vm = name, "confirm3: {why}");
                    job.finish(Some(why.into()))?;
                    return Ok(json!({}));
                }
            }
        }
        if cancelled {
            job.set_phase(Phase::Confirm3Cancelled)?;
            let r = self.resume_source(name, &job);
            let _ = job.finish(Some(r.as_ref().err().map_or_else(|| "cancelled".to_string(), |e| e.desc.clone())));
            return r.map(|()| json!({}));
        }
        if let Some(c) = args.get("cookie") {
            if let Err(e) = Cookie::parse(Some(c), "finish3", &self.host) {
                tracing::warn!(vm = name, error = %e, "confirm3: the finish3 cookie is not valid; the destination runs");
            }
        }
        job.set_phase(Phase::Confirm3)?;
        let mut stats = Value::Null;
        let mut events = vec![];
        if let Ok(vm) = self.vm(name) {
            // A postcopy migration is over when the source says so.
            match self.wait_source_end(&vm) {
                Ok(info) => stats = info,
                Err(e) => tracing::warn!(vm = name, error = %e, "confirm3: the source's migration did not complete"),
            }
            events = vm.take_events().iter().map(event_name).collect();
            vm.quit(QUIT_TIMEOUT);
        }
        self.forget(name);
        job.update(|r| {
            r.events.extend(events.iter().cloned());
            if !stats.is_null() {
                r.statistics = Some(stats.clone());
            }
        })?;
        job.finish(None)?;
        Ok(json!({ "statistics": stats, "events": events }))
    }

    /// Confirm3: waits while the source's migration is still in postcopy; its final statistics.
    fn wait_source_end(&self, vm: &VmProc) -> Result<Value, RpcError> {
        let t0 = Instant::now();
        loop {
            let info = vm.execute("query-migrate", None)?;
            match status_of(&info) {
                "postcopy-active" | "postcopy-paused" | "postcopy-recover" if t0.elapsed() < FINISH_TIMEOUT => {
                    std::thread::sleep(POLL)
                }
                _ => return Ok(info),
            }
        }
    }

    /// Confirm3 (cancelled): ends a migration still running and resumes a VM that was running at Begin.
    fn resume_source(&self, name: &str, job: &Job) -> Result<(), RpcError> {
        let vm = self.vm(name)?;
        let info = vm.execute("query-migrate", None)?;
        if !matches!(status_of(&info), "none" | "completed" | "failed" | "cancelled") {
            vm.execute("migrate_cancel", None)?;
            let t0 = Instant::now();
            while !matches!(status_of(&vm.execute("query-migrate", None)?), "failed" | "cancelled" | "completed") {
                if t0.elapsed() > Duration::from_secs(30) {
                    return Err(RpcError::failed(format!(
                        "VM {name}: the migration does not end after migrate_cancel"
                    )));
                }
                std::thread::sleep(POLL);
            }
        }
        // As libvirt's qemuMigrationParamsReset: the parameters this job set go back.
        if let Some(saved) = job.record().saved_parameters.filter(|p| p.as_object().is_some_and(|o| !o.is_empty())) {
            if let Err(e) = vm.execute("migrate-set-parameters", Some(saved)) {
                tracing::warn!(vm = name, error = %e, "confirm3: cannot restore the migration parameters");
            }
        }
        if job.record().was_running && vm.execute("query-status", None)?["status"] != "running" {
            vm.execute("cont", None)?;
        }
        Ok(())
    }

    /// The p2p shape: this agent drives the v3 protocol against the agent at `to`. Each
    /// phase is announced on the caller's connection (`{"progress": {"phase": P}}`) as it
    /// starts, so a client that loses this agent knows the phase it died in; an error names
    /// the phase that failed (`perform3 failed: ...`).
    fn migrate_p2p(&self, args: Args<'_>, conn: Option<&rpc::Conn<'_>>) -> Result<Value, RpcError> {
        let name = args.str("name")?;
        let to = args.str("to")?;
        let mut flags = flags_arg(args)?;
        flags.p2p = true;
        let announce = |phase: &str| {
            if let Some(c) = conn {
                if let Err(e) = c.progress(json!({ "phase": phase })) {
                    tracing::debug!(error = %e, "migrate: cannot report the phase to the client");
                }
            }
        };
        announce("begin3");
        let client = rpc::Client::connect(to, Duration::from_secs(10))
            .map_err(|e| RpcError::new(e.class, format!("begin3 failed: the destination agent: {}", e.desc)))?;
        let dst = Mutex::new(client);
        migrate::run_v3(&Local(self), &dst, name, &flags, Some(to), &mut |p| {
            if p != "begin3" {
                announce(p)
            }
        })
        .map_err(|e| RpcError::new(e.error.class, e.to_string()))
    }

    /// RPC connection `id` closed: every incoming VM its Prepare3 started and no Finish3 has
    /// taken over is killed and forgotten, its job ended (libvirt's auto-destroy of the
    /// incoming domain when the connection that prepared it closes: the p2p source agent
    /// died, or the client in the direct shape). A Finish3 that began decides instead
    /// (calls on one connection run in order, so one running on this connection has
    /// answered by now).
    fn connection_closed(&self, id: u64) {
        let mut bound = lock(&self.prepared_on);
        let names: Vec<String> = bound.iter().filter(|(_, c)| **c == id).map(|(n, _)| n.clone()).collect();
        for name in names {
            bound.remove(&name);
            let Some(job) = self.active_job(&name) else { continue };
            let r = job.record();
            if r.role != Role::Destination || r.phase != Phase::Prepare {
                continue;
            }
            tracing::warn!(vm = %name, "the connection that ran Prepare3 closed before Finish3: killing the incoming VM");
            self.tunnels.close(&name);
            if let Some(vm) = self.proc_of(&name) {
                vm.kill();
            }
            self.forget(&name);
            let why = "the connection that ran Prepare3 closed before Finish3; the incoming VM was killed";
            if let Err(e) = job.finish(Some(why.into())) {
                tracing::warn!(vm = %name, error = %e, "cannot record the job's end");
            }
        }
    }

    fn setspeed(&self, args: Args<'_>) -> Result<Value, RpcError> {
        let name = args.str("name")?;
        let bw = args.u64("bandwidth")?;
        let vm = self.vm(name)?;
        vm.execute("migrate-set-parameters", Some(json!({ "max-bandwidth": bw })))?;
        if let Some(j) = self.active_job(name) {
            j.update(|r| r.flags.bandwidth = Some(bw >> 20))?;
        }
        Ok(json!({}))
    }

    fn cancel(&self, name: &str) -> Result<Value, RpcError> {
        let job = self.job_of(name, Role::Source, "migrate-cancel")?;
        self.before_cancel(&job);
        self.vm(name)?.execute("migrate_cancel", None)?;
        Ok(json!({}))
    }

    fn jobinfo(&self, name: &str) -> Result<Value, RpcError> {
        let job = match lock(&self.jobs).get(name).cloned() {
            Some(j) => j,
            None => return Err(RpcError::op_invalid(format!("VM '{name}' has no migration job"))),
        };
        let r = job.record();
        let live = !r.finished && matches!(r.phase, Phase::Perform3 | Phase::Prepare);
        let stats = match self.vm(name) {
            Ok(vm) if live => vm.execute("query-migrate", None).ok().or(r.statistics.clone()),
            _ => r.statistics.clone(),
        };
        let mut info = json!({
            "name": r.name, "role": r.role, "phase": r.phase, "finished": r.finished, "error": r.error,
            "flags": r.flags, "statistics": stats, "events": r.events,
        });
        // A tunnelled job's relay: the bytes it carried each way so far.
        if let Some(t) = self.tunnels.get(name) {
            info["tunnel"] = json!({ "forward-bytes": t.forward_bytes(), "backward-bytes": t.backward_bytes() });
        }
        Ok(info)
    }
}

/// What Confirm3 (cancelled) does with the source VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelledConfirm {
    /// Cancel a migration still running and resume the VM if it ran at Begin3.
    Resume,
    /// The migration switched to postcopy and QEMU reports it completed: Confirm3 as if
    /// Finish3 had succeeded (the source goes).
    ForceSuccess,
    /// Still in postcopy (`postcopy-active`, `postcopy-paused`, ...): the guest's state is
    /// split between the hosts; neither cancel nor resume, leave it paused.
    LeavePaused,
}

/// Confirm3 (cancelled)'s decision from the source's `query-migrate` status and whether the
/// migration switched to postcopy, as libvirt's `qemuMigrationSrcConfirmPhase` decides.
pub fn cancelled_confirm(status: &str, switched: bool) -> CancelledConfirm {
    if status.starts_with("postcopy") {
        CancelledConfirm::LeavePaused
    } else if status == "completed" && switched {
        CancelledConfirm::ForceSuccess
    } else {
        CancelledConfirm::Resume
    }
}

/// The agent as the source [`migrate::Peer`] of a p2p migration it drives.
struct Local<'a>(&'a Agent);

impl migrate::Peer for Local<'_> {
    fn call(&self, call: &str, args: Value) -> Result<Value, RpcError> {
        let empty = serde_json::Map::new();
        self.0.dispatch(call, Args(args.as_object().unwrap_or(&empty)))
    }
}

struct Handler(Arc<Agent>);

impl rpc::Handler for Handler {
    fn call(&self, call: &str, args: Args<'_>) -> Result<Value, RpcError> {
        self.0.dispatch(call, args)
    }

    fn call_on(&self, conn: &rpc::Conn<'_>, call: &str, args: Args<'_>) -> Result<Value, RpcError> {
        self.0.dispatch_on(Some(conn), call, args)
    }

    fn closed(&self, conn_id: u64) {
        self.0.connection_closed(conn_id);
    }

    fn is_stream(&self, call: &str) -> bool {
        call == tunnel::TUNNEL_CALL
    }

    fn stream(&self, req: &Value, conn: std::net::TcpStream, pending: Vec<u8>) {
        tunnel::accept_data_connection(&self.0.tunnels, req, conn, pending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_events() {
        assert!(check_name("vm-1.a_b").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(event_name(&json!({"event": "MIGRATION", "data": {"status": "setup"}})), "MIGRATION:setup");
        assert_eq!(event_name(&json!({"event": "STOP"})), "STOP");
    }

    #[test]
    fn cancelled_confirm_follows_libvirt() {
        use CancelledConfirm::*;
        for status in ["none", "active", "failed", "cancelled", "setup"] {
            for switched in [false, true] {
                assert_eq!(cancelled_confirm(status, switched), Resume, "{status} {switched}");
            }
        }
        // Precopy that completed but Finish3 failed: the destination was killed, resume here.
        assert_eq!(cancelled_confirm("completed", false), Resume);
        // Postcopy that completed: the destination has the whole guest.
        assert_eq!(cancelled_confirm("completed", true), ForceSuccess);
        for status in ["postcopy-active", "postcopy-paused", "postcopy-recover"] {
            assert_eq!(cancelled_confirm(status, true), LeavePaused, "{status}");
        }
    }
}
