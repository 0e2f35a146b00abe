//! Typed errors of the format crate. Every decode error names the byte offset
//! where the bad item starts (or where the input ended) and, when it happened
//! inside a section, the section's idstr.

use std::fmt;

/// A decode failure: what went wrong, where in the stream, and in which section.
#[derive(Debug)]
pub struct Error {
    /// Byte offset from the start of the stream (or channel) where the problem was found.
    pub offset: u64,
    /// idstr of the section being decoded, if any (e.g. `ram`, `timer`).
    pub section: Option<String>,
    /// The cause.
    pub kind: ErrorKind,
}

impl Error {
    /// An error at `offset` outside any section.
    pub fn at(offset: u64, kind: ErrorKind) -> Self {
        Error { offset, section: None, kind }
    }

    /// True when the input simply ended early (a truncated stream).
    pub fn is_truncation(&self) -> bool {
        matches!(self.kind, ErrorKind::UnexpectedEof { .. })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.section {
            Some(s) => write!(f, "at byte {} in section '{}': {}", self.offset, s, self.kind),
            None => write!(f, "at byte {}: {}", self.offset, self.kind),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Why decoding failed. Messages follow QEMU's wording where QEMU has one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The underlying reader failed (other than by ending).
    #[error("I/O error")]
    Io(#[source] std::io::Error),
    /// The input ended inside an item.
    #[error("stream ends inside {what}")]
    UnexpectedEof {
        /// The item being read.
        what: &'static str,
    },
    /// The first four bytes are not `QEVM`.
    #[error("not a migration stream (magic {0:#010x})")]
    BadMagic(u32),
    /// Stream version other than 3.
    #[error("unsupported migration stream version {0}")]
    UnsupportedVersion(u32),
    /// The byte after the header is not the configuration record.
    #[error("configuration section missing (found byte {0:#04x})")]
    ConfigurationMissing(u8),
    /// A configuration subsection this crate does not know.
    #[error("unknown configuration subsection '{0}'")]
    UnknownConfigSubsection(String),
    /// `configuration/target-page-bits` outside 10..=16.
    #[error("unsupported target page bits {0}")]
    BadPageBits(u32),
    /// A top-level record type byte that is not allowed here.
    #[error("unknown savevm section type {0}")]
    UnknownRecordType(u8),
    /// The byte after a section body is not the footer marker 0x7e.
    #[error("missing section footer (found byte {0:#04x})")]
    MissingFooter(u8),
    /// The footer names another section.
    #[error("mismatched section id in footer - read {found:#x} expected {expected:#x}")]
    FooterMismatch {
        /// Section id of the section header.
        expected: u32,
        /// Section id found in the footer.
        found: u32,
    },
    /// PART/END for a section id never started.
    #[error("unknown savevm section {0}")]
    UnknownSectionId(u32),
    /// START/FULL reusing a section id for another idstr/instance.
    #[error("section id {id} reused for '{idstr}'")]
    SectionIdReused {
        /// The reused id.
        id: u32,
        /// The new idstr.
        idstr: String,
    },
    /// A RAM section whose version is not 4.
    #[error("unsupported version {0} for 'ram' v4")]
    RamVersion(u32),
    /// RAM record flags that are not one valid kind.
    #[error("unknown combination of migration flags: {0:#x}")]
    RamFlags(u64),
    /// A RAM record kind this crate recognises but cannot load (RDMA hook, mapped-ram).
    #[error("unsupported RAM record: {0}")]
    RamUnsupported(&'static str),
    /// CONTINUE before any block was named on this channel.
    #[error("RAM record with CONTINUE but no block named before (Ack, bad migration stream!)")]
    RamContinueWithoutBlock,
    /// A page record names a block absent from the block list.
    #[error("can't find RAM block '{0}'")]
    UnknownRamBlock(String),
    /// A page record before any MEM_SIZE block list.
    #[error("RAM page record before the RAM block list")]
    RamNoBlockList,
    /// A page whose offset is past its block.
    #[error("illegal RAM offset {offset:#x} in block '{block}' of length {length:#x}")]
    RamOffsetOutOfRange {
        /// Block name.
        block: String,
        /// Offending offset.
        offset: u64,
        /// Block length.
        length: u64,
    },
    /// A block (or the total) larger than the configured limit.
    #[error("RAM size {length:#x} exceeds the limit {limit:#x}")]
    RamTooLarge {
        /// Declared size.
        length: u64,
        /// Configured limit ([`crate::Limits::max_ram_bytes`]).
        limit: u64,
    },
    /// MEM_SIZE block list whose lengths do not add up to the total.
    #[error("RAM block list does not add up: total {total:#x}, blocks so far {sum:#x}")]
    RamTotalMismatch {
        /// MEM_SIZE total.
        total: u64,
        /// Sum of block lengths read.
        sum: u64,
    },
    /// A block length that is not a multiple of the target page size, or zero.
    #[error("RAM block '{block}' has length {length:#x}, not a positive multiple of the page size")]
    RamBlockLength {
        /// Block name.
        block: String,
        /// Declared length.
        length: u64,
    },
    /// Two blocks with the same name.
    #[error("duplicate RAM block '{0}'")]
    RamDuplicateBlock(String),
    /// XBZRLE record with an encoding byte other than 1.
    #[error("failed to load XBZRLE page - wrong compression ({0:#x})")]
    XbzrleEncoding(u8),
    /// XBZRLE record with a length of 0 or above the page size.
    #[error("XBZRLE length {0} out of range")]
    XbzrleLength(u16),
    /// An XBZRLE delta that does not decode.
    #[error("failed to load XBZRLE page - decode error")]
    XbzrleDecode,
    /// A compressed page that does not inflate to exactly one page.
    #[error("bad compressed page: {0}")]
    CompressedPage(String),
    /// A command number unknown to QEMU 7.2 (and newest).
    #[error("MIG_CMD {cmd:#x} unknown (len {len:#x})")]
    UnknownCommand {
        /// Command number.
        cmd: u16,
        /// Declared length.
        len: u16,
    },
    /// A return-path message type unknown to QEMU 7.2 (and newest), or INVALID (0).
    #[error("received invalid return-path message {ty:#06x} length {len:#06x}")]
    UnknownRpMessage {
        /// Message type.
        ty: u16,
        /// Declared length.
        len: u16,
    },
    /// A command whose length does not fit its kind.
    #[error("{name} received with bad length - expecting {expected}, got {got}")]
    CommandLength {
        /// QEMU's command name.
        name: &'static str,
        /// Expected length (description).
        expected: &'static str,
        /// Length found.
        got: usize,
    },
    /// A command payload that is malformed.
    #[error("bad {name} payload: {why}")]
    CommandPayload {
        /// QEMU's command name.
        name: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// A record inside a PACKAGED blob crossing the blob's end.
    #[error("record crosses the end of the PACKAGED blob (ends at {end})")]
    PackageOverrun {
        /// Offset where the blob ends.
        end: u64,
    },
    /// PACKAGED inside PACKAGED, or EOF inside a package.
    #[error("{0} not allowed inside a PACKAGED blob")]
    NotInPackage(&'static str),
    /// Section version newer than the description.
    #[error("{vmsd}: incoming version_id {version} is too new for local version_id {local}")]
    VersionTooNew {
        /// Description name.
        vmsd: String,
        /// Version in the stream.
        version: u32,
        /// Our version.
        local: u32,
    },
    /// Section version older than the description's minimum.
    #[error("{vmsd}: incoming version_id {version} is too old for local minimum version_id {minimum}")]
    VersionTooOld {
        /// Description name.
        vmsd: String,
        /// Version in the stream.
        version: u32,
        /// Our minimum.
        minimum: u32,
    },
    /// A subsection whose name starts with the parent's but is not known.
    #[error("VM subsection '{sub}' in '{vmsd}' does not exist")]
    UnknownSubsection {
        /// Parent description.
        vmsd: String,
        /// Subsection name found.
        sub: String,
    },
    /// A device section with no built-in or registered description and no vmdesc entry.
    #[error("no description for device '{0}' (no built-in one, and the stream has no vmdesc to decode it from)")]
    NoDescription(String),
    /// A live (iterative) section other than RAM, whose body is opaque.
    #[error("cannot decode live section '{0}' (only 'ram' is understood, and no loader was registered for it)")]
    OpaqueLiveSection(String),
    /// The body of a section read by the caller (see `Decoder::register_raw`) is not
    /// followed by its footer: the loader read too little or too much.
    #[error(
        "no section footer where the loader's {read} bytes of body end (found {found}): it read too little or too much"
    )]
    RawBodyEnd {
        /// Body bytes the loader read.
        read: u64,
        /// What was found instead of the footer.
        found: String,
    },
    /// A field value the description does not allow (count too large, bad runstate...).
    #[error("field '{field}': {why}")]
    BadField {
        /// Field path.
        field: String,
        /// What is wrong.
        why: String,
    },
    /// The vmdesc JSON is not valid or not in QEMU's schema.
    #[error("bad vmdesc: {0}")]
    BadVmdesc(String),
    /// A second MEM_SIZE record (QEMU sends the RAM block list once).
    #[error("a second RAM block list (MEM_SIZE record): the block list is sent once")]
    RamSecondBlockList,
    /// POSTCOPY_RAM_DISCARD without a postcopy ADVISE before it, or after LISTEN.
    #[error("CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state (only between POSTCOPY_ADVISE and POSTCOPY_LISTEN)")]
    DiscardOutsidePostcopy,
    /// A POSTCOPY_RAM_DISCARD range whose start or length is not a multiple of the
    /// page size (QEMU's `ram_block_discard_range` refuses it).
    #[error(
        "POSTCOPY_RAM_DISCARD of '{block}': range {start:#x}+{len:#x} is not aligned to the {page_size}-byte page"
    )]
    DiscardUnaligned {
        /// The RAM block.
        block: String,
        /// Start offset in the block.
        start: u64,
        /// Length in bytes.
        len: u64,
        /// The stream's target page size.
        page_size: u64,
    },
    /// A configured limit was exceeded.
    #[error("limit exceeded: {0}")]
    Limit(&'static str),
    /// The page sink (the destination's RAM) refused the stream's block list or its page size.
    #[error("{0}")]
    Sink(String),
    /// A multifd channel packet that is malformed.
    #[error("multifd: {0}")]
    Multifd(String),
}

/// Result alias of the format crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Failure to encode a value with a description (the value does not fit it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The writer failed.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
    /// The state lacks a field the description needs.
    #[error("{vmsd}: missing field '{field}'")]
    MissingField {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
    },
    /// A field value of the wrong kind or size.
    #[error("{vmsd}: field '{field}': {why}")]
    BadValue {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
        /// What is wrong.
        why: String,
    },
    /// A needed subsection with no value.
    #[error("{vmsd}: subsection '{sub}' is needed but has no value")]
    MissingSubsection {
        /// Parent description.
        vmsd: String,
        /// Subsection name.
        sub: String,
    },
    /// A name longer than 255 bytes (idstr, block, subsection).
    #[error("name '{0}' is longer than 255 bytes")]
    NameTooLong(String),
    /// A page buffer of the wrong size, or an offset not page aligned.
    #[error("bad RAM record: {0}")]
    BadRecord(String),
    /// A list or text longer than its length field can say.
    #[error("{what} of {len} does not fit its length field")]
    TooLong {
        /// What was being written.
        what: &'static str,
        /// Its length.
        len: usize,
    },
}
