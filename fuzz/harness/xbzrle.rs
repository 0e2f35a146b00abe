//! XBZRLE: decoding arbitrary deltas onto a page never panics and never writes
//! past it; `encode(old, new)` followed by `decode` onto a copy of `old` gives `new`.
//!
//! Shared by the fuzz target (`fuzz/fuzz_targets/xbzrle.rs`) and the corpus test
//! (`tests/fuzz_corpus.rs`), which runs every committed corpus input and reproducer.
use savevm_format::xbzrle::{decode, encode};

const PAGE: usize = savevm_format::TARGET_PAGE_SIZE;

/// A page from `bytes`, repeated cyclically (all zero when `bytes` is empty).
fn page_from(bytes: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    if !bytes.is_empty() {
        for (i, b) in p.iter_mut().enumerate() {
            *b = bytes[i % bytes.len()];
        }
    }
    p
}

/// One fuzz input, as the fuzz target and the corpus test (`tests/fuzz_corpus.rs`) run it.
pub fn run(data: &[u8]) {
    // 1. The whole input as a delta, onto a page with known contents.
    let base: Vec<u8> = (0..PAGE).map(|i| (i * 7 + 3) as u8).collect();
    let mut page = base.clone();
    if let Some(d) = decode(data, &mut page) {
        assert!(d <= PAGE);
        // Nothing beyond the decoded length changes.
        assert_eq!(&page[d..], &base[d..]);
    }
    // A delta may also target a shorter buffer (dlen checks).
    let mut small = vec![0u8; data.first().map_or(0, |&b| b as usize)];
    if let Some(d) = decode(data, &mut small) {
        assert!(d <= small.len());
    }

    // 2. Round trip. Byte 0 picks the split, byte 1 the output buffer size:
    //    `old` is the first part repeated over a page, `new` is `old` patched at
    //    (be16 position, value) triples from the second part.
    if data.len() < 2 {
        return;
    }
    let split = 2 + (data[0] as usize * (data.len() - 2)) / 255;
    let (a, b) = (&data[2..split], &data[split..]);
    let old = page_from(a);
    let mut new = old.clone();
    for t in b.chunks_exact(3) {
        let pos = u16::from_be_bytes([t[0], t[1]]) as usize % PAGE;
        new[pos] = t[2];
    }
    let dlen = match data[1] {
        0..=127 => PAGE,
        n => n as usize * 16,
    };
    for (o, n) in [(&old, &new), (&new, &old), (&old, &page_from(b))] {
        let mut dst = vec![0u8; dlen];
        if let Some(len) = encode(o, n, &mut dst) {
            assert!(len <= dlen);
            let mut out = o.clone();
            let d = decode(&dst[..len], &mut out).expect("encoded delta must decode");
            assert!(d <= PAGE);
            assert!(out == *n, "encode/decode round trip differs");
            if o == n {
                assert_eq!(len, 0);
            }
        }
    }
}
