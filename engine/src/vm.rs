//! What a VMM supplies besides RAM and vCPUs: devices, block devices the
//! migration hands over, and blockers. Every default refuses: a VMM that forgot
//! to implement something fails the migration instead of silently migrating the
//! wrong thing.
//!
//! Devices come in QEMU's three kinds, each its own trait:
//!
//! - [`DeviceHandler`]: state described by a vmstate description, sent at
//!   switchover in a FULL section (QEMU's `vmsd`).
//! - [`RawDevice`]: state the device writes and reads back itself, sent at
//!   switchover in a FULL section whose body is the device's own bytes (QEMU's
//!   `SaveVMHandlers` `save_state` / `load_state`); the vmdesc records its size.
//! - [`LiveDevice`]: state sent live alongside RAM in START, PART and END
//!   sections of its own (QEMU's `save_setup`, `save_live_iterate`,
//!   `save_live_complete_precopy`, `save_live_pending`, `save_cleanup`, and
//!   `load_state` on the destination); its pending bytes count against the
//!   downtime limit together with RAM's.
//!
//! A hand-written body has no framing: the destination's loader must read exactly
//! what the source's saver wrote, and the section footer is checked right after.
//!
//! Device errors are the reason only; the engine reports them as
//! `device '<idstr>': <reason>` ([`device_error`]).

use savevm_format::vmstate::{State, Vmsd};
use savevm_format::SectionKind;
use std::io::{Read, Write};
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
        Err("cannot save its state".into())
    }
    /// Destination: the state received (decoded at `version`).
    fn load(&mut self, _version: u32, _state: State) -> Result<(), String> {
        Err("cannot load state".into())
    }
}

/// A device whose state it writes and reads back itself (QEMU's old-style
/// `save_state` / `load_state`): a FULL section at switchover whose body is exactly
/// the bytes [`save_state`](Self::save_state) writes.
pub trait RawDevice: Send {
    /// Section idstr.
    fn idstr(&self) -> String;
    /// Instance id (0 unless several instances share the idstr).
    fn instance_id(&self) -> u32 {
        0
    }
    /// Version written in the section header and passed to the destination's loader.
    fn version(&self) -> u32;
    /// Source, at switchover with the vCPUs stopped: write the state to `out`.
    fn save_state(&mut self, _out: &mut dyn Write) -> Result<(), String> {
        Err("cannot save its state".into())
    }
    /// Destination: read exactly the bytes the source wrote (sent at `version`) from
    /// `input`; reading fewer or more fails the migration at that offset.
    fn load_state(&mut self, _version: u32, _input: &mut dyn Read) -> Result<(), String> {
        Err("cannot load state".into())
    }
}

/// A device whose state is sent while the guest runs, alongside RAM (QEMU's live
/// `SaveVMHandlers`): a START section at setup, a PART in every iteration while it
/// has pending bytes, an END at switchover. Each body is the device's own bytes.
pub trait LiveDevice: Send {
    /// Section idstr.
    fn idstr(&self) -> String;
    /// Instance id (0 unless several instances share the idstr).
    fn instance_id(&self) -> u32 {
        0
    }
    /// Version written in the START header and passed to the destination's loader.
    fn version(&self) -> u32;
    /// Source, at setup (guest running, after RAM's START): start tracking changes and
    /// write the START body (QEMU's `save_setup`).
    fn save_setup(&mut self, _out: &mut dyn Write) -> Result<(), String> {
        Err("cannot be migrated live".into())
    }
    /// Source, before every convergence decision: bytes still to send (QEMU's
    /// `save_live_pending`); they must fit in the downtime limit with RAM's for the
    /// switchover to happen.
    fn pending(&mut self) -> u64 {
        0
    }
    /// Source, once per iteration while [`pending`](Self::pending) is not 0 (guest
    /// running): write a PART body, a bounded share of what is pending (QEMU's
    /// `save_live_iterate`).
    fn save_iterate(&mut self, _out: &mut dyn Write) -> Result<(), String> {
        Err("cannot be migrated live".into())
    }
    /// Source, at switchover (vCPUs stopped, after RAM's END): write everything left
    /// as the END body (QEMU's `save_live_complete_precopy`).
    fn save_complete(&mut self, _out: &mut dyn Write) -> Result<(), String> {
        Err("cannot be migrated live".into())
    }
    /// Source, once after [`save_setup`](Self::save_setup) was called, whatever the
    /// outcome (completed, failed, cancelled; also when `save_setup` failed): stop
    /// tracking and free what the migration used (QEMU's `save_cleanup`).
    fn save_cleanup(&mut self) {}
    /// Destination: the body of one START, PART or END section (`kind`), sent at
    /// `version`; read exactly the bytes the source wrote.
    fn load_state(&mut self, _kind: SectionKind, _version: u32, _input: &mut dyn Read) -> Result<(), String> {
        Err("cannot load live state".into())
    }
}

/// A device's refusal with its name: `device 'idstr': why` (`device 'idstr' instance N: why`
/// for instances other than 0).
pub fn device_error(idstr: &str, instance_id: u32, why: &str) -> String {
    if instance_id == 0 {
        format!("device '{idstr}': {why}")
    } else {
        format!("device '{idstr}' instance {instance_id}: {why}")
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
    /// vmstate devices saved (source) or loaded (destination), besides `timer` and
    /// `globalstate`; their FULL sections come first, in this order.
    pub devices: Vec<&'a mut dyn DeviceHandler>,
    /// Hand-written devices; their FULL sections follow the vmstate devices', in this order.
    pub raw_devices: Vec<&'a mut dyn RawDevice>,
    /// Live devices, iterated in this order after RAM in every pass.
    pub live_devices: Vec<&'a mut dyn LiveDevice>,
    /// Block devices handed over.
    pub blocks: Vec<&'a mut dyn BlockDevice>,
    /// Registered blockers; any makes the migration fail at start.
    pub blockers: Vec<MigrationBlocker>,
    /// Dirty sources besides the regions' bitmaps, as `(region index, source)`:
    /// started at setup, ORed into the region's pages to send at every sync, stopped at the end.
    pub dirty_sources: Vec<(usize, &'a mut dyn crate::dirty::DirtySource)>,
}
