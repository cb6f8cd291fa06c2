//! The syscall seam: everything hyperinit asks of the kernel goes through
//! [`Sys`], so the boot plan can be unit-tested with a recording fake. The Linux
//! implementation is the only place in hyperinit with `unsafe`.

use std::ffi::CString;
use std::io;
use std::path::Path;

/// Mount flags used by the plan.
pub const MS_RDONLY: u64 = libc::MS_RDONLY;
pub const MS_NOSUID: u64 = libc::MS_NOSUID;
pub const MS_NODEV: u64 = libc::MS_NODEV;
pub const MS_NOEXEC: u64 = libc::MS_NOEXEC;
pub const MS_MOVE: u64 = libc::MS_MOVE;
pub const MS_REMOUNT: u64 = libc::MS_REMOUNT;

/// What the boot plan needs from the kernel.
pub trait Sys {
    fn mount(
        &mut self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: u64,
        data: &str,
    ) -> io::Result<()>;
    fn mkdir_all(&mut self, path: &str, mode: u32) -> io::Result<()>;
    fn symlink(&mut self, target: &str, link: &str) -> io::Result<()>;
    fn chdir(&mut self, path: &str) -> io::Result<()>;
    fn chroot(&mut self, path: &str) -> io::Result<()>;
    fn sethostname(&mut self, name: &str) -> io::Result<()>;
    fn exists(&mut self, path: &str) -> bool;
    fn dir_is_empty(&mut self, path: &str) -> bool;
    /// Detaches the mount at `path` (MNT_DETACH).
    fn umount(&mut self, path: &str) -> io::Result<()>;
    /// Copies a directory tree (files, directories, symlinks; owners and
    /// modes kept) into an existing directory.
    fn copy_tree(&mut self, from: &str, to: &str) -> io::Result<()>;
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let m = std::fs::symlink_metadata(&src)?;
        let ft = m.file_type();
        if ft.is_dir() {
            std::fs::create_dir_all(&dst)?;
            copy_tree(&src, &dst)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst)?;
        } else {
            continue; // devices, fifos and sockets are not volume content
        }
        std::os::unix::fs::lchown(&dst, Some(m.uid()), Some(m.gid()))?;
        if !ft.is_symlink() {
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
        }
    }
    Ok(())
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The real thing.
#[derive(Debug, Default)]
pub struct Linux;

impl Sys for Linux {
    fn mount(
        &mut self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: u64,
        data: &str,
    ) -> io::Result<()> {
        let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
        // SAFETY: all four are valid NUL-terminated strings that outlive the call.
        check(unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) })
    }

    fn umount(&mut self, path: &str) -> io::Result<()> {
        let p = cstr(path)?;
        // SAFETY: a valid NUL-terminated string that outlives the call.
        check(unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) })
    }

    fn mkdir_all(&mut self, path: &str, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)
    }

    fn symlink(&mut self, target: &str, link: &str) -> io::Result<()> {
        match std::os::unix::fs::symlink(target, link) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            r => r,
        }
    }

    fn chdir(&mut self, path: &str) -> io::Result<()> {
        std::env::set_current_dir(path)
    }

    fn chroot(&mut self, path: &str) -> io::Result<()> {
        std::os::unix::fs::chroot(path)
    }

    fn sethostname(&mut self, name: &str) -> io::Result<()> {
        // SAFETY: the pointer and length describe `name`'s bytes.
        check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
    }

    fn exists(&mut self, path: &str) -> bool {
        Path::new(path).symlink_metadata().is_ok()
    }

    fn dir_is_empty(&mut self, path: &str) -> bool {
        std::fs::read_dir(path)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true)
    }

    fn copy_tree(&mut self, from: &str, to: &str) -> io::Result<()> {
        copy_tree(Path::new(from), Path::new(to))
    }
}

/// Process-level calls used around the app (not part of the testable plan).
pub mod process {
    use super::*;

    /// Gives this process access to the given I/O ports.
    pub fn ioperm(port: u16, len: u16) -> io::Result<()> {
        // SAFETY: ioperm only changes this process's I/O permission bitmap.
        check(unsafe { libc::ioperm(port.into(), len.into(), 1) })
    }

