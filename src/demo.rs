//! `qmig demo`: a live migration of a synthetic guest whose writer threads keep
//! dirtying its memory, from this process to a `qmig recv` child (or a real QEMU
//! 7.2 with `--dest qemu`), with a progress bar, a check that the destination's
//! RAM equals the source's RAM at the moment of stop, and the final statistics.

use engine::memory::RamRegion;
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::Outgoing;
use qmig::{Error, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::pattern::{self, Pattern};
use testkit::qemu::{QemuConfig, QemuProcess};
use testkit::synthetic::SyntheticGuest;
use transports::{connect, MigrationUri};

/// Where the demo migrates to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// A `qmig recv` process.
    Qmig,
    /// A QEMU 7.2 `-machine none` guest with a memory-backend-file.
    Qemu,
}

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// Bytes/s the guest's writer threads dirty.
    pub dirty_rate: u64,
    /// Writer threads.
    pub vcpus: usize,
    /// Transport (`unix:` or `tcp:`); default a unix socket in the work directory.
    pub uri: Option<String>,
    /// Migration parameters (`downtime-limit`, `max-bandwidth`...).
    pub params: MigrationParameters,
    /// `auto-converge`.
    pub auto_converge: bool,
    /// Capability `return-path`: the source completes only after the destination's SHUT(0).
    pub return_path: bool,
    /// The destination.
    pub dest: Destination,
    /// Seed of the guest's content and writes.
    pub seed: u64,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// A whole-migration deadline (virsh's `--timeout`).
    pub timeout: Option<qmig::watch::Timeout>,
    /// Capability `postcopy-ram` on both ends (qmig destination only), with the
    /// switch after this long or at the end of the first pass if sooner; the
    /// destination reads pages at random while postcopy is active (`--postcopy-touch`).
    pub postcopy: Option<Duration>,
}

