//! Multifd (capability `multifd`), QEMU 7.2's layout and sync rules, both ways.
//!
//! Source ([`Sender`]): one thread per channel, each with its own connection. The
//! migration thread (the pre-copy driver) sends zero pages as ZERO records on the
//! main channel and gathers the others in batches of one block's pages (up to a
//! packet's 128); a full batch goes to the next free channel, whose thread writes
//! the packet header and the pages in place from guest memory (`writev` of the
//! volatile views, no copy) or, with `multifd-compression`, through the channel's
//! one persistent zlib/zstd stream. Before every RAM EOS (setup, each PART, the
//! END) the partial batch is sent and every channel writes a SYNC packet; the EOS
//! goes out once all have (7.2's `multifd_send_sync_main`).
//!
//! Destination ([`IncomingChannels`], [`crate::incoming::Incoming::run_multifd`]):
//! the channels are accepted in any order, each identified by its initial packet
//! (magic, version, UUID and id checked, no id twice), then one thread per channel
//! places pages straight into guest memory ([`SharedRamSink`]) while the main
//! thread reads the main stream; at each RAM EOS the main thread waits for every
//! channel's SYNC and then lets them all go on (7.2's `multifd_recv_sync_main`).

use crate::memory::{GuestRegion, PAGE};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender as ChanTx};
use savevm_format::multifd::{
    check_initial, check_pages, header_len, ChannelExpect, ChannelReader, Compression, InitialPacket, PacketCompressor,
    PacketHeader, Payload, MULTIFD_FLAG_SYNC,
};
use savevm_format::{PageSink, RamBlock};
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use transports::{CancelToken, Channel, MigrationReader, MigrationWriter, Pacer, RateLimit};

/// Pages a packet holds at 4 KiB target pages (`MULTIFD_PACKET_SIZE / TPS`).
pub const PAGES_PER_PACKET: usize = (savevm_format::multifd::MULTIFD_PACKET_SIZE / PAGE as u64) as usize;

/// Read buffer of a receiving multifd channel (see [`IncomingChannels::accept`]).
const CHANNEL_READ_BUFFER: usize = 16 << 10;

/// How a multifd channel is named in errors: its id once its initial packet was
/// read, else the order in which it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelName {
    /// Channel id (from the initial packet, or the one a source assigned).
    Id(u8),
    /// The n-th multifd connection accepted (0-based), before its id is known.
    Connection(usize),
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelName::Id(i) => write!(f, "multifd channel {i}"),
            ChannelName::Connection(n) => write!(f, "multifd connection {n} (id not yet known)"),
        }
    }
}

/// A multifd channel failed: which one, and why.
#[derive(Debug, thiserror::Error)]
pub enum MultifdError {
    /// The channel's bytes were refused (bad initial packet, uuid, id, packet,
    /// block, offset, payload): a typed format error at its byte offset in the channel.
    #[error("{channel}")]
    Stream {
        /// The channel.
        channel: ChannelName,
        /// The cause, with its offset in the channel.
        source: savevm_format::Error,
    },
    /// Two connections announced the same channel id.
    #[error("{channel}: a second connection with this id")]
    Duplicate {
        /// The channel.
        channel: ChannelName,
    },
    /// Connecting, accepting, reading or writing the channel failed.
    #[error("{channel}: {what}")]
    Io {
        /// The channel.
        channel: ChannelName,
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// The transport refused (accept or connect).
    #[error("{channel}")]
    Transport {
        /// The channel.
        channel: ChannelName,
        /// The cause.
        source: transports::TransportError,
    },
    /// The channel's thread stopped without saying why (it panicked).
    #[error("{channel}: its thread stopped")]
    Stopped {
        /// The channel.
        channel: ChannelName,
    },
}

impl MultifdError {
    /// The channel it names.
    pub fn channel(&self) -> ChannelName {
        match self {
            MultifdError::Stream { channel, .. }
            | MultifdError::Duplicate { channel }
            | MultifdError::Io { channel, .. }
            | MultifdError::Transport { channel, .. }
            | MultifdError::Stopped { channel } => *channel,
        }
    }

