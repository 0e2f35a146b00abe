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
    /// The pipe [`send_spliced`](Self::send_spliced) moves pages through, made on first use.
    pipe: Option<SplicePipe>,
    /// Set once splicing failed in a way that will not change.
    no_splice: bool,
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
            pipe: None,
            no_splice: false,
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

    /// Send everything queued, then `pages` (guest memory borrowed for `'g`) without
    /// copying them into socket buffers: `vmsplice(2)` puts references to the pages
    /// in a pipe and `splice(2)` hands them to the socket, which keeps them until
    /// the peer reads. So the bytes that go out are the pages' contents when the
    /// peer copies them, a little later than a `writev` would read them; a guest
    /// write after the pages were picked dirties them again, so they are sent again
    /// in a later pass, exactly as when the write lands after a `writev` (dirty
    /// tracking is unchanged). Returns `Ok(false)`, sending nothing, where this
    /// cannot work (TLS, `exec:`, a rate limit this writer applies, no pipe): the
    /// caller then queues the pages with [`write_volatile`](Self::write_volatile).
    pub fn send_spliced(&mut self, pages: &[VolatileSlice<'g>]) -> io::Result<bool> {
        if self.no_splice || self.paced || self.rate.budget().is_some() || !self.ch.can_splice_write() {
            return Ok(false);
        }
        if self.pipe.is_none() {
            match SplicePipe::new() {
                Ok(p) => self.pipe = Some(p),
                Err(_) => {
                    self.no_splice = true;
                    return Ok(false);
                }
            }
        }
        self.send_pending()?;
        let Some(pipe) = self.pipe.take() else { return Ok(false) };
        let mut iov: Vec<libc::iovec> = pages
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| libc::iovec { iov_base: p.ptr_guard().as_ptr() as *mut libc::c_void, iov_len: p.len() })
            .collect();
        let mut first = 0;
        let mut any = false;
        while first < iov.len() {
            let count = (iov.len() - first).min(MAX_IOV);
            // SAFETY: the iovecs lie inside memory borrowed for `'g` (the guest pages
            // passed in), which outlives this writer; the kernel takes references to
            // those pages and only reads them; the pipe is ours and empty here.
            let n = unsafe {
                libc::vmsplice(
                    std::os::fd::AsRawFd::as_raw_fd(&pipe.w),
                    iov[first..].as_ptr(),
                    count,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            let mut n = match usize::try_from(n) {
                Ok(n) if n > 0 => n,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    if !any {
                        // Nothing of these pages went out: they go the usual way.
                        self.no_splice = true;
                        return Ok(false);
                    }
                    return Err(e);
                }
            };
            any = true;
            let mut left = n;
            while left > 0 {
                let m = self.ch.splice_from(std::os::fd::AsFd::as_fd(&pipe.r), left)?;
                if m == 0 {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "migration channel accepted no bytes"));
                }
                self.rate.account(m as u64);
                left -= m;
            }
            // Step past what the pipe took (whole iovecs, then part of one).
            while n > 0 {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    v.iov_base = (v.iov_base as *mut u8).wrapping_add(n) as *mut libc::c_void;
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        self.pipe = Some(pipe);
        Ok(true)
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
    /// The pipe [`copy_to_file`](Self::copy_to_file) splices through, made on first use.
    pipe: Option<SplicePipe>,
    /// Set once splicing failed in a way that will not change (no pipe, a file
    /// system without splice writes): later copies read and write.
    no_splice: bool,
    /// Most bytes one refill of the buffer asks for (see [`set_fill_limit`](Self::set_fill_limit)).
    fill_limit: usize,
}

/// Size asked for the splice pipe: two packets of pages (the kernel may grant less).
const SPLICE_PIPE_SIZE: i32 = 1 << 20;

/// A pipe for `splice(2)`: socket -> pipe -> file.
struct SplicePipe {
    r: std::os::fd::OwnedFd,
    w: std::os::fd::OwnedFd,
    /// Bytes it holds at most.
    cap: usize,
}

impl SplicePipe {
    fn new() -> io::Result<SplicePipe> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        // A larger pipe means fewer splice calls; a smaller one (the per-user pipe
        // limit reached) still works.
        let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(SPLICE_PIPE_SIZE));
        let cap = fcntl(&w, FcntlArg::F_GETPIPE_SZ)?;
        let cap = usize::try_from(cap).ok().filter(|&c| c > 0).ok_or_else(|| io::Error::other("pipe of no size"))?;
        Ok(SplicePipe { r, w, cap })
    }
}

impl MigrationReader {
    /// A reader over `ch` with a 1 MiB buffer; bytes read are counted in `rate`.
    pub fn new(ch: Channel, rate: RateLimit) -> Self {
        MigrationReader::with_capacity(ch, rate, 1 << 20)
    }

