//! The net tier: real servers built from Debian's packages (nginx,
//! redis-server; `scripts/make-app-image`) booted on the QEMU backend and
//! reached through `-p`/`-P` (user-mode networking, no root), outbound
//! connections from the guest to a host loopback service, tap mode (root),
//! and the error paths.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper_tests::*;

/// Builds (once) an artifact of `scripts/make-app-image APP`.
fn app_artifact(app: &str) -> PathBuf {
    static NGINX: OnceLock<PathBuf> = OnceLock::new();
    static REDIS: OnceLock<PathBuf> = OnceLock::new();
    let cell = if app == "nginx" { &NGINX } else { &REDIS };
    cell.get_or_init(|| {
        let layout = scratch().join(format!("{app}-layout"));
        let out = Command::new(repo().join("scripts/make-app-image"))
            .arg(&layout)
            .arg(app)
            .output()
            .expect("run make-app-image");
        assert!(
            out.status.success(),
            "make-app-image {app}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let artifact = scratch().join(format!("{app}.hvm"));
        let o = build(&layout, &artifact);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        artifact
    })
    .clone()
}

/// A VM running in the background; SIGKILLed if still running when dropped.
struct Vm {
    child: Child,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Vm {
    fn start(artifact: &Path, flags: &[&str], cmd: &[&str]) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let stderr_path = dir.path().join("stderr");
        let child = hyperboot()
            .args(["--backend", "qemu", "--timeout", "300"])
            .args(flags)
            .arg(artifact)
            .args(if cmd.is_empty() { &[][..] } else { &["--"][..] })
            .args(cmd)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("start hyperboot");
        Vm {
            child,
            stderr_path,
            _dir: dir,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGTERM, then the exit code.
    fn stop(mut self) -> Option<i32> {
        let _ = nix_kill(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nix_kill(pid: u32, sig: i32) -> i32 {
    // SAFETY: kill() takes no pointers.
    unsafe { libc::kill(pid as i32, sig) }
}

/// One HTTP/1.0 GET: (status line, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(String, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let status = String::from_utf8_lossy(&resp[..split])
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    Ok((status, resp[split + 4..].to_vec()))
}

/// Waits until `port` answers HTTP (the guest boots under TCG).
fn wait_http(vm: &mut Vm, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if http_get(port, "/").is_ok_and(|(s, _)| s.contains("200")) {
            return;
        }
        if let Ok(Some(st)) = vm.child.try_wait() {
            panic!("hyperboot exited {st:?}: {}", vm.stderr());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("no HTTP answer on {port}: {}", vm.stderr());
}

const INDEX: &[u8] = b"hello from nginx in a hyper microVM\n";

#[test]
fn nginx_through_published_port_under_load() {
    let port = free_port();
    let closed = free_port();
    let mut vm = Vm::start(
        &app_artifact("nginx"),
        &[
            "-p",
            &format!("127.0.0.1:{port}:80"),
            "-p",
            &format!("127.0.0.1:{closed}:81"),
        ],
        &[],
    );
    wait_http(&mut vm, port);
    let (status, body) = http_get(port, "/").unwrap();
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, INDEX);

    // A client that never reads a big response, and clients that connect and
    // never send anything, do not stall the others.
    let mut stalled = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stalled, "GET /big.bin HTTP/1.0\r\n\r\n").unwrap();
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();

    // 200 concurrent connections all complete with the right body.
    let handles: Vec<_> = (0..200)
        .map(|_| std::thread::spawn(move || http_get(port, "/")))
        .collect();
    let mut ok = 0;
    for h in handles {
        match h.join().unwrap() {
            Ok((s, b)) if s.contains("200") && b == INDEX => ok += 1,
            other => eprintln!("bad response: {other:?}"),
        }
    }
    assert_eq!(ok, 200, "all 200 concurrent requests must succeed");
    let (_, big) = http_get(port, "/big.bin").unwrap();
    assert_eq!(big.len(), 8 << 20);
    assert!(big.iter().all(|b| *b == b'x'));
    drop((stalled, idle));

    // Nothing listens on guest port 81: the host side is closed cleanly, quickly.
    let started = Instant::now();
    let mut c = TcpStream::connect(("127.0.0.1", closed)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = c.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut buf = [0u8; 16];
    let r = c.read(&mut buf);
    assert!(
        matches!(r, Ok(0))
            || r.as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "refused guest port: {r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let _ = c.shutdown(Shutdown::Both);

    // The app stops (StopSignal SIGQUIT, graceful) and the listener goes away.
    let code = vm.stop();
    assert!(code.is_some(), "hyperboot did not exit after SIGTERM");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the published port is still open after the VM ended"
    );
}

#[test]
fn redis_answers_ping_through_publish_all() {
    let mut vm = Vm::start(&app_artifact("redis"), &["-P"], &[]);
    // -P prints the mapping it chose.
    let deadline = Instant::now() + Duration::from_secs(30);
    let port = loop {
        let e = vm.stderr();
        if let Some(p) = e
            .lines()
            .find_map(|l| l.strip_prefix("hyperboot: published 6379/tcp -> 0.0.0.0:"))
        {
            break p.trim().parse::<u16>().unwrap();
        }
        assert!(Instant::now() < deadline, "no mapping printed: {e}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let pong = loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"PING\r\n")?;
            let mut b = [0u8; 64];
            let n = s.read(&mut b)?;
            Ok(String::from_utf8_lossy(&b[..n]).into_owned())
        })();
        if let Ok(p) = attempt {
            if !p.is_empty() {
                break p;
            }
        }
        if let Ok(Some(st)) = vm.child.try_wait() {
            panic!("hyperboot exited {st:?}: {}", vm.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "redis never answered: {}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(pong, "+PONG\r\n");
    vm.stop();
}

#[test]
fn guest_reaches_host_loopback_services() {
    // A one-shot HTTP server on the host's loopback.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut req = [0u8; 1024];
        let n = c.read(&mut req).unwrap();
        let body = "host says hi";
        write!(
            c,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        String::from_utf8_lossy(&req[..n]).into_owned()
    });
    let r = boot(
        busybox_artifact(),
        &[
            "--",
            "sh",
            "-c",
            &format!("wget -qO- http://host.hyper.internal:{port}/from-guest; echo; cat /etc/resolv.conf"),
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.starts_with("host says hi\n"), "{}", r.stdout);
    assert!(r.stdout.contains("nameserver 10.0.2.3"), "{}", r.stdout);
    let req = server.join().unwrap();
    assert!(req.starts_with("GET /from-guest"), "{req}");
}

#[test]
fn no_network_and_bad_publish_flags() {
    let r = boot(
        busybox_artifact(),
        &["--net", "none", "--", "sh", "-c", "ls /sys/class/net"],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    let r = boot(
        busybox_artifact(),
        &["--", "sh", "-c", "ls /sys/class/net; hostname -i"],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.contains("eth0") && r.stdout.contains("10.0.2.15"),
        "{}",
        r.stdout
    );

    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = busy.local_addr().unwrap().port();
    for (flags, want) in [
        (
            vec!["-p".to_string(), format!("127.0.0.1:{p}:80")],
            "cannot publish 80/tcp",
        ),
        (vec!["-p".into(), "80:".into()], "bad guest port"),
        (
            vec!["--net".into(), "none".into(), "-p".into(), "8080:80".into()],
            "need a network",
        ),
        (vec!["--net".into(), "bridge".into()], "--net"),
    ] {
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend(["--", "true"]);
        let r = boot(busybox_artifact(), &args);
        assert_eq!(r.code, Some(125), "{flags:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{flags:?}: {}", r.stderr);
    }
}

#[test]
fn tap_network_with_published_port() {
    if !nix_is_root() {
        skip(
            "net::tap_network_with_published_port",
            "creating a tap device needs CAP_NET_ADMIN (run the tests as root)",
        );
        return;
    }
    let port = free_port();
    let mut vm = Vm::start(
        &app_artifact("nginx"),
        &["--net", "tap", "-p", &format!("127.0.0.1:{port}:80")],
        &[],
    );
    wait_http(&mut vm, port);
    let (status, body) = http_get(port, "/").unwrap();
    assert!(status.contains("200"));
    assert_eq!(body, INDEX);
    let handles: Vec<_> = (0..50)
        .map(|_| std::thread::spawn(move || http_get(port, "/")))
        .collect();
    for h in handles {
        let (s, b) = h
            .join()
            .unwrap()
            .expect("request through the tap forwarder");
        assert!(s.contains("200") && b == INDEX);
    }
    // The guest is reachable on its own address from the host, too.
    let r = boot(
        busybox_artifact(),
        &[
            "--net",
            "tap",
            "--",
            "sh",
            "-c",
            "hostname -i; ip route 2>/dev/null || route -n",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.starts_with("10.213."), "{}", r.stdout);
    vm.stop();
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid() takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The KVM VMM's `-v` server under a real client with user space on any
/// host: the project's kernel, booted on QEMU, mounts it over TCP (the same
/// 9p client as over virtio, another transport) and busybox works in it.
/// On the KVM backend itself the same server sits behind virtio-9p (the
/// slow tier mounts it with the kernel; kvm_app runs this on hardware).
#[test]
fn the_kvm_share_server_under_a_real_kernel_client() {
    let rw = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(rw.path().join("in"), "from the host\n").unwrap();
    std::fs::create_dir(rw.path().join("many")).unwrap();
    for i in 0..300 {
        std::fs::write(rw.path().join(format!("many/entry-{i:03}")), "").unwrap();
    }
    std::fs::write(ro.path().join("f"), "read me\n").unwrap();
    let (p_rw, p_ro) = (
        serve_9p_over_tcp(rw.path(), false),
        serve_9p_over_tcp(ro.path(), true),
    );
    let opts = "trans=tcp,version=9p2000.L,msize=262144,cache=none";
    let script = format!(
        "set -e; mkdir -p /w /r; \
         mount -t 9p -o {opts},port={p_rw} 10.0.2.2 /w; mount -t 9p -o {opts},port={p_ro} 10.0.2.2 /r; \
         cat /w/in /r/f; echo x > /r/g 2>/dev/null || echo ro-refused; \
         echo written > /w/out; mkdir -p /w/d/e; echo deep > /w/d/e/f; mv /w/d /w/moved; \
         ln -s moved/e/f /w/link; cat /w/link; ln /w/out /w/hard; \
         dd if=/dev/urandom of=/w/big bs=64k count=64 2>/dev/null; \
         sha256sum /w/big | cut -c1-64 > /w/big.sum; cmp /w/big /w/big; \
         truncate -s 3 /w/hard; cat /w/out; echo; \
         chmod 640 /w/out; touch -d '2001-02-03 04:05:06' /w/out; stat -c '%a %s %Y' /w/out; \
         ls /w/many | wc -l; cp -a /etc /w/etc; diff -r /etc /w/etc && echo same; rm -r /w/etc; rm /w/in; rmdir /w/moved/e 2>/dev/null || echo not-empty; ls /w"
    );
    let r = boot(busybox_artifact(), &["--", "sh", "-c", &script]);
    assert_eq!(
        r.stdout,
        "from the host\nread me\nro-refused\ndeep\nwri\n640 3 981173106\n300\nsame\nnot-empty\n\
         big\nbig.sum\nhard\nlink\nmany\nmoved\nout\n",
        "{}",
        r.stderr
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    // What the guest did is on the host.
    let host = |p: &str| rw.path().join(p);
    assert_eq!(
        std::fs::read_to_string(host("moved/e/f")).unwrap(),
        "deep\n"
    );
    assert_eq!(
        std::fs::read_link(host("link")).unwrap(),
        Path::new("moved/e/f")
    );
    assert_eq!(std::fs::read(host("out")).unwrap(), b"wri", "hard link");
    assert!(!host("in").exists() && !ro.path().join("g").exists());
    let sum = Command::new("sha256sum").arg(host("big")).output().unwrap();
    assert_eq!(
        &String::from_utf8_lossy(&sum.stdout)[..64],
        std::fs::read_to_string(host("big.sum")).unwrap().trim(),
        "4 MiB written by the guest arrive intact"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(host("out")).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.mtime()), (0o640, 981_173_106));
}
