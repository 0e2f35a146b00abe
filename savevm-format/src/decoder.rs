//! The pull decoder: `next()` yields one [`Event`] at a time from any `Read`,
//! with no seeking and bounded memory (one page buffer, one XBZRLE buffer, the
//! block list, and the device state of the current section).
//!
//! Sections whose body only their owner can parse (a hand-written device's FULL
//! section, the START/PART/END sections of a live handler other than RAM) are
//! handed to the caller: after [`Decoder::register_raw`], such a section yields an
//! [`Event::RawBody`], a counting reader positioned at the body; the caller's loader
//! reads exactly its bytes, and the decoder then expects the footer right there.

use crate::builtin;
use crate::command::Command;
use crate::error::{Error, ErrorKind, Result};
use crate::input::{IResult, Input};
use crate::ram::{is_zero_page, RamBlock, RecordKind};
use crate::vmstate::{self, State, Vmsd};
use crate::wire::*;
use serde_json::Value as Json;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::sync::Arc;
use vm_memory::VolatileSlice;

/// At most this many ranges in one POSTCOPY_RAM_DISCARD (QEMU's source sends no more).
pub const MAX_DISCARDS_PER_COMMAND: usize = 12;

/// Bounds that keep hostile input from making the decoder allocate or loop without limit.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest RAM total (and so largest block) accepted from MEM_SIZE. Default 16 TiB.
    pub max_ram_bytes: u64,
    /// Most RAM blocks in one block list. Default 4096.
    pub max_ram_blocks: usize,
    /// Largest vmdesc JSON read after EOF. Default 64 MiB.
    pub max_vmdesc_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_ram_bytes: 1 << 44, max_ram_blocks: 4096, max_vmdesc_bytes: 64 << 20 }
    }
}

/// The configuration record: machine type and the optional subsections.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Configuration {
    /// Machine type name, e.g. `none`, `pc-q35-7.2`.
    pub machine: String,
    /// `configuration/target-page-bits`, absent on x86.
    pub target_page_bits: Option<u32>,
    /// `configuration/capabilities`: validated capabilities that are on.
    pub capabilities: Vec<String>,
    /// `configuration/uuid` (with `validate-uuid`).
    pub uuid: Option<[u8; 16]>,
}

/// Section record types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// QEMU_VM_SECTION_START.
    Start,
    /// QEMU_VM_SECTION_PART.
    Part,
    /// QEMU_VM_SECTION_END.
    End,
    /// QEMU_VM_SECTION_FULL.
    Full,
}

impl SectionKind {
    /// `start`, `part`, `end` or `full`.
    pub fn as_str(self) -> &'static str {
        match self {
            SectionKind::Start => "start",
            SectionKind::Part => "part",
            SectionKind::End => "end",
            SectionKind::Full => "full",
        }
    }
}

/// A section header; for PART/END the idstr, instance and version come from the START.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionHeader {
    /// Record type.
    pub kind: SectionKind,
    /// Writer-assigned section id.
    pub section_id: u32,
    /// Handler idstr (`ram`, `timer`, `0000:00:1f.0/ICH9LPC`...).
    pub idstr: String,
    /// Instance id.
    pub instance_id: u32,
    /// Handler version.
    pub version: u32,
    /// Byte offset of the section's type byte.
    pub offset: u64,
}

/// Where a device's description came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DescriptionSource {
    /// A built-in or registered [`Vmsd`].
    Builtin,
    /// Derived from the stream's vmdesc JSON.
    Vmdesc,
}

/// One step of the stream.
#[derive(Debug)]
pub enum Event<'a> {
    /// Magic and version checked.
    Header {
        /// Stream version (3).
        version: u32,
    },
    /// The configuration record.
    Configuration(Configuration),
    /// A section begins (its header was read).
    SectionStart(SectionHeader),
    /// The RAM block list of a MEM_SIZE record.
    RamBlocks(&'a [RamBlock]),
    /// A raw page. `data` is `None` when it was read straight into the [`PageSink`].
    Page {
        /// Its block.
        block: &'a RamBlock,
        /// Byte offset in the block.
        offset: u64,
        /// The page, unless placed in the sink.
        data: Option<&'a [u8]>,
    },
    /// A zero (fill) page; applied to the sink when one is given.
    ZeroPage {
        /// Its block.
        block: &'a RamBlock,
        /// Byte offset in the block.
        offset: u64,
        /// Fill byte (0 from QEMU).
        fill: u8,
    },
    /// An XBZRLE delta; applied in place to the sink's page when one is given.
    XbzrlePage {
        /// Its block.
        block: &'a RamBlock,
        /// Byte offset in the block.
        offset: u64,
        /// The encoded delta (validated).
        delta: &'a [u8],
    },
    /// A zlib-compressed page (7.2 `compress`), inflated; `None` when placed in the sink.
    CompressedPage {
        /// Its block.
        block: &'a RamBlock,
        /// Byte offset in the block.
        offset: u64,
        /// The inflated page, unless placed in the sink.
        data: Option<&'a [u8]>,
    },
    /// MULTIFD_FLUSH record (QEMU 8.0+).
    MultifdFlush,
    /// End of a RAM section body.
    RamEos,
    /// The body of a section registered with [`Decoder::register_raw`], for the
    /// caller to read (after the [`Event::SectionStart`] naming it).
    RawBody(RawBody<'a>),
    /// A device's state, decoded with a built-in description or the vmdesc.
    Device {
        /// Decoded fields and subsections.
        state: State,
        /// The description that decoded it (encodes the state back to the same bytes).
        vmsd: Arc<Vmsd>,
        /// Where that description came from.
        source: DescriptionSource,
    },
    /// Footer read and checked; the section is over.
    SectionEnd {
        /// Record type of the section that ended.
        kind: SectionKind,
        /// Its id.
        section_id: u32,
    },
    /// A command.
    Command(Command),
    /// The bytes announced by a PACKAGED command have all been decoded.
    PackageEnd,
    /// The EOF record.
    Eof,
    /// The trailing JSON device description.
    VmDescription(Json),
}

/// Where one decoded page goes.
#[derive(Debug)]
pub enum PageSlot<'a> {
    /// Private memory (a staging buffer, a `Vec`): the page is read straight into it.
    Buffer(&'a mut [u8]),
    /// Guest memory, which a guest may have mapped: written only with volatile
    /// copies (never seen as `&mut [u8]`); the page is read into the decoder's
    /// buffer, then copied in.
    Guest(VolatileSlice<'a>),
}

impl<'a> From<&'a mut [u8]> for PageSlot<'a> {
    fn from(b: &'a mut [u8]) -> Self {
        PageSlot::Buffer(b)
    }
}

impl<'a> From<VolatileSlice<'a>> for PageSlot<'a> {
    fn from(v: VolatileSlice<'a>) -> Self {
        PageSlot::Guest(v)
    }
}