/// Work files, removed on drop.
pub(crate) struct WorkDir(pub(crate) PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn work_dir() -> Result<WorkDir> {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let d = base.join(format!("qmig-demo-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| Error::file(&d, e))?;
    Ok(WorkDir(d))
}

/// The destination side while it runs.
enum Dest {
    Qmig(Child),
    Qemu(Box<QemuProcess>),
}

/// Run the demo; returns the final statistics (`query-migrate` names plus
/// `"verified"`), and whether the destination's RAM matched.
pub fn demo(opts: &DemoOptions, cancel: &transports::CancelToken) -> Result<(Value, bool)> {
    if opts.ram_size == 0 || !opts.ram_size.is_multiple_of(pattern::PAGE_SIZE as u64) {
        return Err(Error::Usage("--ram-size must be a positive multiple of 4 KiB".into()));
    }
    if opts.postcopy.is_some() && opts.dest == Destination::Qemu {
        return Err(Error::Usage("--postcopy: the synthetic guest's demo postcopy runs into qmig recv".into()));
    }
    let dir = work_dir()?;
    let dst_ram = dir.0.join("dst-ram");
    let uri: MigrationUri = match &opts.uri {
        Some(u) => u.parse().map_err(|e: transports::UriError| Error::Transport(e.into()))?,
        None => MigrationUri::Unix(dir.0.join("migrate.sock")),
    };
    if !matches!(uri, MigrationUri::Tcp { .. } | MigrationUri::Unix(_)) {
        return Err(Error::Usage("the demo migrates over tcp: or unix: URIs".into()));
    }

    // The guest: a quarter of its pages random, the rest zero, then its writers start.
    let mut guest = SyntheticGuest::new(opts.ram_size as usize, |p, page| {
        if p % 4 == 0 {
            let mut buf = [0u8; pattern::PAGE_SIZE];
            pattern::fill_page(Pattern::Random, opts.seed, p, &mut buf);
            page.copy_from_slice(&buf);
        } else {
            page.fill(0);
        }
    });
    let region = guest.region("mem").ok_or_else(|| Error::Usage("guest RAM".into()))?;
    guest.start(opts.vcpus, opts.dirty_rate, opts.seed);

    // The destination, listening before we connect.
    let (mut dest, uri) = match opts.dest {
        Destination::Qmig => start_qmig_recv(&dst_ram, &uri, opts.postcopy.is_some())?,
        Destination::Qemu => start_qemu(&dst_ram, opts.ram_size, &uri)?,
    };

    let params = SharedParameters::new(opts.params.clone()).map_err(|e| Error::Usage(e.to_string()))?;
    let caps = MigrationCapabilities {
        auto_converge: opts.auto_converge,
        return_path: opts.return_path,
        postcopy_ram: opts.postcopy.is_some(),
        ..Default::default()
    };
    let mut out = Outgoing::new(params, caps).map_err(Error::Io)?.with_cancel(cancel.clone());
    if let Some(after) = opts.postcopy {
        out = out.with_postcopy_after(after);
    }
    let ch = connect_retry(&uri, out.cancel())?;
    let progress = opts.progress.then(|| qmig::watch::Progress::outgoing(&out));
    let deadline = opts.timeout.map(|t| qmig::watch::Deadline::arm(&out, t));
    let mut vcpus = guest.vcpus();
    let res = out.run(ch, &mut [RamRegion::new(&region).with_dirty(guest.dirty())], &mut vcpus);
    drop(progress);
    let timeout = deadline.map(qmig::watch::Deadline::finish_json);
    let info = match res {
        Ok(i) => i,
        Err(e) => return Err(qmig::watch::timeout_error(Error::outgoing(e), timeout.as_ref())),
    };
    let dest_report = finish_dest(&mut dest)?;

    // The source is stopped (in postcopy since the switch): compare what it last
    // wrote with the destination's RAM.
    let (verified, differing) = verify(&guest, &dst_ram)?;
    guest.shutdown();
    let mut stats = qmig::send::stats_json(&info);
    stats["verified"] = json!(verified);
    if let Some(t) = timeout {
        stats["timeout"] = t;
    }
    stats["destination"] = dest_report;
    stats["guest"] = json!({"writes": guest.writes(), "dirty-rate": opts.dirty_rate});
    if !verified {
        stats["differing-pages"] = json!(differing);
    }
    Ok((stats, verified))
}

fn start_qmig_recv(dst: &Path, uri: &MigrationUri, postcopy: bool) -> Result<(Dest, MigrationUri)> {
    let exe = std::env::current_exe().map_err(Error::Io)?;
    let mut cmd = Command::new(exe);
    cmd.args(["recv", "--ram", &format!("mem={}", dst.display()), "--from", &uri.to_string()]);
    if postcopy {
        // No vCPU faults in `qmig recv`: its touch thread stands in for one.
        cmd.args(["--postcopy", "--postcopy-touch"]);
    }
    let (child, bound) = spawn_listening(cmd, "qmig recv")?;
    Ok((Dest::Qmig(child), bound))
}

/// Start a qmig destination process and read the `{"listening": URI}` line it
/// prints once it listens; `what` names it in errors.
pub(crate) fn spawn_listening(mut cmd: Command, what: &str) -> Result<(Child, MigrationUri)> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(Error::Io)?;
    let mut line = String::new();
    if let Some(out) = child.stdout.as_mut() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let v: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
    let Some(bound) = v["listening"].as_str() else {
        let mut err = String::new();
        if let Some(e) = child.stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = child.kill();
        let _ = child.wait();
        return Err(Error::Usage(format!("{what} did not start: {}", err.trim())));
    };
    let bound = bound.parse().map_err(|e: transports::UriError| Error::Transport(e.into()))?;
    Ok((child, bound))
}

/// Wait for a qmig destination process to end; its last stdout line (JSON) on
/// success, its stderr in the error otherwise.
pub(crate) fn wait_report(child: &mut Child, what: &str) -> Result<Value> {
    let mut out = String::new();
    if let Some(o) = child.stdout.as_mut() {
        let _ = o.read_to_string(&mut out);
    }
    let mut err = String::new();
    if let Some(e) = child.stderr.as_mut() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().map_err(Error::Io)?;
    if !status.success() {
        return Err(Error::Usage(format!("{what} failed ({status}): {}", err.trim())));
    }
    out.lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| Error::Usage(format!("{what} printed no report")))
}

fn start_qemu(dst: &Path, len: u64, uri: &MigrationUri) -> Result<(Dest, MigrationUri)> {
    let uri = match uri {
        MigrationUri::Tcp { host, port: 0 } => {
            // QEMU needs a concrete port: take a free one.
            let l = std::net::TcpListener::bind((host.as_str(), 0)).map_err(Error::Io)?;
            let port = l.local_addr().map_err(Error::Io)?.port();
            MigrationUri::Tcp { host: host.clone(), port }
        }
        u => u.clone(),
    };
    let qemu_err = |e: testkit::qemu::QemuError| Error::Usage(format!("QEMU: {}", engine::error::report(&e)));
    let mut q = QemuProcess::start(&QemuConfig::new().ram("mem", dst, len).incoming(true)).map_err(qemu_err)?;
    q.migrate_incoming(&uri.to_string()).map_err(qemu_err)?;
    Ok((Dest::Qemu(Box::new(q)), uri))
}

pub(crate) fn connect_retry(uri: &MigrationUri, cancel: &transports::CancelToken) -> Result<transports::Channel> {
    let t0 = Instant::now();
    loop {
        match connect(uri, cancel) {
            Ok(c) => return Ok(c),
            Err(e) if t0.elapsed() < Duration::from_secs(5) && !e.is_cancelled() => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::transport(e)),
        }
    }
}

fn finish_dest(dest: &mut Dest) -> Result<Value> {
    match dest {
        Dest::Qmig(child) => {
            let stats = wait_report(child, "qmig recv")?;
            Ok(json!({"kind": "qmig", "stats": stats}))
        }
        Dest::Qemu(q) => {
            let err =
                |e: testkit::qemu::QemuError| Error::Usage(format!("QEMU destination: {}", engine::error::report(&e)));
            let info = q.wait_migration(Duration::from_secs(60)).map_err(err)?;
            let runstate = q.query_status().map_err(err)?;
            let status = info["status"].as_str().unwrap_or("").to_string();
            if status != "completed" {
                return Err(Error::Usage(format!("QEMU destination ended '{status}'")));
            }
            Ok(json!({"kind": "qemu", "status": status, "runstate": runstate}))
        }
    }
}

fn verify(guest: &SyntheticGuest, dst: &Path) -> Result<(bool, u64)> {
    let mut f = std::fs::File::open(dst).map_err(|e| Error::file(dst, e))?;
    let (mut a, mut b) = (vec![0u8; pattern::PAGE_SIZE], vec![0u8; pattern::PAGE_SIZE]);
    let mut differing = 0u64;
    for p in 0..guest.pages() {
        guest.read_page(p, &mut a);
        f.read_exact(&mut b).map_err(|e| Error::file(dst, e))?;
        if a != b {
            differing += 1;
        }
    }
    Ok((differing == 0, differing))
}
