//! The destination's return path, in process: OPEN_RETURN_PATH opens it, every
//! PING gets PONG(same value), SHUT(0) ends a successful load and SHUT(1) a failed
//! one; what the destination does not implement (postcopy, a capability in the
//! configuration, a multifd channel) fails the load and, once the path is open,
//! sends SHUT(1) so the source fails too.

use engine::incoming::{Incoming, IncomingError, ReturnPathOpener};
use engine::state::MigrationStatus;
use engine::vm::VcpuControl;
use engine::vm::VmParts;
use savevm_format::{write_stopped_guest, Command, PageSink, RamBlock, RpMessage, RpReader, StoppedGuest};
use std::io::Write;
use std::sync::{Arc, Mutex};

struct NoVcpus;
impl VcpuControl for NoVcpus {}

struct Mem(Vec<u8>);
impl PageSink for Mem {
    fn page_mut(&mut self, _: &RamBlock, offset: u64) -> Option<savevm_format::PageSlot<'_>> {
        let o = offset as usize;
        self.0.get_mut(o..o + 4096).map(savevm_format::PageSlot::from)
    }
}

/// A return path that records what the destination wrote.
#[derive(Clone, Default)]
struct Wire(Arc<Mutex<Vec<u8>>>);
impl Write for Wire {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Wire {
    fn opener(&self) -> ReturnPathOpener<'static> {
        let w = self.clone();
        Box::new(move || Ok(Box::new(w.clone()) as Box<dyn Write + Send>))
    }
    fn messages(&self) -> Vec<RpMessage> {
        let bytes = self.0.lock().unwrap().clone();
        let mut r = RpReader::new(&bytes[..]);
        let mut v = Vec::new();
        while let Some(m) = r.next().unwrap() {
            v.push(m);
        }
        v
    }
}

const GUEST_LEN: usize = 64 << 10;

fn guest() -> Vec<u8> {
    (0..GUEST_LEN).map(|i| (i / 4096 * 3 + i % 7) as u8).collect()
}

/// A stopped-guest stream with `cmds` right after the configuration record, as
/// QEMU 7.2 puts OPEN_RETURN_PATH and PING 1, and `tail` cut off the end.
fn stream(cmds: &[Command], cut: usize) -> Vec<u8> {
    let (v, _) = write_stopped_guest(Vec::new(), &[("mem", &guest())], &StoppedGuest::default()).unwrap();
    let at = 8 + 1 + 4 + "none".len();
    let mut out = v[..at].to_vec();
    for c in cmds {
        out.extend(c.encode());
    }
    out.extend_from_slice(&v[at..v.len() - cut]);
    out
}

fn run(s: &[u8], wire: &Wire) -> (Incoming, Result<engine::incoming::IncomingReport, IncomingError>, Mem) {
    let mut mem = Mem(vec![0; GUEST_LEN]);
    let inc = Incoming::new(false);
    let r = inc.run_with_return_path(s, &mut mem, &mut VmParts::default(), &mut NoVcpus, wire.opener());
    (inc, r, mem)
}

#[test]
fn return_path_precopy_pong_then_shut_0() {
    let wire = Wire::default();
    let s = stream(&[Command::OpenReturnPath, Command::Ping(1)], 0);
    let (inc, r, mem) = run(&s, &wire);
    let rep = r.unwrap();
    assert_eq!(mem.0, guest());
    // Exactly what QEMU 7.2's destination sends for a precopy with return-path.
    assert_eq!(wire.messages(), vec![RpMessage::Pong(1), RpMessage::Shut(0)]);
    assert!(rep.return_path.requested && rep.return_path.opened);
    assert_eq!((rep.return_path.pongs, rep.return_path.shut), (1, Some(0)));
    assert_eq!(inc.state.status(), MigrationStatus::Completed);
}

#[test]
fn every_ping_gets_its_value_back() {
    let wire = Wire::default();
    let pings = [1u32, 2, 0xdead_beef, 4];
    let mut cmds = vec![Command::OpenReturnPath];
    cmds.extend(pings.iter().map(|&v| Command::Ping(v)));
    let (_, r, _) = run(&stream(&cmds, 0), &wire);
    r.unwrap();
    let mut want: Vec<_> = pings.iter().map(|&v| RpMessage::Pong(v)).collect();
    want.push(RpMessage::Shut(0));
    assert_eq!(wire.messages(), want);
}

#[test]
fn no_return_path_asked_none_written() {
    let wire = Wire::default();
    let (_, r, _) = run(&stream(&[], 0), &wire);
    let rep = r.unwrap();
    assert!(!rep.return_path.requested);
    assert!(wire.messages().is_empty());
}

#[test]
fn a_load_failure_sends_shut_1() {
    let wire = Wire::default();
    // Cut before EOF: the stream ends early.
    let (inc, r, _) = run(&stream(&[Command::OpenReturnPath, Command::Ping(1)], 400), &wire);
    assert!(r.is_err());
    assert_eq!(wire.messages(), vec![RpMessage::Pong(1), RpMessage::Shut(1)]);
    assert_eq!(inc.state.status(), MigrationStatus::Failed);
}

