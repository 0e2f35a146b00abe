//! Migration parameters and capabilities, by QEMU's names, defaults and ranges
//! (`migrate-set-parameters`, 7.2), changeable while a migration runs.

use std::sync::{Arc, Mutex, MutexGuard};

/// `migrate-set-parameters` values the engine uses (serde: QEMU's kebab-case
/// names, missing members take QEMU's defaults).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct MigrationParameters {
    /// `max-bandwidth`: bytes/s, 0 = unlimited. QEMU default 128 MiB/s.
    pub max_bandwidth: u64,
    /// `downtime-limit`: ms the final stop-and-copy may take. Default 300, at most 2000000.
    pub downtime_limit: u64,
    /// `throttle-trigger-threshold`: % of transferred bytes the dirty bytes must exceed. Default 50 (1..=100).
    pub throttle_trigger_threshold: u8,
    /// `cpu-throttle-initial`: first throttle %. Default 20 (1..=99).
    pub cpu_throttle_initial: u8,
    /// `cpu-throttle-increment`: step %. Default 10 (1..=99).
    pub cpu_throttle_increment: u8,
    /// `cpu-throttle-tailslow`: scale the last steps by need. Default false.
    pub cpu_throttle_tailslow: bool,
    /// `max-cpu-throttle`: cap %. Default 99 (initial..=99).
    pub max_cpu_throttle: u8,
    /// `multifd-channels`: connections besides the main one with capability
    /// `multifd`. Default 2 (1..=255).
    pub multifd_channels: u8,
    /// `multifd-compression`: `none` (default), `zlib` or `zstd`.
    pub multifd_compression: MultifdCompression,
    /// `multifd-zlib-level`: zlib level of multifd packets. Default 1 (0..=9).
    pub multifd_zlib_level: u8,
    /// `multifd-zstd-level`: zstd level of multifd packets. Default 1 (0..=20).
    pub multifd_zstd_level: u8,
    /// `xbzrle-cache-size`: bytes of the source's XBZRLE cache. Default 64 MiB, a power of two of at least a page.
    pub xbzrle_cache_size: u64,
    /// `max-postcopy-bandwidth`: bytes/s of the background pages in postcopy, 0 =
    /// unlimited (QEMU's default).
    pub max_postcopy_bandwidth: u64,
}

/// `multifd-compression` (QEMU's `MultiFDCompression`, 7.2's values).
pub type MultifdCompression = savevm_format::multifd::Compression;

impl Default for MigrationParameters {
    fn default() -> Self {
        MigrationParameters {
            max_bandwidth: 128 << 20,
            downtime_limit: 300,
            throttle_trigger_threshold: 50,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            cpu_throttle_tailslow: false,
            max_cpu_throttle: 99,
            multifd_channels: 2,
            multifd_compression: MultifdCompression::None,
            multifd_zlib_level: 1,
            multifd_zstd_level: 1,
            xbzrle_cache_size: crate::xbzrle::DEFAULT_CACHE_SIZE,
            max_postcopy_bandwidth: 0,
        }
    }
}

/// A parameter outside QEMU's range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Parameter '{name}' expects {expects}")]
pub struct ParameterError {
    /// QEMU's parameter name.
    pub name: &'static str,
    /// The allowed range, in QEMU's words.
    pub expects: &'static str,
}

impl MigrationParameters {
    /// Check every value against QEMU 7.2's ranges (`migrate_params_check`).
    pub fn validate(&self) -> Result<(), ParameterError> {
        let bad = |name, expects| Err(ParameterError { name, expects });
        if self.downtime_limit > 2_000_000 {
            return bad("downtime_limit", "an integer in the range of 0 to (2000 * 1000) ms");
        }
        if !(1..=100).contains(&self.throttle_trigger_threshold) {
            return bad("throttle_trigger_threshold", "an integer in the range of 1 to 100");
        }
        if !(1..=99).contains(&self.cpu_throttle_initial) {
            return bad("cpu_throttle_initial", "an integer in the range of 1 to 99");
        }
        if !(1..=99).contains(&self.cpu_throttle_increment) {
            return bad("cpu_throttle_increment", "an integer in the range of 1 to 99");
        }
        if self.max_cpu_throttle < self.cpu_throttle_initial || self.max_cpu_throttle > 99 {
            return bad("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99");
        }
        if self.multifd_channels < 1 {
            return bad("multifd_channels", "a value between 1 and 255");
        }
        if self.multifd_zlib_level > 9 {
            return bad("multifd_zlib_level", "a value between 0 and 9");
        }
        if self.multifd_zstd_level > 20 {
            return bad("multifd_zstd_level", "a value between 0 and 20");
        }
        if self.xbzrle_cache_size < crate::memory::PAGE as u64 || !self.xbzrle_cache_size.is_power_of_two() {
            return bad("xbzrle_cache_size", "a power of two no less than the target page size");
        }
        Ok(())
    }

    /// The compression level of the selected `multifd-compression`.
    pub fn multifd_level(&self) -> u8 {
        match self.multifd_compression {
            MultifdCompression::Zlib => self.multifd_zlib_level,
            MultifdCompression::Zstd => self.multifd_zstd_level,
            MultifdCompression::None => 0,
        }
    }
}

