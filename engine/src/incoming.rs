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
//! fails too. What this destination cannot honour (postcopy when capability
//! `postcopy-ram` is off here, postcopy recovery, COLO, a capability in the
//! configuration, a multifd channel) fails the load with
//! [`IncomingError::Unsupported`], and so with SHUT(1) when the path is open.
//!
//! Postcopy ([`Incoming::with_postcopy`] and [`Incoming::run_postcopy`]): from
//! PACKAGED on, module [`crate::postcopy_dest`] takes over (userfaultfd, page
//! requests, the package loaded on its own thread while this one reads the pages).

use crate::error::Origin;
use crate::memory::PAGE;
use crate::postcopy_dest::uffd::MissingUffd;
use crate::postcopy_dest::{PageRun, Postcopy, PostcopyOptions, PostcopyReport, PostcopySink, Threads, TrackingSink};
use crate::state::{IllegalTransition, MigrationStatus as S, Role, StateMachine};
use crate::vm::{device_error, VcpuControl, VmParts, VmmError, VmmPart};
use savevm_format::{Command, Decoder, Event, PageSink, PageSlot, RamBlock, RawBody, RpMessage, SectionKind};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

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
    /// The stream broke postcopy's rules (a command out of place, a page size that differs...).
    #[error("{0}")]
    Protocol(String),
    /// The stream failed after POSTCOPY_LISTEN: the guest's missing pages are lost
    /// (QEMU's `postcopy-paused` and recovery are not implemented).
    #[error("postcopy: the stream failed while the guest's pages were still arriving (no postcopy recovery): {0}")]
    PostcopyStream(savevm_format::Error),
    /// Postcopy failed here (userfaultfd, the fault thread, placing a page).
    #[error("{0}")]
    Postcopy(String),
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

/// The destination's end of the return path, once open: shared by the loader, the
/// postcopy fault thread (page requests) and the package loader (PONGs).
#[derive(Default)]
pub(crate) struct RpShared {
    writer: Mutex<Option<Box<dyn Write + Send>>>,
    report: Mutex<ReturnPathReport>,
}

impl RpShared {
    fn report(&self) -> ReturnPathReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut ReturnPathReport)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }

    /// Write `m`; a failed write is recorded and closes the path (QEMU ignores it too:
    /// the main stream fails soon after when the source is gone).
    pub(crate) fn send(&self, m: RpMessage) -> Result<(), String> {
        let Ok(mut w) = self.writer.lock() else { return Err("return path lock poisoned".into()) };
        let Some(out) = w.as_mut() else {
            return Ok(());
        };
        if let Err(e) = m.write_to(out) {
            let why = format!("{}: {e}", m.name());
            self.update(|r| {
                r.error.get_or_insert_with(|| why.clone());
            });
            *w = None;
            return Err(why);
        }
        Ok(())
    }

    fn is_open(&self) -> bool {
        self.writer.lock().is_ok_and(|w| w.is_some())
    }

    fn ping(&self, v: u32) -> Result<(), IncomingError> {
        if !self.report().requested {
            return Err(IncomingError::PingWithoutReturnPath(v));
        }
        if self.send(RpMessage::Pong(v)).is_ok() && self.is_open() {
            self.update(|r| r.pongs += 1);
        }
        Ok(())
    }

    /// SHUT(status), then close the path. Whether it reached the channel.
    fn shut(&self, status: u32) -> Result<(), String> {
        if !self.is_open() {
            let r = self.report();
            return match r.error {
                Some(e) if r.opened => Err(e),
                _ => Ok(()),
            };
        }
        let r = self.send(RpMessage::Shut(status));
        if r.is_ok() {
            self.update(|rep| rep.shut = Some(status));
        }
        if let Ok(mut w) = self.writer.lock() {
            *w = None;
        }
        r
    }
}

