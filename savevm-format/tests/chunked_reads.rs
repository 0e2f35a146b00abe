//! The decoder is a blocking pull decoder over `Read`: fed through a reader
//! that returns only 1..k bytes per call, it must yield exactly the events (and
//! the final error, at the same offset) it yields reading the whole buffer.
//! Streams: QEMU 7.2's fixture streams (whole, with their vmdesc, or cut short)
//! and streams the writer produces.

use proptest::prelude::*;
use savevm_format::{find_trailing_vmdesc, Decoder, PageSink, PageSlot, RamBlock, StoppedGuest, TARGET_PAGE_SIZE};
use std::collections::HashMap;
use std::io::Read;

/// A reader handing out its bytes in the sizes of `sizes`, round robin.
struct Trickle<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    call: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = self.sizes[self.call % self.sizes.len()];
        self.call += 1;
        let n = want.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// RAM pages by (block, offset), so page events carry no data and stay small.
#[derive(Default, PartialEq, Eq)]
struct Pages(HashMap<(String, u64), Vec<u8>>);

impl PageSink for Pages {
    fn page_mut(&mut self, b: &RamBlock, off: u64) -> Option<PageSlot<'_>> {
        if off >= b.length {
            return None;
        }
        Some(PageSlot::from(&mut self.0.entry((b.name.clone(), off)).or_insert_with(|| vec![0; TARGET_PAGE_SIZE])[..]))
    }
}

/// Every event (Debug), the final result, and the RAM the sink received.
fn decode(reader: impl Read, vmdesc: Option<&serde_json::Value>) -> (Vec<String>, String, Pages) {
    let mut d = Decoder::new(reader);
    if let Some(v) = vmdesc {
        d.set_vmdesc(v).expect("fixture vmdesc");
    }
    let mut pages = Pages::default();
    let mut events = Vec::new();
    let end = loop {
        match d.next_with(&mut pages) {
            Ok(Some(ev)) => events.push(format!("{ev:?}")),
            Ok(None) => break "end".to_string(),
            Err(e) => break format!("error at {}: {e}", e.offset),
        }
    };
    (events, end, pages)
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const FIXTURES: [&str; 5] = [
    "multifd-zstd-2ch-none-8m-mixed8-s7.mig",
    "postcopy-active-none-8m-mixed32-s3.mig",
    "pause-before-switchover-none-32m-mixed128-s4.mig",
    "precopy-none-16m-mixed32-s1.mig",
    "q35-kvm-64m.mig",
];

fn sizes(k: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1..=k, 1..12)
}

/// Decodes `stream` whole and through a [`Trickle`]; returns the final result.
fn same_through_trickle(stream: &[u8], sizes: Vec<usize>, vmdesc: Option<&serde_json::Value>) -> String {
    let whole = decode(stream, vmdesc);
    let trickled = decode(Trickle { data: stream, sizes, call: 0 }, vmdesc);
    assert_eq!(whole.1, trickled.1, "final result");
    assert_eq!(whole.0.len(), trickled.0.len(), "number of events");
    if let Some(i) = (0..whole.0.len()).find(|&i| whole.0[i] != trickled.0[i]) {
        panic!("event {i} differs: {} vs {}", whole.0[i], trickled.0[i]);
    }
    assert!(whole.2 == trickled.2, "RAM differs");
    whole.1
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whole fixture streams, their vmdesc supplied up front as `analyze` does.
    #[test]
    fn fixtures_whole(i in 0..FIXTURES.len(), sizes in sizes(64)) {
        let stream = fixture(FIXTURES[i]);
        let vmdesc = find_trailing_vmdesc(&stream).map(|(v, _)| v);
        let end = same_through_trickle(&stream, sizes, vmdesc.as_ref());
        prop_assert_eq!(end, "end");
    }

    /// Fixture streams cut anywhere: the same events, then the same error at the same offset.
    #[test]
    fn fixtures_cut(i in 0..FIXTURES.len(), cut in 0.0f64..1.0, sizes in sizes(9)) {
        let stream = fixture(FIXTURES[i]);
        let n = (stream.len() as f64 * cut) as usize;
        same_through_trickle(&stream[..n], sizes, None);
    }
}

fn guest() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let page = prop_oneof![
        2 => Just(vec![0u8; TARGET_PAGE_SIZE]),
        1 => prop::collection::vec(any::<u8>(), TARGET_PAGE_SIZE),
        1 => any::<u8>().prop_map(|b| vec![b; TARGET_PAGE_SIZE]),
    ];
    prop::collection::vec(("[a-z.]{1,12}", prop::collection::vec(page, 1..8)), 1..4).prop_map(|blocks| {
        let mut seen = std::collections::HashSet::new();
        blocks.into_iter().filter(|(n, _)| seen.insert(n.clone())).map(|(n, pages)| (n, pages.concat())).collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Streams the writer produces, read 1..k bytes at a time.
    #[test]
    fn writer_streams(blocks in guest(), sizes in sizes(17)) {
        let refs: Vec<(&str, &[u8])> = blocks.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        let (stream, _) = savevm_format::write_stopped_guest(Vec::new(), &refs, &StoppedGuest::default())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let vmdesc = find_trailing_vmdesc(&stream).map(|(v, _)| v);
        let end = same_through_trickle(&stream, sizes, vmdesc.as_ref());
        prop_assert_eq!(end, "end");
    }
}
