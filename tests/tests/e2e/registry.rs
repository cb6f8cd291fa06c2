//! The registry tier: images pulled from real registries on loopback (Debian's
//! docker-registry, plain and with htpasswd Basic auth, images pushed by
//! skopeo), from docker-archives, and from a misbehaving registry of our own.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use hyper_tests::registry::{layout_blobs, BlobFault, FakeRegistry, Registry};
use hyper_tests::*;
use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// hyperbuild with a private blob cache, the test kernel and init.
fn hb(cache: &Path, reference: &str, out: &Path, extra: &[&str]) -> Output {
    hb_stdin(cache, reference, out, extra, None, &[])
}

fn hb_stdin(
    cache: &Path,
    reference: &str,
    out: &Path,
    extra: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &Path)],
) -> Output {
    let mut c = hyperbuild();
    c.env("HYPER_BLOB_CACHE", cache)
        .arg(reference)
        .arg("-o")
        .arg(out)
        .arg("--kernel")
        .arg(kernel())
        .arg("--init")
        .arg(init());
    c.args(extra).arg("--quiet");
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("hyperbuild");
    if let Some(s) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "hyperbuild failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn failed(o: &Output, needle: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected a bad-input failure: {err}"
    );
    assert!(err.contains(needle), "error does not say {needle:?}: {err}");
    err
}

fn inspect(art: &Path) -> serde_json::Value {
    let o = hyperbuild()
        .arg("inspect")
        .arg("--json")
        .arg(art)
        .output()
        .unwrap();
    serde_json::from_slice(&o.stdout).expect("inspect json")
}

