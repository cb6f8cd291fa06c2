//! The QEMU backend: the artifact's sections handed to `qemu-system-x86_64 -M
//! microvm`. The kernel and initrd (plus the run-configuration archive) go in
//! memory files; the rootfs is served read-only straight from the verified,
//! open artifact at its offset — no copy, no extraction. Every guest stream
//! comes through a FIFO that a thread of hyperboot's copies out; the control
//! channel (COM2) is a FIFO pair. QEMU runs in its own process group and dies
//! with hyperboot ([`crate::child`]).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hvm::{Artifact, SectionKind};
use hyper_contract::{GuestMessage, HostMessage, LineBuffer};

use crate::exit::{Ending, Outcome};
use crate::net::{Link, Plan, Proto};
use crate::stop::GracefulStop;

pub use super::Accel;
use crate::supervise::{self, Event, VmControl};
use crate::BootError;

/// The CPU model under TCG: QEMU's `max` without ERMS and FSRM. Guest kernels
/// (and libcs) that see them clear and copy pages with `rep stosb`/`rep
/// movsb`, which TCG runs one byte per iteration; without them they take
/// `rep stosq`/`movsq` or plain loops. A demo boot to the app's first output
/// took 11% less on this project's machines (medians of 5, interleaved);
/// inside the nested test host the page clearing of its KVM had been a
/// quarter of a cold boot.
pub const TCG_CPU: &str = "max,-erms,-fsrm";

/// Why QEMU could not run the VM.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{0} not found: install QEMU (apt-get install qemu-system-x86)")]
    Missing(String),
    #[error("cannot prepare QEMU's inputs")]
    Prepare(#[source] std::io::Error),
    #[error("cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("--upper on the QEMU backend: {0}")]
    Upper(String),
    #[error("{binary} failed ({status}): {log}")]
    Failed {
        binary: String,
        status: std::process::ExitStatus,
        log: String,
    },
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
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::empty())?;
    Ok(File::from(fd))
}

/// The FIFOs' folder: `hyperboot-PID-XXXXXX` in `$TMPDIR`.
const FIFO_PREFIX: &str = "hyperboot-";

/// Removes the FIFO folders that hyperboots killed before their guest's
/// first word left behind (see [`watch_status`]): those named for a
/// process that is gone, and those of older hyperboots (no PID in the
/// name) over an hour old. A folder is only removed if it holds nothing but
/// FIFOs; one younger than a minute is left (its hyperboot may be starting).
fn sweep_fifo_dirs(tmp: &std::path::Path, now: std::time::SystemTime) {
    use std::time::Duration;
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(FIFO_PREFIX)) else {
            continue;
        };
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        let owner = rest
            .split_once('-')
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        let stale = match owner {
            Some(pid) => {
                age > Duration::from_secs(60)
                    && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            }
            None => age > Duration::from_secs(3600),
        };
        if !stale || !meta.is_dir() {
            continue;
        }
        let only_fifos = std::fs::read_dir(e.path()).is_ok_and(|d| {
            d.flatten().all(|f| {
                use std::os::unix::fs::FileTypeExt;
                f.file_type().is_ok_and(|t| t.is_fifo())
            })
        });
        if only_fifos {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
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
    let tmp = std::env::temp_dir();
    sweep_fifo_dirs(&tmp, std::time::SystemTime::now());
    let fifo_dir = tempfile::Builder::new()
        .prefix(&format!("{FIFO_PREFIX}{}-", std::process::id()))
        .tempdir_in(&tmp)?;
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
        rustix::fs::mknodat(
            rustix::fs::CWD,
            fifo_dir.path().join(end),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )?;
    }
    let open_rw = |name: &str| {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
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
        // A failure only leaves the default size.
        let _ = rustix::pipe::fcntl_setpipe_size(f, 1 << 20);
    }
    // dup() gives a descriptor without close-on-exec.
    let rootfs_fd = rustix::io::dup(a.file().as_fd())?;
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
        Accel::Tcg => a.extend(["-accel".into(), "tcg".into(), "-cpu".into(), TCG_CPU.into()]),
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

