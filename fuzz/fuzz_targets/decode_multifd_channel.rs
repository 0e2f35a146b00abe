//! One multifd channel (initial packet, then page packets with raw, zlib or zstd
//! payloads) from arbitrary bytes: read every packet until a clean end or a typed error.
#![no_main]

// The workspace's allocation guard, included by path (this crate is outside the
// workspace): inputs are at most a few MiB, so no decoder allocation needs more
// than 128 MiB at once or 1 GiB in total.
#[allow(dead_code)]
#[path = "../../testkit/src/alloc_guard.rs"]
mod alloc_guard;
#[global_allocator]
static GUARD: alloc_guard::AllocGuard = alloc_guard::AllocGuard::new(128 << 20, 1 << 30);

use libfuzzer_sys::fuzz_target;
use savevm_format::multifd::{ChannelReader, MULTIFD_PACKET_SIZE};

const TPS: u64 = savevm_format::TARGET_PAGE_SIZE as u64;

fuzz_target!(|data: &[u8]| {
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
});
