//! Commands (`QEMU_VM_COMMAND`, source to destination) and return-path messages
//! (destination to source), as in QEMU's `migration/savevm.c` and `migration.c`.

use crate::error::ErrorKind;

/// `MIG_CMD_*` numbers.
pub mod cmd {
    /// Open the return path.
    pub const OPEN_RETURN_PATH: u16 = 1;
    /// Ping, answered by PONG.
    pub const PING: u16 = 2;
    /// Postcopy advise (page sizes).
    pub const POSTCOPY_ADVISE: u16 = 3;
    /// Postcopy listen.
    pub const POSTCOPY_LISTEN: u16 = 4;
    /// Postcopy run.
    pub const POSTCOPY_RUN: u16 = 5;
    /// Postcopy RAM discard ranges.
    pub const POSTCOPY_RAM_DISCARD: u16 = 6;
    /// Packaged blob follows.
    pub const PACKAGED: u16 = 7;
    /// Enter COLO.
    pub const ENABLE_COLO: u16 = 8;
    /// Postcopy recovery resume.
    pub const POSTCOPY_RESUME: u16 = 9;
    /// Ask for the received bitmap of a block.
    pub const RECV_BITMAP: u16 = 10;
    /// Switchover start (QEMU 10.0 and later; 7.2 rejects it).
    pub const SWITCHOVER_START: u16 = 11;
}

/// Largest number of ranges QEMU puts in one POSTCOPY_RAM_DISCARD command.
pub const MAX_DISCARD_RANGES: usize = 12;

/// A command record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// MIG_CMD_OPEN_RETURN_PATH.
    OpenReturnPath,
    /// MIG_CMD_PING with its value.
    Ping(u32),
    /// MIG_CMD_POSTCOPY_ADVISE: `Some((ram_pagesize_summary, target_page_size))` with postcopy-ram, `None` (length 0) for dirty-bitmaps only.
    PostcopyAdvise(Option<(u64, u64)>),
    /// MIG_CMD_POSTCOPY_LISTEN.
    PostcopyListen,
    /// MIG_CMD_POSTCOPY_RUN.
    PostcopyRun,
    /// MIG_CMD_POSTCOPY_RAM_DISCARD: byte ranges `(start, length)` of one block.
    PostcopyRamDiscard {
        /// RAM block name.
        block: String,
        /// Ranges in bytes.
        ranges: Vec<(u64, u64)>,
    },
    /// MIG_CMD_PACKAGED: the next `len` bytes of the stream are a nested stream.
    Packaged(u32),
    /// MIG_CMD_ENABLE_COLO.
    EnableColo,
    /// MIG_CMD_POSTCOPY_RESUME.
    PostcopyResume,
    /// MIG_CMD_RECV_BITMAP for a block.
    RecvBitmap(String),
    /// MIG_CMD_SWITCHOVER_START (newest QEMU only; never send it to 7.2).
    SwitchoverStart,
}

