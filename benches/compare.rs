//! qmig against QEMU 7.2 on this machine: one command, one table with ratios.
//!
//! For each guest RAM image (sizes × fills: every page random, every page zero,
//! one page in four random and the rest zero) the same file in `/dev/shm` is
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
//! each over a unix socket and over loopback TCP. The destination RAM file never
//! exists before a run (QEMU and `qmig recv` both create it, sparse) and is
//! deleted after it, so every receiver pays the same first-touch page faults.
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
//! Run: `cargo bench --bench compare` (1 and 4 GiB, 3 runs: about 9 minutes),
//! then read the table on stdout or `target/compare.json`. Options, as
//! arguments after `--` or environment variables:
//!
//! - `--quick` / `QMIG_COMPARE_QUICK=1`: a smoke run (64 MiB images, 1 run,
//!   256 MiB limits); also the default when run without `--bench` (`cargo test --benches`);
//! - `--sizes=1G,4G` / `QMIG_COMPARE_SIZES` (suffix K, M or G);
//! - `--fills=random,zero,mixed25` / `QMIG_COMPARE_FILLS`;
//! - `--cases=qemu-qemu,qmig-qmig,qemu-qmig,qmig-qemu` / `QMIG_COMPARE_CASES`;
//! - `--wires=unix,tcp` / `QMIG_COMPARE_WIRES`;
//! - `--runs=3` / `QMIG_COMPARE_RUNS`;
//! - `--limits=1` / `QMIG_COMPARE_LIMITS` (0 skips the physical limits);
//! - `--verify=first|all|none` / `QMIG_COMPARE_VERIFY`;
//! - `--json=PATH` / `QMIG_COMPARE_JSON` (default `compare.json` in the target dir,
//!   `compare-quick.json` for a quick run);
//! - `--shm=DIR` / `QMIG_COMPARE_SHM` (default `/dev/shm`).
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

const GIB: f64 = (1u64 << 30) as f64;
const MIB: u64 = 1 << 20;
const PAGE: usize = savevm_format::TARGET_PAGE_SIZE;
/// `max-bandwidth` given to a QEMU source: 1 TiB/s, i.e. no limit in practice.
const QEMU_MAX_BANDWIDTH: u64 = 1 << 40;
/// Interval of the `query-migrate` polls that detect completion.
const POLL: Duration = Duration::from_millis(5);
/// Longest a migration may take before the run fails.
const MIGRATION_LIMIT: Duration = Duration::from_secs(180);
/// Share of both cores used by other processes above which a run counts as busy.
const BUSY: f64 = 0.10;
/// Seed of the images' random pages.
const SEED: u64 = 0xc0_4e_9a_7e;

// ---------------------------------------------------------------------------
// Configuration

/// Content of a guest RAM image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Random,
    Zero,
    /// One page in four random, the others zero.
    Mixed25,
}

impl Fill {
    fn parse(s: &str) -> Fill {
        match s {
            "random" => Fill::Random,
            "zero" => Fill::Zero,
            "mixed25" | "25" => Fill::Mixed25,
            _ => panic!("unknown fill '{s}' (expected random, zero or mixed25)"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Fill::Random => "random",
            Fill::Zero => "zero",
            Fill::Mixed25 => "25% random",
        }
    }

    fn pattern(self) -> Pattern {
        match self {
            Fill::Random => Pattern::Random,
            Fill::Zero => Pattern::Zero,
            Fill::Mixed25 => Pattern::Mixed { every: 4 },
        }
    }
}

/// Who sends and who receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    QemuQemu,
    QmigQmig,
    QemuQmig,
    QmigQemu,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::QemuQemu, Kind::QmigQmig, Kind::QemuQmig, Kind::QmigQemu];

    fn parse(s: &str) -> Kind {
        match s {
            "qemu-qemu" => Kind::QemuQemu,
            "qmig-qmig" => Kind::QmigQmig,
            "qemu-qmig" => Kind::QemuQmig,
            "qmig-qemu" => Kind::QmigQemu,
            _ => panic!("unknown case '{s}' (expected qemu-qemu, qmig-qmig, qemu-qmig or qmig-qemu)"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::QemuQemu => "QEMU → QEMU",
            Kind::QmigQmig => "qmig → qmig",
            Kind::QemuQmig => "QEMU → qmig recv",
            Kind::QmigQemu => "qmig send → QEMU",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Kind::QemuQemu => "qemu-qemu",
            Kind::QmigQmig => "qmig-qmig",
            Kind::QemuQmig => "qemu-qmig",
            Kind::QmigQemu => "qmig-qemu",
        }
    }

    fn qemu_src(self) -> bool {
        matches!(self, Kind::QemuQemu | Kind::QemuQmig)
    }

    fn qemu_dst(self) -> bool {
        matches!(self, Kind::QemuQemu | Kind::QmigQemu)
    }
}

/// The transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Unix,
    Tcp,
}

impl Wire {
    fn parse(s: &str) -> Wire {
        match s {
            "unix" => Wire::Unix,
            "tcp" => Wire::Tcp,
            _ => panic!("unknown wire '{s}' (expected unix or tcp)"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Wire::Unix => "unix",
            Wire::Tcp => "tcp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    First,
    All,
    None,
}

#[derive(Debug, Clone)]
struct Config {
    quick: bool,
    sizes: Vec<u64>,
    fills: Vec<Fill>,
    kinds: Vec<Kind>,
    wires: Vec<Wire>,
    runs: usize,
    limits: bool,
    limit_size: usize,
    verify: Verify,
    json: PathBuf,
    shm: PathBuf,
    qmig: PathBuf,
    qemu: Option<PathBuf>,
    /// Run the live KVM rows.
    live: bool,
}

fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], MIB),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().unwrap_or_else(|_| panic!("'{s}' is not a size like 1G, 64M or 4096"));
    let v = n * mul;
    assert!(v > 0 && v.is_multiple_of(PAGE as u64), "size '{s}' must be a positive multiple of {PAGE}");
    v
}

fn list(s: &str) -> Vec<&str> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).collect()
}

