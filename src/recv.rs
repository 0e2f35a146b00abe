//! `qmig recv`: listen (or read the file / run the command), load the stream into
//! mapped RAM files through the engine's incoming side, and succeed only when it
//! ended with EOF and every check passed. On a socket, a source's return path is
//! served (PONGs, then SHUT(0) once the files are written, SHUT(1) on failure).

use crate::error::{Error, Result};
use crate::ramfile::ImageSink;
use engine::incoming::{channel_return_path, Incoming, ReturnPathReport};
use engine::info::MigrationInfo;
use engine::postcopy_dest::{PostcopyOptions, PostcopyReport};
use engine::state::MigrationStatus;
use engine::vm::{VcpuControl, VmParts};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use transports::{CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};

/// After the main connection, a tcp:/unix: listener stays open: QEMU's multifd
/// channels connect there (the main one first). A connection that starts with the
/// multifd magic ends the main stream (its socket's read side is shut down), so
/// the load fails, SHUT(1) goes out on the return path and both ends fail with a
/// clear reason; any other extra connection is closed. Stopped (its token
/// cancelled) and joined on drop.
struct ExtraConnections {
    token: CancelToken,
    multifd: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ExtraConnections {
    fn watch(listener: Listener, main: Option<transports::ReturnPath>, token: CancelToken) -> Self {
        let multifd = Arc::new(AtomicBool::new(false));
        let (flag, stop) = (multifd.clone(), token.clone());
        let thread = std::thread::spawn(move || {
            while let Ok(ch) = listener.accept_another() {
                let mut magic = [0u8; 4];
                let mut got = 0;
                while got < 4 {
                    match ch.read(&mut magic[got..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                if got == 4 && u32::from_be_bytes(magic) == savevm_format::multifd::MULTIFD_MAGIC {
                    flag.store(true, Ordering::SeqCst);
                    let stopped = main.as_ref().is_some_and(|m| m.shutdown(std::net::Shutdown::Read).is_ok());
                    if !stopped {
                        stop.cancel();
                    }
                    return;
                }
            }
        });
        ExtraConnections { token, multifd, thread: Some(thread) }
    }
}

impl Drop for ExtraConnections {
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A destination with no vCPUs to start: the guest stays paused (files only).
struct NoGuest;

impl VcpuControl for NoGuest {}

/// Receive a migration from `uri` into the `ram` files. `on_listening` is called
/// with the bound URI (e.g. the port picked for `tcp:HOST:0`) before waiting.
pub fn recv(
    ram: &[(String, PathBuf)],
    uri: &MigrationUri,
    cancel: &CancelToken,
    on_listening: impl FnOnce(&MigrationUri),
) -> Result<Received> {
    recv_with(ram, uri, cancel, on_listening, false)
}

/// [`recv`], with a progress line on stderr while receiving when `progress`.
pub fn recv_with(
    ram: &[(String, PathBuf)],
    uri: &MigrationUri,
    cancel: &CancelToken,
    on_listening: impl FnOnce(&MigrationUri),
    progress: bool,
) -> Result<Received> {
    recv_postcopy(ram, uri, cancel, on_listening, progress, None)
}

/// [`recv_with`], with capability `postcopy-ram` on when `postcopy` is given
/// (`qmig recv --postcopy`): the RAM files' mappings are registered with
/// userfaultfd at POSTCOPY_LISTEN (they must be on tmpfs, as for QEMU), faults
/// become page requests, and `touch` reads pages at random while postcopy runs.
pub fn recv_postcopy(
    ram: &[(String, PathBuf)],
    uri: &MigrationUri,
    cancel: &CancelToken,
    on_listening: impl FnOnce(&MigrationUri),
    progress: bool,
    postcopy: Option<PostcopyOptions>,
) -> Result<Received> {
    // The load's own token (cancelled by `cancel` too): a multifd channel stops it.
    let load_cancel = CancelToken::new().map_err(Error::Io)?;
    cancel.link_to(&load_cancel);
    let listener = Listener::bind(uri, &load_cancel).map_err(Error::transport)?;
    on_listening(listener.local_uri());
    let (ch, extra) = if matches!(uri, MigrationUri::Tcp { .. } | MigrationUri::Unix(_)) {
        let ch = listener.accept_another().map_err(Error::transport)?;
        let main = ch.return_path().ok();
        (ch, Some(ExtraConnections::watch(listener, main, load_cancel.clone())))
    } else {
        (listener.accept().map_err(Error::transport)?, None)
    };
    let start = Instant::now();
    let rate = RateLimit::new(0);
    // The reverse direction, taken now (a duplicate of the socket) and handed out if
    // the source opens its return path; exec:, file: and pipes have none.
    let open_return_path = channel_return_path(&ch);
    let mut reader = MigrationReader::new(ch, rate.clone());
    let counted = rate.clone();
    let progress = progress.then(|| crate::watch::Progress::incoming(move || counted.total_bytes()));
    let mut dest = ImageSink::destination(ram.to_vec());
    let mut incoming = Incoming::new(false);
    incoming.postcopy = postcopy;
    let outcome =
        incoming.run_postcopy(&mut reader, &mut dest, &mut VmParts::default(), &mut NoGuest, open_return_path);
    let multifd = extra.as_ref().is_some_and(|x| x.multifd.load(Ordering::SeqCst));
    let loaded = outcome
        .map_err(|e| match e {
            _ if multifd => Error::Usage(
                "a multifd channel connected: the source has capability multifd, which this destination does not \
                 implement"
                    .into(),
            ),
            e => Error::incoming(e),
        })
        .and_then(|report| {
            drop(progress);
            dest.flush().map(|()| report)
        })
        // For exec: the command's exit status counts too.
        .and_then(|report| reader.into_channel().finish().map(|()| report).map_err(Error::from));
    let report = match loaded {
        Ok(r) => r,
        Err(e) => {
            let note = dest.abandon();
            return Err(match note {
                Some(note) if !e.is_cancelled() => Error::Incomplete { report: e.report(), note },
                _ => e,
            });
        }
    };
    let total_time = start.elapsed();
    let transferred = rate.total_bytes();
    let secs = total_time.as_secs_f64();
    let info = MigrationInfo {
        status: MigrationStatus::Completed,
        total_time,
        transferred,
        total: dest.total(),
        duplicate: report.duplicate,
        normal: report.normal,
        mbps: if secs > 0.0 { transferred as f64 * 8.0 / secs / 1e6 } else { 0.0 },
        ..Default::default()
    };
    Ok(Received { info, return_path: report.return_path, postcopy: report.postcopy })
}

/// What `recv` reports: `query-migrate`-named statistics and the return path.
#[derive(Debug, Clone)]
pub struct Received {
    /// The statistics.
    pub info: MigrationInfo,
    /// What the return path did (all false/zero when the source asked for none).
    pub return_path: ReturnPathReport,
    /// What postcopy did, when the source switched to it.
    pub postcopy: Option<PostcopyReport>,
}

impl Received {
    /// The destination's statistics (what a destination knows: no source-side
    /// fields such as passes or dirty rates), plus `"return-path"`: `null` when
    /// the source asked for none, else `{"requested", "opened", "pongs", "shut",
    /// "unavailable"?, "error"?}`; after a postcopy migration also
    /// `ram.postcopy-requests` and `"postcopy"` (see [`PostcopyReport::to_json`]:
    /// request counts and the page-request latency in microseconds).
    pub fn to_json(&self) -> serde_json::Value {
        let i = &self.info;
        let mut v = serde_json::json!({
            "status": i.status.as_str(),
            "total-time": u64::try_from(i.total_time.as_millis()).unwrap_or(u64::MAX),
            "ram": {
                "transferred": i.transferred,
                "total": i.total,
                "duplicate": i.duplicate,
                "normal": i.normal,
                "normal-bytes": i.normal.saturating_mul(i.page_size),
                "mbps": (i.mbps * 1000.0).round() / 1000.0,
                "page-size": i.page_size,
            },
            "return-path": if self.return_path.requested { self.return_path.to_json() } else { serde_json::Value::Null },
        });
        if let Some(pc) = &self.postcopy {
            v["ram"]["postcopy-requests"] = pc.requests.into();
            v["postcopy"] = pc.to_json();
        }
        v
    }
}
