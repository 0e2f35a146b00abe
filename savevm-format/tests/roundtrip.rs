//! Round trips (proptest) for every encoder/decoder pair of the format crate:
//! vmstate descriptions (with version gating, arrays, nested structs and
//! subsections) and their vmdesc, commands, return-path messages, XBZRLE,
//! configuration, RAM records and whole streams, multifd initial packets.

use proptest::prelude::*;
use savevm_format::multifd::InitialPacket;
use savevm_format::vmstate::{self, Count, Kind, Needed, State, SubsectionState, Value, Vmsd};
use savevm_format::{
    xbzrle, Command, Configuration, Decoder, Event, PageSink, RamBlock, RpMessage, StoppedGuest, StreamWriter,
};
use std::collections::HashMap;
use std::sync::Arc;

// ------------------------------------------------------------ vmstate

/// A leaf kind with a strategy for its values.
fn leaf() -> impl Strategy<Value = (Kind, BoxedStrategy<Value>)> {
    prop_oneof![
        Just((Kind::Bool, any::<bool>().prop_map(Value::Bool).boxed())),
        prop::sample::select(vec![1u8, 2, 4, 8]).prop_map(|n| {
            let max = if n == 8 { u64::MAX } else { (1u64 << (8 * n)) - 1 };
            (Kind::Uint(n), (0..=max).prop_map(Value::Uint).boxed())
        }),
        prop::sample::select(vec![1u8, 2, 4, 8]).prop_map(|n| {
            let lim = if n == 8 { i64::MAX } else { (1i64 << (8 * n - 1)) - 1 };
            (Kind::Int(n), (-lim - 1..=lim).prop_map(Value::Int).boxed())
        }),
        (0u32..40).prop_map(|n| (
            Kind::Buffer(n),
            prop::collection::vec(any::<u8>(), n as usize).prop_map(Value::Bytes).boxed()
        )),
        (1u32..40).prop_map(|n| (
            Kind::Text(n),
            "[a-z-]{0,38}".prop_map(move |s: String| Value::Text(s[..s.len().min(n as usize - 1)].to_string())).boxed()
        )),
        (0u32..20).prop_map(|n| (Kind::Unused(n), Just(Value::Uint(0)).boxed())),
        Just((Kind::Timer, prop_oneof![Just(None), (0..u64::MAX).prop_map(Some)].prop_map(Value::Timer).boxed())),
        (1u32..200).prop_map(|bits| {
            let n = (bits as usize).div_ceil(64) * 8;
            (Kind::Bitmap(bits), prop::collection::vec(any::<u8>(), n).prop_map(Value::Bytes).boxed())
        }),
    ]
}

/// What to add to a description: a plain field, a fixed array, a variable array
/// (with its count field), a variable buffer (with its length field), or a struct.
#[derive(Debug, Clone)]
enum Spec {
    One(Kind, Value, u32),
    Fixed(Kind, Vec<Value>),
    Var(Kind, Vec<Value>),
    VBuf(Vec<u8>),
    Struct(Arc<Vmsd>, State),
}

fn spec(depth: u32, tag: String) -> BoxedStrategy<Spec> {
    let leafs = leaf().prop_flat_map(|(k, vals)| {
        let k2 = k.clone();
        let k3 = k.clone();
        prop_oneof![
            (vals.clone(), 0u32..4).prop_map(move |(v, ver)| Spec::One(k.clone(), v, ver)),
            prop::collection::vec(vals.clone(), 2..5).prop_map(move |v| Spec::Fixed(k2.clone(), v)),
            prop::collection::vec(vals, 0..5).prop_map(move |v| Spec::Var(k3.clone(), v)),
        ]
    });
    let vbuf = prop::collection::vec(any::<u8>(), 0..50).prop_map(Spec::VBuf);
    if depth == 0 {
        prop_oneof![4 => leafs, 1 => vbuf].boxed()
    } else {
        let st = desc(depth - 1, tag).prop_map(|(v, s)| Spec::Struct(Arc::new(v), s));
        prop_oneof![4 => leafs, 1 => vbuf, 1 => st].boxed()
    }
}

fn unused(k: &Kind) -> bool {
    matches!(k, Kind::Unused(_))
}

