//! hyperboot: boots a sealed `.hvm` artifact as a microVM.
//!
//! [`boot`] opens and verifies the artifact, combines its image config with the
//! command line ([`spec`]), picks a backend and accelerator ([`host`]), runs
//! the VM and maps the guest's report to an exit code ([`status`]).
//! Backends: QEMU `microvm` ([`qemu`]); the own KVM VMM comes next.

pub mod host;
pub mod qemu;
pub mod spec;
pub mod status;

use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use hvm::Artifact;

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Auto,
    Kvm,
    Qemu,
}

/// `--accel` (QEMU backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// Everything `hyperboot` was asked to do.
#[derive(Debug, Clone)]
pub struct BootOptions {
    pub artifact: PathBuf,
    pub backend: Backend,
    pub accel: AccelChoice,
    pub overrides: spec::Overrides,
    pub memory_mib: u64,
    pub timeout: Option<Duration>,
    pub verbose: bool,
    pub console: bool,
}

/// A failure of hyperboot itself (exit code 125).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Artifact(#[from] hvm::ReadError),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error("{0}")]
    Backend(String),
    #[error("cannot prepare the VM")]
    Io(#[from] std::io::Error),
}

/// Kernel arguments for a stock kernel on nested PVM KVM (DESIGN.md).
pub const PVM_WORKAROUNDS: &str =
    "noxsave clearcpuid=cx16,popcnt,smap,fsgsbase,invpcid,pcid,rdrand,rdseed clocksource=jiffies hyper.no_int3_selftest";

fn note(verbose: bool, msg: &str) {
    if verbose {
        eprintln!("hyperboot: {msg}");
    }
}

/// Chooses QEMU's accelerator for `choice` on this host.
pub fn pick_accel(choice: AccelChoice, kvm: &host::Kvm, verbose: bool) -> Result<(qemu::Accel, bool), BootError> {
    use host::Kvm;
    Ok(match (choice, kvm) {
        (AccelChoice::Tcg, _) => (qemu::Accel::Tcg, false),
        (AccelChoice::Kvm, Kvm::Unavailable(why)) => return Err(BootError::Backend(format!("--accel kvm: {why}"))),
        (AccelChoice::Kvm, Kvm::Pvm) => {
            eprintln!("hyperboot: warning: /dev/kvm is nested KVM of the PVM kind: the guest kernel boots emulated (about a minute) and its user space cannot make system calls; use --accel tcg");
            (qemu::Accel::Kvm, true)
        }
        (_, Kvm::Hardware) => (qemu::Accel::Kvm, false),
        (AccelChoice::Auto, Kvm::Pvm) => {
            note(verbose, "/dev/kvm is nested KVM of the PVM kind, which runs stock guest kernels far slower than TCG: using TCG");
            (qemu::Accel::Tcg, false)
        }
        (AccelChoice::Auto, Kvm::Unavailable(why)) => {
            note(verbose, &format!("{why}; using TCG"));
            (qemu::Accel::Tcg, false)
        }
    })
}

fn find_qemu() -> Result<String, BootError> {
    let name = std::env::var("HYPER_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let found = if name.contains('/') {
        std::path::Path::new(&name).is_file()
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(&name).is_file()))
            .unwrap_or(false)
    };
    if found {
        Ok(name)
    } else {
        Err(BootError::Backend(format!("{name} not found: install QEMU (apt-get install qemu-system-x86)")))
    }
}

enum Event {
    Exited(std::io::Result<std::process::ExitStatus>),
    Signal(i32),
}

