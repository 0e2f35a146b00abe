//! The postcopy rows (issue 10): total time of QEMU → QEMU and qmig → qmig postcopy
//! on the same image, postcopy started immediately; the destination's page-request
//! latency (qmig: `recv --postcopy --postcopy-touch` and `kvm-dest` stats, per
//! request; QEMU: `postcopy-blocktime` of a q35 + KVM guest running `busy-bios.bin`);
//! and the KVM demo guest at a dirty rate pre-copy cannot converge at under a
//! 64 MiB/s cap.

use super::*;

/// The firmware loop of the busy q35 guests: writes two words into each of pages
/// 16..143 (64 KiB..576 KiB), over and over (`tests/fixtures/README.md`).
pub(crate) const BUSY_BIOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/busy-bios.bin");

/// One postcopy case, `cfg.runs` runs (each a JSON object of its figures).
pub(crate) struct PostcopyRow {
    pub(crate) key: &'static str,
    pub(crate) label: String,
    pub(crate) runs: Vec<Value>,
    pub(crate) error: Option<String>,
}

impl PostcopyRow {
    fn new(key: &'static str, label: String) -> PostcopyRow {
        PostcopyRow { key, label, runs: vec![], error: None }
    }

    /// The values of `f` over the runs that have it.
    pub(crate) fn field(&self, f: impl Fn(&Value) -> Option<f64>) -> Vec<f64> {
        self.runs.iter().filter_map(f).collect()
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({ "case": self.key, "label": self.label, "runs": self.runs, "error": self.error })
    }
}

/// A q35 + KVM guest running [`BUSY_BIOS`] with its RAM (`pc.ram`) in `ram`, stopped (`-S`).
pub(crate) fn busy_q35(cfg: &Config, ram: &Path, size: u64, incoming: bool) -> Result<QemuProcess, String> {
    let bin = cfg.qemu.clone().ok_or("no QEMU")?;
    let config = QemuConfig::new()
        .binary(bin)
        .machine("q35")
        .ram("pc.ram", ram, size)
        .incoming(incoming)
        .arg("-accel")
        .arg("kvm")
        .arg("-bios")
        .arg(BUSY_BIOS);
    QemuProcess::start(&config).map_err(|e| format!("start q35 QEMU: {e}"))
}

/// Whether /dev/kvm can be opened (else the KVM rows are left out, with a note).
pub(crate) fn kvm_usable() -> Result<(), String> {
    OpenOptions::new().read(true).write(true).open("/dev/kvm").map(drop).map_err(|e| format!("/dev/kvm unusable: {e}"))
}

fn caps(q: &mut QemuProcess, caps: &[(&str, bool)]) -> Result<(), String> {
    q.qmp().and_then(|p| p.set_capabilities(caps)).map_err(|e| format!("migrate-set-capabilities {caps:?}: {e}"))
}

/// Polls both sides until done, as [`run_case_inner`] does; returns the end.
fn wait_both(src: &mut Side, dst: &mut Side, t0: Instant) -> Result<(Instant, Value, Value), String> {
    let (mut src_info, mut dst_info) = (Value::Null, Value::Null);
    loop {
        let s = src.poll(&mut src_info)?;
        let d = dst.poll(&mut dst_info)?;
        if s && d {
            break;
        }
        if Instant::now() >= t0 + MIGRATION_LIMIT {
            return Err(format!("not done after {MIGRATION_LIMIT:?} (source done: {s}, destination done: {d})"));
        }
        thread::sleep(if src.qemu.is_none() && dst.qemu.is_none() { Duration::from_micros(500) } else { POLL });
    }
    let end = src.done.into_iter().chain(dst.done).max().expect("both done");
    Ok((end, src_info, dst_info))
}

