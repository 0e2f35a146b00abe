//! Downtime and total time of a live migration, against `downtime-limit`.
//!
//! A 1 GiB [`SyntheticGuest`] (one writer thread dirtying 0, 64 or 256 MiB/s,
//! counted as page writes × 4 KiB, 80 % of them in the first 1/16 of RAM) is migrated by the engine over a
//! unix socket to a destination in another thread that decodes the stream
//! straight into a 1 GiB buffer, 10 times per dirty rate, with
//! `downtime-limit` 300 ms, for `max-bandwidth` 0 (unlimited) and 1 GiB/s.
//! After every run the destination's RAM must equal the source's RAM at the
//! moment of stop (the guest stays stopped after completion); any difference
//! aborts the bench.
//!
//! Two views of the downtime are measured:
//!
//! - `src`: the engine's `downtime` (`query-migrate`): from the vCPUs having
//!   stopped to the source having written the last byte and closed the stream;
//! - `dst`: from the same instant (the return of `VcpuControl::stop`, recorded
//!   by a wrapper around the guest's vCPU control) to the destination having
//!   decoded the EOF record, i.e. having loaded everything.
//!
//! The goal is a measured downtime <= `downtime-limit` in every run. Per row
//! the bench prints min / median / p90 / max of both views, total time,
//! passes (`dirty-sync-count`) and the runs over the limit; a second table
//! shows what the switchover decision was based on (the engine's bandwidth
//! estimate, threshold and pending bytes at the moment it stopped the guest,
//! read from `query-migrate` inside `stop`) and what the END section then
//! really held and how fast it went, to explain a miss.
//!
//! Run: `cargo bench --bench downtime` (about 75 s on 2 cores). The machine
//! matters: a 2-core box shared with other work shows other processes' CPU
//! time during the downtime (reported per run, and such runs flagged).
//!
//! Environment (all optional):
//!
//! - `QMIG_BENCH_RUNS` runs per row (10); `QMIG_BENCH_RAM_MIB` guest RAM (1024);
//! - `QMIG_BENCH_RATES` dirty rates in MiB/s (`0,64,256`);
//! - `QMIG_BENCH_BANDWIDTHS` `max-bandwidth` values in MiB/s, 0 = unlimited (`0,1024`);
//! - `QMIG_BENCH_DOWNTIME_MS` `downtime-limit` (300);
//! - `QMIG_BENCH_FILL` `random` (every page random: stream bytes = RAM bytes,
//!   the default) or `mixed4` (3 pages in 4 zero, the demo's guest);
//! - `QMIG_BENCH_DST` `prefaulted` (the default: one buffer, poisoned with
//!   0xa5 before every run) or `fresh` (new untouched memory every run, so the
//!   destination takes a page fault on each first write, as QEMU's does; with
//!   `mixed4` the check cannot tell an unsent zero page from a sent one);
//! - `QMIG_BENCH_VCPUS` writer threads (1).
//!
//! Without `--bench` (e.g. `cargo test --benches`) it does a quick smoke run
//! (64 MiB, 1 run per row) unless the variables say otherwise.

use engine::info::{InfoHandle, MigrationInfo};
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::{GuestRegion, Outgoing};
use engine::state::MigrationStatus;
use engine::vm::{VcpuControl, VmmError};
use savevm_format::{Decoder, Event, PageSink, RamBlock, SectionKind};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use testkit::pattern::{fill_page, Pattern};
use testkit::synthetic::{SyntheticGuest, SyntheticVcpus};
use transports::{connect, CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};

const PAGE: usize = savevm_format::TARGET_PAGE_SIZE;
const MIB: f64 = (1u64 << 20) as f64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Random,
    Mixed4,
}

#[derive(Debug, Clone)]
struct Config {
    runs: usize,
    ram: usize,
    rates: Vec<u64>,
    bandwidths: Vec<u64>,
    downtime_limit: u64,
    fill: Fill,
    fresh_dst: bool,
    vcpus: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v}: not a valid value")),
        Err(_) => default,
    }
}

fn env_list(name: &str, default: &[u64]) -> Vec<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse().unwrap_or_else(|_| panic!("{name}={v}: not a list of integers")))
            .collect(),
        Err(_) => default.to_vec(),
    }
}

