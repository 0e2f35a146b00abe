//! Channels: one connected migration transport (socket, pipe pair of an `exec:`
//! child, inherited fd, or file), with I/O that never blocks past a cancel.

use crate::cancel::{CancelToken, Wake};
use crate::error::{NoProgress, TransportError};
use crate::tls::{TlsClient, TlsServer, TlsStream};
use crate::uri::MigrationUri;
use nix::poll::PollFlags;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use std::fs::OpenOptions;
use std::io::{self, IoSlice, Read, Seek, SeekFrom};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most stderr kept from an `exec:` child.
const STDERR_KEEP: usize = 64 * 1024;
/// How long a broken or ended pipe waits for its `exec:` command to finish exiting,
/// so the command's own failure can be reported instead of EPIPE or a short stream.
const EXIT_GRACE: Duration = Duration::from_millis(500);

/// Which side of a migration a channel serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The source: we write the stream.
    Outgoing,
    /// The destination: we read the stream.
    Incoming,
}

/// A running `exec:` command.
struct ExecChild {
    command: String,
    child: Arc<Mutex<Child>>,
    /// Collects the command's stderr (locked so a failing read or write can report it;
    /// boxed to keep `Channel` small).
    stderr: Box<Mutex<Option<JoinHandle<Vec<u8>>>>>,
    status: Option<ExitStatus>,
}

impl ExecChild {
    fn spawn(command: &str, dir: Direction) -> Result<(ExecChild, OwnedFd), TransportError> {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(command).stderr(Stdio::piped()).process_group(0);
        match dir {
            Direction::Outgoing => cmd.stdin(Stdio::piped()).stdout(Stdio::null()),
            Direction::Incoming => cmd.stdin(Stdio::null()).stdout(Stdio::piped()),
        };
        let spawn_err = |source| TransportError::Spawn { command: command.to_string(), source };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let fd: OwnedFd = match dir {
            Direction::Outgoing => child.stdin.take().map(OwnedFd::from),
            Direction::Incoming => child.stdout.take().map(OwnedFd::from),
        }
        .ok_or_else(|| spawn_err(io::Error::other("no pipe to the command")))?;
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut keep = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = e.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let room = STDERR_KEEP.saturating_sub(keep.len());
                    keep.extend_from_slice(&buf[..n.min(room)]);
                }
                keep
            })
        });
        Ok((
            ExecChild {
                command: command.to_string(),
                child: Arc::new(Mutex::new(child)),
                stderr: Box::new(Mutex::new(stderr)),
                status: None,
            },
            fd,
        ))
    }

    fn pid(&self) -> Option<Pid> {
        self.child.lock().ok().map(|c| Pid::from_raw(c.id() as i32))
    }

    /// Wait for the command; an error if it failed (with what it printed on stderr).
    fn wait(&mut self) -> Result<(), TransportError> {
        let status = match self.status {
            Some(s) => s,
            None => {
                // Wait for the exit without the lock (and without reaping, so the pid
                // stays ours): a cancel takes the lock to kill the command, and must
                // not be held up behind a command that never exits.
                let running = self.child.lock().ok().and_then(|mut c| match c.try_wait() {
                    Ok(None) => Some(Pid::from_raw(c.id() as i32)),
                    _ => None,
                });
                if let Some(pid) = running {
                    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
                    while waitid(Id::Pid(pid), flags) == Err(nix::errno::Errno::EINTR) {}
                }
                let s = self
                    .child
                    .lock()
                    .map_err(|_| io::Error::other("exec child lock poisoned"))
                    .and_then(|mut c| c.wait())
                    .map_err(|source| TransportError::Spawn { command: self.command.clone(), source })?;
                self.status = Some(s);
                s
            }
        };
        let stderr = self.stderr.get_mut().ok().and_then(Option::take).and_then(|h| h.join().ok()).unwrap_or_default();
        if status.success() {
            Ok(())
        } else {
            Err(TransportError::Exec { command: self.command.clone(), status, stderr: last_line(&stderr) })
        }
    }

    /// After its pipe broke or ended: the command's failure if it exits unsuccessfully
    /// within [`EXIT_GRACE`] (None if it succeeded, still runs, or on cancel).
    fn failure_after_pipe_end(&self, cancel: &CancelToken) -> Option<TransportError> {
        let deadline = Instant::now() + EXIT_GRACE;
        let status = loop {
            if cancel.is_cancelled() {
                return None;
            }
            match self.child.lock().ok()?.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                _ => return None,
            }
        };
        if status.success() {
            return None;
        }
        // Its stderr closes when it exits (unless something it started keeps it open).
        let mut guard = self.stderr.lock().ok()?;
        while guard.as_ref().is_some_and(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let stderr = match guard.take_if(|h| h.is_finished()) {
            Some(h) => h.join().unwrap_or_default(),
            None => Vec::new(),
        };
        Some(TransportError::Exec { command: self.command.clone(), status, stderr: last_line(&stderr) })
    }

    /// Kill the command's process group.
    fn kill(&self) {
        if let Some(pid) = self.pid() {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }
}

