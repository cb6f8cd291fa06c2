//! hyperinit: the guest's PID 1, a static binary in the artifact's initrd.
//!
//! It mounts the image's read-only EROFS root under a tmpfs-backed overlay,
//! moves into it, applies the run configuration (command, environment, user,
//! working directory, hostname), runs the app as its child, reaps every
//! zombie, forwards termination signals to the app, and when the app exits
//! reports its status to the host and stops the VM ([`report`]).
//!
//! A fatal error prints one line, `hyperinit: error: …`, on the console and
//! ends the VM with an `error=` report, which hyperboot maps to its own exit
//! code (123).

mod config;
mod net;
mod plan;
mod report;
mod spawn;
mod streams;
mod sys;
mod user;
mod warm;

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use config::RunConfig;
use report::Outcome;
use sys::process;

/// The host-guest contract version this hyperinit speaks, where hyperbuild
/// reads it into the artifact's manifest (see the contract crate).
#[used]
#[link_section = ".hyper_contract"]
static CONTRACT_VERSION: [u8; 4] = hyper_contract::VERSION.to_le_bytes();

static DEBUG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

macro_rules! debug {
    ($($t:tt)*) => {
        if DEBUG.load(Ordering::Relaxed) {
            let _ = writeln!(std::io::stderr(), "hyperinit: {}", format_args!($($t)*));
        }
    };
}

/// Microseconds of the monotonic clock at hyperinit's milestones (for
/// `--stats`): started, root mounted, app started, and the Start taken
/// (contract 4; 0 when the run configuration was in the initrd).
static TIMINGS: [std::sync::atomic::AtomicU64; 4] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

fn mark(i: usize) {
    TIMINGS[i].store(process::monotonic_us(), Ordering::SeqCst);
}

fn main() {
    mark(0);
    if std::process::id() != 1 {
        eprintln!("hyperinit: error: must run as PID 1 inside a hyper VM");
        std::process::exit(2);
    }
    let outcome = match boot() {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("hyperinit: error: {msg}");
            Outcome::InitError(msg)
        }
    };
    debug!("app ended: {outcome:?}");
    report::report_and_stop(&outcome)
}

