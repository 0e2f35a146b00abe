//! The source's return-path reader: messages from a destination over a real socket
//! become events; SHUT(0) ends it well, SHUT(1), a closed path, hostile bytes and
//! bad page requests end it with typed errors (offsets on the return path); stop
//! wakes a blocked read within a second.

use engine::return_path::{PageRequest, ReturnPathError, RpEvent, SourceReturnPath};
use savevm_format::{RamBlock, RpMessage};
use std::thread;
use std::time::{Duration, Instant};
use transports::{connect, CancelToken, Channel, Listener, MigrationUri};

fn blocks() -> Vec<RamBlock> {
    vec![RamBlock::new(0, "pc.ram", 16 << 20), RamBlock::new(1, "mem", 1 << 20)]
}

/// (source channel, destination channel, source token)
fn pair() -> (Channel, Channel, CancelToken) {
    let (ct, lt) = (CancelToken::new().unwrap(), CancelToken::new().unwrap());
    let uri: MigrationUri = "tcp:127.0.0.1:0".parse().unwrap();
    let l = Listener::bind(&uri, &lt).unwrap();
    let bound = l.local_uri().clone();
    let acc = thread::spawn(move || l.accept().unwrap());
    let src = connect(&bound, &ct).unwrap();
    (src, acc.join().unwrap(), ct)
}

fn reader_on(src: &Channel, token: &CancelToken) -> SourceReturnPath {
    SourceReturnPath::spawn(src.return_path().unwrap(), blocks(), 4096, token.clone()).unwrap()
}

fn send(dst: &Channel, msgs: &[RpMessage]) {
    let mut rp = dst.return_path().unwrap();
    for m in msgs {
        m.write_to(&mut rp).unwrap();
    }
}

#[test]
fn pongs_page_requests_then_shut_0() {
    let (src, dst, token) = pair();
    let r = reader_on(&src, &token);
    // The messages of a real 7.2 postcopy return path (stream reference 5.3).
    send(
        &dst,
        &[
            RpMessage::Pong(1),
            RpMessage::Pong(2),
            RpMessage::ReqPagesId { start: 0xf0_0000, len: 0x1000, block: "pc.ram".into() },
            RpMessage::ReqPages { start: 0xe0_0000, len: 0x1000 },
            RpMessage::ReqPagesId { start: 0x1000, len: 0x2000, block: "mem".into() },
            RpMessage::Shut(0),
        ],
    );
    assert_eq!(r.wait_end(Duration::from_secs(5)), Some(Ok(())));
    let evs: Vec<RpEvent> = r.events().iter().collect();
    let req = |block: &str, index, start, len, offset| {
        RpEvent::PageRequest(PageRequest { block: block.into(), index, start, len, offset })
    };
    assert_eq!(
        evs,
        vec![
            RpEvent::Pong(1),
            RpEvent::Pong(2),
            req("pc.ram", 0, 0xf0_0000, 0x1000, 16),
            req("pc.ram", 0, 0xe0_0000, 0x1000, 16 + 23),
            req("mem", 1, 0x1000, 0x2000, 16 + 23 + 16),
        ]
    );
    assert_eq!(r.last_pong(), Some(2));
    assert_eq!(r.stop(), Ok(()));
}

#[test]
fn shut_error_fails() {
    let (src, dst, token) = pair();
    let r = reader_on(&src, &token);
    send(&dst, &[RpMessage::Pong(1), RpMessage::Shut(1)]);
    let e = r.wait_end(Duration::from_secs(5)).unwrap().unwrap_err();
    assert_eq!(e, ReturnPathError::Shut(1));
    assert!(e.to_string().contains("destination failed"), "{e}");
}

#[test]
fn destination_gone_before_shut_fails() {
    let (src, dst, token) = pair();
    let r = reader_on(&src, &token);
    send(&dst, &[RpMessage::Pong(1)]);
    drop(dst);
    assert_eq!(r.wait_end(Duration::from_secs(5)), Some(Err(ReturnPathError::Closed { offset: 8 })));
}

fn end_of(bytes: &[u8]) -> ReturnPathError {
    let token = CancelToken::new().unwrap();
    let r = SourceReturnPath::spawn(std::io::Cursor::new(bytes.to_vec()), blocks(), 4096, token).unwrap();
    r.wait_end(Duration::from_secs(5)).expect("ended").unwrap_err()
}

