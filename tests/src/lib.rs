//! Harness for the end-to-end tests: finds (or builds) the kernel, hyperinit
//! and the two binaries, makes the busybox test image with
//! `scripts/make-test-image`, builds artifacts and runs `hyperboot`.
//!
//! Inputs come from the environment when set (`HYPER_KERNEL`, `HYPER_INIT`),
//! otherwise from the repository's scripts, so `cargo test -p hyper-tests`
//! works on its own after the README's set-up command.

pub mod objstore;
pub mod registry;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn script_output(name: &str) -> PathBuf {
    let out = Command::new(repo().join("scripts").join(name))
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/{name}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
}

/// The guest kernel: `$HYPER_KERNEL`, or the cached build (built if missing).
pub fn kernel() -> &'static Path {
    static K: OnceLock<PathBuf> = OnceLock::new();
    K.get_or_init(|| {
        std::env::var_os("HYPER_KERNEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| script_output("build-kernel"))
    })
}

/// The static hyperinit: `$HYPER_INIT`, or built now.
pub fn init() -> &'static Path {
    static I: OnceLock<PathBuf> = OnceLock::new();
    I.get_or_init(|| {
        std::env::var_os("HYPER_INIT")
            .map(PathBuf::from)
            .unwrap_or_else(|| script_output("build-init"))
    })
}

/// The path of a workspace binary: in `$HYPER_TEST_BIN_DIR` when set (the
/// nested tier runs copies, so a build on the host cannot swap them under a
/// running test), else next to this test binary, built on first use.
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("HYPER_TEST_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--quiet", "-p", "hyperbuild", "-p", "hyperboot"])
            .args(["-p", "containerd-shim-hyper-v2"])
            .current_dir(repo())
            .status()
            .expect("cargo build");
        assert!(
            st.success(),
            "building hyperbuild, hyperboot and the shim failed"
        );
    });
    // tests run from target/<profile>/deps/
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join(name)
}

pub fn hyperbuild() -> Command {
    Command::new(bin_path("hyperbuild"))
}

pub fn hyperboot() -> Command {
    let mut c = Command::new(bin_path("hyperboot"));
    // Never hang a test run: every boot has a generous bound.
    c.env_remove("HYPER_QEMU");
    c
}

/// A free TCP port on the loopback address (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A scratch directory that lives for the whole test binary.
pub fn scratch() -> &'static Path {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| tempfile::tempdir().expect("tempdir"))
        .path()
}

/// A scratch directory on a disk filesystem (`$HYPER_TEST_DISK_DIR`, which
/// the nested tier sets, else the temporary directory): one that keeps
/// `user.*` extended attributes, which tmpfs lacks before Linux 6.6.
pub fn disk_scratch() -> &'static Path {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| {
        let base =
            std::env::var_os("HYPER_TEST_DISK_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        tempfile::tempdir_in(base).expect("tempdir")
    })
    .path()
}