impl Drop for ExecChild {
    fn drop(&mut self) {
        if self.status.is_none() {
            // Still running (or never waited): never leave a zombie behind.
            let exited = self.child.lock().ok().and_then(|mut c| c.try_wait().ok().flatten());
            if exited.is_none() {
                self.kill();
            }
            if let Ok(mut c) = self.child.lock() {
                let _ = c.wait();
            }
        }
        if let Some(h) = self.stderr.get_mut().ok().and_then(Option::take) {
            let _ = h.join();
        }
    }
}

/// The last non-blank line of a command's stderr, trimmed.
fn last_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

/// The io timeout of [`ChannelOptions::default`]: 30 s without a byte moving on a
/// socket fails the read or write (QEMU 7.2 has none, and waits as long as TCP retries).
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How a socket channel guards against a dead peer or link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelOptions {
    /// Longest time one read or write on a socket (tcp:, unix:, an fd: socket)
    /// may wait without a byte moving before it fails with [`NoProgress`]
    /// (`None`: wait for ever, as QEMU does). On tcp it also sets `TCP_USER_TIMEOUT`
    /// (unacknowledged data older than this resets the connection) and TCP
    /// keepalive (first probe after a third of it, three probes a third apart), so
    /// an idle connection whose peer vanished is noticed too. Pipes, `exec:` and
    /// `file:` channels are not affected. Default [`DEFAULT_IO_TIMEOUT`].
    pub io_timeout: Option<Duration>,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        ChannelOptions { io_timeout: Some(DEFAULT_IO_TIMEOUT) }
    }
}

impl ChannelOptions {
    /// Options with this io timeout (`None` or zero: none).
    pub fn with_io_timeout(io_timeout: Option<Duration>) -> Self {
        ChannelOptions { io_timeout: io_timeout.filter(|t| !t.is_zero()) }
    }
}

/// Turn on TCP keepalive and `TCP_USER_TIMEOUT` for `timeout` on a tcp socket
/// (other sockets: nothing). Best effort: a refused option is ignored. True on tcp.
fn tcp_liveness(fd: &OwnedFd, timeout: Option<Duration>) -> bool {
    use nix::sys::socket::{getsockname, setsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage};
    let is_inet = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .is_ok_and(|a| matches!(a.family(), Some(AddressFamily::Inet | AddressFamily::Inet6)));
    if !is_inet {
        return false;
    }
    match timeout {
        Some(t) => {
            let ms = u32::try_from(t.as_millis()).unwrap_or(u32::MAX).max(1);
            let third = u32::try_from(t.as_secs() / 3).unwrap_or(u32::MAX).max(1);
            let _ = setsockopt(fd, sockopt::KeepAlive, &true);
            let _ = setsockopt(fd, sockopt::TcpKeepIdle, &third);
            let _ = setsockopt(fd, sockopt::TcpKeepInterval, &third);
            let _ = setsockopt(fd, sockopt::TcpKeepCount, &3);
            let _ = setsockopt(fd, sockopt::TcpUserTimeout, &ms);
        }
        None => {
            let _ = setsockopt(fd, sockopt::KeepAlive, &false);
            let _ = setsockopt(fd, sockopt::TcpUserTimeout, &0);
        }
    }
    true
}

/// A connected migration channel.
pub struct Channel {
    read: Option<OwnedFd>,
    write: Option<OwnedFd>,
    /// The `exec:` command (boxed: it is rare, and keeps `Channel` small).
    exec: Option<Box<ExecChild>>,
    cancel: CancelToken,
    peer: String,
    /// A socket's descriptor that the cancel hook shuts down; the hook holds it
    /// weakly, so dropping the channel closes the socket even while the token lives.
    _shutdown: Option<Arc<OwnedFd>>,
    /// File status flags to put back on drop (inherited `fd:N` only).
    restore_flags: Option<nix::fcntl::OFlag>,
    /// Longest wait without progress in one read or write, in ms (sockets only; 0:
    /// none). A u32 (49 days at most) keeps `Channel` small.
    io_timeout_ms: u32,
    /// A tcp socket (its send queue is reported by [`Channel::queued_bytes`]).
    tcp: bool,
    /// The TLS session, once [`tls_client`](Channel::tls_client) or
    /// [`tls_server`](Channel::tls_server) ran its handshake: every read and write goes through it.
    tls: Option<Arc<TlsStream>>,
    /// A plaintext socket's first read has not happened yet (it refuses a TLS handshake).
    first_read: AtomicBool,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Channel({})", self.peer)
    }
}

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// The major version byte of every TLS record (3: SSL 3.0 to TLS 1.3).
const TLS_MAJOR: u8 = 0x03;

/// Send buffer asked for on unix sockets (the kernel doubles it, capped by `net.core.wmem_max`).
const UNIX_SEND_BUFFER: usize = 1 << 20;

/// On a unix stream socket, raise `SO_SNDBUF` from its default (208 KiB) to
/// [`UNIX_SEND_BUFFER`]: the sender's buffer is all that a unix stream queues, and
/// with the default a 1 GiB stream takes about 11000 partial `writev`s, each
/// followed by a `poll` and a wake-up of both processes (4800 context switches
/// per GiB; 540 with this size, 1 GiB random qmig -> qmig 0.81 s -> 0.76 s). A
/// larger buffer (4 MiB) switched less but was no faster: the bytes queued leave
/// the caches before the receiver copies them. TCP keeps its autotuning (setting
/// the size would turn it off). Best effort: failures are ignored.
fn grow_unix_send_buffer(fd: &OwnedFd) {
    use nix::sys::socket::{getsockname, setsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage};
    let is_unix = getsockname::<SockaddrStorage>(fd.as_raw_fd()).is_ok_and(|a| a.family() == Some(AddressFamily::Unix));
    if is_unix {
        let _ = setsockopt(fd, sockopt::SndBuf, &UNIX_SEND_BUFFER);
    }
}

