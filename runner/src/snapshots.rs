//! Pre-booted starts: the KVM backend keeps a snapshot of each artifact
//! booted to the snapshot point (contract 4: root mounted, nothing of the
//! run applied), so every start after the first on a host is a restore.
//!
//! A snapshot lives in `$HYPER_SNAPSHOT_CACHE`, else
//! `$XDG_CACHE_HOME/hyper/snapshots`, as `<key>.snap`, with `<key>.json`
//! saying what it is of. The key is SHA-256 over everything that makes two
//! machines differ at that point: the artifact's digest, this hyperboot's
//! version and the VMM's snapshot format, the host's CPU (vendor, family,
//! model, stepping, feature bits) and kernel release, guest memory, vCPUs,
//! the device set (console ports, network card, shares) and the kernel
//! command line. A snapshot is read only after its digest was checked (once;
//! then its file's identity is recorded as for artifacts, see
//! [`crate::verified`]); a corrupt, truncated or foreign one is refused with
//! a one-line notice and removed, and the boot is cold. One hyperboot at a
//! time makes a given snapshot (a `flock` on `<key>.lock`); the others boot
//! cold without making one.

use std::fs::File;
use std::path::PathBuf;

use hyper_vmm::snapshot::{self, Header, SnapshotError, State};
use sha2::{Digest, Sha256};

/// `--snapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// Restore the snapshot if there is one; else make one on this boot.
    #[default]
    Auto,
    /// Cold boots only.
    Off,
    /// Make a new snapshot on this boot, replacing any.
    Refresh,
    /// Restore a snapshot, or fail.
    Require,
}

/// Why `--snapshot require` (or `hyperboot prepare`) cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotsError {
    #[error("--snapshot require: {0}")]
    Required(String),
    #[error("cannot make the snapshot: {0}")]
    Make(String),
    #[error("the snapshot cache {0}")]
    Cache(String, #[source] std::io::Error),
}

pub fn dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HYPER_SNAPSHOT_CACHE") {
        return PathBuf::from(p);
    }
    hvm::cache_home().join("snapshots")
}

/// What a snapshot is of, in words (kept beside it) and as its key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Identity {
    pub artifact: String,
    pub hyperboot: String,
    pub format: u32,
    pub cpu: String,
    pub host_kernel: String,
    pub memory_mib: u64,
    pub cpus: u8,
    pub console_ports: Vec<&'static str>,
    pub net: bool,
    /// The NIC's MAC when it is not the default one (`--net redirect`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    pub shares: usize,
    /// The last share is `--upper`'s (tagged `upper`, not `volN`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub upper: bool,
    pub cmdline: String,
}

impl Identity {
    pub fn key(&self) -> [u8; 32] {
        let text = serde_json::to_vec(self).expect("an identity serializes");
        Sha256::digest(&text).into()
    }
}

/// The host CPU as the guest's CPUID and state depend on it.
pub fn cpu_signature() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        let (l0, l1, l7) = (__cpuid(0), __cpuid(1), __cpuid(7));
        let vendor: Vec<u8> = [l0.ebx, l0.edx, l0.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        format!(
            "{} {:08x} {:08x}{:08x} {:08x}{:08x}{:08x}",
            String::from_utf8_lossy(&vendor),
            l1.eax,
            l1.ecx,
            l1.edx & !(0xff << 24),
            l7.ebx,
            l7.ecx,
            l7.edx
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        String::new()
    }
}

pub fn host_kernel() -> String {
    let u = rustix::system::uname();
    u.release().to_string_lossy().into_owned()
}

fn paths(key: &[u8; 32]) -> (PathBuf, PathBuf, PathBuf) {
    let d = dir();
    let k = hex::encode(key);
    (
        d.join(format!("{k}.snap")),
        d.join(format!("{k}.json")),
        d.join(format!("{k}.lock")),
    )
}

/// A snapshot ready to restore: opened, of this key, its digest checked.
pub fn find(key: &[u8; 32]) -> Result<Option<(File, Header, State)>, SnapshotError> {
    let (snap, _, _) = paths(key);
    let file = match File::open(&snap) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SnapshotError::Io(e)),
    };
    let refuse = |e: SnapshotError| {
        // A bad snapshot is gone, so that this boot makes a good one.
        let _ = std::fs::remove_file(&snap);
        e
    };
    let (header, state) = snapshot::open(&file, key).map_err(refuse)?;
    let meta = file.metadata().map_err(SnapshotError::Io)?;
    if !crate::verified::seen(&header.digest, &meta) {
        snapshot::verify(&file, &header).map_err(refuse)?;
        crate::verified::record(&header.digest, &meta);
    }
    Ok(Some((file, header, state)))
}

