//! The incoming side: load the stream into the VMM's RAM (through a
//! [`PageSink`]) and devices, then invalidate every block device's cache, then
//! resume the guest (autostart, when the source was running) or leave it paused.
//! A failure anywhere, invalidation included, leaves the guest unstarted and the
//! state `failed`, with the reason.
//!
//! vmstate devices get their decoded state; hand-written devices (FULL sections)
//! and live devices (START/PART/END sections) read their bodies themselves from
//! the stream, and the section footer must follow exactly where they stopped.

use crate::error::Origin;
use crate::state::{IllegalTransition, MigrationStatus as S, Role, StateMachine};
use crate::vm::{device_error, VcpuControl, VmParts, VmmError, VmmPart};
use savevm_format::{Decoder, Event, PageSink, RawBody, SectionKind};
use std::io::Read;

/// Why an incoming migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IncomingError {
    /// The stream did not decode (or the channel failed, or the RAM sink refused
    /// the stream's blocks: [`origin`](Self::origin) tells).
    #[error(transparent)]
    Stream(#[from] savevm_format::Error),
    /// The stream ended without its EOF record.
    #[error("the stream ended without its EOF record")]
    Incomplete,
    /// A device section the VMM has no handler for.
    #[error("no device for section '{0}' instance {1}")]
    UnknownDevice(String, u32),
    /// The VMM refused: a device its state, a block device its invalidation, or
    /// the vCPUs their resume (named in the error).
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The state machine refused a transition (e.g. this migration already ran).
    #[error(transparent)]
    State(#[from] IllegalTransition),
    /// The RAM sink gave no place for a page (it would have been lost).
    #[error("RAM block '{block}' has no page at offset {offset} for the incoming page")]
    PageNotPlaced {
        /// The block.
        block: String,
        /// Byte offset in the block.
        offset: u64,
    },
}

impl IncomingError {
    /// Who caused it: what the stream carries, or its channel failing, is the
    /// peer's (unless cancelled); the VMM's refusals and its RAM sink's are the
    /// VMM's; a refused state transition is the local side's.
    pub fn origin(&self) -> Origin {
        use savevm_format::ErrorKind as K;
        match self {
            IncomingError::Stream(e) => match &e.kind {
                K::Io(io) if transports::is_cancelled(io) => Origin::Cancel,
                K::Sink(_) => Origin::Vmm,
                _ => Origin::Peer,
            },
            IncomingError::Incomplete | IncomingError::UnknownDevice(..) => Origin::Peer,
            IncomingError::Vmm(_) | IncomingError::PageNotPlaced { .. } => Origin::Vmm,
            IncomingError::State(_) => Origin::Local,
        }
    }
}

/// What the incoming side did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IncomingReport {
    /// Runstate the source recorded in `globalstate`, if sent.
    pub runstate: Option<String>,
    /// Whether the guest was resumed here.
    pub resumed: bool,
    /// Full pages received.
    pub normal: u64,
    /// Zero pages received.
    pub duplicate: u64,
    /// FULL device sections loaded (vmstate and hand-written).
    pub devices: usize,
    /// START, PART and END sections loaded by live devices.
    pub live_sections: u64,
}

/// A loader's outcome: the stream's own failure under it (input ended, reader
/// failed) wins, as a typed stream error at its offset; else the device's refusal,
/// with its name and where in the stream it stopped.
fn body_outcome(body: &RawBody<'_>, loaded: Result<(), VmmError>) -> Result<(), IncomingError> {
    if let Some(e) = body.stream_error() {
        return Err(IncomingError::Stream(e));
    }
    loaded.map_err(|e| {
        let h = body.header();
        let at = format!("{} section at byte {}, body byte {}", h.kind.as_str(), h.offset, body.consumed());
        IncomingError::Vmm(device_error(&h.idstr, h.instance_id, e).at(at))
    })
}

/// One incoming migration.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// The destination state machine (`none -> active -> completed | failed`).
    pub state: StateMachine,
    /// Start the guest after loading if the source was running (QEMU without `-S`).
    pub autostart: bool,
}

impl Incoming {
    /// An incoming migration in state `none`.
    pub fn new(autostart: bool) -> Self {
        Incoming { state: StateMachine::new(Role::Destination), autostart }
    }

