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
