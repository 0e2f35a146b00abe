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
            _ => return Err(ErrorKind::UnknownCommand { cmd: ty, len: wire_len(p) }),
        })
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

    /// Read one message from `r`; `Ok(None)` at a clean end of input.
    pub fn read<R: std::io::Read>(r: &mut R) -> crate::Result<Option<RpMessage>> {
        let mut input = crate::input::Input::new(r);
        if input.at_end().map_err(|k| input.err(k))? {
            return Ok(None);
        }
        let ty = input.be16("a return-path message").map_err(|k| input.err(k))?;
        let len = input.be16("a return-path message").map_err(|k| input.err(k))? as usize;
        if len > RP_MAX_LEN {
            return Err(input.err(ErrorKind::Limit("return-path message longer than 512 bytes")));
        }
        let mut p = [0u8; RP_MAX_LEN];
        input.read_exact(&mut p[..len], "a return-path message").map_err(|k| input.err(k))?;
        RpMessage::decode(ty, &p[..len]).map(Some).map_err(|k| input.err(k))
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
