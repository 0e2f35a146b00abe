//! `qmig vm`: minivmm's KVM guest as a long-lived process driven over QMP, as
//! `qemu-system-x86_64 -qmp unix:PATH -incoming defer|URI` is.
//!
//! The run states (`query-status`) and the migration commands follow QEMU 7.2:
//! `prelaunch` (`-S`), `running`, `paused`, `inmigrate` (with `--incoming`),
//! `finish-migrate` (the source stopped for its switchover), `postmigrate` (after
//! a completed migration). Events: `STOP` and `RESUME` whenever the vCPUs stop or
//! start for a command or a migration, `MIGRATION` and `MIGRATION_PASS` with
//! capability `events` (and `MIGRATION` `setup` on `migrate-incoming` always, as
//! 7.2 does), `SHUTDOWN` on `quit`. Every refusal is QEMU's class and wording.
//! A failed incoming load ends the process with status 1, as QEMU's does.
//! Postcopy (`postcopy-ram`, `migrate-start-postcopy`) is the engine's: the
//! destination takes guest RAM's missing pages through userfaultfd.
//! Multifd (capability `multifd`, `multifd-*` parameters) is the engine's: the
//! source opens `multifd-channels` more connections to a `tcp:`/`unix:` URI, the
//! destination accepts them after the main one, in any order.
//!
//! `x-qmig-query-guest` (ours) reads the guest program's counters and checks its
//! checksums as `qmig kvm-dest` does: the vCPUs stopped where no write is in
//! progress, briefly, when they are running (no events).

use crate::qmp::{mistyped, Args, Events, Handler, QmpError, QmpResult};
use engine::incoming::{channel_return_path, Incoming};
use engine::memory::RamRegion;
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::Outgoing;
use engine::state::{MigrationStatus, Notification};
use engine::vm::{DeviceHandler, VcpuControl, VmParts, VmmError};
use minivmm::{GuestConfig, Vcpus, Vm};
use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use transports::{CancelToken, Channel, Listener, MigrationReader, MigrationUri, RateLimit};

/// Every capability name QEMU 7.2 knows (`MigrationCapability`); the ones the
/// engine does not implement are refused when turned on.
pub const QEMU_CAPABILITIES: &[&str] = &[
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "compress",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "block",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
];

/// The parameters QEMU 7.2 declares `uint8` (larger values are refused as such).
const UINT8_PARAMETERS: &[&str] = &[
    "throttle-trigger-threshold",
    "cpu-throttle-initial",
    "cpu-throttle-increment",
    "max-cpu-throttle",
    "multifd-channels",
];

/// How `qmig vm` starts.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// KVM memory slots (1, or 2 split around the scaled-down PCI hole).
    pub slots: u32,
    /// vCPUs.
    pub vcpus: usize,
    /// The guest program (ignored with `incoming`: the guest comes from the stream).
    pub guest: GuestConfig,
    /// `-S`: do not start the vCPUs (runstate `prelaunch`) until `cont`.
    pub paused: bool,
    /// `-incoming`: `defer` (wait for `migrate-incoming`) or a URI to listen on now.
    pub incoming: Option<String>,
    /// `-name`: reported by `query-name`.
    pub name: Option<String>,
    /// `-uuid`: reported by `query-uuid` (QEMU's default is all zeros).
    pub uuid: Option<String>,
}

/// QEMU's run states that this VM goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// `prelaunch`: never started (`-S`).
    Prelaunch,
    /// `running`.
    Running,
    /// `paused`: stopped by `stop`, or loaded from a running source without autostart.
    Paused,
    /// `inmigrate`: waiting for, or loading, an incoming migration.
    Inmigrate,
    /// `finish-migrate`: the source stopped for the switchover.
    FinishMigrate,
    /// `postmigrate`: a migration out completed.
    Postmigrate,
}

impl RunState {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Inmigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::Postmigrate => "postmigrate",
        }
    }

    fn from_globalstate(s: &str) -> RunState {
        match s {
            "prelaunch" => RunState::Prelaunch,
            "postmigrate" => RunState::Postmigrate,
            _ => RunState::Paused,
        }
    }
}

/// The destination side as `query-migrate` shows it.
#[derive(Debug, Clone, Default)]
struct IncomingView {
    /// The engine's state machine status once the source connected (`setup` before: no status shown).
    status: Option<MigrationStatus>,
    /// `socket-address` while listening and loading.
    address: Option<Value>,
}

struct State {
    run: RunState,
    /// QEMU's `autostart`: start the guest after an incoming migration (`-S` clears it, `cont` sets it).
    autostart: bool,
    caps: MigrationCapabilities,
    /// The last (or current) outgoing migration.
    outgoing: Option<Outgoing>,
    /// `migrate-incoming` (or `-incoming URI`) has been started once.
    incoming_started: bool,
    incoming: IncomingView,
    /// Whether the vCPUs were running when the migration stopped them (QEMU's `vm_was_running`).
    was_running: bool,
}

