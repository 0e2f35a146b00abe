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
use transports::{connect, CancelToken, MigrationUri};

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

/// [`send`], also saying whether the deadline fired (`{"secs", "action", "fired"}`).
pub fn send_watched(
    ram: &[(String, PathBuf)],
    uri: &MigrationUri,
    opts: &SendOptions,
    cancel: &CancelToken,
) -> Result<(MigrationInfo, Option<serde_json::Value>)> {
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
    let params = SharedParameters::new(opts.params.clone()).map_err(|e| Error::Usage(e.to_string()))?;
    let ch = connect(uri, cancel).map_err(Error::transport)?;
    let return_path = opts.return_path.unwrap_or_else(|| ch.return_path().is_ok());
    let caps = MigrationCapabilities {
        auto_converge: opts.auto_converge,
        return_path,
        postcopy_ram: opts.postcopy,
        pause_before_switchover: opts.pause_before_switchover,
        ..Default::default()
    };
    let mut out =
        Outgoing::new(params, caps).map_err(Error::Io)?.with_cancel(cancel.clone()).with_runstate(&opts.runstate);
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
        let r = out.run(ch, &mut ram, &mut Stopped);
        stop.store(true, Ordering::Relaxed);
        r
    });
    drop(progress);
    drop(control);
    let timeout = deadline.map(crate::watch::Deadline::finish_json);
    match result {
        Ok(info) => Ok((info, timeout)),
        Err(e) => Err(crate::watch::timeout_error(Error::outgoing(e), timeout.as_ref())),
    }
}
