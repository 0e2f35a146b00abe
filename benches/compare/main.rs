//! qmig against QEMU 7.2 on this machine: one command, one table with ratios.
//!
//! For each guest RAM image (sizes × fills: every page random, every page zero,
//! one page in four random and the rest zero, `text`: the testdata's compressible
//! word pattern) the same file in `/dev/shm` is
//! migrated, `runs` times per case, cases interleaved within each run so that
//! load from elsewhere hits them alike:
//!
//! - `qemu-qemu`: QEMU 7.2 → QEMU 7.2, `-machine none` guests whose RAM is a
//!   `memory-backend-file` (`share=on`) in `/dev/shm`, the source paused (`-S`,
//!   runstate `prelaunch`), default capabilities, `max-bandwidth` raised to
//!   1 TiB/s on the source (QEMU's default 128 MiB/s would be the limit);
//! - `qmig-qmig`: `qmig send --ram mem=SRC --to URI` → `qmig recv --ram mem=DST --from URI`;
//! - `qemu-qmig`: the QEMU source → `qmig recv`; `qmig-qemu`: `qmig send` → a QEMU destination;
//!
//! each over a unix socket and over loopback TCP, and into each destination kind
//! (`--dests`): by default the destination RAM file does not exist before a run
//! (`fresh`: QEMU and `qmig recv` both create it, sparse), exists all holes
//! (`sparse-existing`) or is already populated (`preallocated`); it is deleted
//! after each run.
//!
//! Measured per run:
//!
//! - time: wall clock from just before the migration starts (QMP `migrate`
//!   sent to the source QEMU, or `qmig send` spawned) until *both* sides are
//!   done: a QEMU side when `query-migrate` (polled every 5 ms on both QEMUs)
//!   first says `completed`, a qmig side when it printed its final statistics
//!   line saying `completed` (it has then exited 0; the exit itself, unmapping
//!   the RAM, is after the migration, as a QEMU's teardown is, and is kept in the
//!   JSON as `exit-after-completed-ms`). QEMU's own source `total-time` is kept in
//!   the JSON as `qemu-src-total-time-ms`; it stops when the source has written
//!   its last byte, a few ms before the destination has loaded it;
//! - GiB/s: guest RAM size / time;
//! - CPU seconds of each side: utime + stime, from `wait4`'s rusage for a qmig
//!   process (its whole life, startup and exit included), and the
//!   difference of `/proc/PID/stat` before the migration and once both sides
//!   are done for a QEMU process (10 ms ticks);
//! - minor page faults of each side (same sources), in the JSON;
//! - `others`: CPU time the machine spent in user and system mode outside the
//!   measured processes and this bench (other agents' builds, kernel threads),
//!   as a share of both cores over the run: above 10 % a run counts as busy and
//!   its row is flagged.
//!
//! The median of each figure over the runs is reported (each separately).
//! The "physical limits" are measured first, in this process: 1 MiB `write`s
//! through a unix socket pair and a loopback TCP connection to a reader thread,
//! single-thread `memcpy` between pre-faulted buffers, `memcpy` into a fresh
//! shared mapping of a new `/dev/shm` file (first-touch faults: what a receiver
//! writing a fresh image through a mapping pays, as QEMU does) and 1 MiB `pwrite`s
//! into a new `/dev/shm` file (what `qmig recv` does for a fresh image). After the
//! first run of each case the destination file is compared with the source file
//! (`--verify`).
//!
//! The `qmig` binary is the one cargo builds for this bench
//! (`CARGO_BIN_EXE_qmig`: `target/release/qmig` under `cargo bench`, built with
//! the bench profile, i.e. release plus debug info), or `QMIG_COMPARE_QMIG`.
//!
//! Run: `cargo bench --bench compare` (the whole default matrix, 1 and 4 GiB, 5 runs:
//! well over an hour on this machine; pick rows with the options below),
//! then read the table on stdout or `target/compare.json`. Options, as
//! arguments after `--` or environment variables:
//!
//! - `--quick` / `QMIG_COMPARE_QUICK=1`: a smoke run (64 MiB images, 1 run,
//!   256 MiB limits); also the default when run without `--bench` (`cargo test --benches`);
//! - `--sizes=1G,4G` / `QMIG_COMPARE_SIZES` (suffix K, M or G);
//! - `--fills=random,zero,mixed25,text` / `QMIG_COMPARE_FILLS`;
//! - `--cases=qemu-qemu,qmig-qmig,qemu-qmig,qmig-qemu` / `QMIG_COMPARE_CASES`;
//! - `--wires=unix,tcp` / `QMIG_COMPARE_WIRES`;
//! - `--dests=fresh,sparse,prealloc` / `QMIG_COMPARE_DESTS`: the destination RAM
//!   file before a run: none (`fresh`, the receiver creates it), an existing
//!   all-holes file (`sparse`, `truncate -s`), or memory already populated
//!   (`prealloc`: every page written before `qmig recv` starts; a QEMU destination
//!   gets `prealloc=on` on its memory backend and populates it at startup);
//! - `--runs=5` / `QMIG_COMPARE_RUNS`;
//! - `--limits=1` / `QMIG_COMPARE_LIMITS` (0 skips the physical limits);
//! - `--verify=first|all|none` / `QMIG_COMPARE_VERIFY`;
//! - `--json=PATH` / `QMIG_COMPARE_JSON` (default `compare.json` in the target dir,
//!   `compare-quick.json` for a quick run);
//! - `--shm=DIR` / `QMIG_COMPARE_SHM` (default `/dev/shm`);
//! - `--multifd=off,2,4,2:zstd,4:zstd` / `QMIG_COMPARE_MULTIFD`: capability
//!   `multifd` settings (`off`, `N` channels, `N:none|zlib|zstd`), each a set of
//!   rows compared with QEMU → QEMU with the same settings (issue 11). Given, they
//!   apply to every image and wire; by default a full run has these five on the
//!   random images over unix only, a quick run none.
//!
//! - `--postcopy=1` / `QMIG_COMPARE_POSTCOPY` (0 skips them) and `--postcopy-size=1G`
//!   (64 MiB in a quick run): the postcopy rows of issue 10 ([`postcopy_rows`]):
//!   QEMU → QEMU and qmig → qmig postcopy of one random image, postcopy started right
//!   away; qmig's per-request latency (`recv --postcopy-touch`, `kvm-dest`) and QEMU's
//!   `postcopy-blocktime` of a q35 + KVM guest running `busy-bios.bin`;
//! - `--xbzrle=1` / `QMIG_COMPARE_XBZRLE`: the XBZRLE live rows ([`xbzrle_rows`]): bytes
//!   on the wire of the same KVM guest (`busy-bios.bin`) rewriting 128 pages, QEMU 7.2 and qmig.
//!
//! Without `qemu-system-x86_64` the QEMU cases are skipped with a note. At most
//! one source image and one destination file exist at a time (8 GiB for 4 GiB
//! images). The live KVM rows run `qmig demo --kvm` at three dirty rates ([`live_rows`]; `--live=0` skips them).

