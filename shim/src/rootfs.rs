//! The container's root filesystem as an artifact. containerd hands the
//! shim its snapshotter's mounts: with the overlay snapshotter, an overlay
//! whose lower directories are committed snapshots (the image's layers,
//! which never change) and whose upper directory is the container's own.
//! The lower layers are flattened into an EROFS with the kernel and init
//! (hyperbuild's directory source) and the artifact is cached, keyed by
//! the layers' identities, so the second container of an image boots
//! without a build. The snapshot's own directory (its upper `fs/` and
//! `work/`) becomes hyperboot's `--upper`: the guest's overlay writes
//! there, in overlayfs' form, so containerd sees the container's changes
//! and a restarted task finds them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why the rootfs could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("rootfs mount {0:?}: only overlay and bind mounts of directories are supported")]
    Unsupported(String),
    #[error("rootfs: more than one mount ({0}); expected one overlay or bind mount")]
    Several(usize),
    #[error("rootfs: overlay mount without lowerdir")]
    NoLower,
    #[error("rootfs: {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rootfs: cannot build the artifact: {0:#}")]
    Build(anyhow::Error),
}

/// One mount as containerd describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The directories a rootfs is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layers {
    /// Read-only layers, lowest first: cached by identity.
    pub lower: Vec<PathBuf>,
    /// A writable directory with content already in it (the top layer of
    /// this container alone): built in, never cached. Only where the
    /// container's writes cannot go to `upper`.
    pub writable: Option<PathBuf>,
    /// The container's overlay snapshot directory, holding the upper layer
    /// `fs/` and overlayfs' `work/` (containerd's layout): the guest's
    /// overlay writes there (hyperboot `--upper`).
    pub upper: Option<PathBuf>,
}

/// Reads the snapshotter's mounts; `bundle_rootfs` is used when there are
/// none (containerd mounted the root itself).
pub fn layers(mounts: &[Mount], bundle_rootfs: &Path) -> Result<Layers, RootfsError> {
    let m = match mounts {
        [] => {
            return Ok(Layers {
                lower: Vec::new(),
                writable: Some(bundle_rootfs.to_owned()),
                upper: None,
            })
        }
        [m] => m,
        more => return Err(RootfsError::Several(more.len())),
    };
    let opt = |key: &str| {
        m.options
            .iter()
            .find_map(|o| o.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    };
    match m.kind.as_str() {
        "overlay" => {
            // overlayfs lists lowerdir top first.
            let mut lower: Vec<PathBuf> = opt("lowerdir")
                .ok_or(RootfsError::NoLower)?
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect();
            lower.reverse();
            match snapshot_dir(opt("upperdir"), opt("workdir")) {
                Some(dir) => match keeps_user_xattrs(&dir.join(hyper_contract::WORK_DIR)) {
                    Ok(()) => {
                        return Ok(Layers {
                            lower,
                            writable: None,
                            upper: Some(dir),
                        })
                    }
                    Err(e) => log::warn!(
                        "{}: no user.* extended attributes there ({e}; tmpfs has them from Linux 6.6): the container's writes stay in its VM",
                        dir.display()
                    ),
                },
                None => log::info!("rootfs: not containerd's overlay layout: the container's writes stay in its VM"),
            }
            // What the upper holds is built in, and the container's writes
            // stay in the VM.
            let writable = match opt("upperdir") {
                Some(upper) if !is_empty_dir(Path::new(upper))? => Some(PathBuf::from(upper)),
                _ => None,
            };
            Ok(Layers {
                lower,
                writable,
                upper: None,
            })
        }
        "bind" | "rbind" => {
            let ro = m.options.iter().any(|o| o == "ro");
            let dir = PathBuf::from(&m.source);
            Ok(if ro {
                Layers {
                    lower: vec![dir],
                    writable: None,
                    upper: None,
                }
            } else {
                Layers {
                    lower: Vec::new(),
                    writable: Some(dir),
                    upper: None,
                }
            })
        }
        other => Err(RootfsError::Unsupported(other.to_string())),
    }
}

/// Whether `dir`'s filesystem keeps `user.` attributes, which the guest's
/// overlayfs marks opaque directories with (hyperboot refuses `--upper`
/// without them).
fn keeps_user_xattrs(dir: &Path) -> std::io::Result<()> {
    const PROBE: &str = "user.hyper.probe";
    rustix::fs::setxattr(dir, PROBE, b"1", rustix::fs::XattrFlags::empty())?;
    let _ = rustix::fs::removexattr(dir, PROBE);
    Ok(())
}

/// The directory holding an overlay's upper and work directories when they
/// are its `fs/` and `work/`, as containerd's overlay snapshotter makes them.
fn snapshot_dir(upper: Option<&str>, work: Option<&str>) -> Option<PathBuf> {
    let (upper, work) = (Path::new(upper?), Path::new(work?));
    let dir = upper.parent()?;
    (upper.file_name()? == hyper_contract::UPPER_DIR && work == dir.join(hyper_contract::WORK_DIR))
        .then(|| dir.to_owned())
}

fn is_empty_dir(p: &Path) -> Result<bool, RootfsError> {
    let io = |source| RootfsError::Io {
        path: p.to_owned(),
        source,
    };
    Ok(std::fs::read_dir(p).map_err(io)?.next().is_none())
}

/// What an artifact is built from besides the layers.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub kernel: PathBuf,
    pub init: PathBuf,
    /// Where cached artifacts are kept.
    pub cache: PathBuf,
}

