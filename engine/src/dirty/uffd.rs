//! Dirty tracking by userfaultfd asynchronous write-protection and `PAGEMAP_SCAN`:
//! [`UffdWriteProtect`].

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd};

use super::{DirtyError, DirtySource, PAGE_SIZE};

use crate::uffd_sys::{
    ioc, UffdioApi, UffdioRange, UffdioRegister, UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFD_API,
};

// include/uapi/linux/userfaultfd.h: the write-protect part
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

// include/uapi/linux/fs.h, the PAGEMAP_SCAN part
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`: one run of pages with the same categories, `[start, end)` in bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const PAGEMAP_SCAN: u32 = ioc(ioc::READ | ioc::WRITE, b'f', 16, size_of::<PmScanArg>());

// The layouts are the uapi's, and on the asm-generic architectures the numbers
// are those `_IOWR('f', 16, struct pm_scan_arg)` etc. expand to.
const _: () = {
    assert!(size_of::<PageRegion>() == 24);
    assert!(size_of::<PmScanArg>() == 96);
};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64", target_arch = "x86"))]
const _: () = {
    assert!(PAGEMAP_SCAN == 0xC060_6610);
};

/// Regions the preallocated output array holds; a scan that fills it is resumed.
const DEFAULT_REGIONS: usize = 1024;

fn os(op: &'static str, source: io::Error) -> DirtyError {
    DirtyError::Os { op, source }
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// Counters of the last [`sync`](DirtySource::sync).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdSyncStats {
    /// `PAGEMAP_SCAN` calls made.
    pub ioctls: u32,
    /// Written regions the kernel returned.
    pub regions: u64,
    /// Pages those regions cover.
    pub pages: u64,
}

/// A [`DirtySource`] over a range of this process's memory: userfaultfd
/// *asynchronous* write-protection, harvested with the `PAGEMAP_SCAN` ioctl
/// (Linux ≥ 6.7).
///
/// # Mechanism
///
/// [`start`](DirtySource::start) creates a userfaultfd with
/// `UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED`, registers the range in
/// `UFFDIO_REGISTER_MODE_WP` and write-protects every page of it (populated or
/// not: unpopulated ptes get a uffd-wp marker). In asynchronous mode a write to
/// a protected page never reaches user space: the kernel resolves the fault
/// itself by clearing the page's uffd-wp bit, which is what "written" means.
/// That holds for writes from any thread and for the kernel's own writes into
/// the memory (`read(2)`, `recv(2)`, get_user_pages with write), so no handler
/// thread exists.
///
/// [`sync`](DirtySource::sync) issues `PAGEMAP_SCAN` on `/proc/self/pagemap`
/// with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`, category and return masks
/// `PAGE_IS_WRITTEN`: the kernel returns the written ranges and write-protects
/// them again in the same walk, pte by pte under the page-table lock, with the
/// TLB flushed before the ioctl returns. A write racing with a sync therefore
/// either cleared the bit before the scan reached its pte (reported now) or
/// faults on the re-protected pte and is reported by the next sync; none is lost.
/// The region array is allocated once (in `new`); a scan that fills it is
/// continued from the kernel's `walk_end`, so a sync allocates nothing.
///
/// [`stop`](DirtySource::stop) unregisters the range (which clears the
/// protection) and closes the userfaultfd; dropping the tracker does the same.
///
/// The fault-driven fallback (synchronous WP with a handler thread) is not
/// implemented: kernels without `UFFD_FEATURE_WP_ASYNC` or `PAGEMAP_SCAN` get
/// [`DirtyError::Unsupported`] naming what is missing.
///
/// # Creating the userfaultfd
///
/// Raw ioctls through `libc`, not the `userfaultfd` crate: that crate needs
/// libclang at build time (bindgen), has no names for `WP_ASYNC`/`WP_UNPOPULATED`
/// and does not expose the feature mask the kernel answers (so a refusal could
/// not say which feature is missing), and when `/dev/userfaultfd` exists but is
/// not accessible (root-only by default) it fails instead of falling back to the
/// `userfaultfd(2)` system call. Here the system call is tried first with
/// `UFFD_USER_MODE_ONLY`, which needs no privilege even with
/// `vm.unprivileged_userfaultfd = 0` (Linux ≥ 5.11) and is harmless in
/// asynchronous mode (kernel-mode writes are resolved by the kernel as well);
/// `/dev/userfaultfd` is the fallback when the system call is refused.
///
/// # Limits
///
/// Tracking granularity is 4 KiB (the page size must be 4 KiB). Anonymous,
/// shared-file and shmem mappings work, including memory populated (even with
/// transparent huge pages) before `start`. Writes that bypass the CPU page
/// tables of this process, such as device DMA into long-term pinned memory, are
/// not seen. A range can be tracked by only one userfaultfd at a time.
#[derive(Debug)]
pub struct UffdWriteProtect {
    addr: u64,
    len: u64,
    /// The userfaultfd while tracking.
    uffd: Option<OwnedFd>,
    /// `/proc/self/pagemap` while tracking.
    pagemap: Option<File>,
    regions: Box<[PageRegion]>,
    last: UffdSyncStats,
}

