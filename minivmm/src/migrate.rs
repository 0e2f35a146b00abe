//! The embedding, end to end: what a VMM hands the engine to migrate a live KVM
//! guest out, and to take one in.
//!
//! ```no_run
//! use engine::params::{MigrationCapabilities, MigrationParameters, SharedParameters};
//! use engine::source::Outgoing;
//! use minivmm::{layout::Layout, GuestConfig, Vm};
//!
//! // Source: boot the guest, let it run, migrate it live over a unix socket.
//! let mut vm = Vm::new(Layout::pc_split(1 << 30)?)?;
//! vm.boot(GuestConfig { working_set: 256 << 20, dirty_rate: 64 << 20, seed: 1 })?;
//! engine::vm::VcpuControl::resume(&mut vm.vcpus())?;
//! let out = Outgoing::new(SharedParameters::new(MigrationParameters::default())?, MigrationCapabilities::default())?;
//! let ch = transports::connect(&"unix:/tmp/dest.sock".parse()?, out.cancel())?;
//! let info = minivmm::migrate::migrate_out(&vm, &out, ch)?;
//! println!("downtime {:?}", info.downtime);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::vm::Vm;
use engine::incoming::{Incoming, IncomingError, IncomingReport};
use engine::info::MigrationInfo;
use engine::memory::RamRegion;
use engine::source::{EngineError, Outgoing};
use engine::vm::{VmParts, VmmError};
use std::io::Read;
use transports::Channel;

/// Migrate `vm` (running or not) out over `ch` with `out`'s parameters: RAM with
/// KVM's dirty log, then the `cpu` section at switchover. On success the guest
/// stays stopped here; on failure or cancel it runs on.
pub fn migrate_out(vm: &Vm, out: &Outgoing, ch: Channel) -> Result<MigrationInfo, EngineError> {
    let region = vm.region().map_err(|e| EngineError::Vmm(VmmError::new(e)))?;
    let mut vcpus = vm.vcpus();
    let mut cpu = vm.cpu_device();
    let mut ram = [RamRegion::new(&region).with_dirty(vm.dirty_log())];
    let mut parts = VmParts { devices: vec![&mut cpu], ..Default::default() };
    out.run_vm(ch, &mut ram, &mut vcpus, &mut parts)
}

/// Load an incoming migration from `reader` into `vm` (RAM straight into guest
/// memory, then the vCPU state) and, with `autostart`, resume the guest.
pub fn migrate_in<R: Read>(vm: &mut Vm, reader: R, autostart: bool) -> Result<IncomingReport, IncomingError> {
    let mut vcpus = vm.vcpus();
    let mut cpu = vm.cpu_device();
    let mut parts = VmParts { devices: vec![&mut cpu], ..Default::default() };
    Incoming::new(autostart).run(reader, &mut vm.sink(), &mut parts, &mut vcpus)
}
