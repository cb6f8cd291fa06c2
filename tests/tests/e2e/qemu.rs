//! The QEMU tier: a busybox OCI image becomes an artifact, which boots under the
//! QEMU backend (TCG where KVM is not hardware) and runs its app.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use hyper_tests::*;

fn assert_run(r: &Run, code: i32, stdout: &str) {
    assert_eq!(
        r.code,
        Some(code),
        "exit code; stdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(r.stdout, stdout, "stdout; stderr:\n{}", r.stderr);
}

#[test]
fn echo_reaches_stdout_byte_exact() {
    let r = boot(busybox_artifact(), &["--", "echo", "hello from the guest"]);
    assert_run(&r, 0, "hello from the guest\n");
}

#[test]
fn exit_codes_pass_through() {
    let r = boot(busybox_artifact(), &["--", "sh", "-c", "echo bye; exit 7"]);
    assert_run(&r, 7, "bye\n");
    let r = boot(busybox_artifact(), &["--", "sh", "-c", "kill -9 $$"]);
    assert_run(&r, 137, "");
    let r = boot(busybox_artifact(), &["--", "no-such-command"]);
    assert_eq!(r.code, Some(127), "{r:?}");
    assert!(r.stderr.contains("executable file not found"), "{r:?}");
    assert_eq!(r.stdout, "", "the error goes to stderr, as with docker run");
}

#[test]
fn stdout_and_stderr_are_separate_binary_safe_and_complete() {
    // 8 MiB of random bytes on stdout, their digest on stderr; a slow reader
    // on hyperboot's stdout must not cost a byte.
    let out = hyperboot()
        .args(["--backend", "qemu", "--timeout", "120", "-m", "256M"])
        .arg(busybox_artifact())
        .args([
            "--",
            "sh",
            "-c",
            "head -c 8388608 /dev/urandom > /tmp/r; cat /tmp/r; sha256sum /tmp/r | cut -d' ' -f1 >&2; printf 'no newline' >&2",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read stdout slowly at first: the pipe fills and everything backs up.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let o = out.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(o.stdout.len(), 8 << 20);
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(&o.stdout));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{digest}\nno newline")),
        "stderr: {err}"
    );
}

#[test]
fn image_config_is_what_the_app_sees() {
    let r = boot(
        busybox_artifact(),
        &[
            "--",
            "sh",
            "-c",
            "echo $GREETING; pwd; id -u; echo $HOME; echo $PATH",
        ],
    );
    assert_run(
        &r,
        0,
        "hello\n/srv/app\n0\n/root\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
    );
}

#[test]
fn command_line_overrides_the_image_config() {
    let r = boot(
        busybox_artifact(),
        &[
            "-e",
            "GREETING=bye",
            "-e",
            "EXTRA=1",
            "-w",
            "/tmp",
            "-u",
            "app",
            "--hostname",
            "box",
            "--",
            "sh",
            "-c",
            "echo $GREETING $EXTRA; pwd; id; hostname; echo $HOME",
        ],
    );
    assert_run(
        &r,
        0,
        "bye 1\n/tmp\nuid=1000(app) gid=1000(app) groups=50(staff),1000(app)\nbox\n/home/app\n",
    );
    let r = boot(busybox_artifact(), &["-u", "1234:4321", "--", "id"]);
    assert_run(&r, 0, "uid=1234 gid=4321 groups=4321\n");
    let r = boot(
        busybox_artifact(),
        &["--entrypoint", "/bin/echo", "--", "a", "b"],
    );
    assert_run(&r, 0, "a b\n");
}

#[test]
fn user_from_the_image_config() {
    let layout = scratch().join("user-layout");
    make_image(&layout, "v1", "app");
    let art = scratch().join("user.hvm");
    let o = build(&layout, &art);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = boot(
        &art,
        &[
            "--",
            "sh",
            "-c",
            "id -un; echo $HOME; touch /srv/app/x 2>/dev/null || echo cannot-write",
        ],
    );
    assert_run(&r, 0, "app\n/home/app\ncannot-write\n");
    let r = boot(&art, &["-u", "ghost", "--", "true"]);
    assert_eq!(r.code, Some(123), "{r:?}");
    assert!(r.stderr.contains("unable to find user ghost"), "{r:?}");
}

#[test]
fn writes_vanish_when_the_vm_ends() {
    let a = busybox_artifact();
    let r = boot(
        a,
        &[
            "--",
            "sh",
            "-c",
            "echo data > /etc/written && cat /etc/written && rm /bin/ls && echo removed",
        ],
    );
    assert_run(&r, 0, "data\nremoved\n");
    let r = boot(
        a,
        &[
            "--",
            "sh",
            "-c",
            "test -e /etc/written && echo present || echo absent; test -e /bin/ls && echo ls-back",
        ],
    );
    assert_run(&r, 0, "absent\nls-back\n");
}

#[test]
fn layers_are_flattened_with_whiteouts() {
    let r = boot(
        busybox_artifact(),
        &[
            "--",
            "sh",
            "-c",
            "cat /etc/motd; ls -A /opt; stat -c %a /tmp",
        ],
    );
    assert_run(&r, 0, "layer two\n1777\n");
}

#[test]
fn a_flipped_byte_in_any_section_is_refused_before_boot() {
    let good = fs::read(busybox_artifact()).unwrap();
    let header = hvm::Header::parse(&good).unwrap();
    let mut positions = vec![20usize];
    for s in &header.sections {
        positions.push((s.offset + s.length / 2) as usize);
    }
    for pos in positions {
        let mut bad = good.clone();
        bad[pos] ^= 1;
        let path = scratch().join(format!("flipped-{pos}.hvm"));
        fs::write(&path, &bad).unwrap();
        let started = std::time::Instant::now();
        let r = boot(&path, &["--", "echo", "must not run"]);
        assert_eq!(r.code, Some(125), "byte {pos}: {r:?}");
        assert_eq!(r.stdout, "", "byte {pos} booted");
        assert!(r.stderr.contains("flipped-"), "byte {pos}: {}", r.stderr);
        assert!(
            started.elapsed().as_secs() < 10,
            "refusal took a boot's time"
        );
    }
    let path = scratch().join("truncated.hvm");
    fs::write(&path, &good[..good.len() - 4096]).unwrap();
    let r = boot(&path, &["--", "echo", "must not run"]);
    assert_eq!(r.code, Some(125), "{r:?}");
    assert!(r.stderr.contains("truncated"), "{}", r.stderr);
}

#[test]
fn a_guest_that_never_stops_is_ended_by_the_timeout() {
    let out = hyperboot()
        .args(["--backend", "qemu", "--timeout", "8"])
        .arg(busybox_artifact())
        .args(["--", "sleep", "1000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--timeout"));
}

#[test]
fn sigterm_ends_the_vm() {
    let mut child = hyperboot()
        .args(["--backend", "qemu", "--timeout", "120"])
        .arg(busybox_artifact())
        .args(["--", "sleep", "1000"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    nix_kill(child.id(), 15);
    let started = std::time::Instant::now();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(143));
    assert!(started.elapsed().as_secs() < 10);
}

fn nix_kill(pid: u32, sig: i32) {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn missing_qemu_is_a_clear_error() {
    let out = hyperboot()
        .env("HYPER_QEMU", "/nonexistent/qemu-system-x86_64")
        .args(["--backend", "qemu"])
        .arg(busybox_artifact())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("apt-get install qemu-system-x86"),
        "{out:?}"
    );
}

#[test]
fn builds_are_reproducible_and_inspectable() {
    // The same image in two different places gives the same artifact.
    let (la, lb) = (
        scratch().join("repro-layout-a"),
        scratch().join("repro-b/elsewhere"),
    );
    make_image(&la, "latest", "");
    make_image(&lb, "latest", "");
    let (a, b) = (scratch().join("r1.hvm"), scratch().join("r2.hvm"));
    let (oa, ob) = (build(&la, &a), build(&lb, &b));
    assert!(oa.status.success() && ob.status.success());
    assert_eq!(oa.stdout, ob.stdout, "digests differ");
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
    assert_eq!(
        fs::metadata(&a).unwrap().permissions().mode() & 0o222,
        0,
        "artifact is writable"
    );
    let out = hyperbuild()
        .arg("inspect")
        .arg("--json")
        .arg(&a)
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        doc["digest"].as_str().unwrap(),
        String::from_utf8_lossy(&oa.stdout).trim()
    );
    assert_eq!(doc["manifest"]["config"]["Cmd"], serde_json::json!(["sh"]));
    assert_eq!(
        doc["manifest"]["config"]["ExposedPorts"],
        serde_json::json!(["8080/tcp"])
    );
    assert_eq!(doc["manifest"]["rootfs"]["type"], "erofs");
    let kinds: Vec<&str> = doc["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["kernel", "initrd", "rootfs", "manifest"]);
}

#[test]
fn bad_input_to_hyperbuild_leaves_no_output() {
    let out_path = scratch().join("never.hvm");
    // Not a layout at all.
    let o = build(&scratch().join("no-such-layout"), &out_path);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an OCI image layout"));
    // A layer whose bytes do not match its digest.
    let layout = scratch().join("corrupt-layout");
    make_image(&layout, "latest", "");
    let biggest = fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = fs::read(&biggest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&biggest, bytes).unwrap();
    let o = build(&layout, &out_path);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not match its digest"), "{err}");
    // Unknown tag.
    let o = hyperbuild()
        .arg(format!("oci:{}:nope", layout.display()))
        .args(["-o"])
        .arg(&out_path)
        .arg("--kernel")
        .arg(kernel())
        .arg("--init")
        .arg(init())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no image tagged \"nope\""));
    // A kernel that is not a PVH vmlinux.
    let o = hyperbuild()
        .arg(format!("oci:{}", busybox_layout().display()))
        .arg("-o")
        .arg(&out_path)
        .arg("--kernel")
        .arg(init())
        .arg("--init")
        .arg(init())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no PVH entry note"));
    assert!(!out_path.exists(), "a failed build left an output file");
    let leftovers: Vec<_> = fs::read_dir(scratch())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".hvm-partial"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
}

