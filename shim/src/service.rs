//! The shim v2 task service: one container per shim, run as one `hyperboot`
//! process (one microVM). containerd's calls map onto it as runc's do onto
//! a container's init process: create builds (or finds) the artifact, start
//! boots it, kill signals hyperboot (which stops the app as `docker stop`
//! does), wait and state report its exit code as runc gives it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};

use containerd_shim as shim;
use log::{info, warn};
use shim::api::{self, Status};
use shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskIO, TaskStart};
use shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use shim::protos::protobuf::{MessageDyn, MessageField};
use shim::protos::topics;
use shim::protos::ttrpc::{self, Code};
use shim::publisher::RemotePublisher;
use shim::{Config, DeleteResponse, ExitSignal, Flags, TtrpcContext, TtrpcResult};

use crate::rootfs::{self, Inputs};
use crate::spec::{self, Plan};

/// hyperboot's pid, kept in the bundle so that `delete` after a lost shim
/// can end a VM the parent-death signal did not.
const PID_FILE: &str = "hyperboot.pid";
/// runc leaves a stopped container until the caller sends SIGKILL; the VM's
/// app gets as long.
const STOP_TIMEOUT: &str = "86400";

fn rpc(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("namespace", &self.inner.namespace)
            .finish_non_exhaustive()
    }
}

struct Inner {
    namespace: String,
    exit: ExitSignal,
    publisher: Mutex<Option<RemotePublisher>>,
    task: Mutex<Option<Task>>,
    changed: Condvar,
}

/// The container: its VM's process and how it ended.
struct Task {
    id: String,
    bundle: PathBuf,
    stdin: String,
    stdout: String,
    stderr: String,
    plan: Plan,
    artifact: PathBuf,
    /// hyperboot's `--upper`: the container's snapshot directory.
    upper: Option<PathBuf>,
    status: Status,
    pid: u32,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    /// The terminal's controlling side, for resize-pty.
    pty: Option<Arc<OwnedFd>>,
}

impl Inner {
    fn task(&self) -> MutexGuard<'_, Option<Task>> {
        self.task.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let guard = self.publisher.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = guard.as_ref() {
            if let Err(e) = p.publish(shim::Context::default(), topic, &self.namespace, event) {
                warn!("cannot publish {topic}: {e}");
            }
        }
    }
}

fn now() -> Timestamp {
    shim::util::timestamp().unwrap_or_default()
}

impl shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            inner: Arc::new(Inner {
                namespace: args.namespace.clone(),
                exit: ExitSignal::default(),
                publisher: Mutex::new(None),
                task: Mutex::new(None),
                changed: Condvar::new(),
            }),
        }
    }

    fn start_shim(&mut self, opts: shim::StartOpts) -> Result<String, shim::Error> {
        let grouping = opts.id.clone();
        let (_pid, address) = shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    /// After a shim was lost: ends its VM if one is left (the working
    /// directory is the bundle).
    fn delete_shim(&mut self) -> Result<DeleteResponse, shim::Error> {
        let pid = std::fs::read_to_string(PID_FILE)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "hyperboot" {
                warn!("ending hyperboot {pid}, left by a lost shim");
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid).expect("positive"),
                    rustix::process::Signal::KILL,
                );
            }
            let _ = std::fs::remove_file(PID_FILE);
        }
        Ok(DeleteResponse {
            pid: pid.unwrap_or(0) as u32,
            exit_status: 128 + 9,
            exited_at: MessageField::some(now()),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.inner.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        *self
            .inner
            .publisher
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(publisher);
        self.clone()
    }
}

/// Where the shim finds what it runs; environment variables override (set
/// them in containerd's service environment).
fn inputs() -> Inputs {
    let cache = std::env::var_os("HYPER_SHIM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("hyper")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hyper")))
        .map(|c| {
            if std::env::var_os("HYPER_SHIM_CACHE").is_some() {
                c
            } else {
                c.join("containers")
            }
        })
        .unwrap_or_else(|| PathBuf::from("/var/cache/hyper/containers"));
    Inputs {
        kernel: hyperbuild::installed("HYPER_KERNEL", "vmlinux"),
        init: hyperbuild::installed("HYPER_INIT", "hyperinit"),
        cache,
    }
}

/// `HYPER_SHIM_HYPERBOOT`, else the `hyperboot` beside this binary, else PATH's.
fn hyperboot() -> PathBuf {
    if let Some(p) = std::env::var_os("HYPER_SHIM_HYPERBOOT") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("hyperboot")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("hyperboot"))
}

fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// One of containerd's IO destinations: a FIFO path, `file://PATH`, or none.
fn open_io(uri: &str, write: bool) -> std::io::Result<Option<File>> {
    if uri.is_empty() {
        return Ok(None);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Some);
    }
    if uri.contains("://") {
        return Err(std::io::Error::other(format!(
            "{uri}: only FIFOs and file:// are supported for container IO"
        )));
    }
    // FIFOs: containerd's side is open or opening; this blocks until it is.
    let f = if write {
        OpenOptions::new().write(true).open(uri)?
    } else {
        File::open(uri)?
    };
    Ok(Some(f))
}

/// Copies containerd's stdin into `to` on a thread of its own: the FIFO's
/// open waits for containerd's side, which may come after start, and its
/// end (containerd closing it) becomes the end of `to`.
fn feed(fifo: String, to: File) {
    std::thread::spawn(move || match open_io(&fifo, false) {
        Ok(Some(from)) => copy(from, to),
        Ok(None) => {}
        Err(e) => warn!("stdin {fifo}: {e}"),
    });
}

fn copy(mut from: impl Read, mut to: impl Write) {
    let mut buf = [0u8; 8192];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// The VM's process as a command, with its standard streams; the copier
/// threads of a terminal are returned to be joined after it ends.
struct Launch {
    command: Command,
    pty: Option<Arc<OwnedFd>>,
    output: Option<std::thread::JoinHandle<()>>,
}

fn launch(t: &Task) -> std::io::Result<Launch> {
    let mut c = Command::new(hyperboot());
    c.args(&t.plan.options);
    c.args(["-q", "--stop-timeout", STOP_TIMEOUT]);
    if let Some(dir) = &t.upper {
        c.arg("--upper").arg(dir);
    }
    match &t.plan.netns {
        // The pod's network: hyperboot runs in the namespace and its VM
        // takes over the namespace's interface (its MAC, address, route).
        Some(ns) => {
            let ns = OwnedFd::from(File::open(ns)?);
            c.args(["--net", "redirect"]);
            for d in &t.plan.dns {
                c.args(["--dns", d]);
            }
            // SAFETY: one system call between fork and exec.
            unsafe {
                c.pre_exec(move || {
                    rustix::thread::move_into_link_name_space(
                        ns.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )?;
                    Ok(())
                });
            }
        }
        None => {
            c.args(["--net", "none"]);
        }
    }
    if let Ok(extra) = std::env::var("HYPER_SHIM_HYPERBOOT_ARGS") {
        c.args(extra.split_whitespace());
    }
    let stdin = (!t.stdin.is_empty()).then(|| t.stdin.clone());
    let stdout = open_io(&t.stdout, true)?;
    let mut pty = None;
    let mut output = None;
    if t.plan.terminal {
        let pair = nix::pty::openpty(None, None).map_err(std::io::Error::from)?;
        let master = Arc::new(pair.master);
        c.arg("-t");
        if let Some(stdin) = stdin {
            c.arg("-i");
            feed(stdin, File::from(master.try_clone()?));
        }
        if let Some(out) = stdout {
            let m = File::from(master.try_clone()?);
            output = Some(std::thread::spawn(move || copy(m, out)));
        }
        let slave = File::from(pair.slave);
        c.stdin(slave.try_clone()?);
        c.stdout(slave.try_clone()?);
        c.stderr(slave);
        // SAFETY: between fork and exec: two system calls, no allocation.
        unsafe {
            c.pre_exec(|| {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(std::io::stdin())?;
                Ok(())
            });
        }
        pty = Some(master);
    } else {
        match stdin {
            Some(fifo) => {
                c.arg("-i");
                let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
                feed(fifo, File::from(w));
                c.stdin(File::from(r));
            }
            None => {
                c.stdin(Stdio::null());
            }
        }
        c.stdout(stdout.map_or_else(Stdio::null, Stdio::from));
        c.stderr(open_io(&t.stderr, true)?.map_or_else(Stdio::null, Stdio::from));
        c.process_group(0);
    }
    let shim = rustix::process::getpid();
    // SAFETY: between fork and exec: two system calls, no allocation. The
    // parent-death signal follows the thread that forks, which is the
    // thread that waits for the VM to end (see `start`).
    unsafe {
        c.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            if rustix::process::getppid() != Some(shim) {
                return Err(std::io::Error::other("the shim is gone"));
            }
            Ok(())
        });
    }
    c.arg(&t.artifact).arg("--").args(&t.plan.args);
    Ok(Launch {
        command: c,
        pty,
        output,
    })
}

