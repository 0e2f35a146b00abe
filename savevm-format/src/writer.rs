//! The stream writer: header, configuration, sections with footers, RAM records,
//! commands, EOF and the vmdesc, on any `Write`. It tracks the RAM "last block"
//! (CONTINUE) state and collects the vmdesc entries of the devices it writes.

use crate::command::Command;
use crate::decoder::Configuration;
use crate::error::EncodeError;
use crate::ram::{self, is_zero_page, RamBlock, MAX_RECORD_HEADER};
use crate::vmstate::{self, State, Vmsd};
use crate::wire::*;
use serde_json::{json, Value as Json};
use std::io::{self, Write};

/// RAM statistics as QEMU 7.2 counts them (`query-migrate` `ram.*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RamStats {
    /// PAGE records (`ram.normal`).
    pub normal: u64,
    /// ZERO records (`ram.duplicate`).
    pub duplicate: u64,
    /// XBZRLE records.
    pub xbzrle: u64,
    /// RAM-code bytes (`ram.transferred` in 7.2): record headers, names, payloads.
    pub transferred: u64,
}

/// Writes a migration stream to `W`.
pub struct StreamWriter<W: Write> {
    w: W,
    written: u64,
    tps: usize,
    blocks: Vec<RamBlock>,
    last_block: Option<usize>,
    devices: Vec<Json>,
    stats: RamStats,
}

