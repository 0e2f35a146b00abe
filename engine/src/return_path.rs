//! The source's side of the return path, as a standalone component: a thread
//! reading the destination's messages (QEMU's `source_return_path_thread`) into a
//! crossbeam channel of [`RpEvent`]s, with the end (SHUT, the path closing, a
//! protocol error) kept for whoever waits for it. The pre-copy driver
//! ([`Outgoing`](crate::source::Outgoing), capability `return-path`) checks it on
//! every loop turn and, as QEMU 7.2 does, reports `completed` only after SHUT(0),
//! failing (and resuming the guest) on SHUT(error), a closed path or an error.
//!
//! Page requests are checked as QEMU's source checks them: REQ_PAGES names the
//! block of the last REQ_PAGES_ID, the block must exist, start and length must be
//! multiples of its host page size and the range must lie inside it; anything
//! else ends the reader with an error naming the byte offset on the return path.

use crossbeam_channel::{Receiver, Sender};
use savevm_format::{RamBlock, RpMessage, RpReader};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use transports::CancelToken;

/// A message from the destination, checked (SHUT ends the reader instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpEvent {
    /// MIG_RP_MSG_PONG with the PING's value.
    Pong(u32),
    /// MIG_RP_MSG_REQ_PAGES(_ID), resolved to its block and checked.
    PageRequest(PageRequest),
    /// MIG_RP_MSG_RECV_BITMAP and the bitmap that followed (postcopy recovery).
    RecvBitmap {
        /// The block.
        block: String,
        /// Bit i of byte i/8 (LSB first) = page i received.
        bitmap: Vec<u8>,
    },
    /// MIG_RP_MSG_RESUME_ACK (postcopy recovery).
    ResumeAck(u32),
    /// MIG_RP_MSG_SWITCHOVER_ACK (QEMU 8.1 and later).
    SwitchoverAck,
}

/// A page request: whole host pages of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Block name.
    pub block: String,
    /// The block's index in the list given to [`SourceReturnPath::spawn`].
    pub index: usize,
    /// Byte offset in the block.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Byte offset of the message on the return path.
    pub offset: u64,
}

/// How the return path ended other than by SHUT(0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReturnPathError {
    /// The destination said it failed: SHUT with a non-zero status (1: its input failed).
    #[error("the destination failed (return-path SHUT {0})")]
    Shut(u32),
    /// The path ended before any SHUT: the destination died or closed it.
    #[error("the return path closed at byte {offset} before the destination's SHUT")]
    Closed {
        /// Bytes read.
        offset: u64,
    },
    /// A message that does not decode, or the read failed.
    #[error("return path at byte {offset}: {why}")]
    Decode {
        /// Where.
        offset: u64,
        /// The decoder's message.
        why: String,
    },
    /// A page request the source cannot serve (QEMU fails the migration too).
    #[error("return path at byte {offset}: page request for {start:#x}+{len:#x} in block '{block}': {why}")]
    PageRequest {
        /// Byte offset of the message.
        offset: u64,
        /// Block named (or last named).
        block: String,
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// [`SourceReturnPath::stop`] ended it.
    #[error("return path reader stopped")]
    Stopped,
    /// The destination sent no SHUT within the time the source waits after EOF.
    #[error("no SHUT from the destination within {waited:?} after the end of the stream")]
    NoShut {
        /// How long the source waited.
        waited: Duration,
    },
}

#[derive(Default)]
struct Shared {
    end: Mutex<Option<Result<(), ReturnPathError>>>,
    ended: Condvar,
    last_pong: Mutex<Option<u32>>,
    /// When the first PONG arrived (for the round trip).
    first_pong_at: Mutex<Option<std::time::Instant>>,
}

/// The source's return-path reader thread (see the module documentation).
pub struct SourceReturnPath {
    events: Receiver<RpEvent>,
    shared: Arc<Shared>,
    stopping: Arc<AtomicBool>,
    cancel: CancelToken,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SourceReturnPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceReturnPath").field("end", &self.end()).finish()
    }
}

/// Checks a page request against the block list (QEMU 7.2's `migrate_handle_rp_req_pages`
/// and `ram_save_queue_pages`).
fn check_request(
    blocks: &[RamBlock],
    page_size: u64,
    index: usize,
    start: u64,
    len: u64,
    offset: u64,
) -> Result<PageRequest, ReturnPathError> {
    let b = &blocks[index];
    let bad = |why| ReturnPathError::PageRequest { offset, block: b.name.clone(), start, len, why };
    let ps = b.page_size.unwrap_or(page_size).max(1);
    if len == 0 {
        return Err(bad("empty request"));
    }
    if !start.is_multiple_of(ps) || !len.is_multiple_of(ps) {
        return Err(bad("Misaligned page request"));
    }
    if start.checked_add(len).is_none_or(|end| end > b.length) {
        return Err(bad("Request for an out of range page"));
    }
    Ok(PageRequest { block: b.name.clone(), index, start, len, offset })
}

