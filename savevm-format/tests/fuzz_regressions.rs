//! Regressions for inputs that broke the decoder (see `fuzz/`). Each one must
//! end in a typed error, quickly and in little memory.
//!
//! This test binary runs under an allocator that aborts once more than
//! 512 MiB are live, so a regression fails fast instead of taking the
//! machine's memory.

use savevm_format::{find_trailing_vmdesc, Decoder, ErrorKind};
use testkit::AllocGuard;

#[global_allocator]
static GUARD: AllocGuard = AllocGuard::new(usize::MAX, 512 << 20);

/// A `-machine none` stream with one FULL section `dev` (id 5, instance 0,
/// version 1) whose body is `body`, then EOF and the vmdesc `{"devices":[dev]}`
/// with the given `fields` for `dev`.
fn stream_with_device(body: &[u8], fields: &str) -> Vec<u8> {
    let vmdesc = format!(
        r#"{{"devices":[{{"name":"dev","instance_id":0,"vmsd_name":"dev","version":1,"fields":[{fields}]}}]}}"#
    );
    let mut s = Vec::new();
    s.extend_from_slice(b"QEVM\x00\x00\x00\x03");
    s.extend_from_slice(b"\x07\x00\x00\x00\x04none");
    s.extend_from_slice(b"\x04\x00\x00\x00\x05\x03dev\x00\x00\x00\x00\x00\x00\x00\x01");
    s.extend_from_slice(body);
    s.extend_from_slice(b"\x7e\x00\x00\x00\x05");
    s.push(0x00); // EOF
    s.push(0x06);
    s.extend_from_slice(&(vmdesc.len() as u32).to_be_bytes());
    s.extend_from_slice(vmdesc.as_bytes());
    s
}

/// Decode `data` to the end with its trailing vmdesc; the final error, if any.
fn decode_all(data: &[u8]) -> Option<savevm_format::Error> {
    let mut d = Decoder::new(data);
    let (vmdesc, _) = find_trailing_vmdesc(data).expect("the test stream has a vmdesc");
    d.set_vmdesc(&vmdesc).expect("valid vmdesc");
    loop {
        match d.next() {
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
}

/// `array_len` copies of `elem` as a struct field named `name`.
fn struct_array(name: &str, len: u32, elem: &str) -> String {
    format!(
        r#"{{"name":"{name}","type":"struct","size":0,"array_len":{len},"struct":{{"vmsd_name":"{name}","version":1,"fields":[{elem}]}}}}"#
    )
}

fn assert_zero_size_error(e: Option<savevm_format::Error>) {
    let e = e.expect("hostile vmdesc must fail");
    match &e.kind {
        ErrorKind::BadField { why, .. } => assert!(why.contains("zero-size"), "{e}"),
        other => panic!("unexpected error {other:?}"),
    }
    assert_eq!(e.section.as_deref(), Some("dev"));
}

/// Nested arrays of zero-size elements: 4096 x 4096 x 4096 empty buffers from a
/// 300-byte stream. Each array stays under the per-array limit for empty
/// elements, but the product (6.9e10 values) exhausted memory (killed by the
/// OOM killer after ~90 s) before the per-device budget of empty elements.
#[test]
fn nested_zero_size_arrays() {
    let leaf = r#"{"name":"b","type":"buffer","size":0,"array_len":4096}"#;
    let fields = struct_array("s1", 4096, &struct_array("s0", 4096, leaf));
    let data = stream_with_device(b"", &fields);
    assert!(data.len() < 400);
    assert_zero_size_error(decode_all(&data));
}

/// The same with a byte-consuming outer array: 4096 elements of
/// `{ uint8 x; buffer[0] b[4096] }` read 4096 input bytes but would build
/// 16.8 M values.
#[test]
fn zero_size_arrays_inside_byte_consuming_elements() {
    let elem = r#"{"name":"x","type":"uint8","size":1},{"name":"b","type":"buffer","size":0,"array_len":4096}"#;
    let fields = struct_array("s", 4096, elem);
    let data = stream_with_device(&[0u8; 4096], &fields);
    assert_zero_size_error(decode_all(&data));
}

/// A flat array of unused zero-size buffers (no memory, but 2^32 iterations).
#[test]
fn huge_array_of_empty_unused_buffers() {
    let fields = r#"{"name":"u","type":"unused_buffer","size":0,"array_len":4294967295}"#;
    assert_zero_size_error(decode_all(&stream_with_device(b"", fields)));
}

/// Legitimate small counts of empty elements still decode.
#[test]
fn few_zero_size_elements_decode() {
    let leaf = r#"{"name":"b","type":"buffer","size":0,"array_len":16}"#;
    let fields = format!(r#"{{"name":"x","type":"uint32","size":4}},{}"#, struct_array("s", 16, leaf));
    let data = stream_with_device(&[0, 0, 0, 7], &fields);
    assert!(decode_all(&data).is_none(), "{:?}", decode_all(&data));
}
