//! The clock-free core of pre-copy: every decision of the outgoing loop, with
//! time, bytes sent and the devices' pending bytes passed in, and no I/O.
//!
//! The driver ([`Outgoing`](crate::source::Outgoing)) asks [`PrecopyCore::step`]
//! what to do next and does it:
//!
//! - [`Action::Sync`]: harvest the dirty sources into [`PrecopyCore::pages_mut`],
//!   then report with [`PrecopyCore::synced`] (which closes dirty-rate periods and
//!   takes auto-converge's steps) and step again;
//! - [`Action::Iterate`]: send a RAM PART of pages taken with
//!   [`PageSet::take`] until the deadline (when `ram`), then a PART of every live
//!   device with pending bytes, and report with [`PrecopyCore::iterated`];
//! - [`Action::Nap`]: nothing is worth sending yet (a live device waiting for its
//!   state to settle): wait until the given time;
//! - [`Action::Switchover`]: stop the guest and send the rest.
//! - [`Action::StartPostcopy`] (after [`PrecopyCore::request_postcopy`], QEMU's
//!   `migrate-start-postcopy`): stop the guest, final sync, discard what is still
//!   to send, send the device state and let the guest run on the destination; then
//!   [`Action::Iterate`] sends the rest in the background, pages the destination
//!   asked for ([`PrecopyCore::queue_request`]) first ([`PrecopyCore::take_page`]),
//!   until [`Action::CompletePostcopy`].
//!
//! The rules are QEMU 7.2's (`migration_iteration_run`, `ram_save_pending`,
//! `migration_update_counters`, `migration_trigger_throttle`), with one deliberate
//! difference: no switchover before the bulk pass has sent every page once (see
//! [`convergence::decide_precopy`]). Tests drive it on simulated time.

use crate::convergence::{self, AutoConverge, BandwidthMeter, Decision};
use crate::dirty::count_bits;
use crate::memory::PAGE;
use crate::params::MigrationParameters;
use std::time::Duration;

/// Longest a RAM PART section keeps sending (QEMU's `MAX_WAIT`).
pub const PART_MAX: Duration = Duration::from_millis(50);
/// Length of a dirty-rate / auto-converge period.
pub const PERIOD: Duration = Duration::from_secs(1);
/// Pause after an iteration in which RAM had nothing to send and the live devices,
/// though reporting pending bytes, wrote less than a page between them (no busy loop
/// of near-empty sections while a device waits for its state to settle).
pub const IDLE_NAP: Duration = Duration::from_millis(5);

/// The pages still to send, one bitmap per region, taken round robin from where
/// the last page was found so passes go round the RAM as QEMU's do.
#[derive(Debug, Clone)]
pub struct PageSet {
    maps: Vec<Vec<u64>>,
    cursor: (usize, usize),
    pending: u64,
    taken: u64,
}

impl PageSet {
    /// Every page of regions of `pages[i]` pages marked (the bulk pass).
    pub fn all(pages: &[u64]) -> Self {
        let maps = pages
            .iter()
            .map(|&n| {
                let mut m = vec![u64::MAX; n.div_ceil(64) as usize];
                if !n.is_multiple_of(64) {
                    if let Some(last) = m.last_mut() {
                        *last = (1u64 << (n % 64)) - 1;
                    }
                }
                m
            })
            .collect();
        let mut s = PageSet { maps, cursor: (0, 0), pending: 0, taken: 0 };
        s.recount();
        s
    }

    /// Pages still to send.
    pub fn pending_pages(&self) -> u64 {
        self.pending
    }

    /// Pages taken so far (for pages-per-second).
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// Region `r`'s bitmap (bit i = page i, u64 words LSB first), for a sync to OR
    /// dirty pages into; call [`recount`](Self::recount) after.
    pub fn map_mut(&mut self, r: usize) -> Option<&mut [u64]> {
        self.maps.get_mut(r).map(Vec::as_mut_slice)
    }

    /// Recount after bits were ORed in; returns the pages added.
    pub fn recount(&mut self) -> u64 {
        let before = self.pending;
        self.pending = self.maps.iter().map(|m| count_bits(m)).sum();
        self.pending.saturating_sub(before)
    }