impl Config {
    /// Options from `--key=value` arguments, else `QMIG_COMPARE_KEY`, else the defaults.
    fn parse() -> Config {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let arg = |key: &str| -> Option<String> {
            let flag = format!("--{key}");
            let prefix = format!("--{key}=");
            let mut it = args.iter();
            while let Some(a) = it.next() {
                if let Some(v) = a.strip_prefix(&prefix) {
                    return Some(v.to_string());
                }
                if *a == flag {
                    return Some(it.next().filter(|v| !v.starts_with("--")).cloned().unwrap_or_else(|| "1".into()));
                }
            }
            let env = format!("QMIG_COMPARE_{}", key.to_uppercase());
            std::env::var(env).ok()
        };
        let on = |v: &str| !matches!(v, "0" | "false" | "no" | "off");
        // `cargo bench` passes --bench; `cargo test --benches` does not: a smoke run then.
        let quick = arg("quick").map(|v| on(&v)).unwrap_or(false) || !args.iter().any(|a| a == "--bench");
        let sizes = match arg("sizes") {
            Some(v) => list(&v).into_iter().map(parse_size).collect(),
            None if quick => vec![64 * MIB],
            None => vec![1 << 30, 4 << 30],
        };
        let fills = arg("fills").map_or_else(
            || vec![Fill::Random, Fill::Zero, Fill::Mixed25],
            |v| list(&v).into_iter().map(Fill::parse).collect(),
        );
        let kinds =
            arg("cases").map_or_else(|| Kind::ALL.to_vec(), |v| list(&v).into_iter().map(Kind::parse).collect());
        let wires = arg("wires")
            .map_or_else(|| vec![Wire::Unix, Wire::Tcp], |v| list(&v).into_iter().map(Wire::parse).collect());
        let runs = arg("runs").map_or(if quick { 1 } else { 3 }, |v| {
            v.parse::<usize>().unwrap_or_else(|_| panic!("--runs={v}: not a number")).max(1)
        });
        let verify = match arg("verify").as_deref() {
            None | Some("first") => Verify::First,
            Some("all") => Verify::All,
            Some("none") => Verify::None,
            Some(v) => panic!("--verify={v}: expected first, all or none"),
        };
        let qmig = std::env::var_os("QMIG_COMPARE_QMIG")
            .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_qmig")), PathBuf::from);
        // target/release/qmig -> target/compare.json (a smoke run must not replace a real one)
        let name = if quick { "compare-quick.json" } else { "compare.json" };
        let default_json = Path::new(env!("CARGO_BIN_EXE_qmig"))
            .parent()
            .and_then(Path::parent)
            .map_or_else(|| PathBuf::from(name), |t| t.join(name));
        Config {
            quick,
            sizes,
            fills,
            kinds,
            wires,
            runs,
            limits: arg("limits").map(|v| on(&v)).unwrap_or(true),
            live: arg("live").map(|v| on(&v)).unwrap_or(true),
            limit_size: if quick { 256 << 20 } else { 1 << 30 },
            verify,
            json: arg("json").map_or(default_json, PathBuf::from),
            shm: arg("shm").map_or_else(|| PathBuf::from("/dev/shm"), PathBuf::from),
            qmig,
            qemu: qemu_binary(),
        }
    }
}

// ---------------------------------------------------------------------------
// Machine load and process CPU

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn cpus() -> usize {
    thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// System-wide user + nice + system time of all CPUs (seconds).
fn system_busy() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else { return 0.0 };
    let v: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 3 {
        return 0.0;
    }
    (v[0] + v[1] + v[2]) as f64 / clock_ticks()
}

/// CPU seconds (utime + stime) and minor faults of a live process, from `/proc/PID/stat`.
fn proc_cpu(pid: u32) -> (f64, u64) {
    let Ok(st) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return (0.0, 0) };
    let Some((_, rest)) = st.rsplit_once(')') else { return (0.0, 0) };
    // After ")": state (field 3) ... minflt is field 10, utime 14, stime 15.
    let f: Vec<u64> = rest.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    if f.len() < 12 {
        return (0.0, 0);
    }
    ((f[10] + f[11]) as f64 / clock_ticks(), f[6])
}

/// This process's CPU seconds (all threads).
fn self_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// A snapshot to compute the share of the machine others used.
#[derive(Clone, Copy)]
struct MachineSample {
    at: Instant,
    busy: f64,
    own: f64,
}

impl MachineSample {
    fn now() -> MachineSample {
        MachineSample { at: Instant::now(), busy: system_busy(), own: self_cpu() }
    }

    /// Share of all cores used outside this bench and `measured` CPU seconds since `self`.
    fn others_since(&self, measured: f64) -> f64 {
        let end = MachineSample::now();
        let wall = end.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let others = (end.busy - self.busy) - (end.own - self.own) - measured;
        (others / (wall * cpus() as f64)).clamp(0.0, 1.0)
    }
}

// ---------------------------------------------------------------------------
// A qmig child process, reaped with wait4 for its rusage

struct Exit {
    at: Instant,
    ok: bool,
    status: String,
    cpu: f64,
    minflt: u64,
}

struct QmigProc {
    pid: i32,
    what: String,
    exit: mpsc::Receiver<Exit>,
    /// Stdout lines with the moment each was read.
    lines: mpsc::Receiver<(Instant, String)>,
    /// The last line read so far.
    last: Option<(Instant, String)>,
    stderr: PathBuf,
    done: Option<Exit>,
}