    /// Load the stream from `reader` into `ram` and `vm`'s devices, then finish the
    /// handover as described in the module documentation.
    pub fn run<R: Read, P: PageSink>(
        &self,
        reader: R,
        ram: &mut P,
        vm: &mut VmParts<'_>,
        vcpus: &mut dyn VcpuControl,
    ) -> Result<IncomingReport, IncomingError> {
        self.state.transition(S::None, S::Active)?;
        match self.load(reader, ram, vm, vcpus) {
            Ok(r) => {
                let _ = self.state.transition(S::Active, S::Completed);
                Ok(r)
            }
            Err(e) => {
                let _ = self.state.transition_from_current(S::Failed);
                Err(e)
            }
        }
    }

    fn load<R: Read, P: PageSink>(
        &self,
        reader: R,
        ram: &mut P,
        vm: &mut VmParts<'_>,
        vcpus: &mut dyn VcpuControl,
    ) -> Result<IncomingReport, IncomingError> {
        let mut d = Decoder::new(reader);
        for dev in &vm.devices {
            d.register((*dev.vmsd()).clone());
        }
        for dev in &vm.raw_devices {
            d.register_raw(&dev.idstr(), dev.instance_id());
        }
        for dev in &vm.live_devices {
            d.register_raw(&dev.idstr(), dev.instance_id());
        }
        let mut report = IncomingReport::default();
        let (mut section, mut eof) = (None, false);
        while let Some(ev) = d.next_with(ram)? {
            match ev {
                Event::SectionStart(h) => section = Some((h.idstr, h.instance_id, h.version)),
                Event::Page { block, offset, data: Some(_) }
                | Event::CompressedPage { block, offset, data: Some(_) } => {
                    return Err(IncomingError::PageNotPlaced { block: block.name.clone(), offset });
                }
                Event::Page { .. } | Event::CompressedPage { .. } | Event::XbzrlePage { .. } => report.normal += 1,
                Event::ZeroPage { .. } => report.duplicate += 1,
                Event::Device { state, .. } => {
                    let Some((idstr, inst, version)) = section.clone() else { continue };
                    match idstr.as_str() {
                        "timer" => {}
                        "globalstate" => {
                            if let Some(savevm_format::vmstate::Value::Text(r)) = state.get("runstate") {
                                report.runstate = Some(r.clone());
                            }
                        }
                        _ => {
                            let dev = vm
                                .devices
                                .iter_mut()
                                .find(|x| x.idstr() == idstr && x.instance_id() == inst)
                                .ok_or_else(|| IncomingError::UnknownDevice(idstr.clone(), inst))?;
                            dev.load(version, state).map_err(|e| device_error(&idstr, inst, e))?;
                            report.devices += 1;
                        }
                    }
                }
                Event::RawBody(mut body) => {
                    let h = body.header().clone();
                    let (idstr, inst) = (h.idstr.as_str(), h.instance_id);
                    let unknown = || IncomingError::UnknownDevice(h.idstr.clone(), inst);
                    let loaded = if h.kind == SectionKind::Full {
                        let dev = vm
                            .raw_devices
                            .iter_mut()
                            .find(|x| x.idstr() == idstr && x.instance_id() == inst)
                            .ok_or_else(unknown)?;
                        report.devices += 1;
                        dev.load_state(h.version, &mut body)
                    } else {
                        let dev = vm
                            .live_devices
                            .iter_mut()
                            .find(|x| x.idstr() == idstr && x.instance_id() == inst)
                            .ok_or_else(unknown)?;
                        report.live_sections += 1;
                        dev.load_state(h.kind, h.version, &mut body)
                    };
                    body_outcome(&body, loaded)?;
                }
                Event::Eof => eof = true,
                _ => {}
            }
        }
        if !eof {
            return Err(IncomingError::Incomplete);
        }
        // All state is in: the images the source wrote become ours before anything runs.
        for b in vm.blocks.iter_mut() {
            b.invalidate_cache().map_err(|e| e.on(VmmPart::Block { name: b.name(), op: "invalidate cache" }))?;
        }
        if self.autostart && report.runstate.as_deref().is_none_or(|r| r == "running") {
            vcpus.resume().map_err(|e| e.on(VmmPart::Vcpu("resume")))?;
            report.resumed = true;
        }
        Ok(report)
    }
}