    /// Whether page `page` of region `r` is still to send.
    pub fn contains(&self, r: usize, page: u64) -> bool {
        let (w, b) = ((page / 64) as usize, page % 64);
        self.maps.get(r).and_then(|m| m.get(w)).is_some_and(|word| word & (1 << b) != 0)
    }

    /// Take page `page` of region `r` if it is still to send, and go on scanning from
    /// there (QEMU's scan jumps to a requested page, so its neighbours follow).
    pub fn take_at(&mut self, r: usize, page: u64) -> bool {
        let (w, b) = ((page / 64) as usize, page % 64);
        let Some(word) = self.maps.get_mut(r).and_then(|m| m.get_mut(w)) else {
            return false;
        };
        if *word & (1 << b) == 0 {
            return false;
        }
        *word &= !(1 << b);
        self.pending -= 1;
        self.taken += 1;
        self.cursor = (r, w);
        true
    }

    /// The runs of pages still to send in region `r`, as `(first page, pages)`
    /// (what a postcopy switch discards on the destination).
    pub fn runs(&self, r: usize) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let Some(map) = self.maps.get(r) else {
            return out;
        };
        for (w, &word) in map.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let start = w as u64 * 64 + u64::from(word.trailing_zeros());
                // The run of ones from the lowest set bit.
                let ones = u64::from((!(word >> word.trailing_zeros())).trailing_zeros()).min(64);
                match out.last_mut() {
                    Some((s, n)) if *s + *n == start => *n += ones,
                    _ => out.push((start, ones)),
                }
                let shift = word.trailing_zeros() as u64 + ones;
                word = if shift >= 64 { 0 } else { word & !((1u64 << shift) - 1) };
            }
        }
        out
    }

    /// Take the next page to send as `(region, page)`, clearing its bit.
    pub fn take(&mut self) -> Option<(usize, u64)> {
        if self.pending == 0 {
            return None;
        }
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
                self.taken += 1;
                self.cursor = (r, w);
                return Some((r, w as u64 * 64 + u64::from(word.trailing_zeros())));
            }
            w += 1;
        }
        None
    }
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Harvest every dirty source into [`PrecopyCore::pages_mut`], then call
    /// [`PrecopyCore::synced`] and step again.
    Sync,
    /// Send while the guest runs: a RAM PART (when `ram`) of pages taken until they
    /// run out or `until` passes, then a PART of every live device with pending
    /// bytes; then call [`PrecopyCore::iterated`].
    Iterate {
        /// Send a RAM PART (false when only live devices have something to send).
        ram: bool,
        /// Deadline of the RAM PART (QEMU's `MAX_WAIT` after it starts).
        until: Duration,
    },
    /// Nothing is worth sending yet: wait until this time, then step again.
    Nap {
        /// When to step again.
        until: Duration,
    },
    /// Stop the guest and send the rest: it fits in the downtime limit.
    Switchover,
    /// Switch to postcopy now ([`PrecopyCore::request_postcopy`] was called and
    /// the live devices' must-precopy bytes fit): stop the guest, final sync
    /// ([`PrecopyCore::final_synced`]), discard [`PageSet::runs`] on the
    /// destination, send the device state, then call [`PrecopyCore::postcopy_started`].
    StartPostcopy,
    /// In postcopy, what is left fits the threshold (or nothing is): send it in
    /// RAM's END section and end the stream.
    CompletePostcopy,
}

/// The inputs of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// Time since the migration started.
    pub now: Duration,
    /// Bytes of the stream sent so far (what the rate limiter counted).
    pub bytes_sent: u64,
}

/// What a sync changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncOutcome {
    /// The pass this sync closed (QEMU's `dirty-sync-count` after it).
    pub pass: u64,
    /// Pages the sync added to the set to send.
    pub new_dirty: u64,
    /// When the sync closed a period: the dirty rate over it (pages/s).
    pub dirty_pages_rate: Option<u64>,
    /// When auto-converge changed the throttle: the new percentage.
    pub throttle: Option<u8>,
}

