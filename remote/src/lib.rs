//! Artifacts in object storage.
//!
//! * [`Target::open`] understands `s3://BUCKET/KEY`, `gs://BUCKET/KEY`,
//!   `az://CONTAINER/KEY`, `file:///PATH` and (read only) `http(s)://…`.
//!   Credentials and endpoints come from the usual places: the `AWS_*`
//!   environment (`AWS_ENDPOINT_URL` for S3-compatible stores) and AWS
//!   profiles (`AWS_PROFILE`, `~/.aws/credentials`, `~/.aws/config`), and the
//!   standard `GOOGLE_*` / `AZURE_*` environment.
//! * [`publish::PublishSink`] streams an artifact as it is written into a
//!   multipart upload; the object appears only when the upload completes, so
//!   there is never a partial object under the final key. Keys are immutable
//!   unless asked otherwise: the same artifact again is a no-op, a different
//!   one is refused.
//! * [`fetch::fetch`] brings an artifact into a local cache keyed by its
//!   digest, verified before it is used, and reused without a transfer.
//! * [`oci`]: OCI registries as artifact stores (`docker://`), OCI 1.1
//!   artifacts with referrers for their signatures.
//! * [`signature`]: OpenSSH signatures of artifacts, made and checked
//!   against an `allowed_signers` file; a signature lives beside its
//!   artifact (`KEY.sig`, `PATH.sig`, or a referrer in a registry).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::{multipart::MultipartStore, ObjectStore, ObjectStoreExt};

mod profile;

pub mod fetch;
pub mod oci;
pub mod publish;
pub mod signature;

/// Why talking to object storage failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{url}: no such object (check the bucket and key)")]
    NotFound { url: String },
    #[error("{url}")]
    Store {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{url} already holds a different artifact ({existing}; this one is {ours}): artifacts are immutable, publish under a new key or pass --replace")]
    Exists {
        url: String,
        existing: String,
        ours: String,
    },
    #[error("{url} already exists and is not a .hvm artifact ({reason}); refusing to replace it")]
    ExistsNotArtifact { url: String, reason: String },
    #[error("{url} is not a .hvm artifact: {reason}")]
    NotArtifact { url: String, reason: String },
    #[error("{url}: the object changed while it was being fetched")]
    Changed { url: String },
    #[error("{url}: the downloaded artifact does not verify")]
    Verify {
        url: String,
        #[source]
        source: hvm::ReadError,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Signature(#[from] signature::VerifyError),
}

/// Shorthand for an I/O error with context.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RemoteError {
    let what = what.into();
    move |source| RemoteError::Io { what, source }
}

/// True when `s` names a location this crate handles rather than a local path.
pub fn is_url(s: &str) -> bool {
    [
        "s3://",
        "gs://",
        "az://",
        "file://",
        "http://",
        "https://",
        "docker://",
    ]
    .iter()
    .any(|p| s.starts_with(p))
}

/// Reads a small object (a signature) at `url`; None when there is none.
pub fn read_object(url: &str) -> Result<Option<Vec<u8>>, RemoteError> {
    match Target::open(url)? {
        Target::File { path, .. } => match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("cannot read {url}"))(e)),
        },
        Target::Cloud(c) => {
            let got = c.rt.block_on(async {
                let r = c.store.get(&c.path).await?;
                r.bytes().await
            });
            match got {
                Ok(b) => Ok(Some(b.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(c.store_err(e)),
            }
        }
    }
}

/// Writes a small object (a signature) at `url`, replacing what is there.
pub fn write_object(url: &str, bytes: &[u8]) -> Result<(), RemoteError> {
    match Target::open(url)? {
        Target::File { path, .. } => {
            let dir = path.parent().unwrap_or(std::path::Path::new("."));
            let mut t = tempfile::NamedTempFile::new_in(dir)
                .map_err(io_err(format!("cannot write {url}")))?;
            std::io::Write::write_all(&mut t, bytes)
                .map_err(io_err(format!("cannot write {url}")))?;
            t.persist(&path)
                .map_err(|e| io_err(format!("cannot write {url}"))(e.error))?;
            Ok(())
        }
        Target::Cloud(c) => {
            c.rt.block_on(c.store.put(&c.path, bytes.to_vec().into()))
                .map(|_| ())
                .map_err(|e| c.store_err(e))
        }
    }
}

