//! XBZRLE page deltas, byte-exact with QEMU's `migration/xbzrle.c`.
//!
//! A delta is a sequence of (zero-run, non-zero-run) pairs: `uleb(zrun)`
//! unchanged bytes are skipped, then `uleb(nzrun)` and that many new bytes are
//! copied. Lengths are 1- or 2-byte ULEB128 (at most 0x3fff). A trailing run of
//! unchanged bytes is not encoded; an unchanged page encodes to nothing.

/// Encode a ULEB128 value below 0x4000 into `out`, returning its length (1 or 2).
fn uleb_put(out: &mut [u8], v: usize) -> usize {
    debug_assert!(v <= 0x3fff);
    // Two 7-bit groups at most (v <= 0x3fff), so both conversions are exact.
    let lo = u8::try_from(v & 0x7f).unwrap_or(0);
    let hi = u8::try_from(v >> 7).unwrap_or(u8::MAX);
    if v < 0x80 {
        out[0] = lo;
        1
    } else {
        out[0] = lo | 0x80;
        out[1] = hi;
        2
    }
}

/// Decode a 1- or 2-byte ULEB128; `None` for a third continuation byte.
fn uleb_get(inp: &[u8]) -> Option<(usize, usize)> {
    let b0 = *inp.first()?;
    if b0 & 0x80 == 0 {
        return Some((b0 as usize, 1));
    }
    let b1 = *inp.get(1)?;
    if b1 & 0x80 != 0 {
        return None;
    }
    Some(((b0 & 0x7f) as usize | (b1 as usize) << 7, 2))
}

/// Encode the delta from `old` to `new` into `dst` as QEMU does.
///
/// Returns `Some(len)` (0 when the pages are equal), or `None` when the
/// encoding would not fit in `dst` (QEMU then sends a plain page). `old` and
/// `new` must have the same length, at most 0x3fff bytes.
pub fn encode(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    assert_eq!(old.len(), new.len(), "xbzrle: pages of different sizes");
    let slen = new.len();
    let dlen = dst.len();
    let (mut i, mut d) = (0usize, 0usize);
    while i < slen {
        if d + 2 > dlen {
            return None;
        }
        let zstart = i;
        i += common_prefix(&old[i..], &new[i..]);
        if i - zstart == slen {
            return Some(0);
        }
        if i == slen {
            return Some(d);
        }
        d += uleb_put(&mut dst[d..], i - zstart);
        if d + 2 > dlen {
            return None;
        }
        let nzstart = i;
        while i < slen && old[i] != new[i] {
            i += 1;
        }
        let nz = i - nzstart;
        d += uleb_put(&mut dst[d..], nz);
        if d + nz > dlen {
            return None;
        }
        dst[d..d + nz].copy_from_slice(&new[nzstart..i]);
        d += nz;
    }
    Some(d)
}

/// Length of the common prefix, a word at a time.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_ne_bytes(a[i..i + 8].try_into().unwrap_or([0; 8]));
        let y = u64::from_ne_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        if x != y {
            break;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// Apply the delta `src` onto `dst` in place (bytes not covered stay as they are).
///
/// Returns the decoded length (the end of the last run), or `None` when the
/// delta is malformed exactly where QEMU's `xbzrle_decode_buffer` fails.
pub fn decode(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let slen = src.len();
    let dlen = dst.len();
    let (mut i, mut d) = (0usize, 0usize);
    while i < slen {
        if slen - i < 2 {
            return None;
        }
        let (z, n) = uleb_get(&src[i..])?;
        if i != 0 && z == 0 {
            return None;
        }
        i += n;
        d += z;
        if d > dlen || slen - i < 2 {
            return None;
        }
        let (nz, n) = uleb_get(&src[i..])?;
        if nz == 0 {
            return None;
        }
        i += n;
        if d + nz > dlen || i + nz > slen {
            return None;
        }
        dst[d..d + nz].copy_from_slice(&src[i..i + nz]);
        d += nz;
        i += nz;
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_qemu_record_decodes() {
        // Eight 2-byte changes at 8-byte strides, from a real 7.2 stream.
        let delta = [
            0x00, 0x02, 0xc1, 0xb6, 0x06, 0x02, 0x69, 0x9b, 0x06, 0x02, 0x51, 0x9f, 0x06, 0x02, 0x39, 0xa3, 0x06, 0x02,
            0x21, 0xa7, 0x06, 0x02, 0x09, 0xab, 0x06, 0x02, 0xf1, 0xae, 0x06, 0x02, 0xd9, 0xb2,
        ];
        let mut page = vec![0u8; 4096];
        assert_eq!(decode(&delta, &mut page), Some(58));
        assert_eq!(&page[..2], &[0xc1, 0xb6]);
        assert_eq!(&page[8..10], &[0x69, 0x9b]);
        assert_eq!(&page[56..58], &[0xd9, 0xb2]);
        // Re-encoding from a zero page gives the same bytes.
        let mut out = vec![0u8; 4096];
        let Some(n) = encode(&vec![0u8; 4096], &page, &mut out) else { panic!("encoding overflowed") };
        assert_eq!(&out[..n], &delta[..]);
    }

    #[test]
    fn unchanged_page_is_empty() {
        let p = vec![7u8; 4096];
        let mut out = vec![0u8; 4096];
        assert_eq!(encode(&p, &p, &mut out), Some(0));
    }

    #[test]
    fn overflow_gives_none() {
        let old = vec![0u8; 4096];
        let new: Vec<u8> = (0..4096).map(|i| if i % 2 == 0 { 1 } else { 0 }).collect();
        let mut out = vec![0u8; 4096];
        assert_eq!(encode(&old, &new, &mut out), None);
    }

    #[test]
    fn decode_rejects_qemu_errors() {
        let mut page = vec![0u8; 4096];
        assert_eq!(decode(&[0x00], &mut page), None); // one byte left before zrun
        assert_eq!(decode(&[0x00, 0x00], &mut page), None); // nzrun 0
        assert_eq!(decode(&[0x00, 0x01, 0xaa, 0x00, 0x01, 0xbb], &mut page), None); // later zrun 0
        assert_eq!(decode(&[0x80, 0x80, 0x01], &mut page), None); // 3-byte uleb
        assert_eq!(decode(&[0xff, 0x7f, 0x01, 0x01], &mut page), None); // beyond page
        assert_eq!(decode(&[0x00, 0x05, 0x01], &mut page), None); // data past input
    }
}
