//! The XBZRLE live rows (issue 11): bytes on the wire of a dirtying KVM guest
//! migrated with capability `xbzrle`, by QEMU 7.2 and by qmig, both running the
//! same guest: the fixtures' `busy-bios.bin` (a real-mode loop writing its 16-bit
//! counter into two words of each of pages 16..143, forever), booted from the
//! reset vector in an otherwise zero RAM of the same size, with the same
//! `xbzrle-cache-size`, `max-bandwidth`, `downtime-limit` 1 ms and the switchover
//! forced after the same time if pre-copy has not converged:
//!
//! - QEMU: q35 + KVM `-bios busy-bios.bin`, `downtime-limit` raised to 5000 ms
//!   after the time (the next iteration then converges);
//! - qmig: `qmig demo --kvm --xbzrle --bios busy-bios.bin` (minivmm: the image
//!   read-only below 4 GiB, its copy below 1 MiB in RAM), `--timeout SECS
//!   --timeout-action switchover`.
//!
//! The totals differ by what each machine carries besides: QEMU's q35 stream has
//! its ROM blocks (pc.bios, pc.rom, ACPI tables) and device state, qmig's RAM has
//! the image's copy below 1 MiB. What the dirtying costs is compared on its own:
//! the bytes beyond the first pass, `xbzrle-bytes + 4096 x (cache-miss +
//! overflow)` (pages re-sent after pass 1: XBZRLE-encoded, or whole when not in
//! the cache or not smaller encoded; both count them by QEMU 7.2's rules).

use super::*;

/// One side's runs (the final `query-migrate`-shaped stats of each).
pub(crate) struct XbzrleRow {
    pub(crate) key: &'static str,
    pub(crate) label: String,
    pub(crate) runs: Vec<Value>,
    pub(crate) error: Option<String>,
}

impl XbzrleRow {
    pub(crate) fn to_json(&self) -> Value {
        json!({ "case": self.key, "label": self.label, "runs": self.runs, "error": self.error })
    }
}

/// Bandwidth cap of both sides, bytes/s: low enough that the bandwidth either side
/// measures keeps the 128 dirty pages above what fits in the 1 ms downtime limit (as
/// in the testdata's xbzrle capture: 3-4 MiB/s).
const BANDWIDTH: u64 = 4 << 20;
/// `xbzrle-cache-size` of both sides (QEMU's default).
const CACHE: u64 = 64 << 20;

/// The figures compared, from a `query-migrate`-shaped object.
fn figures(v: &Value, time_s: f64) -> Value {
    let x = &v["xbzrle-cache"];
    let pages = x["pages"].as_f64().unwrap_or(0.0);
    let bytes = x["bytes"].as_f64().unwrap_or(0.0);
    let passes = v["ram"]["dirty-sync-count"].as_f64().unwrap_or(0.0);
    let transferred = v["ram"]["transferred"].as_f64().unwrap_or(0.0);
    let resent = x["cache-miss"].as_f64().unwrap_or(0.0) + x["overflow"].as_f64().unwrap_or(0.0);
    json!({
        "cache-size": x["cache-size"],
        "beyond-first-pass": round(bytes + 4096.0 * resent, 0),
        "time-s": round(time_s, 3),
        "transferred": v["ram"]["transferred"], "normal": v["ram"]["normal"], "duplicate": v["ram"]["duplicate"],
        "dirty-sync-count": v["ram"]["dirty-sync-count"], "downtime-ms": v["downtime"],
        "xbzrle-pages": x["pages"], "xbzrle-bytes": x["bytes"], "cache-miss": x["cache-miss"],
        "overflow": x["overflow"], "encoding-rate": x["encoding-rate"],
        "bytes-per-xbzrle-page": if pages > 0.0 { json!(round(bytes / pages, 1)) } else { Value::Null },
        "transferred-per-pass": if passes > 0.0 { json!(round(transferred / passes, 0)) } else { Value::Null },
    })
}

