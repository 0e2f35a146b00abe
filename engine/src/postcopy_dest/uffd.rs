//! userfaultfd in MISSING mode, as a postcopy destination uses it: register guest
//! memory, read page faults, resolve them with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`.
//!
//! Raw ioctls through `libc`, extending the engine's hand-written wrapper for the
//! write-protect tracker (`dirty::uffd`) rather than the `userfaultfd` crate: that
//! crate needs libclang at build time (bindgen), and does not report which feature
//! the kernel refused. The userfaultfd is created *without* `UFFD_USER_MODE_ONLY`:
//! KVM resolves a vCPU's access to guest memory in kernel mode (get_user_pages),
//! and those faults must reach the fault thread too. That needs privilege
//! (`CAP_SYS_PTRACE`, or `vm.unprivileged_userfaultfd = 1`); when the system call
//! is refused, `/dev/userfaultfd` is tried.

use crate::uffd_sys::{
    ioc, UffdioApi, UffdioRange, UffdioRegister, UFFDIO, UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFD_API,
};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

// include/uapi/linux/userfaultfd.h. The ioctl numbers are _IOWR/_IOR(0xAA, nr, struct)
// with the generic encoding (x86, arm64, riscv); asserted below.
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_COPY_NR: u64 = 0x03;
const UFFDIO_ZEROPAGE_NR: u64 = 0x04;

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (32 bytes): event byte, then for a page fault the flags at
/// byte 8 and the faulting address at byte 16.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    extra: u64,
}

