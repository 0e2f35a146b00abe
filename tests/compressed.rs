//! Compressed save and restore (`--compress zstd[:LEVEL]`): `qmig save` writes one
//! zstd frame; `qmig recv --from file:` (and `exec:`) recognises and decodes it, and
//! `zstd -dc` fed to QEMU 7.2's `-incoming exec:` loads it, RAM byte-exact both
//! ways. A corrupted and a truncated file each give one clear error line, exit 1,
//! and nothing marked complete (a file recv created is removed, an existing one
//! is reported incomplete).

mod common;

use common::{assert_same_ram, qemu_or_skip, run_qmig, run_qmig_ok, shell_quote, utf8, TestDir};
use serde_json::Value;
use std::fs;
use std::time::Duration;
use testkit::pattern::{self, Pattern, PAGE_SIZE};
use testkit::qemu::{expect_completed, QemuConfig, QemuProcess};

const RAM_LEN: u64 = 64 << 20;
const LIMIT: Duration = Duration::from_secs(60);

/// Random pages (p % 4 == 0), text (p % 8 == 2), zero elsewhere.
fn image() -> Vec<u8> {
    let mut ram = pattern::generate(Pattern::Mixed { every: 4 }, 0x2571, RAM_LEN as usize);
    let mut page = [0u8; PAGE_SIZE];
    for p in (2..RAM_LEN / PAGE_SIZE as u64).step_by(8) {
        pattern::fill_page(Pattern::Text, 7, p, &mut page);
        ram[p as usize * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&page);
    }
    ram
}

/// Save `src` compressed to `out`; returns the statistics line.
fn save(dir: &TestDir, src: &std::path::Path, out: &std::path::Path, compress: &str) -> Value {
    let ram = format!("mem={}", utf8(src));
    let r = run_qmig_ok(dir, &["save", "--ram", &ram, "--out", utf8(out), "--compress", compress], LIMIT);
    serde_json::from_str(r.stdout.trim()).expect("save stats JSON")
}

#[test]
fn compressed_save_restores_with_qmig_and_qemu() {
    let dir = TestDir::new("zstd-save");
    let (src, saved) = (dir.join("src.ram"), dir.join("guest.zst"));
    let ram = image();
    fs::write(&src, &ram).expect("write source RAM");
    let s = save(&dir, &src, &saved, "zstd:3");
    let file = fs::read(&saved).expect("saved file");
    assert_eq!(file[..4], qmig::compress::ZSTD_MAGIC, "one standard zstd frame");
    let z = &s["zstd"];
    assert_eq!((z["level"].as_u64(), z["compressed-size"].as_u64()), (Some(3), Some(file.len() as u64)), "{s}");
    assert_eq!(z["stream-size"], s["ram"]["transferred"], "{s}");
    assert!(file.len() as u64 * 10 < z["stream-size"].as_u64().unwrap_or(0) * 9, "text pages compress: {s}");
    assert!(z["gib-per-s"].as_f64().is_some_and(|g| g > 0.0), "{s}");

    // qmig restores it (file: and exec:), into a new file and over an existing one.
    let dst = dir.join("dst.ram");
    let r = run_qmig_ok(
        &dir,
        &["recv", "--ram", &format!("mem={}", utf8(&dst)), "--from", &format!("file:{}", utf8(&saved))],
        LIMIT,
    );
    let st: Value = serde_json::from_str(r.stdout.trim()).expect("recv stats");
    assert_eq!(st["zstd"]["stream-size"], z["stream-size"], "{st}");
    assert_eq!(st["ram"]["transferred"].as_u64(), Some(file.len() as u64), "{st}");
    assert_same_ram("qmig recv of the zstd save", &fs::read(&dst).expect("dst"), &ram);
    fs::write(&dst, pattern::generate(Pattern::Random, 9, RAM_LEN as usize)).expect("other content");
    let from = format!("exec:cat {}", shell_quote(&saved));
    run_qmig_ok(&dir, &["recv", "--ram", &format!("mem={}", utf8(&dst)), "--from", &from], LIMIT);
    assert_same_ram("qmig recv of the zstd save over exec:", &fs::read(&dst).expect("dst"), &ram);

    // send --to exec: with the same flag writes the same kind of frame; sockets are refused.
    let piped = dir.join("piped.zst");
    let to = format!("exec:cat > {}", shell_quote(&piped));
    let ram_arg = format!("mem={}", utf8(&src));
    run_qmig_ok(&dir, &["send", "--ram", &ram_arg, "--to", &to, "--compress", "zstd"], LIMIT);
    assert_eq!(fs::read(&piped).expect("piped")[..4], qmig::compress::ZSTD_MAGIC);
    let sock = format!("unix:{}", utf8(&dir.join("no.sock")));
    let r = run_qmig(&dir, &["send", "--ram", &ram_arg, "--to", &sock, "--compress", "zstd"], LIMIT);
    assert!(!r.status.success() && r.stderr.contains("--compress"), "{}", r.stderr);

    if qemu_or_skip("compressed_save_restores_with_qemu").is_none() {
        return;
    }
    let qdst = dir.join("qemu.ram");
    fs::write(&qdst, pattern::generate(Pattern::Random, 11, RAM_LEN as usize)).expect("QEMU's RAM file");
    let mut q = QemuProcess::start(&QemuConfig::new().ram("mem", &qdst, RAM_LEN).incoming(true)).expect("start QEMU");
    q.migrate_incoming(&format!("exec:zstd -dc {}", shell_quote(&piped))).expect("migrate-incoming");
    let info = q.wait_migration(LIMIT).and_then(expect_completed);
    let stderr = q.stderr();
    assert!(info.is_ok(), "QEMU did not load zstd -dc of the save: {info:?}\nstderr: {stderr}");
    let _ = q.quit(Duration::from_secs(5));
    assert_same_ram("QEMU 7.2 loading zstd -dc of the save", &fs::read(&qdst).expect("QEMU's RAM"), &ram);
}