impl QmigProc {
    fn spawn(cfg: &Config, dir: &Path, tag: &str, args: &[&str]) -> QmigProc {
        let what = format!("{} {}", cfg.qmig.display(), args.join(" "));
        let stderr = dir.join(format!("{tag}.stderr"));
        let err = File::create(&stderr).expect("create a stderr file for qmig");
        let mut child = Command::new(&cfg.qmig)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let pid = child.id() as i32;
        let out = child.stdout.take().expect("piped stdout");
        // The Child is never waited for through std: wait4 below reaps it.
        drop(child);
        let (ltx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if ltx.send((Instant::now(), l)).is_err() {
                    break;
                }
            }
        });
        let (etx, exit) = mpsc::channel();
        thread::spawn(move || {
            let mut status = 0;
            // SAFETY: zeroed rusage is valid; wait4 fills it.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            let r = loop {
                // SAFETY: pid is our child; pointers are valid.
                let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
                if r == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break r;
            };
            let at = Instant::now();
            let (ok, status) = if r != pid {
                (false, format!("wait4 failed: {}", std::io::Error::last_os_error()))
            } else if libc::WIFEXITED(status) {
                (libc::WEXITSTATUS(status) == 0, format!("exit {}", libc::WEXITSTATUS(status)))
            } else {
                (false, format!("signal {}", libc::WTERMSIG(status)))
            };
            let _ =
                etx.send(Exit { at, ok, status, cpu: tv(ru.ru_utime) + tv(ru.ru_stime), minflt: ru.ru_minflt as u64 });
        });
        QmigProc { pid, what, exit, lines, last: None, stderr, done: None }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default().trim().replace('\n', " / ")
    }

    /// The URI of recv's `{"listening": URI}` line.
    fn listening(&mut self) -> Result<String, String> {
        let (_, line) = self
            .lines
            .recv_timeout(Duration::from_secs(20))
            .map_err(|e| format!("{}: no listening line ({e}); stderr: {}", self.what, self.stderr()))?;
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("{}: bad line {line:?}: {e}", self.what))?;
        v["listening"].as_str().map(str::to_string).ok_or_else(|| format!("{}: no listening URI in {line}", self.what))
    }

    /// Whether it has exited (non-blocking).
    fn poll(&mut self) -> bool {
        if self.done.is_none() {
            self.done = self.exit.try_recv().ok();
        }
        self.done.is_some()
    }

    /// Waits for the exit until `deadline`; the process is killed past it.
    fn wait(&mut self, deadline: Instant) -> Result<&Exit, String> {
        while !self.poll() {
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("{}: still running after the time limit, killed", self.what));
            }
            thread::sleep(Duration::from_millis(1));
        }
        let e = self.done.as_ref().expect("set by poll");
        if !e.ok {
            return Err(format!("{}: {}; stderr: {}", self.what, e.status, self.stderr()));
        }
        Ok(e)
    }

    /// The last stdout line (the statistics) and when it was read, once exited.
    fn stats(&mut self) -> Option<(Instant, Value)> {
        if let Some(l) = self.lines.try_iter().last() {
            self.last = Some(l);
        }
        let (at, line) = self.last.as_ref()?;
        Some((*at, serde_json::from_str(line).ok()?))
    }

    fn kill(&mut self) {
        if self.poll() {
            return;
        }
        // SAFETY: plain kill of our own unreaped child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        self.done = self.exit.recv_timeout(Duration::from_secs(5)).ok();
    }
}

impl Drop for QmigProc {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// Images

/// A guest RAM image in /dev/shm, deleted on drop.
struct Image {
    path: PathBuf,
    size: u64,
    fill: Fill,
}

impl Image {
    /// Writes every page (zero pages too, so the file is fully allocated).
    fn create(dir: &Path, size: u64, fill: Fill) -> Image {
        let path = dir.join(format!("src-{}M-{}.ram", size / MIB, fill.pattern()));
        let mut f = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        let chunk = (64 * MIB).min(size) as usize;
        let mut buf = vec![0u8; chunk];
        let mut off = 0u64;
        while off < size {
            let n = chunk.min((size - off) as usize);
            pattern::fill_from(fill.pattern(), SEED, off / PAGE as u64, &mut buf[..n]);
            f.write_all(&buf[..n]).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            off += n as u64;
        }
        Image { path, size, fill }
    }

