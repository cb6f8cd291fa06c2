//! bench-boot ARTIFACT [RUNS]: boots the same artifact RUNS times through
//! hyperboot and through plain `qemu-system-x86_64 -M microvm` given the same
//! kernel, initrd (plus the same run configuration) and rootfs by hand, and
//! prints the median and spread of process start → the app's first output and
//! of the whole run. Runs alternate between the two so machine noise hits both.

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
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null()).spawn().expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut byte = [0u8; 1];
    let n = out.read(&mut byte).expect("read");
    assert!(n == 1, "no output from {cmd:?}");
    let first_output = start.elapsed();
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    let status = child.wait().expect("wait");
    let total = start.elapsed();
    assert!(status.success() || status.code() == Some(1), "{cmd:?} failed: {status}");
    Sample { first_output, total }
}

fn stats(name: &str, what: &str, v: &mut [Duration]) -> f64 {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = ms(v[v.len() / 2]);
    println!("{name:<28} {what:<14} median {median:9.1} ms   min {:9.1}   max {:9.1}   (n={})", ms(v[0]), ms(v[v.len() - 1]), v.len());
    median
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let artifact = PathBuf::from(args.get(1).expect("usage: bench-boot ARTIFACT [RUNS]"));
    let runs: usize = args.get(2).map(|s| s.parse().expect("RUNS")).unwrap_or(5);
    let hyperboot = std::env::var("HYPERBOOT").unwrap_or_else(|_| "hyperboot".into());
    let a = Artifact::open(&artifact).expect("open artifact");

    // The peer's files, written by hand from the artifact.
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, bytes: &[u8]| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    };
    let kernel = write("vmlinux", &a.read_section(SectionKind::Kernel).unwrap());
    let mut initrd = a.read_section(SectionKind::Initrd).unwrap();
    initrd.resize(initrd.len().div_ceil(4) * 4, 0);
    let run = br#"{"argv":["echo","ready"],"env":[],"workdir":"","user":"","hostname":"peer","debug":false}"#;
    let mut c = hvm::cpio::Cpio::new();
    c.dir("hyper", 0o755);
    c.file("hyper/run.json", 0o644, run);
    initrd.extend_from_slice(&c.finish());
    let initrd = write("initrd", &initrd);
    let rootfs = write("rootfs.erofs", &a.read_section(SectionKind::Rootfs).unwrap());
    let status = dir.path().join("status");
    let cmdline = format!("{} loglevel=1", a.manifest().kernel.cmdline);
    let accel = if Path::new("/sys/module/kvm_pvm").exists() || !std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().contains(" vmx") && !std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().contains(" svm") { "tcg" } else { "kvm" };
    let peer = || {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-M", "microvm,acpi=off,x-option-roms=off,rtc=off", "-nodefaults", "-no-user-config", "-no-reboot"])
            .args(["-display", "none", "-m", "128M", "-accel", accel, "-cpu", if accel == "kvm" { "host" } else { "max" }])
            .arg("-kernel").arg(&kernel).arg("-initrd").arg(&initrd).arg("-append").arg(&cmdline)
            .args(["-serial", "stdio", "-chardev"]).arg(format!("file,id=st,path={}", status.display()))
            .args(["-device", "isa-serial,chardev=st,iobase=0x2f8,irq=3", "-device", "isa-debug-exit,iobase=0x501,iosize=1"])
            .arg("-drive").arg(format!("file={},format=raw,if=none,id=root,readonly=on", rootfs.display()))
            .args(["-device", "virtio-blk-device,drive=root"]);
        c
    };
    let ours = || {
        let mut c = Command::new(&hyperboot);
        c.args(["--backend", "qemu"]).arg(&artifact).args(["--", "echo", "ready"]);
        c
    };
    println!("bench-boot: {} runs each, accel {accel}, artifact {}", runs, artifact.display());
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
    println!("ratio hyperboot/peer: first output {:.2}, whole run {:.2}", a1 / b1, a2 / b2);
}
