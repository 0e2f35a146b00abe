//! `qmig analyze`: decode a whole stream and describe it as one JSON document,
//! optionally writing RAM blocks' final images to sparse files.

use crate::error::{Error, Result};
use crate::ramfile::ImageSink;
use savevm_format::multifd::ChannelReader;
use savevm_format::{find_trailing_vmdesc, Command, Decoder, Event, PageSink, RamBlock, TARGET_PAGE_SIZE};
use serde_json::{json, Map, Value as Json};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How far from the end of a file the vmdesc is looked for.
const VMDESC_TAIL: u64 = 16 << 20;

/// What `analyze` should do besides describing the stream.
#[derive(Debug, Default, Clone)]
pub struct AnalyzeOptions {
    /// `(block name, path)`: write the block's final RAM image there.
    pub extract: Vec<(String, PathBuf)>,
    /// Multifd channel captures (one file per channel) whose pages belong to this stream.
    pub multifd_channels: Vec<PathBuf>,
}

/// Analyze the stream in file `path`. If the file ends with a vmdesc, devices
/// without a built-in description are decoded from it; a hand-written (old-style)
/// device is its `data` buffer of the size the vmdesc records, as in QEMU's
/// `analyze-migration.py`.
pub fn analyze(path: &Path, opts: &AnalyzeOptions) -> Result<Json> {
    let mut f = File::open(path).map_err(|e| Error::file(path, e))?;
    let len = f.metadata().map_err(|e| Error::file(path, e))?.len();
    let start = len.saturating_sub(VMDESC_TAIL);
    f.seek(SeekFrom::Start(start)).map_err(|e| Error::file(path, e))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).map_err(|e| Error::file(path, e))?;
    let vmdesc = find_trailing_vmdesc(&tail).map(|(j, _)| j);
    drop(tail);
    f.seek(SeekFrom::Start(0)).map_err(|e| Error::file(path, e))?;
    let channels = opts
        .multifd_channels
        .iter()
        .map(|p| {
            File::open(p)
                .map(|f| ChannelReader::new(BufReader::with_capacity(1 << 20, f), TARGET_PAGE_SIZE as u64))
                .map_err(|e| Error::file(p, e))
        })
        .collect::<Result<Vec<_>>>()?;
    analyze_reader(BufReader::with_capacity(1 << 20, f), vmdesc.as_ref(), &opts.extract, channels)
}

#[derive(Default, Clone, Copy)]
struct PageCounts {
    normal: u64,
    zero: u64,
    xbzrle: u64,
    compressed: u64,
    multifd: u64,
}