/// A description named `tag` plus a state for it at its version (3), with subsections.
/// Every nested name derives from `tag`, so names never clash as QEMU requires.
fn desc(depth: u32, tag: String) -> BoxedStrategy<(Vmsd, State)> {
    let specs: Vec<_> = (0..6).map(|i| prop::option::weighted(0.6, spec(depth, format!("{tag}_f{i}")))).collect();
    let subs: Vec<_> = if depth == 0 {
        vec![]
    } else {
        (0..2).map(|j| (desc(depth - 1, format!("{tag}/sub{j}")), any::<bool>())).collect()
    };
    (specs, subs)
        .prop_map(move |(specs, subs)| {
            let mut v = Vmsd::new(&tag, 3, 0);
            let mut s = State::default();
            for (i, sp) in specs.into_iter().enumerate() {
                let Some(sp) = sp else { continue };
                let name = format!("f{i}");
                match sp {
                    Spec::One(k, val, ver) => {
                        v = v.field_v(&name, k.clone(), ver);
                        if !unused(&k) {
                            s.set(&name, val);
                        }
                    }
                    Spec::Fixed(k, vals) => {
                        v = v.array(&name, k.clone(), Count::Fixed(vals.len() as u32));
                        if !unused(&k) {
                            s.set(&name, Value::Array(vals));
                        }
                    }
                    Spec::Var(k, vals) => {
                        let cnt = format!("n{i}");
                        v = v.field(&cnt, Kind::Uint(4)).array(
                            &name,
                            k.clone(),
                            Count::Var { field: cnt.clone(), multiply: 1 },
                        );
                        s.set(&cnt, Value::Uint(vals.len() as u64));
                        if !unused(&k) {
                            s.set(&name, Value::Array(vals));
                        }
                    }
                    Spec::VBuf(b) => {
                        let len = format!("len{i}");
                        v = v.field(&len, Kind::Int(4)).field(&name, Kind::VBuffer { field: len.clone(), multiply: 1 });
                        s.set(&len, Value::Int(b.len() as i64));
                        s.set(&name, Value::Bytes(b));
                    }
                    Spec::Struct(inner, st) => {
                        v = v.field(&name, Kind::Struct(inner));
                        s.set(&name, Value::Struct(st));
                    }
                }
            }
            for ((sv, ss), present) in subs {
                if present {
                    s.subsections.push(SubsectionState { name: sv.name.clone(), version: sv.version_id, state: ss });
                }
                v = v.subsection(sv, Needed::IfPresent);
            }
            (v, s)
        })
        .boxed()
}

/// The state as decoded at `version`: fields newer than it are absent.
fn at_version(v: &Vmsd, s: &State, version: u32) -> State {
    let mut out = s.clone();
    out.fields.retain(|(n, _)| v.fields.iter().find(|f| &f.name == n).is_none_or(|f| f.version_id <= version));
    // Rename states of renamed subsections to their final names (already done), keep order.
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn vmstate_round_trip((v, s) in desc(2, "dev".into()), version in 0u32..=3) {
        let mut bytes = Vec::new();
        let n = vmstate::encode_v(&v, version, &s, &mut bytes).unwrap();
        prop_assert_eq!(n as usize, bytes.len());
        let (got, used) = vmstate::decode_bytes(&v, version, &bytes).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(got, at_version(&v, &s, version));
    }

    #[test]
    fn vmdesc_describes_the_bytes_exactly((v, s) in desc(2, "dev".into())) {
        let bytes = vmstate::encode_to_vec(&v, &s).unwrap();
        let json = vmstate::vmdesc("dev", 0, &v, &s).unwrap();
        prop_assert_eq!(&json["vmsd_name"], "dev");
        let from = vmstate::vmsd_from_vmdesc(&json).unwrap();
        let (got, used) = vmstate::decode_bytes(&from, v.version_id, &bytes).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(got.subsections.len(), s.subsections.len());
        // Re-encoding the vmdesc-decoded state with the vmdesc-derived description gives the same bytes.
        let again = vmstate::encode_to_vec(&from, &got).unwrap();
        prop_assert_eq!(again, bytes);
    }
}

