//! Multifd interop with a real `qemu-system-x86_64` (7.2), both directions, 2 and 4
//! channels, compression none / zlib / zstd (one QEMU per case, 32 MiB guests):
//!
//! - QEMU source with capability `multifd` -> `qmig recv --multifd N`: QEMU reports
//!   `completed`, recv exits 0 with QEMU's page counts, the RAM file equals the source's.
//! - `qmig send --multifd N` -> QEMU destination with `multifd`: QEMU completes in
//!   `prelaunch` (after SHUT(0) on the return path), its RAM file equals ours (it was
//!   filled with other data first, so zero pages must be written too).
//!
//! - The same with `-uuid` on QEMU's command line (as libvirt starts it) and `--uuid`
//!   on qmig's, one case each way; a UUID unlike recv's fails both ends, recv in one line.
//! - zstd on a text guest, QEMU and qmig sources: `transferred` and `multifd-bytes`
//!   count pages uncompressed (7.2's accounting), the wire carries under half of it.
//!
//! Without QEMU the tests print `skipped: ...` and pass, except when `CI=true`.

mod common;

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_same_ram, qemu_or_skip, qmig_exe, run_qmig, utf8, TestDir};
use serde_json::{json, Value};
use testkit::pattern::{self, Pattern, PAGE_SIZE};
use testkit::qemu::{expect_completed, QemuConfig, QemuProcess};

const RAM_LEN: u64 = 32 << 20;
const PAGES: u64 = RAM_LEN / PAGE_SIZE as u64;
/// Random pages where p % 3 == 0, zero pages elsewhere: both channels and the main one carry pages.
const GUEST: Pattern = Pattern::Mixed { every: 3 };
const LIMIT: Duration = Duration::from_secs(60);

/// QEMU 7.2's multifd packet header for 4 KiB pages (64 fixed bytes, the block
/// name, 128 offset slots): `multifd-bytes` counts it per packet, plus the pages.
const PACKET_HEADER: u64 = 64 + 256 + 8 * 128;

/// `ram.multifd-bytes` as QEMU 7.2 counts it for `normal` non-zero pages: every
/// page's 4 KiB (uncompressed, whatever the compression) plus one header per
/// packet (at least one per 128 pages; partial packets and SYNCs add some).
fn check_multifd_bytes(who: &str, info: &Value, normal: u64) {
    let got = info["ram"]["multifd-bytes"].as_u64().unwrap_or(0);
    let data = normal * PAGE_SIZE as u64;
    let (lo, hi) = (data + normal.div_ceil(128) * PACKET_HEADER, data + (normal / 64 + 64) * PACKET_HEADER);
    assert!((lo..=hi).contains(&got), "{who}: multifd-bytes {got} not in {lo}..={hi} ({normal} pages): {info}");
    println!("{who}: multifd-bytes {got} for {normal} pages ({} bytes of headers)", got - data);
}

fn set_multifd(qemu: &mut QemuProcess, channels: u8, compression: &str) {
    let q = qemu.qmp().expect("QMP");
    q.set_capabilities(&[("multifd", true)]).expect("migrate-set-capabilities multifd");
    q.execute(
        "migrate-set-parameters",
        Some(json!({"multifd-channels": channels, "multifd-compression": compression})),
    )
    .expect("migrate-set-parameters");
}