impl PageSlot<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            PageSlot::Buffer(b) => b.len(),
            PageSlot::Guest(v) => v.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy `src` (at most the slot's length) into the page.
    pub fn copy_from(&mut self, src: &[u8]) {
        match self {
            PageSlot::Buffer(b) => {
                let n = b.len().min(src.len());
                b[..n].copy_from_slice(&src[..n]);
            }
            PageSlot::Guest(v) => v.copy_from(src),
        }
    }

    /// Make the page all `fill`, leaving it untouched when it already is (QEMU's
    /// check, so a still-zero page is not written).
    pub fn fill(&mut self, fill: u8) {
        match self {
            PageSlot::Buffer(b) => {
                if fill != 0 || !is_zero_page(b) {
                    b.fill(fill);
                }
            }
            PageSlot::Guest(v) => {
                // Read and written a word at a time (volatile u64 accesses), 4 KiB per
                // step, so a ZERO record costs a scan, not a byte loop.
                let word = u64::from_ne_bytes([fill; 8]);
                let mut cur = [0u64; 512];
                let chunk = std::mem::size_of_val(&cur);
                let mut at = 0;
                let mut same = true;
                while at < v.len() && same {
                    let n = (v.len() - at).min(chunk);
                    match v.subslice(at, n) {
                        Ok(part) if n % 8 == 0 => {
                            let k = part.copy_to(&mut cur[..n / 8]);
                            same = k == n / 8 && cur[..k].iter().all(|&w| w == word);
                        }
                        _ => same = false,
                    }
                    at += n;
                }
                if !same {
                    let words = [word; 512];
                    let mut at = 0;
                    while at < v.len() {
                        let n = (v.len() - at).min(chunk);
                        if let Ok(part) = v.subslice(at, n) {
                            if n % 8 == 0 {
                                part.copy_from(&words[..n / 8]);
                            } else {
                                part.copy_from(&vec![fill; n]);
                            }
                        }
                        at += n;
                    }
                }
            }
        }
    }
}

/// Where decoded pages go: memory supplied by the caller, so pages are read
/// straight into it (private buffers) or copied in once (guest memory).
pub trait PageSink {
    /// The page-sized destination for `offset` of `block` (already range-checked),
    /// or `None` to have the page handed out in the event instead.
    fn page_mut(&mut self, block: &RamBlock, offset: u64) -> Option<PageSlot<'_>>;

    /// The stream's RAM block list (MEM_SIZE), before any page: the destination checks
    /// it against its own RAM (QEMU's "Unknown ramblock" / "Size mismatch") and sets
    /// up memory. An error stops decoding.
    fn ram_blocks(&mut self, _blocks: &[RamBlock]) -> Result<(), String> {
        Ok(())
    }

    /// The stream's target page size, just before [`PageSink::ram_blocks`]: a sink
    /// that places pages at another size refuses the stream here. Default: any.
    fn target_page_size(&mut self, _tps: u64) -> Result<(), String> {
        Ok(())
    }

    /// A ZERO record: make the page all `fill`. The default writes the page only when
    /// it is not already so (QEMU's check); a sink that knows a page is still zero can
    /// skip touching it at all.
    fn fill_page(&mut self, block: &RamBlock, offset: u64, fill: u8) {
        if let Some(mut slot) = self.page_mut(block, offset) {
            slot.fill(fill);
        }
    }

    /// A postcopy discard of `len` bytes at `start` of `block` (range-checked): the
    /// destination drops those pages, so they read as zero. Default: ignore.
    fn discard(&mut self, _block: &RamBlock, _start: u64, _len: u64) {}

