//! `qmig demo` with a real KVM guest (the default where `/dev/kvm` works): a
//! [`minivmm`] VM runs the guest program in this process and migrates live, with
//! KVM's dirty log, to a `qmig kvm-dest` process that loads RAM and vCPU state,
//! resumes the guest and reports, at least a second later, its counter and
//! whether the guest's own checksum over its working set still holds.

use crate::demo::{connect_retry, spawn_listening, spawn_progress, wait_report, work_dir};
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::Outgoing;
use engine::vm::VcpuControl;
use minivmm::layout::Layout;
use minivmm::{guest, GuestConfig, Vm};
use qmig::{Error, Result};
use serde_json::{json, Value};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use transports::{CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};

/// Options of the KVM demo.
#[derive(Debug, Clone)]
pub struct KvmDemoOptions {
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// KVM memory slots (1, or 2 split around the scaled-down PCI hole).
    pub slots: u32,
    /// Bytes of the guest's working set.
    pub working_set: u64,
    /// Bytes/s of page writes by the guest.
    pub dirty_rate: u64,
    /// Transport (`unix:` or `tcp:`); default a unix socket in the work directory.
    pub uri: Option<String>,
    /// Migration parameters.
    pub params: MigrationParameters,
    /// `auto-converge` (throttles the vCPU).
    pub auto_converge: bool,
    /// Seed of the working set and the guest's page choice.
    pub seed: u64,
    /// How long the guest runs on the destination before it is read (≥ 1 s).
    pub run_on: Duration,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

fn vm_err(e: minivmm::VmError) -> Error {
    Error::Usage(format!("KVM guest: {}", engine::error::report(&e)))
}

/// Run the KVM demo; returns the statistics (`query-migrate` names, `"verified"`,
/// `"guest"`) and whether everything checked out.
pub fn demo(opts: &KvmDemoOptions, cancel: &CancelToken) -> Result<(Value, bool)> {
    let layout = Layout::with_slots(opts.ram_size, opts.slots).map_err(|e| Error::Usage(e.to_string()))?;
    let dir = work_dir()?;
    let uri: MigrationUri = match &opts.uri {
        Some(u) => u.parse().map_err(|e: transports::UriError| Error::Transport(e.into()))?,
        None => MigrationUri::Unix(dir.0.join("migrate.sock")),
    };
    if !matches!(uri, MigrationUri::Tcp { .. } | MigrationUri::Unix(_)) {
        return Err(Error::Usage("the demo migrates over tcp: or unix: URIs".into()));
    }

    let mut vm = Vm::new(layout).map_err(vm_err)?;
    vm.boot(GuestConfig { working_set: opts.working_set, dirty_rate: opts.dirty_rate, seed: opts.seed })
        .map_err(vm_err)?;
    vm.vcpus().resume().map_err(|e| Error::Usage(format!("KVM guest: {}", engine::error::report(&e))))?;
    let booted = Instant::now();

    let (mut child, uri) = start_dest(opts, &uri)?;
    let params = SharedParameters::new(opts.params.clone()).map_err(|e| Error::Usage(e.to_string()))?;
    let caps = MigrationCapabilities { auto_converge: opts.auto_converge, ..Default::default() };
    let out = Outgoing::new(params, caps).map_err(Error::Io)?.with_cancel(cancel.clone());
    // Let the guest get going before the migration starts.
    std::thread::sleep(Duration::from_millis(200).saturating_sub(booted.elapsed()));
    let ch = match connect_retry(&uri, out.cancel()) {
        Ok(c) => c,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let progress = opts.progress.then(|| spawn_progress(out.clone()));
    let res = minivmm::migrate::migrate_out(&vm, &out, ch);
    if let Some((stop, h)) = progress {
        let _ = stop.send(());
        let _ = h.join();
    }
    let info = match res {
        Ok(i) => i,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::outgoing(e));
        }
    };

