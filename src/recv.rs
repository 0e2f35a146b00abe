//! `qmig recv`: listen (or read the file / run the command), load the stream into
//! mapped RAM files through the engine's incoming side, and succeed only when it
//! ended with EOF and every check passed. On a socket, a source's return path is
//! served (PONGs, then SHUT(0) once the files are written, SHUT(1) on failure).
//! With `--multifd N` (tcp: and unix: only) the N multifd channels are accepted
//! after the main one, in any order, and their pages written into the mapped files
//! by one thread per channel ([`engine::multifd`]).

use crate::error::{Error, Result};
use crate::ramfile::ImageSink;
use engine::incoming::{channel_return_path, Incoming, ReturnPathReport};
use engine::info::MigrationInfo;
use engine::postcopy_dest::{PostcopyOptions, PostcopyReport};
use engine::state::MigrationStatus;
use engine::vm::{VcpuControl, VmParts};
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use transports::{CancelToken, Channel, ChannelOptions, Listener, MigrationReader, MigrationUri, RateLimit};

/// After the main connection (and, with `--multifd N`, the N multifd channels), a
/// tcp:/unix: listener stays open: a further connection that starts with the
/// multifd magic (a source with multifd when recv has none, or with more channels
/// than recv's) ends the main stream (its socket's read side is shut down), so the
/// load fails, SHUT(1) goes out on the return path and both ends fail with a clear
/// reason; any other extra connection is closed. Stopped (its token cancelled) and
/// joined on drop.
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
    recv_opts(ram, uri, cancel, on_listening, &RecvOptions { progress, ..Default::default() })
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
    recv_opts(ram, uri, cancel, on_listening, &RecvOptions { progress, postcopy, ..Default::default() })
}

/// QEMU's stream magic, `QEVM`: what a source sends first.
const STREAM_MAGIC: [u8; 4] = *b"QEVM";

/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// Look at what a new connection sends first, without consuming it: Ok when it
/// starts with the stream magic; else why it is not a source (it closed, it sent
/// other bytes: refused as soon as they differ, or it sent too little within the
/// io timeout).
fn screen(ch: &Channel, io_timeout: Option<Duration>) -> std::result::Result<(), String> {
    // Without an io timeout, wait as long as it takes (a day is for ever here).
    let limit = io_timeout.unwrap_or(Duration::from_secs(86400));
    let deadline = Instant::now() + limit;
    let mut head = [0u8; 4];
    loop {
        let n = match ch.peek(&mut head, deadline) {
            Ok(n) => n,
            Err(e) if transports::is_no_progress(&e) => {
                return Err(format!("it sent nothing within {} s (io-timeout)", limit.as_secs_f64()))
            }
            Err(e) => return Err(format!("reading it failed: {e}")),
        };
        if n == 0 {
            return Err("it closed without sending anything".into());
        }
        if head[0] == TLS_HANDSHAKE {
            // A TLS client where none is configured: the channel's first read refuses it with that reason.
            return Ok(());
        }
        if head[..n] != STREAM_MAGIC[..n] {
            let hex: String = head[..n].iter().map(|b| format!("{b:02x}")).collect();
            return Err(format!("it is not a migration stream (it starts with {hex}, QEMU's magic is 5145564d)"));
        }
        if n == head.len() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("it sent only {n} bytes of the magic within {} s (io-timeout)", limit.as_secs_f64()));
        }
        // Part of the magic came: look again shortly for the rest.
        ch.sleep_until((Instant::now() + Duration::from_millis(5)).min(deadline)).map_err(|e| e.to_string())?;
    }
}

/// Accept on a tcp:/unix: listener until a connection starts with the stream
/// magic; every other one is closed with a line on stderr, and the wait goes on.
fn accept_source(listener: &Listener) -> Result<Channel> {
    loop {
        let ch = listener.accept_another().map_err(Error::transport)?;
        if ch.is_tls() {
            // The handshake authenticated it; the stream inside is checked as it is read.
            return Ok(ch);
        }
        match screen(&ch, ch.io_timeout()) {
            Ok(()) => return Ok(ch),
            Err(_) if ch.cancel_token().is_cancelled() => {
                return Err(Error::transport(transports::TransportError::Accept {
                    uri: listener.local_uri().to_string(),
                    source: std::io::Error::new(std::io::ErrorKind::ConnectionAborted, transports::Cancelled),
                }));
            }
            Err(why) => {
                let line = format!("dropped the connection from {}: {why}; waiting for the source", ch.peer());
                eprintln!("qmig: recv: {}", engine::error::escape_controls(&line));
            }
        }
    }
}