/// Capabilities the engine knows (`migrate-set-capabilities`), all off by default
/// (serde: QEMU's kebab-case names, missing ones off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct MigrationCapabilities {
    /// `auto-converge`: throttle the vCPUs when the guest dirties faster than we send.
    pub auto_converge: bool,
    /// `pause-before-switchover`: wait in `pre-switchover` until told to continue.
    pub pause_before_switchover: bool,
    /// `events`: emit state events (the engine always notifies its subscribers).
    pub events: bool,
    /// `return-path`: open the destination's return path (MIG_CMD_OPEN_RETURN_PATH,
    /// PING 1) and report `completed` only after its SHUT(0); needs a socket channel.
    pub return_path: bool,
    /// `multifd`: pages go on `multifd-channels` extra connections (tcp: and unix:
    /// only), zero pages and everything else on the main one, as QEMU 7.2 does.
    pub multifd: bool,
    /// `xbzrle`: after the bulk pass, send pages found in the XBZRLE cache as deltas
    /// against the copy sent last (see [`crate::xbzrle`]); unused with `multifd`, as in 7.2.
    pub xbzrle: bool,
    /// `postcopy-ram`: allow switching to postcopy (`migrate-start-postcopy`);
    /// opens the return path as `return-path` does (page requests come back on it).
    pub postcopy_ram: bool,
}

impl MigrationCapabilities {
    /// Whether the return path is opened: `return-path`, or `postcopy-ram` which
    /// needs it for page requests (QEMU 7.2's migration_thread opens it for either).
    pub fn uses_return_path(&self) -> bool {
        self.return_path || self.postcopy_ram
    }
}

/// Parameters shared between the migration thread and whoever tunes it.
#[derive(Debug, Clone, Default)]
pub struct SharedParameters {
    inner: Arc<Mutex<MigrationParameters>>,
}

impl SharedParameters {
    /// Share `p` (validated).
    pub fn new(p: MigrationParameters) -> Result<Self, ParameterError> {
        p.validate()?;
        Ok(SharedParameters { inner: Arc::new(Mutex::new(p)) })
    }

    fn lock(&self) -> MutexGuard<'_, MigrationParameters> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the current values.
    pub fn get(&self) -> MigrationParameters {
        self.lock().clone()
    }

    /// Change values while running (validated as a whole; nothing changes on error).
    pub fn update(&self, f: impl FnOnce(&mut MigrationParameters)) -> Result<(), ParameterError> {
        let mut g = self.lock();
        let mut next = g.clone();
        f(&mut next);
        next.validate()?;
        *g = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_uses_qemus_names_and_defaults() {
        let p = MigrationParameters { max_bandwidth: 1 << 20, cpu_throttle_tailslow: true, ..Default::default() };
        let v = serde_json::to_value(&p).expect("serialize");
        assert_eq!(v["max-bandwidth"], 1 << 20);
        assert_eq!(v["downtime-limit"], 300);
        assert_eq!(v["cpu-throttle-tailslow"], true);
        assert_eq!(v["throttle-trigger-threshold"], 50);
        assert_eq!(v["xbzrle-cache-size"], 64 << 20);
        let bad = MigrationParameters { xbzrle_cache_size: 3 << 20, ..Default::default() };
        assert_eq!(bad.validate().map_err(|e| e.name), Err("xbzrle_cache_size"));
        assert_eq!(serde_json::from_value::<MigrationParameters>(v.clone()).expect("round trip"), p);
        // As migrate-set-parameters takes them: only some members, the rest QEMU's defaults.
        let q: MigrationParameters = serde_json::from_str(r#"{"downtime-limit": 50}"#).expect("partial");
        assert_eq!(q, MigrationParameters { downtime_limit: 50, ..Default::default() });
        assert!(serde_json::from_str::<MigrationParameters>(r#"{"downtime_limit": 50}"#).is_err(), "QEMU's names only");
        assert_eq!(v["multifd-channels"], 2);
        assert_eq!(v["multifd-compression"], "none");
        assert_eq!((v["multifd-zlib-level"].as_u64(), v["multifd-zstd-level"].as_u64()), (Some(1), Some(1)));
        let m: MigrationParameters =
            serde_json::from_str(r#"{"multifd-compression": "zstd", "multifd-channels": 4}"#).expect("multifd");
        assert_eq!((m.multifd_compression, m.multifd_channels), (MultifdCompression::Zstd, 4));
        assert!(MigrationParameters { multifd_channels: 0, ..Default::default() }.validate().is_err());
        assert!(MigrationParameters { multifd_zlib_level: 10, ..Default::default() }.validate().is_err());
        assert!(MigrationParameters { multifd_zstd_level: 21, ..Default::default() }.validate().is_err());
        let c: MigrationCapabilities =
            serde_json::from_str(r#"{"auto-converge": true, "multifd": true}"#).expect("caps");
        assert!(c.multifd);
        assert!(c.auto_converge && !c.pause_before_switchover);
        let v = serde_json::to_value(c).expect("serialize");
        assert_eq!(v["pause-before-switchover"], false);
        assert_eq!(v["postcopy-ram"], false);
        let c: MigrationCapabilities = serde_json::from_str(r#"{"postcopy-ram": true}"#).expect("postcopy caps");
        assert!(c.postcopy_ram && !c.return_path && c.uses_return_path(), "postcopy-ram opens the return path");
    }
}
