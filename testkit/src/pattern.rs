//! Deterministic guest RAM fill patterns shared with the QEMU 7.2 test data.
//!
//! These are exactly the patterns of `testdata/qemu-7.2/README.md` ("Guest RAM
//! fill patterns"): every 4 KiB page is generated on its own from `(seed,
//! page)` with SplitMix64, so any page of a RAM image can be recomputed
//! without the rest.

use crate::rng::splitmix64;
use std::fmt;
use std::str::FromStr;

/// Size in bytes of one guest page as used by the patterns.
pub const PAGE_SIZE: usize = savevm_format::TARGET_PAGE_SIZE;

/// Multiplier mixing the page number into the seed: `s0 = seed ^ (p * K)`.
const PAGE_MIX: u64 = 0xD1B5_4A32_D192_ED03;

/// Word list of the `text` pattern (index 0..63).
pub const VOCAB: [&str; 64] = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "migration",
    "page",
    "memory",
    "device",
    "state",
    "stream",
    "section",
    "guest",
    "host",
    "vcpu",
    "dirty",
    "bitmap",
    "channel",
    "block",
    "qemu",
    "rust",
    "wire",
    "frame",
    "bytes",
];

/// A guest RAM fill pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Every byte 0.
    Zero,
    /// Every page is 512 SplitMix64 outputs, little-endian.
    Random,
    /// Page `p` is a `Random` page when `p % every == 0`, otherwise all zero.
    Mixed {
        /// Period of the random pages; 0 is treated like 1 (all random).
        every: u64,
    },
    /// Pseudo-random English-like words from [`VOCAB`] separated by spaces and newlines.
    Text,
}

/// Error returned by [`Pattern::parse`] for an unrecognised pattern name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown fill pattern {0:?} (expected zero, random, text or mixedN, e.g. mixed32)")]
pub struct ParsePatternError(pub String);

impl Pattern {
    /// Parses `zero`, `random`, `text` or `mixedN` / `mixed:N` (N >= 1, e.g. `mixed32`).
    pub fn parse(s: &str) -> Result<Pattern, ParsePatternError> {
        let err = || ParsePatternError(s.to_string());
        match s {
            "zero" => Ok(Pattern::Zero),
            "random" => Ok(Pattern::Random),
            "text" => Ok(Pattern::Text),
            _ => {
                let rest = s.strip_prefix("mixed").ok_or_else(err)?;
                let rest = rest.strip_prefix(':').unwrap_or(rest);
                let every: u64 = rest.parse().map_err(|_| err())?;
                if every == 0 {
                    return Err(err());
                }
                Ok(Pattern::Mixed { every })
            }
        }
    }

    /// Whether page `page` of this pattern is entirely zero (independent of the seed).
    pub fn is_zero_page(&self, page: u64) -> bool {
        match *self {
            Pattern::Zero => true,
            Pattern::Random | Pattern::Text => false,
            Pattern::Mixed { every } => !page.is_multiple_of(every.max(1)),
        }
    }
}

impl FromStr for Pattern {
    type Err = ParsePatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pattern::parse(s)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Zero => f.write_str("zero"),
            Pattern::Random => f.write_str("random"),
            Pattern::Mixed { every } => write!(f, "mixed{every}"),
            Pattern::Text => f.write_str("text"),
        }
    }
}

/// SplitMix64 start state of page `page`: `seed ^ (page * 0xD1B54A32D192ED03)`.
pub fn page_state(seed: u64, page: u64) -> u64 {
    seed ^ page.wrapping_mul(PAGE_MIX)
}

fn fill_random(mut s: u64, out: &mut [u8; PAGE_SIZE]) {
    for chunk in out.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut s).to_le_bytes());
    }
}

