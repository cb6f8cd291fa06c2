//! Assembling an artifact: image → flattened tree → EROFS rootfs, fused with
//! the kernel and an initrd holding hyperinit, sealed.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use hvm::{ArtifactWriter, SectionKind, FLAG_REQUIRED};
use sha2::{Digest, Sha256};

use crate::layer_cache::LayerCache;
use crate::oci::{self, Compression};
use crate::spool::Spool;
use crate::tree::Tree;
use crate::{elf, erofs, layer};

/// The kernel command line every artifact carries; the runner appends its own.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1";

/// Bad input: the user's image, kernel or init is at fault (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("image {reference}")]
    Image {
        reference: String,
        #[source]
        source: oci::OciError,
    },
    #[error("image {reference}: layer {digest}")]
    Layer {
        reference: String,
        digest: String,
        #[source]
        source: layer::LayerError,
    },
    #[error(
        "image {reference}: layer {digest} does not match the diff_id {diff_id} in its config"
    )]
    DiffId {
        reference: String,
        digest: String,
        diff_id: String,
    },
    #[error("image {reference}: cannot decompress layer {digest}")]
    Decompress {
        reference: String,
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("image {reference} is for {found}; only linux/amd64 guests are supported")]
    Architecture { reference: String, found: String },
    #[error("image {reference}: cannot write its filesystem")]
    Filesystem {
        reference: String,
        #[source]
        source: erofs::ErofsError,
    },
    #[error("kernel {path}: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("init {path}: {reason}")]
    Init { path: PathBuf, reason: String },
    #[error("unknown image reference {0:?}")]
    Reference(String),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error("image {reference}")]
    Archive {
        reference: String,
        #[source]
        source: crate::docker_archive::ArchiveError,
    },
    #[error("the blob cache")]
    Cache(#[source] crate::cache::CacheError),
}

/// Where the image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `oci:PATH[:TAG]`: an OCI image layout directory.
    OciLayout { path: PathBuf, tag: Option<String> },
    /// `docker-archive:PATH[:REF]`: the output of `docker save`.
    DockerArchive {
        path: PathBuf,
        reference: Option<String>,
    },
    /// Anything else: a registry reference as `docker pull` takes it.
    Registry(String),
}

impl Source {
    /// Parses what the user typed.
    pub fn parse(reference: &str) -> Result<Self, InputError> {
        if let Some(rest) = reference.strip_prefix("oci:") {
            let (path, tag) = match rest.rsplit_once(':') {
                Some((p, t)) if !t.contains('/') && !p.is_empty() => (p, Some(t.to_string())),
                _ => (rest, None),
            };
            return Ok(Source::OciLayout {
                path: PathBuf::from(path),
                tag,
            });
        }
        if let Some(rest) = reference.strip_prefix("docker-archive:") {
            let (path, r) = match rest.split_once(':') {
                Some((p, r)) if !r.is_empty() => (p, Some(r.to_string())),
                _ => (rest, None),
            };
            return Ok(Source::DockerArchive {
                path: PathBuf::from(path),
                reference: r,
            });
        }
        if reference.is_empty() || reference.contains(char::is_whitespace) {
            return Err(InputError::Reference(reference.to_string()));
        }
        Ok(Source::Registry(reference.to_string()))
    }

    /// What the artifact's manifest records: no host paths, so the same image
    /// gives the same artifact wherever its files were.
    pub fn recorded(&self) -> String {
        match self {
            Source::OciLayout { tag: Some(t), .. } => format!("oci-layout:{t}"),
            Source::OciLayout { tag: None, .. } => "oci-layout".into(),
            Source::DockerArchive {
                reference: Some(r), ..
            } => format!("docker-archive:{r}"),
            Source::DockerArchive {
                reference: None, ..
            } => "docker-archive".into(),
            Source::Registry(r) => r.clone(),
        }
    }
}

/// Where the artifact goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A local file (replaced if it exists, like `cp`).
    Path(PathBuf),
    /// Object storage or `file://`: streamed, atomic, immutable unless `replace`.
    Url { url: String, replace: bool },
}

