//! userfaultfd asynchronous write-protect dirty tracking (`UffdWriteProtect`) on
//! real memory: exact reports, no lost writes under concurrent writers, and the
//! cost of a sync over 1 GiB.
//!
//! Each test prints why it skips when this kernel or process cannot use
//! userfaultfd (set `QMIG_REQUIRE_UFFD=1` to make that a failure instead).
#![cfg(target_os = "linux")]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use engine::dirty::{count_bits, set_bits, DirtySource, UffdWriteProtect, PAGE_SIZE};

const PS: usize = PAGE_SIZE as usize;
const MIB: usize = 1 << 20;

/// The tests run one at a time: the cost measurement is not disturbed and the
/// big mappings do not pile up.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Print on the real stderr, past libtest's capture: skip reasons and the
/// measurements show in a plain `cargo test` run.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn available(test: &str) -> bool {
    match UffdWriteProtect::probe() {
        Ok(()) => true,
        Err(e) => {
            if std::env::var_os("QMIG_REQUIRE_UFFD").is_some() {
                panic!("{test}: userfaultfd write-protect tracking required but unavailable: {e}");
            }
            say(&format!("{test}: SKIPPED: userfaultfd write-protect tracking unavailable here: {e}"));
            false
        }
    }
}

/// A private anonymous or a shared /dev/shm file mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; the tests write it from several threads
// with volatile byte stores only.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn anon(len: usize) -> Mapping {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Mapping { ptr: p.cast(), len }
    }

    /// A shared mapping of a `len`-byte file in /dev/shm (the temporary directory
    /// where there is no /dev/shm), unlinked once mapped.
    fn shm(len: usize, name: &str) -> Mapping {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let path = dir.join(format!("qmig-uffd-test-{}-{name}", std::process::id()));
        let path = path.to_string_lossy().into_owned();
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        file.set_len(len as u64).expect("ftruncate");
        // SAFETY: a fresh shared mapping of our own file; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        let _ = std::fs::remove_file(&path);
        assert_ne!(p, libc::MAP_FAILED, "mmap {path}: {}", std::io::Error::last_os_error());
        Mapping { ptr: p.cast(), len }
    }

    fn pages(&self) -> usize {
        self.len / PS
    }

    fn words(&self) -> usize {
        self.pages().div_ceil(64)
    }

    /// Store `v` into page `page` (at an offset that depends on `v`).
    fn write(&self, page: usize, v: u8) {
        assert!(page < self.pages());
        // SAFETY: inside the mapping, which lives as long as `self`.
        unsafe { std::ptr::write_volatile(self.ptr.add(page * PS + (v as usize * 67) % PS), v) }
    }

    fn read(&self, page: usize) -> u8 {
        assert!(page < self.pages());
        // SAFETY: inside the mapping, which lives as long as `self`.
        unsafe { std::ptr::read_volatile(self.ptr.add(page * PS + 123)) }
    }

    /// `AnonHugePages` of this mapping in /proc/self/smaps, in KiB.
    fn anon_huge_kib(&self) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let head = format!("{:x}-", self.ptr as usize);
        smaps
            .lines()
            .skip_while(|l| !l.starts_with(&head))
            .take_while(|l| !l.starts_with("VmFlags:"))
            .find_map(|l| l.strip_prefix("AnonHugePages:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn tracker(&self) -> UffdWriteProtect {
        // SAFETY: the mapping outlives every tracker the tests make of it (they
        // are dropped before the mapping).
        unsafe { UffdWriteProtect::new(self.ptr, self.len) }.expect("UffdWriteProtect::new")
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer referenced.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// xorshift64*: deterministic pseudo-random numbers without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn sync_pages(t: &mut UffdWriteProtect, words: usize) -> Vec<u64> {
    let mut out = vec![0u64; words];
    t.sync(&mut out).expect("sync");
    set_bits(&out).collect()
}

fn sorted(pages: &[usize]) -> Vec<u64> {
    let mut v: Vec<u64> = pages.iter().map(|&p| p as u64).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn check_exact(m: &Mapping, what: &str) {
    let words = m.words();
    let mut t = m.tracker();
    t.start().expect("start");
    assert_eq!(sync_pages(&mut t, words), Vec::<u64>::new(), "{what}: nothing written since start");

    // A known set: word and huge-page boundaries, both ends, a spread.
    let mut a: Vec<usize> = vec![0, 1, 2, 63, 64, 65, 511, 512, 513, 1000, 1023, 1024, m.pages() - 1];
    a.extend((3000..m.pages()).step_by(997));
    for (i, &p) in a.iter().enumerate() {
        m.write(p, i as u8 | 1);
    }
    for p in [5, 700, 9000] {
        let _ = m.read(p); // reads do not dirty
    }
    assert_eq!(sync_pages(&mut t, words), sorted(&a), "{what}: first sync");
    assert_eq!(sync_pages(&mut t, words), Vec::<u64>::new(), "{what}: second sync");

    // New writes, overlapping the old set in part: only they are reported.
    let b: Vec<usize> = vec![1, 64, 700, 701, 702, 703, 4095, 4096, m.pages() - 2];
    for &p in &b {
        m.write(p, 0x5A);
    }
    assert_eq!(sync_pages(&mut t, words), sorted(&b), "{what}: after new writes");

    // sync ORs into `out`.
    let mut out = vec![0u64; words];
    out[0] = 1 << 3;
    m.write(200, 7);
    t.sync(&mut out).expect("sync");
    assert_eq!(set_bits(&out).collect::<Vec<_>>(), vec![3, 200], "{what}: OR into out");

    // The kernel's own writes into the memory (read(2) from a pipe) count.
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let data = vec![0xEEu8; 2 * PS + 10];
    // SAFETY: writing our buffer to our pipe, which holds 64 KiB.
    let n = unsafe { libc::write(fds[1], data.as_ptr().cast(), data.len()) };
    assert_eq!(n, data.len() as isize);
    // SAFETY: reading into pages 2000..2003 of the mapping, inside its bounds.
    let n = unsafe { libc::read(fds[0], m.ptr.add(2000 * PS).cast(), data.len()) };
    assert_eq!(n, data.len() as isize);
    // SAFETY: closing our pipe.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    assert_eq!(sync_pages(&mut t, words), vec![2000, 2001, 2002], "{what}: kernel writes (read(2))");

    // Stop: syncing is an error; writes are plain again.
    t.stop().expect("stop");
    let mut out = vec![0u64; words];
    assert!(t.sync(&mut out).is_err(), "{what}: sync after stop");
    m.write(300, 1);
    // Start again: a clean slate, then tracking as before.
    t.start().expect("restart");
    assert_eq!(sync_pages(&mut t, words), Vec::<u64>::new(), "{what}: after restart");
    m.write(301, 1);
    m.write(9999, 1);
    assert_eq!(sync_pages(&mut t, words), vec![301, 9999], "{what}: after restart, writes");
    drop(t);

    // A tiny region array: the scan is resumed until the range is covered.
    // SAFETY: as in `Mapping::tracker`.
    let mut t = unsafe { UffdWriteProtect::with_region_capacity(m.ptr, m.len, 2) }.expect("new");
    t.start().expect("start");
    let c: Vec<usize> = (0..50).map(|i| 17 + i * 300).chain([m.pages() - 1]).collect();
    for &p in &c {
        m.write(p, 9);
    }
    assert_eq!(sync_pages(&mut t, words), sorted(&c), "{what}: 2-region array");
    assert!(t.last_sync().ioctls >= 26, "{what}: {:?}", t.last_sync());
    assert_eq!(t.last_sync().pages, c.len() as u64);
}

#[test]
fn reports_exactly_the_written_pages() {
    let _serial = serial();
    if !available("reports_exactly_the_written_pages") {
        return;
    }
    let len = 64 * MIB;

    check_exact(&Mapping::anon(len), "fresh anonymous");

    // Anonymous memory populated before `start`, with huge pages where the
    // kernel gives them: a written huge page must still report 4 KiB pages.
    let m = Mapping::anon(len);
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(m.ptr.cast(), len, libc::MADV_HUGEPAGE) };
    for p in 0..m.pages() {
        m.write(p, 1);
    }
    say(&format!("populated anonymous mapping: {} MiB in transparent huge pages", m.anon_huge_kib() / 1024));
    check_exact(&m, "populated anonymous (THP advised)");

    // A shared /dev/shm file mapping, half of it populated before `start`.
    let m = Mapping::shm(len, "exact");
    for p in (0..m.pages()).step_by(2) {
        m.write(p, 1);
    }
    check_exact(&m, "shared /dev/shm file");
}

/// Writers write random pages while syncs run. A writer reads the number of
/// completed syncs `e` before each write; the write must then be reported by a
/// sync numbered `e` or later (syncs count from 0, the final one after joining).
fn concurrent(m: Mapping, what: &str) {
    let pages = m.pages();
    let words = m.words();
    let m = Arc::new(m);
    let mut t = m.tracker();
    t.start().expect("start");
    let completed = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));

    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (m, completed, done) = (m.clone(), completed.clone(), done.clone());
            std::thread::spawn(move || {
                // must_report[p] = 1 + the syncs completed before the last write to p.
                let mut must_report = vec![0u32; pages];
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w + 1));
                let mut writes = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let p = rng.below(pages);
                    // A few stores to the same page now and then: more chances to
                    // race with its re-protection.
                    let burst = if rng.below(8) == 0 { 16 } else { 1 };
                    for i in 0..burst {
                        let e = completed.load(Ordering::Acquire);
                        m.write(p, (writes as u8).wrapping_add(i));
                        must_report[p] = must_report[p].max(e + 1);
                        writes += 1;
                    }
                }
                (must_report, writes)
            })
        })
        .collect();

    // reported[p] = 1 + the number of the last sync that reported p.
    let mut reported = vec![0u32; pages];
    let mut out = vec![0u64; words];
    let mut syncs = 0u32;
    let mut reports = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1500) {
        out.fill(0);
        t.sync(&mut out).expect("sync");
        for p in set_bits(&out) {
            reported[p as usize] = syncs + 1;
        }
        reports += count_bits(&out);
        syncs += 1;
        completed.store(syncs, Ordering::Release);
    }
    done.store(true, Ordering::Relaxed);
    let results: Vec<_> = writers.into_iter().map(|w| w.join().expect("writer panicked")).collect();
    out.fill(0);
    t.sync(&mut out).expect("final sync");
    for p in set_bits(&out) {
        reported[p as usize] = syncs + 1;
    }
    syncs += 1;

    let mut written = 0;
    let mut writes = 0;
    for (must, n) in &results {
        writes += n;
        for (p, &need) in must.iter().enumerate() {
            assert!(
                reported[p] >= need,
                "{what}: page {p} written after sync {} completed, last reported by sync {}",
                need as i64 - 1,
                reported[p] as i64 - 1
            );
        }
    }
    for p in 0..pages {
        let was_written = results.iter().any(|(must, _)| must[p] != 0);
        written += was_written as u64;
        assert!(was_written || reported[p] == 0, "{what}: page {p} reported but never written");
    }
    say(&format!(
        "{what}: {writes} writes to {written} pages by 2 threads, {syncs} syncs reported {reports} pages: none lost"
    ));
    assert!(syncs > 10 && writes > 10_000, "{what}: too little happened ({syncs} syncs, {writes} writes)");
}

