//! `qmig demo` with a real KVM guest (the default where `/dev/kvm` works): a
//! [`minivmm`] VM runs the guest program on each of its vCPUs in this process and
//! migrates live, with KVM's dirty log, to a `qmig kvm-dest` process that loads
//! RAM and every vCPU's state, resumes the guest and reports, at least a second
//! later, each vCPU's counter and whether its own checksum over its slice of the
//! working set still holds.

use crate::demo::{
    connect_retry, connect_uri, io_timeout_arg, multifd_args, multifd_channels, spawn_listening, wait_report, work_dir,
};
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::Outgoing;
use engine::vm::VcpuControl;
use minivmm::layout::Layout;
use minivmm::{guest, GuestConfig, Vm};
use qmig::{Error, Result};
use serde_json::{json, Value};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use transports::{CancelToken, Listener, MigrationUri};

/// Options of the KVM demo.
#[derive(Debug, Clone)]
pub struct KvmDemoOptions {
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// KVM memory slots (1, or 2 split around the scaled-down PCI hole).
    pub slots: u32,
    /// vCPUs, each running the guest program on its own slice of the working set.
    pub vcpus: usize,
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
    /// Capability `return-path`: the source completes only after the destination's SHUT(0).
    pub return_path: bool,
    /// Capability `xbzrle` (cache size in `params`).
    pub xbzrle: bool,
    /// Guest RAM on transparent huge pages where offered (both VMs).
    pub huge_pages: bool,
    /// Seed of the working set and the guest's page choice.
    pub seed: u64,
    /// How long the guest runs on the destination before it is read (≥ 1 s).
    pub run_on: Duration,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// A whole-migration deadline (virsh's `--timeout`).
    pub timeout: Option<qmig::watch::Timeout>,
    /// The channel's io timeout (`--io-timeout`), on both ends.
    pub channel: transports::ChannelOptions,
    /// Where the source connects, when not to the URI the destination listens on
    /// (`--connect`: a proxy or tunnel in between).
    pub connect: Option<String>,
    /// Capability `multifd` with this many channels (compression in `params`).
    pub multifd: Option<u8>,
    /// TLS on both ends (QEMU's `tls-creds`, `tls-hostname`, `tls-authz`).
    pub tls: Option<transports::TlsParams>,
    /// Capability `postcopy-ram` on both ends, with the switch after this long (or
    /// after the first pass if sooner): the guest runs on the destination while its
    /// pages arrive (`qmig demo --postcopy [--postcopy-after SECS]`).
    pub postcopy: Option<Duration>,
    /// Boot this raw firmware image instead of the guest program (QEMU's `-bios
    /// FILE`; one vCPU, one slot): verified by RAM equal at arrival and the guest
    /// writing on at the destination.
    pub bios: Option<std::path::PathBuf>,
}

/// Where a firmware guest's progress is read: page 16, offset 0 (the fixtures'
/// busy-bios.bin writes its 16-bit loop counter there, and into pages 17..143).
pub const FIRMWARE_PROBE: u64 = 16 * 4096;

fn read_bios(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Usage(format!("--bios {}: {e}", path.display())))
}

/// A firmware guest's progress marks: the word at [`FIRMWARE_PROBE`] and vCPU 0's CX.
fn firmware_marks(vm: &Vm) -> Result<(u16, u16)> {
    let mut w = [0u8; 2];
    vm.read_ram(FIRMWARE_PROBE, &mut w).map_err(vm_err)?;
    let cpu = vm.cpu_devices();
    let cx = match cpu.first() {
        Some(c) => c.state().map_err(|e| Error::Usage(format!("KVM guest: {}", engine::error::report(&e))))?.regs.rcx,
        None => 0,
    };
    Ok((u16::from_le_bytes(w), cx as u16))
}

fn vm_err(e: minivmm::VmError) -> Error {
    Error::Usage(format!("KVM guest: {}", engine::error::report(&e)))
}