impl Output {
    /// A URL (`s3://…`, `file://…`) or a path.
    pub fn parse(s: &str, replace: bool) -> Self {
        if hyper_remote::is_url(s) {
            Output::Url {
                url: s.to_string(),
                replace,
            }
        } else {
            Output::Path(PathBuf::from(s))
        }
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Output::Path(p) => write!(f, "{}", p.display()),
            Output::Url { url, .. } => f.write_str(url),
        }
    }
}

/// Everything a build needs.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub reference: String,
    pub output: Output,
    pub kernel: PathBuf,
    pub init: PathBuf,
    pub pull: crate::registry::PullOptions,
    pub cache_dir: PathBuf,
    /// How the rootfs stores file contents.
    pub compression: crate::spool::Compression,
    /// Load layers read by earlier builds from the cache, and keep the ones read.
    pub reuse_layers: bool,
}

/// What a build produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    pub digest: String,
    /// The path or URL written.
    pub output: String,
    pub size: u64,
    /// For a URL: whether the artifact was written or already there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<hyper_remote::publish::Outcome>,
    pub image_digest: String,
    pub rootfs_size: u64,
    /// Layers loaded from the layer cache instead of read again.
    pub layers_reused: usize,
    pub layers: usize,
}

/// Builds the artifact. On any error nothing is left at `opts.output`.
pub fn build(opts: &BuildOptions) -> anyhow::Result<BuildReport> {
    let reference = opts.reference.clone();
    let source = Source::parse(&reference)?;
    // A bad destination fails before any work.
    let target = match &opts.output {
        Output::Url { url, .. } => Some(hyper_remote::Target::open(url)?),
        Output::Path(_) => None,
    };
    let Boot {
        kernel,
        init,
        contract,
        kernel_version,
    } = Boot::read(&opts.kernel, &opts.init)?;
    let (image, layout) = match &source {
        Source::OciLayout { path, tag } => {
            let image = oci::open(path, tag.as_deref(), &opts.pull.platform).map_err(|source| {
                InputError::Image {
                    reference: reference.clone(),
                    source,
                }
            })?;
            (image, path.clone())
        }
        Source::DockerArchive { path, reference: r } => {
            let image = crate::docker_archive::open(path, r.as_deref()).map_err(|source| {
                InputError::Archive {
                    reference: reference.clone(),
                    source,
                }
            })?;
            (image, path.clone())
        }
        Source::Registry(r) => {
            let cache =
                crate::cache::Cache::open(opts.cache_dir.clone()).map_err(InputError::Cache)?;
            let image =
                crate::registry::pull(r, &cache, &opts.pull).map_err(InputError::Registry)?;
            (image, opts.cache_dir.clone())
        }
    };
    if image.config.os != "linux" || image.config.architecture != "amd64" {
        let found = format!("{}/{}", image.config.os, image.config.architecture);
        return Err(InputError::Architecture { reference, found }.into());
    }

    let mut tree = Tree::new();
    let mut spool = Spool::with_compression(opts.compression)?;
    let cache = if opts.reuse_layers {
        LayerCache::open(&opts.cache_dir, opts.compression)
    } else {
        None
    };
    let read = read_layers(
        &reference,
        &layout,
        &image.layers,
        &mut spool,
        cache.as_ref(),
    )?;
    let (layers_reused, check) = (read.reused, read.check);
    for (i, ops) in read.ops.into_iter().enumerate() {
        let digest = image.layers[i].digest.clone();
        layer::apply_ops(&mut tree, i, ops).map_err(|source| InputError::Layer {
            reference: reference.clone(),
            digest,
            source,
        })?;
    }

    let manifest = |rootfs_size| {
        manifest(
            &source.recorded(),
            &image,
            kernel_version.clone(),
            contract,
            rootfs_size,
        )
        .to_canonical_json()
    };
    let mut check = Some(check);
    let gate = move || -> anyhow::Result<()> {
        check
            .take()
            .expect("checked once")
            .join()
            .map_err(|_| anyhow::anyhow!("the layer check panicked"))??;
        Ok(())
    };
    let parts = Parts {
        kernel: &kernel,
        initrd: &initrd(&init),
        tree: &tree,
        spool: &spool,
        reference: &reference,
    };
    let (digest, size, rootfs_size, outcome) = match (&opts.output, target) {
        (Output::Url { replace, .. }, Some(target)) => {
            let sink = hyper_remote::publish::PublishSink::create(target, *replace)?;
            let (d, s, r, o) =
                write_artifact(ArtifactWriter::with_sink(sink), parts, manifest, gate)?;
            (d, s, r, Some(o))
        }
        (Output::Path(p), _) => {
            let (d, s, r, _) = write_artifact(ArtifactWriter::create(p)?, parts, manifest, gate)?;
            (d, s, r, None)
        }
        (Output::Url { .. }, None) => unreachable!("URL targets are opened above"),
    };
    Ok(BuildReport {
        digest: hvm::digest_string(&digest),
        output: opts.output.to_string(),
        size,
        outcome,
        image_digest: image.manifest_digest,
        rootfs_size,
        layers_reused,
        layers: image.layers.len(),
    })
}