#[test]
fn bad_page_requests_are_protocol_errors_with_offsets() {
    let mut b = RpMessage::Pong(1).encode();
    b.extend(RpMessage::ReqPagesId { start: 16 << 20, len: 0x1000, block: "pc.ram".into() }.encode());
    match end_of(&b) {
        ReturnPathError::PageRequest { offset: 8, why, .. } => assert!(why.contains("out of range"), "{why}"),
        e => panic!("{e:?}"),
    }
    let b = RpMessage::ReqPagesId { start: 0x800, len: 0x1000, block: "mem".into() }.encode();
    assert!(matches!(end_of(&b), ReturnPathError::PageRequest { offset: 0, why: "Misaligned page request", .. }));
    let b = RpMessage::ReqPages { start: 0, len: 0x1000 }.encode();
    match end_of(&b) {
        ReturnPathError::PageRequest { why, .. } => assert!(why.contains("before any REQ_PAGES_ID"), "{why}"),
        e => panic!("{e:?}"),
    }
    let b = RpMessage::ReqPagesId { start: 0, len: 0x1000, block: "nope".into() }.encode();
    assert!(matches!(end_of(&b), ReturnPathError::PageRequest { why: "no such RAM block", .. }));
    // A length that wraps past the end of the address space.
    let b = RpMessage::ReqPagesId { start: u64::MAX - 0xfff, len: 0x2000, block: "mem".into() }.encode();
    assert!(matches!(end_of(&b), ReturnPathError::PageRequest { .. }));
}

#[test]
fn hostile_bytes_end_with_decode_errors() {
    // Unknown type after a good PONG: offset 8.
    let mut b = RpMessage::Pong(1).encode();
    b.extend([0, 42, 0, 0]);
    match end_of(&b) {
        ReturnPathError::Decode { offset: 8, why } => assert!(why.contains("invalid return-path message"), "{why}"),
        e => panic!("{e:?}"),
    }
    // Oversized length: refused, nothing allocated.
    assert!(matches!(end_of(&[0, 2, 0xff, 0xff]), ReturnPathError::Decode { offset: 0, .. }));
    // Cut inside a message.
    assert!(matches!(end_of(&[0, 2, 0, 4, 0]), ReturnPathError::Decode { offset: 5, .. }));
    // A received bitmap larger than its block allows.
    let mut b = RpMessage::RecvBitmap("mem".into()).encode();
    b.extend((1u64 << 40).to_be_bytes());
    assert!(matches!(end_of(&b), ReturnPathError::Decode { .. }));
}

#[test]
fn recv_bitmap_and_recovery_messages_are_events() {
    let token = CancelToken::new().unwrap();
    let mut b = RpMessage::RecvBitmap("mem".into()).encode();
    // 1 MiB / 4 KiB = 256 pages = 32 bytes.
    b.extend(32u64.to_be_bytes());
    b.extend([0xaa; 32]);
    b.extend(savevm_format::command::RECV_BITMAP_ENDING.to_be_bytes());
    b.extend(RpMessage::ResumeAck(1).encode());
    b.extend(RpMessage::Shut(0).encode());
    let r = SourceReturnPath::spawn(std::io::Cursor::new(b), blocks(), 4096, token).unwrap();
    assert_eq!(r.wait_end(Duration::from_secs(5)), Some(Ok(())));
    let evs: Vec<RpEvent> = r.events().iter().collect();
    assert_eq!(evs, vec![RpEvent::RecvBitmap { block: "mem".into(), bitmap: vec![0xaa; 32] }, RpEvent::ResumeAck(1)]);
}

#[test]
fn stop_wakes_a_blocked_reader() {
    let (src, _dst, token) = pair();
    let r = reader_on(&src, &token);
    assert_eq!(r.wait_end(Duration::from_millis(100)), None);
    let t0 = Instant::now();
    assert_eq!(r.stop(), Err(ReturnPathError::Stopped));
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[test]
fn dropping_the_reader_joins_its_thread() {
    let (src, _dst, token) = pair();
    let r = reader_on(&src, &token);
    let t0 = Instant::now();
    drop(r);
    assert!(t0.elapsed() < Duration::from_secs(1));
}