fn boot() -> Result<Outcome, String> {
    let mut linux = sys::Linux;
    plan::early(&mut linux).map_err(|e| e.to_string())?;
    process::raw_output(1);
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == "hyper.debug") {
        DEBUG.store(true, Ordering::Relaxed);
    }
    // Contract 4: the run configuration comes at the snapshot point, over
    // the control port; else it is in the initrd.
    let by_port = cmdline
        .split_whitespace()
        .any(|w| w == hyper_contract::START_ARG);
    // Every run has lo up; before the snapshot point, so no restore pays for it.
    if let Err(e) = net::loopback() {
        debug!("cannot bring lo up: {e}");
    }
    let mut listener = None;
    let (cfg, leftover, made) = if by_port {
        let device = hyper_contract::RunConfig::default()
            .root_device()
            .to_string();
        wait_for(&device)?;
        let made = plan::root_base(&mut linux, &device).map_err(|e| e.to_string())?;
        // What every run does or reads whatever its configuration, done
        // before the snapshot so that no restore pays for it.
        streams::open_early();
        listener = spawn_listener();
        for (path, bytes) in warm::warm_files(plan::NEWROOT, &warm::RUN_FILES) {
            debug!("read {path} ahead ({bytes} bytes) for the snapshot");
        }
        for path in warm::copy_up(plan::NEWROOT, &warm::WRITTEN_FILES) {
            debug!("copied {path} up to the root's writable layer for the snapshot");
        }
        if let Some(program) = warm::program(&cmdline) {
            for (path, bytes) in warm::warm(plan::NEWROOT, program) {
                debug!("read {path} ahead ({bytes} bytes) for the snapshot");
            }
        }
        mark(1);
        debug!("root mounted; waiting for the run configuration");
        let port = report::channel().ok_or("no control port to take the run configuration from")?;
        let (start, leftover) = report::await_start(port)?;
        mark(3);
        apply_start(&start);
        (start.run, leftover, made)
    } else {
        let bytes = std::fs::read(config::PATH).map_err(|e| {
            format!(
                "cannot read {}: {e} (the runner did not pass a run configuration)",
                config::PATH
            )
        })?;
        let cfg = RunConfig::parse(&bytes).map_err(|e| {
            let mut msg = e.to_string();
            if let Some(src) = std::error::Error::source(&e) {
                msg.push_str(&format!(": {src}"));
            }
            msg
        })?;
        wait_for(cfg.root_device())?;
        let made = plan::root_base(&mut linux, cfg.root_device()).map_err(|e| e.to_string())?;
        mark(1);
        (cfg, Vec::new(), made)
    };
    if cfg.debug {
        DEBUG.store(true, Ordering::Relaxed);
    }
    debug!("run config: {cfg:?}");
    if let Some(tag) = &cfg.upper {
        plan::upper(&mut linux, tag, &made).map_err(|e| e.to_string())?;
    }
    plan::root_finish(&mut linux, &cfg.tmpfs, &cfg.volumes).map_err(|e| e.to_string())?;
    debug!("root mounted");
    if let Some(n) = &cfg.network {
        net::configure(n).map_err(|e| format!("network: {e}"))?;
        debug!(
            "network: {} {}/{} via {}",
            n.interface, n.address, n.prefix, n.gateway
        );
    }
    if !cfg.hostname.is_empty() {
        use sys::Sys;
        linux
            .sethostname(&cfg.hostname)
            .map_err(|e| format!("set hostname {:?}: {e}", cfg.hostname))?;
        let _ = std::fs::create_dir_all("/etc");
        for (path, content) in plan::hosts_files(&cfg.hostname, cfg.network.as_ref()) {
            // Like Docker's generated files; an image whose /etc is not a directory keeps its own.
            if let Err(e) = std::fs::write(path, content) {
                debug!("cannot write {path}: {e}");
            }
        }
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let id = user::resolve(&cfg.user, &passwd, &group)?;
    let env = config::app_env(&cfg, &id.home);
    let workdir = if cfg.workdir.is_empty() {
        "/".to_string()
    } else {
        cfg.workdir.clone()
    };
    std::fs::create_dir_all(&workdir)
        .map_err(|e| format!("create working directory {workdir}: {e}"))?;
    if cfg.read_only {
        plan::seal_root(&mut linux).map_err(|e| e.to_string())?;
    }
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(config::DEFAULT_PATH)
        .to_string();

    for sig in [
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        process::on_signal(sig, record_signal);
    }
    debug!(
        "starting {:?} as {}:{} in {workdir}",
        cfg.argv, id.uid, id.gid
    );
    // Separate stdout/stderr streams (and stdin, a pty) when the host offers the ports.
    let wiring = match streams::open(cfg.stdin) {
        Some(ports) => {
            Some(streams::wire(ports, cfg.tty, cfg.tty_size).map_err(|e| format!("app i/o: {e}"))?)
        }
        None => {
            debug!("no stream ports: the app's output goes to the console");
            None
        }
    };
    // Listen before the app starts, so a request that comes at once is not lost.
    listen_for_requests(leftover, listener);
    let _ = std::io::stderr().flush();
    let pid = {
        use std::os::fd::AsRawFd;
        let fd = |i: usize| {
            wiring
                .as_ref()
                .and_then(|w| w.child[i].as_ref().map(|f| f.as_raw_fd()))
        };
        let app = spawn::App {
            argv: &cfg.argv,
            env: &env,
            workdir: &workdir,
            path_var: &path_var,
            uid: id.uid,
            gid: id.gid,
            groups: &id.groups,
            fds: [fd(0), fd(1), fd(2)],
            tty: wiring.as_ref().is_some_and(|w| w.tty),
        };
        spawn::app(&app, fd(2).unwrap_or(2)).map_err(|e| format!("start the app: {e}"))?
    };
    let drained = wiring.map(|mut w| {
        // The app holds its ends now; ours must close for end of file to come.
        w.child = [None, None, None];
        w.start()
    });
    mark(2);
    APP_PID.store(pid, Ordering::SeqCst);
    let outcome = supervise(pid);
    if cfg.stats {
        report::announce_timings([0, 1, 2, 3].map(|i| TIMINGS[i].load(Ordering::SeqCst)));
    }
    if let Some(done) = drained {
        // Every process is gone, so both pipes are at their end. A host that
        // stopped reading gets a few seconds, not forever.
        let wait = std::time::Duration::from_secs(10);
        match done.recv_timeout(wait) {
            Ok(sent) if report::announce_drain(sent) => {
                debug!("sent {} + {} bytes; waiting for the host", sent[0], sent[1]);
                let until = std::time::Instant::now() + wait;
                while !DRAINED.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            }
            _ => debug!("the app's output was not fully passed on"),
        }
    }
    Ok(outcome)
}

