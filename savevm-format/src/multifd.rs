//! Multifd channels (QEMU 7.2 layout): the 64-byte initial packet, page packets
//! with a 1344-byte header, and payloads without compression, with one zlib
//! stream per channel, or one zstd stream per channel.

use crate::error::{Error, ErrorKind, Result};
use crate::input::{IResult, Input};
use crate::ram::RamBlock;
use std::io::Read;

/// Magic of initial and page packets.
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// Packet version.
pub const MULTIFD_VERSION: u32 = 1;
/// Bytes of page data a packet covers at most (`MULTIFD_PACKET_SIZE`).
pub const MULTIFD_PACKET_SIZE: u64 = 512 * 1024;
/// SYNC flag.
pub const MULTIFD_FLAG_SYNC: u32 = 0x1;
/// zlib payload.
pub const MULTIFD_FLAG_ZLIB: u32 = 0x2;
/// zstd payload.
pub const MULTIFD_FLAG_ZSTD: u32 = 0x4;
/// Compression bits of the flags in 7.2.
pub const MULTIFD_FLAG_COMPRESSION_MASK: u32 = 0xe;

/// Largest zstd window accepted (8 MiB); QEMU's level-1 streams use far less.
#[cfg(feature = "zstd")]
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// The packet each multifd connection starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialPacket {
    /// Source VM UUID (all zero without `-uuid`).
    pub uuid: [u8; 16],
    /// 0-based channel id.
    pub channel_id: u8,
}

impl InitialPacket {
    /// The 64 bytes on the wire.
    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[..4].copy_from_slice(&MULTIFD_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&MULTIFD_VERSION.to_be_bytes());
        b[8..24].copy_from_slice(&self.uuid);
        b[24] = self.channel_id;
        b
    }

    /// Parse the 64 bytes, checking magic and version.
    pub fn decode(b: &[u8; 64]) -> std::result::Result<Self, ErrorKind> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let version = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        if magic != MULTIFD_MAGIC {
            return Err(ErrorKind::Multifd(format!("bad initial packet magic {magic:#x}")));
        }
        if version != MULTIFD_VERSION {
            return Err(ErrorKind::Multifd(format!("initial packet version {version}")));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[8..24]);
        Ok(InitialPacket { uuid, channel_id: b[24] })
    }
}

/// Payload compression of a channel (QEMU's `multifd-compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    /// Raw pages.
    None,
    /// One zlib stream per channel.
    Zlib,
    /// One zstd stream per channel.
    Zstd,
}

impl Compression {
    /// QEMU's name (`none`, `zlib`, `zstd`).
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }

    /// The packet flag bits of this method.
    pub fn flag(self) -> u32 {
        match self {
            Compression::None => 0,
            Compression::Zlib => MULTIFD_FLAG_ZLIB,
            Compression::Zstd => MULTIFD_FLAG_ZSTD,
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "zlib" => Ok(Compression::Zlib),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(format!("multifd-compression '{s}': expected none, zlib or zstd")),
        }
    }
}

/// Length of a page packet's header for target page size `tps` (1344 at 4 KiB):
/// 64 fixed bytes, the 256-byte block name, one be64 offset slot per page a
/// packet can hold.
pub fn header_len(tps: u64) -> usize {
    64 + 256 + 8 * usize::try_from(MULTIFD_PACKET_SIZE / tps.max(1)).unwrap_or(0)
}

/// A page packet's header fields (stale fields kept as QEMU sent them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketHeader {
    /// Flags (SYNC, compression).
    pub flags: u32,
    /// Offset slots in the packet (128 with 4 KiB pages).
    pub pages_alloc: u32,
    /// Pages with data in this packet.
    pub normal_pages: u32,
    /// Payload bytes (meaningful only when `normal_pages > 0`).
    pub next_packet_size: u32,
    /// Global packet counter.
    pub packet_num: u64,
    /// RAM block name.
    pub block: String,
    /// Byte offsets of the `normal_pages` pages.
    pub offsets: Vec<u64>,
}

impl PacketHeader {
    /// True for a SYNC packet.
    pub fn is_sync(&self) -> bool {
        self.flags & MULTIFD_FLAG_SYNC != 0
    }