impl UffdWriteProtect {
    /// A tracker for the `len` bytes at `ptr` (both 4 KiB aligned, `len > 0`);
    /// nothing is tracked until [`start`](DirtySource::start).
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must be mapped memory of this process (anonymous, shmem
    /// or a shared file mapping, not hugetlbfs), and must stay mapped, with the
    /// same mapping, until the tracker is stopped or dropped.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Result<Self, DirtyError> {
        // SAFETY: same contract as ours.
        unsafe { Self::with_region_capacity(ptr, len, DEFAULT_REGIONS) }
    }

    /// As [`new`](Self::new), with room for `regions` written ranges per
    /// `PAGEMAP_SCAN` call (at least 1; the default is 1024, 24 KiB).
    ///
    /// # Safety
    ///
    /// As for [`new`](Self::new).
    pub unsafe fn with_region_capacity(ptr: *mut u8, len: usize, regions: usize) -> Result<Self, DirtyError> {
        page_size_is_4k()?;
        let addr = ptr as u64;
        if !addr.is_multiple_of(PAGE_SIZE) || !(len as u64).is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(DirtyError::Unsupported(format!(
                "range {addr:#x}+{len:#x} is not a non-empty multiple of {PAGE_SIZE}-byte pages"
            )));
        }
        if addr.checked_add(len as u64).is_none() {
            return Err(DirtyError::Unsupported(format!("range {addr:#x}+{len:#x} wraps around")));
        }
        Ok(UffdWriteProtect {
            addr,
            len: len as u64,
            uffd: None,
            pagemap: None,
            regions: vec![PageRegion::default(); regions.max(1)].into_boxed_slice(),
            last: UffdSyncStats::default(),
        })
    }

    /// Whether this kernel and process can use this tracker: a userfaultfd with
    /// asynchronous write-protection can be created and `PAGEMAP_SCAN` exists.
    /// The error says what is missing (kernel too old, permission, ...).
    pub fn probe() -> Result<(), DirtyError> {
        page_size_is_4k()?;
        drop(open_uffd_with_features()?);
        let pagemap = open_pagemap()?;
        // An empty scan: ENOTTY (or EINVAL) when the kernel has no PAGEMAP_SCAN.
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..PmScanArg::default()
        };
        // SAFETY: `arg` is a valid, exclusively borrowed pm_scan_arg with no output
        // vector; the kernel only reads and writes it.
        let r = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as libc::Ioctl, &mut arg) };
        if r < 0 {
            return Err(scan_unsupported(last_error()));
        }
        Ok(())
    }

    /// Pages covered (bits [`sync`](DirtySource::sync) may set).
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE
    }

    /// Whether tracking is on.
    pub fn is_started(&self) -> bool {
        self.uffd.is_some()
    }

    /// Counters of the last sync.
    pub fn last_sync(&self) -> UffdSyncStats {
        self.last
    }

    /// One `PAGEMAP_SCAN` from `start`, write-protecting what it reports.
    /// Returns (regions filled, walk end).
    fn scan(&mut self, pagemap: &File, start: u64, output: bool) -> io::Result<(usize, u64)> {
        let (vec, vec_len) =
            if output { (self.regions.as_mut_ptr() as u64, self.regions.len() as u64) } else { (0, 0) };
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start,
            end: self.addr + self.len,
            vec,
            vec_len,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..PmScanArg::default()
        };
        // SAFETY: `arg` is a valid pm_scan_arg borrowed for the call; `vec`, when
        // set, points to `vec_len` writable page_regions owned by `self.regions`,
        // which `&mut self` keeps borrowed and unmoved. The scanned range is ours
        // (the `new` contract keeps it mapped); the kernel only changes the
        // protection bits of its page tables.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as libc::Ioctl, &mut arg) };
        if n < 0 {
            return Err(last_error());
        }
        Ok((n as usize, arg.walk_end))
    }

    fn try_start(&mut self) -> Result<(), DirtyError> {
        let uffd = open_uffd_with_features()?;
        let mut reg = UffdioRegister {
            range: UffdioRange { start: self.addr, len: self.len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: `reg` is a valid uffdio_register borrowed for the call; the range
        // is ours by the `new` contract. Registering changes no memory contents.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as libc::Ioctl, &mut reg) } < 0 {
            let e = last_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => DirtyError::Unsupported(format!(
                    "UFFDIO_REGISTER: {e} (the range is already registered with another userfaultfd)"
                )),
                Some(libc::EINVAL) => DirtyError::Unsupported(format!(
                    "UFFDIO_REGISTER: {e} (the range is not entirely mapped, or this kind of memory \
                     cannot be write-protected by userfaultfd)"
                )),
                _ => os("UFFDIO_REGISTER", e),
            });
        }
        let pagemap = open_pagemap()?;
        // Write-protect the whole range: PAGEMAP_SCAN's write-protect-only path
        // (no output vector) also installs markers on unpopulated ptes. It is
        // what `sync` re-arms with, and fails here if PAGEMAP_SCAN is missing.
        let (_, walk_end) = self.scan(&pagemap, self.addr, false).map_err(scan_unsupported)?;
        if walk_end < self.addr + self.len {
            return Err(os("PAGEMAP_SCAN (initial write-protect)", io::ErrorKind::UnexpectedEof.into()));
        }
        self.uffd = Some(uffd);
        self.pagemap = Some(pagemap);
        Ok(())
    }

    fn try_sync(&mut self, pagemap: &File, out: &mut [u64]) -> Result<(), DirtyError> {
        let end = self.addr + self.len;
        let mut start = self.addr;
        while start < end {
            let (n, walk_end) = self.scan(pagemap, start, true).map_err(|e| os("PAGEMAP_SCAN", e))?;
            self.last.ioctls += 1;
            for r in &self.regions[..n.min(self.regions.len())] {
                let first = (r.start.max(self.addr) - self.addr) / PAGE_SIZE;
                let last = (r.end.min(end).saturating_sub(self.addr)).div_ceil(PAGE_SIZE);
                if last > first {
                    set_bit_range(out, first as usize, last as usize);
                    self.last.pages += last - first;
                }
            }
            self.last.regions += n as u64;
            if walk_end <= start && n == 0 {
                // No progress: never expected from the kernel, but never spin.
                return Err(os("PAGEMAP_SCAN (no progress)", io::ErrorKind::Other.into()));
            }
            start = walk_end;
        }
        Ok(())
    }
}

