//! hyperboot: boots a sealed `.hvm` artifact as a microVM.
//!
//! [`boot`] opens and verifies the artifact, combines its image config with the
//! command line ([`spec`]), picks a backend and accelerator ([`host`]), runs
//! the VM and maps the guest's report to an exit code ([`status`]).
//! Backends: QEMU `microvm` ([`qemu`]); the own KVM VMM comes next.

pub mod host;
pub mod net;
pub mod qemu;
pub mod spec;
pub mod status;
pub mod verified;

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
    /// vCPUs (`--cpus`).
    pub cpus: u8,
    /// `-v` host directories.
    pub binds: Vec<spec::Bind>,
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
pub fn pick_accel(
    choice: AccelChoice,
    kvm: &host::Kvm,
    verbose: bool,
) -> Result<(qemu::Accel, bool), BootError> {
    use host::Kvm;
    Ok(match (choice, kvm) {
        (AccelChoice::Tcg, _) => (qemu::Accel::Tcg, false),
        (AccelChoice::Kvm, Kvm::Unavailable(why)) => {
            return Err(BootError::Backend(format!("--accel kvm: {why}")))
        }
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
    if host::on_path(&name) {
        Ok(name)
    } else {
        Err(BootError::Backend(format!(
            "{name} not found: install QEMU (apt-get install qemu-system-x86)"
        )))
    }
}

enum Event {
    Exited(std::io::Result<std::process::ExitStatus>),
    Signal(i32),
}

/// Which VMM runs the guest, decided from `--backend` and the host.
fn choose_backend(choice: Backend, kvm: &host::Kvm) -> Result<Backend, BootError> {
    use host::Kvm;
    Ok(match (choice, kvm) {
        (Backend::Qemu, _) => Backend::Qemu,
        (Backend::Kvm, Kvm::Unavailable(why)) => {
            return Err(BootError::Backend(format!("--backend kvm: {why}")))
        }
        (Backend::Kvm, _) | (Backend::Auto, Kvm::Hardware) => Backend::Kvm,
        (Backend::Auto, Kvm::Pvm) => {
            eprintln!("hyperboot: /dev/kvm is nested KVM of the PVM kind, on which guest user space cannot run: using the QEMU backend with TCG");
            Backend::Qemu
        }
        (Backend::Auto, Kvm::Unavailable(why)) => {
            eprintln!("hyperboot: {why}: using the QEMU backend with TCG");
            Backend::Qemu
        }
    })
}

/// The kernel command line: the artifact's, then the log level and debug
/// switches, then the PVM workarounds where needed, then `HYPER_KERNEL_ARGS`.
fn kernel_cmdline(base: &str, opts: &BootOptions, pvm: bool, extra: &str) -> String {
    let mut c = base.to_string();
    c.push_str(if opts.verbose || opts.console {
        " loglevel=8"
    } else {
        " loglevel=1"
    });
    if opts.verbose {
        c.push_str(" hyper.debug");
    }
    if !extra.is_empty() {
        c.push(' ');
        c.push_str(extra);
    }
    if pvm {
        c.push(' ');
        c.push_str(PVM_WORKAROUNDS);
    }
    // A debugging aid (as QEMU's -append): words added last, so they win.
    if let Ok(more) = std::env::var("HYPER_KERNEL_ARGS") {
        if !more.trim().is_empty() {
            c.push(' ');
            c.push_str(more.trim());
        }
    }
    c
}

/// Boots the artifact and returns hyperboot's exit code.
pub fn boot(opts: &BootOptions) -> Result<u8, BootError> {
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
    hyper_vmm::phase("artifact verified");
    let m = artifact.manifest();
    if m.image.platform.architecture != "amd64" {
        return Err(BootError::Backend(format!(
            "the artifact is for {}/{}; this host runs linux/amd64 guests",
            m.image.platform.os, m.image.platform.architecture
        )));
    }
    let kvm = host::probe();
    let mut backend = choose_backend(opts.backend, &kvm)?;
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if usize::from(opts.cpus) > host_cpus {
        return Err(BootError::Backend(format!(
            "--cpus {}: this host has {host_cpus} CPUs",
            opts.cpus
        )));
    }
    if let Some(host) = hyper_vmm::kvm::host_memory_mib() {
        if opts.memory_mib > host {
            return Err(BootError::Backend(format!(
                "--memory {} MiB is more than this host has ({host} MiB): lower --memory",
                opts.memory_mib
            )));
        }
    }
    // User-mode networking on the KVM backend is passt's.
    let user_net =
        opts.net.requested() && matches!(opts.net.mode, net::NetMode::Auto | net::NetMode::User);
    let kvm_lacks = if user_net && !net::passt_available() {
        Some("user-mode networking without passt (apt-get install passt)")
    } else if opts.binds.len() > hyper_vmm::MAX_SHARES {
        Some("more than 8 -v host directories")
    } else {
        None
    };
    if let (Backend::Kvm, Some(what)) = (backend, kvm_lacks) {
        if opts.backend == Backend::Auto {
            eprintln!(
                "hyperboot: {what} is not available on the KVM backend yet: using the QEMU backend"
            );
            backend = Backend::Qemu;
        } else {
            return Err(BootError::Backend(format!(
                "{what} is not available on the KVM backend yet; use --backend qemu"
            )));
        }
    }
    let net = net::plan(&opts.net, &m.config.exposed_ports, backend != Backend::Kvm)
        .map_err(BootError::Backend)?;
    let digest_hex = hex::encode(artifact.digest());
    let mut run = spec::combine(&m.config, &opts.overrides, &digest_hex[..12], |k| {
        std::env::var(k).ok()
    })?;
    run.debug = opts.verbose;
    run.network = net.as_ref().map(|p| p.guest.clone());
    run.volumes = spec::volumes(&opts.binds, &m.config.volumes);
    run.stdin = opts.interactive;
    run.tty = opts.tty;
    run.tty_size = opts.tty.then(terminal_size).flatten();
    for b in &opts.binds {
        // As Docker: a missing host directory is created.
        std::fs::create_dir_all(&b.host).map_err(|e| {
            BootError::Backend(format!("-v {}: cannot create it: {e}", b.host.display()))
        })?;
    }
    match backend {
        Backend::Kvm => boot_kvm(&artifact, &run, kvm == host::Kvm::Pvm, opts, net),
        _ => boot_qemu(&artifact, &run, &kvm, opts, net.as_ref()),
    }
}

fn boot_kvm(
    artifact: &Artifact,
    run: &spec::RunConfig,
    pvm: bool,
    opts: &BootOptions,
    net: Option<net::Plan>,
) -> Result<u8, BootError> {
    use hvm::SectionKind;
    // The network: passt (user mode) or the tap, and hyperboot's relays for -p.
    let mut passt = None;
    let net_backend = match net {
        Some(p) => {
            net::forward_tcp(&p.ports, |m| p.upstream(m)).map_err(BootError::Backend)?;
            Some(match p.link {
                net::Link::User => {
                    let (child, sock) =
                        net::start_passt(&p, opts.verbose).map_err(BootError::Backend)?;
                    passt = Some(child);
                    hyper_vmm::devices::virtio_net::Backend::Passt(sock)
                }
                net::Link::Tap { fd, .. } => {
                    hyper_vmm::devices::virtio_net::Backend::Tap(std::fs::File::from(fd))
                }
            })
        }
        None => None,
    };
    if pvm {
        note(
            opts.verbose,
            "nested PVM KVM: adding the stock-kernel workarounds to the command line",
        );
    }
    let k = artifact.section(SectionKind::Kernel);
    let kernel =
        hyper_vmm::loader::SectionReader::new(artifact.file().try_clone()?, k.offset, k.length);
    let mut initrd = artifact.read_section(SectionKind::Initrd)?;
    initrd.resize(initrd.len().div_ceil(4) * 4, 0);
    initrd.extend_from_slice(&spec::run_archive(run));
    let r = artifact.section(SectionKind::Rootfs);
    let shares = share_servers(&opts.binds)?;
    let cmdline = kernel_cmdline(
        &artifact.manifest().kernel.cmdline,
        opts,
        pvm,
        "8250.nr_uarts=2",
    );
    note(
        opts.verbose,
        &format!("KVM backend, kernel command line: {cmdline}"),
    );
    let cfg = hyper_vmm::VmConfig {
        kernel,
        initrd,
        rootfs: Some((artifact.file().try_clone()?, r.offset, r.length)),
        cmdline,
        memory_mib: opts.memory_mib,
        cpus: opts.cpus,
        timeout: opts.timeout,
        console: Box::new(std::io::LineWriter::new(std::io::stdout())),
        streams: vec![
            ("hyper.stdout", Box::new(std::io::stdout())),
            ("hyper.stderr", Box::new(std::io::stderr())),
        ],
        stdin: run.stdin,
        net: net_backend.map(|b| (net::GUEST_MAC, b)),
        shares,
        winsize: run.tty.then_some(terminal_size as fn() -> Option<[u16; 2]>),
        seccomp: true,
        stop_signal: spec::signal_number(&artifact.manifest().config.stop_signal)
            .map_err(BootError::Backend)?,
        stop_timeout: opts.stop_timeout,
    };
    // `-t`: keys go to the app's terminal raw (Ctrl-C included), as with QEMU.
    let raw = RawTerminal::new(opts.tty);
    let outcome = hyper_vmm::run(cfg).map_err(|e| BootError::Backend(error_chain(&e)));
    drop(raw);
    // passt (--one-off) leaves by itself when hyperboot's end of its socket
    // closes, at exit; the filter in place here would not allow a kill.
    drop(passt);
    let outcome = outcome?;
    if let Some(spawn) = std::env::var("HYPER_SPAWN_NS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        eprintln!(
            "hyperboot-timing: exec_to_first_run_us={} exits={}",
            outcome.first_run_ns.saturating_sub(spawn) / 1000,
            outcome.exits
        );
    }
    note(
        opts.verbose,
        &format!(
            "the VM stopped ({:?}) after {} exits; the guest readied {} console ports{}{}",
            outcome.stop,
            outcome.exits,
            outcome.console_ports,
            match outcome.net_ready {
                Some(true) => "; its driver set the network card up",
                Some(false) => "; its driver did not set the network card up",
                None => "",
            },
            outcome
                .shares
                .iter()
                .enumerate()
                .map(|(i, (served, refused))| format!(
                    "; vol{i}: {served} 9p requests answered, {refused} malformed refused"
                ))
                .collect::<String>()
        ),
    );
    Ok(exit_code(&outcome.status, &outcome.stop, opts))
}

/// `-v` on the KVM backend: a 9p server per host directory, tagged `volN`
/// as hyperinit expects. Every fid a guest holds costs host descriptors, so
/// the open-file limit is raised to its hard limit and split between them.
fn share_servers(binds: &[spec::Bind]) -> Result<Vec<(String, hyper_vmm::p9::Server)>, BootError> {
    if binds.is_empty() {
        return Ok(Vec::new());
    }
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    let open_files = getrlimit(Resource::Nofile).current.unwrap_or(1 << 20);
    // A fid holds up to two descriptors (its O_PATH one and an open file).
    let per_share = (open_files.saturating_sub(256) as usize / (2 * binds.len())).min(65_536);
    binds
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let server =
                hyper_vmm::p9::Server::new(&b.host, b.read_only, per_share).map_err(|e| {
                    BootError::Backend(format!("-v {}: cannot share it: {e}", b.host.display()))
                })?;
            Ok((format!("vol{i}"), server))
        })
        .collect()
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