fn fixed(name: &'static str, payload: &[u8], n: usize, expected: &'static str) -> Result<(), ErrorKind> {
    if payload.len() != n {
        return Err(ErrorKind::CommandLength { name, expected, got: payload.len() });
    }
    Ok(())
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

impl Command {
    /// QEMU's name of this command (`OPEN_RETURN_PATH`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Command::OpenReturnPath => "OPEN_RETURN_PATH",
            Command::Ping(_) => "PING",
            Command::PostcopyAdvise(_) => "POSTCOPY_ADVISE",
            Command::PostcopyListen => "POSTCOPY_LISTEN",
            Command::PostcopyRun => "POSTCOPY_RUN",
            Command::PostcopyRamDiscard { .. } => "POSTCOPY_RAM_DISCARD",
            Command::Packaged(_) => "PACKAGED",
            Command::EnableColo => "ENABLE_COLO",
            Command::PostcopyResume => "POSTCOPY_RESUME",
            Command::RecvBitmap(_) => "RECV_BITMAP",
            Command::SwitchoverStart => "SWITCHOVER_START",
        }
    }

    /// The command number.
    pub fn number(&self) -> u16 {
        match self {
            Command::OpenReturnPath => cmd::OPEN_RETURN_PATH,
            Command::Ping(_) => cmd::PING,
            Command::PostcopyAdvise(_) => cmd::POSTCOPY_ADVISE,
            Command::PostcopyListen => cmd::POSTCOPY_LISTEN,
            Command::PostcopyRun => cmd::POSTCOPY_RUN,
            Command::PostcopyRamDiscard { .. } => cmd::POSTCOPY_RAM_DISCARD,
            Command::Packaged(_) => cmd::PACKAGED,
            Command::EnableColo => cmd::ENABLE_COLO,
            Command::PostcopyResume => cmd::POSTCOPY_RESUME,
            Command::RecvBitmap(_) => cmd::RECV_BITMAP,
            Command::SwitchoverStart => cmd::SWITCHOVER_START,
        }
    }

    /// Decode a command from its number and payload (the `len` bytes after the be16 length).
    pub fn decode(number: u16, p: &[u8]) -> Result<Command, ErrorKind> {
        Ok(match number {
            cmd::OPEN_RETURN_PATH => {
                fixed("OPEN_RETURN_PATH", p, 0, "0")?;
                Command::OpenReturnPath
            }
            cmd::PING => {
                fixed("PING", p, 4, "4")?;
                Command::Ping(be32(p))
            }
            cmd::POSTCOPY_ADVISE => match p.len() {
                0 => Command::PostcopyAdvise(None),
                16 => Command::PostcopyAdvise(Some((be64(p), be64(&p[8..])))),
                n => return Err(ErrorKind::CommandLength { name: "POSTCOPY_ADVISE", expected: "0 or 16", got: n }),
            },
            cmd::POSTCOPY_LISTEN => {
                fixed("POSTCOPY_LISTEN", p, 0, "0")?;
                Command::PostcopyListen
            }
            cmd::POSTCOPY_RUN => {
                fixed("POSTCOPY_RUN", p, 0, "0")?;
                Command::PostcopyRun
            }
            cmd::POSTCOPY_RAM_DISCARD => Self::decode_discard(p)?,
            cmd::PACKAGED => {
                fixed("PACKAGED", p, 4, "4")?;
                Command::Packaged(be32(p))
            }
            cmd::ENABLE_COLO => {
                fixed("ENABLE_COLO", p, 0, "0")?;
                Command::EnableColo
            }
            cmd::POSTCOPY_RESUME => {
                fixed("POSTCOPY_RESUME", p, 0, "0")?;
                Command::PostcopyResume
            }
            cmd::RECV_BITMAP => {
                let bad = |why| ErrorKind::CommandPayload { name: "RECV_BITMAP", why };
                let n = *p.first().ok_or(bad("empty"))? as usize;
                if p.len() != 1 + n {
                    return Err(ErrorKind::CommandLength {
                        name: "RECV_BITMAP",
                        expected: "1 + name length",
                        got: p.len(),
                    });
                }
                Command::RecvBitmap(String::from_utf8_lossy(&p[1..]).into_owned())
            }
            cmd::SWITCHOVER_START => {
                fixed("SWITCHOVER_START", p, 0, "0")?;
                Command::SwitchoverStart
            }
            _ => return Err(ErrorKind::UnknownCommand { cmd: number, len: wire_len(p) }),
        })
    }

    fn decode_discard(p: &[u8]) -> Result<Command, ErrorKind> {
        let bad = |why| ErrorKind::CommandPayload { name: "POSTCOPY_RAM_DISCARD", why };
        if p.len() < 1 + 1 + 1 + 1 + 16 {
            return Err(ErrorKind::CommandLength {
                name: "POSTCOPY_RAM_DISCARD",
                expected: "at least 20",
                got: p.len(),
            });
        }
        if p[0] != 0 {
            return Err(bad("discard version is not 0"));
        }
        let n = p[1] as usize;
        if p.len() < 2 + n + 1 {
            return Err(bad("block name runs past the payload"));
        }
        let block = String::from_utf8_lossy(&p[2..2 + n]).into_owned();
        if p[2 + n] != 0 {
            return Err(bad("missing 0 byte after the block name"));
        }
        let rest = &p[3 + n..];
        if rest.is_empty() || !rest.len().is_multiple_of(16) {
            return Err(bad("range list is not a non-empty multiple of 16 bytes"));
        }
        let ranges = rest.chunks_exact(16).map(|c| (be64(c), be64(&c[8..]))).collect();
        Ok(Command::PostcopyRamDiscard { block, ranges })
    }

    /// The payload bytes (what follows the be16 length).
    pub fn payload(&self) -> Vec<u8> {
        match self {
            Command::Ping(v) | Command::Packaged(v) => v.to_be_bytes().to_vec(),
            Command::PostcopyAdvise(Some((a, b))) => [a.to_be_bytes(), b.to_be_bytes()].concat(),
            Command::PostcopyRamDiscard { block, ranges } => {
                let (name, n) = short_name(block);
                let mut v = vec![0u8, n];
                v.extend_from_slice(name);
                v.push(0);
                for (s, l) in ranges {
                    v.extend_from_slice(&s.to_be_bytes());
                    v.extend_from_slice(&l.to_be_bytes());
                }
                v
            }
            Command::RecvBitmap(block) => {
                let (name, n) = short_name(block);
                let mut v = vec![n];
                v.extend_from_slice(name);
                v
            }
            _ => Vec::new(),
        }
    }

    /// The whole record: `0x08`, be16 number, be16 length, payload.
    pub fn encode(&self) -> Vec<u8> {
        let p = self.payload();
        let mut v = Vec::with_capacity(5 + p.len());
        v.push(crate::wire::QEMU_VM_COMMAND);
        v.extend_from_slice(&self.number().to_be_bytes());
        v.extend_from_slice(&wire_len(&p).to_be_bytes());
        v.extend_from_slice(&p);
        v
    }
}

