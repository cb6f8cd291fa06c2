//! bench-boot: boot costs, ours next to the peers', from the same run.
//!
//! `bench-boot app ARTIFACT [RUNS]` boots the same artifact RUNS times through
//! hyperboot and through plain `qemu-system-x86_64 -M microvm` given the same
//! kernel, initrd (plus the same run configuration) and rootfs by hand, and
//! prints the median and spread of process start → the app's first output and
//! of the whole run.
//!
//! `bench-boot null [RUNS]` boots a null test guest (it leaves through the exit
//! port on its first instructions) with hyperboot's KVM VMM and with QEMU
//! microvm (KVM, and TCG), and prints whole-process wall time, exec → first
//! KVM_RUN (hyperboot reports it) and peak RSS.
//!
//! `bench-boot kvm-app ARTIFACT [RUNS]` needs KVM with real semantics
//! (hardware, or the nested host): the artifact on hyperboot's own VMM
//! (`--backend kvm`, with `--stats`) against QEMU microvm with `-accel kvm`
//! given the same kernel, initrd and rootfs by hand; it prints the times to
//! the app's first output and the whole run, the ratio, and ours broken down
//! (exec → first KVM_RUN, exits, VMM-only RSS).
//!
//! `bench-boot initcalls ARTIFACT` boots the artifact once, cold, with
//! `initcall_debug`, runs `dmesg` in it (the bench image has busybox), and
//! prints the kernel's costliest initcalls, named from the artifact's vmlinux
//! with `nm`, and its time from entry to `Run /init`.
//!
//! Runs alternate between the contenders so machine noise hits all of them.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hvm::{Artifact, SectionKind};

struct Sample {
    first_output: Duration,
    total: Duration,
}

fn time(mut cmd: Command) -> Sample {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut byte = [0u8; 1];
    let n = out.read(&mut byte).expect("read");
    assert!(n == 1, "no output from {cmd:?}");
    let first_output = start.elapsed();
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    let status = child.wait().expect("wait");
    let total = start.elapsed();
    assert!(
        status.success() || status.code() == Some(1),
        "{cmd:?} failed: {status}"
    );
    Sample {
        first_output,
        total,
    }
}

