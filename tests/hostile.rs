//! Hostile input: truncations, byte flips, out-of-range pages and absurd block
//! lengths all end in `Ok` or a typed error with an offset, never a panic, a
//! hang or an allocation the input did not justify.

use savevm_format::ram::record_header;
use savevm_format::{Configuration, Decoder, ErrorKind, Event, PageSink, RamBlock, StreamWriter};
use std::collections::HashMap;
use testkit::{splitmix64 as rng, AllocGuard};

/// Counts live heap bytes and the peak, so tests can prove nothing big was allocated.
#[global_allocator]
static GLOBAL: AllocGuard = AllocGuard::counting();

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

/// A sink that allocates only pages actually received, and at most a bounded number.
#[derive(Default)]
struct Sparse(HashMap<(usize, u64), Box<[u8; 4096]>>);

impl PageSink for Sparse {
    fn page_mut(&mut self, b: &RamBlock, off: u64) -> Option<savevm_format::PageSlot<'_>> {
        if self.0.len() > 20_000 && !self.0.contains_key(&(b.index, off)) {
            return None;
        }
        Some(savevm_format::PageSlot::from(
            &mut self.0.entry((b.index, off)).or_insert_with(|| Box::new([0; 4096]))[..],
        ))
    }
}

/// Decode to the end; Ok(events) or the error.
fn run(bytes: &[u8], with_vmdesc: bool) -> Result<usize, savevm_format::Error> {
    let mut d = Decoder::new(bytes);
    if with_vmdesc {
        if let Some((j, _)) = savevm_format::find_trailing_vmdesc(bytes) {
            d.set_vmdesc(&j)?;
        }
    }
    let mut sink = Sparse::default();
    let mut n = 0;
    while d.next_with(&mut sink)?.is_some() {
        n += 1;
    }
    Ok(n)
}

#[test]
fn truncated_at_every_offset_of_the_first_64k() {
    for name in ["precopy-none-16m-mixed32-s1.mig", "postcopy-active-none-8m-mixed32-s3.mig"] {
        let full = fixture(name);
        for n in 0..65536.min(full.len()) {
            match run(&full[..n], false) {
                Err(e) => {
                    assert!(matches!(e.kind, ErrorKind::UnexpectedEof { .. }), "{name} cut at {n}: {e}");
                    assert_eq!(e.offset, n as u64, "{name} cut at {n}: error offset");
                }
                Ok(_) => panic!("{name} cut at {n} decoded without error"),
            }
        }
    }
}

/// Header + configuration + everything from the first FULL section on: a valid
/// stream without RAM, so cutting it everywhere stays cheap.
fn device_part(full: &[u8]) -> Vec<u8> {
    let mut d = Decoder::new(full);
    let mut first_full = None;
    while let Some(ev) = d.next().expect("fixture decodes") {
        if let Event::SectionStart(h) = ev {
            if h.kind == savevm_format::SectionKind::Full {
                first_full = Some(h.offset as usize);
                break;
            }
        }
    }
    let config_end = config_len(full);
    let first_full = first_full.expect("a FULL section");
    [&full[..config_end], &full[first_full..]].concat()
}

/// Length of header + configuration record (no subsections in these fixtures).
fn config_len(full: &[u8]) -> usize {
    let n = u32::from_be_bytes([full[9], full[10], full[11], full[12]]) as usize;
    13 + n
}