/// Figures of the loop for `query-migrate`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CoreStats {
    /// Bandwidth of the last closed window (bytes/ms), capped by `max-bandwidth`.
    pub bandwidth: Option<f64>,
    /// Bytes that fit in the downtime limit at that bandwidth.
    pub threshold: u64,
    /// Pages taken per second over the last bandwidth window.
    pub pages_per_second: u64,
    /// `expected-downtime` (ms): pending bytes over the bandwidth.
    pub expected_downtime: Option<u64>,
    /// Bytes still to send.
    pub remaining: u64,
    /// Dirty-bitmap syncs so far.
    pub dirty_sync_count: u64,
    /// Current auto-converge throttle, 0 when not throttling.
    pub throttle: u8,
    /// Whether every page of the bulk pass has been sent once.
    pub bulk_done: bool,
}

/// The decisions of one outgoing pre-copy (see the module documentation).
#[derive(Debug, Clone)]
pub struct PrecopyCore {
    pages: PageSet,
    meter: BandwidthMeter,
    stats: CoreStats,
    throttle: AutoConverge,
    period_start: Duration,
    period_dirty: u64,
    period_bytes: u64,
    window: (Duration, u64),
    synced_this_round: bool,
    nap_due: bool,
    forced: bool,
    postcopy: Postcopy,
    urgent: std::collections::VecDeque<Request>,
}

/// Where a migration stands with postcopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Postcopy {
    /// Pre-copy, no start asked for.
    No,
    /// `migrate-start-postcopy` was called: switch at the next step that allows it.
    Requested,
    /// The guest runs on the destination; pages go in the background, requested first.
    Active,
}

/// A page request from the destination, in pages, still to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Request {
    region: usize,
    page: u64,
    pages: u64,
}

/// What to send next in postcopy ([`PrecopyCore::next_postcopy_page`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostcopyNext {
    /// Send this page now (a requested one even when the rate limit is hit).
    Page(TakenPage),
    /// The rate limit is hit and nothing is requested: wait for the window's end or
    /// a page request, whichever comes first.
    RateLimited,
    /// Nothing is left to send.
    Done,
}

/// A page to send, taken by [`PrecopyCore::take_page`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TakenPage {
    /// Region index.
    pub region: usize,
    /// Page index in the region.
    pub page: u64,
    /// Whether a page request of the destination asked for it.
    pub requested: bool,
}

impl PrecopyCore {
    /// A migration of regions of `pages[i]` pages, all to be sent, starting at `t`
    /// (the first pass counts as sync 1, as QEMU's setup does).
    pub fn new(pages: &[u64], t: Tick) -> Self {
        let pages = PageSet::all(pages);
        let stats =
            CoreStats { remaining: pages.pending_pages() * PAGE as u64, dirty_sync_count: 1, ..Default::default() };
        PrecopyCore {
            pages,
            meter: BandwidthMeter::new(t.now, t.bytes_sent),
            stats,
            throttle: AutoConverge::default(),
            period_start: t.now,
            period_dirty: 0,
            period_bytes: t.bytes_sent,
            window: (t.now, 0),
            synced_this_round: false,
            nap_due: false,
            forced: false,
            postcopy: Postcopy::No,
            urgent: Default::default(),
        }
    }

    /// The pages to send (take them while sending; OR dirty pages in while syncing).
    pub fn pages_mut(&mut self) -> &mut PageSet {
        &mut self.pages
    }

    /// The current figures.
    pub fn stats(&self) -> CoreStats {
        let mut s = self.stats;
        s.remaining = self.pages.pending_pages() * PAGE as u64;
        s.throttle = self.throttle.percentage;
        s
    }