#[test]
fn version_gating_and_needed_predicate() {
    fn needed(s: &State) -> bool {
        s.get_int("flags").unwrap_or(0) & 1 != 0
    }
    let sub = Vmsd::new("dev/extra", 1, 1).field("x", Kind::Uint(2));
    let v = Vmsd::new("dev", 2, 1)
        .field("flags", Kind::Uint(1))
        .field_v("new", Kind::Uint(4), 2)
        .subsection(sub, Needed::When(needed));
    let mut s = State::default();
    s.set("flags", Value::Uint(1));
    s.set("new", Value::Uint(7));
    s.subsections.push(SubsectionState {
        name: "dev/extra".into(),
        version: 1,
        state: {
            let mut x = State::default();
            x.set("x", Value::Uint(0x1234));
            x
        },
    });
    let b2 = vmstate::encode_to_vec(&v, &s).unwrap();
    assert_eq!(b2, [1, 0, 0, 0, 7, 5, 9, b'd', b'e', b'v', b'/', b'e', b'x', b't', b'r', b'a', 0, 0, 0, 1, 0x12, 0x34]);
    let mut b1 = vec![];
    vmstate::encode_v(&v, 1, &s, &mut b1).unwrap();
    assert_eq!(&b1[..1], &[1]);
    assert_eq!(b1.len(), 1 + 15 + 2, "v1 leaves out 'new'");
    // Not needed: no subsection even though a value exists.
    s.set("flags", Value::Uint(0));
    assert_eq!(vmstate::encode_to_vec(&v, &s).unwrap().len(), 5);
    // Version 3 is too new, 0 too old.
    assert!(vmstate::decode_bytes(&v, 3, &b2).is_err());
    assert!(vmstate::decode_bytes(&v, 0, &b2).is_err());
    // An unknown subsection with the parent's prefix is an error.
    let mut bad = b2.clone();
    bad[15] = b'b';
    let e = vmstate::decode_bytes(&v, 2, &bad).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
}

#[test]
fn builtin_vmdesc_matches_qemu() {
    // The vmdesc QEMU 7.2 writes for a -machine none guest, byte for byte.
    let want = r#"{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": [{"name": "cpu_ticks_offset", "type": "int64", "size": 8}, {"name": "unused", "type": "unused_buffer", "size": 8}, {"name": "cpu_clock_offset", "type": "int64", "size": 8}]}, {"name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate", "version": 1, "fields": [{"name": "size", "type": "uint32", "size": 4}, {"name": "runstate", "type": "buffer", "size": 100}]}]}"#;
    let (stream, _) =
        savevm_format::write_stopped_guest(Vec::new(), &[("mem", &[0u8; 4096][..])], &StoppedGuest::default()).unwrap();
    let (json, pos) = savevm_format::find_trailing_vmdesc(&stream).unwrap();
    assert_eq!(&stream[pos + 5..], want.as_bytes());
    assert_eq!(json["devices"][1]["name"], "globalstate");
}

// ------------------------------------------------------------ commands

fn command() -> impl Strategy<Value = Command> {
    let name = "[a-z./@0-9]{1,40}";
    prop_oneof![
        Just(Command::OpenReturnPath),
        any::<u32>().prop_map(Command::Ping),
        prop::option::of((any::<u64>(), any::<u64>())).prop_map(Command::PostcopyAdvise),
        Just(Command::PostcopyListen),
        Just(Command::PostcopyRun),
        (name, prop::collection::vec((any::<u64>(), any::<u64>()), 1..=12))
            .prop_map(|(block, ranges)| Command::PostcopyRamDiscard { block, ranges }),
        any::<u32>().prop_map(Command::Packaged),
        Just(Command::EnableColo),
        Just(Command::PostcopyResume),
        name.prop_map(Command::RecvBitmap),
        Just(Command::SwitchoverStart),
    ]
}

fn rp_message() -> impl Strategy<Value = RpMessage> {
    let name = "[a-z./@0-9]{1,40}";
    prop_oneof![
        any::<u32>().prop_map(RpMessage::Shut),
        any::<u32>().prop_map(RpMessage::Pong),
        (any::<u64>(), any::<u32>(), name).prop_map(|(start, len, block)| RpMessage::ReqPagesId { start, len, block }),
        (any::<u64>(), any::<u32>()).prop_map(|(start, len)| RpMessage::ReqPages { start, len }),
        name.prop_map(RpMessage::RecvBitmap),
        any::<u32>().prop_map(RpMessage::ResumeAck),
        Just(RpMessage::SwitchoverAck),
    ]
}

