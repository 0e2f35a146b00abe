//! The processes of a case: a qmig child reaped with `wait4` for its rusage, the guest RAM images, and the QEMU and qmig sides of one migration.

use super::*;

pub(crate) struct Exit {
    pub(crate) at: Instant,
    pub(crate) ok: bool,
    pub(crate) status: String,
    pub(crate) cpu: f64,
    pub(crate) minflt: u64,
}

pub(crate) struct QmigProc {
    pub(crate) pid: i32,
    pub(crate) what: String,
    pub(crate) exit: mpsc::Receiver<Exit>,
    /// Stdout lines with the moment each was read.
    pub(crate) lines: mpsc::Receiver<(Instant, String)>,
    /// The last line read so far.
    pub(crate) last: Option<(Instant, String)>,
    pub(crate) stderr: PathBuf,
    pub(crate) done: Option<Exit>,
}

impl QmigProc {
    pub(crate) fn spawn(cfg: &Config, dir: &Path, tag: &str, args: &[&str]) -> QmigProc {
        let what = format!("{} {}", cfg.qmig.display(), args.join(" "));
        let stderr = dir.join(format!("{tag}.stderr"));
        let err = File::create(&stderr).expect("create a stderr file for qmig");
        let mut child = Command::new(&cfg.qmig)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let pid = child.id() as i32;
        let out = child.stdout.take().expect("piped stdout");
        // The Child is never waited for through std: wait4 below reaps it.
        drop(child);
        let (ltx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if ltx.send((Instant::now(), l)).is_err() {
                    break;
                }
            }
        });
        let (etx, exit) = mpsc::channel();
        thread::spawn(move || {
            let mut status = 0;
            // SAFETY: zeroed rusage is valid; wait4 fills it.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            let r = loop {
                // SAFETY: pid is our child; pointers are valid.
                let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
                if r == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break r;
            };
            let at = Instant::now();
            let (ok, status) = if r != pid {
                (false, format!("wait4 failed: {}", std::io::Error::last_os_error()))
            } else if libc::WIFEXITED(status) {
                (libc::WEXITSTATUS(status) == 0, format!("exit {}", libc::WEXITSTATUS(status)))
            } else {
                (false, format!("signal {}", libc::WTERMSIG(status)))
            };
            let _ =
                etx.send(Exit { at, ok, status, cpu: tv(ru.ru_utime) + tv(ru.ru_stime), minflt: ru.ru_minflt as u64 });
        });
        QmigProc { pid, what, exit, lines, last: None, stderr, done: None }
    }

    pub(crate) fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default().trim().replace('\n', " / ")
    }

    /// The URI of recv's `{"listening": URI}` line.
    pub(crate) fn listening(&mut self) -> Result<String, String> {
        let (_, line) = self
            .lines
            .recv_timeout(Duration::from_secs(20))
            .map_err(|e| format!("{}: no listening line ({e}); stderr: {}", self.what, self.stderr()))?;
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("{}: bad line {line:?}: {e}", self.what))?;
        v["listening"].as_str().map(str::to_string).ok_or_else(|| format!("{}: no listening URI in {line}", self.what))
    }

    /// Whether it has exited (non-blocking).
    pub(crate) fn poll(&mut self) -> bool {
        if self.done.is_none() {
            self.done = self.exit.try_recv().ok();
        }
        self.done.is_some()
    }

    /// Waits for the exit until `deadline`; the process is killed past it.
    pub(crate) fn wait(&mut self, deadline: Instant) -> Result<&Exit, String> {
        while !self.poll() {
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("{}: still running after the time limit, killed", self.what));
            }
            thread::sleep(Duration::from_millis(1));
        }
        let e = self.done.as_ref().expect("set by poll");
        if !e.ok {
            return Err(format!("{}: {}; stderr: {}", self.what, e.status, self.stderr()));
        }
        Ok(e)
    }

    /// The last stdout line (the statistics) and when it was read, once exited.
    pub(crate) fn stats(&mut self) -> Option<(Instant, Value)> {
        if let Some(l) = self.lines.try_iter().last() {
            self.last = Some(l);
        }
        if self.done.is_some() {
            // Exited: the reader thread may not have passed on the last line yet (the
            // exit can be seen first on a loaded machine); wait for its end of input.
            while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
                self.last = Some(l);
            }
        }
        let (at, line) = self.last.as_ref()?;
        Some((*at, serde_json::from_str(line).ok()?))
    }

    pub(crate) fn kill(&mut self) {
        if self.poll() {
            return;
        }
        // SAFETY: plain kill of our own unreaped child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        self.done = self.exit.recv_timeout(Duration::from_secs(5)).ok();
    }
}

