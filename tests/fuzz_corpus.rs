//! The fuzz targets' corpora as ordinary tests: every input in
//! `fuzz/corpus/<target>/` (minimised with libFuzzer's merge, see `fuzz/run.sh`)
//! and every reproducer in `fuzz/regressions/<target>/` (the inputs that crashed a
//! target once, kept after the fix) runs through the same function the fuzz target
//! calls (`fuzz/harness/<target>.rs`), under the same allocation guard (an
//! allocation above 128 MiB or more than 1 GiB live aborts).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use testkit::AllocGuard;

#[global_allocator]
static GUARD: AllocGuard = AllocGuard::new(128 << 20, 1 << 30);

#[path = "../fuzz/harness/decode_multifd_channel.rs"]
mod decode_multifd_channel;
#[path = "../fuzz/harness/decode_return_path.rs"]
mod decode_return_path;
#[path = "../fuzz/harness/decode_stream.rs"]
mod decode_stream;
#[path = "../fuzz/harness/incoming_guest.rs"]
mod incoming_guest;
#[path = "../fuzz/harness/postcopy_dest.rs"]
mod postcopy_dest;
#[path = "../fuzz/harness/recv_sink.rs"]
mod recv_sink;
#[path = "../fuzz/harness/xbzrle.rs"]
mod xbzrle;

/// One target at a time: the harnesses measure the heap's growth, which a
/// target running on another test thread would disturb.
static SERIAL: Mutex<()> = Mutex::new(());

/// The guard, as the harnesses' allocation meter.
struct Meter;

impl recv_sink::Meter for Meter {
    fn reset_peak(&self) -> usize {
        GUARD.reset_peak()
    }
    fn peak(&self) -> usize {
        GUARD.peak()
    }
}

impl postcopy_dest::Meter for Meter {
    fn reset_peak(&self) -> usize {
        GUARD.reset_peak()
    }
    fn peak(&self) -> usize {
        GUARD.peak()
    }
}

impl incoming_guest::Meter for Meter {
    fn reset_peak(&self) -> usize {
        GUARD.reset_peak()
    }
    fn peak(&self) -> usize {
        GUARD.peak()
    }
}

/// Every file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` (and of
/// `fuzz/regressions/streams/`, the reproducers every whole-stream target takes), in
/// name order.
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut dirs = vec![root.join("corpus").join(target), root.join("regressions").join(target)];
    if ["decode_stream", "recv_sink", "incoming_guest"].contains(&target) {
        dirs.push(root.join("regressions").join("streams"));
    }
    let mut v = Vec::new();
    for d in dirs {
        if let Ok(rd) = std::fs::read_dir(d) {
            let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
            files.sort();
            v.extend(files);
        }
    }
    v
}

/// Runs `f` over every input of `target`; a failing input is named. Returns how
/// many inputs `f` called loaded.
fn each(target: &str, f: impl Fn(&[u8]) -> bool) -> usize {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for fuzz target {target}");
    let (mut failed, mut loaded) = (Vec::new(), 0);
    for p in &files {
        let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        match catch_unwind(AssertUnwindSafe(|| f(&data))) {
            Ok(l) => loaded += usize::from(l),
            Err(_) => failed.push(p.display().to_string()),
        }
    }
    assert!(failed.is_empty(), "{target}: {} of {} inputs failed: {failed:#?}", failed.len(), files.len());
    println!("{target}: {} inputs, {loaded} loaded", files.len());
    loaded
}

#[test]
fn decode_stream_corpus() {
    each("decode_stream", |d| {
        decode_stream::run(d);
        true
    });
}

#[test]
fn decode_multifd_channel_corpus() {
    each("decode_multifd_channel", |d| {
        decode_multifd_channel::run(d);
        true
    });
}

#[test]
fn decode_return_path_corpus() {
    each("decode_return_path", |d| {
        decode_return_path::run(d);
        true
    });
}

#[test]
fn xbzrle_corpus() {
    each("xbzrle", |d| {
        xbzrle::run(d);
        true
    });
}

#[test]
fn recv_sink_corpus() {
    // Streams that load exercise the checks after a load, not only refusals.
    let loaded = each("recv_sink", |d| recv_sink::run(d, &Meter));
    recv_sink::cleanup();
    assert!(loaded >= 2, "only {loaded} recv_sink inputs loaded");
}

#[test]
fn incoming_guest_corpus() {
    let loaded = each("incoming_guest", |d| incoming_guest::run(d, &Meter));
    assert!(loaded >= 2, "only {loaded} incoming_guest inputs loaded");
}

/// userfaultfd usable here? Else the postcopy tests say why and skip, except under
/// `CI=true`, where they fail.
fn uffd_or_skip(test: &str) -> bool {
    if postcopy_dest::available() {
        return true;
    }
    let why = engine::postcopy_dest::uffd::MissingUffd::probe().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{test}: userfaultfd unavailable: {why}");
    println!("{test}: SKIPPED: userfaultfd unavailable here: {why}");
    false
}

