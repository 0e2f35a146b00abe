//! Multifd receiving into RAM files: uncompressed payloads are spliced from the
//! socket into the file (no pass through user memory). A packet mixing runs of
//! consecutive pages with lone and backward pages, a channel whose bytes arrive in
//! small odd pieces (every splice partial) and a payload cut short are checked
//! byte for byte, into a tmpfs file and into a file of the test's temporary
//! directory (another file system where there is one).

mod common;

use engine::incoming::{Incoming, IncomingError};
use engine::memory::GuestRegion;
use engine::multifd::{ChannelName, IncomingChannels, MultifdError, SharedRamSink};
use engine::vm::{VcpuControl, VmParts};
use savevm_format::multifd::{ChannelExpect, Compression, InitialPacket, PacketHeader, MULTIFD_FLAG_SYNC};
use savevm_format::{Configuration, PageSink, PageSlot, RamBlock, StreamWriter};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use transports::{CancelToken, Listener, MigrationReader, RateLimit};

const PAGE: usize = 4096;
const BLOCK: usize = 1 << 20;

/// Destination RAM: a file, mapped shared, handed to the receiver threads both as
/// the mapping and as the file (as `qmig recv` does).
struct FileRam {
    file: Arc<File>,
    ptr: *mut u8,
}

impl FileRam {
    fn new(path: &Path) -> FileRam {
        let file = File::options().read(true).write(true).create(true).truncate(true).open(path).expect("create");
        file.set_len(BLOCK as u64).expect("set_len");
        // SAFETY: a fresh shared mapping of BLOCK bytes of a file we own, unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BLOCK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        FileRam { file: Arc::new(file), ptr: ptr.cast() }
    }
}

impl Drop for FileRam {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used (the load returned).
        unsafe { libc::munmap(self.ptr.cast(), BLOCK) };
    }
}

impl PageSink for FileRam {
    fn page_mut(&mut self, _: &RamBlock, off: u64) -> Option<PageSlot<'_>> {
        let o = usize::try_from(off).ok().filter(|&o| o + PAGE <= BLOCK)?;
        // SAFETY: within the mapping; the receiver threads write other pages (7.2's rules).
        let s = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(o), PAGE) };
        Some(PageSlot::from(s))
    }
}

impl SharedRamSink for FileRam {
    fn shared_regions(&mut self) -> Result<Vec<GuestRegion>, String> {
        // SAFETY: the mapping outlives the load (unmapped in Drop, after run_multifd).
        let r = unsafe { GuestRegion::new("mem", self.ptr, BLOCK) };
        Ok(vec![r.ok_or("empty")?])
    }
    fn shared_files(&mut self) -> Vec<Option<Arc<File>>> {
        vec![Some(self.file.clone())]
    }
}

struct NoVcpus;
impl VcpuControl for NoVcpus {}

/// The main stream: one block `mem`, the setup's EOS (the channels' SYNC), EOF.
fn main_stream() -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.header().expect("header");
    w.configuration(&Configuration { machine: "none".into(), ..Default::default() }).expect("config");
    w.section_start(2, "ram", 0, 4).expect("start");
    w.ram_block_list(&[RamBlock::new(0, "mem", BLOCK as u64)]).expect("blocks");
    w.ram_eos().expect("eos");
    w.footer(2).expect("footer");
    w.eof().expect("eof");
    w.finish().expect("finish")
}

/// The bytes of page `page` in this test (each page different, no page zero).
fn page_bytes(page: u64) -> Vec<u8> {
    (0..PAGE).map(|i| ((page as usize * 31 + i * 7) % 251 + 1) as u8).collect()
}

fn packet(flags: u32, pages: &[u64], num: u64, out: &mut Vec<u8>) {
    let h = PacketHeader {
        flags,
        pages_alloc: 128,
        normal_pages: pages.len() as u32,
        next_packet_size: (pages.len() * PAGE) as u32,
        packet_num: num,
        block: "mem".into(),
        offsets: pages.iter().map(|p| p * PAGE as u64).collect(),
    };
    h.encode(PAGE as u64, out).expect("encode");
    for &p in pages {
        out.extend_from_slice(&page_bytes(p));
    }
}

/// Packets of page lists, then a SYNC packet: channel 0's bytes after its initial packet.
fn channel(packets: &[&[u64]]) -> Vec<u8> {
    let mut out = InitialPacket { uuid: [0; 16], channel_id: 0 }.encode().to_vec();
    for (i, pages) in packets.iter().enumerate() {
        packet(0, pages, i as u64, &mut out);
    }
    packet(MULTIFD_FLAG_SYNC, &[], packets.len() as u64, &mut out);
    out
}

