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
//! Every method returns a [`VmmError`]: the implementor gives the reason only
//! (`VmmError::msg("...")`, a `String`, an `io::Error` or any boxed error); the
//! engine names what failed ([`VmmPart`]), so a report reads
//! `device '<idstr>': <reason>`.

use savevm_format::vmstate::{State, Vmsd};
use savevm_format::SectionKind;
use std::fmt;
use std::io::{Read, Write};
use std::sync::Arc;

/// Any error a VMM implementation returns, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The part of the VMM that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmmPart {
    /// A device (vmstate, hand-written or live), by section idstr and instance.
    Device {
        /// Section idstr.
        idstr: String,
        /// Instance id.
        instance: u32,
    },
    /// A block device, by name, and the operation refused.
    Block {
        /// The device's [`name`](BlockDevice::name).
        name: String,
        /// The operation: `inactivate`, `activate` or `invalidate cache`.
        op: &'static str,
    },
    /// A [`VcpuControl`] operation: `stop`, `resume` or `set throttle`.
    Vcpu(&'static str),
}

impl fmt::Display for VmmPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmmPart::Device { idstr, instance: 0 } => write!(f, "device '{idstr}'"),
            VmmPart::Device { idstr, instance } => write!(f, "device '{idstr}' instance {instance}"),
            VmmPart::Block { name, op } => write!(f, "block device '{name}' ({op})"),
            VmmPart::Vcpu(op) => write!(f, "vCPU control ({op})"),
        }
    }
}

/// A VMM trait implementation refused: what failed ([`part`](Self::part), set by
/// the engine) with the implementation's own error as the
/// [`source`](std::error::Error::source). Before the engine names the part it
/// displays as its cause alone.
#[derive(Debug)]
pub struct VmmError {
    part: Option<VmmPart>,
    detail: Option<String>,
    cause: BoxError,
}

impl VmmError {
    /// A refusal with this reason.
    pub fn msg(why: impl Into<String>) -> Self {
        Self::new(why.into())
    }

    /// A refusal caused by `cause` (any error, or a message).
    pub fn new(cause: impl Into<BoxError>) -> Self {
        VmmError { part: None, detail: None, cause: cause.into() }
    }

    /// Name the part that failed (the engine does this for every trait call).
    pub fn on(mut self, part: VmmPart) -> Self {
        self.part = Some(part);
        self
    }

    /// Add where it happened, printed after the part in parentheses (e.g. the stream offset).
    pub fn at(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The part that failed, once the engine named it.
    pub fn part(&self) -> Option<&VmmPart> {
        self.part.as_ref()
    }

    /// The implementation's own error.
    pub fn cause(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.cause
    }
}

impl fmt::Display for VmmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.part, &self.detail) {
            (Some(p), Some(d)) => write!(f, "{p} ({d})"),
            (Some(p), None) => write!(f, "{p}"),
            (None, Some(d)) => write!(f, "VMM ({d})"),
            (None, None) => write!(f, "{}", self.cause),
        }
    }
}

impl std::error::Error for VmmError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match (&self.part, &self.detail) {
            (None, None) => self.cause.source(),
            _ => Some(&*self.cause),
        }
    }
}

impl From<String> for VmmError {
    fn from(why: String) -> Self {
        VmmError::msg(why)
    }
}

impl From<&str> for VmmError {
    fn from(why: &str) -> Self {
        VmmError::msg(why)
    }
}

impl From<std::io::Error> for VmmError {
    fn from(e: std::io::Error) -> Self {
        VmmError::new(e)
    }
}

impl From<BoxError> for VmmError {
    fn from(e: BoxError) -> Self {
        VmmError { part: None, detail: None, cause: e }
    }
}

/// vCPU control the VMM provides (both sides: the source stops, resumes and
/// throttles; the destination resumes). The defaults refuse: a VMM that cannot
/// stop its guest must not migrate it live.
pub trait VcpuControl: Send {
    /// Stop every vCPU (switchover).
    fn stop(&mut self) -> Result<(), VmmError> {
        Err(VmmError::msg("this VMM cannot stop its vCPUs"))
    }
    /// Resume the vCPUs (after a cancel or failure; on the destination, after loading).
    fn resume(&mut self) -> Result<(), VmmError> {
        Err(VmmError::msg("this VMM cannot resume its vCPUs"))
    }
    /// Throttle the vCPUs to run `100 - percentage` % of the time (auto-converge; 0 = off).
    fn set_throttle(&mut self, _percentage: u8) -> Result<(), VmmError> {
        Err(VmmError::msg("this VMM cannot throttle its vCPUs"))
    }
}

