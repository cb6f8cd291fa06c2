//! The VMM tier: tiny test guests built from `tests/guests/` boot on
//! hyperboot's own KVM VMM. They run on any KVM, nested PVM included; without
//! /dev/kvm each test says loudly that it was skipped.

use hyper_tests::*;

fn kvm_or_skip(test: &str) -> bool {
    if kvm_usable() {
        return true;
    }
    skip(test, "no usable /dev/kvm on this host");
    false
}

/// Test guests that wait by spinning (no interrupts) never leave the CPU;
/// on a 2-core nested host two of them at once starve the host-side threads
/// and processes a networked guest needs (passt, the receive thread). Tests
/// with long-spinning guests take turns.
static SPINNING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn spinning() -> std::sync::MutexGuard<'static, ()> {
    SPINNING.lock().unwrap_or_else(|e| e.into_inner())
}

fn guest(name: &str, defines: &[&str]) -> std::path::PathBuf {
    guest_artifact(&build_guest(name, defines), &pattern_rootfs(64 * 1024))
}

#[test]
fn console_output_and_exit_code() {
    if !kvm_or_skip("vmm::console_output_and_exit_code") {
        return;
    }
    let r = boot_kvm(&guest("hello", &[]), &[]);
    assert_eq!(r.code, Some(42), "{r:?}");
    assert_eq!(r.stdout, "hello from a test guest\n");
}

#[test]
fn the_exit_port_alone_gives_the_exit_code() {
    if !kvm_or_skip("vmm::the_exit_port_alone_gives_the_exit_code") {
        return;
    }
    let r = boot_kvm(&guest("exitport", &[]), &[]);
    assert_eq!(r.code, Some(7), "{r:?}");
}

#[test]
fn the_vcpu_sees_a_hypervisor_and_the_tsc_deadline_timer_kvm_has() {
    if !kvm_or_skip("vmm::the_vcpu_sees_a_hypervisor_and_the_tsc_deadline_timer_kvm_has") {
        return;
    }
    let r = boot_kvm(&guest("cpuid", &[]), &[]);
    assert_eq!(r.code, Some(0), "{r:?}");
    // Asked as the VMM asks when it sets the vCPU's CPUID.
    let kvm = hyper_vmm::kvm::open().expect("/dev/kvm");
    let want = u8::from(kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer));
    assert_eq!(r.stdout, format!("tsc-deadline={want}\n"), "{r:?}");
}

#[test]
fn a_spinning_guest_is_stopped_by_the_timeout() {
    let _turn = spinning();
    if !kvm_or_skip("vmm::a_spinning_guest_is_stopped_by_the_timeout") {
        return;
    }
    let started = std::time::Instant::now();
    let r = boot_kvm(&guest("spin", &[]), &["--timeout", "1"]);
    assert_eq!(r.code, Some(124), "{r:?}");
    assert!(r.stderr.contains("--timeout"), "{r:?}");
    // Where it stood, for whoever must find out why: the test guest has no
    // init to speak and writes nothing.
    assert!(
        r.stderr
            .contains("at the timeout, this cold VM's init had said: nothing;")
            && r.stderr.contains("the app's output had not come"),
        "{r:?}"
    );
    assert!(started.elapsed().as_secs() < 10);
}

#[test]
fn virtio_blk_serves_the_rootfs_read_only() {
    if !kvm_or_skip("vmm::virtio_blk_serves_the_rootfs_read_only") {
        return;
    }
    let r = boot_kvm(&guest("virtio", &["MODE=0"]), &[]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("reads verified, write refused"), "{r:?}");
}

