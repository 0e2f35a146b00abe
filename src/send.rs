//! `qmig send` (and `save`): a stopped guest whose RAM blocks are files, migrated
//! by the engine's pre-copy loop over any migration URI, pages sent in place from
//! the mappings.

use crate::error::{Error, Result};
use crate::ramfile::RamFile;
use engine::info::MigrationInfo;
use engine::memory::{GuestRegion, RamRegion};
use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
use engine::source::Outgoing;
use engine::vm::{VcpuControl, VmmError};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use transports::{connect_with, CancelToken, MigrationUri};

/// Options of a send.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Runstate recorded in `globalstate` (`prelaunch` for a guest that never ran).
    pub runstate: String,
    /// `max-bandwidth`, `downtime-limit`, ...
    pub params: MigrationParameters,
    /// `auto-converge`.
    pub auto_converge: bool,
    /// Capability `return-path`: `None` (the default) turns it on when the channel
    /// has a reverse direction (tcp:, unix:, an fd: socket); `Some(true)` requires it
    /// (refused on exec: and file:); `Some(false)` turns it off.
    pub return_path: Option<bool>,
    /// Show a progress line on stderr while sending.
    pub progress: bool,
    /// A whole-migration deadline (virsh's `--timeout`).
    pub timeout: Option<crate::watch::Timeout>,
    /// The channel's io timeout (`--io-timeout`; default 30 s on sockets).
    pub channel: transports::ChannelOptions,
    /// Capability `multifd` with this many channels (`multifd-channels`; compression
    /// and levels are in `params`): tcp: and unix: only.
    pub multifd: Option<u8>,
    /// QEMU's `-uuid` of the guest, in each multifd channel's initial packet (a QEMU
    /// 7.2 destination refuses a channel whose UUID is not its own); all zeros by default.
    pub uuid: [u8; 16],
    /// Capability `xbzrle` (its cache size is `params.xbzrle_cache_size`). A stopped
    /// guest is sent in one pass, so no page is sent twice to be encoded.
    pub xbzrle: bool,
    /// `--compress zstd[:LEVEL]`: the stream as one zstd frame (file: and exec: only).
    pub compress: Option<crate::compress::Compression>,
    /// TLS (QEMU's `tls-creds`, `tls-hostname`): the handshake runs before the stream
    /// starts, on the main channel and on each multifd channel (its own session, as in 7.2).
    pub tls: Option<transports::TlsParams>,
    /// Capability `postcopy-ram` (it needs the return path: refused on exec: and file:).
    pub postcopy: bool,
    /// With `postcopy`: start postcopy after this long, or once the first pass has
    /// sent every page if sooner (zero: as soon as allowed); `None`: only when told
    /// (`migrate-start-postcopy` on the control socket).
    pub postcopy_after: Option<std::time::Duration>,
    /// Capability `pause-before-switchover`: hold in `pre-switchover` until
    /// `migrate-continue` arrives on the control socket.
    pub pause_before_switchover: bool,
    /// The control socket (`--control unix:PATH`, see [`crate::control`]).
    pub control: Option<PathBuf>,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            runstate: "prelaunch".into(),
            params: MigrationParameters { max_bandwidth: 0, ..Default::default() },
            auto_converge: false,
            return_path: None,
            progress: false,
            timeout: None,
            channel: transports::ChannelOptions::default(),
            multifd: None,
            uuid: [0; 16],
            xbzrle: false,
            compress: None,
            tls: None,
            postcopy: false,
            postcopy_after: None,
            pause_before_switchover: false,
            control: None,
        }
    }
}

/// Refuse a return path asked for on a URI with one direction only (exec:, file:).
pub fn check_return_path(uri: &MigrationUri, asked: Option<bool>) -> Result<()> {
    if asked == Some(true) && matches!(uri, MigrationUri::Exec(_) | MigrationUri::File { .. }) {
        return Err(Error::Usage(format!(
            "--return-path needs a socket (tcp:, unix: or an fd: socket): {uri} carries only one direction"
        )));
    }
    Ok(())
}

/// The statistics JSON (`query-migrate` names) with `"return-path"`: `null` when
/// none was used, else `{"pongs", "shut", "error"?}` (`shut` 0: the destination
/// confirmed it loaded everything).
pub fn stats_json(info: &MigrationInfo) -> serde_json::Value {
    let mut v = info.to_json();
    if info.return_path.is_none() {
        v["return-path"] = serde_json::Value::Null;
    }
    v
}