/// The destination's end of the return path during one load.
struct DestReturnPath<'a> {
    open: ReturnPathOpener<'a>,
    shared: Arc<RpShared>,
}

impl<'a> DestReturnPath<'a> {
    fn new(open: ReturnPathOpener<'a>) -> Self {
        DestReturnPath { open, shared: Arc::new(RpShared::default()) }
    }

    /// MIG_CMD_OPEN_RETURN_PATH. A second one is harmless (QEMU: "called when RP already open").
    fn open(&mut self) {
        if self.shared.report().requested {
            return;
        }
        self.shared.update(|r| r.requested = true);
        match (self.open)() {
            Ok(w) => {
                if let Ok(mut g) = self.shared.writer.lock() {
                    *g = Some(w);
                }
                self.shared.update(|r| r.opened = true);
            }
            Err(why) => self.shared.update(|r| r.unavailable = Some(why)),
        }
    }

    fn ping(&mut self, v: u32) -> Result<(), IncomingError> {
        self.shared.ping(v)
    }

    fn shut(&mut self, status: u32) -> Result<(), String> {
        self.shared.shut(status)
    }
}

/// What this destination refuses among the commands (QEMU's wording first where it has one).
fn unsupported_command(c: &Command, postcopy: bool) -> Option<String> {
    let why = match c {
        Command::PostcopyAdvise(Some(_)) if !postcopy => {
            "RAM postcopy is disabled but have 16 byte advise: the source has capability postcopy-ram, \
             which is off on this destination (qmig recv --postcopy turns it on)"
        }
        Command::PostcopyListen | Command::PostcopyRun | Command::PostcopyRamDiscard { .. } | Command::Packaged(_)
            if !postcopy =>
        {
            "postcopy-ram is off on this destination"
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
            IncomingError::Protocol(_) => Origin::Peer,
            IncomingError::Multifd(e) if e.is_cancel() => Origin::Cancel,
            IncomingError::Multifd(_) => Origin::Peer,
            IncomingError::PostcopyStream(e) => match &e.kind {
                savevm_format::ErrorKind::Io(io) if transports::is_cancelled(io) => Origin::Cancel,
                _ => Origin::Peer,
            },
            IncomingError::Postcopy(_) => Origin::Vmm,
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
    /// What postcopy did, when the source switched to it.
    pub postcopy: Option<PostcopyReport>,
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
    /// Capability `postcopy-ram` on this side (`None`: off, POSTCOPY_ADVISE is refused).
    pub postcopy: Option<PostcopyOptions>,
    /// With `autostart`, still leave the guest stopped when the migration completes
    /// in pre-copy (postcopy never started), for a caller that checks RAM at stop first.
    pub hold_after_precopy: bool,
}

impl Incoming {
    /// An incoming migration in state `none`.
    pub fn new(autostart: bool) -> Self {
        Incoming { state: StateMachine::new(Role::Destination), autostart, postcopy: None, hold_after_precopy: false }
    }

    /// Leave the guest stopped if the source completes in pre-copy, whatever `autostart`
    /// says (a postcopy destination that must run its guest at RUN but wants to check RAM
    /// at stop otherwise); [`IncomingReport::resumed`] tells the caller to resume it.
    pub fn hold_after_precopy(mut self) -> Self {
        self.hold_after_precopy = true;
        self
    }

    /// Turn capability `postcopy-ram` on for this destination (see [`Incoming::run_postcopy`]).
    pub fn with_postcopy(mut self, options: PostcopyOptions) -> Self {
        self.postcopy = Some(options);
        self
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
        let mut plain = PlainSink(ram);
        // Without host memory postcopy cannot run: the capability stays off.
        self.run_inner(reader, &mut TrackingSink::new(&mut plain), vm, vcpus, open_return_path, None, None)
    }

    /// [`Incoming::run_with_return_path`] with capability `multifd`: `channels` (accepted
    /// and identified) get one receiver thread each, placing pages straight into
    /// `ram`'s shared regions; at each RAM EOS the load waits for every channel's
    /// SYNC (QEMU 7.2). The threads are stopped and joined before this returns.
    /// Postcopy is refused with multifd.
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
                    let _ = self.state.transition_from_current(S::Failed);
                    return Err(e.into());
                }
            };
            let mut shared = crate::multifd::SharingSink::new(ram, rx.memory_handle());
            let mut plain = PlainSink(&mut shared);
            let mut sink = TrackingSink::new(&mut plain);
            let r = self.run_inner(reader, &mut sink, vm, vcpus, open_return_path, None, Some(&mut rx));
            let r = match r {
                // A channel that failed explains a main stream that broke under it.
                Err(e) if !matches!(e, IncomingError::Multifd(_)) => {
                    Err(rx.failure().map_or(e, IncomingError::Multifd))
                }
                r => r,
            };
            rx.stop();
            r
        })
    }

    /// [`Incoming::run_with_return_path`] for a destination with capability
    /// `postcopy-ram` ([`Incoming::with_postcopy`]): `ram`'s blocks are host memory
    /// the postcopy phase registers with userfaultfd (module [`crate::postcopy_dest`]).
    /// A stream without postcopy loads as with `run_with_return_path`.
    pub fn run_postcopy<R: Read, P: PostcopySink>(
        &self,
        reader: R,
        ram: &mut P,
        vm: &mut VmParts<'_>,
        vcpus: &mut dyn VcpuControl,
        open_return_path: ReturnPathOpener<'_>,
    ) -> Result<IncomingReport, IncomingError> {
        let postcopy = self.postcopy.as_ref();
        self.run_inner(reader, &mut TrackingSink::new(ram), vm, vcpus, open_return_path, postcopy, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_inner<R: Read, P: PostcopySink + ?Sized>(
        &self,
        reader: R,
        ram: &mut TrackingSink<'_, P>,
        vm: &mut VmParts<'_>,
        vcpus: &mut dyn VcpuControl,
        open_return_path: ReturnPathOpener<'_>,
        postcopy: Option<&PostcopyOptions>,
        mut multifd: Option<&mut crate::multifd::Receivers>,
    ) -> Result<IncomingReport, IncomingError> {
        let _span = tracing::info_span!("incoming", autostart = self.autostart).entered();
        self.state.transition(S::None, S::Active)?;
        let mut rp = DestReturnPath::new(open_return_path);
        let loaded =
            tracing::info_span!("load").in_scope(|| self.load(reader, ram, vm, vcpus, &mut rp, postcopy, &mut multifd));
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
                let _ = self.state.transition_from_current(S::Completed);
                r.return_path = rp.shared.report();
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

    #[allow(clippy::too_many_arguments)]
    fn load<R: Read, P: PostcopySink + ?Sized>(
        &self,
        reader: R,
        ram: &mut TrackingSink<'_, P>,
        vm: &mut VmParts<'_>,
        vcpus: &mut dyn VcpuControl,
        rp: &mut DestReturnPath<'_>,
        postcopy: Option<&PostcopyOptions>,
        multifd: &mut Option<&mut crate::multifd::Receivers>,
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
        let mut advised = false;
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
                    if multifd.is_some() && matches!(c, Command::PostcopyAdvise(Some(_))) {
                        return Err(IncomingError::Unsupported(
                            "capability postcopy-ram with multifd: this destination refuses the combination \
                             (turn one of them off)"
                                .into(),
                        ));
                    }
                    if let Some(why) = unsupported_command(&c, postcopy.is_some()) {
                        return Err(IncomingError::Unsupported(why));
                    }
                    match c {
                        Command::OpenReturnPath => rp.open(),
                        Command::Ping(v) => rp.ping(v)?,
                        Command::PostcopyAdvise(Some((summary, tps))) => {
                            // QEMU 7.2: ADVISE only in postcopy state NONE.
                            if advised {
                                return Err(IncomingError::Protocol(
                                    "POSTCOPY_ADVISE a second time (wrong postcopy state)".into(),
                                ));
                            }
                            check_advise(summary, tps, d.page_size())?;
                            advised = true;
                            ram.advise(d.ram_blocks());
                        }
                        Command::Packaged(_) if advised => {
                            let pkg = d.take_package()?;
                            let opts = postcopy.cloned().unwrap_or_default();
                            let pc = self.postcopy_phase(&mut d, pkg, ram, vm, vcpus, rp, &mut report, opts)?;
                            report.postcopy = Some(pc);
                            eof = true;
                            break;
                        }
                        Command::Packaged(_) => {
                            return Err(IncomingError::Protocol("PACKAGED without POSTCOPY_ADVISE".into()))
                        }
                        Command::PostcopyListen | Command::PostcopyRun => {
                            return Err(IncomingError::Protocol(format!(
                                "{} outside the PACKAGED blob (wrong postcopy state)",
                                c.name()
                            )))
                        }
                        _ => {}
                    }
                }
                // QEMU 7.2: every RAM EOS waits for each multifd channel's SYNC.
                Event::RamEos if multifd.is_some() => {
                    if let Some(rx) = multifd.as_mut() {
                        let before = rx.pages;
                        rx.sync()?;
                        report.normal += rx.pages - before;
                    }
                }
                other => handle_event(other, &mut section, vm, &mut report, &mut eof)?,
            }
        }
        if !eof {
            return Err(IncomingError::Incomplete);
        }
        ram.loaded().map_err(|e| IncomingError::Vmm(VmmError::from(format!("destination RAM: {e}"))))?;
        if report.postcopy.is_some() {
            // Block devices were activated and the guest resumed at RUN.
            return Ok(report);
        }
        // All state is in: the images the source wrote become ours before anything runs.
        for b in vm.blocks.iter_mut() {
            b.invalidate_cache().map_err(|e| e.on(VmmPart::Block { name: b.name(), op: "invalidate cache" }))?;
        }
        if self.autostart && !self.hold_after_precopy && report.runstate.as_deref().is_none_or(|r| r == "running") {
            vcpus.resume().map_err(|e| e.on(VmmPart::Vcpu("resume")))?;
            report.resumed = true;
        }
        Ok(report)
    }

    /// From PACKAGED to EOF: LISTEN (userfaultfd, fault thread, `postcopy-active`),
    /// the package's devices loaded and RUN on a thread of their own while this one
    /// reads the rest of the stream and places its pages.
    #[allow(clippy::too_many_arguments)]
    fn postcopy_phase<R: Read, P: PostcopySink + ?Sized>(
        &self,
        d: &mut Decoder<R>,
        mut pkg: Decoder<std::io::Cursor<Vec<u8>>>,
        ram: &mut TrackingSink<'_, P>,
        vm: &mut VmParts<'_>,
        vcpus: &mut dyn VcpuControl,
        rp: &mut DestReturnPath<'_>,
        report: &mut IncomingReport,
        opts: PostcopyOptions,
    ) -> Result<PostcopyReport, IncomingError> {
        match pkg.next()? {
            Some(Event::Command(Command::PostcopyListen)) => {}
            _ => return Err(IncomingError::Protocol("the PACKAGED blob does not start with POSTCOPY_LISTEN".into())),
        }
        // What the sink buffered lands now: from here on pages go in through userfaultfd.
        ram.loaded().map_err(|e| IncomingError::Vmm(VmmError::from(format!("destination RAM: {e}"))))?;
        let pc = Postcopy::listen(ram, d.ram_blocks(), rp.shared.clone())
            .map_err(|e| IncomingError::Postcopy(e.to_string()))?;
        let mut threads = Threads::start(&pc).map_err(|e| IncomingError::Postcopy(e.to_string()))?;
        self.state.transition(S::Active, S::PostcopyActive)?;
        tracing::info!(discarded = ram.discarded, "postcopy: listening");
        let shared = rp.shared.clone();
        let autostart = self.autostart;
        let run_seen = std::sync::atomic::AtomicBool::new(false);
        let resumed = std::sync::atomic::AtomicBool::new(false);
        let (listened, packaged) = std::thread::scope(|s| {
            let (pc2, run_seen, resumed) = (pc.clone(), &run_seen, &resumed);
            let (vm, vcpus) = (&mut *vm, &mut *vcpus);
            let touch = opts.touch.then_some(opts.touch_seed);
            let package = std::thread::Builder::new().name("postcopy package".into()).spawn_scoped(s, move || {
                let r = load_package(pkg, vm, vcpus, &shared, autostart, &pc2, touch, run_seen);
                if r.as_ref().is_ok_and(|p| p.resumed) {
                    resumed.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                r
            });
            let package = match package {
                Ok(h) => h,
                Err(e) => return (Err(IncomingError::Postcopy(format!("cannot start the package loader: {e}"))), None),
            };
            let listened = listen_loop(d, &pc, rp, &mut threads, report);
            if listened.is_err() {
                // Nothing more will come: blocked faulting threads (a device load) wake.
                threads.stop();
            }
            let packaged =
                package.join().unwrap_or_else(|_| Err(IncomingError::Postcopy("package loader panicked".into())));
            (listened, Some(packaged))
        });
        let stopped = threads.stop();
        let checked = (|| {
            listened?;
            let pkg_report = packaged.unwrap_or_else(|| Err(IncomingError::Postcopy("no package loader".into())))?;
            if let Some(e) = stopped {
                return Err(IncomingError::Postcopy(e));
            }
            if !run_seen.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(IncomingError::Protocol("the PACKAGED blob ended without POSTCOPY_RUN".into()));
            }
            Ok(pkg_report)
        })();
        let pkg_report = match checked {
            Ok(r) => r,
            Err(e) => {
                // A guest started at RUN must not run on with the pages that never came
                // (the userfaultfd is gone: they read as zeros). QEMU 7.2 exits here.
                if resumed.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Err(stop) = vcpus.stop() {
                        tracing::warn!(error = %stop, "postcopy failed and the guest could not be stopped");
                    }
                }
                return Err(e);
            }
        };
        report.devices += pkg_report.devices;
        report.live_sections += pkg_report.live_sections;
        report.runstate = pkg_report.runstate.or(report.runstate.take());
        report.resumed = pkg_report.resumed;
        let r = pc.report(ram.discarded);
        tracing::info!(
            requests = r.requests,
            placed = r.placed,
            p99_us = r.latency_quantile(0.99),
            "postcopy: stream complete"
        );
        Ok(r)
    }
}