#[test]
fn truncated_at_every_offset_of_the_device_part() {
    // Device sections decoded through built-in descriptions (none) and through the
    // vmdesc (q35); a cut removes the vmdesc, so the decoder must either say which
    // section it cannot describe or that the input ended, at an offset inside the input.
    for name in ["q35-kvm-64m.mig", "xbzrle-q35-kvm-busy-16m-zero.mig", "precopy-none-16m-mixed32-s1.mig"] {
        let dev = device_part(&fixture(name));
        let whole = run(&dev, true).unwrap_or_else(|e| panic!("{name}: spliced stream: {e}"));
        assert!(whole > 4, "{name}");
        let vmdesc_at = savevm_format::find_trailing_vmdesc(&dev).map(|(_, p)| p).expect("vmdesc");
        for n in (0..dev.len()).step_by(if dev.len() > 20_000 { 3 } else { 1 }) {
            match run(&dev[..n], true) {
                Ok(_) => assert!(n >= vmdesc_at, "{name} cut at {n} decoded without error"),
                Err(e) => {
                    assert!(e.offset <= n as u64, "{name} cut at {n}: offset {} past the input", e.offset);
                    assert!(
                        e.is_truncation() || matches!(e.kind, ErrorKind::NoDescription(_)),
                        "{name} cut at {n}: {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn single_byte_flips_never_panic() {
    let mut seed = 42u64;
    let mut errors = 0;
    let mut cases = 0;
    for (name, devices_only, n_cases) in [
        ("precopy-none-16m-mixed32-s1.mig", false, 1500),
        ("postcopy-active-none-8m-mixed32-s3.mig", false, 800),
        ("q35-kvm-64m.mig", true, 1000),
        ("q35-kvm-64m.mig", false, 200),
        ("xbzrle-q35-kvm-busy-16m-zero.mig", true, 200),
        ("xbzrle-q35-kvm-busy-16m-zero.mig", false, 300),
    ] {
        let full = if devices_only { device_part(&fixture(name)) } else { fixture(name) };
        // Most structure sits in the first few KiB and the device part at the end.
        let tail = full.len().saturating_sub(50_000);
        for _ in 0..n_cases {
            let r = rng(&mut seed);
            let pos = match r % 4 {
                0 => (r >> 8) as usize % 4096.min(full.len()),
                1 => tail + (r >> 8) as usize % (full.len() - tail),
                _ => (r >> 8) as usize % full.len(),
            };
            let mut b = full.clone();
            b[pos] ^= ((r >> 40) as u8) | 1;
            cases += 1;
            if run(&b, true).is_err() {
                errors += 1;
            }
        }
    }
    assert_eq!(cases, 4000);
    assert!(errors > 200, "flips should often be detected ({errors} of {cases})");
}

/// A stream up to the RAM START section of `blocks`, with raw bytes appended by the caller.
fn ram_stream(total: u64, blocks: &[(&str, u64)]) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.header().unwrap();
    w.configuration(&Configuration { machine: "none".into(), ..Default::default() }).unwrap();
    w.section_start(2, "ram", 0, 4).unwrap();
    let mut v = w.finish().unwrap();
    v.extend_from_slice(&(total | 0x4).to_be_bytes());
    for (n, l) in blocks {
        v.push(n.len() as u8);
        v.extend_from_slice(n.as_bytes());
        v.extend_from_slice(&l.to_be_bytes());
    }
    v
}

#[test]
fn page_past_its_block_is_rejected() {
    let mut v = ram_stream(0x4000, &[("mem", 0x4000)]);
    v.extend_from_slice(&0x10u64.to_be_bytes()); // EOS
    v.extend_from_slice(&[0x7e, 0, 0, 0, 2, 0x02, 0, 0, 0, 2]); // footer, PART
    let at = v.len() as u64;
    let mut h = [0u8; savevm_format::ram::MAX_RECORD_HEADER];
    let n = record_header(&mut h, 0x4000, 0x08, Some("mem")).unwrap();
    v.extend_from_slice(&h[..n]);
    v.extend_from_slice(&[0xab; 4096]);
    let mut sink = Sparse::default();
    let mut d = Decoder::new(&v[..]);
    let err = loop {
        match d.next_with(&mut sink) {
            Ok(Some(_)) => {}
            Ok(None) => panic!("accepted a page past its block"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err.kind, ErrorKind::RamOffsetOutOfRange { offset: 0x4000, length: 0x4000, .. }), "{err}");
    assert_eq!(err.offset, at, "offset of the bad record");
    assert_eq!(err.section.as_deref(), Some("ram"));
    assert!(sink.0.is_empty(), "nothing written");
    let msg = err.to_string();
    assert!(msg.contains("in section 'ram'") && msg.contains(&format!("at byte {at}")), "{msg}");
}

#[test]
fn block_of_2_pow_60_is_rejected_without_allocating() {
    let huge = 1u64 << 60;
    for (total, blocks) in [(huge, vec![("mem", huge)]), (0x1000, vec![("mem", huge)])] {
        let v = ram_stream(total, &blocks);
        let mut d = Decoder::new(&v[..]);
        let base = GLOBAL.reset_peak();
        let err = loop {
            match d.next() {
                Ok(Some(Event::RamBlocks(_))) => panic!("accepted a 2^60 block"),
                Ok(Some(_)) => {}
                Ok(None) => panic!("no error"),
                Err(e) => break e,
            }
        };
        let peak = GLOBAL.peak() - base;
        assert!(matches!(err.kind, ErrorKind::RamTooLarge { .. } | ErrorKind::RamTotalMismatch { .. }), "{err}");
        assert!(peak < 64 * 1024, "decoder allocated {peak} bytes for a hostile length");
    }
}

#[test]
fn huge_declared_lengths_do_not_allocate() {
    // vmdesc length 2^31 after EOF, and a device whose vmdesc claims a 1 GiB buffer.
    let mut w = StreamWriter::new(Vec::new());
    w.header().unwrap();
    w.configuration(&Configuration { machine: "none".into(), ..Default::default() }).unwrap();
    w.eof().unwrap();
    let mut v = w.finish().unwrap();
    v.extend_from_slice(&[0x06, 0x7f, 0xff, 0xff, 0xff, b'{']);
    let base = GLOBAL.reset_peak();
    let e = run(&v, false).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Limit(_)), "{e}");

    let mut w = StreamWriter::new(Vec::new());
    w.header().unwrap();
    w.configuration(&Configuration { machine: "none".into(), ..Default::default() }).unwrap();
    w.section_full(7, "blob", 0, 1).unwrap();
    let mut v = w.finish().unwrap();
    v.extend_from_slice(&[1, 2, 3]);
    let mut d = Decoder::new(&v[..]);
    d.set_vmdesc(&serde_json::json!({"page_size": 4096, "devices": [{"name": "blob", "instance_id": 0, "vmsd_name": "blob", "version": 1,
        "fields": [{"name": "data", "type": "buffer", "size": 1u64 << 30}]}]}))
        .unwrap();
    let e = loop {
        match d.next() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("no error"),
            Err(e) => break e,
        }
    };
    assert!(e.is_truncation(), "{e}");
    let peak = GLOBAL.peak() - base;
    assert!(peak < 1 << 20, "allocated {peak} bytes for 3 bytes of input");
}

/// Issue 13 bug 3: POSTCOPY_RAM_DISCARD outside postcopy (no ADVISE, or after LISTEN)
/// one with more ranges than QEMU sends, and a range off the page are refused
/// before the sink sees a range.
#[test]
fn discard_outside_postcopy_unbounded_or_unaligned_is_refused() {
    #[derive(Default)]
    struct Discards(u64);
    impl PageSink for Discards {
        fn page_mut(&mut self, _b: &RamBlock, _off: u64) -> Option<savevm_format::PageSlot<'_>> {
            None
        }
        fn discard(&mut self, _b: &RamBlock, _start: u64, len: u64) {
            self.0 += len;
        }
    }
    let discard = |n: usize| savevm_format::Command::PostcopyRamDiscard {
        block: "mem".into(),
        ranges: (0..n as u64).map(|i| (i * 0x2000, 0x1000)).collect(),
    };
    let unaligned = |start: u64, len: u64| savevm_format::Command::PostcopyRamDiscard {
        block: "mem".into(),
        ranges: vec![(start, len)],
    };
    let advise = savevm_format::Command::PostcopyAdvise(Some((4096, 4096)));
    let cases: Vec<(Vec<savevm_format::Command>, bool)> = vec![
        (vec![discard(1)], false),
        (vec![advise.clone(), savevm_format::Command::PostcopyListen, discard(1)], false),
        (vec![advise.clone(), discard(13)], false),
        (vec![advise.clone(), discard(12)], true),
        // QEMU's ram_block_discard_range refuses a start or a length off the page.
        (vec![advise.clone(), unaligned(0x800, 0x1000)], false),
        (vec![advise.clone(), unaligned(0x1000, 0x1800)], false),
    ];
    for (cmds, ok) in cases {
        let mut v = ram_stream(0x100000, &[("mem", 0x100000)]);
        v.extend_from_slice(&0x10u64.to_be_bytes()); // EOS
        v.extend_from_slice(&[0x7e, 0, 0, 0, 2]); // footer
        let mut w = StreamWriter::new(Vec::new());
        for c in &cmds {
            w.command(c).unwrap();
        }
        v.extend_from_slice(&w.finish().unwrap());
        let mut sink = Discards::default();
        let mut d = Decoder::new(&v[..]);
        let r = loop {
            match d.next_with(&mut sink) {
                Ok(Some(Event::Command(savevm_format::Command::PostcopyRamDiscard { .. }))) => break Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => panic!("stream ended"),
                Err(e) => break Err(e),
            }
        };
        match (r, ok) {
            (Ok(()), true) => assert_eq!(sink.0, 12 * 0x1000),
            (Err(e), false) => {
                assert!(
                    matches!(
                        e.kind,
                        ErrorKind::DiscardOutsidePostcopy | ErrorKind::Limit(_) | ErrorKind::DiscardUnaligned { .. }
                    ),
                    "{cmds:?}: {e}"
                );
                assert_eq!(sink.0, 0, "{cmds:?}: a range reached the sink");
            }
            (r, _) => panic!("{cmds:?}: {r:?}"),
        }
    }
}

/// Issue 13 bug 6: a fixed-count array from the vmdesc whose 1-byte elements are
/// structs with a 4000-byte field name: 64 KiB of body would decode into 256 MB of
/// values. Decoded values are bounded by the bytes behind them, so it is refused.
#[test]
fn fixed_arrays_from_vmdesc_are_bounded_by_their_bytes() {
    let mut w = StreamWriter::new(Vec::new());
    w.header().unwrap();
    w.configuration(&Configuration { machine: "none".into(), ..Default::default() }).unwrap();
    w.section_full(7, "dev", 0, 1).unwrap();
    let mut v = w.finish().unwrap();
    v.extend_from_slice(&vec![0u8; 64 << 10]);
    let long = "x".repeat(4000);
    let desc = serde_json::json!({"page_size": 4096, "devices": [{"name": "dev", "instance_id": 0, "vmsd_name": "dev",
        "version": 1, "fields": [{"name": "a", "type": "struct", "size": 1, "array_len": 4_000_000u64,
            "struct": {"vmsd_name": "s", "version": 1, "fields": [{"name": long, "type": "uint8", "size": 1}]}}]}]});
    let mut d = Decoder::new(&v[..]);
    d.set_vmdesc(&desc).unwrap();
    let base = GLOBAL.reset_peak();
    let e = loop {
        match d.next() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("no error"),
            Err(e) => break e,
        }
    };
    let peak = GLOBAL.peak() - base;
    assert!(matches!(e.kind, ErrorKind::BadField { .. }), "{e}");
    assert!(e.to_string().contains("bytes of input"), "{e}");
    assert!(peak < 16 << 20, "allocated {peak} bytes for 64 KiB of input");
}