    /// Append the header as QEMU 7.2 writes it ([`header_len`] bytes: unused offset
    /// slots zero). Refuses a block name over 255 bytes, more offsets than a packet
    /// holds, or `normal_pages` other than the offsets given.
    pub fn encode(&self, tps: u64, out: &mut Vec<u8>) -> std::result::Result<(), crate::EncodeError> {
        let slots = MULTIFD_PACKET_SIZE / tps.max(1);
        let bad = |m: String| crate::EncodeError::BadRecord(format!("multifd packet: {m}"));
        if self.block.len() > 255 {
            return Err(bad(format!("block name of {} bytes", self.block.len())));
        }
        if self.offsets.len() as u64 > slots || u64::from(self.pages_alloc) > slots {
            return Err(bad(format!("{} pages in a packet of {slots}", self.offsets.len())));
        }
        if self.offsets.len() != self.normal_pages as usize {
            return Err(bad(format!("normal_pages {} with {} offsets", self.normal_pages, self.offsets.len())));
        }
        let start = out.len();
        out.extend_from_slice(&MULTIFD_MAGIC.to_be_bytes());
        out.extend_from_slice(&MULTIFD_VERSION.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.pages_alloc.to_be_bytes());
        out.extend_from_slice(&self.normal_pages.to_be_bytes());
        out.extend_from_slice(&self.next_packet_size.to_be_bytes());
        out.extend_from_slice(&self.packet_num.to_be_bytes());
        out.resize(start + 64, 0);
        out.extend_from_slice(self.block.as_bytes());
        out.resize(start + 64 + 256, 0);
        for o in &self.offsets {
            out.extend_from_slice(&o.to_be_bytes());
        }
        out.resize(start + header_len(tps), 0);
        Ok(())
    }
}

/// A UUID in QEMU's `-uuid` text form (8-4-4-4-12 hex digits, either case) as its
/// 16 bytes; `None` for anything else.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let groups: Vec<&str> = s.split('-').collect();
    if !groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]) {
        return None;
    }
    let digits: Vec<u8> = groups
        .concat()
        .bytes()
        .map(|b| (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok()))
        .collect::<Option<_>>()?;
    let mut u = [0u8; 16];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        u[i] = pair[0] << 4 | pair[1];
    }
    Some(u)
}

/// A UUID's 16 bytes in QEMU's text form (`qemu_uuid_unparse`: 8-4-4-4-12, lower case).
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h = crate::vmstate::hex(u);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// What a destination expects of its multifd channels (`multifd-channels`,
/// `multifd-compression`, its own VM UUID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChannelExpect {
    /// The destination's UUID (all zero without `-uuid`): the source's must equal it.
    pub uuid: [u8; 16],
    /// `multifd-channels`: ids run from 0 to this minus one.
    pub channels: u8,
    /// `multifd-compression`: every packet with pages must carry this method.
    pub compression: Compression,
}

/// Check an initial packet against the destination (QEMU 7.2's
/// `multifd_recv_initial_packet`; its id check `id > channels` is one too lax,
/// this one refuses `id == channels` as well).
pub fn check_initial(p: &InitialPacket, e: &ChannelExpect) -> std::result::Result<(), ErrorKind> {
    if p.uuid != e.uuid {
        return Err(ErrorKind::Multifd(format!(
            "received uuid '{}' and expected uuid '{}' for channel {}",
            format_uuid(&p.uuid),
            format_uuid(&e.uuid),
            p.channel_id
        )));
    }
    if p.channel_id >= e.channels {
        return Err(ErrorKind::Multifd(format!(
            "channel id {} out of range: multifd-channels is {}",
            p.channel_id, e.channels
        )));
    }
    Ok(())
}

/// The block a packet's pages belong to, every offset checked against it (page
/// aligned, the page inside `used_length`): QEMU 7.2's `multifd_recv_unfill_packet`.
/// `None` for a packet without pages (its name and offsets are stale).
pub fn check_pages<'b>(
    h: &PacketHeader,
    blocks: &'b [RamBlock],
    tps: u64,
) -> std::result::Result<Option<&'b RamBlock>, ErrorKind> {
    if h.normal_pages == 0 {
        return Ok(None);
    }
    let b = blocks.iter().find(|b| b.name == h.block).ok_or_else(|| {
        ErrorKind::Multifd(format!("packet {} names unknown RAM block '{}'", h.packet_num, h.block.escape_debug()))
    })?;
    for &off in &h.offsets {
        if tps == 0 || off % tps != 0 || off.checked_add(tps).is_none_or(|e| e > b.length) {
            return Err(ErrorKind::Multifd(format!(
                "packet {}: page offset {off:#x} outside RAM block '{}' ({:#x} bytes)",
                h.packet_num,
                b.name.escape_debug(),
                b.length
            )));
        }
    }
    Ok(Some(b))
}