fn stats(name: &str, what: &str, v: &mut [Duration]) -> f64 {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = ms(v[v.len() / 2]);
    println!(
        "{name:<28} {what:<14} median {median:9.1} ms   min {:9.1}   max {:9.1}   (n={})",
        ms(v[0]),
        ms(v[v.len() - 1]),
        v.len()
    );
    median
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("null") => null(args.get(2).map(|s| s.parse().expect("RUNS")).unwrap_or(20)),
        Some("stop") => stop(
            PathBuf::from(args.get(2).expect("usage: bench-boot stop ARTIFACT [RUNS]")),
            args.get(3).map(|s| s.parse().expect("RUNS")).unwrap_or(5),
        ),
        Some("app") => app(
            PathBuf::from(args.get(2).expect("usage: bench-boot app ARTIFACT [RUNS]")),
            args.get(3).map(|s| s.parse().expect("RUNS")).unwrap_or(5),
        ),
        Some("streams") => streams(args.get(2).map(|s| s.parse().expect("RUNS")).unwrap_or(5)),
        Some("kvm-app") => kvm_app(
            PathBuf::from(args.get(2).expect("usage: bench-boot kvm-app ARTIFACT [RUNS]")),
            args.get(3).map(|s| s.parse().expect("RUNS")).unwrap_or(5),
        ),
        Some("initcalls") => initcalls(PathBuf::from(
            args.get(2).expect("usage: bench-boot initcalls ARTIFACT"),
        )),
        Some("peer-files") => peer_files(
            PathBuf::from(args.get(2).expect("usage: bench-boot peer-files ARTIFACT DIR RUN_JSON")),
            PathBuf::from(args.get(3).expect("DIR")),
            args.get(4).expect("RUN_JSON"),
        ),
        _ => panic!("usage: bench-boot null [RUNS] | bench-boot streams [RUNS] | bench-boot app ARTIFACT [RUNS] | bench-boot kvm-app ARTIFACT [RUNS] | bench-boot initcalls ARTIFACT | bench-boot peer-files ARTIFACT DIR RUN_JSON"),
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs `cmd` to the end; returns wall time, peak RSS (KiB) and stderr.
fn measure(mut cmd: Command) -> (Duration, u64, String) {
    let start = Instant::now();
    // Reaped by wait4 below (std's wait would not report the child's rusage).
    #[allow(clippy::zombie_processes)]
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointers; `pid` is our child, not yet reaped.
    unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    let mut err = String::new();
    if let Some(mut e) = child.stderr {
        let _ = e.read_to_string(&mut err);
    }
    (wall, usage.ru_maxrss as u64, err)
}

fn null(runs: usize) {
    let hyperboot = std::env::var("HYPERBOOT").unwrap_or_else(|_| "hyperboot".into());
    let elf = hyper_tests::build_guest("exitport", &["NULL_GUEST"]);
    let art = hyper_tests::guest_artifact(&elf, &[0u8; 4096]);
    let qemu = |accel: &str| {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-M",
            "microvm,acpi=off,x-option-roms=off",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
        ])
        .args(["-display", "none", "-m", "64M", "-accel", accel])
        .arg("-kernel")
        .arg(&elf)
        .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1"]);
        c
    };
    let (mut hw, mut hr, mut hf, mut qkw, mut qkr, mut qtw, mut qtr) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut exits = 0;
    for _ in 0..runs {
        let mut c = Command::new(&hyperboot);
        c.args(["--backend", "kvm", "--memory", "64M"])
            .arg(&art)
            .env("HYPER_SPAWN_NS", monotonic_ns().to_string());
        let (w, rss, err) = measure(c);
        let first = err
            .split("exec_to_first_run_us=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("hyperboot did not report its timing: {err}"));
        exits = err
            .split("exits=")
            .nth(1)
            .and_then(|r| r.trim().parse::<u64>().ok())
            .unwrap_or(0);
        hw.push(w);
        hr.push(Duration::from_micros(rss));
        hf.push(Duration::from_micros(first));
        let (w, rss, _) = measure(qemu("kvm"));
        qkw.push(w);
        qkr.push(Duration::from_micros(rss));
        let (w, rss, _) = measure(qemu("tcg"));
        qtw.push(w);
        qtr.push(Duration::from_micros(rss));
    }
    println!(
        "bench-boot null: {runs} runs each, a null guest that leaves on its first instructions"
    );
    let ours = stats("hyperboot --backend kvm", "whole process", &mut hw);
    stats("hyperboot --backend kvm", "exec->KVM_RUN", &mut hf);
    let peer = stats("qemu microvm -accel kvm", "whole process", &mut qkw);
    stats("qemu microvm -accel tcg", "whole process", &mut qtw);
    let kib = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_micros() as f64 / 1024.0
    };
    println!(
        "peak RSS (median, MiB): hyperboot {:.1}, qemu kvm {:.1}, qemu tcg {:.1}",
        kib(&mut hr),
        kib(&mut qkr),
        kib(&mut qtr)
    );
    println!("exits to hyperboot for the null guest: {exits}");
    println!("ratio hyperboot/qemu-kvm whole process: {:.3}", ours / peer);
    println!(
        "firecracker: not measured (no release can be fetched from this machine's registries)"
    );
}