fn rootfs_sha(art: &Path) -> String {
    let doc = inspect(art);
    doc["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "rootfs")
        .unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Test images are made once per binary; the lock keeps parallel tests from
/// seeing a half-written layout.
static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn layout(name: &str, user: &str) -> PathBuf {
    let _guard = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let l = scratch().join(format!("reg-layout-{name}"));
    if !l.join("index.json").exists() {
        make_image(&l, "latest", user);
    }
    l
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in(scratch()).unwrap()
}

#[test]
fn pulls_by_tag_and_digest_and_the_artifact_boots() {
    let reg = Registry::start(false);
    let l = layout("plain", "");
    reg.push(
        &format!("oci:{}:latest", l.display()),
        "test/busybox:v1",
        &[],
    );
    let d = tmp();
    let (cache, art) = (d.path().join("cache"), d.path().join("a.hvm"));
    ok(&hb(
        &cache,
        &format!("{}/test/busybox:v1", reg.addr),
        &art,
        &[],
    ));
    let doc = inspect(&art);
    assert_eq!(
        doc["manifest"]["image"]["reference"],
        format!("{}/test/busybox:v1", reg.addr)
    );
    let digest = doc["manifest"]["image"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let by_digest = d.path().join("b.hvm");
    ok(&hb(
        &cache,
        &format!("{}/test/busybox@{digest}", reg.addr),
        &by_digest,
        &[],
    ));
    assert_eq!(rootfs_sha(&art), rootfs_sha(&by_digest));
    // The same image from the layout directly gives the same filesystem.
    let direct = d.path().join("direct.hvm");
    ok(&build(&l, &direct).clone());
    assert_eq!(rootfs_sha(&art), rootfs_sha(&direct));
    let r = boot(&art, &["--", "cat", "/etc/motd"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (Some(0), "layer two\n"),
        "{r:?}"
    );
}

#[test]
fn a_second_build_needs_no_registry_and_pull_policies_hold() {
    let reg = Registry::start(false);
    reg.push(
        &format!("oci:{}:latest", layout("plain", "").display()),
        "test/cached:v1",
        &[],
    );
    let d = tmp();
    let cache = d.path().join("cache");
    let r = format!("{}/test/cached:v1", reg.addr);
    let first = ok(&hb(&cache, &r, &d.path().join("1.hvm"), &["--json"]));
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    let by_digest = format!(
        "{}/test/cached@{}",
        reg.addr,
        first["image_digest"].as_str().unwrap()
    );
    let pinned = ok(&hb(&cache, &by_digest, &d.path().join("0.hvm"), &[]));
    drop(reg); // the registry is gone
               // By default a tag is resolved on every build: without the registry it fails…
    failed(&hb(&cache, &r, &d.path().join("4.hvm"), &[]), &r);
    failed(
        &hb(&cache, &r, &d.path().join("4.hvm"), &["--pull", "always"]),
        &r,
    );
    // …while a cached digest reference needs no registry, and --pull missing
    // or never build from the cached resolution, offline.
    let digest = |o: &Output| ok(o);
    // (The artifact records the reference as typed: a digest reference
    // builds another artifact than the tag, the same one every time.)
    assert_eq!(
        digest(&hb(&cache, &by_digest, &d.path().join("d.hvm"), &[])),
        pinned
    );
    for policy in ["missing", "never"] {
        assert_eq!(
            digest(&hb(
                &cache,
                &r,
                &d.path().join(format!("{policy}.hvm")),
                &["--pull", policy]
            )),
            first["digest"].as_str().unwrap()
        );
    }
    failed(
        &hb(
            &d.path().join("empty"),
            &r,
            &d.path().join("5.hvm"),
            &["--pull", "never"],
        ),
        "--pull never",
    );
    assert!(!d.path().join("4.hvm").exists() && !d.path().join("5.hvm").exists());
    // cache ls lists what was pulled; prune --all empties it.
    let ls = Command::new(bin_path("hyperbuild"))
        .env("HYPER_BLOB_CACHE", &cache)
        .args(["cache", "ls", "--json"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(
        doc["blobs"].as_array().unwrap().len(),
        5,
        "index? manifest, config, 3 layers: {doc}"
    );
    let pr = Command::new(bin_path("hyperbuild"))
        .env("HYPER_BLOB_CACHE", &cache)
        .args(["cache", "prune"])
        .output()
        .unwrap();
    assert!(pr.status.success());
    assert!(
        String::from_utf8_lossy(&pr.stderr).contains("removed 0 blobs"),
        "{}",
        String::from_utf8_lossy(&pr.stderr)
    );
    let pr = Command::new(bin_path("hyperbuild"))
        .env("HYPER_BLOB_CACHE", &cache)
        .args(["cache", "prune", "--all"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&pr.stderr).contains("removed 5 blobs"));
}

#[test]
fn schema2_and_zstd_layers_give_the_same_filesystem() {
    let reg = Registry::start(false);
    let l = layout("plain", "");
    let src = format!("oci:{}:latest", l.display());
    reg.push(&src, "test/v2s2:v1", &["--format", "v2s2"]);
    reg.push(
        &src,
        "test/zstd:v1",
        &["--format", "oci", "--dest-compress-format", "zstd"],
    );
    let d = tmp();
    let cache = d.path().join("cache");
    let (a, b, c) = (
        d.path().join("v2s2.hvm"),
        d.path().join("zstd.hvm"),
        d.path().join("direct.hvm"),
    );
    ok(&hb(&cache, &format!("{}/test/v2s2:v1", reg.addr), &a, &[]));
    ok(&hb(&cache, &format!("{}/test/zstd:v1", reg.addr), &b, &[]));
    ok(&build(&l, &c));
    assert_eq!(rootfs_sha(&a), rootfs_sha(&c));
    assert_eq!(rootfs_sha(&b), rootfs_sha(&c));
}

/// The busybox layout behind an index whose first entry is another platform.
fn multi_platform_layout() -> PathBuf {
    let _guard = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let l = scratch().join("reg-layout-multi");
    if l.join("index.json").exists() {
        return l;
    }
    make_image(&l, "latest", "");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(l.join("index.json")).unwrap()).unwrap();
    let amd = index["manifests"][0].clone();
    let read = |d: &str| {
        std::fs::read(l.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap()
    };
    let put = |b: &[u8]| {
        let d = sha(b);
        std::fs::write(
            l.join("blobs/sha256").join(d.trim_start_matches("sha256:")),
            b,
        )
        .unwrap();
        d
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&read(amd["digest"].as_str().unwrap())).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&read(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    config["architecture"] = "arm64".into();
    let cbytes = serde_json::to_vec(&config).unwrap();
    let mut arm = manifest.clone();
    arm["config"]["digest"] = put(&cbytes).into();
    arm["config"]["size"] = cbytes.len().into();
    let arm_bytes = serde_json::to_vec(&arm).unwrap();
    let arm_digest = put(&arm_bytes);
    let entry = |digest: &str, size: usize, arch: &str| serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size, "platform": {"os": "linux", "architecture": arch}});
    let idx = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        entry(&arm_digest, arm_bytes.len(), "arm64"),
        entry(amd["digest"].as_str().unwrap(), amd["size"].as_u64().unwrap() as usize, "amd64"),
    ]});
    let idx_bytes = serde_json::to_vec(&idx).unwrap();
    let idx_digest = put(&idx_bytes);
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": idx_digest, "size": idx_bytes.len(), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(l.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    l
}

#[test]
fn an_index_resolves_to_the_asked_platform() {
    let reg = Registry::start(false);
    let l = multi_platform_layout();
    reg.push(
        &format!("oci:{}:latest", l.display()),
        "test/multi:v1",
        &["--all"],
    );
    let d = tmp();
    let cache = d.path().join("cache");
    let r = format!("{}/test/multi:v1", reg.addr);
    let art = d.path().join("m.hvm");
    ok(&hb(&cache, &r, &art, &[]));
    let doc = inspect(&art);
    assert_eq!(
        doc["manifest"]["image"]["platform"]["architecture"],
        "amd64"
    );
    assert!(
        doc["manifest"]["image"]["index_digest"].is_string(),
        "{doc}"
    );
    // The layout itself resolves the same way.
    ok(&build(&l, &d.path().join("l.hvm")));
    let err = failed(
        &hb(
            &cache,
            &r,
            &d.path().join("x.hvm"),
            &["--platform", "linux/s390x"],
        ),
        "no image for platform linux/s390x",
    );
    assert!(
        err.contains("linux/arm64") && err.contains("linux/amd64"),
        "{err}"
    );
    assert!(!d.path().join("x.hvm").exists());
}

/// A tag that moved in the registry between two builds gives the new image,
/// and the build says so: rebuild-and-replace deploys what the tag names now.
#[test]
fn a_moved_tag_is_resolved_again_on_the_next_build() {
    let reg = Registry::start(false);
    let r = format!("{}/test/moving:latest", reg.addr);
    reg.push(
        &format!("oci:{}:latest", layout("plain", "").display()),
        "test/moving:latest",
        &[],
    );
    let d = tmp();
    let cache = d.path().join("cache");
    let json = |o: &Output| -> serde_json::Value { serde_json::from_str(&ok(o)).unwrap() };
    let loud = |out: &str| {
        let mut c = hyperbuild();
        c.env("HYPER_BLOB_CACHE", &cache)
            .arg(&r)
            .arg("-o")
            .arg(d.path().join(out))
            .arg("--kernel")
            .arg(kernel())
            .arg("--init")
            .arg(init())
            .arg("--json");
        c.output().unwrap()
    };
    let first = loud("1.hvm");
    let one = json(&first);
    assert!(
        String::from_utf8_lossy(&first.stderr)
            .contains(&format!("{r} is {}", one["image_digest"].as_str().unwrap())),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // The tag moves to another image (user app).
    reg.push(
        &format!("oci:{}:latest", layout("app", "app").display()),
        "test/moving:latest",
        &[],
    );
    let second = loud("2.hvm");
    let two = json(&second);
    assert_ne!(two["image_digest"], one["image_digest"]);
    assert_ne!(two["digest"], one["digest"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains(&format!(
            "{r} moved since it was last resolved here: {} -> {}",
            one["image_digest"].as_str().unwrap(),
            two["image_digest"].as_str().unwrap()
        )),
        "{err}"
    );
    assert_eq!(
        inspect(&d.path().join("2.hvm"))["manifest"]["config"]["User"],
        "app"
    );
    // --pull missing keeps building what the cache resolved last.
    let third = json(&hb(
        &cache,
        &r,
        &d.path().join("3.hvm"),
        &["--pull", "missing", "--json"],
    ));
    assert_eq!(third["image_digest"], two["image_digest"]);
}

/// After a good pull, wrong credentials fail: the tag is asked for again.
#[test]
fn wrong_credentials_fail_after_a_good_pull() {
    let reg = Registry::start(true);
    reg.push(
        &format!("oci:{}:latest", layout("plain", "").display()),
        "test/private:v1",
        &[],
    );
    let d = tmp();
    let cache = d.path().join("cache");
    let r = format!("{}/test/private:v1", reg.addr);
    let home = d.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let no_creds = [("HOME", home.as_path())];
    let login = ["--username", "tester", "--password-stdin"];
    ok(&hb_stdin(
        &cache,
        &r,
        &d.path().join("g.hvm"),
        &login,
        Some("s3cret\n"),
        &no_creds,
    ));
    failed(
        &hb_stdin(
            &cache,
            &r,
            &d.path().join("w.hvm"),
            &login,
            Some("wrong\n"),
            &no_creds,
        ),
        "401",
    );
    assert!(!d.path().join("w.hvm").exists());
}

#[test]
fn basic_auth_from_flags_and_docker_config() {
    let reg = Registry::start(true);
    reg.push(
        &format!("oci:{}:latest", layout("plain", "").display()),
        "test/private:v1",
        &[],
    );
    let d = tmp();
    let cache = d.path().join("cache");
    let r = format!("{}/test/private:v1", reg.addr);
    let home = d.path().join("home");
    std::fs::create_dir_all(home.join(".docker")).unwrap();
    let no_creds = [("HOME", home.as_path())];
    failed(
        &hb_stdin(&cache, &r, &d.path().join("n.hvm"), &[], None, &no_creds),
        "401",
    );
    failed(
        &hb_stdin(
            &cache,
            &r,
            &d.path().join("w.hvm"),
            &["--username", "tester", "--password-stdin"],
            Some("wrong\n"),
            &no_creds,
        ),
        "401",
    );
    ok(&hb_stdin(
        &cache,
        &r,
        &d.path().join("f.hvm"),
        &["--username", "tester", "--password-stdin"],
        Some("s3cret\n"),
        &no_creds,
    ));
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode("tester:s3cret");
    std::fs::write(
        home.join(".docker/config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{token}"}}}}}}"#, reg.addr),
    )
    .unwrap();
    let fresh = d.path().join("cache2");
    ok(&hb_stdin(
        &fresh,
        &r,
        &d.path().join("c.hvm"),
        &[],
        None,
        &no_creds,
    ));
    // A credential helper, as docker login with credsStore/credHelpers sets up.
    let bin = d.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-hypertest");
    std::fs::write(&helper, "#!/bin/sh\nread server\necho \"{\\\"ServerURL\\\":\\\"$server\\\",\\\"Username\\\":\\\"tester\\\",\\\"Secret\\\":\\\"s3cret\\\"}\"\n").unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(
        home.join(".docker/config.json"),
        format!(r#"{{"credHelpers":{{"{}":"hypertest"}}}}"#, reg.addr),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let path = std::path::PathBuf::from(path);
    ok(&hb_stdin(
        &d.path().join("cache3"),
        &r,
        &d.path().join("h.hvm"),
        &[],
        None,
        &[("HOME", home.as_path()), ("PATH", path.as_path())],
    ));
    assert!(!d.path().join("n.hvm").exists() && !d.path().join("w.hvm").exists());
}

#[test]
fn unknown_repositories_and_tags_are_not_found() {
    let reg = Registry::start(false);
    reg.push(
        &format!("oci:{}:latest", layout("plain", "").display()),
        "test/here:v1",
        &[],
    );
    let d = tmp();
    let cache = d.path().join("cache");
    failed(
        &hb(
            &cache,
            &format!("{}/test/nothere:v1", reg.addr),
            &d.path().join("a.hvm"),
            &[],
        ),
        "not found",
    );
    failed(
        &hb(
            &cache,
            &format!("{}/test/here:v9", reg.addr),
            &d.path().join("b.hvm"),
            &[],
        ),
        "not found",
    );
}

fn fake(
    fault: BlobFault,
    tweak: impl Fn(&mut Vec<(String, String, Vec<u8>)>),
) -> (FakeRegistry, PathBuf) {
    fake_with(fault, false, tweak)
}

fn fake_with(
    fault: BlobFault,
    bearer: bool,
    tweak: impl Fn(&mut Vec<(String, String, Vec<u8>)>),
) -> (FakeRegistry, PathBuf) {
    let l = layout("plain", "");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(l.join("index.json")).unwrap()).unwrap();
    let md = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mbytes = std::fs::read(
        l.join("blobs/sha256")
            .join(md.trim_start_matches("sha256:")),
    )
    .unwrap();
    let mt = "application/vnd.oci.image.manifest.v1+json".to_string();
    let mut manifests = vec![
        ("v1".to_string(), mt.clone(), mbytes.clone()),
        (md, mt, mbytes),
    ];
    tweak(&mut manifests);
    (
        FakeRegistry::start_with(manifests, layout_blobs(&l), fault, bearer),
        l,
    )
}