/// Where an artifact lives.
#[derive(Debug)]
pub enum Target {
    /// An object store.
    Cloud(Cloud),
    /// `file://` — a local path with the same publishing rules.
    File { url: String, path: PathBuf },
}

/// One object in an object store, with the runtime that talks to it.
#[derive(Clone)]
pub struct Cloud {
    pub url: String,
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) multipart: Option<Arc<dyn MultipartStore>>,
    pub(crate) path: ObjectPath,
    pub(crate) rt: Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cloud")
            .field("url", &self.url)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Retries for every request: interrupted transfers are retried by the store
/// client with backoff, then reported.
fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(120),
    }
}

fn split_bucket(url: &str, rest: &str) -> Result<(String, String), RemoteError> {
    let bad = |reason: &str| RemoteError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let (bucket, key) = rest
        .split_once('/')
        .ok_or_else(|| bad("no key after the bucket"))?;
    if bucket.is_empty() {
        return Err(bad("no bucket"));
    }
    if key.is_empty() || key.ends_with('/') {
        return Err(bad("no object key (expected SCHEME://BUCKET/KEY.hvm)"));
    }
    Ok((bucket.to_string(), key.to_string()))
}

/// True for an endpoint on this machine, where plain HTTP is allowed.
fn loopback_http(endpoint: &str) -> bool {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', ':']).next().unwrap_or("");
    let host = if rest.starts_with('[') {
        rest.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Target {
    /// Parses `url` and prepares a client from the environment. Nothing is
    /// sent until the target is used.
    pub fn open(url: &str) -> Result<Target, RemoteError> {
        let bad = |reason: String| RemoteError::Url {
            url: url.to_string(),
            reason,
        };
        let store_err = |source| RemoteError::Store {
            url: url.to_string(),
            source,
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad(
                    "file:// needs an absolute path (file:///dir/app.hvm)".into()
                ));
            }
            return Ok(Target::File {
                url: url.to_string(),
                path: PathBuf::from(path),
            });
        }
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("not a URL".into()))?;
        let (store, multipart, key): (Arc<dyn ObjectStore>, Option<Arc<dyn MultipartStore>>, _) =
            match scheme {
                "s3" | "s3a" => {
                    let (bucket, key) = split_bucket(url, rest)?;
                    let mut b = object_store::aws::AmazonS3Builder::from_env()
                        .with_bucket_name(bucket)
                        .with_retry(retry());
                    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
                    let prof = profile::load();
                    if env("AWS_ACCESS_KEY_ID").is_none() {
                        if let Some(p) = &prof {
                            if let (Some(id), Some(secret)) =
                                (&p.access_key_id, &p.secret_access_key)
                            {
                                b = b.with_access_key_id(id).with_secret_access_key(secret);
                                if let Some(t) = &p.session_token {
                                    b = b.with_token(t);
                                }
                            }
                        }
                    }
                    let region = env("AWS_REGION")
                        .or_else(|| env("AWS_DEFAULT_REGION"))
                        .or_else(|| prof.as_ref().and_then(|p| p.region.clone()))
                        .unwrap_or_else(|| "us-east-1".into());
                    b = b.with_region(region);
                    let endpoint = env("AWS_ENDPOINT_URL_S3")
                        .or_else(|| env("AWS_ENDPOINT_URL"))
                        .or_else(|| env("AWS_ENDPOINT"))
                        .or_else(|| prof.as_ref().and_then(|p| p.endpoint_url.clone()));
                    if let Some(e) = endpoint {
                        if loopback_http(&e) {
                            b = b.with_allow_http(true);
                        }
                        b = b.with_endpoint(e);
                    }
                    let s = Arc::new(b.build().map_err(store_err)?);
                    (s.clone(), Some(s), key)
                }
                "gs" => {
                    let (bucket, key) = split_bucket(url, rest)?;
                    let s = Arc::new(
                        object_store::gcp::GoogleCloudStorageBuilder::from_env()
                            .with_bucket_name(bucket)
                            .with_retry(retry())
                            .build()
                            .map_err(store_err)?,
                    );
                    (s.clone(), Some(s), key)
                }
                "az" | "azure" => {
                    let (container, key) = split_bucket(url, rest)?;
                    let s = Arc::new(
                        object_store::azure::MicrosoftAzureBuilder::from_env()
                            .with_container_name(container)
                            .with_retry(retry())
                            .build()
                            .map_err(store_err)?,
                    );
                    (s.clone(), Some(s), key)
                }
                "http" | "https" => {
                    let (host, key) = rest
                        .split_once('/')
                        .filter(|(_, k)| !k.is_empty())
                        .ok_or_else(|| bad("no path after the host".into()))?;
                    // http:// was asked for explicitly; the seal is checked either way.
                    let s = object_store::http::HttpBuilder::new()
                        .with_url(format!("{scheme}://{host}"))
                        .with_client_options(
                            object_store::ClientOptions::new().with_allow_http(scheme == "http"),
                        )
                        .with_retry(retry())
                        .build()
                        .map_err(store_err)?;
                    (Arc::new(s), None, key.to_string())
                }
                other => return Err(bad(format!("unsupported scheme {other}://"))),
            };
        let path = ObjectPath::parse(&key).map_err(|e| bad(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(io_err("cannot start the I/O runtime"))?;
        Ok(Target::Cloud(Cloud {
            url: url.to_string(),
            store,
            multipart,
            path,
            rt: Arc::new(rt),
        }))
    }

    /// The URL as given.
    pub fn url(&self) -> &str {
        match self {
            Target::Cloud(c) => &c.url,
            Target::File { url, .. } => url,
        }
    }
}

/// Reads a header and returns the artifact digest it seals.
pub(crate) fn header_digest(bytes: &[u8]) -> Result<String, String> {
    use sha2::Digest;
    if bytes.len() < hvm::HEADER_LEN {
        return Err(format!("only {} bytes", bytes.len()));
    }
    let header = &bytes[..hvm::HEADER_LEN];
    hvm::Header::parse(header).map_err(|e| e.to_string())?;
    Ok(hvm::digest_string(&sha2::Sha256::digest(header).into()))
}

impl Cloud {
    pub(crate) fn store_err(&self, source: object_store::Error) -> RemoteError {
        match source {
            object_store::Error::NotFound { .. } => RemoteError::NotFound {
                url: self.url.clone(),
            },
            source => RemoteError::Store {
                url: self.url.clone(),
                source,
            },
        }
    }

    /// The digest of the artifact under this key, if any. `Err(reason)` inside when an
    /// object is there but is not an artifact.
    pub(crate) fn existing(&self) -> Result<Option<Result<String, String>>, RemoteError> {
        let meta = match self.rt.block_on(self.store.head(&self.path)) {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.store_err(e)),
        };
        if meta.size < hvm::HEADER_LEN as u64 {
            return Ok(Some(Err(format!("{} bytes", meta.size))));
        }
        let bytes = self
            .rt
            .block_on(self.store.get_range(&self.path, 0..hvm::HEADER_LEN as u64))
            .map_err(|e| self.store_err(e))?;
        Ok(Some(header_digest(&bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_before_anything_is_sent() {
        for (url, want) in [
            ("s3://bucket", "no key"),
            ("s3:///key.hvm", "no bucket"),
            ("s3://bucket/dir/", "no object key"),
            ("ftp://host/x.hvm", "unsupported scheme"),
            ("file://relative.hvm", "absolute path"),
            ("https://host", "no path"),
        ] {
            let err = Target::open(url).unwrap_err().to_string();
            assert!(err.contains(want), "{url}: {err}");
        }
        match Target::open("file:///srv/app.hvm").unwrap() {
            Target::File { path, .. } => assert_eq!(path, PathBuf::from("/srv/app.hvm")),
            t => panic!("{t:?}"),
        }
        assert!(is_url("s3://b/k") && is_url("https://h/k") && !is_url("app.hvm"));
    }

    #[test]
    fn plain_http_only_for_loopback_endpoints() {
        assert!(loopback_http("http://127.0.0.1:9000"));
        assert!(loopback_http("http://localhost:9000/"));
        assert!(loopback_http("http://[::1]:9000"));
        assert!(!loopback_http("http://minio.internal:9000"));
        assert!(!loopback_http("https://127.0.0.1:9000"));
    }
}
