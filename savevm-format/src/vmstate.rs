//! VMState: declarative descriptions of device state, in QEMU's manner.
//!
//! One [`Vmsd`] drives three things: [`encode`] (state to bytes), [`decode`]
//! (bytes to state, with QEMU's version and subsection rules) and [`vmdesc`]
//! (the JSON entry QEMU puts in the trailing device description).

use crate::error::{EncodeError, ErrorKind};
use crate::input::{IResult, Input};
use crate::wire::QEMU_VM_SUBSECTION;
use serde_json::{json, Map, Value as Json};
use std::io::{Read, Write};
use std::sync::Arc;

/// A VMStateDescription: name, versions, fields and subsections.
#[derive(Debug, Clone, PartialEq)]
pub struct Vmsd {
    /// vmsd name (also the prefix of its subsections' names).
    pub name: String,
    /// Current version, written in section or subsection headers.
    pub version_id: u32,
    /// Oldest version this description still loads.
    pub minimum_version_id: u32,
    /// Fields in wire order.
    pub fields: Vec<Field>,
    /// Subsections in wire order.
    pub subsections: Vec<Subsection>,
}

/// One field of a description.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// Field name (vmdesc `name`).
    pub name: String,
    /// Element type.
    pub kind: Kind,
    /// The field exists only at stream versions `>= version_id` (QEMU's `_v` macros).
    pub version_id: u32,
    /// How many elements.
    pub count: Count,
}

/// Number of elements of a field.
#[derive(Debug, Clone, PartialEq)]
pub enum Count {
    /// A single value.
    One,
    /// `VMSTATE_ARRAY`: a fixed number of elements.
    Fixed(u32),
    /// `VMSTATE_VARRAY_*`: as many elements as an earlier integer field holds, times `multiply`.
    Var {
        /// Name of the earlier field holding the count.
        field: String,
        /// Multiplier (1 for plain VARRAY).
        multiply: u32,
    },
}

/// Element types (the vmdesc `type` in brackets).
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `bool`: one byte, any non-zero is true.
    Bool,
    /// `uint8`..`uint64`: unsigned big-endian integer of this many bytes.
    Uint(u8),
    /// `int8`..`int64`: signed big-endian integer of this many bytes.
    Int(u8),
    /// `buffer`: fixed-size bytes.
    Buffer(u32),
    /// `buffer` (VBUFFER): as many bytes as an earlier integer field holds, times `multiply`.
    VBuffer {
        /// Name of the earlier field holding the length.
        field: String,
        /// Multiplier.
        multiply: u32,
    },
    /// `buffer` holding NUL-padded text of this fixed size (e.g. globalstate's runstate).
    Text(u32),
    /// `unused_buffer`: this many bytes, written as zeros, ignored on load.
    Unused(u32),
    /// `timer`: be64 expiry in ns, all ones when not armed.
    Timer,
    /// `bitmap` of this many bits, as be64 words.
    Bitmap(u32),
    /// `struct`: a nested description at its own version.
    Struct(Arc<Vmsd>),
    /// Bytes of a custom type this crate treats as opaque (`pci config`, `virtio`...).
    Raw {
        /// vmdesc type name.
        type_name: String,
        /// Size in bytes of one element.
        size: u32,
    },
}

/// A subsection and when it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Subsection {
    /// Its description (name conventionally `<parent>/<something>`).
    pub vmsd: Arc<Vmsd>,
    /// The "needed" predicate.
    pub needed: Needed,
}

/// When a subsection is written.
#[derive(Debug, Clone)]
pub enum Needed {
    /// Whenever the parent state carries a value for it.
    IfPresent,
    /// When the predicate on the parent's state is true (QEMU's `needed` hook).
    When(fn(&State) -> bool),
}

impl PartialEq for Needed {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Needed::IfPresent, Needed::IfPresent) => true,
            (Needed::When(a), Needed::When(b)) => std::ptr::fn_addr_eq(*a, *b),
            _ => false,
        }
    }
}

/// Decoded (or to-be-encoded) state of one description.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct State {
    /// Field values by name, in wire order (unused buffers and absent fields omitted).
    pub fields: Vec<(String, Value)>,
    /// Subsections present, in wire order.
    pub subsections: Vec<SubsectionState>,
}

