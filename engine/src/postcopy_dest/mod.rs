//! Postcopy, destination side (QEMU 7.2's `postcopy-ram.c` and the listen half of
//! `savevm.c`), driven by [`Incoming`](crate::incoming::Incoming) when capability
//! `postcopy-ram` is on here ([`PostcopyOptions`]):
//!
//! - POSTCOPY_ADVISE: the page sizes must match ours, userfaultfd must work.
//! - Before LISTEN the stream is pre-copy: pages go to the VMM's sink as usual, and a
//!   received-pages bitmap (one bit per target page) follows them; a
//!   POSTCOPY_RAM_DISCARD clears its bits and drops the pages in the sink (holes).
//! - LISTEN (the first command of the PACKAGED blob): the sink lands what it
//!   buffered, every block's host memory is registered with a userfaultfd in
//!   MISSING mode ([`uffd::MissingUffd`]), a *fault thread* starts, and the state
//!   goes `postcopy-active`. The package's devices load on their own thread while
//!   the rest of the main stream is read (the listen role): every page arriving is
//!   placed with `UFFDIO_COPY` (`UFFDIO_ZEROPAGE` for zero pages), exactly once
//!   (the bitmap decides, under one lock with the requests).
//! - The fault thread turns each fault on a page not yet received into a page
//!   request on the return path (REQ_PAGES_ID when the block differs from the
//!   previous request's, else REQ_PAGES; one request per page while it is
//!   outstanding) and times it until the page is placed: the request latency.
//!   A fault on a page received as zero in pre-copy (left a hole) gets a zero page.
//! - RUN: the vCPUs resume (autostart); `touch` starts a thread that reads pages
//!   not received yet at random, each read a real fault (a stand-in for a vCPU).
//! - EOF: the faults are over; the memory is unregistered.
//!
//! A failure at any point unregisters the memory (waking every blocked faulting
//! thread: the pages then read as zeros) and the migration fails; it never waits
//! for a page that cannot come. Postcopy recovery (`postcopy-paused`) is not
//! implemented: a lost source fails the destination.

pub mod uffd;

use crate::incoming::RpShared;
use crate::memory::PAGE;
use savevm_format::{PageSink, PageSlot, RamBlock, RpMessage};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uffd::{MissingUffd, Placed, UffdError};

/// Options of a postcopy destination (capability `postcopy-ram` on this side).
#[derive(Debug, Clone, Default)]
pub struct PostcopyOptions {
    /// While postcopy is active, read pages not received yet at random (each read a
    /// userfaultfd fault and so a page request): a stand-in for a vCPU.
    pub touch: bool,
    /// Seed of the touch thread's page choice.
    pub touch_seed: u64,
}

/// A [`PageSink`] whose blocks are host memory a postcopy destination can register
/// with userfaultfd.
pub trait PostcopySink: PageSink {
    /// Host address and length of block `block`'s memory, once
    /// [`PageSink::ram_blocks`] accepted the list; `None` if the sink has none.
    ///
    /// The memory must stay mapped until the load returns, and must be anonymous,
    /// shmem or a shared file on tmpfs (what userfaultfd MISSING mode accepts).
    fn host_memory(&self, block: &RamBlock) -> Option<(u64, u64)>;
}

/// What postcopy did on this destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostcopyReport {
    /// Page requests sent (REQ_PAGES and REQ_PAGES_ID).
    pub requests: u64,
    /// Faults read from the userfaultfd (a page faulted by several threads counts each time).
    pub faults: u64,
    /// Pages placed after LISTEN (UFFDIO_COPY or UFFDIO_ZEROPAGE).
    pub placed: u64,
    /// Of those, zero pages.
    pub placed_zero: u64,
    /// Pages that arrived after LISTEN already received (not placed again).
    pub duplicates: u64,
    /// Faults on pages received as zero before LISTEN (holes), resolved here.
    pub local_zero: u64,
    /// Pages found present although not received (EEXIST), written in place.
    pub rewritten: u64,
    /// Pages dropped by POSTCOPY_RAM_DISCARD.
    pub discarded_pages: u64,
    /// Reads done by the touch thread.
    pub touches: u64,
    /// Request latencies (fault seen to page placed), microseconds, sorted.
    pub latencies_us: Vec<u64>,
    /// Time from LISTEN to the end of the stream.
    pub postcopy_time: Duration,
}