    /// True when it is (or comes from) a cancel.
    pub fn is_cancel(&self) -> bool {
        match self {
            MultifdError::Io { source, .. } => transports::is_cancelled(source),
            MultifdError::Transport { source, .. } => source.is_cancelled(),
            MultifdError::Stream { source, .. } => {
                matches!(&source.kind, savevm_format::ErrorKind::Io(e) if transports::is_cancelled(e))
            }
            _ => false,
        }
    }
}

/// Only `tcp:` and `unix:` carry multifd (QEMU 7.2 refuses the rest with "multifd
/// is not supported by current protocol").
pub fn check_uri(uri: &transports::MigrationUri) -> Result<(), String> {
    match uri {
        transports::MigrationUri::Tcp { .. } | transports::MigrationUri::Unix(_) => Ok(()),
        other => Err(format!("multifd is not supported by current protocol: {other} (multifd needs tcp: or unix:)")),
    }
}

// ---------------------------------------------------------------- source side

/// One packet's worth of pages of one block, for a channel thread.
struct Batch {
    region: usize,
    pages: Vec<u64>,
    packet_num: u64,
}

enum Job {
    Pages(Batch),
    Sync { packet_num: u64 },
}

enum Report {
    /// Channel `n` is free for pages.
    Free(usize),
    /// A channel wrote its SYNC.
    Synced,
    /// Channel `n` failed.
    Failed(MultifdError),
}

/// The source's multifd channels: their threads, the batch being gathered and the
/// packet counter (see the module documentation). Made by [`Sender::start`] inside
/// a thread scope that outlives the guest memory it sends from.
pub struct Sender {
    jobs: Vec<ChanTx<Job>>,
    reports: Receiver<Report>,
    batch: Option<Batch>,
    free: Vec<usize>,
    packet_num: u64,
    cancel: CancelToken,
    pages: Arc<AtomicU64>,
    error: Option<MultifdError>,
    /// Each channel's socket (a duplicate), to shut down when the migration fails.
    sockets: Vec<transports::ReturnPath>,
    /// QEMU 7.2's `multifd-bytes` of the packets handed to the channels.
    bytes: u64,
}

impl Sender {
    /// Start one thread per channel in `scope` (channel `i` gets id `i` and writes its
    /// initial packet first), each sending pages of `mem` (index = RAM block index)
    /// with `compression` at `level`; bytes are counted (and limited) by `rate` as
    /// QEMU 7.2 counts them: each packet's header plus its pages uncompressed (the
    /// initial packet not at all), whatever the compression put on the wire.
    /// With `announced` the channels' initial packets were written already ([`announce`]),
    /// else each thread writes its own with `uuid` (QEMU's `-uuid`).
    #[allow(clippy::too_many_arguments)]
    pub fn start<'scope, 'g: 'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        channels: Vec<Channel>,
        mem: Vec<&'g GuestRegion>,
        compression: Compression,
        level: u8,
        rate: &RateLimit,
        cancel: CancelToken,
        announced: bool,
        uuid: [u8; 16],
    ) -> Result<Sender, MultifdError> {
        let (rtx, reports) = unbounded();
        let mut jobs = Vec::new();
        let sockets = channels.iter().filter_map(|c| c.return_path().ok()).collect();
        let pages = Arc::new(AtomicU64::new(0));
        let mem = Arc::new(mem);
        for (i, ch) in channels.into_iter().enumerate() {
            let id = u8::try_from(i).map_err(|_| MultifdError::Stopped { channel: ChannelName::Connection(i) })?;
            let name = ChannelName::Id(id);
            let comp = PacketCompressor::new(compression, level).map_err(|source| MultifdError::Io {
                channel: name,
                what: "setting up compression",
                source,
            })?;
            let (jtx, jrx) = unbounded::<Job>();
            // The channel's own counter; the shared limit sees 7.2's count (`pacer`).
            let (w, pacer, rtx, mem, pages) = (
                MigrationWriter::new(ch, RateLimit::new(0)),
                Pacer::new(rate.clone()),
                rtx.clone(),
                mem.clone(),
                pages.clone(),
            );
            let flag = compression.flag();
            std::thread::Builder::new()
                .name(format!("qmig-multifd-send-{i}"))
                .spawn_scoped(scope, move || {
                    let mut t = SendThread {
                        id,
                        w,
                        pacer,
                        comp,
                        flag,
                        mem,
                        buf: Vec::new(),
                        raw: Vec::new(),
                        zout: Vec::new(),
                        views: Vec::new(),
                        pages,
                        announced,
                        uuid,
                    };
                    let r = t.run(&jrx, &rtx);
                    let r = r.and_then(|()| t.w.close().map_err(|e| io::Error::other(e.to_string())));
                    if let Err(source) = r {
                        let _ = rtx.send(Report::Failed(MultifdError::Io { channel: name, what: "sending", source }));
                    }
                })
                .map_err(|source| MultifdError::Io { channel: name, what: "starting its thread", source })?;
            jobs.push(jtx);
        }
        Ok(Sender {
            jobs,
            reports,
            batch: None,
            free: Vec::new(),
            packet_num: 0,
            cancel,
            pages,
            error: None,
            sockets,
            bytes: 0,
        })
    }