/// A subsection's state as found in (or destined for) the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SubsectionState {
    /// Full subsection name.
    pub name: String,
    /// Version written in its header.
    pub version: u32,
    /// Its fields and nested subsections.
    pub state: State,
}

/// A field value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `bool`.
    Bool(bool),
    /// Unsigned integer (also opaque custom integers).
    Uint(u64),
    /// Signed integer.
    Int(i64),
    /// Byte buffer, bitmap words as bytes, or raw custom data.
    Bytes(Vec<u8>),
    /// NUL-padded text without the padding.
    Text(String),
    /// Timer expiry; `None` = not armed (all ones on the wire).
    Timer(Option<u64>),
    /// Nested struct.
    Struct(State),
    /// Array elements.
    Array(Vec<Value>),
}

impl State {
    /// The value of field `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Integer value of field `name` (Uint, Int or Bool), if present.
    pub fn get_int(&self, name: &str) -> Option<u64> {
        self.get(name).and_then(Value::as_u64)
    }

    /// Set (or add) field `name`.
    pub fn set(&mut self, name: &str, v: Value) {
        match self.fields.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = v,
            None => self.fields.push((name.to_string(), v)),
        }
    }

    /// The subsection called `name`, if present.
    pub fn subsection(&self, name: &str) -> Option<&SubsectionState> {
        self.subsections.iter().find(|s| s.name == name)
    }

    /// This state as a JSON object: fields by name, subsections as nested objects by name.
    pub fn to_json(&self) -> Json {
        let mut m = Map::new();
        for (n, v) in &self.fields {
            m.insert(n.clone(), v.to_json());
        }
        for s in &self.subsections {
            m.insert(s.name.clone(), s.state.to_json());
        }
        Json::Object(m)
    }
}

impl Value {
    /// Integer view of Uint, Int (two's complement) and Bool.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Uint(v) => Some(*v),
            Value::Int(v) => Some(v.cast_unsigned()),
            Value::Bool(b) => Some(u64::from(*b)),
            _ => None,
        }
    }

    /// JSON view: numbers, hex strings for bytes, `null` for a disarmed timer.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Bool(b) => json!(b),
            Value::Uint(v) => json!(v),
            Value::Int(v) => json!(v),
            Value::Bytes(b) => Json::String(hex(b)),
            Value::Text(s) => json!(s),
            Value::Timer(t) => json!(t),
            Value::Struct(s) => s.to_json(),
            Value::Array(a) => Json::Array(a.iter().map(Value::to_json).collect()),
        }
    }
}

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

impl Vmsd {
    /// A description with no fields yet.
    pub fn new(name: &str, version_id: u32, minimum_version_id: u32) -> Self {
        Vmsd { name: name.to_string(), version_id, minimum_version_id, fields: vec![], subsections: vec![] }
    }

    /// Builder: add a single field present at every version.
    pub fn field(mut self, name: &str, kind: Kind) -> Self {
        self.fields.push(Field { name: name.to_string(), kind, version_id: 0, count: Count::One });
        self
    }

    /// Builder: add a single field present from `version` on.
    pub fn field_v(mut self, name: &str, kind: Kind, version: u32) -> Self {
        self.fields.push(Field { name: name.to_string(), kind, version_id: version, count: Count::One });
        self
    }

    /// Builder: add an array field.
    pub fn array(mut self, name: &str, kind: Kind, count: Count) -> Self {
        self.fields.push(Field { name: name.to_string(), kind, version_id: 0, count });
        self
    }

    /// Builder: add a subsection.
    pub fn subsection(mut self, vmsd: Vmsd, needed: Needed) -> Self {
        self.subsections.push(Subsection { vmsd: Arc::new(vmsd), needed });
        self
    }

    fn check_version(&self, version: u32) -> IResult<()> {
        if version > self.version_id {
            return Err(ErrorKind::VersionTooNew { vmsd: self.name.clone(), version, local: self.version_id });
        }
        if version < self.minimum_version_id {
            return Err(ErrorKind::VersionTooOld {
                vmsd: self.name.clone(),
                version,
                minimum: self.minimum_version_id,
            });
        }
        Ok(())
    }
}