impl PostcopyReport {
    /// The `q`-quantile (0..=1) of the request latencies, in microseconds.
    pub fn latency_quantile(&self, q: f64) -> Option<u64> {
        let n = self.latencies_us.len();
        if n == 0 {
            return None;
        }
        let i = ((n as f64 - 1.0) * q.clamp(0.0, 1.0)).round() as usize;
        self.latencies_us.get(i.min(n - 1)).copied()
    }

    /// `{"requests", "faults", "placed", "placed-zero", "duplicates", "local-zero",
    /// "discarded", "touches", "postcopy-time", "request-latency-us": {"count",
    /// "median", "p99", "max"}}` (times in ms, latencies in µs, `null` without requests).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests,
            "faults": self.faults,
            "placed": self.placed,
            "placed-zero": self.placed_zero,
            "duplicates": self.duplicates,
            "local-zero": self.local_zero,
            "rewritten": self.rewritten,
            "discarded": self.discarded_pages,
            "touches": self.touches,
            "postcopy-time": u64::try_from(self.postcopy_time.as_millis()).unwrap_or(u64::MAX),
            "request-latency-us": {
                "count": self.latencies_us.len(),
                "median": self.latency_quantile(0.5),
                "p99": self.latency_quantile(0.99),
                "max": self.latencies_us.last(),
            },
        })
    }
}

/// Received-pages bitmaps, one per block (bit per target page), readable without the lock.
struct Received {
    bits: Vec<Vec<AtomicU64>>,
}

impl Received {
    fn new(blocks: &[RamBlock]) -> Self {
        let bits = blocks
            .iter()
            .map(|b| (0..(b.length / PAGE as u64).div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
            .collect();
        Received { bits }
    }

    fn word(&self, b: usize, page: u64) -> Option<(&AtomicU64, u64)> {
        let w = self.bits.get(b)?.get(usize::try_from(page / 64).ok()?)?;
        Some((w, 1u64 << (page % 64)))
    }

    fn test(&self, b: usize, page: u64) -> bool {
        self.word(b, page).is_some_and(|(w, m)| w.load(Ordering::Acquire) & m != 0)
    }

    fn set(&self, b: usize, page: u64) {
        if let Some((w, m)) = self.word(b, page) {
            w.fetch_or(m, Ordering::AcqRel);
        }
    }

    /// Clears pages `first..last`; returns how many were set.
    fn clear(&self, b: usize, first: u64, last: u64) -> u64 {
        let mut n = 0;
        for p in first..last {
            if let Some((w, m)) = self.word(b, p) {
                if w.fetch_and(!m, Ordering::AcqRel) & m != 0 {
                    n += 1;
                }
            }
        }
        n
    }
}

/// The pre-copy phase of a postcopy destination: the VMM's sink, with the
/// received-pages bitmap kept beside it.
pub(crate) struct TrackingSink<'s, P: ?Sized> {
    pub(crate) inner: &'s mut P,
    received: Option<Arc<Received>>,
    pub(crate) discarded: u64,
    /// POSTCOPY_ADVISE was accepted: the blocks are emptied when they arrive.
    pub(crate) advised: bool,
}

impl<'s, P: PostcopySink + ?Sized> TrackingSink<'s, P> {
    pub(crate) fn new(inner: &'s mut P) -> Self {
        TrackingSink { inner, received: None, discarded: 0, advised: false }
    }

