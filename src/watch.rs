//! What the CLI commands run beside a migration: a progress bar on a terminal and
//! a whole-migration deadline (virsh's `--timeout` / `--timeout-action`).

use engine::source::Outgoing;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What to do when `--timeout` passes with the migration still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutAction {
    /// Cancel the migration (the guest runs on at the source).
    Cancel,
    /// Stop the guest and send the rest now, whatever the downtime limit says.
    Switchover,
}

impl TimeoutAction {
    /// `cancel` or `switchover`.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutAction::Cancel => "cancel",
            TimeoutAction::Switchover => "switchover",
        }
    }
}

impl std::str::FromStr for TimeoutAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cancel" => Ok(TimeoutAction::Cancel),
            "switchover" => Ok(TimeoutAction::Switchover),
            _ => Err(format!("'{s}': expected cancel or switchover")),
        }
    }
}

/// A whole-migration deadline: after `after`, the action, unless the migration
/// ended first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout {
    /// How long the migration may run.
    pub after: Duration,
    /// What to do then.
    pub action: TimeoutAction,
}

/// A running deadline; dropping it (or [`Deadline::finish_json`]) disarms it.
pub struct Deadline {
    timeout: Timeout,
    stop: crossbeam_channel::Sender<()>,
    fired: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Deadline {
    /// Arm `timeout` over `out`.
    pub fn arm(out: &Outgoing, timeout: Timeout) -> Self {
        let (stop, rx) = crossbeam_channel::bounded::<()>(1);
        let fired = Arc::new(AtomicBool::new(false));
        let (out, flag) = (out.clone(), fired.clone());
        let thread = std::thread::spawn(move || {
            if rx.recv_timeout(timeout.after).is_err() && !out.state().status().is_terminal() {
                flag.store(true, Ordering::SeqCst);
                match timeout.action {
                    TimeoutAction::Cancel => out.cancel().cancel(),
                    TimeoutAction::Switchover => out.force_switchover(),
                }
            }
        });
        Deadline { timeout, stop, fired, thread: Some(thread) }
    }

    /// Whether it fired.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// `{"secs", "action", "fired"}` for the statistics.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "secs": self.timeout.after.as_secs_f64(),
            "action": self.timeout.action.as_str(),
            "fired": self.fired(),
        })
    }

    /// Disarm, then say what it did (`{"secs", "action", "fired"}`).
    pub fn finish_json(mut self) -> serde_json::Value {
        self.disarm();
        self.to_json()
    }

    fn disarm(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// A migration's failure after its deadline fired says so (`--timeout N s reached
/// (action): cause`); any other failure is returned as it is.
pub fn timeout_error(e: crate::Error, timeout: Option<&serde_json::Value>) -> crate::Error {
    match timeout {
        Some(t) if t["fired"] == true => crate::Error::Usage(format!(
            "--timeout {} s reached ({}): {}",
            t["secs"],
            t["action"].as_str().unwrap_or(""),
            e.report()
        )),
        _ => e,
    }
}

/// A progress line on stderr while `out` runs (pass, sent, remaining, bandwidth,
/// dirty rate, expected downtime, throttle), until the returned guard is dropped.
pub struct Progress {
    stop: crossbeam_channel::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Show `out`'s figures every 100 ms.
    pub fn outgoing(out: &Outgoing) -> Self {
        let out = out.clone();
        Self::spawn(move || {
            let i = out.info().get();
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            format!(
                "{} | pass {} | sent {:.0} MiB | remaining {:.1} MiB | {:.0} Mbit/s | dirty {} pages/s | expected downtime {} ms{}",
                i.status,
                i.dirty_sync_count,
                mib(i.transferred),
                mib(i.remaining),
                i.mbps,
                i.dirty_pages_rate,
                i.expected_downtime.unwrap_or(0),
                i.cpu_throttle_percentage.map(|t| format!(" | throttle {t}%")).unwrap_or_default(),
            ) + &if i.status == engine::state::MigrationStatus::PostcopyActive {
                format!(" | page requests {}", i.postcopy_requests)
            } else {
                String::new()
            }
        })
    }

    /// Show the bytes `received` returns (a counter the receiver keeps) and their rate.
    pub fn incoming(received: impl Fn() -> u64 + Send + 'static) -> Self {
        let t0 = std::time::Instant::now();
        Self::spawn(move || {
            let b = received();
            let secs = t0.elapsed().as_secs_f64().max(1e-3);
            format!(
                "receiving | {:.0} MiB | {:.0} MiB/s",
                b as f64 / (1 << 20) as f64,
                b as f64 / (1 << 20) as f64 / secs
            )
        })
    }

    fn spawn(line: impl Fn() -> String + Send + 'static) -> Self {
        let (stop, rx) = crossbeam_channel::bounded::<()>(1);
        let thread = std::thread::spawn(move || {
            let bar = indicatif::ProgressBar::new_spinner();
            while rx.recv_timeout(Duration::from_millis(100)).is_err() {
                bar.set_message(line());
                bar.tick();
            }
            bar.finish_and_clear();
        });
        Progress { stop, thread: Some(thread) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
