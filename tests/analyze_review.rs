//! `qmig analyze` against hostile inputs from the outside review (issue 13).

use savevm_format::multifd::{InitialPacket, MULTIFD_FLAG_SYNC, MULTIFD_MAGIC, MULTIFD_PACKET_SIZE, MULTIFD_VERSION};
use savevm_format::{section_ids, write_guest_epilogue, Configuration, RamBlock, StoppedGuest, StreamWriter};
use std::process::{Command, Stdio};

/// One multifd packet: `slots` offset slots, `offsets` used, then `data`.
fn packet(flags: u32, slots: u64, num: u64, offsets: &[u64], data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&MULTIFD_MAGIC.to_be_bytes());
    v.extend_from_slice(&MULTIFD_VERSION.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&u32::try_from(slots).expect("slots").to_be_bytes());
    v.extend_from_slice(&u32::try_from(offsets.len()).expect("pages").to_be_bytes());
    v.extend_from_slice(&u32::try_from(data.len()).expect("size").to_be_bytes());
    v.extend_from_slice(&num.to_be_bytes());
    v.extend_from_slice(&[0u8; 32]);
    let mut name = [0u8; 256];
    name[..3].copy_from_slice(b"mem");
    v.extend_from_slice(&name);
    for i in 0..slots {
        let o = usize::try_from(i).ok().and_then(|i| offsets.get(i)).copied().unwrap_or(0);
        v.extend_from_slice(&o.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

/// Bug 2: `analyze --multifd-channel` with 64 KiB target pages read the channel
/// as 4 KiB pages and panicked (exit 101) slicing a page out of its data. The
/// channel now takes the main stream's page size: a well-formed 64 KiB channel is
/// counted, and a packet laid out for 4 KiB pages is a one-line error.
#[test]
fn multifd_channel_takes_the_stream_page_size() {
    let dir = std::env::temp_dir().join(format!("qmig-analyze-review-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let tps = 1u64 << 16;
    let mut s = StreamWriter::new(Vec::new());
    s.header().expect("header");
    s.configuration(&Configuration { machine: "none".into(), target_page_bits: Some(16), ..Default::default() })
        .expect("config");
    s.section_start(section_ids::RAM, "ram", 0, 4).expect("start");
    s.ram_block_list(&[RamBlock::new(0, "mem", 4 * tps)]).expect("list");
    s.ram_eos().expect("eos");
    s.footer(section_ids::RAM).expect("footer");
    s.section_part(section_ids::RAM).expect("part");
    write_guest_epilogue(&mut s, &StoppedGuest::default()).expect("epilogue");
    std::fs::write(dir.join("main.mig"), s.finish().expect("finish")).expect("write");
    let initial = InitialPacket { uuid: [0; 16], channel_id: 0 }.encode();
    let page = vec![0xabu8; usize::try_from(tps).expect("tps")];
    let good_slots = MULTIFD_PACKET_SIZE / tps;
    let cases = [
        ("64k", packet(0, good_slots, 0, &[tps], &page), true),
        ("4k layout", packet(0, MULTIFD_PACKET_SIZE / 4096, 0, &[0], &[0xab; 4096]), false),
    ];
    for (what, p, ok) in cases {
        let mut ch = initial.to_vec();
        ch.extend_from_slice(&p);
        ch.extend_from_slice(&packet(MULTIFD_FLAG_SYNC, good_slots, 1, &[], &[]));
        std::fs::write(dir.join("ch0"), &ch).expect("write");
        let o = Command::new(env!("CARGO_BIN_EXE_qmig"))
            .args(["analyze", "--multifd-channel"])
            .arg(dir.join("ch0"))
            .arg(dir.join("main.mig"))
            .stdin(Stdio::null())
            .output()
            .expect("run qmig");
        let e = String::from_utf8_lossy(&o.stderr);
        if ok {
            assert!(o.status.success(), "{what}: {e}");
            let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
            assert_eq!(j["ram"]["blocks"][0]["pages"]["multifd"], 1, "{what}: {j}");
        } else {
            assert_eq!(o.status.code(), Some(1), "{what}: {e}");
            assert_eq!(e.lines().count(), 1, "{what}: {e}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