/// QEMU 7.2 → QEMU 7.2 postcopy of `img` (`-machine none`, no vCPU: the destination
/// never faults, every page comes in the background stream), `migrate-start-postcopy`
/// right after `migrate`.
fn qemu_qemu(cfg: &Config, dir: &Path, img: &Image) -> Result<Value, String> {
    let dst_path = dir.join("dst.ram");
    let _ = fs::remove_file(&dst_path);
    let _ = fs::remove_file(dir.join("mig.sock"));
    let r = (|| {
        let (mut dq, uri) = qemu_destination(cfg, dir, &dst_path, (img.size, false), (Wire::Unix, None))?;
        caps(&mut dq, &[("postcopy-ram", true)])?;
        let mut sq = qemu_source(cfg, img, None)?;
        caps(&mut sq, &[("postcopy-ram", true)])?;
        let mut dst = Side::qemu(dq);
        dst.start();
        let machine = MachineSample::now();
        let base = proc_cpu(sq.pid());
        sq.migrate(&uri).map_err(qemu_err("migrate", &sq))?;
        sq.execute("migrate-start-postcopy", None).map_err(qemu_err("migrate-start-postcopy", &sq))?;
        let mut src = Side::qemu(sq);
        src.base = base;
        let (end, si, di) = wait_both(&mut src, &mut dst, machine.at)?;
        let (sc, sf) = src.cpu();
        let (dc, df) = dst.cpu();
        let others = machine.others_since(sc + dc);
        src.finish();
        dst.finish();
        Ok(json!({
            "time-s": round(end.duration_since(machine.at).as_secs_f64(), 4),
            "src-cpu-s": round(sc, 3), "dst-cpu-s": round(dc, 3), "src-minflt": sf, "dst-minflt": df,
            "others": round(others, 3),
            "requests": si["ram"]["postcopy-requests"], "downtime-ms": si["downtime"],
            "qemu-src": si, "qemu-dst": di,
        }))
    })();
    let r = r.and_then(|v| match first_difference(&img.path, &dst_path, img.size)? {
        Some(p) => Err(format!("the destination differs from the source at page {p}")),
        None => Ok(v),
    });
    let _ = fs::remove_file(&dst_path);
    r
}

/// `qmig send --postcopy --postcopy-after 0` → `qmig recv --postcopy` of `img`,
/// with `--postcopy-touch` on the destination when `touch` (its reads fault like a vCPU's).
fn qmig_qmig(cfg: &Config, dir: &Path, img: &Image, touch: bool) -> Result<Value, String> {
    let dst_path = dir.join("dst.ram");
    let _ = fs::remove_file(&dst_path);
    let _ = fs::remove_file(dir.join("mig.sock"));
    let r = (|| {
        let mut extra = vec!["--postcopy".to_string()];
        if touch {
            extra.push("--postcopy-touch".into());
        }
        let (p, uri) = qmig_recv_with(cfg, dir, &dst_path, (Wire::Unix, None), &extra)?;
        let mut dst = Side::qmig(p);
        dst.start();
        let machine = MachineSample::now();
        let ram = format!("mem={}", img.path.display());
        let args = ["send", "--ram", &ram, "--to", &uri, "--postcopy", "--postcopy-after", "0"];
        let mut src = Side::qmig(QmigProc::spawn(cfg, dir, "send", &args));
        let (end, _, _) = wait_both(&mut src, &mut dst, machine.at)?;
        let (sc, sf) = src.cpu();
        let (dc, df) = dst.cpu();
        let others = machine.others_since(sc + dc);
        let s = src.finish();
        let d = dst.finish();
        if d["postcopy"].is_null() {
            return Err(format!("qmig recv did not report a postcopy phase: {d}"));
        }
        Ok(json!({
            "time-s": round(end.duration_since(machine.at).as_secs_f64(), 4),
            "src-cpu-s": round(sc, 3), "dst-cpu-s": round(dc, 3), "src-minflt": sf, "dst-minflt": df,
            "others": round(others, 3),
            "requests": d["postcopy"]["requests"], "downtime-ms": s["downtime"],
            "latency-us": d["postcopy"]["request-latency-us"],
            "qmig-send": s, "qmig-recv": d,
        }))
    })();
    let r = r.and_then(|v| match first_difference(&img.path, &dst_path, img.size)? {
        Some(p) => Err(format!("the destination differs from the source at page {p}")),
        None => Ok(v),
    });
    let _ = fs::remove_file(&dst_path);
    r
}

