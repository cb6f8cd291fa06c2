//! `hyperboot ps`, `logs`, `stop`, `kill`, `wait`, `rm`: what a user does
//! with detached VMs, reading their directories and talking to their
//! supervisors (see the module above).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{all, find, logs, now, remove, State, Status, VmDir, VmsError};

/// One line of `ps`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: String,
    pub name: Option<String>,
    /// `sha256:…`
    pub digest: String,
    pub artifact: String,
    /// `running`, `restarting`, `exited`, `created`.
    pub status: Status,
    /// None while running, or when the supervisor vanished.
    pub exit_code: Option<u8>,
    pub ports: Vec<String>,
    pub created: u64,
    pub started: Option<u64>,
    pub finished: Option<u64>,
    pub restarts: u32,
}

fn row(vm: &VmDir) -> Result<Row, VmsError> {
    let spec = vm.spec()?;
    let s = vm.current()?;
    Ok(Row {
        id: spec.id,
        name: spec.name,
        digest: spec.digest,
        artifact: spec.artifact.display().to_string(),
        status: s.status,
        exit_code: s.exit_code,
        ports: spec.ports,
        created: spec.created,
        started: s.started,
        finished: s.finished,
        restarts: s.restarts,
    })
}

/// "5 seconds", "3 minutes", "2 hours", "4 days".
fn ago(secs: u64) -> String {
    let (n, unit) = match secs {
        0..=1 => return "a second".into(),
        2..=119 => (secs, "seconds"),
        120..=7199 => (secs / 60, "minutes"),
        7200..=172_799 => (secs / 3600, "hours"),
        _ => (secs / 86_400, "days"),
    };
    format!("{n} {unit}")
}

/// What `ps` says of a VM's status, as Docker words it.
pub fn status_text(r: &Row) -> String {
    let t = now();
    match r.status {
        Status::Running => format!("Up {}", ago(t.saturating_sub(r.started.unwrap_or(t)))),
        Status::Created => "Created".into(),
        Status::Restarting => format!(
            "Restarting ({}) {} ago",
            r.exit_code.map_or("?".into(), |c| c.to_string()),
            ago(t.saturating_sub(r.finished.unwrap_or(t)))
        ),
        Status::Exited => match r.exit_code {
            Some(c) => format!(
                "Exited ({c}) {} ago",
                ago(t.saturating_sub(r.finished.unwrap_or(t)))
            ),
            None => "Exited (unknown: its supervisor vanished)".into(),
        },
    }
}

/// `hyperboot ps [-a] [--json]`.
pub fn ps(every: bool, json: bool) -> Result<(), VmsError> {
    let mut rows: Vec<Row> = all()
        .iter()
        .filter_map(|vm| row(vm).ok())
        .filter(|r| every || r.status != Status::Exited)
        .collect();
    rows.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string(&rows).expect("serializes"));
        return Ok(());
    }
    let _ = writeln!(
        out,
        "{:<12}  {:<16}  {:<12}  {:<40}  {:<24}  UPTIME",
        "ID", "NAME", "DIGEST", "STATUS", "PORTS"
    );
    for r in &rows {
        let digest = r.digest.trim_start_matches("sha256:");
        let uptime = match (r.status, r.started) {
            (Status::Running, Some(s)) => ago(now().saturating_sub(s)),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<12}  {:<16}  {:<12}  {:<40}  {:<24}  {uptime}",
            r.id,
            r.name.as_deref().unwrap_or("-"),
            &digest[..digest.len().min(12)],
            status_text(r),
            if r.ports.is_empty() {
                "-".to_string()
            } else {
                r.ports.join(",")
            },
        );
    }
    Ok(())
}

