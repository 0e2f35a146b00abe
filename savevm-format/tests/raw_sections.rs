//! Sections whose body the caller reads: a hand-written device's FULL section and a
//! live handler's START/PART/END sections, through `Decoder::register_raw` and
//! `Event::RawBody`. Exact loaders round-trip; loaders that read too little or too
//! much, and streams cut anywhere in the section, give typed errors at the right
//! offset; the vmdesc entry has QEMU's old-style shape and decodes the body without
//! any loader.

use savevm_format::{
    find_trailing_vmdesc, to_qemu_json, Configuration, Decoder, DescriptionSource, ErrorKind, Event, SectionKind,
    StreamWriter,
};
use std::io::{Read, Write};

const RAW: &[u8] = b"\x00\x00\x00\x0dhand-written!";

/// A stream with one hand-written device `acpi-raw` (id 7) and a live handler
/// `dirty-log` (id 9: START, two PARTs, END), then EOF and the vmdesc.
/// Returns the stream and the offset of the raw FULL section's body.
fn stream() -> (Vec<u8>, u64) {
    let mut w = StreamWriter::new(Vec::new());
    w.header().expect("header");
    w.configuration(&Configuration { machine: "none".into(), ..Default::default() }).expect("config");
    w.section_start(9, "dirty-log", 0, 2).expect("start");
    w.body().write_all(b"S").expect("body");
    w.footer(9).expect("footer");
    for part in [b"P1", b"P2"] {
        w.section_part(9).expect("part");
        w.body().write_all(part).expect("body");
        w.footer(9).expect("footer");
    }
    w.section_end(9).expect("end");
    w.body().write_all(b"E!").expect("body");
    w.footer(9).expect("footer");
    let before = w.bytes_written();
    w.raw_device(7, "acpi-raw", 0, 3, RAW).expect("raw device");
    let body = before + 1 + 4 + 1 + "acpi-raw".len() as u64 + 4 + 4;
    w.eof().expect("eof");
    w.vmdesc().expect("vmdesc");
    (w.finish().expect("finish"), body)
}

/// A loader that reads a be32 length and that many bytes, plus `skew` bytes more (or fewer).
fn load_prefixed(r: &mut dyn Read, skew: i64) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let n = (u32::from_be_bytes(len) as i64 + skew) as usize;
    let mut v = vec![0u8; n];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// What the loaders received: each live section's body, and the raw device's payload.
type Loaded = (Vec<(SectionKind, Vec<u8>)>, Vec<u8>);

/// Decode with loaders; returns what each live section and the raw device delivered.
fn decode(data: &[u8], skew: i64) -> Result<Loaded, savevm_format::Error> {
    let mut d = Decoder::new(data);
    d.register_raw("acpi-raw", 0);
    d.register_raw("dirty-log", 0);
    let (mut live, mut raw) = (Vec::new(), Vec::new());
    while let Some(ev) = d.next()? {
        if let Event::RawBody(mut body) = ev {
            let h = body.header().clone();
            if h.idstr == "acpi-raw" {
                assert_eq!((h.kind, h.version, h.section_id), (SectionKind::Full, 3, 7));
                match load_prefixed(&mut body, skew) {
                    Ok(v) => raw = v,
                    Err(e) => return Err(body.stream_error().unwrap_or_else(|| panic!("loader failed: {e}"))),
                }
            } else {
                let n = match h.kind {
                    SectionKind::Start => 1,
                    _ => 2,
                };
                let mut v = vec![0u8; n];
                if body.read_exact(&mut v).is_err() {
                    return Err(body.stream_error().expect("stream error"));
                }
                live.push((h.kind, v));
            }
        }
    }
    Ok((live, raw))
}

#[test]
fn exact_loaders_round_trip() {
    let (data, _) = stream();
    let (live, raw) = decode(&data, 0).expect("decode");
    assert_eq!(raw, b"hand-written!");
    let kinds: Vec<_> = live.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    assert_eq!(
        kinds,
        [
            (SectionKind::Start, &b"S"[..]),
            (SectionKind::Part, b"P1"),
            (SectionKind::Part, b"P2"),
            (SectionKind::End, b"E!")
        ]
    );
}

