//! Reading an image from an OCI image-layout directory: `index.json` →
//! manifest (through nested indexes, picking the platform) → config and layers.
//! Every blob is read through its digest: a blob whose sha256 does not match is
//! refused before its content is parsed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{0} is not an OCI image layout (no oci-layout file)")]
    NotLayout(PathBuf),
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("malformed {what} in {path}")]
    Json {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("malformed {what} in {path}: {reason}")]
    Malformed {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("blob {digest} in {layout} does not match its digest (corrupt or tampered)")]
    DigestMismatch { layout: PathBuf, digest: String },
    #[error("blob {digest}: unsupported or malformed digest")]
    BadDigest { digest: String },
    #[error("no image tagged {tag:?} in {layout} (tags there: {available})")]
    NoTag {
        layout: PathBuf,
        tag: String,
        available: String,
    },
    #[error("{layout} holds {count} images; name one with oci:{layout}:TAG", layout = .layout.display())]
    Ambiguous { layout: PathBuf, count: usize },
    #[error("no image for platform {platform} in the index")]
    NoPlatform { platform: String },
    #[error("unsupported media type {0}")]
    MediaType(String),
    #[error("the config lists {diff_ids} layer diff_ids but the manifest has {layers} layers")]
    LayerCount { diff_ids: usize, layers: usize },
}

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub platform: Option<PlatformSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    #[serde(default)]
    media_type: Option<String>,
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageManifest {
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// The image config blob (the parts the builder uses).
#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfigBlob {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub config: Option<RuntimeConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub exposed_ports: Option<std::collections::BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    pub stop_signal: Option<String>,
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub volumes: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression a layer media type names.
    pub fn from_media_type(mt: &str) -> Result<Self, OciError> {
        Ok(match mt {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd" => Compression::Zstd,
            other => return Err(OciError::MediaType(other.to_string())),
        })
    }
}

/// A layer to apply.
#[derive(Debug, Clone)]
pub struct Layer {
    pub path: PathBuf,
    /// A byte range of `path` (docker-archive members), else the whole file.
    pub range: Option<(u64, u64)>,
    pub digest: String,
    pub diff_id: Option<String>,
    pub compression: Compression,
    /// The blob's digest was already checked (blobs from the cache).
    pub verified: bool,
}

/// An image resolved from a layout, a registry or an archive.
#[derive(Debug, Clone)]
pub struct Image {
    pub manifest_digest: String,
    /// The image index (manifest list) it was picked from, if any.
    pub index_digest: Option<String>,
    pub config: ImageConfigBlob,
    pub layers: Vec<Layer>,
}

/// A parsed manifest document: an index or an image manifest.
#[derive(Debug, Clone)]
pub enum Manifest {
    Index(Vec<Descriptor>),
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// Parses an image manifest or image index (OCI or Docker schema 2).
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let json: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if json.get("schemaVersion").and_then(|v| v.as_i64()) == Some(1) {
        return Err("Docker schema 1 manifests are not supported".into());
    }
    if json.get("manifests").is_some() {
        let index: Index = serde_json::from_value(json).map_err(|e| e.to_string())?;
        if let Some(mt) = &index.media_type {
            if !matches!(
                mt.as_str(),
                "application/vnd.oci.image.index.v1+json"
                    | "application/vnd.docker.distribution.manifest.list.v2+json"
            ) {
                return Err(format!("unsupported media type {mt}"));
            }
        }
        return Ok(Manifest::Index(index.manifests));
    }
    let m: ImageManifest = serde_json::from_value(json).map_err(|e| e.to_string())?;
    if let Some(mt) = &m.media_type {
        if !matches!(
            mt.as_str(),
            "application/vnd.oci.image.manifest.v1+json"
                | "application/vnd.docker.distribution.manifest.v2+json"
        ) {
            return Err(format!("unsupported media type {mt}"));
        }
    }
    Ok(Manifest::Image {
        config: m.config,
        layers: m.layers,
    })
}

/// The index entry for `platform`.
pub fn pick_platform<'a>(
    entries: &'a [Descriptor],
    platform: &PlatformSpec,
) -> Result<&'a Descriptor, OciError> {
    entries
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| platform_matches(p, platform))
        })
        .ok_or_else(|| {
            let offered: Vec<String> = entries
                .iter()
                .filter_map(|d| d.platform.as_ref().map(platform_string))
                .collect();
            OciError::NoPlatform {
                platform: format!(
                    "{} (the index offers: {})",
                    platform_string(platform),
                    if offered.is_empty() {
                        "none".into()
                    } else {
                        offered.join(", ")
                    }
                ),
            }
        })
}

/// Parses the config blob and pairs layers with their diff_ids.
pub fn image_from(
    manifest_digest: String,
    index_digest: Option<String>,
    config_bytes: &[u8],
    layer_descs: &[Descriptor],
    locate: impl Fn(&Descriptor) -> Result<(PathBuf, bool), OciError>,
) -> Result<Image, OciError> {
    let config: ImageConfigBlob =
        serde_json::from_slice(config_bytes).map_err(|source| OciError::Json {
            what: "image config",
            path: PathBuf::from("(config blob)"),
            source,
        })?;
    let diff_ids = &config.rootfs.diff_ids;
    if !diff_ids.is_empty() && diff_ids.len() != layer_descs.len() {
        return Err(OciError::LayerCount {
            diff_ids: diff_ids.len(),
            layers: layer_descs.len(),
        });
    }
    let mut layers = Vec::new();
    for (i, l) in layer_descs.iter().enumerate() {
        let compression = Compression::from_media_type(&l.media_type)?;
        let (path, verified) = locate(l)?;
        layers.push(Layer {
            path,
            range: None,
            digest: l.digest.clone(),
            diff_id: diff_ids.get(i).cloned(),
            compression,
            verified,
        });
    }
    Ok(Image {
        manifest_digest,
        index_digest,
        config,
        layers,
    })
}