/// Load `main_stream` with one channel sending `bytes` in pieces of `piece` bytes
/// (one write each, so the receiver sees them arrive piece by piece), closing it
/// after its bytes when `close`. Into a file at `path`.
fn load(name: &str, path: &Path, bytes: Vec<u8>, piece: usize, close: bool) -> (Result<(), IncomingError>, Vec<u8>) {
    let _s = common::serial();
    let uri = common::sock("multifd-splice", name);
    let listener = Listener::bind(&uri, &CancelToken::new().expect("token")).expect("bind");
    let sock = match &uri {
        transports::MigrationUri::Unix(p) => p.clone(),
        _ => unreachable!("a unix uri"),
    };
    let main = main_stream();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        let mut m = UnixStream::connect(&sock).expect("connect main");
        let mut c = UnixStream::connect(&sock).expect("connect channel");
        let _ = m.write_all(&main);
        // The main stream ends here (as a source's does after its EOF record).
        let _ = m.shutdown(std::net::Shutdown::Write);
        for chunk in bytes.chunks(piece) {
            if c.write_all(chunk).is_err() {
                break;
            }
        }
        if close {
            drop(c);
            let _ = wait.recv();
        } else {
            let _ = wait.recv();
            drop(c);
        }
        drop(m);
    });
    let main = listener.accept_another().expect("main");
    let stop = main.return_path().ok();
    let e = ChannelExpect { uuid: [0; 16], channels: 1, compression: Compression::None };
    let chans = IncomingChannels::accept(e, &RateLimit::new(0), || listener.accept_another()).expect("channel");
    let chans = chans.on_failure(move || {
        if let Some(s) = &stop {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
    });
    let mut ram = FileRam::new(path);
    let none = Box::new(|| Err("none".to_string()));
    let reader = MigrationReader::new(main, RateLimit::new(0));
    let r = Incoming::new(false).run_multifd(reader, chans, &mut ram, &mut VmParts::default(), &mut NoVcpus, none);
    drop(done);
    writer.join().expect("writer");
    drop(ram);
    let got = std::fs::read(path).expect("read back");
    let _ = std::fs::remove_file(path);
    (r.map(|_| ()), got)
}

/// What the file must hold after `packets` (later pages win).
fn expected(packets: &[&[u64]]) -> Vec<u8> {
    let mut want = vec![0u8; BLOCK];
    for pages in packets {
        for &p in *pages {
            let o = p as usize * PAGE;
            want[o..o + PAGE].copy_from_slice(&page_bytes(p));
        }
    }
    want
}

/// Where the test files go: tmpfs (`/dev/shm`, the usual RAM file) and the
/// temporary directory (whatever file system it is on).
fn dirs() -> Vec<PathBuf> {
    let mut d = vec![std::env::temp_dir()];
    if Path::new("/dev/shm").is_dir() {
        d.push(PathBuf::from("/dev/shm"));
    }
    d
}

fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("qmig-multifd-splice-{}-{name}.ram", std::process::id()))
}

/// The first index where two buffers differ, for a readable failure.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then_some(a.len().min(b.len())))
}

#[test]
fn contiguous_and_scattered_pages_land_exactly() {
    // A full packet of consecutive pages (one splice run), a packet mixing runs,
    // lone pages and a page before its predecessor, and a single page.
    let full: Vec<u64> = (0..128).collect();
    let mixed: &[u64] = &[130, 131, 132, 140, 129, 200, 201, 255, 5];
    let packets: [&[u64]; 3] = [&full, mixed, &[250]];
    let want = expected(&packets);
    for dir in dirs() {
        for piece in [usize::MAX, 777] {
            let name = format!("exact-{piece}");
            let (r, got) = load(&name, &file(&dir, &name), channel(&packets), piece, false);
            assert!(r.is_ok(), "{}: {:?}", dir.display(), r.err().map(|e| engine::error::report(&e)));
            assert_eq!(first_difference(&got, &want), None, "into {} in pieces of {piece}", dir.display());
        }
    }
}

#[test]
fn a_payload_cut_short_is_a_typed_error() {
    let full: Vec<u64> = (0..128).collect();
    let mut bytes = channel(&[&full]);
    // Cut inside the payload: the header and 100 KiB of the 512 KiB of pages.
    bytes.truncate(64 + 1344 + (100 << 10));
    for dir in dirs() {
        let (r, _) = load("short", &file(&dir, "short"), bytes.clone(), 4096, true);
        let e = match r {
            Ok(()) => panic!("a cut payload accepted"),
            Err(e) => e,
        };
        let msg = engine::error::report(&e);
        match &e {
            IncomingError::Multifd(MultifdError::Stream { channel, source }) => {
                assert_eq!(*channel, ChannelName::Id(0), "{msg}");
                assert!(
                    matches!(source.kind, savevm_format::ErrorKind::UnexpectedEof { .. }),
                    "not an early end: {msg}"
                );
                // Reported at the payload's start (after the initial packet and the header).
                assert_eq!(source.offset, 64 + 1344, "{msg}");
            }
            _ => panic!("not a multifd stream error: {msg}"),
        }
    }
}