    fn label(&self) -> String {
        format!("{} {}", size_label(self.size), self.fill.name())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn size_label(size: u64) -> String {
    if size.is_multiple_of(1 << 30) {
        format!("{} GiB", size >> 30)
    } else {
        format!("{} MiB", size / MIB)
    }
}

/// Compares two files with `pread` (reading the holes of a sparse tmpfs file
/// allocates nothing); returns the first differing page.
fn first_difference(a: &Path, b: &Path, size: u64) -> Result<Option<u64>, String> {
    let fa = File::open(a).map_err(|e| format!("open {}: {e}", a.display()))?;
    let fb = File::open(b).map_err(|e| format!("open {}: {e}", b.display()))?;
    let lb = fb.metadata().map_err(|e| e.to_string())?.len();
    if lb != size {
        return Err(format!("{} is {lb} bytes, expected {size}", b.display()));
    }
    let chunk = 16 * MIB as usize;
    let (mut ba, mut bb) = (vec![0u8; chunk], vec![0u8; chunk]);
    let mut off = 0u64;
    while off < size {
        let n = chunk.min((size - off) as usize);
        fa.read_exact_at(&mut ba[..n], off).map_err(|e| format!("read {}: {e}", a.display()))?;
        fb.read_exact_at(&mut bb[..n], off).map_err(|e| format!("read {}: {e}", b.display()))?;
        if ba[..n] != bb[..n] {
            let p = ba[..n].chunks(PAGE).zip(bb[..n].chunks(PAGE)).position(|(x, y)| x != y).unwrap_or(0);
            return Ok(Some(off / PAGE as u64 + p as u64));
        }
        off += n as u64;
    }
    Ok(None)
}

// ---------------------------------------------------------------------------
// One migration

/// One run's figures.
#[derive(Debug, Clone, Default)]
struct Measure {
    time: f64,
    src_cpu: f64,
    dst_cpu: f64,
    src_minflt: u64,
    dst_minflt: u64,
    others: f64,
    extra: Value,
}

struct Side {
    qemu: Option<QemuProcess>,
    qmig: Option<QmigProc>,
    /// CPU and faults at the start (QEMU only).
    base: (f64, u64),
    done: Option<Instant>,
}

impl Side {
    fn qemu(p: QemuProcess) -> Side {
        Side { qemu: Some(p), qmig: None, base: (0.0, 0), done: None }
    }

    fn qmig(p: QmigProc) -> Side {
        Side { qemu: None, qmig: Some(p), base: (0.0, 0), done: None }
    }

    fn start(&mut self) {
        if let Some(q) = &self.qemu {
            self.base = proc_cpu(q.pid());
        }
        if let Some(q) = &self.qmig {
            self.base = proc_cpu(q.pid as u32);
        }
    }

    /// Checks once whether this side is done; `Err` on a failure.
    fn poll(&mut self, info: &mut Value) -> Result<bool, String> {
        if self.done.is_some() {
            return Ok(true);
        }
        if let Some(q) = &mut self.qemu {
            let v = q.query_migrate().map_err(|e| format!("query-migrate: {e}; stderr: {}", q.stderr()))?;
            match v["status"].as_str().unwrap_or("none") {
                "completed" => {
                    self.done = Some(Instant::now());
                    *info = v;
                }
                "failed" | "cancelled" => return Err(format!("QEMU migration {v}; stderr: {}", q.stderr())),
                _ => {}
            }
        }
        if let Some(q) = &mut self.qmig {
            if q.poll() {
                let exit = q.wait(Instant::now())?.at;
                // Done when it reported `completed` (its stats line), as a QEMU side is done
                // at `completed`: the exit after it (unmapping the RAM) is not migration time.
                self.done = match q.stats() {
                    Some((at, v)) if v["status"] == "completed" => Some(at),
                    _ => Some(exit),
                };
            }
        }
        Ok(self.done.is_some())
    }

    /// CPU seconds and minor faults spent since `start`.
    fn cpu(&self) -> (f64, u64) {
        if let Some(q) = &self.qemu {
            let (c, f) = proc_cpu(q.pid());
            return (c - self.base.0, f.saturating_sub(self.base.1));
        }
        if let Some(Some(e)) = self.qmig.as_ref().map(|q| q.done.as_ref()) {
            // Its whole life (startup before `start` is about a millisecond).
            return (e.cpu, e.minflt);
        }
        (0.0, 0)
    }

    fn finish(mut self) -> Value {
        let mut v = Value::Null;
        if let Some(q) = self.qemu {
            let _ = q.quit(Duration::from_secs(10));
        }
        if let Some(q) = &mut self.qmig {
            if let Some((_, stats)) = q.stats() {
                v = stats;
            }
            if let (Some(e), Some(done)) = (&q.done, self.done) {
                v["exit-after-completed-ms"] =
                    json!(round(e.at.saturating_duration_since(done).as_secs_f64() * 1e3, 1));
            }
        }
        v
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

fn qemu_err<'p>(what: &str, p: &'p QemuProcess) -> impl FnOnce(QemuError) -> String + 'p {
    let what = what.to_string();
    move |e| format!("{what}: {e}; QEMU stderr: {}", p.stderr().trim())
}

/// A QEMU destination listening on `wire`; returns it and the URI to migrate to.
fn qemu_destination(
    cfg: &Config,
    dir: &Path,
    dst: &Path,
    size: u64,
    wire: Wire,
) -> Result<(QemuProcess, String), String> {
    let bin = cfg.qemu.clone().ok_or("no QEMU")?;
    let mut q = QemuProcess::start(&QemuConfig::new().binary(bin).ram("mem", dst, size).incoming(true))
        .map_err(|e| format!("start destination QEMU: {e}"))?;
    let uri = match wire {
        Wire::Unix => {
            let uri = format!("unix:{}", dir.join("mig.sock").display());
            q.migrate_incoming(&uri).map_err(qemu_err("migrate-incoming", &q))?;
            uri
        }
        Wire::Tcp => {
            let mut last = String::new();
            let mut found = None;
            for _ in 0..5 {
                let uri = format!("tcp:127.0.0.1:{}", free_port());
                match q.migrate_incoming(&uri) {
                    Ok(()) => {
                        found = Some(uri);
                        break;
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            found.ok_or_else(|| format!("migrate-incoming on a free port failed 5 times: {last}"))?
        }
    };
    Ok((q, uri))
}

fn qemu_source(cfg: &Config, img: &Image) -> Result<QemuProcess, String> {
    let bin = cfg.qemu.clone().ok_or("no QEMU")?;
    let mut q = QemuProcess::start(&QemuConfig::new().binary(bin).ram("mem", &img.path, img.size))
        .map_err(|e| format!("start source QEMU: {e}"))?;
    q.execute("migrate-set-parameters", Some(json!({ "max-bandwidth": QEMU_MAX_BANDWIDTH })))
        .map_err(qemu_err("migrate-set-parameters", &q))?;
    Ok(q)
}

fn qmig_recv(cfg: &Config, dir: &Path, dst: &Path, wire: Wire) -> Result<(QmigProc, String), String> {
    let from = match wire {
        Wire::Unix => format!("unix:{}", dir.join("mig.sock").display()),
        Wire::Tcp => "tcp:127.0.0.1:0".to_string(),
    };
    let ram = format!("mem={}", dst.display());
    let mut p = QmigProc::spawn(cfg, dir, "recv", &["recv", "--ram", &ram, "--from", &from]);
    let uri = p.listening()?;
    Ok((p, uri))
}

fn run_case(cfg: &Config, dir: &Path, img: &Image, kind: Kind, wire: Wire, verify: bool) -> Result<Measure, String> {
    let dst_path = dir.join("dst.ram");
    let _ = fs::remove_file(&dst_path);
    let _ = fs::remove_file(dir.join("mig.sock"));
    let result = run_case_inner(cfg, dir, img, kind, wire, &dst_path);
    let result = result.and_then(|m| {
        if verify {
            if let Some(p) = first_difference(&img.path, &dst_path, img.size)? {
                return Err(format!("the destination differs from the source at page {p}"));
            }
        }
        Ok(m)
    });
    let _ = fs::remove_file(&dst_path);
    result
}

fn run_case_inner(
    cfg: &Config,
    dir: &Path,
    img: &Image,
    kind: Kind,
    wire: Wire,
    dst_path: &Path,
) -> Result<Measure, String> {
    // The destination first (listening), then the source, ready but not started.
    let (mut dst, uri) = if kind.qemu_dst() {
        let (q, uri) = qemu_destination(cfg, dir, dst_path, img.size, wire)?;
        (Side::qemu(q), uri)
    } else {
        let (p, uri) = qmig_recv(cfg, dir, dst_path, wire)?;
        (Side::qmig(p), uri)
    };
    let mut src_qemu = if kind.qemu_src() { Some(qemu_source(cfg, img)?) } else { None };
    dst.start();
    let machine = MachineSample::now();
    let mut src = match src_qemu.take() {
        Some(mut q) => {
            let base = proc_cpu(q.pid());
            q.migrate(&uri).map_err(qemu_err("migrate", &q))?;
            let mut s = Side::qemu(q);
            s.base = base;
            s
        }
        None => {
            let ram = format!("mem={}", img.path.display());
            Side::qmig(QmigProc::spawn(cfg, dir, "send", &["send", "--ram", &ram, "--to", &uri]))
        }
    };
    let t0 = machine.at;
    let deadline = t0 + MIGRATION_LIMIT;
    let (mut src_info, mut dst_info) = (Value::Null, Value::Null);
    loop {
        let s = src.poll(&mut src_info)?;
        let d = dst.poll(&mut dst_info)?;
        if s && d {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("not done after {MIGRATION_LIMIT:?} (source done: {s}, destination done: {d})"));
        }
        // A qmig side is reaped by its own thread: poll it often; QEMU every POLL.
        let qmig_only = src.qemu.is_none() && dst.qemu.is_none();
        thread::sleep(if qmig_only { Duration::from_micros(500) } else { POLL });
    }
    let end = src.done.into_iter().chain(dst.done).max().expect("both done");
    let (src_cpu, src_minflt) = src.cpu();
    let (dst_cpu, dst_minflt) = dst.cpu();
    let others = machine.others_since(src_cpu + dst_cpu);
    let time = end.duration_since(t0).as_secs_f64();
    let src_stats = src.finish();
    let dst_stats = dst.finish();
    let mut extra = json!({});
    if src_info.is_object() {
        extra["qemu-src-total-time-ms"] = src_info["total-time"].clone();
        extra["qemu-src"] = src_info;
    }
    if dst_info.is_object() {
        extra["qemu-dst"] = dst_info;
    }
    if !src_stats.is_null() {
        extra["qmig-send"] = src_stats;
    }
    if !dst_stats.is_null() {
        extra["qmig-recv"] = dst_stats;
    }
    Ok(Measure { time, src_cpu, dst_cpu, src_minflt, dst_minflt, others, extra })
}

// ---------------------------------------------------------------------------
// Physical limits

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// 1 MiB `write`s of `buf` into `w`, drained by a reader thread with 1 MiB reads.
fn pipe_throughput(
    buf: &[u8],
    mut w: impl Write + Send,
    mut r: impl Read + Send + 'static,
    close: impl FnOnce(&mut dyn Write),
) -> f64 {
    let reader = thread::spawn(move || {
        let mut b = vec![0u8; MIB as usize];
        let mut n = 0u64;
        loop {
            match r.read(&mut b) {
                Ok(0) => break n,
                Ok(k) => n += k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("limit reader: {e}"),
            }
        }
    });
    let t = Instant::now();
    for c in buf.chunks(MIB as usize) {
        w.write_all(c).expect("limit writer: write");
    }
    close(&mut w);
    let got = reader.join().expect("limit reader thread");
    let took = t.elapsed().as_secs_f64();
    assert_eq!(got, buf.len() as u64, "limit reader got every byte");
    buf.len() as f64 / GIB / took
}

fn unix_limit(buf: &[u8]) -> f64 {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let a2 = a.try_clone().expect("clone");
    pipe_throughput(buf, a, b, move |_| a2.shutdown(Shutdown::Write).expect("shutdown"))
}

fn tcp_limit(buf: &[u8]) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    a.set_nodelay(true).expect("nodelay");
    let a2 = a.try_clone().expect("clone");
    pipe_throughput(buf, a, b, move |_| a2.shutdown(Shutdown::Write).expect("shutdown"))
}

fn memcpy_limit(buf: &[u8], dst: &mut [u8]) -> f64 {
    let t = Instant::now();
    dst.copy_from_slice(buf);
    std::hint::black_box(&dst);
    buf.len() as f64 / GIB / t.elapsed().as_secs_f64()
}

/// `memcpy` into a fresh `MAP_SHARED` mapping of a new file in `dir` (first-touch faults included).
fn fresh_file_limit(buf: &[u8], dir: &Path) -> f64 {
    let path = dir.join("limit-fresh.ram");
    let _ = fs::remove_file(&path);
    let f = OpenOptions::new().read(true).write(true).create_new(true).open(&path).expect("create limit file");
    f.set_len(buf.len() as u64).expect("size limit file");
    // SAFETY: a file we just created and own.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&f) }.expect("map limit file");
    let t = Instant::now();
    map.copy_from_slice(buf);
    let took = t.elapsed().as_secs_f64();
    drop(map);
    let _ = fs::remove_file(&path);
    buf.len() as f64 / GIB / took
}

/// 1 MiB `pwrite`s into a new file in `dir` (page allocation, no fault, no clearing).
fn fresh_file_pwrite_limit(buf: &[u8], dir: &Path) -> f64 {
    let path = dir.join("limit-pwrite.ram");
    let _ = fs::remove_file(&path);
    let f = OpenOptions::new().read(true).write(true).create_new(true).open(&path).expect("create limit file");
    f.set_len(buf.len() as u64).expect("size limit file");
    let t = Instant::now();
    for (i, c) in buf.chunks(MIB as usize).enumerate() {
        f.write_all_at(c, i as u64 * MIB).expect("pwrite limit file");
    }
    let took = t.elapsed().as_secs_f64();
    drop(f);
    let _ = fs::remove_file(&path);
    buf.len() as f64 / GIB / took
}

struct Limit {
    key: &'static str,
    label: &'static str,
    gibs: f64,
    all: Vec<f64>,
    others: f64,
}

fn measure_limits(cfg: &Config, dir: &Path) -> Vec<Limit> {
    let size = cfg.limit_size;
    let mut buf = vec![0u8; size];
    pattern::fill(Pattern::Random, SEED, &mut buf);
    let mut dst = vec![1u8; size];
    let runs = cfg.runs.max(3);
    let mut out = Vec::new();
    let cases: [(&str, &str); 5] = [
        ("unix", "unix socket, 1 MiB writes"),
        ("tcp", "loopback TCP, 1 MiB writes"),
        ("memcpy", "memcpy, one thread, pre-faulted"),
        ("fresh-file", "memcpy into a fresh /dev/shm file mapping"),
        ("fresh-file-pwrite", "1 MiB pwrites into a fresh /dev/shm file"),
    ];
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); cases.len()];
    for _ in 0..runs {
        for (i, (key, _)) in cases.iter().enumerate() {
            let m = MachineSample::now();
            let g = match *key {
                "unix" => unix_limit(&buf),
                "tcp" => tcp_limit(&buf),
                "memcpy" => memcpy_limit(&buf, &mut dst),
                "fresh-file" => fresh_file_limit(&buf, dir),
                _ => fresh_file_pwrite_limit(&buf, dir),
            };
            results[i].0.push(g);
            results[i].1.push(m.others_since(0.0));
        }
    }
    for ((key, label), (g, o)) in cases.iter().zip(results) {
        out.push(Limit { key, label, gibs: median(g.clone()), all: g, others: median(o) });
    }
    out
}

// ---------------------------------------------------------------------------
// Rows and report

struct Row {
    image: String,
    size: u64,
    fill: Fill,
    kind: Kind,
    wire: Wire,
    runs: Vec<Measure>,
    error: Option<String>,
    /// Median time of QEMU → QEMU on the same image and wire.
    qemu_time: Option<f64>,
}

impl Row {
    fn time(&self) -> f64 {
        median(self.runs.iter().map(|m| m.time).collect())
    }
    fn src_cpu(&self) -> f64 {
        median(self.runs.iter().map(|m| m.src_cpu).collect())
    }
    fn dst_cpu(&self) -> f64 {
        median(self.runs.iter().map(|m| m.dst_cpu).collect())
    }
    fn others(&self) -> f64 {
        median(self.runs.iter().map(|m| m.others).collect())
    }
    fn busy_runs(&self) -> usize {
        self.runs.iter().filter(|m| m.others >= BUSY).count()
    }
    fn gibs(&self) -> f64 {
        self.size as f64 / GIB / self.time()
    }
    fn ratio(&self) -> Option<f64> {
        self.qemu_time.map(|q| q / self.time())
    }
    fn case(&self) -> String {
        format!("{} ({})", self.kind.label(), self.wire.name())
    }