fn read_loop<R: Read>(
    reader: R,
    blocks: &[RamBlock],
    page_size: u64,
    tx: &Sender<RpEvent>,
    shared: &Shared,
) -> Result<(), ReturnPathError> {
    let mut r = RpReader::new(reader);
    let mut last: Option<usize> = None;
    let find = |name: &str| blocks.iter().position(|b| b.name == name);
    loop {
        let offset = r.offset();
        let m = match r.next() {
            Ok(Some(m)) => m,
            Ok(None) => return Err(ReturnPathError::Closed { offset: r.offset() }),
            Err(e) => return Err(ReturnPathError::Decode { offset: e.offset, why: crate::error::report(&e.kind) }),
        };
        let ev = match m {
            RpMessage::Shut(0) => return Ok(()),
            RpMessage::Shut(s) => return Err(ReturnPathError::Shut(s)),
            RpMessage::Pong(v) => {
                if let Ok(mut p) = shared.last_pong.lock() {
                    *p = Some(v);
                }
                if let Ok(mut at) = shared.first_pong_at.lock() {
                    at.get_or_insert_with(std::time::Instant::now);
                }
                RpEvent::Pong(v)
            }
            RpMessage::ReqPagesId { start, len, block } => {
                let Some(i) = find(&block) else {
                    let why = "no such RAM block";
                    return Err(ReturnPathError::PageRequest { offset, block, start, len: len.into(), why });
                };
                last = Some(i);
                RpEvent::PageRequest(check_request(blocks, page_size, i, start, len.into(), offset)?)
            }
            RpMessage::ReqPages { start, len } => {
                let Some(i) = last else {
                    let why = "REQ_PAGES before any REQ_PAGES_ID named a block";
                    return Err(ReturnPathError::PageRequest {
                        offset,
                        block: String::new(),
                        start,
                        len: len.into(),
                        why,
                    });
                };
                RpEvent::PageRequest(check_request(blocks, page_size, i, start, len.into(), offset)?)
            }
            RpMessage::RecvBitmap(block) => {
                let Some(i) = find(&block) else {
                    let why = "no such RAM block";
                    return Err(ReturnPathError::PageRequest { offset, block, start: 0, len: 0, why });
                };
                let b = &blocks[i];
                // ceil(pages / 8) rounded up to a multiple of 8 (QEMU's size).
                let pages = b.length.div_ceil(page_size.max(1));
                let max = pages.div_ceil(8).div_ceil(8) * 8;
                let bitmap = r
                    .read_recv_bitmap(max)
                    .map_err(|e| ReturnPathError::Decode { offset: e.offset, why: crate::error::report(&e.kind) })?;
                RpEvent::RecvBitmap { block, bitmap }
            }
            RpMessage::ResumeAck(v) => RpEvent::ResumeAck(v),
            RpMessage::SwitchoverAck => RpEvent::SwitchoverAck,
        };
        // Nobody listening is fine: the end still counts.
        let _ = tx.send(ev);
    }
}

impl SourceReturnPath {
    /// Start the reader thread on `reader` (e.g. a [`transports::ReturnPath`]).
    /// `blocks` are the RAM blocks page requests may name (`page_size`: their host
    /// page size unless a block says otherwise); `cancel` is the token that wakes a
    /// blocked read (the return path's own), cancelled by [`stop`](Self::stop).
    pub fn spawn<R: Read + Send + 'static>(
        reader: R,
        blocks: Vec<RamBlock>,
        page_size: u64,
        cancel: CancelToken,
    ) -> std::io::Result<SourceReturnPath> {
        let (tx, events) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let (sh, st) = (shared.clone(), stopping.clone());
        let thread = std::thread::Builder::new().name("return path".into()).spawn(move || {
            let mut end = read_loop(reader, &blocks, page_size, &tx, &sh);
            if end.is_err() && st.load(Ordering::SeqCst) {
                end = Err(ReturnPathError::Stopped);
            }
            if let Ok(mut e) = sh.end.lock() {
                *e = Some(end);
            }
            sh.ended.notify_all();
            // `tx` drops here: the event channel disconnects after the last event.
        })?;
        Ok(SourceReturnPath { events, shared, stopping, cancel, thread: Some(thread) })
    }

    /// The messages, in order; disconnected once the reader ended.
    pub fn events(&self) -> &Receiver<RpEvent> {
        &self.events
    }

    /// When the first PONG arrived (the round trip is that minus when its PING left).
    pub fn first_pong_at(&self) -> Option<std::time::Instant> {
        self.shared.first_pong_at.lock().ok().and_then(|p| *p)
    }

    /// The value of the last PONG received.
    pub fn last_pong(&self) -> Option<u32> {
        self.shared.last_pong.lock().ok().and_then(|p| *p)
    }

    /// How the path ended, if it has: `Ok(())` for SHUT(0).
    pub fn end(&self) -> Option<Result<(), ReturnPathError>> {
        self.shared.end.lock().ok().and_then(|e| e.clone())
    }

    /// Wait up to `timeout` for the end (QEMU's source waits for SHUT before `completed`).
    pub fn wait_end(&self, timeout: Duration) -> Option<Result<(), ReturnPathError>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.end.lock().ok()?;
        loop {
            if let Some(e) = g.as_ref() {
                return Some(e.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            g = self.shared.ended.wait_timeout(g, left).ok()?.0;
        }
    }

    /// Stop the reader (cancelling its token, which wakes a blocked read) and join
    /// it; returns how it ended ([`ReturnPathError::Stopped`] if it had not).
    pub fn stop(mut self) -> Result<(), ReturnPathError> {
        self.halt();
        self.end().unwrap_or(Err(ReturnPathError::Stopped))
    }

    fn halt(&mut self) {
        if let Some(t) = self.thread.take() {
            if !t.is_finished() {
                self.stopping.store(true, Ordering::SeqCst);
                self.cancel.cancel();
            }
            let _ = t.join();
        }
    }
}

impl Drop for SourceReturnPath {
    fn drop(&mut self) {
        self.halt();
    }
}
