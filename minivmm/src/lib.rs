//! A minimal KVM VMM that embeds the qmig engine: the reference for embedders.
//!
//! Each x86-64 vCPU (one or more) runs a tiny guest program ([`guest`]) that
//! keeps writing its counter into its slice of the working set at a set rate and
//! maintains a checksum of it, or a raw firmware image runs from the reset
//! vector instead ([`Vm::map_firmware`], QEMU's `-bios`).
//! Guest RAM is one `pc.ram` block (vm-memory) in one or two KVM slots
//! ([`layout`]); KVM's dirty log ([`dirty`]) is the engine's dirty source; each vCPU's
//! state (registers, CPUID, MSRs, FPU/XSAVE, local APIC, events...) travels as
//! its own instance of the vmstate device `cpu` ([`cpu`]). [`migrate`] shows the
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

pub use vm::{kvm_unavailable, Control, CpuDevice, GuestConfig, RamSink, Vcpus, Vm, VmError, VmOptions, RAM_BLOCK};