    /// Pages handed to channel threads and written so far.
    pub fn pages_sent(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    /// QEMU 7.2's `ram.multifd-bytes`: for each page packet handed to a channel its
    /// header plus its pages' uncompressed size, and each SYNC packet's header (as
    /// 7.2's `multifd_send_pages` and `multifd_send_sync_main` count).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes
    }

    /// Queue page `page` of region `region` (a non-zero page: zero pages go on the
    /// main channel). A full batch, or one of another region, goes to a free channel.
    pub fn queue(&mut self, region: usize, page: u64) -> Result<(), MultifdError> {
        if self.batch.as_ref().is_some_and(|b| b.region != region) {
            self.send_batch()?;
        }
        let b = self.batch.get_or_insert_with(|| Batch {
            region,
            pages: Vec::with_capacity(PAGES_PER_PACKET),
            packet_num: 0,
        });
        b.pages.push(page);
        if b.pages.len() == PAGES_PER_PACKET {
            self.send_batch()?;
        }
        Ok(())
    }

    /// Send the partial batch, then a SYNC packet on every channel, and wait until
    /// every channel has written it: call before each RAM EOS.
    pub fn sync(&mut self) -> Result<(), MultifdError> {
        self.send_batch()?;
        for tx in &self.jobs {
            let packet_num = self.packet_num;
            self.packet_num += 1;
            if tx.send(Job::Sync { packet_num }).is_err() {
                return Err(self.failure());
            }
            self.bytes += savevm_format::multifd::header_len(PAGE as u64) as u64;
        }
        let mut left = self.jobs.len();
        while left > 0 {
            match self.report()? {
                Report::Synced => left -= 1,
                Report::Free(n) => self.free.push(n),
                Report::Failed(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The migration failed: shut the channels' sockets down, so no thread stays
    /// blocked on a destination that stopped reading; then [`finish`](Self::finish).
    pub fn abort(&self) {
        for s in &self.sockets {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Stop the threads (each closes its connection); the scope joins them.
    pub fn finish(self) -> Result<(), MultifdError> {
        let Sender { jobs, reports, error, .. } = self;
        drop(jobs);
        if let Some(e) = error {
            return Err(e);
        }
        // A thread that failed while closing says so before it ends.
        for r in reports.iter() {
            if let Report::Failed(e) = r {
                return Err(e);
            }
        }
        Ok(())
    }

    fn send_batch(&mut self) -> Result<(), MultifdError> {
        let Some(mut b) = self.batch.take().filter(|b| !b.pages.is_empty()) else { return Ok(()) };
        let n = loop {
            if let Some(n) = self.free.pop() {
                break n;
            }
            match self.report()? {
                Report::Free(n) => break n,
                Report::Synced => {}
                Report::Failed(e) => return Err(e),
            }
        };
        b.packet_num = self.packet_num;
        self.packet_num += 1;
        let len = savevm_format::multifd::header_len(PAGE as u64) as u64 + b.pages.len() as u64 * PAGE as u64;
        if self.jobs[n].send(Job::Pages(b)).is_err() {
            return Err(self.failure());
        }
        self.bytes += len;
        Ok(())
    }

    /// The next report of a channel thread, waking every 50 ms for cancel.
    fn report(&mut self) -> Result<Report, MultifdError> {
        loop {
            if self.cancel.is_cancelled() {
                return Err(MultifdError::Io {
                    channel: ChannelName::Id(0),
                    what: "waiting for the channels",
                    source: io::Error::new(io::ErrorKind::ConnectionAborted, transports::Cancelled),
                });
            }
            match self.reports.recv_timeout(Duration::from_millis(50)) {
                Ok(r) => return Ok(r),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Err(self.failure()),
            }
        }
    }

    /// A thread went away: its own report if it left one.
    fn failure(&mut self) -> MultifdError {
        for r in self.reports.try_iter() {
            if let Report::Failed(e) = r {
                return e;
            }
        }
        self.error.take().unwrap_or(MultifdError::Stopped { channel: ChannelName::Id(0) })
    }
}

struct SendThread<'g> {
    id: u8,
    w: MigrationWriter<'g>,
    /// Paces the packets by 7.2's count against the migration's `max-bandwidth`.
    pacer: Pacer,
    comp: Option<PacketCompressor>,
    flag: u32,
    mem: Arc<Vec<&'g GuestRegion>>,
    buf: Vec<u8>,
    raw: Vec<u8>,
    /// A compressed packet's payload.
    zout: Vec<u8>,
    /// A packet's pages, for [`MigrationWriter::send_spliced`].
    views: Vec<vm_memory::VolatileSlice<'g>>,
    pages: Arc<AtomicU64>,
    /// The initial packet was written when the channel connected.
    announced: bool,
    /// QEMU's `-uuid`, for the initial packet.
    uuid: [u8; 16],
}

/// Write multifd channel `id`'s initial packet on `ch` now (QEMU 7.2's source does
/// so as each channel connects); then give the channels to
/// [`Outgoing::run_multifd_announced`](crate::source::Outgoing::run_multifd_announced).
/// `uuid` is the VM's (QEMU's `-uuid`, [`Outgoing::uuid`](crate::source::Outgoing::uuid)).
pub fn announce(ch: &Channel, id: u8, uuid: [u8; 16]) -> io::Result<()> {
    let p = InitialPacket { uuid, channel_id: id }.encode();
    let mut at = 0;
    while at < p.len() {
        match ch.write_vectored(&[io::IoSlice::new(&p[at..])])? {
            0 => return Err(io::Error::new(io::ErrorKind::WriteZero, "multifd initial packet")),
            n => at += n,
        }
    }
    Ok(())
}

impl SendThread<'_> {
    fn run(&mut self, jobs: &Receiver<Job>, reports: &ChanTx<Report>) -> io::Result<()> {
        if !self.announced {
            self.w.write_all(&InitialPacket { uuid: self.uuid, channel_id: self.id }.encode())?;
            self.w.flush_now()?;
        }
        let _ = reports.send(Report::Free(self.id.into()));
        for job in jobs.iter() {
            match job {
                Job::Pages(b) => {
                    self.packet(&b)?;
                    self.pages.fetch_add(b.pages.len() as u64, Ordering::Relaxed);
                    let _ = reports.send(Report::Free(self.id.into()));
                }
                Job::Sync { packet_num } => {
                    let h = PacketHeader {
                        flags: MULTIFD_FLAG_SYNC | self.flag,
                        pages_alloc: PAGES_PER_PACKET as u32,
                        normal_pages: 0,
                        next_packet_size: 0,
                        packet_num,
                        block: String::new(),
                        offsets: vec![],
                    };
                    self.header(&h)?;
                    self.w.flush_now()?;
                    let _ = reports.send(Report::Synced);
                }
            }
        }
        self.w.flush_now()
    }

    fn header(&mut self, h: &PacketHeader) -> io::Result<()> {
        // QEMU 7.2's multifd_send_pages / multifd_send_sync_main: the header plus the
        // pages uncompressed count against the rate limit.
        let counted = header_len(PAGE as u64) as u64 + u64::from(h.normal_pages) * PAGE as u64;
        self.pacer.charge(counted, self.w.channel())?;
        self.buf.clear();
        h.encode(PAGE as u64, &mut self.buf).map_err(|e| io::Error::other(e.to_string()))?;
        debug_assert_eq!(self.buf.len(), header_len(PAGE as u64));
        self.w.write_all(&self.buf)
    }

    fn packet(&mut self, b: &Batch) -> io::Result<()> {
        let mem = self.mem.clone();
        let region = mem.get(b.region).ok_or_else(|| io::Error::other("multifd: no such RAM region"))?;
        let n = b.pages.len();
        let mut h = PacketHeader {
            flags: self.flag,
            pages_alloc: PAGES_PER_PACKET as u32,
            normal_pages: n as u32,
            next_packet_size: (n * PAGE) as u32,
            packet_num: b.packet_num,
            block: region.name().to_string(),
            offsets: b.pages.iter().map(|p| p * PAGE as u64).collect(),
        };
        match self.comp.as_mut() {
            None => {
                self.header(&h)?;
                // In place: the pages are spliced into the socket by reference where
                // the kernel allows (see `send_spliced` for why dirty tracking is
                // unchanged), else queued as volatile views and sent with writev.
                self.views.clear();
                self.views.extend(b.pages.iter().map(|&p| region.page(p)));
                if !self.w.send_spliced(&self.views)? {
                    for v in self.views.drain(..) {
                        self.w.write_volatile(v)?;
                    }
                }
            }
            Some(comp) => {
                self.raw.resize(n * PAGE, 0);
                for (i, &p) in b.pages.iter().enumerate() {
                    region.page(p).copy_to(&mut self.raw[i * PAGE..(i + 1) * PAGE]);
                }
                // The packet's pages in one piece: the stream sees the same bytes as page
                // by page, in fewer calls.
                // The payload buffer is kept for the next packet (a new one each time
                // was a fresh 0.5 MiB mapping, faulted in, per packet).
                let mut out = std::mem::take(&mut self.zout);
                comp.compress(&[&self.raw[..]], &mut out)?;
                h.next_packet_size = u32::try_from(out.len()).map_err(|_| io::Error::other("packet too large"))?;
                let r = self.header(&h).and_then(|()| self.w.write_all(&out));
                self.zout = out;
                r?;
            }
        }
        self.w.flush_now()
    }
}

// ----------------------------------------------------------- destination side

/// Destination RAM that multifd receiver threads write while the main thread loads
/// the main stream.
pub trait SharedRamSink: PageSink {
    /// Once the stream's block list was accepted ([`PageSink::ram_blocks`]): every
    /// block's memory as a region (index = block index), for the receiver threads.
    /// The regions must stay mapped until the load returns (the threads are joined
    /// before it does), and pages the threads write must not be cached by the sink
    /// as known to be zero.
    fn shared_regions(&mut self) -> Result<Vec<GuestRegion>, String>;

    /// Optionally, once the block list was accepted: for each block (index = block
    /// index) a file whose bytes are the block's memory (the file a region maps,
    /// shared), which receiver threads then write with positioned writes instead of
    /// through the mapping: no fault per page, and a new tmpfs page is not cleared
    /// before it is filled. Default: none (every page goes through the regions).
    fn shared_files(&mut self) -> Vec<Option<Arc<std::fs::File>>> {
        Vec::new()
    }
}

/// The multifd channels of an incoming migration, accepted and identified by their
/// initial packets, in id order.
pub struct IncomingChannels {
    readers: Vec<ChannelReader<MigrationReader>>,
    stoppers: Vec<Option<transports::ReturnPath>>,
    expect: ChannelExpect,
    on_failure: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl IncomingChannels {
    /// Accept `expect.channels` connections with `accept` (the main channel was
    /// accepted before), in any order: each one's initial packet is read and checked
    /// (magic, version, UUID, id in range, no id twice). Bytes read count in `rate`.
    pub fn accept(
        expect: ChannelExpect,
        rate: &RateLimit,
        mut accept: impl FnMut() -> Result<Channel, transports::TransportError>,
    ) -> Result<Self, MultifdError> {
        let n = usize::from(expect.channels);
        let mut slots: Vec<Option<ChannelReader<MigrationReader>>> = (0..n).map(|_| None).collect();
        let mut stoppers: Vec<Option<transports::ReturnPath>> = (0..n).map(|_| None).collect();
        for k in 0..n {
            let conn = ChannelName::Connection(k);
            let ch = accept().map_err(|source| MultifdError::Transport { channel: conn, source })?;
            let stop = ch.return_path().ok();
            // A small buffer: a packet's 512 KiB of pages are read straight into the
            // packet buffer (only the header and what follows it in one read pass through).
            let reader = MigrationReader::with_capacity(ch, rate.clone(), CHANNEL_READ_BUFFER);
            let mut r = ChannelReader::new(reader, PAGE as u64);
            r.expect_compression(expect.compression);
            let init = r.initial().map_err(|source| MultifdError::Stream { channel: conn, source })?.clone();
            let name = ChannelName::Id(init.channel_id);
            check_initial(&init, &expect)
                .map_err(|k| MultifdError::Stream { channel: name, source: savevm_format::Error::at(0, k) })?;
            let id = usize::from(init.channel_id);
            if slots[id].is_some() {
                return Err(MultifdError::Duplicate { channel: name });
            }
            slots[id] = Some(r);
            stoppers[id] = stop;
        }
        let readers = slots.into_iter().flatten().collect();
        Ok(IncomingChannels { readers, stoppers, expect, on_failure: None })
    }

    /// Call `f` from a channel's thread when that channel fails (e.g. to shut down
    /// the main channel's reads, so the load stops at once instead of at the next EOS).
    pub fn on_failure(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_failure = Some(Arc::new(f));
        self
    }

    /// What the channels were checked against.
    pub fn expect(&self) -> &ChannelExpect {
        &self.expect
    }
}

enum Ctl {
    Memory(Arc<SharedMem>),
    Go,
}

enum Msg {
    Synced {
        pages: u64,
    },
    /// The channel ended (cleanly, at a packet boundary): an error if a SYNC was still due.
    Ended(ChannelName),
    Failed(MultifdError),
}

struct SharedMem {
    blocks: Vec<RamBlock>,
    regions: Vec<GuestRegion>,
    /// Files behind the regions (see [`SharedRamSink::shared_files`]).
    files: Vec<Option<Arc<std::fs::File>>>,
}

/// Hands the receiver threads the destination's memory once its block list arrived.
pub(crate) struct MemoryHandle(Vec<ChanTx<Ctl>>);

/// A [`SharedRamSink`] whose regions go to the receiver threads as soon as the
/// stream's block list was accepted.
pub(crate) struct SharingSink<'a, P> {
    inner: &'a mut P,
    handle: MemoryHandle,
}

impl<'a, P: SharedRamSink> SharingSink<'a, P> {
    pub(crate) fn new(inner: &'a mut P, handle: MemoryHandle) -> Self {
        SharingSink { inner, handle }
    }
}

impl<P: SharedRamSink> PageSink for SharingSink<'_, P> {
    fn page_mut(&mut self, block: &RamBlock, offset: u64) -> Option<savevm_format::PageSlot<'_>> {
        self.inner.page_mut(block, offset)
    }
    fn ram_blocks(&mut self, blocks: &[RamBlock]) -> Result<(), String> {
        self.inner.ram_blocks(blocks)?;
        let regions = self.inner.shared_regions().map_err(|e| format!("destination RAM for multifd: {e}"))?;
        let files = self.inner.shared_files();
        let m = Arc::new(SharedMem { blocks: blocks.to_vec(), regions, files });
        for c in &self.handle.0 {
            let _ = c.send(Ctl::Memory(m.clone()));
        }
        Ok(())
    }
    fn target_page_size(&mut self, tps: u64) -> Result<(), String> {
        self.inner.target_page_size(tps)
    }
    fn fill_page(&mut self, block: &RamBlock, offset: u64, fill: u8) {
        self.inner.fill_page(block, offset, fill)
    }
    fn discard(&mut self, block: &RamBlock, start: u64, len: u64) {
        self.inner.discard(block, start, len)
    }
    fn loaded(&mut self) -> Result<(), String> {
        self.inner.loaded()
    }
}

/// The main thread's side of the receiver threads during one load.
pub(crate) struct Receivers {
    ctl: Vec<ChanTx<Ctl>>,
    msgs: Receiver<Msg>,
    stopping: Arc<AtomicBool>,
    stoppers: Vec<Option<transports::ReturnPath>>,
    /// Pages the channels placed, counted at each sync.
    pub(crate) pages: u64,
}

impl Receivers {
    /// Start one receiver thread per channel in `scope`.
    pub(crate) fn start<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        channels: IncomingChannels,
    ) -> Result<Receivers, MultifdError> {
        let on_failure: Arc<dyn Fn() + Send + Sync> = channels.on_failure.unwrap_or_else(|| Arc::new(|| {}));
        let (mtx, msgs) = unbounded();
        let stopping = Arc::new(AtomicBool::new(false));
        let mut ctl = Vec::new();
        for (i, reader) in channels.readers.into_iter().enumerate() {
            let name = ChannelName::Id(i as u8);
            let (ctx, crx) = bounded::<Ctl>(4);
            let (mtx, stopping, on_failure) = (mtx.clone(), stopping.clone(), on_failure.clone());
            std::thread::Builder::new()
                .name(format!("qmig-multifd-recv-{i}"))
                .spawn_scoped(scope, move || {
                    if let Err(e) = receive(name, reader, &crx, &mtx, &stopping) {
                        if !stopping.load(Ordering::SeqCst) {
                            tracing::warn!(channel = %name, error = %crate::error::report(&e), "multifd channel failed");
                            let _ = mtx.send(Msg::Failed(e));
                            on_failure();
                        }
                    }
                })
                .map_err(|source| MultifdError::Io { channel: name, what: "starting its thread", source })?;
            ctl.push(ctx);
        }
        Ok(Receivers { ctl, msgs, stopping, stoppers: channels.stoppers, pages: 0 })
    }

    /// What hands the threads the memory to place pages in, once the block list arrived.
    pub(crate) fn memory_handle(&self) -> MemoryHandle {
        MemoryHandle(self.ctl.clone())
    }

    /// A RAM EOS on the main channel: wait for every channel's SYNC, then let them go on.
    pub(crate) fn sync(&mut self) -> Result<(), MultifdError> {
        for _ in 0..self.ctl.len() {
            match self.msgs.recv() {
                Ok(Msg::Synced { pages }) => self.pages += pages,
                Ok(Msg::Failed(e)) => return Err(e),
                Ok(Msg::Ended(channel)) => {
                    let source = io::Error::new(io::ErrorKind::UnexpectedEof, "the channel ended before its SYNC");
                    return Err(MultifdError::Io { channel, what: "reading", source });
                }
                Err(_) => return Err(MultifdError::Stopped { channel: ChannelName::Id(0) }),
            }
        }
        for c in &self.ctl {
            let _ = c.send(Ctl::Go);
        }
        Ok(())
    }

    /// A channel's failure, if one was reported (it explains a main stream that broke).
    pub(crate) fn failure(&self) -> Option<MultifdError> {
        self.msgs.try_iter().find_map(|m| match m {
            Msg::Failed(e) => Some(e),
            Msg::Synced { .. } | Msg::Ended(_) => None,
        })
    }

    /// Stop the threads: their reads see end of stream (the sockets' read sides are
    /// shut down); the scope joins them.
    pub(crate) fn stop(self) {
        self.stopping.store(true, Ordering::SeqCst);
        for s in self.stoppers.iter().flatten() {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
        drop(self.ctl);
    }
}

/// One receiver thread: packets placed into guest memory, a pause at each SYNC.
fn receive(
    name: ChannelName,
    mut reader: ChannelReader<MigrationReader>,
    ctl: &Receiver<Ctl>,
    msgs: &ChanTx<Msg>,
    stopping: &AtomicBool,
) -> Result<(), MultifdError> {
    let stream = |source| MultifdError::Stream { channel: name, source };
    let mut mem: Option<Arc<SharedMem>> = None;
    let mut pages = 0u64;
    let mut scratch = Vec::new();
    if reader.compression_expected() == Some(Compression::None) && reader.get_ref().channel().can_splice() {
        // Read headers exactly (no payload bytes behind them in the buffer), so each
        // payload is spliced whole into the RAM file.
        reader.get_mut().set_fill_limit(header_len(PAGE as u64));
    }
    loop {
        let at = reader.offset();
        // Uncompressed payloads headed for a RAM file are left in the socket and
        // moved into the file by the kernel (`place_spliced`); the rest come read.
        let next = if reader.get_ref().channel().can_splice() {
            reader.next_header()
        } else {
            reader.next_packet().map(|p| p.map(|(h, data)| (h, Payload::Data(data))))
        };
        let Some((h, payload)) = next.map_err(stream)? else {
            let _ = msgs.send(Msg::Ended(name));
            return Ok(());
        };
        tracing::trace!(channel = %name, packet = h.packet_num, flags = h.flags, pages = h.normal_pages, "multifd packet");
        if h.normal_pages > 0 {
            while mem.is_none() {
                match ctl.recv() {
                    Ok(Ctl::Memory(m)) => mem = Some(m),
                    Ok(Ctl::Go) => {}
                    Err(_) => return Ok(()),
                }
            }
            let Some(m) = mem.as_ref() else { return Ok(()) };
            let b = check_pages(&h, &m.blocks, PAGE as u64)
                .map_err(|k| stream(savevm_format::Error::at(at, k)))?
                .ok_or(MultifdError::Stopped { channel: name })?;
            let region = m.regions.get(b.index).ok_or_else(|| {
                stream(savevm_format::Error::at(
                    at,
                    savevm_format::ErrorKind::Multifd(format!("no memory for RAM block '{}'", b.name.escape_debug())),
                ))
            })?;
            let file = m.files.get(b.index).and_then(Option::as_ref);
            let write_err = |source| MultifdError::Io { channel: name, what: "writing the RAM file", source };
            match (payload, file) {
                (Payload::Pending(len), Some(file)) => {
                    let offsets = &h.offsets;
                    reader.take_payload(|ahead, r| place_spliced(file, offsets, len, ahead, r)).map_err(stream)?;
                }
                (Payload::Pending(_), None) => {
                    let offsets = &h.offsets;
                    let scratch = &mut scratch;
                    reader.take_payload(|ahead, r| place_read(region, offsets, ahead, r, scratch)).map_err(stream)?;
                }
                (Payload::Data(data), Some(file)) => write_runs(file, &h.offsets, data).map_err(write_err)?,
                (Payload::Data(data), None) => {
                    for (i, &off) in h.offsets.iter().enumerate() {
                        if let Some(src) = data.get(i * PAGE..(i + 1) * PAGE) {
                            region.page(off / PAGE as u64).copy_from(src);
                        }
                    }
                }
            }
            pages += u64::from(h.normal_pages);
        }
        if h.is_sync() {
            if msgs.send(Msg::Synced { pages: std::mem::take(&mut pages) }).is_err() {
                return Ok(());
            }
            loop {
                match ctl.recv() {
                    Ok(Ctl::Memory(m)) => mem = Some(m),
                    Ok(Ctl::Go) => break,
                    Err(_) => return Ok(()),
                }
            }
        }
        if stopping.load(Ordering::Relaxed) {
            return Ok(());
        }
    }
}

/// The runs of consecutive pages among a packet's offsets: (first offset, pages).
fn runs(offsets: &[u64]) -> impl Iterator<Item = (u64, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *offsets.get(i)?;
        let mut n = 1;
        while offsets.get(i + n).is_some_and(|&o| Some(o) == first.checked_add((n * PAGE) as u64)) {
            n += 1;
        }
        i += n;
        Some((first, n))
    })
}