    /// What to do next, given the time, the bytes sent and the live devices'
    /// pending bytes (asked just before).
    pub fn step(&mut self, t: Tick, device_pending: u64, p: &MigrationParameters) -> Action {
        if self.forced && self.postcopy != Postcopy::Active {
            return Action::Switchover;
        }
        if self.postcopy != Postcopy::Active && std::mem::take(&mut self.nap_due) {
            return Action::Nap { until: t.now + IDLE_NAP };
        }
        if let Some(bw) = self.meter.update(t.now, t.bytes_sent) {
            let bw = convergence::capped_bandwidth(bw, p.max_bandwidth);
            self.stats.bandwidth = Some(bw);
            self.stats.threshold = convergence::threshold(bw, p.downtime_limit);
            let secs = t.now.saturating_sub(self.window.0).as_secs_f64().max(1e-3);
            self.stats.pages_per_second = ((self.pages.taken() - self.window.1) as f64 / secs) as u64;
            self.window = (t.now, self.pages.taken());
            self.stats.expected_downtime =
                convergence::expected_downtime_ms(self.pages.pending_pages() * PAGE as u64, bw)
                    .or(self.stats.expected_downtime);
        }
        let pending = self.pages.pending_pages() * PAGE as u64;
        // The bulk pass is over once every page of the initial set went out.
        self.stats.bulk_done |= pending == 0;
        if self.postcopy == Postcopy::Active {
            // QEMU 7.2's migration_iteration_run in postcopy: complete once the
            // rest fits the threshold; there is no sync (the guest runs elsewhere).
            if (pending == 0 || pending < self.stats.threshold) && self.urgent.is_empty() {
                return Action::CompletePostcopy;
            }
            return Action::Iterate { ram: true, until: t.now + PART_MAX };
        }
        // RAM syncs on its own estimate (QEMU's ram_save_pending); the decision takes
        // every live handler's pending bytes too.
        // With nothing left to send (e.g. the bulk pass ended before the first
        // bandwidth window closed, threshold still 0) the dirty log decides, never a
        // blind switchover.
        if self.stats.bulk_done
            && !self.synced_this_round
            && (pending == 0 || convergence::should_sync(pending, self.stats.threshold))
        {
            return Action::Sync;
        }
        self.synced_this_round = false;
        let total = pending.saturating_add(device_pending);
        if convergence::decide_precopy(self.stats.bulk_done, total, self.stats.threshold) == Decision::Complete {
            return Action::Switchover;
        }
        // QEMU 7.2: with postcopy-ram all of RAM is postcopiable, so only the live
        // devices' bytes must go before the switch, and they must fit the threshold.
        if self.postcopy == Postcopy::Requested && device_pending <= self.stats.threshold {
            return Action::StartPostcopy;
        }
        // A RAM PART every iteration, unless only live devices have something to send.
        Action::Iterate { ram: pending > 0 || device_pending == 0, until: t.now + PART_MAX }
    }

    /// A sync asked for by [`Action::Sync`] is done (the dirty pages are in
    /// [`pages_mut`](Self::pages_mut)): count the pass, close the dirty-rate period
    /// when it is at least [`PERIOD`] old and, with `auto_converge`, take QEMU's
    /// throttle step.
    pub fn synced(&mut self, t: Tick, p: &MigrationParameters, auto_converge: bool) -> SyncOutcome {
        self.synced_this_round = true;
        let new_dirty = self.pages.recount();
        self.period_dirty += new_dirty;
        self.stats.dirty_sync_count += 1;
        let mut out = SyncOutcome { pass: self.stats.dirty_sync_count, new_dirty, ..Default::default() };
        let elapsed = t.now.saturating_sub(self.period_start);
        if elapsed >= PERIOD {
            let bytes_xfer = t.bytes_sent.saturating_sub(self.period_bytes);
            out.dirty_pages_rate = Some((self.period_dirty as f64 / elapsed.as_secs_f64()) as u64);
            if auto_converge {
                out.throttle = self.throttle.on_period(self.period_dirty * PAGE as u64, bytes_xfer, p);
            }
            (self.period_start, self.period_dirty, self.period_bytes) = (t.now, 0, t.bytes_sent);
        }
        out
    }

    /// An [`Action::Iterate`] is done: `device_pending` was what the devices
    /// reported before it, `device_bytes` what their PARTs carried. A round in which
    /// RAM had nothing to send and the devices wrote less than a page naps next.
    pub fn iterated(&mut self, device_pending: u64, device_bytes: u64) {
        self.nap_due = device_pending > 0 && self.pages.pending_pages() == 0 && device_bytes < PAGE as u64;
    }

    /// Switch over at the next step whatever is pending, the bulk pass included
    /// (virsh's `--timeout-action suspend`: the rest goes with the guest stopped,
    /// however long that takes).
    pub fn force_switchover(&mut self) {
        self.forced = true;
    }

