//! The VM: KVM VM (in-kernel local APICs) and its vCPUs, guest RAM as one
//! `pc.ram` block mapped into the layout's slots, one thread per vCPU with
//! stop/resume/throttle, and everything the engine needs from it (region, dirty
//! log, one `cpu` device per vCPU, page sink).

use crate::cpu::{self, CpuState, MSR_IA32_TSC, MSR_MTRR_DEF_TYPE};
use crate::dirty::KvmDirtyLog;
use crate::guest::{self, ctrl, ctrl_addr, CODE_ADDR, GDT_ADDR, MAX_VCPUS, PML4_ADDR, WORKING_SET_MIN};
use crate::layout::{Firmware, Layout, LayoutError};
use engine::source::GuestRegion;
use engine::vm::{DeviceHandler, VcpuControl, VmmError};
use kvm_bindings::{
    kvm_enable_cap, kvm_mp_state, kvm_msr_entry, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use savevm_format::vmstate::{State, Vmsd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Name of the RAM block in the migration stream (as QEMU's PC machines).
pub const RAM_BLOCK: &str = "pc.ram";
const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u64 = 168;
const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1;
/// `KVM_CAP_XSAVE2`: the size of the vCPU's XSAVE state when it exceeds 4 KiB.
const KVM_CAP_XSAVE2: u32 = 208;
/// Throttle time slice (QEMU's CPU_THROTTLE_TIMESLICE_NS).
const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// Failures of the VMM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// `/dev/kvm` or an ioctl failed.
    #[error("{op}")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The RAM layout is unusable.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest configuration does not fit the RAM.
    #[error("guest: {0}")]
    Config(String),
    /// The vCPU did not do what it was asked.
    #[error("vCPU: {0}")]
    Vcpu(String),
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm { op, source: std::io::Error::from_raw_os_error(e.errno()) }
}

/// Why `/dev/kvm` cannot run our guest here, or `None` when it can.
pub fn kvm_unavailable() -> Option<String> {
    match Kvm::new() {
        Err(e) => Some(format!("/dev/kvm: {}", std::io::Error::from_raw_os_error(e.errno()))),
        Ok(k) if !k.check_extension(Cap::UserMemory) => Some("KVM lacks KVM_CAP_USER_MEMORY".into()),
        Ok(_) => None,
    }
}

/// What the guest program does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestConfig {
    /// Bytes of the working set (split over the slots, filled with random words at boot).
    pub working_set: u64,
    /// Bytes per second of page writes (one word per page); 0 = none.
    pub dirty_rate: u64,
    /// Seed of the working set's content and of the page choice.
    pub seed: u64,
}

/// A snapshot of the guest's control block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Control {
    /// Loop iterations.
    pub counter: u64,
    /// The guest's checksum of its working set.
    pub checksum: u64,
    /// Page writes.
    pub writes: u64,
    /// A write was in progress.
    pub busy: bool,
}

#[derive(Default)]
struct Ctl {
    /// The vCPU should run.
    run: bool,
    /// The vCPU thread is parked (not in KVM_RUN).
    parked: bool,
    quit: bool,
    throttle: u8,
    throttle_due: bool,
    /// Why the vCPU stopped on its own.
    error: Option<String>,
    /// The vCPU thread, for kicks.
    thread: Option<libc::pthread_t>,
    /// Returns from KVM_RUN.
    exits: u64,
    /// The vCPU has entered the guest at least once.
    ran: bool,
}