/// Writes a packet's pages (`data`, one page per offset, offsets already checked
/// against the block) to `file` at their offsets, one positioned write per run of
/// consecutive offsets.
fn write_runs(file: &std::fs::File, offsets: &[u64], data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut at = 0;
    for (off, n) in runs(offsets) {
        let src = data.get(at..at + n * PAGE).ok_or_else(|| io::Error::other("multifd: short packet data"))?;
        file.write_all_at(src, off)?;
        at += n * PAGE;
    }
    Ok(())
}

/// Moves a packet's uncompressed payload (`len` bytes, one page per offset,
/// offsets checked against the block) from the channel into `file`: the bytes
/// read ahead with the header (`ahead`) by positioned writes, the rest per run of
/// consecutive pages with [`MigrationReader::copy_to_file`] (splice on a plain
/// socket: one kernel copy, where the read path copied twice).
fn place_spliced(
    file: &std::fs::File,
    offsets: &[u64],
    len: usize,
    mut ahead: &[u8],
    r: &mut MigrationReader,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    if len != offsets.len() * PAGE {
        return Err(io::Error::other(format!("multifd: payload of {len} bytes for {} pages", offsets.len())));
    }
    for (off, n) in runs(offsets) {
        let bytes = n * PAGE;
        let k = ahead.len().min(bytes);
        if k > 0 {
            file.write_all_at(&ahead[..k], off)?;
            ahead = &ahead[k..];
        }
        if bytes > k {
            r.copy_to_file(file, off + k as u64, bytes - k)?;
        }
    }
    Ok(())
}

/// Reads a packet's uncompressed payload into `scratch` (`ahead` first, then the
/// channel) and copies it page by page into guest memory (no RAM file to splice into).
fn place_read(
    region: &GuestRegion,
    offsets: &[u64],
    ahead: &[u8],
    r: &mut MigrationReader,
    scratch: &mut Vec<u8>,
) -> io::Result<()> {
    use std::io::Read;
    scratch.resize(offsets.len() * PAGE, 0);
    let k = ahead.len().min(scratch.len());
    scratch[..k].copy_from_slice(&ahead[..k]);
    r.read_exact(&mut scratch[k..])?;
    for (i, &off) in offsets.iter().enumerate() {
        region.page(off / PAGE as u64).copy_from(&scratch[i * PAGE..(i + 1) * PAGE]);
    }
    Ok(())
}
