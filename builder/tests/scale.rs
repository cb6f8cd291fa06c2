//! A quarter of a million entries (a million takes minutes in a debug build;
//! `scripts/bench-build`'s figures are from release): the build finishes, the
//! image holds every inode (read by Debian's `dump.erofs`), and hyperbuild's
//! peak memory stays within a fixed cost per entry of metadata — file
//! contents are spooled to disk.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

const DIRS: usize = 250;
const PER_DIR: usize = 1000;

fn blob(dir: &Path, bytes: &[u8]) -> String {
    let h = hex::encode(Sha256::digest(bytes));
    std::fs::write(dir.join("blobs/sha256").join(&h), bytes).unwrap();
    h
}

/// An OCI layout with one gzip layer of DIRS directories of PER_DIR empty files.
fn million_entry_layout(out: &Path) {
    std::fs::create_dir_all(out.join("blobs/sha256")).unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    for d in 0..DIRS {
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        tar.append_data(&mut h, format!("d{d:04}/"), std::io::empty())
            .unwrap();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        for i in 0..PER_DIR {
            tar.append_data(&mut h, format!("d{d:04}/f{i:04}"), std::io::empty())
                .unwrap();
        }
    }
    let raw = tar.into_inner().unwrap();
    let diff_id = hex::encode(Sha256::digest(&raw));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    let gz = gz.finish().unwrap();
    let layer = blob(out, &gz);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["true"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]}
    })
    .to_string();
    let config_digest = blob(out, config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{config_digest}"), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": format!("sha256:{layer}"), "size": gz.len()}]
    })
    .to_string();
    let manifest_digest = blob(out, manifest.as_bytes());
    std::fs::write(out.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{manifest_digest}"), "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": "latest"}}]
    });
    std::fs::write(out.join("index.json"), index.to_string()).unwrap();
}

/// Runs a command and returns (success, stderr, peak RSS in KiB). The test
/// binary has no other children, so the largest waited-for child is this one.
fn run_measured(cmd: &mut Command) -> (bool, String, u64) {
    let out = cmd.output().unwrap();
    // SAFETY: rusage is plain old data; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live rusage.
    let r = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(r, 0, "getrusage");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        usage.ru_maxrss as u64,
    )
}

#[test]
fn many_entries_build_in_bounded_memory() {
    let (Some(kernel), Some(init)) = (
        std::env::var_os("HYPER_KERNEL"),
        std::env::var_os("HYPER_INIT"),
    ) else {
        // Loud, and counted by scripts/test.
        let why = "needs HYPER_KERNEL and HYPER_INIT (scripts/test sets them)";
        eprintln!("SKIPPED scale::many_entries_build_in_bounded_memory: {why}");
        if let Some(log) = std::env::var_os("HYPER_TEST_SKIP_LOG") {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            let _ = writeln!(f, "scale::many_entries_build_in_bounded_memory: {why}");
        }
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    million_entry_layout(&layout);
    let artifact = dir.path().join("million.hvm");
    let (ok, stderr, rss_kib) = run_measured(
        Command::new(env!("CARGO_BIN_EXE_hyperbuild"))
            .arg(format!("oci:{}", layout.display()))
            .arg("-o")
            .arg(&artifact)
            .arg("--kernel")
            .arg(&kernel)
            .arg("--init")
            .arg(&init)
            // The streaming path, not layers a run before left in the cache.
            .arg("--no-cache")
            .arg("--quiet"),
    );
    assert!(ok, "hyperbuild failed: {stderr}");
    let entries = (DIRS * (PER_DIR + 1)) as u64;
    // Metadata only: about 0.5 KiB per entry today; 1 KiB per entry plus a
    // fixed 64 MiB is the bound.
    let bound_kib = entries + 64 * 1024;
    eprintln!(
        "{entries} entries: peak RSS {} MiB ({} bytes per entry)",
        rss_kib / 1024,
        rss_kib * 1024 / entries
    );
    assert!(
        rss_kib < bound_kib,
        "peak RSS {rss_kib} KiB for {entries} entries (bound {bound_kib} KiB)"
    );

    // Every inode is in the image, as an independent reader counts them.
    let a = hvm::Artifact::open(&artifact).unwrap();
    let rootfs = dir.path().join("rootfs.erofs");
    std::fs::write(&rootfs, a.read_section(hvm::SectionKind::Rootfs).unwrap()).unwrap();
    let o = Command::new("dump.erofs")
        .arg("-s")
        .arg(&rootfs)
        .output()
        .expect("dump.erofs (apt-get install erofs-utils)");
    let text = String::from_utf8_lossy(&o.stdout);
    let count: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Filesystem inode count:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no inode count in: {text}"));
    assert_eq!(count, entries + 1, "files, directories and the root");
    let o = Command::new("dump.erofs")
        .args(["--ls", "--path=/d0249"])
        .arg(&rootfs)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&o.stdout);
    assert!(listing.contains("f0999"), "{listing}");
}