    fn to_json(&self) -> Value {
        let gib = self.size as f64 / GIB;
        let mut v = json!({
            "image": self.image,
            "size": self.size,
            "fill": self.fill.pattern().to_string(),
            "case": self.kind.key(),
            "wire": self.wire.name(),
        });
        if let Some(e) = &self.error {
            v["error"] = json!(e);
        }
        if self.runs.is_empty() {
            return v;
        }
        v["time-s"] = json!(round(self.time(), 4));
        v["gib-per-s"] = json!(round(self.gibs(), 3));
        v["src-cpu-s"] = json!(round(self.src_cpu(), 3));
        v["dst-cpu-s"] = json!(round(self.dst_cpu(), 3));
        v["src-cpu-s-per-gib"] = json!(round(self.src_cpu() / gib, 3));
        v["dst-cpu-s-per-gib"] = json!(round(self.dst_cpu() / gib, 3));
        v["src-minflt-per-gib"] =
            json!((median(self.runs.iter().map(|m| m.src_minflt as f64).collect()) / gib).round());
        v["dst-minflt-per-gib"] =
            json!((median(self.runs.iter().map(|m| m.dst_minflt as f64).collect()) / gib).round());
        v["ratio-vs-qemu-qemu"] = json!(self.ratio().map(|r| round(r, 3)));
        v["others"] = json!(round(self.others(), 3));
        v["busy-runs"] = json!(self.busy_runs());
        v["runs"] = self
            .runs
            .iter()
            .map(|m| {
                json!({
                    "time-s": round(m.time, 4), "src-cpu-s": round(m.src_cpu, 3), "dst-cpu-s": round(m.dst_cpu, 3),
                    "src-minflt": m.src_minflt, "dst-minflt": m.dst_minflt, "others": round(m.others, 3),
                    "detail": m.extra,
                })
            })
            .collect();
        v
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// One live KVM run set: `qmig demo --kvm` at one dirty rate.
struct Live {
    /// Dirty rate asked of the guest, bytes/s.
    rate: u64,
    /// The stats JSON of each run (`query-migrate` names plus `guest`).
    runs: Vec<Value>,
    error: Option<String>,
}

impl Live {
    fn field(&self, f: impl Fn(&Value) -> Option<f64>) -> Vec<f64> {
        self.runs.iter().filter_map(f).collect()
    }
    fn to_json(&self) -> Value {
        json!({ "dirty-rate": self.rate, "runs": self.runs, "error": self.error })
    }
}

/// The live case: a running KVM guest (1 GiB in two slots, 256 MiB working set)
/// migrated by `qmig demo --kvm` to a `qmig kvm-dest` process over a unix socket
/// at three dirty rates, `cfg.runs` times each, with `downtime-limit` 300 ms and
/// `max-bandwidth` unlimited; each run's stats JSON is kept whole. Without a
/// usable /dev/kvm there are none, with a note.
fn live_rows(cfg: &Config) -> Vec<Live> {
    if !cfg.live {
        return vec![];
    }
    if let Err(e) = fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        println!("note: /dev/kvm unusable ({e}): no live KVM rows");
        return vec![];
    }
    let (ram, ws) = if cfg.quick { ("256M", "64M") } else { ("1G", "256M") };
    let mut out = vec![];
    for rate in [0u64, 64, 256] {
        let mut live = Live { rate: rate * MIB, runs: vec![], error: None };
        for run in 0..cfg.runs {
            let stats = cfg.shm.join(format!("qmig-compare-live-{}.json", std::process::id()));
            let o = Command::new(&cfg.qmig)
                .args(["demo", "--kvm", "--ram-size", ram, "--working-set", ws])
                .args(["--dirty-rate", &rate.to_string(), "--downtime-limit", "300", "--max-bandwidth", "0"])
                .args(["--seed", &(run + 1).to_string(), "--stats-json"])
                .arg(&stats)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output();
            let v = fs::read_to_string(&stats).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok());
            let _ = fs::remove_file(&stats);
            match (o, v) {
                (Ok(o), Some(v)) if o.status.success() => {
                    eprintln!(
                        "live {rate} MiB/s run {run}: {} ms, downtime {} ms, {} passes, verified {}",
                        v["total-time"], v["downtime"], v["ram"]["dirty-sync-count"], v["verified"]
                    );
                    live.runs.push(v);
                }
                (Ok(o), _) => {
                    live.error = Some(String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("").into())
                }
                (Err(e), _) => live.error = Some(format!("run {}: {e}", cfg.qmig.display())),
            }
        }
        out.push(live);
    }
    out
}

fn print_live(live: &[Live]) {
    println!();
    println!("### live KVM guest (`qmig demo --kvm`, downtime-limit 300 ms, max-bandwidth unlimited)");
    println!();
    println!(
        "| dirty rate asked | achieved | passes | total time s | downtime ms (median, max) | within 300 ms | verified | runs |"
    );
    println!("|---:|---:|---:|---:|---:|---|---|---:|");
    for l in live {
        if l.runs.is_empty() {
            println!(
                "| {} MiB/s | failed: {} | | | | | | 0 |",
                l.rate / MIB,
                l.error.as_deref().unwrap_or("").replace('|', "/")
            );
            continue;
        }
        let achieved = median(l.field(|v| v["guest"]["dirty-rate-achieved"].as_f64())) / MIB as f64;
        let passes = median(l.field(|v| v["ram"]["dirty-sync-count"].as_f64()));
        let total = median(l.field(|v| v["total-time"].as_f64())) / 1e3;
        let down = l.field(|v| v["downtime"].as_f64());
        let max = down.iter().cloned().fold(0.0, f64::max);
        let within = down.iter().filter(|d| **d <= 300.0).count();
        let verified = l.runs.iter().filter(|v| v["verified"] == true).count();
        println!(
            "| {} MiB/s | {achieved:.0} MiB/s | {passes:.0} | {total:.3} | {:.0}, {max:.0} | {within}/{} | {verified}/{} | {} |",
            l.rate / MIB,
            median(down),
            l.runs.len(),
            l.runs.len(),
            l.runs.len()
        );
    }
}

fn print_table(rows: &[Row], cfg: &Config) {
    println!();
    println!("| image | case | time s | (min–max) | GiB/s | src CPU s | dst CPU s | vs QEMU→QEMU | others |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        if let Some(e) = &r.error {
            if r.runs.is_empty() {
                println!("| {} | {} | failed: {} | | | | | | |", r.image, r.case(), e.replace('|', "/"));
                continue;
            }
        }
        let busy = r.busy_runs();
        let flag = if busy > 0 { format!(" (busy {busy}/{})", r.runs.len()) } else { String::new() };
        let times = r.runs.iter().map(|m| m.time);
        let (min, max) = (times.clone().fold(f64::INFINITY, f64::min), times.fold(0.0, f64::max));
        println!(
            "| {} | {} | {:.3} | {min:.3}–{max:.3} | {:.2} | {:.2} | {:.2} | {} | {:.0} %{flag} |",
            r.image,
            r.case(),
            r.time(),
            r.gibs(),
            r.src_cpu(),
            r.dst_cpu(),
            r.ratio().map_or_else(|| "–".to_string(), |x| format!("{x:.2}x")),
            r.others() * 100.0,
        );
    }
    for r in rows.iter().filter(|r| !r.runs.is_empty()) {
        if let Some(e) = &r.error {
            println!("note: {} {}: run {} failed: {e}", r.image, r.case(), r.runs.len() + 1);
        }
    }
    println!();
    println!(
        "time: median of {} run(s), migration start to both sides done; CPU: median utime+stime per side; others: \
         median share of both cores used by other processes during the run (busy: runs at >= {:.0} %).",
        cfg.runs,
        BUSY * 100.0
    );
}

/// The targets of issue 5, checked (reported, never asserted).
fn goals(rows: &[Row], limits: &[Limit]) -> Vec<Value> {
    let mut out = Vec::new();
    let unix_limit = limits.iter().find(|l| l.key == "unix").map(|l| l.gibs);
    let pwrite_limit = limits.iter().find(|l| l.key == "fresh-file-pwrite").map(|l| l.gibs);
    for r in rows.iter().filter(|r| r.kind == Kind::QmigQmig && !r.runs.is_empty()) {
        let q = rows.iter().find(|x| {
            x.kind == Kind::QemuQemu && x.size == r.size && x.fill == r.fill && x.wire == r.wire && !x.runs.is_empty()
        });
        let mut add = |goal: String, value: f64, target: f64| {
            out.push(json!({ "image": r.image, "wire": r.wire.name(), "goal": goal, "value": round(value, 3),
                              "target": target, "met": value >= target }));
        };
        match r.fill {
            Fill::Random => {
                if let Some(x) = r.ratio() {
                    add("qmig→qmig / QEMU→QEMU speed (random)".into(), x, 2.0);
                }
                if let (Wire::Unix, Some(l)) = (r.wire, unix_limit) {
                    add("qmig→qmig / unix-socket limit (random)".into(), r.gibs() / l, 0.8);
                }
                if let (Wire::Unix, Some(l)) = (r.wire, pwrite_limit) {
                    // Not a goal of the issue: what a receiver writing a fresh image can reach.
                    add("qmig→qmig / fresh-file pwrite limit (random; for reference)".into(), r.gibs() / l, 0.8);
                }
            }
            Fill::Zero => {
                if let Some(x) = r.ratio() {
                    add("qmig→qmig / QEMU→QEMU speed (zero)".into(), x, 5.0);
                }
            }
            Fill::Mixed25 => {}
        }
        if let Some(q) = q {
            // CPU per GiB lower than QEMU's: the ratio QEMU/qmig must exceed 1.
            add("QEMU src CPU / qmig send CPU".into(), q.src_cpu() / r.src_cpu().max(1e-3), 1.0);
            add("QEMU dst CPU / qmig recv CPU".into(), q.dst_cpu() / r.dst_cpu().max(1e-3), 1.0);
        }
    }
    out
}

fn qemu_version(cfg: &Config) -> String {
    let Some(q) = &cfg.qemu else { return "not found".into() };
    Command::new(q)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

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

    let mut limits = Vec::new();
    if cfg.limits {
        limits = measure_limits(&cfg, &dir);
        println!();
        println!("| physical limit ({}) | GiB/s (median) | all runs | others |", size_label(cfg.limit_size as u64));
        println!("|---|---:|---|---:|");
        for l in &limits {
            let all: Vec<String> = l.all.iter().map(|g| format!("{g:.2}")).collect();
            println!("| {} | {:.2} | {} | {:.0} % |", l.label, l.gibs, all.join(" "), l.others * 100.0);
        }
    }

    let mut kinds = cfg.kinds.clone();
    if cfg.qemu.is_none() {
        println!("note: qemu-system-x86_64 not found: the QEMU cases are skipped");
        kinds.retain(|k| !k.qemu_src() && !k.qemu_dst());
    }
    let mut rows: Vec<Row> = Vec::new();
    for &size in &cfg.sizes {
        for &fill in &cfg.fills {
            let t = Instant::now();
            let img = Image::create(&dir, size, fill);
            eprintln!("image {} written in {:.1} s", img.label(), t.elapsed().as_secs_f64());
            let first = rows.len();
            for &kind in &kinds {
                for &wire in &cfg.wires {
                    rows.push(Row {
                        image: img.label(),
                        size,
                        fill,
                        kind,
                        wire,
                        runs: vec![],
                        error: None,
                        qemu_time: None,
                    });
                }
            }
            for run in 0..cfg.runs {
                for r in rows[first..].iter_mut() {
                    if r.error.is_some() {
                        continue;
                    }
                    let verify = match cfg.verify {
                        Verify::All => true,
                        Verify::First => run == 0,
                        Verify::None => false,
                    };
                    match run_case(&cfg, &dir, &img, r.kind, r.wire, verify) {
                        Ok(m) => {
                            eprintln!(
                                "{} {} run {}: {:.3} s, {:.2} GiB/s, src {:.2} s, dst {:.2} s CPU, others {:.0} %",
                                r.image,
                                r.case(),
                                run + 1,
                                m.time,
                                size as f64 / GIB / m.time,
                                m.src_cpu,
                                m.dst_cpu,
                                m.others * 100.0
                            );
                            r.runs.push(m);
                        }
                        Err(e) => {
                            eprintln!("{} {} run {}: FAILED: {e}", r.image, r.case(), run + 1);
                            r.error = Some(e);
                        }
                    }
                }
            }
            for i in first..rows.len() {
                let q = rows[first..]
                    .iter()
                    .find(|x| x.kind == Kind::QemuQemu && x.wire == rows[i].wire && !x.runs.is_empty())
                    .map(Row::time);
                rows[i].qemu_time = q;
            }
            drop(img);
        }
    }
    let live = live_rows(&cfg);

    println!();
    println!("load average at start: {load_start}; at end: {}", loadavg());
    print_table(&rows, &cfg);
    if !live.is_empty() {
        print_live(&live);
    }
    let goals = goals(&rows, &limits);
    if !goals.is_empty() {
        println!();
        println!("| goal | image | wire | value | target | met |");
        println!("|---|---|---|---:|---:|---|");
        for g in &goals {
            println!(
                "| {} | {} | {} | {:.2} | {} | {} |",
                g["goal"].as_str().unwrap_or(""),
                g["image"].as_str().unwrap_or(""),
                g["wire"].as_str().unwrap_or(""),
                g["value"].as_f64().unwrap_or(f64::NAN),
                g["target"],
                if g["met"].as_bool() == Some(true) { "yes" } else { "no" }
            );
        }
    }

    let doc = json!({
        "started-unix-time": started,
        "machine": {
            "cpus": cpus(),
            "load-average-start": load_start,
            "load-average-end": loadavg(),
            "qemu": qemu_version(&cfg),
            "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        },
        "config": {
            "quick": cfg.quick,
            "sizes": cfg.sizes,
            "fills": cfg.fills.iter().map(|f| f.pattern().to_string()).collect::<Vec<_>>(),
            "runs": cfg.runs,
            "qmig": cfg.qmig.display().to_string(),
            "qemu-source": "paused (-S, prelaunch), max-bandwidth 1 TiB/s, default capabilities",
            "time": "migration start (QMP migrate / qmig send spawned) to both sides done",
            "busy-threshold": BUSY,
        },
        "limits": limits.iter().map(|l| json!({
            "key": l.key, "label": l.label, "size": cfg.limit_size, "gib-per-s": round(l.gibs, 3),
            "runs": l.all.iter().map(|g| round(*g, 3)).collect::<Vec<_>>(), "others": round(l.others, 3),
        })).collect::<Vec<_>>(),
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "live": live.iter().map(Live::to_json).collect::<Vec<_>>(),
        "goals": goals,
    });
    if let Some(parent) = cfg.json.parent() {
        let _ = fs::create_dir_all(parent);
    }
    fs::write(&cfg.json, serde_json::to_string_pretty(&doc).expect("JSON") + "\n")
        .unwrap_or_else(|e| panic!("write {}: {e}", cfg.json.display()));
    println!();
    println!("JSON: {}", cfg.json.display());
}