/// `MIG_RP_MSG_*` numbers.
pub mod rp {
    /// Destination done with the return path.
    pub const SHUT: u16 = 1;
    /// Answer to PING.
    pub const PONG: u16 = 2;
    /// Page request naming the block.
    pub const REQ_PAGES_ID: u16 = 3;
    /// Page request for the last named block.
    pub const REQ_PAGES: u16 = 4;
    /// Received-bitmap header.
    pub const RECV_BITMAP: u16 = 5;
    /// Postcopy recovery acknowledged.
    pub const RESUME_ACK: u16 = 6;
    /// Switchover acknowledged (QEMU 8.1 and later).
    pub const SWITCHOVER_ACK: u16 = 7;
}

/// Largest return-path payload the source accepts.
pub const RP_MAX_LEN: usize = 512;

/// A return-path message (destination to source): be16 type, be16 length, payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpMessage {
    /// MIG_RP_MSG_SHUT with status (0 = success).
    Shut(u32),
    /// MIG_RP_MSG_PONG with the ping's value.
    Pong(u32),
    /// MIG_RP_MSG_REQ_PAGES_ID: start and length in bytes, block name.
    ReqPagesId {
        /// Byte offset in the block.
        start: u64,
        /// Length in bytes.
        len: u32,
        /// Block name.
        block: String,
    },
    /// MIG_RP_MSG_REQ_PAGES for the last named block.
    ReqPages {
        /// Byte offset in the block.
        start: u64,
        /// Length in bytes.
        len: u32,
    },
    /// MIG_RP_MSG_RECV_BITMAP header (the bitmap follows outside the message).
    RecvBitmap(String),
    /// MIG_RP_MSG_RESUME_ACK (value must be 1).
    ResumeAck(u32),
    /// MIG_RP_MSG_SWITCHOVER_ACK.
    SwitchoverAck,
}

