//! The whole incoming path of `qmig recv` into its RAM files: the engine's
//! `Incoming` (as `qmig::recv` runs it: no devices, no vCPUs) into
//! `qmig::ramfile::ImageSink` with RAM files in a directory on a tmpfs
//! (`/dev/shm`, else the temp dir), the blocks' total bounded by
//! [`MAX_TOTAL`]. The same input is first loaded into a reference model (a map
//! of pages), which refuses what the files must refuse (an unlisted block, the
//! existing file's length, the total, target pages other than 4 KiB). After each
//! input:
//!
//! - both loads succeed or both fail, and a failed load leaves no file it created;
//! - after a successful load every file has its block's length, every page the
//!   model holds reads back from its file, every other allocated range of a
//!   created file is zero, and the existing (patterned) file changed only where
//!   the model says: nothing outside the stream's pages changed;
//! - the load's heap growth stayed under [`MAX_HEAP`] (the allocation guard of
//!   the binary measures it; it also aborts on any single allocation above
//!   128 MiB), and no file other than the blocks' appeared.
//!
//! Shared by the fuzz target (`fuzz/fuzz_targets/recv_sink.rs`) and the corpus test
//! (`tests/fuzz_corpus.rs`), which runs every committed corpus input and reproducer.

use engine::incoming::Incoming;
use engine::vm::{VcpuControl, VmParts};
use qmig::ramfile::ImageSink;
use savevm_format::{PageSink, PageSlot, RamBlock};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Most bytes the stream's blocks may total (sparse files on a tmpfs).
pub const MAX_TOTAL: u64 = 128 << 20;
/// Most heap a load may add (decoder buffers, the write-behind stages, bookkeeping).
pub const MAX_HEAP: usize = 24 << 20;
/// Block names with a RAM file that recv creates when the stream has the block.
const CREATED: [&str; 7] =
    ["mem", "a", "pc.ram", "/rom@etc/acpi/tables", "pc.rom", "/rom@etc/table-loader", "/rom@etc/acpi/rsdp"];
/// A RAM file that exists before the load (filled with [`pattern`]): opened, not created.
const EXISTING: (&str, u64) = ("pc.bios", 256 << 10);
const PAGE: u64 = 4096;

/// The allocation counter of the binary running the harness.
pub trait Meter {
    /// Restart the peak at the live total, which it returns.
    fn reset_peak(&self) -> usize;
    /// Highest live total since the last reset.
    fn peak(&self) -> usize;
}

/// The existing file's byte at `off` (never zero, so a page cleared by mistake shows).
fn pattern(off: u64) -> u8 {
    ((off.wrapping_mul(0x9E37_79B9) >> 11) as u8) | 1
}

struct NoGuest;
impl VcpuControl for NoGuest {}

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        // Directories of earlier runs whose process is gone (a fuzzer exits without
        // cleaning up) are removed first.
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("qmig-fuzz-recv-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let d = base.join(format!("qmig-fuzz-recv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("fuzz directory");
        d
    })
}

/// Removes this process's RAM file directory (the corpus test calls it at the end;
/// the fuzz target never ends normally, so it has no use for it).
#[allow(dead_code)]
pub fn cleanup() {
    let _ = std::fs::remove_dir_all(dir());
}

fn existing_bytes() -> Vec<u8> {
    (0..EXISTING.1).map(pattern).collect()
}

/// The RAM file list (`--ram NAME=PATH`), the existing file written afresh.
fn targets() -> Vec<(String, PathBuf)> {
    let d = dir();
    for e in std::fs::read_dir(d).expect("read fuzz directory").flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    std::fs::write(d.join("existing.ram"), existing_bytes()).expect("existing RAM file");
    let mut t: Vec<(String, PathBuf)> =
        CREATED.iter().enumerate().map(|(i, n)| (n.to_string(), d.join(format!("{i}.ram")))).collect();
    t.push((EXISTING.0.to_string(), d.join("existing.ram")));
    t
}

enum MPage {
    Fill(u8),
    Data(Box<[u8]>),
}

/// The reference: pages in a map over each block's initial content.
#[derive(Default)]
struct Model {
    blocks: Vec<RamBlock>,
    pages: HashMap<(usize, u64), MPage>,
}

impl Model {
    fn initial(&self, block: usize, off: u64) -> u8 {
        let b = &self.blocks[block];
        if b.name == EXISTING.0 {
            pattern(off)
        } else {
            0
        }
    }

    fn materialize(&mut self, block: usize, offset: u64) -> &mut [u8] {
        let init: Vec<u8> = (offset..offset + PAGE).map(|o| self.initial(block, o)).collect();
        let p = self.pages.entry((block, offset)).or_insert(MPage::Data(init.into_boxed_slice()));
        if let MPage::Fill(f) = *p {
            *p = MPage::Data(vec![f; PAGE as usize].into_boxed_slice());
        }
        match p {
            MPage::Data(d) => d,
            MPage::Fill(_) => unreachable!("just materialized"),
        }
    }
}

impl PageSink for Model {
    fn target_page_size(&mut self, tps: u64) -> Result<(), String> {
        if tps != PAGE {
            return Err(format!("model: target page size {tps}"));
        }
        Ok(())
    }

    fn ram_blocks(&mut self, blocks: &[RamBlock]) -> Result<(), String> {
        let mut total = 0u64;
        for b in blocks {
            total = total.saturating_add(b.length);
            let known = CREATED.contains(&b.name.as_str()) || b.name == EXISTING.0;
            if !known || (b.name == EXISTING.0 && b.length != EXISTING.1) {
                return Err(format!("model: block {:?} of {:#x}", b.name, b.length));
            }
        }
        if total > MAX_TOTAL {
            return Err(format!("model: total {total:#x}"));
        }
        self.blocks = blocks.to_vec();
        Ok(())
    }

