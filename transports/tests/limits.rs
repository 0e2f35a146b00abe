//! Rate limit and byte counters of `MigrationWriter` / `MigrationReader` over
//! real loopback sockets. Bounds are generous (these are correctness tests, the
//! speed targets live in `benches/transport.rs`), but tight enough that a
//! limiter off by a window, or one ignoring a change of the limit, fails.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::thread;
use std::time::{Duration, Instant};
use transports::{connect, CancelToken, Channel, Listener, MigrationReader, MigrationUri, MigrationWriter, RateLimit};

const MIB: u64 = 1 << 20;
const PAGE: usize = savevm_format::TARGET_PAGE_SIZE;

/// Byte `i` of the test pattern: every page distinct, every offset inside a page too.
fn pattern(i: usize) -> u8 {
    ((i / PAGE) as u8).wrapping_mul(31) ^ (i as u8)
}

/// 256 MiB of pattern, shared by the tests of this binary.
fn guest_256m() -> &'static [u8] {
    static RAM: OnceLock<Vec<u8>> = OnceLock::new();
    RAM.get_or_init(|| (0..256 << 20).map(pattern).collect())
}

fn unique_sock(tag: &str) -> MigrationUri {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let p = std::env::temp_dir().join(format!("qmig-limits-{tag}-{}-{nanos}.sock", std::process::id()));
    MigrationUri::Unix(p)
}

/// Bind `uri` (port 0 / fresh path), returning the listener and the URI to connect to.
fn bind(uri: MigrationUri) -> (Listener, MigrationUri) {
    let token = CancelToken::new().unwrap();
    let l = Listener::bind(&uri, &token).expect("bind");
    let u = l.local_uri().clone();
    (l, u)
}

/// A destination thread: accept, then drain the stream with a `MigrationReader`
/// until end of stream. Returns (bytes read, the reader's counter, first mismatch
/// against `expect` if given).
fn drain(l: Listener, expect: Option<&'static [u8]>) -> thread::JoinHandle<(u64, u64, Option<usize>)> {
    thread::spawn(move || {
        let ch = l.accept().expect("accept");
        let rate = RateLimit::new(0);
        let mut r = MigrationReader::new(ch, rate.clone());
        let mut buf = vec![0u8; 256 << 10];
        let (mut n, mut bad) = (0usize, None);
        loop {
            let k = r.read(&mut buf).expect("read");
            if k == 0 {
                break;
            }
            if let (Some(e), None) = (expect, bad) {
                let want = e.get(n..n + k);
                if want != Some(&buf[..k]) {
                    bad = Some(n + (0..k).find(|&i| e.get(n + i) != Some(&buf[i])).unwrap_or(0));
                }
            }
            n += k;
        }
        r.into_channel().finish().expect("finish reader");
        (n as u64, rate.total_bytes(), bad)
    })
}

fn connect_to(uri: &MigrationUri) -> Channel {
    connect(uri, &CancelToken::new().unwrap()).expect("connect")
}

/// 256 MiB in 4 KiB borrowed pages at 64 MiB/s takes size/limit = 4 s (0.9x..1.25x).
fn limited_256m(listen: MigrationUri) {
    let ram = guest_256m();
    let (l, uri) = bind(listen);
    let dest = drain(l, Some(ram));
    let limit = 64 * MIB;
    let rate = RateLimit::new(limit);
    let mut w = MigrationWriter::new(connect_to(&uri), rate.clone());
    let t0 = Instant::now();
    for page in ram.chunks_exact(PAGE) {
        w.write_borrowed(page).expect("write_borrowed");
    }
    let ch = w.finish().map_err(|(_, e)| e).expect("finish");
    let took = t0.elapsed();
    ch.finish().expect("close channel");
    let (received, reader_counted, bad) = dest.join().unwrap();
    let ideal = ram.len() as f64 / limit as f64;
    let ratio = took.as_secs_f64() / ideal;
    eprintln!("{uri}: 256 MiB at 64 MiB/s took {took:.3?} = {ratio:.3}x of {ideal} s");
    assert!((0.9..=1.25).contains(&ratio), "{uri}: took {took:?}, {ratio:.3}x of the ideal {ideal} s");
    assert_eq!(rate.total_bytes(), ram.len() as u64, "writer's total_bytes");
    assert_eq!(received, ram.len() as u64, "bytes received");
    assert_eq!(reader_counted, received, "reader's total_bytes");
    assert_eq!(bad, None, "first corrupted byte");
}