impl RpMessage {
    /// Decode a message from its type and payload.
    pub fn decode(ty: u16, p: &[u8]) -> Result<RpMessage, ErrorKind> {
        let len = |name, n: usize, exp| fixed(name, p, n, exp);
        Ok(match ty {
            rp::SHUT => {
                len("SHUT", 4, "4")?;
                RpMessage::Shut(be32(p))
            }
            rp::PONG => {
                len("PONG", 4, "4")?;
                RpMessage::Pong(be32(p))
            }
            rp::REQ_PAGES_ID => {
                if p.len() < 13 || p.len() != 13 + p[12] as usize {
                    return Err(ErrorKind::CommandLength {
                        name: "REQ_PAGES_ID",
                        expected: "13 + name length",
                        got: p.len(),
                    });
                }
                RpMessage::ReqPagesId {
                    start: be64(p),
                    len: be32(&p[8..]),
                    block: String::from_utf8_lossy(&p[13..]).into_owned(),
                }
            }
            rp::REQ_PAGES => {
                len("REQ_PAGES", 12, "12")?;
                RpMessage::ReqPages { start: be64(p), len: be32(&p[8..]) }
            }
            rp::RECV_BITMAP => {
                if p.is_empty() || p.len() != 1 + p[0] as usize {
                    return Err(ErrorKind::CommandLength {
                        name: "RECV_BITMAP",
                        expected: "1 + name length",
                        got: p.len(),
                    });
                }
                RpMessage::RecvBitmap(String::from_utf8_lossy(&p[1..]).into_owned())
            }
            rp::RESUME_ACK => {
                len("RESUME_ACK", 4, "4")?;
                RpMessage::ResumeAck(be32(p))
            }
            rp::SWITCHOVER_ACK => {
                len("SWITCHOVER_ACK", 0, "0")?;
                RpMessage::SwitchoverAck
            }
            _ => return Err(ErrorKind::UnknownRpMessage { ty, len: wire_len(p) }),
        })
    }

    /// QEMU's name of this message (`SHUT`, `PONG`, `REQ_PAGES_ID`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            RpMessage::Shut(_) => "SHUT",
            RpMessage::Pong(_) => "PONG",
            RpMessage::ReqPagesId { .. } => "REQ_PAGES_ID",
            RpMessage::ReqPages { .. } => "REQ_PAGES",
            RpMessage::RecvBitmap(_) => "RECV_BITMAP",
            RpMessage::ResumeAck(_) => "RESUME_ACK",
            RpMessage::SwitchoverAck => "SWITCHOVER_ACK",
        }
    }

    /// Write the whole message to `w` and flush it (QEMU flushes every return-path message).
    pub fn write_to<W: std::io::Write + ?Sized>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.encode())?;
        w.flush()
    }

    /// The whole message: be16 type, be16 length, payload.
    pub fn encode(&self) -> Vec<u8> {
        let (ty, p): (u16, Vec<u8>) = match self {
            RpMessage::Shut(v) => (rp::SHUT, v.to_be_bytes().to_vec()),
            RpMessage::Pong(v) => (rp::PONG, v.to_be_bytes().to_vec()),
            RpMessage::ReqPagesId { start, len, block } => {
                let (name, n) = short_name(block);
                let mut v = start.to_be_bytes().to_vec();
                v.extend_from_slice(&len.to_be_bytes());
                v.push(n);
                v.extend_from_slice(name);
                (rp::REQ_PAGES_ID, v)
            }
            RpMessage::ReqPages { start, len } => {
                let mut v = start.to_be_bytes().to_vec();
                v.extend_from_slice(&len.to_be_bytes());
                (rp::REQ_PAGES, v)
            }
            RpMessage::RecvBitmap(block) => {
                let (name, n) = short_name(block);
                let mut v = vec![n];
                v.extend_from_slice(name);
                (rp::RECV_BITMAP, v)
            }
            RpMessage::ResumeAck(v) => (rp::RESUME_ACK, v.to_be_bytes().to_vec()),
            RpMessage::SwitchoverAck => (rp::SWITCHOVER_ACK, vec![]),
        };
        let mut out = ty.to_be_bytes().to_vec();
        out.extend_from_slice(&wire_len(&p).to_be_bytes());
        out.extend_from_slice(&p);
        out
    }

    /// Read one message from `r`; `Ok(None)` at a clean end of input. Error offsets
    /// count from where `r` stood; [`RpReader`] keeps them across messages.
    pub fn read<R: std::io::Read>(r: &mut R) -> crate::Result<Option<RpMessage>> {
        RpReader::new(r).next()
    }
}