fn busybox_layout() -> std::path::PathBuf {
    busybox_artifact();
    scratch().join("busybox-layout")
}

#[test]
fn docker_generated_files_and_limits() {
    let r = boot(
        busybox_artifact(),
        &[
            "--hostname",
            "box",
            "--",
            "sh",
            "-c",
            "cat /etc/hostname; grep -c 'localhost' /etc/hosts; grep box /etc/hosts; ulimit -n",
        ],
    );
    // As Docker: the hostname resolves to the guest's address on its network…
    assert_run(&r, 0, "box\n2\n10.0.2.15\tbox\n1048576\n");
    // …and to 127.0.1.1 without one.
    let r = boot(
        busybox_artifact(),
        &[
            "--net",
            "none",
            "--hostname",
            "box",
            "--",
            "grep",
            "box",
            "/etc/hosts",
        ],
    );
    assert_run(&r, 0, "127.0.1.1\tbox\n");
}

#[test]
fn read_only_root_and_tmpfs_mounts() {
    let r = boot(
        busybox_artifact(),
        &["--read-only", "--tmpfs", "/scratch", "--tmpfs", "/cache:size=1m", "--", "sh", "-c",
          "touch /etc/new 2>/dev/null || echo root-is-read-only; echo x > /scratch/f && cat /scratch/f; grep -c ' /cache tmpfs .*size=1024k' /proc/mounts; cat /etc/hostname >/dev/null && echo hostname-present"],
    );
    assert_run(&r, 0, "root-is-read-only\nx\n1\nhostname-present\n");
    let r = boot(
        busybox_artifact(),
        &["--tmpfs", "relative/path", "--", "true"],
    );
    assert_eq!(r.code, Some(123), "{r:?}");
    assert!(r.stderr.contains("--tmpfs relative/path"), "{}", r.stderr);
}

