//! The postcopy destination's input: the engine's `Incoming::run_postcopy` (capability
//! `postcopy-ram` on, autostart) over the whole input as the main stream, into guest
//! memory of two blocks (`mem` 1 MiB, `pc.bios` 64 KiB filled with a pattern), each
//! an anonymous private mapping as minivmm's guest RAM is. Everything is real: the
//! received-pages bitmap, POSTCOPY_ADVISE/RAM_DISCARD/PACKAGED with LISTEN and RUN,
//! the userfaultfd registration at LISTEN, the fault thread, `UFFDIO_COPY`/
//! `UFFDIO_ZEROPAGE` placement of the pages arriving while listening, and the touch
//! thread (a stand-in vCPU reading pages not received yet, so faults become
//! REQ_PAGES/REQ_PAGES_ID on the return path). The return path is captured.
//!
//! The same input is also walked by a reference model (the decoder with a sink over
//! plain buffers: pre-copy pages land, a discard drops its pages, ADVISE empties the
//! blocks when they arrive, and after the package the first copy of a page not
//! received wins). After each input:
//!
//! - a successful load left memory equal to the model's, byte for byte, and the
//!   model walked the stream to its end too;
//! - the return path holds only well-formed messages: every page request names a
//!   block of the stream (REQ_PAGES only after a REQ_PAGES_ID) and a page-aligned
//!   range inside it; SHUT(0) only after a successful load, never after a failure;
//! - a failed load left the guest stopped (resumed at RUN, then stopped again: the
//!   destination never runs a partial guest);
//! - no postcopy thread (fault, touch, package) outlived the load, and the load's heap growth stayed under
//!   [`MAX_HEAP`] plus twice the input (the PACKAGED blob is a copy).
//!
//! Shared by the fuzz target (`fuzz/fuzz_targets/postcopy_dest.rs`) and the corpus
//! test (`tests/fuzz_corpus.rs`). Without userfaultfd (no permission, old kernel)
//! [`run`] returns `None`.

use engine::incoming::{Incoming, ReturnPathOpener};
use engine::postcopy_dest::{PostcopyOptions, PostcopySink};
use engine::vm::{VcpuControl, VmParts, VmmError};
use savevm_format::{Command, Decoder, Event, PageSink, PageSlot, RamBlock, RpMessage, RpReader};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::VolatileSlice;

/// The guest: block name, length, patterned.
pub const BLOCKS: [(&str, usize, bool); 2] = [("mem", 1 << 20, false), ("pc.bios", 64 << 10, true)];
/// Most heap a load may add besides the input (decoder buffers, bitmaps, requests).
pub const MAX_HEAP: usize = 8 << 20;
const PAGE: usize = 4096;

/// The allocation counter of the binary running the harness.
pub trait Meter {
    /// Restart the peak at the live total, which it returns.
    fn reset_peak(&self) -> usize;
    /// Highest live total since the last reset.
    fn peak(&self) -> usize;
}

/// A patterned block's byte at `off` (never zero, so a page dropped by mistake shows).
fn pattern(block: usize, off: usize) -> u8 {
    ((off.wrapping_mul(0x9E37_79B9) >> 11) as u8 ^ block as u8) | 1
}

/// One anonymous private mapping per block, as minivmm's guest RAM.
struct Guest {
    maps: Vec<(*mut u8, usize)>,
    /// Block of each stream block (by stream index).
    placed: Vec<usize>,
    tps: usize,
}

// SAFETY: the mappings are plain memory owned by this struct until drop; the engine
// reaches them only through volatile slices and userfaultfd, the harness only after
// the load returned.
unsafe impl Send for Guest {}

