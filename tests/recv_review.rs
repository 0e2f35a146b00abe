//! `qmig recv` against hostile streams from the outside review (issue 13): each
//! stream is built here, written to a file and received with `--from file:PATH`.

use savevm_format::{section_ids, write_guest_epilogue, write_guest_prologue, RamBlock, StoppedGuest, StreamWriter};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A fresh directory for one test.
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qmig-recv-review-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// `qmig recv --ram mem=DST --from file:STREAM` (plus `extra` arguments).
fn recv(stream: &Path, ram: &[(&str, &Path)], extra: &[&str]) -> Output {
    let mut args = vec!["recv".to_string()];
    for (n, p) in ram {
        args.push("--ram".into());
        args.push(format!("{n}={}", p.display()));
    }
    args.push("--from".into());
    args.push(format!("file:{}", stream.display()));
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(&args)
        .stdin(Stdio::null())
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run qmig")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A stream of one block `mem` of `len` bytes: prologue, a PART whose records `part`
/// writes, then QEMU 7.2's epilogue (END, devices, EOF, vmdesc).
fn stream(len: u64, part: impl FnOnce(&mut StreamWriter<Vec<u8>>)) -> Vec<u8> {
    let mut s = StreamWriter::new(Vec::new());
    let blocks = [RamBlock::new(0, "mem", len)];
    let opts = StoppedGuest::default();
    write_guest_prologue(&mut s, &blocks, &opts).expect("prologue");
    s.section_part(section_ids::RAM).expect("part");
    part(&mut s);
    write_guest_epilogue(&mut s, &opts).expect("epilogue");
    s.finish().expect("finish")
}

/// The control: a well-formed stream is received.
#[test]
fn well_formed_stream_is_received() {
    let d = dir("ok");
    let v = stream(0x10000, |s| s.ram_page(0, 0x1000, &[0xab; 4096]).expect("page"));
    std::fs::write(d.join("s.mig"), &v).expect("write");
    let o = recv(&d.join("s.mig"), &[("mem", &d.join("mem.ram"))], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = std::fs::read(d.join("mem.ram")).expect("read");
    assert!(got[0x1000..0x2000].iter().all(|&b| b == 0xab));
    let _ = std::fs::remove_dir_all(&d);
}

/// Bug 4: a second MEM_SIZE after pages were received is refused (recv used to
/// drop the staged pages and exit 0).
#[test]
fn second_block_list_is_refused() {
    let d = dir("memsize");
    let v = stream(0x10000, |s| {
        s.ram_page(0, 0x1000, &[0xab; 4096]).expect("page");
        s.ram_block_list(&[RamBlock::new(0, "mem", 0x10000)]).expect("second list");
        s.ram_page(0, 0x2000, &[0xcd; 4096]).expect("page");
    });
    std::fs::write(d.join("s.mig"), &v).expect("write");
    let o = recv(&d.join("s.mig"), &[("mem", &d.join("mem.ram"))], &[]);
    let e = stderr(&o);
    assert!(!o.status.success(), "recv accepted a second block list: {e}");
    assert!(e.contains("second RAM block list"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// `v` with its trailing vmdesc record replaced by one holding `json`.
fn with_vmdesc(mut v: Vec<u8>, json: &[u8]) -> Vec<u8> {
    let (_, at) = savevm_format::find_trailing_vmdesc(&v).expect("a vmdesc");
    v.truncate(at);
    v.push(0x06);
    v.extend_from_slice(&u32::try_from(json.len()).expect("small").to_be_bytes());
    v.extend_from_slice(json);
    v
}

/// Largest resident set of any child waited for so far, in bytes.
fn children_max_rss() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage for the call's duration.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    u64::try_from(ru.ru_maxrss).unwrap_or(0) * 1024
}

/// Bug 5: the destination skips the trailing vmdesc as QEMU does: a malformed one
/// does not fail a complete stream, and an 8 MB one that parses into hundreds of
/// MB of JSON values costs no more than reading past it.
#[test]
fn trailing_vmdesc_is_skipped_not_parsed() {
    let d = dir("vmdesc");
    let good = stream(0x10000, |s| s.ram_page(0, 0x1000, &[0xab; 4096]).expect("page"));
    let mut big = b"[".to_vec();
    big.extend(std::iter::repeat_n(b"0,".as_slice(), 4 << 20).flatten());
    big.extend_from_slice(b"0]");
    for (what, json) in [("malformed", b"{\"devices\": [".to_vec()), ("8 MB", big)] {
        std::fs::write(d.join("s.mig"), with_vmdesc(good.clone(), &json)).expect("write");
        let _ = std::fs::remove_file(d.join("mem.ram"));
        let o = recv(&d.join("s.mig"), &[("mem", &d.join("mem.ram"))], &[]);
        assert!(o.status.success(), "{what} vmdesc: {}", stderr(&o));
        let got = std::fs::read(d.join("mem.ram")).expect("read");
        assert!(got[0x1000..0x2000].iter().all(|&b| b == 0xab), "{what}");
    }
    let rss = children_max_rss();
    assert!(rss < 64 << 20, "recv's peak RSS was {rss} bytes");
    let _ = std::fs::remove_dir_all(&d);
}

/// Also (issue 13): every block is checked against `--ram` before any file is made,
/// and a load that fails after files were opened says the destination is
/// incomplete and removes the files recv created (not the ones it was given).
#[test]
fn failed_recv_creates_nothing_early_and_cleans_up() {
    let d = dir("incomplete");
    // Blocks `a` and `b`; only `a` has a --ram: nothing is created.
    let mut s = StreamWriter::new(Vec::new());
    let blocks = [RamBlock::new(0, "a", 0x10000), RamBlock::new(1, "b", 0x10000)];
    write_guest_prologue(&mut s, &blocks, &StoppedGuest::default()).expect("prologue");
    std::fs::write(d.join("two.mig"), s.finish().expect("finish")).expect("write");
    let o = recv(&d.join("two.mig"), &[("a", &d.join("a.ram"))], &[]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("no --ram b=PATH"), "{e}");
    assert!(!d.join("a.ram").exists(), "a.ram was created before the unlisted block was refused");

    // A stream cut after a page: the file recv created is removed, the line says so.
    let mut v = stream(0x10000, |s| s.ram_page(0, 0x1000, &[0xab; 4096]).expect("page"));
    v.truncate(v.len() - 300);
    std::fs::write(d.join("cut.mig"), &v).expect("write");
    let o = recv(&d.join("cut.mig"), &[("mem", &d.join("new.ram"))], &[]);
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert!(e.contains("destination incomplete"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(!d.join("new.ram").exists(), "the file recv created is left behind");

    // An existing destination file is kept (and said to be incomplete).
    std::fs::write(d.join("old.ram"), vec![7u8; 0x10000]).expect("write");
    let o = recv(&d.join("cut.mig"), &[("mem", &d.join("old.ram"))], &[]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("destination incomplete"), "{e}");
    assert!(d.join("old.ram").exists());
    let _ = std::fs::remove_dir_all(&d);
}

/// Bug 8: names from the stream are escaped in the error line: a block name with a
/// newline and an escape sequence cannot forge a second line or colour the terminal.
#[test]
fn stream_names_are_escaped_in_errors() {
    let d = dir("escape");
    let evil = "x\n\u{1b}[31mqmig: error: forged";
    // An unlisted block, and a page naming an unknown block.
    let mut s = StreamWriter::new(Vec::new());
    write_guest_prologue(&mut s, &[RamBlock::new(0, evil, 0x10000)], &StoppedGuest::default()).expect("prologue");
    let unlisted = s.finish().expect("finish");
    let mut unknown = stream(0x10000, |_| {});
    let (_, at) = savevm_format::find_trailing_vmdesc(&unknown).expect("vmdesc");
    // Replace everything after the prologue's RAM START with a PART whose page names `evil`.
    let mut s = StreamWriter::new(Vec::new());
    write_guest_prologue(&mut s, &[RamBlock::new(0, "mem", 0x10000)], &StoppedGuest::default()).expect("prologue");
    let pro = s.finish().expect("finish").len();
    assert!(pro < at);
    unknown.truncate(pro);
    unknown.extend_from_slice(&[0x02, 0, 0, 0, 2]); // PART of section 2
    let mut h = [0u8; savevm_format::ram::MAX_RECORD_HEADER];
    let n = savevm_format::ram::record_header(&mut h, 0, 0x08, Some(evil)).expect("header");
    unknown.extend_from_slice(&h[..n]);
    unknown.extend_from_slice(&[0u8; 4096]);
    for (what, v) in [("unlisted", unlisted), ("unknown", unknown)] {
        std::fs::write(d.join("s.mig"), &v).expect("write");
        let o = recv(&d.join("s.mig"), &[("mem", &d.join("mem.ram"))], &[]);
        let e = stderr(&o);
        assert!(!o.status.success(), "{what}: {e}");
        assert_eq!(e.lines().count(), 1, "{what}: a forged line: {e:?}");
        assert!(!e.contains('\u{1b}'), "{what}: raw escape: {e:?}");
        assert!(e.contains(r"x\n\u{1b}[31m"), "{what}: {e:?}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Bug 1: a stream with 1 KiB target pages used to be placed as 4 KiB pages (a 1 KiB
/// page zeroing its neighbours) and recv exited 0: RAM files take 4 KiB pages only,
/// so recv refuses it with the page size on its error line.
#[test]
fn other_target_page_sizes_are_refused_by_ram_files() {
    let d = dir("tps");
    for bits in [10u8, 16] {
        let tps = 1u64 << bits;
        let mut s = StreamWriter::new(Vec::new());
        s.header().expect("header");
        let cfg = savevm_format::Configuration {
            machine: "none".into(),
            target_page_bits: Some(bits.into()),
            ..Default::default()
        };
        s.configuration(&cfg).expect("config");
        s.section_start(section_ids::RAM, "ram", 0, 4).expect("start");
        s.ram_block_list(&[RamBlock::new(0, "mem", 0x20000)]).expect("list");
        s.ram_eos().expect("eos");
        s.footer(section_ids::RAM).expect("footer");
        s.section_part(section_ids::RAM).expect("part");
        s.ram_page(0, tps, &vec![0xab; usize::try_from(tps).expect("small")]).expect("page");
        write_guest_epilogue(&mut s, &StoppedGuest::default()).expect("epilogue");
        std::fs::write(d.join("s.mig"), s.finish().expect("finish")).expect("write");
        let o = recv(&d.join("s.mig"), &[("mem", &d.join("mem.ram"))], &[]);
        let e = stderr(&o);
        assert!(!o.status.success(), "{bits}: recv accepted {tps}-byte pages: {e}");
        assert!(e.contains(&format!("target page size is {tps} bytes")), "{e}");
        assert!(!d.join("mem.ram").exists(), "a RAM file was created for a refused stream");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Bug 9: `--from fd:3` in a process that was handed no fd 3 named qmig's own
/// eventfd (made at startup): recv hung on it. Descriptors qmig opened itself
/// (close-on-exec) are refused at once.
#[test]
fn own_descriptors_are_refused_for_fd_uris() {
    let d = dir("fd");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(["recv", "--ram"])
        .arg(format!("mem={}", d.join("mem.ram").display()))
        .args(["--from", "fd:3"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qmig");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if start.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("recv --from fd:3 (its own eventfd) still runs after 10 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut e = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut e).expect("stderr");
    assert_eq!(status.code(), Some(1), "{e}");
    assert!(e.contains("descriptor 3 is one qmig opened itself"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// A small tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mount a tmpfs of `size` bytes at a fresh directory; `None` (with the reason
    /// printed) where this process may not mount.
    fn mount(name: &str, size: u64) -> Option<Tmpfs> {
        let d = dir(name);
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&d)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("SKIP: cannot mount a tmpfs: {}", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        Some(Tmpfs(d))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bug 7: an existing sparse destination file on a full filesystem killed recv with
/// SIGBUS (exit 135, nothing on stderr) at the first write through the mapping.
/// Its holes are checked against the free space before anything is written (or,
/// where pages may reach them through the mapping, allocated), so it is a one-line
/// ENOSPC error.
#[test]
fn full_filesystem_under_an_existing_sparse_file_is_an_error() {
    let Some(fs) = Tmpfs::mount("enospc", 1 << 20) else { return };
    let dst = fs.0.join("mem.ram");
    let f = std::fs::File::create(&dst).expect("create");
    f.set_len(4 << 20).expect("sparse 4 MiB");
    drop(f);
    let v = stream(4 << 20, |s| {
        for p in 0..1024u64 {
            s.ram_page(0, p * 4096, &[0xab; 4096]).expect("page");
        }
    });
    let d = dir("enospc-stream");
    std::fs::write(d.join("s.mig"), &v).expect("write");
    let o = recv(&d.join("s.mig"), &[("mem", &dst)], &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "recv: {:?} {e}", o.status);
    assert!(e.contains("No space left on device"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