#[test]
fn the_anonymous_bearer_token_flow_docker_hub_uses() {
    let (reg, _) = fake_with(BlobFault::None, true, |_| {});
    let d = tmp();
    let art = d.path().join("a.hvm");
    ok(&hb(
        &d.path().join("cache"),
        &format!("{}/test/fake:v1", reg.addr),
        &art,
        &[],
    ));
    assert!(
        reg.blob_requests.load(std::sync::atomic::Ordering::SeqCst) >= 4,
        "config and layers were fetched"
    );
}

#[test]
fn a_blob_with_the_wrong_bytes_is_refused_and_not_cached() {
    let (reg, _) = fake(BlobFault::WrongBytes, |_| {});
    let d = tmp();
    let cache = d.path().join("cache");
    let out = d.path().join("a.hvm");
    failed(
        &hb(&cache, &format!("{}/test/fake:v1", reg.addr), &out, &[]),
        "digest",
    );
    assert!(!out.exists());
    let blobs: Vec<_> = std::fs::read_dir(cache.join("blobs/sha256"))
        .unwrap()
        .collect();
    // Only the manifest (served correctly) may be cached; no wrong blob is.
    assert!(blobs.len() <= 1, "unverified blobs kept: {blobs:?}");
}

#[test]
fn a_connection_cut_mid_blob_is_resumed() {
    let (reg, _) = fake(BlobFault::CutOnce, |_| {});
    let d = tmp();
    let art = d.path().join("a.hvm");
    ok(&hb(
        &d.path().join("cache"),
        &format!("{}/test/fake:v1", reg.addr),
        &art,
        &[],
    ));
    assert_eq!(inspect(&art)["manifest"]["rootfs"]["type"], "erofs");
    let (reg, _) = fake(BlobFault::CutAlways, |_| {});
    let out = d.path().join("b.hvm");
    failed(
        &hb(
            &d.path().join("cache2"),
            &format!("{}/test/fake:v1", reg.addr),
            &out,
            &[],
        ),
        "could not be downloaded",
    );
    assert!(!out.exists());
}

