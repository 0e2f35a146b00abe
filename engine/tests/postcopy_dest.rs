//! The postcopy destination in process (`Incoming::run_postcopy`), on both memory
//! kinds: anonymous private memory (what minivmm's vm-memory mapping is) and a
//! shared shmem file mapping (what `qmig recv` maps). The stream is QEMU 7.2's
//! postcopy shape, written with `StreamWriter`; it is fed through a pipe that holds
//! back the pages after the package until the destination asked for one, so the
//! touch thread's reads are real userfaultfd faults and their requests are timed.
//!
//! Checked: the final memory equals the source's; discarded pages come again and
//! are counted; a page arriving twice after LISTEN is placed once; requests go
//! out as REQ_PAGES_ID then REQ_PAGES; a latency is recorded; states
//! `postcopy-active` then `completed`; a source that dies in postcopy fails the
//! destination quickly, with every thread gone; postcopy off refuses ADVISE.

use engine::incoming::{Incoming, IncomingError, ReturnPathOpener};
use engine::postcopy_dest::{PostcopyOptions, PostcopySink};
use engine::state::MigrationStatus;
use engine::vm::{VcpuControl, VmParts};
use savevm_format::{
    section_ids, write_guest_prologue_with, Command, PageSink, PageSlot, RamBlock, RpMessage, RpReader, StoppedGuest,
    StreamWriter,
};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vm_memory::VolatileSlice;

const PAGE: usize = 4096;
const PAGES: usize = 256;
const LEN: usize = PAGE * PAGES;
const LIMIT: Duration = Duration::from_secs(30);
/// One test at a time: the thread-count check must not see another test's threads.
static SERIAL: Mutex<()> = Mutex::new(());

/// userfaultfd usable here (MISSING mode, kernel-mode faults)? Else the test says
/// why and skips, except under `CI=true`, where it fails.
fn available(test: &str) -> bool {
    match engine::postcopy_dest::uffd::MissingUffd::probe() {
        Ok(()) => true,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("{test}: userfaultfd unavailable: {e}"),
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "{test}: SKIPPED: userfaultfd unavailable here: {e}");
            false
        }
    }
}

struct NoVcpus;
impl VcpuControl for NoVcpus {}

/// Guest memory of one block "mem": anonymous private, or a shared memfd (shmem).
struct Mem {
    ptr: *mut u8,
    file: Option<std::fs::File>,
    /// A page its discards leave in place (memory a sink could not empty).
    keep: Option<usize>,
}

// SAFETY: the mapping is plain memory owned by this struct until drop; the test
// touches it only through the engine (volatile) and after the load returns.
unsafe impl Send for Mem {}

