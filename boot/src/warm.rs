//! `hyper.warm=PROGRAM` (see [`hyper_contract::WARM_ARG`]): before the
//! snapshot point, read the image's own program and the ELF interpreter it
//! names, so that their pages are in the page cache, decompressed, when the
//! snapshot is taken. A restored app then starts without reading (and
//! inflating) its image over virtio-blk. The same for [`RUN_FILES`], which
//! every run reads. Best effort: whatever is missing or unreadable is
//! skipped.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};

use hyper_contract::elf::{Header, PT_INTERP};
use hyper_contract::{DEFAULT_PATH, WARM_ARG};

/// At most this much of a file is read ahead: the time goes to the boot
/// and the pages to guest memory (a large program's start is what runs first).
const MAX_BYTES: u64 = 32 << 20;

/// The program named on the kernel command line, if any.
pub fn program(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(WARM_ARG))
        .filter(|p| !p.is_empty())
}

/// The candidates for `program` in the image: itself if it has a slash,
/// else each directory of the default PATH.
pub fn candidates(program: &str) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_string()];
    }
    DEFAULT_PATH
        .split(':')
        .map(|d| format!("{d}/{program}"))
        .collect()
}

/// The interpreter an ELF executable names (PT_INTERP), from its first
/// bytes; `None` for a static executable or anything else.
pub fn interpreter(head: &[u8]) -> Option<String> {
    let h = Header::parse(head).ok()?;
    let (offset, len) = h.program_table().ok()?;
    let table = head.get(usize::try_from(offset).ok()?..)?;
    let table = table.get(..usize::try_from(len).ok()?)?;
    let ph = h
        .program_headers(table)
        .ok()?
        .into_iter()
        .find(|p| p.kind == PT_INTERP)?;
    let start = usize::try_from(ph.offset).ok()?;
    let bytes = head.get(start..start.checked_add(usize::try_from(ph.filesz).ok()?)?)?;
    let path = bytes.split(|&b| b == 0).next()?;
    std::str::from_utf8(path)
        .ok()
        .filter(|p| p.starts_with('/'))
        .map(str::to_string)
}

/// The interpreter a script names on its `#!` line (nginx's image starts
/// with `/docker-entrypoint.sh`, a `#!/bin/sh` script).
pub fn shebang(head: &[u8]) -> Option<String> {
    let line = head.strip_prefix(b"#!")?;
    let line = line.split(|&b| b == b'\n').next()?;
    let word = std::str::from_utf8(line).ok()?.split_whitespace().next()?;
    word.starts_with('/').then(|| word.to_string())
}

/// Opens `path` inside the tree at `root` as the image sees it: absolute
/// symbolic links resolve under `root`, and nothing escapes it
/// (openat2's RESOLVE_IN_ROOT). Only a regular file is opened for reading:
/// a FIFO would block, and a device node (the root's /dev is devtmpfs by
/// now) could act on being opened.
fn open_in(root: &OwnedFd, path: &str) -> Option<std::fs::File> {
    let probe = openat2_in(root, path, libc::O_PATH)?;
    if !probe.metadata().ok()?.is_file() {
        return None;
    }
    openat2_in(
        root,
        path,
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
    )
}

fn openat2_in(root: &OwnedFd, path: &str, flags: i32) -> Option<std::fs::File> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_IN_ROOT: u64 = 0x10;
    use std::os::fd::AsRawFd;
    let c = CString::new(path.trim_start_matches('/')).ok()?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_IN_ROOT,
    };
    // SAFETY: `c` and `how` outlive the call; the size is the struct's.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Some(std::fs::File::from(unsafe {
        OwnedFd::from_raw_fd(fd as i32)
    }))
}

/// Reads a file to its end (at most [`MAX_BYTES`]), returning its first
/// 4 KiB and the bytes read.
fn read_through(mut f: std::fs::File) -> (Vec<u8>, u64) {
    let mut head = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    while total < MAX_BYTES {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let take = n.min(4096 - head.len());
                head.extend_from_slice(&buf[..take]);
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    (head, total)
}

/// Reads `program`, its interpreter (an ELF file's, or a script's) and, as
/// a script's interpreter may be dynamically linked, that one's, from the
/// tree at `root`; returns the files read, with their sizes.
pub fn warm(root: &str, program: &str) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::File::open(root) else {
        return Vec::new();
    };
    let dir = OwnedFd::from(dir);
    let open = |p: String| open_in(&dir, &p).map(|f| (p, f));
    let mut next = candidates(program).into_iter().find_map(open);
    let mut done = Vec::new();
    while let Some((path, file)) = next.take() {
        let (head, n) = read_through(file);
        done.push((path, n));
        if done.len() < 3 {
            next = interpreter(&head).or_else(|| shebang(&head)).and_then(open);
        }
    }
    done
}

/// What hyperinit reads of every image after the run configuration came:
/// the user and group databases, and the files it writes for the run (an
/// image's own copy is looked up before overlayfs replaces it). Read
/// before the snapshot, they are not read from the disk by each restore.
pub const RUN_FILES: [&str; 5] = [
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
];

/// Reads each of `paths` (regular files only, inside `root`) into the page
/// cache; returns what was read: (path, bytes).
pub fn warm_files(root: &str, paths: &[&str]) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::File::open(root) else {
        return Vec::new();
    };
    let dir = OwnedFd::from(dir);
    paths
        .iter()
        .filter_map(|p| open_in(&dir, p).map(|f| (p.to_string(), read_through(f).1)))
        .collect()
}

/// The files hyperinit writes for every run (Docker's generated ones).
pub const WRITTEN_FILES: [&str; 3] = ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"];

