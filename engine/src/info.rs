//! `query-migrate` statistics, readable at any time from another thread.

use crate::state::{MigrationStatus, StateMachine};
use serde_json::Value;
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
    /// `ram.precopy-bytes`: stream bytes sent while the guest ran.
    pub precopy_bytes: u64,
    /// `ram.downtime-bytes`: stream bytes sent with the guest stopped.
    pub downtime_bytes: u64,
    /// `ram.postcopy-bytes`: stream bytes sent while the guest ran on the destination.
    pub postcopy_bytes: u64,
    /// `ram.postcopy-requests`: page requests received from the destination.
    pub postcopy_requests: u64,
    /// `ram.multifd-bytes`: what went through the multifd channels, by QEMU 7.2's
    /// count (per packet its header plus its pages' uncompressed size; each SYNC
    /// packet's header; not the initial packets).
    pub multifd_bytes: u64,
    /// `error-desc` when failed.
    pub error_desc: Option<String>,
    /// The return path, when capability `return-path` opened one (not a QEMU field).
    pub return_path: Option<ReturnPathInfo>,
    /// `xbzrle-cache`, with capability `xbzrle`.
    pub xbzrle_cache: Option<crate::xbzrle::XbzrleCacheInfo>,
}

/// What the source's return path carried (capability `return-path`); in
/// `query-migrate` as `return-path` (our addition, not a QEMU 7.2 field).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ReturnPathInfo {
    /// PONGs received (QEMU 7.2 sends PING 1 at setup).
    pub pongs: u64,
    /// The destination's SHUT status once received (0: it loaded everything).
    pub shut: Option<u32>,
    /// How the return path failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ReturnPathInfo {
    /// `{"pongs", "shut", "error"?}` (its serde form).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
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
            precopy_bytes: 0,
            downtime_bytes: 0,
            postcopy_bytes: 0,
            postcopy_requests: 0,
            multifd_bytes: 0,
            error_desc: None,
            return_path: None,
            xbzrle_cache: None,
        }
    }
}

/// `query-migrate`'s JSON shape (QEMU 7.2's `MigrationInfo` with its `ram` member),
/// through which [`MigrationInfo`] is serialized and deserialized.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct QueryMigrate {
    status: MigrationStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    total_time: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    setup_time: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    downtime: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    expected_downtime: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    cpu_throttle_percentage: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    error_desc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    return_path: Option<ReturnPathInfo>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    ram: Option<QueryRam>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    xbzrle_cache: Option<crate::xbzrle::XbzrleCacheInfo>,
}

/// `query-migrate`'s `ram` member.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct QueryRam {
    transferred: u64,
    remaining: u64,
    total: u64,
    duplicate: u64,
    normal: u64,
    #[serde(default)]
    normal_bytes: u64,
    dirty_sync_count: u64,
    #[serde(default)]
    dirty_pages_rate: u64,
    #[serde(default)]
    mbps: f64,
    #[serde(default)]
    pages_per_second: u64,
    #[serde(default = "default_page_size")]
    page_size: u64,
    #[serde(default)]
    precopy_bytes: u64,
    #[serde(default)]
    downtime_bytes: u64,
    #[serde(default)]
    postcopy_bytes: u64,
    #[serde(default)]
    postcopy_requests: u64,
    #[serde(default)]
    multifd_bytes: u64,
    /// Pages skipped: always 0, as in QEMU 7.2 (deprecated there, kept for its users).
    #[serde(default)]
    skipped: u64,
}

fn default_page_size() -> u64 {
    4096
}

