//! `qmig demo`: a live migration of a synthetic guest whose writer threads keep
//! dirtying its memory, from this process to a `qmig recv` child (or a real QEMU
//! 7.2 with `--dest qemu`), with a progress bar, a check that the destination's
//! RAM equals the source's RAM at the moment of stop, and the final statistics.

use engine::memory::RamRegion;
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::Outgoing;
use qmig::{Error, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::pattern::{self, Pattern};
use testkit::qemu::{QemuConfig, QemuProcess};
use testkit::synthetic::SyntheticGuest;
use transports::{connect_with, ChannelOptions, MigrationUri};

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
    /// Capability `xbzrle` (cache size in `params`).
    pub xbzrle: bool,
    /// Also write the stream sent to this file (the return path is then off).
    pub capture: Option<PathBuf>,
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
    /// The channel's io timeout (`--io-timeout`), on both ends.
    pub channel: transports::ChannelOptions,
    /// Where the source connects, when not to the URI the destination listens on
    /// (`--connect`: a proxy or tunnel in between).
    pub connect: Option<String>,
    /// Capability `multifd` with this many channels (compression in `params`).
    pub multifd: Option<u8>,
    /// TLS on both ends (QEMU's `tls-creds`, `tls-hostname`, `tls-authz`; qmig destination only).
    pub tls: Option<transports::TlsParams>,
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

    if opts.tls.is_some() && opts.dest == Destination::Qemu {
        return Err(Error::Usage("--tls-creds: the demo runs TLS with a qmig destination only".into()));
    }
    // The destination, listening before we connect.
    let (mut dest, uri) = match opts.dest {
        Destination::Qmig => start_qmig_recv(&dst_ram, &uri, opts)?,
        Destination::Qemu => start_qemu(&dst_ram, opts.ram_size, &uri, opts)?,
    };

    let params = SharedParameters::new(opts.params.clone()).map_err(|e| Error::Usage(e.to_string()))?;
    let caps = MigrationCapabilities {
        auto_converge: opts.auto_converge,
        return_path: opts.return_path && opts.capture.is_none(),
        multifd: opts.multifd.is_some(),
        xbzrle: opts.xbzrle,
        postcopy_ram: opts.postcopy.is_some(),
        ..Default::default()
    };
    let mut out = Outgoing::new(params, caps).map_err(Error::Io)?.with_cancel(cancel.clone());
    if let Some(after) = opts.postcopy {
        out = out.with_postcopy_after(after);
    }
    let to = connect_uri(opts.connect.as_deref(), &uri)?;
    let ch = connect_retry(&to, out.cancel(), &opts.channel, opts.tls.as_ref())?;
    let channels = multifd_channels(&to, opts.multifd, &out, &opts.channel, opts.tls.as_ref())?;
    let progress = opts.progress.then(|| qmig::watch::Progress::outgoing(&out));
    let deadline = opts.timeout.map(|t| qmig::watch::Deadline::arm(&out, t));
    let mut vcpus = guest.vcpus();
    let mut ram = [RamRegion::new(&region).with_dirty(guest.dirty())];
    let res = match (channels, &opts.capture) {
        (Some(c), None) => out.run_multifd_announced(ch, c, &mut ram, &mut vcpus, &mut Default::default()),
        (Some(_), Some(_)) => {
            return Err(Error::Usage("--capture records the main channel only: it refuses --multifd".into()))
        }
        (None, None) => out.run(ch, &mut ram, &mut vcpus),
        (None, Some(path)) => {
            let file = std::fs::File::create(path).map_err(|e| Error::file(path, e))?;
            let file = std::io::BufWriter::with_capacity(1 << 20, file);
            let w = Tee { ch: transports::MigrationWriter::new(ch, out.rate().clone()), file, page: vec![0u8; 4096] };
            out.run_on(w, &mut ram, &mut vcpus, &mut engine::vm::VmParts::default())
        }
    };
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

/// The `multifd-channels` extra connections, after the main one (QEMU 7.2's order);
/// over TLS each runs its own handshake, as in 7.2. Each announces itself (its
/// initial packet, with `out`'s UUID) before the next connects, as 7.2's source
/// does (a QEMU destination serves the next TLS handshake only after that packet):
/// run them with [`Outgoing::run_multifd_announced`].
pub(crate) fn multifd_channels(
    uri: &MigrationUri,
    n: Option<u8>,
    out: &Outgoing,
    channel: &ChannelOptions,
    tls: Option<&transports::TlsParams>,
) -> Result<Option<Vec<transports::Channel>>> {
    let Some(n) = n else { return Ok(None) };
    engine::multifd::check_uri(uri).map_err(Error::Usage)?;
    let client = tls.map(|t| transports::TlsParams { authz: None, ..t.clone() });
    let cancel = out.cancel();
    let open = |id: u8| {
        let c = match &client {
            Some(t) => t.connect_with(uri, cancel, channel),
            None => connect_with(uri, cancel, channel),
        }
        .map_err(Error::transport)?;
        engine::multifd::announce(&c, id, out.uuid()).map_err(|e| {
            Error::transport(transports::TransportError::Channel { peer: c.peer().to_string(), source: e })
        })?;
        Ok(c)
    };
    (0..n).map(open).collect::<Result<Vec<_>>>().map(Some)
}

/// `--multifd N --multifd-compression C` for a destination qmig process.
pub(crate) fn multifd_args(n: Option<u8>, p: &MigrationParameters) -> Vec<String> {
    match n {
        Some(n) => vec![
            "--multifd".into(),
            n.to_string(),
            "--multifd-compression".into(),
            p.multifd_compression.as_str().into(),
        ],
        None => vec![],
    }
}

fn start_qmig_recv(dst: &Path, uri: &MigrationUri, opts: &DemoOptions) -> Result<(Dest, MigrationUri)> {
    let exe = std::env::current_exe().map_err(Error::Io)?;
    let mut cmd = Command::new(exe);
    cmd.args(["recv", "--ram", &format!("mem={}", dst.display()), "--from", &uri.to_string()]);
    cmd.args(["--io-timeout", &io_timeout_arg(&opts.channel)]);
    cmd.args(multifd_args(opts.multifd, &opts.params));
    cmd.args(crate::tls_args::dest_args(opts.tls.as_ref()));
    if opts.postcopy.is_some() {
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

fn start_qemu(dst: &Path, len: u64, uri: &MigrationUri, opts: &DemoOptions) -> Result<(Dest, MigrationUri)> {
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
    if let Some(n) = opts.multifd {
        q.qmp().and_then(|m| m.set_capabilities(&[("multifd", true)])).map_err(qemu_err)?;
        let args = serde_json::json!({
            "multifd-channels": n,
            "multifd-compression": opts.params.multifd_compression.as_str(),
        });
        q.execute("migrate-set-parameters", Some(args)).map_err(qemu_err)?;
    }
    q.migrate_incoming(&uri.to_string()).map_err(qemu_err)?;
    Ok((Dest::Qemu(Box::new(q)), uri))
}

/// The URI the source connects to: `connect` when given, else where the destination listens.
pub(crate) fn connect_uri(connect: Option<&str>, listening: &MigrationUri) -> Result<MigrationUri> {
    match connect {
        Some(c) => c.parse().map_err(|e: transports::UriError| Error::Transport(e.into())),
        None => Ok(listening.clone()),
    }
}

/// `--io-timeout`'s value for a destination process with these options (0: none).
pub(crate) fn io_timeout_arg(channel: &ChannelOptions) -> String {
    channel.io_timeout.map_or(0.0, |t| t.as_secs_f64()).to_string()
}

/// Connect to a destination that may still be starting (retrying for 5 s), then
/// run the TLS handshake once when `tls` is given.
pub(crate) fn connect_retry(
    uri: &MigrationUri,
    cancel: &transports::CancelToken,
    channel: &ChannelOptions,
    tls: Option<&transports::TlsParams>,
) -> Result<transports::Channel> {
    // Both ends' flags come together here: the allow-list is the destination's.
    let client = tls.map(|t| transports::TlsParams { authz: None, ..t.clone() });
    let creds = client.map(|t| t.client()).transpose().map_err(|e| Error::Transport(e.into()))?;
    let name = match tls {
        Some(t) => {
            Some(transports::tls::server_name(uri, t.hostname.as_deref()).map_err(|e| Error::Transport(e.into()))?)
        }
        None => None,
    };
    let t0 = Instant::now();
    loop {
        match connect_with(uri, cancel, channel) {
            Ok(c) => {
                return match (&creds, &name) {
                    (Some(creds), Some(name)) => c.tls_client(creds, name).map_err(Error::transport),
                    _ => Ok(c),
                }
            }
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

/// The stream to the channel and, copied, to a capture file (`--capture`). A page's
/// copy is read when it is queued: if the guest writes it before the channel sends
/// it, the capture holds the earlier bytes (the page is dirty and sent again); the
/// records are the same.
struct Tee<'g> {
    ch: transports::MigrationWriter<'g>,
    file: std::io::BufWriter<std::fs::File>,
    page: Vec<u8>,
}

impl std::io::Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.ch.write(buf)?;
        self.file.write_all(&buf[..n])?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.ch.flush()
    }
}

impl<'g> engine::source::PageWriter<'g> for Tee<'g> {
    fn write_page(&mut self, page: vm_memory::VolatileSlice<'g>) -> std::io::Result<()> {
        self.page.resize(page.len(), 0);
        page.copy_to(&mut self.page[..]);
        self.file.write_all(&self.page)?;
        self.ch.write_volatile(page)
    }
    fn flush_now(&mut self) -> std::io::Result<()> {
        self.ch.flush_now()
    }
    fn bytes_sent(&self) -> u64 {
        self.ch.rate_limit().total_bytes()
    }
    fn close(mut self) -> std::result::Result<(), engine::source::EngineError> {
        self.file.flush()?;
        Ok(self.ch.close()?)
    }
}