/// Set O_NONBLOCK; returns the flags before.
fn set_nonblocking(fd: &OwnedFd) -> io::Result<nix::fcntl::OFlag> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let before = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?);
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(before | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(before)
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.release(true, true);
    }
}

impl Channel {
    /// Close the read and/or write fd. An inherited fd's file description is shared
    /// with other processes (a shell's stdin, say): it goes back in the mode it came in.
    fn release(&mut self, read: bool, write: bool) {
        for (on, slot) in [(read, &mut self.read), (write, &mut self.write)] {
            if let (true, Some(fd)) = (on, slot.take()) {
                if let Some(flags) = self.restore_flags {
                    let _ = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(flags));
                }
            }
        }
    }
}

impl Channel {
    fn socket(fd: OwnedFd, cancel: &CancelToken, peer: String) -> io::Result<Channel> {
        set_nonblocking(&fd)?;
        grow_unix_send_buffer(&fd);
        let other = fd.try_clone()?;
        // Cancel shuts the socket down, so even a peer that never reads cannot keep us.
        let shutdown = Arc::new(fd.try_clone()?);
        let hook_fd = Arc::downgrade(&shutdown);
        cancel.on_cancel(Box::new(move || {
            if let Some(fd) = hook_fd.upgrade() {
                let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            }
        }));
        Ok(Channel {
            read: Some(fd),
            write: Some(other),
            exec: None,
            cancel: cancel.clone(),
            peer,
            _shutdown: Some(shutdown),
            restore_flags: None,
            io_timeout_ms: 0,
            tcp: false,
            tls: None,
            first_read: AtomicBool::new(true),
        })
    }

    fn pipe(
        fd: OwnedFd,
        dir: Direction,
        exec: Option<ExecChild>,
        cancel: &CancelToken,
        peer: String,
    ) -> io::Result<Channel> {
        set_nonblocking(&fd)?;
        if let Some(e) = &exec {
            let child = e.child.clone();
            cancel.on_cancel(Box::new(move || {
                if let Ok(c) = child.lock() {
                    // Only while not reaped (running or a zombie): a reaped pid may be reused.
                    let pid = Pid::from_raw(c.id() as i32);
                    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
                    if waitid(Id::Pid(pid), flags).is_ok() {
                        let _ = killpg(pid, Signal::SIGKILL);
                    }
                }
            }));
        }
        let (read, write) = match dir {
            Direction::Incoming => (Some(fd), None),
            Direction::Outgoing => (None, Some(fd)),
        };
        Ok(Channel {
            read,
            write,
            exec: exec.map(Box::new),
            cancel: cancel.clone(),
            peer,
            _shutdown: None,
            restore_flags: None,
            io_timeout_ms: 0,
            tcp: false,
            tls: None,
            first_read: AtomicBool::new(false),
        })
    }

    /// What this channel is connected to (for messages).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Apply `opts` (the io timeout; on tcp also keepalive and `TCP_USER_TIMEOUT`).
    /// Only socket channels take an io timeout; on others this does nothing.
    pub fn set_options(&mut self, opts: &ChannelOptions) {
        if let Some(fd) = self._shutdown.as_deref() {
            self.tcp = tcp_liveness(fd, opts.io_timeout);
            self.io_timeout_ms = opts.io_timeout.map_or(0, |t| u32::try_from(t.as_millis()).unwrap_or(u32::MAX).max(1));
        }
    }

    /// Bytes written to a tcp socket that the peer has not acknowledged yet
    /// (`SIOCOUTQ`): still on their way, so the switchover counts them as pending
    /// and the bandwidth is measured on what arrived. 0 for other channels.
    pub fn queued_bytes(&self) -> u64 {
        let Some(fd) = self.write.as_ref().filter(|_| self.tcp) else { return 0 };
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one c_int through the pointer, which
        // points at `n`; `fd` is an open socket owned by this channel.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
        if r == 0 {
            u64::try_from(n).unwrap_or(0)
        } else {
            0
        }
    }

    /// The io timeout in force (`None` for none; always `None` off sockets).
    pub fn io_timeout(&self) -> Option<Duration> {
        (self.io_timeout_ms > 0).then(|| Duration::from_millis(self.io_timeout_ms.into()))
    }