impl Mem {
    fn new(shared: bool) -> Mem {
        let file = shared.then(|| {
            // SAFETY: memfd_create with a static C string and flags; returns a new fd or -1.
            let fd = unsafe { libc::memfd_create(c"qmig-postcopy-test".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            // SAFETY: a fresh descriptor we own.
            let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            f.set_len(LEN as u64).expect("size the memfd");
            f
        });
        let (flags, fd) = match &file {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a new mapping of LEN bytes, not overlapping anything (addr null).
        let p = unsafe { libc::mmap(std::ptr::null_mut(), LEN, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Mem { ptr: p.cast(), file, keep: None }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; LEN];
        // SAFETY: the mapping is LEN bytes and the load (and its userfaultfd) is over.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, v.as_mut_ptr(), LEN) };
        v
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.ptr.cast(), LEN) };
    }
}

impl PageSink for Mem {
    fn page_mut(&mut self, _: &RamBlock, offset: u64) -> Option<PageSlot<'_>> {
        let o = usize::try_from(offset).ok().filter(|o| o + PAGE <= LEN)?;
        // SAFETY: inside our LEN-byte mapping, accessed only with volatile copies.
        Some(PageSlot::Guest(unsafe { VolatileSlice::new(self.ptr.add(o), PAGE) }))
    }

    fn ram_blocks(&mut self, blocks: &[RamBlock]) -> Result<(), String> {
        match blocks {
            [b] if b.name == "mem" && b.length == LEN as u64 => Ok(()),
            _ => Err(format!("unexpected blocks {blocks:?}")),
        }
    }

    fn discard(&mut self, _: &RamBlock, start: u64, len: u64) {
        match self.keep.map(|k| (k * PAGE) as u64).filter(|&k| k >= start && k < start + len) {
            Some(k) => {
                self.punch(start, k - start);
                self.punch(k + PAGE as u64, start + len - k - PAGE as u64);
            }
            None => self.punch(start, len),
        }
    }
}

impl Mem {
    /// Drops `len` bytes at `start` (nothing when `len` is 0).
    fn punch(&self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        // QEMU's ram_block_discard_range: punch the file, or drop anonymous pages.
        let r = match &self.file {
            Some(f) => {
                // SAFETY: fallocate on our memfd within its size.
                unsafe {
                    libc::fallocate(
                        f.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        start as i64,
                        len as i64,
                    )
                }
            }
            // SAFETY: inside our mapping; MADV_DONTNEED drops the pages (they read as zero).
            None => unsafe { libc::madvise(self.ptr.add(start as usize).cast(), len as usize, libc::MADV_DONTNEED) },
        };
        assert_eq!(r, 0, "discard: {}", std::io::Error::last_os_error());
    }
}

impl PostcopySink for Mem {
    fn host_memory(&self, _: &RamBlock) -> Option<(u64, u64)> {
        Some((self.ptr as u64, LEN as u64))
    }
}

fn page(p: usize, round: u8) -> Vec<u8> {
    (0..PAGE).map(|i| (p * 7 + i * 13) as u8 ^ round).collect()
}

/// The source's stream, cut where the postcopy pages begin (after PING 4), and the
/// final RAM. Pre-copy: pages 0..PAGES/2 (even pages data, odd ones zero), then a
/// discard of pages 32..96 (dirtied); postcopy: the discarded pages (new data), the
/// never-sent pages, and page 200 a second time.
fn stream() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let blocks = [RamBlock::new(0, "mem", LEN as u64)];
    let mut ram = vec![0u8; LEN];
    let mut s = StreamWriter::new(Vec::new());
    let pre = [Command::OpenReturnPath, Command::Ping(1), Command::PostcopyAdvise(Some((4096, 4096)))];
    write_guest_prologue_with(&mut s, &blocks, &StoppedGuest::default(), &pre).unwrap();
    s.section_part(section_ids::RAM).unwrap();
    for p in 0..PAGES / 2 {
        if p % 2 == 0 {
            let d = page(p, 0);
            s.ram_page(0, (p * PAGE) as u64, &d).unwrap();
            ram[p * PAGE..(p + 1) * PAGE].copy_from_slice(&d);
        } else {
            s.ram_zero(0, (p * PAGE) as u64).unwrap();
        }
    }
    s.ram_eos().unwrap();
    s.footer(section_ids::RAM).unwrap();
    s.command(&Command::PostcopyRamDiscard {
        block: "mem".into(),
        ranges: vec![((32 * PAGE) as u64, (64 * PAGE) as u64)],
    })
    .unwrap();
    s.reset_continue();
    s.command(&Command::Ping(2)).unwrap();
    let mut pkg = s.nested(Vec::new());
    pkg.command(&Command::PostcopyListen).unwrap();
    let timer = savevm_format::builtin::timer();
    pkg.device(section_ids::TIMER, "timer", 0, &timer, &savevm_format::builtin::timer_state(0, 0)).unwrap();
    let gs = savevm_format::builtin::globalstate();
    pkg.device(section_ids::GLOBALSTATE, "globalstate", 0, &gs, &savevm_format::builtin::globalstate_state("running"))
        .unwrap();
    pkg.command(&Command::Ping(3)).unwrap();
    pkg.command(&Command::PostcopyRun).unwrap();
    let blob = pkg.finish().unwrap();
    s.packaged(&blob).unwrap();
    s.command(&Command::Ping(4)).unwrap();
    let cut = s.get_mut().len();
    s.section_part(section_ids::RAM).unwrap();
    let mut post: Vec<usize> = (32..96).chain(PAGES / 2..PAGES).collect();
    post.push(200);
    let mut seen = std::collections::HashSet::new();
    for &p in &post {
        let first = seen.insert(p);
        if p % 5 == 3 {
            s.ram_zero(0, (p * PAGE) as u64).unwrap();
            ram[p * PAGE..(p + 1) * PAGE].fill(0);
        } else {
            // Page 200's second copy carries other bytes: it must not land.
            let d = page(p, if first { 1 } else { 2 });
            s.ram_page(0, (p * PAGE) as u64, &d).unwrap();
            if first {
                ram[p * PAGE..(p + 1) * PAGE].copy_from_slice(&d);
            }
        }
    }
    s.ram_eos().unwrap();
    s.footer(section_ids::RAM).unwrap();
    s.section_end(section_ids::RAM).unwrap();
    s.ram_eos().unwrap();
    s.footer(section_ids::RAM).unwrap();
    s.eof().unwrap();
    let bytes = s.finish().unwrap();
    (bytes[..cut].to_vec(), bytes[cut..].to_vec(), ram)
}

