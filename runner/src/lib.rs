//! hyperboot: boots a sealed `.hvm` artifact as a microVM.
//!
//! [`boot`] opens and verifies the artifact ([`verified`]), combines its
//! image config with the command line into the run configuration of the
//! host-guest contract ([`spec`]), plans the network ([`net`]), picks a
//! backend for the host ([`host`], [`backend`]: hyperboot's own VMM or QEMU),
//! runs the VM under one supervisor for both ([`supervise`], [`stop`]) and
//! turns how it ended into one exit code ([`exit`]). The command line is in
//! [`cli`].

pub mod backend;
pub mod child;
pub mod cli;
pub mod exit;
pub mod host;
pub mod net;
pub mod snapshots;
pub mod spec;
pub mod stats;
pub mod stop;
pub mod supervise;
pub mod terminal;
pub mod trust;
pub mod verified;
pub mod vms;

use std::path::PathBuf;
use std::time::Duration;

use hvm::Artifact;

use backend::{AccelChoice, Backend};
use exit::Exit;

/// Everything `hyperboot` was asked to do.
#[derive(Debug, Clone)]
pub struct BootOptions {
    pub artifact: PathBuf,
    pub backend: Backend,
    pub accel: AccelChoice,
    pub overrides: spec::Overrides,
    pub memory_mib: u64,
    /// vCPUs (`--cpus`).
    pub cpus: u8,
    /// `-v` host directories.
    pub binds: Vec<spec::Bind>,
    /// `--upper DIR`: the root's writes are kept in DIR/fs (an overlayfs
    /// upper layer, with its work directory DIR/work), not in guest memory.
    pub upper: Option<PathBuf>,
    /// `-i`: the app's stdin is hyperboot's.
    pub interactive: bool,
    /// `-t`: the app runs on a pseudo-terminal.
    pub tty: bool,
    pub timeout: Option<Duration>,
    /// Time the app gets after its stop signal before SIGKILL (`--stop-timeout`).
    pub stop_timeout: Duration,
    pub verbose: bool,
    pub console: bool,
    pub net: net::NetOptions,
    /// `--stats FILE|-`: the boot's timeline, exits and memory as JSON.
    pub stats: Option<PathBuf>,
    /// `--snapshot`: restore, make, or neither.
    pub snapshot: snapshots::Mode,
    /// `hyperboot prepare`: only make the snapshot, do not run the app.
    pub prepare: bool,
    /// Boot the artifact only if its digest is this one: the one whose
    /// signature was checked, and for a detached VM's every run (restarts
    /// included) the one it was created with, even if the file was replaced.
    pub pinned: Option<String>,
}

/// Whether `dir`'s filesystem keeps `user.` attributes: the guest's
/// overlayfs marks opaque directories with them.
fn upper_keeps_user_xattrs(dir: &std::path::Path) -> std::io::Result<()> {
    const PROBE: &str = "user.hyper.probe";
    rustix::fs::setxattr(dir, PROBE, b"1", rustix::fs::XattrFlags::empty())?;
    let _ = rustix::fs::removexattr(dir, PROBE);
    Ok(())
}