    /// POSTCOPY_ADVISE accepted. When the blocks are known already (ADVISE after
    /// MEM_SIZE, which QEMU's source never sends but its destination accepts), they
    /// are emptied now, as QEMU's `ram_postcopy_incoming_init` does at ADVISE: what
    /// was received before is dropped and comes again (or faults). Otherwise that
    /// happens when the blocks arrive.
    pub(crate) fn advise(&mut self, blocks: &[RamBlock]) {
        self.advised = true;
        if !blocks.is_empty() {
            self.received = Some(Arc::new(Received::new(blocks)));
            for b in blocks {
                self.inner.discard(b, 0, b.length);
            }
        }
    }

    fn mark(&self, block: &RamBlock, offset: u64) {
        if let Some(r) = &self.received {
            r.set(block.index, offset / PAGE as u64);
        }
    }
}

impl<P: PostcopySink + ?Sized> PageSink for TrackingSink<'_, P> {
    fn page_mut(&mut self, block: &RamBlock, offset: u64) -> Option<PageSlot<'_>> {
        self.mark(block, offset);
        self.inner.page_mut(block, offset)
    }

    fn ram_blocks(&mut self, blocks: &[RamBlock]) -> Result<(), String> {
        self.inner.ram_blocks(blocks)?;
        if self.advised {
            // Allocated once the sink accepted the blocks (it has memory of their size).
            self.received = Some(Arc::new(Received::new(blocks)));
            // As QEMU at ADVISE (postcopy_ram_incoming_init): all of RAM starts empty,
            // so every page not received faults (an existing file's old data is dropped).
            for b in blocks {
                self.inner.discard(b, 0, b.length);
            }
        }
        Ok(())
    }

    fn target_page_size(&mut self, tps: u64) -> Result<(), String> {
        if self.advised && tps != PAGE as u64 {
            return Err(format!("postcopy: the stream's target page size is {tps}, this destination's {PAGE}"));
        }
        self.inner.target_page_size(tps)
    }

    fn fill_page(&mut self, block: &RamBlock, offset: u64, fill: u8) {
        self.mark(block, offset);
        self.inner.fill_page(block, offset, fill);
    }

    fn discard(&mut self, block: &RamBlock, start: u64, len: u64) {
        if let Some(r) = &self.received {
            let first = start / PAGE as u64;
            let last = start.saturating_add(len).div_ceil(PAGE as u64);
            self.discarded += r.clear(block.index, first, last);
        }
        self.inner.discard(block, start, len);
    }

    fn loaded(&mut self) -> Result<(), String> {
        self.inner.loaded()
    }
}

/// Placement state shared by the listen role and the fault thread.
struct Pending {
    /// Outstanding requests: (block, page) -> when the fault was seen.
    outstanding: HashMap<(usize, u64), Instant>,
    latencies_us: Vec<u64>,
    placed: u64,
    placed_zero: u64,
    duplicates: u64,
    local_zero: u64,
    requests: u64,
    faults: u64,
    rewritten: u64,
}

impl Pending {
    /// Page `page` of block `b` was placed: the request for it, if any, is answered.
    fn answered(&mut self, b: usize, page: u64) {
        if self.outstanding.is_empty() {
            return;
        }
        if let Some(t) = self.outstanding.remove(&(b, page)) {
            let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.latencies_us.push(us);
        }
    }
}

/// Most pages a [`PageRun`] holds: 64 KiB, what the source sends between its flushes
/// in postcopy.
pub(crate) const RUN_PAGES: usize = 16;

/// The listen role's page sink: the stream's contiguous pages of one block (the
/// background stream sends them in order) are read straight into one buffer and
/// placed with one `UFFDIO_COPY` ([`PageRun::flush`]), not one ioctl per page.
/// A page someone waits for (an outstanding request) is placed as soon as it is
/// read; a page already received is refused (the decoder hands it out in its event,
/// a duplicate). Any other record flushes the run first (see the listen loop).
pub(crate) struct PageRun<'p> {
    pc: &'p Postcopy,
    buf: Vec<u8>,
    block: usize,
    /// Offset of the run's first page in its block.
    start: u64,
    pages: usize,
    /// A page of the run is waited for: place the run now.
    urgent: bool,
    /// A flush from inside the decoder failed: the listen loop reports it.
    pub(crate) error: Option<UffdError>,
}

