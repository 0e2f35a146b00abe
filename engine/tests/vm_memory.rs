//! The `vm-memory` feature: a `GuestMemoryMmap<AtomicBitmap>` migrated with no
//! `unsafe` in the embedder; the pages the VMM wrote through vm-memory's
//! accessors while the migration ran (its bitmap's marks), and only them, are
//! sent again; marks made before the migration started are covered by the bulk
//! pass. Driven through the in-memory `PageWriter` (a `Vec`), then decoded.
#![cfg(feature = "vm-memory")]

use engine::mmap::MmapRam;
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::Outgoing;
use engine::vm::VmParts;
use engine::vm::{VcpuControl, VmmError};
use savevm_format::{Decoder, Event, PageSink, PageSlot, RamBlock};
use std::collections::HashMap;
use std::sync::Arc;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;

/// vCPUs whose last act before stopping is the VMM writing `writes` through vm-memory.
struct LastWrites {
    mem: Arc<GuestMemoryMmap<AtomicBitmap>>,
    writes: Vec<(u64, u8)>,
}

impl VcpuControl for LastWrites {
    fn stop(&mut self) -> Result<(), VmmError> {
        for &(addr, v) in &self.writes {
            self.mem.write_slice(&[v; 100], GuestAddress(addr)).map_err(|e| VmmError::msg(e.to_string()))?;
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        Ok(())
    }
    fn set_throttle(&mut self, _: u8) -> Result<(), VmmError> {
        Ok(())
    }
}

/// The destination: every block's final bytes, and how often each page came.
#[derive(Default)]
struct Dest {
    blocks: HashMap<String, Vec<u8>>,
}

impl PageSink for Dest {
    fn page_mut(&mut self, b: &RamBlock, off: u64) -> Option<PageSlot<'_>> {
        let v = self.blocks.entry(b.name.clone()).or_insert_with(|| vec![0xee; b.length as usize]);
        v.get_mut(off as usize..off as usize + 4096).map(PageSlot::from)
    }
}

#[test]
fn a_guest_memory_mmap_migrates_and_its_bitmap_marks_are_resent() {
    let mem: Arc<GuestMemoryMmap<AtomicBitmap>> = Arc::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB as usize), (GuestAddress(4 * MIB), 2 * MIB as usize)])
            .expect("memory"),
    );
    for (i, addr) in [0u64, 8192, 4 * MIB, 4 * MIB + 40960, 6 * MIB - 4096].into_iter().enumerate() {
        mem.write_slice(&[i as u8 + 1; 4096], GuestAddress(addr)).expect("fill");
    }
    let ram = MmapRam::new(mem.clone(), |i| format!("ram{i}")).expect("regions");
    ram.check_bitmaps().expect("one bit per page");
    let mut regions = ram.tracked();
    // Written during the migration (at the stop): page 2 of ram0, pages 10 and 11 of ram1.
    let late = vec![(2 * 4096, 0xa1), (4 * MIB + 10 * 4096 + 4050, 0xb2)];
    let mut vcpus = LastWrites { mem: mem.clone(), writes: late };
    let params = SharedParameters::new(MigrationParameters::default()).expect("params");
    let out = Outgoing::new(params, MigrationCapabilities::default()).expect("outgoing");
    let mut stream = Vec::new();
    let info = out.run_on(&mut stream, &mut regions, &mut vcpus, &mut VmParts::default()).expect("migration");
    drop(regions);
    assert_eq!(info.total, 3 * MIB);

    let mut dest = Dest::default();
    let mut seen: HashMap<(usize, u64), u32> = HashMap::new();
    let mut d = Decoder::new(&stream[..]);
    while let Some(ev) = d.next_with(&mut dest).expect("decode") {
        match ev {
            Event::Page { block, offset, .. } | Event::ZeroPage { block, offset, .. } => {
                *seen.entry((block.index, offset)).or_default() += 1;
            }
            _ => {}
        }
    }
    let twice: Vec<(usize, u64)> = {
        let mut v: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).map(|(k, _)| *k).collect();
        v.sort();
        v
    };
    assert_eq!(twice, vec![(0, 2 * 4096), (1, 10 * 4096), (1, 11 * 4096)], "only the marked pages are sent again");
    assert_eq!(seen.len() as u64, 3 * MIB / 4096, "every page once in the bulk pass");
    // The destination holds the memory as it was at the stop.
    for (name, base, len) in [("ram0", 0u64, MIB), ("ram1", 4 * MIB, 2 * MIB)] {
        let mut want = vec![0u8; len as usize];
        mem.read_slice(&mut want, GuestAddress(base)).expect("read");
        assert!(dest.blocks[name] == want, "{name} differs");
    }
}
