//! The incoming side's guest-memory sink (`engine::sink::GuestSink`), issue 13 bug 1:
//! pages land at the stream's target page size (a 1 KiB ZERO record clears 1 KiB,
//! not its 4 KiB neighbourhood; a ZERO in a block's last 3 KiB is not dropped; a
//! 64 KiB record covers 64 KiB), and a block list that does not match the guest's
//! regions (unknown name, other length, a 16 TiB block) is refused before any page,
//! leaving the guest's memory as it was. Streams are built here.
#![cfg(feature = "vm-memory")]

use engine::incoming::{Incoming, IncomingError};
use engine::mmap::MmapRam;
use engine::sink::GuestSink;
use engine::vm::{VcpuControl, VmParts};
use std::sync::Arc;
use testkit::streams::paged_stream;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

struct NoVcpus;
impl VcpuControl for NoVcpus {}

const A: u64 = 256 << 10;
const B: u64 = 128 << 10;

/// Two regions `a` (256 KiB) and `b` (128 KiB), every byte 0x11.
fn guest() -> MmapRam {
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), A as usize), (GuestAddress(1 << 20), B as usize)])
            .expect("memory"),
    );
    mem.write_slice(&[0x11; A as usize], GuestAddress(0)).expect("fill a");
    mem.write_slice(&[0x11; B as usize], GuestAddress(1 << 20)).expect("fill b");
    MmapRam::new(mem, |i| ["a", "b"][i].to_string()).expect("regions")
}

/// Both regions' bytes.
fn contents(ram: &MmapRam) -> (Vec<u8>, Vec<u8>) {
    let (mut a, mut b) = (vec![0u8; A as usize], vec![0u8; B as usize]);
    ram.memory().read_slice(&mut a, GuestAddress(0)).expect("read a");
    ram.memory().read_slice(&mut b, GuestAddress(1 << 20)).expect("read b");
    (a, b)
}

fn load(ram: &MmapRam, stream: &[u8]) -> Result<engine::incoming::IncomingReport, IncomingError> {
    let mut sink = GuestSink::new(ram.regions());
    Incoming::new(false).run(stream, &mut sink, &mut VmParts::default(), &mut NoVcpus)
}

#[test]
fn pages_land_at_the_streams_target_page_size() {
    for bits in [10u32, 12, 13, 16] {
        let tps = 1u64 << bits;
        let page = |v: u8| vec![v; tps as usize];
        let stream = paged_stream(bits, &[("a", A), ("b", B)], |s| {
            s.ram_page(0, tps, &page(0xab)).expect("page");
            s.ram_zero(0, 2 * tps).expect("zero");
            // The block's last target page (for 1 KiB pages: inside its last 4 KiB).
            s.ram_zero(0, A - tps).expect("last zero");
            s.ram_page(0, A - 2 * tps, &page(0xcd)).expect("page");
            s.ram_page(1, 0, &page(0xef)).expect("page in b");
            s.ram_zero(1, B - tps).expect("last zero in b");
        });
        let ram = guest();
        let r = load(&ram, &stream).unwrap_or_else(|e| panic!("{tps}-byte pages: {e}"));
        assert_eq!((r.normal, r.duplicate), (3, 3), "{tps}");
        let (mut a, mut b) = (vec![0x11u8; A as usize], vec![0x11u8; B as usize]);
        let t = tps as usize;
        a[t..2 * t].fill(0xab);
        a[2 * t..3 * t].fill(0);
        a[A as usize - t..].fill(0);
        a[A as usize - 2 * t..A as usize - t].fill(0xcd);
        b[..t].fill(0xef);
        b[B as usize - t..].fill(0);
        let (got_a, got_b) = contents(&ram);
        for (name, got, want) in [("a", &got_a, &a), ("b", &got_b, &b)] {
            if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
                panic!("{tps}-byte pages: block {name} byte {i:#x} is {:#x}, want {:#x}", got[i], want[i]);
            }
        }
        assert_eq!(ram.regions().len(), 2);
    }
}

#[test]
fn blocks_that_are_not_the_guests_regions_are_refused_before_any_page() {
    let cases: [(&[(&str, u64)], &str); 5] = [
        (&[("a", A), ("c", 4096)], "Unknown ramblock \"c\""),
        (&[("a", A), ("b", 2 * B)], "Length mismatch: RAM block \"b\""),
        (&[("a", A / 2)], "Length mismatch: RAM block \"a\""),
        // 16 TiB, the most the decoder takes: refused before anything is set up.
        (&[("a", 1 << 44)], "Length mismatch: RAM block \"a\" is 0x100000000000 bytes"),
        (&[("a\n\x1b[31mforged", A)], "Unknown ramblock \"a\\n\\u{1b}[31mforged\""),
    ];
    for (blocks, want) in cases {
        let stream = paged_stream(12, blocks, |s| s.ram_page(0, 0, &[0xab; 4096]).expect("page"));
        let ram = guest();
        let before = contents(&ram);
        let e = load(&ram, &stream).expect_err("a block list the guest does not have was accepted");
        let msg = e.to_string();
        assert!(matches!(&e, IncomingError::Stream(s) if matches!(s.kind, savevm_format::ErrorKind::Sink(_))), "{e:?}");
        assert!(msg.contains(want), "{msg}\nwanted: {want}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(contents(&ram) == before, "{want}: guest memory changed");
    }
}