impl Kind {
    /// vmdesc `type` name of this kind.
    pub fn type_name(&self) -> String {
        match self {
            Kind::Bool => "bool".into(),
            Kind::Uint(n) => format!("uint{}", u32::from(*n) * 8),
            Kind::Int(n) => format!("int{}", u32::from(*n) * 8),
            Kind::Buffer(_) | Kind::VBuffer { .. } | Kind::Text(_) => "buffer".into(),
            Kind::Unused(_) => "unused_buffer".into(),
            Kind::Timer => "timer".into(),
            Kind::Bitmap(_) => "bitmap".into(),
            Kind::Struct(_) => "struct".into(),
            Kind::Raw { type_name, .. } => type_name.clone(),
        }
    }

    /// Can an array of this kind be described by its first element (QEMU's `vmsd_can_compress`)?
    fn compressible(&self) -> bool {
        match self {
            Kind::Struct(v) => v.subsections.is_empty() && v.fields.iter().all(|f| f.kind.compressible()),
            _ => true,
        }
    }
}

/// Hard cap on elements of one array or bytes of one variable buffer, against hostile counts.
const MAX_ELEMS: u64 = 1 << 24;

fn count_of(state: &State, field: &Field) -> Result<u64, String> {
    match &field.count {
        Count::One => Ok(1),
        Count::Fixed(n) => Ok(u64::from(*n)),
        Count::Var { field: f, multiply } => var_len(state, f, *multiply),
    }
}

fn var_len(state: &State, f: &str, multiply: u32) -> Result<u64, String> {
    let n = state.get_int(f).ok_or_else(|| format!("count field '{f}' missing or not an integer"))?;
    // Counts are read as int32 in QEMU; a negative count is an error.
    let n = n
        .checked_mul(u64::from(multiply))
        .filter(|&n| n <= MAX_ELEMS)
        .ok_or_else(|| format!("count {n} x {multiply} too large"))?;
    Ok(n)
}

// ---------------------------------------------------------------- decode

/// Most elements that consume no input (zero-size fields, structs of them) in one
/// top-level decode. Every other element consumes at least one byte, but nested
/// arrays of empty elements multiply (4096 x 4096 x 4096 from a 300-byte vmdesc),
/// so a per-array limit alone does not bound time and memory.
const MAX_EMPTY_ELEMS: u32 = 1 << 16;

/// Estimated memory of one named field in a [`State`] besides its name's bytes.
const FIELD_COST: usize = std::mem::size_of::<(String, Value)>();

/// Decoded values may take at most this many bytes of memory per byte of input
/// that backs them (plus [`VALUE_SLACK`]): nested structs and long field names
/// otherwise turn one input byte into kilobytes of values.
const VALUE_BYTES_PER_INPUT_BYTE: u64 = 64;
/// Memory for decoded values allowed beyond the proportional bound (small devices).
const VALUE_SLACK: u64 = 4 << 20;

/// What one top-level decode may still spend: elements that consume no input, and
/// memory for values in proportion to the input consumed.
struct Budget {
    empty: u32,
    /// Input offset where the decode started.
    start: u64,
    /// Estimated bytes of the values decoded so far.
    cost: u64,
}

impl Budget {
    /// Charge `bytes` of values, failing when they exceed the bound for the input
    /// consumed up to `offset`.
    fn charge(&mut self, bytes: usize, offset: u64, vmsd: &Vmsd, f: &Field) -> IResult<()> {
        self.cost = self.cost.saturating_add(u64::try_from(bytes).unwrap_or(u64::MAX));
        let consumed = offset.saturating_sub(self.start);
        let allowed = consumed.saturating_mul(VALUE_BYTES_PER_INPUT_BYTE).saturating_add(VALUE_SLACK);
        if self.cost > allowed {
            return Err(ErrorKind::BadField {
                field: path(vmsd, f),
                why: format!("decoded values would take over {} bytes for {consumed} bytes of input", self.cost),
            });
        }
        Ok(())
    }
}

/// Decode the body of `vmsd` at stream version `version` (fields, then subsections).
pub(crate) fn decode<R: Read>(vmsd: &Vmsd, version: u32, input: &mut Input<R>) -> IResult<State> {
    let mut budget = Budget { empty: MAX_EMPTY_ELEMS, start: input.offset(), cost: 0 };
    decode_in(vmsd, version, input, &mut budget)
}