/// One channel's compression stream on the sending side: QEMU keeps one zlib or
/// zstd stream per channel for the whole migration, feeds each packet's pages in
/// order and flushes (`Z_SYNC_FLUSH`, `ZSTD_e_flush`) after the last one.
pub enum PacketCompressor {
    /// One zlib stream (with zlib header).
    Zlib(Box<flate2::Compress>),
    /// One zstd frame, never ended.
    #[cfg(feature = "zstd")]
    Zstd(Box<zstd::stream::raw::Encoder<'static>>),
}

impl PacketCompressor {
    /// A stream for `c` at `level` (`multifd-zlib-level` 0..=9, `multifd-zstd-level`
    /// 0..=20); `None` for [`Compression::None`].
    pub fn new(c: Compression, level: u8) -> std::io::Result<Option<Self>> {
        Ok(match c {
            Compression::None => None,
            Compression::Zlib => Some(PacketCompressor::Zlib(Box::new(flate2::Compress::new(
                flate2::Compression::new(u32::from(level.min(9))),
                true,
            )))),
            #[cfg(feature = "zstd")]
            Compression::Zstd => {
                Some(PacketCompressor::Zstd(Box::new(zstd::stream::raw::Encoder::new(i32::from(level.min(20)))?)))
            }
            #[cfg(not(feature = "zstd"))]
            Compression::Zstd => {
                return Err(std::io::Error::other("zstd: this build has no zstd support (feature `zstd`)"))
            }
        })
    }

