//! Every stream QEMU 7.2 wrote in `tests/fixtures/` decodes, and the RAM rebuilt
//! from it equals the documented fill pattern page for page; device values,
//! commands and record counts match the fixtures' README.

use flate2::read::GzDecoder;
use savevm_format::multifd::ChannelReader;
use savevm_format::vmstate::Value;
use savevm_format::{Command, Decoder, Event, PageSink, RamBlock, RpMessage, SectionKind, StoppedGuest};
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use testkit::pattern::{self, Pattern};

const TPS: usize = savevm_format::TARGET_PAGE_SIZE;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Destination RAM in memory, starting all zero as a fresh destination's file does.
#[derive(Default)]
struct Ram {
    blocks: HashMap<String, Vec<u8>>,
}

impl PageSink for Ram {
    fn page_mut(&mut self, block: &RamBlock, offset: u64) -> Option<savevm_format::PageSlot<'_>> {
        let b = self.blocks.entry(block.name.clone()).or_insert_with(|| vec![0; block.length as usize]);
        (b.get_mut(offset as usize..offset as usize + TPS)).map(savevm_format::PageSlot::from)
    }
    fn discard(&mut self, block: &RamBlock, start: u64, len: u64) {
        if let Some(b) = self.blocks.get_mut(&block.name) {
            b[start as usize..(start + len) as usize].fill(0);
        }
    }
}

#[derive(Default, Debug)]
struct Summary {
    ram: Ram,
    zero: u64,
    page: u64,
    xbzrle: u64,
    ram_sections: u64,
    sections: Vec<(SectionKind, String, u32, u32)>,
    devices: HashMap<(String, u32), savevm_format::vmstate::State>,
    commands: Vec<Command>,
    vmdesc: Option<serde_json::Value>,
    eof: bool,
}

impl std::fmt::Debug for Ram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ram({:?})", self.blocks.keys().collect::<Vec<_>>())
    }
}

/// Decode a main stream (plus multifd channels, synced at each RAM EOS as QEMU 7.2 does).
fn load(name: &str, channels: &[&str]) -> Summary {
    let bytes = read(name);
    let vmdesc = savevm_format::find_trailing_vmdesc(&bytes).map(|(j, _)| j);
    let mut d = Decoder::new(&bytes[..]);
    if let Some(v) = &vmdesc {
        d.set_vmdesc(v).expect("vmdesc");
    }
    let mut chans: Vec<ChannelReader<&[u8]>> = Vec::new();
    let chan_bytes: Vec<Vec<u8>> = channels.iter().map(|c| read(c)).collect();
    for c in &chan_bytes {
        let mut r = ChannelReader::new(&c[..], 4096);
        r.initial().expect("initial packet");
        chans.push(r);
    }
    let mut s = Summary::default();
    let mut cur = None;
    let mut blocks: Vec<RamBlock> = vec![];
    loop {
        let ev = match d.next_with(&mut s.ram) {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            Err(e) => panic!("{name}: {e}"),
        };
        match ev {
            Event::SectionStart(h) => {
                if h.idstr == "ram" {
                    s.ram_sections += 1;
                }
                s.sections.push((h.kind, h.idstr.clone(), h.instance_id, h.version));
                cur = Some((h.idstr, h.instance_id));
            }
            Event::RamBlocks(b) => blocks = b.to_vec(),
            Event::ZeroPage { .. } => s.zero += 1,
            Event::Page { data, .. } => {
                assert!(data.is_none(), "page should have gone to the sink");
                s.page += 1
            }
            Event::XbzrlePage { .. } => s.xbzrle += 1,
            Event::RamEos => {
                for ch in chans.iter_mut() {
                    loop {
                        let (h, data) = ch.next_packet().expect("packet").expect("SYNC before channel end");
                        if h.normal_pages > 0 {
                            let b = blocks.iter().find(|b| b.name == h.block).expect("block");
                            for (i, off) in h.offsets.iter().enumerate() {
                                let mut slot = s.ram.page_mut(b, *off).expect("slot");
                                slot.copy_from(&data[i * TPS..(i + 1) * TPS]);
                            }
                        }
                        if h.is_sync() {
                            break;
                        }
                    }
                }
            }
            Event::Device { state, .. } => {
                s.devices.insert(cur.clone().expect("device inside a section"), state);
            }
            Event::Command(c) => s.commands.push(c),
            Event::Eof => s.eof = true,
            Event::VmDescription(j) => s.vmdesc = Some(j),
            _ => {}
        }
    }
    for ch in chans.iter_mut() {
        while let Some((h, _)) = ch.next_packet().expect("trailing packet") {
            assert_eq!(h.normal_pages, 0, "pages after the last sync");
        }
    }
    s
}

fn check_pattern(ram: &[u8], p: Pattern, seed: u64) {
    let mut want = [0u8; TPS];
    for (i, page) in ram.chunks_exact(TPS).enumerate() {
        pattern::fill_page(p, seed, i as u64, &mut want);
        assert!(page == &want[..], "page {i} differs from the pattern");
    }
}

