//! The network scenarios: real servers built from Debian's packages (nginx,
//! redis-server; `scripts/make-app-image`) reached through `-p`/`-P`
//! (user-mode networking, no root), outbound connections from the guest to a
//! host loopback service, tap mode (root), a namespace's interface taken
//! over (`--net redirect`, root), and the error paths. Run on the
//! QEMU backend by the net tier and on the KVM backend by the nested tier.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper_tests::*;

/// Every scenario of this file, as a test on `$backend`.
macro_rules! net_scenarios {
    ($backend:expr) => {
        scenarios!($backend; net:
            nginx_through_published_port_under_load,
            redis_answers_ping_through_publish_all,
            guest_reaches_host_loopback_services,
            no_network_and_bad_publish_flags,
            tap_network_with_published_port,
            redirect_network_takes_over_a_namespace_interface,
        );
    };
}

/// Builds (once) an artifact of `scripts/make-app-image APP`.
pub fn app_artifact(app: &str) -> PathBuf {
    static NGINX: OnceLock<PathBuf> = OnceLock::new();
    static REDIS: OnceLock<PathBuf> = OnceLock::new();
    let cell = if app == "nginx" { &NGINX } else { &REDIS };
    cell.get_or_init(|| {
        let artifact = scratch().join(format!("{app}.hvm"));
        // Made before in this run (the host's tiers, for the nested one):
        // taken as it is, where making the image at TCG speed costs minutes.
        let script = repo().join("scripts/make-app-image");
        let cached = std::env::var_os("HYPER_TEST_FIXTURES").map(|d| {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            h.update(app.as_bytes());
            h.update(std::fs::read(&script).unwrap_or_default());
            for f in [kernel(), init(), &bin_path("hyperbuild")] {
                let m = std::fs::metadata(f).expect("build input");
                h.update(format!("{}:{:?};", m.len(), m.modified().ok()));
            }
            PathBuf::from(d).join(format!("app-{app}-{}.hvm", hex::encode(h.finalize())))
        });
        if let Some(c) = cached.as_ref().filter(|c| c.exists()) {
            std::fs::copy(c, &artifact).expect("copy a cached app artifact");
            return artifact;
        }
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
        let o = build(&layout, &artifact);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        if let Some(c) = cached {
            let tmp = c.with_extension("tmp");
            if std::fs::copy(&artifact, &tmp).is_ok() {
                let _ = std::fs::rename(&tmp, &c);
            }
        }
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
    fn start(b: Backend, artifact: &Path, flags: &[&str], cmd: &[&str]) -> Vm {
        Vm::start_in(None, b, artifact, flags, cmd)
    }

    /// As [`Vm::start`], in the network namespace `ns`.
    fn start_in(
        ns: Option<&NetNs>,
        b: Backend,
        artifact: &Path,
        flags: &[&str],
        cmd: &[&str],
    ) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let stderr_path = dir.path().join("stderr");
        let mut c = b.hyperboot();
        if let Some(ns) = ns {
            ns.enter(&mut c);
        }
        let child = c
            .args(["--timeout", "300"])
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
    http_get_at("127.0.0.1", port, path)
}

fn http_get_at(host: &str, port: u16, path: &str) -> std::io::Result<(String, Vec<u8>)> {
    let mut s = TcpStream::connect((host, port))?;
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

pub fn nginx_through_published_port_under_load(b: Backend) {
    let port = free_port();
    let closed = free_port();
    let mut vm = Vm::start(
        b,
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

    under_load(port);
    closed_port(closed);
    stop_closes_the_port(vm, port);
}

/// A client that never reads a big response, and clients that connect and
/// never send anything, do not stall the others; 200 at once all succeed.
fn under_load(port: u16) {
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
}

fn closed_port(closed: u16) {
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
}

fn stop_closes_the_port(vm: Vm, port: u16) {
    // The app stops (StopSignal SIGQUIT, graceful) and the listener goes away.
    let code = vm.stop();
    assert!(code.is_some(), "hyperboot did not exit after SIGTERM");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the published port is still open after the VM ended"
    );
}

pub fn redis_answers_ping_through_publish_all(b: Backend) {
    let mut vm = Vm::start(b, &app_artifact("redis"), &["-P"], &[]);
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

pub fn guest_reaches_host_loopback_services(b: Backend) {
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
    let r = b.boot(
        busybox_artifact(),
        &[
            "--net",
            "user",
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

pub fn no_network_and_bad_publish_flags(b: Backend) {
    let r = b.boot(
        busybox_artifact(),
        &["--net", "none", "--", "sh", "-c", "ls /sys/class/net"],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    // Without network flags the QEMU backend gives the guest user-mode
    // networking; the KVM backend boots without a card (its fastest) unless
    // -p, -P or --net asks for one.
    let r = b.boot(
        busybox_artifact(),
        &["--", "sh", "-c", "ls /sys/class/net; hostname -i"],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    match b {
        Backend::Qemu => assert!(
            r.stdout.contains("eth0") && r.stdout.contains("10.0.2.15"),
            "{}",
            r.stdout
        ),
        Backend::Kvm | Backend::KvmRestored => assert!(
            r.stdout.starts_with("lo\n") && !r.stdout.contains("eth0"),
            "{}",
            r.stdout
        ),
    }
    let r = b.boot(
        busybox_artifact(),
        &[
            "--net",
            "user",
            "--",
            "sh",
            "-c",
            "ls /sys/class/net; hostname -i",
        ],
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
        let r = b.boot(busybox_artifact(), &args);
        assert_eq!(r.code, Some(125), "{flags:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{flags:?}: {}", r.stderr);
    }
}

pub fn tap_network_with_published_port(b: Backend) {
    if !nix_is_root() {
        skip(
            &format!("{}::tap_network_with_published_port", b.name()),
            "creating a tap device needs CAP_NET_ADMIN (run the tests as root)",
        );
        return;
    }
    let port = free_port();
    let mut vm = Vm::start(
        b,
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
    let r = b.boot(
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

/// `--net redirect`: the guest takes over a namespace's veth (as a pod's,
/// made here as CNI makes one): its MAC, address and route, and nginx in it
/// answers at that address from the other end of the veth.
pub fn redirect_network_takes_over_a_namespace_interface(b: Backend) {
    if !nix_is_root() {
        skip(
            &format!(
                "{}::redirect_network_takes_over_a_namespace_interface",
                b.name()
            ),
            "a network namespace and a tap need CAP_NET_ADMIN (run the tests as root)",
        );
        return;
    }
    // Its own subnet per backend: the net and nested tiers may share a host.
    let ns = NetNs::new(if b.name() == "qemu" { 21 } else { 22 });
    let mut vm = Vm::start_in(
        Some(&ns),
        b,
        &app_artifact("nginx"),
        &["--net", "redirect"],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let (status, body) = loop {
        match http_get_at(&ns.pod_ip, 80, "/") {
            Ok(r) => break r,
            Err(e) => {
                if let Ok(Some(st)) = vm.child.try_wait() {
                    panic!("hyperboot exited {st:?}: {}", vm.stderr());
                }
                assert!(
                    Instant::now() < deadline,
                    "no answer at {}: {e}: {}",
                    ns.pod_ip,
                    vm.stderr()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, INDEX);
    assert!(ns.qdiscs().contains("ingress"), "{}", ns.qdiscs());
    vm.stop();
    assert!(
        ns.redirect_gone(),
        "the redirect went with the VM: {}",
        ns.qdiscs()
    );
    // The guest's side of it.
    let mut c = b.hyperboot();
    ns.enter(&mut c);
    let out = c
        .args(["--timeout", "300", "--net", "redirect"])
        .arg(busybox_artifact())
        .args(["--", "sh", "-c"])
        .arg(format!(
            "cat /sys/class/net/eth0/address; ip -4 addr show eth0 | grep -o 'inet [0-9./]*'; ip route | grep default; ping -c 1 -W 5 {} >/dev/null && echo gateway-answers",
            ns.gateway
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], ns.mac(), "the interface's MAC: {text}");
    assert_eq!(lines[1], format!("inet {}/24", ns.pod_ip), "{text}");
    assert!(lines[2].contains(&format!("via {}", ns.gateway)), "{text}");
    assert_eq!(lines[3], "gateway-answers", "{text}");
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid() takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