/// The VM and its monitor state, shared by the QMP clients and the migration threads.
pub struct VmMonitor {
    name: Option<String>,
    uuid: String,
    vm: Arc<RwLock<Vm>>,
    vcpus: Vcpus,
    state: Arc<Mutex<State>>,
    params: SharedParameters,
    events: Events,
    quit: crossbeam_channel::Sender<()>,
    /// Descriptors passed by `getfd`, for `fd:NAME` URIs.
    fds: crate::qmp::Fds,
}

/// A VMM or engine failure as a `GenericError`, with its causes.
fn vm_error(e: impl std::error::Error + 'static) -> QmpError {
    QmpError::generic(engine::error::report(&e))
}

/// The migration's vCPU control: emits `STOP`/`RESUME` and keeps the run state,
/// and leaves a guest that was not running alone (a failed migration resumes
/// only a guest that ran, as QEMU's `vm_was_running`).
struct MonitoredVcpus {
    inner: Vcpus,
    state: Arc<Mutex<State>>,
    events: Events,
    /// Incoming side: a resume happens only with `autostart`.
    incoming: bool,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VcpuControl for MonitoredVcpus {
    fn stop(&mut self) -> Result<(), VmmError> {
        let state = self.state.clone();
        let mut st = lock(&state);
        st.was_running = st.run == RunState::Running;
        if st.was_running {
            self.inner.stop()?;
            self.events.emit("STOP", None);
        }
        st.run = RunState::FinishMigrate;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        let state = self.state.clone();
        let mut st = lock(&state);
        if self.incoming {
            if st.autostart {
                self.inner.resume()?;
                st.run = RunState::Running;
                self.events.emit("RESUME", None);
            } else {
                st.run = RunState::Paused;
            }
            return Ok(());
        }
        if st.was_running {
            self.inner.resume()?;
            st.run = RunState::Running;
            self.events.emit("RESUME", None);
        } else if st.run == RunState::FinishMigrate {
            st.run = RunState::Paused;
        }
        Ok(())
    }

    fn set_throttle(&mut self, percentage: u8) -> Result<(), VmmError> {
        self.inner.set_throttle(percentage)
    }
}

/// Forward the engine's notifications as QMP events (`MIGRATION`, `MIGRATION_PASS`) when `events` is on.
fn forward_events(sm: &engine::state::StateMachine, events: &Events, on: bool) {
    if !on {
        return;
    }
    let ev = events.clone();
    sm.on_notify(move |n| match n {
        Notification::State { to, .. } => ev.emit("MIGRATION", Some(json!({ "status": to.as_str() }))),
        Notification::Pass { pass } => ev.emit("MIGRATION_PASS", Some(json!({ "pass": pass }))),
        _ => {}
    });
}

/// `socket-address` as QEMU 7.2 shows a listening address in `query-migrate`.
fn socket_address(uri: &MigrationUri) -> Option<Value> {
    match uri {
        MigrationUri::Unix(p) => Some(json!([{ "path": p.to_string_lossy(), "type": "unix" }])),
        MigrationUri::Tcp { host, port } => {
            let family = if host.contains(':') { "ipv6" } else { "ipv4" };
            Some(json!([{ "port": port.to_string(), family: true, "host": host, "type": "inet" }]))
        }
        _ => None,
    }
}

/// `query-migrate` of a source, with QEMU 7.2's `ram` members the engine does
/// not count (no zero-copy: 0) filled in; the engine's own additions go under
/// `x-qmig-` names.
fn qemu_shaped(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        if let Some(rp) = o.remove("return-path") {
            o.insert("x-qmig-return-path".into(), rp);
        }
        // QEMU 7.2 shows nothing but the status during setup, and the status and
        // the error once failed or cancelled.
        match o.get("status").and_then(Value::as_str) {
            Some("setup" | "failed" | "cancelled") => o.retain(|k, _| k == "status" || k == "error-desc"),
            // The downtime is known once the guest stopped, but QEMU shows it at completion only.
            Some("completed") => {}
            _ => drop(o.remove("downtime")),
        }
        if let Some(ram) = o.get_mut("ram").and_then(Value::as_object_mut) {
            for k in ["postcopy-requests", "multifd-bytes", "dirty-sync-missed-zero-copy"] {
                ram.entry(k).or_insert(json!(0));
            }
        }
    }
    v
}