impl<W: Write> StreamWriter<W> {
    /// A writer with 4 KiB target pages.
    pub fn new(w: W) -> Self {
        StreamWriter {
            w,
            written: 0,
            tps: 4096,
            blocks: vec![],
            last_block: None,
            devices: vec![],
            stats: RamStats::default(),
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// RAM statistics so far.
    pub fn ram_stats(&self) -> RamStats {
        self.stats
    }

    /// Target page size.
    pub fn page_size(&self) -> usize {
        self.tps
    }

    /// The underlying writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    /// Flush and return the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.w.flush()?;
        Ok(self.w)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    /// Magic `QEVM` and version 3.
    pub fn header(&mut self) -> Result<(), EncodeError> {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&QEMU_VM_FILE_MAGIC.to_be_bytes());
        b[4..].copy_from_slice(&QEMU_VM_FILE_VERSION.to_be_bytes());
        Ok(self.put(&b)?)
    }

    /// The configuration record (machine name and the subsections that are set).
    pub fn configuration(&mut self, c: &Configuration) -> Result<(), EncodeError> {
        let machine_len = u8::try_from(c.machine.len()).map_err(|_| EncodeError::NameTooLong(c.machine.clone()))?;
        let mut v = vec![QEMU_VM_CONFIGURATION];
        v.extend_from_slice(&u32::from(machine_len).to_be_bytes());
        v.extend_from_slice(c.machine.as_bytes());
        let sub = |v: &mut Vec<u8>, name: &str| {
            v.push(QEMU_VM_SUBSECTION);
            // The names below, all short.
            v.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
            v.extend_from_slice(name.as_bytes());
            v.extend_from_slice(&1u32.to_be_bytes());
        };
        if let Some(bits) = c.target_page_bits {
            sub(&mut v, "configuration/target-page-bits");
            v.extend_from_slice(&bits.to_be_bytes());
            self.tps = 1 << bits;
        }
        if !c.capabilities.is_empty() {
            sub(&mut v, "configuration/capabilities");
            let count = u32::try_from(c.capabilities.len())
                .map_err(|_| EncodeError::TooLong { what: "capability list", len: c.capabilities.len() })?;
            v.extend_from_slice(&count.to_be_bytes());
            for cap in &c.capabilities {
                v.push(u8::try_from(cap.len()).map_err(|_| EncodeError::NameTooLong(cap.clone()))?);
                v.extend_from_slice(cap.as_bytes());
            }
        }
        if let Some(u) = c.uuid {
            sub(&mut v, "configuration/uuid");
            v.extend_from_slice(&u);
        }
        Ok(self.put(&v)?)
    }

    fn section_with_idstr(
        &mut self,
        t: u8,
        id: u32,
        idstr: &str,
        instance: u32,
        version: u32,
    ) -> Result<(), EncodeError> {
        let idstr_len = u8::try_from(idstr.len()).map_err(|_| EncodeError::NameTooLong(idstr.to_string()))?;
        let mut v = Vec::with_capacity(14 + idstr.len());
        v.push(t);
        v.extend_from_slice(&id.to_be_bytes());
        v.push(idstr_len);
        v.extend_from_slice(idstr.as_bytes());
        v.extend_from_slice(&instance.to_be_bytes());
        v.extend_from_slice(&version.to_be_bytes());
        Ok(self.put(&v)?)
    }

    /// SECTION_START header.
    pub fn section_start(&mut self, id: u32, idstr: &str, instance: u32, version: u32) -> Result<(), EncodeError> {
        self.section_with_idstr(QEMU_VM_SECTION_START, id, idstr, instance, version)
    }

    /// SECTION_FULL header.
    pub fn section_full(&mut self, id: u32, idstr: &str, instance: u32, version: u32) -> Result<(), EncodeError> {
        self.section_with_idstr(QEMU_VM_SECTION_FULL, id, idstr, instance, version)
    }

    /// SECTION_PART header.
    pub fn section_part(&mut self, id: u32) -> Result<(), EncodeError> {
        let mut b = [QEMU_VM_SECTION_PART, 0, 0, 0, 0];
        b[1..].copy_from_slice(&id.to_be_bytes());
        Ok(self.put(&b)?)
    }

    /// SECTION_END header.
    pub fn section_end(&mut self, id: u32) -> Result<(), EncodeError> {
        let mut b = [QEMU_VM_SECTION_END, 0, 0, 0, 0];
        b[1..].copy_from_slice(&id.to_be_bytes());
        Ok(self.put(&b)?)
    }

    /// Section footer (`0x7e`, be32 id).
    pub fn footer(&mut self, id: u32) -> Result<(), EncodeError> {
        let mut b = [QEMU_VM_SECTION_FOOTER, 0, 0, 0, 0];
        b[1..].copy_from_slice(&id.to_be_bytes());
        Ok(self.put(&b)?)
    }

    /// MEM_SIZE record with the block list (inside the RAM START section); resets CONTINUE.
    pub fn ram_block_list(&mut self, blocks: &[RamBlock]) -> Result<(), EncodeError> {
        let mut v = Vec::new();
        // 7.2 does not count the setup block list in `ram.transferred`.
        ram::write_block_list(&mut v, blocks)?;
        self.put(&v)?;
        self.blocks = blocks.to_vec();
        self.last_block = None;
        Ok(())
    }

    fn record(&mut self, block: usize, offset: u64, flags: u64) -> Result<(), EncodeError> {
        let b = self.blocks.get(block).ok_or_else(|| EncodeError::BadRecord(format!("no RAM block {block}")))?;
        if !offset.is_multiple_of(self.tps as u64) || offset + self.tps as u64 > b.length {
            return Err(EncodeError::BadRecord(format!("offset {offset:#x} outside block '{}'", b.name)));
        }
        let mut buf = [0u8; MAX_RECORD_HEADER];
        let name = (self.last_block != Some(block)).then_some(b.name.as_str());
        let n = ram::record_header(&mut buf, offset, flags, name)?;
        self.put(&buf[..n])?;
        self.stats.transferred += n as u64;
        self.last_block = Some(block);
        Ok(())
    }

    /// A PAGE record with `data` (one target page).
    pub fn ram_page(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), EncodeError> {
        if data.len() != self.tps {
            return Err(EncodeError::BadRecord(format!("page of {} bytes", data.len())));
        }
        self.record(block, offset, ram_flags::PAGE)?;
        self.put(data)?;
        self.stats.normal += 1;
        self.stats.transferred += data.len() as u64;
        Ok(())
    }

    /// The header of a PAGE record, counted as a sent page: the caller writes the
    /// page's bytes itself right after (e.g. queued in place for a vectored send).
    pub fn ram_page_header(&mut self, block: usize, offset: u64) -> Result<(), EncodeError> {
        self.record(block, offset, ram_flags::PAGE)?;
        self.stats.normal += 1;
        self.stats.transferred += self.tps as u64;
        Ok(())
    }

    /// A ZERO record (fill byte 0).
    pub fn ram_zero(&mut self, block: usize, offset: u64) -> Result<(), EncodeError> {
        self.record(block, offset, ram_flags::ZERO)?;
        self.put(&[0])?;
        self.stats.duplicate += 1;
        self.stats.transferred += 1;
        Ok(())
    }

    /// ZERO when `data` is all zero, PAGE otherwise; returns true for a zero page.
    pub fn ram_page_auto(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<bool, EncodeError> {
        if is_zero_page(data) {
            self.ram_zero(block, offset)?;
            Ok(true)
        } else {
            self.ram_page(block, offset, data)?;
            Ok(false)
        }
    }

    /// An XBZRLE record carrying `delta` (1..=page size bytes, from [`crate::xbzrle::encode`]).
    pub fn ram_xbzrle(&mut self, block: usize, offset: u64, delta: &[u8]) -> Result<(), EncodeError> {
        if delta.is_empty() || delta.len() > self.tps {
            return Err(EncodeError::BadRecord(format!("XBZRLE delta of {} bytes", delta.len())));
        }
        self.record(block, offset, ram_flags::XBZRLE)?;
        let mut h = [ENCODING_FLAG_XBZRLE, 0, 0];
        let len =
            u16::try_from(delta.len()).map_err(|_| EncodeError::TooLong { what: "XBZRLE delta", len: delta.len() })?;
        h[1..].copy_from_slice(&len.to_be_bytes());
        self.put(&h)?;
        self.put(delta)?;
        self.stats.xbzrle += 1;
        self.stats.transferred += 3 + delta.len() as u64;
        Ok(())
    }

    /// End-of-section record.
    pub fn ram_eos(&mut self) -> Result<(), EncodeError> {
        Ok(self.put(&ram_flags::EOS.to_be_bytes())?)
    }

    /// A command record.
    pub fn command(&mut self, c: &Command) -> Result<(), EncodeError> {
        Ok(self.put(&c.encode())?)
    }

    /// MIG_CMD_PACKAGED followed by `blob`, a nested stream (QEMU's postcopy
    /// package: LISTEN, the device sections, RUN).
    pub fn packaged(&mut self, blob: &[u8]) -> Result<(), EncodeError> {
        let len = u32::try_from(blob.len()).map_err(|_| EncodeError::TooLong { what: "package", len: blob.len() })?;
        self.command(&Command::Packaged(len))?;
        Ok(self.put(blob)?)
    }

    /// Forget the last RAM block written, so the next record names its block (QEMU
    /// resets it after the postcopy discards).
    pub fn reset_continue(&mut self) {
        self.last_block = None;
    }

    /// A writer with the same RAM blocks, target page size and CONTINUE state over
    /// another `Write` (e.g. the postcopy package), for sections only.
    pub fn nested<V: Write>(&self, w: V) -> StreamWriter<V> {
        StreamWriter {
            w,
            written: 0,
            tps: self.tps,
            blocks: self.blocks.clone(),
            last_block: None,
            devices: vec![],
            stats: RamStats::default(),
        }
    }

    /// A whole FULL device section (header, body, footer), remembered for the vmdesc.
    pub fn device(
        &mut self,
        id: u32,
        idstr: &str,
        instance: u32,
        vmsd: &Vmsd,
        state: &State,
    ) -> Result<(), EncodeError> {
        let body = vmstate::encode_to_vec(vmsd, state)?;
        let desc = vmstate::vmdesc(idstr, instance, vmsd, state)?;
        self.section_full(id, idstr, instance, vmsd.version_id)?;
        self.put(&body)?;
        self.footer(id)?;
        self.devices.push(desc);
        Ok(())
    }

    /// A writer for a section body the caller writes by hand (a hand-written device's
    /// bytes, a live handler's START/PART/END body), between a section header and its
    /// [`footer`](Self::footer). Its bytes count in [`bytes_written`](Self::bytes_written).
    pub fn body(&mut self) -> BodyWriter<'_, W> {
        BodyWriter { s: self, written: 0, error: None }
    }

    /// Remember a hand-written FULL section of `size` body bytes for the vmdesc, in
    /// QEMU's old-style shape ([`vmstate::old_style_vmdesc`]).
    pub fn old_style_device(&mut self, idstr: &str, instance: u32, size: u64) {
        self.devices.push(vmstate::old_style_vmdesc(idstr, instance, size));
    }

    /// A whole FULL section of a hand-written device whose body is `body` (header,
    /// bytes, footer), remembered for the vmdesc in QEMU's old-style shape.
    pub fn raw_device(
        &mut self,
        id: u32,
        idstr: &str,
        instance: u32,
        version: u32,
        body: &[u8],
    ) -> Result<(), EncodeError> {
        self.section_full(id, idstr, instance, version)?;
        self.put(body)?;
        self.footer(id)?;
        self.old_style_device(idstr, instance, body.len() as u64);
        Ok(())
    }

    /// The EOF byte.
    pub fn eof(&mut self) -> Result<(), EncodeError> {
        Ok(self.put(&[QEMU_VM_EOF])?)
    }

    /// The vmdesc record for the devices written, in QEMU's JSON layout.
    pub fn vmdesc(&mut self) -> Result<(), EncodeError> {
        let doc = json!({"page_size": self.tps, "devices": self.devices});
        let text = to_qemu_json(&doc);
        let mut h = [QEMU_VM_VMDESCRIPTION, 0, 0, 0, 0];
        let len = u32::try_from(text.len()).map_err(|_| EncodeError::TooLong { what: "vmdesc", len: text.len() })?;
        h[1..].copy_from_slice(&len.to_be_bytes());
        self.put(&h)?;
        Ok(self.put(text.as_bytes())?)
    }
}

/// A section body written by hand, from [`StreamWriter::body`]. It counts the bytes
/// that went through it and keeps the first error of the underlying writer, so a
/// device that turns that error into its own message cannot hide it.
pub struct BodyWriter<'s, W: Write> {
    s: &'s mut StreamWriter<W>,
    written: u64,
    error: Option<io::Error>,
}