#[test]
fn malformed_manifests_and_pinned_digests() {
    let (reg, _) = fake(BlobFault::None, |m| m[0].2 = b"{this is not json".to_vec());
    let d = tmp();
    failed(
        &hb(
            &d.path().join("c"),
            &format!("{}/test/fake:v1", reg.addr),
            &d.path().join("a.hvm"),
            &[],
        ),
        "malformed manifest",
    );
    let other = format!("sha256:{}", "1".repeat(64));
    let (reg, _) = fake(BlobFault::None, |m| {
        m.push((other.clone(), m[0].1.clone(), m[0].2.clone()))
    });
    failed(
        &hb(
            &d.path().join("c2"),
            &format!("{}/test/fake@{other}", reg.addr),
            &d.path().join("b.hvm"),
            &[],
        ),
        "pinned digest",
    );
}

/// A docker-archive holding two images: the busybox one and the same with User=app.
fn two_image_archive() -> PathBuf {
    let path = scratch().join("two-images.tar");
    let (plain, app) = (layout("plain", ""), layout("app", "app"));
    let _guard = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    if path.exists() {
        return path;
    }
    let mut t = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        t.append_data(&mut h, name, data).unwrap();
    };
    let mut entries = Vec::new();
    for (tag, user) in [("busybox:root", ""), ("127.0.0.1:5000/busybox:app", "app")] {
        let l = if user.is_empty() {
            plain.clone()
        } else {
            app.clone()
        };
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(l.join("index.json")).unwrap()).unwrap();
        let read = |d: &str| {
            std::fs::read(l.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap()
        };
        let manifest: serde_json::Value =
            serde_json::from_slice(&read(index["manifests"][0]["digest"].as_str().unwrap()))
                .unwrap();
        let config = read(manifest["config"]["digest"].as_str().unwrap());
        let cname = format!("{}.json", sha(&config).trim_start_matches("sha256:"));
        add(&cname, &config);
        let mut layers = Vec::new();
        for layer in manifest["layers"].as_array().unwrap() {
            let mut raw = Vec::new();
            std::io::Read::read_to_end(
                &mut flate2::read::GzDecoder::new(&read(layer["digest"].as_str().unwrap())[..]),
                &mut raw,
            )
            .unwrap();
            let lname = format!("{}/layer.tar", sha(&raw).trim_start_matches("sha256:"));
            add(&lname, &raw);
            layers.push(lname);
        }
        entries.push(serde_json::json!({"Config": cname, "RepoTags": [tag], "Layers": layers}));
    }
    add("manifest.json", &serde_json::to_vec(&entries).unwrap());
    std::fs::write(&path, t.into_inner().unwrap()).unwrap();
    path
}