/// Options of a receive.
#[derive(Debug, Clone, Default)]
pub struct RecvOptions {
    /// Show a progress line on stderr.
    pub progress: bool,
    /// Capability `postcopy-ram` (see [`recv_postcopy`]).
    pub postcopy: Option<PostcopyOptions>,
    /// Capability `multifd` with this many channels (`multifd-channels`): tcp: and unix: only.
    pub multifd: Option<u8>,
    /// `multifd-compression` the channels must carry.
    pub multifd_compression: savevm_format::multifd::Compression,
    /// QEMU's `-uuid` of the guest: every multifd channel's initial packet must carry it
    /// (as QEMU 7.2's destination checks its own); all zeros by default.
    pub uuid: [u8; 16],
    /// The channels' options (`--io-timeout`).
    pub channel: ChannelOptions,
    /// TLS (QEMU's `tls-creds`, `tls-authz`): the credentials are loaded before
    /// listening, and every connection runs the server handshake before a byte of
    /// the stream is read (so nothing reaches the RAM files from a peer that failed it).
    pub tls: Option<transports::TlsParams>,
}

/// [`recv`] over TLS when `tls` is given (see [`RecvOptions::tls`]).
pub fn recv_with_tls(
    ram: &[(String, PathBuf)],
    uri: &MigrationUri,
    cancel: &CancelToken,
    on_listening: impl FnOnce(&MigrationUri),
    progress: bool,
    tls: Option<&transports::TlsParams>,
) -> Result<Received> {
    recv_opts(ram, uri, cancel, on_listening, &RecvOptions { progress, tls: tls.cloned(), ..Default::default() })
}