/// Maps how the KVM backend's VM ended to hyperboot's exit code.
fn exit_code(status: &[u8], stop: &hyper_vmm::Stop, opts: &BootOptions) -> u8 {
    use hyper_vmm::Stop;
    match stop {
        Stop::Timeout => {
            eprintln!(
                "hyperboot: the VM did not finish within --timeout {}s; stopped it",
                opts.timeout.unwrap_or_default().as_secs_f64()
            );
            return status::TIMEOUT;
        }
        Stop::Signal(s) => return 128u8.saturating_add(*s as u8),
        _ => {}
    }
    if let Some(s) = status::GuestStatus::parse(status) {
        if let status::GuestStatus::InitError(msg) = &s {
            eprintln!("hyperboot: the guest's init failed: {msg}");
        }
        return s.exit_code();
    }
    match stop {
        Stop::ExitPort(v) => *v,
        Stop::GuestError(why) => {
            eprintln!("hyperboot: the guest stopped without reporting an exit status: {why}");
            status::NO_STATUS
        }
        _ => {
            eprintln!("hyperboot: the guest stopped without reporting an exit status (kernel panic or reset; rerun with --console to see the kernel log)");
            status::NO_STATUS
        }
    }
}

/// The size (rows, columns) of the terminal on stdin or stdout, if any.
fn terminal_size() -> Option<[u16; 2]> {
    for fd in [0, 1] {
        // SAFETY: winsize is plain old data; TIOCGWINSZ fills it.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: the pointer is to a live winsize.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return Some([ws.ws_row, ws.ws_col]);
        }
    }
    None
}