/// A rebuild loads unchanged layers from the layer cache and gives the very
/// artifact a build without the cache gives; a damaged cache entry is
/// ignored and replaced; `cache prune --all` empties it.
#[test]
fn rebuilds_reuse_unchanged_layers_and_give_the_same_artifact() {
    let cache = tempfile::tempdir().unwrap();
    let run = |layout: &std::path::Path, extra: &[&str]| -> serde_json::Value {
        let o = hyperbuild()
            .env("HYPER_BLOB_CACHE", cache.path())
            .arg(format!("oci:{}", layout.display()))
            .arg("-o")
            .arg(scratch().join("reuse.hvm"))
            .arg("--kernel")
            .arg(kernel())
            .arg("--init")
            .arg(init())
            .arg("--json")
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let reused = |v: &serde_json::Value| (v["layers_reused"].as_u64(), v["layers"].as_u64());
    let a = scratch().join("reuse-a");
    make_image(&a, "latest", "");
    let cold = run(&a, &[]);
    assert_eq!(reused(&cold), (Some(0), Some(3)));
    let warm = run(&a, &[]);
    assert_eq!(reused(&warm), (Some(3), Some(3)));
    assert_eq!(warm["digest"], cold["digest"]);
    let fresh = run(&a, &["--no-cache"]);
    assert_eq!(
        (reused(&fresh), &fresh["digest"]),
        ((Some(0), Some(3)), &cold["digest"])
    );

    // A new top layer: only it is read; the artifact equals an uncached build's.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    let data = b"version 2\n";
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_data(&mut h, "srv/VERSION", &data[..]).unwrap();
    let top = layout_with_layer("reuse-b", &b.into_inner().unwrap());
    let next = run(&top, &[]);
    assert_eq!(reused(&next), (Some(3), Some(4)));
    assert_eq!(next["digest"], run(&top, &["--no-cache"])["digest"]);
    let r = boot(&scratch().join("reuse.hvm"), &["--", "cat", "/srv/VERSION"]);
    assert_run(&r, 0, "version 2\n");

    // Damage every cached record: ignored, read again, replaced.
    let entries: Vec<_> = fs::read_dir(cache.path().join("layers/lz4"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(entries.len(), 4, "{entries:?}");
    for e in &entries {
        let rec = fs::read(e.join("record")).unwrap();
        fs::write(e.join("record"), &rec[..rec.len() / 2]).unwrap();
    }
    let damaged = run(&top, &[]);
    assert_eq!(
        (reused(&damaged), &damaged["digest"]),
        ((Some(0), Some(4)), &next["digest"])
    );
    assert_eq!(reused(&run(&top, &[])), (Some(4), Some(4)));

    let o = hyperbuild()
        .env("HYPER_BLOB_CACHE", cache.path())
        .args(["cache", "prune", "--all"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("4 read layers"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        fs::read_dir(cache.path().join("layers/lz4"))
            .unwrap()
            .count(),
        0
    );
    // A cached layer whose blob in the layout changed is refused all the same
    // (its change time gives it away, even with its old mtime put back).
    run(&a, &[]);
    assert_eq!(reused(&run(&a, &[])), (Some(3), Some(3)));
    let blob = fs::read_dir(a.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mtime = fs::metadata(&blob).unwrap().modified().unwrap();
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&blob, &bytes).unwrap();
    fs::File::options()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let o = hyperbuild()
        .env("HYPER_BLOB_CACHE", cache.path())
        .arg(format!("oci:{}", a.display()))
        .arg("-o")
        .arg(scratch().join("reuse-bad.hvm"))
        .arg("--kernel")
        .arg(kernel())
        .arg("--init")
        .arg(init())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not match its digest"));
    assert!(!scratch().join("reuse-bad.hvm").exists());
}

/// The busybox layout plus one more (uncompressed) layer.
fn layout_with_layer(name: &str, layer: &[u8]) -> std::path::PathBuf {
    use sha2::{Digest, Sha256};
    let l = scratch().join(name);
    make_image(&l, "latest", "");
    let sha = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let blob = |d: &str| l.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let put = |b: &[u8]| {
        let d = sha(b);
        fs::write(blob(&d), b).unwrap();
        d
    };
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(l.join("index.json")).unwrap()).unwrap();
    let md = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(blob(&md)).unwrap()).unwrap();
    let cd = manifest["config"]["digest"].as_str().unwrap().to_string();
    let mut config: serde_json::Value =
        serde_json::from_slice(&fs::read(blob(&cd)).unwrap()).unwrap();
    let ld = put(layer);
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .push(ld.clone().into());
    let cbytes = serde_json::to_vec(&config).unwrap();
    manifest["config"]["digest"] = put(&cbytes).into();
    manifest["config"]["size"] = cbytes.len().into();
    manifest["layers"].as_array_mut().unwrap().push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}));
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    index["manifests"][0]["digest"] = put(&mbytes).into();
    index["manifests"][0]["size"] = mbytes.len().into();
    fs::write(l.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    l
}

#[test]
fn sparse_files_read_back_exactly_in_the_guest() {
    use sha2::{Digest, Sha256};
    const SIZE: usize = 64 << 20;
    let mut data = vec![0u8; SIZE];
    data[..4].copy_from_slice(b"head");
    data[SIZE / 2..SIZE / 2 + 6].copy_from_slice(b"middle");
    data[SIZE - 3..].copy_from_slice(b"end");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(SIZE as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_data(&mut h, "big.img", &data[..]).unwrap();
    let layout = layout_with_layer("sparse-layout", &b.into_inner().unwrap());
    let art = scratch().join("sparse.hvm");
    let o = build(&layout, &art);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rootfs = hvm::Artifact::open(&art)
        .unwrap()
        .section(hvm::SectionKind::Rootfs)
        .length;
    assert!(
        rootfs < 8 << 20,
        "64 MiB of mostly zeros cost {rootfs} bytes of rootfs"
    );
    let r = boot(&art, &["--", "sh", "-c", "stat -c %s /big.img; head -c 4 /big.img; echo; dd if=/big.img bs=1 skip=33554432 count=6 2>/dev/null; echo; tail -c 3 /big.img; echo; sha256sum /big.img | cut -c1-64"]);
    let want = format!(
        "{SIZE}\nhead\nmiddle\nend\n{}\n",
        hex::encode(Sha256::digest(&data))
    );
    assert_run(&r, 0, &want);
}

/// Compressed contents (LZ4, hyperbuild's default, and Zstandard, which
/// Debian's fsck.erofs cannot read) read back exactly by the guest kernel:
/// extents that compressed, chunks kept plain, chunks of zeros, partial last
/// chunks, and reads that start inside an extent.
#[test]
fn compressed_files_read_back_exactly_in_the_guest() {
    compressed_read_back("lz4");
    compressed_read_back("zstd");
}

fn compressed_read_back(compression: &str) {
    use sha2::{Digest, Sha256};
    const CHUNK: usize = 128 << 10;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let text = |n: usize| -> Vec<u8> {
        let words: [&[u8]; 5] = [b"layer ", b"image ", b"kernel ", b"extent\n", b"boot "];
        let mut out = Vec::with_capacity(n + 8);
        let mut i = 3usize;
        while out.len() < n {
            i = i.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            out.extend_from_slice(words[(i >> 16) % words.len()]);
        }
        out.truncate(n);
        out
    };
    let mut mixed = Vec::new();
    for i in 0..9 {
        match i % 3 {
            0 => mixed.extend(text(CHUNK)),
            1 => mixed.extend(noise(CHUNK)),
            _ => mixed.extend(vec![0u8; CHUNK]),
        }
    }
    mixed.extend(text(5000));
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("text", text(3 << 20)),
        ("noise", noise(300_000)),
        ("mixed", mixed),
        ("small", text(5000)),
        ("edge", text(CHUNK)),
    ];
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, format!("z/{name}"), &data[..])
            .unwrap();
    }
    let layout = layout_with_layer("compressed-layout", &b.into_inner().unwrap());
    let with = |c: &str| {
        let art = scratch().join(format!("compressed-{c}.hvm"));
        let o = hyperbuild()
            .arg(format!("oci:{}", layout.display()))
            .args(["--compress", c, "--quiet", "--kernel"])
            .arg(kernel())
            .arg("--init")
            .arg(init())
            .arg("-o")
            .arg(&art)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        art
    };
    let (art, plain) = (with(compression), with("none"));
    let rootfs = |a: &std::path::Path| {
        hvm::Artifact::open(a)
            .unwrap()
            .section(hvm::SectionKind::Rootfs)
            .length
    };
    let (packed, unpacked) = (rootfs(&art), rootfs(&plain));
    assert!(
        packed * 10 < unpacked * 7,
        "{compression} rootfs {packed} bytes against {unpacked} uncompressed"
    );
    // Whole files, then 4 KiB reads starting in the middle of extents.
    let script = "cd /z && sha256sum text noise mixed small edge | cut -c1-64 && \
        for at in 1 37 65 300; do dd if=mixed bs=4096 skip=$at count=1 2>/dev/null | sha256sum | cut -c1-64; done";
    let r = boot(&art, &["--", "sh", "-c", script]);
    let mut want = String::new();
    for (_, data) in &files {
        want.push_str(&format!("{}\n", hex::encode(Sha256::digest(data))));
    }
    let mixed = &files[2].1;
    for at in [1usize, 37, 65, 300] {
        let part = &mixed[(at * 4096).min(mixed.len())..((at + 1) * 4096).min(mixed.len())];
        want.push_str(&format!("{}\n", hex::encode(Sha256::digest(part))));
    }
    assert_run(&r, 0, &want);
}