impl<'p> PageRun<'p> {
    pub(crate) fn new(pc: &'p Postcopy) -> Self {
        PageRun { pc, buf: vec![0; RUN_PAGES * PAGE], block: 0, start: 0, pages: 0, urgent: false, error: None }
    }

    /// Whether the run should be placed now (full, or waited for).
    pub(crate) fn due(&self) -> bool {
        self.urgent || self.pages == RUN_PAGES
    }

    /// Place the pages held, if any.
    pub(crate) fn flush(&mut self) -> Result<(), UffdError> {
        let n = std::mem::take(&mut self.pages);
        self.urgent = false;
        if n == 0 {
            return Ok(());
        }
        self.pc.place_run(self.block, self.start, &self.buf[..n * PAGE])
    }
}

impl PageSink for PageRun<'_> {
    fn page_mut(&mut self, block: &RamBlock, offset: u64) -> Option<PageSlot<'_>> {
        let (b, page) = (block.index, offset / PAGE as u64);
        if self.error.is_some() || b >= self.pc.blocks.len() || self.pc.received.test(b, page) {
            return None;
        }
        let follows = self.pages > 0 && self.block == b && self.start + (self.pages * PAGE) as u64 == offset;
        if !follows || self.pages == RUN_PAGES {
            if let Err(e) = self.flush() {
                self.error = Some(e);
                return None;
            }
            (self.block, self.start) = (b, offset);
        }
        if self.pc.pending.lock().map_or(true, |p| p.outstanding.contains_key(&(b, page))) {
            self.urgent = true;
        }
        let i = self.pages;
        self.pages += 1;
        self.buf.get_mut(i * PAGE..(i + 1) * PAGE).map(PageSlot::Buffer)
    }

    /// Zero pages are the listen loop's (`UFFDIO_ZEROPAGE`, from the event).
    fn fill_page(&mut self, _block: &RamBlock, _offset: u64, _fill: u8) {}
}

struct BlockMem {
    name: String,
    addr: u64,
    len: u64,
}

/// The postcopy phase: the userfaultfd, the memory, the bitmap and the requests.
pub(crate) struct Postcopy {
    uffd: MissingUffd,
    blocks: Vec<BlockMem>,
    received: Arc<Received>,
    pending: Mutex<Pending>,
    rp: Arc<RpShared>,
    stop: AtomicBool,
    touches: AtomicU64,
    started: Instant,
    /// Zero page for fills other than UFFDIO_ZEROPAGE and filled pages.
    fill_buf: Mutex<Vec<u8>>,
    toucher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Why postcopy failed on this side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostcopyError {
    /// userfaultfd refused or failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The VMM gave no host memory for a block.
    #[error("postcopy: RAM block '{0}' has no host memory to register")]
    NoMemory(String),
    /// The fault thread could not be started.
    #[error("postcopy: cannot start the fault thread: {0}")]
    Thread(std::io::Error),
}

impl Postcopy {
    /// LISTEN: register every block's memory with a new userfaultfd.
    pub(crate) fn listen<P: PostcopySink + ?Sized>(
        sink: &TrackingSink<'_, P>,
        blocks: &[RamBlock],
        rp: Arc<RpShared>,
    ) -> Result<Arc<Postcopy>, PostcopyError> {
        let uffd = MissingUffd::new()?;
        let mut mem = Vec::with_capacity(blocks.len());
        for b in blocks {
            let (addr, len) = sink.inner.host_memory(b).ok_or_else(|| PostcopyError::NoMemory(b.name.clone()))?;
            if len < b.length {
                return Err(PostcopyError::NoMemory(b.name.clone()));
            }
            // SAFETY: the sink vouches (PostcopySink::host_memory) that this is its
            // mapping of the block, kept mapped until the load returns; this
            // userfaultfd is dropped before that, and only it fills missing pages.
            unsafe { uffd.register(addr, b.length)? };
            mem.push(BlockMem { name: b.name.clone(), addr, len: b.length });
        }
        let received = sink.received.clone().unwrap_or_else(|| Arc::new(Received::new(blocks)));
        Ok(Arc::new(Postcopy {
            uffd,
            blocks: mem,
            received,
            pending: Mutex::new(Pending {
                outstanding: HashMap::new(),
                latencies_us: Vec::new(),
                placed: 0,
                placed_zero: 0,
                duplicates: 0,
                local_zero: 0,
                requests: 0,
                faults: 0,
                rewritten: 0,
            }),
            rp,
            stop: AtomicBool::new(false),
            touches: AtomicU64::new(0),
            started: Instant::now(),
            fill_buf: Mutex::new(vec![0; PAGE]),
            toucher: Mutex::new(None),
        }))
    }