/// Waits for a child with a deadline; its stdout and stderr.
fn wait_child(mut child: Child, what: &str) -> (std::process::ExitStatus, String, String) {
    let deadline = Instant::now() + LIMIT;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            let out = child.wait_with_output().expect("output");
            return (
                out.status,
                String::from_utf8_lossy(&out.stdout).into(),
                String::from_utf8_lossy(&out.stderr).into(),
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("{what}: still running after {LIMIT:?}; stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemu_to_qmig(channels: u8, compression: &str) {
    qemu_to_qmig_into(channels, compression, false, None);
}

/// The UUID of the cases run as libvirt runs QEMU (`-uuid`): QEMU 7.2 puts it in each
/// multifd channel's initial packet and requires its own there.
const UUID: &str = "5f1e5b2c-0d5e-4d7e-9a51-6b3c2f0e8a17";

/// `qmig recv --multifd N --multifd-compression C` into `dst`, listening on `uri`
/// once this returns; the thread gives what recv printed after its listening line.
fn spawn_recv(
    name: &str,
    dst: &std::path::Path,
    uri: &str,
    channels: u8,
    compression: &str,
    uuid: Option<&str>,
) -> (Child, std::thread::JoinHandle<String>) {
    let n = channels.to_string();
    let ram_arg = format!("mem={}", utf8(dst));
    let args = ["recv", "--ram", &ram_arg, "--from", uri, "--multifd", &n, "--multifd-compression", compression];
    let mut recv = Command::new(qmig_exe())
        .args(args)
        .args(uuid.iter().flat_map(|u| ["--uuid", u]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qmig recv");
    // recv prints {"listening": URI} once bound.
    let mut out = recv.stdout.take().expect("stdout");
    let mut first = Vec::new();
    let mut b = [0u8; 1];
    while std::io::Read::read(&mut out, &mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
        first.push(b[0]);
    }
    assert!(String::from_utf8_lossy(&first).contains("listening"), "{name}: {:?}", String::from_utf8_lossy(&first));
    let rest = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    (recv, rest)
}

/// QEMU -> `recv --multifd`; with `existing`, into a destination file already
/// full of other data (every ZERO record must clear its page), else into a fresh
/// one (a ZERO record costs no page: the file holds no more than the non-zero pages).
/// With `uuid` the source QEMU runs with `-uuid` and recv with `--uuid`.
fn qemu_to_qmig_into(channels: u8, compression: &str, existing: bool, uuid: Option<&str>) {
    let over = if existing { "_over_data" } else { "" };
    let id = if uuid.is_some() { "_uuid" } else { "" };
    let name = format!("multifd_qemu_to_qmig_{channels}_{compression}{over}{id}");
    if qemu_or_skip(&name).is_none() {
        return;
    }
    let dir = TestDir::new(&name);
    let (src, dst) = (dir.join("src.ram"), dir.join("dst.ram"));
    let ram = pattern::generate(GUEST, 0x3f0 + u64::from(channels), RAM_LEN as usize);
    fs::write(&src, &ram).expect("write source RAM");
    if existing {
        fs::write(&dst, pattern::generate(Pattern::Random, 0xbad0, RAM_LEN as usize)).expect("destination RAM");
    }
    let uri = format!("unix:{}", utf8(&dir.join("mig.sock")));
    let (recv, rest) = spawn_recv(&name, &dst, &uri, channels, compression, uuid);

    let mut qemu =
        QemuProcess::start(&uuid_arg(QemuConfig::new().ram("mem", &src, RAM_LEN), uuid)).expect("start source QEMU");
    set_multifd(&mut qemu, channels, compression);
    qemu.migrate(&uri).unwrap_or_else(|e| panic!("{name}: migrate: {e}\n{}", qemu.stderr()));
    let info = qemu.wait_migration(LIMIT).and_then(expect_completed);
    let (status, _, stderr) = wait_child(recv, &name);
    let info = info.unwrap_or_else(|e| panic!("{name}: source: {e}\nQEMU: {}\nrecv: {stderr}", qemu.stderr()));
    assert!(status.success(), "{name}: recv exited {status}: {stderr}");
    let stats: Value = serde_json::from_str(rest.join().expect("stdout reader").trim()).expect("stats JSON");
    let normal = pattern::nonzero_pages(GUEST, PAGES);
    assert_eq!(info["ram"]["normal"].as_u64(), Some(normal), "{name}: QEMU {info}");
    check_multifd_bytes(&format!("{name}: QEMU source"), &info, normal);
    assert_eq!(stats["status"], "completed", "{name}: {stats}");
    // QEMU 7.2 with multifd sometimes sends a few pages of a PART twice (its `normal`
    // counts each page once): recv counts what arrived, at least every page.
    let got = stats["ram"]["normal"].as_u64().unwrap_or(0);
    assert!((normal..normal + PAGES / 64).contains(&got), "{name}: recv normal {got}, QEMU {normal}: {stats}");
    assert_eq!(stats["ram"]["duplicate"].as_u64(), Some(PAGES - normal), "{name}: recv {stats}");
    let qemu_stderr = qemu.stderr();
    qemu.quit(Duration::from_secs(5)).expect("quit QEMU");
    assert!(qemu_stderr.trim().is_empty(), "{name}: QEMU complained: {qemu_stderr}");
    if !existing {
        use std::os::unix::fs::MetadataExt;
        let stored = fs::metadata(&dst).expect("destination metadata").blocks() * 512;
        let data = normal * PAGE_SIZE as u64;
        println!("{name}: {stored} bytes stored for {data} bytes of non-zero pages");
        assert!(stored <= data + (1 << 20), "{name}: ZERO records cost pages: {stored} stored, {data} of data");
    }
    assert_same_ram(&name, &fs::read(&dst).expect("read received RAM"), &ram);
}

/// A ZERO record under multifd clears a destination page that held data.
#[test]
fn qemu_to_qmig_multifd_over_existing_data() {
    qemu_to_qmig_into(2, "none", true, None);
}

/// `-uuid U` on QEMU's command line (libvirt always passes one).
fn uuid_arg(c: QemuConfig, uuid: Option<&str>) -> QemuConfig {
    match uuid {
        Some(u) => c.arg("-uuid").arg(u),
        None => c,
    }
}

/// A QEMU source started with `-uuid` into `recv --multifd 2 --uuid` of the same UUID.
#[test]
fn qemu_to_qmig_2_zstd_with_uuid() {
    qemu_to_qmig_into(2, "zstd", false, Some(UUID));
}

/// `send --multifd 2 --uuid` into a QEMU destination started with the same `-uuid`.
#[test]
fn qmig_to_qemu_2_zlib_with_uuid() {
    qmig_to_qemu_with(2, "zlib", Some(UUID));
}

fn qmig_to_qemu(channels: u8, compression: &str) {
    qmig_to_qemu_with(channels, compression, None);
}

/// With `uuid` the destination QEMU runs with `-uuid` and send with `--uuid`.
fn qmig_to_qemu_with(channels: u8, compression: &str, uuid: Option<&str>) {
    let id = if uuid.is_some() { "_uuid" } else { "" };
    let name = format!("multifd_qmig_to_qemu_{channels}_{compression}{id}");
    if qemu_or_skip(&name).is_none() {
        return;
    }
    let dir = TestDir::new(&name);
    let (src, dst) = (dir.join("src.ram"), dir.join("dst.ram"));
    let ram = pattern::generate(GUEST, 0x4f0 + u64::from(channels), RAM_LEN as usize);
    fs::write(&src, &ram).expect("write source RAM");
    fs::write(&dst, pattern::generate(Pattern::Random, 0xbad, RAM_LEN as usize)).expect("write destination RAM");
    let mut qemu = QemuProcess::start(&uuid_arg(QemuConfig::new().ram("mem", &dst, RAM_LEN).incoming(true), uuid))
        .expect("start destination QEMU");
    set_multifd(&mut qemu, channels, compression);
    let uri = format!("unix:{}", utf8(&dir.join("mig.sock")));
    qemu.migrate_incoming(&uri).unwrap_or_else(|e| panic!("{name}: migrate-incoming: {e}\n{}", qemu.stderr()));
    let n = channels.to_string();
    let ram_arg = format!("mem={}", utf8(&src));
    let mut args = vec!["send", "--ram", &ram_arg, "--to", &uri, "--multifd", &n, "--multifd-compression", compression];
    if let Some(u) = uuid {
        args.extend(["--uuid", u]);
    }
    let run = run_qmig(&dir, &args, LIMIT);
    assert!(run.status.success(), "{name}: send failed: {}\nQEMU: {}", run.stderr, qemu.stderr());
    let stats: Value = serde_json::from_str(run.stdout.trim()).expect("send stats JSON");
    let normal = pattern::nonzero_pages(GUEST, PAGES);
    assert_eq!(stats["ram"]["normal"].as_u64(), Some(normal), "{name}: send {stats}");
    check_multifd_bytes(&format!("{name}: qmig send"), &stats, normal);
    assert_eq!(stats["ram"]["duplicate"].as_u64(), Some(PAGES - normal), "{name}: send {stats}");
    assert_eq!(stats["return-path"], json!({"pongs": 1, "shut": 0}), "{name}: QEMU confirmed: {stats}");
    let info = qemu
        .wait_migration(LIMIT)
        .and_then(expect_completed)
        .unwrap_or_else(|e| panic!("{name}: destination QEMU: {e}\n{}", qemu.stderr()));
    assert_eq!(qemu.query_status().expect("query-status"), "prelaunch", "{name}: {info}");
    let qemu_stderr = qemu.stderr();
    qemu.quit(Duration::from_secs(5)).expect("quit QEMU");
    assert!(qemu_stderr.trim().is_empty(), "{name}: QEMU complained: {qemu_stderr}");
    assert_same_ram(&name, &fs::read(&dst).expect("read destination RAM"), &ram);
}

/// Multifd zstd on a compressible (text) guest, a QEMU source and `qmig send` each
/// into `recv`: both count every page uncompressed in `multifd-bytes` and in
/// `transferred` (QEMU 7.2's accounting, which its `max-bandwidth` limit also
/// uses), while the wire (recv's count of the bytes it read) carried far fewer.
#[test]
fn zstd_counts_pages_uncompressed_as_qemu() {
    let name = "multifd_zstd_counts_pages_uncompressed";
    if qemu_or_skip(name).is_none() {
        return;
    }
    let dir = TestDir::new(name);
    let src = dir.join("src.ram");
    let ram = pattern::generate(Pattern::Text, 0x7e47, RAM_LEN as usize);
    fs::write(&src, &ram).expect("write source RAM");
    for who in ["QEMU", "qmig"] {
        let dst = dir.join(&format!("dst-{who}.ram"));
        let uri = format!("unix:{}", utf8(&dir.join(&format!("{who}.sock"))));
        let (recv, rest) = spawn_recv(name, &dst, &uri, 2, "zstd", None);
        let sent = if who == "QEMU" {
            let mut qemu = QemuProcess::start(&QemuConfig::new().ram("mem", &src, RAM_LEN)).expect("start QEMU");
            set_multifd(&mut qemu, 2, "zstd");
            qemu.migrate(&uri).unwrap_or_else(|e| panic!("{name}: migrate: {e}\n{}", qemu.stderr()));
            let info = qemu.wait_migration(LIMIT).and_then(expect_completed);
            let info = info.unwrap_or_else(|e| panic!("{name}: QEMU source: {e}\n{}", qemu.stderr()));
            qemu.quit(Duration::from_secs(5)).expect("quit QEMU");
            info
        } else {
            let ram_arg = format!("mem={}", utf8(&src));
            let args = ["send", "--ram", &ram_arg, "--to", &uri, "--multifd", "2", "--multifd-compression", "zstd"];
            let run = run_qmig(&dir, &args, LIMIT);
            assert!(run.status.success(), "{name}: send failed: {}", run.stderr);
            serde_json::from_str(run.stdout.trim()).expect("send stats JSON")
        };
        let (status, _, stderr) = wait_child(recv, name);
        assert!(status.success(), "{name}: recv from {who} exited {status}: {stderr}");
        let stats: Value = serde_json::from_str(rest.join().expect("stdout reader").trim()).expect("stats JSON");
        let normal = sent["ram"]["normal"].as_u64().unwrap_or(0);
        assert_eq!(normal, PAGES, "{name}: {who}: every text page is sent: {sent}");
        check_multifd_bytes(&format!("{name}: {who}"), &sent, normal);
        let (transferred, counted) = (sent["ram"]["transferred"].as_u64(), sent["ram"]["multifd-bytes"].as_u64());
        let (transferred, counted) = (transferred.unwrap_or(0), counted.unwrap_or(0));
        let wire = stats["ram"]["transferred"].as_u64().unwrap_or(u64::MAX);
        println!("{who}: transferred {transferred}, multifd-bytes {counted}, on the wire {wire}");
        assert!(transferred >= counted, "{name}: {who}: transferred {transferred} < multifd-bytes {counted}");
        assert!(wire * 2 < counted, "{name}: {who}: {wire} bytes on the wire for {counted} counted: not compressed?");
        assert_same_ram(&format!("{name}: from {who}"), &fs::read(&dst).expect("read received RAM"), &ram);
    }
}

macro_rules! matrix {
    ($($t:ident: $f:ident($n:expr, $c:expr);)*) => {$(
        #[test]
        fn $t() {
            $f($n, $c);
        }
    )*};
}

matrix! {
    qemu_to_qmig_2_none: qemu_to_qmig(2, "none");
    qemu_to_qmig_2_zlib: qemu_to_qmig(2, "zlib");
    qemu_to_qmig_2_zstd: qemu_to_qmig(2, "zstd");
    qemu_to_qmig_4_none: qemu_to_qmig(4, "none");
    qemu_to_qmig_4_zlib: qemu_to_qmig(4, "zlib");
    qemu_to_qmig_4_zstd: qemu_to_qmig(4, "zstd");
    qmig_to_qemu_2_none: qmig_to_qemu(2, "none");
    qmig_to_qemu_2_zlib: qmig_to_qemu(2, "zlib");
    qmig_to_qemu_2_zstd: qmig_to_qemu(2, "zstd");
    qmig_to_qemu_4_none: qmig_to_qemu(4, "none");
    qmig_to_qemu_4_zlib: qmig_to_qemu(4, "zlib");
    qmig_to_qemu_4_zstd: qmig_to_qemu(4, "zstd");
}

/// A QEMU source (multifd 2, `-uuid` when given) into `qmig recv` with `recv_args`
/// that cannot take it: recv fails with one line on stderr (returned), and the source
/// does not complete.
fn qemu_into_refusing_recv(name: &str, seed: u64, recv_args: &[&str], uuid: Option<&str>) -> String {
    let dir = TestDir::new(name);
    let (src, dst) = (dir.join("src.ram"), dir.join("dst.ram"));
    fs::write(&src, pattern::generate(GUEST, seed, RAM_LEN as usize)).expect("write source RAM");
    let uri = format!("unix:{}", utf8(&dir.join("mig.sock")));
    let ram_arg = format!("mem={}", utf8(&dst));
    let mut recv = Command::new(qmig_exe())
        .args(["recv", "--ram", &ram_arg, "--from", &uri])
        .args(recv_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qmig recv");
    let mut out = recv.stdout.take().expect("stdout");
    let mut b = [0u8; 1];
    while std::io::Read::read(&mut out, &mut b).unwrap_or(0) == 1 && b[0] != b'\n' {}
    let mut qemu =
        QemuProcess::start(&uuid_arg(QemuConfig::new().ram("mem", &src, RAM_LEN), uuid)).expect("start source QEMU");
    set_multifd(&mut qemu, 2, "none");
    qemu.migrate(&uri).unwrap_or_else(|e| panic!("{name}: migrate: {e}\n{}", qemu.stderr()));
    let info = qemu.wait_migration(LIMIT);
    let (status, _, stderr) = wait_child(recv, name);
    assert!(!status.success(), "{name}: recv must fail");
    assert_eq!(stderr.trim().lines().count(), 1, "{name}: one line: {stderr}");
    let st = info.ok().and_then(|i| i["status"].as_str().map(String::from));
    assert_ne!(st.as_deref(), Some("completed"), "{name}: the source must not complete");
    let _ = qemu.kill();
    stderr
}

/// A QEMU source with multifd into a `qmig recv` without `--multifd`: both fail,
/// recv with one line saying to pass `--multifd N`.
#[test]
fn qemu_multifd_source_to_recv_without_multifd_fails_clearly() {
    let name = "multifd_qemu_to_plain_recv";
    if qemu_or_skip(name).is_none() {
        return;
    }
    let stderr = qemu_into_refusing_recv(name, 0x5f0, &[], None);
    assert!(stderr.contains("--multifd"), "{name}: recv says what to do: {stderr}");
}

/// A QEMU source with `-uuid` into `recv --multifd 2` without `--uuid`: recv refuses the
/// first channel in one line naming both UUIDs (QEMU 7.2's words), and the source fails.
#[test]
fn qemu_uuid_unlike_recv_fails_clearly() {
    let name = "multifd_qemu_uuid_mismatch";
    if qemu_or_skip(name).is_none() {
        return;
    }
    let stderr = qemu_into_refusing_recv(name, 0x6f0, &["--multifd", "2"], Some(UUID));
    let expected = format!("received uuid '{UUID}' and expected uuid '00000000-0000-0000-0000-000000000000'");
    assert!(stderr.contains(&expected), "{name}: {stderr}");
}

/// Multifd needs tcp: or unix: (QEMU 7.2: "multifd is not supported by current protocol").
#[test]
fn multifd_refuses_other_transports() {
    let dir = TestDir::new("multifd_transports");
    let src = dir.join("src.ram");
    fs::write(&src, vec![0u8; 1 << 20]).expect("write RAM");
    let ram_arg = format!("mem={}", utf8(&src));
    let out = format!("file:{}", utf8(&dir.join("out.mig")));
    for args in [
        vec!["send", "--ram", &ram_arg, "--to", "exec:cat >/dev/null", "--multifd", "2"],
        vec!["send", "--ram", &ram_arg, "--to", &out, "--multifd", "2"],
        vec!["recv", "--ram", &ram_arg, "--from", &out, "--multifd", "2"],
    ] {
        let run = run_qmig(&dir, &args, LIMIT);
        assert!(!run.status.success(), "{args:?} must be refused");
        assert!(run.stderr.contains("multifd is not supported by current protocol"), "{args:?}: {}", run.stderr);
    }
    assert!(!dir.join("out.mig").exists(), "nothing was written");
}