/// The checks of POSTCOPY_ADVISE (QEMU 7.2's `loadvm_postcopy_handle_advise`):
/// userfaultfd works here, and both page sizes are ours.
fn check_advise(summary: u64, tps: u64, stream_tps: u64) -> Result<(), IncomingError> {
    MissingUffd::probe().map_err(|e| IncomingError::Postcopy(format!("postcopy is not supported here: {e}")))?;
    if summary != PAGE as u64 {
        return Err(IncomingError::Protocol(format!(
            "Postcopy needs matching RAM page sizes (s={summary:#x} d={:#x})",
            PAGE
        )));
    }
    if tps != PAGE as u64 || tps != stream_tps {
        return Err(IncomingError::Protocol(format!("Postcopy needs matching target page sizes (s={tps} d={PAGE})")));
    }
    Ok(())
}

/// The listen role: the rest of the main stream after the package, pages placed
/// through userfaultfd, until EOF.
fn listen_loop<R: Read>(
    d: &mut Decoder<R>,
    pc: &Postcopy,
    rp: &mut DestReturnPath<'_>,
    threads: &mut Threads,
    report: &mut IncomingReport,
) -> Result<(), IncomingError> {
    let placing = |e: crate::postcopy_dest::uffd::UffdError| IncomingError::Postcopy(format!("placing a page: {e}"));
    // Contiguous pages are read into one buffer and placed together (one UFFDIO_COPY).
    let mut run = PageRun::new(pc);
    loop {
        if let Some(e) = threads.fault_error() {
            return Err(IncomingError::Postcopy(e));
        }
        let ev = d.next_with(&mut run).map_err(IncomingError::PostcopyStream)?;
        let ev = ev.ok_or(IncomingError::Incomplete)?;
        if let Some(e) = run.error.take() {
            return Err(placing(e));
        }
        match &ev {
            // The run grows with this page: placed when full or waited for.
            Event::Page { data: None, .. } | Event::CompressedPage { data: None, .. } => {
                report.normal += 1;
                if run.due() {
                    run.flush().map_err(placing)?;
                }
                continue;
            }
            // Refused below; the run (this page decoded against another) is never placed.
            Event::XbzrlePage { .. } => {}
            // Anything else comes after the run: it is placed first (a requested page that
            // lands in a run makes it due at once; one faulted while waiting in it is asked
            // for and comes again, which ends the run).
            _ => run.flush().map_err(placing)?,
        }
        match ev {
            Event::Page { block, offset, data: Some(data) }
            | Event::CompressedPage { block, offset, data: Some(data) } => {
                pc.place(block.index, offset, Some(data), 0).map_err(placing)?;
                report.normal += 1;
            }
            Event::ZeroPage { block, offset, fill } => {
                pc.place(block.index, offset, None, fill).map_err(placing)?;
                report.duplicate += 1;
            }
            Event::XbzrlePage { block, offset, .. } => {
                return Err(IncomingError::Protocol(format!(
                    "XBZRLE page at {offset:#x} of '{}' during postcopy",
                    block.name
                )))
            }
            Event::Command(Command::Ping(v)) => rp.ping(v)?,
            Event::Command(c) => {
                return Err(IncomingError::Protocol(format!("{} after POSTCOPY_LISTEN", c.name())));
            }
            Event::SectionStart(h) if h.idstr == "ram" => {}
            Event::SectionStart(h) => {
                return Err(IncomingError::Protocol(format!(
                    "section '{}' at byte {} after POSTCOPY_LISTEN: only RAM may follow the package",
                    h.idstr, h.offset
                )))
            }
            Event::Eof => return Ok(()),
            Event::RamBlocks(_) | Event::RawBody(_) | Event::Device { .. } => {
                return Err(IncomingError::Protocol(format!(
                    "unexpected record at byte {} after POSTCOPY_LISTEN",
                    d.offset()
                )))
            }
            _ => {}
        }
    }
}

