//! OCI registries as artifact stores: `docker://REGISTRY/REPOSITORY:TAG` or
//! `…@sha256:DIGEST`, as skopeo names them.
//!
//! An artifact travels as an OCI 1.1 artifact: an image manifest with its
//! own `artifactType` ([`ARTIFACT_TYPE`]), the empty config, and one layer —
//! the `.hvm` file, byte for byte — with annotations naming the artifact's
//! seal (`dev.hyper.artifact.digest`), the image it was built from and the
//! kernel. The manifest is canonical JSON, so the same artifact gives the
//! same manifest digest and a second push is a no-op. Uploads go in chunks
//! (`PATCH` with `Content-Range`); after an interruption they resume from
//! the offset the registry reports, or — when the registry dropped the
//! session, as Distribution does when a chunk is cut — start a new one.
//! Downloads resume with ranged `GET`s.
//! Credentials: `--username`/`--password-stdin`, else `~/.docker/config.json`
//! (`auths`, `credHelpers`, `credsStore`), answering Basic or Bearer
//! challenges. Plain HTTP only for loopback registries or those named in
//! `HYPER_INSECURE_REGISTRIES` (comma-separated `host[:port]`).
//!
//! A signature of an artifact ([`crate::signature`]) is pushed as a referrer
//! of its manifest (`subject`, artifact type [`SIG_ARTIFACT_TYPE`]), and
//! also tagged `sha256-<manifest hex>.sig` for registries without the
//! referrers API (Debian's docker-registry is one).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::StatusCode;
use serde_json::json;
use sha2::Digest;

use crate::RemoteError;

/// The artifact type of a `.hvm` artifact in a registry.
pub const ARTIFACT_TYPE: &str = "application/vnd.hyper.hvm.v1";
/// The media type of its one layer: the `.hvm` file.
pub const LAYER_TYPE: &str = "application/vnd.hyper.hvm.v1.file";
/// The artifact type of a signature's referrer.
pub const SIG_ARTIFACT_TYPE: &str = "application/vnd.hyper.hvm.sig.v1";
/// Its layer: an OpenSSH signature (`-----BEGIN SSH SIGNATURE-----`).
pub const SIG_LAYER_TYPE: &str = "application/vnd.hyper.hvm.sig.v1.sshsig";
/// The artifact's seal, as an annotation.
pub const DIGEST_ANNOTATION: &str = "dev.hyper.artifact.digest";

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";
/// Bytes per `PATCH` of an upload.
const CHUNK: u64 = 8 << 20;
/// Attempts of one transfer step before giving up.
const ATTEMPTS: u32 = 6;

/// `docker://REGISTRY/REPOSITORY[:TAG][@DIGEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub url: String,
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(url: &str) -> Result<Reference, RemoteError> {
        let bad = |reason: &str| RemoteError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("docker://")
            .ok_or_else(|| bad("not a docker:// reference"))?;
        let (rest, digest) = match rest.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("the digest is not sha256:…"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad("the digest is not 64 hex digits"));
                }
                (r, Some(d.to_string()))
            }
            None => (rest, None),
        };
        let (registry, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("expected docker://REGISTRY/REPOSITORY:TAG"))?;
        if !registry.contains(['.', ':']) && registry != "localhost" {
            return Err(bad(
                "name the registry host (docker://registry.example/app:v1); there is no default registry for artifacts",
            ));
        }
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_string())),
            _ => (path, None),
        };
        if repository.is_empty()
            || !repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            })
        {
            return Err(bad("the repository must be lowercase path components"));
        }
        if tag.is_none() && digest.is_none() {
            return Err(bad("give a tag (:v1) or a digest (@sha256:…)"));
        }
        if let Some(t) = &tag {
            if t.is_empty() || t.len() > 128 {
                return Err(bad("a tag is 1 to 128 characters"));
            }
        }
        Ok(Reference {
            url: url.to_string(),
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    /// The manifest reference: the digest when given, else the tag.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .expect("a tag or a digest")
    }

    fn plain_http(&self) -> bool {
        let host = self
            .registry
            .rsplit_once(':')
            .map_or(&self.registry[..], |(h, _)| h);
        let loopback = host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        loopback
            || std::env::var("HYPER_INSECURE_REGISTRIES")
                .unwrap_or_default()
                .split(',')
                .any(|r| r.trim() == self.registry)
    }
}