#[test]
fn docker_archives_with_several_images() {
    let a = two_image_archive();
    let d = tmp();
    let cache = d.path().join("cache");
    let (x, y) = (d.path().join("x.hvm"), d.path().join("y.hvm"));
    ok(&hb(
        &cache,
        &format!("docker-archive:{}:busybox:root", a.display()),
        &x,
        &[],
    ));
    ok(&hb(
        &cache,
        &format!("docker-archive:{}:127.0.0.1:5000/busybox:app", a.display()),
        &y,
        &[],
    ));
    assert_eq!(
        inspect(&x)["manifest"]["config"]["User"],
        serde_json::Value::Null
    );
    assert_eq!(inspect(&y)["manifest"]["config"]["User"], "app");
    ok(&build(&layout("plain", ""), &d.path().join("direct.hvm")));
    assert_eq!(rootfs_sha(&x), rootfs_sha(&d.path().join("direct.hvm")));
    let err = failed(
        &hb(
            &cache,
            &format!("docker-archive:{}:nginx:latest", a.display()),
            &d.path().join("z.hvm"),
            &[],
        ),
        "no image \"nginx:latest\"",
    );
    assert!(err.contains("busybox:root"), "{err}");
    failed(
        &hb(
            &cache,
            &format!("docker-archive:{}", a.display()),
            &d.path().join("z.hvm"),
            &[],
        ),
        "holds 2 images",
    );
    assert!(!d.path().join("z.hvm").exists());
}