impl Service {
    /// Runs the VM on a thread of its own, which waits for it and records
    /// how it ended; returns its pid.
    fn run(&self, launch: Launch, id: String) -> std::io::Result<u32> {
        let (tx, rx) = mpsc::channel();
        let inner = self.inner.clone();
        let Launch {
            mut command,
            output,
            ..
        } = launch;
        std::thread::Builder::new()
            .name("vm".into())
            .spawn(move || {
                let mut child = match command.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                drop(command);
                let pid = child.id();
                let _ = tx.send(Ok(pid));
                let code = match child.wait() {
                    Ok(s) => s
                        .code()
                        .map(|c| c as u32)
                        .or(s.signal().map(|n| 128 + n as u32))
                        .unwrap_or(255),
                    Err(e) => {
                        warn!("{id}: cannot wait for hyperboot: {e}");
                        255
                    }
                };
                if let Some(o) = output {
                    let _ = o.join();
                }
                let at = now();
                {
                    let mut g = inner.task();
                    if let Some(t) = g.as_mut() {
                        t.status = Status::STOPPED;
                        t.exit_status = code;
                        t.exited_at = Some(at.clone());
                        t.pty = None;
                    }
                }
                inner.changed.notify_all();
                info!("{id}: the VM ended with {code}");
                inner.publish(
                    topics::TASK_EXIT_EVENT_TOPIC,
                    Box::new(TaskExit {
                        container_id: id.clone(),
                        id,
                        pid,
                        exit_status: code,
                        exited_at: MessageField::some(at),
                        ..Default::default()
                    }),
                );
            })?;
        rx.recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the VM thread ended")))
    }
}

fn check_init(exec_id: &str) -> TtrpcResult<()> {
    if exec_id.is_empty() {
        Ok(())
    } else {
        Err(rpc(
            Code::NOT_FOUND,
            format!("exec process {exec_id}: hyper runs no second process in a VM"),
        ))
    }
}

fn not_created(id: &str) -> ttrpc::Error {
    rpc(Code::NOT_FOUND, format!("task {id} not created"))
}

