//! A 9P2000.L file server for `-v HOSTDIR:GUESTDIR` on the KVM backend: the
//! same protocol, mount tag and guest mount as QEMU's `virtio-9p` with
//! `security_model=none`, so hyperinit mounts a volume the same way on both
//! backends. Files the guest creates belong to the user running hyperboot;
//! ownership changes the host refuses are ignored, as QEMU does.
//!
//! The guest is hostile, so the server never resolves a guest path on the
//! host. Every fid holds an `O_PATH` descriptor; a walk opens one name at a
//! time under its directory's descriptor with `O_NOFOLLOW`, and a name is
//! never empty, `.`, or holds `/` or NUL. `..` goes up only within the share
//! (from the fid's recorded path, one name at a time from the root again).
//! A symlink is never followed by the host, whatever its target: the guest's
//! kernel resolves it. Opening a fid for I/O goes through
//! `/proc/self/fd/N` of a descriptor the server holds, so it reaches that
//! same inode, never a path. Only regular files and directories are opened.
//!
//! Extended attributes: the guest reads, lists, sets and removes those of
//! the `user.` namespace on files and directories (what overlayfs with
//! `userxattr` keeps in an upper directory); other names read as absent and
//! cannot be set. The only device node the guest can make is the overlayfs
//! whiteout, a character device 0:0, which opens nothing.

pub(crate) mod wire;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Stat, Timespec, Timestamps, Uid, CWD};
use rustix::io::Errno;

use wire::{op, Qid, Reader, Writer, HEADER};

/// The largest message size the server agrees to.
pub const MAX_MSIZE: u32 = 1 << 20;
/// Names in one walk (the protocol's limit).
const MAX_WALK: usize = 16;
/// Open flags a guest may pass on (access mode, truncate, append, sync);
/// 9P2000.L uses the x86 Linux values. The server adds CLOEXEC, NOCTTY and
/// NOFOLLOW itself and never lets the guest ask for O_PATH or O_DIRECT.
const OPEN_FLAGS: u32 = 0o3 | 0o1000 | 0o2000 | 0o4010000;
const AT_REMOVEDIR: u32 = 0x200;
/// `Tgetattr` fields this server fills (P9_GETATTR_BASIC).
const GETATTR_BASIC: u64 = 0x7ff;
/// `Tsetattr` valid bits.
const SET_MODE: u32 = 1;
const SET_UID: u32 = 2;
const SET_GID: u32 = 4;
const SET_SIZE: u32 = 8;
const SET_ATIME: u32 = 0x10;
const SET_MTIME: u32 = 0x20;
const SET_ATIME_SET: u32 = 0x80;
const SET_MTIME_SET: u32 = 0x100;

type Result<T> = std::result::Result<T, i32>;

fn os(e: Errno) -> i32 {
    e.raw_os_error()
}

fn io(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    /// Fifos, sockets, devices: visible, never opened.
    Other,
}

impl Kind {
    fn of(st: &Stat) -> Self {
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => Kind::Dir,
            FileType::RegularFile => Kind::File,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        }
    }
}

/// One fid: a file the guest walked to.
#[derive(Debug)]
struct Fid {
    /// `O_PATH | O_NOFOLLOW`: names the inode, never follows it.
    fd: OwnedFd,
    /// From the share's root ("" is the root); kept up to date on renames.
    path: PathBuf,
    kind: Kind,
    /// After Tlopen or Tlcreate.
    open: Option<File>,
    writable: bool,
    /// From Txattrwalk or Txattrcreate: the fid reads or writes an
    /// extended attribute, not the file.
    xattr: Option<Xattr>,
    /// The guest user the fid was attached for (n_uname): what it creates
    /// is given to that user, when the host allows.
    uid: u32,
}

/// The largest extended attribute value or name list (Linux's own limit).
const XATTR_MAX: usize = 65536;
/// The extended attributes the guest sees.
const XATTR_PREFIX: &[u8] = b"user.";

/// What a fid of an extended attribute carries.
#[derive(Debug)]
enum Xattr {
    /// A value, or the list of names: Tread reads it.
    Value(Vec<u8>),
    /// Being set: Twrite fills it, Tclunk sets it (or removes the
    /// attribute when its announced size is 0, as QEMU does).
    Pending {
        name: Vec<u8>,
        size: usize,
        flags: u32,
        data: Vec<u8>,
    },
}

/// The server for one shared directory.
#[derive(Debug)]
pub struct Server {
    root: OwnedFd,
    read_only: bool,
    msize: u32,
    fids: HashMap<u32, Fid>,
    max_fids: usize,
}