    /// The whole stream has been read (the decoder never calls this; a destination
    /// does, before it starts the guest or tells the source it succeeded): land
    /// anything still buffered. An error fails the migration. Default: nothing to do.
    fn loaded(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// A sink that takes nothing: every page is handed out in its event.
pub struct NoSink;

impl PageSink for NoSink {
    fn page_mut(&mut self, _: &RamBlock, _: u64) -> Option<PageSlot<'_>> {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Header,
    Config,
    TopLevel,
    RamBody,
    DeviceBody,
    RawBody,
    Footer,
    AfterEof,
    Done,
}

#[derive(Debug, Clone)]
struct SectionInfo {
    idstr: String,
    instance_id: u32,
    version: u32,
}

/// Borrow-free form of an event, turned into an [`Event`] at the end of `next`.
enum Ev {
    Header(u32),
    Config(Configuration),
    Start(SectionHeader),
    Blocks,
    Page(usize, u64, bool),
    Zero(usize, u64, u8),
    Xbzrle(usize, u64, usize),
    Compressed(usize, u64, bool),
    MultifdFlush,
    Eos,
    Raw(SectionHeader, u64),
    Device(State, Arc<Vmsd>, DescriptionSource),
    End(SectionKind, u32),
    Command(Command),
    PackageEnd,
    Eof,
    Vmdesc(Json),
}

/// Pull decoder over a QEMU migration stream.
pub struct Decoder<R> {
    input: Input<R>,
    phase: Phase,
    limits: Limits,
    tps: u64,
    config: Option<Configuration>,
    sections: HashMap<u32, SectionInfo>,
    current: Option<(SectionKind, u32)>,
    current_name: Option<String>,
    blocks: Vec<RamBlock>,
    block_index: HashMap<String, usize>,
    last_block: Option<usize>,
    postcopy_advised: bool,
    /// POSTCOPY_LISTEN seen: discards are over (QEMU's "wrong postcopy state").
    postcopy_listening: bool,
    /// The vmdesc after EOF is read past, not parsed (a destination's view).
    skip_vmdesc: bool,
    package_end: Option<u64>,
    item_start: u64,
    page_buf: Vec<u8>,
    xbz_buf: Vec<u8>,
    descriptions: HashMap<String, Arc<Vmsd>>,
    vmdesc: HashMap<(String, u32), Arc<Vmsd>>,
    /// Old-style (hand-written) devices of the vmdesc, read as one `data` buffer.
    old_style: HashMap<(String, u32), Arc<Vmsd>>,
    /// Handlers whose section bodies the caller reads.
    raw: HashSet<(String, u32)>,
    /// The section whose body the caller reads, and where that body starts.
    raw_section: Option<(SectionHeader, u64)>,
}

/// The body of a section registered with [`Decoder::register_raw`], read by the
/// caller's loader straight from the stream. It counts the bytes read (so offsets
/// stay exact) and remembers whether the stream ended or failed under the loader.
/// The loader must read exactly the body: the next [`Decoder::next`] expects the
/// section footer where it stopped ([`ErrorKind::RawBodyEnd`] otherwise).
pub struct RawBody<'a> {
    input: &'a mut dyn Read,
    header: SectionHeader,
    start: u64,
    read: u64,
    ended: bool,
    error: Option<(io::ErrorKind, String)>,
}

impl RawBody<'_> {
    /// The section: kind, id, idstr, instance and version.
    pub fn header(&self) -> &SectionHeader {
        &self.header
    }

    /// Stream offset of the next body byte.
    pub fn offset(&self) -> u64 {
        self.start + self.read
    }

    /// Body bytes read so far.
    pub fn consumed(&self) -> u64 {
        self.read
    }

    /// The stream's own failure under the loader, if any: the input ended
    /// ([`ErrorKind::UnexpectedEof`]) or the reader failed ([`ErrorKind::Io`]), at the
    /// offset where it happened, in this section. A loader's error is better
    /// reported as this when there is one.
    pub fn stream_error(&self) -> Option<Error> {
        let kind = if let Some((k, m)) = &self.error {
            ErrorKind::Io(io::Error::new(*k, m.clone()))
        } else if self.ended {
            ErrorKind::UnexpectedEof { what: "a section body" }
        } else {
            return None;
        };
        Some(Error { offset: self.offset(), section: Some(self.header.idstr.clone()), kind })
    }
}

impl Read for RawBody<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.input.read(buf) {
            Ok(0) if !buf.is_empty() => {
                self.ended = true;
                Ok(0)
            }
            Ok(n) => {
                self.read += n as u64;
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted && self.error.is_none() {
                    self.error = Some((e.kind(), e.to_string()));
                }
                Err(e)
            }
        }
    }
}

