//! `qmig recv` into every kind of destination file, byte-exact: one it creates,
//! an existing all-holes file (`truncate`), a preallocated one (`fallocate`: its
//! blocks read as holes too), one already written with other data (the page
//! tables populated ahead of the stream) and one half data, half holes. Every
//! page of the source (zero pages too) must end up in the file.

mod common;

use common::{assert_same_ram, run_qmig_ok, utf8, TestDir};
use std::fs;
use std::os::fd::AsRawFd;
use std::time::Duration;
use testkit::pattern::{self, Pattern, PAGE_SIZE};

const RAM_LEN: u64 = 32 << 20;

/// Preallocate `path` with fallocate(2), as `fallocate -l` does.
fn preallocate(path: &std::path::Path) {
    let f = fs::OpenOptions::new().create(true).truncate(true).write(true).open(path).expect("create");
    // SAFETY: fallocate on a descriptor we own, mode 0, within a new file's first RAM_LEN bytes.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, RAM_LEN as libc::off_t) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
}

#[test]
fn recv_into_fresh_sparse_preallocated_and_written_destinations() {
    let dir = TestDir::new("recv-dest-kinds");
    let src = dir.join("src.ram");
    let stream = dir.join("guest.mig");
    // Random pages (p % 4 == 0) and zero pages, so ZERO records must clear old data.
    let ram = pattern::generate(Pattern::Mixed { every: 4 }, 0xde57, RAM_LEN as usize);
    fs::write(&src, &ram).expect("source RAM");
    let src_arg = format!("mem={}", utf8(&src));
    run_qmig_ok(&dir, &["save", "--ram", &src_arg, "--out", utf8(&stream)], Duration::from_secs(60));
    let other = pattern::generate(Pattern::Random, 0x07e4, RAM_LEN as usize);

    type Prepare = fn(&std::path::Path, &[u8]);
    let kinds: [(&str, Prepare); 5] = [
        ("fresh", |_, _| {}),
        ("sparse-existing", |p, _| fs::File::create(p).and_then(|f| f.set_len(RAM_LEN)).expect("truncate")),
        ("preallocated", |p, _| preallocate(p)),
        ("written", |p, other| fs::write(p, other).expect("written destination")),
        ("half-sparse", |p, other| {
            use std::os::unix::fs::FileExt;
            let f = fs::File::create(p).expect("create");
            f.set_len(RAM_LEN).expect("length");
            // Data in every other MiB, holes between (runs not aligned to a stage).
            for mib in (0..RAM_LEN >> 20).step_by(2) {
                let off = (mib << 20) + PAGE_SIZE as u64 * 3;
                f.write_all_at(&other[off as usize..][..1 << 20], off.min(RAM_LEN - (1 << 20))).expect("data");
            }
        }),
    ];
    for (kind, prepare) in kinds {
        let dst = dir.join(&format!("{kind}.ram"));
        prepare(&dst, &other);
        let from = format!("file:{}", utf8(&stream));
        run_qmig_ok(&dir, &["recv", "--ram", &format!("mem={}", utf8(&dst)), "--from", &from], Duration::from_secs(60));
        assert_same_ram(&format!("recv into a {kind} destination"), &fs::read(&dst).expect("destination"), &ram);
        if kind == "sparse-existing" {
            // Its holes were not allocated up front (that cost the allocation of the
            // whole file inside the migration): the zero pages stay holes, the file
            // holds about its non-zero pages, as a fresh one does.
            use std::os::unix::fs::MetadataExt;
            let stored = fs::metadata(&dst).expect("metadata").blocks() * 512;
            let data = RAM_LEN / 4;
            assert!(stored <= data + (1 << 20), "sparse-existing: {stored} bytes stored for {data} of data");
            assert!(in_hole(&dst, PAGE_SIZE as u64), "sparse-existing: zero page 1 was allocated");
        }
    }
}

/// Whether byte `off` of `path` lies in a hole (SEEK_DATA finds data only past its page).
fn in_hole(path: &std::path::Path, off: u64) -> bool {
    let f = fs::File::open(path).expect("open");
    // SAFETY: lseek on a descriptor we own; it only moves the file offset.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    r < 0 || r as u64 >= off + PAGE_SIZE as u64
}

/// Issue 11: `qmig send --multifd 2` into `qmig recv --multifd 2` (the receiver
/// threads write the RAM file with positioned writes, the main channel's ZERO
/// records through the mapping) into a fresh, a half-sparse and a written
/// destination: byte-exact, and zero pages in the holes stay holes.
#[test]
fn multifd_recv_into_fresh_half_sparse_and_written_destinations() {
    let dir = TestDir::new("recv-dest-multifd");
    let src = dir.join("src.ram");
    let ram = pattern::generate(Pattern::Mixed { every: 4 }, 0x3f1d, RAM_LEN as usize);
    fs::write(&src, &ram).expect("source RAM");
    let other = pattern::generate(Pattern::Random, 0x51de, RAM_LEN as usize);
    let src_arg = format!("mem={}", utf8(&src));
    for kind in ["fresh", "half-sparse", "written"] {
        let dst = dir.join(&format!("mfd-{kind}.ram"));
        match kind {
            "half-sparse" => {
                use std::os::unix::fs::FileExt;
                let f = fs::File::create(&dst).expect("create");
                f.set_len(RAM_LEN).expect("length");
                // Data in the first half, holes in the second.
                f.write_all_at(&other[..(RAM_LEN / 2) as usize], 0).expect("data");
            }
            "written" => fs::write(&dst, &other).expect("written destination"),
            _ => {}
        }
        // A zero page of the source in the second half: a hole before, if the filesystem has holes.
        let zero_page = RAM_LEN / 2 + PAGE_SIZE as u64;
        assert!(ram[zero_page as usize..][..PAGE_SIZE].iter().all(|&b| b == 0), "the pattern changed");
        let check_hole = kind == "half-sparse" && in_hole(&dst, zero_page);
        if kind == "half-sparse" && !check_hole {
            println!("note: the test directory's filesystem reports no holes: hole check skipped");
        }
        let sock = dir.join(&format!("mfd-{kind}.sock"));
        let from = format!("unix:{}", utf8(&sock));
        let ram_arg = format!("mem={}", utf8(&dst));
        let r = common::BackgroundQmig::recv(&dir, &["--ram", &ram_arg, "--from", &from, "--multifd", "2"]);
        let uri = r.listening(Duration::from_secs(60));
        run_qmig_ok(&dir, &["send", "--ram", &src_arg, "--to", &uri, "--multifd", "2"], Duration::from_secs(120));
        let (code, last, stderr) = r.wait(Duration::from_secs(120));
        assert_eq!(code, Some(0), "recv into a {kind} destination failed: {stderr}");
        let stats: serde_json::Value = serde_json::from_str(&last).expect("recv's statistics line");
        assert_eq!(stats["status"], "completed", "{last}");
        assert_same_ram(&format!("multifd recv into a {kind} destination"), &fs::read(&dst).expect("dst"), &ram);
        if check_hole {
            assert!(in_hole(&dst, zero_page), "a zero page in a hole of the {kind} destination was allocated");
        }
    }
}