impl<W: Write> BodyWriter<'_, W> {
    /// Body bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The first error of the underlying writer, if any (taken).
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    fn keep(&mut self, e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::Interrupted {
            return e;
        }
        let copy = io::Error::new(e.kind(), e.to_string());
        if self.error.is_none() {
            self.error = Some(e);
        }
        copy
    }
}

impl<W: Write> Write for BodyWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.s.w.write(buf) {
            Ok(n) => {
                self.s.written += n as u64;
                self.written += n as u64;
                Ok(n)
            }
            Err(e) => Err(self.keep(e)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.s.w.flush().map_err(|e| self.keep(e))
    }
}

/// Serialise JSON the way QEMU's JSON writer does: compact, with `", "` between
/// members and elements and `": "` after keys.
pub fn to_qemu_json(v: &Json) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
    // Serialising a Value into a Vec cannot fail.
    let _ = serde::Serialize::serialize(v, &mut ser);
    String::from_utf8_lossy(&out).into_owned()
}

struct QemuFormatter;

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

/// Options of [`write_stopped_guest`].
#[derive(Debug, Clone)]
pub struct StoppedGuest {
    /// Machine type in the configuration record (`none`).
    pub machine: String,
    /// Runstate recorded in `globalstate` (`prelaunch` as for a guest started with `-S`).
    pub runstate: String,
    /// `timer` `cpu_ticks_offset`.
    pub cpu_ticks_offset: i64,
    /// `timer` `cpu_clock_offset`.
    pub cpu_clock_offset: i64,
}

