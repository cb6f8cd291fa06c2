//! The app tier on the KVM backend: the QEMU tier's app-level checks, run on
//! hyperboot's own VMM. Needs hardware KVM (vmx/svm); elsewhere every test
//! here says loudly that it was skipped.

use hyper_tests::*;

fn hardware_or_skip(test: &str) -> bool {
    if hardware_kvm() {
        return true;
    }
    skip(
        test,
        "needs hardware KVM (vmx/svm); this host has none or nested PVM KVM",
    );
    false
}

fn assert_run(r: &Run, code: i32, stdout: &str) {
    assert_eq!(r.code, Some(code), "{r:?}");
    assert_eq!(r.stdout, stdout, "{r:?}");
}

#[test]
fn echo_and_exit_codes() {
    if !hardware_or_skip("kvm_app::echo_and_exit_codes") {
        return;
    }
    assert_run(
        &boot_on(
            "kvm",
            busybox_artifact(),
            &["--", "echo", "hello from the guest"],
        ),
        0,
        "hello from the guest\n",
    );
    assert_run(
        &boot_on(
            "kvm",
            busybox_artifact(),
            &["--", "sh", "-c", "echo bye; exit 7"],
        ),
        7,
        "bye\n",
    );
    assert_run(
        &boot_on("kvm", busybox_artifact(), &["--", "sh", "-c", "kill -9 $$"]),
        137,
        "",
    );
}

#[test]
fn image_config_and_overrides() {
    if !hardware_or_skip("kvm_app::image_config_and_overrides") {
        return;
    }
    let r = boot_on(
        "kvm",
        busybox_artifact(),
        &["--", "sh", "-c", "echo $GREETING; pwd; id -u"],
    );
    assert_run(&r, 0, "hello\n/srv/app\n0\n");
    let r = boot_on(
        "kvm",
        busybox_artifact(),
        &[
            "-e",
            "GREETING=bye",
            "-w",
            "/tmp",
            "-u",
            "app",
            "--",
            "sh",
            "-c",
            "echo $GREETING; pwd; id -un",
        ],
    );
    assert_run(&r, 0, "bye\n/tmp\napp\n");
}

#[test]
fn writes_vanish_when_the_vm_ends() {
    if !hardware_or_skip("kvm_app::writes_vanish_when_the_vm_ends") {
        return;
    }
    let a = busybox_artifact();
    assert_run(
        &boot_on(
            "kvm",
            a,
            &[
                "--",
                "sh",
                "-c",
                "echo data > /etc/written && cat /etc/written",
            ],
        ),
        0,
        "data\n",
    );
    assert_run(
        &boot_on(
            "kvm",
            a,
            &[
                "--",
                "sh",
                "-c",
                "test -e /etc/written && echo present || echo absent",
            ],
        ),
        0,
        "absent\n",
    );
}

