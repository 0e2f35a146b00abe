//! Rows, the markdown tables and the goals.

use super::*;

pub(crate) struct Row {
    pub(crate) image: String,
    pub(crate) size: u64,
    pub(crate) fill: Fill,
    pub(crate) kind: Kind,
    pub(crate) wire: Wire,
    /// Capability `multifd` of this row.
    pub(crate) multifd: Multifd,
    pub(crate) dest: Dest,
    pub(crate) runs: Vec<Measure>,
    pub(crate) error: Option<String>,
    /// Median time of QEMU → QEMU on the same image, wire and destination kind.
    pub(crate) qemu_time: Option<f64>,
}

impl Row {
    pub(crate) fn time(&self) -> f64 {
        median(self.runs.iter().map(|m| m.time).collect())
    }
    pub(crate) fn src_cpu(&self) -> f64 {
        median(self.runs.iter().map(|m| m.src_cpu).collect())
    }
    pub(crate) fn dst_cpu(&self) -> f64 {
        median(self.runs.iter().map(|m| m.dst_cpu).collect())
    }
    pub(crate) fn others(&self) -> f64 {
        median(self.runs.iter().map(|m| m.others).collect())
    }
    pub(crate) fn busy_runs(&self) -> usize {
        self.runs.iter().filter(|m| m.others >= BUSY).count()
    }
    pub(crate) fn gibs(&self) -> f64 {
        self.size as f64 / GIB / self.time()
    }
    pub(crate) fn ratio(&self) -> Option<f64> {
        self.qemu_time.map(|q| q / self.time())
    }
    pub(crate) fn case(&self) -> String {
        let label = format!("{}{}", self.wire.name(), multifd_label(self.multifd));
        match self.dest {
            Dest::Fresh => format!("{} ({label})", self.kind.label()),
            d => format!("{} ({label}, {})", self.kind.label(), d.key()),
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        let gib = self.size as f64 / GIB;
        let mut v = json!({
            "image": self.image,
            "size": self.size,
            "fill": self.fill.pattern().to_string(),
            "case": self.kind.key(),
            "wire": self.wire.name(),
            "multifd": self.multifd.map(|(n, c)| json!({"channels": n, "compression": c})),
            "dest": self.dest.key(),
        });
        if let Some(e) = &self.error {
            v["error"] = json!(e);
        }
        if self.runs.is_empty() {
            return v;
        }
        v["time-s"] = json!(round(self.time(), 4));
        v["gib-per-s"] = json!(round(self.gibs(), 3));
        v["src-cpu-s"] = json!(round(self.src_cpu(), 3));
        v["dst-cpu-s"] = json!(round(self.dst_cpu(), 3));
        v["src-cpu-s-per-gib"] = json!(round(self.src_cpu() / gib, 3));
        v["dst-cpu-s-per-gib"] = json!(round(self.dst_cpu() / gib, 3));
        v["src-minflt-per-gib"] =
            json!((median(self.runs.iter().map(|m| m.src_minflt as f64).collect()) / gib).round());
        v["dst-minflt-per-gib"] =
            json!((median(self.runs.iter().map(|m| m.dst_minflt as f64).collect()) / gib).round());
        v["ratio-vs-qemu-qemu"] = json!(self.ratio().map(|r| round(r, 3)));
        v["others"] = json!(round(self.others(), 3));
        v["busy-runs"] = json!(self.busy_runs());
        v["runs"] = self
            .runs
            .iter()
            .map(|m| {
                json!({
                    "time-s": round(m.time, 4), "src-cpu-s": round(m.src_cpu, 3), "dst-cpu-s": round(m.dst_cpu, 3),
                    "src-minflt": m.src_minflt, "dst-minflt": m.dst_minflt, "others": round(m.others, 3),
                    "detail": m.extra,
                })
            })
            .collect();
        v
    }
}

pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

pub(crate) fn print_table(rows: &[Row], cfg: &Config) {
    println!();
    println!("| image | case | time s | (min–max) | GiB/s | src CPU s | dst CPU s | vs QEMU→QEMU | others |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        if let Some(e) = &r.error {
            if r.runs.is_empty() {
                println!("| {} | {} | failed: {} | | | | | | |", r.image, r.case(), e.replace('|', "/"));
                continue;
            }
        }
        let busy = r.busy_runs();
        let flag = if busy > 0 { format!(" (busy {busy}/{})", r.runs.len()) } else { String::new() };
        let times = r.runs.iter().map(|m| m.time);
        let (min, max) = (times.clone().fold(f64::INFINITY, f64::min), times.fold(0.0, f64::max));
        println!(
            "| {} | {} | {:.3} | {min:.3}–{max:.3} | {:.2} | {:.2} | {:.2} | {} | {:.0} %{flag} |",
            r.image,
            r.case(),
            r.time(),
            r.gibs(),
            r.src_cpu(),
            r.dst_cpu(),
            r.ratio().map_or_else(|| "–".to_string(), |x| format!("{x:.2}x")),
            r.others() * 100.0,
        );
    }
    for r in rows.iter().filter(|r| !r.runs.is_empty()) {
        if let Some(e) = &r.error {
            println!("note: {} {}: run {} failed: {e}", r.image, r.case(), r.runs.len() + 1);
        }
    }
    println!();
    println!(
        "time: median of {} run(s), migration start to both sides done; CPU: median utime+stime per side; others: \
         median share of both cores used by other processes during the run (busy: runs at >= {:.0} %).",
        cfg.runs,
        BUSY * 100.0
    );
}