impl Default for StoppedGuest {
    fn default() -> Self {
        StoppedGuest { machine: "none".into(), runstate: "prelaunch".into(), cpu_ticks_offset: 0, cpu_clock_offset: 0 }
    }
}

/// Section ids QEMU 7.2 uses for a `-machine none` guest.
pub mod section_ids {
    /// `timer`.
    pub const TIMER: u32 = 0;
    /// `ram`.
    pub const RAM: u32 = 2;
    /// `globalstate`.
    pub const GLOBALSTATE: u32 = 4;
}

/// The start of a stream: header, configuration (`opts.machine`) and the RAM START
/// section (block list, EOS, footer). Pages follow in PART/END sections.
pub fn write_guest_prologue<W: Write>(
    s: &mut StreamWriter<W>,
    blocks: &[RamBlock],
    opts: &StoppedGuest,
) -> Result<(), EncodeError> {
    write_guest_prologue_with(s, blocks, opts, &[])
}

/// [`write_guest_prologue`] with `commands` between the configuration record and
/// RAM's START, where QEMU 7.2 puts OPEN_RETURN_PATH and PING 1.
pub fn write_guest_prologue_with<W: Write>(
    s: &mut StreamWriter<W>,
    blocks: &[RamBlock],
    opts: &StoppedGuest,
    commands: &[Command],
) -> Result<(), EncodeError> {
    let tps = s.page_size() as u64;
    for b in blocks {
        if b.length == 0 || b.length % tps != 0 {
            return Err(EncodeError::BadRecord(format!(
                "block '{}' length {} is not a positive multiple of {tps}",
                b.name, b.length
            )));
        }
    }
    s.header()?;
    s.configuration(&Configuration { machine: opts.machine.clone(), ..Default::default() })?;
    for c in commands {
        s.command(c)?;
    }
    s.section_start(section_ids::RAM, RAM_IDSTR, 0, RAM_VERSION)?;
    s.ram_block_list(blocks)?;
    s.ram_eos()?;
    s.footer(section_ids::RAM)
}

