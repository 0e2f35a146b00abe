//! `qmig recv`: listen (or read the file / run the command), load the stream into
//! mapped RAM files, and succeed only when it ended with EOF and every check passed.

use crate::error::{Error, Result};
use crate::ramfile::{ImageSink, RamImage};
use crate::stats::MigrationStats;
use savevm_format::{Decoder, Event};
use std::path::PathBuf;
use std::time::Instant;
use transports::{CancelToken, Listener, MigrationReader, MigrationUri, RateLimit};

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
    let mut dest = ImageSink::default();
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
                let images = blocks
                    .iter()
                    .map(|b| {
                        let (_, path) = ram.iter().find(|(n, _)| n == &b.name).ok_or_else(|| {
                            Error::Usage(format!(
                                "the stream has RAM block '{}' but no --ram {}=PATH was given",
                                b.name, b.name
                            ))
                        })?;
                        RamImage::open_or_create(&b.name, path, b.length).map(Some)
                    })
                    .collect::<Result<Vec<_>>>()?;
                total = blocks.iter().map(|b| b.length).sum();
                dest.set(images);
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
    dest.flush()?;
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