fn qemu_run(cfg: &Config, dir: &Path, size: u64, secs: f64) -> Result<Value, String> {
    let src_path = dir.join("xb-src.ram");
    let dst_path = dir.join("xb-dst.ram");
    let _ = fs::remove_file(dir.join("mig.sock"));
    let r = (|| {
        File::create(&src_path).and_then(|f| f.set_len(size)).map_err(|e| format!("{}: {e}", src_path.display()))?;
        let mut dq = busy_q35(cfg, &dst_path, size, true)?;
        let uri = format!("unix:{}", dir.join("mig.sock").display());
        dq.migrate_incoming(&uri).map_err(qemu_err("migrate-incoming", &dq))?;
        let mut sq = busy_q35(cfg, &src_path, size, false)?;
        sq.qmp().and_then(|p| p.set_capabilities(&[("xbzrle", true)])).map_err(|e| format!("xbzrle: {e}"))?;
        let p = json!({ "max-bandwidth": BANDWIDTH, "downtime-limit": 1, "xbzrle-cache-size": CACHE });
        sq.execute("migrate-set-parameters", Some(p)).map_err(qemu_err("migrate-set-parameters", &sq))?;
        sq.execute("cont", None).map_err(qemu_err("cont", &sq))?;
        thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now();
        sq.migrate(&uri).map_err(qemu_err("migrate", &sq))?;
        let mut raised = false;
        let info = loop {
            let v = sq.query_migrate().map_err(qemu_err("query-migrate", &sq))?;
            match v["status"].as_str().unwrap_or("") {
                "completed" => break v,
                "failed" | "cancelled" => return Err(format!("QEMU migration {v}; stderr: {}", sq.stderr())),
                _ => {}
            }
            if !raised && t0.elapsed().as_secs_f64() >= secs {
                sq.execute("migrate-set-parameters", Some(json!({ "downtime-limit": 5000 })))
                    .map_err(qemu_err("migrate-set-parameters", &sq))?;
                raised = true;
            }
            if t0.elapsed() > MIGRATION_LIMIT {
                return Err("QEMU xbzrle migration not done in time".into());
            }
            thread::sleep(POLL);
        };
        let time = t0.elapsed().as_secs_f64();
        dq.wait_migration(Duration::from_secs(60)).map_err(qemu_err("destination", &dq))?;
        let _ = sq.quit(Duration::from_secs(10));
        let _ = dq.quit(Duration::from_secs(10));
        let mut f = figures(&info, time);
        f["qemu-src"] = info;
        Ok(f)
    })();
    let _ = fs::remove_file(&src_path);
    let _ = fs::remove_file(&dst_path);
    r
}

fn qmig_run(cfg: &Config, size: u64, secs: f64) -> Result<Value, String> {
    let stats = cfg.shm.join(format!("qmig-compare-xb-{}.json", std::process::id()));
    let t0 = Instant::now();
    let o = Command::new(&cfg.qmig)
        .args(["demo", "--kvm", "--xbzrle", "--bios", BUSY_BIOS, "--ram-size", &size.to_string()])
        .args(["--xbzrle-cache-size", &CACHE.to_string(), "--max-bandwidth", &BANDWIDTH.to_string()])
        .args(["--downtime-limit", "1", "--timeout", &secs.to_string(), "--timeout-action", "switchover"])
        .arg("--stats-json")
        .arg(&stats)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("run {}: {e}", cfg.qmig.display()))?;
    let time = t0.elapsed().as_secs_f64();
    let v = fs::read_to_string(&stats).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok());
    let _ = fs::remove_file(&stats);
    match v {
        Some(v) if o.status.success() && v["verified"] == true => {
            let mut f = figures(&v, v["total-time"].as_f64().map_or(time, |ms| ms / 1e3));
            f["stats"] = v;
            Ok(f)
        }
        Some(v) => Err(format!("not verified ({}): {}", o.status, v["guest"])),
        None => Err(String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("no stats").into()),
    }
}

