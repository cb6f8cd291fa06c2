//! The app's stdout and stderr as separate streams to the host: two virtio
//! console ports named `hyper.stdout` and `hyper.stderr` (both backends; when
//! they are missing, both streams share the serial console).
//!
//! The app writes into pipes, as under `docker run` without `-t`; hyperinit
//! copies them to the ports (`/dev/vport*`, plain virtio serial ports, which
//! the host throttles instead of dropping data). Port writes are
//! asynchronous, so at the end hyperinit tells the host how many bytes it
//! sent on each port (`drain OUT ERR` on COM2) and waits for the host's
//! `drained` before it reports the exit status: nothing the app wrote is lost
//! when the VM stops.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc;
use std::time::Duration;

/// The host's ports, opened.
pub struct Ports {
    out: File,
    err: File,
    /// `hyper.stdin`, when the app's stdin is attached (`-i`).
    input: Option<File>,
}

/// The device of the virtio port named `name`, waiting up to `patience`
/// for it to appear (the driver adds ports as the host announces them).
pub fn await_port(name: &str, patience: Duration) -> Option<String> {
    let start = std::time::Instant::now();
    loop {
        if let Some(dev) = port_device(name) {
            return Some(dev);
        }
        if start.elapsed() >= patience {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The device of the virtio port named `name`, if the host created one.
fn port_device(name: &str) -> Option<String> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    dir.flatten()
        .find(|e| std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == name))
        .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
}

pub fn open_port(dev: &str, read: bool) -> std::io::Result<File> {
    // devtmpfs creates the node shortly after the port appears.
    for _ in 0..100 {
        if std::path::Path::new(dev).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::OpenOptions::new()
        .read(read)
        .write(!read)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(dev)
}

/// The ports opened before the snapshot point ([`open_early`]).
static EARLY: std::sync::Mutex<Option<Ports>> = std::sync::Mutex::new(None);

/// Opens the ports the host provides now, before the snapshot point: which
/// ports there are is the machine's (a snapshot's device set), not the
/// run's, so a restored run finds them open. The input port is opened when
/// there is one (the host adds it only for `-i`).
pub fn open_early() {
    let (Some(out), Some(err)) = (port_device("hyper.stdout"), port_device("hyper.stderr")) else {
        return;
    };
    let input = port_device("hyper.stdin").and_then(|d| open_port(&d, true).ok());
    if let (Ok(out), Ok(err)) = (open_port(&out, false), open_port(&err, false)) {
        *EARLY.lock().unwrap_or_else(|e| e.into_inner()) = Some(Ports { out, err, input });
    }
}

/// The ports, when the host provides them; `stdin`: the input port too.
pub fn open(stdin: bool) -> Option<Ports> {
    if let Some(mut p) = EARLY.lock().unwrap_or_else(|e| e.into_inner()).take() {
        if !stdin {
            p.input = None;
            return Some(p);
        }
        if p.input.is_some() {
            return Some(p);
        }
        // No input port earlier: all three are looked for again below.
    }
    let out = port_device("hyper.stdout")?;
    let err = port_device("hyper.stderr")?;
    let input = if stdin {
        Some(open_port(&port_device("hyper.stdin")?, true).ok()?)
    } else {
        None
    };
    match (open_port(&out, false), open_port(&err, false)) {
        (Ok(out), Ok(err)) => Some(Ports { out, err, input }),
        _ => None,
    }
}

/// Bytes the host sent on stdin before it closed it (`stdin-eof N`); until
/// then `u64::MAX`.
pub static STDIN_EOF_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);

/// The pty master in `-t` mode (-1 otherwise), for window size changes.
pub static TTY_MASTER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Sets the terminal size of the `-t` pty.
pub fn set_winsize(rows: u16, cols: u16) {
    let fd = TTY_MASTER.load(std::sync::atomic::Ordering::SeqCst);
    if fd < 0 {
        return;
    }
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is live.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// How the app is wired to the host.
pub struct Wiring {
    /// Descriptors for the app's 0, 1, 2 (None: stdin stays /dev/null).
    pub child: [Option<OwnedFd>; 3],
    /// Whether the app gets a controlling terminal (the pty slave).
    pub tty: bool,
    relay: Box<dyn FnOnce() -> mpsc::Receiver<[u64; 2]> + Send>,
}

impl Wiring {
    /// Starts copying (call in the parent after fork, once `child` is dropped).
    pub fn start(self) -> mpsc::Receiver<[u64; 2]> {
        (self.relay)()
    }
}

/// Pipes for stdout/stderr (and stdin with `-i`), or a pty with `-t`.
pub fn wire(ports: Ports, tty: bool, size: Option<[u16; 2]>) -> std::io::Result<Wiring> {
    if tty {
        let (master, slave) = openpty()?;
        TTY_MASTER.store(master.as_raw_fd(), std::sync::atomic::Ordering::SeqCst);
        if let Some([r, c]) = size {
            set_winsize(r, c);
        }
        let reader = File::from(master.try_clone()?);
        let writer = File::from(master);
        let child = [
            Some(slave.try_clone()?),
            Some(slave.try_clone()?),
            Some(slave),
        ];
        let Ports { out, err, input } = ports;
        return Ok(Wiring {
            child,
            tty: true,
            relay: Box::new(move || {
                if let Some(input) = input {
                    feed(input, writer, true);
                }
                drop(err);
                relay(vec![(reader, out)])
            }),
        });
    }
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (stdin_child, stdin_feed) = match ports.input.is_some() {
        true => {
            let (r, w) = pipe()?;
            (Some(r), Some(w))
        }
        false => (None, None),
    };
    let Ports { out, err, input } = ports;
    Ok(Wiring {
        child: [stdin_child, Some(out_w), Some(err_w)],
        tty: false,
        relay: Box::new(move || {
            if let (Some(input), Some(w)) = (input, stdin_feed) {
                feed(input, File::from(w), false);
            }
            relay(vec![(File::from(out_r), out), (File::from(err_r), err)])
        }),
    })
}

fn openpty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty writes two descriptors; the other pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    for fd in [&m, &s] {
        // SAFETY: FD_CLOEXEC on our own descriptors.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((m, s))
}

/// Copies the host's stdin (the input port) to the app until the host said
/// where it ended (`stdin-eof N`): then closes the pipe, or types the
/// terminal's end-of-file character on a pty.
fn feed(mut input: File, mut to: File, tty: bool) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        let mut got = 0u64;
        loop {
            let eof_at = STDIN_EOF_AT.load(std::sync::atomic::Ordering::SeqCst);
            if got >= eof_at {
                if tty {
                    let _ = to.write_all(&[4]); // VEOF (^D)
                }
                return; // dropping `to` closes the app's stdin
            }
            let mut p = libc::pollfd {
                fd: input.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut p, 1, 50) };
            if n <= 0 {
                continue;
            }
            match input.read(&mut buf) {
                Ok(0) => std::thread::sleep(Duration::from_millis(20)),
                Ok(k) => {
                    got += k as u64;
                    if to.write_all(&buf[..k]).is_err() {
                        return; // the app closed its stdin
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
}

/// Writes all of `data` to a port, waiting out a full queue (the host is
/// slow, not gone); gives up only on a hard error or after a minute without
/// progress. Returns the bytes written.
fn write_patiently(port: &mut File, mut data: &[u8]) -> u64 {
    let mut written = 0u64;
    let mut stalled = 0u32;
    while !data.is_empty() {
        match port.write(data) {
            Ok(n) if n > 0 => {
                data = &data[n..];
                written += n as u64;
                stalled = 0;
            }
            Ok(_) => stalled += 1,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ENOSPC)
                ) =>
            {
                stalled += 1
            }
            Err(_) => return written, // the host went away
        }
        if stalled > 0 {
            if stalled > 60_000 {
                return written;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    written
}

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Which of the app's streams (stdout, stderr) the host has lost the
/// reader of (`closed 1|2`, contract 6).
static CLOSED: [std::sync::atomic::AtomicBool; 2] = [
    std::sync::atomic::AtomicBool::new(false),
    std::sync::atomic::AtomicBool::new(false),
];
/// The eventfd that wakes the relay to look at [`CLOSED`] (-1 before the
/// relay starts; never closed, so a late wake-up writes to no other file).
static RELAY_WAKE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// The host's `closed FD`: nobody reads the app's stream `fd` (1, 2) on the
/// host any more. The relay closes its end of the app's pipe, so the app's
/// writes fail with EPIPE or SIGPIPE, as in a shell pipeline whose reader
/// has exited (on a terminal, `-t`, the app's terminal hangs up instead).
pub fn close_stream(fd: u8) {
    let Some(closed) = CLOSED.get(usize::from(fd).wrapping_sub(1)) else {
        return;
    };
    closed.store(true, std::sync::atomic::Ordering::SeqCst);
    let wake = RELAY_WAKE.load(std::sync::atomic::Ordering::SeqCst);
    if wake >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live array to the relay's eventfd.
        unsafe { libc::write(wake, one.as_ptr().cast(), one.len()) };
    }
}

/// Copies each source to its port until all reach end of file (a pty master
/// ends with EIO once the app's side is closed). The receiver gets the byte
/// counts (stdout, stderr) when all has been written.
fn relay(pairs: Vec<(File, File)>) -> mpsc::Receiver<[u64; 2]> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sources: Vec<(Option<File>, File)> =
            pairs.into_iter().map(|(s, p)| (Some(s), p)).collect();
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = [0u64; 2];
        // SAFETY: eventfd takes no pointers; a failure leaves -1 (the relay
        // then sees a closed stream at its next read instead).
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        RELAY_WAKE.store(wake, std::sync::atomic::Ordering::SeqCst);
        loop {
            for ((src, _), closed) in sources.iter_mut().zip(&CLOSED) {
                if closed.load(std::sync::atomic::Ordering::SeqCst) && src.is_some() {
                    *src = None; // the app's writes now fail: nobody reads
                }
            }
            if sources.iter().all(|(s, _)| s.is_none()) {
                break;
            }
            let mut fds: Vec<libc::pollfd> = sources
                .iter()
                .map(|(s, _)| s.as_ref().map_or(-1, |f| f.as_raw_fd()))
                .chain([wake])
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `fds` is a valid array of pollfd for its length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            if fds.last().is_some_and(|p| p.revents != 0) {
                let mut count = [0u8; 8];
                // SAFETY: reads the eventfd's 8-byte counter into a live array.
                unsafe { libc::read(wake, count.as_mut_ptr().cast(), count.len()) };
            }
            for (i, p) in fds.iter().enumerate().take(sources.len()) {
                if p.revents == 0 {
                    continue;
                }
                let (src, port) = &mut sources[i];
                let Some(f) = src.as_mut() else { continue };
                match f.read(&mut buf) {
                    Ok(0) => *src = None,
                    Ok(k) => sent[i] += write_patiently(port, &buf[..k]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => *src = None,
                }
            }
        }
        let _ = tx.send(sent);
    });
    rx
}
