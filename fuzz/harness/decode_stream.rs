//! Whole-stream decoding of arbitrary bytes: every failure must be a typed
//! `Error`; a panic, a hang or a huge allocation is a bug.
//!
//! The input is decoded twice, once into a bounded in-memory `PageSink` and once
//! with no sink (`next()`), and both runs must yield the same events and the same
//! final result. A vmdesc found at the end of the input (`find_trailing_vmdesc`)
//! is handed to both decoders first, so vmdesc-driven device decoding is fuzzed too
//! (when the record's length no longer matches, the JSON after the last
//! `0x06, be32, '{'` is tried instead).
//!
//! Shared by the fuzz target (`fuzz/fuzz_targets/decode_stream.rs`) and the corpus test
//! (`tests/fuzz_corpus.rs`), which runs every committed corpus input and reproducer.
use savevm_format::{find_trailing_vmdesc, Decoder, Event, PageSink, RamBlock};
use std::collections::HashMap;

/// At most this many distinct pages are backed by the sink ...
const MAX_PAGES: usize = 4096;
/// ... and at most this many bytes (pages can be up to 64 KiB).
const MAX_BYTES: usize = 32 << 20;

/// Guest memory backed by a bounded map of (block index, page offset) -> page.
struct MapSink {
    tps: usize,
    pages: HashMap<(usize, u64), Box<[u8]>>,
    bytes: usize,
}

impl MapSink {
    fn new() -> Self {
        MapSink { tps: 4096, pages: HashMap::new(), bytes: 0 }
    }
}

impl PageSink for MapSink {
    fn page_mut(&mut self, block: &RamBlock, offset: u64) -> Option<savevm_format::PageSlot<'_>> {
        let tps = self.tps as u64;
        // The decoder promises an aligned, range-checked offset.
        assert_eq!(offset % tps, 0, "unaligned page offset {offset:#x}");
        assert!(
            offset.checked_add(tps).is_some_and(|e| e <= block.length),
            "page {offset:#x} outside block '{}' of {:#x} bytes",
            block.name,
            block.length
        );
        let key = (block.index, offset);
        if !self.pages.contains_key(&key) {
            if self.pages.len() >= MAX_PAGES || self.bytes + self.tps > MAX_BYTES {
                return None; // the decoder then hands the page out in the event
            }
            self.pages.insert(key, vec![0u8; self.tps].into_boxed_slice());
            self.bytes += self.tps;
        }
        // Every other page goes through the guest-memory (volatile) path.
        let guest = (offset / tps) % 2 == 1;
        self.pages.get_mut(&key).map(|p| {
            if guest {
                savevm_format::PageSlot::Guest(vm_memory::VolatileSlice::from(&mut p[..]))
            } else {
                savevm_format::PageSlot::Buffer(&mut p[..])
            }
        })
    }

    fn discard(&mut self, block: &RamBlock, start: u64, len: u64) {
        assert!(
            start.checked_add(len).is_some_and(|e| e <= block.length),
            "discard {start:#x}+{len:#x} outside block '{}' of {:#x} bytes",
            block.name,
            block.length
        );
        let end = start + len;
        let idx = block.index;
        self.pages.retain(|&(b, o), _| !(b == idx && o >= start && o < end));
    }
}

/// A compact, comparable record of one event.
fn tag(ev: &Event<'_>, tps: u64) -> (u8, u64) {
    match ev {
        Event::Header { version } => (0, *version as u64),
        Event::Configuration(c) => (1, c.machine.len() as u64),
        Event::SectionStart(h) => (2, h.section_id as u64),
        Event::RamBlocks(b) => (3, b.len() as u64),
        Event::Page { block, offset, data } => {
            if let Some(d) = data {
                assert_eq!(d.len() as u64, tps, "page data of the wrong size");
            }
            assert!(offset + tps <= block.length);
            (4, *offset)
        }
        Event::ZeroPage { block, offset, fill } => {
            assert!(offset + tps <= block.length);
            (5, *offset ^ *fill as u64)
        }
        Event::XbzrlePage { block, offset, delta } => {
            assert!(offset + tps <= block.length);
            assert!(delta.len() as u64 <= tps);
            (6, *offset)
        }
        Event::CompressedPage { block, offset, data } => {
            if let Some(d) = data {
                assert_eq!(d.len() as u64, tps, "inflated page of the wrong size");
            }
            assert!(offset + tps <= block.length);
            (7, *offset)
        }
        Event::MultifdFlush => (8, 0),
        Event::RamEos => (9, 0),
        Event::Device { state, .. } => {
            let j = state.to_json();
            (10, j.as_object().map_or(0, |o| o.len() as u64))
        }
        Event::SectionEnd { section_id, .. } => (11, *section_id as u64),
        Event::Command(c) => (12, c.number() as u64),
        Event::PackageEnd => (13, 0),
        Event::Eof => (14, 0),
        Event::VmDescription(j) => (15, j.is_object() as u64),
        // Raw bodies are read (and tagged) in `decode`, where the event is mutable.
        Event::RawBody(_) => (16, 0),
        #[allow(unreachable_patterns)]
        _ => (255, 0),
    }
}