impl Config {
    fn from_env(quick: bool) -> Config {
        let fill = match std::env::var("QMIG_BENCH_FILL").as_deref() {
            Err(_) | Ok("random") => Fill::Random,
            Ok("mixed4") => Fill::Mixed4,
            Ok(other) => panic!("QMIG_BENCH_FILL={other}: expected random or mixed4"),
        };
        let fresh_dst = match std::env::var("QMIG_BENCH_DST").as_deref() {
            Err(_) | Ok("prefaulted") => false,
            Ok("fresh") => true,
            Ok(other) => panic!("QMIG_BENCH_DST={other}: expected prefaulted or fresh"),
        };
        let ram_mib: usize = env_or("QMIG_BENCH_RAM_MIB", if quick { 64 } else { 1024 });
        assert!(ram_mib > 0, "QMIG_BENCH_RAM_MIB must be positive");
        Config {
            runs: env_or("QMIG_BENCH_RUNS", if quick { 1 } else { 10 }).max(1),
            ram: ram_mib << 20,
            rates: env_list("QMIG_BENCH_RATES", &[0, 64, 256]),
            bandwidths: env_list("QMIG_BENCH_BANDWIDTHS", &[0, 1024]),
            downtime_limit: env_or("QMIG_BENCH_DOWNTIME_MS", 300),
            fill,
            fresh_dst,
            vcpus: env_or("QMIG_BENCH_VCPUS", 1usize).max(1),
        }
    }
}

/// System-wide CPU time (all CPUs, in USER_HZ ticks), this process's own CPU
/// time and minor page faults, to tell a slow stop-and-copy caused by the
/// machine (other processes, idle CPU, hypervisor steal) or by page faults
/// from one caused by the engine.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    busy: u64,
    idle: u64,
    steal: u64,
    /// This process's utime + stime.
    own: u64,
    minflt: u64,
}

impl Load {
    fn now() -> Load {
        let mut l = Load::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
            if let Some(cpu) = stat.lines().next() {
                let v: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal
                if v.len() >= 8 {
                    l.busy = v[0] + v[1] + v[2] + v[5] + v[6];
                    l.idle = v[3] + v[4];
                    l.steal = v[7];
                }
            }
        }
        if let Ok(st) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the ")" closing the command name: state is field 3, minflt field 10.
            if let Some(rest) = st.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<u64> = rest.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
                // minflt is field 10, utime 14, stime 15 (state, field 3, skipped).
                if f.len() >= 13 {
                    l.minflt = f[6];
                    l.own = f[10] + f[11];
                }
            }
        }
        l
    }

    /// CPU ticks spent by other processes (the machine is shared).
    fn others(&self) -> u64 {
        self.busy.saturating_sub(self.own)
    }

    fn since(self, before: Load) -> Load {
        Load {
            busy: self.busy.saturating_sub(before.busy),
            idle: self.idle.saturating_sub(before.idle),
            steal: self.steal.saturating_sub(before.steal),
            own: self.own.saturating_sub(before.own),
            minflt: self.minflt.saturating_sub(before.minflt),
        }
    }
}

/// The guest's vCPU control, recording when the engine stopped it and what
/// `query-migrate` said at that moment (the figures the decision was made on).
struct TimedVcpus {
    inner: SyntheticVcpus,
    info: InfoHandle,
    stop_called: Option<Instant>,
    stopped: Option<Instant>,
    at_stop: Option<MigrationInfo>,
    load_at_stop: Load,
}

impl VcpuControl for TimedVcpus {
    fn stop(&mut self) -> Result<(), VmmError> {
        self.stop_called = Some(Instant::now());
        self.at_stop = Some(self.info.get());
        self.load_at_stop = Load::now();
        self.inner.stop()?;
        self.stopped = Some(Instant::now());
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        self.inner.resume()
    }

    fn set_throttle(&mut self, percentage: u8) -> Result<(), VmmError> {
        self.inner.set_throttle(percentage)
    }
}

/// Destination RAM: pages are decoded straight into it.
struct Mem(Vec<u8>);

impl PageSink for Mem {
    fn page_mut(&mut self, _: &RamBlock, off: u64) -> Option<savevm_format::PageSlot<'_>> {
        (self.0.get_mut(off as usize..off as usize + PAGE)).map(savevm_format::PageSlot::from)
    }
}