impl From<MigrationInfo> for QueryMigrate {
    fn from(i: MigrationInfo) -> Self {
        if i.status == MigrationStatus::None {
            return QueryMigrate {
                status: i.status,
                total_time: None,
                setup_time: None,
                downtime: None,
                expected_downtime: None,
                cpu_throttle_percentage: None,
                error_desc: None,
                return_path: None,
                ram: None,
                xbzrle_cache: None,
            };
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        QueryMigrate {
            status: i.status,
            total_time: Some(ms(i.total_time)),
            setup_time: Some(ms(i.setup_time)),
            downtime: i.downtime.map(ms),
            expected_downtime: i.expected_downtime.filter(|_| i.status != MigrationStatus::Completed),
            cpu_throttle_percentage: i.cpu_throttle_percentage,
            error_desc: i.error_desc,
            return_path: i.return_path,
            xbzrle_cache: i.xbzrle_cache,
            ram: Some(QueryRam {
                transferred: i.transferred,
                remaining: i.remaining,
                total: i.total,
                duplicate: i.duplicate,
                normal: i.normal,
                normal_bytes: i.normal.saturating_mul(i.page_size),
                dirty_sync_count: i.dirty_sync_count,
                dirty_pages_rate: i.dirty_pages_rate,
                mbps: (i.mbps * 1000.0).round() / 1000.0,
                pages_per_second: i.pages_per_second,
                page_size: i.page_size,
                precopy_bytes: i.precopy_bytes,
                downtime_bytes: i.downtime_bytes,
                postcopy_bytes: i.postcopy_bytes,
                postcopy_requests: i.postcopy_requests,
                multifd_bytes: i.multifd_bytes,
                skipped: 0,
            }),
        }
    }
}

impl From<QueryMigrate> for MigrationInfo {
    fn from(q: QueryMigrate) -> Self {
        let mut i = MigrationInfo {
            status: q.status,
            total_time: Duration::from_millis(q.total_time.unwrap_or(0)),
            setup_time: Duration::from_millis(q.setup_time.unwrap_or(0)),
            downtime: q.downtime.map(Duration::from_millis),
            expected_downtime: q.expected_downtime,
            cpu_throttle_percentage: q.cpu_throttle_percentage,
            error_desc: q.error_desc,
            return_path: q.return_path,
            xbzrle_cache: q.xbzrle_cache,
            ..Default::default()
        };
        if let Some(r) = q.ram {
            i.transferred = r.transferred;
            i.remaining = r.remaining;
            i.total = r.total;
            i.duplicate = r.duplicate;
            i.normal = r.normal;
            i.dirty_sync_count = r.dirty_sync_count;
            i.dirty_pages_rate = r.dirty_pages_rate;
            i.mbps = r.mbps;
            i.pages_per_second = r.pages_per_second;
            i.page_size = r.page_size;
            i.precopy_bytes = r.precopy_bytes;
            i.downtime_bytes = r.downtime_bytes;
            i.postcopy_bytes = r.postcopy_bytes;
            i.postcopy_requests = r.postcopy_requests;
            i.multifd_bytes = r.multifd_bytes;
        }
        i
    }
}

impl serde::Serialize for MigrationInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        QueryMigrate::from(self.clone()).serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for MigrationInfo {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        QueryMigrate::deserialize(d).map(MigrationInfo::from)
    }
}

impl MigrationInfo {
    /// The `query-migrate` JSON object (its serde form).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|_| serde_json::json!({ "status": self.status.as_str() }))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_uses_query_migrates_names_and_shape_and_round_trips() {
        let i = MigrationInfo {
            status: MigrationStatus::Active,
            total_time: Duration::from_millis(1234),
            setup_time: Duration::from_millis(5),
            expected_downtime: Some(40),
            cpu_throttle_percentage: Some(30),
            transferred: 1 << 30,
            remaining: 4096 * 7,
            total: 2 << 30,
            duplicate: 100,
            normal: 262_144,
            dirty_sync_count: 3,
            dirty_pages_rate: 1000,
            mbps: 8589.934592,
            pages_per_second: 250_000,
            ..Default::default()
        };
        let v = serde_json::to_value(&i).expect("serialize");
        assert_eq!(v["status"], "active");
        assert_eq!(v["total-time"], 1234);
        assert_eq!(v["expected-downtime"], 40);
        assert_eq!(v["cpu-throttle-percentage"], 30);
        assert_eq!(v["ram"]["dirty-sync-count"], 3);
        assert_eq!(v["ram"]["normal-bytes"], 262_144u64 * 4096);
        assert_eq!(v["ram"]["pages-per-second"], 250_000);
        assert_eq!((v["ram"]["skipped"].as_u64(), v["ram"]["postcopy-bytes"].as_u64()), (Some(0), Some(0)));
        assert!(v.get("downtime").is_none() && v.get("error-desc").is_none());
        let back: MigrationInfo = serde_json::from_value(v.clone()).expect("deserialize");
        assert_eq!(back, MigrationInfo { mbps: 8589.935, ..i.clone() });
        assert_eq!(i.to_json(), v);
        // A QEMU 7.2 reply (trimmed) deserializes; a migration not started is just its status.
        let qemu = r#"{"status": "completed", "setup-time": 3, "downtime": 12, "total-time": 900,
            "ram": {"total": 33554432, "postcopy-requests": 0, "dirty-sync-count": 2, "multifd-bytes": 0,
            "pages-per-second": 0, "downtime-bytes": 0, "page-size": 4096, "remaining": 0,
            "postcopy-bytes": 0, "mbps": 304.3, "transferred": 33861402, "dirty-sync-missed-zero-copy": 0,
            "precopy-bytes": 33861402, "duplicate": 8025, "dirty-pages-rate": 0, "skipped": 0,
            "normal-bytes": 270336, "normal": 66}}"#;
        let q: MigrationInfo = serde_json::from_str(qemu).expect("QEMU's reply");
        assert_eq!(
            (q.status, q.downtime, q.normal, q.duplicate),
            (MigrationStatus::Completed, Some(Duration::from_millis(12)), 66, 8025)
        );
        let none = serde_json::to_value(MigrationInfo::default()).expect("serialize");
        assert_eq!(none, serde_json::json!({"status": "none"}));
    }
}