fn decode_in<R: Read>(vmsd: &Vmsd, version: u32, input: &mut Input<R>, empty: &mut Budget) -> IResult<State> {
    vmsd.check_version(version)?;
    let mut state = State::default();
    for f in &vmsd.fields {
        if f.version_id > version {
            continue;
        }
        let n = count_of(&state, f).map_err(|why| ErrorKind::BadField { field: path(vmsd, f), why })?;
        if let Count::One = f.count {
            if let Some(v) = decode_counted(vmsd, f, &state, input, empty)? {
                empty.charge(FIELD_COST + f.name.len(), input.offset(), vmsd, f)?;
                state.fields.push((f.name.clone(), v));
            }
        } else {
            empty.charge(FIELD_COST + f.name.len(), input.offset(), vmsd, f)?;
            let mut elems = Vec::new();
            for i in 0..n {
                let before = input.offset();
                if let Some(v) = decode_counted(vmsd, f, &state, input, empty)? {
                    empty.charge(std::mem::size_of::<Value>(), input.offset(), vmsd, f)?;
                    elems.push(v);
                }
                // Zero-size elements cost no input: refuse hostile counts of them.
                if i == 0 && input.offset() == before && n > 4096 {
                    return Err(ErrorKind::BadField { field: path(vmsd, f), why: format!("{n} zero-size elements") });
                }
            }
            if !matches!(f.kind, Kind::Unused(_)) {
                state.fields.push((f.name.clone(), Value::Array(elems)));
            }
        }
    }
    decode_subsections(vmsd, &mut state, input, empty)?;
    Ok(state)
}

/// `decode_elem`, charging an element that consumed no input to the `empty` budget.
fn decode_counted<R: Read>(
    vmsd: &Vmsd,
    f: &Field,
    state: &State,
    input: &mut Input<R>,
    empty: &mut Budget,
) -> IResult<Option<Value>> {
    let before = input.offset();
    let v = decode_elem(vmsd, f, state, input, empty)?;
    if input.offset() == before {
        empty.empty = empty.empty.checked_sub(1).ok_or_else(|| ErrorKind::BadField {
            field: path(vmsd, f),
            why: format!("more than {MAX_EMPTY_ELEMS} zero-size elements in one device"),
        })?;
    }
    Ok(v)
}

fn path(vmsd: &Vmsd, f: &Field) -> String {
    format!("{}.{}", vmsd.name, f.name)
}

fn int_be(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |acc, &x| acc << 8 | u64::from(x))
}

fn decode_elem<R: Read>(
    vmsd: &Vmsd,
    f: &Field,
    state: &State,
    input: &mut Input<R>,
    empty: &mut Budget,
) -> IResult<Option<Value>> {
    const W: &str = "a device field";
    Ok(Some(match &f.kind {
        Kind::Bool => Value::Bool(input.u8(W)? != 0),
        Kind::Uint(n) => {
            let mut b = [0u8; 8];
            input.read_exact(&mut b[..*n as usize], W)?;
            Value::Uint(int_be(&b[..*n as usize]))
        }
        Kind::Int(n) => {
            let n = *n as usize;
            let mut b = [0u8; 8];
            input.read_exact(&mut b[..n], W)?;
            let raw = int_be(&b[..n]);
            // Sign-extend the n-byte two's complement value.
            let shift = 64 - 8 * n;
            Value::Int((raw << shift).cast_signed() >> shift)
        }
        Kind::Buffer(n) => Value::Bytes(input.read_vec(u64::from(*n), W)?),
        Kind::VBuffer { field, multiply } => {
            let n =
                var_len(state, field, *multiply).map_err(|why| ErrorKind::BadField { field: path(vmsd, f), why })?;
            Value::Bytes(input.read_vec(n, W)?)
        }
        Kind::Text(n) => {
            let b = input.read_vec(u64::from(*n), W)?;
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            Value::Text(String::from_utf8_lossy(&b[..end]).into_owned())
        }
        Kind::Unused(n) => {
            input.skip(u64::from(*n), W)?;
            return Ok(None);
        }
        Kind::Timer => {
            let t = input.be64(W)?;
            Value::Timer(if t == u64::MAX { None } else { Some(t) })
        }
        Kind::Bitmap(bits) => Value::Bytes(input.read_vec(u64::from(*bits).div_ceil(64) * 8, W)?),
        Kind::Struct(inner) => Value::Struct(decode_in(inner, inner.version_id, input, empty)?),
        Kind::Raw { size, .. } => Value::Bytes(input.read_vec(u64::from(*size), W)?),
    }))
}