/// What the package loader did.
#[derive(Default)]
struct PackageReport {
    devices: usize,
    live_sections: u64,
    runstate: Option<String>,
    resumed: bool,
}

/// The package after LISTEN: devices, PINGs, RUN (block devices activated, the
/// guest resumed when autostarting, the touch thread started), then its end.
#[allow(clippy::too_many_arguments)]
fn load_package(
    mut pkg: Decoder<std::io::Cursor<Vec<u8>>>,
    vm: &mut VmParts<'_>,
    vcpus: &mut dyn VcpuControl,
    rp: &RpShared,
    autostart: bool,
    pc: &Arc<Postcopy>,
    touch: Option<u64>,
    run_seen: &std::sync::atomic::AtomicBool,
) -> Result<PackageReport, IncomingError> {
    let mut report = IncomingReport::default();
    let (mut section, mut eof) = (None, false);
    let mut resumed = false;
    loop {
        let ev = pkg.next()?.ok_or(IncomingError::Incomplete)?;
        match ev {
            Event::PackageEnd => break,
            Event::Command(Command::Ping(v)) => rp.ping(v)?,
            Event::Command(Command::PostcopyRun) => {
                run_seen.store(true, std::sync::atomic::Ordering::SeqCst);
                for b in vm.blocks.iter_mut() {
                    b.invalidate_cache()
                        .map_err(|e| e.on(VmmPart::Block { name: b.name(), op: "invalidate cache" }))?;
                }
                // QEMU 7.2 (loadvm_postcopy_handle_run_bh): start if autostart, else paused.
                if autostart {
                    vcpus.resume().map_err(|e| e.on(VmmPart::Vcpu("resume")))?;
                    resumed = true;
                }
                if let Some(seed) = touch {
                    pc.start_touching(seed).map_err(|e| IncomingError::Postcopy(e.to_string()))?;
                }
                // QEMU stops reading the package here.
                break;
            }
            Event::Command(c) => {
                return Err(IncomingError::Protocol(format!("{} inside the PACKAGED blob", c.name())));
            }
            Event::Page { block, offset, .. } | Event::ZeroPage { block, offset, .. } => {
                return Err(IncomingError::Protocol(format!(
                    "page at {offset:#x} of '{}' inside the PACKAGED blob",
                    block.name
                )))
            }
            other => handle_event(other, &mut section, vm, &mut report, &mut eof)?,
        }
        if eof {
            return Err(IncomingError::Protocol("EOF inside the PACKAGED blob".into()));
        }
    }
    Ok(PackageReport {
        devices: report.devices,
        live_sections: report.live_sections,
        runstate: report.runstate,
        resumed,
    })
}