impl std::fmt::Debug for RawBody<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawBody")
            .field("header", &self.header)
            .field("start", &self.start)
            .field("read", &self.read)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Decoder<R> {
    /// A decoder over `reader` with default [`Limits`] and the built-in descriptions
    /// (`timer`, `globalstate`). Wrap unbuffered readers in a `BufReader`.
    pub fn new(reader: R) -> Self {
        let mut d = Decoder {
            input: Input::new(reader),
            phase: Phase::Header,
            limits: Limits::default(),
            tps: 4096,
            config: None,
            sections: HashMap::new(),
            current: None,
            current_name: None,
            blocks: Vec::new(),
            block_index: HashMap::new(),
            last_block: None,
            postcopy_advised: false,
            postcopy_listening: false,
            skip_vmdesc: false,
            package_end: None,
            item_start: 0,
            page_buf: vec![0; 4096],
            xbz_buf: Vec::new(),
            descriptions: HashMap::new(),
            vmdesc: HashMap::new(),
            old_style: HashMap::new(),
            raw: HashSet::new(),
            raw_section: None,
        };
        for v in builtin::all() {
            d.register(v);
        }
        d
    }

    /// Replace the limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Register a description for devices whose idstr (or its last `/` component) is `vmsd.name`.
    pub fn register(&mut self, vmsd: Vmsd) {
        self.descriptions.insert(vmsd.name.clone(), Arc::new(vmsd));
    }

    /// Have the caller read the bodies of handler `idstr` instance `instance_id`: its
    /// FULL section (a hand-written device, QEMU's `save_state`/`load_state`) and its
    /// START/PART/END sections (a live handler other than RAM) each yield
    /// [`Event::RawBody`] instead of being decoded (or refused).
    pub fn register_raw(&mut self, idstr: &str, instance_id: u32) {
        self.raw.insert((idstr.to_string(), instance_id));
    }

    /// Read past the vmdesc after EOF (within `max_vmdesc_bytes`, in a fixed buffer)
    /// instead of parsing it: QEMU's destination never interprets it, so neither a
    /// malformed nor a huge one may fail or bloat a load. No vmdesc event follows.
    pub fn skip_vmdesc(&mut self) {
        self.skip_vmdesc = true;
    }

    /// Supply the stream's vmdesc in advance (e.g. read from the end of a file), so
    /// devices without a registered description are decoded from it.
    pub fn set_vmdesc(&mut self, vmdesc: &Json) -> Result<()> {
        let bad = |m: String| Error::at(0, ErrorKind::BadVmdesc(m));
        let devs = vmdesc.get("devices").and_then(Json::as_array).ok_or_else(|| bad("no devices array".into()))?;
        for d in devs {
            let name = d.get("name").and_then(Json::as_str).ok_or_else(|| bad("device without name".into()))?;
            let inst = u32::try_from(d.get("instance_id").and_then(Json::as_u64).unwrap_or(0))
                .map_err(|_| bad(format!("device '{name}': instance_id above 2^32")))?;
            if d.get("vmsd_name").is_none() {
                // Old-style device: its body is the `data` buffer of the recorded size.
                let v = vmstate::vmsd_from_old_style(d).map_err(|m| bad(format!("device '{name}': {m}")))?;
                self.old_style.insert((name.to_string(), inst), Arc::new(v));
                continue;
            }
            let v = vmstate::vmsd_from_vmdesc(d).map_err(|m| bad(format!("device '{name}': {m}")))?;
            self.vmdesc.insert((name.to_string(), inst), Arc::new(v));
        }
        Ok(())
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.input.offset()
    }

    /// Target page size (from the configuration, 4096 by default).
    pub fn page_size(&self) -> u64 {
        self.tps
    }

    /// The configuration record, once read.
    pub fn configuration(&self) -> Option<&Configuration> {
        self.config.as_ref()
    }

    /// The RAM block list, once read.
    pub fn ram_blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Right after [`Event::Command`]`(`[`Command::Packaged`]`)`: read the package's
    /// bytes off this stream in one go (as QEMU does, so the main channel is free
    /// for pages while the package's devices load) and return a decoder over them
    /// that knows this stream's configuration, RAM blocks, sections and registered
    /// descriptions. It yields the package's records, then [`Event::PackageEnd`];
    /// its offsets are this stream's. This decoder goes on after the package, where
    /// discards are no longer accepted (the package carries POSTCOPY_LISTEN). The
    /// buffer grows only as bytes arrive. Without this call the package is decoded
    /// inline instead.
    pub fn take_package(&mut self) -> Result<Decoder<std::io::Cursor<Vec<u8>>>> {
        let start = self.input.offset();
        let end = self.package_end.ok_or_else(|| Error::at(start, ErrorKind::NotInPackage("a package read")))?;
        let blob = self.input.read_vec(end - start, "a PACKAGED blob").map_err(|kind| {
            self.phase = Phase::Done;
            Error { offset: self.input.offset(), section: None, kind }
        })?;
        self.package_end = None;
        self.postcopy_listening = true;
        self.last_block = None;
        Ok(Decoder {
            input: Input::at_offset(std::io::Cursor::new(blob), start),
            phase: Phase::TopLevel,
            limits: self.limits.clone(),
            tps: self.tps,
            config: self.config.clone(),
            sections: self.sections.clone(),
            current: None,
            current_name: None,
            blocks: self.blocks.clone(),
            block_index: self.block_index.clone(),
            last_block: None,
            postcopy_advised: self.postcopy_advised,
            postcopy_listening: self.postcopy_listening,
            skip_vmdesc: self.skip_vmdesc,
            package_end: Some(end),
            item_start: start,
            page_buf: vec![0; self.page_buf.len()],
            xbz_buf: Vec::new(),
            descriptions: self.descriptions.clone(),
            vmdesc: self.vmdesc.clone(),
            old_style: self.old_style.clone(),
            raw: self.raw.clone(),
            raw_section: None,
        })
    }

    /// The reader back.
    pub fn into_inner(self) -> R {
        self.input.into_inner()
    }

    /// The next event, or `None` after the end of the stream. Pages are handed out in events.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Event<'_>>> {
        self.next_with(&mut NoSink)
    }

    /// The next event; pages go straight into `sink` where it supplies memory.
    pub fn next_with<S: PageSink + ?Sized>(&mut self, sink: &mut S) -> Result<Option<Event<'_>>> {
        if self.phase == Phase::Done {
            return Ok(None);
        }
        match self.step(sink) {
            Ok(Some(ev)) => Ok(Some(self.materialize(ev))),
            Ok(None) => {
                self.phase = Phase::Done;
                Ok(None)
            }
            Err(kind) => {
                let offset = match kind {
                    ErrorKind::UnexpectedEof { .. } | ErrorKind::Io(_) => self.input.offset(),
                    _ => self.item_start,
                };
                self.phase = Phase::Done;
                Err(Error { offset, section: self.current_name.clone(), kind })
            }
        }
    }

    fn materialize(&mut self, ev: Ev) -> Event<'_> {
        match ev {
            Ev::Header(v) => Event::Header { version: v },
            Ev::Config(c) => Event::Configuration(c),
            Ev::Start(h) => Event::SectionStart(h),
            Ev::Blocks => Event::RamBlocks(&self.blocks),
            Ev::Page(b, offset, placed) => {
                Event::Page { block: &self.blocks[b], offset, data: (!placed).then_some(&self.page_buf[..]) }
            }
            Ev::Zero(b, offset, fill) => Event::ZeroPage { block: &self.blocks[b], offset, fill },
            Ev::Xbzrle(b, offset, len) => {
                Event::XbzrlePage { block: &self.blocks[b], offset, delta: &self.xbz_buf[..len] }
            }
            Ev::Compressed(b, offset, placed) => {
                Event::CompressedPage { block: &self.blocks[b], offset, data: (!placed).then_some(&self.page_buf[..]) }
            }
            Ev::MultifdFlush => Event::MultifdFlush,
            Ev::Eos => Event::RamEos,
            Ev::Raw(header, start) => {
                Event::RawBody(RawBody { input: &mut self.input, header, start, read: 0, ended: false, error: None })
            }
            Ev::Device(state, vmsd, source) => Event::Device { state, vmsd, source },
            Ev::End(kind, section_id) => Event::SectionEnd { kind, section_id },
            Ev::Command(c) => Event::Command(c),
            Ev::PackageEnd => Event::PackageEnd,
            Ev::Eof => Event::Eof,
            Ev::Vmdesc(j) => Event::VmDescription(j),
        }
    }

    fn step<S: PageSink + ?Sized>(&mut self, sink: &mut S) -> IResult<Option<Ev>> {
        self.item_start = self.input.offset();
        match self.phase {
            Phase::Header => self.header().map(Some),
            Phase::Config => self.configuration_record().map(Some),
            Phase::TopLevel => self.top_level(sink).map(Some),
            Phase::RamBody => self.ram_record(sink).map(Some),
            Phase::DeviceBody => self.device_body().map(Some),
            Phase::RawBody => {
                let (header, start) = self.raw_section.clone().ok_or(ErrorKind::UnknownSectionId(0))?;
                self.phase = Phase::Footer;
                Ok(Some(Ev::Raw(header, start)))
            }
            Phase::Footer => self.footer().map(Some),
            Phase::AfterEof => self.after_eof(),
            Phase::Done => Ok(None),
        }
    }

    fn header(&mut self) -> IResult<Ev> {
        let magic = self.input.be32("the stream header")?;
        if magic != QEMU_VM_FILE_MAGIC {
            return Err(ErrorKind::BadMagic(magic));
        }
        let version = self.input.be32("the stream header")?;
        if version != QEMU_VM_FILE_VERSION {
            return Err(ErrorKind::UnsupportedVersion(version));
        }
        self.phase = Phase::Config;
        Ok(Ev::Header(version))
    }

    fn configuration_record(&mut self) -> IResult<Ev> {
        const W: &str = "the configuration record";
        let t = self.input.u8(W)?;
        if t != QEMU_VM_CONFIGURATION {
            return Err(ErrorKind::ConfigurationMissing(t));
        }
        self.current_name = Some("configuration".into());
        let len = self.input.be32(W)?;
        if len > 255 {
            // QEMU reads it into a 256-byte buffer and fails beyond that.
            return Err(ErrorKind::BadField {
                field: "configuration.len".into(),
                why: format!("machine name length {len}"),
            });
        }
        let mut name = [0u8; 255];
        self.input.read_exact(&mut name[..len as usize], W)?;
        let mut cfg = Configuration {
            machine: String::from_utf8_lossy(&name[..len as usize]).into_owned(),
            ..Default::default()
        };
        while self.input.peek_u8()? == Some(QEMU_VM_SUBSECTION) {
            let head = self.input.peek(2)?;
            if head.len() < 2 {
                break;
            }
            self.input.u8(W)?;
            let sub = self.input.cstr(W)?;
            let version = self.input.be32(W)?;
            if version != 1 {
                return Err(ErrorKind::VersionTooNew { vmsd: sub, version, local: 1 });
            }
            match sub.as_str() {
                "configuration/target-page-bits" => {
                    let bits = self.input.be32(W)?;
                    if !(10..=16).contains(&bits) {
                        return Err(ErrorKind::BadPageBits(bits));
                    }
                    cfg.target_page_bits = Some(bits);
                    self.tps = 1 << bits;
                    self.page_buf = vec![0; 1usize << bits];
                }
                "configuration/capabilities" => {
                    let n = self.input.be32(W)?;
                    if n > 64 {
                        return Err(ErrorKind::Limit("more than 64 configuration capabilities"));
                    }
                    for _ in 0..n {
                        cfg.capabilities.push(self.input.cstr(W)?);
                    }
                }
                "configuration/uuid" => {
                    let mut u = [0u8; 16];
                    self.input.read_exact(&mut u, W)?;
                    cfg.uuid = Some(u);
                }
                _ => return Err(ErrorKind::UnknownConfigSubsection(sub)),
            }
        }
        if cfg.capabilities.iter().any(|c| c == "mapped-ram") {
            return Err(ErrorKind::RamUnsupported("mapped-ram streams (they need a seekable file)"));
        }
        self.current_name = None;
        self.config = Some(cfg.clone());
        self.phase = Phase::TopLevel;
        Ok(Ev::Config(cfg))
    }

    fn top_level<S: PageSink + ?Sized>(&mut self, sink: &mut S) -> IResult<Ev> {
        const W: &str = "the next record";
        if let Some(end) = self.package_end {
            let off = self.input.offset();
            if off == end {
                self.package_end = None;
                return Ok(Ev::PackageEnd);
            }
            if off > end {
                return Err(ErrorKind::PackageOverrun { end });
            }
        }
        let offset = self.input.offset();
        let t = self.input.u8(W)?;
        match t {
            QEMU_VM_EOF => {
                if self.package_end.is_some() {
                    return Err(ErrorKind::NotInPackage("EOF"));
                }
                self.phase = Phase::AfterEof;
                Ok(Ev::Eof)
            }
            QEMU_VM_SECTION_START | QEMU_VM_SECTION_FULL => {
                const H: &str = "a section header";
                let id = self.input.be32(H)?;
                let idstr = self.input.cstr(H)?;
                let instance_id = self.input.be32(H)?;
                let version = self.input.be32(H)?;
                let kind = if t == QEMU_VM_SECTION_START { SectionKind::Start } else { SectionKind::Full };
                self.current_name = Some(idstr.clone());
                if let Some(prev) = self.sections.get(&id) {
                    if prev.idstr != idstr || prev.instance_id != instance_id {
                        return Err(ErrorKind::SectionIdReused { id, idstr });
                    }
                }
                let header = SectionHeader { kind, section_id: id, idstr: idstr.clone(), instance_id, version, offset };
                if idstr == RAM_IDSTR {
                    if version != RAM_VERSION {
                        return Err(ErrorKind::RamVersion(version));
                    }
                    self.phase = Phase::RamBody;
                } else if self.raw.contains(&(idstr.clone(), instance_id)) {
                    self.phase = Phase::RawBody;
                    self.raw_section = Some((header.clone(), self.input.offset()));
                } else if kind == SectionKind::Start {
                    return Err(ErrorKind::OpaqueLiveSection(idstr));
                } else {
                    self.phase = Phase::DeviceBody;
                }
                self.sections.insert(id, SectionInfo { idstr, instance_id, version });
                self.current = Some((kind, id));
                Ok(Ev::Start(header))
            }
            QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => {
                let id = self.input.be32("a section header")?;
                let info = self.sections.get(&id).cloned().ok_or(ErrorKind::UnknownSectionId(id))?;
                self.current_name = Some(info.idstr.clone());
                let kind = if t == QEMU_VM_SECTION_PART { SectionKind::Part } else { SectionKind::End };
                let header = SectionHeader {
                    kind,
                    section_id: id,
                    idstr: info.idstr,
                    instance_id: info.instance_id,
                    version: info.version,
                    offset,
                };
                if header.idstr == RAM_IDSTR {
                    self.phase = Phase::RamBody;
                } else if self.raw.contains(&(header.idstr.clone(), header.instance_id)) {
                    self.phase = Phase::RawBody;
                    self.raw_section = Some((header.clone(), self.input.offset()));
                } else {
                    return Err(ErrorKind::OpaqueLiveSection(header.idstr));
                }
                self.current = Some((kind, id));
                Ok(Ev::Start(header))
            }
            QEMU_VM_COMMAND => {
                const C: &str = "a command";
                let number = self.input.be16(C)?;
                let len = self.input.be16(C)? as usize;
                let mut p = vec![0u8; len];
                self.input.read_exact(&mut p, C)?;
                let c = Command::decode(number, &p)?;
                match &c {
                    Command::Packaged(n) => {
                        if self.package_end.is_some() {
                            return Err(ErrorKind::NotInPackage("PACKAGED"));
                        }
                        self.package_end = Some(self.input.offset() + u64::from(*n));
                    }
                    Command::PostcopyAdvise(Some(_)) => self.postcopy_advised = true,
                    Command::PostcopyListen => self.postcopy_listening = true,
                    Command::PostcopyRamDiscard { block, ranges } => {
                        // QEMU accepts discards only between ADVISE and LISTEN, and its
                        // source sends at most MAX_DISCARDS_PER_COMMAND ranges in one.
                        if !self.postcopy_advised || self.postcopy_listening {
                            return Err(ErrorKind::DiscardOutsidePostcopy);
                        }
                        if ranges.len() > MAX_DISCARDS_PER_COMMAND {
                            return Err(ErrorKind::Limit("more than 12 ranges in one POSTCOPY_RAM_DISCARD"));
                        }
                        let b =
                            *self.block_index.get(block).ok_or_else(|| ErrorKind::UnknownRamBlock(block.clone()))?;
                        let blk = &self.blocks[b];
                        for &(start, len) in ranges {
                            if start.checked_add(len).is_none_or(|e| e > blk.length) {
                                return Err(ErrorKind::RamOffsetOutOfRange {
                                    block: blk.name.clone(),
                                    offset: start,
                                    length: blk.length,
                                });
                            }
                            if start % self.tps != 0 || len % self.tps != 0 {
                                return Err(ErrorKind::DiscardUnaligned {
                                    block: blk.name.clone(),
                                    start,
                                    len,
                                    page_size: self.tps,
                                });
                            }
                            sink.discard(blk, start, len);
                        }
                        self.last_block = None;
                    }
                    _ => {}
                }
                Ok(Ev::Command(c))
            }
            other => Err(ErrorKind::UnknownRecordType(other)),
        }
    }

    fn ram_record<S: PageSink + ?Sized>(&mut self, sink: &mut S) -> IResult<Ev> {
        const W: &str = "a RAM record";
        let v = self.input.be64(W)?;
        let flags = v & (self.tps - 1);
        let offset = v & !(self.tps - 1);
        let kind = RecordKind::from_flags(flags).ok_or(ErrorKind::RamFlags(flags))?;
        match kind {
            RecordKind::Eos => {
                self.phase = Phase::Footer;
                Ok(Ev::Eos)
            }
            RecordKind::MultifdFlush => Ok(Ev::MultifdFlush),
            RecordKind::Hook => Err(ErrorKind::RamUnsupported("RDMA hook record")),
            RecordKind::MemSize => {
                // QEMU sends the block list once, in the setup section: a second one
                // would silently drop (or re-point) pages already received.
                if !self.blocks.is_empty() {
                    return Err(ErrorKind::RamSecondBlockList);
                }
                let ev = self.block_list(offset)?;
                sink.target_page_size(self.tps).map_err(ErrorKind::Sink)?;
                sink.ram_blocks(&self.blocks).map_err(ErrorKind::Sink)?;
                Ok(ev)
            }
            _ => {
                let b = if flags & ram_flags::CONTINUE != 0 {
                    self.last_block.ok_or(ErrorKind::RamContinueWithoutBlock)?
                } else {
                    let name = self.input.cstr(W)?;
                    if self.blocks.is_empty() {
                        return Err(ErrorKind::RamNoBlockList);
                    }
                    *self.block_index.get(&name).ok_or(ErrorKind::UnknownRamBlock(name))?
                };
                let blk = &self.blocks[b];
                if offset.checked_add(self.tps).is_none_or(|end| end > blk.length) {
                    return Err(ErrorKind::RamOffsetOutOfRange { block: blk.name.clone(), offset, length: blk.length });
                }
                self.last_block = Some(b);
                if kind == RecordKind::Zero {
                    let fill = self.input.u8("a zero page")?;
                    sink.fill_page(&self.blocks[b], offset, fill);
                    return Ok(Ev::Zero(b, offset, fill));
                }
                // `page_buf` is always one target page long.
                let tps = self.page_buf.len();
                let slot = match sink.page_mut(&self.blocks[b], offset) {
                    Some(s) if s.len() < tps => {
                        return Err(ErrorKind::Sink(format!(
                            "the destination's page at offset {offset} of '{}' is {} bytes, the stream's pages {tps}",
                            self.blocks[b].name,
                            s.len()
                        )));
                    }
                    s => s,
                };
                let placed = slot.is_some();
                match kind {
                    RecordKind::Page => {
                        match slot {
                            Some(PageSlot::Buffer(s)) => self.input.read_exact(&mut s[..tps], "a page")?,
                            Some(PageSlot::Guest(v)) => {
                                self.input.read_exact(&mut self.page_buf[..tps], "a page")?;
                                v.copy_from(&self.page_buf[..tps]);
                            }
                            None => self.input.read_exact(&mut self.page_buf[..tps], "a page")?,
                        }
                        Ok(Ev::Page(b, offset, placed))
                    }
                    RecordKind::Xbzrle => {
                        const X: &str = "an XBZRLE page";
                        let enc = self.input.u8(X)?;
                        if enc != ENCODING_FLAG_XBZRLE {
                            return Err(ErrorKind::XbzrleEncoding(enc));
                        }
                        let len = self.input.be16(X)?;
                        if u64::from(len) > self.tps {
                            return Err(ErrorKind::XbzrleLength(len));
                        }
                        let len = usize::from(len);
                        self.xbz_buf.resize(len, 0);
                        self.input.read_exact(&mut self.xbz_buf, X)?;
                        let ok = match slot {
                            Some(PageSlot::Buffer(s)) => crate::xbzrle::decode(&self.xbz_buf, &mut s[..tps]),
                            Some(PageSlot::Guest(v)) => {
                                // The delta applies to the page as it is: copy it out and back.
                                v.copy_to(&mut self.page_buf[..tps]);
                                let ok = crate::xbzrle::decode(&self.xbz_buf, &mut self.page_buf[..tps]);
                                v.copy_from(&self.page_buf[..tps]);
                                ok
                            }
                            None => crate::xbzrle::decode(&self.xbz_buf, &mut self.page_buf),
                        };
                        ok.ok_or(ErrorKind::XbzrleDecode)?;
                        Ok(Ev::Xbzrle(b, offset, len))
                    }
                    RecordKind::Compressed => {
                        const C: &str = "a compressed page";
                        let len = u64::from(self.input.be32(C)?);
                        // compressBound(TPS) as in QEMU.
                        let bound = self.tps + (self.tps >> 12) + (self.tps >> 14) + (self.tps >> 25) + 13;
                        if len > bound {
                            return Err(ErrorKind::CompressedPage(format!("length {len} above {bound}")));
                        }
                        let len =
                            usize::try_from(len).map_err(|_| ErrorKind::CompressedPage(format!("length {len}")))?;
                        self.xbz_buf.resize(len, 0);
                        self.input.read_exact(&mut self.xbz_buf, C)?;
                        match slot {
                            Some(PageSlot::Buffer(s)) => inflate_page(&self.xbz_buf, &mut s[..tps])?,
                            Some(PageSlot::Guest(v)) => {
                                inflate_page(&self.xbz_buf, &mut self.page_buf[..tps])?;
                                v.copy_from(&self.page_buf[..tps]);
                            }
                            None => inflate_page(&self.xbz_buf, &mut self.page_buf[..])?,
                        }
                        Ok(Ev::Compressed(b, offset, placed))
                    }
                    _ => Err(ErrorKind::RamFlags(flags)),
                }
            }
        }
    }

    fn block_list(&mut self, total: u64) -> IResult<Ev> {
        const W: &str = "the RAM block list";
        if total > self.limits.max_ram_bytes {
            return Err(ErrorKind::RamTooLarge { length: total, limit: self.limits.max_ram_bytes });
        }
        let ignore_shared = self.config.as_ref().is_some_and(|c| c.capabilities.iter().any(|c| c == "x-ignore-shared"));
        let mut blocks: Vec<RamBlock> = Vec::new();
        let mut index = HashMap::new();
        let mut sum = 0u64;
        while sum < total {
            if blocks.len() >= self.limits.max_ram_blocks {
                return Err(ErrorKind::Limit("too many RAM blocks"));
            }
            let name = self.input.cstr(W)?;
            let length = self.input.be64(W)?;
            if length > self.limits.max_ram_bytes {
                return Err(ErrorKind::RamTooLarge { length, limit: self.limits.max_ram_bytes });
            }
            if length == 0 || length % self.tps != 0 {
                return Err(ErrorKind::RamBlockLength { block: name, length });
            }
            sum = sum.checked_add(length).filter(|&s| s <= total).ok_or(ErrorKind::RamTotalMismatch { total, sum })?;
            let mut page_size = None;
            if self.postcopy_advised && self.next_is_page_size(sum == total)? {
                let ps = self.input.be64(W)?;
                page_size = Some(ps);
            }
            let gpa = if ignore_shared { Some(self.input.be64(W)?) } else { None };
            if index.insert(name.clone(), blocks.len()).is_some() {
                return Err(ErrorKind::RamDuplicateBlock(name));
            }
            blocks.push(RamBlock { index: blocks.len(), name, length, page_size, gpa });
        }
        self.blocks = blocks;
        self.block_index = index;
        self.last_block = None;
        Ok(Ev::Blocks)
    }

    /// With postcopy advised, a hugepage block carries a be64 page size. It is
    /// told apart from what follows (a name's non-zero length byte, or a RAM
    /// record whose flags are never zero) by its shape: a power of two above
    /// the target page size.
    fn next_is_page_size(&mut self, last: bool) -> IResult<bool> {
        let p = self.input.peek(8)?;
        if p.len() < 8 {
            return Ok(false);
        }
        if !last && p[0] != 0 {
            return Ok(false);
        }
        let mut a = [0u8; 8];
        a.copy_from_slice(p);
        let v = u64::from_be_bytes(a);
        Ok(v.is_power_of_two() && v > self.tps)
    }

    fn device_body(&mut self) -> IResult<Ev> {
        let Some((_, id)) = self.current else { return Err(ErrorKind::UnknownSectionId(0)) };
        let info = self.sections.get(&id).cloned().ok_or(ErrorKind::UnknownSectionId(id))?;
        let short = info.idstr.rsplit('/').next().unwrap_or(&info.idstr);
        let key = (info.idstr.clone(), info.instance_id);
        let (vmsd, source) = if let Some(v) = self.old_style.get(&key) {
            // A hand-written body: the vmdesc's `data` buffer, at whatever version the section has.
            let v = Vmsd { version_id: info.version, ..(**v).clone() };
            (Arc::new(v), DescriptionSource::Vmdesc)
        } else if let Some(v) = self.vmdesc.get(&key) {
            // The stream's own description is exact for this stream; prefer it for
            // devices without a built-in one, and when the built-in one disagrees in version.
            match self.descriptions.get(short).or_else(|| self.descriptions.get(&info.idstr)) {
                Some(b) if b.version_id >= info.version => (b.clone(), DescriptionSource::Builtin),
                _ => (v.clone(), DescriptionSource::Vmdesc),
            }
        } else if let Some(b) = self.descriptions.get(&info.idstr).or_else(|| self.descriptions.get(short)) {
            (b.clone(), DescriptionSource::Builtin)
        } else {
            return Err(ErrorKind::NoDescription(info.idstr));
        };
        let state = vmstate::decode(&vmsd, info.version, &mut self.input)?;
        if vmsd.name == "globalstate" {
            builtin::check_globalstate(&state)?;
        }
        self.phase = Phase::Footer;
        Ok(Ev::Device(state, vmsd, source))
    }

    fn footer(&mut self) -> IResult<Ev> {
        const W: &str = "a section footer";
        let Some((kind, id)) = self.current else { return Err(ErrorKind::UnknownSectionId(0)) };
        // After a caller-read body, a misplaced footer means the loader misread.
        let raw_read = self.raw_section.take().map(|(_, start)| self.input.offset().saturating_sub(start));
        let m = self.input.u8(W)?;
        if m != QEMU_VM_SECTION_FOOTER {
            return Err(match raw_read {
                Some(read) => ErrorKind::RawBodyEnd { read, found: format!("byte {m:#04x}") },
                None => ErrorKind::MissingFooter(m),
            });
        }
        let found = self.input.be32(W)?;
        if found != id {
            return Err(match raw_read {
                Some(read) => ErrorKind::RawBodyEnd { read, found: format!("the footer of section {found:#x}") },
                None => ErrorKind::FooterMismatch { expected: id, found },
            });
        }
        if let Some(end) = self.package_end {
            if self.input.offset() > end {
                return Err(ErrorKind::PackageOverrun { end });
            }
        }
        self.current = None;
        self.current_name = None;
        self.phase = Phase::TopLevel;
        Ok(Ev::End(kind, id))
    }

    fn after_eof(&mut self) -> IResult<Option<Ev>> {
        // QEMU tolerates a missing or foreign byte here; so do we (the stream is complete).
        if self.input.peek_u8()? != Some(QEMU_VM_VMDESCRIPTION) {
            self.phase = Phase::Done;
            return Ok(None);
        }
        self.current_name = Some("vmdesc".into());
        self.input.u8("the vmdesc")?;
        let len = self.input.be32("the vmdesc")?;
        if len > self.limits.max_vmdesc_bytes {
            return Err(ErrorKind::Limit("vmdesc larger than max_vmdesc_bytes"));
        }
        if self.skip_vmdesc {
            self.input.skip(u64::from(len), "the vmdesc")?;
            self.current_name = None;
            self.phase = Phase::Done;
            return Ok(None);
        }
        let text = self.input.read_vec(u64::from(len), "the vmdesc")?;
        let json: Json = serde_json::from_slice(&text).map_err(|e| ErrorKind::BadVmdesc(e.to_string()))?;
        self.current_name = None;
        self.phase = Phase::Done;
        Ok(Some(Ev::Vmdesc(json)))
    }
}