/// Makes the busybox OCI layout (`scripts/make-test-image`) at `dir`.
pub fn make_image(dir: &Path, tag: &str, user: &str) {
    let out = Command::new(repo().join("scripts/make-test-image"))
        .arg(dir)
        .arg(tag)
        .arg(user)
        .output()
        .expect("run make-test-image");
    assert!(
        out.status.success(),
        "make-test-image failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds `oci:layout` into `out` with the test kernel and init.
pub fn build(layout: &Path, out: &Path) -> Output {
    build_with(layout, out, &[])
}

/// [`build`] with more hyperbuild flags. With `$HYPER_TEST_FIXTURES` (set
/// by `scripts/test` for one run), an artifact built before from the same
/// layout (index and blobs) and flags by the same hyperbuild, kernel and init is taken from
/// there: the nested tier reuses what the host's tiers built, where a build
/// at TCG speed would cost minutes.
pub fn build_with(layout: &Path, out: &Path, extra: &[&str]) -> Output {
    let cached = std::env::var_os("HYPER_TEST_FIXTURES").map(|d| {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(std::fs::read(layout.join("index.json")).unwrap_or_default());
        // The blobs' bytes too: a test corrupts one and keeps index.json.
        let mut blobs: Vec<PathBuf> = std::fs::read_dir(layout.join("blobs/sha256"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        blobs.sort();
        for b in blobs {
            h.update(std::fs::read(&b).unwrap_or_default());
        }
        for a in extra {
            h.update(a.as_bytes());
            h.update([0]);
        }
        // Size and time, not the path: the nested tier runs copies (cp -p).
        for f in [kernel(), init(), &bin_path("hyperbuild")] {
            let m = std::fs::metadata(f).expect("build input");
            h.update(format!("{}:{:?};", m.len(), m.modified().ok()));
        }
        PathBuf::from(d).join(hex::encode(h.finalize()))
    });
    if let Some(c) = &cached {
        if let Ok(stdout) = std::fs::read(c.with_extension("stdout")) {
            let _ = std::fs::remove_file(out);
            std::fs::copy(c, out).expect("copy a cached test artifact");
            use std::os::unix::process::ExitStatusExt;
            return Output {
                status: std::process::ExitStatus::from_raw(0),
                stdout,
                stderr: Vec::new(),
            };
        }
    }
    let o = hyperbuild()
        .arg(format!("oci:{}", layout.display()))
        .arg("-o")
        .arg(out)
        .arg("--kernel")
        .arg(kernel())
        .arg("--init")
        .arg(init())
        .arg("--quiet")
        .args(extra)
        .output()
        .expect("run hyperbuild");
    if let (Some(c), true) = (&cached, o.status.success()) {
        // Artifact first, then the record that makes it count.
        let tmp = c.with_extension("tmp");
        if std::fs::copy(out, &tmp).is_ok() && std::fs::rename(&tmp, c).is_ok() {
            let _ = std::fs::write(c.with_extension("stdout"), &o.stdout);
        }
    }
    o
}

/// The default busybox artifact (image config: Cmd sh, GREETING=hello,
/// WorkingDir /srv/app, root), built once.
pub fn busybox_artifact() -> &'static Path {
    static A: OnceLock<PathBuf> = OnceLock::new();
    A.get_or_init(|| busybox_built("busybox", ""))
}

/// Another artifact of the busybox image (its user `app`): for what must
/// tell artifacts apart (replacements, moved pointers, pinned digests).
/// Its layout, `objstore-other-layout` in [`scratch`], is kept for builds.
pub fn other_artifact() -> &'static Path {
    static A: OnceLock<PathBuf> = OnceLock::new();
    A.get_or_init(|| busybox_built("objstore-other", "app"))
}

/// Makes the busybox layout `NAME-layout` (run as `user`) in [`scratch`]
/// and builds it into `NAME.hvm` beside it.
fn busybox_built(name: &str, user: &str) -> PathBuf {
    let layout = scratch().join(format!("{name}-layout"));
    make_image(&layout, "latest", user);
    let out = scratch().join(format!("{name}.hvm"));
    let o = build(&layout, &out);
    assert!(
        o.status.success(),
        "hyperbuild failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// The result of one boot.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Boots `artifact` on the QEMU backend with `args` (hyperboot flags, then
/// `--` and the command), bounded by a timeout.
pub fn boot(artifact: &Path, args: &[&str]) -> Run {
    boot_on("qemu", artifact, args)
}

/// Boots `artifact` on `backend` (`qemu` or `kvm`) with `args`.
pub fn boot_on(backend: &str, artifact: &Path, args: &[&str]) -> Run {
    let mut c = hyperboot();
    c.arg("--backend").arg(backend);
    run_bounded(c, artifact, args)
}

/// Runs `hyperboot` with `args` (flags, then `--` and the command) on
/// `artifact`, with `--timeout 120` unless the flags bound it already.
fn run_bounded(mut c: Command, artifact: &Path, args: &[&str]) -> Run {
    let flags: Vec<&str> = args.iter().copied().take_while(|a| *a != "--").collect();
    if !flags.contains(&"--timeout") {
        c.args(["--timeout", "120"]);
    }
    let out = c
        .args(flags)
        .arg(artifact)
        .args(args.iter().skip_while(|a| **a != "--"))
        .output()
        .expect("run hyperboot");
    Run::from(out)
}

/// The VMM a scenario runs on. Every app-level scenario is written once,
/// as a function of the backend, and run as a test on each
/// (`tests/tests/e2e/scenarios/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// QEMU `microvm` (TCG where KVM is not hardware): runs anywhere.
    Qemu,
    /// hyperboot's own VMM, cold boots (`--snapshot off`): full guests
    /// need KVM with real semantics (hardware, or the nested host of the
    /// `nested` tier).
    Kvm,
    /// hyperboot's own VMM, every boot restored from a snapshot made
    /// first with the same options (`hyperboot-restored`).
    KvmRestored,
}

impl Backend {
    /// The `--backend` value.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Qemu => "qemu",
            Backend::Kvm | Backend::KvmRestored => "kvm",
        }
    }

    /// Whether this host runs the backend's full guests; when not, the test
    /// `test` is recorded as skipped, loudly.
    pub fn available(self, test: &str) -> bool {
        match self {
            Backend::Qemu => true,
            Backend::Kvm | Backend::KvmRestored if hardware_kvm() => true,
            Backend::Kvm | Backend::KvmRestored => {
                skip(
                    test,
                    "needs KVM with real semantics (hardware, or the nested host: scripts/test nested)",
                );
                false
            }
        }
    }

    /// `hyperboot --backend NAME`, for scenarios that drive the process
    /// themselves (they add `--timeout`, flags, the artifact and `-- CMD`).
    pub fn hyperboot(self) -> Command {
        let mut c = match self {
            Backend::KvmRestored => {
                let mut c = Command::new(bin_path("hyperboot-restored"));
                c.env_remove("HYPER_QEMU");
                c
            }
            _ => hyperboot(),
        };
        c.args(["--backend", self.name()]);
        if self == Backend::Kvm {
            c.args(["--snapshot", "off"]);
        }
        c
    }

    /// Boots `artifact` with `args` (flags, then `--` and the command).
    pub fn boot(self, artifact: &Path, args: &[&str]) -> Run {
        run_bounded(self.hyperboot(), artifact, args)
    }
}

/// Records a skipped test loudly: on stderr and in `$HYPER_TEST_SKIP_LOG`,
/// which `scripts/test` counts.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("HYPER_TEST_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            // One write per line: concurrent tests append to the same file.
            let _ = f.write_all(format!("{test}: {reason}\n").as_bytes());
        }
    }
}

