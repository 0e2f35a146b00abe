//! Errors say who failed and print each cause once: for representative errors of
//! every crate the engine sees (format, transports, dirty tracking, the VMM's
//! refusals, the engine's own), no error's message repeats its source's, a report
//! (`a: b: c`) holds each cause once, and `origin()` names the local side, the
//! peer, the VMM or a cancel.

use engine::dirty::DirtyError;
use engine::error::{report, Origin};
use engine::incoming::{Incoming, IncomingError};
use engine::source::EngineError;
use engine::vm::{VcpuControl, VmParts, VmmError, VmmPart};
use savevm_format::{EncodeError, ErrorKind};
use std::error::Error;
use std::io;
use transports::{connect, CancelToken, Listener, MigrationUri, TransportError};

/// `e`'s message, then each source's, outermost first.
fn chain(e: &(dyn Error + 'static)) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut c = e.source();
    while let Some(s) = c {
        out.push(s.to_string());
        c = s.source();
    }
    out
}

/// No message in the chain contains the next one (which a report would print
/// again), and the report holds the innermost cause exactly once.
fn assert_once(what: &str, e: &(dyn Error + 'static)) {
    let c = chain(e);
    for pair in c.windows(2) {
        assert!(
            !pair[1].is_empty() && !pair[0].contains(&pair[1]),
            "{what}: {:?} repeats its source {:?}",
            pair[0],
            pair[1]
        );
    }
    let r = report(e);
    let inner = c.last().map(String::as_str).unwrap_or_default();
    assert_eq!(r.matches(inner).count(), 1, "{what}: {r:?} does not hold {inner:?} once");
    assert_eq!(r, c.join(": "), "{what}: the report is the chain");
}

fn io_err() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "peer hung up")
}

fn missing_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("qmig-errors-{}-no-such-dir", std::process::id())).join("x")
}

fn connect_err() -> TransportError {
    let token = CancelToken::new().expect("token");
    match connect(&MigrationUri::Unix(missing_dir()), &token) {
        Err(e) => e,
        Ok(_) => panic!("connected to a socket in a missing directory"),
    }
}

#[test]
fn format_and_transport_errors_print_their_cause_once() {
    let decode = savevm_format::Error::at(17, ErrorKind::Io(io_err()));
    assert_once("decode I/O", &decode);
    assert_eq!(report(&decode), "at byte 17: I/O error: peer hung up");
    assert_once("encode I/O", &EncodeError::Io(io_err()));

    let e = connect_err();
    assert!(matches!(e, TransportError::Connect { .. }), "{e:?}");
    assert_once("connect", &e);
    let token = CancelToken::new().expect("token");
    let Err(e) = Listener::bind(&MigrationUri::Unix(missing_dir()), &token) else { panic!("bound in a missing dir") };
    assert_once("listen", &e);
    let file = MigrationUri::File { path: missing_dir(), offset: 0 };
    let Err(e) = connect(&file, &token) else { panic!("opened a file in a missing dir") };
    assert_once("file", &e);
    assert_eq!(EngineError::Transport(e).origin(), Origin::Local, "a local file is ours");

    let dirty = DirtyError::Os { op: "UFFDIO_WRITEPROTECT", source: io_err() };
    assert_once("dirty", &dirty);
    assert_eq!(report(&dirty), "UFFDIO_WRITEPROTECT: peer hung up");
}

