//! Stream writer throughput against the wire's own limit.
//!
//! 1 GiB of guest pages (a pre-faulted 1 GiB buffer) is sent, for each of a
//! unix socket pair and a loopback TCP connection:
//!
//! - `migration_writer`: 4 KiB pages queued with `MigrationWriter::write_borrowed`
//!   (zero copy: gathered into `writev`s straight from the buffer), unlimited
//!   rate, then `finish()`;
//! - `raw_write`: the same bytes with plain blocking `write` of 1 MiB chunks on
//!   the raw socket: what the connection itself can carry.
//!
//! The destination is the same in both: a thread draining the socket with
//! plain 1 MiB reads. Each iteration times the first write to the reader
//! seeing end of stream, with a fresh connection. The goal is
//! `migration_writer` ≥ 0.9 × `raw_write` on both transports. As criterion
//! measures each function in its own stretch of time, a busy machine skews the
//! ratio of its results; a plain run therefore ends with the two alternating,
//! 7 rounds each, printing `transport/interleaved/{unix,tcp}` with the ratio.
//!
//! Run: `cargo bench --bench transport` (about 80 s).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use transports::{connect, CancelToken, Channel, MigrationUri, MigrationWriter, RateLimit};

const SIZE: usize = 1 << 30;
const PAGE: usize = savevm_format::TARGET_PAGE_SIZE;
const CHUNK: usize = 1 << 20;

#[derive(Clone, Copy, Debug)]
enum Wire {
    Unix,
    Tcp,
}

/// A connection: our sending end as a raw stream, and a reader thread on the
/// other end that drains it and returns how many bytes it got.
fn connection(wire: Wire) -> (Box<dyn RawStream>, JoinHandle<u64>) {
    let (ours, theirs): (Box<dyn RawStream>, Box<dyn Read + Send>) = match wire {
        Wire::Unix => {
            let (a, b) = UnixStream::pair().expect("socketpair");
            (Box::new(a), Box::new(b))
        }
        Wire::Tcp => {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let a = TcpStream::connect(l.local_addr().unwrap()).expect("connect");
            let (b, _) = l.accept().expect("accept");
            a.set_nodelay(true).unwrap();
            (Box::new(a), Box::new(b))
        }
    };
    let reader = thread::spawn(move || {
        let mut theirs = theirs;
        let (mut n, mut buf) = (0u64, vec![0u8; CHUNK]);
        loop {
            match theirs.read(&mut buf) {
                Ok(0) => break n,
                Ok(k) => n += k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    });
    (ours, reader)
}

trait RawStream: Write + Send {
    fn shutdown_write(&self);
    fn into_fd(self: Box<Self>) -> i32;
}

impl RawStream for UnixStream {
    fn shutdown_write(&self) {
        self.shutdown(Shutdown::Write).unwrap();
    }
    fn into_fd(self: Box<Self>) -> i32 {
        (*self).into_raw_fd()
    }
}

impl RawStream for TcpStream {
    fn shutdown_write(&self) {
        self.shutdown(Shutdown::Write).unwrap();
    }
    fn into_fd(self: Box<Self>) -> i32 {
        (*self).into_raw_fd()
    }
}

/// The sending end as a migration channel (`fd:N`, as libvirt passes one).
fn channel(ours: Box<dyn RawStream>, cancel: &CancelToken) -> Channel {
    let uri: MigrationUri = format!("fd:{}", ours.into_fd()).parse().unwrap();
    connect(&uri, cancel).expect("fd: channel")
}

fn with_writer(wire: Wire, ram: &[u8]) -> Duration {
    let (ours, reader) = connection(wire);
    let cancel = CancelToken::new().unwrap();
    let mut w = MigrationWriter::new(channel(ours, &cancel), RateLimit::new(0));
    let t = Instant::now();
    for page in ram.chunks_exact(PAGE) {
        w.write_borrowed(page).expect("write_borrowed");
    }
    let ch = w.finish().map_err(|(_, e)| e).expect("finish");
    let got = reader.join().unwrap();
    let took = t.elapsed();
    ch.finish().unwrap();
    assert_eq!(got, ram.len() as u64);
    took
}

fn raw(wire: Wire, ram: &[u8]) -> Duration {
    let (mut ours, reader) = connection(wire);
    let t = Instant::now();
    for chunk in ram.chunks(CHUNK) {
        ours.write_all(chunk).expect("write");
    }
    ours.shutdown_write();
    let got = reader.join().unwrap();
    let took = t.elapsed();
    assert_eq!(got, ram.len() as u64);
    took
}

/// The ratio, measured robustly: criterion runs each function in its own block
/// of time, so load from elsewhere on the machine skews the ratio of two of
/// its results; here the two alternate, and the medians are compared.
fn interleaved(wire: Wire, ram: &[u8], rounds: usize) {
    let (mut w, mut r): (Vec<f64>, Vec<f64>) =
        (0..rounds).map(|_| (with_writer(wire, ram).as_secs_f64(), raw(wire, ram).as_secs_f64())).unzip();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (tw, tr) = (median(&mut w), median(&mut r));
    let gib = SIZE as f64 / (1u64 << 30) as f64;
    println!(
        "transport/interleaved/{}: migration_writer {:.2} GiB/s, raw_write {:.2} GiB/s, ratio {:.3} (median of {rounds})",
        format!("{wire:?}").to_lowercase(),
        gib / tw,
        gib / tr,
        tr / tw
    );
}

fn transport(c: &mut Criterion) {
    // Pre-faulted, non-zero, every page different.
    let ram: Vec<u8> = (0..SIZE).map(|i| (i / PAGE) as u8 ^ (i as u8)).collect();
    let mut g = c.benchmark_group("transport");
    g.throughput(Throughput::Bytes(SIZE as u64))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    for wire in [Wire::Unix, Wire::Tcp] {
        let name = format!("{wire:?}").to_lowercase();
        g.bench_function(BenchmarkId::new("migration_writer", &name), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| with_writer(wire, &ram)).sum())
        });
        g.bench_function(BenchmarkId::new("raw_write", &name), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| raw(wire, &ram)).sum())
        });
    }
    g.finish();
    // A plain `cargo bench --bench transport` (no filter, not `--test`): also the
    // interleaved ratio, about 15 s more.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| !a.starts_with('-')) {
        for wire in [Wire::Unix, Wire::Tcp] {
            interleaved(wire, &ram, 7);
        }
    }
}

criterion_group!(benches, transport);
criterion_main!(benches);