fn runstate(s: &Summary) -> String {
    match s.devices.get(&("globalstate".to_string(), 0)).and_then(|g| g.get("runstate")) {
        Some(Value::Text(t)) => t.clone(),
        other => panic!("no globalstate runstate: {other:?}"),
    }
}

fn check_none_machine(s: &Summary, zero: u64, page: u64, runstate_want: &str) {
    assert!(s.eof);
    assert_eq!((s.zero, s.page, s.xbzrle), (zero, page, 0));
    let t = &s.devices[&("timer".to_string(), 0)];
    assert_eq!(t.get("cpu_ticks_offset"), Some(&Value::Int(0)));
    assert_eq!(t.get("cpu_clock_offset"), Some(&Value::Int(0)));
    assert_eq!(runstate(s), runstate_want);
    let names: Vec<&str> = s.sections.iter().map(|x| x.1.as_str()).collect();
    assert_eq!(names, ["ram", "ram", "ram", "timer", "globalstate"][..names.len().min(5)].to_vec()[..]);
}

#[test]
fn precopy_16m_mixed32() {
    let s = load("precopy-none-16m-mixed32-s1.mig", &[]);
    check_none_machine(&s, 3968, 128, "prelaunch");
    assert_eq!(s.ram_sections, 3);
    check_pattern(&s.ram.blocks["mem"], Pattern::Mixed { every: 32 }, 1);
    let v = s.vmdesc.expect("vmdesc");
    assert_eq!(v["page_size"], 4096);
    assert_eq!(v["devices"].as_array().map(Vec::len), Some(2));
}

#[test]
fn postcopy_advise_8m() {
    let s = load("postcopy-advise-none-8m-mixed32-s2.mig", &[]);
    check_none_machine(&s, 1984, 64, "prelaunch");
    assert_eq!(
        s.commands,
        vec![Command::OpenReturnPath, Command::Ping(1), Command::PostcopyAdvise(Some((4096, 4096)))]
    );
    check_pattern(&s.ram.blocks["mem"], Pattern::Mixed { every: 32 }, 2);
}

#[test]
fn postcopy_active_8m() {
    let s = load("postcopy-active-none-8m-mixed32-s3.mig", &[]);
    assert!(s.eof);
    assert_eq!((s.zero, s.page), (1984, 64));
    assert_eq!(s.ram_sections, 4, "START, PART, PART after the switch, END");
    assert!(s.vmdesc.is_none(), "postcopy streams have no vmdesc");
    assert_eq!(
        s.commands,
        vec![
            Command::OpenReturnPath,
            Command::Ping(1),
            Command::PostcopyAdvise(Some((4096, 4096))),
            Command::PostcopyRamDiscard { block: "mem".into(), ranges: vec![(0x2e1000, 0x51f000)] },
            Command::Ping(2),
            Command::Packaged(201),
            Command::PostcopyListen,
            Command::Ping(3),
            Command::PostcopyRun,
            Command::Ping(4),
        ]
    );
    assert_eq!(runstate(&s), "prelaunch");
    check_pattern(&s.ram.blocks["mem"], Pattern::Mixed { every: 32 }, 3);
}

#[test]
fn return_path_captures() {
    let mut all = vec![];
    for (f, want) in [
        ("postcopy-advise-none-8m-mixed32-s2.rp.bin", vec![RpMessage::Pong(1), RpMessage::Shut(0)]),
        (
            "postcopy-active-none-8m-mixed32-s3.rp.bin",
            vec![RpMessage::Pong(1), RpMessage::Pong(2), RpMessage::Pong(4), RpMessage::Pong(3), RpMessage::Shut(0)],
        ),
    ] {
        let bytes = read(f);
        let mut r = &bytes[..];
        let mut got = vec![];
        while let Some(m) = RpMessage::read(&mut r).expect("rp message") {
            got.push(m);
        }
        assert_eq!(got, want, "{f}");
        let re: Vec<u8> = got.iter().flat_map(RpMessage::encode).collect();
        assert_eq!(re, bytes, "{f} re-encodes byte for byte");
        all.extend(got);
    }
    assert_eq!(all.len(), 7);
}

#[test]
fn pause_before_switchover_32m() {
    let s = load("pause-before-switchover-none-32m-mixed128-s4.mig", &[]);
    check_none_machine(&s, 8128, 64, "prelaunch");
    check_pattern(&s.ram.blocks["mem"], Pattern::Mixed { every: 128 }, 4);
}

fn multifd(name: &str, seed: u64) {
    let main = format!("{name}.mig");
    let s = load(&main, &[&format!("{name}.ch0.mig"), &format!("{name}.ch1.mig")]);
    check_none_machine(&s, 1792, 0, "prelaunch");
    check_pattern(&s.ram.blocks["mem"], Pattern::Mixed { every: 8 }, seed);
}

