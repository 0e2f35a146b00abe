//! The outgoing side: live pre-copy of guest RAM in QEMU 7.2's manner.
//!
//! Setup (RAM block list, every page marked; then each live device's START),
//! then passes of RAM PART sections, each followed by a PART of every live device
//! with pending bytes, while the guest runs; the dirty sources are synced when
//! RAM's pending estimate already fits the threshold (bandwidth ×
//! `downtime-limit`); when RAM's rest and the live devices' pending bytes together
//! fit, the vCPUs stop, a final sync runs, RAM's END section carries every
//! remaining page, the live devices' END sections theirs, then the FULL device
//! sections (vmstate, then hand-written), EOF and vmdesc. Cancel or any failure
//! resumes the guest and ends `cancelled` / `failed`; live devices get their
//! cleanup call whatever the outcome.
//!
//! With capability `return-path` (QEMU 7.2's behaviour) the channel's reverse
//! direction is read by a [`SourceReturnPath`] thread from the start;
//! OPEN_RETURN_PATH and PING 1 follow the configuration record; a SHUT(error), a
//! bad message or the path closing fails the migration at the next loop turn with
//! the destination's reason; after EOF and the vmdesc the source stays `active`
//! until the destination's SHUT(0), then reports `completed`. SHUT(error), a lost
//! connection or no SHUT within [`Outgoing::with_shut_timeout`] fail it and resume
//! the guest ([`EngineError::ReturnPath`] says so). A channel with no reverse
//! direction (`exec:`, `file:`) fails at start ([`EngineError::NoReturnPath`]).
//!
//! With capability `xbzrle`, once the bulk pass is over, pages go through
//! [`Xbzrle`] (QEMU 7.2's cache and `save_xbzrle_page`): a cache miss is sent
//! whole from the cache's copy, a hit as an XBZRLE delta (nothing when unchanged,
//! a whole page on overflow); `query-migrate` gains `xbzrle-cache`.
//! With capability `postcopy-ram` (which opens the return path too) the source
//! sends POSTCOPY_ADVISE after PING 1, and [`Outgoing::start_postcopy`] (QEMU's
//! `migrate-start-postcopy`) or [`Outgoing::with_postcopy_after`] switches at the
//! next iteration as QEMU 7.2's `postcopy_start` does: `postcopy-active` (through
//! `pre-switchover` with `pause-before-switchover`), the guest stopped, block
//! devices inactivated, the live devices' END sections, a final sync,
//! POSTCOPY_RAM_DISCARD of every page still to send, PING 2, the PACKAGED device
//! state (LISTEN, FULL sections, PING 3, RUN), PING 4; then RAM PARTs in the
//! background (`max-postcopy-bandwidth`) with the destination's page requests
//! served first, RAM's END, EOF without vmdesc, and `completed` after SHUT(0).
//! Once the package may have gone out the guest is never resumed here: a failure
//! ends `failed` with [`EngineError::Postcopy`] saying so.
//!
//! Every decision is the clock-free [`PrecopyCore`](crate::precopy::PrecopyCore)'s;
//! this module is its driver: it reads the clock, does the I/O through a
//! [`PageWriter`] (a channel's [`MigrationWriter`], or memory in tests) and keeps
//! the state machine and `query-migrate` figures current.

use crate::error::Origin;
use crate::info::{InfoHandle, MigrationInfo, ReturnPathInfo};
use crate::memory::{is_zero, RamRegion};
use crate::params::{MigrationCapabilities, SharedParameters};
use crate::precopy::{Action, PostcopyNext, PrecopyCore, Tick};
use crate::return_path::{ReturnPathError, RpEvent, SourceReturnPath};
use crate::state::{IllegalTransition, MigrationStatus as S, Notification, Role, StateMachine};
use crate::vm::{device_error, VcpuControl, VmParts, VmmError, VmmPart};
use crate::xbzrle::{Encoded, Xbzrle};
use savevm_format::{section_ids, write_guest_prologue_with, Command, RamBlock, StoppedGuest, StreamWriter};
use std::collections::HashSet;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
use transports::{CancelToken, Channel, MigrationWriter, RateLimit, ReturnPath};
use vm_memory::VolatileSlice;

pub use crate::memory::{GuestRegion, PAGE};

/// Section id of the first VMM device (QEMU uses 0, 2 and 4 for timer, ram, globalstate).
const FIRST_DEVICE_ID: u32 = 5;

/// How long a source with capability `return-path` waits after EOF for the
/// destination's SHUT before it fails (QEMU 7.2 waits forever); see
/// [`Outgoing::with_shut_timeout`].
pub const DEFAULT_SHUT_TIMEOUT: Duration = Duration::from_secs(30);

/// Pages queued at most in postcopy before they are sent (a page request waits
/// behind them).
const POSTCOPY_BATCH: u64 = 16;

/// How long a failed channel waits for the destination's reason on the return path.
const REASON_WAIT: Duration = Duration::from_millis(500);

/// Why an outgoing migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// Cancelled.
    #[error("migration cancelled")]
    Cancelled,
    /// The channel failed.
    #[error("migration channel")]
    Io(#[from] std::io::Error),
    /// The transport failed (e.g. an `exec:` command).
    #[error(transparent)]
    Transport(#[from] transports::TransportError),
    /// The stream could not be encoded.
    #[error(transparent)]
    Encode(savevm_format::EncodeError),
    /// The VMM refused: vCPU control, a device or a block device (named in the error).
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A state change was refused.
    #[error(transparent)]
    State(#[from] IllegalTransition),
    /// Bad setup (regions, bitmaps).
    #[error("{0}")]
    Setup(String),
    /// A migration blocker is registered.
    #[error("migration is blocked: {0}")]
    Blocked(String),
    /// A dirty source (the VMM's, e.g. KVM's log, or userfaultfd) failed to start.
    #[error("dirty tracking of region {region}: start")]
    DirtyStart {
        /// Index of the RAM region.
        region: usize,
        /// The cause.
        source: crate::dirty::DirtyError,
    },
    /// A dirty source failed to sync (harvest) its pages.
    #[error("dirty tracking of region {region}: sync")]
    DirtySync {
        /// Index of the RAM region.
        region: usize,
        /// The cause.
        source: crate::dirty::DirtyError,
    },
    /// A multifd channel failed (named in the error), or capability `multifd` was
    /// asked for without its channels.
    #[error(transparent)]
    Multifd(#[from] crate::multifd::MultifdError),
    /// Capability `return-path` on a channel with no reverse direction (`exec:`,
    /// `file:`, a pipe, a [`PageWriter`] of its own): refused at start.
    #[error("capability return-path: {0}")]
    NoReturnPath(String),
    /// The migration failed after the switch to postcopy. The guest's newest state
    /// is on the destination, so it is not resumed here (QEMU 7.2 would wait in
    /// `postcopy-paused` for a recovery, which this engine does not implement).
    #[error("{0}; in postcopy the guest runs on the destination and cannot resume on the source: it stays stopped")]
    Postcopy(Box<EngineError>),
    /// The destination's return path ended the migration: SHUT with an error, the
    /// path closed or broken before SHUT(0), or no SHUT in time after EOF.
    #[error(
        "{}{error}{}",
        match (after_eof, error) {
            (true, _) => "the destination did not confirm the migration: ",
            // Reading it failed (a reset, a timeout): the link, not necessarily the destination.
            (false, ReturnPathError::Decode { .. }) => "the return path from the destination failed: ",
            (false, _) => "the destination ended the migration: ",
        },
        if *resumed { "; the guest was resumed on the source" } else { "" }
    )]
    ReturnPath {
        /// How the return path ended.
        error: ReturnPathError,
        /// Whether the whole stream (EOF, vmdesc) had been sent.
        after_eof: bool,
        /// Whether the guest, stopped for the switchover, was resumed here.
        resumed: bool,
    },
}

impl From<savevm_format::EncodeError> for EngineError {
    fn from(e: savevm_format::EncodeError) -> Self {
        match e {
            savevm_format::EncodeError::Io(io) => EngineError::Io(io),
            e => EngineError::Encode(e),
        }
    }
}

impl EngineError {
    /// Who caused it: the channel or transport is the peer's (unless cancelled), the
    /// VMM's refusals, dirty sources and blockers the VMM's, setup, encoding and
    /// state the local side's.
    pub fn origin(&self) -> Origin {
        match self {
            _ if self.is_cancel() => Origin::Cancel,
            EngineError::Io(_) => Origin::Peer,
            EngineError::Transport(transports::TransportError::Uri(_) | transports::TransportError::File { .. }) => {
                Origin::Local
            }
            EngineError::Transport(_) => Origin::Peer,
            EngineError::Vmm(_) | EngineError::Blocked(_) => Origin::Vmm,
            EngineError::DirtyStart { .. } | EngineError::DirtySync { .. } => Origin::Vmm,
            // The destination said no, went away or never confirmed.
            EngineError::ReturnPath { .. } => Origin::Peer,
            EngineError::Multifd(_) => Origin::Peer,
            EngineError::Postcopy(e) => e.origin(),
            _ => Origin::Local,
        }
    }

    fn is_cancel(&self) -> bool {
        match self {
            EngineError::Cancelled => true,
            EngineError::Io(e) => transports::is_cancelled(e),
            EngineError::Transport(t) => t.is_cancelled(),
            EngineError::Multifd(m) => m.is_cancel(),
            EngineError::Postcopy(e) => e.is_cancel(),
            _ => false,
        }
    }

    /// The channel failed (the destination may have said why on the return path).
    fn is_channel(&self) -> bool {
        matches!(self, EngineError::Io(_) | EngineError::Transport(_) | EngineError::Multifd(_))
    }
}

/// What the pre-copy driver writes the stream to: bytes in order, and guest pages
/// queued in place (their bytes may change until they are sent; a page written
/// after that is dirty and sent again).
pub trait PageWriter<'g>: Write {
    /// Queue guest page `page` after everything written so far.
    fn write_page(&mut self, page: VolatileSlice<'g>) -> io::Result<()>;
    /// Send what is queued now.
    fn flush_now(&mut self) -> io::Result<()>;
    /// Bytes sent so far (the bandwidth the switchover decision measures).
    fn bytes_sent(&self) -> u64;
    /// Let the caller pace the stream: sends never wait for the rate limit (postcopy,
    /// where requested pages go at once). No limit by default.
    fn set_caller_paced(&mut self, _on: bool) {}
    /// When the rate limit's window budget is spent: the window's end; `None` when
    /// more may be sent now (always, by default).
    fn rate_limited_until(&mut self) -> Option<Instant> {
        None
    }
    /// Of those, bytes still queued on their way (a tcp socket's unacknowledged
    /// bytes): the decision measures bandwidth on what left and counts these as
    /// pending. 0 by default.
    fn queued(&self) -> u64 {
        0
    }
    /// Flush and close the stream (for `exec:`, check the command's exit status).
    fn close(self) -> Result<(), EngineError>
    where
        Self: Sized;
}

impl<'g> PageWriter<'g> for MigrationWriter<'g> {
    fn write_page(&mut self, page: VolatileSlice<'g>) -> io::Result<()> {
        self.write_volatile(page)
    }
    fn flush_now(&mut self) -> io::Result<()> {
        MigrationWriter::flush_now(self)
    }
    fn set_caller_paced(&mut self, on: bool) {
        MigrationWriter::set_caller_paced(self, on)
    }
    fn rate_limited_until(&mut self) -> Option<Instant> {
        MigrationWriter::rate_limited_until(self)
    }
    fn bytes_sent(&self) -> u64 {
        self.rate_limit().total_bytes()
    }
    fn queued(&self) -> u64 {
        self.queued_bytes()
    }
    fn close(self) -> Result<(), EngineError> {
        Ok(MigrationWriter::close(self)?)
    }
}