/// [`recv`] with [`RecvOptions`] (`--io-timeout`, `--multifd`, `--postcopy`, `--tls-creds`). On tcp: and unix:,
/// recv takes the first connection that starts with QEMU's stream magic: one
/// that sends other bytes is refused at once, one that sends nothing within the
/// io timeout is dropped, each with a line on stderr, and recv waits for another.
pub fn recv_opts(
    ram: &[(String, PathBuf)],
    uri: &MigrationUri,
    cancel: &CancelToken,
    on_listening: impl FnOnce(&MigrationUri),
    opts: &RecvOptions,
) -> Result<Received> {
    let (progress, postcopy, channel) = (opts.progress, opts.postcopy.clone(), &opts.channel);
    if opts.multifd.is_some() {
        engine::multifd::check_uri(uri).map_err(Error::Usage)?;
        if postcopy.is_some() {
            return Err(Error::Usage("--multifd and --postcopy refuse each other: use one of them".into()));
        }
    }
    // The load's own token (cancelled by `cancel` too): a multifd channel stops it.
    let load_cancel = CancelToken::new().map_err(Error::Io)?;
    cancel.link_to(&load_cancel);
    let creds = opts.tls.as_ref().map(|t| t.server()).transpose().map_err(|e| Error::Transport(e.into()))?;
    // Existing RAM files are mapped and populated before recv listens, as QEMU's
    // prealloc=on populates before its -incoming listens.
    let mut dest = ImageSink::destination(ram.to_vec());
    dest.prepare_existing();
    let mut listener = Listener::bind(uri, &load_cancel).map_err(Error::transport)?.with_options(*channel);
    if let Some(creds) = creds {
        listener = listener.with_tls(creds).map_err(Error::transport)?;
    }
    on_listening(listener.local_uri());
    let rate = RateLimit::new(0);
    let mut channels = None;
    let (ch, extra) = if matches!(uri, MigrationUri::Tcp { .. } | MigrationUri::Unix(_)) {
        let ch = accept_source(&listener)?;
        let main = ch.return_path().ok();
        if let Some(n) = opts.multifd {
            // QEMU 7.2: the main channel first, then the multifd ones in any order.
            let expect = savevm_format::multifd::ChannelExpect {
                uuid: opts.uuid,
                channels: n,
                compression: opts.multifd_compression,
            };
            let accepted = engine::multifd::IncomingChannels::accept(expect, &rate, || listener.accept_another())
                .map_err(|e| Error::incoming(engine::incoming::IncomingError::Multifd(e)))?;
            channels = Some(accepted);
        }
        (ch, Some(ExtraConnections::watch(listener, main, load_cancel.clone())))
    } else {
        (listener.accept().map_err(Error::transport)?, None)
    };
    let start = Instant::now();
    let tls = ch.is_tls().then(|| TlsSummary { protocol: ch.tls_protocol(), peer_dn: ch.tls_peer_dn() });
    // The reverse direction, taken now (a duplicate of the socket) and handed out if
    // the source opens its return path; exec:, file: and pipes have none.
    let open_return_path = channel_return_path(&ch);
    let mut reader = MigrationReader::new(ch, rate.clone());
    let counted = rate.clone();
    let progress = progress.then(|| crate::watch::Progress::incoming(move || counted.total_bytes()));
    let mut incoming = Incoming::new(false);
    incoming.postcopy = postcopy;
    // A file or command output that starts with zstd's magic is a compressed save
    // (`save --compress zstd`): decoded on the way in. Sockets carry the plain stream.
    let zstd = extra.is_none() && reader.fill_buf().is_ok_and(|b| b.starts_with(&crate::compress::ZSTD_MAGIC));
    let mut decoded = None;
    let main_stop = reader.channel().return_path().ok();
    let outcome = if zstd {
        let dec = zstd::stream::read::Decoder::with_buffer(&mut reader).map_err(Error::Io)?;
        let mut counted = Counting { inner: dec, n: 0 };
        let r = incoming.run_postcopy(&mut counted, &mut dest, &mut VmParts::default(), &mut NoGuest, open_return_path);
        // The frame's checksum is at its end, after the vmdesc: read to there, so a
        // corrupted file fails here instead of leaving wrong RAM behind.
        let r = r.map_err(Error::incoming).and_then(|report| match std::io::copy(&mut counted, &mut std::io::sink()) {
            Ok(0) => Ok(report),
            Ok(n) => Err(Error::Usage(format!("{n} bytes after the stream's end inside the zstd frame"))),
            Err(e) => Err(Error::Usage(format!("the compressed file is damaged: {e}"))),
        });
        decoded = Some(counted.n);
        r
    } else if let Some(channels) = channels {
        dest = dest.shared();
        // A failed channel stops the main stream's reads at once.
        let channels = channels.on_failure(move || {
            if let Some(m) = &main_stop {
                let _ = m.shutdown(std::net::Shutdown::Read);
            }
        });
        incoming
            .run_multifd(&mut reader, channels, &mut dest, &mut VmParts::default(), &mut NoGuest, open_return_path)
            .map_err(Error::incoming)
    } else {
        incoming
            .run_postcopy(&mut reader, &mut dest, &mut VmParts::default(), &mut NoGuest, open_return_path)
            .map_err(Error::incoming)
    };
    let multifd = extra.as_ref().is_some_and(|x| x.multifd.load(Ordering::SeqCst));
    let loaded = outcome
        .map_err(|e| match e {
            _ if multifd && opts.multifd.is_some() => Error::Usage(format!(
                "more multifd channels connected than multifd-channels {} (the source's multifd-channels must \
                 match)",
                opts.multifd.unwrap_or(0)
            )),
            _ if multifd => Error::Usage(
                "a multifd channel connected: the source has capability multifd; run recv with --multifd N (the \
                 source's multifd-channels)"
                    .into(),
            ),
            e => e,
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
    let compressed = decoded.map(|stream_size| crate::compress::CompressedStats {
        level: 0,
        stream_size,
        compressed_size: transferred,
        secs,
    });
    Ok(Received { info, return_path: report.return_path, postcopy: report.postcopy, compressed, tls })
}

/// A reader counting the bytes it passed on.
struct Counting<R> {
    inner: R,
    n: u64,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| std::io::Error::new(e.kind(), format!("zstd frame: {e}")))?;
        self.n += n as u64;
        Ok(n)
    }
}

/// The TLS session a `recv` ran over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSummary {
    /// The TLS version (`TLSv1_3`, ...).
    pub protocol: Option<String>,
    /// The source's certificate DN (GnuTLS's form), when it presented one.
    pub peer_dn: Option<String>,
}

/// What `recv` reports: `query-migrate`-named statistics and the return path.
#[derive(Debug, Clone)]
pub struct Received {
    /// The statistics.
    pub info: MigrationInfo,
    /// What the return path did (all false/zero when the source asked for none).
    pub return_path: ReturnPathReport,
    /// A compressed save (zstd) was read: its sizes and speed.
    pub compressed: Option<crate::compress::CompressedStats>,
    /// The TLS session, when the stream came over TLS.
    pub tls: Option<TlsSummary>,
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
    /// Over TLS also `"tls": {"protocol", "peer-dn"}`.
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
        if let Some(c) = &self.compressed {
            v["zstd"] = c.to_json();
        }
        if let Some(pc) = &self.postcopy {
            v["ram"]["postcopy-requests"] = pc.requests.into();
            v["postcopy"] = pc.to_json();
        }
        if let Some(t) = &self.tls {
            v["tls"] = serde_json::json!({"protocol": t.protocol, "peer-dn": t.peer_dn});
        }
        v
    }
}
