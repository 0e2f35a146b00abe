//! Decoding a 256 MiB guest from memory.
//!
//! The stream of a stopped `-machine none` guest with one 256 MiB block is
//! built once per pattern with `write_stopped_guest`, then decoded to the end:
//!
//! - `sink`: `next_with` into a pre-allocated, pre-faulted 256 MiB destination
//!   (a `PageSink` handing out slices of it): the realistic "receive into
//!   guest memory" case, one copy per page;
//! - `guest_sink`: the same into memory handed out as guest memory
//!   (`PageSlot::Guest`, a volatile view: read into the decoder's buffer, then
//!   one volatile copy), what a VMM's sink over live guest RAM does;
//! - `no_sink`: `next()`, pages handed out in the events (read into the
//!   decoder's page buffer and not copied further), showing the cost of the
//!   copy into guest memory.
//!
//! Patterns: `random` (every page a random page, all PAGE records) and
//! `mixed4` (3 pages in 4 zero, sent as ZERO records). Throughput is guest-RAM
//! bytes, so the numbers compare directly with `memcpy_256m`, a plain 256 MiB
//! copy between two pre-faulted buffers.
//!
//! Run: `cargo bench --bench decode` (about a minute).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use savevm_format::{write_stopped_guest, Decoder, Event, PageSink, RamBlock, StoppedGuest};
use std::time::Duration;
use testkit::pattern::{generate, Pattern};

const RAM: usize = 256 << 20;
const PAGE: usize = savevm_format::TARGET_PAGE_SIZE;

/// Guest memory of one block: pages are read straight into it.
struct SliceSink<'a> {
    mem: &'a mut [u8],
    /// Hand pages out as guest memory (volatile views) instead of plain slices.
    guest: bool,
}

impl PageSink for SliceSink<'_> {
    fn page_mut(&mut self, _block: &RamBlock, offset: u64) -> Option<savevm_format::PageSlot<'_>> {
        let o = offset as usize;
        let page = self.mem.get_mut(o..o + PAGE)?;
        Some(if self.guest {
            savevm_format::PageSlot::Guest(vm_memory::VolatileSlice::from(page))
        } else {
            savevm_format::PageSlot::Buffer(page)
        })
    }
}

fn stream_of(pattern: Pattern) -> Vec<u8> {
    let ram = generate(pattern, 1, RAM);
    let (stream, stats) =
        write_stopped_guest(Vec::with_capacity(RAM + (8 << 20)), &[("mem", &ram)], &StoppedGuest::default())
            .expect("write stream");
    assert_eq!(stats.normal + stats.duplicate, (RAM / PAGE) as u64);
    stream
}

/// Decode the whole stream into `mem`; returns the number of page records.
fn decode_into(stream: &[u8], mem: &mut [u8], guest: bool) -> u64 {
    let mut sink = SliceSink { mem, guest };
    let mut d = Decoder::new(stream);
    let mut pages = 0;
    while let Some(ev) = d.next_with(&mut sink).expect("decode") {
        if let Event::Page { .. } | Event::ZeroPage { .. } = ev {
            pages += 1;
        }
    }
    pages
}

/// Decode the whole stream with no sink; returns the number of page records.
fn decode_no_sink(stream: &[u8]) -> u64 {
    let mut d = Decoder::new(stream);
    let mut pages = 0;
    while let Some(ev) = d.next().expect("decode") {
        match ev {
            Event::Page { data, .. } => {
                black_box(data);
                pages += 1;
            }
            Event::ZeroPage { .. } => pages += 1,
            _ => {}
        }
    }
    pages
}

fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_256m");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Bytes(RAM as u64));
    // Destination guest memory, allocated once (faulted in by the check below).
    let mut mem = vec![0u8; RAM];
    for (name, pattern) in [("random", Pattern::Random), ("mixed4", Pattern::Mixed { every: 4 })] {
        let stream = stream_of(pattern);
        // Check once that the sink case reproduces the guest.
        for guest in [false, true] {
            mem.fill(0x5a);
            assert_eq!(decode_into(&stream, &mut mem, guest), (RAM / PAGE) as u64);
            assert!(mem == generate(pattern, 1, RAM), "decoded guest differs (guest slots: {guest})");
        }
        g.bench_with_input(BenchmarkId::new("sink", name), &stream, |b, s| b.iter(|| decode_into(s, &mut mem, false)));
        g.bench_with_input(BenchmarkId::new("guest_sink", name), &stream, |b, s| {
            b.iter(|| decode_into(s, &mut mem, true))
        });
        g.bench_with_input(BenchmarkId::new("no_sink", name), &stream, |b, s| b.iter(|| decode_no_sink(s)));
    }
    g.finish();
}

fn bench_memcpy(c: &mut Criterion) {
    let mut g = c.benchmark_group("memcpy");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes(RAM as u64));
    let src = generate(Pattern::Random, 2, RAM);
    let mut dst = vec![0u8; RAM];
    dst.fill(1);
    g.bench_function("memcpy_256m", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        })
    });
    g.finish();
}

criterion_group!(benches, bench_decode, bench_memcpy);
criterion_main!(benches);
