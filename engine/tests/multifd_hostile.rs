//! Hostile multifd channels (bytes built here) against the destination: a wrong
//! initial packet (magic, version, uuid, id out of range, id twice), a packet with
//! more pages than 7.2 allows, a page offset outside its block, a zstd payload that
//! inflates past its packet. Each is a typed error naming the channel, with no
//! panic and no allocation beyond what a packet may state (the guard aborts on any
//! single allocation over 4 MiB).

mod common;

use engine::incoming::{Incoming, IncomingError};
use engine::memory::GuestRegion;
use engine::multifd::{ChannelName, IncomingChannels, MultifdError, SharedRamSink};
use engine::vm::{VcpuControl, VmParts};
use savevm_format::multifd::{ChannelExpect, Compression, InitialPacket, PacketHeader, MULTIFD_FLAG_ZSTD};
use savevm_format::{Configuration, ErrorKind, PageSink, PageSlot, RamBlock, StreamWriter};
use std::io::Write;
use std::os::unix::net::UnixStream;
use testkit::AllocGuard;
use transports::{CancelToken, Listener, MigrationReader, RateLimit};

#[global_allocator]
static GUARD: AllocGuard = AllocGuard::new(4 << 20, 256 << 20);

const BLOCK: u64 = 1 << 20;

/// Destination RAM in a buffer of this test.
struct Ram(Vec<u8>);

impl PageSink for Ram {
    fn page_mut(&mut self, _: &RamBlock, off: u64) -> Option<PageSlot<'_>> {
        let o = usize::try_from(off).ok()?;
        self.0.get_mut(o..o + 4096).map(PageSlot::from)
    }
}

impl SharedRamSink for Ram {
    fn shared_regions(&mut self) -> Result<Vec<GuestRegion>, String> {
        // SAFETY: the buffer outlives the load (the receiver threads are joined before
        // run_multifd returns) and is only written through volatile page copies.
        let r = unsafe { GuestRegion::new("mem", self.0.as_mut_ptr(), self.0.len()) };
        Ok(vec![r.ok_or("empty")?])
    }
}

struct NoVcpus;
impl VcpuControl for NoVcpus {}

fn expect(channels: u8) -> ChannelExpect {
    ChannelExpect { uuid: [0; 16], channels, compression: Compression::None }
}

/// Connections to a fresh unix listener, each sending its bytes; they stay open
/// until the returned sender is dropped.
fn connect_all(name: &str, conns: Vec<Vec<u8>>) -> (Listener, std::sync::mpsc::Sender<()>) {
    connect_all_closing(name, conns, false)
}

/// [`connect_all`], the last connection closed right after its bytes when `close_last`.
fn connect_all_closing(name: &str, conns: Vec<Vec<u8>>, close_last: bool) -> (Listener, std::sync::mpsc::Sender<()>) {
    let uri = common::sock("multifd-hostile", name);
    let listener = Listener::bind(&uri, &CancelToken::new().expect("token")).expect("bind");
    let path = match &uri {
        transports::MigrationUri::Unix(p) => p.clone(),
        _ => unreachable!("a unix uri"),
    };
    let (done, wait) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for bytes in conns {
            let mut s = UnixStream::connect(&path).expect("connect");
            // A channel refused early may be closed under the write: that is fine here.
            let _ = s.write_all(&bytes);
            open.push(s);
        }
        if close_last {
            drop(open.pop());
        }
        let _ = wait.recv();
    });
    (listener, done)
}

fn accept(name: &str, channels: u8, conns: Vec<Vec<u8>>) -> Result<IncomingChannels, MultifdError> {
    let (listener, _keep) = connect_all(name, conns);
    IncomingChannels::accept(expect(channels), &RateLimit::new(0), || listener.accept_another())
}

/// The error of a result that must have failed.
fn refused<T, E>(r: Result<T, E>, what: &str) -> E {
    match r {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => e,
    }
}

fn initial(id: u8) -> Vec<u8> {
    InitialPacket { uuid: [0; 16], channel_id: id }.encode().to_vec()
}

