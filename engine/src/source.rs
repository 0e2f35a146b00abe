//! The outgoing side: live pre-copy of guest RAM in QEMU 7.2's manner.
//!
//! Setup (RAM block list, every page marked; then each live device's START),
//! then passes of RAM PART sections, each followed by a PART of every live device
//! with pending bytes, while the guest runs; before deciding, the dirty bitmap is
//! synced when RAM's pending estimate already fits the threshold (bandwidth ×
//! `downtime-limit`); when RAM's rest and the live devices' pending bytes together
//! fit, the vCPUs stop, a final sync runs, RAM's END section carries every
//! remaining page, the live devices' END sections theirs, then the FULL device
//! sections (vmstate, then hand-written), EOF and vmdesc. Cancel or any failure
//! resumes the guest and ends `cancelled` / `failed`; live devices get their
//! cleanup call whatever the outcome.

use crate::convergence::{self, AutoConverge, BandwidthMeter, Decision};
use crate::dirty::{count_bits, DirtyBitmap};
use crate::info::{InfoHandle, MigrationInfo};
use crate::params::{MigrationCapabilities, SharedParameters};
use crate::state::{IllegalTransition, MigrationStatus as S, Notification, Role, StateMachine};
use crate::vm::{device_error, VmParts};
use savevm_format::ram::is_zero_page;
use savevm_format::{section_ids, write_guest_prologue, RamBlock, StoppedGuest, StreamWriter};
use std::collections::HashSet;
use std::io::Write;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transports::{CancelToken, Channel, MigrationWriter, RateLimit};

/// Target page size.
pub const PAGE: usize = 4096;
/// Longest a RAM PART section keeps sending (QEMU's `MAX_WAIT`).
const PART_MAX: Duration = Duration::from_millis(50);
/// Section id of the first VMM device (QEMU uses 0, 2 and 4 for timer, ram, globalstate).
const FIRST_DEVICE_ID: u32 = 5;
/// Length of a dirty-rate / auto-converge period.
const PERIOD: Duration = Duration::from_secs(1);
/// Pause after an iteration in which RAM had nothing to send and the live devices,
/// though reporting pending bytes, wrote less than a page between them (no busy loop
/// of near-empty sections while a device waits for its state to settle).
const IDLE_NAP: Duration = Duration::from_millis(5);

/// A RAM region of the guest, read by the engine while the guest runs.
#[derive(Debug)]
pub struct GuestRegion {
    name: String,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory; `GuestRegion::new`'s contract keeps it mapped,
// and the engine only reads it (concurrent guest writes are what dirty tracking is for).
unsafe impl Send for GuestRegion {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for GuestRegion {}

impl GuestRegion {
    /// Region `name` of `len` bytes (a positive multiple of 4096) at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped and readable for the region's lifetime. The
    /// guest may write it at any time; pages it writes after being sent must be
    /// marked in the region's dirty bitmap (write first, then mark).
    pub unsafe fn new(name: impl Into<String>, ptr: *mut u8, len: usize) -> Option<Self> {
        let ptr = NonNull::new(ptr)?;
        (len > 0 && len.is_multiple_of(PAGE)).then(|| GuestRegion { name: name.into(), ptr, len })
    }

    /// RAM block name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty region (never: `new` refuses them).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        (self.len / PAGE) as u64
    }

