//! What a VMM supplies besides RAM and vCPUs: devices whose state travels in
//! FULL sections, block devices the migration hands over, and blockers. Every
//! default refuses: a VMM that forgot to implement something fails the
//! migration instead of silently migrating the wrong thing.

use savevm_format::vmstate::{State, Vmsd};
use std::sync::Arc;

/// A device whose state is described by a vmstate description.
pub trait DeviceHandler: Send {
    /// Section idstr (e.g. `serial`, `0000:00:02.0/virtio-net`).
    fn idstr(&self) -> String;
    /// Instance id (0 unless several instances share the idstr).
    fn instance_id(&self) -> u32 {
        0
    }
    /// The description; the section carries its `version_id`.
    fn vmsd(&self) -> Arc<Vmsd>;
    /// Source, at switchover with the vCPUs stopped: the state to send.
    fn save(&mut self) -> Result<State, String> {
        Err(format!("device '{}' cannot save its state", self.idstr()))
    }
    /// Destination: the state received (decoded at `version`).
    fn load(&mut self, _version: u32, _state: State) -> Result<(), String> {
        Err(format!("device '{}' cannot load state", self.idstr()))
    }
}

/// A block device (disk image) the two sides hand over.
pub trait BlockDevice: Send {
    /// A name for messages.
    fn name(&self) -> String;
    /// Source, at switchover: flush and stop using the image (the destination takes it).
    fn inactivate(&mut self) -> Result<(), String> {
        Err(format!("block device '{}' cannot be inactivated", self.name()))
    }
    /// Source, after a failed or cancelled switchover: take the image back.
    fn activate(&mut self) -> Result<(), String> {
        Err(format!("block device '{}' cannot be reactivated", self.name()))
    }
    /// Destination, after all state is loaded and before the guest runs: drop every
    /// cached block and reread the image the source wrote.
    fn invalidate_cache(&mut self) -> Result<(), String> {
        Err(format!("block device '{}' cannot invalidate its cache", self.name()))
    }
}

/// A reason the VM cannot migrate now (QEMU's migration blockers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationBlocker {
    /// Shown to the user when a migration is refused.
    pub reason: String,
}

/// Devices, block devices and blockers of one VM, borrowed for a migration.
#[derive(Default)]
pub struct VmParts<'a> {
    /// Devices saved (source) or loaded (destination), besides `timer` and `globalstate`.
    pub devices: Vec<&'a mut dyn DeviceHandler>,
    /// Block devices handed over.
    pub blocks: Vec<&'a mut dyn BlockDevice>,
    /// Registered blockers; any makes the migration fail at start.
    pub blockers: Vec<MigrationBlocker>,
    /// Dirty sources besides the regions' bitmaps, as `(region index, source)`:
    /// started at setup, ORed into the region's pages to send at every sync, stopped at the end.
    pub dirty_sources: Vec<(usize, &'a mut dyn crate::dirty::DirtySource)>,
}