#[test]
fn rate_limit_64m_tcp() {
    limited_256m("tcp:127.0.0.1:0".parse().unwrap());
}

#[test]
fn rate_limit_64m_unix() {
    limited_256m(unique_sock("64m"));
}

/// Throughput (bytes/s) of the first window of about `span` (less 5 ms of sampling
/// jitter) starting at sample `i`.
fn rate_from(samples: &[(Duration, u64)], i: usize, span: Duration) -> Option<f64> {
    let (t0, b0) = samples[i];
    let (t1, b1) = *samples[i..].iter().find(|(t, _)| *t + Duration::from_millis(5) >= t0 + span)?;
    Some((b1 - b0) as f64 / (t1 - t0).as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Raising the limit from another thread (32 → 128 MiB/s after 1 s) takes effect
/// within 200 ms. A monitor samples `total_bytes()` every 20 ms. The limiter
/// sends each 100-ms budget as one burst, so a single 100-ms window holds 0, 1
/// or 2 bursts depending on phase: the median of the 100-ms sliding windows is
/// checked (±30 %), and every 500-ms sliding window too (±30 %: 4..5 bursts).
#[test]
fn rate_limit_change_mid_transfer() {
    let (old, new) = (32 * MIB, 128 * MIB);
    let (l, uri) = bind(unique_sock("change"));
    let dest = drain(l, None);
    let rate = RateLimit::new(old);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(2));
    let sender = {
        let (rate, stop, start) = (rate.clone(), stop.clone(), start.clone());
        thread::spawn(move || {
            let ram = &guest_256m()[..16 << 20];
            let mut w = MigrationWriter::new(connect_to(&uri), rate);
            start.wait();
            let mut sent = 0u64;
            'out: loop {
                for page in ram.chunks_exact(PAGE) {
                    if stop.load(Ordering::Relaxed) {
                        break 'out;
                    }
                    w.write_borrowed(page).expect("write_borrowed");
                    sent += PAGE as u64;
                }
            }
            w.close().expect("close");
            sent
        })
    };
    start.wait();
    let t0 = Instant::now();
    let (change_at, end_at, tick) = (Duration::from_secs(1), Duration::from_millis(2600), Duration::from_millis(20));
    let mut samples = vec![(Duration::ZERO, rate.total_bytes())];
    let mut changed = None;
    for k in 1.. {
        let due = tick * k;
        if due > end_at {
            break;
        }
        if changed.is_none() && due > change_at {
            // From another thread than the sender's, like migrate-set-parameters.
            thread::sleep((t0 + change_at).saturating_duration_since(Instant::now()));
            rate.set_max_bandwidth(new);
            changed = Some((t0.elapsed(), rate.total_bytes()));
        }
        thread::sleep((t0 + due).saturating_duration_since(Instant::now()));
        samples.push((t0.elapsed(), rate.total_bytes()));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    let (received, reader_counted, _) = dest.join().unwrap();
    assert_eq!(rate.total_bytes(), sent, "writer's total_bytes");
    assert_eq!(received, sent, "bytes received");
    assert_eq!(reader_counted, sent, "reader's total_bytes");

    let (tc, bc) = changed.unwrap();
    let window = |from: Duration, to: Duration, span: Duration| -> Vec<f64> {
        (0..samples.len())
            .filter(|&i| samples[i].0 >= from)
            .filter_map(|i| {
                rate_from(&samples, i, span).filter(|_| samples[i].0 + span <= to + Duration::from_millis(5))
            })
            .collect()
    };
    let check = |what: &str, rates: &[f64], limit: u64| {
        assert!(!rates.is_empty(), "{what}: no windows");
        for r in rates {
            let x = r / limit as f64;
            assert!(
                (0.7..=1.3).contains(&x),
                "{what}: {:.1} MiB/s = {x:.2}x of the limit; all: {:?}",
                r / MIB as f64,
                { rates.iter().map(|r| (r / MIB as f64) as u64).collect::<Vec<_>>() }
            );
        }
    };
    let (ms100, ms500) = (Duration::from_millis(100), Duration::from_millis(500));
    let before100 = window(Duration::ZERO, tc, ms100);
    let after100 = window(tc + Duration::from_millis(200), end_at, ms100);
    let (mb, ma) = (median(before100.clone()), median(after100.clone()));
    let show = |v: &[f64]| v.iter().map(|r| format!("{:.0}", r / MIB as f64)).collect::<Vec<_>>().join(" ");
    eprintln!("100-ms windows before (MiB/s): {}", show(&before100));
    eprintln!("100-ms windows after+200ms (MiB/s): {}", show(&after100));
    eprintln!("medians: before {:.1} MiB/s, after {:.1} MiB/s", mb / MIB as f64, ma / MIB as f64);
    check("median 100-ms window before the change", &[mb], old);
    check("median 100-ms window from 200 ms after the change", &[ma], new);
    check("500-ms windows before the change", &window(Duration::ZERO, tc, ms500), old);
    check("500-ms windows from 200 ms after the change", &window(tc + Duration::from_millis(200), end_at, ms500), new);
    // Within 200 ms of the change at least one full new budget (12.8 MiB) went
    // out; the old limit allows at most 2 old budgets (6.4 MiB) in 200 ms.
    let at200 = samples.iter().find(|(t, _)| *t >= tc + Duration::from_millis(200)).unwrap().1;
    assert!(at200 - bc >= new / 10, "only {} bytes in the 200 ms after the change", at200 - bc);
}

/// total_bytes counts exactly what was written, through every path (copied
/// small writes, large writes, borrowed slices of odd sizes, flushes), and the
/// reader's counter exactly what was read; the bytes arrive intact.
#[test]
fn byte_counters_exact() {
    for listen in ["tcp:127.0.0.1:0".parse().unwrap(), unique_sock("count")] {
        let ram = &guest_256m()[..32 << 20];
        let (l, uri) = bind(listen);
        let dest = drain(l, Some(ram));
        let rate = RateLimit::new(0);
        let mut w = MigrationWriter::new(connect_to(&uri), rate.clone());
        let (mut off, mut k) = (0usize, 0usize);
        // Sizes cycle through tiny, page-sized, odd and larger than the 64 KiB buffer.
        let sizes = [1, 7, 4096, 4095, 8193, 70_000, 3, 1 << 20, 12, 200_000];
        while off < ram.len() {
            let n = sizes[k % sizes.len()].min(ram.len() - off);
            let part = &ram[off..off + n];
            match k % 3 {
                0 => w.write_all(part).unwrap(),
                1 => w.write_borrowed(part).unwrap(),
                _ => {
                    w.write_borrowed(part).unwrap();
                    if k % 7 == 0 {
                        w.flush().unwrap();
                        assert_eq!(rate.total_bytes(), (off + n) as u64, "after flush");
                    }
                }
            }
            off += n;
            k += 1;
        }
        w.close().expect("close");
        let (received, reader_counted, bad) = dest.join().unwrap();
        assert_eq!(rate.total_bytes(), ram.len() as u64, "{uri}: writer's total_bytes");
        assert_eq!(received, ram.len() as u64, "{uri}: bytes received");
        assert_eq!(reader_counted, received, "{uri}: reader's total_bytes");
        assert_eq!(bad, None, "{uri}: first corrupted byte");
    }
}

/// A `Pacer` holds a producer to the shared limit by the counts it charges (not by
/// what it writes), and a cancel of its channel ends a wait for the next window.
#[test]
fn pacer_charges_against_the_shared_limit() {
    let (l, uri) = bind(unique_sock("pacer"));
    let peer = thread::spawn(move || l.accept().expect("accept"));
    let ch = connect_to(&uri);
    let _peer = peer.join().expect("accept thread");
    // 100 KiB/s: a budget of 10 KiB per 100 ms window.
    let rate = RateLimit::new(100 << 10);
    let mut p = transports::Pacer::new(rate.clone());
    let t = Instant::now();
    for _ in 0..3 {
        p.charge(10 << 10, &ch).expect("charge");
    }
    // The first charge spends the window; each later one waits for a new window.
    assert!(t.elapsed() >= Duration::from_millis(180), "3 windows' budget in {:?}", t.elapsed());
    assert_eq!(rate.total_bytes(), 30 << 10, "charged bytes counted");

    // A budget of 1 byte: every charge waits for a new window, until the cancel.
    rate.set_max_bandwidth(1);
    let token = ch.cancel_token().clone();
    let canceller = thread::spawn(move || {
        thread::sleep(Duration::from_millis(250));
        token.cancel();
    });
    let t = Instant::now();
    let err = loop {
        match p.charge(1, &ch) {
            Ok(()) => assert!(t.elapsed() < Duration::from_secs(30), "the cancel never ended the charges"),
            Err(e) => break e,
        }
    };
    assert!(transports::is_cancelled(&err), "not a cancel: {err}");
    canceller.join().expect("canceller");
}
