//! Return-path messages (destination to source): `RpReader` over the input until a
//! clean end or an error, reading the bitmap after each RECV_BITMAP. Every message
//! (with UTF-8 names) re-encodes to a message that decodes to itself; errors lie inside the input; the
//! reader always makes progress.
//!
//! Shared by the fuzz target (`fuzz/fuzz_targets/decode_return_path.rs`) and the corpus test
//! (`tests/fuzz_corpus.rs`), which runs every committed corpus input and reproducer.
use savevm_format::{RpMessage, RpReader};

/// One fuzz input, as the fuzz target and the corpus test (`tests/fuzz_corpus.rs`) run it.
pub fn run(data: &[u8]) {
    let mut r = RpReader::new(data);
    loop {
        let before = r.offset();
        match r.next() {
            Ok(Some(m)) => {
                assert!(r.offset() > before, "no progress");
                // Names that are not UTF-8 decode lossily and may re-encode longer
                // (then cut at 255 bytes): compare only same-length encodings.
                let bytes = m.encode();
                if bytes.len() as u64 == r.offset() - before {
                    let again = RpReader::new(&bytes[..]).next().expect("re-encoded message decodes");
                    assert_eq!(again.as_ref(), Some(&m));
                }
                if let RpMessage::RecvBitmap(_) = m {
                    if let Err(e) = r.read_recv_bitmap(1 << 20) {
                        assert!(e.offset <= data.len() as u64);
                        break;
                    }
                }
            }
            Ok(None) => {
                assert_eq!(r.offset(), data.len() as u64);
                break;
            }
            Err(e) => {
                assert!(e.offset <= data.len() as u64, "{e}");
                break;
            }
        }
    }
}