#[test]
fn concurrent_builds_share_one_cache() {
    let reg = Registry::start(false);
    reg.push(
        &format!("oci:{}:latest", layout("plain", "").display()),
        "test/together:v1",
        &[],
    );
    let d = tmp();
    let cache = d.path().join("cache");
    let r = format!("{}/test/together:v1", reg.addr);
    let spawn = |n: &str| {
        let mut c = hyperbuild();
        c.env("HYPER_BLOB_CACHE", &cache)
            .arg(&r)
            .arg("-o")
            .arg(d.path().join(n))
            .arg("--kernel")
            .arg(kernel())
            .arg("--init")
            .arg(init())
            .arg("-q");
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("a.hvm"), spawn("b.hvm"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(ok(&a), ok(&b));
    let leftovers: Vec<_> = std::fs::read_dir(cache.join("tmp")).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "partial downloads left: {leftovers:?}"
    );
}

/// hyperbuild/hyperboot with a private cache and no credentials from the
/// host's home.
fn hx(bin: &str, home: &Path) -> Command {
    let mut c = Command::new(bin_path(bin));
    c.env("HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("HYPER_BLOB_CACHE", home.join("cache/hyper/blobs"))
        .env_remove("HYPER_POLICY");
    c
}

/// An artifact pushed to a registry boots from it and pulls by tag and by
/// digest into the cache; pushing it again is a no-op; a different
/// artifact under the tag is refused without --replace.
#[test]
fn artifacts_travel_through_a_registry_and_boot() {
    let reg = Registry::start(false);
    let d = tmp();
    let url = format!("docker://{}/apps/busybox:v1", reg.addr);
    let o = hx("hyperbuild", d.path())
        .arg(format!("oci:{}", layout("plain", "").display()))
        .args(["-o", &url, "--kernel"])
        .arg(kernel())
        .arg("--init")
        .arg(init())
        .arg("--json")
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(
        (j["output"].as_str(), j["outcome"].as_str()),
        (Some(&url[..]), Some("written"))
    );
    let digest = j["digest"].as_str().unwrap().to_string();
    let manifest = j["manifest"].as_str().unwrap().to_string();
    // The manifest is an OCI 1.1 artifact of our type.
    let m = std::process::Command::new("curl")
        .args([
            "-s",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
        ])
        .arg(format!("http://{}/v2/apps/busybox/manifests/v1", reg.addr))
        .output()
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&m.stdout).unwrap();
    assert_eq!(m["artifactType"], "application/vnd.hyper.hvm.v1");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );
    assert_eq!(
        m["annotations"]["dev.hyper.artifact.digest"],
        digest.as_str()
    );
    // Boot by tag: fetched into the cache, then booted.
    let r = hx("hyperboot", d.path())
        .args([
            "--backend",
            "qemu",
            "--timeout",
            "120",
            &url,
            "--",
            "echo",
            "from the registry",
        ])
        .output()
        .unwrap();
    assert_eq!(ok(&r), "from the registry");
    // Pull by digest: the same cached file, nothing transferred.
    let pulled = hx("hyperboot", d.path())
        .args([
            "pull",
            "--json",
            &format!("docker://{}/apps/busybox@{manifest}", reg.addr),
        ])
        .output()
        .unwrap();
    let p: serde_json::Value = serde_json::from_str(&ok(&pulled)).unwrap();
    assert_eq!(
        (p["digest"].as_str(), p["transferred"].as_u64()),
        (Some(&digest[..]), Some(0))
    );
    let cached = std::fs::read(p["path"].as_str().unwrap()).unwrap();
    // The same artifact pushed again: a no-op.
    let art = d.path().join("local.hvm");
    std::fs::write(&art, &cached).unwrap();
    let again = hx("hyperbuild", d.path())
        .args(["push", "--json"])
        .arg(&art)
        .arg(&url)
        .output()
        .unwrap();
    let a: serde_json::Value = serde_json::from_str(&ok(&again)).unwrap();
    assert_eq!(
        (a["outcome"].as_str(), a["transferred"].as_u64()),
        (Some("unchanged"), Some(0))
    );
    // Another artifact under the same tag: refused, then replaced.
    let other = d.path().join("other.hvm");
    ok(&hb(
        &d.path().join("blobs"),
        &format!("oci:{}", layout("app", "app").display()),
        &other,
        &[],
    ));
    let refused = hx("hyperbuild", d.path())
        .arg("push")
        .arg(&other)
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--replace"));
    let replaced = hx("hyperbuild", d.path())
        .args(["push", "--replace", "--json"])
        .arg(&other)
        .arg(&url)
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_str(&ok(&replaced)).unwrap();
    assert_eq!(r["outcome"], "replaced");
    let p = hx("hyperboot", d.path())
        .args(["pull", &url])
        .output()
        .unwrap();
    assert_eq!(ok(&p), r["digest"].as_str().unwrap());
}

