//! Assembling an artifact: image → flattened tree → EROFS rootfs, fused with
//! the kernel and an initrd holding hyperinit, sealed.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use hvm::{ArtifactWriter, SectionKind, FLAG_REQUIRED};
use sha2::{Digest, Sha256};

use crate::oci::{self, Compression, PlatformSpec};
use crate::spool::Spool;
use crate::tree::Tree;
use crate::{elf, erofs, layer};

/// The kernel command line every artifact carries; the runner appends its own.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1";

/// Bad input: the user's image, kernel or init is at fault (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("image {reference}")]
    Image { reference: String, #[source] source: oci::OciError },
    #[error("image {reference}: layer {digest}")]
    Layer { reference: String, digest: String, #[source] source: layer::LayerError },
    #[error("image {reference}: layer {digest} does not match the diff_id {diff_id} in its config")]
    DiffId { reference: String, digest: String, diff_id: String },
    #[error("image {reference}: cannot decompress layer {digest}")]
    Decompress { reference: String, digest: String, #[source] source: io::Error },
    #[error("image {reference} is for {found}; only linux/amd64 guests are supported")]
    Architecture { reference: String, found: String },
    #[error("image {reference}: cannot write its filesystem")]
    Filesystem { reference: String, #[source] source: erofs::ErofsError },
    #[error("kernel {path}: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("init {path}: {reason}")]
    Init { path: PathBuf, reason: String },
    #[error("unknown image reference {0:?}: use oci:PATH[:TAG] (registries come later)")]
    Reference(String),
}

/// Where the image comes from.
#[derive(Debug, Clone)]
pub enum Source {
    OciLayout { path: PathBuf, tag: Option<String> },
}

impl Source {
    /// Parses `oci:PATH[:TAG]`.
    pub fn parse(reference: &str) -> Result<Self, InputError> {
        let Some(rest) = reference.strip_prefix("oci:") else {
            return Err(InputError::Reference(reference.to_string()));
        };
        let (path, tag) = match rest.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') && !p.is_empty() => (p, Some(t.to_string())),
            _ => (rest, None),
        };
        Ok(Source::OciLayout { path: PathBuf::from(path), tag })
    }
}

/// Everything a build needs.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub reference: String,
    pub output: PathBuf,
    pub kernel: PathBuf,
    pub init: PathBuf,
}

/// What a build produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    pub digest: String,
    pub path: PathBuf,
    pub size: u64,
    pub image_digest: String,
    pub rootfs_size: u64,
}

/// Builds the artifact. On any error nothing is left at `opts.output`.
pub fn build(opts: &BuildOptions) -> anyhow::Result<BuildReport> {
    let reference = opts.reference.clone();
    let Source::OciLayout { path: layout, tag } = Source::parse(&reference)?;
    let platform = PlatformSpec { os: "linux".into(), architecture: "amd64".into(), variant: None };
    let image = oci::open(&layout, tag.as_deref(), &platform)
        .map_err(|source| InputError::Image { reference: reference.clone(), source })?;
    if image.config.os != "linux" || image.config.architecture != "amd64" {
        let found = format!("{}/{}", image.config.os, image.config.architecture);
        return Err(InputError::Architecture { reference, found }.into());
    }
    let kernel = read_checked(&opts.kernel, |b| elf::pvh_entry(b).map(|_| ()), |path, reason| InputError::Kernel { path, reason })?;
    let kernel_version = elf::kernel_version(&kernel).unwrap_or_else(|| "unknown".into());
    let init = read_checked(&opts.init, elf::check_static, |path, reason| InputError::Init { path, reason })?;

    let mut tree = Tree::new();
    let mut spool = Spool::new()?;
    for (i, l) in image.layers.iter().enumerate() {
        apply_layer(&reference, &layout, l, &mut tree, &mut spool, i)?;
    }

    let mut w = ArtifactWriter::create(&opts.output)?;
    w.section_bytes(SectionKind::Kernel, FLAG_REQUIRED, &kernel)?;
    w.section_bytes(SectionKind::Initrd, FLAG_REQUIRED, &initrd(&init))?;
    let mut rootfs_size = 0;
    w.section(SectionKind::Rootfs, FLAG_REQUIRED, |out| {
        rootfs_size = erofs::write(&tree, &spool, out)?;
        Ok::<_, erofs::ErofsError>(())
    })?
    .map_err(|source| InputError::Filesystem { reference: reference.clone(), source })?;
    // The layout's path is a host path: record only what identifies the image.
    let recorded = match &tag {
        Some(t) => format!("oci-layout:{t}"),
        None => "oci-layout".to_string(),
    };
    let manifest = manifest(&recorded, &image, kernel_version, rootfs_size);
    w.section_bytes(SectionKind::Manifest, FLAG_REQUIRED, &manifest.to_canonical_json())?;
    let digest = w.finish()?;
    let size = std::fs::metadata(&opts.output)?.len();
    Ok(BuildReport {
        digest: hvm::digest_string(&digest),
        path: opts.output.clone(),
        size,
        image_digest: image.manifest_digest,
        rootfs_size,
    })
}