/// Output throughput on the KVM VMM: a test guest writes on the stdout
/// port of the virtio-console (64 KiB buffers) or on the serial console (a VM
/// exit per byte); the same guest writing nothing gives the fixed cost,
/// subtracted.
fn streams(runs: usize) {
    let hyperboot = std::env::var("HYPERBOOT").unwrap_or_else(|_| "hyperboot".into());
    const PORT_KB: u32 = 256 * 1024;
    const SERIAL_KB: u32 = 512;
    let guest = |mode: u32, kb: u32| {
        let elf = hyper_tests::build_guest(
            "console",
            &[&format!("MODE={mode}"), &format!("BULK_KB={kb}")],
        );
        hyper_tests::guest_artifact(&elf, &[0u8; 4096])
    };
    let (port, port0, serial, serial0) = (
        guest(3, PORT_KB),
        guest(3, 0),
        guest(4, SERIAL_KB),
        guest(4, 0),
    );
    let run = |art: &Path| -> (Duration, u64) {
        let start = Instant::now();
        let mut child = Command::new(&hyperboot)
            .args(["--backend", "kvm", "--memory", "64M"])
            .arg(art)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut out = child.stdout.take().expect("stdout");
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        assert!(child.wait().expect("wait").success(), "{art:?} failed");
        (start.elapsed(), n)
    };
    let (mut p, mut p0, mut s, mut s0) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let (t, n) = run(&port);
        assert!(
            n >= u64::from(PORT_KB) * 1024,
            "the port delivered {n} bytes"
        );
        p.push(t);
        p0.push(run(&port0).0);
        let (t, n) = run(&serial);
        assert!(
            n >= u64::from(SERIAL_KB) * 1024,
            "the serial console delivered {n} bytes"
        );
        s.push(t);
        s0.push(run(&serial0).0);
    }
    println!("bench-boot streams: {runs} runs each, test guests on the KVM VMM");
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64()
    };
    let port_mbs = f64::from(PORT_KB) / 1024.0 / (med(&mut p) - med(&mut p0)).max(1e-6);
    let serial_mbs = f64::from(SERIAL_KB) / 1024.0 / (med(&mut s) - med(&mut s0)).max(1e-6);
    println!(
        "virtio-console stdout port  {port_mbs:10.1} MiB/s   ({} MiB)",
        PORT_KB / 1024
    );
    println!(
        "serial console (COM1)       {serial_mbs:10.2} MiB/s   ({} KiB)",
        SERIAL_KB
    );
    println!("ratio port/serial: {:.0}", port_mbs / serial_mbs);
}