fn decode_subsections<R: Read>(
    vmsd: &Vmsd,
    state: &mut State,
    input: &mut Input<R>,
    empty: &mut Budget,
) -> IResult<()> {
    loop {
        let head = input.peek(2)?;
        if head.len() < 2 || head[0] != QEMU_VM_SUBSECTION {
            return Ok(());
        }
        let len = head[1] as usize;
        if len < vmsd.name.len() + 1 {
            return Ok(());
        }
        let head = input.peek(2 + len)?;
        if head.len() < 2 + len {
            return Ok(()); // truncated: the caller's next read reports it
        }
        let name = &head[2..2 + len];
        if !name.starts_with(vmsd.name.as_bytes()) {
            return Ok(());
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let Some(sub) = vmsd.subsections.iter().find(|s| s.vmsd.name == name) else {
            return Err(ErrorKind::UnknownSubsection { vmsd: vmsd.name.clone(), sub: name });
        };
        input.skip(2 + len as u64, "a subsection header")?;
        let version = input.be32("a subsection header")?;
        let sub_state = decode_in(&sub.vmsd, version, input, empty)?;
        state.subsections.push(SubsectionState { name, version, state: sub_state });
    }
}

/// Decode `vmsd` from a byte slice (whole body); returns the state and the bytes consumed.
pub fn decode_bytes(vmsd: &Vmsd, version: u32, bytes: &[u8]) -> crate::Result<(State, usize)> {
    let mut input = Input::new(bytes);
    let st = decode(vmsd, version, &mut input).map_err(|k| input.err(k))?;
    // The offset is within `bytes`, so it fits.
    Ok((st, usize::try_from(input.offset()).unwrap_or(bytes.len())))
}

// ---------------------------------------------------------------- encode

/// Encode `state` as the body of `vmsd` at its current version.
pub fn encode<W: Write>(vmsd: &Vmsd, state: &State, w: &mut W) -> Result<u64, EncodeError> {
    encode_v(vmsd, vmsd.version_id, state, w)
}

/// Encode `state` as the body of `vmsd` at `version` (fields newer than it are left out).
pub fn encode_v<W: Write>(vmsd: &Vmsd, version: u32, state: &State, w: &mut W) -> Result<u64, EncodeError> {
    let mut n = 0u64;
    for f in &vmsd.fields {
        if f.version_id > version {
            continue;
        }
        let bad = |why: String| EncodeError::BadValue { vmsd: vmsd.name.clone(), field: f.name.clone(), why };
        if let Kind::Unused(len) = f.kind {
            let count = count_of(state, f).map_err(bad)?;
            for _ in 0..count {
                w.write_all(&vec![0u8; len as usize])?;
                n += u64::from(len);
            }
            continue;
        }
        let v = state
            .get(&f.name)
            .ok_or_else(|| EncodeError::MissingField { vmsd: vmsd.name.clone(), field: f.name.clone() })?;
        match f.count {
            Count::One => n += encode_elem(vmsd, f, state, v, w)?,
            _ => {
                let count = count_of(state, f).map_err(bad)?;
                let Value::Array(elems) = v else { return Err(bad("expected an array".into())) };
                if elems.len() as u64 != count {
                    return Err(bad(format!("array has {} elements, description says {count}", elems.len())));
                }
                for e in elems {
                    n += encode_elem(vmsd, f, state, e, w)?;
                }
            }
        }
    }
    for sub in &vmsd.subsections {
        let present = state.subsection(&sub.vmsd.name);
        let needed = match sub.needed {
            Needed::IfPresent => present.is_some(),
            Needed::When(pred) => pred(state),
        };
        if !needed {
            continue;
        }
        let s = present
            .ok_or_else(|| EncodeError::MissingSubsection { vmsd: vmsd.name.clone(), sub: sub.vmsd.name.clone() })?;
        let name = sub.vmsd.name.as_bytes();
        let len = u8::try_from(name.len()).map_err(|_| EncodeError::NameTooLong(sub.vmsd.name.clone()))?;
        w.write_all(&[QEMU_VM_SUBSECTION, len])?;
        w.write_all(name)?;
        w.write_all(&s.version.to_be_bytes())?;
        n += 2 + name.len() as u64 + 4 + encode_v(&sub.vmsd, s.version, &s.state, w)?;
    }
    Ok(n)
}

fn encode_elem<W: Write>(vmsd: &Vmsd, f: &Field, state: &State, v: &Value, w: &mut W) -> Result<u64, EncodeError> {
    let bad = |why: String| EncodeError::BadValue { vmsd: vmsd.name.clone(), field: f.name.clone(), why };
    let fixed = |b: &[u8], len: u64| -> Result<(), EncodeError> {
        if b.len() as u64 != len {
            return Err(bad(format!("{} bytes, expected {len}", b.len())));
        }
        Ok(())
    };
    match (&f.kind, v) {
        (Kind::Bool, Value::Bool(b)) => w.write_all(&[u8::from(*b)])?,
        (Kind::Uint(n), v) | (Kind::Int(n), v) if v.as_u64().is_some() => {
            let x = v.as_u64().unwrap_or(0);
            let n = *n as usize;
            if n < 8 {
                let fits = match v {
                    Value::Int(i) => {
                        let lim = 1i64 << (8 * n - 1);
                        (-lim..lim).contains(i)
                    }
                    _ => x < 1u64 << (8 * n),
                };
                if !fits {
                    return Err(bad(format!("value does not fit in {n} bytes")));
                }
            }
            w.write_all(&x.to_be_bytes()[8 - n..])?;
            return Ok(n as u64);
        }
        (Kind::Buffer(len), Value::Bytes(b)) | (Kind::Text(len), Value::Bytes(b)) => {
            fixed(b, u64::from(*len))?;
            w.write_all(b)?;
        }
        // A text buffer is a buffer on the wire: a state decoded with a built-in
        // description encodes with one derived from the vmdesc, and back.
        (Kind::Buffer(len), Value::Text(s)) | (Kind::Text(len), Value::Text(s)) => {
            if s.len() >= *len as usize {
                return Err(bad(format!("text longer than {} bytes", len.saturating_sub(1))));
            }
            let mut buf = vec![0u8; *len as usize];
            buf[..s.len()].copy_from_slice(s.as_bytes());
            w.write_all(&buf)?;
        }
        (Kind::VBuffer { field, multiply }, Value::Bytes(b)) => {
            let len = var_len(state, field, *multiply).map_err(bad)?;
            fixed(b, len)?;
            w.write_all(b)?;
        }
        (Kind::Timer, Value::Timer(t)) => w.write_all(&t.unwrap_or(u64::MAX).to_be_bytes())?,
        (Kind::Bitmap(bits), Value::Bytes(b)) => {
            fixed(b, u64::from(*bits).div_ceil(64) * 8)?;
            w.write_all(b)?;
        }
        (Kind::Struct(inner), Value::Struct(s)) => return encode(inner, s, w),
        (Kind::Raw { size, .. }, Value::Bytes(b)) => {
            fixed(b, u64::from(*size))?;
            w.write_all(b)?;
        }
        (k, v) => return Err(bad(format!("value {v:?} does not fit type {}", k.type_name()))),
    }
    Ok(elem_size_hint(&f.kind, v))
}

fn elem_size_hint(k: &Kind, v: &Value) -> u64 {
    match (k, v) {
        (Kind::Bool, _) => 1,
        (Kind::Text(n), _) | (Kind::Buffer(n), Value::Text(_)) => u64::from(*n),
        (Kind::Timer, _) => 8,
        (_, Value::Bytes(b)) => b.len() as u64,
        _ => 0,
    }
}

/// Encode to a fresh byte vector.
pub fn encode_to_vec(vmsd: &Vmsd, state: &State) -> Result<Vec<u8>, EncodeError> {
    let mut v = Vec::new();
    encode(vmsd, state, &mut v)?;
    Ok(v)
}

// ---------------------------------------------------------------- vmdesc

/// The vmdesc JSON of one top-level device: `{"name", "instance_id", "vmsd_name", "version", "fields", ["subsections"]}`.
pub fn vmdesc(idstr: &str, instance_id: u32, vmsd: &Vmsd, state: &State) -> Result<Json, EncodeError> {
    let mut m = Map::new();
    m.insert("name".into(), json!(idstr));
    m.insert("instance_id".into(), json!(instance_id));
    describe(vmsd, vmsd.version_id, state, &mut m)?;
    Ok(Json::Object(m))
}

/// Fill `vmsd_name`, `version`, `fields` and `subsections` into `m`; returns the body size.
fn describe(vmsd: &Vmsd, version: u32, state: &State, m: &mut Map<String, Json>) -> Result<u64, EncodeError> {
    m.insert("vmsd_name".into(), json!(vmsd.name));
    m.insert("version".into(), json!(version));
    let mut fields = Vec::new();
    let mut total = 0u64;
    for (fi, f) in vmsd.fields.iter().enumerate() {
        if f.version_id > version {
            continue;
        }
        let bad = |why: String| EncodeError::BadValue { vmsd: vmsd.name.clone(), field: f.name.clone(), why };
        let n = count_of(state, f).map_err(bad)?;
        let name = unique_name(vmsd, fi);
        let elems: Vec<Option<&Value>> = match (&f.kind, state.get(&f.name), &f.count) {
            (Kind::Unused(_), _, _) => vec![None; usize::try_from(n).map_err(|_| bad(format!("{n} elements")))?],
            (_, Some(v), Count::One) => vec![Some(v)],
            (_, Some(Value::Array(a)), _) => a.iter().map(Some).collect(),
            _ => return Err(EncodeError::MissingField { vmsd: vmsd.name.clone(), field: f.name.clone() }),
        };
        let compress = f.kind.compressible();
        for (i, e) in elems.iter().enumerate() {
            let mut o = Map::new();
            o.insert("name".into(), json!(name));
            if n > 1 {
                if compress {
                    o.insert("array_len".into(), json!(n));
                } else {
                    o.insert("index".into(), json!(i));
                }
            }
            o.insert("type".into(), json!(f.kind.type_name()));
            let size = match (&f.kind, e) {
                (Kind::Struct(inner), Some(Value::Struct(s))) => {
                    let mut sm = Map::new();
                    let sz = describe(inner, inner.version_id, s, &mut sm)?;
                    o.insert("struct".into(), Json::Object(sm));
                    sz
                }
                (Kind::Unused(len), _) => u64::from(*len),
                (_, Some(v)) => encode_elem(vmsd, f, state, v, &mut std::io::sink())?,
                (_, None) => 0,
            };
            o.insert("size".into(), json!(size));
            total += size * if compress { n } else { 1 };
            fields.push(Json::Object(o));
            if compress {
                break;
            }
        }
    }
    m.insert("fields".into(), Json::Array(fields));
    let mut subs = Vec::new();
    for sub in &vmsd.subsections {
        let Some(s) = state.subsection(&sub.vmsd.name) else { continue };
        let needed = match sub.needed {
            Needed::IfPresent => true,
            Needed::When(pred) => pred(state),
        };
        if !needed {
            continue;
        }
        let mut sm = Map::new();
        total += 2 + sub.vmsd.name.len() as u64 + 4 + describe(&sub.vmsd, s.version, &s.state, &mut sm)?;
        subs.push(Json::Object(sm));
    }
    if !subs.is_empty() {
        m.insert("subsections".into(), Json::Array(subs));
    }
    Ok(total)
}

/// QEMU makes duplicate field names unique with a `[k]` suffix (k = index among same-named fields).
fn unique_name(vmsd: &Vmsd, fi: usize) -> String {
    let name = &vmsd.fields[fi].name;
    let same = vmsd.fields.iter().filter(|f| &f.name == name).count();
    if same <= 1 {
        return name.clone();
    }
    let k = vmsd.fields[..fi].iter().filter(|f| &f.name == name).count();
    format!("{name}[{k}]")
}

/// The vmdesc JSON QEMU writes for an old-style device (hand-written `save_state`,
/// no vmsd): `{"name", "instance_id", "size", "fields": [{"name": "data", "size", "type": "buffer"}]}`,
/// `size` being the body's length.
pub fn old_style_vmdesc(idstr: &str, instance_id: u32, size: u64) -> Json {
    json!({
        "name": idstr,
        "instance_id": instance_id,
        "size": size,
        "fields": [{"name": "data", "size": size, "type": "buffer"}],
    })
}

// ---------------------------------------------------------------- from vmdesc

/// Build a description from a vmdesc device (or struct/subsection) object, so a
/// device this crate has no built-in description for can still be decoded (as
/// QEMU's `analyze-migration.py` does). Sizes come from the JSON.
pub fn vmsd_from_vmdesc(obj: &Json) -> Result<Vmsd, String> {
    from_desc(obj, 0)
}

/// Build a description of an old-style vmdesc entry (no `vmsd_name`; see
/// [`old_style_vmdesc`]) as QEMU's `analyze-migration.py` reads it: its `fields`
/// (one `data` buffer of the body's size), or a `data` buffer of `size` bytes when
/// it has none. Named after the entry's idstr, loading any section version.
pub fn vmsd_from_old_style(obj: &Json) -> Result<Vmsd, String> {
    let o = obj.as_object().ok_or("vmdesc entry is not an object")?;
    let name = o.get("name").and_then(Json::as_str).ok_or("device without name")?;
    let mut vmsd = Vmsd::new(name, u32::MAX, 0);
    match o.get("fields") {
        Some(fields) => {
            for f in fields.as_array().ok_or("fields is not an array")? {
                vmsd.fields.push(field_from_desc(f, 0)?);
            }
        }
        None => {
            let size = o.get("size").and_then(Json::as_u64).ok_or("old-style device without size")?;
            let size = u32::try_from(size).map_err(|_| format!("size {size} too large"))?;
            vmsd.fields.push(Field { name: "data".into(), kind: Kind::Buffer(size), version_id: 0, count: Count::One });
        }
    }
    Ok(vmsd)
}

fn from_desc(obj: &Json, depth: u32) -> Result<Vmsd, String> {
    if depth > 32 {
        return Err("vmdesc nested too deeply".into());
    }
    let o = obj.as_object().ok_or("vmdesc entry is not an object")?;
    let name = o.get("vmsd_name").and_then(Json::as_str).ok_or("missing vmsd_name")?;
    let version = o.get("version").and_then(Json::as_u64).ok_or("missing version")?;
    let version = u32::try_from(version).map_err(|_| "version out of range")?;
    let mut vmsd = Vmsd::new(name, version, 0);
    if let Some(fields) = o.get("fields") {
        for f in fields.as_array().ok_or("fields is not an array")? {
            vmsd.fields.push(field_from_desc(f, depth)?);
        }
    }
    if let Some(subs) = o.get("subsections") {
        for s in subs.as_array().ok_or("subsections is not an array")? {
            let sub = from_desc(s, depth + 1)?;
            vmsd.subsections.push(Subsection { vmsd: Arc::new(sub), needed: Needed::IfPresent });
        }
    }
    Ok(vmsd)
}

fn field_from_desc(f: &Json, depth: u32) -> Result<Field, String> {
    let o = f.as_object().ok_or("field is not an object")?;
    let mut name = o.get("name").and_then(Json::as_str).ok_or("field without name")?.to_string();
    let ty = o.get("type").and_then(Json::as_str).ok_or("field without type")?;
    let size = o.get("size").and_then(Json::as_u64).ok_or("field without size")?;
    let size = u32::try_from(size).map_err(|_| format!("field {name}: size {size} too large"))?;
    let count = match o.get("array_len").and_then(Json::as_u64) {
        Some(n) => Count::Fixed(u32::try_from(n).map_err(|_| "array_len too large")?),
        None => Count::One,
    };
    if let Some(i) = o.get("index").and_then(Json::as_u64) {
        name = format!("{name}[{i}]");
    }
    let int_width = |prefix: &str| -> Option<u8> {
        let bits: u32 = ty.strip_prefix(prefix)?.parse().ok()?;
        (bits / 8 == size).then_some(u8::try_from(size).ok()?).filter(|s| matches!(s, 1 | 2 | 4 | 8))
    };
    let kind = if ty == "struct" || ty == "vstruct" {
        let inner = o.get("struct").ok_or_else(|| format!("struct field {name} without struct"))?;
        Kind::Struct(Arc::new(from_desc(inner, depth + 1)?))
    } else if ty == "bool" && size == 1 {
        Kind::Bool
    } else if let Some(n) = int_width("uint") {
        Kind::Uint(n)
    } else if let Some(n) = int_width("int") {
        Kind::Int(n)
    } else if ty == "timer" && size == 8 {
        Kind::Timer
    } else if ty == "unused_buffer" {
        Kind::Unused(size)
    } else if ty == "buffer" {
        Kind::Buffer(size)
    } else {
        Kind::Raw { type_name: ty.to_string(), size }
    };
    Ok(Field { name, kind, version_id: 0, count })
}
