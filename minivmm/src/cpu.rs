//! The vCPU's state as a vmstate device section `cpu`: general registers, special
//! registers (segments, descriptor tables, control registers, EFER, APIC base,
//! pending interrupts) and the TSC, enough for the guest to resume mid-instruction
//! stream on another host.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use savevm_format::vmstate::{Count, Kind, State, Value, Vmsd};
use std::sync::Arc;

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_MTRR_DEF_TYPE`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
pub const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Section idstr of the vCPU state.
pub const IDSTR: &str = "cpu";

/// What travels for one vCPU.
#[derive(Debug, Clone, Default)]
pub struct CpuState {
    /// General registers, `rip` and `rflags`.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// Time-stamp counter.
    pub tsc: u64,
    /// `IA32_MTRR_DEF_TYPE` (memory is uncacheable unless MTRRs are on).
    pub mtrr_def_type: u64,
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

/// The `cpu` section's description (version 1).
pub fn vmsd() -> Vmsd {
    let seg = Arc::new(segment_vmsd());
    let dt = Arc::new(dtable_vmsd());
    Vmsd::new(IDSTR, 1, 1)
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
        Ok(CpuState { regs, sregs, tsc: int("tsc")?, mtrr_def_type: int("mtrr_def_type")? })
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
        c.mtrr_def_type = MTRR_ENABLE_WB;
        let v = vmsd();
        let bytes = savevm_format::vmstate::encode_to_vec(&v, &c.to_state()).unwrap();
        let (back, used) = savevm_format::vmstate::decode_bytes(&v, 1, &bytes).unwrap();
        assert_eq!(used, bytes.len());
        let d = CpuState::from_state(&back).unwrap();
        assert_eq!(d.regs, c.regs);
        assert_eq!(d.sregs, c.sregs);
        assert_eq!((d.tsc, d.mtrr_def_type), (c.tsc, c.mtrr_def_type));
    }
}
