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
//! The pre-copy loop, the VMM traits (vCPU control, devices, block devices,
//! blockers) and the incoming side build on these.

pub mod convergence;
pub mod dirty;
pub mod info;
pub mod params;
pub mod source;
pub mod state;
pub mod synthetic;
