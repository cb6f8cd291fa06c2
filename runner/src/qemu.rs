//! The QEMU backend: the artifact's sections handed to `qemu-system-x86_64 -M
//! microvm`. The kernel and initrd (plus the run-configuration archive) go in
//! memory files; the rootfs is served read-only straight from the verified,
//! open artifact at its offset — no copy, no extraction.

use std::fs::File;
use std::io::{Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::sync::Arc;

use hvm::{Artifact, SectionKind};

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Everything needed to start QEMU, as file descriptors QEMU inherits.
#[derive(Debug)]
pub struct Prepared {
    pub kernel: File,
    pub initrd: File,
    /// The guest's COM2 output (hyperinit's status line), read after the VM ends.
    pub status: File,
    /// The guest's COM2 input: requests to hyperinit (`signal 15`).
    pub control: File,
    /// The app's stdout and stderr (virtio console ports `hyper.stdout`,
    /// `hyper.stderr`), read by hyperboot while the VM runs.
    pub app_out: File,
    pub app_err: File,
    /// The serial console (kernel and init messages; the app's output too
    /// when the guest's init predates the stream ports).
    pub console: File,
    /// The app's stdin (`-i`): what hyperboot writes here reaches `hyper.stdin`.
    pub app_in: File,
    /// Holds the FIFOs QEMU's pipe chardevs open.
    pub fifo_dir: tempfile::TempDir,
    pub rootfs_fd: OwnedFd,
    pub rootfs_offset: u64,
    pub rootfs_len: u64,
}

/// Fixed knobs of one boot.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub binary: String,
    pub accel: Accel,
    pub memory_mib: u64,
    pub cpus: u8,
    pub cmdline: String,
    /// Add the `hyper.stdin` port (`-i`).
    pub stdin: bool,
    /// More devices (the network).
    pub extra: Vec<String>,
}

fn memfd(name: &str) -> std::io::Result<File> {
    // Not close-on-exec: QEMU inherits it and opens it through /proc/self/fd.
    let fd = nix::sys::memfd::memfd_create(
        &std::ffi::CString::new(name).expect("no NUL"),
        nix::sys::memfd::MemFdCreateFlag::empty(),
    )?;
    Ok(File::from(fd))
}

/// Copies the kernel and initrd into memory files, appends the run archive,
/// and duplicates the artifact's descriptor for QEMU.
pub fn prepare(a: &Artifact, run_archive: &[u8]) -> std::io::Result<Prepared> {
    let mut kernel = memfd("hyper-kernel")?;
    kernel.write_all(&a.read_section(SectionKind::Kernel)?)?;
    let mut initrd = memfd("hyper-initrd")?;
    initrd.write_all(&a.read_section(SectionKind::Initrd)?)?;
    let pad = (4 - initrd.stream_position()? % 4) % 4;
    initrd.write_all(&[0u8; 4][..pad as usize])?;
    initrd.write_all(run_archive)?;
    // QEMU's pipe chardev opens PATH.in and PATH.out; opening both O_RDWR here
    // means neither side ever blocks on open.
    let fifo_dir = tempfile::Builder::new().prefix("hyperboot-").tempdir()?;
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
    for end in [
        "status.in",
        "status.out",
        "out.in",
        "out.out",
        "err.in",
        "err.out",
        "console.in",
        "console.out",
        "in.in",
        "in.out",
    ] {
        nix::unistd::mkfifo(&fifo_dir.path().join(end), mode)?;
    }
    let open_rw = |name: &str| {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo_dir.path().join(name))
    };
    let status = open_rw("status.out")?;
    let control = open_rw("status.in")?;
    let app_out = open_rw("out.out")?;
    let app_err = open_rw("err.out")?;
    let console = open_rw("console.out")?;
    let app_in = open_rw("in.in")?;
    // Room for bursts, so QEMU rarely has to hold the guest back.
    for f in [&app_out, &app_err] {
        // SAFETY: F_SETPIPE_SZ takes an integer; a failure only leaves the default size.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    }
    // dup() gives a descriptor without close-on-exec.
    let rootfs_fd = nix::unistd::dup(a.file().as_raw_fd())?;
    let rootfs_fd = owned(rootfs_fd);
    let s = a.section(SectionKind::Rootfs);
    Ok(Prepared {
        kernel,
        initrd,
        status,
        control,
        app_out,
        app_err,
        console,
        app_in,
        fifo_dir,
        rootfs_fd,
        rootfs_offset: s.offset,
        rootfs_len: s.length,
    })
}

fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by dup() and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The QEMU command line (pure: tested without QEMU).
pub fn args(cfg: &QemuConfig, p: &Prepared) -> Vec<String> {
    let fd = |f: i32| format!("/proc/self/fd/{f}");
    let mut a: Vec<String> = vec![
        "-M".into(),
        "microvm,acpi=off,x-option-roms=off,isa-serial=on".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-no-reboot".into(),
        "-display".into(),
        "none".into(),
        "-m".into(),
        format!("{}M", cfg.memory_mib),
        "-smp".into(),
        cfg.cpus.max(1).to_string(),
    ];
    match cfg.accel {
        Accel::Kvm => a.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]),
        Accel::Tcg => a.extend(["-accel".into(), "tcg".into(), "-cpu".into(), "max".into()]),
    }
    a.extend([
        "-kernel".into(),
        fd(p.kernel.as_raw_fd()),
        "-initrd".into(),
        fd(p.initrd.as_raw_fd()),
        "-append".into(),
        cfg.cmdline.clone(),
        "-chardev".into(),
        format!("pipe,id=console,path={}", p.fifo_dir.path().join("console").display()),
        "-serial".into(),
        "chardev:console".into(),
        "-chardev".into(),
        format!("pipe,id=status,path={}", p.fifo_dir.path().join("status").display()),
        "-device".into(),
        "isa-serial,chardev=status,iobase=0x2f8,irq=3".into(),
        "-device".into(),
        "isa-debug-exit,iobase=0x501,iosize=1".into(),
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!("pipe,id=appout,path={}", p.fifo_dir.path().join("out").display()),
        "-device".into(),
        "virtserialport,chardev=appout,name=hyper.stdout".into(),
        "-chardev".into(),
        format!("pipe,id=apperr,path={}", p.fifo_dir.path().join("err").display()),
        "-device".into(),
        "virtserialport,chardev=apperr,name=hyper.stderr".into(),
        "-blockdev".into(),
        format!(
            "driver=raw,node-name=rootfs,read-only=on,offset={},size={},file.driver=file,file.filename={},file.read-only=on",
            p.rootfs_offset,
            p.rootfs_len,
            fd(p.rootfs_fd.as_raw_fd())
        ),
        "-device".into(),
        "virtio-blk-device,drive=rootfs".into(),
    ]);
    if cfg.stdin {
        a.extend([
            "-chardev".into(),
            format!(
                "pipe,id=appin,path={}",
                p.fifo_dir.path().join("in").display()
            ),
            "-device".into(),
            "virtserialport,chardev=appin,name=hyper.stdin".into(),
        ]);
    }
    a.extend(cfg.extra.iter().cloned());
    a
}

/// `-i`: copies hyperboot's stdin to the guest; at its end, tells hyperinit
/// how many bytes there were (`stdin-eof N` on COM2), so the app sees end of
/// file after the last byte.
pub fn feed_stdin(to: File, control: Arc<Control>) {
    use std::io::Read;
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent = 0u64;
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if write_out(&to, &buf[..n]).is_err() {
                        break;
                    }
                    sent += n as u64;
                }
            }
        }
        control.send(&format!("stdin-eof {sent}\n"));
    });
}