/// `hyperboot logs [-f] [--tail N] [--timestamps] VM`.
pub fn logs(
    what: &str,
    follow: bool,
    tail: Option<usize>,
    timestamps: bool,
) -> Result<(), VmsError> {
    let vm = find(what)?;
    let mut recs = logs::read_all(&vm.path);
    if let Some(n) = tail {
        recs.drain(..recs.len().saturating_sub(n));
    }
    let io = |e| VmsError::Io {
        what: "cannot write the logs of",
        path: vm.path.clone(),
        source: e,
    };
    logs::print(&recs, timestamps).map_err(io)?;
    if follow {
        let ended = || vm.current().map_or(true, |s| s.status == Status::Exited);
        logs::follow(&vm.path, timestamps, ended).map_err(io)?;
    }
    Ok(())
}

/// Sends one request to a VM's supervisor; its answer.
fn request(vm: &VmDir, line: &str) -> Result<String, VmsError> {
    let err = |e| VmsError::Control(vm.id.clone(), e);
    let mut s = UnixStream::connect(vm.file("control")).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    s.write_all(format!("{line}\n").as_bytes()).map_err(err)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).map_err(err)?;
    Ok(answer.trim().to_string())
}

/// Waits until the VM has exited (or `limit` passed); its state then.
fn wait_exited(vm: &VmDir, limit: Option<Duration>) -> Result<State, VmsError> {
    let until = limit.map(|l| Instant::now() + l);
    loop {
        let s = vm.current()?;
        if s.status == Status::Exited || until.is_some_and(|u| Instant::now() >= u) {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `hyperboot stop [-t SECS] VM`: the image's StopSignal to the app, and
/// after SECS the VM is ended. Prints what it stopped.
pub fn stop(what: &str, secs: f64) -> Result<State, VmsError> {
    let vm = find(what)?;
    if vm.current()?.status != Status::Exited {
        match request(&vm, &format!("stop {secs}")) {
            Ok(_) => {}
            Err(e) => {
                // A supervisor that no longer answers is asked with a signal.
                let s = vm.current()?;
                if s.status == Status::Exited {
                    println!("{what}");
                    return Ok(s);
                }
                kill_supervisor(&s, rustix::process::Signal::TERM);
                tracing::debug!("{}", crate::error_chain(&e));
            }
        }
    }
    let s = wait_exited(
        &vm,
        Some(Duration::from_secs_f64(secs) + Duration::from_secs(15)),
    )?;
    if s.status != Status::Exited {
        kill_supervisor(&s, rustix::process::Signal::KILL);
    }
    println!("{what}");
    wait_exited(&vm, Some(Duration::from_secs(5)))
}

fn kill_supervisor(s: &State, sig: rustix::process::Signal) {
    // Only the process this record names, not a later one with its pid.
    if super::process_start(s.pid) == Some(s.pid_start) {
        if let Some(pid) = rustix::process::Pid::from_raw(s.pid as i32) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }
}

/// `hyperboot kill [-s SIG] VM`: SIG to the app (default SIGKILL).
pub fn kill(what: &str, sig: i32) -> Result<(), VmsError> {
    let vm = find(what)?;
    if vm.current()?.status != Status::Running {
        return Err(VmsError::Start(format!("{what} is not running")));
    }
    match request(&vm, &format!("signal {sig}"))?.as_str() {
        "ok" => {
            println!("{what}");
            Ok(())
        }
        other => Err(VmsError::Start(format!("{what}: {other}"))),
    }
}

/// `hyperboot wait VM`: the exit code once it has exited; None when its
/// supervisor vanished without saying.
pub fn wait(what: &str) -> Result<Option<u8>, VmsError> {
    let vm = find(what)?;
    Ok(wait_exited(&vm, None)?.exit_code)
}

/// `hyperboot rm [-f] VM`.
pub fn rm(what: &str, force: bool) -> Result<(), VmsError> {
    let vm = find(what)?;
    let s = vm.current()?;
    if s.status != Status::Exited {
        if !force {
            return Err(VmsError::Running(what.to_string()));
        }
        kill_supervisor(&s, rustix::process::Signal::KILL);
        wait_exited(&vm, Some(Duration::from_secs(10)))?;
    }
    let _lock = vm.lock()?;
    remove(&vm)?;
    println!("{what}");
    Ok(())
}