/// `Basic` credentials for a registry: the given ones, else Docker's.
pub fn credentials(
    registry: &str,
    given: Option<(String, String)>,
) -> Result<Option<(String, String)>, RemoteError> {
    if given.is_some() {
        return Ok(given);
    }
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    match docker_credential::get_credential(registry) {
        Ok(DockerCredential::UsernamePassword(u, p)) => Ok(Some((u, p))),
        Ok(DockerCredential::IdentityToken(t)) => Ok(Some(("<token>".into(), t))),
        Err(E::ConfigNotFound | E::ConfigReadError | E::NoCredentialConfigured) => Ok(None),
        Err(e) => Err(RemoteError::Io {
            what: format!("cannot get the credentials for {registry}"),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// A repository in a registry, with the runtime and the authorization that
/// talk to it.
pub struct Registry {
    pub r: Reference,
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    base: String,
    creds: Option<(String, String)>,
    auth: Mutex<Option<String>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("r", &self.r)
            .finish_non_exhaustive()
    }
}

/// What a registry said that ends the operation.
fn http_err(r: &Reference, what: &str, status: StatusCode, body: &str) -> RemoteError {
    let body: String = body.chars().take(300).collect();
    let hint = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            " (check the credentials: --username with --password-stdin, or docker login)"
        }
        _ => "",
    };
    RemoteError::Url {
        url: r.url.clone(),
        reason: format!(
            "{what}: the registry answered {status}{hint} {}",
            body.trim()
        ),
    }
}

fn net_err(r: &Reference, what: &str, e: reqwest::Error) -> RemoteError {
    RemoteError::Io {
        what: format!("{}: {what}", r.url),
        source: std::io::Error::other(e),
    }
}

/// The descriptor of a blob.
fn descriptor(media_type: &str, digest: &str, size: u64) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": digest, "size": size})
}