/// Inflate one zlib stream into exactly `dst.len()` bytes.
fn inflate_page(src: &[u8], dst: &mut [u8]) -> IResult<()> {
    let mut z = flate2::Decompress::new(true);
    match z.decompress(src, dst, flate2::FlushDecompress::Finish) {
        Ok(flate2::Status::StreamEnd) if z.total_out() == dst.len() as u64 => Ok(()),
        Ok(_) => Err(ErrorKind::CompressedPage(format!("inflated to {} bytes", z.total_out()))),
        Err(e) => Err(ErrorKind::CompressedPage(e.to_string())),
    }
}

/// Locate the vmdesc at the end of a whole stream held in memory (or the tail of a
/// file): the last `0x06, be32 len, JSON` that ends exactly at the end. Returns the
/// JSON and its record offset within `tail`.
pub fn find_trailing_vmdesc(tail: &[u8]) -> Option<(Json, usize)> {
    let n = tail.len();
    // Search backwards for a record that ends exactly at the end of the data.
    let mut pos = n.checked_sub(5 + 2)?;
    loop {
        if tail[pos] == QEMU_VM_VMDESCRIPTION && tail.get(pos + 5) == Some(&b'{') {
            let len = u32::from_be_bytes([tail[pos + 1], tail[pos + 2], tail[pos + 3], tail[pos + 4]]) as usize;
            if pos + 5 + len == n {
                if let Ok(j) = serde_json::from_slice::<Json>(&tail[pos + 5..]) {
                    return Some((j, pos));
                }
            }
        }
        if pos == 0 {
            return None;
        }
        pos -= 1;
    }
}