impl VmMonitor {
    /// Create the VM (booted unless incoming; running unless `paused` or incoming);
    /// events go to `events`, a `quit` to `quit`.
    pub fn new(opts: &VmOptions, events: Events, quit: crossbeam_channel::Sender<()>) -> crate::Result<Arc<Self>> {
        let layout = minivmm::layout::Layout::with_slots(opts.ram_size, opts.slots)
            .map_err(|e| crate::Error::Usage(e.to_string()))?;
        let verr = |e: minivmm::VmError| crate::Error::Usage(format!("KVM guest: {}", engine::error::report(&e)));
        let mut vm = Vm::with_vcpus(layout, opts.vcpus).map_err(verr)?;
        let vcpus = vm.vcpus();
        let run = if opts.incoming.is_some() {
            RunState::Inmigrate
        } else {
            vm.boot(opts.guest).map_err(verr)?;
            if opts.paused {
                RunState::Prelaunch
            } else {
                vcpus.clone().resume().map_err(|e| crate::Error::Usage(format!("KVM guest: {e}")))?;
                RunState::Running
            }
        };
        let state = State {
            run,
            autostart: !opts.paused,
            caps: MigrationCapabilities::default(),
            outgoing: None,
            incoming_started: false,
            incoming: IncomingView::default(),
            was_running: false,
        };
        let params =
            SharedParameters::new(MigrationParameters::default()).map_err(|e| crate::Error::Usage(e.to_string()))?;
        let uuid = opts.uuid.clone().unwrap_or_else(|| "00000000-0000-0000-0000-000000000000".into());
        let m = Arc::new(VmMonitor {
            name: opts.name.clone(),
            uuid,
            vm: Arc::new(RwLock::new(vm)),
            vcpus,
            state: Arc::new(Mutex::new(state)),
            params,
            events,
            quit,
            fds: crate::qmp::Fds::default(),
        });
        if let Some(uri) = opts.incoming.as_deref().filter(|u| *u != "defer") {
            m.start_incoming(uri).map_err(|e| crate::Error::Usage(format!("-incoming {uri}: {}", e.desc)))?;
        }
        Ok(m)
    }

