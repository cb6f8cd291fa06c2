//! The QEMU backend: the artifact's sections handed to `qemu-system-x86_64 -M
//! microvm`. The kernel and initrd (plus the run-configuration archive) go in
//! memory files; the rootfs is served read-only straight from the verified,
//! open artifact at its offset — no copy, no extraction.

use std::fs::File;
use std::io::{Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};

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
    /// Holds the two FIFOs QEMU's pipe chardev opens.
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
    pub cmdline: String,
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
    for end in ["status.in", "status.out"] {
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
    // dup() gives a descriptor without close-on-exec.
    let rootfs_fd = nix::unistd::dup(a.file().as_raw_fd())?;
    let rootfs_fd = owned(rootfs_fd);
    let s = a.section(SectionKind::Rootfs);
    Ok(Prepared {
        kernel,
        initrd,
        status,
        control,
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
        "1".into(),
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
        "stdio,id=console,signal=off".into(),
        "-serial".into(),
        "chardev:console".into(),
        "-chardev".into(),
        format!("pipe,id=status,path={}", p.fifo_dir.path().join("status").display()),
        "-device".into(),
        "isa-serial,chardev=status,iobase=0x2f8,irq=3".into(),
        "-device".into(),
        "isa-debug-exit,iobase=0x501,iosize=1".into(),
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
    a.extend(cfg.extra.iter().cloned());
    a
}

/// Builds the QEMU process: stdin closed, console on our stdout, QEMU's own
/// messages captured in `qemu_log`.
pub fn command(cfg: &QemuConfig, p: &Prepared, qemu_log: &File) -> std::io::Result<Command> {
    let mut c = Command::new(&cfg.binary);
    c.args(args(cfg, p))
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(qemu_log.try_clone()?);
    Ok(c)
}

/// Reads what the guest wrote on the status port (the FIFO is non-blocking).
pub fn read_status(p: &mut Prepared) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        match (&p.status).read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    buf.truncate(n);
    buf
}

/// Sends a request to hyperinit on the guest's COM2.
pub fn send_control(p: &Prepared, line: &str) {
    let _ = (&p.control).write_all(line.as_bytes());
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
            fifo_dir: tempfile::tempdir().unwrap(),
            rootfs_fd: std::fs::File::open("/dev/null").unwrap().into(),
            rootfs_offset: 8192,
            rootfs_len: 4096,
        };
        let cfg = QemuConfig {
            binary: "qemu".into(),
            accel: Accel::Tcg,
            memory_mib: 128,
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
    }
}