    /// Wait until the socket has data (or the peer closed) and copy what is there,
    /// up to `buf.len()` bytes, into `buf` without consuming it (`MSG_PEEK`), for a
    /// listener to look at what a new connection sends first. Ok(0): the peer closed
    /// with nothing sent. A [`NoProgress`] error (kind `TimedOut`) when nothing came
    /// by `deadline`. Sockets only.
    pub fn peek(&self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        use nix::sys::socket::{recv, MsgFlags};
        let fd = self
            .read
            .as_ref()
            .filter(|_| self._shutdown.is_some())
            .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "only socket channels can be peeked"))?;
        let start = Instant::now();
        loop {
            self.cancel.check()?;
            match recv(fd.as_raw_fd(), buf, MsgFlags::MSG_PEEK) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EAGAIN) => {
                    if self.cancel.wait(fd.as_fd(), PollFlags::POLLIN, Some(deadline))? == Wake::Timeout {
                        let timeout = deadline.saturating_duration_since(start);
                        return Err(io::Error::new(io::ErrorKind::TimedOut, NoProgress { what: "read", timeout }));
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(self.io_error(e.into())),
            }
        }
    }

    /// Sleep until `deadline` unless this channel is cancelled first.
    pub fn sleep_until(&self, deadline: Instant) -> io::Result<()> {
        self.cancel.sleep_until(deadline)
    }

    /// The token that cancels this channel's I/O.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    /// Start TLS as the client (the source) on this socket channel: the handshake
    /// runs now (cancellable), checking the server's certificate for `hostname`
    /// when `creds` verify the peer (see [`tls::server_name`](crate::tls::server_name)).
    /// Refused on `exec:`, `file:` and non-socket `fd:` channels.
    pub fn tls_client(self, creds: &TlsClient, hostname: &str) -> Result<Channel, TransportError> {
        let t = self.io_timeout();
        self.start_tls(|fd, peer, cancel| TlsStream::client(fd, creds, hostname, peer, cancel, t))
    }

    /// Start TLS as the server (the destination) on this socket channel: the
    /// handshake runs now (cancellable), requiring and checking the client's
    /// certificate when `creds` verify the peer (and its DN with tls-authz).
    /// Nothing of the migration stream is read before it succeeds.
    pub fn tls_server(self, creds: &TlsServer) -> Result<Channel, TransportError> {
        let t = self.io_timeout();
        self.start_tls(|fd, peer, cancel| TlsStream::server(fd, creds, peer, cancel, t))
    }

    fn start_tls(
        mut self,
        handshake: impl FnOnce(OwnedFd, &str, &CancelToken) -> io::Result<TlsStream>,
    ) -> Result<Channel, TransportError> {
        let peer = self.peer.clone();
        let tls_err = |why: String| TransportError::Tls(crate::tls::TlsError::Handshake { peer: peer.clone(), why });
        if self._shutdown.is_none() || self.tls.is_some() {
            let why = if self.tls.is_some() {
                "TLS is already on"
            } else {
                "TLS needs a socket (tcp:, unix: or an fd: socket)"
            };
            return Err(tls_err(why.into()));
        }
        let fd = match self.read.as_ref() {
            Some(fd) => fd.try_clone().map_err(|e| tls_err(format!("cannot duplicate the socket: {e}")))?,
            None => return Err(tls_err("the channel is closed".into())),
        };
        match handshake(fd, &self.peer, &self.cancel) {
            Ok(stream) => {
                self.tls = Some(Arc::new(stream));
                self.first_read.store(false, Ordering::Relaxed);
                Ok(self)
            }
            Err(e) if crate::cancel::is_cancelled(&e) || self.cancel.is_cancelled() => {
                Err(TransportError::Channel { peer: self.peer.clone(), source: crate::cancel::cancelled() })
            }
            Err(e) => match e.into_inner().map(|inner| inner.downcast::<crate::tls::TlsError>()) {
                Some(Ok(tls)) => Err(TransportError::Tls(*tls)),
                Some(Err(other)) => Err(tls_err(other.to_string())),
                None => Err(tls_err("I/O error".into())),
            },
        }
    }

    /// True once TLS is on.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The TLS version agreed (`TLSv1_3`, ...), when TLS is on.
    pub fn tls_protocol(&self) -> Option<String> {
        self.tls.as_ref().and_then(|t| t.protocol())
    }

    /// The subject DN of the peer's certificate (GnuTLS's format), when TLS is on
    /// and the peer presented one.
    pub fn tls_peer_dn(&self) -> Option<String> {
        self.tls.as_ref().and_then(|t| t.peer_dn())
    }

    /// Read into `buf`; blocks until data, end of stream (0) or cancel.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(tls) = &self.tls {
            return tls.read(buf, &self.cancel, self.io_timeout()).map_err(|e| self.io_error(e));
        }
        let n = self.read_plain(buf)?;
        if self.first_read.swap(false, Ordering::Relaxed) && n >= 2 && buf[0] == TLS_HANDSHAKE && buf[1] == TLS_MAJOR {
            // A TLS record header (handshake, version 3.x) where a migration stream
            // ("QEVM"), a multifd channel or a return path message starts.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                crate::tls::TlsError::UnexpectedTls { peer: self.peer.clone() },
            ));
        }
        Ok(n)
    }

    fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        let fd =
            self.read.as_ref().ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "channel is write-only"))?;
        loop {
            self.cancel.check()?;
            match nix::unistd::read(fd.as_fd(), buf) {
                Ok(0) if !buf.is_empty() => {
                    // A command that ended its output by failing explains the short stream.
                    return match self.exec.as_ref().and_then(|x| x.failure_after_pipe_end(&self.cancel)) {
                        Some(f) => Err(io::Error::other(f)),
                        None => Ok(0),
                    };
                }
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EAGAIN) => self.wait_progress(fd, PollFlags::POLLIN, "read")?,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(self.io_error(e.into())),
            }
        }
    }

    /// True when [`splice_into`](Self::splice_into) can move this channel's bytes:
    /// a plain socket read side (not TLS, not an `exec:` pipe) whose first read
    /// (the TLS check) is behind it.
    pub fn can_splice(&self) -> bool {
        self.tls.is_none()
            && self.exec.is_none()
            && self._shutdown.is_some()
            && self.read.is_some()
            && !self.first_read.load(Ordering::Relaxed)
    }

    /// Move up to `len` bytes from the socket into the pipe `pipe_w` (which must
    /// have room for them) without a user-space copy: `splice(2)`. Blocks like
    /// [`read`](Self::read) (cancel, io timeout); 0 at end of stream. `Unsupported`
    /// when [`can_splice`](Self::can_splice) is false.
    pub fn splice_into(&self, pipe_w: std::os::fd::BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        use nix::fcntl::{splice, SpliceFFlags};
        if !self.can_splice() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "this channel cannot splice"));
        }
        let fd = self.read.as_ref().ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "write-only"))?;
        loop {
            self.cancel.check()?;
            match splice(
                fd.as_fd(),
                None,
                pipe_w,
                None,
                len,
                SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
            ) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EAGAIN) => self.wait_progress(fd, PollFlags::POLLIN, "read")?,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(self.io_error(e.into())),
            }
        }
    }

    /// True when [`splice_from`](Self::splice_from) can write this channel: a plain
    /// socket write side (not TLS, not an `exec:` pipe).
    pub fn can_splice_write(&self) -> bool {
        self.tls.is_none() && self.exec.is_none() && self._shutdown.is_some() && self.write.is_some()
    }

    /// Move up to `len` bytes from the pipe `pipe_r` into the socket with
    /// `splice(2)` (a unix socket takes the pipe's pages by reference since Linux
    /// 6.5, TCP likewise). Blocks like a write (cancel, io timeout). `Unsupported`
    /// when [`can_splice_write`](Self::can_splice_write) is false.
    pub fn splice_from(&self, pipe_r: std::os::fd::BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        use nix::fcntl::{splice, SpliceFFlags};
        if !self.can_splice_write() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "this channel cannot splice"));
        }
        let fd = self.write.as_ref().ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "read-only"))?;
        loop {
            self.cancel.check()?;
            let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MORE;
            match splice(pipe_r, None, fd.as_fd(), None, len, flags) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EAGAIN) => self.wait_progress(fd, PollFlags::POLLOUT, "write")?,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(self.io_error(e.into())),
            }
        }
    }

    /// Wait until `fd` is ready for `events`; with an io timeout, a
    /// [`NoProgress`] error (kind `TimedOut`) when nothing moved for that long.
    fn wait_progress(&self, fd: &OwnedFd, events: PollFlags, what: &'static str) -> io::Result<()> {
        let timeout = self.io_timeout();
        let deadline = timeout.map(|t| Instant::now() + t);
        match self.cancel.wait(fd.as_fd(), events, deadline)? {
            Wake::Ready => Ok(()),
            Wake::Timeout => {
                Err(io::Error::new(io::ErrorKind::TimedOut, NoProgress { what, timeout: timeout.unwrap_or_default() }))
            }
        }
    }

    /// Write some of `iov` (vectored); blocks until progress or cancel.
    pub fn write_vectored(&self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        if let Some(tls) = &self.tls {
            let first = iov.iter().find(|s| !s.is_empty()).map(|s| &s[..]).unwrap_or(&[]);
            return tls.write(first, &self.cancel, self.io_timeout()).map_err(|e| self.io_error(e));
        }
        let fd =
            self.write.as_ref().ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "channel is read-only"))?;
        loop {
            self.cancel.check()?;
            match nix::sys::uio::writev(fd.as_fd(), iov) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EAGAIN) => self.wait_progress(fd, PollFlags::POLLOUT, "write")?,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(self.io_error(e.into())),
            }
        }
    }

    /// [`write_vectored`](Self::write_vectored) over raw iovecs (memory that must not
    /// be seen as `&[u8]`, such as guest RAM the guest may be writing).
    ///
    /// # Safety
    /// Every iovec must describe memory that stays mapped and readable until the call returns.
    pub(crate) unsafe fn write_iovecs(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        if let Some(tls) = &self.tls {
            // SAFETY: the caller's guarantee, passed on.
            return unsafe { tls.write_iovecs(iov, &self.cancel, self.io_timeout()) }.map_err(|e| self.io_error(e));
        }
        let fd =
            self.write.as_ref().ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "channel is read-only"))?;
        let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
        loop {
            self.cancel.check()?;
            // SAFETY: the caller guarantees the iovecs describe readable memory; the
            // kernel only reads it; `fd` is an open descriptor owned by this channel.
            let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), count) };
            if let Ok(n) = usize::try_from(n) {
                return Ok(n);
            }
            match nix::errno::Errno::last() {
                nix::errno::Errno::EAGAIN => self.wait_progress(fd, PollFlags::POLLOUT, "write")?,
                nix::errno::Errno::EINTR => {}
                e => return Err(self.io_error(e.into())),
            }
        }
    }

    fn io_error(&self, e: io::Error) -> io::Error {
        if !self.cancel.is_cancelled() {
            // EPIPE from a command that exited: its exit status and stderr say why.
            if let Some(f) = self.exec.as_ref().and_then(|x| x.failure_after_pipe_end(&self.cancel)) {
                return io::Error::other(f);
            }
        }
        if self.cancel.is_cancelled() {
            crate::cancel::cancelled()
        } else {
            e
        }
    }

    /// The reverse direction of this channel, for QEMU's return path: on a socket
    /// (tcp, unix, an `fd:` socket) a duplicate of its descriptor, usable from another
    /// thread while this channel is read or written, and cancelled by the same token.
    /// `exec:`, `file:` and non-socket `fd:` channels have none: a
    /// [`TransportError::NoReturnPath`] (QEMU refuses a return path on them too).
    pub fn return_path(&self) -> Result<ReturnPath, TransportError> {
        let no = |why: String| TransportError::NoReturnPath { uri: self.peer.clone(), why };
        if self._shutdown.is_none() {
            let kind = if self.exec.is_some() { "an exec: command's pipes" } else { "not a socket" };
            return Err(no(format!("{kind} carry only one direction")));
        }
        let fd = self.read.as_ref().or(self.write.as_ref()).ok_or_else(|| no("the channel is closed".into()))?;
        let fd = fd.try_clone().map_err(|e| no(format!("cannot duplicate the socket: {e}")))?;
        Ok(ReturnPath { fd, cancel: self.cancel.clone(), peer: self.peer.clone(), tls: self.tls.clone() })
    }

    /// Close the write side (the peer sees end of stream), keeping the read side.
    /// On TLS, close_notify goes first (the peer reads a clean end).
    pub fn close_write(&mut self) {
        if let (Some(tls), Some(_)) = (&self.tls, &self.write) {
            tls.close_notify(&self.cancel);
        }
        if let (Some(_), Some(w)) = (&self.read, &self.write) {
            // A socket (both fds are the same socket): tell the peer we are done.
            let _ = nix::sys::socket::shutdown(w.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        }
        self.release(false, true);
    }

    /// Close everything and, for `exec:`, wait for the command and check its exit status.
    pub fn finish(mut self) -> Result<(), TransportError> {
        self.release(true, true);
        match self.exec.as_mut() {
            // Killed by a cancel: report the cancel, not the SIGKILL exit status.
            Some(e) => match e.wait() {
                Err(_) if self.cancel.is_cancelled() => {
                    Err(TransportError::Channel { peer: self.peer.clone(), source: crate::cancel::cancelled() })
                }
                r => r,
            },
            None => Ok(()),
        }
    }
}

