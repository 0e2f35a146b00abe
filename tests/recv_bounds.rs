//! Issue 13: `qmig recv` bounds the stream's RAM blocks before it creates
//! anything: a 16 TiB block in a tiny stream is refused with one error line
//! naming the bytes it would need, and no file is created (it used to create a
//! 16 TiB sparse file and 528 MB of bookkeeping).

use std::process::{Command, Stdio};
use testkit::streams::paged_stream;

#[test]
fn a_16_tib_block_is_refused_before_any_file_is_created() {
    let d = std::env::temp_dir().join(format!("qmig-recv-bounds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    let stream = paged_stream(12, &[("mem", 1 << 44)], |s| s.ram_zero(0, 0).expect("zero"));
    assert!(stream.len() < 1024, "{} bytes", stream.len());
    std::fs::write(d.join("s.mig"), &stream).expect("write stream");
    let started = std::time::Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(["recv", "--ram"])
        .arg(format!("mem={}", d.join("mem.ram").display()))
        .arg("--from")
        .arg(format!("file:{}", d.join("s.mig").display()))
        .stdin(Stdio::null())
        .output()
        .expect("run qmig");
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("need 0x100000000000 bytes of new files in"), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(!e.contains("destination incomplete"), "nothing was touched: {e}");
    assert!(!d.join("mem.ram").exists(), "a 16 TiB file was created");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&d);
}