/// End marker after a received bitmap (`RAMBLOCK_RECV_BITMAP_ENDING`).
pub const RECV_BITMAP_ENDING: u64 = 0x0123_4567_89ab_cdef;

/// Reads return-path messages one after the other from any `Read` (the source's
/// side of the return path), with error offsets counted from the first byte read.
/// Memory is bounded: a message payload is at most [`RP_MAX_LEN`] bytes.
pub struct RpReader<R> {
    input: crate::input::Input<R>,
}

impl<R: std::io::Read> RpReader<R> {
    /// A reader at offset 0 of the return path.
    pub fn new(r: R) -> Self {
        RpReader { input: crate::input::Input::new(r) }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.input.offset()
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.input.into_inner()
    }

    /// The next message; `Ok(None)` when the input ends cleanly between messages.
    /// A truncated message, a payload longer than [`RP_MAX_LEN`], an unknown type or
    /// a bad payload is an error at its offset.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> crate::Result<Option<RpMessage>> {
        const W: &str = "a return-path message";
        let input = &mut self.input;
        if input.at_end().map_err(|k| input.err(k))? {
            return Ok(None);
        }
        let start = input.offset();
        let at_start = |k| crate::Error::at(start, k);
        let ty = input.be16(W).map_err(|k| input.err(k))?;
        let len = input.be16(W).map_err(|k| input.err(k))?;
        if len as usize > RP_MAX_LEN {
            return Err(at_start(ErrorKind::Limit("return-path message longer than 512 bytes")));
        }
        let mut p = [0u8; RP_MAX_LEN];
        let p = &mut p[..len as usize];
        input.read_exact(p, W).map_err(|k| input.err(k))?;
        RpMessage::decode(ty, p).map(Some).map_err(at_start)
    }

    /// After an [`RpMessage::RecvBitmap`]: the bitmap that follows it (be64 size,
    /// `size` bytes, be64 [`RECV_BITMAP_ENDING`]). A size above `max_bytes` or not a
    /// multiple of 8, a short input or a wrong end marker is an error at its offset.
    pub fn read_recv_bitmap(&mut self, max_bytes: u64) -> crate::Result<Vec<u8>> {
        const W: &str = "a received bitmap";
        let input = &mut self.input;
        let size = input.be64(W).map_err(|k| input.err(k))?;
        if size > max_bytes {
            return Err(input.err(ErrorKind::Limit("received bitmap larger than the block's")));
        }
        if size % 8 != 0 {
            return Err(
                input.err(ErrorKind::CommandPayload { name: "RECV_BITMAP", why: "size is not a multiple of 8" })
            );
        }
        let bitmap = input.read_vec(size, W).map_err(|k| input.err(k))?;
        let end = input.be64(W).map_err(|k| input.err(k))?;
        if end != RECV_BITMAP_ENDING {
            return Err(input.err(ErrorKind::CommandPayload { name: "RECV_BITMAP", why: "bad end marker" }));
        }
        Ok(bitmap)
    }
}

/// A block name as commands carry it: at most 255 bytes, and its length byte.
fn short_name(block: &str) -> (&[u8], u8) {
    let name = &block.as_bytes()[..block.len().min(255)];
    (name, u8::try_from(name.len()).unwrap_or(u8::MAX))
}

