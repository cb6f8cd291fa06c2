//! Pulling an image from a registry (the OCI distribution API, through
//! oci-client) into the blob cache: manifest (through an index, for the asked
//! platform), config, then every missing layer in parallel, with progress on
//! stderr and retried, resumed downloads. Every blob is verified before the
//! cache takes it, and the cache only ever hands out verified blobs.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use crate::cache::{Cache, CacheError};
use crate::oci::{self, Descriptor, Manifest, OciError, PlatformSpec};

const ACCEPT: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const PARALLEL: usize = 4;
const ATTEMPTS: u32 = 4;

/// `--pull`, as in docker and podman.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    /// Ask the registry what a tag points to on every build (one manifest
    /// request; blobs and digest references already cached are reused), as
    /// build tools resolve tags: the default.
    Always,
    /// Use the cached resolution of a tag when there is one (offline builds).
    Missing,
    /// Never contact a registry: everything must be cached.
    Never,
}

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub platform: PlatformSpec,
    pub policy: PullPolicy,
    /// Hosts (`host[:port]`) reached over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    /// `--username` with `--password-stdin`.
    pub credentials: Option<(String, String)>,
    pub quiet: bool,
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {0:?}")]
    Reference(String, #[source] oci_client::ParseError),
    #[error("{reference}: not found in the registry (unknown repository, tag or digest)")]
    NotFound { reference: String },
    #[error("{reference}: the registry refused the credentials (401 unauthorized); check --username/--password-stdin or ~/.docker/config.json")]
    Unauthorized { reference: String },
    #[error("{reference}: {what}")]
    Registry { reference: String, what: String },
    #[error("{reference}: the manifest does not match the pinned digest {pinned} (got {actual})")]
    PinnedDigest {
        reference: String,
        pinned: String,
        actual: String,
    },
    #[error("{reference}: malformed manifest: {reason}")]
    Malformed { reference: String, reason: String },
    #[error("{reference}")]
    Image {
        reference: String,
        #[source]
        source: OciError,
    },
    #[error("{reference}: blob {digest}")]
    Blob {
        reference: String,
        digest: String,
        #[source]
        source: CacheError,
    },
    #[error(
        "{reference}: blob {digest} could not be downloaded after {ATTEMPTS} attempts: {last}"
    )]
    Download {
        reference: String,
        digest: String,
        last: String,
    },
    #[error("{reference} is not in the cache and --pull never forbids asking the registry")]
    NotCached { reference: String },
    #[error("credentials for {registry}")]
    Credentials {
        registry: String,
        #[source]
        source: docker_credential::CredentialRetrievalError,
    },
    #[error("cannot start the network runtime")]
    Runtime(#[source] std::io::Error),
}

/// Whether a registry host is reached over plain HTTP, as Docker does for loopback.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match registry.rsplit_once(':') {
            Some((h, port)) if port.parse::<u16>().is_ok() => h,
            _ => registry,
        }
    };
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn auth_for(registry: &str, opts: &PullOptions) -> Result<RegistryAuth, RegistryError> {
    if let Some((u, p)) = &opts.credentials {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    let server = if registry == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        registry
    };
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    match docker_credential::get_credential(server) {
        Ok(DockerCredential::UsernamePassword(u, p)) => Ok(RegistryAuth::Basic(u, p)),
        Ok(DockerCredential::IdentityToken(t)) => Ok(RegistryAuth::Bearer(t)),
        Err(E::ConfigNotFound | E::ConfigReadError | E::NoCredentialConfigured) => {
            Ok(RegistryAuth::Anonymous)
        }
        Err(source) => Err(RegistryError::Credentials {
            registry: registry.into(),
            source,
        }),
    }
}

fn classify(reference: &str, e: OciDistributionError) -> RegistryError {
    let reference = reference.to_string();
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => {
            RegistryError::NotFound { reference }
        }
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => {
            RegistryError::Unauthorized { reference }
        }
        OciDistributionError::DigestError(e) => RegistryError::Registry {
            reference,
            what: format!("the content does not match the pinned digest ({e})"),
        },
        OciDistributionError::ServerError { code: 404, .. } => {
            RegistryError::NotFound { reference }
        }
        OciDistributionError::ServerError { code: 401, .. } => {
            RegistryError::Unauthorized { reference }
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                let c = format!("{:?}", e.code);
                c.contains("NotFound") || c.contains("Unknown")
            }) =>
        {
            RegistryError::NotFound { reference }
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|e| format!("{:?}", e.code).contains("Unauthorized")) =>
        {
            RegistryError::Unauthorized { reference }
        }
        other => RegistryError::Registry {
            reference,
            what: other.to_string(),
        },
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

