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
    /// `max-postcopy-bandwidth`: bytes/s of the background pages in postcopy, 0 =
    /// unlimited (QEMU's default).
    pub max_postcopy_bandwidth: u64,
}

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
        Ok(())
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
        assert_eq!(serde_json::from_value::<MigrationParameters>(v).expect("round trip"), p);
        // As migrate-set-parameters takes them: only some members, the rest QEMU's defaults.
        let q: MigrationParameters = serde_json::from_str(r#"{"downtime-limit": 50}"#).expect("partial");
        assert_eq!(q, MigrationParameters { downtime_limit: 50, ..Default::default() });
        assert!(serde_json::from_str::<MigrationParameters>(r#"{"downtime_limit": 50}"#).is_err(), "QEMU's names only");
        let c: MigrationCapabilities = serde_json::from_str(r#"{"auto-converge": true}"#).expect("caps");
        assert!(c.auto_converge && !c.pause_before_switchover);
        let v = serde_json::to_value(c).expect("serialize");
        assert_eq!(v["pause-before-switchover"], false);
        assert_eq!(v["postcopy-ram"], false);
        let c: MigrationCapabilities = serde_json::from_str(r#"{"postcopy-ram": true}"#).expect("postcopy caps");
        assert!(c.postcopy_ram && !c.return_path && c.uses_return_path(), "postcopy-ram opens the return path");
    }
}