#[test]
fn env_file_then_e_flags_as_in_docker() {
    let f = scratch().join("app.env");
    fs::write(
        &f,
        "# settings\nA=from-file\nB=from-file\n\nGREETING=file\n",
    )
    .unwrap();
    let r = boot(
        busybox_artifact(),
        &[
            "--env-file",
            f.to_str().unwrap(),
            "-e",
            "B=from-flag",
            "--",
            "sh",
            "-c",
            "echo $A $B $GREETING",
        ],
    );
    assert_run(&r, 0, "from-file from-flag file\n");
    let r = boot(
        busybox_artifact(),
        &["--env-file", "/no/such/file", "--", "true"],
    );
    assert_eq!(r.code, Some(125));
    assert!(
        r.stderr.contains("--env-file /no/such/file"),
        "{}",
        r.stderr
    );
}

#[test]
fn the_guest_clock_is_the_hosts() {
    let r = boot(busybox_artifact(), &["--", "date", "+%s"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let guest: i64 = r
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a time: {r:?}"));
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (host - guest).abs() < 300,
        "guest clock {guest}, host {host}"
    );
}

/// Starts hyperboot on `app`, waits for its first line, sends SIGTERM to
/// hyperboot; returns (exit code, whole stdout, seconds from SIGTERM to exit).
fn stop_app(extra: &[&str], app: &str) -> (Option<i32>, String, f64) {
    use std::io::{BufRead, Read};
    let mut child = hyperboot()
        .args(["--backend", "qemu", "--timeout", "120"])
        .args(extra)
        .arg(busybox_artifact())
        .args(["--", "sh", "-c", app])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    nix_kill(child.id(), 15);
    let t = std::time::Instant::now();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let code = child.wait().unwrap().code();
    (code, first + &rest, t.elapsed().as_secs_f64())
}

#[test]
fn sigterm_delivers_the_stop_signal_to_the_app() {
    let (code, out, _) = stop_app(
        &[],
        "trap 'echo got-term; exit 3' TERM; echo ready; while true; do sleep 0.1; done",
    );
    assert_eq!((code, out.as_str()), (Some(3), "ready\ngot-term\n"));
}

#[test]
fn an_app_ignoring_the_stop_signal_is_killed_after_the_stop_timeout() {
    let (code, out, secs) = stop_app(
        &["--stop-timeout", "2"],
        "trap '' TERM; echo ready; while true; do sleep 0.1; done",
    );
    assert_eq!((code, out.as_str()), (Some(137), "ready\n"));
    assert!((1.5..15.0).contains(&secs), "stopped after {secs} s");
}

#[test]
fn a_file_changed_in_place_after_a_verified_boot_is_verified_again() {
    use std::os::unix::fs::FileExt;
    let path = scratch().join("in-place.hvm");
    fs::copy(busybox_artifact(), &path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    assert_run(&boot(&path, &["--", "true"]), 0, "");
    let header = hvm::Header::parse(&fs::read(&path).unwrap()[..4096]).unwrap();
    let rootfs = header.section(hvm::SectionKind::Rootfs).unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, rootfs.offset + 5000).unwrap();
    f.write_all_at(&[b[0] ^ 1], rootfs.offset + 5000).unwrap();
    drop(f);
    let r = boot(&path, &["--", "echo", "must not run"]);
    assert_eq!(r.code, Some(125), "{r:?}");
    assert!(r.stderr.contains("tampered"), "{}", r.stderr);
}

/// security.capability xattrs reach the image and the guest kernel honours
/// them: a busybox copy granted CAP_NET_BIND_SERVICE binds port 80 as an
/// unprivileged user; the plain one cannot.
#[test]
fn file_capabilities_from_pax_xattrs_work_in_the_guest() {
    // VFS_CAP_REVISION_2 | EFFECTIVE, permitted = CAP_NET_BIND_SERVICE (10).
    let mut cap = Vec::new();
    for w in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    let bb = fs::read("/bin/busybox").expect("busybox-static");
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("SCHILY.xattr.security.capability", &cap[..])])
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(bb.len() as u64);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_data(&mut h, "bin/busybox-cap", &bb[..]).unwrap();
    let layout = layout_with_layer("cap-layout", &b.into_inner().unwrap());
    let art = scratch().join("cap.hvm");
    let o = build(&layout, &art);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = "/bin/busybox-cap nc -l -p 80 & sleep 1; cat /proc/net/tcp /proc/net/tcp6 | grep -c ':0050 [0-9A-F]*:0000 0A '; \
                  busybox nc -l -p 81 2>&1 | head -c 40; echo";
    let r = boot(&art, &["-u", "app", "--", "sh", "-c", script]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"1"),
        "the capable copy did not listen on :80: {r:?}"
    );
    assert!(
        r.stdout.contains("Permission denied"),
        "the plain busybox could bind :81 as app: {r:?}"
    );
}

