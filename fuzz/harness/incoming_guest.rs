//! The whole incoming path into guest memory: the engine's `Incoming` into
//! `engine::sink::GuestSink` over a fresh vm-memory guest of three regions
//! (`mem` 8 MiB of zeros, `a` 1 MiB and `pc.bios` 256 KiB filled with a
//! pattern). The same input is first loaded into a reference model (a plain copy
//! of the guest's bytes, pages placed at the stream's target page size, blocks
//! refused unless they are the guest's regions). After each input:
//!
//! - both loads succeed or both fail, and the guest's memory equals the model's
//!   byte for byte: nothing outside the stream's pages changed, and every page
//!   landed at its offset with its size (1 KiB..64 KiB). After a failed load one
//!   page may differ, the one whose record broke (the model takes a failing
//!   record in place, the guest only whole decoded pages);
//! - the load's heap growth stayed under [`MAX_HEAP`] (guest memory is mapped,
//!   not heap: the allocation guard of the binary measures the rest and aborts on
//!   any single allocation above 128 MiB).
//!
//! Shared by the fuzz target (`fuzz/fuzz_targets/incoming_guest.rs`) and the corpus
//! test (`tests/fuzz_corpus.rs`), which runs every committed corpus input and reproducer.

use engine::incoming::Incoming;
use engine::mmap::MmapRam;
use engine::sink::GuestSink;
use engine::vm::{VcpuControl, VmParts};
use savevm_format::{PageSink, PageSlot, RamBlock};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The guest: region name, guest address, length, patterned.
const REGIONS: [(&str, u64, usize, bool); 3] =
    [("mem", 0, 8 << 20, false), ("a", 16 << 20, 1 << 20, true), ("pc.bios", 32 << 20, 256 << 10, true)];
/// Most heap a load may add (decoder buffers and bookkeeping).
pub const MAX_HEAP: usize = 8 << 20;

/// The allocation counter of the binary running the harness.
pub trait Meter {
    /// Restart the peak at the live total, which it returns.
    fn reset_peak(&self) -> usize;
    /// Highest live total since the last reset.
    fn peak(&self) -> usize;
}

/// A patterned region's byte at `off` (never zero, so a page cleared by mistake shows).
fn pattern(region: usize, off: usize) -> u8 {
    ((off.wrapping_mul(0x9E37_79B9) >> 11) as u8 ^ region as u8) | 1
}

fn initial(region: usize) -> Vec<u8> {
    let (_, _, len, patterned) = REGIONS[region];
    if patterned {
        (0..len).map(|o| pattern(region, o)).collect()
    } else {
        vec![0u8; len]
    }
}

struct NoVcpus;
impl VcpuControl for NoVcpus {}

/// The reference: each region's bytes in a `Vec`, pages of the stream's size.
struct Model {
    mem: Vec<Vec<u8>>,
    tps: usize,
    /// Region of each stream block.
    placed: Vec<usize>,
}

impl PageSink for Model {
    fn target_page_size(&mut self, tps: u64) -> Result<(), String> {
        self.tps = tps as usize;
        Ok(())
    }

    fn ram_blocks(&mut self, blocks: &[RamBlock]) -> Result<(), String> {
        self.placed.clear();
        for b in blocks {
            match REGIONS.iter().position(|r| r.0 == b.name && r.2 as u64 == b.length) {
                Some(i) => self.placed.push(i),
                None => return Err(format!("model: block {:?} of {:#x}", b.name, b.length)),
            }
        }
        Ok(())
    }

    fn page_mut(&mut self, block: &RamBlock, offset: u64) -> Option<PageSlot<'_>> {
        let o = offset as usize;
        assert_eq!(o % self.tps, 0);
        let r = self.placed[block.index];
        Some(PageSlot::Buffer(&mut self.mem[r][o..o + self.tps]))
    }
}

/// One fuzz input, as the fuzz target and the corpus test run it; true when it loaded.
pub fn run(data: &[u8], meter: &dyn Meter) -> bool {
    let mut model = Model { mem: (0..REGIONS.len()).map(initial).collect(), tps: 4096, placed: Vec::new() };
    let want = Incoming::new(false).run(data, &mut model, &mut VmParts::default(), &mut NoVcpus);

    let ranges: Vec<(GuestAddress, usize)> = REGIONS.iter().map(|r| (GuestAddress(r.1), r.2)).collect();
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&ranges).expect("guest memory"));
    for (i, r) in REGIONS.iter().enumerate() {
        if r.3 {
            mem.write_slice(&initial(i), GuestAddress(r.1)).expect("fill a region");
        }
    }
    let ram = MmapRam::new(mem.clone(), |i| REGIONS[i].0.to_string()).expect("regions");
    let base = meter.reset_peak();
    let got = {
        let mut sink = GuestSink::new(ram.regions());
        Incoming::new(false).run(data, &mut sink, &mut VmParts::default(), &mut NoVcpus)
    };
    let grew = meter.peak().saturating_sub(base);
    assert!(grew <= MAX_HEAP + data.len(), "the load grew the heap by {grew} bytes");
    match (&want, &got) {
        (Ok(_), Ok(_)) | (Err(_), Err(_)) => {}
        (Ok(_), Err(g)) => panic!("the model loaded, the guest failed: {g}"),
        (Err(w), Ok(_)) => panic!("the guest loaded, the model failed: {w}"),
    }
    // The pages that differ from the model, per region. A failed load may leave the
    // one page whose record broke different: the model's private buffers take a
    // failing record in place (a partly read or inflated page), guest memory only a
    // whole decoded page. Nothing else may differ, whatever the outcome.
    let mut differ = Vec::new();
    let mut buf = Vec::new();
    for (i, r) in REGIONS.iter().enumerate() {
        buf.resize(r.2, 0);
        mem.read_slice(&mut buf, GuestAddress(r.1)).expect("read a region");
        for (p, (g, m)) in buf.chunks(model.tps).zip(model.mem[i].chunks(model.tps)).enumerate() {
            if g != m {
                let at = (0..g.len()).find(|&k| g[k] != m[k]).unwrap_or(0);
                differ.push(format!(
                    "region {:?} byte {:#x} is {:#x}, the model has {:#x}",
                    r.0,
                    p * model.tps + at,
                    g[at],
                    m[at]
                ));
            }
        }
    }
    let allowed = usize::from(got.is_err());
    assert!(
        differ.len() <= allowed,
        "{} pages differ from the model (load: {:?}): {differ:?}",
        differ.len(),
        got.as_ref().map(|_| ()).map_err(|e| e.to_string())
    );
    got.is_ok()
}