/// The return path of a socket channel (see [`Channel::return_path`]): the same
/// connection used in the other direction, on a descriptor of its own. Reads and
/// writes block until progress, end of stream or cancel (a cancel shuts the socket
/// down, which wakes both directions). `&ReturnPath` is `Read` and `Write`, so one
/// thread can read while another writes.
pub struct ReturnPath {
    fd: OwnedFd,
    cancel: CancelToken,
    peer: String,
    /// The channel's TLS session, shared (reads and writes go through it).
    tls: Option<Arc<TlsStream>>,
}

impl std::fmt::Debug for ReturnPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReturnPath({})", self.peer)
    }
}

impl ReturnPath {
    /// What the return path is connected to (for messages).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The same return path with its blocking reads and writes woken by `cancel`
    /// instead of the channel's token, so a reader can be stopped without cancelling
    /// the channel (link the channel's token to `cancel` to keep its cancel reaching it).
    pub fn with_cancel(mut self, cancel: CancelToken) -> ReturnPath {
        self.cancel = cancel;
        self
    }

    /// Another handle on the same return path (for a reader and a writer thread).
    pub fn try_clone(&self) -> io::Result<ReturnPath> {
        Ok(ReturnPath {
            fd: self.fd.try_clone()?,
            cancel: self.cancel.clone(),
            peer: self.peer.clone(),
            tls: self.tls.clone(),
        })
    }