/// Events other than commands: sections, pages outside postcopy, devices, EOF.
fn handle_event(
    ev: Event<'_>,
    section: &mut Option<(String, u32, u32)>,
    vm: &mut VmParts<'_>,
    report: &mut IncomingReport,
    eof: &mut bool,
) -> Result<(), IncomingError> {
    match ev {
        Event::SectionStart(h) => *section = Some((h.idstr, h.instance_id, h.version)),
        Event::Page { block, offset, data: Some(_) } | Event::CompressedPage { block, offset, data: Some(_) } => {
            return Err(IncomingError::PageNotPlaced { block: block.name.clone(), offset });
        }
        Event::Page { .. } | Event::CompressedPage { .. } | Event::XbzrlePage { .. } => report.normal += 1,
        Event::ZeroPage { .. } => report.duplicate += 1,
        Event::Device { state, .. } => {
            let Some((idstr, inst, version)) = section.clone() else { return Ok(()) };
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
        Event::Eof => *eof = true,
        _ => {}
    }
    Ok(())
}

/// A sink without host memory for userfaultfd (pre-copy only).
struct PlainSink<'a, P: ?Sized>(&'a mut P);

impl<P: PageSink + ?Sized> PageSink for PlainSink<'_, P> {
    fn page_mut(&mut self, block: &RamBlock, offset: u64) -> Option<PageSlot<'_>> {
        self.0.page_mut(block, offset)
    }
    fn ram_blocks(&mut self, blocks: &[RamBlock]) -> Result<(), String> {
        self.0.ram_blocks(blocks)
    }
    fn target_page_size(&mut self, tps: u64) -> Result<(), String> {
        self.0.target_page_size(tps)
    }
    fn fill_page(&mut self, block: &RamBlock, offset: u64, fill: u8) {
        self.0.fill_page(block, offset, fill)
    }
    fn discard(&mut self, block: &RamBlock, start: u64, len: u64) {
        self.0.discard(block, start, len)
    }
    fn loaded(&mut self) -> Result<(), String> {
        self.0.loaded()
    }
}

impl<P: PageSink + ?Sized> PostcopySink for PlainSink<'_, P> {
    fn host_memory(&self, _: &RamBlock) -> Option<(u64, u64)> {
        None
    }
}