/// Canonical JSON: sorted keys (serde_json's map is ordered), compact.
fn canonical(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("serializes")
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

impl Registry {
    pub fn connect(
        r: &Reference,
        creds: Option<(String, String)>,
    ) -> Result<Registry, RemoteError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(crate::io_err("cannot start the network runtime"))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .map_err(|e| net_err(r, "cannot make an HTTP client", e))?;
        let scheme = if r.plain_http() { "http" } else { "https" };
        let creds = credentials(&r.registry, creds)?;
        Ok(Registry {
            base: format!("{scheme}://{}/v2/{}", r.registry, r.repository),
            r: r.clone(),
            rt,
            http,
            creds,
            auth: Mutex::new(None),
        })
    }

    /// Sends a request built by `build`, answering one authentication
    /// challenge; returns the response (any status).
    fn send(
        &self,
        build: &dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, reqwest::Error> {
        self.rt.block_on(async {
            let auth = self.auth.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut req = build(&self.http);
            if let Some(a) = &auth {
                req = req.header(AUTHORIZATION, a);
            }
            let resp = req.send().await?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            let Some(challenge) = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
            else {
                return Ok(resp);
            };
            let Some(a) = self.answer(&challenge).await? else {
                return Ok(resp);
            };
            *self.auth.lock().unwrap_or_else(|e| e.into_inner()) = Some(a.clone());
            build(&self.http).header(AUTHORIZATION, a).send().await
        })
    }

    /// The Authorization header for a `Basic` or `Bearer` challenge.
    async fn answer(&self, challenge: &str) -> Result<Option<String>, reqwest::Error> {
        use base64::Engine;
        let basic = self.creds.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let (kind, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if kind.eq_ignore_ascii_case("basic") {
            return Ok(basic);
        }
        if !kind.eq_ignore_ascii_case("bearer") {
            return Ok(None);
        }
        let mut realm = None;
        let mut query = Vec::new();
        for part in split_params(params) {
            let Some((k, v)) = part.split_once('=') else {
                continue;
            };
            let v = v.trim_matches('"').to_string();
            match k.trim() {
                "realm" => realm = Some(v),
                "service" | "scope" => query.push((k.trim().to_string(), v)),
                _ => {}
            }
        }
        if !query.iter().any(|(k, _)| k == "scope") {
            query.push((
                "scope".into(),
                format!("repository:{}:pull,push", self.r.repository),
            ));
        }
        let Some(realm) = realm else {
            return Ok(None);
        };
        let mut req = self.http.get(&realm).query(&query);
        if let Some(b) = &basic {
            req = req.header(AUTHORIZATION, b);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            return Ok(None);
        }
        let v: serde_json::Value = resp.json().await?;
        Ok(v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .map(|t| format!("Bearer {t}")))
    }

    fn text(&self, resp: reqwest::Response) -> String {
        self.rt.block_on(resp.text()).unwrap_or_default()
    }

    /// The manifest at `reference` and its digest; None when there is none.
    pub fn manifest(&self, reference: &str) -> Result<Option<(Vec<u8>, String)>, RemoteError> {
        let url = format!("{}/manifests/{reference}", self.base);
        let resp = self
            .send(&|c| c.get(&url).header("Accept", MANIFEST_TYPE))
            .map_err(|e| net_err(&self.r, "cannot get the manifest", e))?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let bytes = self
                    .rt
                    .block_on(resp.bytes())
                    .map_err(|e| net_err(&self.r, "cannot read the manifest", e))?;
                let digest = sha256(&bytes);
                Ok(Some((bytes.to_vec(), digest)))
            }
            s => Err(http_err(
                &self.r,
                "cannot get the manifest",
                s,
                &self.text(resp),
            )),
        }
    }

    /// Puts a manifest under `reference` (a tag or its digest).
    pub fn put_manifest(&self, reference: &str, bytes: &[u8]) -> Result<(), RemoteError> {
        let url = format!("{}/manifests/{reference}", self.base);
        let resp = self
            .send(&|c| {
                c.put(&url)
                    .header(CONTENT_TYPE, MANIFEST_TYPE)
                    .body(bytes.to_vec())
            })
            .map_err(|e| net_err(&self.r, "cannot put the manifest", e))?;
        if resp.status().is_success() {
            return Ok(());
        }
        let s = resp.status();
        Err(http_err(
            &self.r,
            "cannot put the manifest",
            s,
            &self.text(resp),
        ))
    }

    pub fn blob_exists(&self, digest: &str) -> Result<bool, RemoteError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let resp = self
            .send(&|c| c.head(&url))
            .map_err(|e| net_err(&self.r, "cannot ask for a blob", e))?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            s => Err(http_err(&self.r, "cannot ask for a blob", s, "")),
        }
    }

    /// Turns an upload's `Location` into an absolute URL.
    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            return location.to_string();
        }
        let origin_end = self.base.find("/v2/").unwrap_or(self.base.len());
        format!("{}{location}", &self.base[..origin_end])
    }

    fn location(&self, h: &HeaderMap) -> Option<String> {
        h.get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|l| self.absolute(l))
    }

    /// Uploads `size` bytes of `file` as blob `digest`, in chunks, resuming
    /// from what the registry has after a failed chunk. Returns bytes sent.
    pub fn upload(
        &self,
        file: &mut std::fs::File,
        digest: &str,
        size: u64,
        progress: &dyn Fn(u64),
    ) -> Result<u64, RemoteError> {
        let err = |what: &'static str| move |e: reqwest::Error| net_err(&self.r, what, e);
        let start = format!("{}/blobs/uploads/", self.base);
        let resp = self
            .send(&|c| c.post(&start))
            .map_err(err("cannot start an upload"))?;
        if resp.status() != StatusCode::ACCEPTED {
            let s = resp.status();
            return Err(http_err(
                &self.r,
                "cannot start an upload",
                s,
                &self.text(resp),
            ));
        }
        let mut location = self.location(resp.headers()).ok_or_else(|| {
            http_err(
                &self.r,
                "the upload has no location",
                StatusCode::ACCEPTED,
                "",
            )
        })?;
        let mut offset = 0u64;
        let mut sent = 0u64;
        let mut failures = 0u32;
        let mut buf = vec![0u8; CHUNK as usize];
        while offset < size {
            let n = (size - offset).min(CHUNK) as usize;
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut buf[..n]))
                .map_err(crate::io_err("cannot read the artifact"))?;
            let range = format!("{}-{}", offset, offset + n as u64 - 1);
            let body = buf[..n].to_vec();
            let at = location.clone();
            let result = self.send(&|c| {
                c.patch(&at)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header("Content-Range", range.as_str())
                    .body(body.clone())
            });
            match result {
                Ok(resp) if resp.status() == StatusCode::ACCEPTED => {
                    if let Some(l) = self.location(resp.headers()) {
                        location = l;
                    }
                    offset += n as u64;
                    sent += n as u64;
                    failures = 0;
                    progress(offset);
                    continue;
                }
                Ok(resp)
                    if resp.status().is_client_error()
                        && resp.status() != StatusCode::RANGE_NOT_SATISFIABLE =>
                {
                    let s = resp.status();
                    return Err(http_err(
                        &self.r,
                        "the upload was refused",
                        s,
                        &self.text(resp),
                    ));
                }
                _ => {}
            }
            // Interrupted: ask the registry how far it got and go on from
            // there; a registry that dropped the session (Distribution does
            // when a chunk is cut: its upload state no longer matches) gets
            // a new one, from the start.
            failures += 1;
            if failures >= ATTEMPTS {
                return Err(RemoteError::Io {
                    what: format!("{}: the upload kept failing", self.r.url),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionAborted),
                });
            }
            std::thread::sleep(Duration::from_millis(100 << failures.min(5)));
            let at = location.clone();
            let status = self
                .send(&|c| c.get(&at))
                .ok()
                .filter(|r| r.status() == StatusCode::NO_CONTENT);
            match status {
                Some(resp) => {
                    if let Some(l) = self.location(resp.headers()) {
                        location = l;
                    }
                    offset = resp
                        .headers()
                        .get(RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|r| r.rsplit_once('-'))
                        .and_then(|(_, end)| end.parse::<u64>().ok())
                        .map_or(0, |end| end + 1);
                }
                None => {
                    let resp = self
                        .send(&|c| c.post(&start))
                        .map_err(err("cannot start an upload"))?;
                    if resp.status() != StatusCode::ACCEPTED {
                        let s = resp.status();
                        return Err(http_err(
                            &self.r,
                            "cannot start an upload",
                            s,
                            &self.text(resp),
                        ));
                    }
                    location = self.location(resp.headers()).ok_or_else(|| {
                        http_err(
                            &self.r,
                            "the upload has no location",
                            StatusCode::ACCEPTED,
                            "",
                        )
                    })?;
                    offset = 0;
                }
            }
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let done = format!("{location}{sep}digest={digest}");
        let resp = self
            .send(&|c| {
                c.put(&done)
                    .header(CONTENT_TYPE, "application/octet-stream")
            })
            .map_err(err("cannot finish the upload"))?;
        if resp.status() != StatusCode::CREATED {
            let s = resp.status();
            return Err(http_err(
                &self.r,
                "cannot finish the upload",
                s,
                &self.text(resp),
            ));
        }
        Ok(sent)
    }

    /// Uploads small bytes as a blob unless the registry has it.
    pub fn put_small_blob(&self, bytes: &[u8]) -> Result<String, RemoteError> {
        let digest = sha256(bytes);
        if !self.blob_exists(&digest)? {
            let mut f =
                tempfile::tempfile().map_err(crate::io_err("cannot make a temporary file"))?;
            f.write_all(bytes)
                .map_err(crate::io_err("cannot write a temporary file"))?;
            self.upload(&mut f, &digest, bytes.len() as u64, &|_| {})?;
        }
        Ok(digest)
    }

    /// Reads bytes `range` of a blob.
    pub fn blob_range(&self, digest: &str, from: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let range = format!("bytes={}-{}", from, from + len - 1);
        let resp = self
            .send(&|c| c.get(&url).header(RANGE, range.as_str()))
            .map_err(|e| net_err(&self.r, "cannot read a blob", e))?;
        let s = resp.status();
        if !s.is_success() {
            return Err(http_err(&self.r, "cannot read a blob", s, &self.text(resp)));
        }
        let bytes = self
            .rt
            .block_on(resp.bytes())
            .map_err(|e| net_err(&self.r, "cannot read a blob", e))?;
        // A registry that ignores Range sends the whole blob.
        let start = if s == StatusCode::PARTIAL_CONTENT {
            0
        } else {
            from as usize
        };
        Ok(bytes
            .get(start..(start + len as usize).min(bytes.len()))
            .unwrap_or_default()
            .to_vec())
    }

    /// Downloads blob `digest` of `size` bytes into `file`, resuming after
    /// an interruption; the bytes must hash to `digest`.
    pub fn download(
        &self,
        digest: &str,
        size: u64,
        file: &mut std::fs::File,
    ) -> Result<u64, RemoteError> {
        use futures_util::StreamExt;
        let url = format!("{}/blobs/{digest}", self.base);
        let mut offset = 0u64;
        let mut failures = 0u32;
        let mut hasher = sha2::Sha256::new();
        while offset < size {
            let range = format!("bytes={offset}-");
            let result = self.send(&|c| c.get(&url).header(RANGE, range.as_str()));
            let step: Result<(), String> = match result {
                Ok(resp)
                    if resp.status() == StatusCode::PARTIAL_CONTENT
                        || (resp.status().is_success() && offset == 0) =>
                {
                    self.rt.block_on(async {
                        let mut body = resp.bytes_stream();
                        while let Some(chunk) = body.next().await {
                            let chunk = chunk.map_err(|e| e.to_string())?;
                            let take = chunk.len().min((size - offset) as usize);
                            file.write_all(&chunk[..take]).map_err(|e| e.to_string())?;
                            hasher.update(&chunk[..take]);
                            offset += take as u64;
                        }
                        Ok(())
                    })
                }
                Ok(resp) if resp.status().is_client_error() => {
                    let s = resp.status();
                    return Err(http_err(
                        &self.r,
                        "cannot download the artifact",
                        s,
                        &self.text(resp),
                    ));
                }
                Ok(resp) => Err(resp.status().to_string()),
                Err(e) => Err(e.to_string()),
            };
            if step.is_ok() && offset >= size {
                break;
            }
            failures += 1;
            if failures >= ATTEMPTS {
                return Err(RemoteError::Io {
                    what: format!("{}: the download kept failing", self.r.url),
                    source: std::io::Error::other(step.err().unwrap_or_default()),
                });
            }
            std::thread::sleep(Duration::from_millis(100 << failures.min(5)));
        }
        if format!("sha256:{}", hex::encode(hasher.finalize())) != digest {
            return Err(RemoteError::Url {
                url: self.r.url.clone(),
                reason: format!("the blob does not match its digest {digest}"),
            });
        }
        file.sync_all()
            .map_err(crate::io_err("cannot write the artifact cache"))?;
        Ok(offset)
    }

    /// The referrers of `subject` of `artifact_type`; None when the registry
    /// has no referrers API.
    pub fn referrers(
        &self,
        subject: &str,
        artifact_type: &str,
    ) -> Result<Option<Vec<serde_json::Value>>, RemoteError> {
        let url = format!("{}/referrers/{subject}", self.base);
        let resp = self
            .send(&|c| c.get(&url).query(&[("artifactType", artifact_type)]))
            .map_err(|e| net_err(&self.r, "cannot list the referrers", e))?;
        if !resp.status().is_success() {
            return Ok(None);
        }
        let index: serde_json::Value = self
            .rt
            .block_on(resp.json())
            .map_err(|e| net_err(&self.r, "cannot read the referrers", e))?;
        Ok(Some(
            index["manifests"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|m| m["artifactType"] == artifact_type)
                .collect(),
        ))
    }

    /// A blob's bytes (small ones: manifests' layers such as signatures).
    pub fn blob(&self, digest: &str) -> Result<Vec<u8>, RemoteError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let resp = self
            .send(&|c| c.get(&url))
            .map_err(|e| net_err(&self.r, "cannot read a blob", e))?;
        let s = resp.status();
        if !s.is_success() {
            return Err(http_err(&self.r, "cannot read a blob", s, &self.text(resp)));
        }
        let bytes = self
            .rt
            .block_on(resp.bytes())
            .map_err(|e| net_err(&self.r, "cannot read a blob", e))?;
        if sha256(&bytes) != digest {
            return Err(RemoteError::Url {
                url: self.r.url.clone(),
                reason: format!("blob {digest} does not match its digest"),
            });
        }
        Ok(bytes.to_vec())
    }
}

