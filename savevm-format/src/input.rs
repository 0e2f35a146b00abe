//! Byte-level input: a `Read` with an offset counter, big-endian primitives and a
//! small peek buffer (QEMU peeks at subsection headers). Memory use is bounded:
//! the peek buffer never holds more than one subsection header.

use crate::error::{Error, ErrorKind};
use std::io::{self, Read};

/// Largest peek: subsection marker + length byte + 255-byte name.
const MAX_PEEK: usize = 1 + 1 + 255;

/// A reader that counts the bytes it hands out.
pub(crate) struct Input<R> {
    inner: R,
    /// Bytes consumed (not counting peeked bytes).
    offset: u64,
    /// Peeked bytes not yet consumed; `peek[peek_pos..]` are pending.
    peek: Vec<u8>,
    peek_pos: usize,
}

pub(crate) type IResult<T> = std::result::Result<T, ErrorKind>;

impl<R: Read> Input<R> {
    pub(crate) fn new(inner: R) -> Self {
        Input { inner, offset: 0, peek: Vec::new(), peek_pos: 0 }
    }

    /// A reader whose first byte is byte `offset` of some larger stream (a package
    /// cut out of it), so errors keep naming offsets in that stream.
    pub(crate) fn at_offset(inner: R, offset: u64) -> Self {
        Input { inner, offset, peek: Vec::new(), peek_pos: 0 }
    }

    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    pub(crate) fn get_ref(&self) -> &R {
        &self.inner
    }

    pub(crate) fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    pub(crate) fn err(&self, kind: ErrorKind) -> Error {
        Error::at(self.offset, kind)
    }

    fn pending(&self) -> &[u8] {
        &self.peek[self.peek_pos..]
    }

    /// Fill `buf` completely; a short input is `UnexpectedEof { what }`.
    pub(crate) fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> IResult<()> {
        let mut done = 0;
        let pend = self.pending().len();
        if pend > 0 {
            let n = pend.min(buf.len());
            buf[..n].copy_from_slice(&self.peek[self.peek_pos..self.peek_pos + n]);
            self.peek_pos += n;
            if self.peek_pos == self.peek.len() {
                self.peek.clear();
                self.peek_pos = 0;
            }
            done = n;
        }
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    self.offset += done as u64;
                    return Err(ErrorKind::UnexpectedEof { what });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.offset += done as u64;
                    return Err(ErrorKind::Io(e));
                }
            }
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// For a caller that reads `len` bytes itself: the peeked bytes among them
    /// (consumed here; the offset moves only with [`advance`](Self::advance)), and
    /// the inner reader for the rest.
    pub(crate) fn take_ahead(&mut self, len: usize) -> (Vec<u8>, &mut R) {
        let n = self.pending().len().min(len);
        let ahead = self.peek[self.peek_pos..self.peek_pos + n].to_vec();
        self.peek_pos += n;
        if self.peek_pos == self.peek.len() {
            self.peek.clear();
            self.peek_pos = 0;
        }
        (ahead, &mut self.inner)
    }

    /// Count `n` bytes the caller read itself (see [`take_ahead`](Self::take_ahead)).
    pub(crate) fn advance(&mut self, n: u64) {
        self.offset += n;
    }

    /// Make sure at least `n` (≤ MAX_PEEK) bytes are buffered; returns how many are (less at end of input).
    pub(crate) fn fill_peek(&mut self, n: usize) -> IResult<usize> {
        debug_assert!(n <= MAX_PEEK);
        if self.peek_pos > 0 {
            self.peek.drain(..self.peek_pos);
            self.peek_pos = 0;
        }
        while self.peek.len() < n {
            let have = self.peek.len();
            self.peek.resize(n, 0);
            match self.inner.read(&mut self.peek[have..]) {
                Ok(0) => {
                    self.peek.truncate(have);
                    break;
                }
                Ok(k) => self.peek.truncate(have + k),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.peek.truncate(have),
                Err(e) => {
                    self.peek.truncate(have);
                    return Err(ErrorKind::Io(e));
                }
            }
        }
        Ok(self.peek.len().min(n))
    }

    /// The next `n` bytes without consuming them (fewer at end of input).
    pub(crate) fn peek(&mut self, n: usize) -> IResult<&[u8]> {
        let have = self.fill_peek(n)?;
        Ok(&self.peek[self.peek_pos..self.peek_pos + have])
    }

    /// Next byte without consuming it, `None` at end of input.
    pub(crate) fn peek_u8(&mut self) -> IResult<Option<u8>> {
        Ok(self.peek(1)?.first().copied())
    }

    /// True when no byte is left.
    pub(crate) fn at_end(&mut self) -> IResult<bool> {
        Ok(self.peek_u8()?.is_none())
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> IResult<u8> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b, what)?;
        Ok(b[0])
    }

    pub(crate) fn be16(&mut self, what: &'static str) -> IResult<u16> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b, what)?;
        Ok(u16::from_be_bytes(b))
    }

    pub(crate) fn be32(&mut self, what: &'static str) -> IResult<u32> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }

    pub(crate) fn be64(&mut self, what: &'static str) -> IResult<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }

    /// A counted string (u8 length + bytes), decoded lossily as UTF-8.
    pub(crate) fn cstr(&mut self, what: &'static str) -> IResult<String> {
        let len = self.u8(what)? as usize;
        let mut buf = [0u8; 255];
        self.read_exact(&mut buf[..len], what)?;
        Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
    }

    /// `len` bytes into a new vector, grown as bytes arrive so a huge declared
    /// length cannot allocate more than the input actually holds (+64 KiB).
    pub(crate) fn read_vec(&mut self, len: u64, what: &'static str) -> IResult<Vec<u8>> {
        const CHUNK: usize = 64 * 1024;
        let mut out = Vec::new();
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
            let start = out.len();
            out.resize(start + n, 0);
            self.read_exact(&mut out[start..], what)?;
            left -= n as u64;
        }
        Ok(out)
    }

    /// Discard `len` bytes.
    pub(crate) fn skip(&mut self, len: u64, what: &'static str) -> IResult<()> {
        let mut buf = [0u8; 4096];
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
            self.read_exact(&mut buf[..n], what)?;
            left -= n as u64;
        }
        Ok(())
    }
}

/// Plain reads for bodies the caller decodes itself: pending peeked bytes first,
/// then the inner reader; every byte handed out is counted in the offset.
impl<R: Read> Read for Input<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let pend = self.peek.len() - self.peek_pos;
        let n = if pend > 0 {
            let n = pend.min(buf.len());
            buf[..n].copy_from_slice(&self.peek[self.peek_pos..self.peek_pos + n]);
            self.peek_pos += n;
            if self.peek_pos == self.peek.len() {
                self.peek.clear();
                self.peek_pos = 0;
            }
            n
        } else {
            self.inner.read(buf)?
        };
        self.offset += n as u64;
        Ok(n)
    }
}