use serde_json::{json, Value};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use testkit::pattern::{self, Pattern};
use testkit::qemu::{qemu_binary, QemuConfig, QemuError, QemuProcess};

mod config;
mod cpu;
mod limits;
mod live;
mod postcopy;
mod processes;
mod report;
mod xbzrle;

use config::*;
use cpu::*;
use limits::*;
use live::*;
use postcopy::*;
use processes::*;
use report::*;
use xbzrle::*;

pub(crate) const GIB: f64 = (1u64 << 30) as f64;
pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const PAGE: usize = savevm_format::TARGET_PAGE_SIZE;
/// `max-bandwidth` given to a QEMU source: 1 TiB/s, i.e. no limit in practice.
pub(crate) const QEMU_MAX_BANDWIDTH: u64 = 1 << 40;
/// Interval of the `query-migrate` polls that detect completion.
pub(crate) const POLL: Duration = Duration::from_millis(5);
/// Longest a migration may take before the run fails.
pub(crate) const MIGRATION_LIMIT: Duration = Duration::from_secs(180);
/// Share of both cores used by other processes above which a run counts as busy.
pub(crate) const BUSY: f64 = 0.10;
/// Seed of the images' random pages.
pub(crate) const SEED: u64 = 0xc0_4e_9a_7e;

fn main() {
    let cfg = Config::parse();
    let load_start = loadavg();
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    println!("compare: qmig vs QEMU 7.2 on this machine");
    println!("load average at start: {load_start} ({} CPUs)", cpus());
    println!("qemu: {}", qemu_version(&cfg));
    println!("qmig: {}", cfg.qmig.display());
    println!(
        "images: {} × {}; cases: {}; wires: {}; runs: {}{}",
        cfg.sizes.iter().map(|s| size_label(*s)).collect::<Vec<_>>().join(", "),
        cfg.fills.iter().map(|f| f.name()).collect::<Vec<_>>().join(", "),
        cfg.kinds.iter().map(|k| k.key()).collect::<Vec<_>>().join(", "),
        cfg.wires.iter().map(|w| w.name()).collect::<Vec<_>>().join(", "),
        cfg.runs,
        if cfg.quick { " (quick)" } else { "" }
    );
    assert!(cfg.qmig.is_file(), "qmig binary {} not found (set QMIG_COMPARE_QMIG)", cfg.qmig.display());
    let dir = cfg.shm.join(format!("qmig-compare-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());

    let limits = if cfg.limits { measure_limits(&cfg, &dir) } else { Vec::new() };
    print_limits(&cfg, &limits);

    let rows = run_cases(&cfg, &dir);
    let live = live_rows(&cfg);
    let postcopy = postcopy_rows(&cfg, &dir);
    let xbzrle = xbzrle_rows(&cfg, &dir);

    println!();
    println!("load average at start: {load_start}; at end: {}", loadavg());
    print_table(&rows, &cfg);
    if !live.is_empty() {
        print_live(&live);
    }
    print_postcopy(&postcopy);
    print_xbzrle(&xbzrle);
    let mut goals = goals(&rows, &limits);
    goals.extend(xbzrle_goals(&xbzrle));
    print_goals(&goals);

    let mut doc = document(&cfg, started, &load_start, &limits, &rows, &live, goals);
    doc["postcopy"] = postcopy.iter().map(PostcopyRow::to_json).collect();
    doc["xbzrle"] = xbzrle.iter().map(XbzrleRow::to_json).collect();
    if let Some(parent) = cfg.json.parent() {
        let _ = fs::create_dir_all(parent);
    }
    fs::write(&cfg.json, serde_json::to_string_pretty(&doc).expect("JSON") + "\n")
        .unwrap_or_else(|e| panic!("write {}: {e}", cfg.json.display()));
    println!();
    println!("JSON: {}", cfg.json.display());
}
