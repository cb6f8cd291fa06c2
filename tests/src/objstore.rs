//! Object storage for the tests: moto's S3 server (from PyPI, installed by
//! `scripts/pytools`) on a loopback port, and a TCP proxy that cuts
//! connections on demand to interrupt uploads and downloads.
//!
//! Why moto: it implements the S3 API hyper uses (multipart uploads incl.
//! abort and listing, ranged and conditional GETs, HEAD) faithfully enough
//! that AWS's own SDKs are tested against it, installs in seconds from PyPI,
//! and serves objects over plain HTTP for the `http://` boot path. s3s-fs
//! would take minutes to compile on a 2-core CI machine.

use std::io::{Read, Write};

use crate::free_port;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The Python tools venv (`scripts/pytools`): `$HYPER_PYTOOLS`, else
/// `$XDG_CACHE_HOME/hyper/pytools`. Read once, before tests change the environment of the commands they run.
pub fn pytools() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        if let Some(p) = std::env::var_os("HYPER_PYTOOLS") {
            return PathBuf::from(p);
        }
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
            })
            .join("hyper/pytools")
    })
}

/// A running moto S3 server; stopped when dropped.
#[derive(Debug)]
pub struct S3Server {
    pub addr: String,
    child: Child,
}

impl S3Server {
    pub fn start() -> S3Server {
        let bin = pytools().join("bin/moto_server");
        assert!(
            bin.exists(),
            "{} is missing: run scripts/pytools (scripts/install-deps does)",
            bin.display()
        );
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let addr = format!("127.0.0.1:{port}");
        let mut s = S3Server { addr, child };
        // Python's start-up (moto imports a great deal) takes seconds on a
        // loaded machine and tens of seconds in the nested test host, where
        // every file comes over 9p at TCG speed: a generous deadline, and an
        // early, clear failure if the server exited instead.
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(300) {
            if s.request("GET", "/", b"")
                .is_some_and(|(code, _)| code == 200)
            {
                return s;
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!(
                    "moto_server exited ({status}) before answering on {}",
                    s.addr
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "moto_server did not answer on {} within {:?}",
            s.addr,
            start.elapsed()
        );
    }

    /// The endpoint URL (for `AWS_ENDPOINT_URL`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One plain HTTP request: status and body (moto answers unsigned
    /// requests for public objects and its own health).
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
        raw_request(&self.addr, method, path, body)
    }

    fn aws_ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.aws().args(args).output().expect("awscli");
        assert!(
            out.status.success(),
            "aws {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Creates a bucket.
    pub fn bucket(&self, name: &str) {
        self.aws_ok(&["s3api", "create-bucket", "--bucket", name]);
    }

    /// The bytes under a key, or None when there is no such object.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let out = self
            .aws()
            .args(["s3", "cp", "--quiet", &format!("s3://{bucket}/{key}"), "-"])
            .output()
            .expect("awscli");
        out.status.success().then_some(out.stdout)
    }

    /// Makes an object readable without credentials (for http:// boots).
    pub fn make_public(&self, bucket: &str, key: &str) {
        self.aws_ok(&[
            "s3api",
            "put-object-acl",
            "--bucket",
            bucket,
            "--key",
            key,
            "--acl",
            "public-read",
        ]);
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub fn pending_uploads(&self, bucket: &str) -> usize {
        let out = self.aws_ok(&["s3api", "list-multipart-uploads", "--bucket", bucket]);
        String::from_utf8_lossy(&out)
            .matches("\"UploadId\"")
            .count()
    }

    /// Stores raw bytes under a key, bypassing hyper (with awscli, a
    /// standard S3 client).
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let f = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(f.path(), bytes).unwrap();
        let out = self
            .aws()
            .args(["s3", "cp", "--quiet"])
            .arg(f.path())
            .arg(format!("s3://{bucket}/{key}"))
            .output()
            .expect("awscli");
        assert!(
            out.status.success(),
            "aws s3 cp: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// awscli (from the pytools venv) pointed at this server.
    pub fn aws(&self) -> Command {
        let mut c = Command::new(pytools().join("bin/aws"));
        c.envs(self.env())
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .arg("--endpoint-url")
            .arg(self.endpoint());
        c
    }

    /// The environment a hyper command needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raw_request(addr: &str, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = resp[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Some((code, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < eol + 2 + n {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[(eol + 4 + n).min(b.len())..];
    }
}

/// Which way a [`CutProxy`] counts bytes and cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server (uploads).
    Up,
    /// Server to client (downloads).
    Down,
}

/// A TCP proxy to `upstream` that cuts a connection once more than `after`
/// bytes went through it in `dir`, for the first `cuts` connections that get
/// that far (`usize::MAX`: always).
#[derive(Debug)]
pub struct CutProxy {
    pub addr: String,
    /// Connections cut so far.
    pub cut: Arc<AtomicUsize>,
}

impl CutProxy {
    pub fn start(upstream: &str, dir: Direction, after: usize, cuts: usize) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicUsize::new(0));
        let upstream = upstream.to_string();
        let counter = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let counter = counter.clone();
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (watched_from, watched_to, other_from, other_to) = match dir {
                    Direction::Up => (client, server, s2, c2),
                    Direction::Down => (server, client, c2, s2),
                };
                std::thread::spawn(move || pipe(other_from, other_to, None));
                std::thread::spawn(move || {
                    pipe(watched_from, watched_to, Some((after, cuts, counter)))
                });
            }
        });
        CutProxy { addr, cut }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, cut: Option<(usize, usize, Arc<AtomicUsize>)>) {
    let mut buf = [0u8; 16384];
    let mut seen = 0usize;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        seen += n;
        if let Some((after, cuts, counter)) = &cut {
            if seen > *after
                && counter
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                        (c < *cuts).then_some(c + 1)
                    })
                    .is_ok()
            {
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
