//! The server against a real host directory, spoken to as the guest's 9p
//! client would (message by message), including what a hostile guest sends.

use super::wire::{op, Reader, Writer};
use super::*;

const ROOT: u32 = 0;

struct Client {
    server: Server,
    dir: tempfile::TempDir,
}

fn client(read_only: bool) -> Client {
    let dir = tempfile::tempdir().unwrap();
    client_in(dir, read_only, 1000)
}

fn client_in(dir: tempfile::TempDir, read_only: bool, max_fids: usize) -> Client {
    let mut c = Client {
        server: Server::new(dir.path(), read_only, max_fids).unwrap(),
        dir,
    };
    let r = c.ok(op::TVERSION, |w| {
        w.u32(262_144).str(b"9P2000.L");
    });
    let mut rd = Reader::new(&r);
    assert_eq!(rd.u32(), Ok(262_144));
    assert_eq!(rd.str(), Ok(&b"9P2000.L"[..]));
    c.ok(op::TATTACH, |w| {
        w.u32(ROOT).u32(!0).str(b"root").str(b"").u32(0);
    });
    c
}

impl Client {
    /// Sends one request; returns the reply's type and body.
    fn call(&mut self, kind: u8, body: impl FnOnce(&mut Writer)) -> (u8, Vec<u8>) {
        let mut w = Writer::new(kind, 7);
        body(&mut w);
        let reply = self.server.handle(&w.finish(), 1 << 20);
        assert_eq!(&reply[..4], &(reply.len() as u32).to_le_bytes());
        assert_eq!(&reply[5..7], &7u16.to_le_bytes(), "the tag comes back");
        (reply[4], reply[7..].to_vec())
    }

    fn ok(&mut self, kind: u8, body: impl FnOnce(&mut Writer)) -> Vec<u8> {
        let (t, b) = self.call(kind, body);
        assert_eq!(
            t,
            kind + 1,
            "request {kind} failed: errno {:?}",
            errno(t, &b)
        );
        b
    }

    fn err(&mut self, kind: u8, body: impl FnOnce(&mut Writer)) -> i32 {
        let (t, b) = self.call(kind, body);
        errno(t, &b).unwrap_or_else(|| panic!("request {kind} should have failed"))
    }

    fn walk(&mut self, from: u32, to: u32, names: &[&[u8]]) -> (u8, Vec<u8>) {
        self.call(op::TWALK, |w| {
            w.u32(from).u32(to).u16(names.len() as u16);
            for n in names {
                w.str(n);
            }
        })
    }

    fn walk_ok(&mut self, from: u32, to: u32, names: &[&[u8]]) {
        let (t, b) = self.walk(from, to, names);
        assert_eq!(t, op::TWALK + 1, "walk {names:?}: {:?}", errno(t, &b));
        assert_eq!(u16::from_le_bytes([b[0], b[1]]) as usize, names.len());
    }

    fn create(&mut self, dir: u32, name: &[u8], flags: u32) -> Result<()> {
        let (t, b) = self.call(op::TLCREATE, |w| {
            w.u32(dir).str(name).u32(flags).u32(0o644).u32(0);
        });
        errno(t, &b).map_or(Ok(()), Err)
    }

    fn write(&mut self, fid: u32, offset: u64, data: &[u8]) -> u32 {
        let b = self.ok(op::TWRITE, |w| {
            w.u32(fid).u64(offset).u32(data.len() as u32).raw(data);
        });
        Reader::new(&b).u32().unwrap()
    }

    fn read(&mut self, fid: u32, offset: u64, count: u32) -> Vec<u8> {
        let b = self.ok(op::TREAD, |w| {
            w.u32(fid).u64(offset).u32(count);
        });
        let mut r = Reader::new(&b);
        let n = r.u32().unwrap() as usize;
        r.bytes(n).unwrap().to_vec()
    }