/// The targets of issue 5, checked (reported, never asserted).
pub(crate) fn goals(rows: &[Row], limits: &[Limit]) -> Vec<Value> {
    let mut out = Vec::new();
    let unix_limit = limits.iter().find(|l| l.key == "unix").map(|l| l.gibs);
    let pwrite_limit = limits.iter().find(|l| l.key == "fresh-file-pwrite").map(|l| l.gibs);
    for r in rows.iter().filter(|r| r.kind == Kind::QmigQmig && !r.runs.is_empty()) {
        let q = rows.iter().find(|x| {
            x.kind == Kind::QemuQemu
                && x.size == r.size
                && x.fill == r.fill
                && x.wire == r.wire
                && x.multifd == r.multifd
                && x.dest == r.dest
                && !x.runs.is_empty()
        });
        let fresh = rows.iter().find(|x| {
            x.kind == r.kind
                && x.size == r.size
                && x.fill == r.fill
                && x.wire == r.wire
                && x.multifd == r.multifd
                && x.dest == Dest::Fresh
                && !x.runs.is_empty()
        });
        let dest = r.dest;
        let wire = format!("{}{}", r.wire.name(), multifd_label(r.multifd));
        let mut add = |goal: String, value: f64, target: f64| {
            let goal = if dest == Dest::Fresh { goal } else { format!("{goal} [{}]", dest.key()) };
            out.push(json!({ "image": r.image, "wire": wire, "dest": dest.key(), "goal": goal,
                              "value": round(value, 3), "target": target, "met": value >= target }));
        };
        // Issue 11: multifd qmig→qmig at least 1.5x QEMU's with the same channels; zstd at
        // least QEMU's speed with at most its CPU per GiB on both sides.
        if let Some((_, c)) = r.multifd {
            if let Some(x) = r.ratio() {
                add(format!("multifd qmig→qmig / QEMU→QEMU speed ({c})"), x, if c == "none" { 1.5 } else { 1.0 });
            }
            if let (Some(q), true) = (q, c != "none") {
                add("QEMU src CPU / qmig send CPU (multifd)".into(), q.src_cpu() / r.src_cpu().max(1e-3), 1.0);
                add("QEMU dst CPU / qmig recv CPU (multifd)".into(), q.dst_cpu() / r.dst_cpu().max(1e-3), 1.0);
            }
            continue;
        }
        if let (Dest::Sparse, Some(f)) = (dest, fresh) {
            // Issue 11: an existing all-holes file within 10 % of a fresh one.
            add("qmig→qmig fresh time / sparse-existing time".into(), f.time() / r.time(), 0.9);
        }
        match r.fill {
            Fill::Random => {
                if let Some(x) = r.ratio() {
                    add("qmig→qmig / QEMU→QEMU speed (random)".into(), x, 2.0);
                }
                if let (Wire::Unix, Some(l)) = (r.wire, unix_limit) {
                    add("qmig→qmig / unix-socket limit (random)".into(), r.gibs() / l, 0.8);
                }
                if let (Wire::Unix, Some(l)) = (r.wire, pwrite_limit) {
                    // Not a goal of the issue: what a receiver writing a fresh image can reach.
                    add("qmig→qmig / fresh-file pwrite limit (random; for reference)".into(), r.gibs() / l, 0.8);
                }
            }
            Fill::Zero => {
                if let Some(x) = r.ratio() {
                    add("qmig→qmig / QEMU→QEMU speed (zero)".into(), x, 5.0);
                }
            }
            Fill::Mixed25 | Fill::Text => {}
        }
        if let Some(q) = q {
            // CPU per GiB lower than QEMU's: the ratio QEMU/qmig must exceed 1.
            add("QEMU src CPU / qmig send CPU".into(), q.src_cpu() / r.src_cpu().max(1e-3), 1.0);
            add("QEMU dst CPU / qmig recv CPU".into(), q.dst_cpu() / r.dst_cpu().max(1e-3), 1.0);
        }
    }
    out
}