    /// A reader over `ch` with a `capacity`-byte buffer (at least 4 KiB): a read of
    /// at least that many bytes, when nothing is buffered, goes straight from the
    /// channel into the caller's buffer (one copy fewer for large payloads).
    pub fn with_capacity(ch: Channel, rate: RateLimit, capacity: usize) -> Self {
        let buf = vec![0u8; capacity.max(4096)].into_boxed_slice();
        let fill_limit = buf.len();
        MigrationReader { ch, buf, pos: 0, filled: 0, rate, pipe: None, no_splice: false, fill_limit }
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

    /// Refill the buffer with reads of at most `limit` bytes (at least 1, at most
    /// the buffer): a caller that reads a fixed-size header and then hands the
    /// payload to [`copy_to_file`](Self::copy_to_file) leaves the payload in the
    /// channel, where it can be spliced.
    pub fn set_fill_limit(&mut self, limit: usize) {
        self.fill_limit = limit.clamp(1, self.buf.len());
    }

    /// Write the next `len` bytes of the stream into `file` at `offset`. Bytes
    /// already buffered go with a positioned write; on a channel that
    /// [can splice](Channel::can_splice) the rest moves socket -> pipe -> file with
    /// `splice(2)` (one kernel copy into the file's pages, no pass through user
    /// memory), else it is read through the buffer and written. An end of stream
    /// before `len` bytes is `UnexpectedEof`; cancel and the io timeout act as on reads.
    pub fn copy_to_file(&mut self, file: &std::fs::File, mut offset: u64, mut len: usize) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let n = (self.filled - self.pos).min(len);
        if n > 0 {
            file.write_all_at(&self.buf[self.pos..self.pos + n], offset)?;
            self.pos += n;
            offset += n as u64;
            len -= n;
        }
        if len > 0 && !self.no_splice && self.ch.can_splice() {
            if self.pipe.is_none() {
                match SplicePipe::new() {
                    Ok(p) => self.pipe = Some(p),
                    // No pipe (descriptors exhausted): read and write instead.
                    Err(_) => self.no_splice = true,
                }
            }
            if let Some(pipe) = self.pipe.take() {
                let r = self.splice_to_file(&pipe, file, &mut offset, &mut len);
                // A pipe left holding bytes (an error on the way out) is not reused.
                if r.is_ok() {
                    self.pipe = Some(pipe);
                }
                r?;
            }
        }
        while len > 0 {
            let avail = self.fill_buf()?;
            if avail.is_empty() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside a payload"));
            }
            let n = avail.len().min(len);
            file.write_all_at(&avail[..n], offset)?;
            self.consume(n);
            offset += n as u64;
            len -= n;
        }
        Ok(())
    }

    /// The splicing part of [`copy_to_file`](Self::copy_to_file): moves bytes until
    /// `len` is 0, or stops early (leaving the rest to the read path, the pipe
    /// empty) when the file system takes no splice writes.
    fn splice_to_file(
        &mut self,
        pipe: &SplicePipe,
        file: &std::fs::File,
        offset: &mut u64,
        len: &mut usize,
    ) -> io::Result<()> {
        use nix::fcntl::{splice, SpliceFFlags};
        use std::os::fd::AsFd;
        while *len > 0 {
            let got = self.ch.splice_into(pipe.w.as_fd(), (*len).min(pipe.cap))?;
            if got == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside a payload"));
            }
            self.rate.account(got as u64);
            let mut left = got;
            while left > 0 {
                let mut off = libc::loff_t::try_from(*offset).map_err(|_| io::Error::other("file offset too large"))?;
                match splice(pipe.r.as_fd(), None, file.as_fd(), Some(&mut off), left, SpliceFFlags::SPLICE_F_MOVE) {
                    Ok(0) => {
                        return Err(io::Error::new(io::ErrorKind::WriteZero, "splice into the file wrote nothing"))
                    }
                    Ok(m) => {
                        left -= m;
                        *offset += m as u64;
                        *len -= m;
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(nix::errno::Errno::EINVAL) if left == got => {
                        // The file system takes no splice writes: empty the pipe by
                        // reading, and read and write from now on.
                        self.no_splice = true;
                        return self.drain_pipe(pipe, file, offset, len, left);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Move the `left` bytes a pipe holds into `file` at `offset` by reading them.
    fn drain_pipe(
        &mut self,
        pipe: &SplicePipe,
        file: &std::fs::File,
        offset: &mut u64,
        len: &mut usize,
        mut left: usize,
    ) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        while left > 0 {
            let k = left.min(self.buf.len());
            let n = match nix::unistd::read(&pipe.r, &mut self.buf[..k]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the pipe ran dry")),
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            file.write_all_at(&self.buf[..n], *offset)?;
            left -= n;
            *offset += n as u64;
            *len -= n;
        }
        // The buffer was used as scratch: nothing is buffered now.
        self.pos = 0;
        self.filled = 0;
        Ok(())
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
            let n = self.ch.read(&mut self.buf[..self.fill_limit])?;
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