/// Both sides, `cfg.runs` times, interleaved.
pub(crate) fn xbzrle_rows(cfg: &Config, dir: &Path) -> Vec<XbzrleRow> {
    if !cfg.xbzrle {
        return vec![];
    }
    if let Err(e) = kvm_usable() {
        println!("note: {e}: no XBZRLE rows");
        return vec![];
    }
    let (size, secs) = if cfg.quick { (16 * MIB, 1.0) } else { (64 * MIB, 3.0) };
    let sz = size_label(size);
    let mut rows = vec![];
    if cfg.qemu.is_some() {
        rows.push(XbzrleRow {
            key: "qemu",
            label: format!("QEMU 7.2, q35 + KVM busy-bios.bin, {sz}"),
            runs: vec![],
            error: None,
        });
    }
    rows.push(XbzrleRow {
        key: "qmig",
        label: format!("qmig demo --kvm --bios busy-bios.bin, {sz}"),
        runs: vec![],
        error: None,
    });
    for run in 0..cfg.runs {
        for r in rows.iter_mut().filter(|r| r.error.is_none()) {
            let res = match r.key {
                "qemu" => qemu_run(cfg, dir, size, secs),
                _ => qmig_run(cfg, size, secs),
            };
            match res {
                Ok(v) => {
                    eprintln!(
                        "xbzrle {} run {}: transferred {} ({} beyond pass 1), {} passes, {} xbzrle pages, {} B/page",
                        r.key,
                        run + 1,
                        v["transferred"],
                        v["beyond-first-pass"],
                        v["dirty-sync-count"],
                        v["xbzrle-pages"],
                        v["bytes-per-xbzrle-page"]
                    );
                    r.runs.push(v);
                }
                Err(e) => {
                    eprintln!("xbzrle {} run {}: FAILED: {e}", r.key, run + 1);
                    r.error = Some(e);
                }
            }
        }
    }
    rows
}

pub(crate) fn print_xbzrle(rows: &[XbzrleRow]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "### XBZRLE live (issue 11): max-bandwidth {} MiB/s, downtime-limit 1 ms, switchover forced if still \
         running after 3 s (1 s in a quick run)",
        BANDWIDTH >> 20
    );
    println!();
    println!(
        "The same guest on both (busy-bios.bin from the reset vector, xbzrle-cache-size {} MiB); QEMU's q35 \
         stream also carries its ROM blocks and device state, qmig's RAM the image's copy below 1 MiB: \
         \"beyond pass 1\" = xbzrle bytes + 4096 x (cache-miss + overflow) is the dirtying's cost alone.",
        CACHE >> 20
    );
    println!();
    println!(
        "| sender | time s | ram.transferred KiB | beyond pass 1 KiB | passes | xbzrle pages | \
         bytes per xbzrle page | normal pages | overflow | cache-miss | runs |"
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
        let f = |k: &str, scale: f64| -> Vec<f64> {
            r.runs.iter().filter_map(|v| v[k].as_f64()).map(|x| x / scale).collect()
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            spread(&f("time-s", 1.0), 2),
            spread(&f("transferred", 1024.0), 1),
            spread(&f("beyond-first-pass", 1024.0), 1),
            spread(&f("dirty-sync-count", 1.0), 0),
            spread(&f("xbzrle-pages", 1.0), 0),
            spread(&f("bytes-per-xbzrle-page", 1.0), 1),
            spread(&f("normal", 1.0), 0),
            spread(&f("overflow", 1.0), 0),
            spread(&f("cache-miss", 1.0), 0),
            r.runs.len()
        );
        if let Some(e) = &r.error {
            println!("note: {}: run {} failed: {e}", r.label, r.runs.len() + 1);
        }
    }
}

/// The goal "XBZRLE live: fewer bytes on the wire than QEMU for the same dirtying
/// guest", from the medians of the two rows: qmig / QEMU for `ram.transferred` and
/// for the bytes beyond the first pass (met when below 1; nothing without both rows).
pub(crate) fn xbzrle_goals(rows: &[XbzrleRow]) -> Vec<Value> {
    let med = |key: &str, k: &str| {
        let r = rows.iter().find(|r| r.key == key && !r.runs.is_empty())?;
        Some(median(r.runs.iter().filter_map(|v| v[k].as_f64()).collect()))
    };
    let mut out = vec![];
    for (k, what) in [("transferred", "ram.transferred"), ("beyond-first-pass", "bytes beyond pass 1")] {
        if let (Some(q), Some(m)) = (med("qemu", k), med("qmig", k)) {
            let value = m / q.max(1.0);
            out.push(json!({ "image": "busy-bios.bin", "wire": "unix", "dest": "kvm",
                "goal": format!("XBZRLE qmig / QEMU {what}, same guest (median)"),
                "value": round(value, 3), "target": 1.0, "met": value < 1.0,
                "qmig": m, "qemu": q }));
        }
    }
    out
}