/// `-t` on a terminal: raw mode while the VM runs (keys, Ctrl-C included, go
/// to the app), the previous mode restored when dropped.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn new(on: bool) -> RawTerminal {
        // SAFETY: isatty takes a descriptor.
        if !on || unsafe { libc::isatty(0) } != 1 {
            return RawTerminal(None);
        }
        // SAFETY: termios is plain old data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal and `t` a live termios.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return RawTerminal(None);
        }
        let saved = t;
        // SAFETY: as above.
        unsafe {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
        }
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the mode saved from the same terminal.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

/// The threads copying the app's streams; dropping them lets them drain what
/// is left and waits for them, so no output is lost on any way out.
struct Pumps {
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: std::sync::Arc<qemu::Stop>,
}

impl Drop for Pumps {
    fn drop(&mut self) {
        self.stop.set();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn boot_qemu(
    artifact: &Artifact,
    run: &spec::RunConfig,
    kvm: &host::Kvm,
    opts: &BootOptions,
    net: Option<&net::Plan>,
) -> Result<u8, BootError> {
    let m = artifact.manifest();
    let (accel, pvm) = pick_accel(opts.accel, kvm, opts.verbose)?;
    let binary = find_qemu()?;
    let cmdline = kernel_cmdline(&m.kernel.cmdline, opts, pvm, "");
    let prepared = qemu::prepare(artifact, &spec::run_archive(run))?;
    let cfg = qemu::QemuConfig {
        binary,
        accel,
        memory_mib: opts.memory_mib,
        cpus: opts.cpus,
        stdin: opts.interactive,
        cmdline,
        extra: net
            .map(net::qemu_args)
            .unwrap_or_default()
            .into_iter()
            .chain(qemu::share_args(&opts.binds))
            .collect(),
    };
    if let Some(p) = net {
        net::forward_tcp(&p.ports, |m| p.upstream(m)).map_err(BootError::Backend)?;
    }
    let log = qemu::log_file()?;
    let mut cmd = qemu::command(&cfg, &prepared, &log)?;
    note(
        opts.verbose,
        &format!("{} {}", cfg.binary, qemu::args(&cfg, &prepared).join(" ")),
    );

    let (tx, rx) = mpsc::channel();
    let mut signals = signal_hook::iterator::Signals::new([
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGWINCH,
    ])?;
    let handle = signals.handle();
    let stx = tx.clone();
    std::thread::spawn(move || {
        for s in signals.forever() {
            if stx.send(Event::Signal(s)).is_err() {
                break;
            }
        }
    });
    let control = qemu::Control::new(prepared.control.try_clone()?);
    let raw = RawTerminal::new(opts.tty);
    let mut child = cmd
        .spawn()
        .map_err(|e| BootError::Backend(format!("cannot start {}: {e}", cfg.binary)))?;
    if opts.interactive {
        qemu::feed_stdin(prepared.app_in.try_clone()?, control.clone());
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    drop(cmd);
    let stop_pumps = qemu::Stop::new()?;
    let counts: [std::sync::Arc<std::sync::atomic::AtomicU64>; 2] = Default::default();
    use std::os::fd::AsFd;
    let stdout = qemu::dup_file(std::io::stdout().as_fd())?;
    let pumps = Pumps {
        threads: vec![
            qemu::pump(
                prepared.app_out.try_clone()?,
                stdout.try_clone()?,
                stop_pumps.clone(),
                counts[0].clone(),
            ),
            qemu::pump(
                prepared.app_err.try_clone()?,
                qemu::dup_file(std::io::stderr().as_fd())?,
                stop_pumps.clone(),
                counts[1].clone(),
            ),
            qemu::pump(
                prepared.console.try_clone()?,
                stdout,
                stop_pumps.clone(),
                Default::default(),
            ),
        ],
        stop: stop_pumps,
    };
    let stop_status = qemu::Stop::new()?;
    let status_watch = qemu::watch_status(
        prepared.status.try_clone()?,
        control.clone(),
        counts,
        stop_status.clone(),
    );
    std::thread::spawn(move || {
        let _ = tx.send(Event::Exited(child.wait()));
    });

    let stop = |rx: &mpsc::Receiver<Event>| {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if !matches!(
            rx.recv_timeout(Duration::from_secs(3)),
            Ok(Event::Exited(_))
        ) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(3));
        }
    };
    let deadline = opts.timeout.map(|t| std::time::Instant::now() + t);
    let stop_signal =
        spec::signal_number(&artifact.manifest().config.stop_signal).map_err(BootError::Backend)?;
    // (deadline, SIGKILL already sent, the signal hyperboot got)
    let mut graceful: Option<(std::time::Instant, bool, i32)> = None;
    let exit = loop {
        let until = [deadline, graceful.map(|g| g.0)]
            .into_iter()
            .flatten()
            .min();
        let ev = match until {
            Some(d) => {
                match rx.recv_timeout(d.saturating_duration_since(std::time::Instant::now())) {
                    Ok(ev) => Some(ev),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(BootError::Backend("lost track of the VM process".into()))
                    }
                }
            }
            None => Some(
                rx.recv()
                    .map_err(|_| BootError::Backend("lost track of the VM process".into()))?,
            ),
        };
        let now = std::time::Instant::now();
        match ev {
            Some(Event::Exited(r)) => break r?,
            Some(Event::Signal(libc::SIGWINCH)) => {
                if let (true, Some([r, c])) = (opts.tty, terminal_size()) {
                    control.send(&format!("winsize {r} {c}\n"));
                }
            }
            Some(Event::Signal(s)) if opts.stop_timeout.is_zero() => {
                note(opts.verbose, &format!("signal {s}: stopping the VM"));
                stop(&rx);
                handle.close();
                return Ok(128 + s as u8);
            }
            Some(Event::Signal(s)) => {
                if graceful.is_none() {
                    note(
                        opts.verbose,
                        &format!("signal {s}: sending signal {stop_signal} to the app"),
                    );
                    control.send(&format!("signal {stop_signal}\n"));
                    graceful = Some((now + opts.stop_timeout, false, s));
                }
            }
            None => match graceful {
                Some((g, false, s)) if now >= g => {
                    note(opts.verbose, "the app did not stop in time: SIGKILL");
                    control.send("signal 9\n");
                    graceful = Some((now + Duration::from_secs(2), true, s));
                }
                Some((g, true, s)) if now >= g => {
                    stop(&rx);
                    handle.close();
                    return Ok(128 + s as u8);
                }
                _ => {
                    if deadline.is_some_and(|d| now >= d) {
                        stop(&rx);
                        eprintln!(
                            "hyperboot: the VM did not finish within --timeout {}s; stopped it",
                            opts.timeout.unwrap_or_default().as_secs_f64()
                        );
                        handle.close();
                        return Ok(status::TIMEOUT);
                    }
                }
            },
        }
    };
    handle.close();
    drop(pumps);
    drop(raw);
    stop_status.set();
    let report = status_watch.join().unwrap_or_default();
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
                Err(BootError::Backend(format!(
                    "{} failed ({exit}): {}",
                    cfg.binary,
                    qlog.trim()
                )))
            }
        }
    }
}