/// A guest that is not running: stopping, resuming and throttling are no-ops.
struct Stopped;

impl VcpuControl for Stopped {
    fn stop(&mut self) -> std::result::Result<(), VmmError> {
        Ok(())
    }
    fn resume(&mut self) -> std::result::Result<(), VmmError> {
        Ok(())
    }
    fn set_throttle(&mut self, _: u8) -> std::result::Result<(), VmmError> {
        Ok(())
    }
}

/// Send the guest whose RAM blocks are `ram` files to `uri`; `cancel` stops it from any thread.
pub fn send(
    ram: &[(String, PathBuf)],
    uri: &MigrationUri,
    opts: &SendOptions,
    cancel: &CancelToken,
) -> Result<MigrationInfo> {
    send_watched(ram, uri, opts, cancel).map(|(info, _)| info)
}

/// What a send did: the source's `query-migrate` figures, the deadline's report
/// (`{"secs", "action", "fired"}`) when one was armed, and the compression's.
#[derive(Debug, Clone)]
pub struct Sent {
    /// `query-migrate`.
    pub info: MigrationInfo,
    /// The deadline's report.
    pub timeout: Option<serde_json::Value>,
    /// With `--compress`: sizes and speed.
    pub compressed: Option<crate::compress::CompressedStats>,
}

impl Sent {
    /// The statistics line: [`stats_json`] plus `"timeout"` and `"zstd"` when present.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = stats_json(&self.info);
        if let Some(t) = &self.timeout {
            v["timeout"] = t.clone();
        }
        if let Some(c) = &self.compressed {
            v["zstd"] = c.to_json();
        }
        v
    }
}

/// [`send`], also saying whether the deadline fired (`{"secs", "action", "fired"}`).
pub fn send_watched(
    ram: &[(String, PathBuf)],
    uri: &MigrationUri,
    opts: &SendOptions,
    cancel: &CancelToken,
) -> Result<(MigrationInfo, Option<serde_json::Value>)> {
    send_all(ram, uri, opts, cancel).map(|s| (s.info, s.timeout))
}

