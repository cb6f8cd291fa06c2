//! The supervisor of a detached VM: a hyperboot process in a session of its
//! own (`hyperboot __supervise ID`), started by `hyperboot -d`, which waits
//! for it to say the VM runs (or why it cannot) before printing the ID.
//!
//! It boots the VM as a foreground hyperboot would, with the app's stdout
//! and stderr going into the VM's logs and its own messages into
//! `hyperboot.log`; it serves stop and kill requests on the VM's `control`
//! socket; it records every change in `state.json`; it restarts the VM as
//! `--restart` says, with Docker's backoff (100 ms, doubling, at most a
//! minute, back to 100 ms after 10 s of running). The VM lives in this
//! process (the KVM backend) or dies with it (QEMU and passt get a
//! parent-death signal), so a killed supervisor leaves no VM behind.
//!
//! Each run happens on a thread of its own: on the KVM backend that thread
//! ends under the supervisor's seccomp filter, which must not bind the
//! process that records the end and restarts.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{claim_name, logs, now, process_start, Restart, Spec, State, Status, VmDir, VmsError};
use crate::supervise::Event;

/// What `-d` adds to a run.
#[derive(Debug, Clone, Default)]
pub struct Detach {
    pub name: Option<String>,
    /// `--rm`: the VM's directory goes when it ends.
    pub remove: bool,
    pub restart: Restart,
}

/// `hyperboot -d`: records the VM, starts its supervisor and waits until
/// the VM runs; returns its ID.
pub fn start(
    args: Vec<String>,
    artifact: &Path,
    digest: String,
    d: Detach,
) -> Result<String, VmsError> {
    let root = super::root();
    std::fs::create_dir_all(&root).map_err(super::io("cannot create", &root))?;
    let id = super::new_id();
    let vm = VmDir::new(&id);
    std::fs::create_dir(&vm.path).map_err(super::io("cannot create", &vm.path))?;
    let made = (|| {
        if let Some(n) = &d.name {
            claim_name(n, &id)?;
        }
        let spec = Spec {
            id: id.clone(),
            name: d.name.clone(),
            artifact: artifact.to_path_buf(),
            digest,
            args,
            ports: Vec::new(),
            restart: d.restart,
            remove: d.remove,
            created: now(),
        };
        super::write_json(&vm.file("spec.json"), &spec)?;
        vm.set_state(&State {
            status: Status::Created,
            pid: 0,
            pid_start: 0,
            started: None,
            finished: None,
            exit_code: None,
            restarts: 0,
            stopped: false,
        })?;
        spawn(&vm)
    })();
    if let Err(e) = made {
        let _ = super::remove(&vm);
        return Err(e);
    }
    Ok(id)
}

/// Starts the supervisor and reads what it says on the ready pipe.
fn spawn(vm: &VmDir) -> Result<(), VmsError> {
    let exe = std::env::current_exe().map_err(super::io("cannot find", Path::new("hyperboot")))?;
    let log_path = vm.file("hyperboot.log");
    let log = std::fs::File::create(&log_path).map_err(super::io("cannot create", &log_path))?;
    let (r, w) = rustix::pipe::pipe().map_err(|e| VmsError::Start(e.to_string()))?;
    rustix::io::fcntl_setfd(&w, rustix::io::FdFlags::empty())
        .map_err(|e| VmsError::Start(e.to_string()))?;
    let mut c = std::process::Command::new(exe);
    c.arg("__supervise")
        .arg(&vm.id)
        .env("HYPER_READY_FD", w.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| VmsError::Start(e.to_string()))?,
        )
        .stderr(log);
    // SAFETY: the closure runs in the child between fork and exec and makes
    // one system call (setsid); it allocates nothing.
    unsafe {
        c.pre_exec(|| {
            rustix::process::setsid()?;
            Ok(())
        });
    }
    let child = c.spawn().map_err(|e| VmsError::Start(e.to_string()))?;
    drop(w);
    drop(c);
    // One line: the supervisor's children (QEMU) may hold the pipe open.
    let mut said = String::new();
    let _ = BufReader::new(std::fs::File::from(r)).read_line(&mut said);
    // The supervisor goes on alone; its exit is no concern of ours.
    drop(child);
    match said.trim() {
        "ok" => Ok(()),
        "" => Err(VmsError::Start(format!(
            "it ended without a word; see {}",
            vm.file("hyperboot.log").display()
        ))),
        other => Err(VmsError::Start(
            other.strip_prefix("error: ").unwrap_or(other).to_string(),
        )),
    }
}

