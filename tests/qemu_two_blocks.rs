//! Interop tests with two RAM blocks against a real `qemu-system-x86_64` (7.2).
//!
//! QEMU 7.2 `-machine none` migrates only its `memory-backend` RAM block: a second
//! `memory-backend-file` is created but no device maps it, so it never becomes a
//! migratable RAM block. The `x-remote` machine (the multi-process QEMU remote
//! machine) has a PCI host bridge, so an `ivshmem-plain` device can map a second
//! backend; QEMU then migrates two RAM blocks, `mem` (the machine's memory backend)
//! and `0000:00:00.0/mem2` (the ivshmem BAR, named after its PCI device), plus the
//! device sections `timer`, `PCIHost`, `PCIBUS`, `0000:00:00.0/ivshmem-plain` and
//! `globalstate`, under the configuration `x-remote`.
//!
//! - QEMU -> qmig: `qmig analyze --extract-ram` must reproduce both blocks exactly.
//! - qmig -> QEMU: a stream written with [`StreamWriter`] (new RAM content for both
//!   blocks, the device sections re-encoded from a QEMU stream's vmdesc) must load
//!   into a QEMU destination and leave exactly the new content in both blocks.
//!
//! Without QEMU (or without its `x-remote` machine) the tests print a skip line and
//! pass, except when `CI=true`, where they fail.

mod common;

use std::fs;
use std::io::BufWriter;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_same_ram, qemu_or_skip, run_qmig_ok, shell_quote, TestDir};
use qmig::savevm_format::vmstate::{self, State};
use qmig::savevm_format::{
    find_trailing_vmdesc, Configuration, Decoder, DescriptionSource, Event, RamBlock, SectionKind, StreamWriter,
};
use serde_json::Value;
use testkit::pattern::{self, Pattern, PAGE_SIZE};
use testkit::qemu::{expect_completed, QemuConfig, QemuProcess};

const MEM_LEN: u64 = 16 << 20;
const MEM2_LEN: u64 = 8 << 20;
/// The machine's memory backend: its backend id is the RAM block name.
const MEM: &str = "mem";
/// The ivshmem BAR: QEMU names the block after the PCI device that registers it.
const MEM2: &str = "0000:00:00.0/mem2";
const IVSHMEM: &str = "0000:00:00.0/ivshmem-plain";
const MIGRATION_LIMIT: Duration = Duration::from_secs(20);
const QMIG_LIMIT: Duration = Duration::from_secs(20);
const QUIT_LIMIT: Duration = Duration::from_secs(5);