impl Guest {
    fn new() -> Guest {
        let maps = BLOCKS
            .iter()
            .enumerate()
            .map(|(i, &(_, len, patterned))| {
                // SAFETY: a new private anonymous mapping of `len` bytes at an address
                // the kernel picks; it overlaps nothing.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
                let p = p.cast::<u8>();
                if patterned {
                    let bytes: Vec<u8> = (0..len).map(|o| pattern(i, o)).collect();
                    // SAFETY: `len` bytes into our own fresh mapping of `len` bytes.
                    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, len) };
                }
                (p, len)
            })
            .collect();
        Guest { maps, placed: Vec::new(), tps: PAGE }
    }

    /// Block `i`'s bytes (the load is over: no userfaultfd covers them any more).
    fn bytes(&self, i: usize) -> Vec<u8> {
        let (p, len) = self.maps[i];
        let mut v = vec![0u8; len];
        // SAFETY: `len` bytes out of our own mapping of `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        v
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        for &(p, len) in &self.maps {
            // SAFETY: unmapping our own mapping, once.
            unsafe { libc::munmap(p.cast(), len) };
        }
    }
}

/// The pages `start..start+len` touches, as the received-pages bitmap counts them.
fn page_span(start: u64, len: u64) -> (usize, usize) {
    let first = (start / PAGE as u64) as usize;
    let last = start.saturating_add(len).div_ceil(PAGE as u64) as usize;
    (first, last)
}

/// Which of the guest's blocks stream block `b` is, or why not.
fn match_block(b: &RamBlock) -> Result<usize, String> {
    BLOCKS
        .iter()
        .position(|r| r.0 == b.name && r.1 as u64 == b.length)
        .ok_or_else(|| format!("unknown block {:?} of {:#x}", b.name, b.length))
}

impl PageSink for Guest {
    fn page_mut(&mut self, block: &RamBlock, offset: u64) -> Option<PageSlot<'_>> {
        let &i = self.placed.get(block.index)?;
        let (p, len) = self.maps[i];
        let o = usize::try_from(offset).ok().filter(|o| o + self.tps <= len)?;
        // SAFETY: inside block `i`'s mapping (checked above), used only through
        // volatile copies while the load runs.
        Some(PageSlot::Guest(unsafe { VolatileSlice::new(p.add(o), self.tps) }))
    }

    fn target_page_size(&mut self, tps: u64) -> Result<(), String> {
        self.tps = usize::try_from(tps).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn ram_blocks(&mut self, blocks: &[RamBlock]) -> Result<(), String> {
        self.placed = blocks.iter().map(match_block).collect::<Result<_, _>>()?;
        Ok(())
    }

    fn discard(&mut self, block: &RamBlock, start: u64, len: u64) {
        // Called range-checked by the decoder (and for whole blocks at ADVISE).
        assert!(start.checked_add(len).is_some_and(|e| e <= block.length), "discard past the block");
        let Some(&i) = self.placed.get(block.index) else { return };
        let (first, last) = page_span(start, len);
        let (p, blen) = self.maps[i];
        let n = ((last - first) * PAGE).min(blen - first * PAGE);
        // SAFETY: whole pages inside block `i`'s mapping; the advice only drops their
        // contents (they read as zero, or fault under userfaultfd), it unmaps nothing.
        let r = unsafe { libc::madvise(p.add(first * PAGE).cast(), n, libc::MADV_DONTNEED) };
        assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
    }
}

impl PostcopySink for Guest {
    fn host_memory(&self, block: &RamBlock) -> Option<(u64, u64)> {
        let &i = self.placed.get(block.index)?;
        let (p, len) = self.maps[i];
        Some((p as u64, len as u64))
    }
}

/// The reference model: each block's bytes, and which pages were received.
struct Model {
    mem: Vec<Vec<u8>>,
    received: Vec<Vec<bool>>,
    placed: Vec<usize>,
    advised: bool,
    tps: usize,
}

impl Model {
    fn mark(&mut self, block: &RamBlock, offset: u64) {
        let i = self.placed[block.index];
        if let Some(r) = self.received[i].get_mut(offset as usize / PAGE) {
            *r = true;
        }
    }
}