/// Splits `a="x,y",b=z` at the commas outside quotes.
fn split_params(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().map(|p| p.trim().to_string()).collect()
}

/// What an artifact manifest says.
#[derive(Debug, Clone)]
pub struct ArtifactManifest {
    /// The manifest's own digest.
    pub digest: String,
    /// The artifact's seal.
    pub artifact_digest: String,
    /// The layer: the `.hvm` file.
    pub file_digest: String,
    pub size: u64,
}

/// The manifest of an artifact: deterministic for the same artifact.
pub fn artifact_manifest(
    a: &hvm::Artifact,
    file_digest: &str,
    size: u64,
    empty_digest: &str,
) -> Vec<u8> {
    let m = a.manifest();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": empty_digest, "size": EMPTY.len(), "data": "e30="},
        "layers": [descriptor(LAYER_TYPE, file_digest, size)],
        "annotations": {
            DIGEST_ANNOTATION: hvm::digest_string(&a.digest()),
            "dev.hyper.image.reference": m.image.reference,
            "dev.hyper.image.digest": m.image.digest,
            "dev.hyper.kernel": m.kernel.version,
        },
    });
    canonical(&manifest)
}

/// Reads an artifact manifest; refuses anything else.
pub fn parse_artifact_manifest(
    r: &Reference,
    bytes: &[u8],
    digest: &str,
) -> Result<ArtifactManifest, RemoteError> {
    let bad = |reason: &str| RemoteError::NotArtifact {
        url: r.url.clone(),
        reason: reason.to_string(),
    };
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| bad(&format!("its manifest is not JSON: {e}")))?;
    if v["artifactType"] != ARTIFACT_TYPE {
        return Err(bad(&format!(
            "its manifest is not a hyper artifact (artifactType {})",
            v["artifactType"]
        )));
    }
    let layer = &v["layers"][0];
    let artifact_digest = v["annotations"][DIGEST_ANNOTATION]
        .as_str()
        .ok_or_else(|| bad("its manifest names no artifact digest"))?;
    let (Some(file_digest), Some(size)) = (layer["digest"].as_str(), layer["size"].as_u64()) else {
        return Err(bad("its manifest has no .hvm layer"));
    };
    if layer["mediaType"] != LAYER_TYPE || v["layers"].as_array().map_or(0, Vec::len) != 1 {
        return Err(bad("its manifest's layer is not a .hvm file"));
    }
    Ok(ArtifactManifest {
        digest: digest.to_string(),
        artifact_digest: artifact_digest.to_string(),
        file_digest: file_digest.to_string(),
        size,
    })
}