/// QEMU 7.2 → QEMU 7.2 postcopy of a running q35 + KVM guest (1 vCPU, [`BUSY_BIOS`],
/// RAM all zero but the pages the loop writes), `postcopy-blocktime` on the
/// destination (which is told `cont` first, so it runs from POSTCOPY_RUN on and
/// faults), postcopy started right after `migrate`.
fn qemu_busy_blocktime(cfg: &Config, dir: &Path, size: u64) -> Result<Value, String> {
    let src_path = dir.join("busy-src.ram");
    let dst_path = dir.join("busy-dst.ram");
    let _ = fs::remove_file(dir.join("mig.sock"));
    let r = (|| {
        File::create(&src_path).and_then(|f| f.set_len(size)).map_err(|e| format!("{}: {e}", src_path.display()))?;
        let mut dq = busy_q35(cfg, &dst_path, size, true)?;
        caps(&mut dq, &[("postcopy-ram", true), ("postcopy-blocktime", true)])?;
        // In `inmigrate`, `cont` only sets autostart: the guest starts at POSTCOPY_RUN.
        dq.execute("cont", None).map_err(qemu_err("cont (destination)", &dq))?;
        let uri = format!("unix:{}", dir.join("mig.sock").display());
        dq.migrate_incoming(&uri).map_err(qemu_err("migrate-incoming", &dq))?;
        let mut sq = busy_q35(cfg, &src_path, size, false)?;
        caps(&mut sq, &[("postcopy-ram", true)])?;
        sq.execute("migrate-set-parameters", Some(json!({ "max-bandwidth": QEMU_MAX_BANDWIDTH })))
            .map_err(qemu_err("migrate-set-parameters", &sq))?;
        sq.execute("cont", None).map_err(qemu_err("cont", &sq))?;
        // Let the loop run (and dirty its pages) before the migration starts.
        thread::sleep(Duration::from_millis(200));
        let mut dst = Side::qemu(dq);
        dst.start();
        let machine = MachineSample::now();
        let base = proc_cpu(sq.pid());
        sq.migrate(&uri).map_err(qemu_err("migrate", &sq))?;
        sq.execute("migrate-start-postcopy", None).map_err(qemu_err("migrate-start-postcopy", &sq))?;
        let mut src = Side::qemu(sq);
        src.base = base;
        let (end, si, _) = wait_both(&mut src, &mut dst, machine.at)?;
        let (sc, sf) = src.cpu();
        let (dc, df) = dst.cpu();
        let others = machine.others_since(sc + dc);
        // The blocktime figures appear in the destination's query-migrate once completed.
        let di = dst.qemu.as_mut().map(QemuProcess::query_migrate).transpose().map_err(|e| e.to_string())?;
        let di = di.unwrap_or(Value::Null);
        let status = dst.qemu.as_mut().map(QemuProcess::query_status).transpose().map_err(|e| e.to_string())?;
        src.finish();
        dst.finish();
        let requests = si["ram"]["postcopy-requests"].as_f64().unwrap_or(0.0);
        let vcpu_ms = di["postcopy-vcpu-blocktime"].as_array().and_then(|a| a.first()).and_then(Value::as_f64);
        Ok(json!({
            "time-s": round(end.duration_since(machine.at).as_secs_f64(), 4),
            "src-cpu-s": round(sc, 3), "dst-cpu-s": round(dc, 3), "src-minflt": sf, "dst-minflt": df,
            "others": round(others, 3),
            "requests": si["ram"]["postcopy-requests"], "downtime-ms": si["downtime"],
            "blocktime-ms": di["postcopy-blocktime"], "vcpu-blocktime-ms": di["postcopy-vcpu-blocktime"],
            // vCPU 0's blocked time over the requests the source answered: a mean per request,
            // an upper bound (a request the vCPU did not wait for adds nothing; ms granularity).
            "mean-blocktime-per-request-us": vcpu_ms.filter(|_| requests > 0.0).map(|ms| round(ms * 1e3 / requests, 1)),
            "dst-runstate": status,
            "qemu-src": si, "qemu-dst": di,
        }))
    })();
    let _ = fs::remove_file(&src_path);
    let _ = fs::remove_file(&dst_path);
    r
}