/// Whether /dev/kvm can be opened (any kind, PVM included): the tiny test
/// guests run on it.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Whether the host has hardware virtualization (vmx/svm) and not nested PVM
/// KVM: full guests with user space run only there.
pub fn hardware_kvm() -> bool {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    kvm_usable() && hw && !Path::new("/sys/module/kvm_pvm").exists()
}

/// Compiles a test guest from `tests/guests/NAME.c` (plus `start.S`) with the
/// given `-D` defines into a tiny ELF with a PVH note: 32-bit code (gcc -m32),
/// linked as i386 by `guest.ld`, then rewrapped as ELF64 (no relocations are
/// left to convert) so the same loader as for a vmlinux takes it.
pub fn build_guest(name: &str, defines: &[&str]) -> PathBuf {
    let src = repo().join("tests/guests");
    let tag = format!(
        "{name}{}",
        defines
            .iter()
            .map(|d| format!("-{}", d.replace('=', "")))
            .collect::<String>()
    );
    let dir = scratch().join(format!("guest-{tag}"));
    std::fs::create_dir_all(&dir).expect("guest dir");
    let flags = [
        "-m32",
        "-O2",
        "-ffreestanding",
        "-fno-pic",
        "-fno-pie",
        "-fno-stack-protector",
        "-nostdlib",
        "-fno-builtin",
        "-mgeneral-regs-only",
        "-fno-asynchronous-unwind-tables",
        "-Wall",
        "-Werror",
    ];
    let mut objs = Vec::new();
    for (file, obj) in [("start.S", "start.o"), (&format!("{name}.c")[..], "main.o")] {
        let o = dir.join(obj);
        let mut cc = Command::new("gcc");
        cc.args(flags)
            .args(defines.iter().map(|d| format!("-D{d}")))
            .arg("-c")
            .arg(src.join(file))
            .arg("-o")
            .arg(&o);
        run_ok(cc, "gcc (install build-essential)");
        objs.push(o);
    }
    let elf32 = dir.join(format!("{tag}.elf32"));
    let mut ld = Command::new("ld");
    ld.args([
        "-m",
        "elf_i386",
        "-nostdlib",
        "-static",
        "-z",
        "noexecstack",
        "--no-warn-rwx-segments",
        "--build-id=none",
        "-T",
    ])
    .arg(src.join("guest.ld"))
    .arg("-o")
    .arg(&elf32)
    .args(&objs);
    run_ok(ld, "ld");
    let elf = dir.join(format!("{tag}.elf"));
    let mut oc = Command::new("objcopy");
    oc.args(["-O", "elf64-x86-64"]).arg(&elf32).arg(&elf);
    run_ok(oc, "objcopy");
    elf
}