/// Time from SIGTERM to hyperboot's exit for an app that exits promptly on
/// its stop signal, and app output throughput through the stdout port
/// against the serial console.
fn stop(artifact: PathBuf, runs: usize) {
    use std::io::BufRead;
    let hyperboot = std::env::var("HYPERBOOT").unwrap_or_else(|_| "hyperboot".into());
    let mut stops = Vec::new();
    let mut rates = Vec::new();
    let mut serial = Vec::new();
    for _ in 0..runs {
        let mut child = Command::new(&hyperboot)
            .args(["--backend", "qemu"])
            .arg(&artifact)
            .args([
                "--",
                "sh",
                "-c",
                "trap 'exit 0' TERM; echo ready; sleep 1000 & wait",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("ready");
        let t = Instant::now();
        // SAFETY: kill has no memory effects; the pid is our live child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().expect("wait");
        assert_eq!(
            status.code(),
            Some(0),
            "the app did not exit cleanly on SIGTERM"
        );
        stops.push(t.elapsed());
        // App output: the stream port (stdout) against the serial console
        // (the same bytes written to /dev/console).
        for (redirect, mib, slot) in [
            ("", 16usize, &mut rates),
            (" > /dev/console", 1, &mut serial),
        ] {
            let mut child = Command::new(&hyperboot)
                .args(["--backend", "qemu"])
                .arg(&artifact)
                .args([
                    "--",
                    "sh",
                    "-c",
                    &format!(
                        "(echo go; dd if=/dev/zero bs=65536 count={} 2>/dev/null | tr '\\000' x){redirect}",
                        mib * 16
                    ),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn");
            let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
            let mut go = String::new();
            out.read_line(&mut go).expect("go");
            let t = Instant::now();
            let mut rest = Vec::new();
            out.read_to_end(&mut rest).expect("output");
            let secs = t.elapsed().as_secs_f64();
            child.wait().expect("wait");
            assert_eq!(rest.len(), mib << 20, "lost output");
            slot.push(Duration::from_secs_f64(secs / mib as f64));
        }
    }
    println!("bench-boot stop: {runs} runs, QEMU backend");
    stats("SIGTERM -> hyperboot exit", "app exits", &mut stops);
    let fast = stats("1 MiB of app output", "stdout port", &mut rates);
    let slow = stats("1 MiB of app output", "serial", &mut serial);
    println!(
        "app output: {:.2} MB/s through the stdout port (virtio serial) vs {:.2} MB/s through the serial console ({:.0}x)",
        1.048576 / (fast / 1000.0),
        1.048576 / (slow / 1000.0),
        slow / fast
    );
}

/// Writes what a peer VMM needs to boot the artifact by hand into `dir`:
/// `vmlinux`, `initrd` (with `run_json` as hyperinit's run configuration),
/// `rootfs.erofs` and `cmdline`.
fn peer_files(artifact: PathBuf, dir: PathBuf, run_json: &str) {
    let a = Artifact::open(&artifact).expect("open artifact");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).expect("write");
    write("vmlinux", &a.read_section(SectionKind::Kernel).unwrap());
    let mut initrd = a.read_section(SectionKind::Initrd).unwrap();
    initrd.resize(initrd.len().div_ceil(4) * 4, 0);
    let mut c = hvm::cpio::Cpio::new();
    c.dir("hyper", 0o755);
    c.file("hyper/run.json", 0o644, run_json.as_bytes());
    initrd.extend_from_slice(&c.finish());
    write("initrd", &initrd);
    write(
        "rootfs.erofs",
        &a.read_section(SectionKind::Rootfs).unwrap(),
    );
    write(
        "cmdline",
        format!("{} loglevel=1", a.manifest().kernel.cmdline).as_bytes(),
    );
}

fn app(artifact: PathBuf, runs: usize) {
    let hyperboot = std::env::var("HYPERBOOT").unwrap_or_else(|_| "hyperboot".into());
    let peer_vm = Peer::new(&artifact);
    let accel = if Path::new("/sys/module/kvm_pvm").exists()
        || !std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .contains(" vmx")
            && !std::fs::read_to_string("/proc/cpuinfo")
                .unwrap_or_default()
                .contains(" svm")
    {
        "tcg"
    } else {
        "kvm"
    };
    let peer = || peer_vm.command(accel);
    let ours = || {
        let mut c = Command::new(&hyperboot);
        c.args(["--backend", "qemu"])
            .arg(&artifact)
            .args(["--", "echo", "ready"]);
        c
    };
    println!(
        "bench-boot: {} runs each, accel {accel}, artifact {}",
        runs,
        artifact.display()
    );
    let (mut of, mut ot, mut pf, mut pt) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let s = time(ours());
        of.push(s.first_output);
        ot.push(s.total);
        let s = time(peer());
        pf.push(s.first_output);
        pt.push(s.total);
    }
    let a1 = stats("hyperboot --backend qemu", "first output", &mut of);
    let a2 = stats("hyperboot --backend qemu", "whole run", &mut ot);
    let b1 = stats("qemu microvm by hand (peer)", "first output", &mut pf);
    let b2 = stats("qemu microvm by hand (peer)", "whole run", &mut pt);
    println!(
        "ratio hyperboot/peer: first output {:.2}, whole run {:.2}",
        a1 / b1,
        a2 / b2
    );
}

/// QEMU microvm booting the artifact's kernel, initrd (with a run
/// configuration for `echo ready`) and rootfs by hand, as the peer.
struct Peer {
    _dir: tempfile::TempDir,
    kernel: PathBuf,
    initrd: PathBuf,
    rootfs: PathBuf,
    status: PathBuf,
    cmdline: String,
}

impl Peer {
    fn new(artifact: &Path) -> Peer {
        Peer::with_argv(artifact, &["echo", "ready"])
    }

    /// The peer running `argv` as its app.
    fn with_argv(artifact: &Path, argv: &[&str]) -> Peer {
        let a = Artifact::open(artifact).expect("open artifact");
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, bytes: &[u8]| -> PathBuf {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).expect("write");
            p
        };
        let kernel = write("vmlinux", &a.read_section(SectionKind::Kernel).unwrap());
        let mut initrd = a.read_section(SectionKind::Initrd).unwrap();
        initrd.resize(initrd.len().div_ceil(4) * 4, 0);
        let run = serde_json::json!({
            "argv": argv, "env": [], "workdir": "", "user": "", "hostname": "peer", "debug": false
        })
        .to_string();
        let run = run.as_bytes();
        let mut c = hvm::cpio::Cpio::new();
        c.dir("hyper", 0o755);
        c.file("hyper/run.json", 0o644, run);
        initrd.extend_from_slice(&c.finish());
        let initrd = write("initrd", &initrd);
        let rootfs = write(
            "rootfs.erofs",
            &a.read_section(SectionKind::Rootfs).unwrap(),
        );
        let status = dir.path().join("status");
        let cmdline = format!("{} loglevel=1", a.manifest().kernel.cmdline);
        Peer {
            _dir: dir,
            kernel,
            initrd,
            rootfs,
            status,
            cmdline,
        }
    }

    fn command(&self, accel: &str) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-M",
            "microvm,acpi=off,x-option-roms=off",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-m",
            "128M",
            "-accel",
            accel,
            "-cpu",
            // The CPU model hyperboot's QEMU backend gives a TCG guest.
            if accel == "kvm" {
                "host"
            } else {
                hyperboot::backend::qemu::TCG_CPU
            },
        ])
        .arg("-kernel")
        .arg(&self.kernel)
        .arg("-initrd")
        .arg(&self.initrd)
        .arg("-append")
        .arg(&self.cmdline)
        .args(["-serial", "stdio", "-chardev"])
        .arg(format!("file,id=st,path={}", self.status.display()))
        .args([
            "-device",
            "isa-serial,chardev=st,iobase=0x2f8,irq=3",
            "-device",
            "isa-debug-exit,iobase=0x501,iosize=1",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=root,readonly=on",
            self.rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"]);
        c
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn kvm_app(artifact: PathBuf, runs: usize) {
    let hyperboot = std::env::var("HYPERBOOT").unwrap_or_else(|_| "hyperboot".into());
    let peer = Peer::new(&artifact);
    let stats_file = tempfile::NamedTempFile::new().expect("tempfile");
    let snapshots = tempfile::tempdir().expect("tempdir");
    // `--snapshot off`: a cold boot; `require`: restored from the snapshot
    // `prepare` made (a boot that is not restored fails the benchmark).
    let ours = |snapshot: &str| {
        let mut c = Command::new(&hyperboot);
        c.env("HYPER_SNAPSHOT_CACHE", snapshots.path())
            .args(["--backend", "kvm", "--snapshot", snapshot, "--stats"])
            .arg(stats_file.path())
            .arg(&artifact)
            .args(["--", "echo", "ready"]);
        c
    };
    println!(
        "bench-boot kvm-app: {runs} runs each, artifact {}",
        artifact.display()
    );
    let prepared = Command::new(&hyperboot)
        .env("HYPER_SNAPSHOT_CACHE", snapshots.path())
        .args(["prepare", "--backend", "kvm"])
        .arg(&artifact)
        .stdout(Stdio::null())
        .status()
        .expect("hyperboot prepare");
    assert!(prepared.success(), "hyperboot prepare failed");
    // One of each first: the page cache and KVM warm for all.
    let _ = time(ours("off"));
    let _ = time(ours("require"));
    let _ = time(peer.command("kvm"));
    std::fs::write(stats_file.path(), b"").expect("truncate");
    let (mut of, mut ot, mut rf, mut rt, mut pf, mut pt) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let s = time(ours("off"));
        of.push(s.first_output);
        ot.push(s.total);
        let s = time(ours("require"));
        rf.push(s.first_output);
        rt.push(s.total);
        let s = time(peer.command("kvm"));
        pf.push(s.first_output);
        pt.push(s.total);
    }
    let a1 = stats("hyperboot kvm, cold", "first output", &mut of);
    let a2 = stats("hyperboot kvm, cold", "whole run", &mut ot);
    let r1 = stats("hyperboot kvm, restored", "first output", &mut rf);
    let r2 = stats("hyperboot kvm, restored", "whole run", &mut rt);
    let b1 = stats("qemu microvm -accel kvm", "first output", &mut pf);
    let b2 = stats("qemu microvm -accel kvm", "whole run", &mut pt);
    println!(
        "ratio hyperboot cold/qemu microvm: first output {:.2}, whole run {:.2}",
        a1 / b1,
        a2 / b2
    );
    println!(
        "ratio hyperboot restored/qemu microvm: first output {:.2}, whole run {:.2}",
        r1 / b1,
        r2 / b2
    );
    println!(
        "ratio hyperboot restored/cold: first output {:.3} (budget <= 0.1), whole run {:.3}",
        r1 / a1,
        r2 / a2
    );
    // Ours, broken down from --stats (one JSON line per run).
    let lines = std::fs::read_to_string(stats_file.path()).expect("read stats");
    let runs: Vec<serde_json::Value> = lines
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let cold: Vec<&serde_json::Value> = runs.iter().filter(|v| v["snapshot"] == "none").collect();
    let restored: Vec<&serde_json::Value> = runs
        .iter()
        .filter(|v| v["snapshot"] == "restored")
        .collect();
    assert_eq!(
        restored.len(),
        cold.len(),
        "every --snapshot require run restored"
    );
    breakdown("cold", &cold);
    breakdown("restored", &restored);
    density(&hyperboot, &artifact, snapshots.path());
}

/// Medians of one kind of run's `--stats` lines.
fn breakdown(kind: &str, runs: &[&serde_json::Value]) {
    let field = |f: &dyn Fn(&serde_json::Value) -> Option<f64>| -> Vec<f64> {
        runs.iter().copied().filter_map(f).collect()
    };
    let us = |k: &'static str| move |v: &serde_json::Value| v[k].as_f64();
    for (name, mut v, unit, scale) in [
        (
            "exec -> first KVM_RUN",
            field(&us("first_kvm_run")),
            "ms",
            1e-3,
        ),
        (
            "exec -> hyperinit",
            field(&us("hyperinit_started")),
            "ms",
            1e-3,
        ),
        ("exec -> app started", field(&us("app_exec")), "ms", 1e-3),
        (
            "Start taken -> app started",
            field(&us("start_to_app_exec_us")),
            "ms",
            1e-3,
        ),
        (
            "exec -> app's first output",
            field(&us("app_first_output")),
            "ms",
            1e-3,
        ),
        (
            "exits to hyperboot",
            field(&|v| v["exits"]["total"].as_f64()),
            "",
            1.0,
        ),
        (
            "VMM-only RSS",
            field(&us("vmm_rss_kib")),
            "MiB",
            1.0 / 1024.0,
        ),
        (
            "peak RSS (guest pages too)",
            field(&us("peak_rss_kib")),
            "MiB",
            1.0 / 1024.0,
        ),
    ] {
        if v.is_empty() {
            continue;
        }
        println!(
            "hyperboot --stats {kind:<9} {name:<28} median {:9.2} {unit}   (n={})",
            median(&mut v) * scale,
            v.len()
        );
    }
}

/// Ten VMs of one artifact at once, each up and idle: the sum of their
/// proportional set sizes (PSS: a page shared by n processes counts 1/n in
/// each) and of their RSS, booted cold, restored, and as QEMU microvm
/// booting the same kernel, init and rootfs.
fn density(hyperboot: &str, artifact: &Path, snapshots: &Path) {
    const N: usize = 10;
    let idle = ["sh", "-c", "echo up; exec sleep 600"];
    let peer = Peer::with_argv(artifact, &idle);
    let ours = |snapshot: &str| {
        let mut c = Command::new(hyperboot);
        c.env("HYPER_SNAPSHOT_CACHE", snapshots)
            .args(["--backend", "kvm", "--snapshot", snapshot])
            .arg(artifact)
            .arg("--")
            .args(idle);
        c
    };
    for name in [
        "hyperboot kvm, cold",
        "hyperboot kvm, restored",
        "qemu microvm -accel kvm",
    ] {
        let mut children: Vec<std::process::Child> = (0..N)
            .map(|_| {
                let mut c = match name {
                    "hyperboot kvm, cold" => ours("off"),
                    "hyperboot kvm, restored" => ours("require"),
                    _ => peer.command("kvm"),
                };
                c.stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("spawn")
            })
            .collect();
        let start = Instant::now();
        for c in &mut children {
            let out = c.stdout.take().expect("stdout");
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(out));
            assert!(
                lines.any(|l| l.map(|l| l.trim() == "up").unwrap_or(false)),
                "a VM of {name} never came up"
            );
        }
        let up = start.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let (mut pss, mut rss) = (0u64, 0u64);
        for c in &children {
            let (p, r) = smaps_rollup(c.id());
            pss += p;
            rss += r;
        }
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        println!(
            "{name:<28} {N} VMs up in {:8.1} ms; PSS {:7.1} MiB in all ({:5.1} per VM), RSS {:7.1} MiB in all",
            up.as_secs_f64() * 1000.0,
            pss as f64 / 1024.0,
            pss as f64 / 1024.0 / N as f64,
            rss as f64 / 1024.0
        );
    }
}