fn fill_text(mut s: u64, out: &mut [u8; PAGE_SIZE]) {
    let mut pos = 0;
    while pos < PAGE_SIZE {
        let r = splitmix64(&mut s);
        let word = VOCAB[(r & 63) as usize].as_bytes();
        let sep = if (r >> 32) & 7 == 0 { b'\n' } else { b' ' };
        for &b in word.iter().chain(std::iter::once(&sep)) {
            if pos == PAGE_SIZE {
                break;
            }
            out[pos] = b;
            pos += 1;
        }
    }
}

/// Writes page `page` of `pattern` with `seed` into `out` (exactly one 4096-byte page).
pub fn fill_page(pattern: Pattern, seed: u64, page: u64, out: &mut [u8; PAGE_SIZE]) {
    if pattern.is_zero_page(page) {
        out.fill(0);
        return;
    }
    let s0 = page_state(seed, page);
    match pattern {
        Pattern::Text => fill_text(s0, out),
        Pattern::Zero => out.fill(0),
        Pattern::Random | Pattern::Mixed { .. } => fill_random(s0, out),
    }
}

/// Fills `buf` as pages 0, 1, ... of `pattern`; a trailing partial page gets the page's prefix.
pub fn fill(pattern: Pattern, seed: u64, buf: &mut [u8]) {
    fill_from(pattern, seed, 0, buf);
}

/// Like [`fill`], but `buf` starts at page `first_page` of the RAM block.
pub fn fill_from(pattern: Pattern, seed: u64, first_page: u64, buf: &mut [u8]) {
    let mut page = [0u8; PAGE_SIZE];
    for (i, chunk) in buf.chunks_mut(PAGE_SIZE).enumerate() {
        let p = first_page.wrapping_add(i as u64);
        if let Ok(out) = <&mut [u8; PAGE_SIZE]>::try_from(&mut *chunk) {
            fill_page(pattern, seed, p, out);
        } else {
            fill_page(pattern, seed, p, &mut page);
            chunk.copy_from_slice(&page[..chunk.len()]);
        }
    }
}

/// Returns a freshly allocated RAM image of `len` bytes filled with `pattern`.
pub fn generate(pattern: Pattern, seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(pattern, seed, &mut v);
    v
}