proptest! {
    #[test]
    fn command_round_trip(c in command()) {
        let rec = c.encode();
        prop_assert_eq!(rec[0], 0x08);
        let num = u16::from_be_bytes([rec[1], rec[2]]);
        let len = u16::from_be_bytes([rec[3], rec[4]]) as usize;
        prop_assert_eq!(rec.len(), 5 + len);
        prop_assert_eq!(Command::decode(num, &rec[5..]).unwrap(), c.clone());
        // And through the stream decoder.
        let mut w = StreamWriter::new(Vec::new());
        w.header().unwrap();
        w.configuration(&Configuration { machine: "none".into(), ..Default::default() }).unwrap();
        w.command(&c).unwrap();
        let bytes = w.finish().unwrap();
        let mut d = Decoder::new(&bytes[..]);
        d.next().unwrap();
        d.next().unwrap();
        match d.next() {
            Ok(Some(Event::Command(got))) => prop_assert_eq!(got, c),
            Err(e) => prop_assert!(matches!(c, Command::PostcopyRamDiscard { .. }), "{}", e),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn rp_message_round_trip(m in rp_message()) {
        let bytes = m.encode();
        let mut r = &bytes[..];
        prop_assert_eq!(RpMessage::read(&mut r).unwrap(), Some(m));
        prop_assert!(r.is_empty());
    }

    #[test]
    fn initial_packet_round_trip(uuid in any::<[u8; 16]>(), channel_id in any::<u8>()) {
        let p = InitialPacket { uuid, channel_id };
        prop_assert_eq!(InitialPacket::decode(&p.encode()).unwrap(), p);
    }
}

// ------------------------------------------------------------ xbzrle

/// QEMU's encoding, written the slow, obvious way: maximal runs of equal/different bytes.
fn reference_xbzrle(old: &[u8], new: &[u8], dlen: usize) -> Option<Vec<u8>> {
    fn uleb(v: usize, out: &mut Vec<u8>) {
        if v < 0x80 {
            out.push(v as u8)
        } else {
            out.push((v as u8 & 0x7f) | 0x80);
            out.push((v >> 7) as u8);
        }
    }
    let mut out = vec![];
    let mut i = 0;
    while i < new.len() {
        if out.len() + 2 > dlen {
            return None;
        }
        let z = (i..new.len()).take_while(|&j| old[j] == new[j]).count();
        if z == new.len() {
            return Some(vec![]);
        }
        i += z;
        if i == new.len() {
            break;
        }
        uleb(z, &mut out);
        if out.len() + 2 > dlen {
            return None;
        }
        let nz = (i..new.len()).take_while(|&j| old[j] != new[j]).count();
        uleb(nz, &mut out);
        if out.len() + nz > dlen {
            return None;
        }
        out.extend_from_slice(&new[i..i + nz]);
        i += nz;
    }
    Some(out)
}

proptest! {
    #[test]
    fn xbzrle_round_trip(old in prop::collection::vec(any::<u8>(), 4096), edits in prop::collection::vec((0usize..4096, 1usize..300, any::<u8>()), 0..20)) {
        let mut new = old.clone();
        for (at, len, x) in edits {
            for b in &mut new[at..(at + len).min(4096)] {
                *b = b.wrapping_add(x | 1);
            }
        }
        let mut buf = vec![0u8; 4096];
        let got = xbzrle::encode(&old, &new, &mut buf);
        let want = reference_xbzrle(&old, &new, 4096);
        prop_assert_eq!(got.map(|n| buf[..n].to_vec()), want.clone());
        if let Some(n) = got {
            let mut page = old.clone();
            prop_assert!(xbzrle::decode(&buf[..n], &mut page).is_some());
            prop_assert_eq!(page, new);
        }
    }
}

// ------------------------------------------------------------ configuration and whole streams

proptest! {
    #[test]
    fn configuration_round_trip(machine in "[a-z0-9.-]{1,30}", caps in prop::collection::vec("[a-z-]{1,20}", 0..3), uuid in prop::option::of(any::<[u8; 16]>()), bits in prop::option::of(10u32..=16)) {
        let c = Configuration { machine, target_page_bits: bits, capabilities: caps, uuid };
        let mut w = StreamWriter::new(Vec::new());
        w.header().unwrap();
        w.configuration(&c).unwrap();
        w.eof().unwrap();
        let bytes = w.finish().unwrap();
        let mut d = Decoder::new(&bytes[..]);
        d.next().unwrap();
        match d.next() {
            Ok(Some(Event::Configuration(got))) => prop_assert_eq!(got, c),
            other => prop_assert!(false, "{:?}", other),
        }
        prop_assert!(matches!(d.next(), Ok(Some(Event::Eof))));
        prop_assert!(matches!(d.next(), Ok(None)));
    }
}

#[derive(Default)]
struct Mem(HashMap<String, Vec<u8>>);

impl PageSink for Mem {
    fn page_mut(&mut self, b: &RamBlock, off: u64) -> Option<savevm_format::PageSlot<'_>> {
        let v = self.0.entry(b.name.clone()).or_insert_with(|| vec![0xee; b.length as usize]);
        (v.get_mut(off as usize..off as usize + 4096)).map(savevm_format::PageSlot::from)
    }
}

fn guest() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let page = prop_oneof![2 => Just(vec![0u8; 4096]), 1 => prop::collection::vec(any::<u8>(), 4096), 1 => any::<u8>().prop_map(|b| vec![b; 4096])];
    prop::collection::vec(("[a-z.]{1,12}", prop::collection::vec(page, 1..8)), 1..4).prop_map(|blocks| {
        let mut seen = std::collections::HashSet::new();
        blocks.into_iter().filter(|(n, _)| seen.insert(n.clone())).map(|(n, pages)| (n, pages.concat())).collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    #[test]
    fn stream_round_trip(blocks in guest(), runstate in prop::sample::select(vec!["prelaunch", "running", "paused"])) {
        let refs: Vec<(&str, &[u8])> = blocks.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        let opts = StoppedGuest { runstate: runstate.into(), ..Default::default() };
        let (bytes, stats) = savevm_format::write_stopped_guest(Vec::new(), &refs, &opts).unwrap();
        let mut d = Decoder::new(&bytes[..]);
        let mut mem = Mem::default();
        let (mut zero, mut normal) = (0, 0);
        while let Some(ev) = d.next_with(&mut mem).unwrap() {
            match ev {
                Event::ZeroPage { .. } => zero += 1,
                Event::Page { .. } => normal += 1,
                Event::Device { state, .. } => {
                    if let Some(Value::Text(r)) = state.get("runstate") {
                        prop_assert_eq!(r.as_str(), runstate);
                    }
                }
                _ => {}
            }
        }
        prop_assert_eq!((zero, normal), (stats.duplicate, stats.normal));
        for (n, data) in &blocks {
            prop_assert!(&mem.0[n] == data, "block {} differs", n);
        }
    }

    /// XBZRLE records and interleaved commands through the writer and the decoder.
    #[test]
    fn xbzrle_records_in_a_stream(base in prop::collection::vec(any::<u8>(), 4096 * 2), flips in prop::collection::vec((0usize..8192, any::<u8>()), 1..40)) {
        let mut new = base.clone();
        for (at, x) in flips { new[at] ^= x | 1; }
        let mut w = StreamWriter::new(Vec::new());
        w.header().unwrap();
        w.configuration(&Configuration { machine: "none".into(), ..Default::default() }).unwrap();
        w.section_start(2, "ram", 0, 4).unwrap();
        w.ram_block_list(&[RamBlock::new(0, "mem", 8192)]).unwrap();
        w.ram_eos().unwrap();
        w.footer(2).unwrap();
        w.section_part(2).unwrap();
        w.ram_page(0, 0, &base[..4096]).unwrap();
        w.ram_page(0, 4096, &base[4096..]).unwrap();
        w.ram_eos().unwrap();
        w.footer(2).unwrap();
        w.command(&Command::Ping(9)).unwrap();
        w.section_end(2).unwrap();
        let mut buf = vec![0u8; 4096];
        for p in 0..2 {
            let r = p * 4096..(p + 1) * 4096;
            match xbzrle::encode(&base[r.clone()], &new[r.clone()], &mut buf) {
                Some(0) => {}
                Some(n) => w.ram_xbzrle(0, r.start as u64, &buf[..n]).unwrap(),
                None => w.ram_page(0, r.start as u64, &new[r]).unwrap(),
            }
        }
        w.ram_eos().unwrap();
        w.footer(2).unwrap();
        w.eof().unwrap();
        let bytes = w.finish().unwrap();
        let mut mem = Mem::default();
        let mut d = Decoder::new(&bytes[..]);
        let mut pings = 0;
        while let Some(ev) = d.next_with(&mut mem).unwrap() {
            if let Event::Command(Command::Ping(9)) = ev { pings += 1 }
        }
        prop_assert_eq!(pings, 1);
        prop_assert!(mem.0["mem"] == new);
    }
}