#[test]
fn postcopy_advise_is_refused_with_shut_1() {
    let wire = Wire::default();
    let cmds = [Command::OpenReturnPath, Command::Ping(1), Command::PostcopyAdvise(Some((4096, 4096)))];
    let (_, r, _) = run(&stream(&cmds, 0), &wire);
    match r {
        Err(IncomingError::Unsupported(why)) => {
            assert!(why.contains("RAM postcopy is disabled but have 16 byte advise"), "{why}");
            assert!(why.contains("postcopy-ram"), "{why}");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert_eq!(wire.messages(), vec![RpMessage::Pong(1), RpMessage::Shut(1)]);
}

#[test]
fn advise_without_postcopy_ram_is_accepted() {
    // Length 0: dirty-bitmaps postcopy only, which QEMU 7.2 accepts without postcopy-ram.
    let wire = Wire::default();
    let (_, r, _) = run(&stream(&[Command::OpenReturnPath, Command::PostcopyAdvise(None)], 0), &wire);
    r.unwrap();
    assert_eq!(wire.messages(), vec![RpMessage::Shut(0)]);
}

#[test]
fn other_unsupported_commands_are_refused() {
    for c in [Command::PostcopyListen, Command::PostcopyRun, Command::EnableColo, Command::SwitchoverStart] {
        let wire = Wire::default();
        let (_, r, _) = run(&stream(&[Command::OpenReturnPath, c.clone()], 0), &wire);
        match r {
            Err(IncomingError::Unsupported(why)) => assert!(why.starts_with(c.name()), "{why}"),
            other => panic!("{}: expected Unsupported, got {other:?}", c.name()),
        }
        assert_eq!(wire.messages(), vec![RpMessage::Shut(1)], "{}", c.name());
    }
}

#[test]
fn ping_without_return_path_fails_like_qemu() {
    let wire = Wire::default();
    let (_, r, _) = run(&stream(&[Command::Ping(7)], 0), &wire);
    let e = r.unwrap_err();
    assert!(matches!(e, IncomingError::PingWithoutReturnPath(7)), "{e:?}");
    assert_eq!(e.to_string(), "CMD_PING (0x7) received with no return path");
    assert!(wire.messages().is_empty());
}

#[test]
fn a_capability_in_the_configuration_is_refused() {
    for (cmds, shut) in [(vec![Command::OpenReturnPath, Command::Ping(1)], true), (vec![], false)] {
        let mut v = stream(&cmds, 0);
        let at = 8 + 1 + 4 + "none".len();
        let mut sub = vec![0x05, 26];
        sub.extend_from_slice(b"configuration/capabilities");
        sub.extend(1u32.to_be_bytes());
        sub.extend(1u32.to_be_bytes());
        sub.push(15);
        sub.extend_from_slice(b"x-ignore-shared");
        v.splice(at..at, sub);
        let wire = Wire::default();
        let (_, r, _) = run(&v, &wire);
        match r {
            Err(IncomingError::Unsupported(why)) => assert!(why.contains("x-ignore-shared"), "{why}"),
            other => panic!("expected Unsupported, got {other:?}"),
        }
        // The refusal comes with the configuration, before the return path opens: it
        // waits one record, so a source that opens one right after still gets SHUT(1).
        let want = if shut { vec![RpMessage::Shut(1)] } else { vec![] };
        assert_eq!(wire.messages(), want);
    }
}

#[test]
fn a_multifd_channel_is_named() {
    let mut pkt = savevm_format::multifd::MULTIFD_MAGIC.to_be_bytes().to_vec();
    pkt.extend([0u8; 21]);
    let wire = Wire::default();
    let (_, r, _) = run(&pkt, &wire);
    match r {
        Err(IncomingError::Unsupported(why)) => assert!(why.contains("multifd"), "{why}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn unavailable_return_path_drops_messages_and_loads() {
    // exec:/file: channels have no reverse direction; QEMU 7.2 accepts
    // OPEN_RETURN_PATH there and its writes go nowhere. So do we.
    let mut mem = Mem(vec![0; GUEST_LEN]);
    let inc = Incoming::new(false);
    let s = stream(&[Command::OpenReturnPath, Command::Ping(1)], 0);
    let open: ReturnPathOpener<'_> = Box::new(|| Err("exec: has no return path".into()));
    let rep = inc.run_with_return_path(&s[..], &mut mem, &mut VmParts::default(), &mut NoVcpus, open).unwrap();
    assert!(rep.return_path.requested && !rep.return_path.opened);
    assert_eq!(rep.return_path.unavailable.as_deref(), Some("exec: has no return path"));
    assert_eq!((rep.return_path.pongs, rep.return_path.shut), (0, None));
    assert_eq!(mem.0, guest());
}

/// A return path whose writes fail.
struct Broken;
impl Write for Broken {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn shut_0_that_cannot_be_sent_fails_the_migration() {
    let mut mem = Mem(vec![0; GUEST_LEN]);
    let inc = Incoming::new(false);
    let s = stream(&[Command::OpenReturnPath], 0);
    let open: ReturnPathOpener<'_> = Box::new(|| Ok(Box::new(Broken) as Box<dyn Write + Send>));
    let r = inc.run_with_return_path(&s[..], &mut mem, &mut VmParts::default(), &mut NoVcpus, open);
    assert!(matches!(r, Err(IncomingError::ReturnPath(_))), "{r:?}");
    assert_eq!(inc.state.status(), MigrationStatus::Failed);
}