#[test]
fn volumes_share_host_directories_and_persist() {
    let rw = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    fs::write(rw.path().join("in"), "from the host\n").unwrap();
    fs::write(ro.path().join("f"), "read me\n").unwrap();
    let rw_flag = format!("{}:/data", rw.path().display());
    let ro_flag = format!("{}:/config:ro", ro.path().display());
    let r = boot(
        busybox_artifact(),
        &[
            "-v",
            &rw_flag,
            "-v",
            &ro_flag,
            "--read-only",
            "--",
            "sh",
            "-c",
            "cat /data/in /config/f; echo written > /data/out; echo x > /config/g 2>/dev/null || echo ro-refused",
        ],
    );
    assert_run(&r, 0, "from the host\nread me\nro-refused\n");
    assert_eq!(
        fs::read_to_string(rw.path().join("out")).unwrap(),
        "written\n"
    );
    assert!(!ro.path().join("g").exists());
    // The data outlives the VM: the next one sees it.
    let r = boot(
        busybox_artifact(),
        &["-v", &rw_flag, "--", "cat", "/data/out"],
    );
    assert_run(&r, 0, "written\n");
    // A missing host directory is created, as by docker run.
    let fresh = rw.path().join("new/dir");
    let r = boot(
        busybox_artifact(),
        &[
            "-v",
            &format!("{}:/n", fresh.display()),
            "--",
            "touch",
            "/n/made",
        ],
    );
    assert_run(&r, 0, "");
    assert!(fresh.join("made").exists());
    for (bad, want) in [
        ("data:/data", "named volumes"),
        ("/tmp:relative", "absolute"),
    ] {
        let r = boot(busybox_artifact(), &["-v", bad, "--", "true"]);
        assert_eq!(r.code, Some(125), "{r:?}");
        assert!(r.stderr.contains(want), "{r:?}");
    }
}

