//! `qmig recv`: listen (or read the file / run the command), load the stream into
//! mapped RAM files, and succeed only when it ended with EOF and every check passed.

use crate::error::{Error, Result};
use crate::ramfile::RamImage;
use crate::stats::MigrationStats;
use savevm_format::{Decoder, Event, PageSink, RamBlock};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;
use transports::{CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};

/// Destination RAM: one mapped file per block name.
struct Dest {
    wanted: HashMap<String, PathBuf>,
    images: Vec<Option<RamImage>>,
}

impl PageSink for Dest {
    fn page_mut(&mut self, block: &RamBlock, offset: u64) -> Option<&mut [u8]> {
        let img = self.images.get_mut(block.index)?.as_mut()?;
        let o = usize::try_from(offset).ok()?;
        img.bytes_mut().get_mut(o..o + 4096)
    }

    fn discard(&mut self, block: &RamBlock, start: u64, len: u64) {
        if let Some(Some(img)) = self.images.get_mut(block.index) {
            if let Some(r) = img.bytes_mut().get_mut(start as usize..(start + len) as usize) {
                r.fill(0);
            }
        }
    }
}

/// Receive a migration from `uri` into the `ram` files. `on_listening` is called
/// with the bound URI (e.g. the port picked for `tcp:HOST:0`) before waiting.
pub fn recv(
    ram: &[(String, PathBuf)],
    uri: &MigrationUri,
    cancel: &CancelToken,
    on_listening: impl FnOnce(&MigrationUri),
) -> Result<MigrationStats> {
    let listener = Listener::bind(uri, cancel)?;
    on_listening(listener.local_uri());
    let ch = listener.accept()?;
    let start = Instant::now();
    let rate = RateLimit::new(0);
    let mut d = Decoder::new(MigrationReader::new(ch, rate.clone()));
    let mut dest = Dest { wanted: ram.iter().cloned().collect(), images: vec![] };
    let (mut setup_time, mut normal, mut duplicate, mut total, mut eof) = (None, 0u64, 0u64, 0u64, false);
    loop {
        let ev = match d.next_with(&mut dest) {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            Err(e) => {
                // A cancel shows up as an I/O error inside the decoder: report it as such.
                if let savevm_format::ErrorKind::Io(io) = &e.kind {
                    if transports::is_cancelled(io) {
                        return Err(Error::Cancelled);
                    }
                }
                return Err(e.into());
            }
        };
        match ev {
            Event::RamBlocks(blocks) => {
                let mut images = Vec::new();
                for b in blocks {
                    let path = dest.wanted.get(&b.name).ok_or_else(|| {
                        Error::Usage(format!(
                            "the stream has RAM block '{}' but no --ram {}=PATH was given",
                            b.name, b.name
                        ))
                    })?;
                    images.push(Some(RamImage::open_or_create(&b.name, path, b.length)?));
                }
                total = blocks.iter().map(|b| b.length).sum();
                dest.images = images;
                setup_time = Some(start.elapsed());
            }
            Event::Page { .. } | Event::CompressedPage { .. } | Event::XbzrlePage { .. } => normal += 1,
            Event::ZeroPage { .. } => duplicate += 1,
            Event::Eof => eof = true,
            _ => {}
        }
    }
    if !eof {
        return Err(Error::Usage("the stream ended without its EOF record".into()));
    }
    for img in dest.images.iter().flatten() {
        img.flush()?;
    }
    let page_size = d.page_size();
    let reader = d.into_inner();
    reader.into_channel().finish()?;
    Ok(MigrationStats {
        status: "completed".into(),
        total_time: start.elapsed(),
        setup_time: setup_time.unwrap_or_default(),
        transferred: rate.total_bytes(),
        total,
        duplicate,
        normal,
        page_size,
    })
}