/// A return path recording what the destination wrote, with a condition for waiters.
#[derive(Clone, Default)]
struct Wire(Arc<(Mutex<Vec<u8>>, Condvar)>);

impl Write for Wire {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 .0.lock().unwrap().extend_from_slice(b);
        self.0 .1.notify_all();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Wire {
    fn opener(&self) -> ReturnPathOpener<'static> {
        let w = self.clone();
        Box::new(move || Ok(Box::new(w.clone()) as Box<dyn Write + Send>))
    }
    fn messages(&self) -> Vec<RpMessage> {
        let bytes = self.0 .0.lock().unwrap().clone();
        let mut r = RpReader::new(&bytes[..]);
        let mut v = Vec::new();
        while let Ok(Some(m)) = r.next() {
            v.push(m);
        }
        v
    }
    /// Wait (up to LIMIT) for a page request.
    fn wait_request(&self) -> bool {
        let deadline = Instant::now() + LIMIT;
        loop {
            if self.messages().iter().any(|m| matches!(m, RpMessage::ReqPagesId { .. })) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let g = self.0 .0.lock().unwrap();
            let _ = self.0 .1.wait_timeout(g, left.min(Duration::from_millis(50))).unwrap();
        }
    }
}

/// Feeds `head`, then (after a page request, or `die` right away) `tail` or nothing.
fn feeder(head: Vec<u8>, tail: Vec<u8>, wire: Wire, die: bool) -> (std::fs::File, std::thread::JoinHandle<()>) {
    let (r, mut w) = std::io::pipe().map(|(r, w)| (std::fs::File::from(std::os::fd::OwnedFd::from(r)), w)).unwrap();
    let t = std::thread::spawn(move || {
        if w.write_all(&head).is_err() {
            return;
        }
        let asked = wire.wait_request();
        if die {
            return; // the pipe closes: the source died in postcopy
        }
        assert!(asked, "no page request within {LIMIT:?}");
        let _ = w.write_all(&tail);
    });
    (r, t)
}