struct Puller<'a> {
    client: Client,
    auth: RegistryAuth,
    reference: Reference,
    typed: &'a str,
    cache: &'a Cache,
    opts: &'a PullOptions,
}

/// Pulls `typed` (what the user typed) into the cache and returns the image,
/// its layers pointing at verified cache blobs.
pub fn pull(typed: &str, cache: &Cache, opts: &PullOptions) -> Result<oci::Image, RegistryError> {
    let reference: Reference = typed
        .parse()
        .map_err(|e| RegistryError::Reference(typed.into(), e))?;
    let registry = reference.resolve_registry().to_string();
    let mut http = opts.insecure.clone();
    if is_loopback(&registry) {
        http.push(registry.clone());
    }
    let config = ClientConfig {
        protocol: ClientProtocol::HttpsExcept(http),
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let auth = if opts.policy == PullPolicy::Never {
        RegistryAuth::Anonymous
    } else {
        auth_for(&registry, opts)?
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(RegistryError::Runtime)?;
    let p = Puller {
        client: Client::new(config),
        auth,
        reference,
        typed,
        cache,
        opts,
    };
    rt.block_on(p.run())
}

impl Puller<'_> {
    fn err_image(&self, source: OciError) -> RegistryError {
        RegistryError::Image {
            reference: self.typed.into(),
            source,
        }
    }

    fn by_digest(&self, digest: &str) -> Reference {
        Reference::with_digest(
            self.reference.registry().to_string(),
            self.reference.repository().to_string(),
            digest.to_string(),
        )
    }

    /// A manifest by digest, from the cache or the registry (verified either way).
    async fn manifest_by_digest(&self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        let blob_err = |source| RegistryError::Blob {
            reference: self.typed.into(),
            digest: digest.into(),
            source,
        };
        if let Some(b) = self.cache.read_verified(digest).map_err(blob_err)? {
            return Ok(b);
        }
        if self.opts.policy == PullPolicy::Never {
            return Err(RegistryError::NotCached {
                reference: self.typed.into(),
            });
        }
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&self.by_digest(digest), &self.auth, ACCEPT)
            .await
            .map_err(|e| classify(self.typed, e))?;
        let actual = sha256(&bytes);
        if actual != digest {
            return Err(RegistryError::PinnedDigest {
                reference: self.typed.into(),
                pinned: digest.into(),
                actual,
            });
        }
        self.cache.put_bytes(digest, &bytes).map_err(blob_err)?;
        Ok(bytes.to_vec())
    }

    /// The top-level manifest (or index) digest the reference names.
    async fn resolve_top(&self) -> Result<String, RegistryError> {
        if let Some(d) = self.reference.digest() {
            return Ok(d.to_string());
        }
        let key = self.reference.whole();
        if self.opts.policy != PullPolicy::Always {
            if let Some(d) = self.cache.get_ref(&key).filter(|d| self.cache.has(d)) {
                return Ok(d);
            }
        }
        if self.opts.policy == PullPolicy::Never {
            return Err(RegistryError::NotCached {
                reference: self.typed.into(),
            });
        }
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&self.reference, &self.auth, ACCEPT)
            .await
            .map_err(|e| classify(self.typed, e))?;
        let digest = sha256(&bytes);
        let blob_err = |source| RegistryError::Blob {
            reference: self.typed.into(),
            digest: digest.clone(),
            source,
        };
        let previous = self.cache.get_ref(&key);
        self.cache.put_bytes(&digest, &bytes).map_err(blob_err)?;
        self.cache.set_ref(&key, &digest).map_err(blob_err)?;
        if !self.opts.quiet {
            match previous {
                Some(old) if old != digest => eprintln!(
                    "hyperbuild: {} moved since it was last resolved here: {old} -> {digest}",
                    self.typed
                ),
                _ => eprintln!("hyperbuild: {} is {digest}", self.typed),
            }
        }
        Ok(digest)
    }

    async fn run(self) -> Result<oci::Image, RegistryError> {
        let top = self.resolve_top().await?;
        let mut manifest_digest = top.clone();
        let mut index_digest = None;
        let mut bytes = self.manifest_by_digest(&top).await?;
        for _ in 0..4 {
            let parsed =
                oci::parse_manifest(&bytes).map_err(|reason| RegistryError::Malformed {
                    reference: self.typed.into(),
                    reason,
                })?;
            match parsed {
                Manifest::Index(entries) => {
                    let entry = oci::pick_platform(&entries, &self.opts.platform)
                        .map_err(|e| self.err_image(e))?;
                    index_digest.get_or_insert(manifest_digest.clone());
                    manifest_digest = entry.digest.clone();
                    bytes = self.manifest_by_digest(&manifest_digest).await?;
                }
                Manifest::Image { config, layers } => {
                    let config_bytes = self.small_blob(&config).await?;
                    self.fetch_layers(&layers).await?;
                    let cache = self.cache;
                    return oci::image_from(
                        manifest_digest,
                        index_digest,
                        &config_bytes,
                        &layers,
                        |l| {
                            Ok((
                                cache
                                    .blob_path(&l.digest)
                                    .map_err(|_| OciError::BadDigest {
                                        digest: l.digest.clone(),
                                    })?,
                                true,
                            ))
                        },
                    )
                    .map_err(|e| self.err_image(e));
                }
            }
        }
        Err(RegistryError::Malformed {
            reference: self.typed.into(),
            reason: "image indexes nested too deeply".into(),
        })
    }

    fn descriptor(d: &Descriptor) -> OciDescriptor {
        OciDescriptor {
            media_type: d.media_type.clone(),
            digest: d.digest.clone(),
            size: d.size as i64,
            ..Default::default()
        }
    }

    async fn small_blob(&self, d: &Descriptor) -> Result<Vec<u8>, RegistryError> {
        let blob_err = |source| RegistryError::Blob {
            reference: self.typed.into(),
            digest: d.digest.clone(),
            source,
        };
        if let Some(b) = self.cache.read_verified(&d.digest).map_err(blob_err)? {
            return Ok(b);
        }
        if self.opts.policy == PullPolicy::Never {
            return Err(RegistryError::NotCached {
                reference: self.typed.into(),
            });
        }
        let path = self.download(d, &ProgressBar::hidden()).await?;
        std::fs::read(&path).map_err(|source| blob_err(CacheError::Io { path, source }))
    }

    async fn fetch_layers(&self, layers: &[Descriptor]) -> Result<(), RegistryError> {
        let missing: Vec<&Descriptor> = layers
            .iter()
            .filter(|l| !self.cache.has(&l.digest))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if self.opts.policy == PullPolicy::Never {
            return Err(RegistryError::NotCached {
                reference: self.typed.into(),
            });
        }
        let multi = MultiProgress::with_draw_target(
            if self.opts.quiet || !std::io::stderr().is_terminal() {
                ProgressDrawTarget::hidden()
            } else {
                ProgressDrawTarget::stderr()
            },
        );
        let style = ProgressStyle::with_template(
            "{prefix:>12} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec}",
        )
        .expect("valid template");
        let total_bytes: u64 = missing.iter().map(|l| l.size).sum();
        let total = multi.add(
            ProgressBar::new(total_bytes)
                .with_style(style.clone())
                .with_prefix("total"),
        );
        let jobs = missing.into_iter().map(|l| {
            let short = l
                .digest
                .trim_start_matches("sha256:")
                .chars()
                .take(12)
                .collect::<String>();
            let bar = multi.insert_before(
                &total,
                ProgressBar::new(l.size)
                    .with_style(style.clone())
                    .with_prefix(short),
            );
            let total = total.clone();
            async move {
                let r = self.download_counted(l, &bar, &total).await;
                bar.finish();
                r
            }
        });
        futures_util::stream::iter(jobs)
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<_>>()
            .await?;
        total.finish();
        Ok(())
    }

    async fn download_counted(
        &self,
        d: &Descriptor,
        bar: &ProgressBar,
        total: &ProgressBar,
    ) -> Result<PathBuf, RegistryError> {
        let before = bar.position();
        let r = self.download(d, bar).await;
        total.inc(bar.position().saturating_sub(before));
        r
    }

    /// Streams a blob into the cache, resuming after dropped connections.
    async fn download(&self, d: &Descriptor, bar: &ProgressBar) -> Result<PathBuf, RegistryError> {
        let digest = d.digest.clone();
        let blob_err = |source| RegistryError::Blob {
            reference: self.typed.into(),
            digest: digest.clone(),
            source,
        };
        let partial = self
            .cache
            .partial_path(&digest)
            .map_err(blob_err)?
            .with_extension(format!("{}.partial", std::process::id()));
        let desc = Self::descriptor(d);
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            let (stream, append) = if have > 0 && have < d.size {
                match self
                    .client
                    .pull_blob_stream_partial(&self.reference, &desc, have, None)
                    .await
                {
                    Ok(oci_client::client::BlobResponse::Partial(s)) => (s, true),
                    Ok(oci_client::client::BlobResponse::Full(s)) => (s, false),
                    Err(e) => match classify(self.typed, e) {
                        // Retrying cannot fix a missing blob or refused credentials.
                        e @ (RegistryError::NotFound { .. }
                        | RegistryError::Unauthorized { .. }) => return Err(e),
                        e => {
                            last = e.to_string();
                            continue;
                        }
                    },
                }
            } else {
                match self.client.pull_blob_stream(&self.reference, &desc).await {
                    Ok(s) => (s, false),
                    Err(e) => match classify(self.typed, e) {
                        e @ (RegistryError::NotFound { .. }
                        | RegistryError::Unauthorized { .. }) => return Err(e),
                        e => {
                            last = e.to_string();
                            continue;
                        }
                    },
                }
            };
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(append)
                .write(true)
                .truncate(!append)
                .open(&partial);
            let mut file = match file {
                Ok(f) => std::io::BufWriter::with_capacity(1 << 20, f),
                Err(source) => {
                    return Err(blob_err(CacheError::Io {
                        path: partial.clone(),
                        source,
                    }))
                }
            };
            bar.set_position(if append { have } else { 0 });
            let mut s = stream.stream;
            let mut failed = None;
            while let Some(chunk) = s.next().await {
                match chunk {
                    Ok(bytes) => {
                        if let Err(e) = file.write_all(&bytes) {
                            return Err(blob_err(CacheError::Io {
                                path: partial.clone(),
                                source: e,
                            }));
                        }
                        bar.inc(bytes.len() as u64);
                    }
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            if let Err(e) = file.flush() {
                return Err(blob_err(CacheError::Io {
                    path: partial.clone(),
                    source: e,
                }));
            }
            drop(file);
            if let Some(e) = failed {
                last = e;
                // A wrong digest over the whole blob cannot be fixed by resuming.
                if last.contains("digest") {
                    let _ = std::fs::remove_file(&partial);
                }
                continue;
            }
            match self.cache.commit(&partial, &digest) {
                Ok(p) => return Ok(p),
                Err(e @ CacheError::Mismatch { .. }) => last = e.to_string(),
                Err(e) => return Err(blob_err(e)),
            }
        }
        let _ = std::fs::remove_file(&partial);
        Err(RegistryError::Download {
            reference: self.typed.into(),
            digest,
            last,
        })
    }
}

