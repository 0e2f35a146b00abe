//! The migration stream over a channel (QEMU's QEMUFile): a buffered, vectored,
//! rate-limited writer that sends guest pages in place (volatile views of memory
//! the guest may be writing, never copied and never turned into `&[u8]`), and a
//! buffered reader.

use crate::channel::Channel;
use crate::error::TransportError;
use crate::ratelimit::{RateLimit, Window};
use std::io::{self, BufRead, Read, Write};
use std::marker::PhantomData;
use vm_memory::VolatileSlice;

/// Bytes of small writes gathered before a send.
const BUF_SIZE: usize = 64 * 1024;
/// Most iovecs per `writev` (Linux IOV_MAX is 1024).
const MAX_IOV: usize = 256;
/// Bytes queued (buffer + borrowed pages) that trigger a send.
const MAX_PENDING: usize = 1 << 20;

enum Seg {
    /// `buf[start..end]`.
    Buf(usize, usize),
    /// Borrowed memory (a guest page) valid for the writer's `'g`: its address and
    /// length, kept raw because the guest may write it until the kernel copies it.
    Ext(*const u8, usize),
}

impl Seg {
    fn len(&self) -> usize {
        match self {
            Seg::Buf(s, e) => e - s,
            Seg::Ext(_, n) => *n,
        }
    }
}

/// Buffered migration-stream writer. Small writes are copied into a buffer;
/// [`write_volatile`](Self::write_volatile) queues guest memory that lives for
/// `'g` and is sent in place with `writev` (and
/// [`write_borrowed`](Self::write_borrowed) the same for plain byte slices).
pub struct MigrationWriter<'g> {
    ch: Channel,
    buf: Vec<u8>,
    segs: Vec<Seg>,
    pending: usize,
    rate: RateLimit,
    window: Window,
    paced: bool,
    _borrow: PhantomData<&'g [u8]>,
}

// SAFETY: the raw pointers in `segs` point into memory borrowed for `'g` (slices or
// volatile views, both shareable across threads) and are only handed to the kernel.
unsafe impl Send for MigrationWriter<'_> {}

impl<'g> MigrationWriter<'g> {
    /// A writer over `ch`, limited (and counted) by `rate`.
    pub fn new(ch: Channel, rate: RateLimit) -> Self {
        MigrationWriter {
            ch,
            buf: Vec::with_capacity(BUF_SIZE),
            segs: Vec::with_capacity(MAX_IOV),
            pending: 0,
            rate,
            window: Window::new(),
            paced: false,
            _borrow: PhantomData,
        }
    }

    /// The rate limit and byte counters (clone it to change the limit from another thread).
    pub fn rate_limit(&self) -> &RateLimit {
        &self.rate
    }

    /// The channel.
    pub fn channel(&self) -> &Channel {
        &self.ch
    }

    /// Let the caller pace the stream (QEMU 7.2's postcopy: a requested page goes at
    /// once whatever the rate limit): sends never wait for the window, the bytes
    /// still count, and the caller asks [`rate_limited_until`](Self::rate_limited_until).
    pub fn set_caller_paced(&mut self, on: bool) {
        self.paced = on;
    }

    /// When this window's budget is spent, counting what is queued as sent: the end
    /// of the window (QEMU's `qemu_file_rate_limit`); `None` when more may be sent now.
    pub fn rate_limited_until(&mut self) -> Option<std::time::Instant> {
        self.window.blocked_with(&self.rate, self.pending as u64)
    }

    /// Bytes handed to the kernel that the peer has not acknowledged yet (tcp;
    /// see [`Channel::queued_bytes`]).
    pub fn queued_bytes(&self) -> u64 {
        self.ch.queued_bytes()
    }

    /// Send everything queued now (borrowed slices must not outlive their memory).
    pub fn flush_now(&mut self) -> io::Result<()> {
        self.send_pending()
    }

    /// Queue `data` to be sent after everything written so far, without copying it.
    pub fn write_borrowed(&mut self, data: &'g [u8]) -> io::Result<()> {
        self.queue(data.as_ptr(), data.len())
    }

    /// Queue guest memory to be sent after everything written so far, in place: the
    /// kernel copies it when the queue is sent (at the latest at the next
    /// [`flush_now`](Self::flush_now)), so writes the guest makes before then go out.
    pub fn write_volatile(&mut self, data: VolatileSlice<'g>) -> io::Result<()> {
        let ptr = data.ptr_guard().as_ptr();
        self.queue(ptr, data.len())
    }

    fn queue(&mut self, ptr: *const u8, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.segs.push(Seg::Ext(ptr, len));
        self.pending += len;
        if self.segs.len() >= MAX_IOV || self.pending >= MAX_PENDING {
            self.send_pending()?;
        }
        Ok(())
    }

    fn append(&mut self, data: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(data);
        match self.segs.last_mut() {
            Some(Seg::Buf(_, end)) if *end == start => *end = self.buf.len(),
            _ => self.segs.push(Seg::Buf(start, self.buf.len())),
        }
        self.pending += data.len();
    }