#[test]
fn concurrent_writes_are_never_lost() {
    let _serial = serial();
    if !available("concurrent_writes_are_never_lost") {
        return;
    }
    concurrent(Mapping::anon(64 * MIB), "anonymous");
    concurrent(Mapping::shm(64 * MIB, "concurrent"), "shared /dev/shm file");
}

#[test]
fn sync_cost_over_1gib_with_1_percent_dirty() {
    let _serial = serial();
    if !available("sync_cost_over_1gib_with_1_percent_dirty") {
        return;
    }
    let m = Mapping::anon(1 << 30);
    let pages = m.pages();
    for p in 0..pages {
        m.write(p, 1);
    }
    let words = m.words();
    let mut t = m.tracker();
    let t0 = Instant::now();
    t.start().expect("start");
    let start_cost = t0.elapsed();

    let mut out = vec![0u64; words];
    let t0 = Instant::now();
    t.sync(&mut out).expect("sync");
    let empty = t0.elapsed();
    assert_eq!(count_bits(&out), 0);

    let dirty = pages / 100;
    let mut rng = Rng(42);
    let mut times = Vec::new();
    let mut stats = t.last_sync();
    for _round in 0..7 {
        let mut chosen = vec![0u64; words];
        let mut n = 0;
        while n < dirty {
            let p = rng.below(pages);
            if chosen[p / 64] & (1 << (p % 64)) == 0 {
                chosen[p / 64] |= 1 << (p % 64);
                m.write(p, 3);
                n += 1;
            }
        }
        out.fill(0);
        let t0 = Instant::now();
        t.sync(&mut out).expect("sync");
        times.push(t0.elapsed());
        stats = t.last_sync();
        assert_eq!(out, chosen, "the dirty set");
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    say(&format!(
        "uffd-wp sync over 1 GiB ({pages} pages), 1% dirty ({dirty} random pages): median {:.3} ms, \
         min {:.3} ms, max {:.3} ms ({} PAGEMAP_SCAN calls, {} regions); empty sync {:.3} ms; start {:.3} ms",
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1]),
        stats.ioctls,
        stats.regions,
        ms(empty),
        ms(start_cost),
    ));
}