/// The artifact for `layers`: from the cache, or built (into the cache when
/// every layer is read-only, else to `scratch`). Returns the path and
/// whether it was built now.
pub fn artifact(
    layers: &Layers,
    inputs: &Inputs,
    scratch: &Path,
) -> Result<(PathBuf, bool), RootfsError> {
    let key = key(layers, inputs)?;
    let cached = layers.writable.is_none();
    let out = if cached {
        inputs.cache.join(format!("{key}.hvm"))
    } else {
        scratch.join("rootfs.hvm")
    };
    if cached && out.is_file() {
        return Ok((out, false));
    }
    let dir = out.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir).map_err(|source| RootfsError::Io {
        path: dir.to_owned(),
        source,
    })?;
    // Built beside its name and renamed: two containers of one image
    // starting at once both build, and the cache holds one whole file.
    let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
    let mut all = layers.lower.clone();
    all.extend(layers.writable.clone());
    let built = hyperbuild::build::build_from_dirs(&hyperbuild::build::DirBuildOptions {
        layers: all,
        reference: "containerd-snapshots".into(),
        digest: format!("sha256:{key}"),
        output: tmp.clone(),
        kernel: inputs.kernel.clone(),
        init: inputs.init.clone(),
        compression: hyperbuild::spool::Compression::Lz4,
    });
    if let Err(e) = built {
        let _ = std::fs::remove_file(&tmp);
        return Err(RootfsError::Build(e));
    }
    std::fs::rename(&tmp, &out).map_err(|source| RootfsError::Io {
        path: out.clone(),
        source,
    })?;
    if cached {
        // What the sweep checks: the layers, and the kernel and init.
        let current = inputs_stamp(inputs)?;
        let record = serde_json::json!({"layers": layers.lower, "inputs": current});
        let _ = std::fs::write(out.with_extension("json"), record.to_string());
        let removed = sweep(&inputs.cache, &current);
        if removed > 0 {
            log::info!("artifact cache: removed {removed} artifacts no container can use again");
        }
    }
    Ok((out, true))
}

/// The kernel's and init's identities, as they enter every key.
fn inputs_stamp(inputs: &Inputs) -> Result<String, RootfsError> {
    let mut h = Sha256::new();
    for p in [&inputs.kernel, &inputs.init] {
        stamp_into(&mut h, p)?;
    }
    Ok(hex::encode(h.finalize()))
}

/// Removes the cached artifacts no container can be given again: those
/// whose layer directories are gone (containerd removed the image's
/// snapshots), those built with another kernel or init than `current`,
/// those without a record (an older shim's), and builds left half done an
/// hour ago. Returns how many artifacts went.
pub fn sweep(cache: &Path, current: &str) -> usize {
    let mut removed = 0;
    let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for e in std::fs::read_dir(cache).into_iter().flatten().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < an_hour_ago);
            if old {
                let _ = std::fs::remove_file(&p);
            }
            continue;
        }
        if p.extension().and_then(|x| x.to_str()) != Some("hvm") {
            continue;
        }
        let record: Option<serde_json::Value> = std::fs::read(p.with_extension("json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let usable = record.is_some_and(|r| {
            r["inputs"].as_str() == Some(current)
                && r["layers"].as_array().is_some_and(|ls| {
                    ls.iter()
                        .all(|l| l.as_str().is_some_and(|l| Path::new(l).is_dir()))
                })
        });
        if !usable && std::fs::remove_file(&p).is_ok() {
            let _ = std::fs::remove_file(p.with_extension("json"));
            removed += 1;
        }
    }
    removed
}

/// What identifies an artifact: hyperbuild's version, the kernel and init
/// files, and each layer directory (committed snapshots are never changed
/// in place; a new one is a new directory).
fn key(layers: &Layers, inputs: &Inputs) -> Result<String, RootfsError> {
    let mut h = Sha256::new();
    h.update(b"hyper-shim-rootfs-v1\0");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    for p in [&inputs.kernel, &inputs.init]
        .into_iter()
        .chain(&layers.lower)
        .chain(&layers.writable)
    {
        stamp_into(&mut h, p)?;
    }
    Ok(hex::encode(h.finalize()))
}