impl PageSink for Model {
    fn page_mut(&mut self, block: &RamBlock, offset: u64) -> Option<PageSlot<'_>> {
        self.mark(block, offset);
        let i = self.placed[block.index];
        let o = offset as usize;
        Some(PageSlot::Buffer(&mut self.mem[i][o..o + self.tps]))
    }

    fn target_page_size(&mut self, tps: u64) -> Result<(), String> {
        if self.advised && tps != PAGE as u64 {
            return Err(format!("model: postcopy with {tps}-byte pages"));
        }
        self.tps = tps as usize;
        Ok(())
    }

    fn ram_blocks(&mut self, blocks: &[RamBlock]) -> Result<(), String> {
        self.placed = blocks.iter().map(match_block).collect::<Result<_, _>>()?;
        if self.advised {
            // ADVISE first: the blocks start empty.
            for &i in &self.placed {
                self.mem[i].fill(0);
            }
        }
        Ok(())
    }

    fn discard(&mut self, block: &RamBlock, start: u64, len: u64) {
        let i = self.placed[block.index];
        let (first, last) = page_span(start, len);
        self.mem[i][first * PAGE..last * PAGE].fill(0);
        self.received[i][first..last].fill(false);
    }
}

/// The model's walk of the stream; the memory it ends with, or why it stopped.
fn model(data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut m = Model {
        mem: BLOCKS
            .iter()
            .enumerate()
            .map(|(i, &(_, len, pat))| (0..len).map(|o| if pat { pattern(i, o) } else { 0 }).collect())
            .collect(),
        received: BLOCKS.iter().map(|b| vec![false; b.1 / PAGE]).collect(),
        placed: Vec::new(),
        advised: false,
        tps: PAGE,
    };
    let mut d = Decoder::new(data);
    d.skip_vmdesc();
    loop {
        match d.next_with(&mut m).map_err(|e| e.to_string())? {
            None => return Err("model: no EOF".into()),
            Some(Event::Eof) => return Ok(m.mem),
            Some(Event::Command(Command::PostcopyAdvise(Some(_)))) => {
                // After the blocks (QEMU's source never does this): emptied now.
                m.advised = true;
                for &i in &m.placed {
                    m.mem[i].fill(0);
                    m.received[i].fill(false);
                }
            }
            Some(Event::Command(Command::Packaged(_))) => break,
            Some(_) => {}
        }
    }
    d.take_package().map_err(|e| e.to_string())?;
    loop {
        let ev = d.next().map_err(|e| e.to_string())?;
        let (block, offset, page) = match ev {
            None => return Err("model: no EOF after the package".into()),
            Some(Event::Eof) => return Ok(m.mem),
            Some(Event::Page { block, offset, data: Some(d) })
            | Some(Event::CompressedPage { block, offset, data: Some(d) }) => (block, offset, Err(d.to_vec())),
            Some(Event::ZeroPage { block, offset, fill }) => (block, offset, Ok(fill)),
            Some(_) => continue,
        };
        let i = m.placed[block.index];
        let o = offset as usize;
        if m.received[i][o / PAGE] {
            continue;
        }
        m.received[i][o / PAGE] = true;
        match page {
            Err(bytes) => m.mem[i][o..o + PAGE].copy_from_slice(&bytes),
            Ok(fill) => m.mem[i][o..o + PAGE].fill(fill),
        }
    }
}

/// The return path as the destination writes it.
#[derive(Clone, Default)]
struct Wire(Arc<Mutex<Vec<u8>>>);

impl Write for Wire {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// vCPUs that only record whether they would run.
struct Vcpus(Arc<Mutex<bool>>);

impl VcpuControl for Vcpus {
    fn stop(&mut self) -> Result<(), VmmError> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = false;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        Ok(())
    }
}

/// Postcopy threads of this process (named `postcopy ...`: the fault, touch and
/// package threads; other threads of a test process come and go on their own).
fn threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("postcopy ")))
        .count()
}