#[test]
fn engine_errors_print_their_cause_once_and_say_who_failed() {
    let cases: Vec<(&str, EngineError, Origin)> = vec![
        ("channel", EngineError::Io(io_err()), Origin::Peer),
        ("encode", EngineError::from(EncodeError::Io(io_err())), Origin::Peer),
        ("connect", EngineError::Transport(connect_err()), Origin::Peer),
        (
            "dirty sync",
            EngineError::DirtySync { region: 1, source: DirtyError::Os { op: "KVM_GET_DIRTY_LOG", source: io_err() } },
            Origin::Vmm,
        ),
        (
            "dirty start",
            EngineError::DirtyStart { region: 0, source: DirtyError::Unsupported("no uffd".into()) },
            Origin::Vmm,
        ),
        (
            "device",
            EngineError::Vmm(VmmError::msg("DMA in flight").on(VmmPart::Device { idstr: "rtc".into(), instance: 1 })),
            Origin::Vmm,
        ),
        (
            "ioctl",
            EngineError::Vmm(
                VmmError::new(io_err()).at("KVM_GET_REGS").on(VmmPart::Device { idstr: "cpu".into(), instance: 0 }),
            ),
            Origin::Vmm,
        ),
        ("vcpu", EngineError::Vmm(VmmError::msg("stuck").on(VmmPart::Vcpu("stop"))), Origin::Vmm),
        ("blocked", EngineError::Blocked("vfio".into()), Origin::Vmm),
        ("setup", EngineError::Setup("one dirty bitmap per RAM region is needed".into()), Origin::Local),
        ("cancel", EngineError::Cancelled, Origin::Cancel),
        (
            "cancelled channel",
            EngineError::Io(io::Error::new(io::ErrorKind::ConnectionAborted, transports::Cancelled)),
            Origin::Cancel,
        ),
    ];
    for (what, e, origin) in &cases {
        assert_once(what, e);
        assert_eq!(e.origin(), *origin, "{what}: {e}");
    }
    let text: Vec<String> = cases.iter().map(|(_, e, _)| report(e)).collect();
    assert_eq!(text[0], "migration channel: peer hung up");
    assert_eq!(text[3], "dirty tracking of region 1: sync: KVM_GET_DIRTY_LOG: peer hung up");
    assert_eq!(text[5], "device 'rtc' instance 1: DMA in flight");
    assert_eq!(text[6], "device 'cpu' (KVM_GET_REGS): peer hung up");
    assert_eq!(text[7], "vCPU control (stop): stuck");
}

#[test]
fn an_untagged_vmm_error_is_its_cause() {
    let e = VmmError::new(io_err());
    assert_eq!(e.to_string(), "peer hung up");
    assert!(e.source().is_none());
    assert!(e.part().is_none());
    let e: VmmError = "nope".into();
    assert_eq!(report(&e), "nope");
}

struct NoVcpus;
impl VcpuControl for NoVcpus {}

/// Destination RAM of 64 KiB.
struct Ram(Vec<u8>);

impl savevm_format::PageSink for Ram {
    fn page_mut(&mut self, _: &savevm_format::RamBlock, offset: u64) -> Option<savevm_format::PageSlot<'_>> {
        let o = usize::try_from(offset).ok()?;
        self.0.get_mut(o..o.checked_add(4096)?).map(savevm_format::PageSlot::from)
    }
}

/// A stopped guest's stream with 64 KiB of RAM.
fn stream() -> Vec<u8> {
    let guest = vec![7u8; 64 << 10];
    let stopped = savevm_format::StoppedGuest::default();
    savevm_format::write_stopped_guest(Vec::new(), &[("mem", &guest)], &stopped).expect("stream").0
}

#[test]
fn incoming_errors_say_who_failed() {
    // A second run of the same migration: the state machine refuses, which is ours
    // (it was reported as a device error before).
    let inc = Incoming::new(false);
    let mut sink = Ram(vec![0; 64 << 10]);
    let stream = stream();
    inc.run(&stream[..], &mut sink, &mut VmParts::default(), &mut NoVcpus).expect("first run");
    let e = inc.run(&stream[..], &mut sink, &mut VmParts::default(), &mut NoVcpus).expect_err("second run");
    assert!(matches!(e, IncomingError::State(_)), "{e:?}");
    assert_eq!(e.origin(), Origin::Local);
    assert_once("state", &e);

    // A truncated stream is the peer's.
    let e = Incoming::new(false)
        .run(&stream[..stream.len() / 2], &mut sink, &mut VmParts::default(), &mut NoVcpus)
        .expect_err("truncated");
    assert_eq!(e.origin(), Origin::Peer, "{e}");
    assert_once("truncated", &e);

    let cases = [
        (IncomingError::Stream(savevm_format::Error::at(3, ErrorKind::Io(io_err()))), Origin::Peer),
        (
            IncomingError::Stream(savevm_format::Error::at(
                3,
                ErrorKind::Io(io::Error::new(io::ErrorKind::ConnectionAborted, transports::Cancelled)),
            )),
            Origin::Cancel,
        ),
        (IncomingError::Stream(savevm_format::Error::at(40, ErrorKind::Sink("no such block".into()))), Origin::Vmm),
        (IncomingError::UnknownDevice("rtc".into(), 0), Origin::Peer),
        (IncomingError::Vmm(VmmError::msg("refused").on(VmmPart::Vcpu("resume"))), Origin::Vmm),
        (IncomingError::PageNotPlaced { block: "mem".into(), offset: 4096 }, Origin::Vmm),
    ];
    for (e, origin) in &cases {
        assert_once("incoming", e);
        assert_eq!(e.origin(), *origin, "{e}");
    }
}
