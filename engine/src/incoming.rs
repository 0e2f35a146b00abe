//! The incoming side: load the stream into the VMM's RAM (through a
//! [`PageSink`]) and devices, then invalidate every block device's cache, then
//! resume the guest (autostart, when the source was running) or leave it paused.
//! A failure anywhere, invalidation included, leaves the guest unstarted and the
//! state `failed`, with the reason.
//!
//! vmstate devices get their decoded state; hand-written devices (FULL sections)
//! and live devices (START/PART/END sections) read their bodies themselves from
//! the stream, and the section footer must follow exactly where they stopped.
//!
//! The return path (QEMU 7.2's behaviour): MIG_CMD_OPEN_RETURN_PATH opens it
//! through the caller's [`ReturnPathOpener`]; every PING is answered with
//! PONG(same value); at the end SHUT(0) goes out once everything loaded (after the
//! guest was resumed, as QEMU does), SHUT(1) when loading failed, so the source
//! fails too. What this destination cannot honour (postcopy, COLO, a capability in
//! the configuration, a multifd channel) fails the load with
//! [`IncomingError::Unsupported`], and so with SHUT(1) when the path is open.

use crate::error::Origin;
use crate::state::{IllegalTransition, MigrationStatus as S, Role, StateMachine};
use crate::vm::{device_error, VcpuControl, VmParts, VmmError, VmmPart};
use savevm_format::{Command, Decoder, Event, PageSink, RawBody, RpMessage, SectionKind};
use std::io::{Read, Write};

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
    /// The source negotiated something this destination does not implement
    /// (postcopy, COLO, a validated capability, multifd...).
    #[error("{0}")]
    Unsupported(String),
    /// A PING before any OPEN_RETURN_PATH (QEMU's wording).
    #[error("CMD_PING ({0:#x}) received with no return path")]
    PingWithoutReturnPath(u32),
    /// A multifd channel failed (named in the error: bad initial packet, uuid, id,
    /// packet, block, offset, payload, or its connection).
    #[error(transparent)]
    Multifd(#[from] crate::multifd::MultifdError),
    /// The final SHUT(0) could not be written: the source cannot know we succeeded.
    #[error("return path: cannot send SHUT(0) to the source: {0}")]
    ReturnPath(String),
}

/// Opens the destination's end of the return path when the stream asks for it
/// (MIG_CMD_OPEN_RETURN_PATH): a writer for return-path messages, or why the channel
/// has none (`exec:`, `file:`), in which case messages are dropped as QEMU's writes
/// into such a channel are.
pub type ReturnPathOpener<'a> = Box<dyn FnMut() -> Result<Box<dyn Write + Send>, String> + 'a>;

/// The opener of `ch`'s return path: its reverse direction is taken now (a
/// duplicate of the socket) and handed out when the source asks for it; on
/// `exec:`, `file:` and pipes it says why there is none (messages are dropped, as
/// QEMU 7.2 drops them).
pub fn channel_return_path(ch: &transports::Channel) -> ReturnPathOpener<'static> {
    let mut path = Some(ch.return_path());
    Box::new(move || match path.take() {
        Some(Ok(rp)) => Ok(Box::new(rp) as Box<dyn Write + Send>),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("the return path was already taken".into()),
    })
}

/// What the return path did in an incoming migration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReturnPathReport {
    /// The source sent OPEN_RETURN_PATH (capability `return-path` or `postcopy-ram`).
    pub requested: bool,
    /// It was opened: messages reached the channel.
    pub opened: bool,
    /// Why it could not be opened (messages were dropped).
    pub unavailable: Option<String>,
    /// PINGs answered with PONG.
    pub pongs: u64,
    /// The SHUT status written at the end (0 loaded, 1 failed).
    pub shut: Option<u32>,
    /// The first write on it that failed (later messages were dropped).
    pub error: Option<String>,
}

impl ReturnPathReport {
    /// `{"requested", "opened", "pongs", "shut", "unavailable"?, "error"?}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "requested": self.requested,
            "opened": self.opened,
            "pongs": self.pongs,
            "shut": self.shut,
        });
        if let Some(u) = &self.unavailable {
            v["unavailable"] = u.clone().into();
        }
        if let Some(e) = &self.error {
            v["error"] = e.clone().into();
        }
        v
    }
}