/// What goes into an artifact besides its manifest.
#[derive(Clone, Copy)]
struct Parts<'a> {
    kernel: &'a [u8],
    initrd: &'a [u8],
    tree: &'a Tree,
    spool: &'a Spool,
    reference: &'a str,
}

/// Streams the sections into `w` and seals it: digest, size, rootfs size and
/// what the sink reported.
fn write_artifact<S: hvm::Sink>(
    mut w: ArtifactWriter<S>,
    p: Parts<'_>,
    manifest: impl FnOnce(u64) -> Vec<u8>,
    gate: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<([u8; 32], u64, u64, S::Done)> {
    w.section_bytes(SectionKind::Kernel, FLAG_REQUIRED, p.kernel)?;
    w.section_bytes(SectionKind::Initrd, FLAG_REQUIRED, p.initrd)?;
    let mut rootfs_size = 0;
    w.section(SectionKind::Rootfs, FLAG_REQUIRED, |out| {
        rootfs_size = erofs::write(p.tree, p.spool, out)?;
        Ok::<_, erofs::ErofsError>(())
    })?
    .map_err(|source| InputError::Filesystem {
        reference: p.reference.to_string(),
        source,
    })?;
    w.section_bytes(SectionKind::Manifest, FLAG_REQUIRED, &manifest(rootfs_size))?;
    gate()?;
    let size = w.file_len();
    let (digest, done) = w.finish_sink()?;
    Ok((digest, size, rootfs_size, done))
}

/// The kernel and init an artifact boots, read and checked.
struct Boot {
    kernel: Vec<u8>,
    init: Vec<u8>,
    contract: Option<u32>,
    kernel_version: String,
}

impl Boot {
    fn read(kernel: &Path, init: &Path) -> Result<Boot, InputError> {
        let kernel_bytes = read_checked(
            kernel,
            |b| elf::pvh_entry(b).map(|_| ()),
            |path, reason| InputError::Kernel { path, reason },
        )?;
        let init_bytes = read_checked(init, elf::check_static, |path, reason| InputError::Init {
            path,
            reason,
        })?;
        let contract = elf::init_contract(&init_bytes).map_err(|reason| InputError::Init {
            path: init.to_owned(),
            reason,
        })?;
        let kernel_version = elf::kernel_version(&kernel_bytes).unwrap_or_else(|| "unknown".into());
        Ok(Boot {
            kernel: kernel_bytes,
            init: init_bytes,
            contract,
            kernel_version,
        })
    }
}

fn read_checked(
    path: &Path,
    check: impl Fn(&[u8]) -> Result<(), String>,
    err: impl Fn(PathBuf, String) -> InputError,
) -> Result<Vec<u8>, InputError> {
    let bytes =
        std::fs::read(path).map_err(|e| err(path.to_owned(), format!("cannot read it ({e})")))?;
    check(&bytes).map_err(|reason| err(path.to_owned(), reason))?;
    Ok(bytes)
}

/// Reads every layer (verify, decompress, parse, spool contents) on as many
/// threads as there are CPUs; returns each layer's ops in layer order. Layers
/// found in `cache` are loaded from it instead, and layers read are kept
/// there. The first failing layer, in layer order, is the error reported.
fn read_layers(
    reference: &str,
    layout: &Path,
    layers: &[oci::Layer],
    spool: &mut Spool,
    cache: Option<&LayerCache>,
) -> anyhow::Result<Layers> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    type Job = (
        crate::spool::SpoolWriter,
        Option<crate::layer_cache::Pending>,
    );
    let mut cached: Vec<Option<Vec<layer::OpAt>>> = layers
        .iter()
        .map(|l| cache.and_then(|c| c.load(l, spool)))
        .collect();
    let mut jobs: Vec<Mutex<Option<Job>>> = Vec::with_capacity(layers.len());
    for hit in &cached {
        if hit.is_some() {
            jobs.push(Mutex::new(None));
            continue;
        }
        let job = match cache.and_then(LayerCache::begin) {
            Some((pending, file)) => (spool.writer_on(file)?, Some(pending)),
            None => (spool.writer()?, None),
        };
        jobs.push(Mutex::new(Some(job)));
    }
    type Slot = Mutex<Option<Result<Vec<layer::OpAt>, InputError>>>;
    let results: Vec<Slot> = layers.iter().map(|_| Mutex::new(None)).collect();
    let todo: Vec<usize> = (0..layers.len()).filter(|&i| cached[i].is_none()).collect();
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(todo.len())
        .max(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while let Some(&i) = todo.get(next.fetch_add(1, Ordering::SeqCst)) {
                    let (mut w, pending) = jobs[i]
                        .lock()
                        .expect("not poisoned")
                        .take()
                        .expect("one reader per layer");
                    let r = read_layer(reference, layout, &layers[i], &mut w);
                    if let (Ok(ops), Some(c), Some(p)) = (&r, cache, pending) {
                        c.keep(p, &layers[i], &w, ops);
                        if !layers[i].verified {
                            c.remember_blob(&layers[i]);
                        }
                    }
                    *jobs[i].lock().expect("not poisoned") = Some((w, None));
                    *results[i].lock().expect("not poisoned") = Some(r);
                }
            });
        }
    });
    for job in jobs {
        if let Some((w, _)) = job.into_inner().expect("not poisoned") {
            spool.adopt(w);
        }
    }
    let reused = cached.iter().filter(|c| c.is_some()).count();
    // Cached layers whose blob in a local layout was not checked yet: bad input
    // is refused whether or not it was seen before. Checked while the image is
    // written; the artifact is sealed only if they hold.
    // A blob file verified before and unchanged since (same inode, size and
    // change time) is not hashed again.
    let unchecked: Vec<oci::Layer> = (0..layers.len())
        .filter(|&i| cached[i].is_some() && !layers[i].verified)
        .filter(|&i| !cache.is_some_and(|c| c.blob_unchanged(&layers[i])))
        .map(|i| layers[i].clone())
        .collect();
    let (reference_owned, layout_owned) = (reference.to_string(), layout.to_owned());
    let stamps = cache.cloned();
    let check = std::thread::spawn(move || {
        for l in unchecked {
            oci::verify_blob(&layout_owned, &l.path, &l.digest).map_err(|source| {
                InputError::Image {
                    reference: reference_owned.clone(),
                    source,
                }
            })?;
            if let Some(c) = &stamps {
                c.remember_blob(&l);
            }
        }
        Ok(())
    });
    let mut out = Vec::with_capacity(layers.len());
    for (i, r) in results.into_iter().enumerate() {
        let read = r.into_inner().expect("not poisoned");
        match (cached[i].take(), read) {
            (_, Some(Err(e))) => return Err(e.into()),
            (Some(ops), _) => out.push(ops),
            (None, Some(Ok(ops))) => out.push(ops),
            (None, None) => unreachable!("every layer not cached is read"),
        }
    }
    Ok(Layers {
        ops: out,
        reused,
        check,
    })
}