struct VcpuShared {
    /// The vCPU's index (its KVM vCPU id and APIC id).
    index: usize,
    fd: Mutex<VcpuFd>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

impl VcpuShared {
    fn kick(&self, c: &Ctl) {
        if let Some(t) = c.thread {
            // SAFETY: `t` is the vCPU thread, which clears it under this lock before it
            // exits; the signal has a no-op handler, so it only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Ask the vCPU to park (without waiting).
    fn request_stop(&self) {
        let mut c = lock(&self.ctl);
        c.run = false;
        self.kick(&c);
    }

    /// Park the vCPU; kicks until it is out of KVM_RUN.
    fn stop(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut c = lock(&self.ctl);
        c.run = false;
        while !c.parked {
            if Instant::now() > deadline {
                return Err(format!("vCPU {} did not stop within 2 s", self.index));
            }
            self.kick(&c);
            c = self.cv.wait_timeout(c, Duration::from_millis(1)).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), String> {
        let mut c = lock(&self.ctl);
        if let Some(e) = &c.error {
            return Err(format!("vCPU {} stopped: {e}", self.index));
        }
        c.run = true;
        self.cv.notify_all();
        Ok(())
    }

    /// The vCPU fd, only while the vCPU is parked.
    fn parked_fd(&self) -> Result<MutexGuard<'_, VcpuFd>, String> {
        if !lock(&self.ctl).parked {
            return Err(format!("vCPU {} is running", self.index));
        }
        Ok(lock(&self.fd))
    }

    fn run_loop(&self) {
        {
            let mut c = lock(&self.ctl);
            // SAFETY: pthread_self has no preconditions.
            c.thread = Some(unsafe { libc::pthread_self() });
        }
        loop {
            let mut c = lock(&self.ctl);
            while !c.run || c.quit {
                if c.quit {
                    c.thread = None;
                    c.parked = true;
                    self.cv.notify_all();
                    return;
                }
                c.parked = true;
                self.cv.notify_all();
                c = self.cv.wait(c).unwrap_or_else(|e| e.into_inner());
            }
            c.parked = false;
            c.ran = true;
            drop(c);
            let mut fd = lock(&self.fd);
            let exit = match fd.run() {
                Ok(VcpuExit::Intr) => None,
                Ok(other) => Some(format!("unexpected exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(format!("KVM_RUN: {}", std::io::Error::from_raw_os_error(e.errno()))),
            };
            drop(fd);
            let mut c = lock(&self.ctl);
            c.exits += 1;
            if let Some(e) = exit {
                c.error = Some(e);
                c.run = false;
                continue;
            }
            if c.throttle_due && c.throttle > 0 {
                c.throttle_due = false;
                let p = c.throttle.min(99) as u32;
                drop(c);
                std::thread::sleep(THROTTLE_SLICE * p / (100 - p));
            }
        }
    }
}

/// Stop, resume and throttle all the VM's vCPUs together (cloneable; what the engine drives).
#[derive(Clone)]
pub struct Vcpus(Arc<[Arc<VcpuShared>]>);

impl VcpuControl for Vcpus {
    fn stop(&mut self) -> Result<(), VmmError> {
        self.stop_all()?;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        self.resume_all()?;
        Ok(())
    }
    fn set_throttle(&mut self, percentage: u8) -> Result<(), VmmError> {
        for v in self.0.iter() {
            lock(&v.ctl).throttle = percentage.min(99);
        }
        Ok(())
    }
}

impl Vcpus {
    /// Every vCPU asked to stop first, then each waited for (they stop together).
    fn stop_all(&self) -> Result<(), String> {
        self.0.iter().for_each(|v| v.request_stop());
        self.0.iter().try_for_each(|v| v.stop())
    }

    fn resume_all(&self) -> Result<(), String> {
        self.0.iter().try_for_each(|v| v.resume())
    }

    /// How many vCPUs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never: a VM has at least one vCPU.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every vCPU is out of KVM_RUN.
    pub fn is_parked(&self) -> bool {
        self.0.iter().all(|v| lock(&v.ctl).parked)
    }

    /// Returns from KVM_RUN so far, all vCPUs together (kicks for stop and throttle).
    pub fn exits(&self) -> u64 {
        self.0.iter().map(|v| lock(&v.ctl).exits).sum()
    }

    /// Why a vCPU stopped on its own, if one did (the first such vCPU).
    pub fn error(&self) -> Option<String> {
        self.0.iter().find_map(|v| lock(&v.ctl).error.clone().map(|e| format!("vCPU {}: {e}", v.index)))
    }
}

/// A failed vCPU ioctl: the OS error as the cause, the ioctl as where (the engine adds `device 'cpu'`).
fn cpu_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |x| VmmError::new(std::io::Error::from_raw_os_error(x.errno())).at(op)
}

/// One vCPU's state as the engine's `cpu` device (instance id = vCPU index).
pub struct CpuDevice {
    vcpu: Arc<VcpuShared>,
    vmsd: Arc<Vmsd>,
    /// The MSRs to carry (saveable per KVM and readable on this vCPU).
    msr_list: Arc<[u32]>,
}

fn msr_entries(entries: impl IntoIterator<Item = (u32, u64)>) -> Result<Vec<Msrs>, VmmError> {
    let all: Vec<kvm_msr_entry> =
        entries.into_iter().map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    all.chunks(KVM_MAX_MSR_ENTRIES)
        .map(|c| Msrs::from_entries(c).map_err(|x| VmmError::msg(format!("cpu: msrs: {x:?}"))))
        .collect()
}

impl CpuDevice {
    /// The vCPU's full state now (the vCPU must be stopped).
    pub fn state(&self) -> Result<CpuState, VmmError> {
        let fd = self.vcpu.parked_fd()?;
        let regs = fd.get_regs().map_err(cpu_err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(cpu_err("KVM_GET_SREGS"))?;
        let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(cpu_err("KVM_GET_CPUID2"))?.as_slice().to_vec();
        let mut msrs = vec![];
        for mut chunk in msr_entries(
            [MSR_IA32_TSC, MSR_MTRR_DEF_TYPE].into_iter().chain(self.msr_list.iter().copied()).map(|i| (i, 0)),
        )? {
            let n = fd.get_msrs(&mut chunk).map_err(cpu_err("KVM_GET_MSRS"))?;
            if let Some(e) = chunk.as_slice().get(n) {
                return Err(format!("cpu: KVM_GET_MSRS refused MSR {:#x}", e.index).into());
            }
            msrs.extend(chunk.as_slice().iter().map(|e| (e.index, e.data)));
        }
        let [(_, tsc), (_, mtrr_def_type)] = msrs.drain(..2.min(msrs.len())).collect::<Vec<_>>()[..] else {
            return Err("cpu: KVM_GET_MSRS did not return TSC and MTRRdefType".into());
        };
        let tsc_khz = fd.get_tsc_khz().map_err(cpu_err("KVM_GET_TSC_KHZ"))?;
        let mp_state = fd.get_mp_state().map_err(cpu_err("KVM_GET_MP_STATE"))?.mp_state;
        let fpu = fd.get_fpu().map_err(cpu_err("KVM_GET_FPU"))?;
        let xsave = cpu::xsave_bytes(&fd.get_xsave().map_err(cpu_err("KVM_GET_XSAVE"))?);
        let xcrs = fd.get_xcrs().map_err(cpu_err("KVM_GET_XCRS"))?;
        let lapic = cpu::lapic_bytes(&fd.get_lapic().map_err(cpu_err("KVM_GET_LAPIC"))?);
        let debugregs = fd.get_debug_regs().map_err(cpu_err("KVM_GET_DEBUGREGS"))?;
        let events = fd.get_vcpu_events().map_err(cpu_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(CpuState {
            regs,
            sregs,
            tsc,
            tsc_khz,
            mtrr_def_type,
            cpuid,
            msrs,
            mp_state,
            fpu,
            xsave,
            xcrs,
            lapic,
            debugregs,
            events,
        })
    }

    /// Set the vCPU's full state (the vCPU must be stopped and, for CPUID, never
    /// have run). Order, as Cloud Hypervisor and QEMU: TSC frequency (when it
    /// differs), CPUID, mp_state, registers,
    /// special registers (APIC base, EFER), FPU, XSAVE, XCRs, local APIC, MSRs
    /// (TSC and MTRRdefType among them), debug registers, events last.
    pub fn set_state(&self, c: &CpuState) -> Result<(), VmmError> {
        let fd = self.vcpu.parked_fd()?;
        if c.tsc_khz != 0 && fd.get_tsc_khz().map_err(cpu_err("KVM_GET_TSC_KHZ"))? != c.tsc_khz {
            fd.set_tsc_khz(c.tsc_khz).map_err(cpu_err("KVM_SET_TSC_KHZ"))?;
        }
        let cpuid = kvm_bindings::CpuId::from_entries(&c.cpuid)
            .map_err(|x| VmmError::msg(format!("cpu: {} CPUID entries: {x:?}", c.cpuid.len())))?;
        fd.set_cpuid2(&cpuid).map_err(cpu_err("KVM_SET_CPUID2"))?;
        fd.set_mp_state(kvm_mp_state { mp_state: c.mp_state }).map_err(cpu_err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&c.regs).map_err(cpu_err("KVM_SET_REGS"))?;
        fd.set_sregs(&c.sregs).map_err(cpu_err("KVM_SET_SREGS"))?;
        fd.set_fpu(&c.fpu).map_err(cpu_err("KVM_SET_FPU"))?;
        let xsave = cpu::xsave_from_bytes(&c.xsave).ok_or("cpu: the XSAVE area is not 4096 bytes")?;
        // SAFETY: KVM_SET_XSAVE reads sizeof(struct kvm_xsave) = 4096 bytes, all of
        // `xsave`; `Vm::with_vcpus` refuses vCPUs whose XSAVE state is larger
        // (KVM_CAP_XSAVE2), so nothing past the struct is needed.
        unsafe { fd.set_xsave(&xsave) }.map_err(cpu_err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&c.xcrs).map_err(cpu_err("KVM_SET_XCRS"))?;
        let lapic = cpu::lapic_from_bytes(&c.lapic).ok_or("cpu: the local APIC page is not 1024 bytes")?;
        fd.set_lapic(&lapic).map_err(cpu_err("KVM_SET_LAPIC"))?;
        let all = c.msrs.iter().copied().chain([(MSR_IA32_TSC, c.tsc), (MSR_MTRR_DEF_TYPE, c.mtrr_def_type)]);
        for chunk in msr_entries(all)? {
            let n = fd.set_msrs(&chunk).map_err(cpu_err("KVM_SET_MSRS"))?;
            if let Some(e) = chunk.as_slice().get(n) {
                return Err(format!("cpu: KVM_SET_MSRS refused MSR {:#x} = {:#x}", e.index, e.data).into());
            }
        }
        fd.set_debug_regs(&c.debugregs).map_err(cpu_err("KVM_SET_DEBUGREGS"))?;
        fd.set_vcpu_events(&c.events).map_err(cpu_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

impl DeviceHandler for CpuDevice {
    fn idstr(&self) -> &str {
        cpu::IDSTR
    }
    fn instance_id(&self) -> u32 {
        self.vcpu.index as u32
    }
    fn vmsd(&self) -> Arc<Vmsd> {
        self.vmsd.clone()
    }
    fn save(&mut self) -> Result<State, VmmError> {
        Ok(self.state()?.to_state())
    }
    fn load(&mut self, version: u32, state: State) -> Result<(), VmmError> {
        if version != cpu::VERSION {
            return Err(format!("cpu: version {version} unknown (this VMM carries version {})", cpu::VERSION).into());
        }
        self.set_state(&CpuState::from_state(&state)?)
    }
}

/// How a [`Vm`] is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmOptions {
    /// Back guest RAM with transparent huge pages where the kernel offers them
    /// (`MADV_HUGEPAGE`): fewer faults and TLB misses, a 2 MiB page cleared per
    /// first touch. On by default.
    pub huge_pages: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions { huge_pages: true }
    }
}

/// A KVM VM whose vCPUs each run the guest program.
pub struct Vm {
    vm: Arc<VmFd>,
    layout: Layout,
    /// Owns the RAM block's mapping (the slot views in `mem` borrow it).
    ram: Arc<MmapRegion>,
    mem: GuestMemoryMmap,
    regions: Vec<kvm_userspace_memory_region>,
    vcpus: Arc<[Arc<VcpuShared>]>,
    threads: Vec<JoinHandle<()>>,
    /// The MSRs every `cpu` section carries.
    msr_list: Arc<[u32]>,
    ticker: Option<JoinHandle<()>>,
    manual_protect: bool,
    tsc_khz: u32,
    config: Option<GuestConfig>,
    /// The VMM has written guest RAM (boot or an incoming migration).
    written: bool,
    /// Guest RAM was advised MADV_HUGEPAGE and the kernel took it.
    huge_pages: bool,
    /// A firmware image mapped read-only below 4 GiB (not part of `pc.ram`).
    rom: Option<Rom>,
}

/// A firmware image in its own host mapping, a KVM read-only slot.
struct Rom {
    map: MmapRegion,
    firmware: Firmware,
}

static SIGNAL: Once = Once::new();

impl Vm {
    /// A VM with `layout`'s RAM (all zero) and one parked vCPU, not booted.
    pub fn new(layout: Layout) -> Result<Vm, VmError> {
        Self::with_vcpus(layout, 1)
    }

    /// A VM with `layout`'s RAM (all zero) and `vcpus` parked vCPUs (1 to
    /// [`MAX_VCPUS`]), each with its own thread, not booted.
    pub fn with_vcpus(layout: Layout, vcpus: usize) -> Result<Vm, VmError> {
        Self::with_options(layout, vcpus, VmOptions::default())
    }

    /// [`with_vcpus`](Self::with_vcpus) with `options` (transparent huge pages).
    pub fn with_options(layout: Layout, vcpus: usize, options: VmOptions) -> Result<Vm, VmError> {
        layout.validate()?;
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(VmError::Config(format!("{vcpus} vCPUs: this VMM runs 1 to {MAX_VCPUS}")));
        }
        SIGNAL.call_once(|| {
            let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick);
        });
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        // In-kernel local APICs (and PIC/IOAPIC): the state a guest kernel relies on.
        vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let xsave2 = vm.check_extension_raw(KVM_CAP_XSAVE2 as _);
        if xsave2 > cpu::XSAVE_LEN as i32 {
            return Err(VmError::Config(format!(
                "the vCPUs' XSAVE state is {xsave2} bytes (KVM_CAP_XSAVE2); this VMM carries {} bytes",
                cpu::XSAVE_LEN
            )));
        }
        let manual_protect = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as _) > 0
            && vm
                .enable_cap(&kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as u32,
                    args: [KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, 0, 0, 0],
                    ..Default::default()
                })
                .is_ok();

        let ram =
            Arc::new(MmapRegion::new(layout.ram_size as usize).map_err(|e| VmError::Memory(format!("mmap: {e}")))?);
        // Best effort: a kernel without THP (or with it set to `never`) refuses, and
        // the RAM stays in 4 KiB pages.
        let huge_pages = options.huge_pages
            // SAFETY: the whole of a private anonymous mapping we own and keep mapped;
            // MADV_HUGEPAGE only changes how later faults are served, not contents.
            && unsafe { libc::madvise(ram.as_ptr().cast(), ram.size(), libc::MADV_HUGEPAGE) } == 0;
        let mut views = vec![];
        let mut regions = vec![];
        for (i, s) in layout.slots.iter().enumerate() {
            // SAFETY: offset..offset+len lies inside `ram`, which `Vm` keeps mapped for as
            // long as `mem` (the only owner of these views) lives.
            let host = unsafe { ram.as_ptr().add(s.offset as usize) };
            // SAFETY: as above: a sub-range of a live mapping we own.
            let view = unsafe {
                MmapRegion::build_raw(
                    host,
                    s.len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                )
            }
            .map_err(|e| VmError::Memory(format!("slot {i}: {e}")))?;
            views.push(
                GuestRegionMmap::new(view, GuestAddress(s.gpa))
                    .ok_or_else(|| VmError::Memory(format!("slot {i} overflows")))?,
            );
            let region = kvm_userspace_memory_region {
                slot: i as u32,
                flags: 0,
                guest_phys_addr: s.gpa,
                memory_size: s.len,
                userspace_addr: host as u64,
            };
            // SAFETY: the host range stays mapped while the VM exists (`ram` outlives `vm`:
            // Drop stops the vCPU first and fields drop after).
            unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            regions.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(views).map_err(|e| VmError::Memory(e.to_string()))?;

        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut shared = vec![];
        let mut threads = vec![];
        let mut tsc_khz = 0;
        for index in 0..vcpus {
            let vcpu = vm.create_vcpu(index as u64).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            // Each vCPU's CPUID names its own APIC id (leaf 1 EBX[31:24], leaves 0xb and 0x1f EDX).
            let mut cpuid = supported.clone();
            for e in cpuid.as_mut_slice() {
                match e.function {
                    1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((index as u32) << 24),
                    0xb | 0x1f => e.edx = index as u32,
                    _ => {}
                }
            }
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            tsc_khz = vcpu.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
            let s = Arc::new(VcpuShared {
                index,
                fd: Mutex::new(vcpu),
                ctl: Mutex::new(Ctl::default()),
                cv: Condvar::new(),
            });
            let s2 = s.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || s2.run_loop())
                .map_err(|e| VmError::Vcpu(format!("spawn: {e}")))?;
            // Wait until the thread is parked, so kicks reach it.
            {
                let mut c = lock(&s.ctl);
                while !c.parked || c.thread.is_none() {
                    c = s.cv.wait(c).unwrap_or_else(|e| e.into_inner());
                }
            }
            shared.push(s);
            threads.push(thread);
        }
        let shared: Arc<[Arc<VcpuShared>]> = shared.into();
        let msr_list = {
            let fd = lock(&shared[0].fd);
            saveable_msrs(&kvm, &fd)?
        };
        let s3 = shared.clone();
        let ticker = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || loop {
                std::thread::sleep(THROTTLE_SLICE);
                for v in s3.iter() {
                    let mut c = lock(&v.ctl);
                    if c.quit {
                        return;
                    }
                    if c.throttle > 0 && c.run && !c.parked {
                        c.throttle_due = true;
                        v.kick(&c);
                    }
                }
            })
            .map_err(|e| VmError::Vcpu(format!("spawn: {e}")))?;
        Ok(Vm {
            vm: Arc::new(vm),
            layout,
            ram,
            mem,
            regions,
            vcpus: shared,
            threads,
            msr_list,
            ticker: Some(ticker),
            manual_protect,
            tsc_khz,
            config: None,
            written: false,
            huge_pages,
            rom: None,
        })
    }

    /// Whether guest RAM uses transparent huge pages (asked for and accepted).
    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// The RAM layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The vm-memory view of guest RAM (one region per slot).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// How many vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// TSC frequency of the vCPUs in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Whether KVM_CLEAR_DIRTY_LOG (manual dirty-log protection) is on.
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// The guest configuration given to [`boot`](Self::boot).
    pub fn config(&self) -> Option<GuestConfig> {
        self.config
    }

    fn write_u64(&self, gpa: u64, v: u64) -> Result<(), VmError> {
        self.mem.write_obj(v, GuestAddress(gpa)).map_err(|e| VmError::Memory(format!("write at {gpa:#x}: {e}")))
    }

    fn read_u64(&self, gpa: u64) -> Result<u64, VmError> {
        self.mem.read_obj(GuestAddress(gpa)).map_err(|e| VmError::Memory(format!("read at {gpa:#x}: {e}")))
    }

    /// Working-set segments `(gpa, pages)` for `bytes` of working set.
    fn working_set(&self, bytes: u64) -> Result<[(u64, u64); 2], VmError> {
        let pages = bytes.div_ceil(4096).max(1);
        let s0 = *self.layout.slots.first().ok_or_else(|| VmError::Config("no memory slot".into()))?;
        let cap0 = (s0.len.saturating_sub(WORKING_SET_MIN)) / 4096;
        let (p0, p1, base1) = match self.layout.slots.get(1) {
            Some(s1) => {
                let cap1 = s1.len / 4096;
                let p0 = (pages / 2).min(cap0).max(pages.saturating_sub(cap1));
                (p0, pages - p0, s1.gpa)
            }
            None => (pages, 0, 0),
        };
        if p0 > cap0 || p0 == 0 && p1 == 0 || self.layout.slots.get(1).is_some_and(|s| p1 > s.len / 4096) {
            return Err(VmError::Config(format!("a working set of {bytes} bytes does not fit the RAM")));
        }
        Ok([(WORKING_SET_MIN, p0), (base1, p1)])
    }

    /// Load the guest program, page tables and control block, fill the working set
    /// with seeded random words and set the vCPU up to start at the program in
    /// 64-bit mode. The vCPU stays parked until resumed.
    pub fn boot(&mut self, cfg: GuestConfig) -> Result<(), VmError> {
        let ws = self.working_set(cfg.working_set)?;
        // GDT: null, 64-bit code, data, TSS.
        for (i, d) in [0u64, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff].iter().enumerate() {
            self.write_u64(GDT_ADDR + 8 * i as u64, *d)?;
        }
        // Identity map 0..4 GiB with 2 MiB pages: PML4 -> PDPT -> 4 PDs.
        let pdpt = PML4_ADDR + 0x1000;
        self.write_u64(PML4_ADDR, pdpt | 3)?;
        for g in 0..4u64 {
            let pd = pdpt + 0x1000 * (g + 1);
            self.write_u64(pdpt + 8 * g, pd | 3)?;
            for j in 0..512u64 {
                self.write_u64(pd + 8 * j, ((g * 512 + j) << 21) | 0x83)?;
            }
        }
        self.mem
            .write_slice(guest::PROGRAM, GuestAddress(CODE_ADDR))
            .map_err(|e| VmError::Memory(format!("program: {e}")))?;
        // Each vCPU's slice of each segment: random words; its checksum is their sum.
        let n = self.vcpus.len() as u64;
        let slice =
            |(base, pages): (u64, u64), i: u64| (base + pages * i / n * 4096, pages * (i + 1) / n - pages * i / n);
        let mut seed = cfg.seed ^ 0x6a09_e667_f3bc_c908;
        let mut page = [0u8; 4096];
        // Spread the rate over the vCPUs: each writes 1/n of the pages per second.
        let interval = match cfg.dirty_rate / 4096 {
            0 => u64::MAX,
            pps => (self.tsc_khz as u64 * 1000 * n / pps).max(1),
        };
        for i in 0..n {
            let parts = [slice(ws[0], i), slice(ws[1], i)];
            if parts[0].1 + parts[1].1 == 0 {
                return Err(VmError::Config(format!(
                    "a working set of {} bytes has no page for each of {n} vCPUs",
                    cfg.working_set
                )));
            }
            let mut sum = 0u64;
            for (base, pages) in parts {
                for p in 0..pages {
                    for w in page.chunks_exact_mut(8) {
                        w.copy_from_slice(&splitmix(&mut seed).to_le_bytes());
                    }
                    sum = sum.wrapping_add(guest::word_sum(&page));
                    self.mem
                        .write_slice(&page, GuestAddress(base + p * 4096))
                        .map_err(|e| VmError::Memory(format!("working set: {e}")))?;
                }
            }
            let lcg = cfg.seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
            for (off, v) in [
                (ctrl::COUNTER, 0),
                (ctrl::CHECKSUM, sum),
                (ctrl::BASE0, parts[0].0),
                (ctrl::PAGES0, parts[0].1),
                (ctrl::BASE1, parts[1].0),
                (ctrl::PAGES1, parts[1].1),
                (ctrl::INTERVAL, interval),
                (ctrl::LCG, lcg),
                (ctrl::BUSY, 0),
                (ctrl::WRITES, 0),
            ] {
                self.write_u64(ctrl_addr(i as usize) + off, v)?;
            }
        }

        for v in self.vcpus.iter() {
            self.boot_vcpu(v)?;
        }
        self.config = Some(cfg);
        self.written = true;
        Ok(())
    }

    /// Map a raw firmware image as QEMU's `-bios FILE` does ([`Firmware`]): the
    /// whole image read-only at 4 GiB - its size, in its own KVM slot
    /// (`KVM_MEM_READONLY`) outside `pc.ram`, so it is not migrated (the
    /// destination maps the same file, as QEMU's ROM is there from its own
    /// `-bios`). With `alias`, its last 128 KiB are also copied into guest RAM below
    /// 1 MiB (a source booting it; that copy migrates as RAM, so a destination
    /// passes `false`). The vCPUs keep KVM's reset state (real mode, CS base
    /// 0xffff0000, RIP 0xfff0): resumed, vCPU 0 runs the image from its reset
    /// vector. One vCPU only (this VMM sends no INIT/SIPI to others).
    pub fn map_firmware(&mut self, image: &[u8], alias: bool) -> Result<Firmware, VmError> {
        if self.rom.is_some() {
            return Err(VmError::Config("a firmware image is already mapped".into()));
        }
        if self.vcpus.len() != 1 {
            return Err(VmError::Config(format!("a firmware guest runs one vCPU, not {}", self.vcpus.len())));
        }
        if self.vm.check_extension_raw(kvm_bindings::KVM_CAP_READONLY_MEM as _) <= 0 {
            return Err(VmError::Config("KVM has no read-only memory slots (KVM_CAP_READONLY_MEM)".into()));
        }
        let fw = Firmware::place(image.len() as u64, &self.layout)?;
        let map = MmapRegion::new(image.len()).map_err(|e| VmError::Memory(format!("firmware mmap: {e}")))?;
        vm_memory::VolatileMemory::as_volatile_slice(&map).copy_from(image);
        let region = kvm_userspace_memory_region {
            slot: self.regions.len() as u32,
            flags: kvm_bindings::KVM_MEM_READONLY,
            guest_phys_addr: fw.rom_gpa,
            memory_size: fw.size,
            userspace_addr: map.as_ptr() as u64,
        };
        // SAFETY: `map` is a live mapping of `fw.size` bytes that `self.rom` keeps
        // until the VM (declared before it, so dropped first) is gone.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (firmware)"))?;
        if alias {
            let from = fw.alias_from as usize;
            self.mem
                .write_slice(&image[from..from + fw.alias_len as usize], GuestAddress(fw.alias_gpa))
                .map_err(|e| VmError::Memory(format!("firmware alias: {e}")))?;
            self.written = true;
        }
        self.rom = Some(Rom { map, firmware: fw });
        Ok(fw)
    }

    /// The mapped firmware image's placement and bytes, if any.
    pub fn firmware(&self) -> Option<(Firmware, vm_memory::VolatileSlice<'_>)> {
        self.rom.as_ref().map(|r| (r.firmware, vm_memory::VolatileMemory::as_volatile_slice(&r.map)))
    }

    /// Read guest RAM at guest-physical `gpa` (a firmware guest's data, the alias).
    pub fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.mem.read_slice(buf, GuestAddress(gpa)).map_err(|e| VmError::Memory(format!("read at {gpa:#x}: {e}")))
    }