    /// The state, with a completed migration's `postmigrate` in place: whoever saw
    /// `completed` sees the run state that goes with it (the migration thread sets it
    /// too, a moment later).
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = lock(&self.state);
        if st.run == RunState::FinishMigrate
            && st.outgoing.as_ref().is_some_and(|o| o.state().status() == MigrationStatus::Completed)
        {
            st.run = RunState::Postmigrate;
        }
        st
    }

    fn query_status(&self) -> Value {
        let run = self.lock().run;
        json!({ "status": run.as_str(), "singlestep": false, "running": run == RunState::Running })
    }

    fn stop(&self) -> QmpResult {
        let mut st = self.lock();
        match st.run {
            RunState::Inmigrate => st.autostart = false,
            RunState::Running => {
                self.vcpus.clone().stop().map_err(vm_error)?;
                st.run = RunState::Paused;
                self.events.emit("STOP", None);
            }
            _ => {}
        }
        Ok(json!({}))
    }

    fn cont(&self) -> QmpResult {
        let mut st = self.lock();
        match st.run {
            RunState::FinishMigrate => Err(QmpError::generic("Migration is not finalized yet")),
            RunState::Inmigrate => {
                st.autostart = true;
                Ok(json!({}))
            }
            RunState::Running => Ok(json!({})),
            RunState::Prelaunch | RunState::Paused | RunState::Postmigrate => {
                self.vcpus.clone().resume().map_err(vm_error)?;
                st.run = RunState::Running;
                self.events.emit("RESUME", None);
                Ok(json!({}))
            }
        }
    }

    fn outgoing_active(st: &State) -> bool {
        st.outgoing.as_ref().is_some_and(|o| {
            let s = o.state().status();
            s != MigrationStatus::None && !s.is_terminal()
        })
    }

    fn migrate(self: &Arc<Self>, args: &Args<'_>) -> QmpResult {
        args.only(&["uri", "blk", "inc", "detach", "resume"])?;
        let uri = args.str("uri")?;
        let (blk, inc) = (args.opt_bool("blk")?, args.opt_bool("inc")?);
        // `detach` is accepted and ignored, as QEMU 7.2 does.
        args.opt_bool("detach")?;
        if args.opt_bool("resume")? == Some(true) {
            // Only a paused postcopy migration can be resumed; qmig has none.
            return Err(QmpError::generic("Cannot resume if there is no paused migration"));
        }
        if blk == Some(true) || inc == Some(true) {
            return Err(QmpError::generic(
                "qmig vm has no block devices: blk and inc (block migration) are not supported",
            ));
        }
        let mut st = self.lock();
        if Self::outgoing_active(&st) {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        match st.run {
            RunState::Inmigrate => return Err(QmpError::generic("Guest is waiting for an incoming migration")),
            RunState::Postmigrate => {
                return Err(QmpError::generic("Can't migrate the vm that was paused due to previous migration"))
            }
            _ => {}
        }
        let parsed = self.migration_uri(uri, false);
        let runstate = match st.run {
            RunState::Running => "running",
            RunState::Prelaunch => "prelaunch",
            _ => "paused",
        };
        let out = Outgoing::new(self.params.clone(), st.caps)
            .map_err(vm_error)?
            .with_runstate(runstate)
            .with_uuid(self.uuid_bytes());
        forward_events(out.state(), &self.events, st.caps.events);
        // As QEMU 7.2: `setup` (and its event) before the reply.
        out.begin_setup().map_err(vm_error)?;
        st.outgoing = Some(out.clone());
        drop(st);
        let parsed = match parsed {
            Ok(p) => p,
            Err(e) => {
                // QEMU 7.2 fails the migration it has just set up (an `fd:` error is its error-desc).
                if uri.starts_with("fd:") {
                    out.info().update(|i| i.error_desc = Some(e.desc.clone()));
                }
                let _ = out.state().transition_from_current(MigrationStatus::Failed);
                return Err(e);
            }
        };
        if out.caps().multifd {
            if let Err(e) = engine::multifd::check_uri(&parsed) {
                // QEMU 7.2 (migrate_fd_connect): `migrate` succeeds, the migration fails
                // at once and the reason goes to stderr; we show it as error-desc too.
                eprintln!("multifd is not supported by current protocol");
                out.info().update(|i| i.error_desc = Some(e));
                let _ = out.state().transition_from_current(MigrationStatus::Failed);
                return Ok(json!({}));
            }
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || me.run_outgoing(out, parsed))
            .map_err(vm_error)?;
        Ok(json!({}))
    }

    /// The main connection and, with capability `multifd`, the `multifd-channels`
    /// connections after it to the same URI, each announcing itself (its initial
    /// packet) as it connects, as QEMU 7.2's source does.
    fn connect_all(out: &Outgoing, uri: &MigrationUri) -> Result<(Channel, Option<Vec<Channel>>), String> {
        let ch = transports::connect(uri, out.cancel()).map_err(|e| engine::error::report(&e))?;
        if !out.caps().multifd {
            return Ok((ch, None));
        }
        let n = out.params().get().multifd_channels;
        let channels = (0..n)
            .map(|id| {
                let c = transports::connect(uri, out.cancel()).map_err(|e| engine::error::report(&e))?;
                engine::multifd::announce(&c, id, out.uuid()).map_err(|e| format!("multifd channel {id}: {e}"))?;
                Ok(c)
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok((ch, Some(channels)))
    }

    fn run_outgoing(&self, out: Outgoing, uri: MigrationUri) {
        let (ch, channels) = match Self::connect_all(&out, &uri) {
            Ok(c) => c,
            Err(e) => {
                if out.cancel().is_cancelled() {
                    let _ = out.state().transition_from_current(MigrationStatus::Cancelled);
                } else {
                    // As QEMU: the migration fails from setup with the reason.
                    out.info().update(|i| i.error_desc = Some(e));
                    let _ = out.state().transition_from_current(MigrationStatus::Failed);
                }
                return;
            }
        };
        let vm = self.vm.read().unwrap_or_else(|e| e.into_inner());
        let mut vcpus = MonitoredVcpus {
            inner: self.vcpus.clone(),
            state: self.state.clone(),
            events: self.events.clone(),
            incoming: false,
        };
        let result = (|| {
            let region = vm.region().map_err(|e| engine::source::EngineError::Vmm(VmmError::new(e)))?;
            let mut cpus = vm.cpu_devices();
            let mut ram = [RamRegion::new(&region).with_dirty(vm.dirty_log())];
            let devices = cpus.iter_mut().map(|c| c as &mut dyn DeviceHandler).collect();
            let mut parts = VmParts { devices, ..Default::default() };
            match channels {
                Some(channels) => out.run_multifd_announced(ch, channels, &mut ram, &mut vcpus, &mut parts),
                None => out.run_vm(ch, &mut ram, &mut vcpus, &mut parts),
            }
        })();
        match result {
            // `lock` settles the run state to `postmigrate` (unless a `cont` already came).
            Ok(_) => drop(self.lock()),
            Err(e) => tracing::warn!(error = %engine::error::report(&e), "qmig vm: migration failed"),
        }
    }

    /// A `migrate`/`migrate-incoming` URI. `fd:NAME` takes the descriptor `getfd`
    /// kept as NAME (QEMU 7.2: `migrate` always by name; `migrate-incoming` by
    /// name, or a number for an inherited descriptor when NAME starts with a digit).
    fn migration_uri(&self, uri: &str, incoming: bool) -> Result<MigrationUri, QmpError> {
        let invalid = || QmpError::generic("Parameter 'uri' expects a valid migration protocol");
        match uri.strip_prefix("fd:") {
            Some(name) if !(incoming && name.starts_with(|c: char| c.is_ascii_digit())) => {
                use std::os::fd::IntoRawFd;
                let fd = self
                    .fds
                    .take(name)
                    .ok_or_else(|| QmpError::generic(format!("File descriptor named '{name}' has not been found")))?;
                // The transport owns it from here (it closes it when the channel ends).
                Ok(MigrationUri::Fd(fd.into_raw_fd()))
            }
            Some(number) => {
                uri.parse().map_err(|_| QmpError::generic(format!("Invalid file descriptor number '{number}'")))
            }
            None => uri.parse().map_err(|_| invalid()),
        }
    }

    fn migrate_incoming(self: &Arc<Self>, args: &Args<'_>) -> QmpResult {
        args.only(&["uri"])?;
        let uri = args.str("uri")?;
        self.start_incoming(uri).map(|()| json!({}))
    }

    fn start_incoming(self: &Arc<Self>, uri: &str) -> Result<(), QmpError> {
        let mut st = self.lock();
        if st.incoming_started {
            return Err(QmpError::generic("The incoming migration has already been started"));
        }
        if st.run != RunState::Inmigrate {
            return Err(QmpError::generic("'-incoming' was not specified on the command line"));
        }
        let parsed = self.migration_uri(uri, true)?;
        let cancel = CancelToken::new().map_err(vm_error)?;
        let listener = Listener::bind(&parsed, &cancel).map_err(|e| QmpError::generic(engine::error::report(&e)))?;
        st.incoming_started = true;
        st.incoming.address = socket_address(listener.local_uri());
        drop(st);
        // QEMU 7.2 announces the setup on the destination whatever the capability.
        self.events.emit("MIGRATION", Some(json!({ "status": "setup" })));
        let me = self.clone();
        std::thread::Builder::new()
            .name("incoming".into())
            .spawn(move || me.run_incoming(listener))
            .map_err(vm_error)?;
        Ok(())
    }

    /// The source's main connection and, with capability `multifd` as it is when
    /// that connection arrives (QEMU 7.2 reads it then), the `multifd-channels`
    /// connections after it in any order, each identified by its initial packet
    /// (checked against `multifd-channels` and `multifd-compression`).
    /// `-uuid` as bytes, for the multifd channels' initial packets (checked at startup).
    fn uuid_bytes(&self) -> [u8; 16] {
        savevm_format::multifd::parse_uuid(&self.uuid).unwrap_or_default()
    }

    fn accept_incoming(
        listener: Listener,
        state: &Mutex<State>,
        params: &SharedParameters,
        uuid: [u8; 16],
    ) -> Result<(Channel, Option<engine::multifd::IncomingChannels>), String> {
        let report = |e: transports::TransportError| engine::error::report(&e);
        let multifd = || lock(state).caps.multifd;
        if engine::multifd::check_uri(listener.local_uri()).is_err() {
            let ch = listener.accept().map_err(report)?;
            if multifd() {
                // QEMU 7.2 prints this and never loads; qmig vm fails the load instead.
                eprintln!("multifd is not supported by current protocol");
                return Err("multifd is not supported by current protocol (multifd needs tcp: or unix:)".into());
            }
            return Ok((ch, None));
        }
        let ch = listener.accept_another().map_err(report)?;
        if !multifd() {
            // As QEMU: no more connections are taken.
            drop(listener);
            return Ok((ch, None));
        }
        let p = params.get();
        let expect = savevm_format::multifd::ChannelExpect {
            uuid,
            channels: p.multifd_channels,
            compression: p.multifd_compression,
        };
        let channels =
            engine::multifd::IncomingChannels::accept(expect, &RateLimit::new(0), || listener.accept_another())
                .map_err(|e| engine::error::report(&e))?;
        Ok((ch, Some(channels)))
    }

    fn run_incoming(&self, listener: Listener) {
        // With capability postcopy-ram here, a source switching to postcopy is followed
        // (guest RAM registered with userfaultfd, the vCPUs run from POSTCOPY_RUN).
        let postcopy = lock(&self.state).caps.postcopy_ram;
        let incoming = if postcopy {
            Incoming::new(true).with_postcopy(engine::postcopy_dest::PostcopyOptions::default())
        } else {
            Incoming::new(true)
        };
        let (st, ev) = (self.state.clone(), self.events.clone());
        incoming.state.on_notify(move |n| {
            let mut st = lock(&st);
            // `completed` is published once the run state is final (below), as QEMU does.
            if let Notification::State { to, .. } = *n {
                if to == MigrationStatus::Completed {
                    return;
                }
                st.incoming.status = Some(to);
                // A destination reads the capability when it emits (it may be set late).
                if st.caps.events {
                    ev.emit("MIGRATION", Some(json!({ "status": to.as_str() })));
                }
            }
        });
        let result =
            Self::accept_incoming(listener, &self.state, &self.params, self.uuid_bytes()).and_then(|(ch, channels)| {
                let mut vm = self.vm.write().unwrap_or_else(|e| e.into_inner());
                let mut vcpus = MonitoredVcpus {
                    inner: self.vcpus.clone(),
                    state: self.state.clone(),
                    events: self.events.clone(),
                    incoming: true,
                };
                let mut cpus = vm.cpu_devices();
                let devices = cpus.iter_mut().map(|c| c as &mut dyn DeviceHandler).collect();
                let mut parts = VmParts { devices, ..Default::default() };
                let open = channel_return_path(&ch);
                if let Some(channels) = channels {
                    // A failing channel stops the main channel's load at once.
                    let main = ch.return_path().ok();
                    let channels = channels.on_failure(move || {
                        if let Some(m) = &main {
                            let _ = m.shutdown(std::net::Shutdown::Read);
                        }
                    });
                    let reader = MigrationReader::new(ch, RateLimit::new(0));
                    return incoming
                        .run_multifd(reader, channels, &mut vm.sink(), &mut parts, &mut vcpus, open)
                        .map_err(|e| engine::error::report(&e));
                }
                let reader = MigrationReader::new(ch, RateLimit::new(0));
                if postcopy {
                    incoming.run_postcopy(reader, &mut vm.sink(), &mut parts, &mut vcpus, open)
                } else {
                    incoming.run_with_return_path(reader, &mut vm.sink(), &mut parts, &mut vcpus, open)
                }
                .map_err(|e| engine::error::report(&e))
            });
        match result {
            Ok(report) => {
                let mut st = self.lock();
                if !report.resumed && st.run == RunState::Inmigrate {
                    st.run = report.runstate.as_deref().map_or(RunState::Paused, RunState::from_globalstate);
                }
                // As QEMU 7.2: the run state first, then `completed` (and the address gone).
                st.incoming.status = Some(MigrationStatus::Completed);
                st.incoming.address = None;
                if st.caps.events {
                    self.events.emit("MIGRATION", Some(json!({ "status": "completed" })));
                }
            }
            Err(e) => {
                // As QEMU 7.2: a failed load ends the process.
                eprintln!("qmig vm: load of migration failed: {e}");
                std::process::exit(1);
            }
        }
    }

    fn query_migrate(&self) -> Value {
        let st = self.lock();
        let mut v = match &st.outgoing {
            Some(o) if o.state().status() != MigrationStatus::None => qemu_shaped(o.info().get().to_json()),
            _ => json!({}),
        };
        if v.get("status").is_none() {
            if let Some(s) = st.incoming.status {
                v["status"] = s.as_str().into();
            }
            if let Some(a) = &st.incoming.address {
                v["socket-address"] = a.clone();
            }
        }
        v
    }

    fn caps_json(caps: &MigrationCapabilities) -> Map<String, Value> {
        match serde_json::to_value(caps) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        }
    }

    fn set_capabilities(&self, args: &Args<'_>) -> QmpResult {
        args.only(&["capabilities"])?;
        let list = match args.get("capabilities") {
            None => return Err(QmpError::generic("Parameter 'capabilities' is missing")),
            Some(v) => v.as_array().ok_or_else(|| mistyped("capabilities", "array"))?,
        };
        let mut st = self.lock();
        if Self::outgoing_active(&st) {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        let mut map = Self::caps_json(&st.caps);
        for (i, item) in list.iter().enumerate() {
            let o = item.as_object().ok_or_else(|| mistyped(&format!("capabilities[{i}]"), "object"))?;
            let name = match o.get("capability") {
                None => return Err(QmpError::generic(format!("Parameter 'capabilities[{i}].capability' is missing"))),
                Some(v) => v.as_str().ok_or_else(|| mistyped(&format!("capabilities[{i}].capability"), "string"))?,
            };
            let state = match o.get("state") {
                None => return Err(QmpError::generic(format!("Parameter 'capabilities[{i}].state' is missing"))),
                Some(v) => v.as_bool().ok_or_else(|| mistyped(&format!("capabilities[{i}].state"), "boolean"))?,
            };
            if let Some(k) = o.keys().find(|k| *k != "capability" && *k != "state") {
                return Err(QmpError::generic(format!("Parameter 'capabilities[{i}].{k}' is unexpected")));
            }
            if !QEMU_CAPABILITIES.contains(&name) && !map.contains_key(name) {
                return Err(QmpError::generic(format!("Parameter 'capability' does not accept value '{name}'")));
            }
            match map.get_mut(name) {
                Some(slot) => *slot = state.into(),
                None if !state => {}
                None => {
                    return Err(QmpError::generic(format!("Migration capability '{name}' is not supported by qmig vm")))
                }
            }
        }
        let caps: MigrationCapabilities = serde_json::from_value(Value::Object(map)).map_err(vm_error)?;
        if caps.postcopy_ram && caps.multifd {
            // QEMU 7.2 takes the pair and runs multifd pre-copy, but a destination it
            // switches to postcopy aborts; later QEMUs refuse the pair here, in these words.
            return Err(QmpError::generic("Postcopy is not yet compatible with multifd"));
        }
        st.caps = caps;
        Ok(json!({}))
    }

    /// All of QEMU 7.2's capabilities in its order (those the engine lacks are
    /// `false`), then any the engine has that QEMU 7.2 does not.
    fn query_capabilities(&self) -> Value {
        let caps = self.lock().caps;
        let mut have = Self::caps_json(&caps);
        let mut list: Vec<Value> = QEMU_CAPABILITIES
            .iter()
            .map(|name| json!({ "state": have.remove(*name).unwrap_or(Value::Bool(false)), "capability": name }))
            .collect();
        list.extend(have.into_iter().map(|(k, v)| json!({ "state": v, "capability": k })));
        Value::Array(list)
    }

    fn set_parameters(&self, args: &Args<'_>) -> QmpResult {
        let current = match serde_json::to_value(self.params.get()) {
            Ok(Value::Object(m)) => m,
            _ => return Err(QmpError::generic("parameters cannot be read")),
        };
        let mut next = current.clone();
        for (k, v) in args.0 {
            let Some(cur) = current.get(k) else {
                return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
            };
            let v = match cur {
                Value::Bool(_) => v.as_bool().ok_or_else(|| mistyped(k, "boolean"))?.into(),
                Value::Number(_) => {
                    // QEMU's integer visitor: a negative number wraps to uint64.
                    let n = v
                        .as_u64()
                        .or_else(|| v.as_i64().map(|i| i as u64))
                        .ok_or_else(|| QmpError::generic(format!("Parameter '{k}' expects uint64")))?;
                    if UINT8_PARAMETERS.contains(&k.as_str()) && n > u8::MAX.into() {
                        return Err(QmpError::generic(format!("Parameter '{k}' expects uint8_t")));
                    }
                    n.into()
                }
                Value::String(_) => {
                    let text = v.as_str().ok_or_else(|| mistyped(k, "string"))?;
                    // The enum (`multifd-compression`): QEMU's visitor names the value it refuses.
                    let mut probe = current.clone();
                    probe.insert(k.clone(), v.clone());
                    if serde_json::from_value::<MigrationParameters>(Value::Object(probe)).is_err() {
                        return Err(QmpError::generic(format!("Parameter '{k}' does not accept value '{text}'")));
                    }
                    v.clone()
                }
                _ => v.clone(),
            };
            next.insert(k.clone(), v);
        }
        let p: MigrationParameters = serde_json::from_value(Value::Object(next))
            .map_err(|e| QmpError::generic(format!("Invalid parameter value: {e}")))?;
        self.params.update(|x| *x = p.clone()).map_err(|e| QmpError::generic(e.to_string()))?;
        // Effective now, as QEMU sets the running migration's rate limit at once.
        if let Some(o) = &self.lock().outgoing {
            o.rate().set_max_bandwidth(p.max_bandwidth);
        }
        Ok(json!({}))
    }

    fn migrate_cancel(&self) -> QmpResult {
        let st = self.lock();
        if let Some(o) = &st.outgoing {
            if Self::outgoing_active(&st) {
                // As QEMU 7.2: `cancelling` at once; the migration thread ends it `cancelled`.
                let _ = o.state().transition_from_current(MigrationStatus::Cancelling);
                o.cancel().cancel();
            }
        }
        Ok(json!({}))
    }

    fn migrate_continue(&self, args: &Args<'_>) -> QmpResult {
        args.only(&["state"])?;
        let want = args.str("state")?;
        let want: MigrationStatus = serde_json::from_value(json!(want))
            .map_err(|_| QmpError::generic(format!("Parameter 'state' does not accept value '{want}'")))?;
        let st = self.lock();
        let current = st.outgoing.as_ref().map_or(MigrationStatus::None, |o| o.state().status());
        if current != want {
            return Err(QmpError::generic(format!("Migration not in expected state: {}", current.as_str())));
        }
        if let (Some(o), MigrationStatus::PreSwitchover) = (&st.outgoing, want) {
            o.continue_switchover().map_err(vm_error)?;
        }
        Ok(json!({}))
    }

    /// QEMU's `migrate-start-postcopy`: the capability first, then a migration started.
    fn start_postcopy(&self) -> QmpResult {
        let st = self.lock();
        if !st.caps.postcopy_ram {
            return Err(QmpError::generic("Enable postcopy with migrate_set_capability before the start of migration"));
        }
        match &st.outgoing {
            Some(o) if o.state().status() != MigrationStatus::None => {
                o.start_postcopy().map(|()| json!({})).map_err(|e| QmpError::generic(e.to_string()))
            }
            _ => Err(QmpError::generic("Postcopy must be started after migration has been started")),
        }
    }

    fn query_guest(&self) -> QmpResult {
        let vm =
            self.vm.try_read().map_err(|_| QmpError::generic("the guest is being loaded by an incoming migration"))?;
        let st = self.lock();
        if st.run == RunState::Inmigrate {
            return Err(QmpError::generic("Guest is waiting for an incoming migration"));
        }
        let per_vcpu: Vec<(minivmm::Control, Option<bool>)> = if Self::outgoing_active(&st) {
            // The migration owns the vCPUs: counters only.
            vm.controls().map_err(vm_error)?.into_iter().map(|c| (c, None)).collect()
        } else if st.run == RunState::Running {
            let all = vm.stop_and_check_all().map_err(vm_error)?;
            self.vcpus.clone().resume().map_err(vm_error)?;
            all.into_iter().map(|(c, ok)| (c, Some(ok))).collect()
        } else {
            let controls = vm.controls().map_err(vm_error)?;
            controls
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    // A vCPU stopped mid-write has its checksum off by that write.
                    let ok = if c.busy { None } else { vm.working_set_sum_of(i).ok().map(|s| s == c.checksum) };
                    (c, ok)
                })
                .collect()
        };
        let vcpus: Vec<Value> = per_vcpu
            .iter()
            .enumerate()
            .map(|(i, (c, ok))| json!({ "vcpu": i, "counter": c.counter, "writes": c.writes, "checksum_ok": ok }))
            .collect();
        let all_ok = per_vcpu.iter().try_fold(true, |acc, (_, ok)| ok.map(|o| acc && o));
        Ok(json!({
            "counter": per_vcpu.first().map(|(c, _)| c.counter),
            "checksum_ok": all_ok,
            "vcpus": vcpus,
        }))
    }
}