/// What [`read_layers`] gives: each layer's ops, how many came from the
/// cache, and the check of cached layers' blobs still running.
struct Layers {
    ops: Vec<Vec<layer::OpAt>>,
    reused: usize,
    check: std::thread::JoinHandle<Result<(), InputError>>,
}

fn read_layer(
    reference: &str,
    layout: &Path,
    l: &oci::Layer,
    spool: &mut crate::spool::SpoolWriter,
) -> Result<Vec<layer::OpAt>, InputError> {
    let image_err = |source| InputError::Image {
        reference: reference.to_string(),
        source,
    };
    if !l.verified {
        oci::verify_blob(layout, &l.path, &l.digest).map_err(image_err)?;
    }
    let mut file = File::open(&l.path).map_err(|source| {
        image_err(oci::OciError::Io {
            path: l.path.clone(),
            source,
        })
    })?;
    let blob: Box<dyn Read + Send> = match l.range {
        Some((offset, len)) => {
            use std::io::Seek;
            file.seek(std::io::SeekFrom::Start(offset))
                .map_err(|source| {
                    image_err(oci::OciError::Io {
                        path: l.path.clone(),
                        source,
                    })
                })?;
            Box::new(BufReader::with_capacity(1 << 16, file.take(len)))
        }
        None => Box::new(BufReader::with_capacity(1 << 16, file)),
    };
    let raw: Box<dyn Read + Send> = match l.compression {
        Compression::None => blob,
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(blob).map_err(|source| {
                InputError::Decompress {
                    reference: reference.into(),
                    digest: l.digest.clone(),
                    source,
                }
            })?)
        }
    };
    let mut hashed = HashingReader {
        inner: raw,
        hasher: Sha256::new(),
        error: None,
    };
    let result = layer::parse(spool, &mut hashed);
    if let Some(source) = hashed.error.take() {
        return Err(InputError::Decompress {
            reference: reference.into(),
            digest: l.digest.clone(),
            source,
        });
    }
    let ops = result.map_err(|source| InputError::Layer {
        reference: reference.into(),
        digest: l.digest.clone(),
        source,
    })?;
    // The tar reader stops at the end-of-archive marker; hash the rest too.
    io::copy(&mut hashed, &mut io::sink()).map_err(|source| InputError::Decompress {
        reference: reference.into(),
        digest: l.digest.clone(),
        source,
    })?;
    if let Some(diff_id) = &l.diff_id {
        let got = format!("sha256:{}", hex::encode(hashed.hasher.finalize()));
        if &got != diff_id {
            return Err(InputError::DiffId {
                reference: reference.into(),
                digest: l.digest.clone(),
                diff_id: diff_id.clone(),
            });
        }
    }
    Ok(ops)
}