/// Waits (up to 10 s) for the postcopy threads to be gone: a joined thread may
/// linger in /proc for a moment.
fn threads_back_to(n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = threads();
        if now <= n || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether userfaultfd works here (checked once).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| engine::postcopy_dest::uffd::MissingUffd::probe().is_ok())
}

/// One fuzz input, as the fuzz target and the corpus test run it: `Some(true)` when it
/// loaded, `None` when userfaultfd is unavailable here.
pub fn run(data: &[u8], meter: &dyn Meter) -> Option<bool> {
    if !available() {
        return None;
    }
    let mut guest = Guest::new();
    let wire = Wire::default();
    let running = Arc::new(Mutex::new(false));
    let w = wire.clone();
    let open: ReturnPathOpener<'static> = Box::new(move || Ok(Box::new(w.clone()) as Box<dyn Write + Send>));
    // The touch thread's page choice follows the input, so a replay faults the same pages.
    let seed = data.iter().fold(0u64, |h, &b| h.rotate_left(5) ^ u64::from(b));
    let before = threads();
    let base = meter.reset_peak();
    let got = Incoming::new(true).with_postcopy(PostcopyOptions { touch: true, touch_seed: seed }).run_postcopy(
        data,
        &mut guest,
        &mut VmParts::default(),
        &mut Vcpus(running.clone()),
        open,
    );
    let grew = meter.peak().saturating_sub(base);
    assert!(grew <= MAX_HEAP + 2 * data.len(), "the load grew the heap by {grew} bytes");
    let after = threads_back_to(before);
    assert!(after <= before, "{} threads outlived the load ({before} before)", after - before);
    let running = *running.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = &got {
        let _ = e.to_string();
        assert!(!running, "the load failed ({e}) and the guest runs on");
    }

    // The return path: well-formed, requests inside the stream's blocks.
    let rp = wire.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut r = RpReader::new(&rp[..]);
    let mut named: Option<usize> = None;
    let mut shut = None;
    loop {
        let m = match r.next() {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => panic!("the destination wrote a malformed return-path message: {e}"),
        };
        assert!(shut.is_none(), "a message after SHUT: {m:?}");
        let (start, len) = match m {
            RpMessage::ReqPagesId { start, len, ref block } => {
                let b = BLOCKS.iter().position(|b| b.0 == block.as_str());
                named = Some(b.unwrap_or_else(|| panic!("a page request for block {block:?}")));
                (start, len)
            }
            RpMessage::ReqPages { start, len } => {
                assert!(named.is_some(), "REQ_PAGES before any REQ_PAGES_ID");
                (start, len)
            }
            RpMessage::Shut(s) => {
                shut = Some(s);
                continue;
            }
            RpMessage::Pong(_) => continue,
            other => panic!("the destination wrote {other:?}"),
        };
        let blen = named.map_or(0, |b| BLOCKS[b].1 as u64);
        assert!(
            start % PAGE as u64 == 0 && len > 0 && start + u64::from(len) <= blen,
            "page request {start:#x}+{len:#x} outside its block of {blen:#x}"
        );
    }
    match (&got, shut) {
        (Ok(_), Some(s)) => assert_eq!(s, 0, "SHUT({s}) after a successful load"),
        (Err(e), Some(0)) => panic!("SHUT(0) after a failed load: {e}"),
        _ => {}
    }

    // Memory against the model.
    if got.is_ok() {
        let want = model(data).unwrap_or_else(|e| panic!("the destination loaded, the model failed: {e}"));
        for (i, w) in want.iter().enumerate() {
            let g = guest.bytes(i);
            if let Some(at) = (0..g.len()).find(|&k| g[k] != w[k]) {
                panic!("block {:?} byte {at:#x} is {:#x}, the model has {:#x}", BLOCKS[i].0, g[at], w[at]);
            }
        }
    }
    Some(got.is_ok())
}
