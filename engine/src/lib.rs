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
//! - `mmap` (feature `vm-memory`): a vm-memory `GuestMemoryMmap` as regions with
//!   no `unsafe` in the embedder, and its `AtomicBitmap` as a dirty source.
//! - [`precopy`]: the clock-free core of pre-copy: every decision (sync, send a
//!   part until a deadline, nap, switch over) as a step taking the time, the bytes
//!   sent and the devices' pending bytes; tested on simulated time.
//! - [`source`]: its driver ([`Outgoing`](source::Outgoing)): the I/O through a
//!   [`PageWriter`](source::PageWriter), cancel from any thread, `query-migrate`
//!   figures in [`info`] readable while it runs.
//! - [`vm`]: what the VMM supplies: [`VcpuControl`](vm::VcpuControl) to stop,
//!   resume and throttle its vCPUs, devices, block devices and migration
//!   blockers; every default refuses with a [`VmmError`](vm::VmmError).
//!   Devices are vmstate ([`DeviceHandler`](vm::DeviceHandler)), hand-written
//!   ([`RawDevice`](vm::RawDevice): the device's own bytes in a FULL section) or
//!   live ([`LiveDevice`](vm::LiveDevice): START/PART/END sections alongside RAM,
//!   pending bytes counted against the downtime limit).
//! - [`incoming`]: the destination: load RAM and devices, invalidate block caches,
//!   then resume or stay paused.
//! - [`sink`]: the destination's guest memory ([`GuestSink`](sink::GuestSink)): the
//!   stream's blocks checked against the guest's regions, pages placed at the
//!   stream's target page size.
//! - [`return_path`]: the source's return-path reader (a thread turning the
//!   destination's PONG, page requests and SHUT into events), standalone for now.
//! - [`error`]: who caused a failure ([`Origin`](error::Origin): local, peer, VMM,
//!   cancel; `EngineError::origin`, `IncomingError::origin`) and
//!   [`report`](error::report), an error with its causes on one line.
//!
//! A VMM on `vm-memory` (feature `vm-memory`) hands its `GuestMemoryMmap` over
//! with no `unsafe`, each region with the dirty sources that see its writes
//! (KVM's dirty log for the guest's, vm-memory's `AtomicBitmap` for the VMM's
//! own, ...):
//!
//! ```
//! use engine::mmap::MmapRam;
//! use std::sync::Arc;
//! use vm_memory::bitmap::AtomicBitmap;
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! // Two slots, split around a hole as x86 splits low and high memory.
//! let mem: Arc<GuestMemoryMmap<AtomicBitmap>> = Arc::new(GuestMemoryMmap::from_ranges(&[
//!     (GuestAddress(0), 2 << 20),
//!     (GuestAddress(4 << 20), 2 << 20),
//! ])?);
//! let ram = MmapRam::new(mem, |i| format!("ram{i}"))?;
//! let regions = ram.tracked(); // + .with_dirty(&mut kvm_log) for the guest's writes
//! assert_eq!(regions[1].memory().pages(), 512);
//! // outgoing.run(channel, &mut regions, &mut vcpus)
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod convergence;
pub mod dirty;
pub mod error;
pub mod incoming;
pub mod info;
pub mod memory;
#[cfg(feature = "vm-memory")]
pub mod mmap;
pub mod multifd;
pub mod params;
pub mod postcopy_dest;
pub mod precopy;
pub mod return_path;
pub mod sink;
pub mod source;
pub mod state;
mod uffd_sys;
pub mod vm;
pub mod xbzrle;