#[test]
fn image_volumes_get_a_fresh_writable_copy() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("var/lib/app")).unwrap();
    fs::write(root.join("var/lib/app/seed"), "seeded by the image\n").unwrap();
    let layout = dir.path().join("layout");
    let out = std::process::Command::new(repo().join("scripts/make-test-image"))
        .arg(&layout)
        .env("EXTRA_ROOT", &root)
        .env(
            "IMAGE_CONFIG",
            r#"{"Env":["PATH=/usr/bin:/bin"],"Cmd":["sh"],"Volumes":{"/var/lib/app":{}}}"#,
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let artifact = dir.path().join("vol.hvm");
    let o = build(&layout, &artifact);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Writable even with --read-only, and filled with the image's content.
    let r = boot(
        &artifact,
        &["--read-only", "--", "sh", "-c",
          "cat /var/lib/app/seed; echo w > /var/lib/app/new && echo writable; touch /etc/x 2>/dev/null || echo root-read-only"],
    );
    assert_run(&r, 0, "seeded by the image\nwritable\nroot-read-only\n");
}

#[test]
fn cpus_and_memory_are_what_the_guest_gets() {
    let r = boot(
        busybox_artifact(),
        &[
            "--cpus",
            "2",
            "-m",
            "200M",
            "--",
            "sh",
            "-c",
            "nproc; grep MemTotal /proc/meminfo",
        ],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("2"));
    let kb: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!((150_000..=204_800).contains(&kb), "MemTotal {kb} kB");
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 64 {
        let r = boot(busybox_artifact(), &["--cpus", "64", "--", "true"]);
        assert_eq!(r.code, Some(125), "{r:?}");
        assert!(r.stderr.contains("this host has"), "{r:?}");
    }
    let r = boot(busybox_artifact(), &["-m", "100000G", "--", "true"]);
    assert_eq!(r.code, Some(125), "{r:?}");
    assert!(r.stderr.contains("MiB"), "{r:?}");
}

