//! The QEMU tier: the app-level scenarios (`scenarios/app.rs`) on the QEMU
//! backend (TCG where KVM is not hardware), and what is not about a backend:
//! builds (reproducible, cached, refused), verification before boot, and the
//! process environment against a container runtime's.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use hyper_tests::*;

use crate::scenarios::{assert_run, layout_with_layer};

mod app {
    app_scenarios!(hyper_tests::Backend::Qemu);
}

mod detached {
    detached_scenarios!(hyper_tests::Backend::Qemu);
}

/// 20 detached VMs started at once are all listed, running, then all
/// removed with rm -f.
#[test]
fn twenty_detached_vms_started_at_once_are_all_listed() {
    let h = std::sync::Arc::new(crate::scenarios::detached::Host::new(Backend::Qemu));
    let starts: Vec<_> = (0..20)
        .map(|i| {
            let h = h.clone();
            std::thread::spawn(move || {
                h.detach(
                    &["--name", &format!("vm{i}"), "-m", "48M"],
                    busybox_artifact(),
                    &["sleep", "600"],
                )
            })
        })
        .collect();
    let mut ids: Vec<String> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20, "20 distinct IDs");
    let ps = h.ps();
    assert_eq!(ps.len(), 20, "{ps:?}");
    for e in &ps {
        let id = e["id"].as_str().unwrap();
        assert_eq!(e["status"], "running", "{e}: {}", h.said(id));
    }
    let mut names: Vec<&str> = ps.iter().map(|e| e["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names.len(), 20);
    let mut rm = h.cmd(&["rm", "-f"]);
    rm.args(&ids);
    crate::scenarios::detached::ok(&rm.output().unwrap());
    assert!(h.ps().is_empty());
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