/// The monitor's commands.
pub const COMMANDS: &[&str] = &[
    "query-status",
    "stop",
    "cont",
    "quit",
    "migrate",
    "migrate-incoming",
    "query-migrate",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate_cancel",
    "migrate-continue",
    "migrate-start-postcopy",
    "x-qmig-query-guest",
    "query-name",
    "query-uuid",
];

/// The QMP handler of one [`VmMonitor`].
pub struct VmHandler(pub Arc<VmMonitor>);

impl Handler for VmHandler {
    fn execute(&self, command: &str, args: &Args<'_>) -> QmpResult {
        let m = &self.0;
        if !matches!(
            command,
            "migrate" | "migrate-incoming" | "migrate-set-capabilities" | "migrate-set-parameters" | "migrate-continue"
        ) {
            args.only(&[])?;
        }
        match command {
            "query-status" => Ok(m.query_status()),
            "stop" => m.stop(),
            "cont" => m.cont(),
            "quit" => {
                m.events.emit("SHUTDOWN", Some(json!({ "guest": false, "reason": "host-qmp-quit" })));
                Ok(json!({}))
            }
            "migrate" => m.migrate(args),
            "migrate-incoming" => m.migrate_incoming(args),
            "query-migrate" => Ok(m.query_migrate()),
            "migrate-set-capabilities" => m.set_capabilities(args),
            "query-migrate-capabilities" => Ok(m.query_capabilities()),
            "migrate-set-parameters" => m.set_parameters(args),
            "query-migrate-parameters" => serde_json::to_value(m.params.get()).map_err(vm_error),
            "migrate_cancel" => m.migrate_cancel(),
            "migrate-continue" => m.migrate_continue(args),
            "migrate-start-postcopy" => m.start_postcopy(),
            "x-qmig-query-guest" => m.query_guest(),
            "query-name" => Ok(m.name.as_ref().map_or_else(|| json!({}), |n| json!({ "name": n }))),
            "query-uuid" => Ok(json!({ "UUID": m.uuid })),
            c => Err(QmpError::not_found(format!("The command {c} has not been found"))),
        }
    }