fn run(shared: bool) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (head, tail, want) = stream();
    let mut mem = Mem::new(shared);
    let wire = Wire::default();
    let (reader, feed) = feeder(head, tail, wire.clone(), false);
    let inc = Incoming::new(true).with_postcopy(PostcopyOptions { touch: true, touch_seed: 7 });
    let notes = inc.state.subscribe();
    struct Resume(Arc<Mutex<bool>>);
    impl VcpuControl for Resume {
        fn resume(&mut self) -> Result<(), engine::vm::VmmError> {
            *self.0.lock().unwrap() = true;
            Ok(())
        }
    }
    let resumed = Arc::new(Mutex::new(false));
    let r = inc
        .run_postcopy(reader, &mut mem, &mut VmParts::default(), &mut Resume(resumed.clone()), wire.opener())
        .unwrap_or_else(|e| panic!("postcopy load failed: {}", engine::error::report(&e)));
    feed.join().unwrap();
    assert!(*resumed.lock().unwrap(), "the guest resumes at RUN (autostart)");
    assert!(r.resumed);
    let pc = r.postcopy.clone().expect("postcopy report");
    assert_eq!(pc.discarded_pages, 64, "pages 32..96, all received before (data or zero), are dropped");
    assert_eq!(pc.duplicates, 1, "page 200 came twice after LISTEN and was placed once: {pc:?}");
    assert_eq!(pc.placed, 64 + (PAGES / 2) as u64, "{pc:?}");
    assert!(pc.requests >= 1 && !pc.latencies_us.is_empty(), "a timed page request: {pc:?}");
    assert_eq!(pc.rewritten, 0, "{pc:?}");
    let msgs = wire.messages();
    let reqs: Vec<&RpMessage> =
        msgs.iter().filter(|m| matches!(m, RpMessage::ReqPages { .. } | RpMessage::ReqPagesId { .. })).collect();
    assert!(matches!(reqs.first(), Some(RpMessage::ReqPagesId { block, len: 4096, .. }) if block == "mem"), "{msgs:?}");
    assert!(reqs[1..].iter().all(|m| matches!(m, RpMessage::ReqPages { len: 4096, .. })), "{msgs:?}");
    assert_eq!(reqs.len() as u64, pc.requests);
    assert_eq!(msgs.last(), Some(&RpMessage::Shut(0)));
    assert_eq!(msgs.iter().filter(|m| matches!(m, RpMessage::Pong(_))).count(), 4);
    let got = mem.bytes();
    for p in 0..PAGES {
        assert!(got[p * PAGE..(p + 1) * PAGE] == want[p * PAGE..(p + 1) * PAGE], "page {p} differs");
    }
    assert_eq!(inc.state.status(), MigrationStatus::Completed);
    let states: Vec<MigrationStatus> = notes
        .try_iter()
        .filter_map(|n| match n {
            engine::state::Notification::State { to, .. } => Some(to),
            _ => None,
        })
        .collect();
    assert_eq!(states, vec![MigrationStatus::Active, MigrationStatus::PostcopyActive, MigrationStatus::Completed]);
}

#[test]
fn postcopy_into_anonymous_memory() {
    if !available("postcopy_into_anonymous_memory") {
        return;
    }
    run(false);
}

#[test]
fn postcopy_into_shared_file_memory() {
    if !available("postcopy_into_shared_file_memory") {
        return;
    }
    run(true);
}

/// Threads of this process the engine named (`postcopy faults`, `postcopy touch`,
/// `postcopy package`, `return path`, `qmig-...`; comm holds 15 bytes). Not every
/// thread: libtest starts the next test's thread (waiting on [`SERIAL`]) whenever
/// one ends, which made a count of all threads race with the other tests.
fn threads() -> usize {
    let Ok(d) = std::fs::read_dir("/proc/self/task") else { return 0 };
    d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("postcopy") || c.starts_with("return path") || c.starts_with("qmig-"))
        .count()
}

#[test]
fn source_dying_in_postcopy_fails_fast_and_leaves_no_thread() {
    if !available("source_dying_in_postcopy_fails_fast_and_leaves_no_thread") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (head, tail, _) = stream();
    let before = threads();
    let mut mem = Mem::new(true);
    let wire = Wire::default();
    let (reader, feed) = feeder(head, tail, wire.clone(), true);
    let inc = Incoming::new(false).with_postcopy(PostcopyOptions { touch: true, touch_seed: 3 });
    let t = Instant::now();
    let r = inc.run_postcopy(reader, &mut mem, &mut VmParts::default(), &mut NoVcpus, wire.opener());
    let took = t.elapsed();
    feed.join().unwrap();
    let e = r.expect_err("the stream ended in postcopy");
    assert!(matches!(e, IncomingError::PostcopyStream(_)), "{e:?}");
    assert!(e.to_string().contains("no postcopy recovery"), "{e}");
    assert_eq!(inc.state.status(), MigrationStatus::Failed);
    assert_eq!(wire.messages().last(), Some(&RpMessage::Shut(1)));
    assert!(took < LIMIT, "took {took:?}");
    eprintln!("failed in {took:?}: {}", engine::error::report(&e));
    // The fault and touch threads are joined (the toucher woken by the unregistration).
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads() > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(threads() <= before, "threads left: {} > {before}", threads());
}