/// An in-memory stream (captures, tests of the driver): pages are copied as they
/// are queued, with volatile reads.
impl<'g> PageWriter<'g> for &mut Vec<u8> {
    fn write_page(&mut self, page: VolatileSlice<'g>) -> io::Result<()> {
        let at = self.len();
        self.resize(at + page.len(), 0);
        page.copy_to(&mut self[at..]);
        Ok(())
    }
    fn flush_now(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn bytes_sent(&self) -> u64 {
        self.len() as u64
    }
    fn close(self) -> Result<(), EngineError> {
        Ok(())
    }
}

/// One outgoing migration: its state, statistics, parameters and cancel handle,
/// all shareable with other threads while [`run`](Self::run) works. Clones are
/// handles to the same migration (nothing in it is a per-clone copy that could
/// diverge).
#[derive(Clone)]
pub struct Outgoing {
    state: StateMachine,
    info: InfoHandle,
    params: SharedParameters,
    cancel: CancelToken,
    rate: RateLimit,
    fixed: Arc<Fixed>,
    /// Set by [`force_switchover`](Self::force_switchover).
    force: Arc<std::sync::atomic::AtomicBool>,
    /// Set by [`continue_switchover`](Self::continue_switchover).
    go_on: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    /// Set by [`begin_setup`](Self::begin_setup): the run starts from `setup`.
    begun: Arc<std::sync::atomic::AtomicBool>,
    /// The multifd channels were given with their initial packets written ([`Outgoing::run_multifd_announced`]).
    announced: Arc<std::sync::atomic::AtomicBool>,
    /// Set by [`start_postcopy`](Self::start_postcopy).
    postcopy: Arc<std::sync::atomic::AtomicBool>,
}

/// Why [`Outgoing::start_postcopy`] refused (QEMU's `migrate-start-postcopy` errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartPostcopyError {
    /// Capability `postcopy-ram` is off.
    #[error("Enable postcopy with migrate_set_capability before the start of migration")]
    NoCapability,
    /// The migration has not started (state `none`).
    #[error("Postcopy must be started after migration has been started")]
    NotStarted,
    /// The migration failed or was cancelled: nothing to switch.
    #[error("the migration has ended ({0}): nothing to switch to postcopy")]
    Ended(S),
}

/// What is set once, before the migration is shared.
#[derive(Debug, Clone)]
struct Fixed {
    caps: MigrationCapabilities,
    runstate: String,
    shut_timeout: Duration,
    postcopy_after: Option<Duration>,
    uuid: [u8; 16],
}

/// Refuse two devices with the same idstr and instance among `ids`.
fn check_unique<'a>(ids: impl Iterator<Item = (&'a str, u32)>, what: &str) -> Result<(), EngineError> {
    let mut seen = HashSet::new();
    for (idstr, inst) in ids {
        if !seen.insert((idstr, inst)) {
            return Err(EngineError::Setup(format!("two {what} devices are '{idstr}' instance {inst}")));
        }
    }
    Ok(())
}

/// Let a device write a section body; the channel's own failure wins over the
/// device's message (which may only echo it). Returns the body's length.
fn save_body<W: Write>(
    w: &mut StreamWriter<W>,
    idstr: &str,
    instance: u32,
    save: impl FnOnce(&mut dyn Write) -> Result<(), VmmError>,
) -> Result<u64, EngineError> {
    let mut body = w.body();
    let r = save(&mut body);
    if let Some(e) = body.take_error() {
        return Err(EngineError::Io(e));
    }
    r.map_err(|e| device_error(idstr, instance, e))?;
    Ok(body.written())
}

/// What a run did that its end must undo, whatever happened.
#[derive(Default)]
struct Undo {
    /// The vCPUs were stopped.
    stopped: bool,
    /// Block devices inactivated (a prefix of the list).
    inactivated: usize,
    /// Live devices whose `save_setup` was called (a prefix of the list).
    live_setup: usize,
    /// Regions whose dirty sources were started (a prefix of the list).
    dirty_started: usize,
    /// The package went out: the guest may run on the destination, never resume here.
    postcopy: bool,
}

/// The return path of a run with capability `return-path`: the reader thread and
/// what it carried so far.
struct RpState {
    reader: SourceReturnPath,
    pongs: u64,
    requests: u64,
    /// When PING 1 went out (flushed after the prologue).
    ping_at: Option<Instant>,
}

impl RpState {
    /// The round trip PING 1 -> PONG 1 took, once it is known: the destination's
    /// SHUT(0) at the end takes about as long after the last byte arrives.
    fn round_trip(&self) -> Option<Duration> {
        Some(self.reader.first_pong_at()?.saturating_duration_since(self.ping_at?))
    }
}

/// The return path opened on the channel (its reads woken by a token of its own),
/// or why there is none.
type RpOpen = Result<(ReturnPath, CancelToken), EngineError>;

impl RpState {
    /// Count what arrived (page requests go to `core`'s urgent queue); fail with the
    /// destination's reason if the path ended badly.
    fn check(&mut self, info: &InfoHandle, core: Option<&mut PrecopyCore>) -> Result<(), EngineError> {
        self.drain(info, core);
        match self.reader.end() {
            Some(Err(error)) => Err(EngineError::ReturnPath { error, after_eof: false, resumed: false }),
            _ => Ok(()),
        }
    }

    /// Take what arrived; returns the number of page requests queued.
    fn drain(&mut self, info: &InfoHandle, mut core: Option<&mut PrecopyCore>) -> u64 {
        let requests = self.requests;
        let events: Vec<RpEvent> = self.reader.events().try_iter().collect();
        for ev in events {
            self.take(ev, info, core.as_deref_mut());
        }
        self.requests - requests
    }