/// Analyze a stream from any reader. `vmdesc` (if known in advance) decodes devices
/// without built-in descriptions; `channels` are multifd channels to merge.
pub fn analyze_reader<R: Read, C: Read>(
    reader: R,
    vmdesc: Option<&Json>,
    extract: &[(String, PathBuf)],
    mut channels: Vec<ChannelReader<C>>,
) -> Result<Json> {
    let mut d = Decoder::new(reader);
    if let Some(v) = vmdesc {
        d.set_vmdesc(v)?;
    }
    let mut sink = ImageSink::extract(extract.to_vec());
    let mut out = Map::new();
    let mut sections = Vec::new();
    let mut commands = Vec::new();
    let mut devices = Map::new();
    let mut blocks: Vec<RamBlock> = Vec::new();
    let mut counts: Vec<PageCounts> = Vec::new();
    let mut current: Option<(String, u32)> = None;
    let mut vmdesc_out = Json::Null;
    let mut eof = false;
    let mut tps = TARGET_PAGE_SIZE as u64;
    while let Some(ev) = d.next_with(&mut sink)? {
        match ev {
            Event::Header { version } => {
                out.insert("header".into(), json!({"version": version}));
            }
            Event::Configuration(c) => {
                let mut m = Map::new();
                m.insert("name".into(), json!(c.machine));
                if let Some(b) = c.target_page_bits {
                    m.insert("target_page_bits".into(), json!(b));
                    tps = 1 << b;
                    for ch in channels.iter_mut() {
                        ch.set_page_size(tps);
                    }
                }
                m.insert("capabilities".into(), json!(c.capabilities));
                if let Some(u) = c.uuid {
                    m.insert("uuid".into(), json!(savevm_format::vmstate::hex(&u)));
                }
                out.insert("configuration".into(), Json::Object(m));
            }
            Event::SectionStart(h) => {
                sections.push(json!({
                    "id": h.section_id, "name": h.idstr, "instance_id": h.instance_id,
                    "version": h.version, "kind": h.kind.as_str(), "offset": h.offset,
                }));
                current = Some((h.idstr, h.instance_id));
            }
            Event::RamBlocks(b) => {
                blocks = b.to_vec();
                counts = vec![PageCounts::default(); blocks.len()];
            }
            Event::Page { block, .. } => counts[block.index].normal += 1,
            Event::ZeroPage { block, .. } => counts[block.index].zero += 1,
            Event::XbzrlePage { block, .. } => counts[block.index].xbzrle += 1,
            Event::CompressedPage { block, .. } => counts[block.index].compressed += 1,
            Event::RamEos => {
                for ch in channels.iter_mut() {
                    drain_to_sync(ch, &blocks, &mut counts, &mut sink, tps)?;
                }
            }
            // No handler is registered raw here: old-style devices decode from the vmdesc.
            Event::MultifdFlush | Event::SectionEnd { .. } | Event::PackageEnd | Event::RawBody(_) => {}
            Event::Device { state, .. } => {
                if let Some((name, inst)) = &current {
                    let key = if *inst == 0 { name.clone() } else { format!("{name} ({inst})") };
                    devices.insert(key, state.to_json());
                }
            }
            Event::Command(c) => commands.push(command_json(&c)),
            Event::Eof => eof = true,
            Event::VmDescription(j) => vmdesc_out = j,
        }
    }
    for ch in channels.iter_mut() {
        while drain_to_sync(ch, &blocks, &mut counts, &mut sink, tps)? {}
    }
    for (name, _) in extract {
        if !blocks.iter().any(|b| &b.name == name && sink.has(b.index)) {
            let have: Vec<&str> = blocks.iter().map(|b| b.name.as_str()).collect();
            return Err(Error::Usage(format!("RAM block '{name}' is not in the stream (it has: {})", have.join(", "))));
        }
    }
    sink.flush()?;
    let ram_blocks: Vec<Json> = blocks
        .iter()
        .zip(&counts)
        .map(|(b, c)| {
            let mut pages = json!({"normal": c.normal + c.multifd, "zero": c.zero, "xbzrle": c.xbzrle});
            if c.compressed > 0 {
                pages["compressed"] = json!(c.compressed);
            }
            if c.multifd > 0 {
                pages["multifd"] = json!(c.multifd);
            }
            json!({"name": b.name, "length": b.length, "pages": pages})
        })
        .collect();
    out.insert("sections".into(), Json::Array(sections));
    out.insert("commands".into(), Json::Array(commands));
    out.insert("ram".into(), json!({"page_size": tps, "blocks": ram_blocks}));
    out.insert("devices".into(), Json::Object(devices));
    out.insert("eof".into(), json!(eof));
    out.insert("vmdesc".into(), vmdesc_out);
    Ok(Json::Object(out))
}

/// Apply one channel's packets up to and including its next SYNC packet (QEMU 7.2
/// syncs every channel at each RAM EOS). Returns false when the channel has ended.
fn drain_to_sync<C: Read>(
    ch: &mut ChannelReader<C>,
    blocks: &[RamBlock],
    counts: &mut [PageCounts],
    sink: &mut ImageSink,
    tps: u64,
) -> Result<bool> {
    loop {
        let Some((h, data)) = ch.next_packet()? else { return Ok(false) };
        if h.normal_pages > 0 {
            let b = blocks.iter().find(|b| b.name == h.block).ok_or_else(|| {
                Error::Usage(format!("multifd packet {} names unknown RAM block '{}'", h.packet_num, h.block))
            })?;
            for (i, &off) in h.offsets.iter().enumerate() {
                if off % tps != 0 || off.checked_add(tps).is_none_or(|e| e > b.length) {
                    return Err(Error::Usage(format!(
                        "multifd packet {}: illegal RAM offset {off:#x} in block '{}'",
                        h.packet_num, b.name
                    )));
                }
                let page = usize::try_from(tps)
                    .ok()
                    .and_then(|t| data.get(i.checked_mul(t)?..i.checked_add(1)?.checked_mul(t)?))
                    .ok_or_else(|| {
                        Error::Usage(format!("multifd packet {}: page {i} is past its data", h.packet_num))
                    })?;
                if let Some(mut slot) = sink.page_mut(b, off) {
                    slot.copy_from(page);
                }
                counts[b.index].multifd += 1;
            }
        }
        if h.is_sync() {
            return Ok(true);
        }
    }
}

fn command_json(c: &Command) -> Json {
    let mut m = Map::new();
    m.insert("name".into(), json!(c.name()));
    match c {
        Command::Ping(v) => {
            m.insert("value".into(), json!(v));
        }
        Command::PostcopyAdvise(Some((a, b))) => {
            m.insert("ram_pagesize_summary".into(), json!(a));
            m.insert("target_page_size".into(), json!(b));
        }
        Command::PostcopyRamDiscard { block, ranges } => {
            m.insert("block".into(), json!(block));
            m.insert("ranges".into(), json!(ranges));
        }
        Command::Packaged(n) => {
            m.insert("length".into(), json!(n));
        }
        Command::RecvBitmap(b) => {
            m.insert("block".into(), json!(b));
        }
        _ => {}
    }
    Json::Object(m)
}