/// A push through a connection cut mid-upload resumes where the registry
/// says it got to; a registry with htpasswd auth takes the same credentials
/// as pulls (flags, or Docker's config).
#[test]
fn registry_pushes_resume_and_use_credentials() {
    let reg = Registry::start(true);
    let proxy = hyper_tests::objstore::CutProxy::start(
        &reg.addr,
        hyper_tests::objstore::Direction::Up,
        12 << 20,
        1,
    );
    let d = tmp();
    let art = d.path().join("a.hvm");
    ok(&hb(
        &d.path().join("blobs"),
        &format!("oci:{}", layout("plain", "").display()),
        &art,
        &[],
    ));
    let url = format!("docker://{}/apps/cut:v1", proxy.addr);
    let denied = hx("hyperbuild", d.path())
        .arg("push")
        .arg(&art)
        .arg(&url)
        .output()
        .unwrap();
    assert_ne!(denied.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let mut c = hx("hyperbuild", d.path());
    c.args(["push", "--json", "--username", "tester", "--password-stdin"])
        .arg(&art)
        .arg(&url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let pushed = child.wait_with_output().unwrap();
    let p: serde_json::Value = serde_json::from_str(&ok(&pushed)).unwrap();
    assert_eq!(p["outcome"], "written");
    assert_eq!(
        proxy.cut.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the upload was cut once"
    );
    // Pull with Docker's config: the bytes verify.
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode("tester:s3cret");
    std::fs::create_dir_all(d.path().join(".docker")).unwrap();
    std::fs::write(
        d.path().join(".docker/config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{token}"}}}}}}"#, reg.addr),
    )
    .unwrap();
    let direct = format!("docker://{}/apps/cut:v1", reg.addr);
    let pulled = hx("hyperboot", d.path())
        .args(["pull", &direct])
        .output()
        .unwrap();
    assert_eq!(ok(&pulled), p["digest"].as_str().unwrap());
}