    /// Send everything queued, honouring the rate limit; the buffer is then empty.
    fn send_pending(&mut self) -> io::Result<()> {
        let mut done = 0usize;
        while done < self.pending {
            // Rate limit: never send more than what is left of this window's budget.
            let allowance = loop {
                if self.paced {
                    break usize::MAX;
                }
                if let Some(until) = self.window.blocked_until(&self.rate) {
                    self.ch.cancel_token().sleep_until(until)?;
                    continue;
                }
                break match self.rate.budget() {
                    Some(b) => b.saturating_sub(self.rate.window_bytes()).max(1) as usize,
                    None => usize::MAX,
                };
            };
            let mut iov: Vec<libc::iovec> = Vec::with_capacity(self.segs.len().min(MAX_IOV));
            let mut skip = done;
            let mut room = allowance.min(self.pending - done);
            for seg in &self.segs {
                if room == 0 || iov.len() == MAX_IOV {
                    break;
                }
                let len = seg.len();
                if skip >= len {
                    skip -= len;
                    continue;
                }
                let base = match seg {
                    Seg::Buf(s, _) => self.buf[*s..].as_ptr(),
                    Seg::Ext(p, _) => *p,
                };
                let part = (skip + room).min(len) - skip;
                // `skip < len`, so the offset stays inside the segment.
                iov.push(libc::iovec { iov_base: base.wrapping_add(skip) as *mut libc::c_void, iov_len: part });
                skip = 0;
                room -= part;
            }
            // SAFETY: every iovec lies inside `self.buf` (not touched until the call
            // returns) or inside memory borrowed for `'g` by `write_borrowed` /
            // `write_volatile`, which outlives this writer.
            let n = unsafe { self.ch.write_iovecs(&iov)? };
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "migration channel accepted no bytes"));
            }
            self.rate.account(n as u64);
            done += n;
        }
        self.buf.clear();
        self.segs.clear();
        self.pending = 0;
        Ok(())
    }

    /// Flush, close the channel's write side, and check the channel ended well
    /// (for `exec:`, the command's exit status).
    pub fn finish(mut self) -> Result<Channel, (Channel, io::Error)> {
        if let Err(e) = self.send_pending() {
            return Err((self.ch, e));
        }
        self.ch.close_write();
        Ok(self.ch)
    }

    /// Flush and close, then wait for an `exec:` command and check its status.
    pub fn close(self) -> Result<(), TransportError> {
        match self.finish() {
            Ok(ch) => ch.finish(),
            Err((ch, e)) => {
                let peer = ch.peer().to_owned();
                // The command's own failure explains a broken pipe better than EPIPE does.
                ch.finish()?;
                Err(TransportError::Channel { peer, source: e })
            }
        }
    }
}

impl Write for MigrationWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > BUF_SIZE {
            self.send_pending()?;
        }
        if data.len() >= BUF_SIZE {
            // Large writes bypass the buffer (still rate limited).
            let mut done = 0;
            while done < data.len() {
                let n = data.len().min(done + BUF_SIZE) - done;
                self.append(&data[done..done + n]);
                self.send_pending()?;
                done += n;
            }
            return Ok(data.len());
        }
        self.append(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_pending()
    }
}

/// Buffered migration-stream reader.
pub struct MigrationReader {
    ch: Channel,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    rate: RateLimit,
}

impl MigrationReader {
    /// A reader over `ch` with a 1 MiB buffer; bytes read are counted in `rate`.
    pub fn new(ch: Channel, rate: RateLimit) -> Self {
        MigrationReader { ch, buf: vec![0u8; 1 << 20].into_boxed_slice(), pos: 0, filled: 0, rate }
    }

    /// A reader over `ch` with a `capacity`-byte buffer (at least 4 KiB): a read of
    /// at least that many bytes, when nothing is buffered, goes straight from the
    /// channel into the caller's buffer (one copy fewer for large payloads).
    pub fn with_capacity(ch: Channel, rate: RateLimit, capacity: usize) -> Self {
        MigrationReader { ch, buf: vec![0u8; capacity.max(4096)].into_boxed_slice(), pos: 0, filled: 0, rate }
    }

    /// The byte counters.
    pub fn rate_limit(&self) -> &RateLimit {
        &self.rate
    }

    /// The channel back (e.g. to [`Channel::finish`] it).
    pub fn into_channel(self) -> Channel {
        self.ch
    }

    /// The channel.
    pub fn channel(&self) -> &Channel {
        &self.ch
    }
}

impl Read for MigrationReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.filled && out.len() >= self.buf.len() {
            let n = self.ch.read(out)?;
            self.rate.account(n as u64);
            return Ok(n);
        }
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for MigrationReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.filled {
            let n = self.ch.read(&mut self.buf)?;
            self.rate.account(n as u64);
            self.pos = 0;
            self.filled = n;
        }
        Ok(&self.buf[self.pos..self.filled])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.filled);
    }
}
