//! `query-migrate` statistics, readable at any time from another thread.

use crate::state::{MigrationStatus, StateMachine};
use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The figures QEMU's `query-migrate` reports (source side), by its names.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationInfo {
    /// `status`.
    pub status: MigrationStatus,
    /// `total-time` so far (final at completion).
    pub total_time: Duration,
    /// `setup-time`.
    pub setup_time: Duration,
    /// `downtime` (shown once completed): from vCPU stop to completion.
    pub downtime: Option<Duration>,
    /// `expected-downtime` (ms) while running.
    pub expected_downtime: Option<u64>,
    /// `ram.transferred`: bytes of the stream sent.
    pub transferred: u64,
    /// `ram.remaining`: dirty bytes not yet sent.
    pub remaining: u64,
    /// `ram.total`.
    pub total: u64,
    /// `ram.duplicate`: zero pages sent.
    pub duplicate: u64,
    /// `ram.normal`: full pages sent.
    pub normal: u64,
    /// `ram.dirty-sync-count`.
    pub dirty_sync_count: u64,
    /// `ram.dirty-pages-rate` (pages/s over the last period ≥ 1 s).
    pub dirty_pages_rate: u64,
    /// `ram.mbps` (Mbit/s).
    pub mbps: f64,
    /// `ram.pages-per-second`.
    pub pages_per_second: u64,
    /// `cpu-throttle-percentage` while auto-converge throttles.
    pub cpu_throttle_percentage: Option<u8>,
    /// `ram.page-size`.
    pub page_size: u64,
    /// `error-desc` when failed.
    pub error_desc: Option<String>,
}

impl Default for MigrationInfo {
    fn default() -> Self {
        MigrationInfo {
            status: MigrationStatus::None,
            total_time: Duration::ZERO,
            setup_time: Duration::ZERO,
            downtime: None,
            expected_downtime: None,
            transferred: 0,
            remaining: 0,
            total: 0,
            duplicate: 0,
            normal: 0,
            dirty_sync_count: 0,
            dirty_pages_rate: 0,
            mbps: 0.0,
            pages_per_second: 0,
            cpu_throttle_percentage: None,
            page_size: savevm_format::TARGET_PAGE_SIZE as u64,
            error_desc: None,
        }
    }
}

impl MigrationInfo {
    /// The `query-migrate` JSON object.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("status".into(), json!(self.status.as_str()));
        if self.status == MigrationStatus::None {
            return Value::Object(m);
        }
        m.insert("total-time".into(), json!(self.total_time.as_millis() as u64));
        m.insert("setup-time".into(), json!(self.setup_time.as_millis() as u64));
        if let Some(d) = self.downtime {
            m.insert("downtime".into(), json!(d.as_millis() as u64));
        }
        if let Some(e) = self.expected_downtime.filter(|_| self.status != MigrationStatus::Completed) {
            m.insert("expected-downtime".into(), json!(e));
        }
        if let Some(t) = self.cpu_throttle_percentage {
            m.insert("cpu-throttle-percentage".into(), json!(t));
        }
        if let Some(e) = &self.error_desc {
            m.insert("error-desc".into(), json!(e));
        }
        m.insert(
            "ram".into(),
            json!({
                "transferred": self.transferred,
                "remaining": self.remaining,
                "total": self.total,
                "duplicate": self.duplicate,
                "normal": self.normal,
                "normal-bytes": self.normal * self.page_size,
                "dirty-sync-count": self.dirty_sync_count,
                "dirty-pages-rate": self.dirty_pages_rate,
                "mbps": (self.mbps * 1000.0).round() / 1000.0,
                "pages-per-second": self.pages_per_second,
                "page-size": self.page_size,
            }),
        );
        Value::Object(m)
    }
}

/// Shared, always-current statistics of one migration. The status is not kept
/// here but read from the migration's state machine, its one owner.
#[derive(Debug, Clone, Default)]
pub struct InfoHandle {
    inner: Arc<Mutex<MigrationInfo>>,
    state: Option<StateMachine>,
}

impl InfoHandle {
    fn lock(&self) -> MutexGuard<'_, MigrationInfo> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Figures whose `status` is `state`'s.
    pub fn for_state(state: StateMachine) -> Self {
        InfoHandle { inner: Default::default(), state: Some(state) }
    }

    /// A copy of the current figures.
    pub fn get(&self) -> MigrationInfo {
        let mut i = self.lock().clone();
        if let Some(s) = &self.state {
            i.status = s.status();
        }
        i
    }

    /// Update the figures.
    pub fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut self.lock())
    }
}