/// `qmig demo --kvm --postcopy` (a KVM guest migrated to `qmig kvm-dest`, whose
/// vCPU faults on the pages not yet there) with `args`; its stats JSON, or the error.
fn kvm_demo(cfg: &Config, run: usize, args: &[&str]) -> Result<Value, String> {
    let stats = cfg.shm.join(format!("qmig-compare-pc-{}.json", std::process::id()));
    let machine = MachineSample::now();
    let before = children_cpu();
    let o = Command::new(&cfg.qmig)
        .args(["demo", "--kvm", "--postcopy", "--seed", &(run + 1).to_string(), "--stats-json"])
        .arg(&stats)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("run {}: {e}", cfg.qmig.display()))?;
    let v = fs::read_to_string(&stats).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok());
    let _ = fs::remove_file(&stats);
    // The demo's CPU is not split per side here: `others` counts the whole demo as measured.
    let cpu = children_cpu().0 - before.0;
    let others = machine.others_since(cpu);
    match v {
        Some(v) if o.status.success() && v["verified"] == true => {
            let pc = &v["destination"]["postcopy"];
            Ok(json!({
                "time-s": v["total-time"].as_f64().map(|ms| round(ms / 1e3, 4)),
                "requests": pc["requests"], "downtime-ms": v["downtime"],
                "latency-us": pc["request-latency-us"], "others": round(others, 3), "cpu-s": round(cpu, 3),
                "dirty-rate-achieved": v["guest"]["dirty-rate-achieved"], "stats": v,
            }))
        }
        Some(v) => Err(format!("not verified: {}", v["guest"])),
        None => Err(String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("no stats").into()),
    }
}

/// CPU seconds of this process's reaped children so far (`RUSAGE_CHILDREN`) and their minor faults.
fn children_cpu() -> (f64, u64) {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    (tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_minflt as u64)
}

/// Every postcopy case, `cfg.runs` times, interleaved within a run.
pub(crate) fn postcopy_rows(cfg: &Config, dir: &Path) -> Vec<PostcopyRow> {
    if !cfg.postcopy {
        return vec![];
    }
    let size = cfg.postcopy_size;
    let kvm = kvm_usable();
    if let Err(e) = &kvm {
        println!("note: {e}: no KVM postcopy rows");
    }
    if cfg.qemu.is_none() {
        println!("note: qemu-system-x86_64 not found: no QEMU postcopy rows");
    }
    let t = Instant::now();
    let img = Image::create(dir, size, Fill::Random);
    eprintln!("postcopy image {} written in {:.1} s", img.label(), t.elapsed().as_secs_f64());
    let sz = size_label(size);
    let demo_ram = size.to_string();
    // 256 MiB, or a quarter of a smaller RAM (a smoke run).
    let ws = (256 * MIB).min(size / 4).to_string();
    // A smoke run's small guest would converge under 64 MiB/s (its loop is slow here).
    let cap = if cfg.quick { "8M" } else { "64M" };
    // Two slots (around a PCI hole) need more than 192 MiB.
    let slots = if size > 192 * MIB { "2" } else { "1" };
    let mut rows = vec![];
    if cfg.qemu.is_some() {
        rows.push(PostcopyRow::new("qemu-qemu", format!("QEMU → QEMU, {sz} random, -machine none (no faults)")));
    }
    rows.push(PostcopyRow::new("qmig-qmig", format!("qmig → qmig, {sz} random (no faults)")));
    rows.push(PostcopyRow::new("qmig-qmig-touch", format!("qmig → qmig, {sz} random, recv --postcopy-touch")));
    if kvm.is_ok() {
        if cfg.qemu.is_some() {
            rows.push(PostcopyRow::new(
                "qemu-q35-busy",
                format!("QEMU → QEMU, q35 + KVM busy-bios.bin, {sz} zero, postcopy-blocktime"),
            ));
        }
        rows.push(PostcopyRow::new(
            "qmig-kvm-busy",
            format!("qmig demo --kvm, {sz}, 512 KiB working set (128 pages) at 1 GiB/s"),
        ));
        rows.push(PostcopyRow::new(
            "qmig-kvm-64m",
            format!(
                "qmig demo --kvm, {sz}, {} working set at 256 MiB/s, max-bandwidth {} MiB/s",
                size_label((256 * MIB).min(size / 4)),
                if cfg.quick { 8 } else { 64 }
            ),
        ));
    }
    for run in 0..cfg.runs {
        for r in rows.iter_mut() {
            if r.error.is_some() {
                continue;
            }
            let res = match r.key {
                "qemu-qemu" => qemu_qemu(cfg, dir, &img),
                "qmig-qmig" => qmig_qmig(cfg, dir, &img, false),
                "qmig-qmig-touch" => qmig_qmig(cfg, dir, &img, true),
                "qemu-q35-busy" => qemu_busy_blocktime(cfg, dir, size),
                // Postcopy right away, as the QEMU rows; no rate limit.
                "qmig-kvm-busy" => kvm_demo(
                    cfg,
                    run,
                    &["--ram-size", &demo_ram, "--slots", "1", "--working-set", "512K", "--dirty-rate", "1024"]
                        .into_iter()
                        .chain(["--max-bandwidth", "0", "--postcopy-after", "0"])
                        .collect::<Vec<_>>(),
                ),
                // 256 MiB/s into 256 MiB under a 64 MiB/s cap: pre-copy never gets under the
                // 300 ms downtime limit; postcopy after the first pass, as `demo --postcopy` does.
                _ => kvm_demo(
                    cfg,
                    run,
                    &["--ram-size", &demo_ram, "--slots", slots, "--working-set", &ws, "--dirty-rate", "256"]
                        .into_iter()
                        .chain(["--max-bandwidth", cap, "--downtime-limit", "300"])
                        .collect::<Vec<_>>(),
                ),
            };
            match res {
                Ok(v) => {
                    eprintln!(
                        "postcopy {} run {}: {} s, {} requests, latency {}, blocktime {}, others {}",
                        r.key,
                        run + 1,
                        v["time-s"],
                        v["requests"],
                        v["latency-us"],
                        v["vcpu-blocktime-ms"],
                        v["others"]
                    );
                    r.runs.push(v);
                }
                Err(e) => {
                    eprintln!("postcopy {} run {}: FAILED: {e}", r.key, run + 1);
                    r.error = Some(e);
                }
            }
        }
    }
    rows
}