#[test]
fn multifd_none_2ch() {
    multifd("multifd-none-2ch-none-8m-mixed8-s5", 5);
}

#[test]
fn multifd_zlib_2ch() {
    multifd("multifd-zlib-2ch-none-8m-mixed8-s6", 6);
}

#[test]
fn multifd_zstd_2ch() {
    multifd("multifd-zstd-2ch-none-8m-mixed8-s7", 7);
}

#[test]
fn multifd_channel_headers() {
    let b = read("multifd-zstd-2ch-none-8m-mixed8-s7.ch1.mig");
    let mut r = ChannelReader::new(&b[..], 4096);
    assert_eq!(r.initial().expect("init").channel_id, 1);
    let mut seen = vec![];
    while let Some((h, data)) = r.next_packet().expect("packet") {
        assert_eq!(data.len(), h.normal_pages as usize * TPS);
        seen.push((h.packet_num, h.flags, h.normal_pages));
    }
    assert_eq!(seen, vec![(1, 1, 0), (3, 4, 128), (4, 4, 1), (6, 1, 0), (8, 1, 0)]);
}

const Q35_DEVICES: &[&str] = &[
    "timer",
    "cpu_common",
    "cpu",
    "kvm-tpr-opt",
    "apic",
    "kvmclock",
    "fw_cfg",
    "0000:00:00.0/mch",
    "PCIHost",
    "PCIBUS",
    "dma",
    "dma",
    "0000:00:1f.0/ICH9LPC",
    "i8259",
    "i8259",
    "ioapic",
    "hpet",
    "mc146818rtc",
    "i8254",
    "pcspk",
    "ps2kbd",
    "ps2mouse",
    "pckbd",
    "vmmouse",
    "port92",
    "0000:00:1f.2/ich9_ahci",
    "i2c_bus",
    "0000:00:1f.3/ich9_smb",
    "acpi_build",
    "globalstate",
];

#[test]
fn q35_full_machine_walks() {
    let s = load("q35-kvm-64m.mig", &[]);
    assert!(s.eof);
    assert_eq!((s.zero, s.page), (16463, 51));
    let full: Vec<&str> = s.sections.iter().filter(|x| x.0 == SectionKind::Full).map(|x| x.1.as_str()).collect();
    assert_eq!(full, Q35_DEVICES);
    assert_eq!(s.devices.len(), 30, "every device decoded from the vmdesc");
    assert!(s.ram.blocks["pc.ram"].iter().all(|&b| b == 0), "the guest never ran");
    assert_eq!(runstate(&s), "prelaunch");
    let cpu = &s.devices[&("cpu".to_string(), 0)];
    assert!(cpu.fields.len() > 50, "cpu has many fields: {}", cpu.fields.len());
    assert!(!cpu.subsections.is_empty(), "cpu has subsections");
    let names: Vec<&str> = s.ram.blocks.keys().map(String::as_str).collect();
    assert!(names.contains(&"pc.bios") && names.contains(&"/rom@etc/acpi/tables"), "{names:?}");
}

#[test]
fn xbzrle_busy_guest() {
    let s = load("xbzrle-q35-kvm-busy-16m-zero.mig", &[]);
    assert!(s.eof);
    assert_eq!((s.zero, s.page, s.xbzrle), (4043, 263, 1778));
    assert_eq!(s.ram_sections, 56);
    assert_eq!(runstate(&s), "running");
    let mut want = vec![];
    GzDecoder::new(&read("xbzrle-q35-kvm-busy-16m-zero.final-ram.bin.gz")[..]).read_to_end(&mut want).expect("gunzip");
    let got = &s.ram.blocks["pc.ram"];
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.chunks(TPS).zip(want.chunks(TPS)).enumerate() {
        assert!(a == b, "pc.ram page {i} differs from the final RAM");
    }
    let t = &s.devices[&("timer".to_string(), 0)];
    assert_eq!(t.get("cpu_ticks_offset"), Some(&Value::Int(533928431)));
}

/// Our writer reproduces QEMU's own stream for the same guest byte for byte.
#[test]
fn save_is_byte_identical_to_qemu() {
    let ram = pattern::generate(Pattern::Mixed { every: 32 }, 1, 16 << 20);
    let (ours, stats) =
        savevm_format::write_stopped_guest(Vec::new(), &[("mem", &ram)], &StoppedGuest::default()).expect("write");
    let qemu = read("precopy-none-16m-mixed32-s1.mig");
    assert_eq!(ours.len(), qemu.len());
    assert!(ours == qemu, "first difference at byte {:?}", ours.iter().zip(&qemu).position(|(a, b)| a != b));
    // query-migrate of that source: ram.normal 128, ram.duplicate 3968, ram.transferred 561036.
    assert_eq!((stats.normal, stats.duplicate, stats.transferred), (128, 3968, 561036));
}
