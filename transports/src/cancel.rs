//! Cancellation: an eventfd that every blocking wait polls alongside its file
//! descriptor, so another thread can wake and fail any blocked read, write,
//! accept or rate-limit sleep at once.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The error a cancelled operation returns (inside an `io::Error` of kind `ConnectionAborted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("migration cancelled")]
pub struct Cancelled;

/// True when `e` is (or wraps) [`Cancelled`].
pub fn is_cancelled(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<Cancelled>())
}

pub(crate) fn cancelled() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, Cancelled)
}

/// Shared cancellation state. Cloning shares it.
#[derive(Clone)]
pub struct CancelToken {
    inner: Arc<TokenInner>,
}

struct TokenInner {
    flag: AtomicBool,
    efd: EventFd,
    hooks: std::sync::Mutex<Vec<Box<dyn Fn() + Send>>>,
}

/// What a wait ended with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    Ready,
    Timeout,
}

impl CancelToken {
    /// A fresh, uncancelled token.
    pub fn new() -> io::Result<Self> {
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(io::Error::from)?;
        Ok(CancelToken { inner: Arc::new(TokenInner { flag: AtomicBool::new(false), efd, hooks: Default::default() }) })
    }

    /// Cancel: wake every waiter and run the registered hooks (socket shutdown, child kill).
    pub fn cancel(&self) {
        if self.inner.flag.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self.inner.efd.write(1);
        if let Ok(hooks) = self.inner.hooks.lock() {
            for h in hooks.iter() {
                h();
            }
        }
    }

    /// True once [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }

    /// Cancel `other` too whenever this token is cancelled (e.g. an engine's token and
    /// the token its channel was connected with). The link does not keep `other`
    /// alive: a long-lived token linked to many short-lived ones holds none of them.
    pub fn link_to(&self, other: &CancelToken) {
        if Arc::ptr_eq(&self.inner, &other.inner) {
            return;
        }
        let o = Arc::downgrade(&other.inner);
        self.on_cancel(Box::new(move || {
            if let Some(inner) = o.upgrade() {
                CancelToken { inner }.cancel();
            }
        }));
    }

    /// Run `hook` on cancel (at once if already cancelled).
    pub(crate) fn on_cancel(&self, hook: Box<dyn Fn() + Send>) {
        if self.is_cancelled() {
            hook();
            return;
        }
        if let Ok(mut hooks) = self.inner.hooks.lock() {
            hooks.push(hook);
        }
    }

    /// Err(cancelled) if cancelled.
    pub(crate) fn check(&self) -> io::Result<()> {
        if self.is_cancelled() {
            Err(cancelled())
        } else {
            Ok(())
        }
    }

    /// Wait until `fd` has `events`, the deadline passes, or cancellation.
    pub(crate) fn wait(&self, fd: BorrowedFd<'_>, events: PollFlags, deadline: Option<Instant>) -> io::Result<Wake> {
        loop {
            self.check()?;
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(Wake::Timeout);
                    }
                    // Round up so we never spin on sub-millisecond remainders.
                    PollTimeout::try_from(left + Duration::from_micros(999)).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(fd, events), PollFd::new(self.inner.efd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) => continue, // re-check the deadline
                Ok(_) => {
                    if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                        return Err(cancelled());
                    }
                    return Ok(Wake::Ready);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sleep until `deadline` unless cancelled first.
    pub(crate) fn sleep_until(&self, deadline: Instant) -> io::Result<()> {
        loop {
            self.check()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            let timeout = PollTimeout::try_from(left + Duration::from_micros(999)).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.inner.efd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) => {}
                Ok(_) => return Err(cancelled()),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