#[test]
fn advise_with_postcopy_off_is_refused_and_on_is_accepted() {
    if !available("advise_with_postcopy_off_is_refused_and_on_is_accepted") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (head, tail, _) = stream();
    let all = [head, tail].concat();
    let mut mem = Mem::new(false);
    let e = Incoming::new(false)
        .run_with_return_path(&all[..], &mut mem, &mut VmParts::default(), &mut NoVcpus, Wire::default().opener())
        .expect_err("postcopy-ram off here");
    assert!(e.to_string().contains("RAM postcopy is disabled but have 16 byte advise"), "{e}");
    // The whole stream at once (no gate): nothing faults, every page arrives in the background.
    let mut mem = Mem::new(false);
    let r = Incoming::new(false)
        .with_postcopy(PostcopyOptions::default())
        .run_postcopy(&all[..], &mut mem, &mut VmParts::default(), &mut NoVcpus, Wire::default().opener())
        .unwrap_or_else(|e| panic!("{}", engine::error::report(&e)));
    let pc = r.postcopy.expect("postcopy report");
    assert_eq!((pc.requests, pc.touches, pc.duplicates), (0, 0, 1), "{pc:?}");
}

/// Capability on both ends but no switch: ADVISE, then an ordinary pre-copy end
/// (QEMU's `postcopy-ram` without `migrate-start-postcopy`): it loads as pre-copy.
#[test]
fn advised_but_never_switched_loads_as_precopy() {
    if !available("advised_but_never_switched_loads_as_precopy") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ram: Vec<u8> = (0..LEN).map(|i| if (i / PAGE).is_multiple_of(3) { (i % 251) as u8 } else { 0 }).collect();
    let pre = [Command::OpenReturnPath, Command::Ping(1), Command::PostcopyAdvise(Some((4096, 4096)))];
    let blocks = [RamBlock::new(0, "mem", LEN as u64)];
    let mut s = StreamWriter::new(Vec::new());
    write_guest_prologue_with(&mut s, &blocks, &StoppedGuest::default(), &pre).unwrap();
    s.section_part(section_ids::RAM).unwrap();
    for p in 0..PAGES {
        s.ram_page_auto(0, (p * PAGE) as u64, &ram[p * PAGE..(p + 1) * PAGE]).unwrap();
    }
    savevm_format::write_guest_epilogue(&mut s, &StoppedGuest::default()).unwrap();
    let bytes = s.finish().unwrap();
    let mut mem = Mem::new(true);
    let wire = Wire::default();
    let r = Incoming::new(false)
        .with_postcopy(PostcopyOptions { touch: true, touch_seed: 1 })
        .run_postcopy(&bytes[..], &mut mem, &mut VmParts::default(), &mut NoVcpus, wire.opener())
        .unwrap_or_else(|e| panic!("{}", engine::error::report(&e)));
    assert!(r.postcopy.is_none(), "no switch, no postcopy phase");
    assert_eq!(mem.bytes(), ram);
    assert_eq!(wire.messages(), vec![RpMessage::Pong(1), RpMessage::Shut(0)]);
}