/// Opens for writing, and closes unchanged, each of `paths` that is a
/// regular file inside `root` (the overlay root): overlayfs copies it, and
/// its directory, up to the writable layer, the work a run's first write of
/// the file would do. Done before the snapshot, no restore pays for it; the
/// contents stay the image's until the run writes its own. Returns the
/// paths copied up.
pub fn copy_up(root: &str, paths: &[&str]) -> Vec<String> {
    let Ok(dir) = std::fs::File::open(root) else {
        return Vec::new();
    };
    let dir = OwnedFd::from(dir);
    paths
        .iter()
        .filter(|p| {
            openat2_in(&dir, p, libc::O_PATH)
                .and_then(|f| f.metadata().ok())
                .is_some_and(|m| m.is_file())
        })
        .filter(|p| {
            openat2_in(&dir, p, libc::O_WRONLY | libc::O_NONBLOCK | libc::O_NOCTTY).is_some()
        })
        .map(|p| p.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copying_up_leaves_contents_and_skips_what_is_not_a_regular_file() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::fs::write(etc.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::create_dir(etc.join("hostname")).unwrap();
        std::os::unix::fs::symlink("/etc/hosts", etc.join("resolv.conf")).unwrap();
        let done = copy_up(root.path().to_str().unwrap(), &WRITTEN_FILES);
        // The absolute link resolves inside the root: to its /etc/hosts.
        assert_eq!(done, ["/etc/hosts", "/etc/resolv.conf"]);
        assert_eq!(
            std::fs::read_to_string(etc.join("hosts")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert!(copy_up("/nonexistent-root", &WRITTEN_FILES).is_empty());
    }

    #[test]
    fn the_program_comes_from_the_command_line() {
        assert_eq!(
            program("console=hvc0 hyper.start=port hyper.warm=/bin/busybox quiet"),
            Some("/bin/busybox")
        );
        assert_eq!(program("hyper.start=port hyper.warm="), None);
        assert_eq!(program("hyper.start=port"), None);
    }

    #[test]
    fn a_bare_name_is_looked_up_in_the_default_path() {
        assert_eq!(candidates("/srv/app"), vec!["/srv/app".to_string()]);
        let c = candidates("nginx");
        assert_eq!(c.first().map(String::as_str), Some("/usr/local/sbin/nginx"));
        assert!(c.contains(&"/bin/nginx".to_string()));
    }

    /// An x86-64 ELF header with one PT_INTERP program header naming `interp`.
    fn elf_with_interp(interp: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let off = b.len() as u64;
        b[64..68].copy_from_slice(&PT_INTERP.to_le_bytes());
        b[64 + 8..64 + 16].copy_from_slice(&off.to_le_bytes());
        b[64 + 32..64 + 40].copy_from_slice(&(interp.len() as u64).to_le_bytes());
        b.extend_from_slice(interp);
        b
    }

    #[test]
    fn the_interpreter_is_read_from_the_program_headers() {
        let b = elf_with_interp(b"/lib64/ld-linux-x86-64.so.2\0");
        assert_eq!(
            interpreter(&b).as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        // Cut short, relative, or no ELF at all: nothing.
        assert_eq!(interpreter(&b[..b.len() - 10]), None);
        assert_eq!(interpreter(&elf_with_interp(b"ld.so\0")), None);
        assert_eq!(interpreter(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn a_scripts_interpreter_is_its_first_line() {
        assert_eq!(shebang(b"#!/bin/sh\nset -e\n").as_deref(), Some("/bin/sh"));
        assert_eq!(
            shebang(b"#! /usr/bin/env python3\n").as_deref(),
            Some("/usr/bin/env")
        );
        assert_eq!(shebang(b"#!sh\n"), None);
        assert_eq!(shebang(b"\x7fELF"), None);
    }

    #[test]
    fn absolute_links_resolve_inside_the_root_and_the_file_is_read() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("lib")).unwrap();
        std::fs::write(root.join("lib/ld.so"), b"loader").unwrap();
        std::fs::write(root.join("bin/real"), elf_with_interp(b"/lib/ld.so\0")).unwrap();
        std::os::unix::fs::symlink("/bin/real", root.join("bin/app")).unwrap();
        // An absolute link would leave the root if resolved as the host sees it.
        std::os::unix::fs::symlink("/etc/hostname", root.join("bin/out")).unwrap();
        let got = warm(root.to_str().unwrap(), "app");
        assert_eq!(
            got,
            vec![
                ("/bin/app".to_string(), 64 + 56 + 11),
                ("/lib/ld.so".to_string(), 6)
            ]
        );
        assert!(warm(root.to_str().unwrap(), "/bin/out").is_empty());
        // A script: itself, its interpreter, and that one's loader.
        std::fs::write(root.join("entry.sh"), b"#!/bin/app\nexec x\n").unwrap();
        let got: Vec<String> = warm(root.to_str().unwrap(), "/entry.sh")
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(got, ["/entry.sh", "/bin/app", "/lib/ld.so"]);
        assert!(warm(root.to_str().unwrap(), "missing").is_empty());
        // Not a regular file: never opened for reading (a FIFO would block).
        let fifo = std::ffi::CString::new(root.join("bin/fifo").to_str().unwrap()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert!(warm(root.to_str().unwrap(), "/bin/fifo").is_empty());
        assert!(warm(root.to_str().unwrap(), "/bin").is_empty());
    }

    #[test]
    fn the_run_files_an_image_has_are_read_and_the_rest_skipped() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
        // A link out of the root stays inside it: /etc/hostname is not there.
        std::os::unix::fs::symlink("/etc/hostname", root.join("etc/hosts")).unwrap();
        std::fs::create_dir_all(root.join("etc/group")).unwrap();
        let got = warm_files(root.to_str().unwrap(), &RUN_FILES);
        assert_eq!(got, vec![("/etc/passwd".to_string(), 26)]);
    }
}