/// What the destination saw.
struct DestReport {
    mem: Vec<u8>,
    /// When the EOF record was decoded (everything loaded).
    eof_at: Instant,
    /// When the RAM END section started to be decoded.
    end_at: Option<Instant>,
    /// Stream bytes from the RAM END section's start to the EOF record.
    end_bytes: u64,
    /// Page and zero-page records in the RAM END section.
    end_pages: u64,
    end_zero: u64,
    /// RAM sections (START, PARTs, END).
    ram_sections: u64,
}

fn destination(listener: Listener, mem: Vec<u8>) -> JoinHandle<Result<DestReport, String>> {
    std::thread::spawn(move || {
        let ch = listener.accept().map_err(|e| e.to_string())?;
        let mut d = Decoder::new(MigrationReader::new(ch, RateLimit::new(0)));
        let mut mem = Mem(mem);
        let (mut eof_at, mut end_at, mut end_off) = (None, None, 0u64);
        let (mut in_end, mut end_pages, mut end_zero, mut ram_sections, mut end_bytes) = (false, 0, 0, 0, 0);
        loop {
            let ev = d.next_with(&mut mem).map_err(|e| e.to_string())?;
            let Some(ev) = ev else { break };
            match ev {
                Event::SectionStart(h) if h.idstr == "ram" => {
                    ram_sections += 1;
                    if h.kind == SectionKind::End {
                        end_at = Some(Instant::now());
                        end_off = h.offset;
                        in_end = true;
                    }
                }
                Event::Page { .. } if in_end => end_pages += 1,
                Event::ZeroPage { .. } if in_end => end_zero += 1,
                Event::RamEos => in_end = false,
                Event::Eof => {
                    eof_at = Some(Instant::now());
                    end_bytes = d.offset().saturating_sub(end_off);
                }
                _ => {}
            }
        }
        let eof_at = eof_at.ok_or("the stream ended without an EOF record")?;
        Ok(DestReport { mem: mem.0, eof_at, end_at, end_bytes, end_pages, end_zero, ram_sections })
    })
}

/// One run's figures.
#[derive(Debug, Clone)]
struct Run {
    /// Engine `downtime`.
    src_ms: f64,
    /// vCPUs stopped -> destination decoded EOF.
    dst_ms: f64,
    /// `stop()` call -> vCPUs parked (not in either downtime).
    stop_ms: f64,
    total_s: f64,
    passes: u64,
    /// The engine's last bandwidth estimate before the stop (bytes/ms), and the threshold from it.
    bw_est: f64,
    threshold: u64,
    /// Pending (dirty, unsent) bytes at the decision.
    remaining: u64,
    /// Stream bytes / page records of the END section.
    end_bytes: u64,
    end_pages: u64,
    /// stop -> END section seen at the destination (ms).
    end_lag_ms: f64,
    transferred: u64,
    ram_sections: u64,
    /// CPU ticks and minor faults from the stop to the end.
    load: Load,
}

impl Run {
    /// Share of the machine's CPU time during the downtime: (other processes, idle).
    fn shares(&self) -> (f64, f64) {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        let ticks = (self.load.busy + self.load.idle + self.load.steal).max(1) as f64;
        let cap = ticks.max(self.dst_ms / 10.0 * cpus);
        (self.load.others() as f64 / cap, self.load.idle as f64 / cap)
    }

    /// Other processes took at least 10 % of the machine during the downtime.
    fn disturbed(&self) -> bool {
        self.shares().0 >= 0.10
    }
}

fn sock(tag: &str) -> MigrationUri {
    MigrationUri::Unix(std::env::temp_dir().join(format!("qmig-bench-downtime-{}-{tag}.sock", std::process::id())))
}

fn fill(cfg: &Config, seed: u64) -> impl Fn(u64, &mut [u8]) + Sync {
    let pattern = cfg.fill;
    move |p, page| {
        if pattern == Fill::Random || p.is_multiple_of(4) {
            let mut buf = [0u8; PAGE];
            fill_page(Pattern::Random, seed, p, &mut buf);
            page.copy_from_slice(&buf);
        } else {
            page.fill(0);
        }
    }
}

