//! The userfaultfd kernel ABI both of the engine's userfaultfd users share (the
//! write-protect dirty tracker, [`crate::dirty`], and the postcopy destination,
//! [`crate::postcopy_dest::uffd`]): ioctl encoding, the common `uffdio_*` structs and
//! ioctl numbers, and creating a userfaultfd.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// ioctl numbers (include/uapi/asm-generic/ioctl.h, and the architectures that
// override it)

#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
pub(crate) mod ioc {
    pub const NONE: u32 = 1;
    pub const READ: u32 = 2;
    pub const WRITE: u32 = 4;
    pub const SIZEBITS: u32 = 13;
}

#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
pub(crate) mod ioc {
    pub const NONE: u32 = 0;
    pub const READ: u32 = 2;
    pub const WRITE: u32 = 1;
    pub const SIZEBITS: u32 = 14;
}

/// `_IOC(dir, type, nr, size)`: `nr` in bits 0..8, `type` in 8..16, `size` in
/// 16..16+SIZEBITS, `dir` above.
pub(crate) const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < 1 << ioc::SIZEBITS);
    (dir << (16 + ioc::SIZEBITS)) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

// include/uapi/linux/userfaultfd.h
pub(crate) const UFFD_API: u64 = 0xAA;
pub(crate) const UFFDIO: u8 = 0xAA;

#[repr(C)]
pub(crate) struct UffdioApi {
    pub(crate) api: u64,
    pub(crate) features: u64,
    pub(crate) ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UffdioRange {
    pub(crate) start: u64,
    pub(crate) len: u64,
}

#[repr(C)]
pub(crate) struct UffdioRegister {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
    pub(crate) ioctls: u64,
}

pub(crate) const UFFDIO_API: u32 = ioc(ioc::READ | ioc::WRITE, UFFDIO, 0x3F, size_of::<UffdioApi>());
pub(crate) const UFFDIO_REGISTER: u32 = ioc(ioc::READ | ioc::WRITE, UFFDIO, 0x00, size_of::<UffdioRegister>());
pub(crate) const UFFDIO_UNREGISTER: u32 = ioc(ioc::READ, UFFDIO, 0x01, size_of::<UffdioRange>());
/// `/dev/userfaultfd`'s only ioctl: a new userfaultfd, the argument being its flags.
pub(crate) const USERFAULTFD_IOC_NEW: u32 = ioc(ioc::NONE, 0xAA, 0x00, 0);

/// A new userfaultfd with `flags`: the `userfaultfd(2)` system call, else
/// `/dev/userfaultfd`'s `USERFAULTFD_IOC_NEW`. The error says why both failed.
pub(crate) fn open(flags: libc::c_int) -> Result<OwnedFd, String> {
    // SAFETY: the userfaultfd system call takes an int of flags and returns a new
    // file descriptor or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: `fd` is a fresh descriptor we exclusively own.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
    }
    let syscall_err = io::Error::last_os_error();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|e| format!("userfaultfd(2): {syscall_err}; /dev/userfaultfd: {e}"))?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new file
    // descriptor or -1.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as libc::Ioctl, flags) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(format!("userfaultfd(2): {syscall_err}; /dev/userfaultfd USERFAULTFD_IOC_NEW: {e}"));
    }
    // SAFETY: `fd` is a fresh descriptor we exclusively own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const _: () = {
    assert!(size_of::<UffdioApi>() == 24);
    assert!(size_of::<UffdioRange>() == 16);
    assert!(size_of::<UffdioRegister>() == 32);
};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
const _: () = {
    assert!(UFFDIO_API == 0xC018_AA3F);
    assert!(UFFDIO_REGISTER == 0xC020_AA00);
    assert!(UFFDIO_UNREGISTER == 0x8010_AA01);
    assert!(USERFAULTFD_IOC_NEW == 0x0000_AA00);
};
