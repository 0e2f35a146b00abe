//! `qmig recv`: listen (or read the file / run the command), load the stream into
//! mapped RAM files through the engine's incoming side, and succeed only when it
//! ended with EOF and every check passed.

use crate::error::{Error, Result};
use crate::ramfile::ImageSink;
use engine::incoming::Incoming;
use engine::info::MigrationInfo;
use engine::state::MigrationStatus;
use engine::vm::{VcpuControl, VmParts};
use std::path::PathBuf;
use std::time::Instant;
use transports::{CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};

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
) -> Result<MigrationInfo> {
    let listener = Listener::bind(uri, cancel).map_err(Error::transport)?;
    on_listening(listener.local_uri());
    let ch = listener.accept().map_err(Error::transport)?;
    let start = Instant::now();
    let rate = RateLimit::new(0);
    let mut reader = MigrationReader::new(ch, rate.clone());
    let mut dest = ImageSink::destination(ram.to_vec());
    let incoming = Incoming::new(false);
    let report =
        incoming.run(&mut reader, &mut dest, &mut VmParts::default(), &mut NoGuest).map_err(Error::incoming)?;
    dest.flush()?;
    // For exec: the command's exit status counts too.
    reader.into_channel().finish()?;
    let total_time = start.elapsed();
    let transferred = rate.total_bytes();
    let secs = total_time.as_secs_f64();
    Ok(MigrationInfo {
        status: MigrationStatus::Completed,
        total_time,
        transferred,
        total: dest.total(),
        duplicate: report.duplicate,
        normal: report.normal,
        mbps: if secs > 0.0 { transferred as f64 * 8.0 / secs / 1e6 } else { 0.0 },
        ..Default::default()
    })
}