#[cfg(test)]
mod page_slot_tests {
    use super::*;

    #[test]
    fn a_guest_slot_is_filled_and_copied_word_by_word_exactly() {
        for len in [4096usize, 1024, 65536] {
            let mut mem = vec![0x5au8; len + 16];
            {
                let mut slot = PageSlot::Guest(VolatileSlice::from(&mut mem[8..8 + len]));
                slot.fill(0);
                slot.fill(0); // already zero: left as it is
                assert_eq!(slot.len(), len);
            }
            assert!(mem[8..8 + len].iter().all(|&b| b == 0), "{len}: zeroed");
            assert!(mem[..8].iter().chain(&mem[8 + len..]).all(|&b| b == 0x5a), "{len}: nothing outside");
            {
                let mut slot = PageSlot::Guest(VolatileSlice::from(&mut mem[8..8 + len]));
                slot.fill(7);
            }
            assert!(mem[8..8 + len].iter().all(|&b| b == 7), "{len}: filled");
            let data: Vec<u8> = (0..len).map(|i| u8::try_from(i * 7 % 251).unwrap_or(0)).collect();
            {
                let mut slot = PageSlot::Guest(VolatileSlice::from(&mut mem[8..8 + len]));
                slot.copy_from(&data);
            }
            assert_eq!(&mem[8..8 + len], &data[..]);
        }
    }
}