    /// Place page `offset` of block `b` (`data`, or all `fill` bytes) unless it was
    /// received already; records the latency of a request it answers.
    pub(crate) fn place(&self, b: usize, offset: u64, data: Option<&[u8]>, fill: u8) -> Result<(), UffdError> {
        let Some(m) = self.blocks.get(b) else { return Ok(()) };
        let page = offset / PAGE as u64;
        let mut p = self.pending.lock().map_err(|_| UffdError::Unsupported("state lock poisoned".into()))?;
        if self.received.test(b, page) {
            p.duplicates += 1;
            return Ok(());
        }
        let dst = m.addr + offset;
        let mut buf = self.fill_buf.lock().map_err(|_| UffdError::Unsupported("lock poisoned".into()))?;
        let src: &[u8] = match data {
            Some(d) => &d[..PAGE.min(d.len())],
            None => {
                buf.fill(fill);
                &buf
            }
        };
        let placed = if data.is_none() && fill == 0 {
            p.placed_zero += 1;
            self.uffd.zero(dst, PAGE as u64)?
        } else {
            self.uffd.copy(dst, src)?
        };
        if placed == Placed::AlreadyThere {
            // The page is present although never received (memory the sink could not
            // empty): no fault can happen on it, so it is written in place.
            // SAFETY: `dst..dst+PAGE` lies in block `b`'s memory, mapped until the load
            // returns (PostcopySink::host_memory); it is written only with a volatile copy.
            let v = unsafe { vm_memory::VolatileSlice::new(dst as *mut u8, PAGE) };
            v.copy_from(src);
            p.rewritten += 1;
        }
        drop(buf);
        self.received.set(b, page);
        p.placed += 1;
        p.answered(b, page);
        Ok(())
    }

    /// Place the `data.len() / PAGE` contiguous pages at `offset` of block `b`, none
    /// of them received yet (a [`PageRun`], whose pages only this thread places),
    /// with one `UFFDIO_COPY`; records the latency of the requests they answer.
    fn place_run(&self, b: usize, offset: u64, data: &[u8]) -> Result<(), UffdError> {
        let Some(m) = self.blocks.get(b) else { return Ok(()) };
        let mut p = self.pending.lock().map_err(|_| UffdError::Unsupported("state lock poisoned".into()))?;
        let present = self.uffd.copy_run(m.addr + offset, data)?;
        for &dst in &present {
            // As in `place`: present although never received, so written in place.
            let i = usize::try_from(dst - (m.addr + offset)).unwrap_or(usize::MAX);
            let Some(src) = data.get(i..i.saturating_add(PAGE)) else { continue };
            // SAFETY: `dst..dst+PAGE` lies in block `b`'s memory (a page of the run),
            // mapped until the load returns (PostcopySink::host_memory); it is written
            // only with a volatile copy.
            let v = unsafe { vm_memory::VolatileSlice::new(dst as *mut u8, PAGE) };
            v.copy_from(src);
            p.rewritten += 1;
        }
        let first = offset / PAGE as u64;
        let n = (data.len() / PAGE) as u64;
        for page in first..first + n {
            self.received.set(b, page);
            p.answered(b, page);
        }
        p.placed += n;
        Ok(())
    }

    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.blocks.iter().enumerate().find_map(|(i, m)| {
            (addr >= m.addr && addr < m.addr + m.len).then(|| (i, (addr - m.addr) & !(PAGE as u64 - 1)))
        })
    }

