//! The app's stdout and stderr as separate streams to the host: two virtio
//! console ports named `hyper.stdout` and `hyper.stderr` (QEMU backend; the
//! KVM VMM has none yet, and then both streams share the serial console).
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
}

/// The device of the virtio port named `name`, if the host created one.
fn port_device(name: &str) -> Option<String> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    dir.flatten()
        .find(|e| std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == name))
        .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
}

fn open_port(dev: &str) -> std::io::Result<File> {
    // devtmpfs creates the node shortly after the port appears.
    for _ in 0..100 {
        if std::path::Path::new(dev).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(dev)
}

/// The ports, when the host provides them.
pub fn open() -> Option<Ports> {
    let out = port_device("hyper.stdout")?;
    let err = port_device("hyper.stderr")?;
    match (open_port(&out), open_port(&err)) {
        (Ok(out), Ok(err)) => Some(Ports { out, err }),
        _ => None,
    }
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

/// Copies both pipes to their ports until both reach end of file. The
/// receiver gets the byte counts (stdout, stderr) when all has been written.
pub fn relay(ports: Ports, out: OwnedFd, err: OwnedFd) -> mpsc::Receiver<[u64; 2]> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sources = [
            (Some(File::from(out)), ports.out),
            (Some(File::from(err)), ports.err),
        ];
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = [0u64; 2];
        while sources.iter().any(|(s, _)| s.is_some()) {
            let mut fds: Vec<libc::pollfd> = sources
                .iter()
                .map(|(s, _)| libc::pollfd {
                    fd: s.as_ref().map_or(-1, |f| f.as_raw_fd()),
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
            for (i, p) in fds.iter().enumerate() {
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