    /// Writes a byte to an I/O port. Requires a prior successful [`ioperm`].
    pub fn outb(port: u16, value: u8) {
        // SAFETY: `out` to a port this process was granted by ioperm; the
        // devices behind these ports (UART, exit port) have no memory effects.
        unsafe {
            std::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
        }
    }

    /// Reads a byte from an I/O port. Requires a prior successful [`ioperm`].
    pub fn inb(port: u16) -> u8 {
        let v: u8;
        // SAFETY: as for `outb`; reading a UART status register has no side effects.
        unsafe {
            std::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
        }
        v
    }

    /// Microseconds of the monotonic clock (the guest's time since boot).
    pub fn monotonic_us() -> u64 {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime fills a live timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
        t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000
    }

    /// Waits for any child; returns (pid, raw status), or None when there are no children.
    pub fn wait_any() -> io::Result<Option<(libc::pid_t, libc::c_int)>> {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ECHILD) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some((pid, status)))
    }

    pub fn kill(pid: libc::pid_t, sig: libc::c_int) {
        // SAFETY: kill has no memory effects; errors (no such process) are ignored.
        unsafe { libc::kill(pid, sig) };
    }

    /// Installs `handler` for `sig` without SA_RESTART, so waits are interrupted.
    pub fn on_signal(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) {
        // SAFETY: a zeroed sigaction is valid; the handlers given here only
        // store to an atomic or restart the machine.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }

    /// Runs `handler` on SIGSEGV and SIGBUS (a fault of this process's own;
    /// the handler must not return, or the faulting instruction runs again).
    pub fn on_fault(handler: extern "C" fn(libc::c_int)) {
        for sig in [libc::SIGSEGV, libc::SIGBUS] {
            on_signal(sig, handler);
        }
    }

    /// Opens a serial port without making it the controlling terminal and puts
    /// it in raw mode (no echo, no line editing, no output processing).
    pub fn open_raw_tty(path: &str) -> Option<std::fs::File> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)
            .ok()?;
        // SAFETY: termios is plain data; the fd is open for the whole call.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(f.as_raw_fd(), &mut t) != 0 {
                return None;
            }
            libc::cfmakeraw(&mut t);
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            if libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t) != 0 {
                return None;
            }
        }
        Some(f)
    }

    /// Sets the wall clock to `ns` nanoseconds since the epoch.
    pub fn set_realtime(ns: u64) -> io::Result<()> {
        let ts = libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: clock_settime reads one live timespec.
        check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
    }

    /// Adds `seed` to the kernel's random pool, credited as entropy, then
    /// has the kernel reseed its generator from the pool at once
    /// (RNDADDENTROPY, RNDRESEEDCRNG on /dev/urandom).
    pub fn add_entropy(seed: &[u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
        const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")?;
        // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
        let mut info: Vec<u8> = Vec::with_capacity(8 + seed.len());
        info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
        info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
        info.extend_from_slice(seed);
        // Aligned for the kernel's view of it (ints, then u32 words).
        let mut words = vec![0u32; info.len().div_ceil(4)];
        for (i, chunk) in info.chunks(4).enumerate() {
            let mut w = [0u8; 4];
            w[..chunk.len()].copy_from_slice(chunk);
            words[i] = u32::from_ne_bytes(w);
        }
        // SAFETY: RNDADDENTROPY reads a rand_pool_info of the size its
        // buf_size field says, which `words` holds; RNDRESEEDCRNG takes no
        // argument.
        unsafe {
            check(libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, words.as_ptr()))?;
            check(libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG))
        }
    }

    /// Puts the console in raw output mode so app bytes reach the host unchanged.
    pub fn raw_output(fd: libc::c_int) {
        // SAFETY: termios is plain data; failure (not a tty) is ignored.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut t) == 0 {
                t.c_oflag &= !libc::OPOST;
                libc::tcsetattr(fd, libc::TCSANOW, &t);
            }
        }
    }

    pub fn sync() {
        // SAFETY: no arguments.
        unsafe { libc::sync() };
    }

    /// Last resort when the exit port did not stop the VM: a reset (`reboot=t`).
    pub fn reboot() -> ! {
        // SAFETY: PID 1 asking for a restart; the VMM turns the reset into an exit.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
        loop {
            std::thread::park();
        }
    }
}