/// A failure of hyperboot itself (exit code 125).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Artifact(#[from] hvm::ReadError),
    #[error(transparent)]
    Snapshots(#[from] snapshots::SnapshotsError),
    #[error(transparent)]
    Contract(#[from] hyper_contract::VersionError),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error("the artifact is for {0}; this host runs linux/amd64 guests")]
    Platform(String),
    #[error("--cpus {asked}: this host has {host} CPUs")]
    Cpus { asked: u8, host: usize },
    #[error("--memory {asked} MiB is more than this host has ({host} MiB): lower --memory")]
    Memory { asked: u64, host: u64 },
    #[error("{0}")]
    NoKvm(&'static str, #[source] host::Unavailable),
    #[error("{0} is not available on the KVM backend yet; use --backend qemu")]
    KvmLacks(&'static str),
    #[error("-v {0}: cannot create it")]
    Volume(String, #[source] std::io::Error),
    #[error("--upper {0}: {1}")]
    Upper(String, String),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Passt(#[from] net::passt::PasstError),
    #[error(transparent)]
    Share(#[from] backend::kvm::ShareError),
    #[error(transparent)]
    Qemu(#[from] backend::qemu::QemuError),
    #[error(transparent)]
    Vmm(#[from] hyper_vmm::VmmError),
    #[error("--stats {0}: cannot open it")]
    Stats(String, #[source] std::io::Error),
    #[error("cannot prepare the VM")]
    Io(#[from] std::io::Error),
    #[error(
        "the artifact changed since it was checked ({want}; the file is now {got}): not booting it"
    )]
    Changed { want: String, got: String },
}

/// Called once the VM runs, with the host ports it published
/// (`HOSTIP:PORT->GUEST/proto`).
pub type OnStart = Box<dyn FnOnce(&[String]) + Send>;

/// Called with a sender of the supervisor's events before the VM starts, to
/// feed it requests (stop, signals to the app).
pub type OnRequests = Box<dyn FnOnce(std::sync::mpsc::Sender<supervise::Event>) + Send>;

/// What a caller may add to a boot (the detached supervisor does).
#[derive(Default)]
pub struct Hooks {
    pub on_start: Option<OnStart>,
    pub requests: Option<OnRequests>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("on_start", &self.on_start.is_some())
            .field("requests", &self.requests.is_some())
            .finish()
    }
}

/// The events of one run and the start hook, as a backend takes them.
pub struct Run {
    pub tx: std::sync::mpsc::Sender<supervise::Event>,
    pub rx: std::sync::mpsc::Receiver<supervise::Event>,
    pub on_start: Option<OnStart>,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run").finish()
    }
}

impl Run {
    /// The VM runs: tell whoever asked, with the published ports.
    pub fn started(&mut self, plan: Option<&net::Plan>) {
        if let Some(f) = self.on_start.take() {
            let ports: Vec<String> = plan
                .map(|p| {
                    p.ports
                        .iter()
                        .map(|m| {
                            format!(
                                "{}:{}->{}/{}",
                                m.host_ip,
                                m.host_port,
                                m.guest_port,
                                m.proto.name()
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            f(&ports);
        }
    }
}

/// Boots the artifact; returns how the run ended.
pub fn boot(opts: &BootOptions) -> Result<Exit, BootError> {
    boot_with(opts, Hooks::default())
}

/// [`boot`], with hooks.
pub fn boot_with(opts: &BootOptions, hooks: Hooks) -> Result<Exit, BootError> {
    let seen = std::cell::Cell::new(false);
    let artifact = Artifact::open_with(&opts.artifact, |digest, meta| {
        seen.set(verified::seen(digest, meta));
        seen.get()
    })?;
    if !seen.get() {
        if let Ok(m) = artifact.file().metadata() {
            verified::record(&artifact.digest(), &m);
        }
    }
    if let Some(want) = &opts.pinned {
        let got = hvm::digest_string(&artifact.digest());
        if &got != want {
            return Err(BootError::Changed {
                want: want.clone(),
                got,
            });
        }
    }
    hyper_vmm::phase("artifact verified");
    if let Some(to) = &opts.stats {
        stats::enable(to).map_err(|e| BootError::Stats(to.display().to_string(), e))?;
        stats::mark("artifact_verified");
    }
    let m = artifact.manifest();
    if m.image.platform.architecture != "amd64" {
        return Err(BootError::Platform(format!(
            "{}/{}",
            m.image.platform.os, m.image.platform.architecture
        )));
    }
    let contract = hyper_contract::check_version(m.init.as_ref().map(|i| i.contract))?;
    let kvm = host::probe();
    hyper_vmm::phase("host probed");
    let mut chosen = backend::choose(opts.backend, &kvm)?;
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if usize::from(opts.cpus) > host_cpus {
        return Err(BootError::Cpus {
            asked: opts.cpus,
            host: host_cpus,
        });
    }
    if let Some(host) = hyper_vmm::kvm::host_memory_mib() {
        if opts.memory_mib > host {
            return Err(BootError::Memory {
                asked: opts.memory_mib,
                host,
            });
        }
    }
    // User-mode networking on the KVM backend is passt's.
    let user_net =
        opts.net.requested() && matches!(opts.net.mode, net::NetMode::Auto | net::NetMode::User);
    let kvm_lacks = if user_net && !net::passt::available() {
        Some("user-mode networking without passt (apt-get install passt)")
    } else if opts.binds.len() + usize::from(opts.upper.is_some()) > hyper_vmm::MAX_SHARES {
        Some("more than 8 host directories (-v and --upper)")
    } else {
        None
    };
    if let (Backend::Kvm, Some(what)) = (chosen, kvm_lacks) {
        if opts.backend != Backend::Auto {
            return Err(BootError::KvmLacks(what));
        }
        tracing::info!("{what} is not available on the KVM backend yet: using the QEMU backend");
        chosen = Backend::Qemu;
    }
    let plan = net::plan(
        &opts.net,
        &m.config.exposed_ports,
        chosen != Backend::Kvm,
        !opts.prepare,
    )?;
    let digest_hex = hex::encode(artifact.digest());
    let mut run = spec::combine(&m.config, &opts.overrides, &digest_hex[..12], |k| {
        std::env::var(k).ok()
    })?;
    hyper_vmm::phase("run planned");
    run.debug = opts.verbose;
    run.network = plan.as_ref().map(|p| p.guest.clone());
    run.volumes = spec::volumes(&opts.binds, &m.config.volumes);
    run.stdin = opts.interactive;
    run.tty = opts.tty;
    run.tty_size = opts.tty.then(terminal::size).flatten();
    // hyperinit reports its milestones from contract 2 on.
    run.stats = opts.stats.is_some() && contract >= 2;
    for b in &opts.binds {
        // As Docker: a missing host directory is created.
        std::fs::create_dir_all(&b.host)
            .map_err(|e| BootError::Volume(b.host.display().to_string(), e))?;
    }
    if let Some(dir) = &opts.upper {
        let err = |why: String| BootError::Upper(dir.display().to_string(), why);
        if contract < 5 {
            return Err(err(
                "the artifact's hyperinit predates it (contract 5): rebuild the artifact".into(),
            ));
        }
        for sub in [hyper_contract::UPPER_DIR, hyper_contract::WORK_DIR] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| err(format!("cannot create {sub}/ in it: {e}")))?;
        }
        upper_keeps_user_xattrs(&dir.join(hyper_contract::WORK_DIR)).map_err(|e| {
            err(format!(
                "its filesystem keeps no user.* extended attributes ({e}), which overlayfs needs there (tmpfs has them from Linux 6.6)"
            ))
        })?;
        run.upper = Some(spec::UPPER_TAG.into());
    }
    let stop_signal = spec::signal_number(&m.config.stop_signal)?;
    let archive = spec::run_archive(&run);
    let (tx, rx, _signals) = supervise::events()?;
    if let Some(f) = hooks.requests {
        f(tx.clone());
    }
    let events = Run {
        tx,
        rx,
        on_start: hooks.on_start,
    };
    let base = &m.kernel.cmdline;
    let outcome = match chosen {
        Backend::Kvm => {
            let pvm = kvm == host::Kvm::Pvm;
            if pvm {
                tracing::debug!(
                    "nested PVM KVM: adding the stock-kernel workarounds to the command line"
                );
            }
            let mut cmdline = backend::kvm::cmdline(base, opts, pvm, contract);
            let why_not = if pvm {
                Some("nested PVM KVM runs no guest user space")
            } else if contract < 4 {
                Some("the artifact's hyperinit predates snapshots (rebuild it)")
            } else {
                None
            };
            let use_snapshots =
                why_not.is_none() && (opts.snapshot != snapshots::Mode::Off || opts.prepare);
            if use_snapshots {
                cmdline.push(' ');
                cmdline.push_str(hyper_contract::START_ARG);
                if let Some(warm) = backend::kvm::warm_arg(&m.config) {
                    cmdline.push(' ');
                    cmdline.push_str(&warm);
                }
            }
            let identity = snapshots::Identity {
                artifact: hvm::digest_string(&artifact.digest()),
                hyperboot: env!("CARGO_PKG_VERSION").into(),
                format: hyper_vmm::snapshot::FORMAT,
                cpu: snapshots::cpu_signature(),
                host_kernel: snapshots::host_kernel(),
                memory_mib: opts.memory_mib,
                cpus: opts.cpus,
                console_ports: backend::kvm::console_ports(opts.interactive, contract >= 3),
                net: plan.is_some(),
                mac: plan
                    .as_ref()
                    .filter(|p| p.mac != net::GUEST_MAC)
                    .map(|p| format!("{:02x?}", p.mac)),
                shares: opts.binds.len() + usize::from(opts.upper.is_some()),
                upper: opts.upper.is_some(),
                cmdline: cmdline.clone(),
            };
            let choice = snapshots::choose(opts, why_not, &identity, &artifact)?;
            hyper_vmm::phase("snapshot chosen");
            if let snapshots::Choice::Ready(path) = &choice {
                println!("{}", path.display());
                return Ok(Exit::App(0));
            }
            let start = use_snapshots.then(|| run.clone());
            let empty = Vec::new();
            let b = backend::Boot {
                artifact: &artifact,
                // Nothing of the run may be in a snapshot's memory: with a
                // start message, the initrd carries no run configuration.
                archive: if use_snapshots { &empty } else { &archive },
                stop_signal,
                cmdline,
                opts,
                contract,
            };
            let outcome = backend::kvm::boot(b, plan, events, contract >= 3, pvm, choice, start)?;
            if opts.prepare {
                return if snapshots::saved() {
                    println!("{}", snapshots::path_of(&identity).display());
                    Ok(Exit::App(0))
                } else {
                    Err(BootError::Snapshots(snapshots::SnapshotsError::Make(
                        "the guest did not reach the snapshot point".into(),
                    )))
                };
            }
            outcome
        }
        _ => {
            if opts.snapshot == snapshots::Mode::Require || opts.prepare {
                return Err(BootError::Snapshots(snapshots::SnapshotsError::Required(
                    "snapshots are the KVM backend's; this boot is on QEMU".into(),
                )));
            }
            let (accel, pvm) = backend::pick_accel(opts.accel, &kvm)?;
            let b = backend::Boot {
                artifact: &artifact,
                archive: &archive,
                stop_signal,
                cmdline: backend::kernel_cmdline(base, opts.verbose, opts.console, pvm, ""),
                opts,
                contract,
            };
            backend::qemu::boot(b, accel, plan.as_ref(), events)?
        }
    };
    let timeout = opts.timeout.unwrap_or_default().as_secs_f64();
    let exit = Exit::of(&outcome, timeout);
    if let Some(to) = &opts.stats {
        stats::mark("vm_torn_down");
        stats::set(
            "backend",
            serde_json::json!(if chosen == Backend::Kvm {
                "kvm"
            } else {
                "qemu"
            }),
        );
        stats::set("exit_code", serde_json::json!(exit.code()));
        if let Err(e) = stats::write() {
            tracing::warn!("--stats {}: {e}", to.display());
        }
    }
    Ok(exit)
}

/// The whole error chain on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}
