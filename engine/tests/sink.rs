//! A destination whose RAM sink takes no page, or too short a page, fails the
//! incoming migration with a typed error instead of dropping the page.

use engine::incoming::{Incoming, IncomingError};
use engine::vm::VcpuControl;
use engine::vm::VmParts;
use savevm_format::{write_stopped_guest, ErrorKind, PageSink, RamBlock, StoppedGuest};

struct NoVcpus;
impl VcpuControl for NoVcpus {}

/// RAM that hands out no place for pages past `limit` bytes, and `slot`-byte slots.
struct Ram {
    mem: Vec<u8>,
    limit: usize,
    slot: usize,
}

impl PageSink for Ram {
    fn page_mut(&mut self, _: &RamBlock, offset: u64) -> Option<savevm_format::PageSlot<'_>> {
        let o = offset as usize;
        if o >= self.limit {
            return None;
        }
        (self.mem.get_mut(o..o + self.slot)).map(savevm_format::PageSlot::from)
    }
}

fn stream() -> Vec<u8> {
    let mut guest = vec![0u8; 64 << 10];
    for (i, b) in guest.iter_mut().enumerate() {
        *b = (i / 4096) as u8 + 1;
    }
    let (v, _) = write_stopped_guest(Vec::new(), &[("mem", &guest)], &StoppedGuest::default()).unwrap();
    v
}

#[test]
fn a_page_the_sink_does_not_take_is_an_error() {
    let s = stream();
    let mut ram = Ram { mem: vec![0; 64 << 10], limit: 8192, slot: 4096 };
    let r = Incoming::new(false).run(&s[..], &mut ram, &mut VmParts::default(), &mut NoVcpus);
    match r {
        Err(IncomingError::PageNotPlaced { block, offset }) => assert_eq!((block.as_str(), offset), ("mem", 8192)),
        other => panic!("expected PageNotPlaced, got {other:?}"),
    }
}

#[test]
fn a_sink_page_shorter_than_the_streams_is_an_error() {
    let s = stream();
    let mut ram = Ram { mem: vec![0; 64 << 10], limit: usize::MAX, slot: 2048 };
    let r = Incoming::new(false).run(&s[..], &mut ram, &mut VmParts::default(), &mut NoVcpus);
    match r {
        Err(IncomingError::Stream(e)) => {
            assert!(matches!(e.kind, ErrorKind::Sink(_)), "{e}");
            assert!(e.to_string().contains("2048 bytes"), "{e}");
        }
        other => panic!("expected a sink error, got {other:?}"),
    }
}