    /// Count one event (a page request goes to `core`'s urgent queue) and publish
    /// the counters; returns whether it was a page request.
    fn take(&mut self, ev: RpEvent, info: &InfoHandle, core: Option<&mut PrecopyCore>) -> bool {
        match ev {
            RpEvent::Pong(_) => {
                self.pongs += 1;
                let pongs = self.pongs;
                info.update(|i| i.return_path.get_or_insert_with(Default::default).pongs = pongs);
                false
            }
            // QEMU's ram_save_queue_pages: counted, then queued for the sender.
            RpEvent::PageRequest(r) => {
                self.requests += 1;
                tracing::trace!(block = %r.block, start = r.start, len = r.len, "page request");
                if let Some(c) = core {
                    c.queue_request(r.index, r.start / PAGE as u64, r.len / PAGE as u64);
                }
                let requests = self.requests;
                info.update(|i| i.postcopy_requests = requests);
                true
            }
            _ => false,
        }
    }

    /// After EOF: wait for the destination's SHUT (QEMU 7.2's
    /// `await_return_path_close_on_source`), at most `timeout`, waking for cancel.
    fn await_shut(&mut self, info: &InfoHandle, cancel: &CancelToken, timeout: Duration) -> Result<(), EngineError> {
        let t0 = Instant::now();
        loop {
            self.drain(info, None);
            if cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                let error = ReturnPathError::NoShut { waited: timeout };
                return Err(EngineError::ReturnPath { error, after_eof: true, resumed: false });
            }
            match self.reader.wait_end(left.min(Duration::from_millis(20))) {
                Some(Ok(())) => return Ok(()),
                Some(Err(error)) => return Err(EngineError::ReturnPath { error, after_eof: true, resumed: false }),
                None => {}
            }
        }
    }

    /// Stop the reader; the figures for `query-migrate`.
    fn finish(mut self, info: &InfoHandle) -> ReturnPathInfo {
        self.drain(info, None);
        let end = self.reader.stop();
        let shut = match &end {
            Ok(()) => Some(0),
            Err(ReturnPathError::Shut(s)) => Some(*s),
            Err(_) => None,
        };
        let error = match end {
            Ok(()) | Err(ReturnPathError::Stopped) => None,
            Err(e) => Some(e.to_string()),
        };
        ReturnPathInfo { pongs: self.pongs, shut, error }
    }
}

/// The driver's view of one run: the clock, the stream, the core.
struct Run<'o, 'g, W: PageWriter<'g>> {
    out: &'o Outgoing,
    start: Instant,
    w: StreamWriter<W>,
    core: PrecopyCore,
    /// The multifd channels (capability `multifd`): non-zero pages go there.
    mf: Option<&'o mut crate::multifd::Sender>,
    /// Capability `xbzrle`: the cache and counters.
    xbz: Option<Xbzrle>,
    /// Each region's first RAM address (regions laid end to end, as QEMU's ram_addr_t).
    bases: Vec<u64>,
    /// Bytes sent when the guest started running on the destination (postcopy).
    postcopy_from: Option<u64>,
    _g: std::marker::PhantomData<&'g ()>,
}

impl<'g, W: PageWriter<'g>> Run<'_, 'g, W> {
    fn tick(&mut self) -> Tick {
        let w = self.w.get_mut();
        // What reached the peer: bytes still queued in the socket have not left yet.
        Tick { now: self.start.elapsed(), bytes_sent: w.bytes_sent().saturating_sub(w.queued()) }
    }

    /// Publish the core's figures and the page counters for other threads.
    fn publish(&mut self) {
        let st = self.w.ram_stats();
        let multifd_pages = self.mf.as_ref().map_or(0, |m| m.pages_sent());
        let multifd_bytes = self.mf.as_ref().map_or(0, |m| m.bytes_sent());
        let transferred = self.w.get_mut().bytes_sent();
        let c = self.core.stats();
        let total_time = self.start.elapsed();
        let xbz = self.xbz.as_ref().map(|x| x.info().clone());
        let postcopy_from = self.postcopy_from;
        self.out.info.update(|i| {
            i.total_time = total_time;
            i.normal = st.normal + multifd_pages;
            i.multifd_bytes = multifd_bytes;
            i.duplicate = st.duplicate;
            i.transferred = transferred;
            i.remaining = c.remaining;
            i.dirty_sync_count = c.dirty_sync_count;
            i.pages_per_second = c.pages_per_second;
            if let Some(bw) = c.bandwidth {
                i.mbps = bw * 8.0 / 1000.0;
            }
            i.expected_downtime = c.expected_downtime.or(i.expected_downtime);
            i.cpu_throttle_percentage = (c.throttle > 0).then_some(c.throttle);
            i.xbzrle_cache = xbz;
            if let Some(from) = postcopy_from {
                i.postcopy_bytes = transferred.saturating_sub(from);
            }
        });
    }