/// Hashes what passes through; remembers the inner reader's own errors so a
/// decompression failure is not mistaken for a malformed tar.
struct HashingReader {
    inner: Box<dyn Read + Send>,
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

/// The initrd: `/init`, the console node the kernel opens before running
/// it, and `/dev/null`, which the Rust runtime opens onto descriptors 0-2
/// when a boot without a console left them closed (a quiet KVM boot).
pub fn initrd(init: &[u8]) -> Vec<u8> {
    let mut c = hvm::cpio::Cpio::new();
    c.dir("dev", 0o755);
    c.char_dev("dev/console", 0o600, 5, 1);
    c.char_dev("dev/null", 0o666, 1, 3);
    c.dir("proc", 0o755);
    c.dir("sys", 0o755);
    c.dir("mnt", 0o755);
    c.file("init", 0o755, init);
    c.finish()
}

fn manifest(
    reference: &str,
    image: &oci::Image,
    kernel_version: String,
    contract: Option<u32>,
    rootfs_size: u64,
) -> hvm::Manifest {
    let rc = image.config.config.clone().unwrap_or_default();
    hvm::Manifest {
        image: hvm::ImageInfo {
            reference: reference.to_string(),
            digest: image.manifest_digest.clone(),
            index_digest: image.index_digest.clone(),
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
        kernel: hvm::KernelInfo {
            version: kernel_version,
            cmdline: BASE_CMDLINE.to_string(),
        },
        rootfs: hvm::RootfsInfo {
            fs_type: "erofs".into(),
            size: rootfs_size,
        },
        builder: hvm::BuilderInfo {
            name: "hyperbuild".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        init: contract.map(|contract| hvm::InitInfo { contract }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_of_reference() {
        let oci = |p: &str, t: Option<&str>| Source::OciLayout {
            path: PathBuf::from(p),
            tag: t.map(Into::into),
        };
        let arc = |p: &str, r: Option<&str>| Source::DockerArchive {
            path: PathBuf::from(p),
            reference: r.map(Into::into),
        };
        let cases = [
            ("oci:./img:v1", oci("./img", Some("v1"))),
            ("oci:/a/b", oci("/a/b", None)),
            ("docker-archive:save.tar", arc("save.tar", None)),
            (
                "docker-archive:save.tar:busybox:latest",
                arc("save.tar", Some("busybox:latest")),
            ),
            (
                "docker-archive:s.tar:127.0.0.1:5000/app:v2",
                arc("s.tar", Some("127.0.0.1:5000/app:v2")),
            ),
            ("nginx:latest", Source::Registry("nginx:latest".into())),
            (
                "127.0.0.1:5000/app@sha256:00",
                Source::Registry("127.0.0.1:5000/app@sha256:00".into()),
            ),
        ];
        for (typed, want) in cases {
            assert_eq!(Source::parse(typed).unwrap(), want, "{typed}");
        }
        assert!(Source::parse("").is_err());
        assert_eq!(
            Source::parse("oci:/tmp/x:v1").unwrap().recorded(),
            "oci-layout:v1"
        );
        assert_eq!(
            Source::parse("docker-archive:/tmp/s.tar:a:b")
                .unwrap()
                .recorded(),
            "docker-archive:a:b"
        );
    }
}

/// An artifact from directory trees instead of an image: containerd's
/// committed overlay snapshots, lowest first (see [`hyperfs::dir`]).
#[derive(Debug, Clone)]
pub struct DirBuildOptions {
    /// The layers' directories, lowest first.
    pub layers: Vec<PathBuf>,
    /// What the manifest records as the image reference.
    pub reference: String,
    /// What the manifest records as the image digest (the caller's key for
    /// these layers).
    pub digest: String,
    pub output: PathBuf,
    pub kernel: PathBuf,
    pub init: PathBuf,
    pub compression: crate::spool::Compression,
}

/// Builds an artifact from directory layers; the image config is empty (the
/// caller passes the process to run at boot). On any error nothing is left
/// at `opts.output`.
pub fn build_from_dirs(opts: &DirBuildOptions) -> anyhow::Result<BuildReport> {
    let Boot {
        kernel,
        init,
        contract,
        kernel_version,
    } = Boot::read(&opts.kernel, &opts.init)?;
    let mut tree = Tree::new();
    let mut spool = Spool::with_compression(opts.compression)?;
    for (i, dir) in opts.layers.iter().enumerate() {
        let layer_err = |source| InputError::Layer {
            reference: opts.reference.clone(),
            digest: dir.display().to_string(),
            source,
        };
        let ops = hyperfs::dir::read(spool.main_writer(), dir).map_err(layer_err)?;
        layer::apply_ops(&mut tree, i, ops).map_err(layer_err)?;
    }
    let image = oci::Image {
        manifest_digest: opts.digest.clone(),
        index_digest: None,
        config: oci::ImageConfigBlob {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
            config: None,
            rootfs: oci::RootFs::default(),
        },
        layers: Vec::new(),
    };
    let manifest = |rootfs_size| {
        manifest(
            &opts.reference,
            &image,
            kernel_version.clone(),
            contract,
            rootfs_size,
        )
        .to_canonical_json()
    };
    let parts = Parts {
        kernel: &kernel,
        initrd: &initrd(&init),
        tree: &tree,
        spool: &spool,
        reference: &opts.reference,
    };
    let (digest, size, rootfs_size, _) = write_artifact(
        ArtifactWriter::create(&opts.output)?,
        parts,
        manifest,
        || Ok(()),
    )?;
    Ok(BuildReport {
        digest: hvm::digest_string(&digest),
        output: opts.output.display().to_string(),
        size,
        outcome: None,
        image_digest: opts.digest.clone(),
        rootfs_size,
        layers_reused: 0,
        layers: opts.layers.len(),
    })
}