/// Number of pages of `pattern` among the first `pages` pages that are not all zero.
pub fn nonzero_pages(pattern: Pattern, pages: u64) -> u64 {
    match pattern {
        Pattern::Zero => 0,
        Pattern::Random | Pattern::Text => pages,
        Pattern::Mixed { every } => pages.div_ceil(every.max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(pattern: Pattern, seed: u64, p: u64) -> [u8; PAGE_SIZE] {
        let mut out = [0xAAu8; PAGE_SIZE];
        fill_page(pattern, seed, p, &mut out);
        out
    }

    #[test]
    fn random_check_value() {
        let pg = page(Pattern::Random, 0, 0);
        assert_eq!(pg[..8], [0xaf, 0xcd, 0x1d, 0x7b, 0x39, 0xa8, 0x20, 0xe2]);
    }

    #[test]
    fn page_zero_seed_zero_is_plain_splitmix() {
        // s0 = 0 for seed 0, page 0: the page is the classic SplitMix64 sequence from 0.
        let pg = page(Pattern::Random, 0, 0);
        assert_eq!(u64::from_le_bytes(pg[..8].try_into().unwrap()), 0xe220_a839_7b1d_cdaf);
        assert_eq!(u64::from_le_bytes(pg[8..16].try_into().unwrap()), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn page_state_mixes_page_number() {
        assert_eq!(page_state(0, 0), 0);
        assert_eq!(page_state(5, 0), 5);
        assert_eq!(page_state(0, 1), 0xD1B5_4A32_D192_ED03);
        assert_eq!(page_state(1, 2), 0xD1B5_4A32_D192_ED03u64.wrapping_mul(2) ^ 1);
        // Same page and seed -> same bytes; different page -> different bytes.
        assert_eq!(page(Pattern::Random, 7, 3), page(Pattern::Random, 7, 3));
        assert_ne!(page(Pattern::Random, 7, 3), page(Pattern::Random, 7, 4));
        assert_ne!(page(Pattern::Random, 7, 3), page(Pattern::Random, 8, 3));
    }

    #[test]
    fn mixed_pattern_layout() {
        let m = Pattern::Mixed { every: 4 };
        assert_eq!(page(m, 1, 0), page(Pattern::Random, 1, 0));
        assert_eq!(page(m, 1, 4), page(Pattern::Random, 1, 4));
        for p in [1, 2, 3, 5, 7] {
            assert!(page(m, 1, p).iter().all(|&b| b == 0), "page {p}");
        }
        assert_eq!(nonzero_pages(m, 4096), 1024);
        assert_eq!(nonzero_pages(Pattern::Mixed { every: 32 }, 4096), 128);
        assert_eq!(nonzero_pages(Pattern::Mixed { every: 8 }, 2049), 257);
    }

    #[test]
    fn zero_pattern() {
        assert!(page(Pattern::Zero, 99, 12).iter().all(|&b| b == 0));
    }

    #[test]
    fn text_pattern() {
        // Values cross-checked with an independent implementation of the README
        // algorithm (which reproduces the README's RAM file sha256 for mixed32 seed 1).
        let pg = page(Pattern::Text, 0, 0);
        assert_eq!(&pg[..46], b"memory guest not\nwill\nthey so been rust to\nhas");
        assert!(pg.iter().all(|&b| b == b' ' || b == b'\n' || b.is_ascii_lowercase()));
        let pg = page(Pattern::Text, 3, 5);
        assert_eq!(&pg[..24], b"memory on\nwould guest me");
    }

    #[test]
    fn cross_checked_bytes() {
        assert_eq!(page(Pattern::Random, 7, 3)[..8], [0x5f, 0xef, 0x30, 0xc2, 0x26, 0x14, 0xfa, 0xdc]);
        assert_eq!(page(Pattern::Mixed { every: 4 }, 1, 4)[..8], [0xb8, 0x2d, 0xa4, 0xc6, 0x69, 0x62, 0x7f, 0xe8]);
    }

    #[test]
    fn fill_matches_fill_page() {
        let m = Pattern::Mixed { every: 3 };
        let mut buf = vec![0x55u8; PAGE_SIZE * 5 + 100];
        fill(m, 42, &mut buf);
        for p in 0..5u64 {
            let s = p as usize * PAGE_SIZE;
            assert_eq!(buf[s..s + PAGE_SIZE], page(m, 42, p));
        }
        assert_eq!(buf[5 * PAGE_SIZE..], page(m, 42, 5)[..100]);
        let mut tail = vec![0u8; PAGE_SIZE];
        fill_from(m, 42, 3, &mut tail);
        assert_eq!(tail[..], page(m, 42, 3)[..]);
        assert_eq!(generate(m, 42, PAGE_SIZE * 2)[..], buf[..PAGE_SIZE * 2]);
    }

    #[test]
    fn parse_names() {
        assert_eq!(Pattern::parse("zero"), Ok(Pattern::Zero));
        assert_eq!(Pattern::parse("random"), Ok(Pattern::Random));
        assert_eq!(Pattern::parse("text"), Ok(Pattern::Text));
        assert_eq!(Pattern::parse("mixed32"), Ok(Pattern::Mixed { every: 32 }));
        assert_eq!("mixed:4".parse(), Ok(Pattern::Mixed { every: 4 }));
        assert!(Pattern::parse("mixed0").is_err());
        assert!(Pattern::parse("mixed").is_err());
        assert!(Pattern::parse("ones").is_err());
        for p in [Pattern::Zero, Pattern::Random, Pattern::Text, Pattern::Mixed { every: 8 }] {
            assert_eq!(Pattern::parse(&p.to_string()), Ok(p));
        }
    }
}