/// A device whose state is described by a vmstate description.
pub trait DeviceHandler: Send {
    /// Section idstr (e.g. `serial`, `0000:00:02.0/virtio-net`).
    fn idstr(&self) -> &str;
    /// Instance id (0 unless several instances share the idstr).
    fn instance_id(&self) -> u32 {
        0
    }
    /// The description; the section carries its `version_id`.
    fn vmsd(&self) -> Arc<Vmsd>;
    /// Source, at switchover with the vCPUs stopped: the state to send.
    fn save(&mut self) -> Result<State, VmmError> {
        Err(VmmError::msg("cannot save its state"))
    }
    /// Destination: the state received (decoded at `version`).
    fn load(&mut self, _version: u32, _state: State) -> Result<(), VmmError> {
        Err(VmmError::msg("cannot load state"))
    }
}

/// A device whose state it writes and reads back itself (QEMU's old-style
/// `save_state` / `load_state`): a FULL section at switchover whose body is exactly
/// the bytes [`save_state`](Self::save_state) writes.
pub trait RawDevice: Send {
    /// Section idstr.
    fn idstr(&self) -> &str;
    /// Instance id (0 unless several instances share the idstr).
    fn instance_id(&self) -> u32 {
        0
    }
    /// Version written in the section header and passed to the destination's loader.
    fn version(&self) -> u32;
    /// Source, at switchover with the vCPUs stopped: write the state to `out`.
    fn save_state(&mut self, _out: &mut dyn Write) -> Result<(), VmmError> {
        Err(VmmError::msg("cannot save its state"))
    }
    /// Destination: read exactly the bytes the source wrote (sent at `version`) from
    /// `input`; reading fewer or more fails the migration at that offset.
    fn load_state(&mut self, _version: u32, _input: &mut dyn Read) -> Result<(), VmmError> {
        Err(VmmError::msg("cannot load state"))
    }
}

/// A device whose state is sent while the guest runs, alongside RAM (QEMU's live
/// `SaveVMHandlers`): a START section at setup, a PART in every iteration while it
/// has pending bytes, an END at switchover. Each body is the device's own bytes.
pub trait LiveDevice: Send {
    /// Section idstr.
    fn idstr(&self) -> &str;
    /// Instance id (0 unless several instances share the idstr).
    fn instance_id(&self) -> u32 {
        0
    }
    /// Version written in the START header and passed to the destination's loader.
    fn version(&self) -> u32;
    /// Source, at setup (guest running, after RAM's START): start tracking changes and
    /// write the START body (QEMU's `save_setup`).
    fn save_setup(&mut self, _out: &mut dyn Write) -> Result<(), VmmError> {
        Err(VmmError::msg("cannot be migrated live"))
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
    fn save_iterate(&mut self, _out: &mut dyn Write) -> Result<(), VmmError> {
        Err(VmmError::msg("cannot be migrated live"))
    }
    /// Source, at switchover (vCPUs stopped, after RAM's END): write everything left
    /// as the END body (QEMU's `save_live_complete_precopy`).
    fn save_complete(&mut self, _out: &mut dyn Write) -> Result<(), VmmError> {
        Err(VmmError::msg("cannot be migrated live"))
    }
    /// Source, once after [`save_setup`](Self::save_setup) was called, whatever the
    /// outcome (completed, failed, cancelled; also when `save_setup` failed): stop
    /// tracking and free what the migration used (QEMU's `save_cleanup`).
    fn save_cleanup(&mut self) {}
    /// Destination: the body of one START, PART or END section (`kind`), sent at
    /// `version`; read exactly the bytes the source wrote.
    fn load_state(&mut self, _kind: SectionKind, _version: u32, _input: &mut dyn Read) -> Result<(), VmmError> {
        Err(VmmError::msg("cannot load live state"))
    }
}

/// Name a device's refusal: reported as `device 'idstr': why` (`device 'idstr'
/// instance N: why` for instances other than 0).
pub fn device_error(idstr: &str, instance: u32, e: VmmError) -> VmmError {
    e.on(VmmPart::Device { idstr: idstr.to_owned(), instance })
}

/// A block device (disk image) the two sides hand over.
pub trait BlockDevice: Send {
    /// A name for messages.
    fn name(&self) -> String;
    /// Source, at switchover: flush and stop using the image (the destination takes it).
    fn inactivate(&mut self) -> Result<(), VmmError> {
        Err(VmmError::msg("cannot be inactivated"))
    }
    /// Source, after a failed or cancelled switchover: take the image back.
    fn activate(&mut self) -> Result<(), VmmError> {
        Err(VmmError::msg("cannot be reactivated"))
    }
    /// Destination, after all state is loaded and before the guest runs: drop every
    /// cached block and reread the image the source wrote.
    fn invalidate_cache(&mut self) -> Result<(), VmmError> {
        Err(VmmError::msg("cannot invalidate its cache"))
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
