//! Reading guest memory as the sender does: through volatile views only.
//!
//! - `zero_scan`: the zero-page check over 256 MiB of zero pages (every page is
//!   read to the end), with the engine's volatile check
//!   (`engine::memory::is_zero` on `GuestRegion::page`) against the plain slice
//!   check the sender used before (`savevm_format::ram::is_zero_page`);
//! - `zero_scan_data`: the same over random pages (the check stops at the first
//!   non-zero bytes).
//!
//! Run: `cargo bench --bench guest_memory` (about 20 s).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::memory::{is_zero, GuestRegion, PAGE};
use std::time::Duration;

const RAM: usize = 256 << 20;

fn bench_zero_scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero_scan_256m");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes(RAM as u64));
    for (name, random) in [("zero", false), ("random", true)] {
        let mut mem = vec![0u8; RAM];
        if random {
            let mut s = 0x1234_5678_u64;
            for w in mem.chunks_exact_mut(8) {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                w.copy_from_slice(&s.to_le_bytes());
            }
        }
        let pages = (RAM / PAGE) as u64;
        g.bench_with_input(BenchmarkId::new("slice", name), &mem, |b, m| {
            b.iter(|| m.chunks_exact(PAGE).filter(|p| savevm_format::ram::is_zero_page(black_box(p))).count())
        });
        let base = mem.as_mut_ptr();
        // SAFETY: `mem` outlives `region` (dropped at the end of this iteration) and is
        // not otherwise accessed while the region is read.
        let region = unsafe { GuestRegion::new("mem", base, RAM) }.expect("region");
        g.bench_function(BenchmarkId::new("volatile", name), |b| {
            b.iter(|| (0..pages).filter(|&p| is_zero(&region.page(black_box(p)))).count())
        });
        drop(region);
    }
    g.finish();
}

criterion_group!(benches, bench_zero_scan);
criterion_main!(benches);