#[test]
fn damaged_compressed_files_fail_with_one_line() {
    let dir = TestDir::new("zstd-damaged");
    let (src, saved) = (dir.join("src.ram"), dir.join("guest.zst"));
    fs::write(&src, image()).expect("write source RAM");
    save(&dir, &src, &saved, "zstd");
    let file = fs::read(&saved).expect("saved file");
    let truncated = dir.join("truncated.zst");
    fs::write(&truncated, &file[..file.len() / 2]).expect("truncated copy");
    // Flip bytes well inside the frame (past its header and first block).
    let corrupt = dir.join("corrupt.zst");
    let mut bad = file.clone();
    for b in &mut bad[file.len() / 3..][..8] {
        *b ^= 0x5a;
    }
    fs::write(&corrupt, &bad).expect("corrupt copy");
    let existing = dir.join("existing.ram");
    for (name, path) in [("truncated", &truncated), ("corrupt", &corrupt)] {
        // Into a file recv creates: removed again.
        let dst = dir.join("new.ram");
        let from = format!("file:{}", utf8(path));
        let r = run_qmig(&dir, &["recv", "--ram", &format!("mem={}", utf8(&dst)), "--from", &from], LIMIT);
        assert_eq!(r.status.code(), Some(1), "{name}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{name}: one error line: {}", r.stderr);
        assert!(r.stderr.starts_with("qmig: error: ") && r.stderr.contains("zstd"), "{name}: {}", r.stderr);
        assert!(!r.stdout.contains("completed"), "{name}: {}", r.stdout);
        assert!(!dst.exists(), "{name}: the file recv created is removed");
        // Into an existing file: said to be incomplete.
        fs::write(&existing, vec![0u8; RAM_LEN as usize]).expect("existing destination");
        let r = run_qmig(&dir, &["recv", "--ram", &format!("mem={}", utf8(&existing)), "--from", &from], LIMIT);
        assert_eq!(r.status.code(), Some(1), "{name}: {}", r.stderr);
        assert!(r.stderr.contains("destination incomplete"), "{name}: {}", r.stderr);
        assert!(!r.stdout.contains("completed"), "{name}: {}", r.stdout);
    }
}
