//! One multifd channel (initial packet, then page packets with raw, zlib or zstd
//! payloads) from arbitrary bytes: read every packet until a clean end or a typed error.
//!
//! Shared by the fuzz target (`fuzz/fuzz_targets/decode_multifd_channel.rs`) and the corpus test
//! (`tests/fuzz_corpus.rs`), which runs every committed corpus input and reproducer.
use savevm_format::multifd::{ChannelReader, MULTIFD_PACKET_SIZE};

const TPS: u64 = savevm_format::TARGET_PAGE_SIZE as u64;

/// One fuzz input, as the fuzz target and the corpus test (`tests/fuzz_corpus.rs`) run it.
pub fn run(data: &[u8]) {
    let mut r = ChannelReader::new(data, TPS);
    if r.initial().is_err() {
        return;
    }
    let slots = r.pages_per_packet();
    assert_eq!(slots, MULTIFD_PACKET_SIZE / TPS);
    // A packet header alone is 1344 bytes, so a run has few packets.
    let max_packets = data.len() / 1344 + 2;
    let mut packets = 0;
    loop {
        match r.next_packet() {
            Ok(Some((h, pages))) => {
                packets += 1;
                assert!(packets <= max_packets, "channel reader does not make progress");
                assert!(h.pages_alloc as u64 <= slots);
                assert!(h.normal_pages <= h.pages_alloc);
                assert_eq!(h.offsets.len(), h.normal_pages as usize);
                assert_eq!(pages.len() as u64, h.normal_pages as u64 * TPS);
                assert!(h.block.len() <= 256 * 3); // lossy UTF-8 of at most 256 bytes
            }
            Ok(None) => break,
            Err(e) => {
                assert!(e.offset <= data.len() as u64, "error offset {} past the input", e.offset);
                let _ = e.to_string();
                break;
            }
        }
    }
}