/// The be16 length of a payload. Decoded payloads came with a be16 length; the
/// payloads built here are bounded (a name of at most 255 bytes, QEMU's at most
/// 12 discard ranges per command), so saturation never applies in practice.
fn wire_len(p: &[u8]) -> u16 {
    u16::try_from(p.len()).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod rp_tests {
    use super::*;

    fn all() -> Vec<RpMessage> {
        vec![
            RpMessage::Shut(0),
            RpMessage::Shut(1),
            RpMessage::Pong(1),
            RpMessage::Pong(0xdead_beef),
            RpMessage::ReqPagesId { start: 0xf0_0000, len: 0x1000, block: "mem".into() },
            RpMessage::ReqPages { start: 0xe0_0000, len: 0x1000 },
            RpMessage::RecvBitmap("pc.ram".into()),
            RpMessage::ResumeAck(1),
            RpMessage::SwitchoverAck,
        ]
    }

    #[test]
    fn bytes_seen_from_qemu_7_2() {
        // Section 5.3 of the stream reference: a real 7.2 postcopy return path.
        let seen: &[(&[u8], RpMessage)] = &[
            (&[0, 2, 0, 4, 0, 0, 0, 1], RpMessage::Pong(1)),
            (
                &[0, 3, 0, 0x10, 0, 0, 0, 0, 0, 0xf0, 0, 0, 0, 0, 0x10, 0, 3, b'm', b'e', b'm'],
                RpMessage::ReqPagesId { start: 0xf0_0000, len: 0x1000, block: "mem".into() },
            ),
            (
                &[0, 4, 0, 0x0c, 0, 0, 0, 0, 0, 0xe0, 0, 0, 0, 0, 0x10, 0],
                RpMessage::ReqPages { start: 0xe0_0000, len: 0x1000 },
            ),
            (&[0, 1, 0, 4, 0, 0, 0, 0], RpMessage::Shut(0)),
        ];
        let mut stream = Vec::new();
        for (bytes, msg) in seen {
            assert_eq!(msg.encode(), *bytes, "{msg:?}");
            stream.extend_from_slice(bytes);
        }
        let mut r = RpReader::new(&stream[..]);
        for (_, msg) in seen {
            assert_eq!(r.next().unwrap().as_ref(), Some(msg));
        }
        assert!(r.next().unwrap().is_none());
        assert_eq!(r.offset(), stream.len() as u64);
    }

    #[test]
    fn round_trip_through_write_to_and_reader() {
        let mut buf = Vec::new();
        for m in all() {
            m.write_to(&mut buf).unwrap();
        }
        let mut r = RpReader::new(&buf[..]);
        for m in all() {
            let got = r.next().unwrap().unwrap();
            assert_eq!(got.name(), m.name());
            assert_eq!(got, m);
        }
        assert!(r.next().unwrap().is_none());
    }

    #[test]
    fn every_cut_is_a_typed_error_at_the_cut() {
        let mut buf = Vec::new();
        for m in all() {
            buf.extend(m.encode());
        }
        // Message boundaries: a cut there is a clean end.
        let mut bounds = vec![0u64];
        for m in all() {
            bounds.push(bounds.last().unwrap() + m.encode().len() as u64);
        }
        for cut in 0..buf.len() {
            let mut r = RpReader::new(&buf[..cut]);
            let mut n = 0;
            let err = loop {
                match r.next() {
                    Ok(Some(_)) => n += 1,
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            if bounds.contains(&(cut as u64)) {
                assert!(err.is_none(), "cut {cut}: {err:?}");
            } else {
                let e = err.unwrap_or_else(|| panic!("cut {cut} inside message {n} decoded"));
                assert!(e.is_truncation(), "cut {cut}: {e}");
                assert_eq!(e.offset, cut as u64, "cut {cut}: {e}");
            }
        }
    }

    #[test]
    fn hostile_headers_and_payloads() {
        let err = |bytes: &[u8]| RpReader::new(bytes).next().unwrap_err();
        // INVALID and unknown types.
        let e = err(&[0, 0, 0, 0]);
        assert!(matches!(e.kind, ErrorKind::UnknownRpMessage { ty: 0, len: 0 }), "{e}");
        let e = err(&[0, 99, 0, 1, 7]);
        assert!(matches!(e.kind, ErrorKind::UnknownRpMessage { ty: 99, len: 1 }), "{e}");
        assert_eq!(e.offset, 0);
        // Too long: refused before reading (or allocating) the payload.
        let e = err(&[0, 1, 0x02, 0x01]);
        assert!(matches!(e.kind, ErrorKind::Limit(_)), "{e}");
        let e = err(&[0, 1, 0xff, 0xff]);
        assert!(matches!(e.kind, ErrorKind::Limit(_)), "{e}");
        // Fixed lengths.
        let e = err(&[0, 1, 0, 3, 0, 0, 0]);
        assert!(matches!(e.kind, ErrorKind::CommandLength { name: "SHUT", got: 3, .. }), "{e}");
        let e = err(&[0, 2, 0, 5, 0, 0, 0, 0, 0]);
        assert!(matches!(e.kind, ErrorKind::CommandLength { name: "PONG", got: 5, .. }), "{e}");
        let e = err(&[0, 4, 0, 13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(e.kind, ErrorKind::CommandLength { name: "REQ_PAGES", got: 13, .. }), "{e}");
        let e = err(&[0, 7, 0, 1, 0]);
        assert!(matches!(e.kind, ErrorKind::CommandLength { name: "SWITCHOVER_ACK", .. }), "{e}");
        // REQ_PAGES_ID whose name length disagrees with the payload, or no name length at all.
        let mut p = vec![0, 3, 0, 16];
        p.extend([0; 12]);
        p.extend([9, b'm', b'e', b'm']);
        let e = err(&p);
        assert!(matches!(e.kind, ErrorKind::CommandLength { name: "REQ_PAGES_ID", got: 16, .. }), "{e}");
        let e = err(&[0, 3, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(e.kind, ErrorKind::CommandLength { name: "REQ_PAGES_ID", got: 12, .. }), "{e}");
        let e = err(&[0, 5, 0, 0]);
        assert!(matches!(e.kind, ErrorKind::CommandLength { name: "RECV_BITMAP", got: 0, .. }), "{e}");
        // The error offset is the message's own start, later in the stream.
        let mut two = RpMessage::Pong(1).encode();
        two.extend([0, 1, 0, 0]);
        let mut r = RpReader::new(&two[..]);
        assert_eq!(r.next().unwrap(), Some(RpMessage::Pong(1)));
        assert_eq!(r.next().unwrap_err().offset, 8);
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small xorshift: deterministic garbage, including plausible headers.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let mut b: Vec<u8> = (0..len).map(|i| (x >> ((i % 8) * 8)).to_le_bytes()[0] ^ i.to_le_bytes()[0]).collect();
            if b.len() >= 4 {
                b[0] = 0;
                b[1] = (x % 9) as u8;
                b[2] = 0;
            }
            let mut r = RpReader::new(&b[..]);
            while let Ok(Some(_)) = r.next() {}
            assert!(r.offset() <= b.len() as u64);
        }
    }

    #[test]
    fn recv_bitmap_body() {
        let mut b = RpMessage::RecvBitmap("mem".into()).encode();
        b.extend(16u64.to_be_bytes());
        b.extend([0xffu8; 16]);
        b.extend(RECV_BITMAP_ENDING.to_be_bytes());
        let mut r = RpReader::new(&b[..]);
        assert_eq!(r.next().unwrap(), Some(RpMessage::RecvBitmap("mem".into())));
        assert_eq!(r.read_recv_bitmap(16).unwrap(), vec![0xff; 16]);
        // Over the caller's bound: refused before allocating.
        let mut r = RpReader::new(&b[..]);
        r.next().unwrap();
        assert!(matches!(r.read_recv_bitmap(8).unwrap_err().kind, ErrorKind::Limit(_)));
        // Wrong marker.
        let n = b.len();
        b[n - 1] ^= 1;
        let mut r = RpReader::new(&b[..]);
        r.next().unwrap();
        let e = r.read_recv_bitmap(16).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::CommandPayload { .. }), "{e}");
    }
}