/// A plan to make the snapshot of `id` on this boot, unless another
/// hyperboot is making it (then None: boot cold without one).
pub fn plan(
    id: &Identity,
    describe: &serde_json::Value,
    notify: bool,
) -> Result<Option<hyper_vmm::SnapshotPlan>, SnapshotsError> {
    let key = id.key();
    let d = dir();
    std::fs::create_dir_all(&d).map_err(|e| SnapshotsError::Cache(d.display().to_string(), e))?;
    let (snap, json, lock_path) = paths(&key);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| SnapshotsError::Cache(lock_path.display().to_string(), e))?;
    // `hyperboot prepare` waits its turn (then finds the snapshot made, or
    // makes it); a boot does not wait: it boots without making one.
    let how = if notify {
        rustix::fs::FlockOperation::LockExclusive
    } else {
        rustix::fs::FlockOperation::NonBlockingLockExclusive
    };
    if rustix::fs::flock(&lock, how).is_err() {
        tracing::debug!("another hyperboot is making this snapshot; booting without making one");
        return Ok(None);
    }
    if notify && snap.exists() {
        return Ok(None);
    }
    let tmp = d.join(format!(
        "{}.snap.{}.tmp",
        hex::encode(key),
        std::process::id()
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| SnapshotsError::Cache(tmp.display().to_string(), e))?;
    let describe = serde_json::to_vec_pretty(describe).expect("a description serializes");
    // Removes the temporary file unless it became the snapshot, also when
    // the guest never reaches the snapshot point (`done` dropped uncalled).
    let unkept = Unkept(tmp.clone());
    let done = move |result: Result<Header, SnapshotError>| {
        let _held = lock;
        let _unkept = unkept;
        match result {
            Ok(header) => {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444));
                let _ = std::fs::write(&json, &describe);
                match std::fs::rename(&tmp, &snap) {
                    Ok(()) => {
                        SAVED.store(true, std::sync::atomic::Ordering::SeqCst);
                        if let Ok(m) = std::fs::metadata(&snap) {
                            crate::verified::record(&header.digest, &m);
                        }
                        if notify {
                            tracing::info!("snapshot saved: {}", snap.display());
                        } else {
                            tracing::debug!("snapshot saved: {}", snap.display());
                        }
                    }
                    Err(e) => {
                        tracing::warn!("cannot keep the snapshot: {e}");
                    }
                }
            }
            Err(e) => {
                tracing::warn!("cannot make a snapshot: {e}; later boots are cold too");
            }
        }
    };
    Ok(Some(hyper_vmm::SnapshotPlan {
        key,
        file,
        done: Box::new(done),
        stop_after: notify,
    }))
}

