//! `MigrationReader::copy_to_file`: stream bytes moved into a file at an offset,
//! spliced on a plain socket (bytes buffered with a header first, the rest in
//! pieces as they arrive), exact into tmpfs and into the temporary directory's
//! file system; an early end, the io timeout and a cancel end it as reads end.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;
use transports::{connect_with, is_cancelled, is_no_progress, CancelToken, ChannelOptions, MigrationReader};
use transports::{MigrationUri, RateLimit};

fn tcp_pair(opts: ChannelOptions, cancel: &CancelToken) -> (transports::Channel, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let uri = MigrationUri::Tcp { host: "127.0.0.1".into(), port: l.local_addr().expect("addr").port() };
    let ch = connect_with(&uri, cancel, &opts).expect("connect");
    let (peer, _) = l.accept().expect("accept");
    (ch, peer)
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 253) as u8 ^ (i >> 12) as u8).collect()
}

fn files(name: &str) -> Vec<PathBuf> {
    let f = format!("qmig-splice-{}-{name}", std::process::id());
    let mut v = vec![std::env::temp_dir().join(&f)];
    if std::path::Path::new("/dev/shm").is_dir() {
        v.push(PathBuf::from("/dev/shm").join(&f));
    }
    v
}

#[test]
fn bytes_land_exactly_after_a_header_in_pieces() {
    for path in files("exact") {
        let cancel = CancelToken::new().expect("token");
        let (ch, mut peer) = tcp_pair(ChannelOptions::with_io_timeout(None), &cancel);
        let data = payload(700 << 10);
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            peer.write_all(b"HDR!").expect("header");
            // Odd pieces: the splices see partial payloads.
            for c in sent.chunks(70_001) {
                peer.write_all(c).expect("piece");
            }
            peer
        });
        assert!(!ch.can_splice(), "not before the first read (the TLS check)");
        let mut r = MigrationReader::with_capacity(ch, RateLimit::new(0), 16 << 10);
        let mut hdr = [0u8; 4];
        r.read_exact(&mut hdr).expect("header");
        assert_eq!(&hdr, b"HDR!");
        assert!(r.channel().can_splice(), "a plain socket can splice once read from");
        let file =
            std::fs::File::options().read(true).write(true).create(true).truncate(true).open(&path).expect("file");
        // Some bytes of the payload came with the header (16 KiB buffer): written
        // from the buffer, the rest spliced.
        r.copy_to_file(&file, 8192, 300 << 10).expect("first part");
        r.copy_to_file(&file, 8192 + (300 << 10), 400 << 10).expect("second part");
        let _peer = writer.join().expect("writer");
        let got = std::fs::read(&path).expect("read back");
        let _ = std::fs::remove_file(&path);
        assert_eq!(got.len(), 8192 + data.len(), "{}", path.display());
        assert!(got[..8192].iter().all(|&b| b == 0), "{}: bytes before the offset", path.display());
        assert!(got[8192..] == data[..], "{}: the payload differs", path.display());
        assert_eq!(r.rate_limit().total_bytes(), 4 + data.len() as u64, "every byte counted");
    }
}

#[test]
fn an_early_end_the_io_timeout_and_a_cancel_stop_it() {
    let path = &files("stops")[0];
    let file = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(path).expect("file");

    // The peer sends a header and part of the payload, then closes.
    let cancel = CancelToken::new().expect("token");
    let (ch, mut peer) = tcp_pair(ChannelOptions::with_io_timeout(None), &cancel);
    peer.write_all(b"HDR!").expect("header");
    peer.write_all(&payload(10_000)).expect("part");
    drop(peer);
    let mut r = MigrationReader::with_capacity(ch, RateLimit::new(0), 4096);
    r.set_fill_limit(4);
    r.read_exact(&mut [0u8; 4]).expect("header");
    assert!(r.channel().can_splice());
    let e = r.copy_to_file(&file, 0, 20_000).expect_err("cut short");
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");

    // A silent peer: the io timeout.
    let cancel = CancelToken::new().expect("token");
    let (ch, mut peer) = tcp_pair(ChannelOptions::with_io_timeout(Some(Duration::from_millis(300))), &cancel);
    peer.write_all(b"HDR!").expect("header");
    let mut r = MigrationReader::with_capacity(ch, RateLimit::new(0), 4096);
    r.set_fill_limit(4);
    r.read_exact(&mut [0u8; 4]).expect("header");
    let e = r.copy_to_file(&file, 0, 4096).expect_err("silent peer");
    assert!(is_no_progress(&e), "{e}");

    // A silent peer without timeout: a cancel from another thread.
    let cancel = CancelToken::new().expect("token");
    let (ch, mut peer) = tcp_pair(ChannelOptions::with_io_timeout(None), &cancel);
    peer.write_all(b"HDR!").expect("header");
    let mut r = MigrationReader::with_capacity(ch, RateLimit::new(0), 4096);
    r.set_fill_limit(4);
    r.read_exact(&mut [0u8; 4]).expect("header");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let c2 = cancel.clone();
    let canceller = std::thread::spawn(move || {
        // Cancel once the copy is (very likely) waiting; either way it must end.
        let _ = rx.recv_timeout(Duration::from_millis(200));
        c2.cancel();
    });
    let e = r.copy_to_file(&file, 0, 4096).expect_err("cancelled");
    drop(tx);
    canceller.join().expect("canceller");
    assert!(is_cancelled(&e), "{e}");
    drop(peer);
    let _ = std::fs::remove_file(path);
}

#[test]
fn pages_spliced_into_a_socket_arrive_in_order_after_buffered_bytes() {
    let cancel = CancelToken::new().expect("token");
    let (ch, mut peer) = tcp_pair(ChannelOptions::with_io_timeout(None), &cancel);
    assert!(ch.can_splice_write());
    // 200 pages in 3 packets; each packet's buffered header goes first.
    let mut mem = payload(200 << 12);
    let want = {
        let mut w = Vec::new();
        for (i, chunk) in mem.chunks(128 << 12).enumerate() {
            w.extend_from_slice(format!("packet {i}\n").as_bytes());
            w.extend_from_slice(chunk);
        }
        w
    };
    let len = want.len();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; len];
        peer.read_exact(&mut got).expect("read all");
        got
    });
    let mut w = transports::MigrationWriter::new(ch, RateLimit::new(0));
    let mut spliced = 0;
    for (i, chunk) in mem.chunks_mut(128 << 12).enumerate() {
        w.write_all(format!("packet {i}\n").as_bytes()).expect("header");
        let pages: Vec<vm_memory::VolatileSlice<'_>> =
            chunk.chunks_mut(4096).map(vm_memory::VolatileSlice::from).collect();
        if w.send_spliced(&pages).expect("send") {
            spliced += 1;
        } else {
            pages.into_iter().for_each(|p| w.write_volatile(p).expect("queue"));
        }
    }
    w.flush_now().expect("flush");
    assert_eq!(spliced, 2, "a plain socket without a rate limit takes spliced pages");
    assert_eq!(w.rate_limit().total_bytes(), len as u64, "every byte counted");
    let got = reader.join().expect("reader");
    assert!(got == want, "the bytes differ");

    // With a rate limit the writer applies, the caller's usual path is used.
    let (ch, _peer) = tcp_pair(ChannelOptions::with_io_timeout(None), &cancel);
    let mut w = transports::MigrationWriter::new(ch, RateLimit::new(1 << 30));
    let page = &mut [0u8; 4096][..];
    assert!(!w.send_spliced(&[vm_memory::VolatileSlice::from(page)]).expect("refused"), "spliced past a rate limit");
}
