//! XBZRLE on the source (capability `xbzrle`), with QEMU 7.2's cache and counters
//! (`migration/page_cache.c`, `save_xbzrle_page` in `migration/ram.c`).
//!
//! The cache is direct-mapped: `xbzrle-cache-size / page` slots, a page's slot is
//! its RAM address divided by the page size, modulo the slot count. A slot holds
//! the copy of the page that was last sent, its address and its age (the
//! dirty-sync count when it was last used). XBZRLE starts after the bulk pass: a
//! page sent again is either a miss (it is put in the cache, unless its slot holds
//! another page used within the last two syncs, and sent whole from the cache's
//! copy) or a hit, encoded against the cached copy: an unchanged page sends
//! nothing, a delta no smaller than a page is an overflow (sent whole), anything
//! else goes as an XBZRLE record; the cached copy becomes what was sent. In the
//! final stage (guest stopped) misses are not inserted and the cache is not
//! updated. Zero pages sent refresh their slot with zeros.

use crate::memory::PAGE;
use vm_memory::VolatileSlice;

/// QEMU's `CACHED_PAGE_LIFETIME`: a slot used within this many syncs is not
/// taken over by another page.
const CACHED_PAGE_LIFETIME: u64 = 2;

/// QEMU 7.2's default `xbzrle-cache-size` (64 MiB).
pub const DEFAULT_CACHE_SIZE: u64 = 64 << 20;

/// One slot of the cache.
struct Slot {
    addr: u64,
    age: u64,
    data: Option<Box<[u8; PAGE]>>,
}

/// QEMU's page cache (`PageCache`): direct-mapped, page copies allocated on first use.
pub struct PageCache {
    slots: Vec<Slot>,
}

impl PageCache {
    /// A cache of `size` bytes (a power of two, at least a page), `None` otherwise.
    /// Slot copies are allocated as pages are inserted, as QEMU does.
    pub fn new(size: u64) -> Option<Self> {
        let n = size / PAGE as u64;
        if n == 0 || !size.is_power_of_two() {
            return None;
        }
        let n = usize::try_from(n).ok()?;
        let mut slots = Vec::new();
        slots.try_reserve_exact(n).ok()?;
        slots.extend((0..n).map(|_| Slot { addr: u64::MAX, age: 0, data: None }));
        Some(PageCache { slots })
    }

    fn slot(&self, addr: u64) -> usize {
        // The slot count is a power of two.
        (addr / PAGE as u64) as usize & (self.slots.len() - 1)
    }

    /// QEMU's `cache_is_cached`: whether `addr` is cached; a hit refreshes its age.
    fn is_cached(&mut self, addr: u64, age: u64) -> bool {
        let i = self.slot(addr);
        let s = &mut self.slots[i];
        if s.addr == addr && s.data.is_some() {
            s.age = age;
            return true;
        }
        false
    }

    /// QEMU's `cache_insert`: put `data` in `addr`'s slot unless the slot holds
    /// another page used within the last [`CACHED_PAGE_LIFETIME`] syncs. Returns
    /// whether it was inserted.
    fn insert(&mut self, addr: u64, data: &[u8; PAGE], age: u64) -> bool {
        let i = self.slot(addr);
        let s = &mut self.slots[i];
        if s.data.is_some() && s.addr != addr && s.age + CACHED_PAGE_LIFETIME > age {
            return false;
        }
        let page = s.data.get_or_insert_with(|| Box::new([0u8; PAGE]));
        page.copy_from_slice(data);
        s.age = age;
        s.addr = addr;
        true
    }

    fn data(&self, addr: u64) -> Option<&[u8; PAGE]> {
        let s = &self.slots[self.slot(addr)];
        (s.addr == addr).then_some(s.data.as_deref()).flatten()
    }

    fn data_mut(&mut self, addr: u64) -> Option<&mut [u8; PAGE]> {
        let i = self.slot(addr);
        let s = &mut self.slots[i];
        (s.addr == addr).then_some(s.data.as_deref_mut()).flatten()
    }
}

/// `query-migrate`'s `xbzrle-cache` figures (QEMU's names in JSON).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct XbzrleCacheInfo {
    /// `cache-size`: the parameter `xbzrle-cache-size`, in bytes.
    pub cache_size: u64,
    /// `bytes`: XBZRLE record bytes without their 8-byte header, plus a page per overflow.
    pub bytes: u64,
    /// `pages`: cache hits (encoded, unchanged or overflowed pages).
    pub pages: u64,
    /// `cache-miss`: pages sent again that were not in the cache.
    pub cache_miss: u64,
    /// `cache-miss-rate`: misses over pages sent, in the last period of at least a second.
    pub cache_miss_rate: f64,
    /// `encoding-rate`: bytes of the pages hit over their encoded bytes, in the last period.
    pub encoding_rate: f64,
    /// `overflow`: hits whose encoding was not smaller than a page (sent whole).
    pub overflow: u64,
}