fn stream_err(e: MultifdError) -> (ChannelName, String) {
    match e {
        MultifdError::Stream { channel, source } => match source.kind {
            ErrorKind::Multifd(m) => (channel, m),
            k => panic!("not a multifd format error: {k}"),
        },
        e => panic!("not a stream error: {e}"),
    }
}

#[test]
fn bad_initial_packets_are_refused_naming_the_channel() {
    let _s = common::serial();
    let mut bad_magic = initial(0);
    bad_magic[0] = 0x51;
    let (ch, m) = stream_err(refused(accept("magic", 2, vec![bad_magic]), "bad magic refused"));
    assert_eq!(ch, ChannelName::Connection(0));
    assert!(m.contains("magic"), "{m}");

    let mut bad_version = initial(0);
    bad_version[7] = 2;
    let (ch, m) = stream_err(refused(accept("version", 2, vec![bad_version]), "bad version refused"));
    assert_eq!(ch, ChannelName::Connection(0));
    assert!(m.contains("version"), "{m}");

    let mut bad_uuid = initial(1);
    bad_uuid[8] = 0xaa;
    let (ch, m) = stream_err(refused(accept("uuid", 2, vec![bad_uuid]), "uuid refused"));
    assert_eq!(ch, ChannelName::Id(1));
    assert!(m.contains("uuid"), "{m}");

    let (ch, m) = stream_err(refused(accept("id", 2, vec![initial(0), initial(2)]), "id 2 of 2 refused"));
    assert_eq!(ch, ChannelName::Id(2));
    assert!(m.contains("out of range"), "{m}");
    let e = stream_err(refused(accept("id255", 2, vec![initial(255)]), "id 255 refused"));
    assert_eq!(e.0, ChannelName::Id(255));

    let dup = refused(accept("dup", 2, vec![initial(1), initial(1)]), "the same id twice refused");
    assert!(matches!(dup, MultifdError::Duplicate { channel: ChannelName::Id(1) }), "{dup}");
    assert!(dup.to_string().contains("multifd channel 1"), "{dup}");

    // In any order.
    let ok = accept("order", 3, vec![initial(2), initial(0), initial(1)]);
    assert!(ok.is_ok(), "channels 2, 0, 1: {:?}", ok.err());
}

/// The main stream up to the setup's EOS (one 1 MiB block `mem`).
fn main_stream() -> Vec<u8> {
    main_stream_with(&[])
}

/// [`main_stream`] with `commands` after the configuration.
fn main_stream_with(commands: &[savevm_format::Command]) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.header().expect("header");
    w.configuration(&Configuration { machine: "none".into(), ..Default::default() }).expect("config");
    for c in commands {
        w.command(c).expect("command");
    }
    w.section_start(2, "ram", 0, 4).expect("start");
    w.ram_block_list(&[RamBlock::new(0, "mem", BLOCK)]).expect("blocks");
    w.ram_eos().expect("eos");
    w.footer(2).expect("footer");
    w.finish().expect("finish")
}

fn header(flags: u32, pages_alloc: u32, offsets: Vec<u64>, size: u32) -> Vec<u8> {
    let mut raw = Vec::new();
    let h = PacketHeader {
        flags,
        pages_alloc,
        normal_pages: offsets.len() as u32,
        next_packet_size: size,
        packet_num: 7,
        block: "mem".into(),
        offsets,
    };
    h.encode(4096, &mut raw).expect("encode");
    raw
}

/// Load `main_stream` with one multifd channel carrying `channel` (after its initial packet).
fn load(name: &str, channel: Vec<u8>, compression: Compression) -> IncomingError {
    load_main(name, main_stream(), channel, compression)
}

fn load_main(name: &str, main: Vec<u8>, channel: Vec<u8>, compression: Compression) -> IncomingError {
    load_full(name, main, channel, compression, false)
}