impl DirtySource for UffdWriteProtect {
    /// Create the userfaultfd, register the range and write-protect it. Starting
    /// while started discards what was dirtied since the last sync.
    fn start(&mut self) -> Result<(), DirtyError> {
        if self.is_started() {
            self.stop()?;
        }
        self.last = UffdSyncStats::default();
        self.try_start()
    }

    /// OR the pages written since the last sync (or `start`) into `out` and
    /// write-protect them again. On an error every page of the block is set in
    /// `out` (the scan may have re-armed pages it could not report).
    fn sync(&mut self, out: &mut [u64]) -> Result<(), DirtyError> {
        let pages = self.pages() as usize;
        if out.len() < pages.div_ceil(64) {
            return Err(os("sync: bitmap shorter than the block", io::ErrorKind::InvalidInput.into()));
        }
        let Some(pagemap) = self.pagemap.take() else {
            return Err(os("sync: tracking not started", io::ErrorKind::InvalidInput.into()));
        };
        self.last = UffdSyncStats::default();
        let r = self.try_sync(&pagemap, out);
        self.pagemap = Some(pagemap);
        if r.is_err() {
            set_bit_range(out, 0, pages);
        }
        r
    }

    /// Unregister the range (clearing its write-protection) and close the
    /// userfaultfd. Stopping a stopped tracker does nothing.
    fn stop(&mut self) -> Result<(), DirtyError> {
        self.pagemap = None;
        let Some(uffd) = self.uffd.take() else {
            return Ok(());
        };
        let mut range = UffdioRange { start: self.addr, len: self.len };
        // SAFETY: `range` is a valid uffdio_range borrowed for the call, over our
        // registered range. Closing `uffd` below would unregister it too.
        let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER as libc::Ioctl, &mut range) };
        let e = last_error();
        drop(uffd);
        if r < 0 {
            return Err(os("UFFDIO_UNREGISTER", e));
        }
        Ok(())
    }
}

