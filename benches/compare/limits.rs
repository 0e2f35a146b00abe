//! Physical limits of this machine: pipe, memcpy and fresh-file throughput, measured in this process.

use super::*;

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// 1 MiB `write`s of `buf` into `w`, drained by a reader thread with 1 MiB reads.
pub(crate) fn pipe_throughput(
    buf: &[u8],
    mut w: impl Write + Send,
    mut r: impl Read + Send + 'static,
    close: impl FnOnce(&mut dyn Write),
) -> f64 {
    let reader = thread::spawn(move || {
        let mut b = vec![0u8; MIB as usize];
        let mut n = 0u64;
        loop {
            match r.read(&mut b) {
                Ok(0) => break n,
                Ok(k) => n += k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("limit reader: {e}"),
            }
        }
    });
    let t = Instant::now();
    for c in buf.chunks(MIB as usize) {
        w.write_all(c).expect("limit writer: write");
    }
    close(&mut w);
    let got = reader.join().expect("limit reader thread");
    let took = t.elapsed().as_secs_f64();
    assert_eq!(got, buf.len() as u64, "limit reader got every byte");
    buf.len() as f64 / GIB / took
}

pub(crate) fn unix_limit(buf: &[u8]) -> f64 {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let a2 = a.try_clone().expect("clone");
    pipe_throughput(buf, a, b, move |_| a2.shutdown(Shutdown::Write).expect("shutdown"))
}

pub(crate) fn tcp_limit(buf: &[u8]) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    a.set_nodelay(true).expect("nodelay");
    let a2 = a.try_clone().expect("clone");
    pipe_throughput(buf, a, b, move |_| a2.shutdown(Shutdown::Write).expect("shutdown"))
}

pub(crate) fn memcpy_limit(buf: &[u8], dst: &mut [u8]) -> f64 {
    let t = Instant::now();
    dst.copy_from_slice(buf);
    std::hint::black_box(&dst);
    buf.len() as f64 / GIB / t.elapsed().as_secs_f64()
}

/// `memcpy` into a fresh `MAP_SHARED` mapping of a new file in `dir` (first-touch faults included).
pub(crate) fn fresh_file_limit(buf: &[u8], dir: &Path) -> f64 {
    let path = dir.join("limit-fresh.ram");
    let _ = fs::remove_file(&path);
    let f = OpenOptions::new().read(true).write(true).create_new(true).open(&path).expect("create limit file");
    f.set_len(buf.len() as u64).expect("size limit file");
    // SAFETY: a file we just created and own.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&f) }.expect("map limit file");
    let t = Instant::now();
    map.copy_from_slice(buf);
    let took = t.elapsed().as_secs_f64();
    drop(map);
    let _ = fs::remove_file(&path);
    buf.len() as f64 / GIB / took
}

/// 1 MiB `pwrite`s into a new file in `dir` (page allocation, no fault, no clearing).
pub(crate) fn fresh_file_pwrite_limit(buf: &[u8], dir: &Path) -> f64 {
    let path = dir.join("limit-pwrite.ram");
    let _ = fs::remove_file(&path);
    let f = OpenOptions::new().read(true).write(true).create_new(true).open(&path).expect("create limit file");
    f.set_len(buf.len() as u64).expect("size limit file");
    let t = Instant::now();
    for (i, c) in buf.chunks(MIB as usize).enumerate() {
        f.write_all_at(c, i as u64 * MIB).expect("pwrite limit file");
    }
    let took = t.elapsed().as_secs_f64();
    drop(f);
    let _ = fs::remove_file(&path);
    buf.len() as f64 / GIB / took
}

pub(crate) struct Limit {
    pub(crate) key: &'static str,
    pub(crate) label: &'static str,
    pub(crate) gibs: f64,
    pub(crate) all: Vec<f64>,
    pub(crate) others: f64,
}

pub(crate) fn measure_limits(cfg: &Config, dir: &Path) -> Vec<Limit> {
    let size = cfg.limit_size;
    let mut buf = vec![0u8; size];
    pattern::fill(Pattern::Random, SEED, &mut buf);
    let mut dst = vec![1u8; size];
    let runs = cfg.runs.max(3);
    let mut out = Vec::new();
    let cases: [(&str, &str); 5] = [
        ("unix", "unix socket, 1 MiB writes"),
        ("tcp", "loopback TCP, 1 MiB writes"),
        ("memcpy", "memcpy, one thread, pre-faulted"),
        ("fresh-file", "memcpy into a fresh /dev/shm file mapping"),
        ("fresh-file-pwrite", "1 MiB pwrites into a fresh /dev/shm file"),
    ];
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); cases.len()];
    for _ in 0..runs {
        for (i, (key, _)) in cases.iter().enumerate() {
            let m = MachineSample::now();
            let g = match *key {
                "unix" => unix_limit(&buf),
                "tcp" => tcp_limit(&buf),
                "memcpy" => memcpy_limit(&buf, &mut dst),
                "fresh-file" => fresh_file_limit(&buf, dir),
                _ => fresh_file_pwrite_limit(&buf, dir),
            };
            results[i].0.push(g);
            results[i].1.push(m.others_since(0.0));
        }
    }
    for ((key, label), (g, o)) in cases.iter().zip(results) {
        out.push(Limit { key, label, gibs: median(g.clone()), all: g, others: median(o) });
    }
    out
}

/// The limits as a markdown table on stdout (nothing when none were measured).
pub(crate) fn print_limits(cfg: &Config, limits: &[Limit]) {
    if limits.is_empty() {
        return;
    }
    println!();
    println!("| physical limit ({}) | GiB/s (median) | all runs | others |", size_label(cfg.limit_size as u64));
    println!("|---|---:|---|---:|");
    for l in limits {
        let all: Vec<String> = l.all.iter().map(|g| format!("{g:.2}")).collect();
        println!("| {} | {:.2} | {} | {:.0} % |", l.label, l.gibs, all.join(" "), l.others * 100.0);
    }
}
