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
use engine::incoming::{channel_return_path, Incoming, IncomingError, IncomingReport};
use engine::info::MigrationInfo;
use engine::memory::RamRegion;
use engine::postcopy_dest::PostcopyOptions;
use engine::source::{EngineError, Outgoing};
use engine::vm::{DeviceHandler, VmParts, VmmError};
use transports::{Channel, MigrationReader, RateLimit};

/// Migrate `vm` (running or not) out over `ch` with `out`'s parameters: RAM with
/// KVM's dirty log, then one `cpu` section per vCPU at switchover. On success the guest
/// stays stopped here; on failure or cancel it runs on.
pub fn migrate_out(vm: &Vm, out: &Outgoing, ch: Channel) -> Result<MigrationInfo, EngineError> {
    let region = vm.region().map_err(|e| EngineError::Vmm(VmmError::new(e)))?;
    let mut vcpus = vm.vcpus();
    let mut cpus = vm.cpu_devices();
    let mut ram = [RamRegion::new(&region).with_dirty(vm.dirty_log())];
    let devices = cpus.iter_mut().map(|c| c as &mut dyn DeviceHandler).collect();
    let mut parts = VmParts { devices, ..Default::default() };
    out.run_vm(ch, &mut ram, &mut vcpus, &mut parts)
}

/// [`migrate_out`] with capability `multifd`: `channels` are the `multifd-channels`
/// extra connections (connected after `ch`), each with a sender thread.
pub fn migrate_out_multifd(
    vm: &Vm,
    out: &Outgoing,
    ch: Channel,
    channels: Vec<Channel>,
) -> Result<MigrationInfo, EngineError> {
    multifd_out(vm, out, ch, channels, false)
}

/// [`migrate_out_multifd`] with channels whose initial packets were written as each
/// connected ([`engine::multifd::announce`], QEMU 7.2's order).
pub fn migrate_out_multifd_announced(
    vm: &Vm,
    out: &Outgoing,
    ch: Channel,
    channels: Vec<Channel>,
) -> Result<MigrationInfo, EngineError> {
    multifd_out(vm, out, ch, channels, true)
}

fn multifd_out(
    vm: &Vm,
    out: &Outgoing,
    ch: Channel,
    channels: Vec<Channel>,
    announced: bool,
) -> Result<MigrationInfo, EngineError> {
    let region = vm.region().map_err(|e| EngineError::Vmm(VmmError::new(e)))?;
    let mut vcpus = vm.vcpus();
    let mut cpus = vm.cpu_devices();
    let mut ram = [RamRegion::new(&region).with_dirty(vm.dirty_log())];
    let devices = cpus.iter_mut().map(|c| c as &mut dyn DeviceHandler).collect();
    let mut parts = VmParts { devices, ..Default::default() };
    if announced {
        out.run_multifd_announced(ch, channels, &mut ram, &mut vcpus, &mut parts)
    } else {
        out.run_multifd(ch, channels, &mut ram, &mut vcpus, &mut parts)
    }
}

/// [`migrate_in`] with capability `multifd`: `channels` (accepted and identified)
/// place their pages straight into guest memory from a thread each.
pub fn migrate_in_multifd(
    vm: &mut Vm,
    ch: Channel,
    channels: engine::multifd::IncomingChannels,
    autostart: bool,
) -> Result<IncomingReport, IncomingError> {
    let mut vcpus = vm.vcpus();
    let mut cpus = vm.cpu_devices();
    let devices = cpus.iter_mut().map(|c| c as &mut dyn DeviceHandler).collect();
    let mut parts = VmParts { devices, ..Default::default() };
    let open = channel_return_path(&ch);
    let main = ch.return_path().ok();
    let channels = channels.on_failure(move || {
        if let Some(m) = &main {
            let _ = m.shutdown(std::net::Shutdown::Read);
        }
    });
    let reader = MigrationReader::new(ch, RateLimit::new(0));
    Incoming::new(autostart).run_multifd(reader, channels, &mut vm.sink(), &mut parts, &mut vcpus, open)
}

/// Load an incoming migration from `ch` into `vm` (RAM straight into guest
/// memory, then the vCPU state) and, with `autostart`, resume the guest. A source
/// with `return-path` gets its PONGs and, once everything loaded, SHUT(0) (SHUT(1)
/// on failure) on the channel's reverse direction.
pub fn migrate_in(vm: &mut Vm, ch: Channel, autostart: bool) -> Result<IncomingReport, IncomingError> {
    let mut vcpus = vm.vcpus();
    let mut cpus = vm.cpu_devices();
    let devices = cpus.iter_mut().map(|c| c as &mut dyn DeviceHandler).collect();
    let mut parts = VmParts { devices, ..Default::default() };
    let open = channel_return_path(&ch);
    let reader = MigrationReader::new(ch, RateLimit::new(0));
    Incoming::new(autostart).run_with_return_path(reader, &mut vm.sink(), &mut parts, &mut vcpus, open)
}

/// [`migrate_in`] with capability `postcopy-ram` on this side: when the source
/// switches to postcopy, guest RAM (anonymous memory) is registered with
/// userfaultfd at POSTCOPY_LISTEN, the vCPUs resume at POSTCOPY_RUN (with
/// `autostart`) and run while the rest of the pages arrive: a vCPU touching a page
/// not there yet faults through KVM into the userfaultfd, which asks the source for
/// it. A stream without postcopy loads as with `migrate_in`.
pub fn migrate_in_postcopy(
    vm: &mut Vm,
    ch: Channel,
    autostart: bool,
    options: PostcopyOptions,
) -> Result<IncomingReport, IncomingError> {
    migrate_in_postcopy_with(vm, ch, Incoming::new(autostart).with_postcopy(options))
}

/// [`migrate_in_postcopy`] with an [`Incoming`] set up by the caller (e.g.
/// [`Incoming::hold_after_precopy`]); it must have postcopy on.
pub fn migrate_in_postcopy_with(vm: &mut Vm, ch: Channel, incoming: Incoming) -> Result<IncomingReport, IncomingError> {
    let mut vcpus = vm.vcpus();
    let mut cpus = vm.cpu_devices();
    let devices = cpus.iter_mut().map(|c| c as &mut dyn DeviceHandler).collect();
    let mut parts = VmParts { devices, ..Default::default() };
    let open = channel_return_path(&ch);
    let reader = MigrationReader::new(ch, RateLimit::new(0));
    incoming.run_postcopy(reader, &mut vm.sink(), &mut parts, &mut vcpus, open)
}