/// Like [`qemu_or_skip`], and also requires the `x-remote` machine (QEMU built with multiprocess support).
fn x_remote_or_skip(test: &str) -> bool {
    let Some(qemu) = qemu_or_skip(test) else { return false };
    let out = Command::new(&qemu)
        .args(["-machine", "help"])
        .output()
        .unwrap_or_else(|e| panic!("{test}: cannot run {} -machine help: {e}", qemu.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    if text.lines().any(|l| l.split_whitespace().next() == Some("x-remote")) {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {} has no x-remote machine, and CI=true forbids skipping", qemu.display());
    }
    eprintln!("{test}: skipped: {} has no x-remote machine", qemu.display());
    false
}

/// An `x-remote` guest with RAM block `mem` in `mem_path` and the ivshmem block in `mem2_path`.
fn two_block_config(mem_path: &Path, mem2_path: &Path) -> QemuConfig {
    QemuConfig::new()
        .machine("x-remote")
        .ram("mem", mem_path, MEM_LEN)
        .ram("mem2", mem2_path, MEM2_LEN)
        .arg("-device")
        .arg("ivshmem-plain,memdev=mem2,master=on")
}

/// Starts a source QEMU on the two RAM files and migrates it to `stream`; returns the final `query-migrate`.
fn qemu_migrate_to_file(mem_path: &Path, mem2_path: &Path, stream: &Path) -> Value {
    let mut qemu = QemuProcess::start(&two_block_config(mem_path, mem2_path)).expect("start source QEMU");
    qemu.migrate(&format!("exec:cat > {}", shell_quote(stream))).expect("migrate to file");
    let info = qemu
        .wait_migration(MIGRATION_LIMIT)
        .and_then(expect_completed)
        .unwrap_or_else(|e| panic!("source migration: {e}\nstderr: {}", qemu.stderr()));
    let stderr = qemu.stderr();
    qemu.quit(QUIT_LIMIT).expect("quit source QEMU");
    assert!(stderr.trim().is_empty(), "source QEMU complained: {stderr}");
    info
}

fn get<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for k in path {
        cur = cur.get(*k).unwrap_or_else(|| panic!("analyze JSON: missing {}; document: {v:#}", path.join(".")));
    }
    cur
}

fn u64_at(v: &Value, path: &[&str]) -> u64 {
    get(v, path).as_u64().unwrap_or_else(|| panic!("analyze JSON: {} is not an unsigned integer", path.join(".")))
}

#[test]
fn qemu_to_qmig_two_blocks() {
    const NAME: &str = "qemu_to_qmig_two_blocks";
    if !x_remote_or_skip(NAME) {
        return;
    }
    let t0 = Instant::now();
    let dir = TestDir::new(NAME);
    let (a, b) = (dir.join("a.ram"), dir.join("b.ram"));
    let (x, y) = (dir.join("x.ram"), dir.join("y.ram"));
    let stream = dir.join("qemu.mig");

    let (pat_a, pat_b) = (Pattern::Mixed { every: 3 }, Pattern::Mixed { every: 5 });
    let ram_a = pattern::generate(pat_a, 1, MEM_LEN as usize);
    let ram_b = pattern::generate(pat_b, 2, MEM2_LEN as usize);
    fs::write(&a, &ram_a).expect("write RAM file A");
    fs::write(&b, &ram_b).expect("write RAM file B");
    let pages_a = MEM_LEN / PAGE_SIZE as u64;
    let pages_b = MEM2_LEN / PAGE_SIZE as u64;
    let (normal_a, normal_b) = (pattern::nonzero_pages(pat_a, pages_a), pattern::nonzero_pages(pat_b, pages_b));

    let info = qemu_migrate_to_file(&a, &b, &stream);
    // QEMU's own accounting covers both blocks.
    assert_eq!(info["ram"]["normal"].as_u64(), Some(normal_a + normal_b), "{info:#}");
    assert_eq!(info["ram"]["duplicate"].as_u64(), Some(pages_a + pages_b - normal_a - normal_b), "{info:#}");
    let t_qemu = t0.elapsed();

    let x_arg = format!("{MEM}={}", x.display());
    let y_arg = format!("{MEM2}={}", y.display());
    let stream_arg = stream.to_str().expect("UTF-8 path");
    let run = run_qmig_ok(&dir, &["analyze", stream_arg, "--extract-ram", &x_arg, "--extract-ram", &y_arg], QMIG_LIMIT);
    let doc: Value = serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "qmig analyze did not print one JSON document ({e}); stdout (first 2000 bytes): {}",
            &run.stdout[..run.stdout.len().min(2000)]
        )
    });

    assert_eq!(get(&doc, &["configuration", "name"]).as_str(), Some("x-remote"), "configuration.name");
    let blocks =
        get(&doc, &["ram", "blocks"]).as_array().unwrap_or_else(|| panic!("ram.blocks is not an array: {doc:#}"));
    assert_eq!(blocks.len(), 2, "two RAM blocks expected: {blocks:#?}");
    for (blk, name, len, normal, pages) in
        [(&blocks[0], MEM, MEM_LEN, normal_a, pages_a), (&blocks[1], MEM2, MEM2_LEN, normal_b, pages_b)]
    {
        assert_eq!(blk["name"].as_str(), Some(name), "block name: {blk:#}");
        assert_eq!(u64_at(blk, &["length"]), len, "block length: {blk:#}");
        assert_eq!(u64_at(blk, &["pages", "normal"]), normal, "normal pages: {blk:#}");
        assert_eq!(u64_at(blk, &["pages", "zero"]), pages - normal, "zero pages: {blk:#}");
        assert_eq!(u64_at(blk, &["pages", "xbzrle"]), 0, "xbzrle pages: {blk:#}");
    }
    let devices = get(&doc, &["devices"]);
    for dev in ["timer", "PCIHost", "PCIBUS", IVSHMEM, "globalstate"] {
        assert!(devices.get(dev).is_some(), "device {dev} missing: {devices:#}");
    }
    assert_eq!(doc["eof"].as_bool(), Some(true), "eof: {doc:#}");

    assert_same_ram("qmig analyze --extract-ram mem=...", &fs::read(&x).expect("read X"), &ram_a);
    assert_same_ram("qmig analyze --extract-ram 0000:00:00.0/mem2=...", &fs::read(&y).expect("read Y"), &ram_b);
    eprintln!("{NAME}: ok in {:?} (QEMU migration {t_qemu:?})", t0.elapsed());
}

