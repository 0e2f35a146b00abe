//! The multifd encoder against the channel reader: packets of QEMU 7.2's size,
//! SYNC flags, one persistent zlib/zstd stream per channel, and the receive checks.

use savevm_format::multifd::{
    check_initial, check_pages, header_len, ChannelExpect, ChannelReader, Compression, InitialPacket, PacketCompressor,
    PacketHeader, MULTIFD_FLAG_SYNC,
};
use savevm_format::{ErrorKind, RamBlock};

const TPS: u64 = 4096;

fn page(i: u64) -> Vec<u8> {
    (0..TPS).map(|b| ((b * 7 + i * 13) % 251) as u8).collect()
}

/// A channel: initial packet, two data packets (128 and 3 pages), a SYNC.
fn channel(c: Compression) -> Vec<u8> {
    let mut out = InitialPacket { uuid: [0; 16], channel_id: 1 }.encode().to_vec();
    let mut comp = PacketCompressor::new(c, 1).expect("compressor");
    let mut payload = Vec::new();
    let mut num = 0;
    for n in [128u64, 3] {
        let pages: Vec<Vec<u8>> = (0..n).map(page).collect();
        let refs: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
        match comp.as_mut() {
            Some(z) => z.compress(&refs, &mut payload).expect("compress"),
            None => payload = pages.concat(),
        }
        let h = PacketHeader {
            flags: c.flag(),
            pages_alloc: 128,
            normal_pages: n as u32,
            next_packet_size: payload.len() as u32,
            packet_num: num,
            block: "mem".into(),
            offsets: (0..n).map(|i| i * TPS).collect(),
        };
        num += 2;
        h.encode(TPS, &mut out).expect("encode");
        out.extend_from_slice(&payload);
    }
    let sync = PacketHeader {
        flags: MULTIFD_FLAG_SYNC | c.flag(),
        pages_alloc: 128,
        normal_pages: 0,
        next_packet_size: 0,
        packet_num: num,
        block: String::new(),
        offsets: vec![],
    };
    sync.encode(TPS, &mut out).expect("encode");
    out
}

#[test]
fn encoded_channels_decode_for_every_compression() {
    assert_eq!(header_len(TPS), 1344);
    let blocks = [RamBlock::new(0, "mem", 1 << 20)];
    for c in [Compression::None, Compression::Zlib, Compression::Zstd] {
        let bytes = channel(c);
        let mut r = ChannelReader::new(&bytes[..], TPS);
        r.expect_compression(c);
        let init = r.initial().expect("initial").clone();
        let expect = ChannelExpect { uuid: [0; 16], channels: 2, compression: c };
        check_initial(&init, &expect).expect("channel 1 of 2");
        let mut seen = 0u64;
        let mut syncs = 0;
        while let Some((h, data)) = r.next_packet().expect("packet") {
            let b = check_pages(&h, &blocks, TPS).expect("pages in the block");
            for (i, off) in h.offsets.iter().enumerate() {
                assert_eq!(&data[i * 4096..(i + 1) * 4096], &page(off / TPS)[..], "{c:?}");
                seen += 1;
            }
            assert_eq!(b.is_some(), h.normal_pages > 0);
            syncs += usize::from(h.is_sync());
        }
        assert_eq!((seen, syncs), (131, 1), "{c:?}");
        if c == Compression::Zlib {
            assert_eq!(&bytes[64 + 1344..64 + 1346], &[0x78, 0x01], "zlib header at level 1");
        }
        if c == Compression::Zstd {
            assert_eq!(&bytes[64 + 1344..64 + 1348], &[0x28, 0xb5, 0x2f, 0xfd], "zstd frame magic");
        }
    }
}

#[test]
fn receive_checks_refuse_hostile_values() {
    let e = ChannelExpect { uuid: [0; 16], channels: 2, compression: Compression::None };
    let bad_id = check_initial(&InitialPacket { uuid: [0; 16], channel_id: 2 }, &e);
    assert!(matches!(bad_id, Err(ErrorKind::Multifd(m)) if m.contains("out of range")));
    let bad_uuid = check_initial(&InitialPacket { uuid: [1; 16], channel_id: 0 }, &e);
    assert!(matches!(bad_uuid, Err(ErrorKind::Multifd(m)) if m.contains("uuid")));
    let blocks = [RamBlock::new(0, "mem", 8 * TPS)];
    let mut h = PacketHeader {
        flags: 0,
        pages_alloc: 128,
        normal_pages: 1,
        next_packet_size: 4096,
        packet_num: 3,
        block: "mem".into(),
        offsets: vec![8 * TPS],
    };
    assert!(matches!(check_pages(&h, &blocks, TPS), Err(ErrorKind::Multifd(m)) if m.contains("outside")));
    h.offsets = vec![7 * TPS + 1];
    assert!(check_pages(&h, &blocks, TPS).is_err());
    h.block = "other".into();
    assert!(matches!(check_pages(&h, &blocks, TPS), Err(ErrorKind::Multifd(m)) if m.contains("unknown")));
    // The wrong compression for the destination is refused by the reader.
    let bytes = channel(Compression::Zlib);
    let mut r = ChannelReader::new(&bytes[..], TPS);
    r.expect_compression(Compression::Zstd);
    assert!(r.next_packet().is_err());
}