#[test]
fn interactive_stdin_reaches_the_app_and_ends_with_eof() {
    use std::io::Write;
    let mut child = hyperboot()
        .args(["--backend", "qemu", "--timeout", "120", "-i"])
        .arg(busybox_artifact())
        .args(["--", "sh", "-c", "wc -l; cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"one\ntwo\nthree\n").unwrap();
    drop(stdin); // end of file: wc must finish and see 3 lines
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "3");
    // Without -i the app's stdin is empty, as with docker run.
    let r = boot(busybox_artifact(), &["--", "sh", "-c", "wc -c"]);
    assert_run(&r, 0, "0\n");
}

/// A pseudo-terminal of `rows` x `cols` for hyperboot: (master, slave).
fn pty(rows: u16, cols: u16) -> (fs::File, fs::File) {
    use std::os::fd::FromRawFd;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty writes two descriptors; the winsize pointer is live.
    let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors are new and ours.
    unsafe { (fs::File::from_raw_fd(m), fs::File::from_raw_fd(s)) }
}

#[test]
fn tty_gives_the_app_a_terminal_and_ctrl_c_reaches_it() {
    use std::io::{Read, Write};
    let (mut master, slave) = pty(33, 101);
    let mut child = hyperboot()
        .args(["--backend", "qemu", "--timeout", "120", "-it"])
        .arg(busybox_artifact())
        .args([
            "--",
            "sh",
            "-c",
            "tty; stty size; trap 'echo got-int; exit 9' INT; echo ready; read line; echo \"typed: $line\"; while :; do sleep 0.1; done",
        ])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    // Reads the terminal until `want` shows up.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut reader = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut wait_for = |want: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !seen.contains(want) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!("never saw {want:?}; saw {seen:?}"),
            }
        }
        seen.clone()
    };
    let out = wait_for("ready");
    assert!(out.contains("/dev/pts/0"), "{out:?}");
    assert!(out.contains("33 101"), "the host terminal's size: {out:?}");
    master.write_all(b"hello there\r").unwrap();
    wait_for("typed: hello there");
    master.write_all(&[3]).unwrap(); // Ctrl-C: a byte for the app's terminal
    wait_for("got-int");
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(9),
        "the app's own exit code, not hyperboot's SIGINT"
    );
}

