//! Capability `xbzrle` on the source: the live synthetic guest (several passes,
//! dirtying) migrated with XBZRLE into qmig and into a real QEMU 7.2, the stream
//! captured on the way: the destination's RAM equals the source's at stop, pages
//! were encoded, and `xbzrle-cache` and the `ram` counters agree with what
//! `qmig analyze` counts in the capture.

mod common;

use common::{qemu_or_skip, run_qmig_ok, utf8, TestDir};
use serde_json::Value;
use std::time::Duration;

/// `qmig demo --xbzrle` into `dest`, with its capture analysed; returns (stats, analysis's pages).
fn demo_xbzrle(dir: &TestDir, dest: &str) -> (Value, Value) {
    let cap = dir.join("stream.mig");
    let args = [
        "demo",
        "--guest",
        "synthetic",
        "--dest",
        dest,
        "--ram-size",
        "64M",
        "--dirty-rate",
        "32",
        "--max-bandwidth",
        "64M",
        "--downtime-limit",
        "30",
        "--xbzrle",
        "--xbzrle-cache-size",
        "16M",
        "--capture",
        utf8(&cap),
    ];
    let run = run_qmig_ok(dir, &args, Duration::from_secs(120));
    let s: Value = serde_json::from_str(run.stdout.trim()).expect("demo stats JSON");
    assert_eq!((&s["status"], &s["verified"]), (&Value::from("completed"), &Value::from(true)), "{s}");
    assert!(s["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) > 2, "several passes: {s}");
    let a = run_qmig_ok(dir, &["analyze", utf8(&cap)], Duration::from_secs(60));
    let a: Value = serde_json::from_str(a.stdout.trim()).expect("analyze JSON");
    let pages = a["ram"]["blocks"][0]["pages"].clone();
    (s, pages)
}

/// The source's counters against the records in its stream.
fn check_counts(s: &Value, pages: &Value) {
    let x = &s["xbzrle-cache"];
    let hits = x["pages"].as_u64().expect("xbzrle-cache.pages");
    let overflow = x["overflow"].as_u64().expect("xbzrle-cache.overflow");
    let records = pages["xbzrle"].as_u64().expect("analyze's xbzrle count");
    assert_eq!(x["cache-size"], 16 << 20, "{s}");
    assert!(hits > 0 && records > 0, "pages were encoded: {x}, {pages}");
    // Every hit is a record, an overflow (a normal page) or an unchanged page (nothing sent).
    assert!(records + overflow <= hits, "{x} vs {pages}");
    assert!(x["cache-miss"].as_u64().unwrap_or(0) > 0, "pages sent a second time were cached first: {x}");
    assert_eq!(pages["normal"], s["ram"]["normal"], "normal pages: {pages} vs {s}");
    assert_eq!(pages["zero"], s["ram"]["duplicate"], "zero pages: {pages} vs {s}");
    // The XBZRLE bytes: at least the encoding byte and length of each record.
    assert!(x["bytes"].as_u64().unwrap_or(0) >= 3 * records + overflow * 4096, "{x}");
}

#[test]
fn xbzrle_live_guest_into_qmig() {
    let dir = TestDir::new("xbzrle-qmig");
    let (s, pages) = demo_xbzrle(&dir, "qmig");
    check_counts(&s, &pages);
    assert_eq!(s["destination"]["stats"]["status"], "completed", "{s}");
    // recv counts an XBZRLE record as a page received.
    let recv_normal = s["destination"]["stats"]["ram"]["normal"].as_u64();
    assert_eq!(recv_normal, Some(pages["normal"].as_u64().unwrap_or(0) + pages["xbzrle"].as_u64().unwrap_or(0)));
}

#[test]
fn xbzrle_live_guest_into_qemu() {
    if qemu_or_skip("xbzrle_live_guest_into_qemu").is_none() {
        return;
    }
    let dir = TestDir::new("xbzrle-qemu");
    let (s, pages) = demo_xbzrle(&dir, "qemu");
    check_counts(&s, &pages);
    assert_eq!(s["destination"]["status"], "completed", "QEMU 7.2 loaded the XBZRLE stream: {s}");
}
