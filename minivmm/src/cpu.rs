//! A vCPU's state as a vmstate device section `cpu` (one instance per vCPU,
//! numbered by vCPU index as QEMU does): what a real guest kernel needs to resume
//! on another host, as Cloud Hypervisor carries it. General and special
//! registers, TSC, its frequency and `MTRRdefType` as fields; CPUID entries and the MSRs KVM
//! reports as saveable as variable arrays; mp_state, FPU; XSAVE, XCRs, local APIC,
//! debug registers and pending events as the bytes of their KVM ABI structs
//! (x86-64, little-endian).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use savevm_format::vmstate::{Count, Kind, State, Value, Vmsd};
use std::sync::Arc;
use zerocopy::{FromBytes, IntoBytes};

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_MTRR_DEF_TYPE`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
pub const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Section idstr of the vCPU state.
pub const IDSTR: &str = "cpu";
/// Section version (2: the full x86 state; version 1 had registers, TSC and MTRRdefType only).
pub const VERSION: u32 = 2;

/// Bytes of `kvm_xsave` (the legacy 4 KiB XSAVE area).
pub const XSAVE_LEN: usize = 4096;
/// Bytes of the local APIC register page.
pub const LAPIC_LEN: usize = 1024;

/// What travels for one vCPU.
#[derive(Debug, Clone)]
pub struct CpuState {
    /// General registers, `rip` and `rflags`.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// Time-stamp counter.
    pub tsc: u64,
    /// TSC frequency in kHz (the destination's vCPU is set to it when it differs).
    pub tsc_khz: u32,
    /// `IA32_MTRR_DEF_TYPE` (memory is uncacheable unless MTRRs are on).
    pub mtrr_def_type: u64,
    /// The vCPU's CPUID entries (`KVM_GET_CPUID2`).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every other MSR KVM reports as saveable and lets us read: `(index, value)`.
    pub msrs: Vec<(u32, u64)>,
    /// `KVM_MP_STATE_*`.
    pub mp_state: u32,
    /// x87 and SSE state.
    pub fpu: kvm_fpu,
    /// The XSAVE area (`KVM_GET_XSAVE`, [`XSAVE_LEN`] bytes).
    pub xsave: Vec<u8>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// The local APIC's registers ([`LAPIC_LEN`] bytes).
    pub lapic: Vec<u8>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Pending exception, interrupt, NMI, SMI and interrupt shadow.
    pub events: kvm_vcpu_events,
}

impl Default for CpuState {
    fn default() -> Self {
        CpuState {
            regs: Default::default(),
            sregs: Default::default(),
            tsc: 0,
            tsc_khz: 0,
            mtrr_def_type: 0,
            cpuid: vec![],
            msrs: vec![],
            mp_state: 0,
            fpu: Default::default(),
            xsave: vec![0; XSAVE_LEN],
            xcrs: Default::default(),
            lapic: vec![0; LAPIC_LEN],
            debugregs: Default::default(),
            events: Default::default(),
        }
    }
}

/// `kvm_xsave` from its bytes (`None` unless exactly [`XSAVE_LEN`]).
pub fn xsave_from_bytes(b: &[u8]) -> Option<kvm_xsave> {
    if b.len() != XSAVE_LEN {
        return None;
    }
    let mut x = kvm_xsave::default();
    for (w, c) in x.region.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Some(x)
}

/// The bytes of a `kvm_xsave` area.
pub fn xsave_bytes(x: &kvm_xsave) -> Vec<u8> {
    x.region.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// `kvm_lapic_state` from its bytes (`None` unless exactly [`LAPIC_LEN`]).
pub fn lapic_from_bytes(b: &[u8]) -> Option<kvm_lapic_state> {
    if b.len() != LAPIC_LEN {
        return None;
    }
    let mut l = kvm_lapic_state::default();
    for (r, &v) in l.regs.iter_mut().zip(b) {
        *r = v as _;
    }
    Some(l)
}

/// The bytes of a local APIC register page.
pub fn lapic_bytes(l: &kvm_lapic_state) -> Vec<u8> {
    l.regs.iter().map(|&v| v as u8).collect()
}

fn segment_vmsd() -> Vmsd {
    Vmsd::new("cpu/segment", 1, 1)
        .field("base", Kind::Uint(8))
        .field("limit", Kind::Uint(4))
        .field("selector", Kind::Uint(2))
        .field("type", Kind::Uint(1))
        .field("present", Kind::Uint(1))
        .field("dpl", Kind::Uint(1))
        .field("db", Kind::Uint(1))
        .field("s", Kind::Uint(1))
        .field("l", Kind::Uint(1))
        .field("g", Kind::Uint(1))
        .field("avl", Kind::Uint(1))
        .field("unusable", Kind::Uint(1))
}

fn dtable_vmsd() -> Vmsd {
    Vmsd::new("cpu/dtable", 1, 1).field("base", Kind::Uint(8)).field("limit", Kind::Uint(2))
}

fn cpuid_vmsd() -> Vmsd {
    Vmsd::new("cpu/cpuid", 1, 1)
        .field("function", Kind::Uint(4))
        .field("index", Kind::Uint(4))
        .field("flags", Kind::Uint(4))
        .field("eax", Kind::Uint(4))
        .field("ebx", Kind::Uint(4))
        .field("ecx", Kind::Uint(4))
        .field("edx", Kind::Uint(4))
}

fn msr_vmsd() -> Vmsd {
    Vmsd::new("cpu/msr", 1, 1).field("index", Kind::Uint(4)).field("data", Kind::Uint(8))
}

fn fpu_vmsd() -> Vmsd {
    Vmsd::new("cpu/fpu", 1, 1)
        .field("fpr", Kind::Buffer(128))
        .field("fcw", Kind::Uint(2))
        .field("fsw", Kind::Uint(2))
        .field("ftwx", Kind::Uint(1))
        .field("last_opcode", Kind::Uint(2))
        .field("last_ip", Kind::Uint(8))
        .field("last_dp", Kind::Uint(8))
        .field("xmm", Kind::Buffer(256))
        .field("mxcsr", Kind::Uint(4))
}

/// The `cpu` section's description (version [`VERSION`]).
pub fn vmsd() -> Vmsd {
    let seg = Arc::new(segment_vmsd());
    let dt = Arc::new(dtable_vmsd());
    let var = |field: &str| Count::Var { field: field.into(), multiply: 1 };
    Vmsd::new(IDSTR, VERSION, VERSION)
        .array("regs", Kind::Uint(8), Count::Fixed(18))
        .array("segs", Kind::Struct(seg), Count::Fixed(8))
        .field("gdt", Kind::Struct(dt.clone()))
        .field("idt", Kind::Struct(dt))
        .array("cr", Kind::Uint(8), Count::Fixed(5))
        .field("efer", Kind::Uint(8))
        .field("apic_base", Kind::Uint(8))
        .array("interrupt_bitmap", Kind::Uint(8), Count::Fixed(4))
        .field("tsc", Kind::Uint(8))
        .field("mtrr_def_type", Kind::Uint(8))
        .field("tsc_khz", Kind::Uint(4))
        .field("nr_cpuid", Kind::Uint(4))
        .array("cpuid", Kind::Struct(Arc::new(cpuid_vmsd())), var("nr_cpuid"))
        .field("nr_msrs", Kind::Uint(4))
        .array("msrs", Kind::Struct(Arc::new(msr_vmsd())), var("nr_msrs"))
        .field("mp_state", Kind::Uint(4))
        .field("fpu", Kind::Struct(Arc::new(fpu_vmsd())))
        .field("xsave", Kind::Buffer(XSAVE_LEN as u32))
        .field("xcrs", Kind::Buffer(std::mem::size_of::<kvm_xcrs>() as u32))
        .field("lapic", Kind::Buffer(LAPIC_LEN as u32))
        .field("debugregs", Kind::Buffer(std::mem::size_of::<kvm_debugregs>() as u32))
        .field("events", Kind::Buffer(std::mem::size_of::<kvm_vcpu_events>() as u32))
}

fn ints_state(fields: &[(&str, u64)]) -> Value {
    let mut st = State::default();
    for &(n, v) in fields {
        st.set(n, u(v));
    }
    Value::Struct(st)
}

fn u(v: u64) -> Value {
    Value::Uint(v)
}

fn seg_state(s: &kvm_segment) -> Value {
    let mut st = State::default();
    for (n, v) in [
        ("base", s.base),
        ("limit", s.limit as u64),
        ("selector", s.selector as u64),
        ("type", s.type_ as u64),
        ("present", s.present as u64),
        ("dpl", s.dpl as u64),
        ("db", s.db as u64),
        ("s", s.s as u64),
        ("l", s.l as u64),
        ("g", s.g as u64),
        ("avl", s.avl as u64),
        ("unusable", s.unusable as u64),
    ] {
        st.set(n, u(v));
    }
    Value::Struct(st)
}

fn dt_state(d: &kvm_dtable) -> Value {
    let mut st = State::default();
    st.set("base", u(d.base));
    st.set("limit", u(d.limit as u64));
    Value::Struct(st)
}

impl CpuState {
    /// The register order of `regs`.
    fn reg_list(r: &kvm_regs) -> [u64; 18] {
        [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
            r.r15, r.rip, r.rflags,
        ]
    }

    /// As a vmstate value of [`vmsd`].
    pub fn to_state(&self) -> State {
        let s = &self.sregs;
        let mut st = State::default();
        st.set("regs", Value::Array(Self::reg_list(&self.regs).iter().map(|&v| u(v)).collect()));
        let segs = [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt];
        st.set("segs", Value::Array(segs.iter().map(|x| seg_state(x)).collect()));
        st.set("gdt", dt_state(&s.gdt));
        st.set("idt", dt_state(&s.idt));
        st.set("cr", Value::Array([s.cr0, s.cr2, s.cr3, s.cr4, s.cr8].iter().map(|&v| u(v)).collect()));
        st.set("efer", u(s.efer));
        st.set("apic_base", u(s.apic_base));
        st.set("interrupt_bitmap", Value::Array(s.interrupt_bitmap.iter().map(|&v| u(v)).collect()));
        st.set("tsc", u(self.tsc));
        st.set("mtrr_def_type", u(self.mtrr_def_type));
        st.set("tsc_khz", u(self.tsc_khz as u64));
        st.set("nr_cpuid", u(self.cpuid.len() as u64));
        let cpuid = self.cpuid.iter().map(|e| {
            ints_state(&[
                ("function", e.function as u64),
                ("index", e.index as u64),
                ("flags", e.flags as u64),
                ("eax", e.eax as u64),
                ("ebx", e.ebx as u64),
                ("ecx", e.ecx as u64),
                ("edx", e.edx as u64),
            ])
        });
        st.set("cpuid", Value::Array(cpuid.collect()));
        st.set("nr_msrs", u(self.msrs.len() as u64));
        let msrs = self.msrs.iter().map(|&(i, d)| ints_state(&[("index", i as u64), ("data", d)]));
        st.set("msrs", Value::Array(msrs.collect()));
        st.set("mp_state", u(self.mp_state as u64));
        let f = &self.fpu;
        let mut fpu = State::default();
        fpu.set("fpr", Value::Bytes(f.fpr.iter().flatten().copied().collect()));
        for (n, v) in [
            ("fcw", f.fcw as u64),
            ("fsw", f.fsw as u64),
            ("ftwx", f.ftwx as u64),
            ("last_opcode", f.last_opcode as u64),
            ("last_ip", f.last_ip),
            ("last_dp", f.last_dp),
        ] {
            fpu.set(n, u(v));
        }
        fpu.set("xmm", Value::Bytes(f.xmm.iter().flatten().copied().collect()));
        fpu.set("mxcsr", u(f.mxcsr as u64));
        st.set("fpu", Value::Struct(fpu));
        st.set("xsave", Value::Bytes(self.xsave.clone()));
        st.set("xcrs", Value::Bytes(self.xcrs.as_bytes().to_vec()));
        st.set("lapic", Value::Bytes(self.lapic.clone()));
        st.set("debugregs", Value::Bytes(self.debugregs.as_bytes().to_vec()));
        st.set("events", Value::Bytes(self.events.as_bytes().to_vec()));
        st
    }

    /// From a decoded state of [`vmsd`]; names the first missing or malformed field.
    pub fn from_state(st: &State) -> Result<Self, String> {
        let ints = |name: &str, n: usize| -> Result<Vec<u64>, String> {
            match st.get(name) {
                Some(Value::Array(a)) if a.len() == n => {
                    a.iter().map(|v| v.as_u64().ok_or_else(|| format!("cpu: field '{name}' is not integers"))).collect()
                }
                _ => Err(format!("cpu: field '{name}' missing or not {n} integers")),
            }
        };
        let int = |name: &str| st.get_int(name).ok_or_else(|| format!("cpu: field '{name}' missing"));
        let r = ints("regs", 18)?;
        let regs = kvm_regs {
            rax: r[0],
            rbx: r[1],
            rcx: r[2],
            rdx: r[3],
            rsi: r[4],
            rdi: r[5],
            rsp: r[6],
            rbp: r[7],
            r8: r[8],
            r9: r[9],
            r10: r[10],
            r11: r[11],
            r12: r[12],
            r13: r[13],
            r14: r[14],
            r15: r[15],
            rip: r[16],
            rflags: r[17],
        };
        let segs = match st.get("segs") {
            Some(Value::Array(a)) if a.len() == 8 => a.iter().map(segment).collect::<Result<Vec<_>, _>>()?,
            _ => return Err("cpu: field 'segs' missing or not 8 segments".into()),
        };
        let cr = ints("cr", 5)?;
        let ib = ints("interrupt_bitmap", 4)?;
        let sregs = kvm_sregs {
            cs: segs[0],
            ds: segs[1],
            es: segs[2],
            fs: segs[3],
            gs: segs[4],
            ss: segs[5],
            tr: segs[6],
            ldt: segs[7],
            gdt: dtable(st.get("gdt"), "gdt")?,
            idt: dtable(st.get("idt"), "idt")?,
            cr0: cr[0],
            cr2: cr[1],
            cr3: cr[2],
            cr4: cr[3],
            cr8: cr[4],
            efer: int("efer")?,
            apic_base: int("apic_base")?,
            interrupt_bitmap: [ib[0], ib[1], ib[2], ib[3]],
        };
        let structs = |name: &str| -> Result<Vec<&State>, String> {
            let n = int(&format!("nr_{name}"))? as usize;
            match st.get(name) {
                Some(Value::Array(a)) if a.len() == n => a
                    .iter()
                    .map(|v| match v {
                        Value::Struct(s) => Ok(s),
                        _ => Err(format!("cpu: an element of '{name}' is not a struct")),
                    })
                    .collect(),
                _ => Err(format!("cpu: field '{name}' missing or not {n} entries")),
            }
        };
        let sint =
            |s: &State, what: &str, n: &str| s.get_int(n).ok_or_else(|| format!("cpu: {what} field '{n}' missing"));
        let cpuid = structs("cpuid")?
            .into_iter()
            .map(|e| {
                let f = |n| sint(e, "cpuid", n).map(|v| v as u32);
                Ok(kvm_cpuid_entry2 {
                    function: f("function")?,
                    index: f("index")?,
                    flags: f("flags")?,
                    eax: f("eax")?,
                    ebx: f("ebx")?,
                    ecx: f("ecx")?,
                    edx: f("edx")?,
                    padding: [0; 3],
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let msrs = structs("msrs")?
            .into_iter()
            .map(|e| Ok((sint(e, "msr", "index")? as u32, sint(e, "msr", "data")?)))
            .collect::<Result<Vec<_>, String>>()?;
        let bytes = |v: Option<&Value>, name: &str, len: usize| -> Result<Vec<u8>, String> {
            match v {
                Some(Value::Bytes(b)) if b.len() == len => Ok(b.clone()),
                _ => Err(format!("cpu: field '{name}' missing or not {len} bytes")),
            }
        };
        let Some(Value::Struct(f)) = st.get("fpu") else { return Err("cpu: field 'fpu' missing".into()) };
        let fi = |n| sint(f, "fpu", n);
        let mut fpu = kvm_fpu {
            fcw: fi("fcw")? as u16,
            fsw: fi("fsw")? as u16,
            ftwx: fi("ftwx")? as u8,
            last_opcode: fi("last_opcode")? as u16,
            last_ip: fi("last_ip")?,
            last_dp: fi("last_dp")?,
            mxcsr: fi("mxcsr")? as u32,
            ..Default::default()
        };
        for (r, c) in fpu.fpr.iter_mut().zip(bytes(f.get("fpr"), "fpu.fpr", 128)?.chunks_exact(16)) {
            r.copy_from_slice(c);
        }
        for (r, c) in fpu.xmm.iter_mut().zip(bytes(f.get("xmm"), "fpu.xmm", 256)?.chunks_exact(16)) {
            r.copy_from_slice(c);
        }
        let abi = |name: &str, len: usize| bytes(st.get(name), name, len);
        let xcrs = kvm_xcrs::read_from_bytes(&abi("xcrs", std::mem::size_of::<kvm_xcrs>())?)
            .map_err(|_| "cpu: field 'xcrs' malformed".to_string())?;
        let debugregs = kvm_debugregs::read_from_bytes(&abi("debugregs", std::mem::size_of::<kvm_debugregs>())?)
            .map_err(|_| "cpu: field 'debugregs' malformed".to_string())?;
        let events = kvm_vcpu_events::read_from_bytes(&abi("events", std::mem::size_of::<kvm_vcpu_events>())?)
            .map_err(|_| "cpu: field 'events' malformed".to_string())?;
        Ok(CpuState {
            regs,
            sregs,
            tsc: int("tsc")?,
            mtrr_def_type: int("mtrr_def_type")?,
            tsc_khz: u32::try_from(int("tsc_khz")?).map_err(|_| "cpu: field 'tsc_khz' out of range".to_string())?,
            cpuid,
            msrs,
            mp_state: int("mp_state")? as u32,
            fpu,
            xsave: abi("xsave", XSAVE_LEN)?,
            xcrs,
            lapic: abi("lapic", LAPIC_LEN)?,
            debugregs,
            events,
        })
    }
}

fn segment(v: &Value) -> Result<kvm_segment, String> {
    let Value::Struct(s) = v else { return Err("cpu: a segment is not a struct".into()) };
    let f = |n: &str| s.get_int(n).ok_or_else(|| format!("cpu: segment field '{n}' missing"));
    Ok(kvm_segment {
        base: f("base")?,
        limit: f("limit")? as u32,
        selector: f("selector")? as u16,
        type_: f("type")? as u8,
        present: f("present")? as u8,
        dpl: f("dpl")? as u8,
        db: f("db")? as u8,
        s: f("s")? as u8,
        l: f("l")? as u8,
        g: f("g")? as u8,
        avl: f("avl")? as u8,
        unusable: f("unusable")? as u8,
        padding: 0,
    })
}

fn dtable(v: Option<&Value>, name: &str) -> Result<kvm_dtable, String> {
    let Some(Value::Struct(s)) = v else { return Err(format!("cpu: field '{name}' missing")) };
    let f = |n: &str| s.get_int(n).ok_or_else(|| format!("cpu: {name} field '{n}' missing"));
    Ok(kvm_dtable { base: f("base")?, limit: f("limit")? as u16, padding: [0; 3] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_state_round_trips_through_the_wire() {
        let mut c = CpuState::default();
        c.regs.rip = 0x2014;
        c.regs.r13 = 12345;
        c.regs.rflags = 2;
        c.sregs.cs.l = 1;
        c.sregs.cs.selector = 8;
        c.sregs.efer = 0x500;
        c.sregs.cr3 = 0x9000;
        c.sregs.gdt.limit = 31;
        c.tsc = 1 << 40;
        c.tsc_khz = 2_995_200;
        c.mtrr_def_type = MTRR_ENABLE_WB;
        c.cpuid = vec![
            kvm_cpuid_entry2 { function: 1, eax: 0x806c1, ebx: 3 << 24, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xd, index: 1, flags: 1, ecx: 0x240, ..Default::default() },
        ];
        c.msrs = vec![(0xc000_0080, 0x500), (0x6e0, u64::MAX)];
        c.mp_state = 0;
        c.fpu.fcw = 0x37f;
        c.fpu.xmm[15][3] = 9;
        c.fpu.mxcsr = 0x1f80;
        c.xsave[0] = 0x7f;
        c.xsave[XSAVE_LEN - 1] = 1;
        c.xcrs.nr_xcrs = 1;
        c.xcrs.xcrs[0].value = 7;
        c.lapic[0x20] = 3;
        c.debugregs.dr7 = 0x400;
        c.events.nmi.pending = 1;
        c.events.flags = 4;
        let v = vmsd();
        let bytes = savevm_format::vmstate::encode_to_vec(&v, &c.to_state()).unwrap();
        let (back, used) = savevm_format::vmstate::decode_bytes(&v, VERSION, &bytes).unwrap();
        assert_eq!(used, bytes.len());
        let d = CpuState::from_state(&back).unwrap();
        assert_eq!(d.regs, c.regs);
        assert_eq!(d.sregs, c.sregs);
        assert_eq!((d.tsc, d.tsc_khz, d.mtrr_def_type), (c.tsc, c.tsc_khz, c.mtrr_def_type));
        assert_eq!((d.cpuid, d.msrs, d.mp_state), (c.cpuid, c.msrs, c.mp_state));
        assert_eq!((d.fpu, d.xsave, d.xcrs, d.lapic), (c.fpu, c.xsave, c.xcrs, c.lapic));
        assert_eq!((d.debugregs, d.events), (c.debugregs, c.events));
    }
}
