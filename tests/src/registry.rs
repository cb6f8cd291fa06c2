//! Registries for the tests: Debian's `docker-registry` on a loopback port
//! (plain, or with htpasswd Basic auth), images pushed with `skopeo`, and a
//! small misbehaving registry of our own for faults no real one produces on
//! demand (wrong blob bytes, connections cut mid-blob, malformed manifests).

use crate::free_port;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A running `docker-registry`; stopped when dropped.
#[derive(Debug)]
pub struct Registry {
    pub addr: String,
    pub credentials: Option<(String, String)>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry; with `auth`, user `tester` / password `s3cret`.
    pub fn start(auth: bool) -> Registry {
        assert!(
            Command::new("docker-registry").arg("--version").output().is_ok_and(|o| o.status.success()),
            "docker-registry is missing: apt-get install docker-registry (scripts/install-deps does)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        let credentials = if auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", "tester", "s3cret"])
                .output()
                .expect("htpasswd (apache2-utils)");
            assert!(out.status.success());
            std::fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: hyper-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
            Some(("tester".to_string(), "s3cret".to_string()))
        } else {
            None
        };
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..200 {
            if TcpStream::connect(&addr).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        Registry {
            addr,
            credentials,
            child,
            _dir: dir,
        }
    }

    /// Pushes `oci:LAYOUT[:TAG]` (or any skopeo source) to `REPO:TAG` here.
    pub fn push(&self, source: &str, dest: &str, extra: &[&str]) {
        let mut c = Command::new("skopeo");
        c.args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(extra);
        if let Some((u, p)) = &self.credentials {
            c.arg(format!("--dest-creds={u}:{p}"));
        }
        c.arg(source).arg(format!("docker://{}/{dest}", self.addr));
        let out = c.output().expect("skopeo (apt-get install skopeo)");
        assert!(
            out.status.success(),
            "skopeo copy {source} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the fake registry misbehaves on blob downloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobFault {
    None,
    /// Serve other bytes than the digest names.
    WrongBytes,
    /// Cut the connection half-way on the first request for each blob.
    CutOnce,
    /// Cut it every time.
    CutAlways,
}

/// A minimal registry of our own serving one repository from a map of
/// manifests and blobs, with faults on demand.
#[derive(Debug)]
pub struct FakeRegistry {
    pub addr: String,
    /// How many blob GETs it answered.
    pub blob_requests: Arc<AtomicUsize>,
}

type Blobs = Arc<Mutex<std::collections::HashMap<String, (String, Vec<u8>)>>>;

impl FakeRegistry {
    /// `manifests`: reference (tag or digest) → (media type, bytes); `blobs`:
    /// digest → bytes.
    pub fn start(
        manifests: Vec<(String, String, Vec<u8>)>,
        blobs: Vec<(String, Vec<u8>)>,
        fault: BlobFault,
    ) -> FakeRegistry {
        Self::start_with(manifests, blobs, fault, false)
    }

    /// With `bearer`, every request needs the token that `/token` hands out
    /// anonymously, as Docker Hub does.
    pub fn start_with(
        manifests: Vec<(String, String, Vec<u8>)>,
        blobs: Vec<(String, Vec<u8>)>,
        fault: BlobFault,
        bearer: bool,
    ) -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap().to_string();
        let map: Blobs = Arc::new(Mutex::new(
            manifests
                .into_iter()
                .map(|(r, mt, b)| (format!("manifests/{r}"), (mt, b)))
                .collect(),
        ));
        for (d, b) in blobs {
            map.lock()
                .unwrap()
                .insert(format!("blobs/{d}"), ("application/octet-stream".into(), b));
        }
        let counter = Arc::new(AtomicUsize::new(0));
        let seen: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
        let c2 = counter.clone();
        let a2 = addr.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (map, seen, c2, addr) = (map.clone(), seen.clone(), c2.clone(), a2.clone());
                let token = bearer.then_some(addr);
                std::thread::spawn(move || {
                    serve(stream, &map, &seen, &c2, fault, token.as_deref())
                });
            }
        });
        FakeRegistry {
            addr,
            blob_requests: counter,
        }
    }
}

const TOKEN: &str = "hyper-test-token";

fn serve(
    stream: TcpStream,
    map: &Blobs,
    seen: &Mutex<std::collections::HashSet<String>>,
    count: &AtomicUsize,
    fault: BlobFault,
    bearer_realm: Option<&str>,
) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (method, path) = (
            parts.first().copied().unwrap_or(""),
            parts.get(1).copied().unwrap_or(""),
        );
        let (mut range_start, mut body_len, mut authorized) = (0usize, 0usize, false);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("range: bytes=") {
                range_start = v
                    .trim()
                    .trim_end_matches('-')
                    .split('-')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                body_len = v.trim().parse().unwrap_or(0);
            }
            if lower.trim_end() == format!("authorization: bearer {TOKEN}") {
                authorized = true;
            }
        }
        let mut sink = vec![0u8; body_len];
        let _ = reader.read_exact(&mut sink);
        if let Some(realm) = bearer_realm {
            if path.starts_with("/token") {
                let body =
                    format!(r#"{{"token":"{TOKEN}","access_token":"{TOKEN}","expires_in":300}}"#);
                let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                continue;
            }
            if !authorized {
                let msg =
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
                let _ = write!(
                    out,
                    "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://{realm}/token\",service=\"fake\",scope=\"repository:test/fake:pull\"\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    msg.len()
                );
                let _ = out.write_all(msg);
                continue;
            }
        }
        if path == "/v2/" {
            let _ = out.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}",
            );
            continue;
        }
        // /v2/<name>/manifests/<ref> or /v2/<name>/blobs/<digest>
        let key = path.rsplitn(3, '/').collect::<Vec<_>>();
        let key = if key.len() >= 2 {
            format!("{}/{}", key[1], key[0])
        } else {
            String::new()
        };
        let entry = map.lock().unwrap().get(&key).cloned();
        let Some((media_type, mut body)) = entry else {
            let msg = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"not found"}]}"#;
            let _ = write!(out, "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", msg.len());
            let _ = out.write_all(msg);
            continue;
        };
        let is_blob = key.starts_with("blobs/");
        if is_blob {
            count.fetch_add(1, Ordering::SeqCst);
            if fault == BlobFault::WrongBytes {
                for b in body.iter_mut().step_by(97) {
                    *b ^= 0xff;
                }
            }
        }
        let first_time = seen.lock().unwrap().insert(key.clone());
        let cut = is_blob
            && (fault == BlobFault::CutAlways || (fault == BlobFault::CutOnce && first_time))
            && body.len() > 1;
        let (status, slice) = if is_blob && range_start > 0 && range_start < body.len() {
            ("206 Partial Content", &body[range_start..])
        } else {
            ("200 OK", &body[..])
        };
        let _ = write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Type: {media_type}\r\nContent-Length: {}\r\n\r\n",
            slice.len()
        );
        if method == "HEAD" {
            continue;
        }
        if cut {
            let _ = out.write_all(&slice[..slice.len() / 2]);
            let _ = out.flush();
            let _ = out.shutdown(std::net::Shutdown::Both);
            return;
        }
        let _ = out.write_all(slice);
    }
}

/// The blobs of an OCI layout, for feeding the fake registry.
pub fn layout_blobs(layout: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(layout.join("blobs/sha256"))
        .expect("blobs")
        .map(|e| {
            let p: PathBuf = e.unwrap().path();
            (
                format!("sha256:{}", p.file_name().unwrap().to_string_lossy()),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}