/// The destination's end of the return path during one load.
struct DestReturnPath<'a> {
    open: ReturnPathOpener<'a>,
    writer: Option<Box<dyn Write + Send>>,
    report: ReturnPathReport,
}

impl<'a> DestReturnPath<'a> {
    fn new(open: ReturnPathOpener<'a>) -> Self {
        DestReturnPath { open, writer: None, report: ReturnPathReport::default() }
    }

    /// MIG_CMD_OPEN_RETURN_PATH. A second one is harmless (QEMU: "called when RP already open").
    fn open(&mut self) {
        if self.report.requested {
            return;
        }
        self.report.requested = true;
        match (self.open)() {
            Ok(w) => {
                self.writer = Some(w);
                self.report.opened = true;
            }
            Err(why) => self.report.unavailable = Some(why),
        }
    }

    /// Write `m`; a failed write is recorded and closes the path (QEMU ignores it too:
    /// the main stream fails soon after when the source is gone).
    fn send(&mut self, m: RpMessage) -> Result<(), String> {
        let Some(w) = self.writer.as_mut() else {
            return Ok(());
        };
        if let Err(e) = m.write_to(w) {
            let why = format!("{}: {e}", m.name());
            self.report.error.get_or_insert_with(|| why.clone());
            self.writer = None;
            return Err(why);
        }
        Ok(())
    }

    fn ping(&mut self, v: u32) -> Result<(), IncomingError> {
        if !self.report.requested {
            return Err(IncomingError::PingWithoutReturnPath(v));
        }
        if self.send(RpMessage::Pong(v)).is_ok() && self.writer.is_some() {
            self.report.pongs += 1;
        }
        Ok(())
    }

    /// SHUT(status), then close the path. Whether it reached the channel.
    fn shut(&mut self, status: u32) -> Result<(), String> {
        if self.writer.is_none() {
            return match &self.report.error {
                Some(e) if self.report.opened => Err(e.clone()),
                _ => Ok(()),
            };
        }
        let r = self.send(RpMessage::Shut(status));
        if r.is_ok() {
            self.report.shut = Some(status);
        }
        self.writer = None;
        r
    }
}

/// What this destination refuses among the commands (QEMU's wording first where it has one).
fn unsupported_command(c: &Command) -> Option<String> {
    let why = match c {
        Command::PostcopyAdvise(Some(_)) => {
            "RAM postcopy is disabled but have 16 byte advise: the source has capability postcopy-ram, \
             which this destination does not implement"
        }
        Command::PostcopyListen | Command::PostcopyRun | Command::PostcopyRamDiscard { .. } => {
            "postcopy is not implemented by this destination"
        }
        Command::PostcopyResume | Command::RecvBitmap(_) => "postcopy recovery is not implemented by this destination",
        Command::EnableColo => "COLO (x-colo) is not implemented by this destination",
        Command::SwitchoverStart => "MIG_CMD 0xb unknown (len 0x0): QEMU 7.2 has no SWITCHOVER_START",
        _ => return None,
    };
    Some(match c {
        Command::PostcopyAdvise(_) => why.to_string(),
        _ => format!("{}: {why}", c.name()),
    })
}