    // The source vCPU stopped for good at switchover: this is the guest at stop.
    let at_stop = vm.control().map_err(vm_err)?;
    let ran = booted.elapsed().saturating_sub(info.downtime.unwrap_or_default()).as_secs_f64();
    let achieved = if ran > 0.0 { (at_stop.writes as f64 * 4096.0 / ran) as u64 } else { 0 };
    let src_digest = guest::digest_volatile(&vm.ram());
    let src_sum_ok = if at_stop.busy { None } else { Some(vm.working_set_sum().map_err(vm_err)? == at_stop.checksum) };
    drop(vm);

    let dest = wait_report(&mut child, "qmig kvm-dest")?;
    let dst_digest = dest["ram_digest"].as_str().unwrap_or("");
    let ram_equal = dst_digest == format!("{src_digest:016x}");
    let on_dest = dest["counter"].as_u64().unwrap_or(0);
    let checksum_ok = dest["checksum_ok"].as_bool() == Some(true);
    let verified = ram_equal && checksum_ok && on_dest > at_stop.counter && src_sum_ok != Some(false);
    let mut stats = info.to_json();
    stats["verified"] = json!(verified);
    stats["guest"] = json!({
        "kind": "kvm",
        "slots": opts.slots,
        "working-set": opts.working_set,
        "dirty-rate": opts.dirty_rate,
        "dirty-rate-achieved": achieved,
        "counter_at_stop": at_stop.counter,
        "writes_at_stop": at_stop.writes,
        "counter_on_destination": on_dest,
        "checksum_ok": checksum_ok,
        "ram_equal_at_stop": ram_equal,
        "ran_on_destination_ms": dest["ran_ms"],
    });
    stats["destination"] = dest;
    Ok((stats, verified))
}

fn start_dest(opts: &KvmDemoOptions, uri: &MigrationUri) -> Result<(Child, MigrationUri)> {
    let exe = std::env::current_exe().map_err(Error::Io)?;
    let mut cmd = Command::new(exe);
    cmd.args(["kvm-dest", "--from", &uri.to_string()])
        .args(["--ram-size", &opts.ram_size.to_string(), "--slots", &opts.slots.to_string()])
        .args(["--run-on", &opts.run_on.as_millis().to_string()]);
    spawn_listening(cmd, "qmig kvm-dest")
}

/// `qmig kvm-dest`: an empty VM with `ram_size`/`slots` listens on `uri`
/// (`on_listening` gets the bound URI), loads the incoming guest, takes a digest of
/// its RAM, resumes it, lets it run `run_on`, stops it at a point where no write is
/// in progress and reports its counter and whether its checksum holds.
pub fn dest(
    ram_size: u64,
    slots: u32,
    uri: &MigrationUri,
    run_on: Duration,
    cancel: &CancelToken,
    on_listening: impl FnOnce(&MigrationUri),
) -> Result<Value> {
    let layout = Layout::with_slots(ram_size, slots).map_err(|e| Error::Usage(e.to_string()))?;
    let mut vm = Vm::new(layout).map_err(vm_err)?;
    let listener = Listener::bind(uri, cancel).map_err(Error::transport)?;
    on_listening(listener.local_uri());
    let ch = listener.accept().map_err(Error::transport)?;
    let start = Instant::now();
    let reader = MigrationReader::new(ch, RateLimit::new(0));
    let report = minivmm::migrate::migrate_in(&mut vm, reader, false).map_err(Error::incoming)?;
    let loaded_ms = start.elapsed().as_millis() as u64;
    let digest = guest::digest_volatile(&vm.ram());
    let loaded = vm.control().map_err(vm_err)?;
    let mut vcpus = vm.vcpus();
    if report.runstate.as_deref().is_none_or(|r| r == "running") {
        vcpus.resume().map_err(|e| Error::incoming(e.on(engine::vm::VmmPart::Vcpu("resume")).into()))?;
    }
    let resumed = Instant::now();
    while resumed.elapsed() < run_on {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (now, ok) = vm.stop_and_check().map_err(vm_err)?;
    Ok(json!({
        "ram_digest": format!("{digest:016x}"),
        "counter_loaded": loaded.counter,
        "counter": now.counter,
        "writes": now.writes,
        "checksum_ok": ok,
        "load_ms": loaded_ms,
        "ran_ms": resumed.elapsed().as_millis() as u64,
        "runstate": report.runstate,
    }))
}