/// `-i`: copies hyperboot's stdin to the guest (thread `stdin`); at its end,
/// tells hyperinit how many bytes there were (`stdin-eof N` on COM2), so the
/// app sees end of file after the last byte.
fn feed_stdin(to: File, control: Arc<Control>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
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
            control.send(HostMessage::StdinEof(sent));
        })?;
    Ok(())
}

/// `-v` host directories as virtio-9p shares `vol0`, `vol1`, … (QEMU's own
/// 9p server: no extra daemon, no root; files the guest creates belong to the
/// user running hyperboot), and the `--upper` directory as `upper`, served
/// through the proxy helper's socket `proxy`.
fn share_args(shares: &[crate::spec::Share], proxy: Option<i32>) -> Vec<String> {
    let mut a = Vec::new();
    for (i, b) in shares.iter().enumerate() {
        // QEMU option values escape a comma by doubling it.
        let path = b.host.display().to_string().replace(',', ",,");
        let ro = if b.read_only { ",readonly=on" } else { "" };
        a.push("-fsdev".into());
        match proxy {
            Some(fd) if b.tag == crate::spec::UPPER_TAG => {
                a.push(format!("proxy,id=fsvol{i},sock_fd={fd}"));
            }
            _ => a.push(format!(
                "local,id=fsvol{i},path={path},security_model=none{ro}"
            )),
        }
        a.push("-device".into());
        a.push(format!(
            "virtio-9p-device,fsdev=fsvol{i},mount_tag={}",
            b.tag
        ));
    }
    a
}

/// QEMU's proxy 9p helper, shipped with QEMU (up to 8.x).
const PROXY_HELPER: &str = "/usr/lib/qemu/virtfs-proxy-helper";

/// The helper serving the `--upper` directory, ended with the VM.
struct ProxyHelper(std::process::Child);