impl Server {
    /// Serves `dir` (read-only with `read_only`), holding at most `max_fids`
    /// fids (each is a host file descriptor).
    pub fn new(dir: &Path, read_only: bool, max_fids: usize) -> std::io::Result<Self> {
        let root = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self {
            root,
            read_only,
            msize: MAX_MSIZE,
            fids: HashMap::new(),
            max_fids: max_fids.max(16),
        })
    }

    /// The negotiated message size: no request or reply is longer.
    pub fn msize(&self) -> u32 {
        self.msize
    }

    /// Answers one whole request (its size field equals `msg.len()`, at
    /// least 7); the reply is at most `room` bytes.
    pub fn handle(&mut self, msg: &[u8], room: usize) -> Vec<u8> {
        let kind = msg[4];
        let tag = u16::from_le_bytes([msg[5], msg[6]]);
        let room = room.min(self.msize as usize);
        let mut r = Reader::new(&msg[HEADER..]);
        let reply = match self.dispatch(kind, tag, &mut r, room) {
            Ok(w) => w.finish(),
            Err(e) => wire::error(tag, e),
        };
        if reply.len() > room {
            wire::error(tag, libc::EMSGSIZE)
        } else {
            reply
        }
    }

    fn dispatch(&mut self, kind: u8, tag: u16, r: &mut Reader, room: usize) -> Result<Writer> {
        let mut w = Writer::new(kind.wrapping_add(1), tag);
        match kind {
            op::TVERSION => self.version(r, &mut w)?,
            op::TATTACH => self.attach(r, &mut w)?,
            op::TFLUSH => {}
            op::TWALK => self.walk(r, &mut w)?,
            op::TCLUNK => {
                let fid = self.fids.remove(&r.u32()?).ok_or(libc::EBADF)?;
                if let Some(Xattr::Pending { .. }) = fid.xattr {
                    set_xattr(&fid)?;
                }
            }
            op::TLOPEN => self.lopen(r, &mut w)?,
            op::TLCREATE => self.lcreate(r, &mut w)?,
            op::TREAD => self.read(r, &mut w, room)?,
            op::TWRITE => self.write(r, &mut w)?,
            op::TREADDIR => self.readdir(r, &mut w, room)?,
            op::TGETATTR => self.getattr(r, &mut w)?,
            op::TSETATTR => self.setattr(r)?,
            op::TSTATFS => self.statfs(r, &mut w)?,
            op::TMKDIR => self.mkdir(r, &mut w)?,
            op::TSYMLINK => self.symlink(r, &mut w)?,
            op::TMKNOD => self.mknod(r, &mut w)?,
            op::TREADLINK => self.readlink(r, &mut w)?,
            op::TLINK => self.link(r)?,
            op::TRENAME => self.rename(r)?,
            op::TRENAMEAT => self.renameat(r)?,
            op::TUNLINKAT => self.unlinkat(r)?,
            op::TREMOVE => self.remove(r)?,
            op::TFSYNC => self.fsync(r)?,
            op::TXATTRWALK => self.xattrwalk(r, &mut w)?,
            op::TXATTRCREATE => self.xattrcreate(r)?,
            op::TLOCK => {
                // As QEMU: locks are the guest's own business (status SUCCESS).
                w.u8(0);
            }
            op::TGETLOCK => {
                let (_fid, _kind) = (r.u32()?, r.u8()?);
                let (start, len, proc_id) = (r.u64()?, r.u64()?, r.u32()?);
                let client = r.str()?;
                w.u8(libc::F_UNLCK as u8)
                    .u64(start)
                    .u64(len)
                    .u32(proc_id)
                    .str(client);
            }
            // No authentication.
            op::TAUTH => return Err(libc::EOPNOTSUPP),
            // The legacy 9P2000 and 9P2000.u messages.
            _ => return Err(libc::EOPNOTSUPP),
        }
        Ok(w)
    }

    fn fid(&self, id: u32) -> Result<&Fid> {
        self.fids.get(&id).ok_or(libc::EBADF)
    }

    fn modifiable(&self) -> Result<()> {
        if self.read_only {
            Err(libc::EROFS)
        } else {
            Ok(())
        }
    }

    fn insert(&mut self, id: u32, fid: Fid) -> Result<()> {
        if !self.fids.contains_key(&id) && self.fids.len() >= self.max_fids {
            return Err(libc::ENFILE);
        }
        self.fids.insert(id, fid);
        Ok(())
    }

    fn version(&mut self, r: &mut Reader, w: &mut Writer) -> Result<()> {
        let msize = r.u32()?;
        let version = r.str()?;
        // A new session: every fid of the old one is gone.
        self.fids.clear();
        self.msize = msize.clamp(HEADER as u32 + 64, MAX_MSIZE);
        w.u32(self.msize);
        if version.starts_with(b"9P2000.L") {
            w.str(b"9P2000.L");
        } else {
            w.str(b"unknown");
        }
        Ok(())
    }

    fn attach(&mut self, r: &mut Reader, w: &mut Writer) -> Result<()> {
        let fid = r.u32()?;
        let (_afid, _uname, _aname, uid) = (r.u32()?, r.str()?, r.str()?, r.u32()?);
        if self.fids.contains_key(&fid) {
            return Err(libc::EBADF);
        }
        let fd = rustix::io::fcntl_dupfd_cloexec(&self.root, 0).map_err(os)?;
        let st = stat(&fd)?;
        w.qid(qid(&st));
        let mut root = new_fid(fd, PathBuf::new(), &st);
        // No numeric user (NONUNAME): root, as QEMU takes it.
        root.uid = if uid == u32::MAX { 0 } else { uid };
        self.insert(fid, root)
    }

    fn walk(&mut self, r: &mut Reader, w: &mut Writer) -> Result<()> {
        let (id, newid) = (r.u32()?, r.u32()?);
        let n = usize::from(r.u16()?);
        if n > MAX_WALK {
            return Err(libc::EINVAL);
        }
        let names = (0..n).map(|_| r.str()).collect::<Result<Vec<_>>>()?;
        if newid != id && self.fids.contains_key(&newid) {
            return Err(libc::EBADF);
        }
        let from = self.fid(id)?;
        let uid = from.uid;
        let mut fd = rustix::io::fcntl_dupfd_cloexec(&from.fd, 0).map_err(os)?;
        let mut path = from.path.clone();
        let mut st = stat(&fd)?;
        let mut qids = Vec::with_capacity(n);
        for name in &names {
            let step = if *name == b".." {
                let mut up = path.clone();
                up.pop();
                self.open_path(&up).map(|fd| (fd, up))
            } else {
                check_name(name).and_then(|nm| {
                    let fd = rustix::fs::openat(&fd, nm, opath(), Mode::empty()).map_err(os)?;
                    Ok((fd, path.join(nm)))
                })
            };
            match step.and_then(|(fd, p)| Ok((stat(&fd)?, fd, p))) {
                Ok((s, f, p)) => {
                    qids.push(qid(&s));
                    (st, fd, path) = (s, f, p);
                }
                // The first name failing fails the walk; a later one
                // returns the qids so far and makes no new fid.
                Err(e) if qids.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        if qids.len() == n {
            let mut fid = new_fid(fd, path, &st);
            fid.uid = uid;
            self.insert(newid, fid)?;
        }
        w.u16(qids.len() as u16);
        for q in qids {
            w.qid(q);
        }
        Ok(())
    }

    /// Opens a path inside the share one name at a time, never following
    /// a symlink (one in the middle fails the walk with ENOTDIR).
    fn open_path(&self, path: &Path) -> Result<OwnedFd> {
        let mut fd = rustix::io::fcntl_dupfd_cloexec(&self.root, 0).map_err(os)?;
        for c in path.iter() {
            fd = rustix::fs::openat(&fd, c, opath(), Mode::empty()).map_err(os)?;
        }
        Ok(fd)
    }

    fn lopen(&mut self, r: &mut Reader, w: &mut Writer) -> Result<()> {
        let (id, flags) = (r.u32()?, r.u32()?);
        let read_only = self.read_only;
        let fid = self.fids.get_mut(&id).ok_or(libc::EBADF)?;
        let writes = flags & 3 != 0 || flags & 0o1000 != 0;
        let flags = match fid.kind {
            Kind::Dir if writes => return Err(libc::EISDIR),
            Kind::Dir => OFlags::RDONLY | OFlags::DIRECTORY,
            Kind::File if writes && read_only => return Err(libc::EROFS),
            Kind::File => OFlags::from_bits_retain(flags & OPEN_FLAGS),
            Kind::Symlink => return Err(libc::ELOOP),
            Kind::Other => return Err(libc::ENXIO),
        };
        let file = reopen(&fid.fd, flags)?;
        w.qid(qid(&rustix::fs::fstat(&file).map_err(os)?)).u32(0);
        fid.open = Some(File::from(file));
        fid.writable = writes;
        Ok(())
    }

    fn lcreate(&mut self, r: &mut Reader, w: &mut Writer) -> Result<()> {
        let id = r.u32()?;
        let name = check_name(r.str()?)?;
        let (flags, mode, gid) = (r.u32()?, r.u32()?, r.u32()?);
        self.modifiable()?;
        let fid = self.fids.get_mut(&id).ok_or(libc::EBADF)?;
        let oflags = OFlags::from_bits_retain(flags & OPEN_FLAGS)
            | OFlags::CREATE
            | OFlags::from_bits_retain(flags & 0o200) // O_EXCL
            | OFlags::NOFOLLOW
            | OFlags::NOCTTY
            | OFlags::CLOEXEC;
        let file = rustix::fs::openat(&fid.fd, name, oflags, perm(mode)).map_err(os)?;
        let _ = rustix::fs::fchown(
            &file,
            Some(Uid::from_raw(fid.uid)),
            Some(Gid::from_raw(gid)),
        );
        let st = rustix::fs::fstat(&file).map_err(os)?;
        if Kind::of(&st) != Kind::File {
            return Err(libc::EEXIST);
        }
        let fd = reopen_path(&file)?;
        w.qid(qid(&st)).u32(0);
        fid.fd = fd;
        fid.path.push(name);
        fid.kind = Kind::File;
        fid.open = Some(File::from(file));
        fid.writable = flags & 3 != 0;
        Ok(())
    }

    fn read(&mut self, r: &mut Reader, w: &mut Writer, room: usize) -> Result<()> {
        let (id, offset, count) = (r.u32()?, r.u64()?, r.u32()?);
        let fid = self.fid(id)?;
        let n = (count as usize).min(room.saturating_sub(HEADER + 4));
        match &fid.xattr {
            Some(Xattr::Value(v)) => {
                let from = (offset.min(v.len() as u64)) as usize;
                let part = &v[from..(from + n).min(v.len())];
                w.u32(part.len() as u32).raw(part);
                return Ok(());
            }
            Some(Xattr::Pending { .. }) => return Err(libc::EBADF),
            None => {}
        }
        let file = match (&fid.open, fid.kind) {
            (Some(f), Kind::File) => f,
            (Some(_), _) => return Err(libc::EISDIR),
            (None, _) => return Err(libc::EBADF),
        };
        let buf = w.buf_mut();
        let at = buf.len() + 4;
        buf.resize(at + n, 0);
        let got = file.read_at(&mut buf[at..], offset).map_err(io)?;
        buf.truncate(at + got);
        buf[at - 4..at].copy_from_slice(&(got as u32).to_le_bytes());
        Ok(())
    }

    fn write(&mut self, r: &mut Reader, w: &mut Writer) -> Result<()> {
        let (id, offset, count) = (r.u32()?, r.u64()?, r.u32()?);
        let data = r.bytes(count as usize)?;
        self.modifiable()?;
        if let Some(Xattr::Pending {
            size, data: value, ..
        }) = &mut self.fids.get_mut(&id).ok_or(libc::EBADF)?.xattr
        {
            // An attribute's value comes in order and no longer than announced.
            if offset != value.len() as u64 || value.len() + data.len() > *size {
                return Err(libc::EINVAL);
            }
            value.extend_from_slice(data);
            w.u32(data.len() as u32);
            return Ok(());
        }
        let fid = self.fid(id)?;
        let file = match (&fid.open, fid.writable) {
            (Some(f), true) => f,
            _ => return Err(libc::EBADF),
        };
        let n = file.write_at(data, offset).map_err(io)?;
        w.u32(n as u32);
        Ok(())
    }

    fn readdir(&mut self, r: &mut Reader, w: &mut Writer, room: usize) -> Result<()> {
        let (id, offset, count) = (r.u32()?, r.u64()?, r.u32()?);
        let fid = self.fid(id)?;
        let dir = match (&fid.open, fid.kind) {
            (Some(d), Kind::Dir) => d,
            (Some(_), _) => return Err(libc::ENOTDIR),
            (None, _) => return Err(libc::EBADF),
        };
        let max = (count as usize).min(room.saturating_sub(HEADER + 4));
        rustix::fs::seek(dir, rustix::fs::SeekFrom::Start(offset)).map_err(os)?;
        let mut raw = vec![MaybeUninit::<u8>::uninit(); 16 * 1024];
        let mut entries = rustix::fs::RawDir::new(dir, &mut raw);
        // The byte count goes in front of the entries once they are written.
        w.u32(0);
        let start = w.len();
        while let Some(e) = entries.next() {
            let e = e.map_err(os)?;
            let name = e.file_name().to_bytes();
            // qid 13, offset 8, type 1, name 2 + its bytes.
            if w.len() - start + 24 + name.len() > max {
                break;
            }
            let kind = match e.file_type() {
                FileType::Directory => wire::QID_DIR,
                FileType::Symlink => wire::QID_SYMLINK,
                _ => wire::QID_FILE,
            };
            w.qid(Qid {
                kind,
                version: 0,
                path: e.ino(),
            })
            .u64(e.next_entry_cookie())
            .u8((e.file_type().as_raw_mode() >> 12) as u8)
            .str(name);
        }
        let n = (w.len() - start) as u32;
        w.buf_mut()[start - 4..start].copy_from_slice(&n.to_le_bytes());
        Ok(())
    }

    fn getattr(&mut self, r: &mut Reader, w: &mut Writer) -> Result<()> {
        let (id, _mask) = (r.u32()?, r.u64()?);
        let st = stat(&self.fid(id)?.fd)?;
        let t = |s: i64, ns: u64| [s as u64, ns];
        w.u64(GETATTR_BASIC)
            .qid(qid(&st))
            .u32(st.st_mode)
            .u32(st.st_uid)
            .u32(st.st_gid)
            .u64(st.st_nlink)
            .u64(st.st_rdev)
            .u64(st.st_size as u64)
            .u64(st.st_blksize as u64)
            .u64(st.st_blocks as u64);
        for [s, ns] in [
            t(st.st_atime, st.st_atime_nsec),
            t(st.st_mtime, st.st_mtime_nsec),
            t(st.st_ctime, st.st_ctime_nsec),
        ] {
            w.u64(s).u64(ns);
        }
        // btime, gen, data_version: not reported (outside BASIC).
        w.u64(0).u64(0).u64(0).u64(0);
        Ok(())
    }

    fn setattr(&mut self, r: &mut Reader) -> Result<()> {
        let (id, valid, mode, uid, gid) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        let size = r.u64()?;
        let atime = (r.u64()?, r.u64()?);
        let mtime = (r.u64()?, r.u64()?);
        let changes = SET_MODE | SET_UID | SET_GID | SET_SIZE | SET_ATIME | SET_MTIME;
        if valid & changes == 0 {
            return Ok(());
        }
        self.modifiable()?;
        let fid = self.fid(id)?;
        if valid & SET_MODE != 0 && fid.kind != Kind::Symlink {
            rustix::fs::chmodat(CWD, proc_path(&fid.fd), perm(mode), AtFlags::empty())
                .map_err(os)?;
        }
        if valid & (SET_UID | SET_GID) != 0 {
            let owner = (valid & SET_UID != 0).then(|| Uid::from_raw(uid));
            let group = (valid & SET_GID != 0).then(|| Gid::from_raw(gid));
            match rustix::fs::chownat(&fid.fd, "", owner, group, empty_path()) {
                // security_model=none: ownership the host refuses is ignored.
                Ok(()) | Err(Errno::PERM) => {}
                Err(e) => return Err(os(e)),
            }
        }
        if valid & SET_SIZE != 0 {
            if fid.kind != Kind::File {
                return Err(libc::EINVAL);
            }
            match (&fid.open, fid.writable) {
                (Some(f), true) => f.set_len(size).map_err(io)?,
                _ => File::from(reopen(&fid.fd, OFlags::WRONLY)?)
                    .set_len(size)
                    .map_err(io)?,
            }
        }
        if valid & (SET_ATIME | SET_MTIME) != 0 {
            let when = |set: u32, given: u32, (s, ns): (u64, u64)| {
                if valid & set == 0 {
                    Timespec {
                        tv_sec: 0,
                        tv_nsec: rustix::fs::UTIME_OMIT,
                    }
                } else if valid & given == 0 {
                    Timespec {
                        tv_sec: 0,
                        tv_nsec: rustix::fs::UTIME_NOW,
                    }
                } else {
                    Timespec {
                        tv_sec: s as i64,
                        tv_nsec: (ns % 1_000_000_000) as _,
                    }
                }
            };
            let times = Timestamps {
                last_access: when(SET_ATIME, SET_ATIME_SET, atime),
                last_modification: when(SET_MTIME, SET_MTIME_SET, mtime),
            };
            rustix::fs::utimensat(&fid.fd, "", &times, empty_path()).map_err(os)?;
        }
        Ok(())
    }

    fn statfs(&mut self, r: &mut Reader, w: &mut Writer) -> Result<()> {
        let fd = &self.fid(r.u32()?)?.fd;
        let s = rustix::fs::fstatfs(fd).map_err(os)?;
        // The same call, for the filesystem id as one number.
        let v = rustix::fs::fstatvfs(fd).map_err(os)?;
        w.u32(s.f_type as u32)
            .u32(s.f_bsize as u32)
            .u64(s.f_blocks)
            .u64(s.f_bfree)
            .u64(s.f_bavail)
            .u64(s.f_files)
            .u64(s.f_ffree)
            .u64(v.f_fsid)
            .u32(s.f_namelen as u32);
        Ok(())
    }

    fn mkdir(&mut self, r: &mut Reader, w: &mut Writer) -> Result<()> {
        let id = r.u32()?;
        let name = check_name(r.str()?)?;
        let (mode, gid) = (r.u32()?, r.u32()?);
        self.modifiable()?;
        let dir = self.fid(id)?;
        rustix::fs::mkdirat(&dir.fd, name, perm(mode)).map_err(os)?;
        w.qid(self.created(dir, name, gid)?);
        Ok(())
    }

    fn symlink(&mut self, r: &mut Reader, w: &mut Writer) -> Result<()> {
        let id = r.u32()?;
        let name = check_name(r.str()?)?;
        let (target, gid) = (r.str()?, r.u32()?);
        if target.is_empty() || target.contains(&0) || target.len() >= libc::PATH_MAX as usize {
            return Err(libc::EINVAL);
        }
        self.modifiable()?;
        let dir = self.fid(id)?;
        rustix::fs::symlinkat(OsStr::from_bytes(target), &dir.fd, name).map_err(os)?;
        w.qid(self.created(dir, name, gid)?);
        Ok(())
    }

    fn mknod(&mut self, r: &mut Reader, w: &mut Writer) -> Result<()> {
        let id = r.u32()?;
        let name = check_name(r.str()?)?;
        let (mode, major, minor, gid) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        self.modifiable()?;
        // Fifos, sockets, empty files and overlayfs' whiteout (a character
        // device 0:0, which opens nothing); never a real device node.
        let kind = FileType::from_raw_mode(mode);
        let whiteout = kind == FileType::CharacterDevice && (major, minor) == (0, 0);
        if !whiteout
            && !matches!(
                kind,
                FileType::Fifo | FileType::Socket | FileType::RegularFile
            )
        {
            return Err(libc::EPERM);
        }
        let dir = self.fid(id)?;
        rustix::fs::mknodat(&dir.fd, name, kind, perm(mode), 0).map_err(os)?;
        w.qid(self.created(dir, name, gid)?);
        Ok(())
    }

    /// The qid of a name just created in `dir` by the fid's user, given to
    /// that user and the guest's group (security_model=none: when the host
    /// refuses, hyperboot's user keeps it).
    fn created(&self, dir: &Fid, name: &OsStr, gid: u32) -> Result<Qid> {
        let flags = AtFlags::SYMLINK_NOFOLLOW;
        let (owner, group) = (Uid::from_raw(dir.uid), Gid::from_raw(gid));
        let _ = rustix::fs::chownat(&dir.fd, name, Some(owner), Some(group), flags);
        Ok(qid(&rustix::fs::statat(&dir.fd, name, flags).map_err(os)?))
    }

    fn readlink(&mut self, r: &mut Reader, w: &mut Writer) -> Result<()> {
        let fid = self.fid(r.u32()?)?;
        if fid.kind != Kind::Symlink {
            return Err(libc::EINVAL);
        }
        let target = rustix::fs::readlinkat(&fid.fd, "", Vec::new()).map_err(os)?;
        w.str(target.as_bytes());
        Ok(())
    }

    fn link(&mut self, r: &mut Reader) -> Result<()> {
        let (dir, id) = (r.u32()?, r.u32()?);
        let name = check_name(r.str()?)?;
        self.modifiable()?;
        let fid = self.fid(id)?;
        // Following a symlink here would let the guest link any host file.
        if matches!(fid.kind, Kind::Dir | Kind::Symlink) {
            return Err(libc::EPERM);
        }
        let dir = &self.fid(dir)?.fd;
        rustix::fs::linkat(CWD, proc_path(&fid.fd), dir, name, AtFlags::SYMLINK_FOLLOW).map_err(os)
    }

    fn rename(&mut self, r: &mut Reader) -> Result<()> {
        let (id, dir) = (r.u32()?, r.u32()?);
        let name = check_name(r.str()?)?;
        self.modifiable()?;
        let from = self.fid(id)?.path.clone();
        let (Some(parent), Some(last)) = (from.parent(), from.file_name()) else {
            return Err(libc::EBUSY); // the share's root
        };
        let parent = self.open_path(parent)?;
        let d = self.fid(dir)?;
        let to = d.path.join(name);
        rustix::fs::renameat(&parent, last, &d.fd, name).map_err(os)?;
        self.moved(&from, &to);
        Ok(())
    }

    fn renameat(&mut self, r: &mut Reader) -> Result<()> {
        let old_dir = r.u32()?;
        let old = check_name(r.str()?)?;
        let new_dir = r.u32()?;
        let new = check_name(r.str()?)?;
        self.modifiable()?;
        let (od, nd) = (self.fid(old_dir)?, self.fid(new_dir)?);
        rustix::fs::renameat(&od.fd, old, &nd.fd, new).map_err(os)?;
        let (from, to) = (od.path.join(old), nd.path.join(new));
        self.moved(&from, &to);
        Ok(())
    }

    /// Fids at or below a renamed path follow it.
    fn moved(&mut self, from: &Path, to: &Path) {
        for fid in self.fids.values_mut() {
            if let Ok(rest) = fid.path.strip_prefix(from) {
                fid.path = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
    }

    fn unlinkat(&mut self, r: &mut Reader) -> Result<()> {
        let dir = r.u32()?;
        let name = check_name(r.str()?)?;
        let flags = r.u32()?;
        self.modifiable()?;
        let at = if flags & AT_REMOVEDIR != 0 {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rustix::fs::unlinkat(&self.fid(dir)?.fd, name, at).map_err(os)
    }

    fn remove(&mut self, r: &mut Reader) -> Result<()> {
        // Tremove clunks the fid whether or not the removal works.
        let fid = self.fids.remove(&r.u32()?).ok_or(libc::EBADF)?;
        self.modifiable()?;
        let (Some(parent), Some(last)) = (fid.path.parent(), fid.path.file_name()) else {
            return Err(libc::EBUSY);
        };
        let at = if fid.kind == Kind::Dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rustix::fs::unlinkat(self.open_path(parent)?, last, at).map_err(os)
    }

    fn fsync(&mut self, r: &mut Reader) -> Result<()> {
        let (id, datasync) = (r.u32()?, r.u32()?);
        match &self.fid(id)?.open {
            Some(f) if datasync != 0 => f.sync_data().map_err(io),
            Some(f) => f.sync_all().map_err(io),
            None => Err(libc::EBADF),
        }
    }

    fn xattrwalk(&mut self, r: &mut Reader, w: &mut Writer) -> Result<()> {
        let (id, newid) = (r.u32()?, r.u32()?);
        let name = r.str()?;
        let from = self.fid(id)?;
        let value = if name.is_empty() {
            list_xattrs(from)?
        } else {
            get_xattr(from, check_xattr_name(name)?)?
        };
        let fd = rustix::io::fcntl_dupfd_cloexec(&from.fd, 0).map_err(os)?;
        let mut fid = new_fid(fd, from.path.clone(), &stat(&from.fd)?);
        fid.uid = from.uid;
        w.u64(value.len() as u64);
        fid.xattr = Some(Xattr::Value(value));
        self.insert(newid, fid)?;
        Ok(())
    }

    /// Turns the fid into one that sets an attribute: the value follows in
    /// Twrite, and Tclunk sets it.
    fn xattrcreate(&mut self, r: &mut Reader) -> Result<()> {
        let id = r.u32()?;
        let name = r.str()?.to_vec();
        let (size, flags) = (r.u64()?, r.u32()?);
        self.modifiable()?;
        check_xattr_name(&name)?;
        if !name.starts_with(XATTR_PREFIX) {
            return Err(libc::EOPNOTSUPP);
        }
        if size > XATTR_MAX as u64 {
            return Err(libc::E2BIG);
        }
        if flags & !(libc::XATTR_CREATE | libc::XATTR_REPLACE) as u32 != 0 {
            return Err(libc::EINVAL);
        }
        let fid = self.fids.get_mut(&id).ok_or(libc::EBADF)?;
        if fid.open.is_some() || fid.xattr.is_some() {
            return Err(libc::EBADF);
        }
        fid.xattr = Some(Xattr::Pending {
            name,
            size: size as usize,
            flags,
            data: Vec::new(),
        });
        Ok(())
    }
}

/// An attribute name the guest gives.
fn check_xattr_name(b: &[u8]) -> Result<&[u8]> {
    if b.is_empty() || b.contains(&0) {
        return Err(libc::EINVAL);
    }
    if b.len() > 255 {
        return Err(libc::ERANGE);
    }
    Ok(b)
}

/// Whether a fid's inode can carry the guest's attributes: `user.`
/// attributes exist only on regular files and directories.
fn has_xattrs(fid: &Fid) -> bool {
    matches!(fid.kind, Kind::File | Kind::Dir)
}

fn get_xattr(fid: &Fid, name: &[u8]) -> Result<Vec<u8>> {
    if !has_xattrs(fid) || !name.starts_with(XATTR_PREFIX) {
        return Err(libc::ENODATA);
    }
    let mut buf = vec![0; XATTR_MAX];
    let n = rustix::fs::getxattr(proc_path(&fid.fd), OsStr::from_bytes(name), &mut buf[..])
        .map_err(os)?;
    buf.truncate(n);
    Ok(buf)
}

/// The names of the fid's `user.` attributes, each ending in NUL.
fn list_xattrs(fid: &Fid) -> Result<Vec<u8>> {
    if !has_xattrs(fid) {
        return Ok(Vec::new());
    }
    let mut buf = vec![0; XATTR_MAX];
    let n = rustix::fs::listxattr(proc_path(&fid.fd), &mut buf[..]).map_err(os)?;
    let mut names = Vec::new();
    for name in buf[..n].split(|&b| b == 0) {
        if name.starts_with(XATTR_PREFIX) {
            names.extend_from_slice(name);
            names.push(0);
        }
    }
    Ok(names)
}

/// Tclunk of a fid from Txattrcreate: sets the attribute, or removes it for
/// an announced size of 0.
fn set_xattr(fid: &Fid) -> Result<()> {
    let Some(Xattr::Pending {
        name,
        size,
        flags,
        data,
    }) = &fid.xattr
    else {
        return Ok(());
    };
    if data.len() != *size {
        return Err(libc::EINVAL);
    }
    if !has_xattrs(fid) {
        return Err(libc::EPERM);
    }
    let (path, name) = (proc_path(&fid.fd), OsStr::from_bytes(name));
    if *size == 0 {
        return rustix::fs::removexattr(path, name).map_err(os);
    }
    let flags = rustix::fs::XattrFlags::from_bits_retain(*flags);
    rustix::fs::setxattr(path, name, data, flags).map_err(os)
}

fn new_fid(fd: OwnedFd, path: PathBuf, st: &Stat) -> Fid {
    Fid {
        fd,
        path,
        kind: Kind::of(st),
        open: None,
        writable: false,
        xattr: None,
        uid: 0,
    }
}

fn opath() -> OFlags {
    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn empty_path() -> AtFlags {
    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW
}

/// A name the guest gives for one directory entry.
fn check_name(b: &[u8]) -> Result<&OsStr> {
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(libc::EINVAL);
    }
    if b.len() > 255 {
        return Err(libc::ENAMETOOLONG);
    }
    Ok(OsStr::from_bytes(b))
}

fn stat(fd: &OwnedFd) -> Result<Stat> {
    rustix::fs::statat(fd, "", empty_path()).map_err(os)
}

fn qid(st: &Stat) -> Qid {
    let kind = match Kind::of(st) {
        Kind::Dir => wire::QID_DIR,
        Kind::Symlink => wire::QID_SYMLINK,
        _ => wire::QID_FILE,
    };
    Qid {
        kind,
        version: 0,
        path: st.st_ino,
    }
}

fn perm(mode: u32) -> Mode {
    Mode::from_raw_mode(mode & 0o7777)
}

/// The magic link to a descriptor the server holds: opening it reaches that
/// inode, whatever has happened to its name since.
fn proc_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Opens the inode `fd` names for I/O (never creating, never a tty).
fn reopen(fd: &OwnedFd, flags: OFlags) -> Result<OwnedFd> {
    rustix::fs::openat(
        CWD,
        proc_path(fd),
        flags | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(os)
}

/// An `O_PATH` descriptor for an open file's inode.
fn reopen_path(file: &impl AsFd) -> Result<OwnedFd> {
    rustix::fs::openat(
        CWD,
        proc_path(&file.as_fd()),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(os)
}

#[cfg(test)]
mod tests;
