//! Detached microVMs without a daemon (`hyperboot -d`, `ps`, `logs`, `stop`,
//! `kill`, `wait`, `rm`): each detached VM is supervised by a hyperboot
//! process of its own (in its own session, [`supervisor`]) and described by a
//! directory under the state root ([`root`]):
//!
//! | file | what | written by |
//! | --- | --- | --- |
//! | `spec.json` | the VM's options (the command line), artifact, digest, name, restart policy, creation time | the starting hyperboot, once |
//! | `state.json` | status, supervisor pid and start time, app start/finish, exit code, restarts | the supervisor, atomically (write and rename) |
//! | `stdout.log`, `stderr.log` | the app's streams, a timestamp per line, capped and rotated (`.1`) | the supervisor |
//! | `hyperboot.log` | the supervisor's own messages | the supervisor |
//! | `control` | a socket: `stop SECS`, `signal N` | served by the supervisor |
//! | `lock` | `flock`ed by whoever changes or removes the directory | everyone |
//!
//! Names live in `names/NAME`, a symlink to the ID, created atomically (a
//! name taken is refused). A VM whose supervisor vanished (killed, host
//! crash) shows as exited with an unknown code: its pid is gone, or now
//! belongs to another process (the start time differs).

pub mod commands;
pub mod logs;
pub mod supervisor;

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a detached-VM command failed.
#[derive(Debug, thiserror::Error)]
pub enum VmsError {
    #[error("no such VM: {0} (hyperboot ps -a lists them)")]
    NotFound(String),
    #[error("{0} matches more than one VM: give more of the ID")]
    Ambiguous(String),
    #[error("the name {name:?} is in use by VM {id}: choose another, or hyperboot rm {name}")]
    NameInUse { name: String, id: String },
    #[error(
        "invalid name {0:?}: letters, digits, '_', '.' and '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error("VM {0} is running: stop it first, or use rm -f")]
    Running(String),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the record of VM {0} is damaged")]
    Damaged(String, #[source] serde_json::Error),
    #[error("the VM's supervisor did not start: {0}")]
    Start(String),
    #[error("cannot reach the supervisor of VM {0}")]
    Control(String, #[source] std::io::Error),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VmsError + 'a {
    move |source| VmsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The state root: `$HYPER_STATE_DIR`, else `$XDG_RUNTIME_DIR/hyper`, else
/// `/run/hyper` for root and `/tmp/hyper-UID` for others.
pub fn root() -> PathBuf {
    if let Some(d) = std::env::var_os("HYPER_STATE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("hyper");
    }
    let uid = rustix::process::getuid();
    if uid.is_root() {
        PathBuf::from("/run/hyper")
    } else {
        PathBuf::from(format!("/tmp/hyper-{}", uid.as_raw()))
    }
}

/// `--restart`, as Docker's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    #[default]
    No,
    /// On a non-zero exit, at most this many times (None: without limit).
    OnFailure(Option<u32>),
    Always,
}

impl std::str::FromStr for Restart {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "no" => Ok(Restart::No),
            "always" => Ok(Restart::Always),
            "on-failure" => Ok(Restart::OnFailure(None)),
            _ => match s.strip_prefix("on-failure:").map(str::parse::<u32>) {
                Some(Ok(n)) => Ok(Restart::OnFailure(Some(n))),
                _ => Err(format!(
                    "--restart {s:?}: expected no, on-failure[:N] or always"
                )),
            },
        }
    }
}

/// What a detached VM is: written once when it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    /// The local artifact file (fetched first when given as a URL).
    pub artifact: PathBuf,
    /// `sha256:…`
    pub digest: String,
    /// hyperboot's arguments, as given (without `-d`, `--name`, `--rm`,
    /// `--restart`).
    pub args: Vec<String>,
    /// Published ports as `hyperboot ps` shows them.
    pub ports: Vec<String>,
    pub restart: Restart,
    pub remove: bool,
    /// Seconds since the epoch.
    pub created: u64,
}

/// Where a detached VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Created,
    Running,
    Restarting,
    Exited,
}

/// The supervisor's record of the VM: rewritten as things happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub status: Status,
    /// The supervisor's pid and its start time (clock ticks since boot, as
    /// /proc/PID/stat gives it), to tell it from a later process with the
    /// same pid.
    pub pid: u32,
    pub pid_start: u64,
    /// Seconds since the epoch.
    pub started: Option<u64>,
    pub finished: Option<u64>,
    pub exit_code: Option<u8>,
    pub restarts: u32,
    /// Set once a stop was asked for: no restart follows.
    #[serde(default)]
    pub stopped: bool,
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A live process's start time (clock ticks since boot); None when there is
/// no such process, or only its zombie.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    // After the command: the state (field 3), ..., starttime (field 22).
    if rest.starts_with('Z') || rest.starts_with('X') {
        return None;
    }
    rest.split(' ').nth(19)?.parse().ok()
}

