//! A minimal KVM VMM that embeds the qmig engine: the reference for embedders.
//!
//! One x86-64 vCPU runs a tiny guest program ([`guest`]) that keeps writing a
//! counter into its working set at a set rate and maintains a checksum of it.
//! Guest RAM is one `pc.ram` block (vm-memory) in one or two KVM slots
//! ([`layout`]); KVM's dirty log ([`dirty`]) is the engine's dirty source; the vCPU
//! registers travel as the vmstate device `cpu` ([`cpu`]). [`migrate`] shows the
//! whole embedding: a live pre-copy out, and an incoming side that loads RAM and
//! vCPU state and resumes the guest.

#![warn(missing_docs)]
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

pub mod cpu;
pub mod dirty;
pub mod guest;
pub mod layout;
pub mod migrate;
mod vm;

pub use vm::{kvm_unavailable, Control, CpuDevice, GuestConfig, RamSink, Vcpus, Vm, VmError, RAM_BLOCK};
