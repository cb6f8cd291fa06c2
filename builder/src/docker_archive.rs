//! Reading an image from a `docker save` archive (`docker-archive:PATH[:REF]`),
//! which may hold several images. Members are read in place, as byte ranges
//! of the archive; every layer's sha256 is checked against the config's
//! diff_ids before its content is used.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::oci::{Compression, Image, ImageConfigBlob, Layer};

/// Why an archive could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a docker-archive (no manifest.json)")]
    NoManifest(PathBuf),
    #[error("malformed {what} in {path}: {reason}")]
    Malformed {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} has no image {wanted:?} (it holds: {available})")]
    NoImage {
        path: PathBuf,
        wanted: String,
        available: String,
    },
    #[error("{path} holds {count} images; name one with docker-archive:{path}:REF (it holds: {available})", path = .path.display())]
    Ambiguous {
        path: PathBuf,
        count: usize,
        available: String,
    },
    #[error("{path}: member {member:?} is missing")]
    Missing { path: PathBuf, member: String },
    #[error("{path}: layer {member:?} does not match its diff_id {diff_id} (corrupt or tampered)")]
    Mismatch {
        path: PathBuf,
        member: String,
        diff_id: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Normalizes a tag as `docker save` records it (`busybox` → `busybox:latest`).
fn normalize(tag: &str) -> String {
    let tag = tag.strip_prefix("docker.io/").unwrap_or(tag);
    let tag = tag.strip_prefix("library/").unwrap_or(tag);
    let last = tag.rsplit('/').next().unwrap_or(tag);
    if last.contains(':') || tag.contains('@') {
        tag.to_string()
    } else {
        format!("{tag}:latest")
    }
}

fn normalize_member(name: &str) -> String {
    name.trim_start_matches("./").to_string()
}

/// Opens `path` and resolves the image tagged `wanted` (or the only one).
pub fn open(path: &Path, wanted: Option<&str>) -> Result<Image, ArchiveError> {
    let io_err = |source| ArchiveError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut archive = tar::Archive::new(file);
    let mut members: HashMap<String, (u64, u64)> = HashMap::new();
    let mut manifest_json = None;
    for e in archive.entries().map_err(io_err)? {
        let mut e = e.map_err(io_err)?;
        let name = normalize_member(&String::from_utf8_lossy(&e.path_bytes()));
        if name == "manifest.json" {
            let mut s = Vec::new();
            e.read_to_end(&mut s).map_err(io_err)?;
            manifest_json = Some(s);
        } else if e.header().entry_type().is_file() {
            members.insert(name, (e.raw_file_position(), e.size()));
        }
    }
    let manifest_json = manifest_json.ok_or_else(|| ArchiveError::NoManifest(path.to_owned()))?;
    let entries: Vec<Entry> =
        serde_json::from_slice(&manifest_json).map_err(|e| ArchiveError::Malformed {
            what: "manifest.json",
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let tags = |e: &Entry| e.repo_tags.clone().unwrap_or_default();
    let available = {
        let all: Vec<String> = entries.iter().flat_map(tags).collect();
        if all.is_empty() {
            "untagged images".to_string()
        } else {
            all.join(", ")
        }
    };
    let entry = match wanted {
        Some(w) => {
            let want = normalize(w);
            entries
                .iter()
                .find(|e| tags(e).iter().any(|t| normalize(t) == want))
                .ok_or_else(|| ArchiveError::NoImage {
                    path: path.to_owned(),
                    wanted: w.to_string(),
                    available: available.clone(),
                })?
        }
        None => match entries.as_slice() {
            [only] => only,
            _ => {
                return Err(ArchiveError::Ambiguous {
                    path: path.to_owned(),
                    count: entries.len(),
                    available,
                })
            }
        },
    };

    let mut f = File::open(path).map_err(io_err)?;
    let member = |name: &str| {
        members
            .get(&normalize_member(name))
            .copied()
            .ok_or_else(|| ArchiveError::Missing {
                path: path.to_owned(),
                member: name.to_string(),
            })
    };
    let (coff, clen) = member(&entry.config)?;
    let mut config_bytes = vec![0u8; clen as usize];
    f.seek(SeekFrom::Start(coff))
        .and_then(|_| f.read_exact(&mut config_bytes))
        .map_err(io_err)?;
    let config: ImageConfigBlob =
        serde_json::from_slice(&config_bytes).map_err(|e| ArchiveError::Malformed {
            what: "image config",
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let diff_ids = config.rootfs.diff_ids.clone();
    if diff_ids.len() != entry.layers.len() {
        return Err(ArchiveError::Malformed {
            what: "image config",
            path: path.to_owned(),
            reason: format!(
                "{} diff_ids for {} layers",
                diff_ids.len(),
                entry.layers.len()
            ),
        });
    }
    let mut layers = Vec::new();
    for (name, diff_id) in entry.layers.iter().zip(&diff_ids) {
        let (off, len) = member(name)?;
        let mut magic = [0u8; 2];
        f.seek(SeekFrom::Start(off))
            .and_then(|_| f.read_exact(&mut magic))
            .map_err(io_err)?;
        let compression = if magic == [0x1f, 0x8b] {
            Compression::Gzip
        } else {
            Compression::None
        };
        // Check the uncompressed content against the diff_id before anything uses it.
        f.seek(SeekFrom::Start(off)).map_err(io_err)?;
        let mut h = Sha256::new();
        let limited = (&mut f).take(len);
        let copied = match compression {
            Compression::Gzip => io::copy(&mut flate2::read::MultiGzDecoder::new(limited), &mut h),
            _ => io::copy(&mut io::BufReader::new(limited), &mut h),
        };
        let ok = copied.is_ok() && format!("sha256:{}", hex::encode(h.finalize())) == *diff_id;
        if !ok {
            return Err(ArchiveError::Mismatch {
                path: path.to_owned(),
                member: name.clone(),
                diff_id: diff_id.clone(),
            });
        }
        layers.push(Layer {
            path: path.to_owned(),
            range: Some((off, len)),
            digest: diff_id.clone(),
            diff_id: Some(diff_id.clone()),
            compression,
            verified: true,
        });
    }
    let id = format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes)));
    Ok(Image {
        manifest_digest: id,
        index_digest: None,
        config,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn tags_normalize_as_docker_save_writes_them() {
        assert_eq!(normalize("busybox"), "busybox:latest");
        assert_eq!(normalize("docker.io/library/busybox:1"), "busybox:1");
        assert_eq!(normalize("127.0.0.1:5000/app"), "127.0.0.1:5000/app:latest");
        assert_eq!(normalize("127.0.0.1:5000/app:v2"), "127.0.0.1:5000/app:v2");
    }
}