/// Runs `script` under crun in an OCI bundle unpacked by umoci from `layout`,
/// configured as `docker run --hostname box` would (HOSTNAME in the
/// environment, no TERM without -t, the primary gid first among the
/// supplementary groups as Docker puts it, no cgroup limits; the open-file limit is
/// left out: the host's hard limit may be below Docker's 1048576, which
/// `docker_generated_files_and_limits` checks on our side). crun
/// needs a pure cgroup2 hierarchy: it gets one in a private mount namespace.
fn crun_oracle(layout: &std::path::Path, script: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    let o = std::process::Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(&bundle)
        .output()
        .expect("umoci");
    assert!(
        o.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let cfg_path = bundle.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&fs::read(&cfg_path).unwrap()).unwrap();
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = serde_json::json!(["sh", "-c", script]);
    if let Some(p) = cfg["process"].as_object_mut() {
        p.remove("rlimits");
    }
    let env: Vec<serde_json::Value> = cfg["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e.as_str().unwrap_or("").starts_with("TERM="))
        .cloned()
        .chain([serde_json::json!("HOSTNAME=box")])
        .collect();
    cfg["process"]["env"] = env.into();
    cfg["hostname"] = "box".into();
    // Docker (unlike umoci's default) lists the primary gid as a supplementary group.
    let gid = cfg["process"]["user"]["gid"].clone();
    let mut extra = vec![gid];
    extra.extend(
        cfg["process"]["user"]["additionalGids"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    cfg["process"]["user"]["additionalGids"] = extra.into();
    if let Some(l) = cfg["linux"].as_object_mut() {
        l.remove("resources");
        l.remove("cgroupsPath");
    }
    fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let o = std::process::Command::new("unshare")
        .arg("-m")
        .arg("sh")
        .arg("-c")
        .arg(
            "for m in $(awk '$2 ~ \"^/sys/fs/cgroup/\" {print $2}' /proc/mounts); do umount \"$m\"; done; \
             umount /sys/fs/cgroup 2>/dev/null; mount -t cgroup2 none /sys/fs/cgroup && \
             exec crun --cgroup-manager=disabled run hyper-oracle-$$ < /dev/null",
        )
        .current_dir(&bundle)
        .output()
        .expect("unshare + crun");
    assert!(
        o.status.success(),
        "crun: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn a_container_runtime_sees_the_same_process_environment() {
    // SAFETY: geteuid() takes no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    let have = |c: &str| {
        std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !root || !have("crun") || !have("umoci") {
        skip(
            "qemu::a_container_runtime_sees_the_same_process_environment",
            "needs root, crun and umoci (scripts/install-deps installs them)",
        );
        return;
    }
    let script = "id; env | sort; pwd; hostname; for m in /proc /sys /dev /dev/pts /dev/shm; do grep -c \" $m \" /proc/mounts; done";
    // The default image (root) and the same image with User app.
    busybox_artifact();
    let layouts = [
        (
            scratch().join("busybox-layout"),
            busybox_artifact().to_path_buf(),
        ),
        {
            let l = scratch().join("oracle-app-layout");
            make_image(&l, "latest", "app");
            let a = scratch().join("oracle-app.hvm");
            let o = build(&l, &a);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            (l, a)
        },
    ];
    for (layout, artifact) in layouts {
        let want = crun_oracle(&layout, script);
        let r = boot(&artifact, &["--hostname", "box", "--", "sh", "-c", script]);
        assert_eq!(r.code, Some(0), "{r:?}");
        assert_eq!(r.stdout, want, "hyperboot (left) and crun (right) differ");
    }
}

/// A static helper for the guest: prints every extended attribute of each
/// path as `path name=hex`, in the kernel's listing order.
const GETX_C: &str = r#"
#include <stdio.h>
#include <sys/xattr.h>
int main(int argc, char **argv) {
    static char names[65536];
    static unsigned char value[65536];
    for (int i = 1; i < argc; i++) {
        ssize_t n = llistxattr(argv[i], names, sizeof names);
        if (n < 0) { perror(argv[i]); return 1; }
        for (char *p = names; p < names + n; p += strlen(p) + 1) {
            ssize_t v = lgetxattr(argv[i], p, value, sizeof value);
            if (v < 0) { perror(p); return 1; }
            printf("%s %s=", argv[i], p);
            for (ssize_t k = 0; k < v; k++) printf("%02x", value[k]);
            printf("\n");
        }
    }
    return 0;
}
"#;

/// The POSIX ACL xattr format: version 2, then (tag, perm, id) entries.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

#[test]
fn xattrs_and_acls_read_back_through_the_guest_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("getx.c");
    fs::write(&src, format!("#include <string.h>\n{GETX_C}")).unwrap();
    let getx = dir.path().join("getx");
    let o = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&getx)
        .arg(&src)
        .output()
        .expect("gcc (build-essential)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // user.* (text and binary), trusted.*, an access and a default ACL, a file
    // capability: each as a PAX SCHILY.xattr record, as docker save writes them.
    let access = acl(&[
        (0x01, 6, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ]);
    let default = acl(&[
        (0x01, 7, u32::MAX),
        (0x04, 5, u32::MAX),
        (0x20, 5, u32::MAX),
    ]);
    let mut cap = vec![0u8; 20];
    cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes()); // v2, effective
    cap[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes()); // CAP_NET_BIND_SERVICE
    type Attrs = Vec<(&'static str, Vec<u8>)>;
    let files: Vec<(&str, Attrs)> = vec![
        (
            "x/plain",
            vec![
                ("user.comment", b"hello".to_vec()),
                ("user.bin", vec![0, 0xff, 7]),
            ],
        ),
        ("x/trusted", vec![("trusted.note", b"root only".to_vec())]),
        ("x/acl", vec![("system.posix_acl_access", access.clone())]),
        ("x/cap", vec![("security.capability", cap.clone())]),
    ];
    let mut tar = tar::Builder::new(Vec::new());
    let header = |t: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(t);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    let bin = fs::read(&getx).unwrap();
    tar.append_data(
        &mut header(tar::EntryType::Regular, 0o755, bin.len() as u64),
        "getx",
        &bin[..],
    )
    .unwrap();
    tar.append_pax_extensions([("SCHILY.xattr.system.posix_acl_default", &default[..])])
        .unwrap();
    tar.append_data(
        &mut header(tar::EntryType::Directory, 0o755, 0),
        "x/",
        std::io::empty(),
    )
    .unwrap();
    for (path, attrs) in &files {
        let recs: Vec<(String, &[u8])> = attrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), &v[..]))
            .collect();
        tar.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        tar.append_data(
            &mut header(tar::EntryType::Regular, 0o644, 1),
            path,
            &b"x"[..],
        )
        .unwrap();
    }
    let layer = tar.into_inner().unwrap();
    let layout = dir.path().join("layout");
    oci_layout_of(&layout, &layer, r#"{"Cmd":["/getx"]}"#);
    let artifact = dir.path().join("xattrs.hvm");
    let o = build(&layout, &artifact);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let r = boot(
        &artifact,
        &[
            "--net",
            "none",
            "--",
            "/getx",
            "/x",
            "/x/plain",
            "/x/trusted",
            "/x/acl",
            "/x/cap",
        ],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let mut got: Vec<&str> = r.stdout.lines().collect();
    got.sort();
    let hexs = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut want = vec![format!("/x system.posix_acl_default={}", hexs(&default))];
    for (path, attrs) in &files {
        for (k, v) in attrs {
            want.push(format!("/{path} {k}={}", hexs(v)));
        }
    }
    want.sort();
    assert_eq!(got, want, "what the guest kernel reads back");
}

/// An OCI layout holding one uncompressed layer and an image config.
fn oci_layout_of(out: &std::path::Path, layer: &[u8], config: &str) {
    use sha2::Digest;
    let blobs = out.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let h = hex::encode(sha2::Sha256::digest(b));
        fs::write(blobs.join(&h), b).unwrap();
        h
    };
    let l = put(layer);
    let cfg = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{config},"rootfs":{{"type":"layers","diff_ids":["sha256:{l}"]}}}}"#
    );
    let c = put(cfg.as_bytes());
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{c}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{l}","size":{}}}]}}"#,
        cfg.len(),
        layer.len()
    );
    let mh = put(m.as_bytes());
    fs::write(out.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(
        out.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{mh}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"latest"}}}}]}}"#,
            m.len()
        ),
    )
    .unwrap();
}