/// A stream error that means the source uses something we do not implement.
fn unsupported_stream(e: &savevm_format::Error) -> Option<String> {
    match e.kind {
        savevm_format::ErrorKind::BadMagic(m) if m == savevm_format::multifd::MULTIFD_MAGIC && e.offset == 0 => Some(
            "the connection is a multifd channel (magic 0x11223344), not the main stream: the source has \
             capability multifd, which this destination does not implement"
                .to_string(),
        ),
        _ => None,
    }
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
            IncomingError::Unsupported(_) | IncomingError::PingWithoutReturnPath(_) => Origin::Peer,
            IncomingError::Multifd(e) if e.is_cancel() => Origin::Cancel,
            IncomingError::Multifd(_) => Origin::Peer,
            // The source's end of the return path went away under our SHUT(0).
            IncomingError::ReturnPath(_) => Origin::Peer,
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
    /// The return path, if the source asked for one.
    pub return_path: ReturnPathReport,
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

/// The receiver threads of a multifd load and how to get the sink's shared regions.
type MultifdHooks<'a, P> =
    (&'a mut crate::multifd::Receivers, fn(&mut P) -> Result<Vec<crate::memory::GuestRegion>, String>);

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
    /// handover as described in the module documentation. A return path the source
    /// asks for is unavailable (messages dropped); see [`Incoming::run_with_return_path`].
    pub fn run<R: Read, P: PageSink>(
        &self,
        reader: R,
        ram: &mut P,
        vm: &mut VmParts<'_>,
        vcpus: &mut dyn VcpuControl,
    ) -> Result<IncomingReport, IncomingError> {
        let none: ReturnPathOpener<'_> = Box::new(|| Err("this destination was given no return path".into()));
        self.run_with_return_path(reader, ram, vm, vcpus, none)
    }

    /// [`Incoming::run`], opening the return path with `open_return_path` when the
    /// stream asks for it: PONGs, then SHUT(0) after loading and resuming, or SHUT(1)
    /// on any failure. When SHUT(0) cannot be written the migration fails
    /// ([`IncomingError::ReturnPath`]; a guest already resumed here is not stopped again).
    pub fn run_with_return_path<R: Read, P: PageSink>(
        &self,
        reader: R,
        ram: &mut P,
        vm: &mut VmParts<'_>,
        vcpus: &mut dyn VcpuControl,
        open_return_path: ReturnPathOpener<'_>,
    ) -> Result<IncomingReport, IncomingError> {
        self.run_inner(reader, ram, vm, vcpus, open_return_path, None)
    }

    /// [`Incoming::run_with_return_path`] with capability `multifd`: `channels` (accepted
    /// and identified) get one receiver thread each, placing pages straight into
    /// `ram`'s shared regions; at each RAM EOS the load waits for every channel's
    /// SYNC (QEMU 7.2). The threads are stopped and joined before this returns.
    pub fn run_multifd<R: Read, P: crate::multifd::SharedRamSink>(
        &self,
        reader: R,
        channels: crate::multifd::IncomingChannels,
        ram: &mut P,
        vm: &mut VmParts<'_>,
        vcpus: &mut dyn VcpuControl,
        open_return_path: ReturnPathOpener<'_>,
    ) -> Result<IncomingReport, IncomingError> {
        std::thread::scope(|s| {
            let mut rx = match crate::multifd::Receivers::start(s, channels) {
                Ok(rx) => rx,
                Err(e) => {
                    let _ = self.state.transition(S::None, S::Failed);
                    return Err(e.into());
                }
            };
            let r = self.run_inner(reader, ram, vm, vcpus, open_return_path, Some((&mut rx, P::shared_regions)));
            rx.stop();
            r
        })
    }

    fn run_inner<R: Read, P: PageSink>(
        &self,
        reader: R,
        ram: &mut P,
        vm: &mut VmParts<'_>,
        vcpus: &mut dyn VcpuControl,
        open_return_path: ReturnPathOpener<'_>,
        mut mf: Option<MultifdHooks<'_, P>>,
    ) -> Result<IncomingReport, IncomingError> {
        let _span = tracing::info_span!("incoming", autostart = self.autostart).entered();
        self.state.transition(S::None, S::Active)?;
        let mut rp = DestReturnPath::new(open_return_path);
        let loaded = tracing::info_span!("load").in_scope(|| self.load(reader, ram, vm, vcpus, &mut rp, &mut mf));
        // A channel that failed explains a main stream that broke under it.
        let loaded = match (loaded, &mf) {
            (Err(e), Some((rx, _))) if !matches!(e, IncomingError::Multifd(_)) => {
                Err(rx.failure().map_or(e, IncomingError::Multifd))
            }
            (l, _) => l,
        };
        match &loaded {
            Ok(r) => tracing::info!(
                normal = r.normal,
                duplicate = r.duplicate,
                devices = r.devices,
                resumed = r.resumed,
                "incoming migration loaded"
            ),
            Err(e) => {
                tracing::warn!(origin = %e.origin(), error = %crate::error::report(e), "incoming migration failed")
            }
        }
        match loaded {
            Ok(mut r) => {
                if let Err(e) = rp.shut(0) {
                    let _ = self.state.transition_from_current(S::Failed);
                    return Err(IncomingError::ReturnPath(e));
                }
                let _ = self.state.transition(S::Active, S::Completed);
                r.return_path = rp.report;
                Ok(r)
            }
            Err(e) => {
                // The source must not complete: it learns of the failure here (QEMU 7.2
                // just exits, and the source sees the return path end).
                let _ = rp.shut(1);
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
        rp: &mut DestReturnPath<'_>,
        mf: &mut Option<MultifdHooks<'_, P>>,
    ) -> Result<IncomingReport, IncomingError> {
        let mut d = Decoder::new(reader);
        // As QEMU: the trailing vmdesc is not interpreted on the destination.
        d.skip_vmdesc();
        for dev in &vm.devices {
            d.register((*dev.vmsd()).clone());
        }
        for dev in &vm.raw_devices {
            d.register_raw(dev.idstr(), dev.instance_id());
        }
        for dev in &vm.live_devices {
            d.register_raw(dev.idstr(), dev.instance_id());
        }
        let mut report = IncomingReport::default();
        let (mut section, mut eof) = (None, false);
        let mut refusal: Option<String> = None;
        loop {
            let ev = match d.next_with(ram) {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => {
                    let e = unsupported_stream(&e).map_or(IncomingError::Stream(e), IncomingError::Unsupported);
                    return Err(match refusal {
                        Some(why) => IncomingError::Unsupported(why),
                        None => e,
                    });
                }
            };
            if let Some(why) = refusal.take() {
                if let Event::Command(Command::OpenReturnPath) = ev {
                    rp.open();
                }
                return Err(IncomingError::Unsupported(why));
            }
            match ev {
                Event::Configuration(cfg) => {
                    // QEMU 7.2 validates x-ignore-shared (newest also mapped-ram): on at the
                    // source means on here, which we do not implement. The refusal waits
                    // for the next record: when it opens the return path, SHUT(1) can go out.
                    if let Some(c) = cfg.capabilities.first() {
                        refusal = Some(format!(
                            "Capability {c} is off, but received capability is on: \
                             this destination does not implement {c}"
                        ));
                    }
                    continue;
                }
                Event::Command(c) => {
                    // Multifd and postcopy refuse each other (QEMU 7.2 accepts the pair but
                    // cannot switch a multifd migration to postcopy safely).
                    if mf.is_some() && matches!(c, Command::PostcopyAdvise(Some(_))) {
                        return Err(IncomingError::Unsupported(
                            "capability postcopy-ram with multifd: this destination refuses the combination \
                             (turn one of them off)"
                                .into(),
                        ));
                    }
                    if let Some(why) = unsupported_command(&c) {
                        return Err(IncomingError::Unsupported(why));
                    }
                    match c {
                        Command::OpenReturnPath => rp.open(),
                        Command::Ping(v) => rp.ping(v)?,
                        _ => {}
                    }
                }
                Event::SectionStart(h) => section = Some((h.idstr, h.instance_id, h.version)),
                Event::Page { block, offset, data: Some(_) }
                | Event::CompressedPage { block, offset, data: Some(_) } => {
                    return Err(IncomingError::PageNotPlaced { block: block.name.clone(), offset });
                }
                Event::Page { .. } | Event::CompressedPage { .. } | Event::XbzrlePage { .. } => report.normal += 1,
                Event::ZeroPage { .. } => report.duplicate += 1,
                Event::RamBlocks(blocks) => {
                    if let Some((rx, regions)) = mf.as_mut() {
                        let blocks = blocks.to_vec();
                        let regions = regions(ram).map_err(|e| {
                            IncomingError::Vmm(VmmError::from(format!("destination RAM for multifd: {e}")))
                        })?;
                        rx.memory(blocks, regions);
                    }
                }
                Event::RamEos => {
                    if let Some((rx, _)) = mf.as_mut() {
                        let before = rx.pages;
                        rx.sync()?;
                        report.normal += rx.pages - before;
                    }
                }
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
        ram.loaded().map_err(|e| IncomingError::Vmm(VmmError::from(format!("destination RAM: {e}"))))?;
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