/// One FULL device section of the QEMU stream, with what is needed to write it again.
struct DeviceSection {
    section_id: u32,
    idstr: String,
    instance_id: u32,
    version: u32,
    state: State,
    source: DescriptionSource,
    /// The section body as QEMU wrote it (between header and footer).
    body: Vec<u8>,
}

/// RAM content of the qmig -> QEMU test: `mem` random (seed 7) with every 16th page
/// zero (so ZERO records must clear the pre-filled destination), `mem2` text (seed 8).
fn new_content() -> (Vec<u8>, Vec<u8>) {
    let mut mem = pattern::generate(Pattern::Random, 7, MEM_LEN as usize);
    for page in mem.chunks_exact_mut(PAGE_SIZE).skip(5).step_by(16) {
        page.fill(0);
    }
    (mem, pattern::generate(Pattern::Text, 8, MEM2_LEN as usize))
}

#[test]
fn qmig_to_qemu_two_blocks() {
    const NAME: &str = "qmig_to_qemu_two_blocks";
    if !x_remote_or_skip(NAME) {
        return;
    }
    let t0 = Instant::now();
    let dir = TestDir::new(NAME);

    // 1. A QEMU stream of the same guest (other content) to take the device sections from.
    let (pa, pb) = (dir.join("prelim-a.ram"), dir.join("prelim-b.ram"));
    let prelim = dir.join("qemu.mig");
    fs::write(&pa, pattern::generate(Pattern::Mixed { every: 64 }, 3, MEM_LEN as usize)).expect("write RAM A");
    fs::write(&pb, pattern::generate(Pattern::Mixed { every: 64 }, 4, MEM2_LEN as usize)).expect("write RAM B");
    qemu_migrate_to_file(&pa, &pb, &prelim);
    let t_prelim = t0.elapsed();

    // 2. Decode it, collecting the configuration, the RAM section id, the block list and every FULL section.
    let bytes = fs::read(&prelim).expect("read QEMU stream");
    let (vmdesc, _) = find_trailing_vmdesc(&bytes).expect("QEMU stream ends with a vmdesc");
    let mut d = Decoder::new(&bytes[..]);
    d.set_vmdesc(&vmdesc).expect("set_vmdesc");
    let mut config: Option<Configuration> = None;
    let mut ram_id: Option<u32> = None;
    let mut blocks: Vec<RamBlock> = Vec::new();
    let mut devices: Vec<DeviceSection> = Vec::new();
    let mut open: Option<DeviceSection> = None;
    let mut body_start = 0usize;
    loop {
        let ev = d.next().unwrap_or_else(|e| panic!("decoding the QEMU stream: {e}"));
        let Some(ev) = ev else { break };
        match ev {
            Event::Configuration(c) => config = Some(c),
            Event::SectionStart(h) if h.idstr == "ram" => {
                assert_eq!(h.version, 4, "RAM section version");
                assert!(ram_id.is_none_or(|id| id == h.section_id), "two RAM section ids");
                ram_id = Some(h.section_id);
            }
            Event::SectionStart(h) => {
                assert_eq!(h.kind, SectionKind::Full, "device section {} is not FULL", h.idstr);
                // type, be32 id, idstr (length byte + bytes), be32 instance, be32 version
                body_start = h.offset as usize + 1 + 4 + 1 + h.idstr.len() + 4 + 4;
                open = Some(DeviceSection {
                    section_id: h.section_id,
                    idstr: h.idstr,
                    instance_id: h.instance_id,
                    version: h.version,
                    state: State::default(),
                    source: DescriptionSource::Builtin,
                    body: Vec::new(),
                });
            }
            Event::RamBlocks(b) => blocks = b.to_vec(),
            Event::Device { state, source, .. } => {
                let dev = open.as_mut().expect("device state outside a section");
                dev.state = state;
                dev.source = source;
            }
            Event::SectionEnd { kind: SectionKind::Full, section_id } => {
                let end = d.offset() as usize - 5; // the footer: 0x7e, be32 id
                let mut dev = open.take().expect("FULL section end without start");
                assert_eq!(dev.section_id, section_id);
                dev.body = bytes[body_start..end].to_vec();
                devices.push(dev);
            }
            _ => {}
        }
    }
    let config = config.expect("configuration record");
    assert_eq!(config.machine, "x-remote", "{config:?}");
    let ram_id = ram_id.expect("RAM section");
    let names: Vec<(&str, u64)> = blocks.iter().map(|b| (b.name.as_str(), b.length)).collect();
    assert_eq!(names, [(MEM, MEM_LEN), (MEM2, MEM2_LEN)], "QEMU's block list");
    let idstrs: Vec<String> = devices.iter().map(|d| d.idstr.clone()).collect();
    for want in ["timer", "PCIHost", "PCIBUS", IVSHMEM, "globalstate"] {
        assert!(idstrs.iter().any(|i| i == want), "device section {want} missing from QEMU's stream: {idstrs:?}");
    }

    // 3. Descriptions from QEMU's vmdesc; each state must re-encode to QEMU's exact body.
    let vmdesc_devices = vmdesc["devices"].as_array().expect("vmdesc devices array");
    let mut vmsds = Vec::new();
    let mut report = Vec::new();
    for dev in &mut devices {
        let entry = vmdesc_devices
            .iter()
            .find(|e| {
                e["name"].as_str() == Some(&dev.idstr) && e["instance_id"].as_u64() == Some(dev.instance_id as u64)
            })
            .unwrap_or_else(|| panic!("no vmdesc entry for {} instance {}", dev.idstr, dev.instance_id));
        let vmsd = vmstate::vmsd_from_vmdesc(entry).unwrap_or_else(|e| panic!("vmsd_from_vmdesc({}): {e}", dev.idstr));
        // StreamWriter::device writes vmsd.version_id as the section version.
        assert_eq!(vmsd.version_id, dev.version, "{}: vmdesc version vs section version", dev.idstr);
        let (from_body, used) = vmstate::decode_bytes(&vmsd, dev.version, &dev.body)
            .unwrap_or_else(|e| panic!("{}: QEMU's body does not decode with its vmdesc description: {e}", dev.idstr));
        assert_eq!(used, dev.body.len(), "{}: vmdesc description leaves bytes of the body", dev.idstr);
        if dev.source == DescriptionSource::Vmdesc {
            assert_eq!(dev.state, from_body, "{}: Decoder state differs from decode_bytes", dev.idstr);
        } else {
            // Decoded with a built-in description (globalstate's runstate is text there,
            // a plain buffer in the vmdesc): the state must still encode to QEMU's bytes.
            let b = vmstate::encode_to_vec(&vmsd, &dev.state).unwrap_or_else(|e| {
                panic!("{}: built-in state does not encode with the vmdesc description: {e}", dev.idstr)
            });
            assert!(b == dev.body, "{}: built-in state encodes to other bytes", dev.idstr);
            report.push(format!("{}: built-in state re-encodes with the vmdesc description", dev.idstr));
        }
        let again = vmstate::encode_to_vec(&vmsd, &dev.state)
            .unwrap_or_else(|e| panic!("{}: cannot re-encode the state: {e}", dev.idstr));
        assert!(
            again == dev.body,
            "{}: re-encoded body differs from QEMU's ({} vs {} bytes)",
            dev.idstr,
            again.len(),
            dev.body.len()
        );
        vmsds.push(vmsd);
    }

    // 4. Write a new stream: same configuration and section ids, new RAM content.
    let (mem, mem2) = new_content();
    let stream = dir.join("qmig.mig");
    let file = fs::File::create(&stream).expect("create new stream");
    let mut w = StreamWriter::new(BufWriter::new(file));
    let list: Vec<RamBlock> = blocks.iter().map(|b| RamBlock::new(b.index, b.name.clone(), b.length)).collect();
    w.header().expect("header");
    w.configuration(&config).expect("configuration");
    w.section_start(ram_id, "ram", 0, 4).expect("RAM START");
    w.ram_block_list(&list).expect("block list");
    w.ram_eos().expect("EOS");
    w.footer(ram_id).expect("footer");
    w.section_part(ram_id).expect("RAM PART");
    let mut zero_pages = 0;
    for (i, data) in [&mem, &mem2].into_iter().enumerate() {
        for (p, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            zero_pages += w.ram_page_auto(i, (p * PAGE_SIZE) as u64, page).expect("RAM page") as u64;
        }
    }
    w.ram_eos().expect("EOS");
    w.footer(ram_id).expect("footer");
    w.section_end(ram_id).expect("RAM END");
    w.ram_eos().expect("EOS");
    w.footer(ram_id).expect("footer");
    for (dev, vmsd) in devices.iter().zip(&vmsds) {
        w.device(dev.section_id, &dev.idstr, dev.instance_id, vmsd, &dev.state)
            .unwrap_or_else(|e| panic!("writing device {}: {e}", dev.idstr));
    }
    w.eof().expect("EOF");
    w.vmdesc().expect("vmdesc");
    let stream_len = w.bytes_written();
    w.finish().expect("flush new stream");
    assert_eq!(zero_pages, (MEM_LEN / PAGE_SIZE as u64).div_ceil(16), "ZERO records written");

    // Informational: does the vmdesc we wrote describe the devices as QEMU's did?
    let new_bytes = fs::read(&stream).expect("read new stream");
    let (new_vmdesc, _) = find_trailing_vmdesc(&new_bytes).expect("new stream ends with a vmdesc");
    drop(new_bytes);
    let same_desc: Vec<String> = new_vmdesc["devices"]
        .as_array()
        .expect("devices array")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap_or("?");
            let orig = vmdesc_devices.iter().find(|o| o["name"] == e["name"] && o["instance_id"] == e["instance_id"]);
            format!("{name}: {}", if orig == Some(e) { "same" } else { "differs" })
        })
        .collect();

    // 5. Load it into a fresh destination whose RAM files hold other data.
    let (da, db) = (dir.join("dst-a.ram"), dir.join("dst-b.ram"));
    fs::write(&da, pattern::generate(Pattern::Random, 0x0bad, MEM_LEN as usize)).expect("write destination A");
    fs::write(&db, pattern::generate(Pattern::Random, 0x0bae, MEM2_LEN as usize)).expect("write destination B");
    let t_load = Instant::now();
    let mut qemu = QemuProcess::start(&two_block_config(&da, &db).incoming(true)).expect("start destination QEMU");
    qemu.migrate_incoming(&format!("exec:cat {}", shell_quote(&stream))).expect("migrate-incoming");
    let info = qemu.wait_migration(MIGRATION_LIMIT).and_then(expect_completed).unwrap_or_else(|e| {
        panic!("QEMU did not load the qmig stream ({stream_len} bytes): {e}\nstderr: {}", qemu.stderr())
    });
    let runstate = qemu.query_status().expect("query-status");
    let stderr = qemu.stderr();
    qemu.quit(QUIT_LIMIT).expect("quit destination QEMU");
    let t_load = t_load.elapsed();
    assert!(
        runstate == "prelaunch" || runstate == "paused",
        "destination runstate {runstate:?} after loading a stopped guest (query-migrate: {info:#})"
    );
    assert!(stderr.trim().is_empty(), "destination QEMU complained: {stderr}");

    assert_same_ram("destination mem", &fs::read(&da).expect("read destination A"), &mem);
    assert_same_ram("destination 0000:00:00.0/mem2", &fs::read(&db).expect("read destination B"), &mem2);
    eprintln!(
        "{NAME}: ok in {:?} (QEMU source {t_prelim:?}, load {t_load:?}, stream {stream_len} bytes); \
         devices re-encoded: {idstrs:?}; {}; vmdesc vs QEMU's: {}",
        t0.elapsed(),
        report.join(", "),
        same_desc.join(", ")
    );
}
