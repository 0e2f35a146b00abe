//! The io timeout of socket channels: a silent peer fails a read (and a peer that
//! stops reading fails a write) with `NoProgress` after about the timeout; no
//! timeout waits; `peek` shows the first bytes without consuming them.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use transports::{connect_with, is_no_progress, CancelToken, ChannelOptions, Listener, MigrationUri};

fn tcp_pair(opts: ChannelOptions) -> (transports::Channel, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = MigrationUri::Tcp { host: "127.0.0.1".into(), port: l.local_addr().unwrap().port() };
    let ch = connect_with(&uri, &CancelToken::new().unwrap(), &opts).unwrap();
    let (peer, _) = l.accept().unwrap();
    (ch, peer)
}

#[test]
fn silent_peer_fails_a_read_after_the_io_timeout() {
    let t = Duration::from_millis(300);
    let (ch, _peer) = tcp_pair(ChannelOptions::with_io_timeout(Some(t)));
    assert_eq!(ch.io_timeout(), Some(t));
    let t0 = Instant::now();
    let e = ch.read(&mut [0u8; 16]).expect_err("no data");
    let took = t0.elapsed();
    assert!(is_no_progress(&e), "{e}");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    assert!(took >= t && took < Duration::from_secs(10), "{took:?}");
    assert!(e.to_string().contains("no read progress for 0.3 s (io-timeout)"), "{e}");
}

#[test]
fn a_peer_that_stops_reading_fails_a_write() {
    let (ch, _peer) = tcp_pair(ChannelOptions::with_io_timeout(Some(Duration::from_millis(300))));
    let buf = vec![0u8; 1 << 20];
    let t0 = Instant::now();
    let e = loop {
        match ch.write_vectored(&[std::io::IoSlice::new(&buf)]) {
            Ok(_) => assert!(t0.elapsed() < Duration::from_secs(30), "the buffers never filled"),
            Err(e) => break e,
        }
    };
    // The progress timeout, or TCP_USER_TIMEOUT on the zero-window probes first.
    assert!(is_no_progress(&e) || e.raw_os_error() == Some(110), "{e}");
    if is_no_progress(&e) {
        // Bytes the peer has not acknowledged (it did not read, so they sit queued).
        assert!(ch.queued_bytes() > 0);
    }
}

#[test]
fn zero_means_no_timeout_and_peek_does_not_consume() {
    assert_eq!(ChannelOptions::with_io_timeout(Some(Duration::ZERO)).io_timeout, None);
    let (ch, mut peer) = tcp_pair(ChannelOptions::with_io_timeout(None));
    assert_eq!(ch.io_timeout(), None);
    let writer = std::thread::spawn(move || {
        // After longer than any timeout above: a channel without one still waits.
        std::thread::sleep(Duration::from_millis(500));
        peer.write_all(b"QEVM\0\0\0\x03").unwrap();
        peer
    });
    let mut head = [0u8; 4];
    let n = ch.peek(&mut head, Instant::now() + Duration::from_secs(30)).unwrap();
    assert!(n > 0 && head[..n] == b"QEVM"[..n]);
    let mut all = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        got += ch.read(&mut all[got..]).unwrap();
    }
    assert_eq!(&all, b"QEVM\0\0\0\x03");
    drop(writer.join().unwrap());
}

#[test]
fn listener_options_reach_accepted_channels() {
    let cancel = CancelToken::new().unwrap();
    let uri = MigrationUri::Tcp { host: "127.0.0.1".into(), port: 0 };
    let l = Listener::bind(&uri, &cancel).unwrap();
    assert_eq!(l.options().io_timeout, Some(transports::DEFAULT_IO_TIMEOUT));
    let l = l.with_options(ChannelOptions::with_io_timeout(Some(Duration::from_secs(7))));
    let MigrationUri::Tcp { port, .. } = l.local_uri().clone() else { unreachable!() };
    let _c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let ch = l.accept().unwrap();
    assert_eq!(ch.io_timeout(), Some(Duration::from_secs(7)));
}