/// Signatures: made by hyperbuild or by `ssh-keygen -Y sign`, checked by
/// hyperboot or by `ssh-keygen -Y verify`; every wrong case refused before
/// boot with one line, nothing booted and nothing cached; in a registry the
/// signature is found through its fallback tag; a policy file requires
/// signatures for a prefix.
#[test]
fn signatures_are_checked_before_anything_boots() {
    let d = tmp();
    let keygen = |name: &str, kind: &str| {
        let p = d.path().join(name);
        let o = Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-C", name, "-f"])
            .arg(&p)
            .output()
            .expect("ssh-keygen (openssh-client)");
        assert!(o.status.success());
        (
            p.clone(),
            std::fs::read_to_string(p.with_extension("pub")).unwrap(),
        )
    };
    let (ours, ours_pub) = keygen("ours", "ed25519");
    let (theirs, theirs_pub) = keygen("theirs", "ecdsa");
    let allowed = d.path().join("allowed_signers");
    std::fs::write(&allowed, format!("ci@example.org {ours_pub}")).unwrap();
    let allowed_theirs = d.path().join("allowed_theirs");
    std::fs::write(&allowed_theirs, format!("ops@example.org {theirs_pub}")).unwrap();
    let art = d.path().join("app.hvm");
    ok(&hb(
        &d.path().join("blobs"),
        &format!("oci:{}", layout("plain", "").display()),
        &art,
        &[],
    ));
    let header = std::fs::read(&art).unwrap()[..4096].to_vec();
    let sig = d.path().join("app.hvm.sig");
    let boot = |signers: &Path| {
        hx("hyperboot", d.path())
            .args(["--backend", "qemu", "--timeout", "120", "--allowed-signers"])
            .arg(signers)
            .arg(&art)
            .args(["--", "echo", "booted"])
            .output()
            .unwrap()
    };
    let refused = |o: &Output, want: &str| {
        assert_eq!(
            o.status.code(),
            Some(125),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.stdout.is_empty(), "something booted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains(want), "{err}");
    };
    refused(&boot(&allowed), "is not signed");
    // Ours, checked by ssh-keygen and by hyperboot.
    let s = hx("hyperbuild", d.path())
        .args(["sign", "--key"])
        .arg(&ours)
        .arg(&art)
        .output()
        .unwrap();
    ok(&s);
    let verify = |signers: &Path, id: &str, ns: &str| {
        let mut c = Command::new("ssh-keygen");
        c.args(["-Y", "verify", "-f"])
            .arg(signers)
            .args(["-I", id, "-n", ns, "-s"])
            .arg(&sig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&header).unwrap();
        child.wait().unwrap().success()
    };
    assert!(
        verify(&allowed, "ci@example.org", "hyper-artifact"),
        "ssh-keygen refuses our signature"
    );
    assert_eq!(ok(&boot(&allowed)), "booted");
    refused(&boot(&allowed_theirs), "signed by a key not in");
    // ssh-keygen's, checked by hyperboot.
    let keysign = |key: &Path, ns: &str, what: &[u8]| {
        let mut c = Command::new("ssh-keygen");
        c.args(["-Y", "sign", "-n", ns, "-f"])
            .arg(key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(what).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success());
        std::fs::write(&sig, o.stdout).unwrap();
    };
    keysign(&theirs, "hyper-artifact", &header);
    assert_eq!(ok(&boot(&allowed_theirs)), "booted");
    keysign(&ours, "file", &header);
    refused(&boot(&allowed), "namespace");
    let mut other = header.clone();
    other[4000] ^= 1;
    keysign(&ours, "hyper-artifact", &other);
    refused(&boot(&allowed), "for another artifact");
    std::fs::write(&sig, "not a signature").unwrap();
    refused(&boot(&allowed), "not an OpenSSH signature");

    // In a registry: signed through a referrer with its fallback tag.
    let reg = Registry::start(false);
    let url = format!("docker://{}/apps/signed:v1", reg.addr);
    ok(&hx("hyperbuild", d.path())
        .arg("push")
        .arg(&art)
        .arg(&url)
        .output()
        .unwrap());
    let pull = |signers: &Path, cache: &str| {
        hx("hyperboot", d.path())
            .env("XDG_CACHE_HOME", d.path().join(cache))
            .args(["pull", "--allowed-signers"])
            .arg(signers)
            .arg(&url)
            .output()
            .unwrap()
    };
    let p = pull(&allowed, "c1");
    assert_eq!(p.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&p.stderr).contains("is not signed"));
    assert!(
        !d.path().join("c1/hyper/artifacts/sha256").exists(),
        "an unsigned artifact was cached"
    );
    ok(&hx("hyperbuild", d.path())
        .args(["sign", "--key"])
        .arg(&ours)
        .arg(&url)
        .output()
        .unwrap());
    let tags = Command::new("curl")
        .arg("-s")
        .arg(format!("http://{}/v2/apps/signed/tags/list", reg.addr))
        .output()
        .unwrap();
    let tags = String::from_utf8_lossy(&tags.stdout);
    assert!(tags.contains(".sig\""), "no fallback tag: {tags}");
    let p = pull(&allowed_theirs, "c2");
    assert!(String::from_utf8_lossy(&p.stderr).contains("signed by a key not in"));
    assert!(!d.path().join("c2/hyper/artifacts/sha256").exists());
    assert_eq!(ok(&pull(&allowed, "c3")).len(), "sha256:".len() + 64);
    // A policy that requires signatures for the registry's prefix.
    let policy = d.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[require]]\nprefix = \"docker://{}/\"\nallowed_signers = \"{}\"\n",
            reg.addr,
            allowed_theirs.display()
        ),
    )
    .unwrap();
    let o = hx("hyperboot", d.path())
        .env("HYPER_POLICY", &policy)
        .env("XDG_CACHE_HOME", d.path().join("c4"))
        .args(["--backend", "qemu", &url, "--", "echo", "must not boot"])
        .output()
        .unwrap();
    refused(&o, "signed by a key not in");
}