/// Event tags in order, and the final error (offset, message) if any.
type Outcome = (Vec<(u8, u64)>, Option<(u64, String)>);

/// Decode `data` to completion.
fn decode(data: &[u8], vmdesc: Option<&serde_json::Value>, sink: Option<&mut MapSink>) -> Outcome {
    let mut d = Decoder::new(data);
    // Sections of these devices go to the loader in `decode` (hand-written state).
    d.register_raw("raw", 0);
    d.register_raw("live", 0);
    if let Some(j) = vmdesc {
        // A bad vmdesc is a typed error; decoding then goes on without it.
        let _ = d.set_vmdesc(j).map_err(|e| e.to_string());
    }
    let mut trace = Vec::new();
    let mut sink = sink;
    // Every event but PackageEnd consumes input, so a valid run is short.
    let max_events = 2 * data.len() + 16;
    loop {
        assert!(trace.len() <= max_events, "decoder does not make progress");
        let before = d.offset();
        // The page size is fixed by the configuration record, before any page.
        let tps = d.page_size();
        let r = match sink.as_deref_mut() {
            Some(s) => {
                s.tps = d.page_size() as usize;
                d.next_with(s)
            }
            None => d.next(),
        };
        match r {
            Ok(Some(Event::RawBody(mut body))) => {
                // A hand-written loader: reads a length byte, then that many bytes
                // (whatever is there: a short or long read is the decoder's to catch).
                let mut n = [0u8; 1];
                let _ = std::io::Read::read_exact(&mut body, &mut n);
                let mut buf = vec![0u8; n[0] as usize];
                let _ = std::io::Read::read_exact(&mut body, &mut buf);
                assert!(body.consumed() <= 256);
                trace.push((16, body.consumed()));
            }
            Ok(Some(ev)) => {
                trace.push(tag(&ev, tps));
            }
            Ok(None) => {
                // Done is sticky.
                assert!(matches!(d.next(), Ok(None)));
                return (trace, None);
            }
            Err(e) => {
                assert!(e.offset <= data.len() as u64, "error offset {} past the input", e.offset);
                let msg = e.to_string();
                assert!(d.offset() >= before);
                // After an error the decoder is finished.
                assert!(matches!(d.next(), Ok(None)));
                return (trace, Some((e.offset, msg)));
            }
        }
        assert!(d.offset() <= data.len() as u64);
    }
}

/// The vmdesc to hand to the decoders: the exact trailing record when there is
/// one, else (so that mutated JSON still reaches `set_vmdesc` even though its
/// length prefix no longer matches) the JSON after the last `0x06, be32, '{'`.
fn vmdesc_of(data: &[u8]) -> Option<serde_json::Value> {
    if let Some((j, pos)) = find_trailing_vmdesc(data) {
        assert!(pos < data.len());
        assert_eq!(data[pos], 0x06);
        return Some(j);
    }
    let pos = data.windows(6).rposition(|w| w[0] == 0x06 && w[5] == b'{')?;
    serde_json::from_slice(&data[pos + 5..]).ok()
}

/// One fuzz input, as the fuzz target and the corpus test (`tests/fuzz_corpus.rs`) run it.
pub fn run(data: &[u8]) {
    let vmdesc = vmdesc_of(data);
    let mut sink = MapSink::new();
    let (t1, r1) = decode(data, vmdesc.as_ref(), Some(&mut sink));
    assert!(sink.pages.len() <= MAX_PAGES && sink.bytes <= MAX_BYTES);
    let (t2, r2) = decode(data, vmdesc.as_ref(), None);
    assert_eq!(t1, t2, "events differ with and without a sink");
    assert_eq!(r1, r2, "result differs with and without a sink");
}