/// Adds `manifest` and every blob it reaches (through indexes) to `keep`.
pub fn reachable(cache: &Cache, manifest: &str, keep: &mut std::collections::BTreeSet<String>) {
    if !keep.insert(manifest.to_string()) {
        return;
    }
    let Ok(Some(bytes)) = cache.read_verified(manifest) else {
        return;
    };
    match oci::parse_manifest(&bytes) {
        Ok(Manifest::Index(entries)) => {
            for e in entries {
                reachable(cache, &e.digest, keep);
            }
        }
        Ok(Manifest::Image { config, layers }) => {
            keep.insert(config.digest);
            keep.extend(layers.into_iter().map(|l| l.digest));
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_use_plain_http() {
        for h in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "127.1.2.3",
            "[::1]:5000",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["docker.io", "ghcr.io", "10.0.0.1:5000", "127.example.com"] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn references_normalize_like_docker() {
        let r: Reference = "nginx:latest".parse().unwrap();
        assert_eq!(
            (r.resolve_registry(), r.repository(), r.tag()),
            ("index.docker.io", "library/nginx", Some("latest"))
        );
        let r: Reference = "127.0.0.1:5000/app:tag".parse().unwrap();
        assert_eq!((r.registry(), r.repository()), ("127.0.0.1:5000", "app"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r: Reference = format!("ghcr.io/org/app@{d}").parse().unwrap();
        assert_eq!(r.digest(), Some(d.as_str()));
    }
}