/// Boots the artifact and returns hyperboot's exit code.
pub fn boot(opts: &BootOptions) -> Result<u8, BootError> {
    let artifact = Artifact::open(&opts.artifact)?;
    let m = artifact.manifest();
    if m.image.platform.architecture != "amd64" {
        return Err(BootError::Backend(format!(
            "the artifact is for {}/{}; this host runs linux/amd64 guests",
            m.image.platform.os, m.image.platform.architecture
        )));
    }
    match opts.backend {
        Backend::Kvm => {
            return Err(BootError::Backend(
                "the KVM backend is not available in this build yet; use --backend qemu".into(),
            ))
        }
        Backend::Auto | Backend::Qemu => {}
    }
    let kvm = host::probe();
    let (accel, pvm) = pick_accel(opts.accel, &kvm, opts.verbose)?;
    let binary = find_qemu()?;
    let digest_hex = hex::encode(artifact.digest());
    let mut run = spec::combine(&m.config, &opts.overrides, &digest_hex[..12], |k| std::env::var(k).ok())?;
    run.debug = opts.verbose;
    let mut cmdline = m.kernel.cmdline.clone();
    cmdline.push_str(if opts.verbose || opts.console { " loglevel=8" } else { " loglevel=1" });
    if opts.verbose {
        cmdline.push_str(" hyper.debug");
    }
    if pvm {
        cmdline.push(' ');
        cmdline.push_str(PVM_WORKAROUNDS);
    }
    let mut prepared = qemu::prepare(&artifact, &spec::run_archive(&run))?;
    let cfg = qemu::QemuConfig { binary, accel, memory_mib: opts.memory_mib, cmdline };
    let log = qemu::log_file()?;
    let mut cmd = qemu::command(&cfg, &prepared, &log)?;
    note(opts.verbose, &format!("{} {}", cfg.binary, qemu::args(&cfg, &prepared).join(" ")));

    let (tx, rx) = mpsc::channel();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP])?;
    let handle = signals.handle();
    let stx = tx.clone();
    std::thread::spawn(move || {
        for s in signals.forever() {
            if stx.send(Event::Signal(s)).is_err() {
                break;
            }
        }
    });
    let mut child = cmd.spawn().map_err(|e| BootError::Backend(format!("cannot start {}: {e}", cfg.binary)))?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    drop(cmd);
    std::thread::spawn(move || {
        let _ = tx.send(Event::Exited(child.wait()));
    });

    let stop = |rx: &mpsc::Receiver<Event>| {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if !matches!(rx.recv_timeout(Duration::from_secs(3)), Ok(Event::Exited(_))) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(3));
        }
    };
    let deadline = opts.timeout.map(|t| std::time::Instant::now() + t);
    let exit = loop {
        let ev = match deadline {
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(std::time::Instant::now())) {
                Ok(ev) => ev,
                Err(_) => {
                    stop(&rx);
                    eprintln!(
                        "hyperboot: the VM did not finish within --timeout {}s; stopped it",
                        opts.timeout.unwrap_or_default().as_secs_f64()
                    );
                    handle.close();
                    return Ok(status::TIMEOUT);
                }
            },
            None => rx.recv().map_err(|_| BootError::Backend("lost track of the VM process".into()))?,
        };
        match ev {
            Event::Signal(s) => {
                note(opts.verbose, &format!("signal {s}: stopping the VM"));
                stop(&rx);
                handle.close();
                return Ok(128 + s as u8);
            }
            Event::Exited(r) => break r?,
        }
    };
    handle.close();
    let report = qemu::read_status(&mut prepared);
    match status::GuestStatus::parse(&report) {
        Some(s) => {
            if let status::GuestStatus::InitError(msg) = &s {
                eprintln!("hyperboot: the guest's init failed: {msg}");
            }
            Ok(s.exit_code())
        }
        None => {
            let mut qlog = String::new();
            let mut lf = log;
            use std::io::Seek;
            let _ = lf.seek(std::io::SeekFrom::Start(0));
            let _ = lf.take(8192).read_to_string(&mut qlog);
            if exit.success() {
                eprintln!("hyperboot: the guest stopped without reporting an exit status (kernel panic or reset; rerun with --console to see the kernel log)");
                Ok(status::NO_STATUS)
            } else {
                Err(BootError::Backend(format!("{} failed ({exit}): {}", cfg.binary, qlog.trim())))
            }
        }
    }
}