/// `median (min–max)` of `v` with `digits` decimals, or `–`.
pub(crate) fn spread(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.digits$} ({min:.digits$}–{max:.digits$})", median(v.to_vec()))
}

pub(crate) fn print_postcopy(rows: &[PostcopyRow]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!("### postcopy (issue 10), started right after the migration starts, unix socket");
    println!();
    println!(
        "| case | total time s | src CPU s | dst CPU s | page requests | latency p50 µs | latency p99 µs | \
         QEMU vCPU blocktime ms | per request µs | others | runs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        if r.runs.is_empty() {
            println!(
                "| {} | failed: {} | | | | | | | | | 0 |",
                r.label,
                r.error.as_deref().unwrap_or("").replace('|', "/")
            );
            continue;
        }
        let f = |k: &str| r.field(|v| v[k].as_f64());
        let lat = |k: &str| r.field(|v| v["latency-us"][k].as_f64());
        let vcpu = r.field(|v| v["vcpu-blocktime-ms"].as_array().and_then(|a| a.first()).and_then(Value::as_f64));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            spread(&f("time-s"), 3),
            spread(&f("src-cpu-s"), 2),
            spread(&f("dst-cpu-s"), 2),
            spread(&f("requests"), 0),
            spread(&lat("median"), 0),
            spread(&lat("p99"), 0),
            spread(&vcpu, 0),
            spread(&f("mean-blocktime-per-request-us"), 0),
            spread(&f("others").iter().map(|x| x * 100.0).collect::<Vec<_>>(), 0),
            r.runs.len()
        );
        if let Some(e) = &r.error {
            println!("note: {}: run {} failed: {e}", r.label, r.runs.len() + 1);
        }
    }
    println!();
    println!(
        "latency: qmig's destination times each page request from the fault to the page placed (µs). \
         QEMU 7.2 reports no per-request latency: its postcopy-vcpu-blocktime is the total time (ms) \
         its vCPU was blocked on missing pages; divided by the source's postcopy-requests it is a mean \
         per request. The `demo --kvm` rows have no CPU split per side (one process tree)."
    );
}
