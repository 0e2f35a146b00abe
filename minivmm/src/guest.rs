//! The guest program: 64-bit code that runs forever, counting loop iterations and
//! writing the count into random pages of its working set at a set rate, while
//! keeping a checksum of the working set's words up to date.
//!
//! Its source is `guest.S` beside this file (GNU as, Intel syntax); [`PROGRAM`]
//! holds the bytes `as --64` + `objcopy -O binary` made of it, and a test
//! re-assembles the source to check them when binutils are installed.
//!
//! Memory map (guest-physical): GDT at [`GDT_ADDR`], the control block at
//! [`CTRL_ADDR`], the code at [`CODE_ADDR`], identity page tables (2 MiB pages,
//! 0..4 GiB) at [`PML4_ADDR`]..+6 pages; the working set is configured in the
//! control block and lies at or above [`WORKING_SET_MIN`].
//!
//! Each write, with `BUSY` set around it: pick page `lcg % pages` of the working
//! set (segment 0 then segment 1), write the counter into word `counter % 512`
//! of that page, add the difference to `CHECKSUM`. So, whenever `BUSY` is 0,
//! `CHECKSUM` equals the wrapping sum of every u64 of the working set: a page
//! lost or stale after a migration breaks it.

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest-physical address of the control block.
pub const CTRL_ADDR: u64 = 0x1000;
/// Guest-physical address of the code (the vCPU starts here).
pub const CODE_ADDR: u64 = 0x2000;
/// Guest-physical address of the PML4; the PDPT and four page directories follow.
pub const PML4_ADDR: u64 = 0x9000;
/// Lowest guest-physical address of the working set.
pub const WORKING_SET_MIN: u64 = 0x10_0000;

/// Control block fields: byte offsets from [`CTRL_ADDR`], each a little-endian u64.
pub mod ctrl {
    /// Loop iterations so far (the guest's heartbeat).
    pub const COUNTER: u64 = 0;
    /// Wrapping sum of every u64 word of the working set.
    pub const CHECKSUM: u64 = 8;
    /// Guest-physical start of working-set segment 0.
    pub const BASE0: u64 = 16;
    /// Pages in segment 0.
    pub const PAGES0: u64 = 24;
    /// Guest-physical start of segment 1.
    pub const BASE1: u64 = 32;
    /// Pages in segment 1 (0 if unused).
    pub const PAGES1: u64 = 40;
    /// TSC ticks between two page writes (0: as fast as it can).
    pub const INTERVAL: u64 = 48;
    /// Page-choice generator state (64-bit LCG).
    pub const LCG: u64 = 56;
    /// 1 while a write and its checksum update are in progress.
    pub const BUSY: u64 = 64;
    /// Page writes so far.
    pub const WRITES: u64 = 72;
}

/// The program's machine code (see `guest.S`).
pub const PROGRAM: &[u8] = &[
    0xbb, 0x00, 0x10, 0x00, 0x00, 0x4c, 0x8b, 0x2b, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0x49, 0x89,
    0xc4, 0x49, 0xff, 0xc5, 0x4c, 0x89, 0x2b, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0x4c, 0x39, 0xe0,
    0x0f, 0x82, 0x91, 0x00, 0x00, 0x00, 0x48, 0x89, 0xc2, 0x4c, 0x29, 0xe2, 0x48, 0x3b, 0x53, 0x30, 0x72, 0xdc, 0x49,
    0x89, 0xc4, 0x48, 0x8b, 0x43, 0x38, 0x48, 0xb9, 0x2d, 0x7f, 0x95, 0x4c, 0x2d, 0xf4, 0x51, 0x58, 0x48, 0x0f, 0xaf,
    0xc1, 0x48, 0xb9, 0x4f, 0x81, 0x67, 0xf7, 0x7e, 0x7b, 0x05, 0x14, 0x48, 0x01, 0xc8, 0x48, 0x89, 0x43, 0x38, 0x48,
    0xc1, 0xe8, 0x21, 0x48, 0x8b, 0x4b, 0x18, 0x48, 0x8b, 0x73, 0x28, 0x48, 0x01, 0xce, 0x31, 0xd2, 0x48, 0xf7, 0xf6,
    0x48, 0x39, 0xca, 0x72, 0x09, 0x48, 0x29, 0xca, 0x48, 0x8b, 0x7b, 0x20, 0xeb, 0x04, 0x48, 0x8b, 0x7b, 0x10, 0x48,
    0xc1, 0xe2, 0x0c, 0x48, 0x01, 0xd7, 0x4c, 0x89, 0xe8, 0x25, 0xff, 0x01, 0x00, 0x00, 0x48, 0x8d, 0x3c, 0xc7, 0x48,
    0xc7, 0x43, 0x40, 0x01, 0x00, 0x00, 0x00, 0x48, 0x8b, 0x07, 0x4c, 0x89, 0x2f, 0x4c, 0x29, 0xe8, 0x48, 0x29, 0x43,
    0x08, 0x48, 0xff, 0x43, 0x48, 0x48, 0xc7, 0x43, 0x40, 0x00, 0x00, 0x00, 0x00, 0xe9, 0x57, 0xff, 0xff, 0xff, 0x49,
    0x89, 0xc4, 0xe9, 0x4f, 0xff, 0xff, 0xff,
];

/// The assembly source of [`PROGRAM`].
pub const SOURCE: &str = include_str!("guest.S");

