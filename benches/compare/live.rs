//! The live KVM rows: `qmig demo --kvm` at three dirty rates.

use super::*;

/// One live KVM run set: `qmig demo --kvm` at one dirty rate.
pub(crate) struct Live {
    /// Dirty rate asked of the guest, bytes/s.
    pub(crate) rate: u64,
    /// The stats JSON of each run (`query-migrate` names plus `guest`).
    pub(crate) runs: Vec<Value>,
    pub(crate) error: Option<String>,
}

impl Live {
    pub(crate) fn field(&self, f: impl Fn(&Value) -> Option<f64>) -> Vec<f64> {
        self.runs.iter().filter_map(f).collect()
    }
    pub(crate) fn to_json(&self) -> Value {
        json!({ "dirty-rate": self.rate, "runs": self.runs, "error": self.error })
    }
}

/// The live case: a running KVM guest (1 GiB in two slots, 256 MiB working set)
/// migrated by `qmig demo --kvm` to a `qmig kvm-dest` process over a unix socket
/// at three dirty rates, `cfg.runs` times each, with `downtime-limit` 300 ms and
/// `max-bandwidth` unlimited; each run's stats JSON is kept whole. Without a
/// usable /dev/kvm there are none, with a note.
pub(crate) fn live_rows(cfg: &Config) -> Vec<Live> {
    if !cfg.live {
        return vec![];
    }
    if let Err(e) = fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        println!("note: /dev/kvm unusable ({e}): no live KVM rows");
        return vec![];
    }
    let (ram, ws) = if cfg.quick { ("256M", "64M") } else { ("1G", "256M") };
    let mut out = vec![];
    for rate in [0u64, 64, 256] {
        let mut live = Live { rate: rate * MIB, runs: vec![], error: None };
        for run in 0..cfg.runs {
            let stats = cfg.shm.join(format!("qmig-compare-live-{}.json", std::process::id()));
            let o = Command::new(&cfg.qmig)
                .args(["demo", "--kvm", "--ram-size", ram, "--working-set", ws])
                .args(["--dirty-rate", &rate.to_string(), "--downtime-limit", "300", "--max-bandwidth", "0"])
                .args(["--seed", &(run + 1).to_string(), "--stats-json"])
                .arg(&stats)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output();
            let v = fs::read_to_string(&stats).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok());
            let _ = fs::remove_file(&stats);
            match (o, v) {
                (Ok(o), Some(v)) if o.status.success() => {
                    eprintln!(
                        "live {rate} MiB/s run {run}: {} ms, downtime {} ms, {} passes, verified {}",
                        v["total-time"], v["downtime"], v["ram"]["dirty-sync-count"], v["verified"]
                    );
                    live.runs.push(v);
                }
                (Ok(o), _) => {
                    live.error = Some(String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("").into())
                }
                (Err(e), _) => live.error = Some(format!("run {}: {e}", cfg.qmig.display())),
            }
        }
        out.push(live);
    }
    out
}

pub(crate) fn print_live(live: &[Live]) {
    println!();
    println!("### live KVM guest (`qmig demo --kvm`, downtime-limit 300 ms, max-bandwidth unlimited)");
    println!();
    println!(
        "| dirty rate asked | achieved | passes | total time s | downtime ms (median, max) | within 300 ms | verified | runs |"
    );
    println!("|---:|---:|---:|---:|---:|---|---|---:|");
    for l in live {
        if l.runs.is_empty() {
            println!(
                "| {} MiB/s | failed: {} | | | | | | 0 |",
                l.rate / MIB,
                l.error.as_deref().unwrap_or("").replace('|', "/")
            );
            continue;
        }
        let achieved = median(l.field(|v| v["guest"]["dirty-rate-achieved"].as_f64())) / MIB as f64;
        let passes = median(l.field(|v| v["ram"]["dirty-sync-count"].as_f64()));
        let total = median(l.field(|v| v["total-time"].as_f64())) / 1e3;
        let down = l.field(|v| v["downtime"].as_f64());
        let max = down.iter().cloned().fold(0.0, f64::max);
        let within = down.iter().filter(|d| **d <= 300.0).count();
        let verified = l.runs.iter().filter(|v| v["verified"] == true).count();
        println!(
            "| {} MiB/s | {achieved:.0} MiB/s | {passes:.0} | {total:.3} | {:.0}, {max:.0} | {within}/{} | {verified}/{} | {} |",
            l.rate / MIB,
            median(down),
            l.runs.len(),
            l.runs.len(),
            l.runs.len()
        );
    }
}