    /// One fault: a request, unless the page is in (a zero hole) or already asked for.
    /// Returns the request to send, if any.
    fn on_fault(&self, addr: u64) -> Result<Option<(usize, u64)>, UffdError> {
        let Some((b, offset)) = self.locate(addr) else { return Ok(None) };
        let page = offset / PAGE as u64;
        let mut p = self.pending.lock().map_err(|_| UffdError::Unsupported("state lock poisoned".into()))?;
        p.faults += 1;
        if self.received.test(b, page) {
            // Received before LISTEN as a zero page the sink did not write (a hole).
            if self.uffd.zero(self.blocks[b].addr + offset, PAGE as u64)? == Placed::Now {
                p.local_zero += 1;
            }
            return Ok(None);
        }
        if p.outstanding.contains_key(&(b, page)) {
            return Ok(None);
        }
        p.outstanding.insert((b, page), Instant::now());
        p.requests += 1;
        Ok(Some((b, offset)))
    }

    /// The fault thread's loop: until [`Postcopy::finish`] (or an error, which it
    /// returns). An error racing with `finish` (the memory just unregistered) is not one.
    fn fault_loop(&self, stop_fd: i32) -> Result<(), String> {
        let r = self.fault_loop_inner(stop_fd);
        if self.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        r
    }

