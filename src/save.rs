//! `qmig save`: the stream of a stopped `-machine none` guest, written to a file.

use crate::error::{Error, Result};
use crate::ramfile::RamFile;
use savevm_format::{write_stopped_guest, RamStats, StoppedGuest};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// Write the stream of a stopped guest whose RAM blocks are the given files to `out`.
pub fn save(ram: &[(String, PathBuf)], out: &Path, opts: &StoppedGuest) -> Result<RamStats> {
    if ram.is_empty() {
        return Err(Error::Usage("at least one --ram NAME=PATH is needed".into()));
    }
    let files = ram.iter().map(|(n, p)| RamFile::open(n, p)).collect::<Result<Vec<_>>>()?;
    let blocks: Vec<(&str, &[u8])> = files.iter().map(|f| (f.name.as_str(), f.bytes())).collect();
    let f = File::create(out).map_err(|e| Error::file(out, e))?;
    let w = BufWriter::with_capacity(1 << 20, f);
    let (w, stats) = write_stopped_guest(w, &blocks, opts).map_err(|e| match e {
        savevm_format::EncodeError::Io(io) => Error::file(out, io),
        e => Error::Encode(e),
    })?;
    let f = w.into_inner().map_err(|e| Error::file(out, e.into_error()))?;
    f.sync_all().map_err(|e| Error::file(out, e))?;
    Ok(stats)
}