    /// Page `p` as bytes (may change under us while the guest runs).
    pub fn page(&self, p: u64) -> &[u8] {
        let off = (p as usize).min(self.len / PAGE - 1) * PAGE;
        // SAFETY: in bounds (clamped above); mapped per `new`'s contract. The bytes may
        // be written concurrently by the guest: they are only copied out (by the kernel
        // or a comparison), and a page written after its copy is marked and resent.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), PAGE) }
    }
}

/// vCPU control the VMM provides. The defaults refuse: a VMM that cannot stop its
/// guest must not migrate it live.
pub trait VcpuControl: Send {
    /// Stop every vCPU (switchover).
    fn stop(&mut self) -> Result<(), String> {
        Err("this VMM cannot stop its vCPUs".into())
    }
    /// Resume the vCPUs (after a cancel or failure).
    fn resume(&mut self) -> Result<(), String> {
        Err("this VMM cannot resume its vCPUs".into())
    }
    /// Throttle the vCPUs to run `100 - percentage` % of the time (auto-converge; 0 = off).
    fn set_throttle(&mut self, _percentage: u8) -> Result<(), String> {
        Err("this VMM cannot throttle its vCPUs".into())
    }
}

/// Why an outgoing migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// Cancelled.
    #[error("migration cancelled")]
    Cancelled,
    /// The channel failed.
    #[error("migration channel: {0}")]
    Io(#[from] std::io::Error),
    /// The transport failed (e.g. an `exec:` command).
    #[error(transparent)]
    Transport(#[from] transports::TransportError),
    /// The stream could not be encoded.
    #[error(transparent)]
    Encode(savevm_format::EncodeError),
    /// The VMM's vCPU control failed.
    #[error("vCPU control: {0}")]
    Vcpu(String),
    /// A state change was refused.
    #[error(transparent)]
    State(#[from] IllegalTransition),
    /// Bad setup (regions, bitmaps).
    #[error("{0}")]
    Setup(String),
    /// A migration blocker is registered.
    #[error("migration is blocked: {0}")]
    Blocked(String),
    /// A device or block device refused.
    #[error("{0}")]
    Device(String),
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
    fn is_cancel(&self) -> bool {
        match self {
            EngineError::Cancelled => true,
            EngineError::Io(e) => transports::is_cancelled(e),
            EngineError::Transport(t) => t.is_cancelled(),
            _ => false,
        }
    }
}

/// One outgoing migration: its state, statistics, parameters and cancel handle,
/// all shareable with other threads while [`run`](Self::run) works.
#[derive(Clone)]
pub struct Outgoing {
    /// The state machine (subscribe for notifications).
    pub state: StateMachine,
    /// `query-migrate` figures, current at any time.
    pub info: InfoHandle,
    /// Parameters, changeable while running (`max-bandwidth`, `downtime-limit`...).
    pub params: SharedParameters,
    /// Capabilities.
    pub caps: MigrationCapabilities,
    /// Cancels the migration from any thread.
    pub cancel: CancelToken,
    /// Byte counters and the rate limit of the stream.
    pub rate: RateLimit,
    /// Runstate written in `globalstate` (`running` for a live guest).
    pub runstate: String,
    /// Set by [`continue_switchover`](Self::continue_switchover).
    go_on: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

/// Iteration over the pages still to send, round robin from where the last pass stopped.
struct ToSend {
    maps: Vec<Vec<u64>>,
    cursor: (usize, usize),
    /// Set bits in `maps`, kept current by `take` and `recount`.
    pending: u64,
}

impl ToSend {
    fn pending_pages(&self) -> u64 {
        self.pending
    }

    /// Recount after bits were ORed in (a sync).
    fn recount(&mut self) {
        self.pending = self.maps.iter().map(|m| count_bits(m)).sum();
    }

    /// Take the next page to send, clearing its bit: a cyclic scan from where the
    /// previous page was found, so passes go round the RAM as QEMU's do.
    fn take(&mut self) -> Option<(usize, u64)> {
        let regions = self.maps.len();
        let words: usize = self.maps.iter().map(Vec::len).sum();
        let (mut r, mut w) = self.cursor;
        for _ in 0..=words + regions {
            if r >= regions {
                (r, w) = (0, 0);
            }
            let map = &mut self.maps[r];
            if w >= map.len() {
                (r, w) = (r + 1, 0);
                continue;
            }
            let word = map[w];
            if word != 0 {
                map[w] = word & (word - 1);
                self.pending -= 1;
                self.cursor = (r, w);
                return Some((r, w as u64 * 64 + word.trailing_zeros() as u64));
            }
            w += 1;
        }
        None
    }
}

/// A bitmap sync: OR every source's dirty pages into the pages to send (no allocation).
fn harvest(
    dirty: &[Arc<DirtyBitmap>],
    sources: &mut [(usize, &mut dyn crate::dirty::DirtySource)],
    todo: &mut ToSend,
) -> Result<(), EngineError> {
    for (d, m) in dirty.iter().zip(todo.maps.iter_mut()) {
        d.drain_into(m);
    }
    for (r, src) in sources.iter_mut() {
        if let Some(m) = todo.maps.get_mut(*r) {
            src.sync(m).map_err(|e| EngineError::Setup(format!("dirty tracking: {e}")))?;
        }
    }
    todo.recount();
    Ok(())
}

/// Let a device write a section body; the channel's own failure wins over the
/// device's message (which may only echo it). Returns the body's length.
fn save_body<W: Write>(
    w: &mut StreamWriter<W>,
    idstr: &str,
    instance: u32,
    save: impl FnOnce(&mut dyn Write) -> Result<(), String>,
) -> Result<u64, EngineError> {
    let mut body = w.body();
    let r = save(&mut body);
    if let Some(e) = body.take_error() {
        return Err(EngineError::Io(e));
    }
    r.map_err(|why| EngineError::Device(device_error(idstr, instance, &why)))?;
    Ok(body.written())
}

/// Refuse two devices with the same idstr and instance among `ids`.
fn check_unique(ids: impl Iterator<Item = (String, u32)>, what: &str) -> Result<(), EngineError> {
    let mut seen = HashSet::new();
    for (idstr, inst) in ids {
        if !seen.insert((idstr.clone(), inst)) {
            return Err(EngineError::Setup(format!("two {what} devices are '{idstr}' instance {inst}")));
        }
    }
    Ok(())
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
}

impl Outgoing {
    /// A migration in state `none` with these parameters and capabilities.
    pub fn new(params: SharedParameters, caps: MigrationCapabilities) -> std::io::Result<Self> {
        Ok(Outgoing {
            state: StateMachine::new(Role::Source),
            info: InfoHandle::default(),
            rate: RateLimit::new(params.get().max_bandwidth),
            params,
            caps,
            cancel: CancelToken::new()?,
            runstate: "running".into(),
            go_on: Default::default(),
        })
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

    /// Migrate `regions` (with their dirty bitmaps, one per region, marked by the VMM)
    /// over `ch`. On success the guest stays stopped (as QEMU's `postmigrate`); on
    /// cancel or failure it is resumed.
    pub fn run(
        &self,
        ch: Channel,
        regions: &[GuestRegion],
        dirty: &[Arc<DirtyBitmap>],
        vcpus: &mut dyn VcpuControl,
    ) -> Result<MigrationInfo, EngineError> {
        self.run_vm(ch, regions, dirty, vcpus, &mut VmParts::default())
    }

    /// [`run`](Self::run) with the VM's devices (vmstate and hand-written ones saved
    /// at switchover after `timer`; live ones sent alongside RAM, see the module
    /// documentation), block devices (inactivated at switchover, reactivated if it
    /// fails) and blockers (any fails the migration at start with its reason).
    pub fn run_vm(
        &self,
        ch: Channel,
        regions: &[GuestRegion],
        dirty: &[Arc<DirtyBitmap>],
        vcpus: &mut dyn VcpuControl,
        vm: &mut VmParts<'_>,
    ) -> Result<MigrationInfo, EngineError> {
        let start = Instant::now();
        // Our cancel must wake the channel's blocked reads, writes and rate-limit sleeps.
        self.cancel.link_to(ch.cancel_token());
        self.state.transition(S::None, S::Setup)?;
        self.info.update(|i| i.status = S::Setup);
        let mut undo = Undo::default();
        let result = match vm.blockers.first() {
            Some(b) => Err(EngineError::Blocked(b.reason.clone())),
            None => self.precopy(ch, regions, dirty, vcpus, start, vm, &mut undo),
        };
        for (_, src) in vm.dirty_sources.iter_mut() {
            let _ = src.stop();
        }
        // As QEMU's qemu_savevm_state_cleanup(): every live handler that was set up.
        for d in vm.live_devices.iter_mut().take(undo.live_setup) {
            d.save_cleanup();
        }
        // As QEMU's cpu_throttle_stop(): whatever the outcome, the vCPUs run at full speed again.
        let _ = vcpus.set_throttle(0);
        self.info.update(|i| i.cpu_throttle_percentage = None);
        if result.is_err() {
            for b in vm.blocks.iter_mut().take(undo.inactivated) {
                let _ = b.activate();
            }
        }
        match result {
            Ok(()) => {
                self.state.transition_from_current(S::Completed)?;
                self.info.update(|i| {
                    i.status = S::Completed;
                    i.total_time = start.elapsed();
                    i.remaining = 0;
                    let secs = i.total_time.saturating_sub(i.setup_time).as_secs_f64();
                    i.mbps = if secs > 0.0 { i.transferred as f64 * 8.0 / secs / 1e6 } else { 0.0 };
                });
                Ok(self.info.get())
            }
            Err(e) => {
                let cancelled = e.is_cancel() || self.cancel.is_cancelled();
                let resumed = if undo.stopped { vcpus.resume().map_err(EngineError::Vcpu) } else { Ok(()) };
                let end = if cancelled {
                    let _ = self.state.transition_from_current(S::Cancelling);
                    S::Cancelled
                } else {
                    S::Failed
                };
                let _ = self.state.transition_from_current(end);
                let e = if cancelled { EngineError::Cancelled } else { e };
                self.info.update(|i| {
                    i.status = end;
                    i.total_time = start.elapsed();
                    if end == S::Failed {
                        i.error_desc = Some(e.to_string());
                    }
                });
                resumed?;
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn precopy(
        &self,
        ch: Channel,
        regions: &[GuestRegion],
        dirty: &[Arc<DirtyBitmap>],
        vcpus: &mut dyn VcpuControl,
        start: Instant,
        vm: &mut VmParts<'_>,
        undo: &mut Undo,
    ) -> Result<(), EngineError> {
        if regions.is_empty() || regions.len() != dirty.len() {
            return Err(EngineError::Setup("one dirty bitmap per RAM region is needed".into()));
        }
        for (r, d) in regions.iter().zip(dirty) {
            if d.pages() != r.pages() {
                return Err(EngineError::Setup(format!("dirty bitmap of '{}' has the wrong size", r.name)));
            }
        }
        let full = vm.devices.iter().map(|d| (d.idstr(), d.instance_id()));
        check_unique(full.chain(vm.raw_devices.iter().map(|d| (d.idstr(), d.instance_id()))), "FULL-section")?;
        check_unique(vm.live_devices.iter().map(|d| (d.idstr(), d.instance_id())), "live")?;
        // Section ids: vmstate devices, then hand-written ones, then live ones.
        let raw_base = FIRST_DEVICE_ID + vm.devices.len() as u32;
        let live_base = raw_base + vm.raw_devices.len() as u32;
        let blocks: Vec<RamBlock> =
            regions.iter().enumerate().map(|(i, r)| RamBlock::new(i, r.name.clone(), r.len as u64)).collect();
        let total: u64 = blocks.iter().map(|b| b.length).sum();
        self.rate.set_max_bandwidth(self.params.get().max_bandwidth);
        let mut w = StreamWriter::new(MigrationWriter::new(ch, self.rate.clone()));
        let guest = StoppedGuest { runstate: self.runstate.clone(), ..Default::default() };
        write_guest_prologue(&mut w, &blocks, &guest)?;
        // Live devices' START sections follow RAM's (QEMU's qemu_savevm_state_setup).
        for (k, d) in vm.live_devices.iter_mut().enumerate() {
            let (id, idstr, inst) = (live_base + k as u32, d.idstr(), d.instance_id());
            w.section_start(id, &idstr, inst, d.version())?;
            undo.live_setup += 1;
            save_body(&mut w, &idstr, inst, |out| d.save_setup(out))?;
            w.footer(id)?;
        }
        w.get_mut().flush_now()?;
        for (r, src) in vm.dirty_sources.iter_mut() {
            if *r >= regions.len() {
                return Err(EngineError::Setup(format!("dirty source for region {r}, which does not exist")));
            }
            src.start().map_err(|e| EngineError::Setup(format!("dirty tracking: {e}")))?;
        }
        // Bulk pass: every page is to be sent; marks from now on come from the guest.
        for d in dirty {
            let mut scratch = vec![0u64; d.words()];
            d.drain_into(&mut scratch);
        }
        let mut todo = ToSend {
            maps: regions
                .iter()
                .map(|r| {
                    let b = DirtyBitmap::new(r.pages());
                    b.mark_all();
                    let mut m = vec![0u64; b.words()];
                    b.drain_into(&mut m);
                    m
                })
                .collect(),
            cursor: (0, 0),
            pending: 0,
        };
        todo.recount();
        let mut sync_count = 1u64;
        self.state.announce(Notification::Pass { pass: sync_count });
        let setup_time = start.elapsed();
        self.state.transition(S::Setup, S::Active)?;
        self.info.update(|i| {
            i.status = S::Active;
            i.setup_time = setup_time;
            i.total = total;
            i.dirty_sync_count = sync_count;
            i.expected_downtime = Some(self.params.get().downtime_limit);
        });

        let mut meter = BandwidthMeter::new(Instant::now(), self.rate.total_bytes());
        let mut threshold = 0u64;
        let mut throttle = AutoConverge::default();
        let (mut period_start, mut period_dirty, mut period_bytes) = (Instant::now(), 0u64, self.rate.total_bytes());
        let mut window_pages = (Instant::now(), 0u64);
        let mut bulk_done = false;
        loop {
            if self.cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            let params = self.params.get();
            self.rate.set_max_bandwidth(params.max_bandwidth);
            self.info.update(|i| i.total_time = start.elapsed());
            if let Some(bw) = meter.update(Instant::now(), self.rate.total_bytes()) {
                let bw = convergence::capped_bandwidth(bw, params.max_bandwidth);
                threshold = convergence::threshold(bw, params.downtime_limit);
                let pages_sent = self.info.get().normal + self.info.get().duplicate;
                let secs = window_pages.0.elapsed().as_secs_f64().max(1e-3);
                let pps = ((pages_sent - window_pages.1) as f64 / secs) as u64;
                window_pages = (Instant::now(), pages_sent);
                self.info.update(|i| {
                    i.mbps = bw * 8.0 / 1000.0;
                    i.pages_per_second = pps;
                    i.expected_downtime = convergence::expected_downtime_ms(i.remaining, bw).or(i.expected_downtime);
                });
            }
            let mut pending = todo.pending_pages() * PAGE as u64;
            // The bulk pass is over once every page of the initial set went out.
            bulk_done |= pending == 0;
            // RAM syncs on its own estimate (QEMU's ram_save_pending); the decision
            // takes every live handler's pending bytes too.
            if bulk_done && convergence::should_sync(pending, threshold) {
                let before = todo.pending_pages();
                harvest(dirty, &mut vm.dirty_sources, &mut todo)?;
                let after = todo.pending_pages();
                period_dirty += after - before;
                sync_count += 1;
                pending = after * PAGE as u64;
                self.state.announce(Notification::Pass { pass: sync_count });
                if period_start.elapsed() >= PERIOD {
                    let secs = period_start.elapsed().as_secs_f64();
                    let bytes_xfer = self.rate.total_bytes() - period_bytes;
                    let rate = (period_dirty as f64 / secs) as u64;
                    if self.caps.auto_converge {
                        if let Some(t) = throttle.on_period(period_dirty * PAGE as u64, bytes_xfer, &params) {
                            vcpus.set_throttle(t).map_err(EngineError::Vcpu)?;
                            self.state.announce(Notification::Throttle { percentage: t });
                        }
                    }
                    self.info.update(|i| {
                        i.dirty_pages_rate = rate;
                        i.cpu_throttle_percentage = (throttle.percentage > 0).then_some(throttle.percentage);
                    });
                    (period_start, period_dirty, period_bytes) = (Instant::now(), 0, self.rate.total_bytes());
                }
                self.info.update(|i| {
                    i.dirty_sync_count = sync_count;
                    i.remaining = pending;
                });
            }
            let dev_pending: Vec<u64> = vm.live_devices.iter_mut().map(|d| d.pending()).collect();
            let dev_total = dev_pending.iter().fold(0u64, |a, &b| a.saturating_add(b));
            if convergence::decide_precopy(bulk_done, pending.saturating_add(dev_total), threshold)
                == Decision::Complete
            {
                break;
            }
            // A RAM PART every iteration, unless only live devices have something to send.
            if pending > 0 || dev_total == 0 {
                self.send_pages(&mut w, regions, &mut todo, Some(PART_MAX), section_ids::RAM, false)?;
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
                w.section_part(id)?;
                dev_sent += save_body(&mut w, &d.idstr(), d.instance_id(), |out| d.save_iterate(out))?;
                w.footer(id)?;
            }
            if dev_total > 0 {
                w.get_mut().flush_now()?;
                self.info.update(|i| i.transferred = self.rate.total_bytes());
                if pending == 0 && dev_sent < PAGE as u64 {
                    std::thread::sleep(IDLE_NAP);
                }
            }
        }

        // Switchover: stop the guest, final sync, everything left without a limit.
        // Downtime starts when we ask the vCPUs to stop (QEMU's downtime_start).
        let stop_time = Instant::now();
        vcpus.stop().map_err(EngineError::Vcpu)?;
        undo.stopped = true;
        if self.caps.pause_before_switchover {
            self.state.transition(S::Active, S::PreSwitchover)?;
            self.info.update(|i| i.status = S::PreSwitchover);
            self.wait_for_continue()?;
            self.state.transition(S::PreSwitchover, S::Device)?;
            self.info.update(|i| i.status = S::Device);
        }
        self.rate.set_max_bandwidth(0);
        harvest(dirty, &mut vm.dirty_sources, &mut todo)?;
        sync_count += 1;
        self.state.announce(Notification::Pass { pass: sync_count });
        self.info.update(|i| i.dirty_sync_count = sync_count);
        self.send_pages(&mut w, regions, &mut todo, None, section_ids::RAM, true)?;
        // Live devices' END sections follow RAM's (QEMU's save_live_complete_precopy).
        for (k, d) in vm.live_devices.iter_mut().enumerate() {
            let id = live_base + k as u32;
            w.section_end(id)?;
            save_body(&mut w, &d.idstr(), d.instance_id(), |out| d.save_complete(out))?;
            w.footer(id)?;
        }
        let timer = savevm_format::builtin::timer();
        w.device(section_ids::TIMER, "timer", 0, &timer, &savevm_format::builtin::timer_state(0, 0))?;
        for (k, d) in vm.devices.iter_mut().enumerate() {
            let state = d.save().map_err(|why| EngineError::Device(device_error(&d.idstr(), d.instance_id(), &why)))?;
            let vmsd = d.vmsd();
            w.device(FIRST_DEVICE_ID + k as u32, &d.idstr(), d.instance_id(), &vmsd, &state)?;
        }
        // Hand-written devices: the body is theirs; the vmdesc records its size (QEMU's old style).
        for (k, d) in vm.raw_devices.iter_mut().enumerate() {
            let (id, idstr, inst) = (raw_base + k as u32, d.idstr(), d.instance_id());
            w.section_full(id, &idstr, inst, d.version())?;
            let size = save_body(&mut w, &idstr, inst, |out| d.save_state(out))?;
            w.footer(id)?;
            w.old_style_device(&idstr, inst, size);
        }
        // As QEMU 7.2: block devices are inactivated after the device state, before EOF.
        for b in vm.blocks.iter_mut() {
            b.inactivate().map_err(EngineError::Device)?;
            undo.inactivated += 1;
        }
        let gs = savevm_format::builtin::globalstate();
        w.device(
            section_ids::GLOBALSTATE,
            "globalstate",
            0,
            &gs,
            &savevm_format::builtin::globalstate_state(&self.runstate),
        )?;
        w.eof()?;
        w.vmdesc()?;
        let mw = w.finish()?;
        let transferred = self.rate.total_bytes();
        mw.close()?;
        self.info.update(|i| {
            i.downtime = Some(stop_time.elapsed());
            i.transferred = transferred;
        });
        Ok(())
    }

    /// One RAM PART (or the END when `last`): pages from the to-send set until it is
    /// empty or `limit` has passed (checked every 64 pages), then EOS and footer.
    fn send_pages<'g>(
        &self,
        w: &mut StreamWriter<MigrationWriter<'g>>,
        regions: &'g [GuestRegion],
        todo: &mut ToSend,
        limit: Option<Duration>,
        id: u32,
        last: bool,
    ) -> Result<(), EngineError> {
        if last {
            w.section_end(id)?;
        } else {
            w.section_part(id)?;
        }
        let t0 = Instant::now();
        let mut n = 0u64;
        while let Some((r, p)) = todo.take() {
            let page = regions[r].page(p);
            let off = p * PAGE as u64;
            if is_zero_page(page) {
                w.ram_zero(r, off)?;
            } else {
                w.ram_page_header(r, off)?;
                w.get_mut().write_borrowed(page)?;
            }
            n += 1;
            if n.is_multiple_of(64) {
                if self.cancel.is_cancelled() {
                    return Err(EngineError::Cancelled);
                }
                self.publish(w, todo);
                if limit.is_some_and(|l| t0.elapsed() >= l) {
                    break;
                }
            }
        }
        w.ram_eos()?;
        w.footer(id)?;
        w.get_mut().flush_now()?;
        self.publish(w, todo);
        Ok(())
    }

    /// Make the page counters readable by other threads.
    fn publish(&self, w: &StreamWriter<MigrationWriter<'_>>, todo: &ToSend) {
        let st = w.ram_stats();
        self.info.update(|i| {
            i.normal = st.normal;
            i.duplicate = st.duplicate;
            i.transferred = self.rate.total_bytes();
            i.remaining = todo.pending_pages() * PAGE as u64;
        });
    }
}