/// QEMU 7.2's ADVISE rules: a second ADVISE is refused ("wrong postcopy state"), and
/// an ADVISE after the RAM setup empties RAM (QEMU's `ram_postcopy_incoming_init`):
/// pages received before it are dropped, the guest reads them as zero.
#[test]
fn advise_twice_is_refused_and_late_advise_empties_ram() {
    if !available("advise_twice_is_refused_and_late_advise_empties_ram") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let blocks = [RamBlock::new(0, "mem", LEN as u64)];
    let advise = Command::PostcopyAdvise(Some((4096, 4096)));
    // ADVISE twice, before the RAM setup.
    let mut s = StreamWriter::new(Vec::new());
    let pre = [Command::OpenReturnPath, advise.clone(), advise.clone()];
    write_guest_prologue_with(&mut s, &blocks, &StoppedGuest::default(), &pre).unwrap();
    savevm_format::write_guest_epilogue(&mut s, &StoppedGuest::default()).unwrap();
    let bytes = s.finish().unwrap();
    let mut mem = Mem::new(false);
    let e = Incoming::new(false)
        .with_postcopy(PostcopyOptions::default())
        .run_postcopy(&bytes[..], &mut mem, &mut VmParts::default(), &mut NoVcpus, Wire::default().opener())
        .expect_err("a second ADVISE");
    assert!(e.to_string().contains("POSTCOPY_ADVISE a second time"), "{e}");

    // Pages 0..4, then ADVISE, then page 2 again and the end: only page 2 survives.
    let mut s = StreamWriter::new(Vec::new());
    write_guest_prologue_with(&mut s, &blocks, &StoppedGuest::default(), &[Command::OpenReturnPath]).unwrap();
    s.section_part(section_ids::RAM).unwrap();
    for p in 0..4 {
        s.ram_page(0, (p * PAGE) as u64, &page(p, 0)).unwrap();
    }
    s.ram_eos().unwrap();
    s.footer(section_ids::RAM).unwrap();
    s.command(&advise).unwrap();
    s.reset_continue();
    s.section_part(section_ids::RAM).unwrap();
    s.ram_page(0, (2 * PAGE) as u64, &page(2, 1)).unwrap();
    s.ram_eos().unwrap();
    s.footer(section_ids::RAM).unwrap();
    savevm_format::write_guest_epilogue(&mut s, &StoppedGuest::default()).unwrap();
    let bytes = s.finish().unwrap();
    let mut mem = Mem::new(true);
    Incoming::new(false)
        .with_postcopy(PostcopyOptions::default())
        .run_postcopy(&bytes[..], &mut mem, &mut VmParts::default(), &mut NoVcpus, Wire::default().opener())
        .unwrap_or_else(|e| panic!("{}", engine::error::report(&e)));
    let mut want = vec![0u8; LEN];
    want[2 * PAGE..3 * PAGE].copy_from_slice(&page(2, 1));
    assert!(mem.bytes() == want, "pages received before the late ADVISE survived it");
}

/// `unregister_all` must wake every thread blocked in a fault on the ranges, also
/// one that entered the kernel's fault handler just as the unregister ran. With
/// per-VMA locks (Linux 6.4+) such a thread can queue itself after UFFDIO_UNREGISTER's
/// own wake-up and sleep forever (the `postcopy_dest` fuzz target hung so in
/// `Threads::stop`). Races a reader against the unregister many times, each within
/// a bounded wait.
#[test]
fn unregister_wakes_a_fault_racing_with_it() {
    use engine::postcopy_dest::uffd::MissingUffd;
    use std::sync::atomic::{AtomicU64, Ordering};
    if !available("unregister_wakes_a_fault_racing_with_it") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const N: usize = 16;
    let rounds: u64 = std::env::var("QMIG_UFFD_RACE_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
    for round in 0..rounds {
        // SAFETY: a fresh anonymous private mapping of N pages, unmapped below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                N * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let addr = ptr as u64;
        let uffd = MissingUffd::new().expect("userfaultfd");
        // SAFETY: our mapping, unmapped only after the userfaultfd is dropped and the reader joined.
        unsafe { uffd.register(addr, (N * PAGE) as u64) }.expect("register");
        let started = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let s = started.clone();
        let reader = std::thread::spawn(move || {
            s.store(1, Ordering::Release);
            let mut sum = 0u64;
            for i in 0..N {
                // SAFETY: inside the mapping, alive until this thread is joined.
                sum += u64::from(unsafe { std::ptr::read_volatile((addr + (i * PAGE) as u64) as *const u8) });
            }
            let _ = tx.send(sum);
        });
        while started.load(Ordering::Acquire) == 0 {
            std::hint::spin_loop();
        }
        // Vary the moment of the unregister against the reader's first fault.
        for _ in 0..(round % 64) * 50 {
            std::hint::spin_loop();
        }
        uffd.unregister_all();
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(sum) => assert_eq!(sum, 0, "an unregistered missing page reads as zero"),
            Err(_) => panic!("round {round}: a thread faulting on the memory was not woken by unregister_all"),
        }
        reader.join().expect("reader");
        drop(uffd);
        // SAFETY: our mapping; nothing uses it any more.
        unsafe { libc::munmap(ptr, N * PAGE) };
    }
}