fn run_ok(mut c: Command, what: &str) {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The rootfs test guests read: at every 4-byte offset o, the word o ^ 0x5a5a5a5a.
pub fn pattern_rootfs(len: usize) -> Vec<u8> {
    (0..len / 4)
        .flat_map(|i| ((i as u32 * 4) ^ 0x5a5a_5a5a).to_le_bytes())
        .collect()
}

/// Wraps a test guest into an artifact (kernel = the guest, rootfs = `rootfs`).
pub fn guest_artifact(elf: &Path, rootfs: &[u8]) -> PathBuf {
    let out = elf.with_extension("hvm");
    let _ = std::fs::remove_file(&out);
    let manifest = hvm::Manifest {
        image: hvm::ImageInfo {
            reference: "test-guest".into(),
            digest: "sha256:0000000000000000000000000000000000000000000000000000000000000000"
                .into(),
            index_digest: None,
            platform: hvm::Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                variant: None,
            },
        },
        config: hvm::ImageConfig {
            cmd: Some(vec!["guest".into()]),
            ..Default::default()
        },
        kernel: hvm::KernelInfo {
            version: "test-guest".into(),
            cmdline: String::new(),
        },
        rootfs: hvm::RootfsInfo {
            fs_type: "raw".into(),
            size: rootfs.len() as u64,
        },
        builder: hvm::BuilderInfo {
            name: "hyper-tests".into(),
            version: "0".into(),
        },
        init: None,
    };
    let mut w = hvm::ArtifactWriter::create(&out).expect("create artifact");
    w.section_bytes(
        hvm::SectionKind::Kernel,
        hvm::FLAG_REQUIRED,
        &std::fs::read(elf).expect("guest elf"),
    )
    .unwrap();
    w.section_bytes(hvm::SectionKind::Initrd, hvm::FLAG_REQUIRED, &[])
        .unwrap();
    w.section_bytes(hvm::SectionKind::Rootfs, hvm::FLAG_REQUIRED, rootfs)
        .unwrap();
    w.section_bytes(
        hvm::SectionKind::Manifest,
        hvm::FLAG_REQUIRED,
        &manifest.to_canonical_json(),
    )
    .unwrap();
    w.finish().expect("finish artifact");
    out
}