impl Drop for QmigProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A guest RAM image in /dev/shm, deleted on drop.
pub(crate) struct Image {
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    pub(crate) fill: Fill,
}

/// An image's name in the tables: "4 GiB random".
fn image_label(size: u64, fill: Fill) -> String {
    format!("{} {}", size_label(size), fill.name())
}

impl Image {
    /// Writes every page (zero pages too, so the file is fully allocated).
    pub(crate) fn create(dir: &Path, size: u64, fill: Fill) -> Image {
        let path = dir.join(format!("src-{}M-{}.ram", size / MIB, fill.pattern()));
        let mut f = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        let chunk = (64 * MIB).min(size) as usize;
        let mut buf = vec![0u8; chunk];
        let mut off = 0u64;
        while off < size {
            let n = chunk.min((size - off) as usize);
            pattern::fill_from(fill.pattern(), SEED, off / PAGE as u64, &mut buf[..n]);
            f.write_all(&buf[..n]).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            off += n as u64;
        }
        Image { path, size, fill }
    }

    pub(crate) fn label(&self) -> String {
        image_label(self.size, self.fill)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

pub(crate) fn size_label(size: u64) -> String {
    if size.is_multiple_of(1 << 30) {
        format!("{} GiB", size >> 30)
    } else {
        format!("{} MiB", size / MIB)
    }
}

/// Compares two files with `pread` (reading the holes of a sparse tmpfs file
/// allocates nothing); returns the first differing page.
pub(crate) fn first_difference(a: &Path, b: &Path, size: u64) -> Result<Option<u64>, String> {
    let fa = File::open(a).map_err(|e| format!("open {}: {e}", a.display()))?;
    let fb = File::open(b).map_err(|e| format!("open {}: {e}", b.display()))?;
    let lb = fb.metadata().map_err(|e| e.to_string())?.len();
    if lb != size {
        return Err(format!("{} is {lb} bytes, expected {size}", b.display()));
    }
    let chunk = 16 * MIB as usize;
    let (mut ba, mut bb) = (vec![0u8; chunk], vec![0u8; chunk]);
    let mut off = 0u64;
    while off < size {
        let n = chunk.min((size - off) as usize);
        fa.read_exact_at(&mut ba[..n], off).map_err(|e| format!("read {}: {e}", a.display()))?;
        fb.read_exact_at(&mut bb[..n], off).map_err(|e| format!("read {}: {e}", b.display()))?;
        if ba[..n] != bb[..n] {
            let p = ba[..n].chunks(PAGE).zip(bb[..n].chunks(PAGE)).position(|(x, y)| x != y).unwrap_or(0);
            return Ok(Some(off / PAGE as u64 + p as u64));
        }
        off += n as u64;
    }
    Ok(None)
}

/// One run's figures.
#[derive(Debug, Clone, Default)]
pub(crate) struct Measure {
    pub(crate) time: f64,
    pub(crate) src_cpu: f64,
    pub(crate) dst_cpu: f64,
    pub(crate) src_minflt: u64,
    pub(crate) dst_minflt: u64,
    pub(crate) others: f64,
    pub(crate) extra: Value,
}

pub(crate) struct Side {
    pub(crate) qemu: Option<QemuProcess>,
    pub(crate) qmig: Option<QmigProc>,
    /// CPU and faults at the start (QEMU only).
    pub(crate) base: (f64, u64),
    pub(crate) done: Option<Instant>,
}

impl Side {
    pub(crate) fn qemu(p: QemuProcess) -> Side {
        Side { qemu: Some(p), qmig: None, base: (0.0, 0), done: None }
    }

    pub(crate) fn qmig(p: QmigProc) -> Side {
        Side { qemu: None, qmig: Some(p), base: (0.0, 0), done: None }
    }

    pub(crate) fn start(&mut self) {
        if let Some(q) = &self.qemu {
            self.base = proc_cpu(q.pid());
        }
        if let Some(q) = &self.qmig {
            self.base = proc_cpu(q.pid as u32);
        }
    }

    /// Checks once whether this side is done; `Err` on a failure.
    pub(crate) fn poll(&mut self, info: &mut Value) -> Result<bool, String> {
        if self.done.is_some() {
            return Ok(true);
        }
        if let Some(q) = &mut self.qemu {
            let v = q.query_migrate().map_err(|e| format!("query-migrate: {e}; stderr: {}", q.stderr()))?;
            match v["status"].as_str().unwrap_or("none") {
                "completed" => {
                    self.done = Some(Instant::now());
                    *info = v;
                }
                "failed" | "cancelled" => return Err(format!("QEMU migration {v}; stderr: {}", q.stderr())),
                _ => {}
            }
        }
        if let Some(q) = &mut self.qmig {
            if q.poll() {
                let exit = q.wait(Instant::now())?.at;
                // Done when it reported `completed` (its stats line), as a QEMU side is done
                // at `completed`: the exit after it (unmapping the RAM) is not migration time.
                self.done = match q.stats() {
                    Some((at, v)) if v["status"] == "completed" => Some(at),
                    _ => Some(exit),
                };
            }
        }
        Ok(self.done.is_some())
    }

    /// CPU seconds and minor faults spent since `start`.
    pub(crate) fn cpu(&self) -> (f64, u64) {
        if let Some(q) = &self.qemu {
            let (c, f) = proc_cpu(q.pid());
            return (c - self.base.0, f.saturating_sub(self.base.1));
        }
        if let Some(Some(e)) = self.qmig.as_ref().map(|q| q.done.as_ref()) {
            // Since `start`, as for QEMU: a qmig recv into an existing file maps and
            // populates it before it listens (as QEMU's prealloc=on before its
            // -incoming listens); that startup is `dst-startup-ms` in the JSON.
            return (e.cpu - self.base.0, e.minflt.saturating_sub(self.base.1));
        }
        (0.0, 0)
    }

    pub(crate) fn finish(mut self) -> Value {
        let mut v = Value::Null;
        if let Some(q) = self.qemu {
            let _ = q.quit(Duration::from_secs(10));
        }
        if let Some(q) = &mut self.qmig {
            if let Some((_, stats)) = q.stats() {
                v = stats;
            }
            if let (Some(e), Some(done)) = (&q.done, self.done) {
                v["exit-after-completed-ms"] =
                    json!(round(e.at.saturating_duration_since(done).as_secs_f64() * 1e3, 1));
            }
        }
        v
    }
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

pub(crate) fn qemu_err<'p>(what: &str, p: &'p QemuProcess) -> impl FnOnce(QemuError) -> String + 'p {
    let what = what.to_string();
    move |e| format!("{what}: {e}; QEMU stderr: {}", p.stderr().trim())
}

/// `--multifd N --multifd-compression C` for a qmig side.
pub(crate) fn qmig_multifd_args(m: Multifd) -> Vec<String> {
    m.map_or_else(Vec::new, |(n, c)| vec!["--multifd".into(), n.to_string(), "--multifd-compression".into(), c.into()])
}

/// Capability `multifd` and its parameters on a QEMU side.
pub(crate) fn qemu_multifd(q: &mut QemuProcess, m: Multifd) -> Result<(), String> {
    let Some((n, c)) = m else { return Ok(()) };
    q.qmp().and_then(|p| p.set_capabilities(&[("multifd", true)])).map_err(|e| format!("multifd: {e}"))?;
    q.execute("migrate-set-parameters", Some(json!({"multifd-channels": n, "multifd-compression": c})))
        .map_err(qemu_err("migrate-set-parameters", q))?;
    Ok(())
}

/// A QEMU destination listening on `wire`; returns it and the URI to migrate to.
pub(crate) fn qemu_destination(
    cfg: &Config,
    dir: &Path,
    dst: &Path,
    (size, prealloc): (u64, bool),
    (wire, multifd): (Wire, Multifd),
) -> Result<(QemuProcess, String), String> {
    let bin = cfg.qemu.clone().ok_or("no QEMU")?;
    let mut config = QemuConfig::new().binary(bin).ram("mem", dst, size).incoming(true).prealloc(prealloc);
    if prealloc {
        // Populating 4 GiB before QMP answers took over the default 30 s on this
        // loaded machine (2026-12-04): allow it the time.
        config = config.timeout(Duration::from_secs(180));
    }
    let mut q = QemuProcess::start(&config).map_err(|e| format!("start destination QEMU: {e}"))?;
    qemu_multifd(&mut q, multifd)?;
    let uri = match wire {
        Wire::Unix => {
            let uri = format!("unix:{}", dir.join("mig.sock").display());
            q.migrate_incoming(&uri).map_err(qemu_err("migrate-incoming", &q))?;
            uri
        }
        Wire::Tcp => {
            let mut last = String::new();
            let mut found = None;
            for _ in 0..5 {
                let uri = format!("tcp:127.0.0.1:{}", free_port());
                match q.migrate_incoming(&uri) {
                    Ok(()) => {
                        found = Some(uri);
                        break;
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            found.ok_or_else(|| format!("migrate-incoming on a free port failed 5 times: {last}"))?
        }
    };
    Ok((q, uri))
}

pub(crate) fn qemu_source(cfg: &Config, img: &Image, multifd: Multifd) -> Result<QemuProcess, String> {
    let bin = cfg.qemu.clone().ok_or("no QEMU")?;
    let mut q = QemuProcess::start(&QemuConfig::new().binary(bin).ram("mem", &img.path, img.size))
        .map_err(|e| format!("start source QEMU: {e}"))?;
    qemu_multifd(&mut q, multifd)?;
    q.execute("migrate-set-parameters", Some(json!({ "max-bandwidth": QEMU_MAX_BANDWIDTH })))
        .map_err(qemu_err("migrate-set-parameters", &q))?;
    Ok(q)
}

pub(crate) fn qmig_recv(
    cfg: &Config,
    dir: &Path,
    dst: &Path,
    (wire, multifd): (Wire, Multifd),
) -> Result<(QmigProc, String), String> {
    qmig_recv_with(cfg, dir, dst, (wire, multifd), &[])
}

/// [`qmig_recv`] with `extra` arguments (e.g. `--postcopy`).
pub(crate) fn qmig_recv_with(
    cfg: &Config,
    dir: &Path,
    dst: &Path,
    (wire, multifd): (Wire, Multifd),
    extra: &[String],
) -> Result<(QmigProc, String), String> {
    let from = match wire {
        Wire::Unix => format!("unix:{}", dir.join("mig.sock").display()),
        Wire::Tcp => "tcp:127.0.0.1:0".to_string(),
    };
    let ram = format!("mem={}", dst.display());
    let mut args = vec!["recv".to_string(), "--ram".into(), ram, "--from".into(), from];
    args.extend(qmig_multifd_args(multifd));
    args.extend(extra.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = QmigProc::spawn(cfg, dir, "recv", &args);
    let uri = p.listening()?;
    Ok((p, uri))
}

pub(crate) fn run_case(
    cfg: &Config,
    dir: &Path,
    img: &Image,
    (kind, wire, dest): (Kind, Wire, Dest),
    multifd: Multifd,
    verify: bool,
) -> Result<Measure, String> {
    let dst_path = dir.join("dst.ram");
    let _ = fs::remove_file(&dst_path);
    let _ = fs::remove_file(dir.join("mig.sock"));
    prepare_destination(&dst_path, img.size, dest, kind.qemu_dst())?;
    let result = run_case_inner(cfg, dir, img, (kind, wire, dest), multifd, &dst_path);
    let result = result.and_then(|m| {
        if verify {
            if let Some(p) = first_difference(&img.path, &dst_path, img.size)? {
                return Err(format!("the destination differs from the source at page {p}"));
            }
        }
        Ok(m)
    });
    let _ = fs::remove_file(&dst_path);
    result
}

/// The destination file of `dest` before the receiver starts: none, all holes, or
/// every page written (a QEMU destination gets `prealloc=on` instead).
fn prepare_destination(path: &Path, size: u64, dest: Dest, qemu: bool) -> Result<(), String> {
    let err = |e: std::io::Error| format!("prepare {} destination {}: {e}", dest.key(), path.display());
    match (dest, qemu) {
        (Dest::Fresh, _) | (Dest::Prealloc, true) => Ok(()),
        (Dest::Sparse, _) => File::create(path).and_then(|f| f.set_len(size)).map_err(err),
        (Dest::Prealloc, false) => {
            let mut f = File::create(path).map_err(err)?;
            let zeros = vec![0u8; (64 * MIB).min(size) as usize];
            let mut left = size;
            while left > 0 {
                let n = zeros.len().min(left as usize);
                f.write_all(&zeros[..n]).map_err(err)?;
                left -= n as u64;
            }
            Ok(())
        }
    }
}

pub(crate) fn run_case_inner(
    cfg: &Config,
    dir: &Path,
    img: &Image,
    (kind, wire, dest): (Kind, Wire, Dest),
    multifd: Multifd,
    dst_path: &Path,
) -> Result<Measure, String> {
    // The destination first (listening), then the source, ready but not started.
    let spawned = Instant::now();
    let (mut dst, uri) = if kind.qemu_dst() {
        let (q, uri) = qemu_destination(cfg, dir, dst_path, (img.size, dest == Dest::Prealloc), (wire, multifd))?;
        (Side::qemu(q), uri)
    } else {
        let (p, uri) = qmig_recv(cfg, dir, dst_path, (wire, multifd))?;
        (Side::qmig(p), uri)
    };
    let dst_startup = spawned.elapsed();
    let mut src_qemu = if kind.qemu_src() { Some(qemu_source(cfg, img, multifd)?) } else { None };
    dst.start();
    let machine = MachineSample::now();
    let mut src = match src_qemu.take() {
        Some(mut q) => {
            let base = proc_cpu(q.pid());
            q.migrate(&uri).map_err(qemu_err("migrate", &q))?;
            let mut s = Side::qemu(q);
            s.base = base;
            s
        }
        None => {
            let ram = format!("mem={}", img.path.display());
            let mut args = vec!["send".to_string(), "--ram".into(), ram, "--to".into(), uri.clone()];
            args.extend(qmig_multifd_args(multifd));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Side::qmig(QmigProc::spawn(cfg, dir, "send", &args))
        }
    };
    let t0 = machine.at;
    let deadline = t0 + MIGRATION_LIMIT;
    let (mut src_info, mut dst_info) = (Value::Null, Value::Null);
    loop {
        let s = src.poll(&mut src_info)?;
        let d = dst.poll(&mut dst_info)?;
        if s && d {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("not done after {MIGRATION_LIMIT:?} (source done: {s}, destination done: {d})"));
        }
        // A qmig side is reaped by its own thread: poll it often; QEMU every POLL.
        let qmig_only = src.qemu.is_none() && dst.qemu.is_none();
        thread::sleep(if qmig_only { Duration::from_micros(500) } else { POLL });
    }
    let end = src.done.into_iter().chain(dst.done).max().expect("both done");
    let (src_cpu, src_minflt) = src.cpu();
    let (dst_cpu, dst_minflt) = dst.cpu();
    let others = machine.others_since(src_cpu + dst_cpu);
    let time = end.duration_since(t0).as_secs_f64();
    let src_stats = src.finish();
    let dst_stats = dst.finish();
    let mut extra = json!({ "dst-startup-ms": round(dst_startup.as_secs_f64() * 1e3, 1) });
    if src_info.is_object() {
        extra["qemu-src-total-time-ms"] = src_info["total-time"].clone();
        extra["qemu-src"] = src_info;
    }
    if dst_info.is_object() {
        extra["qemu-dst"] = dst_info;
    }
    if !src_stats.is_null() {
        extra["qmig-send"] = src_stats;
    }
    if !dst_stats.is_null() {
        extra["qmig-recv"] = dst_stats;
    }
    Ok(Measure { time, src_cpu, dst_cpu, src_minflt, dst_minflt, others, extra })
}

/// Every case on every image, `cfg.runs` times, cases interleaved within a run;
/// each row with its QEMU → QEMU time on the same image and wire.
pub(crate) fn run_cases(cfg: &Config, dir: &Path) -> Vec<Row> {
    let mut kinds = cfg.kinds.clone();
    if cfg.qemu.is_none() {
        println!("note: qemu-system-x86_64 not found: the QEMU cases are skipped");
        kinds.retain(|k| !k.qemu_src() && !k.qemu_dst());
    }
    let mut rows: Vec<Row> = Vec::new();
    for &size in &cfg.sizes {
        for &fill in &cfg.fills {
            let first = rows.len();
            let label = image_label(size, fill);
            for &kind in &kinds {
                for &wire in &cfg.wires {
                    for &multifd in &cfg.multifd {
                        for &dest in &cfg.dests {
                            let plain = fill == Fill::Random && wire == Wire::Unix && dest == Dest::Fresh;
                            if multifd.is_some() && !plain && !cfg.multifd_everywhere {
                                continue;
                            }
                            rows.push(Row {
                                image: label.clone(),
                                size,
                                fill,
                                kind,
                                wire,
                                multifd,
                                dest,
                                runs: vec![],
                                error: None,
                                qemu_time: None,
                            });
                        }
                    }
                }
            }
            if rows.len() == first {
                // No case on this image (e.g. `--cases=` for the postcopy rows): not written.
                continue;
            }
            let t = Instant::now();
            let img = Image::create(dir, size, fill);
            eprintln!("image {} written in {:.1} s", img.label(), t.elapsed().as_secs_f64());
            for run in 0..cfg.runs {
                for r in rows[first..].iter_mut() {
                    if r.error.is_some() {
                        continue;
                    }
                    let verify = match cfg.verify {
                        Verify::All => true,
                        Verify::First => run == 0,
                        Verify::None => false,
                    };
                    match run_case(cfg, dir, &img, (r.kind, r.wire, r.dest), r.multifd, verify) {
                        Ok(m) => {
                            eprintln!(
                                "{} {} run {}: {:.3} s, {:.2} GiB/s, src {:.2} s, dst {:.2} s CPU, others {:.0} %",
                                r.image,
                                r.case(),
                                run + 1,
                                m.time,
                                size as f64 / GIB / m.time,
                                m.src_cpu,
                                m.dst_cpu,
                                m.others * 100.0
                            );
                            r.runs.push(m);
                        }
                        Err(e) => {
                            eprintln!("{} {} run {}: FAILED: {e}", r.image, r.case(), run + 1);
                            r.error = Some(e);
                        }
                    }
                }
            }
            for i in first..rows.len() {
                let q = rows[first..]
                    .iter()
                    .find(|x| {
                        x.kind == Kind::QemuQemu
                            && x.wire == rows[i].wire
                            && x.multifd == rows[i].multifd
                            && x.dest == rows[i].dest
                            && !x.runs.is_empty()
                    })
                    .map(Row::time);
                rows[i].qemu_time = q;
            }
            drop(img);
        }
    }
    rows
}