/// Compare the stopped guest with the destination; panics on any difference.
fn verify(guest: &SyntheticGuest, got: &[u8], what: &str) {
    let mut page = vec![0u8; PAGE];
    let (mut differing, mut first) = (0u64, None);
    for p in 0..guest.pages() {
        guest.read_page(p, &mut page);
        let o = p as usize * PAGE;
        if got[o..o + PAGE] != page[..] {
            differing += 1;
            first.get_or_insert(p);
        }
    }
    assert!(
        differing == 0,
        "{what}: the destination's RAM differs from the source's at stop in {differing} pages (first: page {})",
        first.unwrap_or(0)
    );
}

fn run_once(
    cfg: &Config,
    guest: &SyntheticGuest,
    region: &GuestRegion,
    vcpus: SyntheticVcpus,
    dst: Vec<u8>,
    max_bandwidth: u64,
    tag: &str,
) -> (Run, Vec<u8>, SyntheticVcpus) {
    let params = MigrationParameters { max_bandwidth, downtime_limit: cfg.downtime_limit, ..Default::default() };
    let out = Outgoing::new(SharedParameters::new(params).expect("parameters"), MigrationCapabilities::default())
        .expect("outgoing");
    let uri = sock(tag);
    let cancel = CancelToken::new().expect("cancel token");
    let listener = Listener::bind(&uri, &cancel).expect("listen");
    let dest = destination(listener, dst);
    let ch = connect(&uri, &cancel).expect("connect");
    let mut timed = TimedVcpus {
        inner: vcpus,
        info: out.info().clone(),
        stop_called: None,
        stopped: None,
        at_stop: None,
        load_at_stop: Load::default(),
    };
    timed.inner.resume().expect("resume");
    let info = out
        .run(ch, &mut [engine::memory::RamRegion::new(region).with_dirty(guest.dirty())], &mut timed)
        .unwrap_or_else(|e| panic!("{tag}: migration failed: {e}"));
    let rep = dest.join().expect("destination thread").unwrap_or_else(|e| panic!("{tag}: destination: {e}"));
    let load = Load::now().since(timed.load_at_stop);
    if let MigrationUri::Unix(p) = &uri {
        let _ = std::fs::remove_file(p);
    }
    assert_eq!(info.status, MigrationStatus::Completed, "{tag}");
    assert!(!timed.inner.running(), "{tag}: the guest must stay stopped after completion");
    verify(guest, &rep.mem, tag);

    let stopped = timed.stopped.expect("the engine stopped the vCPUs");
    let at_stop = timed.at_stop.clone().expect("info at stop");
    // `mbps` is the engine's last bandwidth window (bytes/ms × 8 / 1000) while active.
    let bw_est = at_stop.mbps * 1000.0 / 8.0;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let run = Run {
        src_ms: ms(info.downtime.expect("downtime")),
        dst_ms: ms(rep.eof_at.saturating_duration_since(stopped)),
        stop_ms: ms(stopped - timed.stop_called.expect("stop called")),
        total_s: info.total_time.as_secs_f64(),
        passes: info.dirty_sync_count,
        bw_est,
        threshold: (bw_est * cfg.downtime_limit as f64) as u64,
        remaining: at_stop.remaining,
        end_bytes: rep.end_bytes,
        end_pages: rep.end_pages + rep.end_zero,
        end_lag_ms: rep.end_at.map(|t| ms(t.saturating_duration_since(stopped))).unwrap_or(f64::NAN),
        transferred: info.transferred,
        ram_sections: rep.ram_sections,
        load,
    };
    (run, rep.mem, timed.inner)
}

/// min, median, p90 (nearest rank), max.
fn stats(v: &[f64]) -> [f64; 4] {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    let p90 = s[((0.9 * n as f64).ceil() as usize).clamp(1, n) - 1];
    [s[0], median, p90, s[n - 1]]
}

fn median(v: &[f64]) -> f64 {
    stats(v)[1]
}

fn bw_name(b: u64) -> String {
    if b == 0 {
        "unlimited".into()
    } else if b.is_multiple_of(1 << 30) {
        format!("{} GiB/s", b >> 30)
    } else {
        format!("{} MiB/s", b >> 20)
    }
}