/// Boots an artifact on the KVM backend with extra hyperboot flags.
pub fn boot_kvm(artifact: &Path, flags: &[&str]) -> Run {
    let mut defaults: Vec<&str> = Vec::new();
    for (flag, value) in [("--memory", "64M"), ("--timeout", "60")] {
        if !flags.contains(&flag) {
            defaults.extend([flag, value]);
        }
    }
    let out = hyperboot()
        .args(["--backend", "kvm"])
        .args(defaults)
        .args(flags)
        .arg(artifact)
        .output()
        .expect("run hyperboot");
    Run::from(out)
}

/// Serves `dir` with the KVM VMM's 9p server over TCP on the host's loopback
/// (a connection, a session), as a QEMU guest's kernel can mount it with
/// `trans=tcp`; returns the port.
pub fn serve_9p_over_tcp(dir: &Path, read_only: bool) -> u16 {
    use hyper_vmm::p9::Server;
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            let mut server = Server::new(&dir, read_only, 4096).unwrap();
            std::thread::spawn(move || loop {
                let mut size = [0u8; 4];
                if c.read_exact(&mut size).is_err() {
                    return;
                }
                let n = u32::from_le_bytes(size) as usize;
                assert!((7..=1 << 20).contains(&n), "a 9p message of {n} bytes");
                let mut m = vec![0u8; n];
                m[..4].copy_from_slice(&size);
                c.read_exact(&mut m[4..]).unwrap();
                let room = server.msize() as usize;
                if c.write_all(&server.handle(&m, room)).is_err() {
                    return;
                }
            });
        }
    });
    port
}

/// A network namespace made as CNI makes a pod's: a veth pair, the host's
/// end 10.231.N.1/24, the namespace's `eth0` 10.231.N.2/24 with a default
/// route; removed when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    host_if: String,
    pub pod_ip: String,
    pub gateway: String,
}

impl NetNs {
    pub fn new(n: u8) -> NetNs {
        let name = format!("hyper-test-{}-{n}", std::process::id());
        let host_if = format!("hct{}", n);
        let net = NetNs {
            name: name.clone(),
            host_if: host_if.clone(),
            pod_ip: format!("10.231.{n}.2"),
            gateway: format!("10.231.{n}.1"),
        };
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        for args in [
            vec!["netns", "add", &name],
            vec![
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ],
            vec!["addr", "add", &format!("10.231.{n}.1/24"), "dev", &host_if],
            vec!["link", "set", &host_if, "up"],
            vec![
                "-n",
                &name,
                "addr",
                "add",
                &format!("10.231.{n}.2/24"),
                "dev",
                "eth0",
            ],
            vec!["-n", &name, "link", "set", "eth0", "up"],
            vec!["-n", &name, "link", "set", "lo", "up"],
            vec![
                "-n",
                &name,
                "route",
                "add",
                "default",
                "via",
                &format!("10.231.{n}.1"),
            ],
        ] {
            let out = Command::new("ip")
                .args(&args)
                .output()
                .expect("ip (iproute2)");
            assert!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        net
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Makes `c` run in the namespace (setns between fork and exec).
    pub fn enter(&self, c: &mut Command) {
        use std::os::fd::{AsRawFd, OwnedFd};
        use std::os::unix::process::CommandExt;
        let ns = OwnedFd::from(std::fs::File::open(self.path()).expect("the namespace"));
        // SAFETY: one system call between fork and exec, on a descriptor
        // the closure owns.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// The namespace's eth0's MAC address.
    pub fn mac(&self) -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "cat",
                "/sys/class/net/eth0/address",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .into_owned()
            .trim()
            .to_string()
    }

    /// Waits (up to 10 s) until no tc redirect is left on eth0: a VM's is
    /// removed by a helper once its hyperboot has gone.
    pub fn redirect_gone(&self) -> bool {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.qdiscs().contains("ingress") {
            if std::time::Instant::now() > until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        true
    }

    /// What `tc qdisc show` lists on the namespace's eth0.
    pub fn qdiscs(&self) -> String {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "tc", "qdisc", "show", "dev", "eth0",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}