    /// Compress one packet's pages onto `out` (cleared first): each page fed in
    /// order, the stream flushed after the last, so the receiver's persistent
    /// stream yields exactly these pages.
    pub fn compress(&mut self, pages: &[&[u8]], out: &mut Vec<u8>) -> std::io::Result<()> {
        out.clear();
        let raw: usize = pages.iter().map(|p| p.len()).sum();
        out.reserve(raw + raw / 8 + 1024);
        match self {
            PacketCompressor::Zlib(z) => {
                let err = |e: flate2::CompressError| std::io::Error::other(format!("zlib: {e}"));
                for (i, page) in pages.iter().enumerate() {
                    let flush =
                        if i + 1 == pages.len() { flate2::FlushCompress::Sync } else { flate2::FlushCompress::None };
                    let mut done = 0;
                    loop {
                        if out.capacity() - out.len() < 64 {
                            out.reserve(out.capacity().max(4096));
                        }
                        let in0 = z.total_in();
                        z.compress_vec(&page[done..], out, flush).map_err(err)?;
                        done += consumed(z.total_in(), in0);
                        // Done when the page is in and (after a flush) the output has room left.
                        if done == page.len() && out.capacity() > out.len() {
                            break;
                        }
                    }
                }
            }
            #[cfg(feature = "zstd")]
            PacketCompressor::Zstd(z) => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                // Straight into `out`'s spare room (no bounce buffer), grown when short.
                let room = |out: &mut Vec<u8>| {
                    if out.capacity() - out.len() < 4096 {
                        out.reserve(out.capacity().max(64 << 10));
                    }
                };
                for page in pages {
                    let mut inb = InBuffer::around(page);
                    while inb.pos() < page.len() {
                        room(out);
                        let at = out.len();
                        z.run(&mut inb, &mut OutBuffer::around_pos(out, at))?;
                    }
                }
                loop {
                    room(out);
                    let at = out.len();
                    if z.flush(&mut OutBuffer::around_pos(out, at))? == 0 {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

enum Inflater {
    None,
    Zlib(Box<flate2::Decompress>),
    #[cfg(feature = "zstd")]
    Zstd(Box<zstd::stream::raw::Decoder<'static>>),
}

/// A packet's page data as [`ChannelReader::next_header`] returns it.
#[derive(Debug)]
pub enum Payload<'a> {
    /// The data, read (and inflated) already: `normal_pages * tps` bytes.
    Data(&'a [u8]),
    /// This many uncompressed bytes follow in the channel, for
    /// [`ChannelReader::take_payload`].
    Pending(usize),
}

/// Reads one multifd channel: the initial packet, then page packets with their
/// (decompressed) data.
pub struct ChannelReader<R> {
    input: Input<R>,
    tps: u64,
    initial: Option<InitialPacket>,
    inflater: Inflater,
    compression: Option<Compression>,
    expected: Option<Compression>,
    comp: Vec<u8>,
    data: Vec<u8>,
    /// With [`next_header`](Self::next_header): the uncompressed payload bytes of the
    /// last packet that the caller still has to take ([`take_payload`](Self::take_payload)).
    deferred: usize,
    /// Whether the next packet's uncompressed payload is left to the caller.
    defer: bool,
}

impl<R: Read> ChannelReader<R> {
    /// A reader for a channel with target page size `tps`.
    pub fn new(reader: R, tps: u64) -> Self {
        ChannelReader {
            input: Input::new(reader),
            tps,
            initial: None,
            inflater: Inflater::None,
            compression: None,
            expected: None,
            comp: vec![],
            data: vec![],
            deferred: 0,
            defer: false,
        }
    }

    /// Set the target page size (the main stream's `target-page-bits`), before the
    /// first page packet is read.
    pub fn set_page_size(&mut self, tps: u64) {
        self.tps = tps;
    }

    /// The initial packet, read on first use.
    pub fn initial(&mut self) -> Result<&InitialPacket> {
        if self.initial.is_none() {
            let mut b = [0u8; 64];
            self.input.read_exact(&mut b, "the multifd initial packet").map_err(|k| self.input.err(k))?;
            let p = InitialPacket::decode(&b).map_err(|k| Error::at(0, k))?;
            self.initial = Some(p);
        }
        match &self.initial {
            Some(p) => Ok(p),
            None => Err(Error::at(0, ErrorKind::Multifd("no initial packet".into()))),
        }
    }

    /// The reader underneath.
    pub fn get_ref(&self) -> &R {
        self.input.get_ref()
    }

    /// The reader underneath, e.g. to tune it; reading from it directly puts the
    /// channel out of step (use [`take_payload`](Self::take_payload)).
    pub fn get_mut(&mut self) -> &mut R {
        self.input.get_mut()
    }

    /// The compression set with [`expect_compression`](Self::expect_compression).
    pub fn compression_expected(&self) -> Option<Compression> {
        self.expected
    }

    /// Pages per packet (offset slots in the header).
    pub fn pages_per_packet(&self) -> u64 {
        MULTIFD_PACKET_SIZE / self.tps
    }

    /// Require every packet with pages to carry `c` (the destination's
    /// `multifd-compression`, as QEMU 7.2's loaders check the flags).
    pub fn expect_compression(&mut self, c: Compression) {
        self.expected = Some(c);
    }

    /// Bytes of the channel read so far.
    pub fn offset(&self) -> u64 {
        self.input.offset()
    }

    /// Compression seen so far on this channel.
    pub fn compression(&self) -> Option<Compression> {
        self.compression
    }

    /// The next packet and its page data (`normal_pages * tps` bytes), or `None` at a clean end.
    pub fn next_packet(&mut self) -> Result<Option<(PacketHeader, &[u8])>> {
        self.defer = false;
        match self.read_packet()? {
            Some(h) => {
                // `packet` sized `data` to the packet's pages when it has any.
                let n = if h.normal_pages == 0 { 0 } else { self.data.len() };
                Ok(Some((h, &self.data[..n])))
            }
            None => Ok(None),
        }
    }

    /// Like [`next_packet`](Self::next_packet), but an uncompressed payload is left
    /// unread: the header is checked and returned with the payload's length, and the
    /// caller then takes exactly that many bytes with [`take_payload`](Self::take_payload)
    /// (e.g. moving them into a file without passing through user memory). A
    /// compressed payload is inflated as usual and returned as data (length 0 pending).
    pub fn next_header(&mut self) -> Result<Option<(PacketHeader, Payload<'_>)>> {
        self.defer = true;
        let r = self.read_packet();
        self.defer = false;
        match r? {
            Some(h) if self.deferred > 0 => Ok(Some((h, Payload::Pending(self.deferred)))),
            Some(h) => {
                let n = if h.normal_pages == 0 { 0 } else { self.data.len() };
                Ok(Some((h, Payload::Data(&self.data[..n]))))
            }
            None => Ok(None),
        }
    }

    /// Hand the pending payload of the last [`next_header`](Self::next_header) to `f`:
    /// first the bytes already read ahead (possibly none), then the reader for the
    /// rest; `f` must consume exactly the rest (the pending length minus the
    /// read-ahead bytes) from the reader, else the channel is out of step. An error
    /// of `f` is reported at the payload's start; an early end of input as
    /// `UnexpectedEof` (use `io::ErrorKind::UnexpectedEof`).
    pub fn take_payload(&mut self, f: impl FnOnce(&[u8], &mut R) -> std::io::Result<()>) -> Result<()> {
        let len = std::mem::take(&mut self.deferred);
        let at = self.input.offset();
        let (ahead, inner) = self.input.take_ahead(len);
        match f(&ahead, inner) {
            Ok(()) => {
                self.input.advance(len as u64);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(Error::at(at, ErrorKind::UnexpectedEof { what: "multifd page data" }))
            }
            Err(e) => Err(Error::at(at, ErrorKind::Io(e))),
        }
    }

    fn read_packet(&mut self) -> Result<Option<PacketHeader>> {
        if self.deferred > 0 {
            let at = self.input.offset();
            return Err(Error::at(at, ErrorKind::Multifd("the last packet's payload was not taken".into())));
        }
        self.initial()?;
        let start = self.input.offset();
        match self.packet() {
            Ok(h) => Ok(h),
            Err(k @ (ErrorKind::UnexpectedEof { .. } | ErrorKind::Io(_))) => Err(self.input.err(k)),
            Err(k) => Err(Error::at(start, k)),
        }
    }

    fn packet(&mut self) -> IResult<Option<PacketHeader>> {
        const W: &str = "a multifd packet header";
        if self.input.at_end()? {
            return Ok(None);
        }
        let slots = self.pages_per_packet();
        let magic = self.input.be32(W)?;
        let version = self.input.be32(W)?;
        if magic != MULTIFD_MAGIC || version != MULTIFD_VERSION {
            return Err(ErrorKind::Multifd(format!("bad packet magic {magic:#x} / version {version}")));
        }
        let flags = self.input.be32(W)?;
        let pages_alloc = self.input.be32(W)?;
        let normal_pages = self.input.be32(W)?;
        let next_packet_size = self.input.be32(W)?;
        let packet_num = self.input.be64(W)?;
        self.input.skip(32, W)?;
        let mut name = [0u8; 256];
        self.input.read_exact(&mut name, W)?;
        let end = name.iter().position(|&c| c == 0).unwrap_or(256);
        let block = String::from_utf8_lossy(&name[..end]).into_owned();
        if u64::from(pages_alloc) > slots {
            return Err(ErrorKind::Multifd(format!("pages_alloc {pages_alloc} above {slots}")));
        }
        if normal_pages > pages_alloc {
            return Err(ErrorKind::Multifd(format!("normal_pages {normal_pages} above pages_alloc {pages_alloc}")));
        }
        let mut offsets = Vec::with_capacity(normal_pages as usize);
        for i in 0..slots {
            let o = self.input.be64(W)?;
            if i < u64::from(normal_pages) {
                offsets.push(o);
            }
        }
        let h = PacketHeader { flags, pages_alloc, normal_pages, next_packet_size, packet_num, block, offsets };
        if normal_pages == 0 {
            return Ok(Some(h)); // next_packet_size is stale here: no data follows
        }
        let out_len = usize::try_from(u64::from(normal_pages) * self.tps)
            .map_err(|_| ErrorKind::Multifd(format!("{normal_pages} pages of {} bytes", self.tps)))?;
        self.data.resize(out_len, 0);
        let comp = match flags & MULTIFD_FLAG_COMPRESSION_MASK {
            0 => Compression::None,
            MULTIFD_FLAG_ZLIB => Compression::Zlib,
            MULTIFD_FLAG_ZSTD => Compression::Zstd,
            f => return Err(ErrorKind::Multifd(format!("unknown compression flags {f:#x}"))),
        };
        if let Some(e) = self.expected.filter(|&e| e != comp) {
            return Err(ErrorKind::Multifd(format!(
                "packet flags {flags:#x}: {} payload, but multifd-compression is {}",
                comp.as_str(),
                e.as_str()
            )));
        }
        if let Some(c) = self.compression {
            if c != comp {
                return Err(ErrorKind::Multifd(format!("compression changed from {c:?} to {comp:?}")));
            }
        }
        self.compression = Some(comp);
        if comp == Compression::None {
            if next_packet_size as usize != out_len {
                return Err(ErrorKind::Multifd(format!(
                    "next_packet_size {next_packet_size} for {normal_pages} pages"
                )));
            }
            if self.defer {
                self.deferred = out_len;
                return Ok(Some(h));
            }
            self.input.read_exact(&mut self.data, "multifd page data")?;
            return Ok(Some(h));
        }
        // A compressed payload never legitimately exceeds twice the raw size.
        if next_packet_size as usize > 2 * out_len + 1024 {
            return Err(ErrorKind::Multifd(format!("compressed size {next_packet_size} too large")));
        }
        self.comp.resize(next_packet_size as usize, 0);
        self.input.read_exact(&mut self.comp, "multifd compressed data")?;
        self.inflate(comp)?;
        Ok(Some(h))
    }

    fn inflate(&mut self, comp: Compression) -> IResult<()> {
        let bad = |m: String| ErrorKind::Multifd(m);
        if matches!(self.inflater, Inflater::None) {
            self.inflater = match comp {
                Compression::Zlib => Inflater::Zlib(Box::new(flate2::Decompress::new(true))),
                #[cfg(not(feature = "zstd"))]
                Compression::Zstd => {
                    return Err(bad("zstd payload, but this build has no zstd support (feature `zstd`)".into()));
                }
                #[cfg(feature = "zstd")]
                Compression::Zstd => {
                    let mut d = zstd::stream::raw::Decoder::new().map_err(|e| bad(format!("zstd: {e}")))?;
                    // A packet holds at most 512 KiB; refuse frames that ask for a window
                    // (decoder memory) far beyond that.
                    d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
                        .map_err(|e| bad(format!("zstd: {e}")))?;
                    Inflater::Zstd(Box::new(d))
                }
                Compression::None => Inflater::None,
            };
        }
        let want = self.data.len();
        match &mut self.inflater {
            Inflater::Zlib(z) => {
                let (in0, out0) = (z.total_in(), z.total_out());
                loop {
                    let i = consumed(z.total_in(), in0);
                    let o = consumed(z.total_out(), out0);
                    if i >= self.comp.len() || o >= want {
                        break;
                    }
                    z.decompress(&self.comp[i..], &mut self.data[o..], flate2::FlushDecompress::Sync)
                        .map_err(|e| bad(format!("zlib: {e}")))?;
                    if z.total_in() - in0 == i as u64 && z.total_out() - out0 == o as u64 {
                        break;
                    }
                }
                let got = consumed(z.total_out(), out0);
                if got != want || consumed(z.total_in(), in0) != self.comp.len() {
                    return Err(bad(format!("zlib payload inflated to {got} bytes, expected {want}")));
                }
            }
            #[cfg(feature = "zstd")]
            Inflater::Zstd(z) => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                let mut inb = InBuffer::around(&self.comp);
                let mut outb = OutBuffer::around(&mut self.data[..]);
                loop {
                    let (ip, op) = (inb.pos(), outb.pos());
                    z.run(&mut inb, &mut outb).map_err(|e| bad(format!("zstd: {e}")))?;
                    if inb.pos() == ip && outb.pos() == op {
                        break;
                    }
                    if inb.pos() == self.comp.len() && outb.pos() == want {
                        break;
                    }
                }
                if outb.pos() != want || inb.pos() != self.comp.len() {
                    return Err(bad(format!("zstd payload inflated to {} bytes, expected {want}", outb.pos())));
                }
            }
            Inflater::None => return Err(bad("no decompressor".into())),
        }
        Ok(())
    }
}
/// Bytes a zlib stream moved since it stood at `start` (saturating: the callers
/// compare it with the buffer lengths, which it never exceeds).
fn consumed(total: u64, start: u64) -> usize {
    usize::try_from(total - start).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod uuid_tests {
    use super::{format_uuid, parse_uuid};

    #[test]
    fn uuid_text_round_trips_and_bad_shapes_are_refused() {
        let s = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let u = parse_uuid(s).expect("a UUID");
        assert_eq!(u[0], 0x1b);
        assert_eq!(u[15], 0x27);
        assert_eq!(format_uuid(&u), s);
        assert_eq!(parse_uuid(&s.to_uppercase()), Some(u));
        assert_eq!(format_uuid(&[0; 16]), "00000000-0000-0000-0000-000000000000");
        for bad in [
            "",
            "1b4e28ba2fa111d2883f0016d3cca427",
            "1b4e28ba-2fa1-11d2-883f-0016d3cca42g",
            "1b4e28ba-2fa1-11d2-883f0-016d3cca427",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad}");
        }
    }
}