fn load_full(name: &str, main: Vec<u8>, channel: Vec<u8>, compression: Compression, close: bool) -> IncomingError {
    let _s = common::serial();
    let mut ch0 = initial(0);
    ch0.extend_from_slice(&channel);
    let (listener, keep) = connect_all_closing(name, vec![main, ch0], close);
    let main = listener.accept_another().expect("main");
    let stop = main.return_path().ok();
    let e = ChannelExpect { compression, ..expect(1) };
    let chans = IncomingChannels::accept(e, &RateLimit::new(0), || listener.accept_another()).expect("channel");
    let chans = chans.on_failure(move || {
        if let Some(s) = &stop {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
    });
    let mut ram = Ram(vec![0; BLOCK as usize]);
    let none = Box::new(|| Err("none".to_string()));
    let reader = MigrationReader::new(main, RateLimit::new(0));
    let r = Incoming::new(false).run_multifd(reader, chans, &mut ram, &mut VmParts::default(), &mut NoVcpus, none);
    drop(keep);
    refused(r, "hostile channel")
}

fn channel_error(e: IncomingError) -> (ChannelName, String) {
    let msg = engine::error::report(&e);
    match e {
        IncomingError::Multifd(m) => {
            let (c, s) = stream_err(m);
            assert!(msg.contains("multifd channel 0"), "{msg}");
            (c, s)
        }
        e => panic!("not a multifd error: {e}"),
    }
}

#[test]
fn more_pages_than_a_packet_holds() {
    // pages_alloc 129 (and 129 offsets' worth of claims): 7.2 allows 128.
    let mut p = header(0, 128, vec![0], 4096);
    p[12..16].copy_from_slice(&129u32.to_be_bytes());
    let (c, m) = channel_error(load("pages", p, Compression::None));
    assert_eq!(c, ChannelName::Id(0));
    assert!(m.contains("pages_alloc 129"), "{m}");
    // normal_pages above pages_alloc.
    let mut p = header(0, 128, vec![0], 4096);
    p[16..20].copy_from_slice(&4_000_000u32.to_be_bytes());
    let (_, m) = channel_error(load("normal", p, Compression::None));
    assert!(m.contains("normal_pages"), "{m}");
}

#[test]
fn page_offset_outside_its_block() {
    let mut p = header(0, 128, vec![BLOCK], 4096);
    p.extend_from_slice(&[0x5a; 4096]);
    let (c, m) = channel_error(load("offset", p, Compression::None));
    assert_eq!(c, ChannelName::Id(0));
    assert!(m.contains("outside RAM block 'mem'"), "{m}");
}

#[test]
fn zstd_payload_inflating_past_its_packet() {
    // 3 MiB of zeros compress to a few hundred bytes; the packet claims one page.
    let bomb = zstd::bulk::compress(&vec![0u8; 3 << 20], 1).expect("compress");
    let mut p = header(MULTIFD_FLAG_ZSTD, 128, vec![0], bomb.len() as u32);
    p.extend_from_slice(&bomb);
    let (c, m) = channel_error(load("zstd", p, Compression::Zstd));
    assert_eq!(c, ChannelName::Id(0));
    assert!(m.contains("zstd payload inflated"), "{m}");
    assert!(GUARD.peak() < 64 << 20, "peak heap {} bytes", GUARD.peak());
}

#[test]
fn compression_other_than_the_destinations() {
    let mut p = header(MULTIFD_FLAG_ZSTD, 128, vec![0], 16);
    p.extend_from_slice(&[0; 16]);
    let (_, m) = channel_error(load("comp", p, Compression::None));
    assert!(m.contains("multifd-compression is none"), "{m}");
}

#[test]
fn postcopy_with_multifd_is_refused() {
    let advise = savevm_format::Command::PostcopyAdvise(Some((4096, 4096)));
    let e = load_main("postcopy", main_stream_with(&[advise]), vec![], Compression::None);
    match e {
        IncomingError::Unsupported(m) => assert!(m.contains("postcopy-ram with multifd"), "{m}"),
        e => panic!("not refused as unsupported: {e}"),
    }
}

#[test]
fn a_channel_ending_before_its_sync() {
    let e = load_full("ended", main_stream(), vec![], Compression::None, true);
    let msg = engine::error::report(&e);
    assert!(matches!(e, IncomingError::Multifd(MultifdError::Io { channel: ChannelName::Id(0), .. })), "{msg}");
    assert!(msg.contains("ended before its SYNC"), "{msg}");
}