#[test]
fn loaders_that_misread_give_the_offset_where_the_footer_was_expected() {
    let (data, body) = stream();
    for skew in [-1i64, -5, 1, 3] {
        let e = decode(&data, skew).expect_err("misread");
        let read = (RAW.len() as i64 + skew) as u64;
        assert!(matches!(e.kind, ErrorKind::RawBodyEnd { read: r, .. } if r == read), "skew {skew}: {e}");
        assert_eq!(e.offset, body + read, "skew {skew}: {e}");
        assert_eq!(e.section.as_deref(), Some("acpi-raw"));
    }
}

#[test]
fn a_cut_anywhere_in_the_raw_section_is_a_truncation_at_the_cut() {
    let (data, body) = stream();
    let section = body - (1 + 4 + 1 + 8 + 4 + 4);
    let end = body + RAW.len() as u64 + 5;
    for cut in section..end {
        let e = decode(&data[..cut as usize], 0).expect_err("cut");
        assert!(e.is_truncation(), "cut {cut}: {e}");
        assert_eq!(e.offset, cut, "cut {cut}: {e}");
    }
    // And in the live sections before it.
    for cut in 20..section {
        let e = decode(&data[..cut as usize], 0).expect_err("cut");
        assert!(e.is_truncation() && e.offset == cut, "cut {cut}: {e}");
    }
}

#[test]
fn vmdesc_has_the_old_style_shape_and_decodes_the_body_without_a_loader() {
    let (data, _) = stream();
    let (vmdesc, _) = find_trailing_vmdesc(&data).expect("vmdesc");
    assert_eq!(
        to_qemu_json(&vmdesc),
        r#"{"page_size": 4096, "devices": [{"name": "acpi-raw", "instance_id": 0, "size": 17, "fields": [{"name": "data", "size": 17, "type": "buffer"}]}]}"#
    );
    // Without the live sections (no loader can skip them), the raw device decodes from the vmdesc.
    let mut w = StreamWriter::new(Vec::new());
    w.header().expect("header");
    w.configuration(&Configuration { machine: "none".into(), ..Default::default() }).expect("config");
    w.raw_device(7, "acpi-raw", 0, 3, RAW).expect("raw device");
    w.eof().expect("eof");
    w.vmdesc().expect("vmdesc");
    let plain = w.finish().expect("finish");
    let (vmdesc, _) = find_trailing_vmdesc(&plain).expect("vmdesc");
    let mut d = Decoder::new(&plain[..]);
    d.set_vmdesc(&vmdesc).expect("set vmdesc");
    let mut seen = None;
    while let Some(ev) = d.next().expect("decode") {
        if let Event::Device { state, source, vmsd } = ev {
            assert_eq!(source, DescriptionSource::Vmdesc);
            assert_eq!(vmsd.version_id, 3, "the section's version");
            seen = Some(state.to_json());
        }
    }
    assert_eq!(seen, Some(serde_json::json!({"data": savevm_format::vmstate::hex(RAW)})));
    // Without vmdesc or loader: a typed error, not a guess.
    let mut d = Decoder::new(&plain[..]);
    let e = loop {
        match d.next() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("decoded an opaque body"),
            Err(e) => break e,
        }
    };
    assert!(matches!(e.kind, ErrorKind::NoDescription(ref n) if n == "acpi-raw"), "{e}");
}

#[test]
fn an_unregistered_live_section_is_refused() {
    let (data, _) = stream();
    let mut d = Decoder::new(&data[..]);
    let e = loop {
        match d.next() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("decoded an opaque live section"),
            Err(e) => break e,
        }
    };
    assert!(matches!(e.kind, ErrorKind::OpaqueLiveSection(ref n) if n == "dirty-log"), "{e}");
}
