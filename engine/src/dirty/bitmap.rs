//! A page-granular atomic bitmap: any thread marks, the engine drains.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page over `AtomicU64` words. Marks outside the block are ignored.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl DirtyBitmap {
    /// A clear bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        let n = pages.div_ceil(64) as usize;
        DirtyBitmap { words: (0..n).map(|_| AtomicU64::new(0)).collect(), pages }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Words of the bitmap (`pages.div_ceil(64)`).
    pub fn words(&self) -> usize {
        self.words.len()
    }

    /// Mark page `page` dirty. Write the page first, then mark it: a drain that sees
    /// the mark then sees the write.
    pub fn mark(&self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
        }
    }

    /// Mark every page touched by `len` bytes at byte `offset` (page size `page_size`).
    pub fn mark_range(&self, offset: u64, len: u64, page_size: u64) {
        if len == 0 {
            return;
        }
        let first = offset / page_size;
        let last = (offset.saturating_add(len) - 1) / page_size;
        for p in first..=last.min(self.pages.saturating_sub(1)) {
            self.mark(p);
        }
    }

    /// True when page `page` is marked.
    pub fn is_marked(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }

    /// Mark every page (the bulk pass: everything is to be sent).
    pub fn mark_all(&self) {
        let full = self.pages / 64;
        for w in &self.words[..full as usize] {
            w.store(u64::MAX, Ordering::Relaxed);
        }
        if !self.pages.is_multiple_of(64) {
            self.words[full as usize].store((1u64 << (self.pages % 64)) - 1, Ordering::Relaxed);
        }
    }

    /// OR the marks into `out` and clear them, word by word (atomic swap): a mark
    /// racing with the drain lands either in this drain or in the next.
    pub fn drain_into(&self, out: &mut [u64]) {
        for (w, o) in self.words.iter().zip(out.iter_mut()) {
            if w.load(Ordering::Relaxed) != 0 {
                *o |= w.swap(0, Ordering::AcqRel);
            }
        }
    }

    /// Clear every mark (no allocation).
    pub fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
    }
}

/// Number of set bits in a plain bitmap.
pub fn count_bits(words: &[u64]) -> u64 {
    words.iter().map(|w| w.count_ones() as u64).sum()
}

/// Iterate the set bits (page numbers) of a plain bitmap.
pub fn set_bits(words: &[u64]) -> impl Iterator<Item = u64> + '_ {
    words.iter().enumerate().flat_map(|(i, &w)| {
        let mut w = w;
        std::iter::from_fn(move || {
            if w == 0 {
                return None;
            }
            let b = w.trailing_zeros() as u64;
            w &= w - 1;
            Some(i as u64 * 64 + b)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_drain_and_bounds() {
        let b = DirtyBitmap::new(130);
        b.mark(0);
        b.mark(64);
        b.mark(129);
        b.mark(130); // outside: ignored
        b.mark_range(4096 * 10 + 1, 4096, 4096); // pages 10 and 11
        assert_eq!(b.count(), 5);
        let mut out = vec![0u64; b.words()];
        b.drain_into(&mut out);
        assert_eq!(set_bits(&out).collect::<Vec<_>>(), vec![0, 10, 11, 64, 129]);
        assert_eq!(b.count(), 0);
        b.mark_all();
        assert_eq!(b.count(), 130);
        assert!(b.is_marked(129) && !b.is_marked(130));
    }

    #[test]
    fn concurrent_marks_are_never_lost() {
        let b = std::sync::Arc::new(DirtyBitmap::new(1 << 16));
        let mut seen = vec![0u64; b.words()];
        let writers: Vec<_> = (0..2)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for p in (t..1 << 16).step_by(2) {
                        b.mark(p);
                    }
                })
            })
            .collect();
        for _ in 0..50 {
            b.drain_into(&mut seen);
        }
        for w in writers {
            w.join().unwrap_or_default();
        }
        b.drain_into(&mut seen);
        assert_eq!(count_bits(&seen), 1 << 16);
    }
}