struct Row {
    bandwidth: u64,
    rate: u64,
    runs: Vec<Run>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = !args.iter().any(|a| a == "--bench");
    let cfg = Config::from_env(quick);
    let limit = cfg.downtime_limit as f64;
    println!(
        "downtime bench: {} MiB guest ({:?} fill, {} writer thread{}), unix socket, downtime-limit {} ms, {} run{} per row, destination memory {}{}",
        cfg.ram >> 20,
        cfg.fill,
        cfg.vcpus,
        if cfg.vcpus == 1 { "" } else { "s" },
        cfg.downtime_limit,
        cfg.runs,
        if cfg.runs == 1 { "" } else { "s" },
        if cfg.fresh_dst { "fresh (faulted in during the migration)" } else { "pre-faulted" },
        if quick { " [quick mode: no --bench]" } else { "" },
    );

    let mut dst_keep: Option<Vec<u8>> = None;
    let mut rows: Vec<Row> = vec![];
    for &bw_mib in &cfg.bandwidths {
        let bandwidth = bw_mib << 20;
        for &rate_mib in &cfg.rates {
            let seed = 0x5eed ^ rate_mib ^ (bw_mib << 16);
            let mut guest = SyntheticGuest::new(cfg.ram, fill(&cfg, seed));
            guest.start(cfg.vcpus, rate_mib << 20, seed);
            let region = guest.region("mem").expect("guest region");
            let mut vcpus = guest.vcpus();
            let mut runs = vec![];
            for i in 0..cfg.runs {
                let dst = if cfg.fresh_dst {
                    drop(dst_keep.take());
                    vec![0u8; cfg.ram] // untouched (calloc'd) memory
                } else {
                    let mut d = dst_keep.take().unwrap_or_default();
                    d.resize(cfg.ram, 0);
                    d.fill(0xa5);
                    d
                };
                // Let the guest run (and dirty) a little before each migration.
                std::thread::sleep(Duration::from_millis(200));
                let tag = format!("bw{bw_mib}-r{rate_mib}-{i}");
                let (run, mem, v) = run_once(&cfg, &guest, &region, vcpus, dst, bandwidth, &tag);
                vcpus = v;
                dst_keep = Some(mem);
                println!(
                    "  {:>9} {:>3} MiB/s run {:>2}: downtime src {:>6.1} ms dst {:>6.1} ms{} | total {:.2} s, {} passes, {} RAM sections | at stop: bw est {:.0} MiB/s, threshold {:.1} MiB, pending {:.1} MiB (predicts {:.0} ms) | END {:.1} MiB, {} pages, seen at dst +{:.1} ms | stop() {:.1} ms | during: cpu ticks ours {} others {} idle {} steal {}, {} minor faults",
                    bw_name(bandwidth),
                    rate_mib,
                    i + 1,
                    run.src_ms,
                    run.dst_ms,
                    match (run.src_ms > limit || run.dst_ms > limit, run.disturbed()) {
                        (true, true) => " OVER (machine busy)",
                        (true, false) => " OVER",
                        _ => "",
                    },
                    run.total_s,
                    run.passes,
                    run.ram_sections,
                    run.bw_est * 1000.0 / MIB,
                    run.threshold as f64 / MIB,
                    run.remaining as f64 / MIB,
                    if run.bw_est > 0.0 { run.remaining as f64 / run.bw_est } else { f64::NAN },
                    run.end_bytes as f64 / MIB,
                    run.end_pages,
                    run.end_lag_ms,
                    run.stop_ms,
                    run.load.own,
                    run.load.others(),
                    run.load.idle,
                    run.load.steal,
                    run.load.minflt,
                );
                runs.push(run);
            }
            guest.shutdown();
            drop(region);
            rows.push(Row { bandwidth, rate: rate_mib, runs });
        }
    }