    /// Read into `buf`; blocks until data, end of stream (0) or cancel.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(tls) = &self.tls {
            // As on plaintext: a return path may stay quiet for as long as the migration runs.
            return tls.read(buf, &self.cancel, None).map_err(|e| self.error(e));
        }
        loop {
            self.cancel.check()?;
            match nix::unistd::read(self.fd.as_fd(), buf) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EAGAIN) => {
                    self.cancel.wait(self.fd.as_fd(), PollFlags::POLLIN, None)?;
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(self.error(e.into())),
            }
        }
    }

    /// Write some of `buf`; blocks until progress or cancel.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        if let Some(tls) = &self.tls {
            return tls.write(buf, &self.cancel, None).map_err(|e| self.error(e));
        }
        loop {
            self.cancel.check()?;
            match nix::unistd::write(&self.fd, buf) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EAGAIN) => {
                    self.cancel.wait(self.fd.as_fd(), PollFlags::POLLOUT, None)?;
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(self.error(e.into())),
            }
        }
    }

    /// Shut down one or both directions of the connection (the main channel's too,
    /// as it is the same socket): `Write` tells the peer nothing more comes; `Read`
    /// makes every read here, the main channel's included, see end of stream.
    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        use nix::sys::socket::Shutdown as S;
        let how = match how {
            std::net::Shutdown::Read => S::Read,
            std::net::Shutdown::Write => S::Write,
            std::net::Shutdown::Both => S::Both,
        };
        nix::sys::socket::shutdown(self.fd.as_raw_fd(), how).map_err(io::Error::from)
    }

    fn error(&self, e: io::Error) -> io::Error {
        if self.cancel.is_cancelled() {
            crate::cancel::cancelled()
        } else {
            e
        }
    }
}