/// Hashes a file: its sha256 digest and size.
pub fn file_digest(path: &Path) -> Result<(String, u64), RemoteError> {
    let mut f = std::fs::File::open(path)
        .map_err(crate::io_err(format!("cannot read {}", path.display())))?;
    let mut h = sha2::Sha256::new();
    let size = std::io::copy(&mut f, &mut h)
        .map_err(crate::io_err(format!("cannot read {}", path.display())))?;
    Ok((format!("sha256:{}", hex::encode(h.finalize())), size))
}

/// What a push did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pushed {
    pub url: String,
    pub digest: String,
    pub manifest: String,
    pub size: u64,
    /// `written`, `unchanged` or `replaced`.
    pub outcome: &'static str,
    pub transferred: u64,
}

/// Pushes the artifact at `path` to `url`. A tag that names a different
/// artifact is refused unless `replace`.
pub fn push(
    path: &Path,
    url: &str,
    creds: Option<(String, String)>,
    replace: bool,
    progress: bool,
) -> Result<Pushed, RemoteError> {
    let r = Reference::parse(url)?;
    if r.digest.is_some() {
        return Err(RemoteError::Url {
            url: url.to_string(),
            reason: "push to a tag (docker://REGISTRY/REPOSITORY:TAG), not a digest".into(),
        });
    }
    let a = hvm::Artifact::open(path).map_err(|source| RemoteError::Verify {
        url: path.display().to_string(),
        source,
    })?;
    let (file_digest, size) = file_digest(path)?;
    let reg = Registry::connect(&r, creds)?;
    let empty = sha256(EMPTY);
    let manifest = artifact_manifest(&a, &file_digest, size, &empty);
    let manifest_digest = sha256(&manifest);
    let tag = r.tag.clone().expect("a tag");
    let existing = reg.manifest(&tag)?;
    let outcome = match &existing {
        Some((_, d)) if *d == manifest_digest => "unchanged",
        Some((bytes, d)) => {
            if !replace {
                let theirs = parse_artifact_manifest(&r, bytes, d)
                    .map(|m| m.artifact_digest)
                    .unwrap_or_else(|_| format!("manifest {d}"));
                return Err(RemoteError::Exists {
                    url: url.to_string(),
                    existing: theirs,
                    ours: hvm::digest_string(&a.digest()),
                });
            }
            "replaced"
        }
        None => "written",
    };
    let mut transferred = 0;
    if outcome != "unchanged" {
        reg.put_small_blob(EMPTY)?;
        if !reg.blob_exists(&file_digest)? {
            if progress {
                eprintln!("hyperbuild: pushing {url} ({:.1} MB)", size as f64 / 1e6);
            }
            let mut f = std::fs::File::open(path)
                .map_err(crate::io_err(format!("cannot read {}", path.display())))?;
            transferred = reg.upload(&mut f, &file_digest, size, &|_| {})?;
        }
        reg.put_manifest(&tag, &manifest)?;
    }
    Ok(Pushed {
        url: url.to_string(),
        digest: hvm::digest_string(&a.digest()),
        manifest: manifest_digest,
        size,
        outcome,
        transferred,
    })
}