/// Contiguous postcopy pages are placed a run at a time (one UFFDIO_COPY each); a
/// page inside a run that is present although never received (memory the sink could
/// not empty: UFFDIO_COPY stops there with EEXIST) is written in place and the rest
/// of the run still lands, on both memory kinds.
#[test]
fn a_run_across_a_present_page_places_every_page_once() {
    if !available("a_run_across_a_present_page_places_every_page_once") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const N: usize = 40;
    let blocks = [RamBlock::new(0, "mem", LEN as u64)];
    let mut s = StreamWriter::new(Vec::new());
    let pre = [Command::OpenReturnPath, Command::Ping(1), Command::PostcopyAdvise(Some((4096, 4096)))];
    write_guest_prologue_with(&mut s, &blocks, &StoppedGuest::default(), &pre).unwrap();
    s.section_part(section_ids::RAM).unwrap();
    for p in 0..8 {
        s.ram_page(0, (p * PAGE) as u64, &page(p, 0)).unwrap();
    }
    s.ram_eos().unwrap();
    s.footer(section_ids::RAM).unwrap();
    s.command(&Command::PostcopyRamDiscard { block: "mem".into(), ranges: vec![(0, (N * PAGE) as u64)] }).unwrap();
    s.reset_continue();
    let mut pkg = s.nested(Vec::new());
    pkg.command(&Command::PostcopyListen).unwrap();
    let gs = savevm_format::builtin::globalstate();
    pkg.device(section_ids::GLOBALSTATE, "globalstate", 0, &gs, &savevm_format::builtin::globalstate_state("running"))
        .unwrap();
    pkg.command(&Command::PostcopyRun).unwrap();
    let blob = pkg.finish().unwrap();
    s.packaged(&blob).unwrap();
    s.section_end(section_ids::RAM).unwrap();
    // 0..N in order: runs of 16, 16 and 8 pages; page 5 is present (kept).
    for p in 0..N {
        s.ram_page(0, (p * PAGE) as u64, &page(p, 1)).unwrap();
    }
    s.ram_eos().unwrap();
    s.footer(section_ids::RAM).unwrap();
    s.eof().unwrap();
    let bytes = s.finish().unwrap();
    let mut want = vec![0u8; LEN];
    for p in 0..N {
        want[p * PAGE..(p + 1) * PAGE].copy_from_slice(&page(p, 1));
    }
    for shared in [false, true] {
        let mut mem = Mem::new(shared);
        mem.keep = Some(5);
        let r = Incoming::new(false)
            .with_postcopy(PostcopyOptions::default())
            .run_postcopy(&bytes[..], &mut mem, &mut VmParts::default(), &mut NoVcpus, Wire::default().opener())
            .unwrap_or_else(|e| panic!("shared {shared}: {}", engine::error::report(&e)));
        let pc = r.postcopy.expect("postcopy report");
        assert_eq!(pc.placed, N as u64, "shared {shared}: {pc:?}");
        assert_eq!(pc.rewritten, 1, "shared {shared}: page 5 was present: {pc:?}");
        assert_eq!(pc.duplicates, 0, "shared {shared}: {pc:?}");
        assert_eq!(r.normal, N as u64 + 8, "shared {shared}");
        let got = mem.bytes();
        for p in 0..PAGES {
            assert!(
                got[p * PAGE..(p + 1) * PAGE] == want[p * PAGE..(p + 1) * PAGE],
                "shared {shared}: page {p} differs"
            );
        }
    }
}