/// A file's or directory's identity: path, device, inode, size, change time.
fn stamp_into(h: &mut Sha256, p: &Path) -> Result<(), RootfsError> {
    let md = std::fs::metadata(p).map_err(|source| RootfsError::Io {
        path: p.to_owned(),
        source,
    })?;
    h.update(p.as_os_str().as_encoded_bytes());
    h.update([0]);
    for v in [
        md.dev(),
        md.ino(),
        md.size(),
        md.ctime() as u64,
        md.ctime_nsec() as u64,
    ] {
        h.update(v.to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(options: &[&str]) -> Mount {
        Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn overlay_lower_layers_come_lowest_first() {
        let upper = tempfile::tempdir().unwrap();
        let up = format!("upperdir={}", upper.path().display());
        let l = layers(
            &[overlay(&[
                "index=off",
                "workdir=/w",
                &up,
                "lowerdir=/s/3/fs:/s/2/fs:/s/1/fs",
            ])],
            Path::new("/bundle/rootfs"),
        )
        .unwrap();
        assert_eq!(
            l.lower,
            ["/s/1/fs", "/s/2/fs", "/s/3/fs"].map(PathBuf::from)
        );
        assert_eq!(l.writable, None, "an empty upper directory adds nothing");
        assert_eq!(l.upper, None, "not containerd's fs/ and work/");
        std::fs::write(upper.path().join("f"), b"x").unwrap();
        let l = layers(&[overlay(&[&up, "lowerdir=/s/1/fs"])], Path::new("/b")).unwrap();
        assert_eq!(l.writable.as_deref(), Some(upper.path()));
    }

    #[test]
    fn containerds_snapshot_directory_takes_the_writes() {
        let snap = tempfile::tempdir().unwrap();
        let d = snap.path();
        std::fs::create_dir(d.join("fs")).unwrap();
        std::fs::create_dir(d.join("work")).unwrap();
        std::fs::write(d.join("fs/kept"), b"from the last run").unwrap();
        let up = format!("upperdir={}", d.join("fs").display());
        let work = format!("workdir={}", d.join("work").display());
        let l = layers(
            &[overlay(&[
                "index=off",
                &work,
                &up,
                "lowerdir=/s/2/fs:/s/1/fs",
            ])],
            Path::new("/b"),
        )
        .unwrap();
        assert_eq!(l.upper.as_deref(), Some(d));
        assert_eq!(l.writable, None, "the upper is shared, not built in");
        // Other names: the upper's content is built in.
        let other = format!("workdir={}", d.join("elsewhere").display());
        let l = layers(
            &[overlay(&[&other, &up, "lowerdir=/s/1/fs"])],
            Path::new("/b"),
        )
        .unwrap();
        assert_eq!(l.upper, None);
        assert_eq!(l.writable.as_deref(), Some(d.join("fs").as_path()));
    }

    #[test]
    fn the_sweep_keeps_only_artifacts_a_container_can_be_given() {
        let cache = tempfile::tempdir().unwrap();
        let layer = tempfile::tempdir().unwrap();
        let c = cache.path();
        let put = |name: &str, layers: &[&Path], inputs: &str| {
            std::fs::write(c.join(format!("{name}.hvm")), b"artifact").unwrap();
            let r = serde_json::json!({"layers": layers, "inputs": inputs});
            std::fs::write(c.join(format!("{name}.json")), r.to_string()).unwrap();
        };
        put("live", &[layer.path()], "now");
        put(
            "image-removed",
            &[layer.path(), Path::new("/no/such/layer")],
            "now",
        );
        put("old-kernel", &[layer.path()], "before");
        std::fs::write(c.join("unrecorded.hvm"), b"artifact").unwrap();
        std::fs::write(c.join(".building.7.tmp"), b"half").unwrap();
        assert_eq!(sweep(c, "now"), 3);
        let mut left: Vec<String> = std::fs::read_dir(c)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [".building.7.tmp", "live.hvm", "live.json"],
            "a build of this hour stays"
        );
    }

    #[test]
    fn other_mounts_are_refused() {
        let m = Mount {
            kind: "btrfs".into(),
            source: "/dev/sda".into(),
            options: vec![],
        };
        let e = layers(&[m], Path::new("/b")).unwrap_err();
        assert!(e.to_string().contains("\"btrfs\""), "{e}");
        assert!(matches!(
            layers(&[overlay(&["upperdir=/u"])], Path::new("/b")),
            Err(RootfsError::NoLower)
        ));
    }
}