const UFFDIO_WAKE: u32 = ioc(ioc::READ, UFFDIO, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: u32 = ioc(ioc::READ | ioc::WRITE, UFFDIO, 0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u32 = ioc(ioc::READ | ioc::WRITE, UFFDIO, 0x04, size_of::<UffdioZeropage>());

const _: () = {
    assert!(size_of::<UffdMsg>() == 32);
    assert!(size_of::<UffdioCopy>() == 40);
    assert!(size_of::<UffdioZeropage>() == 32);
};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
const _: () = {
    assert!(UFFDIO_WAKE == 0x8010_AA02);
    assert!(UFFDIO_COPY == 0xC028_AA03);
    assert!(UFFDIO_ZEROPAGE == 0xC020_AA04);
};

/// Why userfaultfd cannot be used, or an ioctl failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UffdError {
    /// The kernel or the process cannot give us what postcopy needs.
    #[error("userfaultfd: {0}")]
    Unsupported(String),
    /// An operation failed.
    #[error("userfaultfd {op}: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

fn os(op: &'static str) -> UffdError {
    UffdError::Os { op, source: io::Error::last_os_error() }
}

/// How a placement ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The page was filled now (and its faulting threads woken).
    Now,
    /// The page was already there (EEXIST): its waiters were woken.
    AlreadyThere,
}

/// A userfaultfd in MISSING mode with the ranges registered on it (unregistered,
/// waking every blocked faulting thread, when dropped).
#[derive(Debug)]
pub struct MissingUffd {
    fd: OwnedFd,
    ranges: std::sync::Mutex<Vec<(u64, u64)>>,
    zeropage: std::sync::atomic::AtomicBool,
}

fn new_fd() -> Result<OwnedFd, UffdError> {
    crate::uffd_sys::open(libc::O_CLOEXEC | libc::O_NONBLOCK).map_err(|why| {
        UffdError::Unsupported(format!(
            "cannot create one: {why} (kernel-mode faults need CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)"
        ))
    })
}

impl MissingUffd {
    /// A userfaultfd with the API handshake done and `UFFD_FEATURE_MISSING_SHMEM`
    /// (shared file and shmem memory) on. Nothing is registered yet.
    pub fn new() -> Result<Self, UffdError> {
        let fd = new_fd()?;
        let mut api = UffdioApi { api: UFFD_API, features: UFFD_FEATURE_MISSING_SHMEM, ioctls: 0 };
        // SAFETY: a valid uffdio_api borrowed for the call, on our userfaultfd.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as libc::Ioctl, &mut api) } < 0 {
            let e = io::Error::last_os_error();
            return Err(UffdError::Unsupported(format!(
                "UFFDIO_API with UFFD_FEATURE_MISSING_SHMEM: {e} (kernel without shmem userfaults)"
            )));
        }
        Ok(MissingUffd {
            fd,
            ranges: std::sync::Mutex::new(Vec::new()),
            zeropage: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Whether this process can use userfaultfd for postcopy (QEMU's
    /// `postcopy_ram_supported_by_host`); the error says what is missing.
    pub fn probe() -> Result<(), UffdError> {
        Self::new().map(drop)
    }

    /// Register `len` bytes at `addr` in MISSING mode: from now on, a first access to
    /// a page not present there blocks its thread until a placement fills the page.
    ///
    /// # Safety
    /// The range must be memory of this process that stays mapped until this
    /// userfaultfd is dropped (anonymous, shmem or a shared file on tmpfs), and
    /// whose missing pages nothing but this userfaultfd fills meanwhile.
    pub unsafe fn register(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut reg =
            UffdioRegister { range: UffdioRange { start: addr, len }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        // SAFETY: a valid uffdio_register for our userfaultfd; the caller vouches for the range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as libc::Ioctl, &mut reg) } < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EINVAL) => UffdError::Unsupported(format!(
                    "UFFDIO_REGISTER {addr:#x}+{len:#x}: {e} (postcopy needs guest RAM that is anonymous, \
                     shmem or a shared file on tmpfs, as QEMU does)"
                )),
                Some(libc::EBUSY) => UffdError::Unsupported(format!(
                    "UFFDIO_REGISTER {addr:#x}+{len:#x}: {e} (already registered with another userfaultfd)"
                )),
                _ => UffdError::Os { op: "UFFDIO_REGISTER", source: e },
            });
        }
        // Recorded before the checks below, so that a refused range is still
        // unregistered (and its faults woken) by `unregister_all`.
        if let Ok(mut r) = self.ranges.lock() {
            r.push((addr, len));
        }
        if reg.ioctls & (1 << UFFDIO_COPY_NR) == 0 {
            return Err(UffdError::Unsupported(format!("UFFDIO_COPY is not available on {addr:#x}+{len:#x}")));
        }
        if reg.ioctls & (1 << UFFDIO_ZEROPAGE_NR) == 0 {
            self.zeropage.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    fn covered(&self, addr: u64, len: u64) -> bool {
        self.ranges
            .lock()
            .map(|r| r.iter().any(|&(a, l)| addr >= a && addr.checked_add(len).is_some_and(|e| e <= a + l)))
            .unwrap_or(false)
    }

    /// Fill the missing page(s) at `dst` (whole pages inside a registered range) with
    /// `src`, waking the threads blocked on them ([`copy_run`](Self::copy_run));
    /// [`Placed::AlreadyThere`] when a page was present (its waiters woken, it left as is).
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<Placed, UffdError> {
        Ok(if self.copy_run(dst, src)?.is_empty() { Placed::Now } else { Placed::AlreadyThere })
    }

    /// Fill the missing pages `dst..dst + src.len()` (whole pages, inside a registered
    /// range) with `src`, with as few `UFFDIO_COPY` calls as the kernel allows (one
    /// when every page is missing), waking the threads blocked on them. A page found
    /// present (EEXIST) is skipped after waking its threads; the addresses of such
    /// pages are returned (the caller decides what to do with them).
    pub fn copy_run(&self, dst: u64, src: &[u8]) -> Result<Vec<u64>, UffdError> {
        let page = crate::memory::PAGE as u64;
        let len = src.len() as u64;
        if !len.is_multiple_of(page) {
            return Err(UffdError::Unsupported(format!("UFFDIO_COPY to {dst:#x}+{len:#x}: not whole pages")));
        }
        if !self.covered(dst, len) {
            return Err(UffdError::Unsupported(format!("UFFDIO_COPY to {dst:#x}+{len:#x}: not a registered range")));
        }
        let mut present = Vec::new();
        let mut done = 0u64;
        while done < len {
            let mut c =
                UffdioCopy { dst: dst + done, src: src.as_ptr() as u64 + done, len: len - done, mode: 0, copy: 0 };
            // SAFETY: `src[done..]` is a readable slice of `len - done` bytes for the call;
            // `dst + done..dst + len` lies in a range registered under `register`'s
            // contract. UFFDIO_COPY only fills pages that are missing (never overwrites one).
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as libc::Ioctl, &mut c) };
            if r == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if c.copy > 0 {
                // A part was placed (the kernel stopped at a page it could not fill, or
                // was interrupted): the rest again, which says why if it fails.
                done += (c.copy as u64).min(len - done);
                continue;
            }
            match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    self.wake(dst + done, page)?;
                    present.push(dst + done);
                    done += page;
                }
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => return Err(UffdError::Os { op: "UFFDIO_COPY", source: e }),
            }
        }
        Ok(present)
    }

    /// Fill the missing page(s) at `dst` with zeros (`UFFDIO_ZEROPAGE`, or a copy of
    /// zeros where the memory kind has no zeropage ioctl), waking their threads.
    pub fn zero(&self, dst: u64, len: u64) -> Result<Placed, UffdError> {
        if !self.zeropage.load(std::sync::atomic::Ordering::Relaxed) {
            let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
            return self.copy(dst, &zeros);
        }
        if !self.covered(dst, len) {
            return Err(UffdError::Unsupported(format!("UFFDIO_ZEROPAGE {dst:#x}+{len:#x}: not a registered range")));
        }
        loop {
            let mut z = UffdioZeropage { range: UffdioRange { start: dst, len }, mode: 0, zeropage: 0 };
            // SAFETY: `dst` lies in a registered range (`register`'s contract); the ioctl
            // only maps zero pages where pages are missing.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as libc::Ioctl, &mut z) };
            if r == 0 {
                return Ok(Placed::Now);
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EEXIST) => {
                    self.wake(dst, len)?;
                    return Ok(Placed::AlreadyThere);
                }
                Some(libc::EAGAIN) | Some(libc::EINTR) if z.zeropage <= 0 => continue,
                _ => return Err(os("UFFDIO_ZEROPAGE")),
            }
        }
    }

    /// Wake the threads blocked on `len` bytes at `addr`.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut r = UffdioRange { start: addr, len };
        // SAFETY: a valid uffdio_range for the call; waking touches no memory.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as libc::Ioctl, &mut r) } < 0 {
            return Err(os("UFFDIO_WAKE"));
        }
        Ok(())
    }

    /// Unregister every range: blocked threads are woken and from now on missing
    /// pages fault normally (a hole reads as zeros). Idempotent.
    ///
    /// UFFDIO_UNREGISTER wakes the threads queued on the range *before* it detaches
    /// the range, and with per-VMA locks (Linux 6.4+) a fault holds only its VMA's
    /// lock, so a thread that entered the fault handler just then queues itself
    /// after that wake-up and would sleep forever. Once the unregister returned no
    /// new fault can queue, so an explicit UFFDIO_WAKE of each range afterwards
    /// (which needs no registration) wakes such a straggler; it then retries its
    /// fault, which the kernel now resolves without us.
    pub fn unregister_all(&self) {
        let ranges = self.ranges.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default();
        for &(start, len) in &ranges {
            let mut r = UffdioRange { start, len };
            // SAFETY: a valid uffdio_range of a range we registered; unregistering
            // changes no memory contents.
            if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as libc::Ioctl, &mut r) } < 0 {
                // Nothing to do about it here but say so: the wake below still runs,
                // and closing the descriptor detaches every range.
                tracing::warn!("userfaultfd: UFFDIO_UNREGISTER {start:#x}+{len:#x}: {}", io::Error::last_os_error());
            }
        }
        for &(start, len) in &ranges {
            if let Err(e) = self.wake(start, len) {
                tracing::warn!("userfaultfd: waking {start:#x}+{len:#x} after unregistering: {e}");
            }
        }
    }

    /// Read the pending page faults (addresses) into `out`, without blocking; stops at
    /// `out`'s capacity. Other events are skipped.
    pub fn read_faults(&self, out: &mut Vec<u64>) -> Result<(), UffdError> {
        let mut msgs = [UffdMsg::default(); 16];
        loop {
            // SAFETY: reading into a buffer of `size_of_val(&msgs)` bytes we own; the
            // kernel writes whole uffd_msg records.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), std::mem::size_of_val(&msgs)) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    Some(libc::EINTR) => continue,
                    _ => Err(UffdError::Os { op: "read", source: e }),
                };
            }
            let k = (n as usize) / size_of::<UffdMsg>();
            for m in &msgs[..k] {
                if m.event == UFFD_EVENT_PAGEFAULT {
                    out.push(m.address);
                }
            }
            if k < msgs.len() || out.len() >= out.capacity() {
                return Ok(());
            }
        }
    }

    /// The descriptor, for `poll`.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for MissingUffd {
    fn drop(&mut self) {
        self.unregister_all();
    }
}