    /// Every vCPU starts runnable (no INIT/SIPI) in 64-bit mode at the program,
    /// with its index in `rdi`.
    fn boot_vcpu(&self, v: &VcpuShared) -> Result<(), VmError> {
        let fd = v.parked_fd().map_err(VmError::Vcpu)?;
        fd.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }).map_err(kvm_err("KVM_SET_MP_STATE"))?;
        let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let seg = |selector: u16, type_: u8, l: u8, db: u8, s: u8| kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db,
            s,
            l,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = seg(0x8, 0xb, 1, 0, 1);
        let data = seg(0x10, 0x3, 0, 1, 1);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = seg(0x18, 0xb, 0, 0, 0);
        sregs.gdt = kvm_bindings::kvm_dtable { base: GDT_ADDR, limit: 31, padding: [0; 3] };
        sregs.idt = kvm_bindings::kvm_dtable { base: 0, limit: 0, padding: [0; 3] };
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 |= 1 << 5; // PAE
        sregs.cr0 = 0x8000_0033; // PG | NE | ET | MP | PE
        sregs.efer |= 0x500; // LME | LMA
        fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs = kvm_bindings::kvm_regs {
            rip: CODE_ADDR,
            rflags: 2,
            rsp: CODE_ADDR,
            rdi: v.index as u64,
            ..Default::default()
        };
        fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        // Without enabled MTRRs all guest memory is uncacheable: default type write-back.
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: cpu::MSR_MTRR_DEF_TYPE,
            data: cpu::MTRR_ENABLE_WB,
            ..Default::default()
        }])
        .map_err(|e| VmError::Vcpu(format!("msrs: {e:?}")))?;
        fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        Ok(())
    }

    /// The vCPU controls, all vCPUs at once (what [`engine::source::Outgoing`] and `Incoming` drive).
    pub fn vcpus(&self) -> Vcpus {
        Vcpus(self.vcpus.clone())
    }

    /// One `cpu` device per vCPU, in vCPU order (instance id = vCPU index).
    pub fn cpu_devices(&self) -> Vec<CpuDevice> {
        let vmsd = Arc::new(cpu::vmsd());
        self.vcpus
            .iter()
            .map(|v| CpuDevice { vcpu: v.clone(), vmsd: vmsd.clone(), msr_list: self.msr_list.clone() })
            .collect()
    }

    /// KVM's dirty log of every slot, as an engine dirty source for the RAM block.
    pub fn dirty_log(&self) -> KvmDirtyLog {
        KvmDirtyLog::new(self.vm.clone(), &self.layout, &self.regions, self.manual_protect)
    }

    /// The RAM block as an engine region (valid while the VM lives).
    pub fn region(&self) -> Result<GuestRegion, VmError> {
        // SAFETY: the mapping is owned by `self.ram` and stays mapped while this VM
        // lives; the guest writes it concurrently, which KVM's dirty log reports.
        unsafe { GuestRegion::new(RAM_BLOCK, self.ram.as_ptr(), self.layout.ram_size as usize) }
            .ok_or_else(|| VmError::Memory("empty RAM".into()))
    }

    /// The RAM block as a volatile view (the vCPU may write it at any time).
    pub fn ram(&self) -> vm_memory::VolatileSlice<'_> {
        vm_memory::VolatileMemory::as_volatile_slice(&*self.ram)
    }

    /// True when this VM's RAM equals `other`'s byte for byte (compared in 1 MiB
    /// copies; meaningful while both guests are stopped).
    pub fn ram_equals(&self, other: &Vm) -> bool {
        let (a, b) = (self.ram(), other.ram());
        if a.len() != b.len() {
            return false;
        }
        let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        (0..a.len()).step_by(1 << 20).all(|at| {
            let n = (a.len() - at).min(1 << 20);
            match (a.subslice(at, n), b.subslice(at, n)) {
                (Ok(p), Ok(q)) => {
                    p.copy_to(&mut x[..n]);
                    q.copy_to(&mut y[..n]);
                    x[..n] == y[..n]
                }
                _ => false,
            }
        })
    }

    /// A page sink writing the incoming `pc.ram` block straight into guest RAM.
    /// On a VM whose RAM nothing has written yet, ZERO records touch no memory.
    pub fn sink(&mut self) -> RamSink<'_> {
        let pristine = !self.written && !self.vcpus.iter().any(|v| lock(&v.ctl).ran);
        self.written = true;
        let pages = self.layout.ram_size / 4096;
        let known_zero = pristine.then(|| vec![u64::MAX; pages.div_ceil(64) as usize]);
        // Guest memory is only ever reached through volatile views (the vCPU may run
        // again while the sink lives, as it does in postcopy).
        RamSink { ram: vm_memory::VolatileMemory::as_volatile_slice(&*self.ram), known_zero, tps: 4096 }
    }

    /// vCPU 0's control block now.
    pub fn control(&self) -> Result<Control, VmError> {
        self.control_of(0)
    }

    /// vCPU `index`'s control block now.
    pub fn control_of(&self, index: usize) -> Result<Control, VmError> {
        let at = ctrl_addr(index);
        Ok(Control {
            counter: self.read_u64(at + ctrl::COUNTER)?,
            checksum: self.read_u64(at + ctrl::CHECKSUM)?,
            writes: self.read_u64(at + ctrl::WRITES)?,
            busy: self.read_u64(at + ctrl::BUSY)? != 0,
        })
    }

    /// Every vCPU's control block now, in vCPU order.
    pub fn controls(&self) -> Result<Vec<Control>, VmError> {
        (0..self.vcpus.len()).map(|i| self.control_of(i)).collect()
    }

    /// Sum of vCPU 0's working-set slice (see [`working_set_sum_of`](Self::working_set_sum_of)).
    pub fn working_set_sum(&self) -> Result<u64, VmError> {
        self.working_set_sum_of(0)
    }

    /// Sum of the words of vCPU `index`'s working-set slice, read from guest memory
    /// as its control block describes it (compare with [`Control::checksum`] while
    /// the vCPUs are stopped).
    pub fn working_set_sum_of(&self, index: usize) -> Result<u64, VmError> {
        let mut sum = 0u64;
        let mut page = [0u8; 4096];
        let at = ctrl_addr(index);
        for (b, p) in [(ctrl::BASE0, ctrl::PAGES0), (ctrl::BASE1, ctrl::PAGES1)] {
            let base = self.read_u64(at + b)?;
            let pages = self.read_u64(at + p)?;
            if pages > self.layout.ram_size / 4096 {
                return Err(VmError::Memory(format!("control block {index}: {pages} pages is more than the RAM")));
            }
            for i in 0..pages {
                self.mem
                    .read_slice(&mut page, GuestAddress(base + i * 4096))
                    .map_err(|e| VmError::Memory(format!("working set: {e}")))?;
                sum = sum.wrapping_add(guest::word_sum(&page));
            }
        }
        Ok(sum)
    }

    /// Stop the vCPUs at a point where no write is in progress on any of them
    /// (running them on for a moment while one is), read vCPU 0's control block and
    /// check every vCPU's checksum: `(vCPU 0, all checksums hold)`. The vCPUs are
    /// left stopped.
    pub fn stop_and_check(&self) -> Result<(Control, bool), VmError> {
        let all = self.stop_and_check_all()?;
        let ok = all.iter().all(|(_, ok)| *ok);
        let first = all.first().ok_or_else(|| VmError::Vcpu("no vCPU".into()))?;
        Ok((first.0, ok))
    }

    /// Stop the vCPUs where none is mid-write; every vCPU's control block and
    /// whether its checksum holds, in vCPU order. The vCPUs are left stopped.
    pub fn stop_and_check_all(&self) -> Result<Vec<(Control, bool)>, VmError> {
        let v = self.vcpus();
        for _ in 0..1000 {
            v.stop_all().map_err(VmError::Vcpu)?;
            let c = self.controls()?;
            if c.iter().all(|c| !c.busy) {
                return c
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| Ok((c, self.working_set_sum_of(i)? == c.checksum)))
                    .collect();
            }
            v.resume_all().map_err(VmError::Vcpu)?;
            std::thread::sleep(Duration::from_micros(200));
        }
        Err(VmError::Vcpu("always stopped mid-write".into()))
    }
}

