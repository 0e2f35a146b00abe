//! `qmig send` (and `save`): the stream of a stopped guest over any migration URI,
//! guest pages sent in place from the mapped RAM files.

use crate::error::{Error, Result};
use crate::ramfile::RamFile;
use crate::stats::MigrationStats;
use savevm_format::ram::is_zero_page;
use savevm_format::{write_guest_epilogue, write_guest_prologue, RamBlock, StoppedGuest, StreamWriter};
use std::path::PathBuf;
use std::time::Instant;
use transports::{connect, CancelToken, MigrationUri, MigrationWriter, RateLimit};

/// Options of a send.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Runstate etc. of the guest.
    pub guest: StoppedGuest,
    /// The rate limit (`max-bandwidth`, bytes/s; 0 = unlimited); clone it to change it while sending.
    pub rate: RateLimit,
}

/// Send the guest whose RAM blocks are `ram` files to `uri`; `cancel` stops it from any thread.
pub fn send(
    ram: &[(String, PathBuf)],
    uri: &MigrationUri,
    opts: &SendOptions,
    cancel: &CancelToken,
) -> Result<MigrationStats> {
    if ram.is_empty() {
        return Err(Error::Usage("at least one --ram NAME=PATH is needed".into()));
    }
    let start = Instant::now();
    let files = ram.iter().map(|(n, p)| RamFile::open(n, p)).collect::<Result<Vec<_>>>()?;
    let blocks: Vec<RamBlock> =
        files.iter().enumerate().map(|(i, f)| RamBlock::new(i, f.name.clone(), f.bytes().len() as u64)).collect();
    let ch = connect(uri, cancel)?;
    let mut w = StreamWriter::new(MigrationWriter::new(ch, opts.rate.clone()));
    let io = |e: savevm_format::EncodeError| match e {
        savevm_format::EncodeError::Io(e) => Error::Io(e),
        e => Error::Encode(e),
    };
    write_guest_prologue(&mut w, &blocks, &opts.guest).map_err(io)?;
    let setup_time = start.elapsed();
    let tps = w.page_size();
    for (i, f) in files.iter().enumerate() {
        for (p, page) in f.bytes().chunks_exact(tps).enumerate() {
            let off = (p * tps) as u64;
            if is_zero_page(page) {
                w.ram_zero(i, off).map_err(io)?;
            } else {
                w.ram_page_header(i, off).map_err(io)?;
                w.get_mut().write_borrowed(page).map_err(Error::Io)?;
            }
        }
    }
    write_guest_epilogue(&mut w, &opts.guest).map_err(io)?;
    let ram = w.ram_stats();
    let mw = w.finish().map_err(Error::Io)?;
    let transferred = mw.rate_limit().total_bytes();
    mw.close()?;
    Ok(MigrationStats {
        status: "completed".into(),
        total_time: start.elapsed(),
        setup_time,
        transferred,
        total: blocks.iter().map(|b| b.length).sum(),
        duplicate: ram.duplicate,
        normal: ram.normal,
        page_size: tps as u64,
    })
}