/// Opens `layout`, picks the image tagged `tag` (or the only one) for `platform`.
pub fn open(layout: &Path, tag: Option<&str>, platform: &PlatformSpec) -> Result<Image, OciError> {
    if !layout.join("oci-layout").is_file() {
        return Err(OciError::NotLayout(layout.to_owned()));
    }
    let index_path = layout.join("index.json");
    let index_bytes = fs::read(&index_path).map_err(|source| OciError::Io {
        path: index_path.clone(),
        source,
    })?;
    let index: Index = serde_json::from_slice(&index_bytes).map_err(|source| OciError::Json {
        what: "index",
        path: index_path.clone(),
        source,
    })?;
    let _ = index.media_type;
    let desc = pick_tag(layout, &index.manifests, tag)?;
    resolve(layout, desc, platform, 0)
}

fn pick_tag<'a>(
    layout: &Path,
    manifests: &'a [Descriptor],
    tag: Option<&str>,
) -> Result<&'a Descriptor, OciError> {
    const REF: &str = "org.opencontainers.image.ref.name";
    match tag {
        Some(tag) => manifests
            .iter()
            .find(|d| d.annotations.get(REF).map(String::as_str) == Some(tag))
            .ok_or_else(|| {
                let available: Vec<&str> = manifests
                    .iter()
                    .filter_map(|d| d.annotations.get(REF).map(String::as_str))
                    .collect();
                OciError::NoTag {
                    layout: layout.to_owned(),
                    tag: tag.into(),
                    available: if available.is_empty() {
                        "none".into()
                    } else {
                        available.join(", ")
                    },
                }
            }),
        None => match manifests {
            [only] => Ok(only),
            _ => manifests
                .iter()
                .find(|d| d.annotations.get(REF).map(String::as_str) == Some("latest"))
                .ok_or(OciError::Ambiguous {
                    layout: layout.to_owned(),
                    count: manifests.len(),
                }),
        },
    }
}

fn resolve(
    layout: &Path,
    desc: &Descriptor,
    platform: &PlatformSpec,
    depth: u32,
) -> Result<Image, OciError> {
    let bytes = read_blob(layout, &desc.digest)?;
    let path = blob_path(layout, &desc.digest)?;
    match parse_manifest(&bytes).map_err(|e| OciError::Malformed {
        what: "manifest",
        path: path.clone(),
        reason: e,
    })? {
        Manifest::Index(entries) => {
            if depth > 4 {
                return Err(OciError::MediaType("image index nested too deeply".into()));
            }
            let entry = pick_platform(&entries, platform)?;
            let mut image = resolve(layout, entry, platform, depth + 1)?;
            image
                .index_digest
                .get_or_insert_with(|| desc.digest.clone());
            Ok(image)
        }
        Manifest::Image { config, layers } => {
            let config_bytes = read_blob(layout, &config.digest)?;
            image_from(desc.digest.clone(), None, &config_bytes, &layers, |l| {
                Ok((blob_path(layout, &l.digest)?, false))
            })
        }
    }
}

fn platform_matches(p: &PlatformSpec, want: &PlatformSpec) -> bool {
    p.os == want.os
        && p.architecture == want.architecture
        && (want.variant.is_none() || p.variant == want.variant)
}

pub fn platform_string(p: &PlatformSpec) -> String {
    match &p.variant {
        Some(v) => format!("{}/{}/{}", p.os, p.architecture, v),
        None => format!("{}/{}", p.os, p.architecture),
    }
}

/// `blobs/sha256/<hex>` for a well-formed sha256 digest.
pub fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, OciError> {
    let bad = || OciError::BadDigest {
        digest: digest.to_string(),
    };
    let hex = digest.strip_prefix("sha256:").ok_or_else(bad)?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    Ok(layout.join("blobs/sha256").join(hex))
}

/// Reads a small blob (manifest, config) and checks its digest.
fn read_blob(layout: &Path, digest: &str) -> Result<Vec<u8>, OciError> {
    let path = blob_path(layout, digest)?;
    let bytes = fs::read(&path).map_err(|source| OciError::Io {
        path: path.clone(),
        source,
    })?;
    if format!("sha256:{}", hex::encode(Sha256::digest(&bytes))) != digest {
        return Err(OciError::DigestMismatch {
            layout: layout.to_owned(),
            digest: digest.to_string(),
        });
    }
    Ok(bytes)
}

/// Checks a (possibly large) blob file against its digest by streaming it.
pub fn verify_blob(layout: &Path, path: &Path, digest: &str) -> Result<(), OciError> {
    let mut f = fs::File::open(path).map_err(|source| OciError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(|source| OciError::Io {
        path: path.to_owned(),
        source,
    })?;
    if format!("sha256:{}", hex::encode(h.finalize())) != digest {
        return Err(OciError::DigestMismatch {
            layout: layout.to_owned(),
            digest: digest.to_string(),
        });
    }
    Ok(())
}