    fn fault_loop_inner(&self, stop_fd: i32) -> Result<(), String> {
        let mut faults = Vec::with_capacity(64);
        let mut last_block: Option<usize> = None;
        while !self.stop.load(Ordering::Acquire) {
            let mut fds = [
                libc::pollfd { fd: self.uffd.raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: stop_fd, events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: two valid pollfd records for the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll on the userfaultfd: {e}"));
            }
            if fds[1].revents != 0 {
                break;
            }
            faults.clear();
            self.uffd.read_faults(&mut faults).map_err(|e| e.to_string())?;
            for &addr in &faults {
                let Some((b, start)) = self.on_fault(addr).map_err(|e| e.to_string())? else { continue };
                let len = PAGE as u32;
                let m = if last_block == Some(b) {
                    RpMessage::ReqPages { start, len }
                } else {
                    RpMessage::ReqPagesId { start, len, block: self.blocks[b].name.clone() }
                };
                last_block = Some(b);
                self.rp.send(m).map_err(|e| format!("page request on the return path: {e}"))?;
            }
        }
        Ok(())
    }

    /// The touch thread: reads a page not received yet, chosen at random, until stopped.
    fn touch_loop(&self, seed: u64) {
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        while !self.stop.load(Ordering::Acquire) {
            let b = (next() % self.blocks.len().max(1) as u64) as usize;
            let Some(m) = self.blocks.get(b) else { return };
            let pages = m.len / PAGE as u64;
            let start = next() % pages.max(1);
            // The first page not received from a random start (wrapping).
            let Some(page) = (0..pages).map(|i| (start + i) % pages).find(|&p| !self.received.test(b, p)) else {
                // This block is complete; the others may not be.
                if (0..self.blocks.len()).all(|i| self.complete(i)) {
                    return;
                }
                continue;
            };
            let addr = m.addr + page * PAGE as u64;
            // SAFETY: `addr` lies in block `b`'s registered memory, mapped until the load
            // returns (PostcopySink::host_memory), which joins this thread first. A
            // volatile one-byte read: the guest's memory is only ever read this way here.
            let _ = unsafe { std::ptr::read_volatile(addr as *const u8) };
            self.touches.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Start the touch thread (at RUN); it stops with [`Threads::stop`].
    pub(crate) fn start_touching(self: &Arc<Self>, seed: u64) -> Result<(), PostcopyError> {
        let p = self.clone();
        let t = std::thread::Builder::new()
            .name("postcopy touch".into())
            .spawn(move || p.touch_loop(seed))
            .map_err(PostcopyError::Thread)?;
        if let Ok(mut g) = self.toucher.lock() {
            *g = Some(t);
        }
        Ok(())
    }

    fn complete(&self, b: usize) -> bool {
        let pages = self.blocks.get(b).map_or(0, |m| m.len / PAGE as u64);
        (0..pages).all(|p| self.received.test(b, p))
    }

    /// Stop the threads' loops and unregister the memory (waking any blocked thread).
    pub(crate) fn finish(&self) {
        self.stop.store(true, Ordering::Release);
        self.uffd.unregister_all();
    }

    pub(crate) fn report(&self, discarded: u64) -> PostcopyReport {
        let p = self.pending.lock().ok();
        let mut latencies_us = p.as_ref().map(|p| p.latencies_us.clone()).unwrap_or_default();
        latencies_us.sort_unstable();
        PostcopyReport {
            requests: p.as_ref().map_or(0, |p| p.requests),
            faults: p.as_ref().map_or(0, |p| p.faults),
            placed: p.as_ref().map_or(0, |p| p.placed),
            placed_zero: p.as_ref().map_or(0, |p| p.placed_zero),
            duplicates: p.as_ref().map_or(0, |p| p.duplicates),
            local_zero: p.as_ref().map_or(0, |p| p.local_zero),
            rewritten: p.as_ref().map_or(0, |p| p.rewritten),
            discarded_pages: discarded,
            touches: self.touches.load(Ordering::Relaxed),
            latencies_us,
            postcopy_time: self.started.elapsed(),
        }
    }
}

/// The fault thread (and the touch thread, when started), stopped and joined on drop.
pub(crate) struct Threads {
    pc: Arc<Postcopy>,
    stop_fd: Option<std::os::fd::OwnedFd>,
    fault: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Threads {
    /// Start the fault thread.
    pub(crate) fn start(pc: &Arc<Postcopy>) -> Result<Threads, PostcopyError> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: eventfd takes an initial value and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(PostcopyError::Thread(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor we own.
        let stop_fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let raw = stop_fd.as_raw_fd();
        let p = pc.clone();
        let fault = std::thread::Builder::new()
            .name("postcopy faults".into())
            .spawn(move || p.fault_loop(raw))
            .map_err(PostcopyError::Thread)?;
        Ok(Threads { pc: pc.clone(), stop_fd: Some(stop_fd), fault: Some(fault) })
    }

    /// Whether the fault thread stopped by itself (an error), and why.
    pub(crate) fn fault_error(&mut self) -> Option<String> {
        if self.fault.as_ref().is_some_and(|t| t.is_finished()) {
            return match self.fault.take().map(|t| t.join()) {
                Some(Ok(Err(e))) => Some(e),
                Some(Err(_)) => Some("the fault thread panicked".into()),
                _ => None,
            };
        }
        None
    }

    /// Stop everything, unregister the memory, join the threads; the fault thread's error if any.
    pub(crate) fn stop(&mut self) -> Option<String> {
        use std::os::fd::AsRawFd;
        self.pc.finish();
        if let Some(fd) = &self.stop_fd {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a local to our eventfd.
            unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
        let mut err = None;
        if let Some(t) = self.fault.take() {
            err = match t.join() {
                Ok(Err(e)) => Some(e),
                Err(_) => Some("the fault thread panicked".into()),
                Ok(Ok(())) => None,
            };
        }
        let touch = self.pc.toucher.lock().ok().and_then(|mut g| g.take());
        if let Some(t) = touch {
            let _ = t.join();
        }
        self.stop_fd = None;
        err
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop();
    }
}
