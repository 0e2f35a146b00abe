//! The destination's multifd receiving state machine on one channel (sans-IO, as
//! the engine's receiver threads run it): the initial packet checked against the
//! destination (uuid, id below `multifd-channels`), then every packet decoded with
//! the destination's `multifd-compression` required, its pages checked against the
//! block list and placed, SYNCs counted; for each of none, zlib and zstd.
#![no_main]

#[allow(dead_code)]
#[path = "../../testkit/src/alloc_guard.rs"]
mod alloc_guard;
#[global_allocator]
static GUARD: alloc_guard::AllocGuard = alloc_guard::AllocGuard::new(128 << 20, 1 << 30);

use libfuzzer_sys::fuzz_target;
use savevm_format::multifd::{check_initial, check_pages, ChannelExpect, ChannelReader, Compression};
use savevm_format::RamBlock;
use std::collections::HashMap;

const TPS: u64 = savevm_format::TARGET_PAGE_SIZE as u64;

fuzz_target!(|data: &[u8]| {
    let blocks = [RamBlock::new(0, "mem", 8 << 20), RamBlock::new(1, "pc.rom", 64 << 10)];
    for compression in [Compression::None, Compression::Zlib, Compression::Zstd] {
        let expect = ChannelExpect { uuid: [0; 16], channels: 4, compression };
        let mut r = ChannelReader::new(data, TPS);
        r.expect_compression(compression);
        let Ok(init) = r.initial().cloned() else { continue };
        if check_initial(&init, &expect).is_err() {
            continue;
        }
        assert!(init.channel_id < 4);
        // Destination RAM, sparse: at most one page per page of input placed.
        let mut ram: HashMap<(usize, u64), Box<[u8; 4096]>> = HashMap::new();
        let mut packets = 0usize;
        loop {
            match r.next_packet() {
                Ok(Some((h, pages))) => {
                    packets += 1;
                    assert!(packets <= data.len() / 1344 + 2, "no progress");
                    match check_pages(&h, &blocks, TPS) {
                        Ok(Some(b)) => {
                            for (i, &off) in h.offsets.iter().enumerate() {
                                assert!(off % TPS == 0 && off + TPS <= b.length);
                                let src = &pages[i * 4096..(i + 1) * 4096];
                                ram.entry((b.index, off)).or_insert_with(|| Box::new([0; 4096])).copy_from_slice(src);
                            }
                        }
                        Ok(None) => assert_eq!(h.normal_pages, 0),
                        Err(e) => {
                            let _ = e.to_string();
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(e.offset <= data.len() as u64, "error offset {} past the input", e.offset);
                    break;
                }
            }
        }
        assert!(ram.len() as u64 <= (data.len() as u64 / 16).max(1) * 4, "pages placed beyond what the input holds");
    }
});