/// [`send`], with everything it reports ([`Sent`]).
pub fn send_all(
    ram: &[(String, PathBuf)],
    uri: &MigrationUri,
    opts: &SendOptions,
    cancel: &CancelToken,
) -> Result<Sent> {
    if ram.is_empty() {
        return Err(Error::Usage("at least one --ram NAME=PATH is needed".into()));
    }
    let files = ram.iter().map(|(n, p)| RamFile::open(n, p)).collect::<Result<Vec<_>>>()?;
    let regions = files
        .iter()
        .map(|f| {
            let bytes = f.bytes();
            // SAFETY: the read-only mapping lives in `files` until this function returns,
            // after the migration; the engine only reads through the region.
            unsafe { GuestRegion::new(f.name.clone(), bytes.as_ptr() as *mut u8, bytes.len()) }
                .ok_or_else(|| Error::Usage(format!("{}: empty RAM file", f.path.display())))
        })
        .collect::<Result<Vec<_>>>()?;
    // A stopped guest writes nothing: its regions need no dirty source.
    let mut ram: Vec<RamRegion<'_>> = regions.iter().map(RamRegion::new).collect();
    check_return_path(uri, opts.return_path)?;
    if opts.compress.is_some() && !matches!(uri, MigrationUri::File { .. } | MigrationUri::Exec(_)) {
        return Err(Error::Usage(format!(
            "--compress writes a file (file:) or a command's input (exec:), not {uri}: a live destination reads the plain stream"
        )));
    }
    if opts.postcopy {
        check_return_path(uri, Some(true)).map_err(|_| {
            Error::Usage(format!("--postcopy needs a socket (tcp:, unix: or an fd: socket), not {uri}"))
        })?;
        if opts.return_path == Some(false) {
            return Err(Error::Usage("--postcopy needs the return path: drop --no-return-path".into()));
        }
    }
    if opts.pause_before_switchover && opts.control.is_none() {
        return Err(Error::Usage("--pause-before-switchover needs --control unix:PATH to continue from".into()));
    }
    if let Some(p) = opts.control.as_deref().filter(|p| p.exists()) {
        // Refused before connecting, so the destination never sees a stream begin.
        return Err(Error::Usage(format!("--control {}: the file exists already", p.display())));
    }
    let mut params = opts.params.clone();
    if let Some(n) = opts.multifd {
        engine::multifd::check_uri(uri).map_err(Error::Usage)?;
        if opts.postcopy {
            return Err(Error::Usage("--multifd and --postcopy refuse each other: use one of them".into()));
        }
        params.multifd_channels = n;
    }
    let params = SharedParameters::new(params).map_err(|e| Error::Usage(e.to_string()))?;
    let open = || match &opts.tls {
        Some(tls) => tls.connect_with(uri, cancel, &opts.channel),
        None => connect_with(uri, cancel, &opts.channel),
    };
    let ch = open().map_err(Error::transport)?;
    // The multifd channels connect after the main one (QEMU 7.2's order).
    let channels = match opts.multifd {
        // Each announces itself (its initial packet) before the next connects, as
        // QEMU 7.2's source does: a QEMU destination serves the next connection (its
        // TLS handshake) only after reading the previous one's initial packet.
        Some(n) => Some(
            (0..n)
                .map(|i| {
                    let c = open().map_err(Error::transport)?;
                    engine::multifd::announce(&c, i, opts.uuid).map_err(|e| {
                        Error::transport(transports::TransportError::Channel { peer: c.peer().to_string(), source: e })
                    })?;
                    Ok(c)
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let return_path = opts.return_path.unwrap_or_else(|| ch.return_path().is_ok());
    let caps = MigrationCapabilities {
        auto_converge: opts.auto_converge,
        return_path,
        xbzrle: opts.xbzrle,
        postcopy_ram: opts.postcopy,
        pause_before_switchover: opts.pause_before_switchover,
        multifd: channels.is_some(),
        ..Default::default()
    };
    let mut out = Outgoing::new(params, caps)
        .map_err(Error::Io)?
        .with_cancel(cancel.clone())
        .with_runstate(&opts.runstate)
        .with_uuid(opts.uuid);
    if let (true, Some(after)) = (opts.postcopy, opts.postcopy_after) {
        out = out.with_postcopy_after(after);
    }
    let control = opts.control.as_deref().map(|p| crate::control::ControlServer::bind(p, &out)).transpose()?;
    let stop = AtomicBool::new(false);
    let progress = opts.progress.then(|| crate::watch::Progress::outgoing(&out));
    let deadline = opts.timeout.map(|t| crate::watch::Deadline::arm(&out, t));
    let result = std::thread::scope(|s| {
        let prefault = || files.iter().for_each(|f| f.prefault(&stop));
        // Without the thread the engine's reads fault the pages in themselves.
        let _ = std::thread::Builder::new().name("qmig-prefault".into()).spawn_scoped(s, prefault);
        // multifd needs tcp:/unix:, --compress file:/exec: (both checked above): never both.
        let r = match (channels, opts.compress) {
            (Some(channels), _) => {
                out.run_multifd_announced(ch, channels, &mut ram, &mut Stopped, &mut Default::default())
            }
            (None, None) => out.run(ch, &mut ram, &mut Stopped),
            (None, Some(c)) => {
                // The compressed bytes are what the channel's rate limit counts.
                let w = transports::MigrationWriter::new(ch, out.rate().clone());
                match crate::compress::ZstdPageWriter::new(w, c) {
                    Ok(w) => out.run_on(w, &mut ram, &mut Stopped, &mut engine::vm::VmParts::default()),
                    Err(e) => Err(engine::source::EngineError::Setup(format!("zstd: {}", e.report()))),
                }
            }
        };
        stop.store(true, Ordering::Relaxed);
        r
    });
    drop(progress);
    drop(control);
    let timeout = deadline.map(crate::watch::Deadline::finish_json);
    match result {
        Ok(info) => {
            let compressed = opts.compress.map(|c| crate::compress::CompressedStats {
                level: c.level,
                stream_size: info.transferred,
                compressed_size: out.rate().total_bytes(),
                secs: info.total_time.as_secs_f64(),
            });
            Ok(Sent { info, timeout, compressed })
        }
        Err(e) => Err(crate::watch::timeout_error(Error::outgoing(e), timeout.as_ref())),
    }
}