#[test]
fn hostile_virtio_guests_fail_their_requests_not_the_vmm() {
    if !kvm_or_skip("vmm::hostile_virtio_guests_fail_their_requests_not_the_vmm") {
        return;
    }
    let names = [
        "queue outside memory",
        "data outside memory",
        "descriptor loop",
        "absurd lengths",
        "unknown registers",
        "avail index jump",
        "read-only status",
    ];
    for (i, name) in names.iter().enumerate() {
        let mode = i + 1;
        let r = boot_kvm(
            &guest("virtio", &[&format!("MODE={mode}")]),
            &["--timeout", "20"],
        );
        assert_eq!(r.code, Some(0), "mode {mode} ({name}): {r:?}");
        assert!(
            r.stdout
                .contains(&format!("still serves after mode {mode}")),
            "mode {mode} ({name}): {r:?}"
        );
    }
}

/// The app's output path on the KVM VMM: a virtio-console whose ports are
/// named as hyperinit expects; each port's bytes reach hyperboot's stdout or
/// stderr, apart, after the control handshake a Linux guest does.
#[test]
fn virtio_console_ports_reach_stdout_and_stderr_apart() {
    if !kvm_or_skip("vmm::virtio_console_ports_reach_stdout_and_stderr_apart") {
        return;
    }
    let r = boot_kvm(&guest("console", &["MODE=0"]), &["--timeout", "20"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(
        r.stdout, "to stdout over virtio\nconsole: both ports written\n",
        "{r:?}"
    );
    assert!(r.stderr.contains("to stderr over virtio\n"), "{r:?}");
    assert!(!r.stdout.contains("stderr over"), "{r:?}");
}

/// `-i` on the KVM VMM: hyperboot's stdin reaches the guest on the
/// `hyper.stdin` port (more than the device buffers at once, so the reader
/// waits for the guest), and `stdin-eof N` on COM2 says where it ended; the
/// guest echoes it all back on its stdout port.
#[test]
fn stdin_reaches_the_guest_on_its_port_and_its_end_is_announced() {
    let _turn = spinning();
    if !kvm_or_skip("vmm::stdin_reaches_the_guest_on_its_port_and_its_end_is_announced") {
        return;
    }
    use std::io::Write;
    let input: Vec<u8> = (0..3_000_000u32)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz\n"[(i % 27) as usize])
        .collect();
    let mut child = std::process::Command::new(bin_path("hyperboot"))
        .args(["--backend", "kvm", "-i", "--timeout", "60"])
        .arg(guest("console", &["MODE=2"]))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feed = input.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&feed));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let mut want = b"to stdout over virtio\n".to_vec();
    want.extend_from_slice(&input);
    want.extend_from_slice(format!("console: echoed {} bytes\n", input.len()).as_bytes());
    assert!(
        out.stdout == want,
        "stdout differs ({} bytes, want {}); stderr: {stderr}",
        out.stdout.len(),
        want.len()
    );
}

/// User-mode networking on the KVM VMM: virtio-net frames go to passt over
/// a socket pair and back; the guest's ARP request for the gateway is
/// answered. MODE 1 first sends frames the device must refuse and posts a
/// receive buffer too small for any frame.
#[test]
fn virtio_net_reaches_passt_and_back() {
    let _turn = spinning();
    if !kvm_or_skip("vmm::virtio_net_reaches_passt_and_back") {
        return;
    }
    for mode in [0, 1] {
        let r = boot_kvm(
            &guest("net", &[&format!("MODE={mode}")]),
            &["--net", "user", "--timeout", "30"],
        );
        assert_eq!(r.code, Some(0), "mode {mode}: {r:?}");
        assert!(
            r.stdout.contains("net: 10.0.2.2 is-at "),
            "mode {mode}: {r:?}"
        );
    }
}