impl shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let mut g = self.inner.task();
        if let Some(t) = g.as_ref() {
            return Err(rpc(
                Code::ALREADY_EXISTS,
                format!("this shim already runs task {}", t.id),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(rpc(Code::UNIMPLEMENTED, "restoring checkpoints"));
        }
        let bundle = PathBuf::from(&req.bundle);
        let config = std::fs::read(bundle.join("config.json")).map_err(|e| {
            rpc(
                Code::INVALID_ARGUMENT,
                format!("{}/config.json: {e}", bundle.display()),
            )
        })?;
        let plan = spec::plan(&config, host_cpus())
            .map_err(|e| rpc(Code::INVALID_ARGUMENT, format!("{}: {e}", req.id)))?;
        if let Some(ns) = &plan.netns {
            std::fs::metadata(ns).map_err(|e| {
                rpc(
                    Code::INVALID_ARGUMENT,
                    format!("{}: network namespace {ns}: {e}", req.id),
                )
            })?;
        }
        for s in &plan.skipped {
            info!(
                "{}: {s} is the guest's own, not bound from the host",
                req.id
            );
        }
        let mounts: Vec<rootfs::Mount> = req
            .rootfs
            .iter()
            .map(|m| rootfs::Mount {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let layers = rootfs::layers(&mounts, &bundle.join("rootfs"))
            .map_err(|e| rpc(Code::INVALID_ARGUMENT, format!("{}: {e}", req.id)))?;
        let started = std::time::Instant::now();
        let (artifact, built) = rootfs::artifact(&layers, &inputs(), &bundle)
            .map_err(|e| rpc(Code::INTERNAL, format!("{}: {e}", req.id)))?;
        info!(
            "{}: artifact {} ({} in {} ms)",
            req.id,
            artifact.display(),
            if built { "built" } else { "cached" },
            started.elapsed().as_millis()
        );
        *g = Some(Task {
            id: req.id.clone(),
            bundle: bundle.clone(),
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            plan,
            artifact,
            upper: layers.upper.clone(),
            status: Status::CREATED,
            pid: 0,
            exit_status: 0,
            exited_at: None,
            pty: None,
        });
        drop(g);
        self.inner.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid: 0,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid: 0,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        check_init(&req.exec_id)?;
        let mut g = self.inner.task();
        let t = g.as_mut().ok_or_else(|| not_created(&req.id))?;
        if t.status != Status::CREATED {
            return Err(rpc(
                Code::FAILED_PRECONDITION,
                format!("task {} was started already", t.id),
            ));
        }
        let io_err = |e: std::io::Error| rpc(Code::INTERNAL, format!("{}: {e}", req.id));
        let launch = launch(t).map_err(io_err)?;
        t.pty = launch.pty.clone();
        let pid = self.run(launch, t.id.clone()).map_err(|e| {
            rpc(
                Code::INTERNAL,
                format!("{}: cannot run {}: {e}", req.id, hyperboot().display()),
            )
        })?;
        // The VM may have ended already; its thread waits for this lock.
        t.pid = pid;
        t.status = Status::RUNNING;
        let _ = std::fs::write(t.bundle.join(PID_FILE), pid.to_string());
        let id = t.id.clone();
        drop(g);
        info!("{id}: hyperboot {pid} started");
        self.inner.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: id,
                pid,
                ..Default::default()
            }),
        );
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        check_init(&req.exec_id)?;
        let g = self.inner.task();
        let t = g.as_ref().ok_or_else(|| not_created(&req.id))?;
        Ok(api::StateResponse {
            id: t.id.clone(),
            bundle: t.bundle.display().to_string(),
            pid: t.pid,
            status: t.status.into(),
            stdin: t.stdin.clone(),
            stdout: t.stdout.clone(),
            stderr: t.stderr.clone(),
            terminal: t.plan.terminal,
            exit_status: t.exit_status,
            exited_at: t.exited_at.clone().into(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        check_init(&req.exec_id)?;
        let mut g = self.inner.task();
        loop {
            let t = g.as_ref().ok_or_else(|| not_created(&req.id))?;
            if t.status == Status::STOPPED {
                return Ok(api::WaitResponse {
                    exit_status: t.exit_status,
                    exited_at: t.exited_at.clone().into(),
                    ..Default::default()
                });
            }
            g = self
                .inner
                .changed
                .wait(g)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        check_init(&req.exec_id)?;
        let mut g = self.inner.task();
        let t = g.as_mut().ok_or_else(|| not_created(&req.id))?;
        let sig = req.signal as i32;
        match t.status {
            Status::STOPPED => Err(rpc(Code::NOT_FOUND, "process already finished")),
            Status::CREATED => {
                // Nothing runs yet: the task ends as if killed.
                let at = now();
                t.status = Status::STOPPED;
                t.exit_status = 128 + req.signal;
                t.exited_at = Some(at.clone());
                let exit = TaskExit {
                    container_id: t.id.clone(),
                    id: t.id.clone(),
                    exit_status: t.exit_status,
                    exited_at: MessageField::some(at),
                    ..Default::default()
                };
                drop(g);
                self.inner.changed.notify_all();
                self.inner
                    .publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(exit));
                Ok(api::Empty::default())
            }
            _ => {
                // hyperboot turns SIGTERM, SIGINT and SIGHUP into the
                // app's stop signal and hands SIGQUIT, SIGUSR1 and SIGUSR2
                // to the app; SIGKILL ends the VM at once.
                const TAKEN: [i32; 7] = [
                    libc::SIGKILL,
                    libc::SIGTERM,
                    libc::SIGINT,
                    libc::SIGHUP,
                    libc::SIGQUIT,
                    libc::SIGUSR1,
                    libc::SIGUSR2,
                ];
                if !TAKEN.contains(&sig) {
                    return Err(rpc(
                        Code::INVALID_ARGUMENT,
                        format!("signal {sig}: a hyper VM takes SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 (to the app) and SIGKILL (ends the VM)"),
                    ));
                }
                let pid = rustix::process::Pid::from_raw(t.pid as i32)
                    .ok_or_else(|| rpc(Code::INTERNAL, "no pid"))?;
                let signal = rustix::process::Signal::from_named_raw(sig)
                    .ok_or_else(|| rpc(Code::INVALID_ARGUMENT, format!("signal {sig}")))?;
                info!("{}: signal {sig} to hyperboot {}", t.id, t.pid);
                rustix::process::kill_process(pid, signal)
                    .map_err(|e| rpc(Code::INTERNAL, format!("kill {}: {e}", t.pid)))?;
                Ok(api::Empty::default())
            }
        }
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        check_init(&req.exec_id)?;
        let mut g = self.inner.task();
        let t = g.as_ref().ok_or_else(|| not_created(&req.id))?;
        if t.status == Status::RUNNING {
            return Err(rpc(
                Code::FAILED_PRECONDITION,
                format!("task {} is running; kill it first", t.id),
            ));
        }
        let t = g.take().expect("checked above");
        drop(g);
        let _ = std::fs::remove_file(t.bundle.join(PID_FILE));
        let scratch = t.bundle.join("rootfs.hvm");
        if t.artifact == scratch {
            let _ = std::fs::remove_file(&scratch);
        }
        let exited_at = t.exited_at.clone().unwrap_or_else(now);
        self.inner.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: t.id.clone(),
                id: t.id.clone(),
                pid: t.pid,
                exit_status: t.exit_status,
                exited_at: MessageField::some(exited_at.clone()),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid: t.pid,
            exit_status: t.exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let g = self.inner.task();
        let t = g.as_ref().ok_or_else(|| not_created(&req.id))?;
        let processes = (t.status == Status::RUNNING)
            .then(|| shim::protos::api::ProcessInfo {
                pid: t.pid,
                ..Default::default()
            })
            .into_iter()
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        check_init(&req.exec_id)?;
        let g = self.inner.task();
        let t = g.as_ref().ok_or_else(|| not_created(&req.id))?;
        if let Some(pty) = &t.pty {
            let size = rustix::termios::Winsize {
                ws_row: req.height.min(u16::MAX as u32) as u16,
                ws_col: req.width.min(u16::MAX as u32) as u16,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            rustix::termios::tcsetwinsize(pty.as_ref(), size)
                .map_err(|e| rpc(Code::INTERNAL, format!("resize: {e}")))?;
        }
        Ok(api::Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        // hyperboot reads the stdin FIFO itself (or its copier does) and
        // sees the end when containerd closes its side.
        check_init(&req.exec_id)?;
        Ok(api::Empty::default())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        use shim::protos::cgroups::metrics::{
            CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
        };
        let g = self.inner.task();
        let t = g.as_ref().ok_or_else(|| not_created(&req.id))?;
        let Usage { rss, user, kernel } = if t.status == Status::RUNNING {
            tree_usage(t.pid)
        } else {
            Usage::default()
        };
        let metrics = Metrics {
            cpu: MessageField::some(CPUStat {
                usage: MessageField::some(CPUUsage {
                    total: user + kernel,
                    user,
                    kernel,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                rss,
                usage: MessageField::some(MemoryEntry {
                    usage: rss,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            pids: MessageField::some(PidsStat {
                current: u64::from(t.status == Status::RUNNING),
                ..Default::default()
            }),
            ..Default::default()
        };
        let any = shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| rpc(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let pid = self.inner.task().as_ref().map_or(0, |t| t.pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            version: format!("hyper {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // As runc's shim: only once the task is deleted.
        if self.inner.task().is_none() {
            self.inner.exit.signal();
        }
        Ok(api::Empty::default())
    }
}

/// The resident memory of `pid` and its descendants (hyperboot, and QEMU
/// on that backend), in bytes.
/// What the VM's processes (hyperboot, and QEMU on that backend) use: the
/// VM's whole cost on the host, guest included.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    /// Resident memory, bytes.
    rss: u64,
    /// CPU time in user and kernel mode, nanoseconds.
    user: u64,
    kernel: u64,
}

fn tree_usage(pid: u32) -> Usage {
    let tick_ns = 1_000_000_000 / rustix::param::clock_ticks_per_second().max(1);
    let mut u = Usage::default();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        u.rss += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024;
        // utime and stime: the 14th and 15th fields, counted after the
        // command name's closing parenthesis (the name may hold spaces).
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let mut fields = rest.split_whitespace().skip(11);
        let mut next = || {
            fields
                .next()
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        u.user += next() * tick_ns;
        u.kernel += next() * tick_ns;
        let tasks = Path::new("/proc").join(p.to_string()).join("task");
        for task in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_destinations() {
        assert!(open_io("", true).unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let f = open_io(&format!("file://{}", log.display()), true).unwrap();
        assert!(f.is_some() && log.exists());
        let e = open_io("binary:///usr/bin/logger", true).unwrap_err();
        assert!(e.to_string().contains("only FIFOs and file://"), "{e}");
    }

    #[test]
    fn the_memory_and_cpu_time_of_this_process_are_counted() {
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let u = tree_usage(std::process::id());
        assert!(u.rss > 1 << 20, "{u:?}");
        assert!(
            u.user >= 50_000_000,
            "100 ms of spinning is user time: {u:?}"
        );
    }
}
