//! Migration statistics with QEMU's `query-migrate` field names.

use serde_json::{json, Value};
use std::time::Duration;

/// Final figures of a migration, reported as `query-migrate` does.
#[derive(Debug, Clone, Default)]
pub struct MigrationStats {
    /// `completed`, `failed` or `cancelled`.
    pub status: String,
    /// From start to completion.
    pub total_time: Duration,
    /// From start to the end of setup (connection and RAM block list).
    pub setup_time: Duration,
    /// Bytes of the stream on the wire.
    pub transferred: u64,
    /// Sum of the RAM blocks' lengths.
    pub total: u64,
    /// Zero pages (`ram.duplicate`).
    pub duplicate: u64,
    /// Full pages (`ram.normal`).
    pub normal: u64,
    /// Target page size.
    pub page_size: u64,
}

impl MigrationStats {
    /// Throughput in Mbit/s over the non-setup time, as QEMU computes `ram.mbps` at completion.
    pub fn mbps(&self) -> f64 {
        let secs = self.total_time.saturating_sub(self.setup_time).as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            self.transferred as f64 * 8.0 / secs / 1e6
        }
    }

    /// The JSON line: `{"status", "total-time", "setup-time", "ram": {...}}`.
    pub fn to_json(&self) -> Value {
        json!({
            "status": self.status,
            "total-time": self.total_time.as_millis() as u64,
            "setup-time": self.setup_time.as_millis() as u64,
            "ram": {
                "transferred": self.transferred,
                "total": self.total,
                "duplicate": self.duplicate,
                "normal": self.normal,
                "normal-bytes": self.normal * self.page_size,
                "mbps": (self.mbps() * 1000.0).round() / 1000.0,
                "page-size": self.page_size,
            }
        })
    }
}