/// Run the KVM demo; returns the statistics (`query-migrate` names, `"verified"`,
/// `"guest"`) and whether everything checked out.
pub fn demo(opts: &KvmDemoOptions, cancel: &CancelToken) -> Result<(Value, bool)> {
    let bios = opts.bios.as_deref().map(read_bios).transpose()?;
    if bios.is_some() && (opts.slots != 1 || opts.vcpus != 1 || opts.postcopy.is_some()) {
        return Err(Error::Usage("a --bios guest runs one vCPU in one memory slot, without postcopy".into()));
    }
    let layout = Layout::with_slots(opts.ram_size, opts.slots).map_err(|e| Error::Usage(e.to_string()))?;
    let dir = work_dir()?;
    let uri: MigrationUri = match &opts.uri {
        Some(u) => u.parse().map_err(|e: transports::UriError| Error::Transport(e.into()))?,
        None => MigrationUri::Unix(dir.0.join("migrate.sock")),
    };
    if !matches!(uri, MigrationUri::Tcp { .. } | MigrationUri::Unix(_)) {
        return Err(Error::Usage("the demo migrates over tcp: or unix: URIs".into()));
    }

    let vm_options = minivmm::VmOptions { huge_pages: opts.huge_pages };
    let mut vm = Vm::with_options(layout, opts.vcpus, vm_options).map_err(vm_err)?;
    let huge_pages = vm.huge_pages();
    match &bios {
        Some(image) => {
            vm.map_firmware(image, true).map_err(vm_err)?;
        }
        None => vm
            .boot(GuestConfig { working_set: opts.working_set, dirty_rate: opts.dirty_rate, seed: opts.seed })
            .map_err(vm_err)?,
    }
    vm.vcpus().resume().map_err(|e| Error::Usage(format!("KVM guest: {}", engine::error::report(&e))))?;
    let booted = Instant::now();

    let (mut child, uri) = start_dest(opts, &uri)?;
    let params = SharedParameters::new(opts.params.clone()).map_err(|e| Error::Usage(e.to_string()))?;
    let caps = MigrationCapabilities {
        auto_converge: opts.auto_converge,
        return_path: opts.return_path,
        multifd: opts.multifd.is_some(),
        xbzrle: opts.xbzrle,
        postcopy_ram: opts.postcopy.is_some(),
        ..Default::default()
    };
    let mut out = Outgoing::new(params, caps).map_err(Error::Io)?.with_cancel(cancel.clone());
    if let Some(after) = opts.postcopy {
        out = out.with_postcopy_after(after);
    }
    // Let the guest get going before the migration starts.
    std::thread::sleep(Duration::from_millis(200).saturating_sub(booted.elapsed()));
    let to = connect_uri(opts.connect.as_deref(), &uri)?;
    let ch = match connect_retry(&to, out.cancel(), &opts.channel, opts.tls.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let progress = opts.progress.then(|| qmig::watch::Progress::outgoing(&out));
    let deadline = opts.timeout.map(|t| qmig::watch::Deadline::arm(&out, t));
    let channels = match multifd_channels(&to, opts.multifd, &out, &opts.channel, opts.tls.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let res = match channels {
        Some(c) => minivmm::migrate::migrate_out_multifd_announced(&vm, &out, ch, c),
        None => minivmm::migrate::migrate_out(&vm, &out, ch),
    };
    drop(progress);
    let timeout = deadline.map(qmig::watch::Deadline::finish_json);
    let info = match res {
        Ok(i) => i,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(qmig::watch::timeout_error(Error::outgoing(e), timeout.as_ref()));
        }
    };

    if bios.is_some() {
        return firmware_result(opts, &vm, child, info, timeout, huge_pages);
    }
    // The source vCPUs stopped for good at switchover: this is the guest at stop.
    let at_stop = vm.controls().map_err(vm_err)?;
    let ran = booted.elapsed().saturating_sub(info.downtime.unwrap_or_default()).as_secs_f64();
    let writes: u64 = at_stop.iter().map(|c| c.writes).sum();
    let achieved = if ran > 0.0 { (writes as f64 * 4096.0 / ran) as u64 } else { 0 };
    let src_digest = guest::digest_volatile(&vm.ram());
    // A vCPU stopped mid-write has its checksum off by that write until it resumes.
    let src_sum_ok = at_stop
        .iter()
        .enumerate()
        .map(|(i, c)| Ok(if c.busy { None } else { Some(vm.working_set_sum_of(i).map_err(vm_err)? == c.checksum) }))
        .collect::<Result<Vec<_>>>()?;
    drop(vm);

    let dest = wait_report(&mut child, "qmig kvm-dest")?;
    let dst_digest = dest["ram_digest"].as_str().unwrap_or("");
    // In postcopy the guest ran on the destination before its RAM was complete:
    // there is no moment where both RAMs are the guest at stop. Its own checksum
    // (over every page of its working set) and its counter are the checks then.
    let postcopy = dest["postcopy"].is_object();
    let ram_equal = postcopy || dst_digest == format!("{src_digest:016x}");
    let dest_vcpus = dest["vcpus"].as_array().cloned().unwrap_or_default();
    if dest_vcpus.len() != at_stop.len() {
        return Err(Error::Usage(format!(
            "qmig kvm-dest reported {} vCPUs, the guest has {}",
            dest_vcpus.len(),
            at_stop.len()
        )));
    }
    let vcpus: Vec<Value> = at_stop
        .iter()
        .zip(&dest_vcpus)
        .zip(&src_sum_ok)
        .enumerate()
        .map(|(i, ((s, d), src_ok))| {
            let on_dest = d["counter"].as_u64().unwrap_or(0);
            let ok = d["checksum_ok"].as_bool() == Some(true) && *src_ok != Some(false);
            json!({
                "vcpu": i,
                "counter_at_stop": s.counter,
                "writes_at_stop": s.writes,
                "counter_on_destination": on_dest,
                "checksum_ok": ok,
                "ran_on": on_dest > s.counter,
            })
        })
        .collect();
    let all_ok = vcpus.iter().all(|v| v["checksum_ok"] == true);
    let all_ran = vcpus.iter().all(|v| v["ran_on"] == true);
    let verified = ram_equal && all_ok && all_ran;
    let mut stats = qmig::send::stats_json(&info);
    stats["verified"] = json!(verified);
    if let Some(t) = timeout {
        stats["timeout"] = t;
    }
    stats["guest"] = json!({
        "kind": "kvm",
        "slots": opts.slots,
        "huge-pages": huge_pages,
        "working-set": opts.working_set,
        "dirty-rate": opts.dirty_rate,
        "dirty-rate-achieved": achieved,
        // vCPU 0's counter; every vCPU's checksum.
        "counter_at_stop": vcpus[0]["counter_at_stop"],
        "writes_at_stop": writes,
        "counter_on_destination": vcpus[0]["counter_on_destination"],
        "checksum_ok": all_ok,
        "vcpus": vcpus,
        "ram_equal_at_stop": if postcopy { Value::Null } else { json!(ram_equal) },
        "ran_on_destination_ms": dest["ran_ms"],
    });
    stats["destination"] = dest;
    Ok((stats, verified))
}

/// The end of a `--bios` demo: RAM at the destination's arrival equal to the
/// source's at stop, and the guest writing on at the destination.
fn firmware_result(
    opts: &KvmDemoOptions,
    vm: &Vm,
    mut child: Child,
    info: engine::info::MigrationInfo,
    timeout: Option<Value>,
    huge_pages: bool,
) -> Result<(Value, bool)> {
    let src_digest = format!("{:016x}", guest::digest_volatile(&vm.ram()));
    let (word, cx) = firmware_marks(vm)?;
    let vcpu_error = vm.vcpus().error();
    let dest = wait_report(&mut child, "qmig kvm-dest")?;
    let ram_equal = dest["ram_digest"].as_str() == Some(src_digest.as_str());
    let fw = &dest["firmware"];
    let ran_on = fw["ran_on"].as_bool() == Some(true);
    let verified = ram_equal && ran_on && vcpu_error.is_none() && dest["vcpu_error"].is_null();
    let mut stats = qmig::send::stats_json(&info);
    stats["verified"] = json!(verified);
    if let Some(t) = timeout {
        stats["timeout"] = t;
    }
    stats["guest"] = json!({
        "kind": "kvm",
        "bios": opts.bios.as_ref().map(|p| p.display().to_string()),
        "huge-pages": huge_pages,
        "ram_digest_at_stop": src_digest,
        "ram_digest_on_arrival": dest["ram_digest"],
        "ram_equal_at_stop": ram_equal,
        "probe_gpa": FIRMWARE_PROBE,
        "probe_word_at_stop": word,
        "cx_at_stop": cx,
        "probe_word_on_arrival": fw["probe_word_loaded"],
        "probe_word_after_run": fw["probe_word_after_run"],
        "cx_after_run": fw["cx_after_run"],
        "ran_on_destination": ran_on,
        "ran_on_destination_ms": dest["ran_ms"],
        "vcpu_error": vcpu_error,
    });
    stats["destination"] = dest;
    Ok((stats, verified))
}

fn start_dest(opts: &KvmDemoOptions, uri: &MigrationUri) -> Result<(Child, MigrationUri)> {
    let exe = std::env::current_exe().map_err(Error::Io)?;
    let mut cmd = Command::new(exe);
    cmd.args(["kvm-dest", "--from", &uri.to_string()])
        .args(["--ram-size", &opts.ram_size.to_string(), "--slots", &opts.slots.to_string()])
        .args(["--vcpus", &opts.vcpus.to_string()])
        .args(["--run-on", &opts.run_on.as_millis().to_string()])
        .args(["--io-timeout", &io_timeout_arg(&opts.channel)])
        .args(multifd_args(opts.multifd, &opts.params))
        .args(crate::tls_args::dest_args(opts.tls.as_ref()));
    if !opts.huge_pages {
        cmd.arg("--no-huge-pages");
    }
    if opts.postcopy.is_some() {
        cmd.arg("--postcopy");
    }
    if let Some(b) = &opts.bios {
        cmd.arg("--bios").arg(b);
    }
    spawn_listening(cmd, "qmig kvm-dest")
}

/// `qmig kvm-dest`: an empty VM with `ram_size`/`slots` and `vcpus` vCPUs listens
/// on `uri` (over TLS with `tls`; `on_listening` gets the bound URI), loads the incoming guest, takes a
/// digest of its RAM, resumes it, lets it run `run_on`, stops it at a point where
/// no write is in progress and reports each vCPU's counter and whether its
/// checksum holds (`vcpus`), and vCPU 0's counter and all checksums at the top.
/// The listener takes `channel`'s options (the io timeout).
/// With `multifd` (`multifd-channels`, `multifd-compression`) the channels are
/// accepted after the main one and place pages straight into guest memory.
#[allow(clippy::too_many_arguments)]
pub fn dest(
    (ram_size, slots, vcpus): (u64, u32, usize),
    vm_options: minivmm::VmOptions,
    (uri, channel): (&MigrationUri, &transports::ChannelOptions),
    (run_on, postcopy, multifd): (Duration, bool, Option<(u8, savevm_format::multifd::Compression)>),
    (tls, bios): (Option<&transports::TlsParams>, Option<&std::path::Path>),
    cancel: &CancelToken,
    on_listening: impl FnOnce(&MigrationUri),
) -> Result<Value> {
    let creds = tls.map(|t| t.server()).transpose().map_err(|e| Error::Transport(e.into()))?;
    let layout = Layout::with_slots(ram_size, slots).map_err(|e| Error::Usage(e.to_string()))?;
    let mut vm = Vm::with_options(layout, vcpus, vm_options).map_err(vm_err)?;
    // The image's read-only mapping (not migrated, as QEMU's ROM); its alias below
    // 1 MiB arrives with the RAM.
    if let Some(path) = bios {
        vm.map_firmware(&read_bios(path)?, false).map_err(vm_err)?;
    }
    let mut listener = Listener::bind(uri, cancel).map_err(Error::transport)?.with_options(*channel);
    if let Some(creds) = creds {
        listener = listener.with_tls(creds).map_err(Error::transport)?;
    }
    on_listening(listener.local_uri());
    let start = Instant::now();
    let report = if let Some((n, compression)) = multifd {
        engine::multifd::check_uri(uri).map_err(Error::Usage)?;
        if postcopy {
            return Err(Error::Usage("--multifd and --postcopy refuse each other: use one of them".into()));
        }
        let ch = listener.accept_another().map_err(Error::transport)?;
        let expect = savevm_format::multifd::ChannelExpect { uuid: [0; 16], channels: n, compression };
        let rate = transports::RateLimit::new(0);
        let channels = engine::multifd::IncomingChannels::accept(expect, &rate, || listener.accept_another())
            .map_err(|e| Error::incoming(e.into()))?;
        minivmm::migrate::migrate_in_multifd(&mut vm, ch, channels, false).map_err(Error::incoming)?
    } else if postcopy {
        let ch = listener.accept().map_err(Error::transport)?;
        // Autostart: in postcopy the guest runs from POSTCOPY_RUN on, faulting in its pages.
        let opts = engine::postcopy_dest::PostcopyOptions::default();
        // A migration that completes in pre-copy leaves the guest stopped, so that its RAM
        // digest and counters below are the guest at stop; it is resumed after them.
        let incoming = engine::incoming::Incoming::new(true).with_postcopy(opts).hold_after_precopy();
        minivmm::migrate::migrate_in_postcopy_with(&mut vm, ch, incoming).map_err(Error::incoming)?
    } else {
        let ch = listener.accept().map_err(Error::transport)?;
        minivmm::migrate::migrate_in(&mut vm, ch, false).map_err(Error::incoming)?
    };
    let loaded_ms = start.elapsed().as_millis() as u64;
    let digest = guest::digest_volatile(&vm.ram());
    if bios.is_some() {
        return firmware_run_on(&vm, report, digest, (start, loaded_ms, run_on), cancel);
    }
    let loaded = vm.controls().map_err(vm_err)?;
    let mut control = vm.vcpus();
    let resumed = run_for(&mut control, &report, run_on, cancel)?;
    let now = vm.stop_and_check_all().map_err(vm_err)?;
    let per_vcpu: Vec<Value> = now
        .iter()
        .zip(&loaded)
        .enumerate()
        .map(|(i, ((c, ok), l))| {
            json!({ "vcpu": i, "counter_loaded": l.counter, "counter": c.counter, "writes": c.writes, "checksum_ok": ok })
        })
        .collect();
    let first = now.first().map(|(c, _)| *c).unwrap_or_default();
    Ok(json!({
        "ram_digest": format!("{digest:016x}"),
        "huge_pages": vm.huge_pages(),
        "counter_loaded": loaded.first().map(|c| c.counter),
        "counter": first.counter,
        "writes": now.iter().map(|(c, _)| c.writes).sum::<u64>(),
        "checksum_ok": now.iter().all(|(_, ok)| *ok),
        "vcpus": per_vcpu,
        "load_ms": loaded_ms,
        "ran_ms": resumed.elapsed().as_millis() as u64,
        "runstate": report.runstate,
        "return-path": report.return_path.requested.then(|| report.return_path.to_json()),
        "postcopy": report.postcopy.as_ref().map(engine::postcopy_dest::PostcopyReport::to_json),
    }))
}

/// Resume the loaded guest (unless the stream left it paused or it already
/// runs) and let it run `run_on`; when it was resumed.
fn run_for(
    control: &mut minivmm::Vcpus,
    report: &engine::incoming::IncomingReport,
    run_on: Duration,
    cancel: &CancelToken,
) -> Result<Instant> {
    if !report.resumed && report.runstate.as_deref().is_none_or(|r| r == "running") {
        control.resume().map_err(|e| Error::incoming(e.on(engine::vm::VmmPart::Vcpu("resume")).into()))?;
    }
    let resumed = Instant::now();
    while resumed.elapsed() < run_on {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(resumed)
}

/// The destination of a firmware guest: progress marks on arrival, resume, run
/// `run_on`, stop, marks again.
fn firmware_run_on(
    vm: &Vm,
    report: engine::incoming::IncomingReport,
    digest: u64,
    (_start, loaded_ms, run_on): (Instant, u64, Duration),
    cancel: &CancelToken,
) -> Result<Value> {
    let (word0, cx0) = firmware_marks(vm)?;
    let mut control = vm.vcpus();
    let resumed = run_for(&mut control, &report, run_on, cancel)?;
    control.stop().map_err(|e| Error::incoming(e.on(engine::vm::VmmPart::Vcpu("stop")).into()))?;
    let ran_ms = resumed.elapsed().as_millis() as u64;
    let (word1, cx1) = firmware_marks(vm)?;
    Ok(json!({
        "ram_digest": format!("{digest:016x}"),
        "huge_pages": vm.huge_pages(),
        "firmware": {
            "probe_word_loaded": word0,
            "cx_loaded": cx0,
            "probe_word_after_run": word1,
            "cx_after_run": cx1,
            // The loop's 16-bit counter moved on (it wraps: equal again after a
            // multiple of 65 536 rounds is possible, and then reads as not run).
            "ran_on": word1 != word0 || cx1 != cx0,
        },
        "vcpu_error": control.error(),
        "load_ms": loaded_ms,
        "ran_ms": ran_ms,
        "runstate": report.runstate,
        "return-path": report.return_path.requested.then(|| report.return_path.to_json()),
    }))
}