    fn commands(&self) -> Vec<&'static str> {
        COMMANDS.to_vec()
    }

    fn after_quit(&self) {
        let _ = self.0.quit.send(());
    }

    fn fds(&self) -> Option<&crate::qmp::Fds> {
        Some(&self.0.fds)
    }
}

/// Run `qmig vm` until `quit` (or `cancel`): the VM, its QMP socket at `qmp`.
pub fn run(opts: &VmOptions, qmp: &std::path::Path, cancel: &CancelToken) -> crate::Result<()> {
    let server = crate::qmp::Server::bind(qmp).map_err(|source| crate::Error::File { path: qmp.into(), source })?;
    let (quit_tx, quit_rx) = crossbeam_channel::bounded(1);
    let monitor = VmMonitor::new(opts, server.events(), quit_tx)?;
    let handler: Arc<dyn Handler> = Arc::new(VmHandler(monitor.clone()));
    let server = Arc::new(server);
    let s = server.clone();
    std::thread::Builder::new().name("qmp".into()).spawn(move || s.serve(handler)).map_err(crate::Error::Io)?;
    loop {
        match quit_rx.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(()) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) if cancel.is_cancelled() => break,
            Err(_) => {}
        }
    }
    // A migration still running is cancelled; the process ends (the VM with it).
    if let Some(o) = &monitor.lock().outgoing {
        o.cancel().cancel();
    }
    let _ = std::fs::remove_file(qmp);
    Ok(())
}