    println!();
    println!(
        "Downtime (ms; src = engine `downtime`, dst = vCPUs stopped -> destination loaded EOF), limit {} ms, {} runs per row",
        cfg.downtime_limit, cfg.runs
    );
    println!(
        "{:>13} {:>7} | {:^31} | {:^31} | {:>9} | {:^20} | {:>7}",
        "max-bandwidth",
        "dirty",
        "src min / med / p90 / max",
        "dst min / med / p90 / max",
        "over lim",
        "total s min/med/max",
        "passes"
    );
    println!("{}", "-".repeat(134));
    let mut worst_over = 0usize;
    for r in &rows {
        let src = stats(&r.runs.iter().map(|x| x.src_ms).collect::<Vec<_>>());
        let dst = stats(&r.runs.iter().map(|x| x.dst_ms).collect::<Vec<_>>());
        let tot = stats(&r.runs.iter().map(|x| x.total_s).collect::<Vec<_>>());
        let over_src = r.runs.iter().filter(|x| x.src_ms > limit).count();
        let over_dst = r.runs.iter().filter(|x| x.dst_ms > limit).count();
        worst_over = worst_over.max(over_src).max(over_dst);
        let (pmin, pmax) =
            (r.runs.iter().map(|x| x.passes).min().unwrap_or(0), r.runs.iter().map(|x| x.passes).max().unwrap_or(0));
        println!(
            "{:>13} {:>3} MiB/s | {:>6.1} / {:>6.1} / {:>6.1} / {:>6.1} | {:>6.1} / {:>6.1} / {:>6.1} / {:>6.1} | {:>3} / {:>3} | {:>5.2} / {:>5.2} / {:>5.2} | {:>7}",
            bw_name(r.bandwidth),
            r.rate,
            src[0],
            src[1],
            src[2],
            src[3],
            dst[0],
            dst[1],
            dst[2],
            dst[3],
            over_src,
            over_dst,
            tot[0],
            tot[1],
            tot[2],
            if pmin == pmax { pmin.to_string() } else { format!("{pmin}-{pmax}") },
        );
    }

    println!();
    println!("What the switchover was decided on, and what the END section then took (medians; END rate = END stream bytes / dst downtime;");
    println!("others / idle = share of the machine's CPU time taken by other processes / left idle during the downtime, median and max)");
    println!(
        "{:>13} {:>7} | {:>12} {:>12} {:>12} {:>12} | {:>10} {:>11} {:>13} | {:>11} {:>11} | {:>13} {:>13} {:>9}",
        "max-bandwidth",
        "dirty",
        "bw est MiB/s",
        "thresh MiB",
        "pending MiB",
        "predict ms",
        "END MiB",
        "END pages",
        "END rate MiB/s",
        "stop() max",
        "sent MiB",
        "others %",
        "idle %",
        "disturbed"
    );
    println!("{}", "-".repeat(200));
    for r in &rows {
        let m = |f: &dyn Fn(&Run) -> f64| median(&r.runs.iter().map(f).collect::<Vec<_>>());
        println!(
            "{:>13} {:>3} MiB/s | {:>12.0} {:>12.1} {:>12.1} {:>12.0} | {:>10.1} {:>11.0} {:>13.0} | {:>8.1} ms {:>11.0} | {:>5.0} / {:>5.0} {:>5.0} / {:>5.0} {:>9}",
            bw_name(r.bandwidth),
            r.rate,
            m(&|x| x.bw_est * 1000.0 / MIB),
            m(&|x| x.threshold as f64 / MIB),
            m(&|x| x.remaining as f64 / MIB),
            m(&|x| if x.bw_est > 0.0 { x.remaining as f64 / x.bw_est } else { f64::NAN }),
            m(&|x| x.end_bytes as f64 / MIB),
            m(&|x| x.end_pages as f64),
            m(&|x| x.end_bytes as f64 / MIB / (x.dst_ms / 1000.0)),
            r.runs.iter().map(|x| x.stop_ms).fold(0.0, f64::max),
            m(&|x| x.transferred as f64 / MIB),
            m(&|x| x.shares().0 * 100.0),
            r.runs.iter().map(|x| x.shares().0 * 100.0).fold(0.0, f64::max),
            m(&|x| x.shares().1 * 100.0),
            r.runs.iter().map(|x| x.shares().1 * 100.0).fold(0.0, f64::max),
            format!("{}/{}", r.runs.iter().filter(|x| x.disturbed()).count(), r.runs.len()),
        );
    }
    println!();
    if worst_over == 0 {
        println!("goal met: measured downtime <= {} ms in every run (both views)", cfg.downtime_limit);
    } else {
        println!("goal NOT met: some runs exceeded downtime-limit {} ms (see the rows above)", cfg.downtime_limit);
    }
}