impl Read for &ReturnPath {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        ReturnPath::read(self, buf)
    }
}

impl Read for ReturnPath {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        ReturnPath::read(self, buf)
    }
}

impl io::Write for &ReturnPath {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        ReturnPath::write(self, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Write for ReturnPath {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        ReturnPath::write(self, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Open the outgoing side of `uri` (connect, spawn, open the file, or take the fd)
/// with the default [`ChannelOptions`] (a 30 s io timeout on sockets).
pub fn connect(uri: &MigrationUri, cancel: &CancelToken) -> Result<Channel, TransportError> {
    connect_with(uri, cancel, &ChannelOptions::default())
}

/// [`connect`] with these options.
pub fn connect_with(
    uri: &MigrationUri,
    cancel: &CancelToken,
    opts: &ChannelOptions,
) -> Result<Channel, TransportError> {
    let mut ch = connect_raw(uri, cancel)?;
    ch.set_options(opts);
    Ok(ch)
}

fn connect_raw(uri: &MigrationUri, cancel: &CancelToken) -> Result<Channel, TransportError> {
    let at = |source| TransportError::Connect { uri: uri.to_string(), source };
    if cancel.is_cancelled() {
        return Err(at(crate::cancel::cancelled()));
    }
    match uri {
        MigrationUri::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port)).map_err(at)?;
            let _ = s.set_nodelay(true);
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| uri.to_string());
            Channel::socket(OwnedFd::from(s), cancel, peer).map_err(at)
        }
        MigrationUri::Unix(path) => {
            let s = UnixStream::connect(path).map_err(at)?;
            Channel::socket(OwnedFd::from(s), cancel, uri.to_string()).map_err(at)
        }
        MigrationUri::Fd(n) => {
            let fd = take_fd(*n).map_err(at)?;
            fd_channel(fd, Direction::Outgoing, cancel, uri).map_err(at)
        }
        MigrationUri::Exec(cmd) => {
            let (child, fd) = ExecChild::spawn(cmd, Direction::Outgoing)?;
            Channel::pipe(fd, Direction::Outgoing, Some(child), cancel, uri.to_string()).map_err(at)
        }
        MigrationUri::File { path, offset } => {
            let file_err = |source| TransportError::File { path: path.clone(), source };
            let mut f = OpenOptions::new().write(true).create(true).truncate(false).open(path).map_err(file_err)?;
            f.set_len(*offset).map_err(file_err)?;
            f.seek(SeekFrom::Start(*offset)).map_err(file_err)?;
            Channel::pipe(OwnedFd::from(f), Direction::Outgoing, None, cancel, uri.to_string()).map_err(at)
        }
    }
}

/// Take ownership of inherited descriptor `n` after checking it is open.
fn take_fd(n: i32) -> io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg};
    // SAFETY: `n` is only borrowed for the F_GETFD probe, which has no side effect.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(n) };
    fcntl(borrowed, FcntlArg::F_GETFD)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("fd {n} is not open")))?;
    // SAFETY: the fd is open (checked above) and `fd:N` hands it to us: nothing else in
    // this process uses it, so owning (and eventually closing) it is sound.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

fn fd_channel(fd: OwnedFd, dir: Direction, cancel: &CancelToken, uri: &MigrationUri) -> io::Result<Channel> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?);
    let is_socket =
        nix::sys::stat::fstat(fd.as_fd()).map(|st| st.st_mode & libc_s_ifmt() == libc_s_ifsock()).unwrap_or(false);
    let mut ch = if is_socket {
        Channel::socket(fd, cancel, uri.to_string())?
    } else {
        Channel::pipe(fd, dir, None, cancel, uri.to_string())?
    };
    ch.restore_flags = Some(flags);
    Ok(ch)
}

const fn libc_s_ifmt() -> u32 {
    0o170000
}

const fn libc_s_ifsock() -> u32 {
    0o140000
}

/// The incoming side, bound before the source connects.
pub struct Listener {
    uri: MigrationUri,
    kind: ListenKind,
    cancel: CancelToken,
    opts: ChannelOptions,
    /// TLS credentials: every accepted connection runs the server handshake first.
    tls: Option<TlsServer>,
}

enum ListenKind {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    Other,
}