impl Drop for ProxyHelper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--upper` on QEMU. QEMU's own 9p server cannot make overlayfs' whiteout:
/// it opens every node it creates to set its mode, and a 0:0 device opens
/// nothing. Its proxy helper makes nodes with mknod alone; it chroots into
/// the directory, so it needs root. Returns the helper and QEMU's end of
/// their socket (inherited by QEMU, not by the helper).
fn start_proxy(dir: &std::path::Path, log: &File) -> Result<(ProxyHelper, OwnedFd), QemuError> {
    if !rustix::process::geteuid().is_root() {
        return Err(QemuError::Upper(
            "it needs root (QEMU's own 9p server cannot make overlayfs whiteouts; its proxy helper, which can, chroots)".into(),
        ));
    }
    if !std::path::Path::new(PROXY_HELPER).exists() {
        return Err(QemuError::Upper(format!(
            "{PROXY_HELPER} is missing (apt-get install qemu-system-common)"
        )));
    }
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    let (ours, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| QemuError::Prepare(e.into()))?;
    let fd = theirs.as_raw_fd();
    let mut c = crate::child::helper(PROXY_HELPER);
    c.args(["-n", "-f", &fd.to_string(), "-p"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.try_clone().map_err(QemuError::Prepare)?);
    // SAFETY: one fcntl between fork and exec, nothing allocated.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
    let child = c
        .spawn()
        .map_err(|e| QemuError::Spawn(PROXY_HELPER.into(), e))?;
    drop(theirs);
    // QEMU inherits its end, as it does the other descriptors.
    rustix::io::fcntl_setfd(&ours, rustix::io::FdFlags::empty())
        .map_err(|e| QemuError::Prepare(e.into()))?;
    Ok((ProxyHelper(child), ours))
}

/// Builds the QEMU process: stdin and stdout closed (every guest stream comes
/// through a FIFO hyperboot copies), QEMU's own messages captured in
/// `qemu_log`.
fn command(cfg: &QemuConfig, p: &Prepared, qemu_log: &File) -> std::io::Result<Command> {
    let mut c = crate::child::helper(&cfg.binary);
    c.args(args(cfg, p))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(qemu_log.try_clone()?);
    Ok(c)
}

/// Writes all of `data`, waiting when `out` is non-blocking and full (a
/// terminal or pipe someone else made non-blocking).
fn write_out(out: &File, mut data: &[u8]) -> std::io::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    while !data.is_empty() {
        match (&*out).write(data) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(out, PollFlags::OUT)];
                let wait = Timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                let _ = poll(&mut fds, Some(&wait));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A descriptor of ours (stdout or stderr) as a file, for the pumps.
fn dup_file(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<File> {
    Ok(File::from(fd.try_clone_to_owned()?))
}

/// Watches the control channel while the VM runs (thread `control`): a
/// `ready` releases the held requests; a `drain OUT ERR` (the guest's byte
/// counts on the stream ports) is answered with `drained` once the pumps
/// have received that much; everything else is kept (at most 4 KiB) and
/// returned when `stop` is set and the FIFO is empty: the report is in it,
/// with when (monotonic ns) a `timings` line arrived (0: none; `--stats`).
/// The FIFOs' folder is removed at the guest's first word: QEMU opened them
/// all before the guest ran, and a hyperboot killed later leaves nothing.
/// One killed earlier leaves it to the next hyperboot's sweep.
fn watch_status(
    status: File,
    control: Arc<Control>,
    counts: [Arc<AtomicU64>; 2],
    stop: Arc<Stop>,
    mut fifos: Option<tempfile::TempDir>,
) -> std::io::Result<std::thread::JoinHandle<(Vec<u8>, u64)>> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let mut report = Vec::new();
            let mut timings_at = 0;
            let mut lines = LineBuffer::default();
            let mut buf = [0u8; 512];
            loop {
                let stopping = stop.is_set();
                stop.wait(&status);
                let n = (&status).read(&mut buf).unwrap_or(0);
                if n > 0 {
                    drop(fifos.take());
                }
                for &b in &buf[..n] {
                    let Some(line) = lines.push(b) else {
                        continue;
                    };
                    match GuestMessage::decode(&line) {
                        Ok(GuestMessage::Ready) => control.ready(),
                        Ok(GuestMessage::Drain { stdout, stderr }) => {
                            let want = [stdout, stderr];
                            let until = std::time::Instant::now() + Duration::from_secs(10);
                            while (0..2).any(|i| counts[i].load(Ordering::SeqCst) < want[i])
                                && std::time::Instant::now() < until
                            {
                                std::thread::sleep(Duration::from_millis(1));
                            }
                            control.send(HostMessage::Drained);
                        }
                        m => {
                            if matches!(m, Ok(GuestMessage::Timings { .. })) {
                                timings_at = hyper_vmm::monotonic_ns();
                            }
                            if report.len() < 4096 {
                                report.extend_from_slice(&line);
                            }
                        }
                    }
                }
                if stopping && n == 0 {
                    report.extend_from_slice(lines.partial());
                    return (report, timings_at);
                }
            }
        })
}

/// The host's side of COM2: requests to hyperinit. hyperinit announces
/// `ready` once it listens; requests made before are held until then (bytes
/// that reach the guest's UART before it is opened are echoed or lost).
#[derive(Debug)]
struct Control {
    file: File,
    /// Whether hyperinit is ready, and the requests held until it is.
    state: Mutex<(bool, Vec<HostMessage>)>,
}

impl Control {
    fn new(file: File) -> Arc<Control> {
        Arc::new(Control {
            file,
            state: Mutex::new((false, Vec::new())),
        })
    }

    /// Sends a request now, or once hyperinit is ready.
    fn send(&self, m: HostMessage) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0 {
            let _ = (&self.file).write_all(&m.encode());
        } else {
            st.1.push(m);
        }
    }

    fn ready(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = true;
        for m in std::mem::take(&mut st.1) {
            let _ = (&self.file).write_all(&m.encode());
        }
    }
}

/// Tells the stream threads to finish: a flag, and a pipe whose readability
/// wakes them at once.
#[derive(Debug)]
struct Stop {
    flag: AtomicBool,
    r: OwnedFd,
    w: OwnedFd,
}

impl Stop {
    fn new() -> std::io::Result<Arc<Stop>> {
        let (r, w) = rustix::pipe::pipe()?;
        Ok(Arc::new(Stop {
            flag: AtomicBool::new(false),
            r,
            w,
        }))
    }

    fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = rustix::io::write(&self.w, b"x");
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Waits until `src` is readable or the stop is set.
    fn wait(&self, src: &File) {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut fds = [
            PollFd::new(src, PollFlags::IN),
            PollFd::new(&self.r, PollFlags::IN),
        ];
        let _ = poll(&mut fds, None);
    }
}

/// Copies what the guest writes on one stream FIFO to `out` (thread `NAME`)
/// until `stop` is set and the FIFO is empty.
fn pump(
    name: &str,
    src: File,
    out: File,
    stop: Arc<Stop>,
    count: Arc<AtomicU64>,
    first: Option<Arc<AtomicU64>>,
    gone: Option<(u8, supervise::ReaderGone)>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
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
                            if let Some(f) = &first {
                                crate::stats::first(f);
                            }
                            count.fetch_add(n as u64, Ordering::SeqCst);
                            // If our own stdout is gone, keep draining so QEMU
                            // never blocks (the app is told, see ReaderGone).
                            let written = write_out(&out, &buf[..n]);
                            if let Some((fd, g)) = &gone {
                                g.check(*fd, &written);
                            }
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

/// QEMU's `-netdev`/`-device` arguments for a plan.
pub fn net_args(p: &Plan) -> Vec<String> {
    let netdev = match &p.link {
        Link::User => {
            let mut s = format!(
                "user,id=net0,net=10.0.2.0/24,host=10.0.2.2,dns={},ipv6=off",
                "10.0.2.3"
            );
            let mut internal = p.internal.iter();
            for m in &p.ports {
                // TCP goes through hyperboot's relay to a loopback-only forward;
                // UDP is forwarded by QEMU directly.
                let (ip, port) = match m.proto {
                    Proto::Tcp => (
                        "127.0.0.1".to_string(),
                        *internal.next().expect("one internal port per TCP port"),
                    ),
                    Proto::Udp if m.host_ip.is_unspecified() => (String::new(), m.host_port),
                    Proto::Udp => (m.host_ip.to_string(), m.host_port),
                };
                s.push_str(&format!(
                    ",hostfwd={}:{ip}:{port}-{}:{}",
                    m.proto.name(),
                    p.guest.address,
                    m.guest_port
                ));
            }
            s
        }
        Link::Tap { fd, .. } => format!("tap,id=net0,fd={}", fd.as_raw_fd()),
    };
    vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        format!(
            "virtio-net-device,netdev=net0,mac={}",
            p.mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        ),
    ]
}

/// How QEMU ends a VM hyperboot no longer wants: SIGTERM, then SIGKILL if
/// it has not gone after 3 s.
struct QemuVm {
    pid: rustix::process::Pid,
    control: Arc<Control>,
    exited: Arc<AtomicBool>,
}

impl VmControl for QemuVm {
    fn send(&self, m: HostMessage) {
        self.control.send(m);
    }

    fn end(&self) {
        use rustix::process::{kill_process, Signal};
        let _ = kill_process(self.pid, Signal::TERM);
        let exited = self.exited.clone();
        let pid = self.pid;
        let _ = std::thread::Builder::new()
            .name("qemu kill".into())
            .spawn(move || {
                std::thread::sleep(Duration::from_secs(3));
                if !exited.load(Ordering::SeqCst) {
                    let _ = kill_process(pid, Signal::KILL);
                }
            });
    }
}

/// The QEMU binary: `$HYPER_QEMU` or `qemu-system-x86_64` on `$PATH`.
fn find_qemu() -> Result<String, QemuError> {
    let name = std::env::var("HYPER_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    if crate::host::on_path(&name) {
        Ok(name)
    } else {
        Err(QemuError::Missing(name))
    }
}

/// The threads copying the app's streams; dropping them lets them drain what
/// is left and waits for them, so no output is lost on any way out.
struct Pumps {
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: Arc<Stop>,
}

impl Drop for Pumps {
    fn drop(&mut self) {
        self.stop.set();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Boots on QEMU and supervises it to the end.
pub fn boot(
    b: super::Boot<'_>,
    accel: Accel,
    net: Option<&Plan>,
    mut run: crate::Run,
) -> Result<Outcome, BootError> {
    let super::Boot {
        artifact,
        archive: run_archive,
        stop_signal,
        cmdline,
        opts,
        contract,
    } = b;
    let binary = find_qemu()?;
    let prepared = prepare(artifact, run_archive).map_err(QemuError::Prepare)?;
    let log = memfd("hyper-qemu-log").map_err(QemuError::Prepare)?;
    let proxy = match &opts.upper {
        Some(dir) => Some(start_proxy(dir, &log)?),
        None => None,
    };
    let cfg = QemuConfig {
        binary,
        accel,
        memory_mib: opts.memory_mib,
        cpus: opts.cpus,
        stdin: opts.interactive,
        cmdline,
        extra: net
            .map(net_args)
            .unwrap_or_default()
            .into_iter()
            .chain(share_args(
                &crate::spec::shares(&opts.binds, opts.upper.as_deref()),
                proxy.as_ref().map(|(_, fd)| fd.as_raw_fd()),
            ))
            .collect(),
    };
    if let Some(p) = net {
        crate::net::relay::forward_tcp(&p.ports, |m| p.upstream(m))?;
    }
    let mut cmd = command(&cfg, &prepared, &log).map_err(QemuError::Prepare)?;
    tracing::debug!("{} {}", cfg.binary, args(&cfg, &prepared).join(" "));

    let tx = run.tx.clone();
    let control = Control::new(prepared.control.try_clone()?);
    let raw = crate::terminal::RawMode::new(opts.tty);
    let mut child = cmd
        .spawn()
        .map_err(|e| QemuError::Spawn(cfg.binary.clone(), e))?;
    drop(cmd);
    let guest_started = hyper_vmm::monotonic_ns();
    crate::stats::set("guest_started", crate::stats::us(guest_started));
    run.started(net);
    if opts.interactive {
        feed_stdin(prepared.app_in.try_clone()?, control.clone())?;
    }
    let stop_pumps = Stop::new()?;
    let counts: [Arc<AtomicU64>; 2] = Default::default();
    let counts_first = Arc::new(AtomicU64::new(0));
    let stdout = dup_file(std::io::stdout().as_fd())?;
    let gone = supervise::ReaderGone::new(run.tx.clone(), contract);
    let pumps = Pumps {
        threads: vec![
            pump(
                "stdout",
                prepared.app_out.try_clone()?,
                stdout.try_clone()?,
                stop_pumps.clone(),
                counts[0].clone(),
                Some(counts_first.clone()),
                Some((1, gone.clone())),
            )?,
            pump(
                "stderr",
                prepared.app_err.try_clone()?,
                dup_file(std::io::stderr().as_fd())?,
                stop_pumps.clone(),
                counts[1].clone(),
                Some(counts_first.clone()),
                Some((2, gone)),
            )?,
            pump(
                "console",
                prepared.console.try_clone()?,
                stdout,
                stop_pumps.clone(),
                Default::default(),
                None,
                None,
            )?,
        ],
        stop: stop_pumps,
    };
    let stop_status = Stop::new()?;
    let status_watch = watch_status(
        prepared.status.try_clone()?,
        control.clone(),
        counts,
        stop_status.clone(),
        Some(prepared.fifo_dir),
    )?;
    let vm = QemuVm {
        pid: rustix::process::Pid::from_child(&child),
        control,
        exited: Arc::new(AtomicBool::new(false)),
    };
    let exited = vm.exited.clone();
    let exited_at = Arc::new(AtomicU64::new(0));
    let exited_mark = exited_at.clone();
    let (status_tx, status_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("qemu wait".into())
        .spawn(move || {
            let st = child.wait();
            exited_mark.store(hyper_vmm::monotonic_ns(), Ordering::SeqCst);
            exited.store(true, Ordering::SeqCst);
            let _ = status_tx.send(st);
            let _ = tx.send(Event::Ended);
        })?;
    let ending = supervise::supervise(
        &run.rx,
        &vm,
        GracefulStop::new(stop_signal, opts.stop_timeout),
        opts.timeout,
        opts.tty,
    );
    drop(pumps);
    drop(raw);
    stop_status.set();
    let (report, timings_at) = status_watch.join().unwrap_or_default();
    if crate::stats::enabled() {
        crate::stats::guest_timings(&report, timings_at, Some(guest_started));
        let first = counts_first.load(Ordering::SeqCst);
        crate::stats::set("app_first_output", crate::stats::us(first));
        crate::stats::set(
            "app_exited",
            crate::stats::us(exited_at.load(Ordering::SeqCst)),
        );
    }
    let report = GuestMessage::find_report(&report);
    if ending != Ending::Guest {
        return Ok(Outcome {
            ending,
            report,
            why: None,
        });
    }
    let status = status_rx
        .recv_timeout(Duration::from_secs(5))
        .ok()
        .and_then(Result::ok);
    match (report, status) {
        (Some(r), _) => Ok(Outcome {
            ending,
            report: Some(r),
            why: None,
        }),
        (None, Some(st)) if !st.success() => {
            let mut qlog = String::new();
            let mut lf = log;
            let _ = lf.seek(std::io::SeekFrom::Start(0));
            let _ = lf.take(8192).read_to_string(&mut qlog);
            Err(QemuError::Failed {
                binary: cfg.binary,
                status: st,
                log: qlog.trim().to_string(),
            }
            .into())
        }
        (None, _) => Ok(Outcome {
            ending,
            report: None,
            why: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_folders_of_dead_hyperboots_are_swept() {
        use std::time::{Duration, SystemTime};
        let t = tempfile::tempdir().unwrap();
        let fifo_dir = |name: &str| {
            let d = t.path().join(name);
            std::fs::create_dir(&d).unwrap();
            rustix::fs::mknodat(
                rustix::fs::CWD,
                d.join("status.in"),
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o600),
                0,
            )
            .unwrap();
            d
        };
        // No process has PID 4194304 (above the kernel's PID_MAX_LIMIT).
        let dead = fifo_dir("hyperboot-4194304-aaaaaa");
        let mine = fifo_dir(&format!("hyperboot-{}-bbbbbb", std::process::id()));
        let legacy = fifo_dir("hyperboot-cccccc");
        let not_ours = fifo_dir("hyperboot-4194304-dddddd");
        std::fs::write(not_ours.join("data"), b"x").unwrap();
        let other = t.path().join("unrelated-4194304-x");
        std::fs::create_dir(&other).unwrap();
        let now = SystemTime::now();
        // Young folders are left alone, whoever made them.
        sweep_fifo_dirs(t.path(), now);
        assert!(dead.exists() && legacy.exists());
        // Two minutes on: the dead hyperboot's goes; the living one's, the
        // not-yet-hour-old legacy one, one holding a file and others stay.
        sweep_fifo_dirs(t.path(), now + Duration::from_secs(120));
        assert!(!dead.exists());
        assert!(mine.exists() && legacy.exists() && not_ours.exists() && other.exists());
        // Two hours on: the legacy one goes too.
        sweep_fifo_dirs(t.path(), now + Duration::from_secs(7200));
        assert!(!legacy.exists());
        assert!(mine.exists() && not_ours.exists() && other.exists());
    }

    #[test]
    fn the_upper_share_goes_through_the_proxy_helper() {
        let shares = crate::spec::shares(
            &[crate::spec::parse_bind("/h,x:/data").unwrap()],
            Some(std::path::Path::new("/snap/7")),
        );
        let a = share_args(&shares, Some(9)).join(" ");
        assert!(
            a.contains("-fsdev local,id=fsvol0,path=/h,,x,security_model=none -device virtio-9p-device,fsdev=fsvol0,mount_tag=vol0"),
            "{a}"
        );
        assert!(
            a.contains("-fsdev proxy,id=fsvol1,sock_fd=9 -device virtio-9p-device,fsdev=fsvol1,mount_tag=upper"),
            "{a}"
        );
    }

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
}