fn read_checked(
    path: &Path,
    check: impl Fn(&[u8]) -> Result<(), String>,
    err: impl Fn(PathBuf, String) -> InputError,
) -> Result<Vec<u8>, InputError> {
    let bytes = std::fs::read(path).map_err(|e| err(path.to_owned(), format!("cannot read it ({e})")))?;
    check(&bytes).map_err(|reason| err(path.to_owned(), reason))?;
    Ok(bytes)
}

fn apply_layer(
    reference: &str,
    layout: &Path,
    l: &oci::Layer,
    tree: &mut Tree,
    spool: &mut Spool,
    index: usize,
) -> Result<(), InputError> {
    let image_err = |source| InputError::Image { reference: reference.to_string(), source };
    oci::verify_blob(layout, &l.path, &l.digest).map_err(image_err)?;
    let file = File::open(&l.path)
        .map_err(|source| image_err(oci::OciError::Io { path: l.path.clone(), source }))?;
    let raw: Box<dyn Read> = match l.compression {
        Compression::None => Box::new(BufReader::new(file)),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, file))),
    };
    let mut hashed = HashingReader { inner: raw, hasher: Sha256::new(), error: None };
    let result = layer::apply(tree, spool, index, &mut hashed);
    if let Some(source) = hashed.error.take() {
        return Err(InputError::Decompress { reference: reference.into(), digest: l.digest.clone(), source });
    }
    result.map_err(|source| InputError::Layer { reference: reference.into(), digest: l.digest.clone(), source })?;
    // The tar reader stops at the end-of-archive marker; hash the rest too.
    io::copy(&mut hashed, &mut io::sink())
        .map_err(|source| InputError::Decompress { reference: reference.into(), digest: l.digest.clone(), source })?;
    if let Some(diff_id) = &l.diff_id {
        let got = format!("sha256:{}", hex::encode(hashed.hasher.finalize()));
        if &got != diff_id {
            return Err(InputError::DiffId { reference: reference.into(), digest: l.digest.clone(), diff_id: diff_id.clone() });
        }
    }
    Ok(())
}

/// Hashes what passes through; remembers the inner reader's own errors so a
/// decompression failure is not mistaken for a malformed tar.
struct HashingReader {
    inner: Box<dyn Read>,
    hasher: Sha256,
    error: Option<io::Error>,
}

impl Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.error = Some(e);
                Err(copy)
            }
        }
    }
}

/// The initrd: `/init` and the console node the kernel opens before running it.
pub fn initrd(init: &[u8]) -> Vec<u8> {
    let mut c = hvm::cpio::Cpio::new();
    c.dir("dev", 0o755);
    c.char_dev("dev/console", 0o600, 5, 1);
    c.dir("proc", 0o755);
    c.dir("sys", 0o755);
    c.dir("mnt", 0o755);
    c.file("init", 0o755, init);
    c.finish()
}

fn manifest(reference: &str, image: &oci::Image, kernel_version: String, rootfs_size: u64) -> hvm::Manifest {
    let rc = image.config.config.clone().unwrap_or_default();
    hvm::Manifest {
        image: hvm::ImageInfo {
            reference: reference.to_string(),
            digest: image.manifest_digest.clone(),
            platform: hvm::Platform {
                os: image.config.os.clone(),
                architecture: image.config.architecture.clone(),
                variant: image.config.variant.clone(),
            },
        },
        config: hvm::ImageConfig {
            entrypoint: rc.entrypoint,
            cmd: rc.cmd,
            env: rc.env.unwrap_or_default(),
            working_dir: rc.working_dir.unwrap_or_default(),
            user: rc.user.unwrap_or_default(),
            exposed_ports: rc.exposed_ports.unwrap_or_default().into_keys().collect(),
            stop_signal: rc.stop_signal.unwrap_or_default(),
            labels: rc.labels.unwrap_or_default(),
            volumes: rc.volumes.unwrap_or_default().into_keys().collect(),
        },
        kernel: hvm::KernelInfo { version: kernel_version, cmdline: BASE_CMDLINE.to_string() },
        rootfs: hvm::RootfsInfo { fs_type: "erofs".into(), size: rootfs_size },
        builder: hvm::BuilderInfo { name: "hyperbuild".into(), version: env!("CARGO_PKG_VERSION").into() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_oci_references() {
        let Source::OciLayout { path, tag } = Source::parse("oci:./img:v1").unwrap();
        assert_eq!((path, tag), (PathBuf::from("./img"), Some("v1".into())));
        let Source::OciLayout { path, tag } = Source::parse("oci:/a/b").unwrap();
        assert_eq!((path, tag), (PathBuf::from("/a/b"), None));
        assert!(Source::parse("nginx:latest").is_err());
    }
}
