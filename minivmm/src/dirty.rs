//! KVM's dirty log as an engine [`DirtySource`]: logging is switched on per slot
//! (`KVM_MEM_LOG_DIRTY_PAGES`) at start and off at stop; each sync fetches every
//! slot's bitmap (`KVM_GET_DIRTY_LOG`) into a buffer sized once, re-protects the
//! reported pages with `KVM_CLEAR_DIRTY_LOG` when manual protection is on (the
//! kernel then does not write-protect the whole slot at each fetch), and ORs the
//! bits into the RAM block's page bitmap at the slot's offset.

use crate::layout::Layout;
use engine::dirty::{DirtyError, DirtySource};
use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use std::sync::Arc;
use vmm_sys_util::ioctl::ioctl_with_ref;

/// The dirty-log ioctl numbers, in a private module: the macros define them as `pub fn`.
mod nr {
    use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log};
    use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}
use nr::{KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG};

/// Per-slot registration and buffer.
struct SlotLog {
    region: kvm_userspace_memory_region,
    /// First page of the slot in the block.
    first_page: u64,
    pages: u64,
    bitmap: Vec<u64>,
}

/// KVM dirty logging of one RAM block's slots.
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    slots: Vec<SlotLog>,
    manual_protect: bool,
    /// Pages reported dirty by the last sync.
    pub last_dirty_pages: u64,
}

impl KvmDirtyLog {
    /// Tracking for `layout`'s slots as registered by the VM (`regions[i]` is slot i).
    pub(crate) fn new(vm: Arc<VmFd>, layout: &Layout, regions: &[kvm_userspace_memory_region], manual: bool) -> Self {
        let slots = layout
            .slots
            .iter()
            .zip(regions)
            .map(|(s, r)| {
                let pages = s.len / 4096;
                SlotLog { region: *r, first_page: s.offset / 4096, pages, bitmap: vec![0; pages.div_ceil(64) as usize] }
            })
            .collect();
        KvmDirtyLog { vm, slots, manual_protect: manual, last_dirty_pages: 0 }
    }

    /// Whether `KVM_CLEAR_DIRTY_LOG` (manual protection) is in use.
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    fn set_logging(&mut self, on: bool) -> Result<(), DirtyError> {
        for s in &mut self.slots {
            s.region.flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            // SAFETY: the region describes the same host mapping the VM registered at
            // creation (kept alive by the VM); only the flags change.
            unsafe { self.vm.set_user_memory_region(s.region) }.map_err(|e| os("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        Ok(())
    }
}

fn os(op: &'static str, e: kvm_ioctls::Error) -> DirtyError {
    DirtyError::Os { op, source: std::io::Error::from_raw_os_error(e.errno()) }
}

impl DirtySource for KvmDirtyLog {
    fn start(&mut self) -> Result<(), DirtyError> {
        self.set_logging(true)
    }

    fn sync(&mut self, out: &mut [u64]) -> Result<(), DirtyError> {
        let mut total = 0;
        for s in &mut self.slots {
            let log = kvm_dirty_log {
                slot: s.region.slot,
                padding1: 0,
                __bindgen_anon_1: kvm_bindings::kvm_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: s.bitmap.as_mut_ptr().cast(),
                },
            };
            // SAFETY: `log` points at a buffer of one bit per page of the slot, which is
            // what KVM_GET_DIRTY_LOG writes.
            if unsafe { ioctl_with_ref(&*self.vm, KVM_GET_DIRTY_LOG(), &log) } < 0 {
                return Err(DirtyError::Os { op: "KVM_GET_DIRTY_LOG", source: std::io::Error::last_os_error() });
            }
            if self.manual_protect {
                let clear = kvm_clear_dirty_log {
                    slot: s.region.slot,
                    num_pages: s.pages as u32,
                    first_page: 0,
                    __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                        dirty_bitmap: s.bitmap.as_mut_ptr().cast(),
                    },
                };
                // SAFETY: as above; KVM reads `num_pages` bits (the slot's size, a multiple of 64).
                if unsafe { ioctl_with_ref(&*self.vm, KVM_CLEAR_DIRTY_LOG(), &clear) } < 0 {
                    return Err(DirtyError::Os { op: "KVM_CLEAR_DIRTY_LOG", source: std::io::Error::last_os_error() });
                }
            }
            total += or_at(out, s.first_page, &s.bitmap, s.pages);
        }
        self.last_dirty_pages = total;
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        self.set_logging(false)
    }
}

/// OR `pages` bits of `src` into `out` starting at bit `at`; returns the bits set in `src`.
fn or_at(out: &mut [u64], at: u64, src: &[u64], pages: u64) -> u64 {
    let mut n = 0;
    if at.is_multiple_of(64) {
        let base = (at / 64) as usize;
        for (i, w) in src.iter().enumerate() {
            if let Some(o) = out.get_mut(base + i) {
                *o |= *w;
                n += w.count_ones() as u64;
            }
        }
        return n;
    }
    for (i, &w) in src.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let b = w.trailing_zeros() as u64;
            w &= w - 1;
            let p = i as u64 * 64 + b;
            if p < pages {
                let q = at + p;
                if let Some(o) = out.get_mut((q / 64) as usize) {
                    *o |= 1 << (q % 64);
                    n += 1;
                }
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::or_at;

    #[test]
    fn or_at_aligned_and_not() {
        let mut out = [0u64; 4];
        assert_eq!(or_at(&mut out, 64, &[0b101], 64), 2);
        assert_eq!(out, [0, 0b101, 0, 0]);
        let mut out = [0u64; 4];
        assert_eq!(or_at(&mut out, 3, &[1 | 1 << 63], 64), 2);
        assert_eq!(out, [1 << 3, 1 << 2, 0, 0]);
    }
}