/// `-v` host directories as virtio-9p shares `vol0`, `vol1`, … (QEMU's own
/// 9p server: no extra daemon, no root; files the guest creates belong to the
/// user running hyperboot).
pub fn share_args(binds: &[crate::spec::Bind]) -> Vec<String> {
    let mut a = Vec::new();
    for (i, b) in binds.iter().enumerate() {
        // QEMU option values escape a comma by doubling it.
        let path = b.host.display().to_string().replace(',', ",,");
        let ro = if b.read_only { ",readonly=on" } else { "" };
        a.push("-fsdev".into());
        a.push(format!(
            "local,id=fsvol{i},path={path},security_model=none{ro}"
        ));
        a.push("-device".into());
        a.push(format!("virtio-9p-device,fsdev=fsvol{i},mount_tag=vol{i}"));
    }
    a
}

/// Builds the QEMU process: stdin and stdout closed (every guest stream comes
/// through a FIFO hyperboot copies), QEMU's own
/// messages captured in `qemu_log`.
pub fn command(cfg: &QemuConfig, p: &Prepared, qemu_log: &File) -> std::io::Result<Command> {
    let mut c = Command::new(&cfg.binary);
    c.args(args(cfg, p))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(qemu_log.try_clone()?);
    Ok(c)
}

/// Writes all of `data`, waiting when `out` is non-blocking and full (a
/// terminal or pipe someone else made non-blocking).
fn write_out(out: &File, mut data: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    while !data.is_empty() {
        match (&*out).write(data) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [nix::poll::PollFd::new(
                    out.as_fd(),
                    nix::poll::PollFlags::POLLOUT,
                )];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A descriptor of ours (stdout or stderr) as a file, for the pumps.
pub fn dup_file(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<File> {
    Ok(File::from(fd.try_clone_to_owned()?))
}

/// Watches the status port while the VM runs. A `drain OUT ERR` line (the
/// guest's byte counts on the stream ports) is answered with `drained` once
/// the pumps have received that much; everything else is the status report,
/// returned (at most 4 KiB) when `stop` is set and the FIFO is empty.
pub fn watch_status(
    status: File,
    control: Arc<Control>,
    counts: [Arc<AtomicU64>; 2],
    stop: Arc<Stop>,
) -> std::thread::JoinHandle<Vec<u8>> {
    use std::io::Read;
    std::thread::spawn(move || {
        let mut report = Vec::new();
        let mut line = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            let stopping = stop.is_set();
            stop.wait(&status);
            let n = (&status).read(&mut buf).unwrap_or(0);
            for &b in &buf[..n] {
                if line.len() < 4096 {
                    line.push(b);
                }
                if b != b'\n' {
                    continue;
                }
                let text = String::from_utf8_lossy(&line).into_owned();
                if text.trim() == "ready" {
                    control.ready();
                    line.clear();
                    continue;
                }
                match parse_drain(&text) {
                    Some(want) => {
                        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
                        while (0..2).any(|i| counts[i].load(Ordering::SeqCst) < want[i])
                            && std::time::Instant::now() < until
                        {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        control.send("drained\n");
                    }
                    None => {
                        if report.len() < 4096 {
                            report.extend_from_slice(&line);
                        }
                    }
                }
                line.clear();
            }
            if stopping && n == 0 {
                report.extend_from_slice(&line);
                return report;
            }
        }
    })
}

/// `drain OUT ERR` from hyperinit: bytes it sent on stdout and stderr.
fn parse_drain(line: &str) -> Option<[u64; 2]> {
    let mut it = line.trim().strip_prefix("drain ")?.split(' ');
    let out = it.next()?.parse().ok()?;
    let err = it.next()?.parse().ok()?;
    Some([out, err])
}

/// The host's side of COM2: requests to hyperinit. hyperinit announces
/// `ready` once it listens; requests made before are held until then (bytes
/// that reach the guest's UART before it is opened are echoed or lost).
#[derive(Debug)]
pub struct Control {
    file: File,
    state: std::sync::Mutex<(bool, Vec<String>)>,
}

impl Control {
    pub fn new(file: File) -> Arc<Control> {
        Arc::new(Control {
            file,
            state: std::sync::Mutex::new((false, Vec::new())),
        })
    }

    /// Sends one line now, or once hyperinit is ready.
    pub fn send(&self, line: &str) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0 {
            let _ = (&self.file).write_all(line.as_bytes());
        } else {
            st.1.push(line.to_string());
        }
    }

    fn ready(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = true;
        for line in std::mem::take(&mut st.1) {
            let _ = (&self.file).write_all(line.as_bytes());
        }
    }
}

/// Tells the stream threads to finish: a flag, and a pipe whose readability
/// wakes them at once.
#[derive(Debug)]
pub struct Stop {
    flag: AtomicBool,
    r: OwnedFd,
    w: OwnedFd,
}

impl Stop {
    pub fn new() -> std::io::Result<Arc<Stop>> {
        let (r, w) = nix::unistd::pipe()?;
        Ok(Arc::new(Stop {
            flag: AtomicBool::new(false),
            r,
            w,
        }))
    }

    pub fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = nix::unistd::write(&self.w, b"x");
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Waits until `src` is readable or the stop is set.
    fn wait(&self, src: &File) {
        use std::os::fd::AsFd;
        let mut fds = [
            nix::poll::PollFd::new(src.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(self.r.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE);
    }
}

/// Copies what the guest writes on one stream FIFO to `out` until `stop` is
/// set and the FIFO is empty.
pub fn pump(
    src: File,
    out: File,
    stop: Arc<Stop>,
    count: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    use std::io::Read;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let stopping = stop.is_set();
            stop.wait(&src);
            let mut got = false;
            loop {
                match (&src).read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        got = true;
                        count.fetch_add(n as u64, Ordering::SeqCst);
                        // If our own stdout is gone, keep draining so QEMU never blocks.
                        let _ = write_out(&out, &buf[..n]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            if stopping && !got {
                return;
            }
        }
    })
}

/// A memory file for QEMU's stderr.
pub fn log_file() -> std::io::Result<File> {
    memfd("hyper-qemu-log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_is_served_read_only_from_the_artifact_range() {
        let p = Prepared {
            kernel: tempfile::tempfile().unwrap(),
            initrd: tempfile::tempfile().unwrap(),
            status: tempfile::tempfile().unwrap(),
            control: tempfile::tempfile().unwrap(),
            app_out: tempfile::tempfile().unwrap(),
            app_err: tempfile::tempfile().unwrap(),
            console: tempfile::tempfile().unwrap(),
            app_in: tempfile::tempfile().unwrap(),
            fifo_dir: tempfile::tempdir().unwrap(),
            rootfs_fd: std::fs::File::open("/dev/null").unwrap().into(),
            rootfs_offset: 8192,
            rootfs_len: 4096,
        };
        let cfg = QemuConfig {
            binary: "qemu".into(),
            accel: Accel::Tcg,
            memory_mib: 128,
            cpus: 2,
            stdin: false,
            cmdline: "console=ttyS0".into(),
            extra: vec![],
        };
        let a = args(&cfg, &p).join(" ");
        assert!(
            a.contains("driver=raw,node-name=rootfs,read-only=on,offset=8192,size=4096,"),
            "{a}"
        );
        assert!(a.contains("file.read-only=on"));
        assert!(a.contains("-accel tcg"));
        assert!(a.contains("-no-reboot"));
        assert!(a.contains("isa-debug-exit,iobase=0x501"));
        assert!(a.contains("-m 128M"));
        assert!(a.contains("-smp 2"));
        assert!(a.contains("virtserialport,chardev=appout,name=hyper.stdout"));
        assert!(a.contains("virtserialport,chardev=apperr,name=hyper.stderr"));
    }

    #[test]
    fn drain_lines() {
        assert_eq!(parse_drain("drain 12 0\n"), Some([12, 0]));
        assert_eq!(parse_drain("drain 12\n"), None);
        assert_eq!(parse_drain("exit=0\n"), None);
    }
}