/// Writes `value` as JSON to `path` atomically (a temp file renamed over it).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), VmsError> {
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io("cannot write", &tmp))?;
    f.write_all(&serde_json::to_vec_pretty(value).expect("serializes"))
        .map_err(io("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("cannot write", path))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path, id: &str) -> Result<T, VmsError> {
    let bytes = std::fs::read(path).map_err(io("cannot read", path))?;
    serde_json::from_slice(&bytes).map_err(|e| VmsError::Damaged(id.to_string(), e))
}

/// One detached VM's directory.
#[derive(Debug, Clone)]
pub struct VmDir {
    pub id: String,
    pub path: PathBuf,
}

impl VmDir {
    pub fn new(id: &str) -> VmDir {
        VmDir {
            id: id.to_string(),
            path: root().join(id),
        }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn spec(&self) -> Result<Spec, VmsError> {
        read_json(&self.file("spec.json"), &self.id)
    }

    pub fn state(&self) -> Result<State, VmsError> {
        read_json(&self.file("state.json"), &self.id)
    }

    pub fn set_state(&self, s: &State) -> Result<(), VmsError> {
        write_json(&self.file("state.json"), s)
    }

    /// The state as it is now: a record that says running but whose
    /// supervisor is gone is exited, with an unknown code.
    pub fn current(&self) -> Result<State, VmsError> {
        let mut s = self.state()?;
        if matches!(
            s.status,
            Status::Running | Status::Restarting | Status::Created
        ) && process_start(s.pid) != Some(s.pid_start)
        {
            s.status = Status::Exited;
            s.exit_code = None;
        }
        Ok(s)
    }

    /// Holds the directory's lock until dropped.
    pub fn lock(&self) -> Result<std::fs::File, VmsError> {
        let path = self.file("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io("cannot lock", &path))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
            VmsError::Io {
                what: "cannot lock",
                path,
                source: e.into(),
            }
        })?;
        Ok(f)
    }
}

/// A VM name Docker would take.
pub fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && n.len() <= 128
}

/// Every VM's directory, in no particular order.
pub fn all() -> Vec<VmDir> {
    let Ok(entries) = std::fs::read_dir(root()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.len() == 12 && name.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| VmDir::new(&name))
        })
        .collect()
}

/// The VM a user means: a name, a whole ID, or an ID's unique prefix.
pub fn find(what: &str) -> Result<VmDir, VmsError> {
    if let Ok(target) = std::fs::read_link(root().join("names").join(what)) {
        let id = target.to_string_lossy().into_owned();
        if root().join(&id).is_dir() {
            return Ok(VmDir::new(&id));
        }
    }
    if what.is_empty() || !what.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(VmsError::NotFound(what.to_string()));
    }
    let hits: Vec<VmDir> = all()
        .into_iter()
        .filter(|d| d.id.starts_with(what))
        .collect();
    match hits.len() {
        0 => Err(VmsError::NotFound(what.to_string())),
        1 => Ok(hits.into_iter().next().expect("one")),
        _ => Err(VmsError::Ambiguous(what.to_string())),
    }
}

/// Claims `name` for `id`; refused when another VM has it.
pub fn claim_name(name: &str, id: &str) -> Result<(), VmsError> {
    if !valid_name(name) {
        return Err(VmsError::BadName(name.to_string()));
    }
    let dir = root().join("names");
    std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
    let link = dir.join(name);
    match std::os::unix::fs::symlink(id, &link) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let owner = std::fs::read_link(&link)
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            // A name whose VM was removed behind our back is free again.
            if !owner.is_empty() && !root().join(&owner).is_dir() {
                let _ = std::fs::remove_file(&link);
                return claim_name(name, id);
            }
            Err(VmsError::NameInUse {
                name: name.to_string(),
                id: owner,
            })
        }
        Err(e) => Err(io("cannot create", &link)(e)),
    }
}

/// Removes a VM's directory and its name.
pub fn remove(vm: &VmDir) -> Result<(), VmsError> {
    if let Ok(Some(name)) = vm.spec().map(|s| s.name) {
        let link = root().join("names").join(&name);
        if std::fs::read_link(&link).is_ok_and(|t| t.as_os_str() == vm.id.as_str()) {
            let _ = std::fs::remove_file(&link);
        }
    }
    std::fs::remove_dir_all(&vm.path).map_err(io("cannot remove", &vm.path))
}

/// A new VM ID: 12 hex digits from the kernel's random source.
pub fn new_id() -> String {
    let mut b = [0u8; 6];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut b)
    });
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policies_and_names() {
        assert_eq!("no".parse::<Restart>(), Ok(Restart::No));
        assert_eq!(
            "on-failure:2".parse::<Restart>(),
            Ok(Restart::OnFailure(Some(2)))
        );
        assert_eq!(
            "on-failure".parse::<Restart>(),
            Ok(Restart::OnFailure(None))
        );
        assert_eq!("always".parse::<Restart>(), Ok(Restart::Always));
        assert!("sometimes".parse::<Restart>().is_err());
        assert!("on-failure:x".parse::<Restart>().is_err());
        for good in ["web", "web-1", "a.b_c", "9"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "-x", "a/b", "a b", ".."] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn our_own_start_time_is_read() {
        let me = std::process::id();
        assert!(process_start(me).is_some());
        assert_eq!(process_start(u32::MAX), None);
    }
}
