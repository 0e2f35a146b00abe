//! QEMU's rate limiter: a budget of `max-bandwidth / 10` bytes per 100 ms window
//! (0 = unlimited), changeable from another thread while a migration runs, and
//! the byte counters `query-migrate` reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Length of a rate-limit window (QEMU's `BUFFER_DELAY`).
pub const WINDOW: Duration = Duration::from_millis(100);

/// Shared limit and counters; clone to hand to another thread.
#[derive(Debug, Clone, Default)]
pub struct RateLimit {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    max_bandwidth: AtomicU64,
    total: AtomicU64,
    window: AtomicU64,
}

impl RateLimit {
    /// A limiter at `max_bandwidth` bytes/s (0 = unlimited).
    pub fn new(max_bandwidth: u64) -> Self {
        let r = RateLimit::default();
        r.set_max_bandwidth(max_bandwidth);
        r
    }

    /// Change the limit (bytes/s, 0 = unlimited); takes effect within one window.
    pub fn set_max_bandwidth(&self, bytes_per_s: u64) {
        self.inner.max_bandwidth.store(bytes_per_s, Ordering::Relaxed);
    }

    /// The current limit in bytes/s (0 = unlimited).
    pub fn max_bandwidth(&self) -> u64 {
        self.inner.max_bandwidth.load(Ordering::Relaxed)
    }

    /// Bytes per window allowed now, `None` when unlimited.
    pub fn budget(&self) -> Option<u64> {
        match self.max_bandwidth() {
            0 => None,
            bw => Some((bw / 10).max(1)),
        }
    }

    /// Bytes sent since the stream was created.
    pub fn total_bytes(&self) -> u64 {
        self.inner.total.load(Ordering::Relaxed)
    }

    /// Bytes sent in the current window.
    pub fn window_bytes(&self) -> u64 {
        self.inner.window.load(Ordering::Relaxed)
    }

    pub(crate) fn account(&self, n: u64) {
        self.inner.total.fetch_add(n, Ordering::Relaxed);
        self.inner.window.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn reset_window(&self) {
        self.inner.window.store(0, Ordering::Relaxed);
    }
}

/// Paces a producer against a shared [`RateLimit`] by a byte count it gives itself
/// rather than by the bytes it writes: QEMU 7.2's multifd counts each packet as its
/// header plus its pages uncompressed, whatever went on the wire.
#[derive(Debug)]
pub struct Pacer {
    rate: RateLimit,
    window: Window,
}

impl Pacer {
    /// A pacer counting into `rate` (its limit and counters are shared).
    pub fn new(rate: RateLimit) -> Self {
        Pacer { rate, window: Window::new() }
    }

    /// Wait (on `channel`, so a cancel ends the wait) until this window's budget is
    /// not spent, then count `n` bytes as sent.
    pub fn charge(&mut self, n: u64, channel: &crate::Channel) -> std::io::Result<()> {
        while let Some(until) = self.window.blocked_until(&self.rate) {
            channel.sleep_until(until)?;
        }
        self.rate.account(n);
        Ok(())
    }
}

/// Window bookkeeping owned by one writer.
#[derive(Debug)]
pub(crate) struct Window {
    pub(crate) start: Instant,
}

impl Window {
    pub(crate) fn new() -> Self {
        Window { start: Instant::now() }
    }

    /// When the writer may send next: `None` now, or the end of the window.
    pub(crate) fn blocked_until(&mut self, rl: &RateLimit) -> Option<Instant> {
        self.blocked_with(rl, 0)
    }

    /// [`blocked_until`](Self::blocked_until) counting `queued` bytes not sent yet
    /// as sent (QEMU counts bytes when they enter the buffer).
    pub(crate) fn blocked_with(&mut self, rl: &RateLimit, queued: u64) -> Option<Instant> {
        let now = Instant::now();
        if now.duration_since(self.start) >= WINDOW {
            self.start = now;
            rl.reset_window();
            return None;
        }
        match rl.budget() {
            Some(b) if rl.window_bytes().saturating_add(queued) >= b => Some(self.start + WINDOW),
            _ => None,
        }
    }
}