    /// `migrate-start-postcopy`: switch to postcopy at the next step (QEMU's next
    /// iteration: after the RAM PART under way, at most [`PART_MAX`] later) unless
    /// pre-copy completes first. No effect once in postcopy.
    pub fn request_postcopy(&mut self) {
        if self.postcopy == Postcopy::No {
            self.postcopy = Postcopy::Requested;
        }
    }

    /// Whether the guest runs on the destination (the switch was made).
    pub fn in_postcopy(&self) -> bool {
        self.postcopy == Postcopy::Active
    }

    /// The switch asked for by [`Action::StartPostcopy`] is done: from now on the
    /// pages left go in the background, requested ones first.
    pub fn postcopy_started(&mut self) {
        self.postcopy = Postcopy::Active;
        self.forced = false;
        self.nap_due = false;
    }

    /// A page request of the destination: `pages` pages from `page` of `region`
    /// (checked against the regions by the return-path reader). Requests are
    /// served in arrival order, all of them before any background page (QEMU's
    /// `src_page_requests` queue); pages already sent are skipped.
    pub fn queue_request(&mut self, region: usize, page: u64, pages: u64) {
        if pages > 0 {
            self.urgent.push_back(Request { region, page, pages });
        }
    }

    /// Requests not yet served, in pages.
    pub fn urgent_pages(&self) -> u64 {
        self.urgent.iter().map(|r| r.pages).sum()
    }

    /// The next page to send: the first still-unsent page of the oldest request
    /// (the background scan then goes on from it, as QEMU's does), else the next
    /// page of the background scan ([`PageSet::take`]).
    pub fn take_page(&mut self) -> Option<TakenPage> {
        self.take_requested().or_else(|| self.take_background())
    }

    /// In postcopy, the next page to send when the stream's rate limit is hit
    /// (`rate_limited`) or not: QEMU 7.2's `ram_save_iterate` goes on sending while
    /// `postcopy_has_request()` even past the limit, so a requested page never waits
    /// for the next window; background pages do.
    pub fn next_postcopy_page(&mut self, rate_limited: bool) -> PostcopyNext {
        if let Some(t) = self.take_requested() {
            return PostcopyNext::Page(t);
        }
        if rate_limited {
            return if self.pages.pending_pages() == 0 { PostcopyNext::Done } else { PostcopyNext::RateLimited };
        }
        self.take_background().map_or(PostcopyNext::Done, PostcopyNext::Page)
    }

    fn take_background(&mut self) -> Option<TakenPage> {
        self.pages.take().map(|(region, page)| TakenPage { region, page, requested: false })
    }

    /// The first still-unsent page of the oldest request, dropping requests whose
    /// pages were all sent already.
    fn take_requested(&mut self) -> Option<TakenPage> {
        while let Some(req) = self.urgent.front_mut() {
            let (region, page) = (req.region, req.page);
            req.page += 1;
            req.pages -= 1;
            if req.pages == 0 {
                self.urgent.pop_front();
            }
            if self.pages.take_at(region, page) {
                return Some(TakenPage { region, page, requested: true });
            }
        }
        None
    }

    /// The final sync at switchover (guest stopped) is done; returns its pass number.
    pub fn final_synced(&mut self) -> u64 {
        self.pages.recount();
        self.stats.dirty_sync_count += 1;
        self.stats.dirty_sync_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_set_takes_every_page_once_round_robin() {
        let mut s = PageSet::all(&[3, 130]);
        assert_eq!(s.pending_pages(), 133);
        let mut seen = vec![];
        while let Some(p) = s.take() {
            seen.push(p);
        }
        assert_eq!(seen.len(), 133);
        assert_eq!(seen[..4], [(0, 0), (0, 1), (0, 2), (1, 0)]);
        assert_eq!(seen[132], (1, 129));
        // The scan goes on from where it stopped: a mark at the cursor comes first,
        // marks behind it after the wrap.
        let m = s.map_mut(1).expect("region 1");
        m[0] |= 1 << 5;
        m[2] |= 1 << 1;
        assert_eq!(s.recount(), 2);
        assert_eq!(s.take(), Some((1, 129)));
        assert_eq!(s.take(), Some((1, 5)));
        assert_eq!(s.take(), None);
        assert_eq!(s.taken(), 135);
    }
}