/// `-p` on the KVM VMM: a client's connection to the published host port
/// goes through hyperboot's relay and passt, and arrives in the guest as a
/// TCP SYN for its port 80 in a virtio-net frame.
#[test]
fn a_published_port_reaches_the_guest_through_passt() {
    let _turn = spinning();
    if !kvm_or_skip("vmm::a_published_port_reaches_the_guest_through_passt") {
        return;
    }
    use std::io::BufRead;
    let port = free_port();
    let mut child = std::process::Command::new(bin_path("hyperboot"))
        .args(["--backend", "kvm", "--timeout", "60", "-p"])
        .arg(format!("127.0.0.1:{port}:80"))
        .arg(guest("net", &["MODE=2"]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("net: 10.0.2.2 is-at "), "{line:?}");
    // The guest knows its gateway; now a client connects to the published port.
    let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "net: SYN for 10.0.2.15:80\n");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    drop(client);
}

/// `--net tap` on the KVM VMM: a datagram the host sends to the tap's
/// broadcast address reaches the guest, which then asks for the host by ARP
/// and gets the host kernel's answer. Needs CAP_NET_ADMIN.
#[test]
fn virtio_net_on_a_tap_talks_to_the_host() {
    let _turn = spinning();
    if !kvm_or_skip("vmm::virtio_net_on_a_tap_talks_to_the_host") {
        return;
    }
    if !unsafe_is_root() {
        skip(
            "vmm::virtio_net_on_a_tap_talks_to_the_host",
            "--net tap needs CAP_NET_ADMIN (run as root)",
        );
        return;
    }
    use std::io::BufRead;
    let tap = "hytapvmm0";
    let mut child = std::process::Command::new(bin_path("hyperboot"))
        .args(["--backend", "kvm", "--timeout", "60", "--net"])
        .arg(format!("tap:{tap}"))
        .arg(guest("net", &["MODE=3"]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "net: listening\n");
    let ip = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", tap])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ip.stdout).into_owned();
    let host: std::net::Ipv4Addr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address on {tap}: {text}"));
    let broadcast = std::net::Ipv4Addr::from(u32::from(host) | 3);
    let sock = std::net::UdpSocket::bind((host, 0)).unwrap();
    sock.set_broadcast(true).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let sender = std::thread::spawn(move || {
        while !d.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = sock.send_to(b"hello guest", (broadcast, 9));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    line.clear();
    out.read_line(&mut line).unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    sender.join().unwrap();
    assert_eq!(line, format!("net: tap host {host} answered\n"));
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// Control messages for ports that do not exist, unknown events, short
/// messages, and transmit buffers the device may not read are refused; the
/// handshake and the honest writes after them still work.
#[test]
fn a_hostile_console_driver_fails_its_requests_not_the_vmm() {
    if !kvm_or_skip("vmm::a_hostile_console_driver_fails_its_requests_not_the_vmm") {
        return;
    }
    let r = boot_kvm(&guest("console", &["MODE=1"]), &["--timeout", "20"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.starts_with("to stdout over virtio\n"), "{r:?}");
    assert!(r.stderr.contains("to stderr over virtio\n"), "{r:?}");
}

#[test]
fn the_vmm_runs_under_seccomp() {
    if !kvm_or_skip("vmm::the_vmm_runs_under_seccomp") {
        return;
    }
    let art = guest("spin", &[]);
    let mut child = hyperboot()
        .args([
            "--backend",
            "kvm",
            "--memory",
            "64M",
            "--timeout",
            "20",
            "--stop-timeout",
            "0",
        ])
        .arg(&art)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The guest prints before it spins. hyperboot's own thread filters
    // itself once the VM runs, a moment later: every thread must carry a
    // filter soon after (each one's status, not only the main thread's).
    let mut line = [0u8; 9];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut line).unwrap();
    let unfiltered = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .unwrap()
            .flatten()
            .map(|t| std::fs::read_to_string(t.path().join("status")).unwrap_or_default())
            .filter(|s| !s.lines().any(|l| l == "Seccomp:\t2"))
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut left = unfiltered();
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        left = unfiltered();
    }
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let st = child.wait().unwrap();
    assert!(
        left.is_empty(),
        "threads without a seccomp filter: {left:?}"
    );
    assert_eq!(st.code(), Some(143));
}

#[test]
fn errors_name_the_fix() {
    if !kvm_or_skip("vmm::errors_name_the_fix") {
        return;
    }
    let art = guest("hello", &[]);
    let r = boot_kvm(&art, &["--memory", "100000G"]);
    assert_eq!(r.code, Some(125), "{r:?}");
    assert!(
        r.stderr.contains("more than this host has") && r.stderr.contains("lower --memory"),
        "{}",
        r.stderr
    );

    // An artifact for another architecture.
    let other = scratch().join("arm64.hvm");
    let a = hvm::Artifact::open(&art).unwrap();
    let mut m = a.manifest().clone();
    m.image.platform.architecture = "arm64".into();
    let mut w = hvm::ArtifactWriter::create(&other).unwrap();
    for kind in [
        hvm::SectionKind::Kernel,
        hvm::SectionKind::Initrd,
        hvm::SectionKind::Rootfs,
    ] {
        w.section_bytes(kind, hvm::FLAG_REQUIRED, &a.read_section(kind).unwrap())
            .unwrap();
    }
    w.section_bytes(
        hvm::SectionKind::Manifest,
        hvm::FLAG_REQUIRED,
        &m.to_canonical_json(),
    )
    .unwrap();
    w.finish().unwrap();
    let r = boot_kvm(&other, &[]);
    assert_eq!(r.code, Some(125));
    assert!(r.stderr.contains("is for linux/arm64"), "{}", r.stderr);

    if unsafe_is_root() {
        // No /dev/kvm at all: a private mount namespace with an empty /dev.
        let out = std::process::Command::new("unshare")
            .args(["--mount", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs none /dev && exec {} --backend kvm {}",
                bin_path("hyperboot").display(),
                art.display()
            ))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(
            err.contains("no /dev/kvm") && err.contains("--backend qemu"),
            "{err}"
        );
        // No permission: an unprivileged user.
        // (Its own home: root's is closed to it, and an unreadable trust
        // policy there is refused before anything else.)
        let out = std::process::Command::new("setpriv")
            .env("HOME", "/")
            .env_remove("XDG_CONFIG_HOME")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin_path("hyperboot"))
            .args(["--backend", "kvm"])
            .arg(&art)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if std::fs::metadata("/dev/kvm")
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 == 0)
            .unwrap_or(false)
        {
            assert!(err.contains("add your user to the kvm group"), "{err}");
        } else {
            // /dev/kvm is world-accessible here; the artifact itself may be unreadable instead.
            assert!(out.status.code().is_some(), "{err}");
        }
    } else {
        skip(
            "vmm::errors_name_the_fix (no-/dev/kvm and permission cases)",
            "needs root to hide /dev/kvm",
        );
    }
}

fn unsafe_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn auto_backend_picks_kvm_on_hardware_and_says_why_it_does_not() {
    // The same test guest reports the same way under either backend.
    let r = boot_on("auto", &guest("hello", &[]), &[]);
    assert_eq!(r.code, Some(42), "{r:?}");
    assert_eq!(r.stdout, "hello from a test guest\n");
    let notices = r
        .stderr
        .lines()
        .filter(|l| l.contains("using the QEMU backend"))
        .count();
    assert_eq!(notices, if hardware_kvm() { 0 } else { 1 }, "{}", r.stderr);
}

#[test]
fn a_stop_request_reaches_the_guest_on_com2() {
    if !kvm_or_skip("vmm::a_stop_request_reaches_the_guest_on_com2") {
        return;
    }
    let art = guest("control", &[]);
    let mut child = hyperboot()
        .args(["--backend", "kvm", "--memory", "64M", "--timeout", "30"])
        .arg(&art)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 22];
    std::io::Read::read_exact(&mut out, &mut first).unwrap();
    assert_eq!(&first, b"waiting for a request\n");
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let st = child.wait().unwrap();
    assert_eq!(rest, "got: signal 15\n");
    assert_eq!(st.code(), Some(0), "the guest reported after the request");
}
