//! The 9P2000.L wire format: little-endian integers, strings as a 16-bit
//! length and bytes, every message `size[4] type[1] tag[2] body`.
//!
//! [`Reader`] takes a request apart and refuses anything that runs past the
//! message (EPROTO); [`Writer`] builds a reply and fills in its size.

/// Message types this server answers (T) and sends (R = T + 1).
pub mod op {
    pub const RLERROR: u8 = 7;
    pub const TSTATFS: u8 = 8;
    pub const TLOPEN: u8 = 12;
    pub const TLCREATE: u8 = 14;
    pub const TSYMLINK: u8 = 16;
    pub const TMKNOD: u8 = 18;
    pub const TRENAME: u8 = 20;
    pub const TREADLINK: u8 = 22;
    pub const TGETATTR: u8 = 24;
    pub const TSETATTR: u8 = 26;
    pub const TXATTRWALK: u8 = 30;
    pub const TXATTRCREATE: u8 = 32;
    pub const TREADDIR: u8 = 40;
    pub const TFSYNC: u8 = 50;
    pub const TLOCK: u8 = 52;
    pub const TGETLOCK: u8 = 54;
    pub const TLINK: u8 = 70;
    pub const TMKDIR: u8 = 72;
    pub const TRENAMEAT: u8 = 74;
    pub const TUNLINKAT: u8 = 76;
    pub const TVERSION: u8 = 100;
    pub const TAUTH: u8 = 102;
    pub const TATTACH: u8 = 104;
    pub const TFLUSH: u8 = 108;
    pub const TWALK: u8 = 110;
    pub const TREAD: u8 = 116;
    pub const TWRITE: u8 = 118;
    pub const TCLUNK: u8 = 120;
    pub const TREMOVE: u8 = 122;
}

/// Bytes before a message's body: size, type, tag.
pub const HEADER: usize = 7;

/// A qid: the server's identity of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qid {
    pub kind: u8,
    pub version: u32,
    pub path: u64,
}

pub const QID_DIR: u8 = 0x80;
pub const QID_SYMLINK: u8 = 0x02;
pub const QID_FILE: u8 = 0;

/// Reads a request's body; every getter fails with EPROTO past the end.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(body: &'a [u8]) -> Self {
        Self { buf: body, at: 0 }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], i32> {
        let end = self.at.checked_add(n).ok_or(libc::EPROTO)?;
        let b = self.buf.get(self.at..end).ok_or(libc::EPROTO)?;
        self.at = end;
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], i32> {
        Ok(self.bytes(N)?.try_into().expect("N bytes"))
    }

    pub fn u8(&mut self) -> Result<u8, i32> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, i32> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, i32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, i32> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A string: its bytes, which need not be UTF-8.
    pub fn str(&mut self) -> Result<&'a [u8], i32> {
        let n = self.u16()?;
        self.bytes(usize::from(n))
    }
}

/// Builds one reply.
#[derive(Debug)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// Starts a reply of type `kind` to the request tagged `tag`.
    pub fn new(kind: u8, tag: u16) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&[0; 4]);
        buf.push(kind);
        buf.extend_from_slice(&tag.to_le_bytes());
        Self { buf }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A string; callers keep it under 64 KiB (names and link targets are
    /// bounded by the host's NAME_MAX and PATH_MAX).
    pub fn str(&mut self, s: &[u8]) -> &mut Self {
        let n = u16::try_from(s.len()).unwrap_or(u16::MAX);
        self.u16(n);
        self.buf.extend_from_slice(&s[..usize::from(n)]);
        self
    }

    pub fn qid(&mut self, q: Qid) -> &mut Self {
        self.u8(q.kind).u32(q.version).u64(q.path)
    }

    /// Bytes as they are (a read's data; tests build requests with it).
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// The buffer, for writing data in place (a read's bytes).
    pub fn buf_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// The finished message, its size filled in.
    pub fn finish(mut self) -> Vec<u8> {
        let n = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&n.to_le_bytes());
        self.buf
    }
}

/// An Rlerror reply.
pub fn error(tag: u16, errno: i32) -> Vec<u8> {
    let mut w = Writer::new(op::RLERROR, tag);
    w.u32(errno as u32);
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_refuses_to_run_past_the_message() {
        let mut r = Reader::new(&[1, 0, 0, 0, 3, 0, b'a', b'b']);
        assert_eq!(r.u32(), Ok(1));
        assert_eq!(r.str(), Err(libc::EPROTO), "3-byte string, 2 left");
        let mut r = Reader::new(&[0xff, 0xff]);
        assert_eq!(r.str(), Err(libc::EPROTO));
        assert_eq!(Reader::new(&[1]).u64(), Err(libc::EPROTO));
    }

    #[test]
    fn writer_fills_in_the_size() {
        let mut w = Writer::new(101, 0xffff);
        w.u32(8192).str(b"9P2000.L");
        let m = w.finish();
        assert_eq!(&m[..4], &(m.len() as u32).to_le_bytes());
        assert_eq!(&m[4..7], &[101, 0xff, 0xff]);
        assert_eq!(&m[11..13], &8u16.to_le_bytes());
        assert_eq!(
            error(3, libc::ENOENT),
            vec![11, 0, 0, 0, 7, 3, 0, 2, 0, 0, 0]
        );
    }
}
