//! Detached VMs (`hyperboot -d`, `ps`, `logs`, `stop`, `kill`, `wait`,
//! `rm`, `--restart`) on both backends: each test has a state directory of
//! its own (`HYPER_STATE_DIR`).

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hyper_tests::*;

/// Every scenario of this file, as a test on `$backend`.
macro_rules! detached_scenarios {
    ($backend:expr) => {
        scenarios!($backend; detached:
            a_detached_server_is_listed_logged_stopped_and_removed,
            names_are_unique_and_unknown_vms_are_clear_errors,
            logs_follow_until_the_vm_exits_and_kill_signals_the_app,
            a_killed_supervisor_leaves_no_vm_and_shows_as_exited,
            on_failure_restarts_as_often_as_asked_then_stops,
            a_restart_boots_only_the_artifact_the_vm_was_created_with,
        );
    };
}

/// hyperboot with a state directory of its own.
pub struct Host {
    pub state: tempfile::TempDir,
    pub backend: Backend,
}

impl Host {
    pub fn new(backend: Backend) -> Host {
        Host {
            state: tempfile::tempdir().unwrap(),
            backend,
        }
    }

    /// `hyperboot ARGS` (management commands).
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = hyperboot();
        c.env("HYPER_STATE_DIR", self.state.path()).args(args);
        c
    }

    /// `hyperboot -d --backend B FLAGS ARTIFACT -- CMD`; the ID.
    pub fn detach(&self, flags: &[&str], artifact: &std::path::Path, cmd: &[&str]) -> String {
        let o = self
            .cmd(&["-d", "--backend", self.backend.name()])
            .args(flags)
            .arg(artifact)
            .args(if cmd.is_empty() { &[][..] } else { &["--"][..] })
            .args(cmd)
            .output()
            .unwrap();
        let id = ok(&o);
        assert!(
            id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "not an ID: {id:?}"
        );
        id
    }

    /// What a VM's supervisor and app said, for a failure's message.
    pub fn said(&self, id: &str) -> String {
        let dir = self.state.path().join(id);
        ["hyperboot.log", "stdout.log", "stderr.log"]
            .iter()
            .map(|f| {
                format!(
                    "{f}: {}\n",
                    std::fs::read_to_string(dir.join(f)).unwrap_or_default()
                )
            })
            .collect()
    }

    /// `ps -a --json`.
    pub fn ps(&self) -> Vec<serde_json::Value> {
        let o = self.cmd(&["ps", "-a", "--json"]).output().unwrap();
        serde_json::from_str::<serde_json::Value>(&ok(&o))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// The `ps` entry of `vm`.
    pub fn entry(&self, vm: &str) -> serde_json::Value {
        self.ps()
            .into_iter()
            .find(|e| e["id"] == vm || e["name"] == vm)
            .unwrap_or_else(|| panic!("{vm} not listed"))
    }

    /// Waits until `vm`'s status is `status`.
    pub fn until(&self, vm: &str, status: &str, secs: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let e = self.entry(vm);
            if e["status"] == status {
                return e;
            }
            assert!(Instant::now() < deadline, "{vm} never {status}: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The trimmed stdout of a successful command.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// One HTTP/1.0 GET's whole answer.
fn get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    Ok(r)
}

/// nginx detached with -p: it answers, its access line is in `logs`, `stop`
/// ends it gracefully (StopSignal SIGQUIT, exit 0), `ps -a` shows it exited,
/// `rm` removes it.
pub fn a_detached_server_is_listed_logged_stopped_and_removed(b: Backend) {
    let h = Host::new(b);
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:80");
    let id = h.detach(
        &["--name", "web", "-p", &publish],
        &crate::scenarios::net::app_artifact("nginx"),
        &[],
    );
    let e = h.entry("web");
    assert_eq!(
        (e["id"].as_str(), e["status"].as_str()),
        (Some(&id[..]), Some("running"))
    );
    assert_eq!(
        e["ports"],
        serde_json::json!([format!("127.0.0.1:{port}->80/tcp")])
    );
    let table = ok(&h.cmd(&["ps"]).output().unwrap());
    assert!(
        table.contains(&id) && table.contains("web") && table.contains("Up "),
        "{table}"
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    let page = loop {
        if let Ok(p) = get(port, "/from-the-test") {
            if p.contains("404") {
                break p;
            }
        }
        assert!(Instant::now() < deadline, "nginx never answered");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(page.starts_with("HTTP/1.1 404"), "{page}");
    // nginx logs each request on stdout (the image links access.log there).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = ok(&h.cmd(&["logs", "web"]).output().unwrap());
        if logs.contains("GET /from-the-test") {
            break;
        }
        assert!(Instant::now() < deadline, "no access line in: {logs}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        ok(&h.cmd(&["stop", "-t", "30", "web"]).output().unwrap()),
        "web"
    );
    let e = h.entry(&id);
    assert_eq!(
        (e["status"].as_str(), e["exit_code"].as_u64()),
        (Some("exited"), Some(0))
    );
    assert!(get(port, "/").is_err(), "the port is still published");
    let table = ok(&h.cmd(&["ps"]).output().unwrap());
    assert!(
        !table.contains(&id),
        "ps without -a lists an exited VM: {table}"
    );
    assert_eq!(ok(&h.cmd(&["wait", &id[..6]]).output().unwrap()), "0");
    assert_eq!(ok(&h.cmd(&["rm", "web"]).output().unwrap()), "web");
    assert!(h.ps().is_empty());
}

/// A name in use is refused; unknown names and IDs, and an ambiguous
/// prefix, are clear errors; a running VM is not removed without -f.
pub fn names_are_unique_and_unknown_vms_are_clear_errors(b: Backend) {
    let h = Host::new(b);
    let a = busybox_artifact();
    let id = h.detach(&["--name", "one"], a, &["sleep", "600"]);
    let o = h
        .cmd(&["-d", "--backend", b.name(), "--name", "one"])
        .arg(a)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("\"one\" is in use by VM") && err.contains(&id),
        "{err}"
    );
    assert_eq!(h.ps().len(), 1, "the refused VM left a record");
    for (args, want) in [
        (vec!["logs", "nosuch"], "no such VM: nosuch"),
        (vec!["stop", "abcdef123456"], "no such VM: abcdef123456"),
        (vec!["rm", "one"], "is running"),
        (vec!["kill", "-s", "NOPE", "one"], "NOPE"),
    ] {
        let o = h.cmd(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(125), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let o = h
        .cmd(&["-d", "--name", "bad/name"])
        .arg(a)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid name"));
    assert_eq!(ok(&h.cmd(&["rm", "-f", "one"]).output().unwrap()), "one");
    assert!(h.ps().is_empty());
}

/// `logs -f` prints as the app writes and returns when the VM exits;
/// stdout and stderr stay apart; `kill -s` signals the app; `wait` gives
/// its exit code.
pub fn logs_follow_until_the_vm_exits_and_kill_signals_the_app(b: Backend) {
    let h = Host::new(b);
    let id = h.detach(
        &[],
        busybox_artifact(),
        &[
            "sh",
            "-c",
            "trap 'echo got-usr1; exit 7' USR1; echo to-out; echo to-err >&2; \
             i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.5; done",
        ],
    );
    let follower = h
        .cmd(&["logs", "-f", &id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ok(&h.cmd(&["logs", &id]).output().unwrap()).contains("tick 3") {
        assert!(Instant::now() < deadline, "the app never ticked");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        ok(&h.cmd(&["kill", "-s", "USR1", &id]).output().unwrap()),
        id
    );
    let o = h.cmd(&["wait", &id]).output().unwrap();
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).trim()),
        (Some(7), "7")
    );
    let started = Instant::now();
    let f = follower.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "logs -f did not end"
    );
    let out = String::from_utf8_lossy(&f.stdout);
    assert!(
        out.starts_with("to-out\ntick 1\n") && out.ends_with("got-usr1\n"),
        "{out}"
    );
    assert_eq!(String::from_utf8_lossy(&f.stderr), "to-err\n");
    let tail = ok(&h.cmd(&["logs", "--tail", "1", "-t", &id]).output().unwrap());
    assert!(
        tail.ends_with("Z got-usr1") && tail.starts_with("20"),
        "{tail}"
    );
}

/// A supervisor killed outright takes its VM with it, and `ps` says the
/// VM exited with an unknown code.
pub fn a_killed_supervisor_leaves_no_vm_and_shows_as_exited(b: Backend) {
    let h = Host::new(b);
    let id = h.detach(&["--net", "user"], busybox_artifact(), &["sleep", "600"]);
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.state.path().join(&id).join("state.json")).unwrap(),
    )
    .unwrap();
    let pid = state["pid"].as_u64().unwrap() as i32;
    let helpers: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(") ")
                        .map(|(_, r)| r.split(' ').nth(1) == Some(&pid.to_string()))
                })
                .unwrap_or(false)
        })
        .collect();
    assert!(
        !helpers.is_empty(),
        "QEMU or passt is the supervisor's child"
    );
    // SAFETY: kill() takes no pointers.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let e = h.until(&id, "exited", 30);
    assert_eq!(e["exit_code"], serde_json::Value::Null);
    let table = ok(&h.cmd(&["ps", "-a"]).output().unwrap());
    assert!(table.contains("Exited (unknown"), "{table}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while helpers
        .iter()
        .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(
            Instant::now() < deadline,
            "the VM outlived its supervisor: {helpers:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ok(&h.cmd(&["rm", &id]).output().unwrap()), id);
}

/// `--restart on-failure:2`: a failing app runs three times, then the VM
/// stays exited with its code.
pub fn on_failure_restarts_as_often_as_asked_then_stops(b: Backend) {
    let h = Host::new(b);
    let id = h.detach(
        &["--restart", "on-failure:2"],
        busybox_artifact(),
        &["sh", "-c", "echo run; exit 3"],
    );
    let o = h.cmd(&["wait", &id]).output().unwrap();
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).trim()),
        (Some(3), "3")
    );
    let e = h.entry(&id);
    assert_eq!(e["restarts"], 2);
    let logs = ok(&h.cmd(&["logs", &id]).output().unwrap());
    assert_eq!(logs, "run\nrun\nrun");
    // --rm takes the record away at the end.
    let gone = h.detach(&["--rm"], busybox_artifact(), &["true"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while h.ps().iter().any(|e| e["id"] == gone.as_str()) {
        assert!(Instant::now() < deadline, "--rm left the record");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A detached VM boots, on every restart, the artifact it was created with
/// (the one whose signature was checked): when the file was replaced since
/// (a rebuild in place), the restart is refused, said in the VM's log, and
/// the VM stays exited instead of retrying.
pub fn a_restart_boots_only_the_artifact_the_vm_was_created_with(b: Backend) {
    let h = Host::new(b);
    let dir = tempfile::tempdir_in(scratch()).unwrap();
    let file = dir.path().join("app.hvm");
    std::fs::copy(busybox_artifact(), &file).unwrap();
    // The replacement is ready before the VM starts: its runs are quick.
    let new = dir.path().join("new.hvm");
    std::fs::copy(other_artifact(), &new).unwrap();
    let id = h.detach(
        &["--restart", "on-failure:3"],
        &file,
        &["sh", "-c", "echo run; sleep 4; exit 3"],
    );
    h.until(&id, "running", 120);
    // As hyperbuild writes: a new file renamed over the old one.
    std::fs::rename(&new, &file).unwrap();
    let o = h.cmd(&["wait", &id]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "125",
        "{}",
        h.said(&id)
    );
    let said = h.said(&id);
    assert!(
        said.contains("the artifact changed since it was checked"),
        "{said}"
    );
    // Every run before the replacement ran the app once; the refused one
    // ran nothing and was the last.
    let e = h.entry(&id);
    assert_eq!(e["status"], "exited", "{e}");
    let runs = e["restarts"].as_u64().unwrap();
    assert!((1..=3).contains(&runs), "{e}");
    let logs = ok(&h.cmd(&["logs", &id]).output().unwrap());
    assert_eq!(logs.lines().count() as u64, runs, "{logs}");
    assert!(logs.lines().all(|l| l == "run"), "{logs}");
}