impl Drop for UffdWriteProtect {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Set bits `first..end` of `out`, a word at a time.
fn set_bit_range(out: &mut [u64], mut first: usize, end: usize) {
    while first < end {
        let bit = first % 64;
        let n = (64 - bit).min(end - first);
        out[first / 64] |= if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
        first += n;
    }
}

fn page_size_is_4k() -> Result<(), DirtyError> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps != PAGE_SIZE as libc::c_long {
        return Err(DirtyError::Unsupported(format!("page size is {ps}, userfaultfd tracking needs {PAGE_SIZE}")));
    }
    Ok(())
}

fn open_pagemap() -> Result<File, DirtyError> {
    File::open("/proc/self/pagemap").map_err(|e| os("open /proc/self/pagemap", e))
}

fn scan_unsupported(e: io::Error) -> DirtyError {
    match e.raw_os_error() {
        Some(libc::ENOTTY) | Some(libc::EINVAL) => {
            DirtyError::Unsupported(format!("PAGEMAP_SCAN on /proc/self/pagemap: {e} (needs Linux 6.7 or later)"))
        }
        Some(libc::EPERM) => DirtyError::Unsupported(format!(
            "PAGEMAP_SCAN: {e} (part of the range is not registered for asynchronous write-protection)"
        )),
        _ => os("PAGEMAP_SCAN", e),
    }
}

/// A new userfaultfd (close-on-exec, non-blocking, user-mode faults only): the
/// `userfaultfd(2)` system call, else `/dev/userfaultfd`.
fn open_uffd() -> Result<OwnedFd, DirtyError> {
    crate::uffd_sys::open(libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY).map_err(|why| {
        DirtyError::Unsupported(format!(
            "{why} (needs CONFIG_USERFAULTFD, and Linux ≥ 5.11 for unprivileged user-mode-only userfaultfds, or \
             access to /dev/userfaultfd)"
        ))
    })
}

/// `UFFDIO_API` on `fd` asking for `features`; returns the kernel's answer
/// (all the features it supports, when `features` is 0).
fn uffd_api(fd: &OwnedFd, features: u64) -> io::Result<u64> {
    let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
    // SAFETY: `api` is a valid uffdio_api borrowed for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as libc::Ioctl, &mut api) } < 0 {
        return Err(last_error());
    }
    Ok(api.features)
}

/// A userfaultfd with asynchronous write-protection enabled.
fn open_uffd_with_features() -> Result<OwnedFd, DirtyError> {
    let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    let fd = open_uffd()?;
    match uffd_api(&fd, want) {
        Ok(_) => Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // Ask a fresh userfaultfd what the kernel has, to say what is missing.
            let have = open_uffd().ok().and_then(|fd| uffd_api(&fd, 0).ok());
            let missing = match have {
                Some(have) => {
                    let names: Vec<&str> = [
                        (UFFD_FEATURE_WP_ASYNC, "UFFD_FEATURE_WP_ASYNC"),
                        (UFFD_FEATURE_WP_UNPOPULATED, "UFFD_FEATURE_WP_UNPOPULATED"),
                    ]
                    .iter()
                    .filter(|(bit, _)| want & bit != 0 && have & bit == 0)
                    .map(|&(_, name)| name)
                    .collect();
                    let names = if names.is_empty() { vec!["no feature we asked for"] } else { names };
                    format!("kernel lacks {} (has features {have:#x})", names.join(", "))
                }
                None => "kernel refused the features".to_string(),
            };
            Err(DirtyError::Unsupported(format!(
                "UFFDIO_API: {e}: {missing}; asynchronous write-protection needs Linux 6.7 or later"
            )))
        }
        Err(e) => Err(os("UFFDIO_API", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_ranges() {
        let mut w = [0u64; 3];
        set_bit_range(&mut w, 3, 5);
        assert_eq!(w, [0b11000, 0, 0]);
        set_bit_range(&mut w, 60, 130);
        assert_eq!(w, [0b11000 | (0xF << 60), u64::MAX, 0b11]);
        set_bit_range(&mut w, 7, 7);
        assert_eq!(w[0].count_ones(), 6);
    }

    #[test]
    fn rejects_misaligned_ranges() {
        let mut buf = vec![0u8; 3 * PAGE_SIZE as usize];
        let p = buf.as_mut_ptr();
        // SAFETY: `buf` holds a whole aligned page after `aligned`, and nothing is
        // started: `new` only checks its arguments.
        unsafe {
            let aligned = p.add(p.align_offset(PAGE_SIZE as usize));
            assert!(UffdWriteProtect::new(aligned.add(1), 4096).is_err());
            assert!(UffdWriteProtect::new(aligned, 100).is_err());
            assert!(UffdWriteProtect::new(aligned, 0).is_err());
            assert!(UffdWriteProtect::new(aligned, 4096).is_ok());
        }
    }
}