/// Resolves `url` to its artifact manifest.
pub fn resolve(reg: &Registry) -> Result<ArtifactManifest, RemoteError> {
    let (bytes, digest) =
        reg.manifest(reg.r.reference())?
            .ok_or_else(|| RemoteError::NotFound {
                url: reg.r.url.clone(),
            })?;
    if let Some(want) = &reg.r.digest {
        if *want != digest {
            return Err(RemoteError::Url {
                url: reg.r.url.clone(),
                reason: format!("the registry sent manifest {digest} for {want}"),
            });
        }
    }
    parse_artifact_manifest(&reg.r, &bytes, &digest)
}

/// The fallback tag of a signature of manifest `digest`.
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replace(':', "-"))
}

/// Pushes `signature` as a referrer of the artifact manifest `subject`
/// (and under its fallback tag).
pub fn push_signature(
    reg: &Registry,
    subject: &ArtifactManifest,
    subject_size: u64,
    signature: &[u8],
) -> Result<String, RemoteError> {
    let empty = reg.put_small_blob(EMPTY)?;
    let sig = reg.put_small_blob(signature)?;
    let manifest = canonical(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": SIG_ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": empty, "size": EMPTY.len(), "data": "e30="},
        "layers": [descriptor(SIG_LAYER_TYPE, &sig, signature.len() as u64)],
        "subject": descriptor(MANIFEST_TYPE, &subject.digest, subject_size),
    }));
    let digest = sha256(&manifest);
    reg.put_manifest(&digest, &manifest)?;
    reg.put_manifest(&signature_tag(&subject.digest), &manifest)?;
    Ok(digest)
}