/// What to send for a page (see [`Xbzrle::save_page`]).
#[derive(Debug)]
pub enum Encoded<'a> {
    /// Nothing: the page is as it was last sent.
    Unchanged,
    /// An XBZRLE record with this delta.
    Delta(&'a [u8]),
    /// A normal page with these bytes (a copy: the cache's, or the page as read).
    Copy(&'a [u8; PAGE]),
    /// A normal page sent from guest memory in place (not cached).
    InPlace,
}

/// The source's XBZRLE state: the cache, the buffers and the counters.
pub struct Xbzrle {
    cache: PageCache,
    current: Box<[u8; PAGE]>,
    encoded: Box<[u8; PAGE]>,
    zero: Box<[u8; PAGE]>,
    info: XbzrleCacheInfo,
    /// Counters at the start of the current rate period: (cache-miss, pages, bytes, pages sent).
    prev: (u64, u64, u64, u64),
}

impl Xbzrle {
    /// XBZRLE with a cache of `cache_size` bytes (a power of two, at least a page).
    pub fn new(cache_size: u64) -> Option<Self> {
        Some(Xbzrle {
            cache: PageCache::new(cache_size)?,
            current: Box::new([0u8; PAGE]),
            encoded: Box::new([0u8; PAGE]),
            zero: Box::new([0u8; PAGE]),
            info: XbzrleCacheInfo { cache_size, ..Default::default() },
            prev: (0, 0, 0, 0),
        })
    }

    /// The counters so far.
    pub fn info(&self) -> &XbzrleCacheInfo {
        &self.info
    }

    /// A zero page at RAM address `addr` was sent (QEMU's `xbzrle_cache_zero_page`):
    /// its slot is refreshed with zeros where the cache lets it be.
    pub fn zero_page(&mut self, addr: u64, age: u64) {
        self.cache.insert(addr, &self.zero, age);
    }

    /// QEMU's `save_xbzrle_page` for the non-zero page `page` at RAM address `addr`,
    /// `age` the dirty-sync count, `last_stage` when the guest is stopped for the
    /// switchover. The counters are updated except `bytes` of a delta, which the
    /// caller adds with [`sent_delta`](Self::sent_delta) once it knows the record's size.
    pub fn save_page(&mut self, addr: u64, page: &VolatileSlice<'_>, age: u64, last_stage: bool) -> Encoded<'_> {
        if !self.cache.is_cached(addr, age) {
            self.info.cache_miss += 1;
            if last_stage {
                return Encoded::InPlace;
            }
            page.copy_to(&mut self.current[..]);
            if !self.cache.insert(addr, &self.current, age) {
                return Encoded::InPlace;
            }
            // What is sent is the cached copy, so the cache holds what the destination has.
            return Encoded::Copy(&self.current);
        }
        self.info.pages += 1;
        // The page is read once: the guest may go on writing it.
        page.copy_to(&mut self.current[..]);
        let Some(prev) = self.cache.data_mut(addr) else { return Encoded::Copy(&self.current) };
        let len = savevm_format::xbzrle::encode(&prev[..], &self.current[..], &mut self.encoded[..]);
        if !last_stage && len != Some(0) {
            prev.copy_from_slice(&self.current[..]);
        }
        match len {
            Some(0) => Encoded::Unchanged,
            None => {
                self.info.overflow += 1;
                self.info.bytes += PAGE as u64;
                Encoded::Copy(&self.current)
            }
            Some(n) => Encoded::Delta(&self.encoded[..n]),
        }
    }

    /// An XBZRLE record of `record_bytes` bytes (header included) was written.
    pub fn sent_delta(&mut self, record_bytes: u64) {
        // As QEMU: the 8-byte page header is not counted.
        self.info.bytes += record_bytes.saturating_sub(8);
    }

    /// A rate period (at least a second, closed at a dirty sync) ended, in which
    /// `pages_sent` pages were sent in all since the start: `cache-miss-rate` and
    /// `encoding-rate` over the period, as QEMU's `migration_update_rates`.
    pub fn close_period(&mut self, pages_sent: u64) {
        let (miss0, pages0, bytes0, sent0) = self.prev;
        let sent = pages_sent.saturating_sub(sent0);
        if sent == 0 {
            return;
        }
        let i = &mut self.info;
        i.cache_miss_rate = i.cache_miss.saturating_sub(miss0) as f64 / sent as f64;
        let unencoded = (i.pages.saturating_sub(pages0) * PAGE as u64) as f64;
        let encoded = i.bytes.saturating_sub(bytes0) as f64;
        i.encoding_rate = if i.pages == pages0 || encoded == 0.0 { 0.0 } else { unencoded / encoded };
        self.prev = (i.cache_miss, i.pages, i.bytes, pages_sent);
    }

    /// The cached copy of `addr`, if any (tests).
    pub fn cached(&self, addr: u64) -> Option<&[u8; PAGE]> {
        self.cache.data(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(b: &mut [u8]) -> VolatileSlice<'_> {
        VolatileSlice::from(b)
    }

    #[test]
    fn miss_then_hit_delta_unchanged_overflow() {
        let mut x = Xbzrle::new(4 * PAGE as u64).expect("cache");
        let mut page = vec![7u8; PAGE];
        // A miss is cached and sent from the copy.
        assert!(matches!(x.save_page(0, &vs(&mut page), 2, false), Encoded::Copy(c) if c[..] == page[..]));
        assert_eq!(x.info().cache_miss, 1);
        // Unchanged: nothing to send, counted as a page.
        assert!(matches!(x.save_page(0, &vs(&mut page), 3, false), Encoded::Unchanged));
        page[100] = 1;
        let Encoded::Delta(d) = x.save_page(0, &vs(&mut page), 3, false) else { panic!("no delta") };
        let mut rebuilt = vec![7u8; PAGE];
        assert_eq!(savevm_format::xbzrle::decode(d, &mut rebuilt), Some(101));
        assert_eq!(rebuilt, page);
        assert_eq!(x.cached(0).map(|c| c[..] == page[..]), Some(true));
        // Every other byte changed: overflow, sent whole, cache updated.
        for (i, b) in page.iter_mut().enumerate() {
            if i % 2 == 0 {
                *b ^= 0xff;
            }
        }
        assert!(matches!(x.save_page(0, &vs(&mut page), 4, false), Encoded::Copy(_)));
        assert_eq!((x.info().pages, x.info().overflow, x.info().bytes), (3, 1, PAGE as u64));
        assert_eq!(x.cached(0).map(|c| c[..] == page[..]), Some(true));
        // Final stage: a change is encoded but the cache keeps what was sent before.
        let before = page.clone();
        page[0] ^= 1;
        assert!(matches!(x.save_page(0, &vs(&mut page), 5, true), Encoded::Delta(_)));
        assert_eq!(x.cached(0).map(|c| c[..] == before[..]), Some(true));
        // Final stage miss: not inserted, sent in place.
        assert!(matches!(x.save_page(PAGE as u64, &vs(&mut page), 5, true), Encoded::InPlace));
        assert!(x.cached(PAGE as u64).is_none());
    }

    #[test]
    fn fresh_slot_is_kept_and_zero_pages_refresh() {
        // Two slots: addresses 0 and 2 pages share slot 0.
        let mut x = Xbzrle::new(2 * PAGE as u64).expect("cache");
        let mut page = vec![1u8; PAGE];
        let far = 2 * PAGE as u64;
        assert!(matches!(x.save_page(0, &vs(&mut page), 2, false), Encoded::Copy(_)));
        // Slot used at age 2: at age 3 another page cannot take it (sent in place).
        assert!(matches!(x.save_page(far, &vs(&mut page), 3, false), Encoded::InPlace));
        // At age 4 it can.
        assert!(matches!(x.save_page(far, &vs(&mut page), 4, false), Encoded::Copy(_)));
        assert!(x.cached(0).is_none() && x.cached(far).is_some());
        x.zero_page(far, 4);
        assert_eq!(x.cached(far).map(|c| c.iter().all(|&b| b == 0)), Some(true));
        assert!(Xbzrle::new(3 * PAGE as u64).is_none() && Xbzrle::new(1024).is_none());
    }

    #[test]
    fn rates_over_a_period() {
        let mut x = Xbzrle::new(4 * PAGE as u64).expect("cache");
        let mut page = vec![3u8; PAGE];
        let _ = x.save_page(0, &vs(&mut page), 2, false);
        page[0] = 9;
        let n = match x.save_page(0, &vs(&mut page), 3, false) {
            Encoded::Delta(d) => d.len() as u64,
            e => panic!("{e:?}"),
        };
        x.sent_delta(8 + 3 + n);
        x.close_period(2);
        let i = x.info();
        assert_eq!(i.cache_miss_rate, 0.5);
        assert_eq!(i.encoding_rate, PAGE as f64 / (3 + n) as f64);
    }
}