/// The MSRs KVM reports as saveable (`KVM_GET_MSR_INDEX_LIST`) that this vCPU lets
/// us read, as Cloud Hypervisor keeps them (it drops those `KVM_GET_MSRS` refuses);
/// TSC and MTRRdefType are carried as their own fields.
fn saveable_msrs(kvm: &Kvm, fd: &VcpuFd) -> Result<Arc<[u32]>, VmError> {
    let list = kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut rest: Vec<u32> =
        list.as_slice().iter().copied().filter(|&i| i != MSR_IA32_TSC && i != MSR_MTRR_DEF_TYPE).collect();
    let mut keep = vec![];
    while !rest.is_empty() {
        let chunk: Vec<kvm_msr_entry> =
            rest.iter().take(KVM_MAX_MSR_ENTRIES).map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&chunk).map_err(|e| VmError::Vcpu(format!("msrs: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?.min(chunk.len());
        keep.extend_from_slice(&rest[..n]);
        // KVM_GET_MSRS stops at the first MSR it refuses: skip that one.
        let next = if n < chunk.len() { n + 1 } else { n };
        rest.drain(..next);
    }
    Ok(keep.into())
}

impl Drop for Vm {
    fn drop(&mut self) {
        for v in self.vcpus.iter() {
            let mut c = lock(&v.ctl);
            c.quit = true;
            v.cv.notify_all();
        }
        // Kick until each vCPU thread has left (it clears `thread` on its way out).
        for v in self.vcpus.iter() {
            loop {
                let c = lock(&v.ctl);
                if c.thread.is_none() {
                    break;
                }
                v.kick(&c);
                drop(c);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

/// Writes incoming pages of `pc.ram` into guest RAM, at the stream's target page
/// size (`configuration/target-page-bits`: 1 KiB to 64 KiB; 4 KiB unless it says).
pub struct RamSink<'a> {
    ram: vm_memory::VolatileSlice<'a, ()>,
    /// One bit per 4 KiB page still zero since the VM was created (a fresh anonymous
    /// mapping): a ZERO record for it needs no access (reading would fault it in).
    known_zero: Option<Vec<u64>>,
    /// The stream's target page size.
    tps: usize,
}

impl RamSink<'_> {
    /// The 4 KiB pages a target page at `offset` overlaps.
    fn small_pages(&self, offset: u64) -> std::ops::Range<usize> {
        let first = usize::try_from(offset / 4096).unwrap_or(usize::MAX);
        let end = offset.saturating_add(self.tps as u64).div_ceil(4096);
        first..usize::try_from(end).unwrap_or(usize::MAX)
    }

    /// True when every 4 KiB page under the target page at `offset` is known zero.
    fn is_known_zero(&self, offset: u64) -> bool {
        let Some(k) = &self.known_zero else { return false };
        self.small_pages(offset).all(|p| k.get(p / 64).is_some_and(|w| w & (1u64 << (p % 64)) != 0))
    }
}

impl savevm_format::PageSink for RamSink<'_> {
    fn target_page_size(&mut self, tps: u64) -> Result<(), String> {
        // The decoder bounds it to 1 KiB..64 KiB, and `ram_blocks` checks the block
        // (a multiple of it) against this VM's RAM.
        self.tps = usize::try_from(tps).map_err(|_| format!("target page size {tps} bytes"))?;
        Ok(())
    }

    fn ram_blocks(&mut self, blocks: &[savevm_format::RamBlock]) -> Result<(), String> {
        match blocks {
            [b] if b.name == RAM_BLOCK && b.length == self.ram.len() as u64 => Ok(()),
            _ => Err(format!(
                "this VM has one RAM block '{RAM_BLOCK}' of {} bytes; the stream has {}",
                self.ram.len(),
                blocks
                    .iter()
                    .map(|b| format!("'{}' ({} bytes)", b.name.escape_debug(), b.length))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    fn page_mut(&mut self, _block: &savevm_format::RamBlock, offset: u64) -> Option<savevm_format::PageSlot<'_>> {
        let pages = self.small_pages(offset);
        if let Some(k) = self.known_zero.as_mut() {
            for p in pages {
                if let Some(w) = k.get_mut(p / 64) {
                    *w &= !(1u64 << (p % 64));
                }
            }
        }
        self.ram.subslice(usize::try_from(offset).ok()?, self.tps).ok().map(savevm_format::PageSlot::Guest)
    }

    fn fill_page(&mut self, block: &savevm_format::RamBlock, offset: u64, fill: u8) {
        if fill == 0 && self.is_known_zero(offset) {
            return;
        }
        if let Some(mut page) = self.page_mut(block, offset) {
            page.fill(fill);
        }
    }

    /// Drop the pages (QEMU's `ram_block_discard_range` on anonymous memory:
    /// `MADV_DONTNEED`, after turning transparent huge pages off for them as its
    /// postcopy does): they read as zero, and under postcopy's userfaultfd they fault.
    fn discard(&mut self, _block: &savevm_format::RamBlock, start: u64, len: u64) {
        let (Ok(s), Ok(l)) = (usize::try_from(start), usize::try_from(len)) else { return };
        let Ok(range) = self.ram.subslice(s, l) else { return };
        let ptr = range.ptr_guard_mut().as_ptr();
        // SAFETY: `ptr..ptr+l` is inside this VM's anonymous RAM mapping (a checked
        // subslice); the advice only drops page contents (the guest reads zeros,
        // which is what a discard means) and never unmaps anything.
        unsafe {
            libc::madvise(ptr.cast(), l, libc::MADV_NOHUGEPAGE);
            libc::madvise(ptr.cast(), l, libc::MADV_DONTNEED);
        }
        if let Some(k) = self.known_zero.as_mut() {
            for p in start / 4096..start.saturating_add(len).div_ceil(4096) {
                if let Some(w) = k.get_mut((p / 64) as usize) {
                    *w |= 1u64 << (p % 64);
                }
            }
        }
    }
}

impl engine::postcopy_dest::PostcopySink for RamSink<'_> {
    /// Guest RAM: one anonymous private mapping (the KVM slots are views of it).
    fn host_memory(&self, _block: &savevm_format::RamBlock) -> Option<(u64, u64)> {
        Some((self.ram.ptr_guard().as_ptr() as u64, self.ram.len() as u64))
    }
}

impl engine::multifd::SharedRamSink for RamSink<'_> {
    fn shared_regions(&mut self) -> Result<Vec<GuestRegion>, String> {
        // Multifd receiver threads write pages behind this sink's back: a page is
        // no longer known to be zero because the sink did not write it.
        self.known_zero = None;
        let ptr = self.ram.ptr_guard_mut().as_ptr();
        // SAFETY: the RAM mapping behind `self.ram` lives for the sink's lifetime 'a,
        // which outlives the load (run_multifd joins its threads before returning);
        // receiver threads write it only with volatile page copies.
        let region = unsafe { GuestRegion::new(RAM_BLOCK, ptr, self.ram.len()) };
        Ok(vec![region.ok_or("empty RAM")?])
    }
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