/// Where requests for the current run go (none between runs).
type Requests = Arc<Mutex<Option<Sender<Event>>>>;

/// `hyperboot __supervise ID`: runs the VM to its end, restarting it as
/// asked; returns the last exit code.
pub fn supervise(
    id: &str,
    boot_options: impl Fn(&Spec) -> Result<crate::BootOptions, String>,
) -> u8 {
    let vm = VmDir::new(id);
    let mut ready = std::env::var("HYPER_READY_FD")
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        // SAFETY: the starting hyperboot handed us this descriptor (the
        // write end of its pipe) and nothing else in this process uses it.
        .map(|fd| std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
    if let Some(f) = &ready {
        // Not for the VM's helpers: the starting hyperboot waits for our word.
        let _ = rustix::io::fcntl_setfd(f, rustix::io::FdFlags::CLOEXEC);
    }
    let say = |ready: &mut Option<std::fs::File>, what: &str| {
        if let Some(mut f) = ready.take() {
            let _ = writeln!(f, "{what}");
        }
    };
    let fail = |ready: &mut Option<std::fs::File>, e: String| -> u8 {
        tracing::error!("{e}");
        say(ready, &format!("error: {e}"));
        crate::exit::FAILED
    };
    let spec = match vm.spec() {
        Ok(s) => s,
        Err(e) => return fail(&mut ready, crate::error_chain(&e)),
    };
    let opts = match boot_options(&spec) {
        Ok(o) => o,
        Err(e) => return fail(&mut ready, e),
    };
    if let Err(e) = redirect_streams(&vm) {
        return fail(&mut ready, format!("cannot set up the logs: {e}"));
    }
    let requests: Requests = Arc::default();
    let stopped = Arc::new(AtomicBool::new(false));
    if let Err(e) = serve_control(&vm, requests.clone(), stopped.clone()) {
        return fail(&mut ready, format!("cannot open the control socket: {e}"));
    }
    let me = std::process::id();
    let mut state = State {
        status: Status::Running,
        pid: me,
        pid_start: process_start(me).unwrap_or(0),
        started: None,
        finished: None,
        exit_code: None,
        restarts: 0,
        stopped: false,
    };
    let ready = Arc::new(Mutex::new(ready));
    let mut delay = Duration::from_millis(100);
    let code = loop {
        let ran_from = Instant::now();
        state.status = Status::Running;
        state.started = Some(now());
        state.finished = None;
        let _ = vm.set_state(&state);
        let hooks = crate::Hooks {
            on_start: Some({
                let (ready, vm, state) = (ready.clone(), vm.clone(), state.clone());
                Box::new(move |ports: &[String]| {
                    if let Ok(mut spec) = vm.spec() {
                        spec.ports = ports.to_vec();
                        let _ = super::write_json(&vm.file("spec.json"), &spec);
                    }
                    let _ = vm.set_state(&state);
                    let mut r = ready.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(mut f) = r.take() {
                        let _ = writeln!(f, "ok");
                    }
                })
            }),
            requests: Some({
                let requests = requests.clone();
                Box::new(move |tx| {
                    *requests.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
                })
            }),
        };
        let run_opts = opts.clone();
        let result = std::thread::Builder::new()
            .name("run".into())
            .spawn(move || crate::boot_with(&run_opts, hooks))
            .map_err(|e| e.to_string())
            .and_then(|t| t.join().map_err(|_| "the run panicked".to_string()));
        *requests.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // No restart can boot an artifact that was replaced.
        let mut last = false;
        let exit = match result {
            Ok(Ok(exit)) => exit,
            Ok(Err(e)) => {
                last = matches!(e, crate::BootError::Changed { .. });
                let msg = crate::error_chain(&e);
                let mut r = ready.lock().unwrap_or_else(|e| e.into_inner());
                if r.is_some() {
                    // It never ran: the starting hyperboot says why.
                    let code = fail(&mut r, msg);
                    drop(r);
                    let _ = super::remove(&vm);
                    return code;
                }
                tracing::error!("{msg}");
                crate::exit::Exit::Failed
            }
            Err(e) => {
                tracing::error!("{e}");
                crate::exit::Exit::Failed
            }
        };
        if let Some(m) = exit.message() {
            tracing::error!("{m}");
        }
        let code = exit.code();
        state.finished = Some(now());
        state.exit_code = Some(code);
        state.stopped = stopped.load(Ordering::SeqCst);
        let again = !state.stopped
            && !last
            && match spec.restart {
                Restart::No => false,
                Restart::Always => true,
                Restart::OnFailure(limit) => code != 0 && limit.is_none_or(|n| state.restarts < n),
            };
        if !again {
            state.status = Status::Exited;
            let _ = vm.set_state(&state);
            break code;
        }
        if ran_from.elapsed() >= Duration::from_secs(10) {
            delay = Duration::from_millis(100);
        }
        state.status = Status::Restarting;
        let _ = vm.set_state(&state);
        tracing::info!("exit code {code}: restarting in {} ms", delay.as_millis());
        let until = Instant::now() + delay;
        while Instant::now() < until && !stopped.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if stopped.load(Ordering::SeqCst) {
            state.status = Status::Exited;
            state.stopped = true;
            let _ = vm.set_state(&state);
            break code;
        }
        delay = (delay * 2).min(Duration::from_secs(60));
        state.restarts += 1;
    };
    // The logs have all the app wrote once the collectors drain the pipes.
    let _ = std::io::stdout().flush();
    if spec.remove {
        let _lock = vm.lock();
        let _ = super::remove(&vm);
    }
    code
}

/// The app's stdout and stderr (this process's descriptors 1 and 2) become
/// pipes that collectors copy into the logs; hyperboot's own messages stay
/// on the file that was descriptor 2 (`hyperboot.log`).
fn redirect_streams(vm: &VmDir) -> std::io::Result<()> {
    let own = rustix::io::dup(std::io::stderr().as_fd())?;
    let own = Mutex::new(std::fs::File::from(own));
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::level_filters::LevelFilter::INFO)
        .with_writer(own)
        .with_ansi(false)
        .with_target(false)
        .try_init();
    for (fd, name) in [(1, "stdout"), (2, "stderr")] {
        let (r, w) = rustix::pipe::pipe()?;
        let log = logs::LogWriter::create(&vm.file(&format!("{name}.log")))?;
        logs::collect(name, std::fs::File::from(r), log)?;
        if fd == 1 {
            rustix::stdio::dup2_stdout(&w)?;
        } else {
            rustix::stdio::dup2_stderr(&w)?;
        }
    }
    Ok(())
}