/// The part after the pages: EOS and footer of the PART, an empty END, `timer`,
/// `globalstate`, EOF and the vmdesc.
pub fn write_guest_epilogue<W: Write>(s: &mut StreamWriter<W>, opts: &StoppedGuest) -> Result<(), EncodeError> {
    s.ram_eos()?;
    s.stats.transferred += 8; // 7.2 counts the EOS of PART sections
    s.footer(section_ids::RAM)?;
    s.section_end(section_ids::RAM)?;
    s.ram_eos()?;
    s.footer(section_ids::RAM)?;
    let timer = crate::builtin::timer();
    s.device(
        section_ids::TIMER,
        "timer",
        0,
        &timer,
        &crate::builtin::timer_state(opts.cpu_ticks_offset, opts.cpu_clock_offset),
    )?;
    let gs = crate::builtin::globalstate();
    s.device(section_ids::GLOBALSTATE, "globalstate", 0, &gs, &crate::builtin::globalstate_state(&opts.runstate))?;
    s.eof()?;
    s.vmdesc()
}

/// Write the whole stream of a stopped `-machine none` guest in QEMU 7.2's layout:
/// RAM START (block list), one PART with every page (zero pages as ZERO records),
/// an empty END, `timer`, `globalstate`, EOF and vmdesc. For a guest QEMU would
/// send in one pass, the bytes equal QEMU's own.
pub fn write_stopped_guest<W: Write>(
    w: W,
    blocks: &[(&str, &[u8])],
    opts: &StoppedGuest,
) -> Result<(W, RamStats), EncodeError> {
    let mut s = StreamWriter::new(w);
    let tps = s.page_size();
    let list: Vec<RamBlock> =
        blocks.iter().enumerate().map(|(i, (n, d))| RamBlock::new(i, *n, d.len() as u64)).collect();
    write_guest_prologue(&mut s, &list, opts)?;
    s.section_part(section_ids::RAM)?;
    for (i, (_, data)) in blocks.iter().enumerate() {
        for (p, page) in data.chunks_exact(tps).enumerate() {
            s.ram_page_auto(i, (p * tps) as u64, page)?;
        }
    }
    write_guest_epilogue(&mut s, opts)?;
    let stats = s.stats;
    Ok((s.finish()?, stats))
}