/// [`postcopy_dest::run`] on a thread of its own, failing (not hanging) the test
/// when it does not return within a minute (a thread left blocked in a userfaultfd
/// fault once hung the load: `regressions/postcopy_dest/touch-hang`, see `fuzz/README.md`).
fn postcopy_within_a_minute(data: &[u8]) -> Option<bool> {
    let (tx, rx) = std::sync::mpsc::channel();
    let data = data.to_vec();
    std::thread::spawn(move || {
        let r = catch_unwind(AssertUnwindSafe(|| postcopy_dest::run(&data, &Meter)));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(Ok(r)) => r,
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("the postcopy load did not return within 60 s (a thread blocked in a userfaultfd fault? see fuzz/README.md)"),
    }
}

#[test]
fn postcopy_dest_corpus() {
    if !uffd_or_skip("postcopy_dest_corpus") {
        return;
    }
    let loaded = each("postcopy_dest", |d| postcopy_within_a_minute(d).unwrap_or(false));
    assert!(loaded >= 2, "only {loaded} postcopy_dest inputs loaded");
}

/// The postcopy_dest target's seeds, in QEMU 7.2's shape over the harness's blocks
/// (`mem` 1 MiB, `pc.bios` 64 KiB): (name, stream).
fn postcopy_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use savevm_format::{section_ids, write_guest_prologue_with, Command, RamBlock, StoppedGuest, StreamWriter};
    let blocks = [RamBlock::new(0, "mem", 1 << 20), RamBlock::new(1, "pc.bios", 64 << 10)];
    let page = |n: u8| -> Vec<u8> { (0..4096u32).map(|i| (i as u8).wrapping_mul(n) ^ n).collect() };
    // `advise_late`: ADVISE after the RAM setup (QEMU's source never does; its
    // destination empties RAM then). `cut`: the stream ends in postcopy.
    let stream = |advise_late: bool, cut: bool| {
        let mut s = StreamWriter::new(Vec::new());
        let mut pre = vec![Command::OpenReturnPath, Command::Ping(1)];
        if !advise_late {
            pre.push(Command::PostcopyAdvise(Some((4096, 4096))));
        }
        write_guest_prologue_with(&mut s, &blocks, &StoppedGuest::default(), &pre).unwrap();
        s.section_part(section_ids::RAM).unwrap();
        s.ram_page(0, 0, &page(1)).unwrap();
        s.ram_zero(0, 0x1000).unwrap();
        s.ram_page(0, 0x5000, &page(2)).unwrap();
        s.ram_page(1, 0x2000, &page(3)).unwrap();
        s.ram_eos().unwrap();
        s.footer(section_ids::RAM).unwrap();
        if advise_late {
            s.command(&Command::PostcopyAdvise(Some((4096, 4096)))).unwrap();
            s.reset_continue();
            s.section_part(section_ids::RAM).unwrap();
            s.ram_page(0, 0x6000, &page(4)).unwrap();
            s.ram_eos().unwrap();
            s.footer(section_ids::RAM).unwrap();
        }
        s.command(&Command::PostcopyRamDiscard { block: "mem".into(), ranges: vec![(0x5000, 0x2000)] }).unwrap();
        s.reset_continue();
        s.command(&Command::Ping(2)).unwrap();
        let mut pkg = s.nested(Vec::new());
        pkg.command(&Command::PostcopyListen).unwrap();
        let timer = savevm_format::builtin::timer();
        pkg.device(section_ids::TIMER, "timer", 0, &timer, &savevm_format::builtin::timer_state(0, 0)).unwrap();
        let gs = savevm_format::builtin::globalstate();
        let running = savevm_format::builtin::globalstate_state("running");
        pkg.device(section_ids::GLOBALSTATE, "globalstate", 0, &gs, &running).unwrap();
        pkg.command(&Command::PostcopyRun).unwrap();
        let blob = pkg.finish().unwrap();
        s.packaged(&blob).unwrap();
        s.command(&Command::Ping(3)).unwrap();
        s.section_part(section_ids::RAM).unwrap();
        s.ram_page(0, 0x5000, &page(5)).unwrap();
        s.ram_zero(0, 0x8000).unwrap();
        if cut {
            return s.finish().unwrap();
        }
        s.ram_page(1, 0x3000, &page(6)).unwrap();
        s.ram_page(0, 0x5000, &page(7)).unwrap();
        s.ram_eos().unwrap();
        s.footer(section_ids::RAM).unwrap();
        s.section_end(section_ids::RAM).unwrap();
        s.ram_eos().unwrap();
        s.footer(section_ids::RAM).unwrap();
        s.eof().unwrap();
        s.finish().unwrap()
    };
    vec![
        ("seed-postcopy", stream(false, false)),
        ("seed-postcopy-advise-late", stream(true, false)),
        ("seed-postcopy-cut", stream(false, true)),
    ]
}

/// The seeds load (or, cut, fail) as built, with memory equal to the harness's
/// model; `QMIG_WRITE_FUZZ_SEEDS=1` writes them to `fuzz/corpus/postcopy_dest/`.
#[test]
fn postcopy_dest_seeds() {
    if !uffd_or_skip("postcopy_dest_seeds") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (name, bytes) in postcopy_seeds() {
        let loaded = postcopy_within_a_minute(&bytes);
        assert_eq!(loaded, Some(!name.ends_with("-cut")), "{name}");
        if std::env::var("QMIG_WRITE_FUZZ_SEEDS").as_deref() == Ok("1") {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/postcopy_dest");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), &bytes).unwrap();
        }
    }
}
