//! The net tier: the network scenarios (`scenarios/net.rs`) on the QEMU
//! backend, and the KVM VMM's 9p server under a real kernel client.

use std::path::Path;
use std::process::Command;

use hyper_tests::*;

net_scenarios!(hyper_tests::Backend::Qemu);

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