    /// OR every region's dirty sources into the pages to send.
    fn harvest(&mut self, ram: &mut [RamRegion<'g>]) -> Result<(), EngineError> {
        let pages = self.core.pages_mut();
        for (r, region) in ram.iter_mut().enumerate() {
            if let Some(map) = pages.map_mut(r) {
                for src in region.dirty.iter_mut() {
                    src.sync(map).map_err(|source| EngineError::DirtySync { region: r, source })?;
                }
            }
        }
        Ok(())
    }

    /// One RAM PART (or the END when `until` is `None`): pages from the set until it
    /// is empty or `until` has passed (checked every 64 pages), then EOS and footer.
    /// Requested pages go first; in postcopy the return path is read after every
    /// page and a requested page is sent at once (not left queued).
    fn send_pages(
        &mut self,
        ram: &[RamRegion<'g>],
        until: Option<Duration>,
        rp: &mut Option<RpState>,
    ) -> Result<(), EngineError> {
        let id = section_ids::RAM;
        match until {
            None => self.w.section_end(id)?,
            Some(_) => self.w.section_part(id)?,
        }
        let mut n = 0u64;
        // As QEMU 7.2: XBZRLE once the bulk pass is over and never in postcopy; the
        // final stage (the guest stopped) neither inserts nor updates cached pages.
        let postcopy = self.core.in_postcopy();
        let stats = self.core.stats();
        let xbz_on = stats.bulk_done && self.xbz.is_some() && !postcopy;
        let (age, last_stage) = (stats.dirty_sync_count, until.is_none());
        loop {
            if postcopy {
                if let Some(r) = rp.as_mut() {
                    r.drain(&self.out.info, Some(&mut self.core));
                }
            }
            let t = if postcopy {
                // QEMU 7.2: requested pages go whatever the rate limit; background
                // pages wait for the next window (or a request, which wakes us).
                let limited = self.w.get_mut().rate_limited_until();
                match self.core.next_postcopy_page(limited.is_some()) {
                    PostcopyNext::Page(t) => t,
                    PostcopyNext::Done => break,
                    PostcopyNext::RateLimited => {
                        self.w.get_mut().flush_now()?;
                        let window_end = limited.unwrap_or_else(Instant::now);
                        let deadline = until.map_or(window_end, |u| window_end.min(self.start + u));
                        self.await_request(deadline, rp)?;
                        if until.is_some_and(|u| self.start.elapsed() >= u) {
                            break;
                        }
                        continue;
                    }
                }
            } else {
                let Some(t) = self.core.take_page() else { break };
                t
            };
            let (r, p) = (t.region, t.page);
            let memory = ram[r].memory();
            let page = memory.page(p);
            let off = p * PAGE as u64;
            let addr = self.bases[r] + off;
            if is_zero(&page) {
                self.w.ram_zero(r, off)?;
                if let Some(x) = self.xbz.as_mut().filter(|_| xbz_on) {
                    x.zero_page(addr, age);
                }
            } else if let Some(mf) = self.mf.as_mut() {
                // QEMU 7.2's ram_save_target_page: multifd before XBZRLE, which it bypasses.
                mf.queue(r, p)?;
            } else if let Some(x) = self.xbz.as_mut().filter(|_| xbz_on) {
                match x.save_page(addr, &page, age, last_stage) {
                    Encoded::Unchanged => {}
                    Encoded::Delta(d) => {
                        let before = self.w.bytes_written();
                        self.w.ram_xbzrle(r, off, d)?;
                        x.sent_delta(self.w.bytes_written() - before);
                    }
                    Encoded::Copy(c) => self.w.ram_page(r, off, &c[..])?,
                    Encoded::InPlace => {
                        self.w.ram_page_header(r, off)?;
                        self.w.get_mut().write_page(page)?;
                    }
                }
            } else {
                self.w.ram_page_header(r, off)?;
                self.w.get_mut().write_page(page)?;
            }
            n += 1;
            // In postcopy a request waits behind what is queued: keep the queue short
            // (QEMU's buffer holds about as much), and send a requested page at once.
            if postcopy && (t.requested || n.is_multiple_of(POSTCOPY_BATCH)) {
                self.w.get_mut().flush_now()?;
            }
            if n.is_multiple_of(64) {
                if self.out.cancel.is_cancelled() {
                    return Err(EngineError::Cancelled);
                }
                self.publish();
                if until.is_some_and(|u| self.start.elapsed() >= u) {
                    break;
                }
            }
        }
        // QEMU 7.2: every channel's SYNC before each RAM EOS.
        if let Some(mf) = self.mf.as_mut() {
            mf.sync()?;
        }
        self.w.ram_eos()?;
        self.w.footer(id)?;
        self.w.get_mut().flush_now()?;
        self.publish();
        Ok(())
    }
}

impl<'g, W: PageWriter<'g>> Run<'_, 'g, W> {
    /// Rate limited in postcopy: wait until `deadline` or until a page request
    /// arrives on the return path (queued in the core), waking for cancel and
    /// failing if the return path ended badly (QEMU's `rate_limit_sem`, posted by
    /// `migration_make_urgent_request`).
    fn await_request(&mut self, deadline: Instant, rp: &mut Option<RpState>) -> Result<(), EngineError> {
        loop {
            if self.out.cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            // Short slices: cancel and the end of the return path are polled.
            let slice = left.min(Duration::from_millis(20));
            let Some(r) = rp.as_mut() else {
                std::thread::sleep(slice);
                continue;
            };
            match r.reader.events().recv_timeout(slice) {
                Ok(ev) => {
                    if r.take(ev, &self.out.info, Some(&mut self.core)) {
                        return Ok(());
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    r.check(&self.out.info, Some(&mut self.core))?;
                    // Ended well (SHUT 0) or stopped: nothing more will be asked for.
                    std::thread::sleep(slice);
                }
            }
        }
    }
}

/// The return path of `ch` for capability `return-path`, its reads woken by a token
/// of their own (the channel's cancel reaches it; stopping the reader does not
/// cancel the channel).
fn open_return_path(ch: &Channel) -> RpOpen {
    let path = ch.return_path().map_err(|e| EngineError::NoReturnPath(e.to_string()))?;
    let token = CancelToken::new()?;
    ch.cancel_token().link_to(&token);
    Ok((path.with_cancel(token.clone()), token))
}

impl Outgoing {
    /// A migration in state `none` with these parameters and capabilities.
    pub fn new(params: SharedParameters, caps: MigrationCapabilities) -> std::io::Result<Self> {
        let state = StateMachine::new(Role::Source);
        Ok(Outgoing {
            info: InfoHandle::for_state(state.clone()),
            state,
            rate: RateLimit::new(params.get().max_bandwidth),
            params,
            fixed: Arc::new(Fixed {
                caps,
                runstate: "running".into(),
                shut_timeout: DEFAULT_SHUT_TIMEOUT,
                postcopy_after: None,
                uuid: [0; 16],
            }),
            cancel: CancelToken::new()?,
            force: Default::default(),
            go_on: Default::default(),
            begun: Default::default(),
            announced: Default::default(),
            postcopy: Default::default(),
        })
    }

    /// With capability `postcopy-ram`: start postcopy by itself once `after` has
    /// passed since the migration became active, or when the first pass has sent
    /// every page if that is sooner (`qmig send --postcopy-after`; zero: as soon as
    /// allowed). Set before the migration is shared.
    pub fn with_postcopy_after(mut self, after: Duration) -> Self {
        Arc::make_mut(&mut self.fixed).postcopy_after = Some(after);
        self
    }

    /// QEMU's `-uuid`: the VM's UUID, written in each multifd channel's initial packet
    /// (a QEMU 7.2 destination requires its own); all zeros by default, as QEMU without `-uuid`.
    pub fn with_uuid(mut self, uuid: [u8; 16]) -> Self {
        Arc::make_mut(&mut self.fixed).uuid = uuid;
        self
    }

    /// The VM's UUID given by [`with_uuid`](Self::with_uuid) (all zeros by default).
    pub fn uuid(&self) -> [u8; 16] {
        self.fixed.uuid
    }

    /// The runstate written in `globalstate` (`running` for a live guest, the
    /// default; `paused` for a stopped one), set before the migration is shared.
    pub fn with_runstate(mut self, runstate: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.fixed).runstate = runstate.into();
        self
    }

    /// With capability `return-path`: how long to wait after EOF for the destination's
    /// SHUT before failing ([`DEFAULT_SHUT_TIMEOUT`]), set before the migration is shared.
    pub fn with_shut_timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.fixed).shut_timeout = timeout;
        self
    }

    /// Cancel with `token` (shared with the caller's other work), set before the
    /// migration is shared.
    pub fn with_cancel(mut self, token: CancelToken) -> Self {
        self.cancel = token;
        self
    }

    /// The state machine (subscribe for notifications); the one owner of the status.
    pub fn state(&self) -> &StateMachine {
        &self.state
    }

    /// `query-migrate` figures, current at any time (the status read from [`state`](Self::state)).
    pub fn info(&self) -> &InfoHandle {
        &self.info
    }

    /// Parameters, changeable while running (`max-bandwidth`, `downtime-limit`...).
    pub fn params(&self) -> &SharedParameters {
        &self.params
    }

    /// Cancels the migration from any thread.
    pub fn cancel(&self) -> &CancelToken {
        &self.cancel
    }

    /// Byte counters and the rate limit of the stream.
    pub fn rate(&self) -> &RateLimit {
        &self.rate
    }

    /// The capabilities.
    pub fn caps(&self) -> &MigrationCapabilities {
        &self.fixed.caps
    }

    /// The runstate written in `globalstate`.
    pub fn runstate(&self) -> &str {
        &self.fixed.runstate
    }

    /// QEMU's `migrate-continue state=pre-switchover`: with `pause-before-switchover`,
    /// let a migration waiting in `pre-switchover` (guest stopped) go on.
    pub fn continue_switchover(&self) -> Result<(), IllegalTransition> {
        let status = self.state.status();
        if status != S::PreSwitchover {
            return Err(IllegalTransition { from: S::PreSwitchover, to: S::Device, current: status });
        }
        let (m, cv) = &*self.go_on;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        Ok(())
    }