    fn page_mut(&mut self, block: &RamBlock, offset: u64) -> Option<PageSlot<'_>> {
        assert_eq!(offset % PAGE, 0);
        assert!(offset + PAGE <= block.length);
        Some(PageSlot::Buffer(self.materialize(block.index, offset)))
    }

    fn fill_page(&mut self, block: &RamBlock, offset: u64, fill: u8) {
        self.pages.insert((block.index, offset), MPage::Fill(fill));
    }

    fn discard(&mut self, block: &RamBlock, start: u64, len: u64) {
        let end = start + len;
        let mut p = start - start % PAGE;
        while p < end {
            if p >= start && p + PAGE <= end {
                self.pages.insert((block.index, p), MPage::Fill(0));
            } else {
                let (a, b) = (start.max(p) - p, end.min(p + PAGE) - p);
                self.materialize(block.index, p)[a as usize..b as usize].fill(0);
            }
            p += PAGE;
        }
    }
}

/// Every allocated range of `f` (SEEK_DATA / SEEK_HOLE), as (start, end).
fn data_ranges(f: &std::fs::File, len: u64) -> Vec<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    let mut v = Vec::new();
    let mut at = 0i64;
    let len = i64::try_from(len).expect("file length");
    while at < len {
        let Ok(start) = lseek(f, at, Whence::SeekData) else { break };
        let end = lseek(f, start, Whence::SeekHole).expect("SEEK_HOLE");
        v.push((start as u64, end as u64));
        at = end;
    }
    v
}

/// One fuzz input, as the fuzz target and the corpus test run it; true when it loaded.
pub fn run(data: &[u8], meter: &dyn Meter) -> bool {
    let mut model = Model::default();
    let want = Incoming::new(false).run(data, &mut model, &mut VmParts::default(), &mut NoGuest);

    let targets = targets();
    let base = meter.reset_peak();
    let mut sink = ImageSink::destination(targets.clone()).with_max_total(MAX_TOTAL);
    let got = Incoming::new(false)
        .run(data, &mut sink, &mut VmParts::default(), &mut NoGuest)
        .map_err(|e| e.to_string())
        .and_then(|r| sink.flush().map(|()| r).map_err(|e| e.to_string()));
    let grew = meter.peak().saturating_sub(base);
    assert!(grew <= MAX_HEAP + data.len(), "the load grew the heap by {grew} bytes");

    match (&want, &got) {
        (Ok(_), Ok(_)) => {}
        (Err(w), Err(g)) => {
            let note = sink.abandon();
            for (i, (_, p)) in targets.iter().enumerate() {
                if i < CREATED.len() {
                    assert!(!p.exists(), "{} left behind after a failed load ({w} / {g}; {note:?})", p.display());
                }
            }
            return false;
        }
        (Ok(_), Err(g)) => panic!("the model loaded, the RAM files failed: {g}"),
        (Err(w), Ok(_)) => panic!("the RAM files loaded, the model failed: {w}"),
    }
    drop(sink);

    // Which file each block went to.
    let mut files: HashMap<String, usize> = HashMap::new();
    for (bi, b) in model.blocks.iter().enumerate() {
        let ti = targets.iter().position(|(n, _)| *n == b.name).expect("a known block");
        files.insert(b.name.clone(), bi);
        let path = &targets[ti].1;
        let f = std::fs::File::open(path).expect("the block's RAM file");
        let len = f.metadata().expect("stat").len();
        assert_eq!(len, b.length, "block {:?}: file of {len:#x} bytes", b.name);
        let mut buf = vec![0u8; PAGE as usize];
        for ((pb, off), p) in &model.pages {
            if *pb != bi {
                continue;
            }
            f.read_exact_at(&mut buf, *off).expect("read a page");
            let ok = match p {
                MPage::Fill(x) => buf.iter().all(|b| b == x),
                MPage::Data(d) => buf[..] == d[..],
            };
            assert!(ok, "block {:?} page {off:#x} differs from the model", b.name);
        }
        if b.name == EXISTING.0 {
            let mut all = vec![0u8; len as usize];
            f.read_exact_at(&mut all, 0).expect("read the existing file");
            for (i, &x) in all.iter().enumerate() {
                let off = i as u64;
                if !model.pages.contains_key(&(bi, off - off % PAGE)) {
                    assert_eq!(x, pattern(off), "existing file byte {off:#x} changed outside the stream's pages");
                }
            }
        } else {
            for (s, e) in data_ranges(&f, len) {
                let mut p = s - s % PAGE;
                while p < e.min(len) {
                    if !model.pages.contains_key(&(bi, p)) {
                        f.read_exact_at(&mut buf, p).expect("read a page");
                        assert!(
                            buf.iter().all(|&x| x == 0),
                            "block {:?} page {p:#x}: written, not in the stream",
                            b.name
                        );
                    }
                    p += PAGE;
                }
            }
        }
    }
    // Files for blocks the stream does not have: never created, or untouched.
    for (i, (n, p)) in targets.iter().enumerate() {
        if files.contains_key(n) {
            continue;
        }
        if i < CREATED.len() {
            assert!(!p.exists(), "{} created for a block the stream does not have", p.display());
        } else {
            assert!(std::fs::read(p).expect("existing file") == existing_bytes(), "the existing file changed");
        }
    }
    let extra = std::fs::read_dir(dir()).expect("read fuzz directory").count();
    assert!(extra <= targets.len(), "{extra} files in the RAM directory");
    true
}