impl Listener {
    /// Bind `uri` for an incoming migration: listen on tcp/unix; fd, exec and file
    /// need no listening and are opened by [`accept`](Self::accept).
    pub fn bind(uri: &MigrationUri, cancel: &CancelToken) -> Result<Listener, TransportError> {
        let at = |source| TransportError::Listen { uri: uri.to_string(), source };
        let (kind, uri) = match uri {
            MigrationUri::Tcp { host, port } => {
                let l = TcpListener::bind((host.as_str(), *port)).map_err(at)?;
                l.set_nonblocking(true).map_err(at)?;
                let port = l.local_addr().map_err(at)?.port();
                (ListenKind::Tcp(l), MigrationUri::Tcp { host: host.clone(), port })
            }
            MigrationUri::Unix(path) => {
                // Like QEMU, replace a stale socket left by an earlier run; refuse other files.
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    if m.file_type().is_socket() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                let l = UnixListener::bind(path).map_err(at)?;
                l.set_nonblocking(true).map_err(at)?;
                (ListenKind::Unix(l, path.clone()), uri.clone())
            }
            _ => (ListenKind::Other, uri.clone()),
        };
        Ok(Listener { uri, kind, cancel: cancel.clone(), opts: ChannelOptions::default(), tls: None })
    }

    /// Give accepted channels these options instead of the default ones.
    pub fn with_options(mut self, opts: ChannelOptions) -> Listener {
        self.opts = opts;
        self
    }

    /// The options accepted channels get.
    pub fn options(&self) -> &ChannelOptions {
        &self.opts
    }

    /// Run the TLS server handshake with `creds` on every connection accepted
    /// (a failed handshake is the accept's error; nothing of the stream is read
    /// before it succeeds). Only `tcp:` and `unix:` listeners (and `fd:` sockets).
    pub fn with_tls(mut self, creds: TlsServer) -> Result<Listener, TransportError> {
        if matches!(self.uri, MigrationUri::Exec(_) | MigrationUri::File { .. }) {
            return Err(TransportError::Tls(crate::tls::TlsError::Config(format!(
                "TLS needs a socket (tcp:, unix: or an fd: socket), not {}",
                self.uri
            ))));
        }
        self.tls = Some(creds);
        Ok(self)
    }

    /// The URI a source should use (with the port the system picked for `tcp:…:0`).
    pub fn local_uri(&self) -> &MigrationUri {
        &self.uri
    }

    /// Wait for the source (or open the fd, command or file) and return the channel.
    pub fn accept(self) -> Result<Channel, TransportError> {
        self.accept_ref()
    }

    /// Accept one connection on a `tcp:` or `unix:` listener and keep listening, for
    /// a source that opens several (QEMU's multifd channels). Other URIs have one
    /// channel only: an error (use [`accept`](Self::accept)).
    pub fn accept_another(&self) -> Result<Channel, TransportError> {
        if matches!(self.kind, ListenKind::Other) {
            let source =
                io::Error::new(io::ErrorKind::Unsupported, "only tcp: and unix: take more than one connection");
            return Err(TransportError::Accept { uri: self.uri.to_string(), source });
        }
        self.accept_ref()
    }

    fn accept_ref(&self) -> Result<Channel, TransportError> {
        let mut ch = self.accept_plain()?;
        ch.set_options(&self.opts);
        match &self.tls {
            Some(creds) => ch.tls_server(creds),
            None => Ok(ch),
        }
    }

    fn accept_plain(&self) -> Result<Channel, TransportError> {
        let uri = self.uri.clone();
        let at = |source| TransportError::Accept { uri: uri.to_string(), source };
        if self.cancel.is_cancelled() {
            return Err(at(crate::cancel::cancelled()));
        }
        match &self.kind {
            ListenKind::Tcp(l) => loop {
                match l.accept() {
                    Ok((s, addr)) => {
                        s.set_nonblocking(false).map_err(at)?;
                        let _ = s.set_nodelay(true);
                        return Channel::socket(OwnedFd::from(s), &self.cancel, addr.to_string()).map_err(at);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.cancel.wait(l.as_fd(), PollFlags::POLLIN, None).map_err(at)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(at(e)),
                }
            },
            ListenKind::Unix(l, _) => loop {
                match l.accept() {
                    Ok((s, _)) => return Channel::socket(OwnedFd::from(s), &self.cancel, uri.to_string()).map_err(at),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.cancel.wait(l.as_fd(), PollFlags::POLLIN, None).map_err(at)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(at(e)),
                }
            },
            ListenKind::Other => match &self.uri {
                MigrationUri::Fd(n) => {
                    let fd = take_fd(*n).map_err(at)?;
                    fd_channel(fd, Direction::Incoming, &self.cancel, &self.uri).map_err(at)
                }
                MigrationUri::Exec(cmd) => {
                    let (child, fd) = ExecChild::spawn(cmd, Direction::Incoming)?;
                    Channel::pipe(fd, Direction::Incoming, Some(child), &self.cancel, self.uri.to_string()).map_err(at)
                }
                MigrationUri::File { path, offset } => {
                    let file_err = |source| TransportError::File { path: path.clone(), source };
                    let mut f = std::fs::File::open(path).map_err(file_err)?;
                    f.seek(SeekFrom::Start(*offset)).map_err(file_err)?;
                    Channel::pipe(OwnedFd::from(f), Direction::Incoming, None, &self.cancel, self.uri.to_string())
                        .map_err(at)
                }
                _ => Err(at(io::Error::other("unreachable listener kind"))),
            },
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenKind::Unix(_, path) = &self.kind {
            let _ = std::fs::remove_file(path);
        }
    }
}
