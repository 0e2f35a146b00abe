//! A synthetic guest for demos and tests: RAM as atomic words, and writer threads
//! (its "vCPUs") dirtying pages at a set rate, mostly in a hot set with a random
//! spread elsewhere. Each write goes to memory first and is then marked in the
//! dirty bitmap, as a VMM's device emulation would. It implements [`VcpuControl`]
//! (stop, resume, throttle), so auto-converge slows its writers for real.

use crate::rng::splitmix64 as mix;
use engine::dirty::DirtyBitmap;
use engine::source::GuestRegion;
use engine::vm::{VcpuControl, VmmError};
use savevm_format::TARGET_PAGE_SIZE as PAGE;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(10);

struct Shared {
    mem: Box<[AtomicU64]>,
    dirty: Arc<DirtyBitmap>,
    run: AtomicBool,
    quit: AtomicBool,
    parked: AtomicUsize,
    throttle: AtomicU8,
    writes: AtomicU64,
}

/// The guest: memory, dirty bitmap and writer threads.
pub struct SyntheticGuest {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl SyntheticGuest {
    /// `len` bytes of RAM (a multiple of 4096), page `p` filled by `fill(p, page)`.
    pub fn new(len: usize, fill: impl Fn(u64, &mut [u8]) + Sync) -> Self {
        let pages = (len / PAGE) as u64;
        let mem: Box<[AtomicU64]> = (0..len / 8).map(|_| AtomicU64::new(0)).collect();
        let mut buf = vec![0u8; PAGE];
        for p in 0..pages {
            fill(p, &mut buf);
            for (i, w) in buf.chunks_exact(8).enumerate() {
                let v = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
                mem[p as usize * PAGE / 8 + i].store(v, Ordering::Relaxed);
            }
        }
        SyntheticGuest {
            shared: Arc::new(Shared {
                mem,
                dirty: Arc::new(DirtyBitmap::new(pages)),
                run: AtomicBool::new(true),
                quit: AtomicBool::new(false),
                parked: AtomicUsize::new(0),
                throttle: AtomicU8::new(0),
                writes: AtomicU64::new(0),
            }),
            threads: vec![],
        }
    }

    /// Pages of RAM.
    pub fn pages(&self) -> u64 {
        self.shared.dirty.pages()
    }

    /// The RAM as a region the engine migrates (valid while the guest lives).
    pub fn region(&self, name: &str) -> Option<GuestRegion> {
        let ptr = self.shared.mem.as_ptr() as *mut u8;
        // SAFETY: the memory is owned by `shared`, which every GuestRegion user keeps
        // alive through this guest; writers only store whole aligned words.
        unsafe { GuestRegion::new(name, ptr, self.shared.mem.len() * 8) }
    }

    /// The dirty bitmap the writers mark.
    pub fn dirty(&self) -> Arc<DirtyBitmap> {
        self.shared.dirty.clone()
    }

    /// Page writes done so far.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// Copy page `p` out.
    pub fn read_page(&self, p: u64, out: &mut [u8]) {
        let base = p as usize * PAGE / 8;
        for (i, o) in out.chunks_exact_mut(8).enumerate() {
            o.copy_from_slice(&self.shared.mem[base + i].load(Ordering::Relaxed).to_ne_bytes());
        }
    }

    /// Start `vcpus` writer threads dirtying `bytes_per_s` in total (whole pages
    /// counted), 80 % of writes in the first 1/16 of RAM.
    pub fn start(&mut self, vcpus: usize, bytes_per_s: u64, seed: u64) {
        let pages = self.pages();
        for t in 0..vcpus.max(1) {
            let sh = self.shared.clone();
            let per_tick = bytes_per_s as f64 / PAGE as f64 * TICK.as_secs_f64() / vcpus.max(1) as f64;
            self.threads.push(std::thread::spawn(move || {
                let mut s = seed ^ (t as u64).wrapping_mul(0x9E37);
                let hot = (pages / 16).max(1);
                let mut budget = 0.0f64;
                let mut counter = 0u64;
                while !sh.quit.load(Ordering::Acquire) {
                    if !sh.run.load(Ordering::Acquire) {
                        sh.parked.fetch_add(1, Ordering::AcqRel);
                        while !sh.run.load(Ordering::Acquire) && !sh.quit.load(Ordering::Acquire) {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        sh.parked.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    let tick = Instant::now();
                    budget += per_tick;
                    while budget >= 1.0 && sh.run.load(Ordering::Acquire) {
                        budget -= 1.0;
                        let r = mix(&mut s);
                        let page = if !r.is_multiple_of(5) { (r >> 8) % hot } else { (r >> 8) % pages };
                        let word = page as usize * PAGE / 8 + (mix(&mut s) % (PAGE as u64 / 8)) as usize;
                        counter += 1;
                        sh.mem[word].store(counter ^ r, Ordering::Relaxed);
                        sh.dirty.mark(page);
                        sh.writes.fetch_add(1, Ordering::Relaxed);
                    }
                    let p = sh.throttle.load(Ordering::Relaxed).min(99) as f64 / 100.0;
                    let busy = tick.elapsed();
                    let nap = TICK.saturating_sub(busy) + TICK.mul_f64(p / (1.0 - p));
                    std::thread::sleep(nap);
                }
            }));
        }
    }

    /// The guest's vCPU control (stop parks every writer; resume lets them run).
    pub fn vcpus(&self) -> SyntheticVcpus {
        SyntheticVcpus { shared: self.shared.clone(), n: self.threads.len() }
    }

    /// Stop and join the writers.
    pub fn shutdown(&mut self) {
        self.shared.quit.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for SyntheticGuest {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// [`VcpuControl`] of a [`SyntheticGuest`].
pub struct SyntheticVcpus {
    shared: Arc<Shared>,
    n: usize,
}

impl SyntheticVcpus {
    /// Current throttle percentage.
    pub fn throttle(&self) -> u8 {
        self.shared.throttle.load(Ordering::Relaxed)
    }

    /// True while the writers are allowed to run.
    pub fn running(&self) -> bool {
        self.shared.run.load(Ordering::Acquire)
    }
}

impl VcpuControl for SyntheticVcpus {
    fn stop(&mut self) -> Result<(), VmmError> {
        self.shared.run.store(false, Ordering::Release);
        let t0 = Instant::now();
        while self.shared.parked.load(Ordering::Acquire) < self.n {
            if t0.elapsed() > Duration::from_secs(5) {
                return Err("writer threads did not stop within 5 s".into());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        self.shared.run.store(true, Ordering::Release);
        Ok(())
    }

    fn set_throttle(&mut self, percentage: u8) -> Result<(), VmmError> {
        self.shared.throttle.store(percentage.min(99), Ordering::Relaxed);
        Ok(())
    }
}