/// Waits (briefly) for the root block device node to appear.
fn wait_for(device: &str) -> Result<(), String> {
    for _ in 0..200 {
        if Path::new(device).exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(format!(
        "root device {device} did not appear (is the rootfs attached as virtio-blk?)"
    ))
}

/// The app's pid once it runs (0 before).
static APP_PID: AtomicI32 = AtomicI32::new(0);

/// The host has every byte the app wrote (see `streams`).
static DRAINED: AtomicBool = AtomicBool::new(false);

extern "C" fn record_signal(sig: libc::c_int) {
    PENDING_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Starts the thread that serves the host's requests (`signal N`: deliver
/// N to the app, …), from the control port or COM2 (put in raw mode first:
/// no echo, so nothing the host sends comes back on the status channel).
/// It reads nothing until it is sent the bytes that came after the start
/// message: on a machine that is snapshotted it is started before the
/// snapshot point, so that no restore pays for a thread.
fn spawn_listener() -> Option<std::sync::mpsc::Sender<Vec<u8>>> {
    let source: Box<dyn std::io::Read + Send> = match report::channel() {
        Some(port) => match port.try_clone() {
            Ok(f) => Box::new(f),
            Err(e) => {
                debug!("cannot read the control port: {e}");
                return None;
            }
        },
        None => match process::open_raw_tty("/dev/ttyS1") {
            Some(tty) => Box::new(tty),
            None => {
                debug!("no control port and no /dev/ttyS1: the host cannot send requests");
                return None;
            }
        },
    };
    let (go, leftover) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        use hyper_contract::{HostMessage, LineBuffer};
        let mut source = source;
        let mut lines = LineBuffer::default();
        let mut buf = [0u8; 256];
        // What came after the start message, in the same read; sent once
        // the host may send requests.
        let Ok(leftover) = leftover.recv() else {
            return;
        };
        let mut first = Some(leftover);
        loop {
            let chunk: Vec<u8> = match first.take() {
                Some(l) => l,
                None => match source.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => buf[..n].to_vec(),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                },
            };
            for &b in &chunk {
                let Some(line) = lines.push(b) else {
                    continue;
                };
                match HostMessage::decode(&line) {
                    Ok(HostMessage::StdinEof(n)) => {
                        streams::STDIN_EOF_AT.store(n, Ordering::SeqCst)
                    }
                    Ok(HostMessage::Winsize { rows, cols }) => streams::set_winsize(rows, cols),
                    Ok(HostMessage::Drained) => {
                        debug!("the host has all the output");
                        DRAINED.store(true, Ordering::SeqCst);
                    }
                    Ok(HostMessage::Closed(fd)) => {
                        debug!("nobody reads the app's fd {fd} on the host");
                        streams::close_stream(fd);
                    }
                    Ok(HostMessage::Signal(sig)) => {
                        debug!("host asks for signal {sig}");
                        match APP_PID.load(Ordering::SeqCst) {
                            // Not started yet: supervise() delivers it first thing.
                            0 => PENDING_SIGNAL.store(sig, Ordering::SeqCst),
                            app => process::kill(app, sig),
                        }
                    }
                    Err(e) => debug!("ignored from the host: {e}"),
                }
            }
        }
    });
    Some(go)
}

/// Lets the listener (`early`'s, else one started now) serve the host's
/// requests, and tells the host it may send them.
fn listen_for_requests(leftover: Vec<u8>, early: Option<std::sync::mpsc::Sender<Vec<u8>>>) {
    let Some(go) = early.or_else(spawn_listener) else {
        return;
    };
    // The host holds its requests until this line: earlier bytes would have
    // met a closed (or echoing) port.
    report::announce_ready();
    let _ = go.send(leftover);
}

/// What a start message asks before anything of the run: the wall clock
/// (a restored guest has the snapshot's) and fresh entropy (and the same
/// random state as every other restore of the snapshot, until reseeded).
fn apply_start(start: &hyper_contract::Start) {
    if start.realtime_ns > 0 {
        if let Err(e) = process::set_realtime(start.realtime_ns) {
            debug!("cannot set the clock: {e}");
        }
    }
    match hex_bytes(&start.entropy) {
        Some(seed) if !seed.is_empty() => {
            if let Err(e) = process::add_entropy(&seed) {
                debug!("cannot reseed the random pool: {e}");
            }
        }
        _ => debug!("the start message carried no entropy"),
    }
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Reaps every child; forwards signals to the app; when the app exits, ends
/// every remaining process and returns the app's outcome.
fn supervise(app: libc::pid_t) -> Outcome {
    loop {
        let sig = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            debug!("forwarding signal {sig}");
            process::kill(app, sig);
        }
        match process::wait_any() {
            Ok(Some((pid, status))) if pid == app => {
                let outcome = if libc::WIFEXITED(status) {
                    Outcome::Exited(libc::WEXITSTATUS(status))
                } else {
                    Outcome::Signaled(libc::WTERMSIG(status))
                };
                // Orphans must not keep the VM alive: end them and reap them.
                process::kill(-1, libc::SIGKILL);
                while let Ok(Some(_)) = process::wait_any() {}
                return outcome;
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return Outcome::InitError("the app disappeared without an exit status".into())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Outcome::InitError(format!("wait: {e}")),
        }
    }
}