    fn open(&mut self, fid: u32, flags: u32) -> Result<()> {
        let (t, b) = self.call(op::TLOPEN, |w| {
            w.u32(fid).u32(flags);
        });
        errno(t, &b).map_or(Ok(()), Err)
    }

    /// Tsetattr with uid and gid 0 and atime 0; mtime is `mtime` s + 5 ns.
    fn setattr(&mut self, fid: u32, valid: u32, mode: u32, size: u64, mtime: u64) -> Result<()> {
        let (t, b) = self.call(op::TSETATTR, |w| {
            w.u32(fid).u32(valid).u32(mode).u32(0).u32(0).u64(size);
            w.u64(0).u64(0).u64(mtime).u64(5);
        });
        errno(t, &b).map_or(Ok(()), Err)
    }

    fn clunk(&mut self, fid: u32) {
        self.ok(op::TCLUNK, |w| {
            w.u32(fid);
        });
    }

    /// Every name in a directory fid, read `count` bytes at a time.
    fn list(&mut self, dir: u32, count: u32) -> Vec<String> {
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let b = self.ok(op::TREADDIR, |w| {
                w.u32(dir).u64(offset).u32(count);
            });
            let mut r = Reader::new(&b);
            let n = r.u32().unwrap() as usize;
            if n == 0 {
                return names;
            }
            let mut e = Reader::new(r.bytes(n).unwrap());
            while let Ok(_qid) = e.bytes(13) {
                offset = e.u64().unwrap();
                let _type = e.u8().unwrap();
                names.push(String::from_utf8(e.str().unwrap().to_vec()).unwrap());
            }
        }
    }

    fn host(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

fn errno(t: u8, body: &[u8]) -> Option<i32> {
    (t == op::RLERROR).then(|| Reader::new(body).u32().unwrap() as i32)
}

#[test]
fn a_file_created_written_and_read_back_lands_on_the_host() {
    let mut c = client(false);
    c.walk_ok(ROOT, 1, &[]);
    c.create(1, b"hello.txt", libc::O_RDWR as u32).unwrap();
    assert_eq!(c.write(1, 0, b"hello from the guest\n"), 21);
    assert_eq!(c.write(1, 6, b"FROM"), 4);
    assert_eq!(c.read(1, 0, 4096), b"hello FROM the guest\n");
    assert_eq!(c.read(1, 100, 4096), b"", "past the end");
    c.clunk(1);
    assert_eq!(
        std::fs::read(c.host("hello.txt")).unwrap(),
        b"hello FROM the guest\n"
    );
    // A file the host made, read through a new walk.
    std::fs::write(c.host("host.bin"), (0..=255u8).collect::<Vec<_>>()).unwrap();
    c.walk_ok(ROOT, 2, &[b"host.bin"]);
    c.open(2, libc::O_RDONLY as u32).unwrap();
    assert_eq!(c.read(2, 250, 100), vec![250, 251, 252, 253, 254, 255]);
    assert_eq!(
        c.err(op::TWRITE, |w| {
            w.u32(2).u64(0).u32(1).raw(b"x");
        }),
        libc::EBADF,
        "opened read-only"
    );
}

#[test]
fn directories_list_and_attributes_change() {
    let mut c = client(false);
    let q = c.ok(op::TMKDIR, |w| {
        w.u32(ROOT).str(b"sub").u32(0o750).u32(0);
    });
    assert_eq!(q[0], wire::QID_DIR);
    for i in 0..300 {
        std::fs::write(c.host(&format!("sub/file-with-a-longish-name-{i:03}")), b"").unwrap();
    }
    c.walk_ok(ROOT, 1, &[b"sub"]);
    c.open(1, libc::O_RDONLY as u32).unwrap();
    // Small pages: every entry exactly once across many Treaddir calls.
    let mut names = c.list(1, 500);
    names.sort();
    assert_eq!(names.len(), 302);
    assert_eq!(&names[..2], &[".", ".."]);
    names.dedup();
    assert_eq!(names.len(), 302, "no entry twice");
    assert_eq!(c.open(1, libc::O_WRONLY as u32), Err(libc::EISDIR));

    c.walk_ok(1, 2, &[b"file-with-a-longish-name-007"]);
    c.setattr(2, SET_MODE | SET_SIZE, 0o600, 12345, 0).unwrap();
    c.setattr(2, SET_MTIME | SET_MTIME_SET, 0, 0, 1_000_000_000)
        .unwrap();
    let b = c.ok(op::TGETATTR, |w| {
        w.u32(2).u64(GETATTR_BASIC);
    });
    let mut r = Reader::new(&b);
    assert_eq!(r.u64(), Ok(GETATTR_BASIC));
    r.bytes(13).unwrap();
    assert_eq!(r.u32(), Ok(libc::S_IFREG | 0o600));
    let (uid, _gid) = (r.u32().unwrap(), r.u32().unwrap());
    assert_eq!(uid, rustix::process::getuid().as_raw());
    let (_nlink, _rdev, size) = (r.u64().unwrap(), r.u64().unwrap(), r.u64().unwrap());
    assert_eq!(size, 12345);
    let _ = (r.u64(), r.u64(), r.u64(), r.u64());
    assert_eq!((r.u64(), r.u64()), (Ok(1_000_000_000), Ok(5)), "mtime");
    let meta = std::fs::metadata(c.host("sub/file-with-a-longish-name-007")).unwrap();
    assert_eq!(meta.len(), 12345);

    let b = c.ok(op::TSTATFS, |w| {
        w.u32(ROOT);
    });
    let mut r = Reader::new(&b);
    let (_type, bsize) = (r.u32().unwrap(), r.u32().unwrap());
    assert!(bsize >= 512);
}

#[test]
fn renames_removals_and_links_keep_fids_right() {
    let mut c = client(false);
    c.ok(op::TMKDIR, |w| {
        w.u32(ROOT).str(b"a").u32(0o755).u32(0);
    });
    c.walk_ok(ROOT, 1, &[b"a"]);
    c.create(1, b"f", libc::O_WRONLY as u32).unwrap();
    c.write(1, 0, b"data");
    c.walk_ok(ROOT, 2, &[b"a"]);
    // Trenameat moves the directory; the fid on a/f follows it.
    c.ok(op::TRENAMEAT, |w| {
        w.u32(ROOT).str(b"a").u32(ROOT).str(b"b");
    });
    assert!(c.host("b/f").exists() && !c.host("a").exists());
    c.ok(op::TRENAME, |w| {
        w.u32(1).u32(2).str(b"g");
    });
    assert_eq!(std::fs::read(c.host("b/g")).unwrap(), b"data");
    c.ok(op::TLINK, |w| {
        w.u32(ROOT).u32(1).str(b"hard");
    });
    assert_eq!(std::fs::read(c.host("hard")).unwrap(), b"data");
    c.ok(op::TREMOVE, |w| {
        w.u32(1);
    });
    assert!(!c.host("b/g").exists());
    assert_eq!(c.open(1, 0), Err(libc::EBADF), "Tremove clunked the fid");
    c.ok(op::TUNLINKAT, |w| {
        w.u32(ROOT).str(b"b").u32(AT_REMOVEDIR);
    });
    assert!(!c.host("b").exists());
    c.ok(op::TUNLINKAT, |w| {
        w.u32(ROOT).str(b"hard").u32(0);
    });
    assert!(!c.host("hard").exists());
}

#[test]
fn symlinks_are_the_guests_to_follow_never_the_hosts() {
    let mut c = client(false);
    let q = c.ok(op::TSYMLINK, |w| {
        w.u32(ROOT).str(b"up").str(b"/").u32(0);
    });
    assert_eq!(q[0], wire::QID_SYMLINK);
    std::os::unix::fs::symlink("/etc/passwd", c.host("pw")).unwrap();
    // Walking through a symlink does not reach the host's /.
    let (t, b) = c.walk(ROOT, 1, &[b"up", b"etc"]);
    assert_eq!(t, op::TWALK + 1);
    assert_eq!(&b[..2], &1u16.to_le_bytes(), "only `up` itself was walked");
    c.walk_ok(ROOT, 1, &[b"up"]);
    let b = c.ok(op::TREADLINK, |w| {
        w.u32(1);
    });
    assert_eq!(Reader::new(&b).str(), Ok(&b"/"[..]));
    c.walk_ok(ROOT, 2, &[b"pw"]);
    assert_eq!(c.open(2, 0), Err(libc::ELOOP), "opening a symlink");
    assert_eq!(
        c.err(op::TLINK, |w| {
            w.u32(ROOT).u32(2).str(b"stolen");
        }),
        libc::EPERM,
        "a hard link through a symlink"
    );
    assert_eq!(
        c.setattr(2, SET_SIZE, 0, 0, 0),
        Err(libc::EINVAL),
        "truncating through a symlink"
    );
    // Creating over a symlink does not follow it either.
    assert_eq!(
        c.create(ROOT, b"pw", libc::O_WRONLY as u32),
        Err(libc::ELOOP)
    );
    assert!(std::fs::symlink_metadata(c.host("pw"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn dot_dot_stays_inside_the_share() {
    let mut c = client(false);
    let (_, root) = c.walk(ROOT, 9, &[b"."]);
    assert_eq!(
        errno(op::RLERROR, &root),
        Some(libc::EINVAL),
        "`.` is no name"
    );
    std::fs::create_dir(c.host("d")).unwrap();
    let (t, b) = c.walk(ROOT, 1, &[b"..", b"..", b"d", b"..", b"d"]);
    assert_eq!(t, op::TWALK + 1);
    assert_eq!(u16::from_le_bytes([b[0], b[1]]), 5);
    let qids: Vec<&[u8]> = b[2..].chunks(13).collect();
    let root_qid = &c.ok(op::TGETATTR, |w| {
        w.u32(ROOT).u64(GETATTR_BASIC);
    })[8..21];
    assert_eq!(qids[0], root_qid, ".. of the root is the root");
    assert_eq!(qids[1], root_qid);
    assert_eq!(qids[3], root_qid, "d/.. is the root");
    assert_eq!(qids[4][0], wire::QID_DIR);
}

#[test]
fn hostile_requests_get_errors_not_crashes() {
    let mut c = client(false);
    for name in [&b""[..], b".", b"..", b"a/b", b"/etc", b"x\0y"] {
        assert_eq!(
            c.create(ROOT, name, libc::O_WRONLY as u32),
            Err(libc::EINVAL),
            "{name:?}"
        );
    }
    assert_eq!(c.create(ROOT, &[b'n'; 256], 0), Err(libc::ENAMETOOLONG));
    let seventeen: Vec<&[u8]> = vec![b"a"; 17];
    assert_eq!(
        errno(op::RLERROR, &c.walk(ROOT, 1, &seventeen).1),
        Some(libc::EINVAL)
    );
    assert_eq!(c.open(42, 0), Err(libc::EBADF), "unknown fid");
    // Messages cut short: every prefix of a valid Twalk body.
    let mut full = Writer::new(op::TWALK, 7);
    full.u32(ROOT).u32(3).u16(2).str(b"aa").str(b"bb");
    let full = full.finish();
    for cut in super::HEADER..full.len() {
        let mut m = full[..cut].to_vec();
        m[..4].copy_from_slice(&(cut as u32).to_le_bytes());
        let reply = c.server.handle(&m, 4096);
        assert_eq!(reply[4], op::RLERROR, "cut at {cut}");
        assert_eq!(Reader::new(&reply[7..]).u32(), Ok(libc::EPROTO as u32));
    }
    // A write claiming more data than it carries.
    c.walk_ok(ROOT, 1, &[]);
    c.create(1, b"w", libc::O_WRONLY as u32).unwrap();
    assert_eq!(
        c.err(op::TWRITE, |w| {
            w.u32(1).u64(0).u32(1000).raw(b"short");
        }),
        libc::EPROTO
    );
    assert_eq!(
        c.err(op::TAUTH, |w| {
            w.u32(5).str(b"u").str(b"");
        }),
        libc::EOPNOTSUPP
    );
    assert_eq!(c.err(0xee, |_| {}), libc::EOPNOTSUPP, "unknown type");
    assert_eq!(
        c.err(op::TATTACH, |w| {
            w.u32(ROOT).u32(!0).str(b"").str(b"").u32(0);
        }),
        libc::EBADF,
        "attach over a live fid"
    );
    assert_eq!(
        c.err(op::TMKNOD, |w| {
            w.u32(ROOT)
                .str(b"sda")
                .u32(libc::S_IFBLK | 0o600)
                .u32(8)
                .u32(0)
                .u32(0);
        }),
        libc::EPERM,
        "no device nodes on the host"
    );
    // A fifo the host put there is seen, never opened (it would block).
    rustix::fs::mknodat(CWD, c.host("fifo"), FileType::Fifo, Mode::RUSR, 0).unwrap();
    c.walk_ok(ROOT, 2, &[b"fifo"]);
    assert_eq!(c.open(2, 0), Err(libc::ENXIO));
}

#[test]
fn replies_fit_the_room_the_guest_gave() {
    let mut c = client(false);
    std::fs::write(c.host("big"), vec![7u8; 100_000]).unwrap();
    c.walk_ok(ROOT, 1, &[b"big"]);
    c.open(1, 0).unwrap();
    let mut w = Writer::new(op::TREAD, 1);
    w.u32(1).u64(0).u32(65_536);
    let reply = c.server.handle(&w.finish(), 4096);
    assert_eq!(reply.len(), 4096, "a read is cut to the buffer");
    assert_eq!(Reader::new(&reply[7..]).u32(), Ok(4096 - 11));
    // A readlink that cannot fit says so rather than overrunning.
    std::os::unix::fs::symlink("x".repeat(200), c.host("long")).unwrap();
    c.walk_ok(ROOT, 2, &[b"long"]);
    let mut w = Writer::new(op::TREADLINK, 1);
    w.u32(2);
    let reply = c.server.handle(&w.finish(), 64);
    assert_eq!(reply[4], op::RLERROR);
    assert_eq!(Reader::new(&reply[7..]).u32(), Ok(libc::EMSGSIZE as u32));
}

#[test]
fn a_read_only_share_refuses_every_change() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep"), b"original").unwrap();
    let mut c = client_in(dir, true, 1000);
    c.walk_ok(ROOT, 1, &[b"keep"]);
    assert_eq!(c.open(1, libc::O_RDWR as u32), Err(libc::EROFS));
    assert_eq!(c.open(1, libc::O_TRUNC as u32), Err(libc::EROFS));
    c.open(1, 0).unwrap();
    assert_eq!(c.read(1, 0, 100), b"original");
    assert_eq!(c.create(ROOT, b"new", 1), Err(libc::EROFS));
    let e = c.err(op::TMKDIR, |w| {
        w.u32(ROOT).str(b"d").u32(0o755).u32(0);
    });
    assert_eq!(e, libc::EROFS);
    assert_eq!(c.setattr(1, SET_MODE, 0o777, 0, 0), Err(libc::EROFS));
    let e = c.err(op::TUNLINKAT, |w| {
        w.u32(ROOT).str(b"keep").u32(0);
    });
    assert_eq!(e, libc::EROFS);
    assert_eq!(std::fs::read(c.host("keep")).unwrap(), b"original");
}

#[test]
fn fids_are_bounded() {
    let mut c = client_in(tempfile::tempdir().unwrap(), false, 20);
    for fid in 1..20 {
        c.walk_ok(ROOT, fid, &[]);
    }
    assert_eq!(
        errno(op::RLERROR, &c.walk(ROOT, 100, &[]).1),
        Some(libc::ENFILE)
    );
    c.clunk(5);
    c.walk_ok(ROOT, 100, &[]);
    // Tversion starts over: every fid is gone.
    c.ok(op::TVERSION, |w| {
        w.u32(8192).str(b"9P2000.L");
    });
    assert_eq!(c.open(100, 0), Err(libc::EBADF));
}

#[test]
fn every_operation_runs_under_the_share_threads_seccomp_filter() {
    // A system call missing from the filter raises SIGSYS, which ends the
    // whole test process: this test cannot pass by accident.
    let c = client(false);
    let c = std::thread::spawn(move || {
        let mut c = c;
        crate::seccomp::Profile::FileServer.install().unwrap();
        c.walk_ok(ROOT, 1, &[]);
        c.create(1, b"f", libc::O_RDWR as u32).unwrap();
        c.write(1, 0, b"some bytes");
        assert_eq!(c.read(1, 5, 100), b"bytes");
        c.ok(op::TFSYNC, |w| {
            w.u32(1).u32(0);
        });
        c.ok(op::TFSYNC, |w| {
            w.u32(1).u32(1);
        });
        let valid = SET_MODE | SET_UID | SET_GID | SET_SIZE | SET_ATIME | SET_MTIME;
        c.setattr(1, valid, 0o600, 4, 0).unwrap();
        c.ok(op::TGETATTR, |w| {
            w.u32(1).u64(GETATTR_BASIC);
        });
        c.ok(op::TSTATFS, |w| {
            w.u32(1);
        });
        c.ok(op::TMKDIR, |w| {
            w.u32(ROOT).str(b"d").u32(0o755).u32(0);
        });
        c.ok(op::TSYMLINK, |w| {
            w.u32(ROOT).str(b"s").str(b"f").u32(0);
        });
        c.ok(op::TMKNOD, |w| {
            w.u32(ROOT)
                .str(b"p")
                .u32(libc::S_IFIFO | 0o600)
                .u32(0)
                .u32(0)
                .u32(0);
        });
        c.walk_ok(ROOT, 2, &[b"s"]);
        c.ok(op::TREADLINK, |w| {
            w.u32(2);
        });
        c.ok(op::TLINK, |w| {
            w.u32(ROOT).u32(1).str(b"h");
        });
        c.ok(op::TRENAMEAT, |w| {
            w.u32(ROOT).str(b"h").u32(ROOT).str(b"h2");
        });
        c.ok(op::TRENAME, |w| {
            w.u32(1).u32(ROOT).str(b"g");
        });
        c.walk_ok(ROOT, 3, &[b"d"]);
        c.open(3, 0).unwrap();
        assert!(c.list(3, 8192).contains(&".".to_string()));
        c.ok(op::TXATTRWALK, |w| {
            w.u32(ROOT).u32(4).str(b"");
        });
        c.set_xattr(1, b"user.a", b"value").unwrap();
        assert_eq!(c.get_xattr(1, b"user.a"), Ok(b"value".to_vec()));
        c.set_xattr(1, b"user.a", b"").unwrap();
        c.ok(op::TMKNOD, |w| {
            w.u32(ROOT)
                .str(b"wh")
                .u32(libc::S_IFCHR)
                .u32(0)
                .u32(0)
                .u32(0);
        });
        c.ok(op::TREMOVE, |w| {
            w.u32(1);
        });
        c.ok(op::TUNLINKAT, |w| {
            w.u32(ROOT).str(b"d").u32(AT_REMOVEDIR);
        });
        c
    })
    .join()
    .unwrap();
    assert!(!c.host("g").exists() && c.host("h2").exists());
}

#[test]
fn files_belong_to_the_guest_user_when_the_host_allows() {
    use std::os::unix::fs::MetadataExt;
    let mut c = client(false);
    // The kernel attaches once per guest user (access=user), n_uname 1000.
    c.ok(op::TATTACH, |w| {
        w.u32(50).u32(!0).str(b"").str(b"").u32(1000);
    });
    c.walk_ok(50, 51, &[]);
    c.create(51, b"mine", libc::O_WRONLY as u32).unwrap();
    c.ok(op::TMKDIR, |w| {
        w.u32(50).str(b"dir").u32(0o755).u32(1000);
    });
    let want = if rustix::process::geteuid().is_root() {
        1000
    } else {
        rustix::process::geteuid().as_raw() // security_model=none: the host said no
    };
    for p in ["mine", "dir"] {
        assert_eq!(std::fs::metadata(c.host(p)).unwrap().uid(), want, "{p}");
    }
}

impl Client {
    /// Sets (or with an empty `value` and `size` 0, removes) an attribute
    /// as the guest's client does: Txattrcreate, Twrite, Tclunk.
    fn set_xattr(&mut self, fid: u32, name: &[u8], value: &[u8]) -> Result<()> {
        self.walk_ok(fid, 90, &[]);
        let (t, b) = self.call(op::TXATTRCREATE, |w| {
            w.u32(90).str(name).u64(value.len() as u64).u32(0);
        });
        if let Some(e) = errno(t, &b) {
            self.clunk(90);
            return Err(e);
        }
        if !value.is_empty() {
            // In two parts, as a value longer than one message comes.
            let half = value.len() / 2;
            self.write(90, 0, &value[..half]);
            self.write(90, half as u64, &value[half..]);
        }
        let (t, b) = self.call(op::TCLUNK, |w| {
            w.u32(90);
        });
        errno(t, &b).map_or(Ok(()), Err)
    }

    /// Txattrwalk then Tread: an attribute's value, or with "" the list.
    fn get_xattr(&mut self, fid: u32, name: &[u8]) -> Result<Vec<u8>> {
        let (t, b) = self.call(op::TXATTRWALK, |w| {
            w.u32(fid).u32(91).str(name);
        });
        if let Some(e) = errno(t, &b) {
            return Err(e);
        }
        let size = Reader::new(&b).u64().unwrap();
        let value = self.read(91, 0, 1 << 16);
        assert_eq!(
            value.len() as u64,
            size,
            "the size announced is the size read"
        );
        self.clunk(91);
        Ok(value)
    }
}

#[test]
fn user_attributes_are_set_read_listed_and_removed() {
    let mut c = client(false);
    c.walk_ok(ROOT, 1, &[]);
    c.create(1, b"f", libc::O_RDWR as u32).unwrap();
    c.ok(op::TMKDIR, |w| {
        w.u32(ROOT).str(b"d").u32(0o755).u32(0);
    });
    c.walk_ok(ROOT, 2, &[b"d"]);
    // What overlayfs with userxattr marks an opaque directory with.
    c.set_xattr(2, b"user.overlay.opaque", b"y").unwrap();
    assert_eq!(
        rustix::fs::getxattr(c.host("d"), "user.overlay.opaque", &mut [0u8; 8][..]),
        Ok(1),
        "the attribute is on the host's directory"
    );
    assert_eq!(c.get_xattr(2, b"user.overlay.opaque"), Ok(b"y".to_vec()));
    c.set_xattr(1, b"user.note", &[7u8; 3000]).unwrap();
    assert_eq!(c.get_xattr(1, b"user.note"), Ok(vec![7u8; 3000]));
    // Only user. attributes are seen or made.
    rustix::fs::setxattr(
        c.host("f"),
        "trusted.hidden",
        b"x",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    assert_eq!(c.get_xattr(1, b""), Ok(b"user.note\0".to_vec()));
    assert_eq!(c.get_xattr(1, b"trusted.hidden"), Err(libc::ENODATA));
    assert_eq!(
        c.set_xattr(1, b"trusted.overlay.opaque", b"y"),
        Err(libc::EOPNOTSUPP)
    );
    assert_eq!(
        c.set_xattr(1, b"security.capability", b"y"),
        Err(libc::EOPNOTSUPP)
    );
    // Size 0 removes, as the guest's removexattr sends it.
    c.set_xattr(1, b"user.note", b"").unwrap();
    assert_eq!(c.get_xattr(1, b"user.note"), Err(libc::ENODATA));
    assert_eq!(c.get_xattr(1, b""), Ok(Vec::new()));
    // A value that does not come as announced is not set.
    c.walk_ok(1, 92, &[]);
    c.ok(op::TXATTRCREATE, |w| {
        w.u32(92).str(b"user.short").u64(10).u32(0);
    });
    c.write(92, 0, b"abc");
    let e = c.err(op::TWRITE, |w| {
        w.u32(92).u64(0).u32(3).raw(b"abc");
    });
    assert_eq!(e, libc::EINVAL, "a write out of order");
    let e = c.err(op::TWRITE, |w| {
        w.u32(92).u64(3).u32(8).raw(b"too long");
    });
    assert_eq!(e, libc::EINVAL, "a write past the announced size");
    assert_eq!(
        c.err(op::TCLUNK, |w| {
            w.u32(92);
        }),
        libc::EINVAL
    );
    assert_eq!(c.get_xattr(1, b"user.short"), Err(libc::ENODATA));
    let e = c.err(op::TXATTRCREATE, |w| {
        w.u32(1).str(b"user.big").u64(1 << 20).u32(0);
    });
    assert_eq!(e, libc::E2BIG);
    // Symlinks carry none.
    c.ok(op::TSYMLINK, |w| {
        w.u32(ROOT).str(b"s").str(b"f").u32(0);
    });
    c.walk_ok(ROOT, 3, &[b"s"]);
    assert_eq!(c.get_xattr(3, b""), Ok(Vec::new()));
    assert_eq!(c.set_xattr(3, b"user.x", b"1"), Err(libc::EPERM));
}

#[test]
fn the_only_device_node_is_overlayfs_whiteout() {
    let mut c = client(false);
    let mknod = |c: &mut Client, name: &[u8], major: u32, minor: u32| {
        let (t, b) = c.call(op::TMKNOD, |w| {
            w.u32(ROOT)
                .str(name)
                .u32(libc::S_IFCHR)
                .u32(major)
                .u32(minor)
                .u32(0);
        });
        errno(t, &b).map_or(Ok(()), Err)
    };
    mknod(&mut c, b"gone", 0, 0).unwrap();
    let st = rustix::fs::lstat(c.host("gone")).unwrap();
    assert_eq!(
        FileType::from_raw_mode(st.st_mode),
        FileType::CharacterDevice
    );
    assert_eq!(st.st_rdev, 0);
    assert_eq!(mknod(&mut c, b"null", 1, 3), Err(libc::EPERM));
    assert!(!c.host("null").exists());
    c.walk_ok(ROOT, 1, &[b"gone"]);
    assert_eq!(c.open(1, 0), Err(libc::ENXIO), "a whiteout is never opened");
}

#[test]
fn a_read_only_share_sets_no_attribute() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep"), b"original").unwrap();
    let mut c = client_in(dir, true, 1000);
    c.walk_ok(ROOT, 1, &[b"keep"]);
    assert_eq!(c.set_xattr(1, b"user.x", b"1"), Err(libc::EROFS));
    assert_eq!(c.get_xattr(1, b""), Ok(Vec::new()));
}