/// (PSS, RSS) of a process in KiB.
fn smaps_rollup(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Pss:"), field("Rss:"))
}

fn initcalls(artifact: PathBuf) {
    let hyperboot = std::env::var("HYPERBOOT").unwrap_or_else(|_| "hyperboot".into());
    let out = Command::new(&hyperboot)
        .env("HYPER_KERNEL_ARGS", "initcall_debug printk.time=1")
        // A cold boot, quiet as usual (the console's output would be timed
        // too): the guest's own dmesg prints the kernel's log afterwards.
        .args(["--backend", "kvm", "--snapshot", "off", "-q"])
        .arg(&artifact)
        .args(["--", "dmesg"])
        .output()
        .expect("run hyperboot");
    let log = String::from_utf8_lossy(&out.stdout);
    // "[    0.123456] initcall NAME+0x0/0x30 returned 0 after 1234 usecs"
    let mut calls: Vec<(u64, String)> = log
        .lines()
        .filter_map(|l| {
            let rest = l.split("initcall ").nth(1)?;
            let name = rest
                .split_whitespace()
                .next()?
                .split('+')
                .next()?
                .to_string();
            let usecs = rest
                .split(" after ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((usecs, name))
        })
        .collect();
    assert!(
        !calls.is_empty(),
        "no initcall in the guest's log: does the image have dmesg? ({})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // The kernel has no kallsyms (it would cost boot time and memory), so
    // initcall_debug names each initcall by address: name them from the
    // artifact's vmlinux symbol table.
    let symbols = kernel_symbols(&artifact);
    if symbols.is_empty() {
        println!("bench-boot initcalls: no symbol table (is nm installed?): addresses only");
    }
    for call in &mut calls {
        if let Some(name) = symbol_at(&symbols, &call.1) {
            call.1 = name;
        }
    }
    calls.sort_by_key(|b| std::cmp::Reverse(b.0));
    let total: u64 = calls.iter().map(|c| c.0).sum();
    println!(
        "bench-boot initcalls: {} initcalls, {:.1} ms in all",
        calls.len(),
        total as f64 / 1000.0
    );
    for (usecs, name) in calls.iter().take(10) {
        println!("  {:9.2} ms  {name}", *usecs as f64 / 1000.0);
    }
    let stamp = |needle: &str| {
        log.lines().find(|l| l.contains(needle)).and_then(|l| {
            l.trim_start_matches('[')
                .split(']')
                .next()?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    if let Some(t) = stamp("Run /init") {
        println!(
            "kernel entry -> Run /init: {:.1} ms (printk time)",
            t * 1000.0
        );
    }
}

/// The text symbols of the artifact's kernel, sorted by address (`nm -n`);
/// empty when the kernel or nm cannot be read.
fn kernel_symbols(artifact: &Path) -> Vec<(u64, String)> {
    let Some(kernel) = Artifact::open(artifact)
        .ok()
        .and_then(|a| a.read_section(SectionKind::Kernel).ok())
    else {
        return Vec::new();
    };
    let Ok(mut file) = tempfile::NamedTempFile::new() else {
        return Vec::new();
    };
    if std::io::Write::write_all(&mut file, &kernel).is_err() {
        return Vec::new();
    }
    let Ok(out) = Command::new("nm")
        .args(["-n", "--defined-only"])
        .arg(file.path())
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let kind = f.next()?;
            let name = f.next()?;
            matches!(kind, "t" | "T").then(|| (addr, name.to_string()))
        })
        .collect()
}

/// The symbol holding `addr` ("0xffffffff81c98ed0"), if it is an address.
fn symbol_at(symbols: &[(u64, String)], addr: &str) -> Option<String> {
    let addr = u64::from_str_radix(addr.strip_prefix("0x")?, 16).ok()?;
    let i = symbols.partition_point(|s| s.0 <= addr).checked_sub(1)?;
    Some(symbols[i].1.clone())
}