    /// Move `none -> setup` now, before the channel is even connected, as QEMU 7.2's
    /// `migrate` command does before it returns (so `query-migrate` never shows
    /// `none` after it); the run then goes on from `setup`. A channel that cannot
    /// be opened then ends it `setup -> failed`.
    pub fn begin_setup(&self) -> Result<(), IllegalTransition> {
        self.state.transition(S::None, S::Setup)?;
        self.begun.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// QEMU's `migrate-start-postcopy`: switch to postcopy at the next iteration
    /// boundary (after the RAM PART under way), unless pre-copy completes first.
    /// Allowed from `setup` on (also once completed, where it does nothing, as QEMU);
    /// refused without capability `postcopy-ram`, before the migration started, or
    /// after it failed or was cancelled.
    pub fn start_postcopy(&self) -> Result<(), StartPostcopyError> {
        if !self.fixed.caps.postcopy_ram {
            return Err(StartPostcopyError::NoCapability);
        }
        match self.state.status() {
            S::None => Err(StartPostcopyError::NotStarted),
            st @ (S::Failed | S::Cancelling | S::Cancelled) => Err(StartPostcopyError::Ended(st)),
            _ => {
                self.postcopy.store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::info!("postcopy requested");
                Ok(())
            }
        }
    }

    /// Stop the guest and complete at the next decision, whatever is still to send
    /// (the downtime is then what the rest takes): what virsh's `--timeout` with
    /// `--timeout-action suspend` amounts to. Any thread, any time while running.
    pub fn force_switchover(&self) {
        self.force.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Wait in `pre-switchover` until continued or cancelled.
    fn wait_for_continue(&self) -> Result<(), EngineError> {
        let (m, cv) = &*self.go_on;
        let mut go = m.lock().unwrap_or_else(|e| e.into_inner());
        while !*go {
            if self.cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            go = cv.wait_timeout(go, Duration::from_millis(20)).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
        Ok(())
    }

    /// Migrate the guest RAM `ram` (each region with its dirty sources) over `ch`.
    /// On success the guest stays stopped (as QEMU's `postmigrate`); on cancel or
    /// failure it is resumed.
    pub fn run(
        &self,
        ch: Channel,
        ram: &mut [RamRegion<'_>],
        vcpus: &mut dyn VcpuControl,
    ) -> Result<MigrationInfo, EngineError> {
        self.run_vm(ch, ram, vcpus, &mut VmParts::default())
    }

    /// [`run`](Self::run) with the VM's devices (vmstate and hand-written ones saved
    /// at switchover after `timer`; live ones sent alongside RAM, see the module
    /// documentation), block devices (inactivated at switchover, reactivated if it
    /// fails) and blockers (any fails the migration at start with its reason).
    pub fn run_vm(
        &self,
        ch: Channel,
        ram: &mut [RamRegion<'_>],
        vcpus: &mut dyn VcpuControl,
        vm: &mut VmParts<'_>,
    ) -> Result<MigrationInfo, EngineError> {
        // Our cancel must wake the channel's blocked reads, writes and rate-limit sleeps.
        self.cancel.link_to(ch.cancel_token());
        let rp = self.fixed.caps.uses_return_path().then(|| open_return_path(&ch));
        self.run_inner(MigrationWriter::new(ch, self.rate.clone()), rp, ram, vcpus, vm)
    }

    /// [`run_vm`](Self::run_vm) with capability `multifd`: `channels` are the
    /// `multifd-channels` extra connections to the same destination (connected after
    /// `ch`, in id order); each gets a sender thread (see [`crate::multifd`]).
    pub fn run_multifd(
        &self,
        ch: Channel,
        channels: Vec<Channel>,
        ram: &mut [RamRegion<'_>],
        vcpus: &mut dyn VcpuControl,
        vm: &mut VmParts<'_>,
    ) -> Result<MigrationInfo, EngineError> {
        self.cancel.link_to(ch.cancel_token());
        for c in &channels {
            self.cancel.link_to(c.cancel_token());
        }
        let rp = self.fixed.caps.return_path.then(|| open_return_path(&ch));
        let w = MigrationWriter::new(ch, self.rate.clone());
        self.run_inner_mf(w, rp, ram, vcpus, vm, Some(channels))
    }

    /// [`run_multifd`](Self::run_multifd) with channels whose initial packets were
    /// written as each connected ([`crate::multifd::announce`]), as QEMU 7.2's source
    /// does: a QEMU destination reads each channel's initial packet before it serves
    /// the next connection (its TLS handshake included), so over TLS the next
    /// channel's handshake waits for the previous channel's packet.
    pub fn run_multifd_announced(
        &self,
        ch: Channel,
        channels: Vec<Channel>,
        ram: &mut [RamRegion<'_>],
        vcpus: &mut dyn VcpuControl,
        vm: &mut VmParts<'_>,
    ) -> Result<MigrationInfo, EngineError> {
        self.announced.store(true, std::sync::atomic::Ordering::SeqCst);
        self.run_multifd(ch, channels, ram, vcpus, vm)
    }

    /// [`run_vm`](Self::run_vm) into any [`PageWriter`] (an in-memory stream, say).
    /// Such a stream has no return path: capability `return-path` fails at start.
    pub fn run_on<'g, W: PageWriter<'g>>(
        &self,
        w: W,
        ram: &mut [RamRegion<'g>],
        vcpus: &mut dyn VcpuControl,
        vm: &mut VmParts<'_>,
    ) -> Result<MigrationInfo, EngineError> {
        let rp = self.fixed.caps.uses_return_path().then(|| {
            Err(EngineError::NoReturnPath("a stream written to a PageWriter has no reverse direction".into()))
        });
        self.run_inner(w, rp, ram, vcpus, vm)
    }

    fn run_inner<'g, W: PageWriter<'g>>(
        &self,
        w: W,
        rp: Option<RpOpen>,
        ram: &mut [RamRegion<'g>],
        vcpus: &mut dyn VcpuControl,
        vm: &mut VmParts<'_>,
    ) -> Result<MigrationInfo, EngineError> {
        self.run_inner_mf(w, rp, ram, vcpus, vm, None)
    }

    fn run_inner_mf<'g, W: PageWriter<'g>>(
        &self,
        w: W,
        rp: Option<RpOpen>,
        ram: &mut [RamRegion<'g>],
        vcpus: &mut dyn VcpuControl,
        vm: &mut VmParts<'_>,
        channels: Option<Vec<Channel>>,
    ) -> Result<MigrationInfo, EngineError> {
        let start = Instant::now();
        let pages: u64 = ram.iter().map(|r| r.memory().pages()).sum();
        let _span = tracing::info_span!("migration", role = "source", regions = ram.len(), pages).entered();
        if !self.begun.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.state.transition(S::None, S::Setup)?;
        }
        let mut undo = Undo::default();
        let mut reader: Option<RpState> = None;
        let result = match (vm.blockers.first(), rp, channels) {
            (Some(b), _, _) => Err(EngineError::Blocked(b.reason.clone())),
            // As QEMU: a return path that cannot be opened fails the migration in setup.
            (None, Some(Err(e)), _) => Err(e),
            (None, rp, channels) => {
                let rp = rp.and_then(Result::ok);
                if self.fixed.caps.multifd && self.fixed.caps.postcopy_ram {
                    Err(EngineError::Setup(
                        "capabilities multifd and postcopy-ram refuse each other: turn one of them off".into(),
                    ))
                } else if self.fixed.caps.multifd != channels.is_some() {
                    Err(EngineError::Setup(match channels {
                        Some(_) => "multifd channels were given without capability multifd".into(),
                        None => "capability multifd needs its channels (Outgoing::run_multifd)".into(),
                    }))
                } else if let Some(channels) = channels {
                    self.precopy_multifd(w, start, ram, vcpus, vm, &mut undo, rp, &mut reader, channels)
                } else {
                    self.precopy(w, start, ram, vcpus, vm, &mut undo, rp, &mut reader, None)
                }
            }
        };
        // A broken channel: the return path says whether the destination ended it
        // (its SHUT status, or that it closed the connection) better than EPIPE does.
        let result = match (result, &reader) {
            (Err(e), Some(r)) if e.is_channel() && !e.is_cancel() && !self.cancel.is_cancelled() => {
                match r.reader.wait_end(REASON_WAIT) {
                    Some(Err(error)) if error != ReturnPathError::Stopped => {
                        Err(EngineError::ReturnPath { error, after_eof: false, resumed: false })
                    }
                    _ => Err(e),
                }
            }
            (r, _) => r,
        };
        if let Some(r) = reader.take() {
            let rp_info = r.finish(&self.info);
            self.info.update(|i| i.return_path = Some(rp_info));
        }
        for region in ram.iter_mut().take(undo.dirty_started) {
            for src in region.dirty.iter_mut() {
                let _ = src.stop();
            }
        }
        // As QEMU's qemu_savevm_state_cleanup(): every live handler that was set up.
        for d in vm.live_devices.iter_mut().take(undo.live_setup) {
            d.save_cleanup();
        }
        // As QEMU's cpu_throttle_stop(): whatever the outcome, the vCPUs run at full speed again.
        let _ = vcpus.set_throttle(0);
        // query-migrate's cpu-throttle-percentage: the last step stays in the final
        // figures of a migration that throttled (so its report shows it); a failed or
        // cancelled one, whose guest runs on unthrottled, drops it.
        if result.is_err() {
            self.info.update(|i| i.cpu_throttle_percentage = None);
            // In postcopy the destination owns the block devices now.
            for b in vm.blocks.iter_mut().take(if undo.postcopy { 0 } else { undo.inactivated }) {
                let _ = b.activate();
            }
        }
        match &result {
            Ok(()) => tracing::info!(total_ms = start.elapsed().as_millis() as u64, "migration completed"),
            Err(e) => tracing::warn!(origin = %e.origin(), error = %crate::error::report(e), "migration ended"),
        }
        match result {
            Ok(()) => {
                self.info.update(|i| {
                    i.total_time = start.elapsed();
                    i.remaining = 0;
                    let secs = i.total_time.saturating_sub(i.setup_time).as_secs_f64();
                    i.mbps = if secs > 0.0 { i.transferred as f64 * 8.0 / secs / 1e6 } else { 0.0 };
                });
                self.state.transition_from_current(S::Completed)?;
                Ok(self.info.get())
            }
            Err(e) => {
                let cancelled = e.is_cancel() || self.cancel.is_cancelled();
                let resumed = if undo.stopped && !undo.postcopy {
                    vcpus.resume().map_err(|e| EngineError::Vmm(e.on(VmmPart::Vcpu("resume"))))
                } else {
                    Ok(())
                };
                let mut e = if cancelled { EngineError::Cancelled } else { e };
                if let EngineError::ReturnPath { resumed: said, .. } = &mut e {
                    *said = undo.stopped && !undo.postcopy && resumed.is_ok();
                }
                // After the package the destination may run the guest: it was not
                // resumed here, and the error says why (a cancel stays a cancel).
                let e = if undo.postcopy { EngineError::Postcopy(Box::new(e)) } else { e };
                self.info.update(|i| {
                    i.total_time = start.elapsed();
                    if !cancelled {
                        i.error_desc = Some(crate::error::report(&e));
                    }
                });
                if cancelled {
                    let _ = self.state.transition_from_current(S::Cancelling);
                    let _ = self.state.transition_from_current(S::Cancelled);
                } else {
                    let _ = self.state.transition_from_current(S::Failed);
                }
                resumed?;
                Err(e)
            }
        }
    }

    /// [`precopy`](Self::precopy) with the multifd sender threads running in a scope
    /// around it (they borrow the guest memory).
    #[allow(clippy::too_many_arguments)]
    fn precopy_multifd<'g, W: PageWriter<'g>>(
        &self,
        w: W,
        start: Instant,
        ram: &mut [RamRegion<'g>],
        vcpus: &mut dyn VcpuControl,
        vm: &mut VmParts<'_>,
        undo: &mut Undo,
        rp: Option<(ReturnPath, CancelToken)>,
        reader: &mut Option<RpState>,
        channels: Vec<Channel>,
    ) -> Result<(), EngineError> {
        let params = self.params.get();
        let mem: Vec<&'g GuestRegion> = ram.iter().map(|r| r.memory()).collect();
        std::thread::scope(|s| {
            let comp = params.multifd_compression;
            let mut sender = crate::multifd::Sender::start(
                s,
                channels,
                mem,
                comp,
                params.multifd_level(),
                &self.rate,
                self.cancel.clone(),
                self.announced.load(std::sync::atomic::Ordering::SeqCst),
                self.fixed.uuid,
            )?;
            let r = self.precopy(w, start, ram, vcpus, vm, undo, rp, reader, Some(&mut sender));
            if r.is_err() {
                sender.abort();
            }
            let f = sender.finish();
            r?;
            Ok(f?)
        })
    }

    /// Setup, the passes the core asks for, and the switchover; with a return path
    /// `rp`, its reader is spawned into `reader`, checked every loop turn and waited
    /// for (SHUT) after EOF.
    #[allow(clippy::too_many_arguments)]
    fn precopy<'g, W: PageWriter<'g>>(
        &self,
        w: W,
        start: Instant,
        ram: &mut [RamRegion<'g>],
        vcpus: &mut dyn VcpuControl,
        vm: &mut VmParts<'_>,
        undo: &mut Undo,
        rp: Option<(ReturnPath, CancelToken)>,
        reader: &mut Option<RpState>,
        mut mf: Option<&mut crate::multifd::Sender>,
    ) -> Result<(), EngineError> {
        if ram.is_empty() {
            return Err(EngineError::Setup("a migration needs at least one RAM region".into()));
        }
        let setup_span = tracing::info_span!("setup").entered();
        let full = vm.devices.iter().map(|d| (d.idstr(), d.instance_id()));
        check_unique(full.chain(vm.raw_devices.iter().map(|d| (d.idstr(), d.instance_id()))), "FULL-section")?;
        check_unique(vm.live_devices.iter().map(|d| (d.idstr(), d.instance_id())), "live")?;
        // Section ids: vmstate devices, then hand-written ones, then live ones.
        let raw_base = FIRST_DEVICE_ID + vm.devices.len() as u32;
        let live_base = raw_base + vm.raw_devices.len() as u32;
        let blocks: Vec<RamBlock> = ram
            .iter()
            .enumerate()
            .map(|(i, r)| RamBlock::new(i, r.memory().name().to_string(), r.memory().len() as u64))
            .collect();
        let total: u64 = blocks.iter().map(|b| b.length).sum();
        let params = self.params.get();
        self.rate.set_max_bandwidth(params.max_bandwidth);
        let mut w = StreamWriter::new(w);
        let guest = StoppedGuest { runstate: self.fixed.runstate.clone(), ..Default::default() };
        // QEMU 7.2's migration_thread: the reader runs before anything is sent, then
        // OPEN_RETURN_PATH and PING 1 follow the configuration, before RAM's START.
        let mut commands = Vec::new();
        if let Some((path, token)) = rp {
            let r = SourceReturnPath::spawn(path, blocks.clone(), PAGE as u64, token)?;
            *reader = Some(RpState { reader: r, pongs: 0, requests: 0, ping_at: None });
            self.info.update(|i| i.return_path = Some(ReturnPathInfo::default()));
            commands = vec![Command::OpenReturnPath, Command::Ping(1)];
        }
        // QEMU 7.2 advises postcopy right after the return path: the OR of the
        // blocks' page sizes, then the target page size.
        if self.fixed.caps.postcopy_ram {
            let summary = blocks.iter().fold(0u64, |a, b| a | b.page_size.unwrap_or(PAGE as u64));
            commands.push(Command::PostcopyAdvise(Some((summary, PAGE as u64))));
        }
        match mf.as_mut() {
            None => write_guest_prologue_with(&mut w, &blocks, &guest, &commands)?,
            // QEMU 7.2's ram_save_setup with multifd: every channel's SYNC before the EOS.
            Some(mf) => {
                w.header()?;
                w.configuration(&savevm_format::Configuration {
                    machine: guest.machine.clone(),
                    ..Default::default()
                })?;
                for c in &commands {
                    w.command(c)?;
                }
                w.section_start(section_ids::RAM, savevm_format::wire::RAM_IDSTR, 0, savevm_format::wire::RAM_VERSION)?;
                w.ram_block_list(&blocks)?;
                w.get_mut().flush_now()?;
                mf.sync()?;
                w.ram_eos()?;
                w.footer(section_ids::RAM)?;
            }
        }
        // Live devices' START sections follow RAM's (QEMU's qemu_savevm_state_setup).
        for (k, d) in vm.live_devices.iter_mut().enumerate() {
            // The device is borrowed mutably to save: its name is copied out first.
            let (id, idstr, inst) = (live_base + k as u32, d.idstr().to_owned(), d.instance_id());
            w.section_start(id, &idstr, inst, d.version())?;
            undo.live_setup += 1;
            save_body(&mut w, &idstr, inst, |out| d.save_setup(out))?;
            w.footer(id)?;
        }
        w.get_mut().flush_now()?;
        if let Some(r) = reader.as_mut() {
            r.ping_at = Some(Instant::now());
        }
        // Bulk pass: every page is to be sent; marks from now on come from the guest.
        for (r, region) in ram.iter_mut().enumerate() {
            undo.dirty_started += 1;
            for src in region.dirty.iter_mut() {
                src.start().map_err(|source| EngineError::DirtyStart { region: r, source })?;
            }
        }
        let pages: Vec<u64> = ram.iter().map(|r| r.memory().pages()).collect();
        let t0 = Tick { now: start.elapsed(), bytes_sent: w.get_mut().bytes_sent() };
        let xbz = match self.fixed.caps.xbzrle {
            false => None,
            true => Some(Xbzrle::new(params.xbzrle_cache_size).ok_or_else(|| {
                EngineError::Setup(format!("xbzrle-cache-size {} cannot be allocated", params.xbzrle_cache_size))
            })?),
        };
        let bases = blocks.iter().scan(0u64, |next, b| Some(std::mem::replace(next, *next + b.length))).collect();
        let mut run = Run {
            out: self,
            start,
            core: PrecopyCore::new(&pages, t0),
            w,
            mf,
            xbz,
            bases,
            postcopy_from: None,
            _g: std::marker::PhantomData,
        };
        self.state.announce(Notification::Pass { pass: 1 });
        let setup_time = start.elapsed();
        self.info.update(|i| {
            i.setup_time = setup_time;
            i.total = total;
            i.dirty_sync_count = 1;
            i.expected_downtime = Some(params.downtime_limit);
        });
        self.state.transition(S::Setup, S::Active)?;
        tracing::debug!(setup_ms = setup_time.as_millis() as u64, total_bytes = total, "setup done");
        drop(setup_span);

        let mut pass_span = Some(tracing::info_span!("pass", n = 1u64).entered());
        // Whether the loop ended in postcopy (else: the pre-copy switchover), and the
        // downtime and bytes of the postcopy switch.
        let mut switched: Option<(Duration, u64)> = None;
        loop {
            if self.cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            if let Some(r) = reader.as_mut() {
                r.check(&self.info, Some(&mut run.core))?;
            }
            let params = self.params.get();
            let in_postcopy = run.core.in_postcopy();
            self.rate.set_max_bandwidth(if in_postcopy { params.max_postcopy_bandwidth } else { params.max_bandwidth });
            if self.fixed.caps.postcopy_ram && !in_postcopy {
                // "After the first pass" waits for a measured bandwidth too: before the
                // first window closes the downtime threshold is 0, so a guest whose
                // bulk pass took under 100 ms would switch although it converges.
                let due = self.fixed.postcopy_after.is_some_and(|after| {
                    let s = run.core.stats();
                    start.elapsed().saturating_sub(setup_time) >= after || (s.bulk_done && s.bandwidth.is_some())
                });
                if due || self.postcopy.load(std::sync::atomic::Ordering::SeqCst) {
                    run.core.request_postcopy();
                }
            }
            // After the postcopy switch the live devices have sent their END sections.
            let dev_pending: Vec<u64> =
                vm.live_devices.iter_mut().map(|d| if in_postcopy { 0 } else { d.pending() }).collect();
            // Bytes still queued in the socket must arrive within the downtime too
            // (before the postcopy switch: after it, the guest runs on the destination).
            let queued = if in_postcopy { 0 } else { run.w.get_mut().queued() };
            let dev_total = dev_pending.iter().fold(queued, |a, &b| a.saturating_add(b));
            if self.force.load(std::sync::atomic::Ordering::SeqCst) {
                run.core.force_switchover();
            }
            let tick = run.tick();
            // With a return path, the last byte needs half a round trip to arrive and
            // the destination's SHUT(0), which ends the downtime, a whole one back:
            // the data gets what is left of the limit (at least a quarter of it).
            let mut params = params;
            if let Some(rtt) = reader.as_ref().and_then(RpState::round_trip) {
                let rtt_ms = u64::try_from(rtt.as_millis() * 3 / 2).unwrap_or(u64::MAX);
                params.downtime_limit = params.downtime_limit.saturating_sub(rtt_ms).max(params.downtime_limit / 4);
            }
            match run.core.step(tick, dev_total, &params) {
                Action::Sync => {
                    run.harvest(ram)?;
                    let tick = run.tick();
                    let o = run.core.synced(tick, &params, self.fixed.caps.auto_converge);
                    let c = run.core.stats();
                    drop(pass_span.take());
                    pass_span = Some(tracing::info_span!("pass", n = o.pass).entered());
                    tracing::debug!(
                        pass = o.pass,
                        new_dirty_pages = o.new_dirty,
                        remaining = c.remaining,
                        threshold = c.threshold,
                        bytes_sent = tick.bytes_sent,
                        dirty_pages_rate = o.dirty_pages_rate,
                        expected_downtime_ms = c.expected_downtime,
                        "dirty sync"
                    );
                    self.state.announce(Notification::Pass { pass: o.pass });
                    if let Some(t) = o.throttle {
                        tracing::info!(percentage = t, "auto-converge: throttling the vCPUs");
                        vcpus.set_throttle(t).map_err(|e| e.on(VmmPart::Vcpu("set throttle")))?;
                        self.state.announce(Notification::Throttle { percentage: t });
                    }
                    if let Some(rate) = o.dirty_pages_rate {
                        self.info.update(|i| i.dirty_pages_rate = rate);
                        let taken = run.core.pages_mut().taken();
                        if let Some(x) = run.xbz.as_mut() {
                            x.close_period(taken);
                        }
                    }
                    run.publish();
                }
                Action::Nap { until } => {
                    let now = run.start.elapsed();
                    std::thread::sleep(until.saturating_sub(now));
                }
                Action::Switchover => {
                    let c = run.core.stats();
                    let forced = self.force.load(std::sync::atomic::Ordering::SeqCst);
                    tracing::info!(
                        remaining = c.remaining,
                        device_pending = dev_total,
                        threshold = c.threshold,
                        bandwidth_bytes_per_ms = c.bandwidth,
                        expected_downtime_ms = c.expected_downtime,
                        reason = if forced { "forced" } else { "the rest fits in downtime-limit" },
                        "switchover"
                    );
                    break;
                }
                Action::StartPostcopy => {
                    drop(pass_span.take());
                    switched = Some(self.postcopy_switch(&mut run, ram, vcpus, vm, undo, reader, live_base)?);
                    pass_span = Some(tracing::info_span!("postcopy").entered());
                }
                Action::CompletePostcopy => break,
                Action::Iterate { ram: send_ram, until } => {
                    if send_ram {
                        run.send_pages(ram, Some(until), reader)?;
                    }
                    let mut dev_sent = 0u64;
                    for (k, d) in vm.live_devices.iter_mut().enumerate() {
                        if dev_pending[k] == 0 {
                            continue;
                        }
                        if self.cancel.is_cancelled() {
                            return Err(EngineError::Cancelled);
                        }
                        let id = live_base + k as u32;
                        run.w.section_part(id)?;
                        let (idstr, inst) = (d.idstr().to_owned(), d.instance_id());
                        dev_sent += save_body(&mut run.w, &idstr, inst, |out| d.save_iterate(out))?;
                        run.w.footer(id)?;
                    }
                    if dev_total > 0 {
                        run.w.get_mut().flush_now()?;
                        run.publish();
                    }
                    run.core.iterated(dev_total, dev_sent);
                }
            }
        }

        drop(pass_span);
        if let Some((downtime, downtime_bytes)) = switched {
            return self.postcopy_complete(run, ram, reader, downtime, downtime_bytes);
        }
        // Switchover: stop the guest, final sync, everything left without a limit.
        // Downtime starts when we ask the vCPUs to stop (QEMU's downtime_start).
        let switchover_span = tracing::info_span!("switchover").entered();
        let stop_time = Instant::now();
        let precopy_bytes = run.w.get_mut().bytes_sent();
        self.info.update(|i| i.precopy_bytes = precopy_bytes);
        vcpus.stop().map_err(|e| e.on(VmmPart::Vcpu("stop")))?;
        undo.stopped = true;
        if self.fixed.caps.pause_before_switchover {
            self.state.transition(S::Active, S::PreSwitchover)?;
            self.wait_for_continue()?;
            self.state.transition(S::PreSwitchover, S::Device)?;
        }
        self.rate.set_max_bandwidth(0);
        if let Some(r) = reader.as_mut() {
            r.check(&self.info, None)?;
        }
        run.harvest(ram)?;
        let pass = run.core.final_synced();
        self.state.announce(Notification::Pass { pass });
        run.publish();
        run.send_pages(ram, None, reader)?;
        tracing::debug!(pass, pages_at_stop = run.w.ram_stats().normal + run.w.ram_stats().duplicate, "RAM END sent");
        let device_span = tracing::info_span!(
            "devices",
            live = vm.live_devices.len(),
            full = vm.devices.len() + vm.raw_devices.len()
        )
        .entered();
        let w = &mut run.w;
        // Live devices' END sections follow RAM's (QEMU's save_live_complete_precopy).
        for (k, d) in vm.live_devices.iter_mut().enumerate() {
            let id = live_base + k as u32;
            w.section_end(id)?;
            let (idstr, inst) = (d.idstr().to_owned(), d.instance_id());
            save_body(w, &idstr, inst, |out| d.save_complete(out))?;
            w.footer(id)?;
        }
        let timer = savevm_format::builtin::timer();
        w.device(section_ids::TIMER, "timer", 0, &timer, &savevm_format::builtin::timer_state(0, 0))?;
        for (k, d) in vm.devices.iter_mut().enumerate() {
            let state = d.save().map_err(|e| device_error(d.idstr(), d.instance_id(), e))?;
            let vmsd = d.vmsd();
            w.device(FIRST_DEVICE_ID + k as u32, d.idstr(), d.instance_id(), &vmsd, &state)?;
        }
        // Hand-written devices: the body is theirs; the vmdesc records its size (QEMU's old style).
        for (k, d) in vm.raw_devices.iter_mut().enumerate() {
            let (id, idstr, inst) = (raw_base + k as u32, d.idstr().to_owned(), d.instance_id());
            w.section_full(id, &idstr, inst, d.version())?;
            let size = save_body(w, &idstr, inst, |out| d.save_state(out))?;
            w.footer(id)?;
            w.old_style_device(&idstr, inst, size);
        }
        // As QEMU 7.2: block devices are inactivated after the device state, before EOF.
        for b in vm.blocks.iter_mut() {
            b.inactivate().map_err(|e| e.on(VmmPart::Block { name: b.name(), op: "inactivate" }))?;
            undo.inactivated += 1;
        }
        drop(device_span);
        let gs = savevm_format::builtin::globalstate();
        let gs_state = savevm_format::builtin::globalstate_state(&self.fixed.runstate);
        w.device(section_ids::GLOBALSTATE, "globalstate", 0, &gs, &gs_state)?;
        w.eof()?;
        w.vmdesc()?;
        let mut inner = run.w.finish()?;
        let transferred = inner.bytes_sent();
        inner.flush_now()?;
        let transferred = transferred.max(inner.bytes_sent());
        inner.close()?;
        // QEMU 7.2's migration_completion: with a return path, the destination's
        // SHUT(0) is what completes the migration (the guest stays stopped meanwhile).
        if let Some(r) = reader.as_mut() {
            r.await_shut(&self.info, &self.cancel, self.fixed.shut_timeout)?;
        }
        self.info.update(|i| {
            i.downtime = Some(stop_time.elapsed());
            i.transferred = transferred;
            i.downtime_bytes = transferred.saturating_sub(precopy_bytes);
        });
        tracing::info!(downtime_ms = stop_time.elapsed().as_millis() as u64, transferred, "stream complete");
        drop(switchover_span);
        Ok(())
    }

    /// The FULL device sections of the stopped guest in QEMU's order (`timer`, the
    /// vmstate devices, the hand-written ones, `globalstate`): the postcopy package's.
    fn save_device_state<V: Write>(
        &self,
        w: &mut StreamWriter<V>,
        vm: &mut VmParts<'_>,
        raw_base: u32,
    ) -> Result<(), EngineError> {
        let timer = savevm_format::builtin::timer();
        w.device(section_ids::TIMER, "timer", 0, &timer, &savevm_format::builtin::timer_state(0, 0))?;
        for (k, d) in vm.devices.iter_mut().enumerate() {
            let state = d.save().map_err(|e| device_error(d.idstr(), d.instance_id(), e))?;
            let vmsd = d.vmsd();
            w.device(FIRST_DEVICE_ID + k as u32, d.idstr(), d.instance_id(), &vmsd, &state)?;
        }
        for (k, d) in vm.raw_devices.iter_mut().enumerate() {
            let (id, idstr, inst) = (raw_base + k as u32, d.idstr().to_owned(), d.instance_id());
            w.section_full(id, &idstr, inst, d.version())?;
            save_body(w, &idstr, inst, |out| d.save_state(out))?;
            w.footer(id)?;
        }
        let gs = savevm_format::builtin::globalstate();
        let gs_state = savevm_format::builtin::globalstate_state(&self.fixed.runstate);
        w.device(section_ids::GLOBALSTATE, "globalstate", 0, &gs, &gs_state)?;
        Ok(())
    }

    /// The switch to postcopy, as QEMU 7.2's `postcopy_start`: `postcopy-active`
    /// (with `pause-before-switchover`: `pre-switchover` first, waiting for
    /// [`continue_switchover`](Self::continue_switchover)), the guest stopped, block
    /// devices inactivated, the live devices' END sections, the rate limit lifted,
    /// the final sync, POSTCOPY_RAM_DISCARD of every page still to send (per block,
    /// at most 12 ranges a command), PING 2, the PACKAGED blob (LISTEN, the device
    /// sections, PING 3, RUN), PING 4. Returns the downtime (stop to package sent)
    /// and the bytes sent meanwhile.
    #[allow(clippy::too_many_arguments)]
    fn postcopy_switch<'g, W: PageWriter<'g>>(
        &self,
        run: &mut Run<'_, 'g, W>,
        ram: &mut [RamRegion<'g>],
        vcpus: &mut dyn VcpuControl,
        vm: &mut VmParts<'_>,
        undo: &mut Undo,
        reader: &mut Option<RpState>,
        live_base: u32,
    ) -> Result<(Duration, u64), EngineError> {
        let _span = tracing::info_span!("postcopy switch").entered();
        let c = run.core.stats();
        tracing::info!(remaining = c.remaining, threshold = c.threshold, "switching to postcopy");
        let pause = self.fixed.caps.pause_before_switchover;
        if !pause {
            self.state.transition(S::Active, S::PostcopyActive)?;
        }
        let stop_time = Instant::now();
        let precopy_bytes = run.w.get_mut().bytes_sent();
        self.info.update(|i| i.precopy_bytes = precopy_bytes);
        vcpus.stop().map_err(|e| e.on(VmmPart::Vcpu("stop")))?;
        undo.stopped = true;
        if pause {
            self.state.transition(S::Active, S::PreSwitchover)?;
            self.wait_for_continue()?;
            self.state.transition(S::PreSwitchover, S::PostcopyActive)?;
        }
        for b in vm.blocks.iter_mut() {
            b.inactivate().map_err(|e| e.on(VmmPart::Block { name: b.name(), op: "inactivate" }))?;
            undo.inactivated += 1;
        }
        let raw_base = FIRST_DEVICE_ID + vm.devices.len() as u32;
        // The live devices cannot go on after the switch: their END sections now.
        for (k, d) in vm.live_devices.iter_mut().enumerate() {
            let id = live_base + k as u32;
            run.w.section_end(id)?;
            let (idstr, inst) = (d.idstr().to_owned(), d.instance_id());
            save_body(&mut run.w, &idstr, inst, |out| d.save_complete(out))?;
            run.w.footer(id)?;
        }
        self.rate.set_max_bandwidth(0);
        if let Some(r) = reader.as_mut() {
            r.check(&self.info, Some(&mut run.core))?;
        }
        run.harvest(ram)?;
        let pass = run.core.final_synced();
        self.state.announce(Notification::Pass { pass });
        run.publish();
        // Every page still to send (dirtied since it was sent, or never sent) is
        // dropped on the destination, which will ask for it or get it in the background.
        run.w.reset_continue();
        let mut discarded = 0u64;
        for (r, region) in ram.iter().enumerate() {
            let runs = run.core.pages_mut().runs(r);
            for chunk in runs.chunks(savevm_format::command::MAX_DISCARD_RANGES) {
                let ranges: Vec<(u64, u64)> = chunk.iter().map(|&(p, n)| (p * PAGE as u64, n * PAGE as u64)).collect();
                discarded += chunk.iter().map(|&(_, n)| n).sum::<u64>();
                run.w.command(&Command::PostcopyRamDiscard { block: region.memory().name().to_string(), ranges })?;
            }
        }
        run.w.command(&Command::Ping(2))?;
        let mut pkg = run.w.nested(Vec::new());
        pkg.command(&Command::PostcopyListen)?;
        self.save_device_state(&mut pkg, vm, raw_base)?;
        pkg.command(&Command::Ping(3))?;
        pkg.command(&Command::PostcopyRun)?;
        let blob = pkg.finish()?;
        // The last point where the source can still take the guest back.
        if let Some(r) = reader.as_mut() {
            r.check(&self.info, Some(&mut run.core))?;
        }
        if self.cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        // From here the destination may run the guest: it never resumes here again.
        undo.postcopy = true;
        run.w.packaged(&blob)?;
        run.w.get_mut().flush_now()?;
        let downtime = stop_time.elapsed();
        run.w.command(&Command::Ping(4))?;
        run.w.get_mut().flush_now()?;
        let sent = run.w.get_mut().bytes_sent();
        let downtime_bytes = sent.saturating_sub(precopy_bytes);
        run.postcopy_from = Some(sent);
        run.core.postcopy_started();
        self.rate.set_max_bandwidth(self.params.get().max_postcopy_bandwidth);
        // From now on the driver paces the stream page by page (requested pages
        // bypass the limit), as QEMU 7.2's ram_save_iterate does.
        run.w.get_mut().set_caller_paced(true);
        // `downtime` shows once completed, as QEMU 7.2 reports it.
        self.info.update(|i| i.downtime_bytes = downtime_bytes);
        run.publish();
        tracing::info!(
            pass,
            discarded_pages = discarded,
            package_bytes = blob.len(),
            downtime_ms = downtime.as_millis() as u64,
            "postcopy: the guest runs on the destination"
        );
        Ok((downtime, downtime_bytes))
    }

    /// The end of a postcopy migration: what is left in RAM's END section, EOF (no
    /// vmdesc in postcopy, as QEMU 7.2), then the destination's SHUT(0).
    fn postcopy_complete<'g, W: PageWriter<'g>>(
        &self,
        mut run: Run<'_, 'g, W>,
        ram: &mut [RamRegion<'g>],
        reader: &mut Option<RpState>,
        downtime: Duration,
        downtime_bytes: u64,
    ) -> Result<(), EngineError> {
        let _span = tracing::info_span!("postcopy complete").entered();
        run.send_pages(ram, None, reader)?;
        run.w.eof()?;
        let postcopy_from = run.postcopy_from.unwrap_or(0);
        let mut inner = run.w.finish()?;
        let transferred = inner.bytes_sent();
        inner.flush_now()?;
        let transferred = transferred.max(inner.bytes_sent());
        inner.close()?;
        if let Some(r) = reader.as_mut() {
            r.await_shut(&self.info, &self.cancel, self.fixed.shut_timeout)?;
        }
        self.info.update(|i| {
            i.downtime = Some(downtime);
            i.transferred = transferred;
            i.downtime_bytes = downtime_bytes;
            i.postcopy_bytes = transferred.saturating_sub(postcopy_from);
        });
        tracing::info!(transferred, "postcopy complete");
        Ok(())
    }
}