/// The signatures of the artifact manifest `subject`: from the referrers
/// API, else from the fallback tag.
pub fn signatures(reg: &Registry, subject: &str) -> Result<Vec<Vec<u8>>, RemoteError> {
    let manifests: Vec<String> = match reg.referrers(subject, SIG_ARTIFACT_TYPE)? {
        Some(refs) if !refs.is_empty() => refs
            .iter()
            .filter_map(|d| d["digest"].as_str().map(str::to_string))
            .collect(),
        _ => vec![signature_tag(subject)],
    };
    let mut out = Vec::new();
    for m in manifests {
        let Some((bytes, _)) = reg.manifest(&m)? else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        if v["artifactType"] != SIG_ARTIFACT_TYPE || v["subject"]["digest"] != subject {
            continue;
        }
        if let Some(d) = v["layers"][0]["digest"].as_str() {
            out.push(reg.blob(d)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = Reference::parse("docker://127.0.0.1:5000/apps/web:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "apps/web", Some("v1"))
        );
        assert!(r.plain_http());
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("docker://ghcr.io/x/y@{d}")).unwrap();
        assert_eq!((r.reference(), r.plain_http()), (d.as_str(), false));
        for bad in [
            "docker://nginx:latest",
            "docker://reg.io/App:v1",
            "docker://reg.io/app",
            "docker://reg.io/app@sha256:1234",
            "s3://b/k",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn challenges_split_outside_quotes() {
        assert_eq!(
            split_params(r#"realm="http://a/token",service="reg",scope="repository:x:pull,push""#),
            [
                r#"realm="http://a/token""#,
                r#"service="reg""#,
                r#"scope="repository:x:pull,push""#
            ]
        );
    }
}