pub(crate) fn qemu_version(cfg: &Config) -> String {
    let Some(q) = &cfg.qemu else { return "not found".into() };
    Command::new(q)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The goals as a markdown table on stdout (nothing when there are none).
pub(crate) fn print_goals(goals: &[Value]) {
    if !goals.is_empty() {
        println!();
        println!("| goal | image | wire | value | target | met |");
        println!("|---|---|---|---:|---:|---|");
        for g in goals {
            println!(
                "| {} | {} | {} | {:.2} | {} | {} |",
                g["goal"].as_str().unwrap_or(""),
                g["image"].as_str().unwrap_or(""),
                g["wire"].as_str().unwrap_or(""),
                g["value"].as_f64().unwrap_or(f64::NAN),
                g["target"],
                if g["met"].as_bool() == Some(true) { "yes" } else { "no" }
            );
        }
    }
}

/// The JSON document written to `cfg.json`.
pub(crate) fn document(
    cfg: &Config,
    started: u64,
    load_start: &str,
    limits: &[Limit],
    rows: &[Row],
    live: &[Live],
    goals: Vec<Value>,
) -> Value {
    json!({
        "started-unix-time": started,
        "machine": {
            "cpus": cpus(),
            "load-average-start": load_start,
            "load-average-end": loadavg(),
            "qemu": qemu_version(cfg),
            "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        },
        "config": {
            "quick": cfg.quick,
            "sizes": cfg.sizes,
            "fills": cfg.fills.iter().map(|f| f.pattern().to_string()).collect::<Vec<_>>(),
            "runs": cfg.runs,
            "qmig": cfg.qmig.display().to_string(),
            "qemu-source": "paused (-S, prelaunch), max-bandwidth 1 TiB/s, default capabilities",
            "time": "migration start (QMP migrate / qmig send spawned) to both sides done",
            "busy-threshold": BUSY,
        },
        "limits": limits.iter().map(|l| json!({
            "key": l.key, "label": l.label, "size": cfg.limit_size, "gib-per-s": round(l.gibs, 3),
            "runs": l.all.iter().map(|g| round(*g, 3)).collect::<Vec<_>>(), "others": round(l.others, 3),
        })).collect::<Vec<_>>(),
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "live": live.iter().map(Live::to_json).collect::<Vec<_>>(),
        "goals": goals,
    })
}
