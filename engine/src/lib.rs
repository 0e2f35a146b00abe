//! # engine
//!
//! The policy side of live migration, in QEMU's manner. This first part holds the
//! pieces the pre-copy loop is built from, each testable on its own:
//!
//! - [`dirty`]: the page-granular atomic [`DirtyBitmap`](dirty::DirtyBitmap) a VMM
//!   marks, and the [`DirtySource`](dirty::DirtySource) trait for sources the engine
//!   harvests at each sync (combined by OR, no allocation per sync).
//! - [`convergence`]: bandwidth windows, the `downtime-limit` threshold, QEMU 7.2's
//!   complete-or-iterate decision, expected downtime and auto-converge steps, as
//!   pure functions.
//! - [`params`]: `migrate-set-parameters` values and capabilities with QEMU's names,
//!   defaults and ranges, changeable while running.
//! - [`state`]: the migration states with QEMU's names, the legal transitions of
//!   each side, and notifiers (callbacks or crossbeam channels).
//!
//! - [`memory`]: guest RAM as volatile views ([`GuestRegion`](memory::GuestRegion),
//!   never `&[u8]` over memory the guest writes) and
//!   [`RamRegion`](memory::RamRegion): one region with the dirty sources that
//!   report its writes.
//! - [`precopy`]: the clock-free core of pre-copy: every decision (sync, send a
//!   part until a deadline, nap, switch over) as a step taking the time, the bytes
//!   sent and the devices' pending bytes; tested on simulated time.
//! - [`source`]: its driver ([`Outgoing`](source::Outgoing)): the I/O through a
//!   [`PageWriter`](source::PageWriter), cancel from any thread, `query-migrate`
//!   figures in [`info`] readable while it runs; [`VcpuControl`](source::VcpuControl)
//!   is what the VMM supplies to stop, resume and throttle its vCPUs.
//! - [`vm`]: devices, block devices and migration blockers; every default refuses.
//!   Devices are vmstate ([`DeviceHandler`](vm::DeviceHandler)), hand-written
//!   ([`RawDevice`](vm::RawDevice): the device's own bytes in a FULL section) or
//!   live ([`LiveDevice`](vm::LiveDevice): START/PART/END sections alongside RAM,
//!   pending bytes counted against the downtime limit).
//! - [`incoming`]: the destination: load RAM and devices, invalidate block caches,
//!   then resume or stay paused.
//!
//! A VMM on `vm-memory` builds its regions from its `GuestMemoryMmap` in a few
//! lines, each with the dirty sources that see its writes (KVM's dirty log, a
//! bitmap its device emulation marks, ...):
//!
//! ```
//! use engine::dirty::DirtyBitmap;
//! use engine::memory::{GuestRegion, RamRegion};
//! use std::sync::Arc;
//! use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
//!
//! // Two slots, split around a hole as x86 splits low and high memory.
//! let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
//!     (GuestAddress(0), 2 << 20),
//!     (GuestAddress(4 << 20), 2 << 20),
//! ])?;
//! let regions: Vec<GuestRegion> = mem
//!     .iter()
//!     .enumerate()
//!     .filter_map(|(i, r)| {
//!         let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
//!         // SAFETY: the regions stay mapped as long as `mem` lives, beyond the migration.
//!         unsafe { GuestRegion::new(format!("ram{i}"), host, r.len() as usize) }
//!     })
//!     .collect();
//! // The pages the VMM itself writes (virtio queues, say) are marked here.
//! let marks: Vec<Arc<DirtyBitmap>> = regions.iter().map(|r| Arc::new(DirtyBitmap::new(r.pages()))).collect();
//! let ram: Vec<RamRegion> = regions.iter().zip(&marks).map(|(r, m)| RamRegion::new(r).with_dirty(m.clone())).collect();
//! assert_eq!(ram.len(), 2);
//! assert_eq!(ram[1].memory().pages(), 512);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod convergence;
pub mod dirty;
pub mod incoming;
pub mod info;
pub mod memory;
pub mod params;
pub mod precopy;
pub mod source;
pub mod state;
pub mod vm;