/// Wrapping sum of the little-endian u64 words of `bytes` (the guest's checksum).
pub fn word_sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
        .fold(0u64, u64::wrapping_add)
}

/// A 64-bit digest of `bytes` (four multiply-rotate lanes over u64 words, then
/// the tail): fast enough to compare whole guest RAM images across processes.
pub fn digest(bytes: &[u8]) -> u64 {
    let mut d = Digest::default();
    d.update(bytes);
    d.finish()
}

/// [`digest`] of guest memory read through a volatile view (copied out 1 MiB at a time).
pub fn digest_volatile(mem: &vm_memory::VolatileSlice<'_>) -> u64 {
    let mut d = Digest::default();
    let mut buf = vec![0u8; 1 << 20];
    for at in (0..mem.len()).step_by(buf.len()) {
        let n = (mem.len() - at).min(buf.len());
        if let Ok(part) = mem.subslice(at, n) {
            part.copy_to(&mut buf[..n]);
        }
        d.update(&buf[..n]);
    }
    d.finish()
}

/// The state of a [`digest`] fed in pieces (each but the last a multiple of 32 bytes).
#[derive(Debug, Clone)]
struct Digest {
    h: [u64; 4],
    len: u64,
    tail: Vec<u8>,
}

impl Default for Digest {
    fn default() -> Self {
        Digest { h: [1, 2, 3, 4], len: 0, tail: Vec::new() }
    }
}

const K: [u64; 4] = [0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F, 0x1656_67B1_9E37_79F9, 0x27D4_EB2F_1656_67C5];

impl Digest {
    fn update(&mut self, bytes: &[u8]) {
        debug_assert!(self.tail.is_empty(), "only the last piece may be short of 32 bytes");
        self.len += bytes.len() as u64;
        let mut chunks = bytes.chunks_exact(32);
        for c in &mut chunks {
            for (i, h) in self.h.iter_mut().enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(&c[i * 8..i * 8 + 8]);
                *h = (*h ^ u64::from_le_bytes(w)).wrapping_mul(K[i]).rotate_left(31);
            }
        }
        self.tail.extend_from_slice(chunks.remainder());
    }

    fn finish(self) -> u64 {
        let mut out = self.len;
        for (i, x) in self.h.iter().enumerate() {
            out = (out ^ x).wrapping_mul(K[i]).rotate_left(27);
        }
        for &b in &self.tail {
            out = (out ^ b as u64).wrapping_mul(K[0]);
        }
        out ^ (out >> 29)
    }
}

/// The old one-piece form, kept to check [`Digest`] against it.
#[cfg(test)]
fn digest_reference(bytes: &[u8]) -> u64 {
    const K: [u64; 4] = [0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F, 0x1656_67B1_9E37_79F9, 0x27D4_EB2F_1656_67C5];
    let mut h = [1u64, 2, 3, 4];
    let mut chunks = bytes.chunks_exact(32);
    for c in &mut chunks {
        for (i, h) in h.iter_mut().enumerate() {
            let w = u64::from_le_bytes([
                c[i * 8],
                c[i * 8 + 1],
                c[i * 8 + 2],
                c[i * 8 + 3],
                c[i * 8 + 4],
                c[i * 8 + 5],
                c[i * 8 + 6],
                c[i * 8 + 7],
            ]);
            *h = (*h ^ w).wrapping_mul(K[i]).rotate_left(31);
        }
    }
    let mut out = bytes.len() as u64;
    for (i, x) in h.iter().enumerate() {
        out = (out ^ x).wrapping_mul(K[i]).rotate_left(27);
    }
    for &b in chunks.remainder() {
        out = (out ^ b as u64).wrapping_mul(K[0]);
    }
    out ^ (out >> 29)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_matches_its_source() {
        let dir = std::env::temp_dir().join(format!("minivmm-as-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, obj, bin) = (dir.join("g.S"), dir.join("g.o"), dir.join("g.bin"));
        std::fs::write(&src, SOURCE).unwrap();
        let ok = |c: &mut std::process::Command| c.status().map(|s| s.success()).unwrap_or(false);
        if !ok(std::process::Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src)) {
            println!("SKIP program_matches_its_source: GNU as (binutils) is not installed");
            return;
        }
        assert!(ok(std::process::Command::new("objcopy").args(["-O", "binary"]).arg(&obj).arg(&bin)));
        assert_eq!(std::fs::read(&bin).unwrap(), PROGRAM);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn digest_in_pieces_and_over_volatile_memory_is_the_same() {
        let mut a: Vec<u8> = (0..(3 << 20) + 77).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let d = digest_reference(&a);
        assert_eq!(digest(&a), d);
        let v = vm_memory::VolatileSlice::from(&mut a[..]);
        assert_eq!(digest_volatile(&v), d);
    }

    #[test]
    fn digest_sees_every_word() {
        let mut a = vec![0u8; 8192];
        let d0 = digest(&a);
        for i in [0, 7, 8, 4095, 8191] {
            a[i] = 1;
            assert_ne!(digest(&a), d0, "byte {i}");
            a[i] = 0;
        }
        assert_eq!(digest(&a), d0);
    }

    #[test]
    fn word_sum_wraps() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        b[8..].copy_from_slice(&2u64.to_le_bytes());
        assert_eq!(word_sum(&b), 1);
    }
}