/// The app's streams on the KVM VMM's virtio-console ports: stdout and
/// stderr apart, stdin with `-i`, and a second vCPU the app can see.
#[test]
fn streams_stdin_and_cpus() {
    if !hardware_or_skip("kvm_app::streams_stdin_and_cpus") {
        return;
    }
    let r = boot_on(
        "kvm",
        busybox_artifact(),
        &["--", "sh", "-c", "echo to-out; echo to-err >&2"],
    );
    assert_run(&r, 0, "to-out\n");
    assert!(r.stderr.contains("to-err\n"), "{r:?}");
    use std::io::Write;
    let mut child = hyperboot()
        .args(["--backend", "kvm", "--timeout", "120", "-i"])
        .arg(busybox_artifact())
        .args(["--", "sh", "-c", "wc -c; cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&vec![b'x'; 100_000])
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100000");
    let r = boot_on(
        "kvm",
        busybox_artifact(),
        &[
            "--cpus",
            "2",
            "--",
            "sh",
            "-c",
            "grep -c ^processor /proc/cpuinfo",
        ],
    );
    assert_run(&r, 0, "2\n");
}

/// Networking on the KVM VMM in user mode (passt): the guest reaches a host
/// loopback service by name, and a port published with `-p` serves a client.
#[test]
fn user_mode_network_both_ways() {
    if !hardware_or_skip("kvm_app::user_mode_network_both_ways") {
        return;
    }
    // A host loopback service the guest fetches from.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut c in l.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nfrom-host");
        }
    });
    let r = boot_on(
        "kvm",
        busybox_artifact(),
        &[
            "--net",
            "user",
            "--",
            "wget",
            "-qO-",
            &format!("http://host.hyper.internal:{port}/"),
        ],
    );
    assert_run(&r, 0, "from-host");
    // A published port: busybox httpd serving /etc, fetched through -p.
    let published = free_port();
    let mut vm = hyperboot()
        .args(["--backend", "kvm", "--timeout", "120", "-p"])
        .arg(format!("127.0.0.1:{published}:8080"))
        .arg(busybox_artifact())
        .args(["--", "httpd", "-f", "-p", "8080", "-h", "/etc"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut body = String::new();
    for _ in 0..100 {
        use std::io::{Read, Write};
        if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", published)) {
            let _ = c.write_all(b"GET /motd HTTP/1.0\r\n\r\n");
            let mut s = String::new();
            let _ = c.read_to_string(&mut s);
            if s.contains("layer two") {
                body = s;
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = vm.kill();
    let _ = vm.wait();
    assert!(body.contains("layer two"), "no answer through -p: {body:?}");
}

/// `-v` on the KVM VMM's own 9p server: what the app sees and does in a
/// read-write and a read-only share lands in (or stays out of) the host
/// directories, and outlives the VM.
#[test]
fn volumes_on_the_kvm_backend() {
    if !hardware_or_skip("kvm_app::volumes_on_the_kvm_backend") {
        return;
    }
    let rw = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(rw.path().join("in"), "from the host\n").unwrap();
    std::fs::write(ro.path().join("f"), "read me\n").unwrap();
    let rw_flag = format!("{}:/data", rw.path().display());
    let ro_flag = format!("{}:/config:ro", ro.path().display());
    let script = "cat /data/in /config/f; echo written > /data/out; \
        echo x > /config/g 2>/dev/null || echo ro-refused; \
        mkdir -p /data/d/e && echo deep > /data/d/e/f && mv /data/d /data/moved && ls /data/moved/e; \
        ln -s moved/e/f /data/link && cat /data/link; \
        dd if=/dev/urandom of=/data/big bs=64k count=64 2>/dev/null; \
        sha256sum /data/big | cut -c1-64 > /data/big.sum; rm /data/in; ls /data";
    let r = boot_on(
        "kvm",
        busybox_artifact(),
        &["-v", &rw_flag, "-v", &ro_flag, "--", "sh", "-c", script],
    );
    assert_run(
        &r,
        0,
        "from the host\nread me\nro-refused\nf\ndeep\nbig\nbig.sum\nlink\nmoved\nout\n",
    );
    assert_eq!(
        std::fs::read_to_string(rw.path().join("moved/e/f")).unwrap(),
        "deep\n"
    );
    assert_eq!(
        std::fs::read_link(rw.path().join("link")).unwrap(),
        std::path::Path::new("moved/e/f")
    );
    assert!(!ro.path().join("g").exists() && !rw.path().join("in").exists());
    let host_sum = std::process::Command::new("sha256sum")
        .arg(rw.path().join("big"))
        .output()
        .unwrap();
    let guest_sum = std::fs::read_to_string(rw.path().join("big.sum")).unwrap();
    assert_eq!(
        &String::from_utf8_lossy(&host_sum.stdout)[..64],
        guest_sum.trim(),
        "4 MiB written by the guest arrive intact"
    );
    assert_eq!(
        std::fs::metadata(rw.path().join("big")).unwrap().len(),
        4 << 20
    );
    let r = boot_on(
        "kvm",
        busybox_artifact(),
        &["-v", &rw_flag, "--", "cat", "/data/out"],
    );
    assert_run(&r, 0, "written\n");
}