/// Serves the VM's control socket (thread `control`): `stop SECS` and
/// `signal N`, one per connection, answered `ok` or `not running`.
fn serve_control(vm: &VmDir, requests: Requests, stopped: Arc<AtomicBool>) -> std::io::Result<()> {
    let path = vm.file("control");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut line = String::new();
                let mut r = BufReader::new(&conn);
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let words: Vec<&str> = line.split_whitespace().collect();
                let event = match words.as_slice() {
                    ["stop", secs] => secs.parse::<f64>().ok().filter(|s| *s >= 0.0).map(|s| {
                        stopped.store(true, Ordering::SeqCst);
                        Event::Stop(Duration::from_secs_f64(s))
                    }),
                    ["signal", n] => n
                        .parse::<i32>()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .map(Event::Deliver),
                    _ => None,
                };
                let answer = match event {
                    None => "bad request",
                    Some(e) => {
                        let tx = requests.lock().unwrap_or_else(|e| e.into_inner());
                        match tx.as_ref().map(|tx| tx.send(e)) {
                            Some(Ok(())) => "ok",
                            // Between runs, a stop still cancels the restart.
                            _ if matches!(e, Event::Stop(_)) => "ok",
                            _ => "not running",
                        }
                    }
                };
                let _ = (&conn).write_all(format!("{answer}\n").as_bytes());
            }
        })?;
    Ok(())
}