static SAVED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process saved a snapshot (asked without a system call: the
/// supervising thread's filter allows no file lookups).
pub fn saved() -> bool {
    SAVED.load(std::sync::atomic::Ordering::SeqCst)
}

/// A temporary file removed when dropped (a no-op once renamed away).
struct Unkept(PathBuf);

impl Drop for Unkept {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What a boot does about snapshots.
#[derive(Debug)]
pub enum Choice {
    /// A cold boot that makes no snapshot.
    Cold,
    /// A cold boot that makes one (a start message after it).
    Make(hyper_vmm::SnapshotPlan),
    /// A cold boot with a start message, another hyperboot making the
    /// snapshot.
    ColdWaiting,
    /// Restore this one (at this path).
    Restore(File, Header, Box<State>, PathBuf),
    /// `hyperboot prepare`, and the snapshot exists already.
    Ready(PathBuf),
}

/// Decides from `--snapshot` (and `prepare`) and what the cache holds;
/// `why_not`: why this boot cannot use snapshots at all.
pub fn choose(
    opts: &crate::BootOptions,
    why_not: Option<&str>,
    id: &Identity,
    artifact: &hvm::Artifact,
) -> Result<Choice, SnapshotsError> {
    if let Some(why) = why_not {
        return match (opts.snapshot, opts.prepare) {
            (_, true) | (Mode::Require, _) => Err(SnapshotsError::Required(why.into())),
            (Mode::Refresh, _) => {
                tracing::warn!("--snapshot refresh: {why}; booting cold");
                Ok(Choice::Cold)
            }
            _ => Ok(Choice::Cold),
        };
    }
    if opts.snapshot == Mode::Off && !opts.prepare {
        return Ok(Choice::Cold);
    }
    let key = id.key();
    if opts.snapshot != Mode::Refresh {
        match find(&key) {
            Ok(Some(_)) if opts.prepare => return Ok(Choice::Ready(path_of(id))),
            Ok(Some((f, h, st))) => return Ok(Choice::Restore(f, h, Box::new(st), path_of(id))),
            Ok(None) if opts.snapshot == Mode::Require => {
                return Err(SnapshotsError::Required(
                    "no snapshot of this artifact with these options yet (hyperboot prepare ARTIFACT with the same options makes one)".into(),
                ))
            }
            Ok(None) => {}
            Err(e) if opts.snapshot == Mode::Require => {
                return Err(SnapshotsError::Required(format!("the snapshot is unusable: {e}")))
            }
            Err(e) => tracing::info!("the snapshot is unusable ({e}); booting cold and making a new one"),
        }
    }
    let mut describe = serde_json::to_value(id).expect("an identity serializes");
    describe["path"] = serde_json::json!(
        std::fs::canonicalize(&opts.artifact).unwrap_or_else(|_| opts.artifact.clone())
    );
    let _ = artifact;
    match plan(id, &describe, opts.prepare)? {
        Some(p) => Ok(Choice::Make(p)),
        // Another `hyperboot prepare` made it while this one waited.
        None if opts.prepare => Ok(Choice::Ready(path_of(id))),
        None => Ok(Choice::ColdWaiting),
    }
}

/// The start message's builder: the run configuration and fresh entropy
/// now; the wall clock when it is sent.
pub fn start_message(run: hyper_contract::RunConfig) -> Box<dyn FnOnce() -> Vec<u8> + Send> {
    use std::io::Read;
    let mut seed = [0u8; 64];
    let _ = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed));
    Box::new(move || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        hyper_contract::encode_start(&hyper_contract::Start {
            run,
            realtime_ns: now,
            entropy: hex::encode(seed),
        })
    })
}

/// Where the snapshot of `id` is (or would be).
pub fn path_of(id: &Identity) -> PathBuf {
    paths(&id.key()).0
}

fn size_of(p: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or((0, 0), |m| (m.len(), m.blocks() * 512))
}

/// `hyperboot cache ls`.
pub fn list() -> Result<(), SnapshotsError> {
    let art = hvm::cache_home().join("artifacts/sha256");
    println!("artifacts ({}):", art.display());
    for e in std::fs::read_dir(&art).into_iter().flatten().flatten() {
        let (len, _) = size_of(&e.path());
        println!("  sha256:{}  {len} bytes", e.file_name().to_string_lossy());
    }
    let d = dir();
    println!("snapshots ({}):", d.display());
    for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("snap") {
            continue;
        }
        let (len, on_disk) = size_of(&p);
        let what: serde_json::Value = std::fs::read(p.with_extension("json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        println!(
            "  {}  artifact {}  {} MiB, {} vCPU  {} bytes ({} on disk)",
            p.file_stem().unwrap_or_default().to_string_lossy(),
            what["artifact"].as_str().unwrap_or("?"),
            what["memory_mib"],
            what["cpus"],
            len,
            on_disk
        );
    }
    Ok(())
}

/// `hyperboot cache prune [--all]`: snapshots whose artifact is no longer
/// in the artifact cache nor a file any snapshot record names (all with
/// `--all`, fetched artifacts too), and leftovers of interrupted ones.
pub fn prune(all: bool) -> Result<(), SnapshotsError> {
    let d = dir();
    let mut removed = 0u64;
    for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
        let p = e.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let stale_tmp = name.ends_with(".tmp");
        let keep = !all && !stale_tmp && {
            let json = p.with_extension("json");
            let what: serde_json::Value = std::fs::read(&json)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            what["artifact"].as_str().is_some_and(|a| {
                hvm::cache_home()
                    .join("artifacts/sha256")
                    .join(a.trim_start_matches("sha256:"))
                    .exists()
                    || std::path::Path::new(what["path"].as_str().unwrap_or("")).exists()
            })
        };
        if !keep && (stale_tmp || name.ends_with(".snap") || name.ends_with(".json")) {
            let (len, _) = size_of(&p);
            if std::fs::remove_file(&p).is_ok() {
                removed += len;
            }
        }
    }
    if all {
        let art = hvm::cache_home().join("artifacts");
        if art.exists() {
            std::fs::remove_dir_all(&art)
                .map_err(|e| SnapshotsError::Cache(art.display().to_string(), e))?;
        }
    }
    println!("removed {removed} bytes");
    Ok(())
}
