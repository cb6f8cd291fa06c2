//! The objstore tier: artifacts published to and booted from a real
//! S3-compatible server on loopback (moto), and `file://` / `http://` URLs:
//! streaming publish, immutability, boot from the bucket, cache reuse,
//! interrupted and failed transfers, corrupt objects, credentials.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hyper_tests::objstore::{CutProxy, Direction, S3Server};
use hyper_tests::*;

objstore_scenarios!(hyper_tests::Backend::Qemu);

const AWS_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
];

/// A command that sees only the object-store settings it is given.
pub(crate) fn with_env(mut c: Command, env: &[(&str, String)]) -> Command {
    for v in AWS_VARS {
        c.env_remove(v);
    }
    // No profile from the host's home either.
    c.env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// The busybox layout behind `busybox_artifact()`.
pub(crate) fn layout() -> PathBuf {
    busybox_artifact();
    scratch().join("busybox-layout")
}

pub(crate) fn build_to(layout: &Path, url: &str, env: &[(&str, String)], extra: &[&str]) -> Output {
    with_env(hyperbuild(), env)
        .arg(format!("oci:{}", layout.display()))
        .arg("-o")
        .arg(url)
        .arg("--kernel")
        .arg(kernel())
        .arg("--init")
        .arg(init())
        .args(extra)
        .arg("--json")
        .output()
        .expect("run hyperbuild")
}

pub(crate) fn push(file: &Path, url: &str, env: &[(&str, String)], extra: &[&str]) -> Output {
    with_env(hyperbuild(), env)
        .arg("push")
        .arg(file)
        .arg(url)
        .args(extra)
        .arg("--json")
        .output()
        .expect("run hyperbuild push")
}

pub(crate) fn pull(cache: &Path, url: &str, env: &[(&str, String)]) -> Output {
    with_env(hyperboot(), env)
        .env("XDG_CACHE_HOME", cache)
        .args(["pull", "--json", url])
        .output()
        .expect("run hyperboot pull")
}

pub(crate) fn ok_json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

pub(crate) fn digest_of(file: &Path) -> String {
    hvm::digest_string(&hvm::Artifact::open(file).expect("artifact").digest())
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn keys_are_immutable_unless_replaced() {
    let s3 = S3Server::start();
    s3.bucket("imm");
    let url = "s3://imm/app.hvm";
    let first = ok_json(&build_to(&layout(), url, &s3.env(), &[]));
    let same = ok_json(&build_to(&layout(), url, &s3.env(), &[]));
    assert_eq!(same["outcome"], "already_present");
    assert_eq!(same["digest"], first["digest"]);

    let other = other_artifact();
    let refused = push(other, url, &s3.env(), &[]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("different artifact"),
        "{}",
        stderr(&refused)
    );
    let kept = s3.get("imm", "app.hvm").unwrap();
    assert!(
        kept == std::fs::read(busybox_artifact()).unwrap(),
        "the object changed"
    );
    let l2 = scratch().join("objstore-other-layout");
    let refused = build_to(&l2, url, &s3.env(), &[]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("immutable"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(
        s3.pending_uploads("imm"),
        0,
        "the refused upload was not aborted"
    );

    let replaced = ok_json(&push(other, url, &s3.env(), &["--replace"]));
    assert_eq!(replaced["outcome"], "written");
    assert_eq!(replaced["digest"], digest_of(other));
    assert!(s3.get("imm", "app.hvm").unwrap() == std::fs::read(other).unwrap());
    let noop = ok_json(&push(other, url, &s3.env(), &[]));
    assert_eq!(noop["outcome"], "already_present");

    // Moving a pointer back is a server-side copy, with the same rules.
    ok_json(&push(busybox_artifact(), "s3://imm/v1.hvm", &s3.env(), &[]));
    let refused = with_env(hyperbuild(), &s3.env())
        .args(["push", "s3://imm/v1.hvm", url])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let moved = ok_json(
        &with_env(hyperbuild(), &s3.env())
            .args(["push", "s3://imm/v1.hvm", url, "--replace", "--json"])
            .output()
            .unwrap(),
    );
    assert_eq!(moved["digest"], digest_of(busybox_artifact()));
    assert!(s3.get("imm", "app.hvm").unwrap() == std::fs::read(busybox_artifact()).unwrap());
    s3.bucket("elsewhere");
    let o = with_env(hyperbuild(), &s3.env())
        .args(["push", "s3://imm/v1.hvm", "s3://elsewhere/x.hvm"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("another store"), "{}", stderr(&o));

    // Something that is not an artifact is never overwritten by accident.
    s3.put("imm", "notes.txt", b"not an artifact");
    let o = push(other, "s3://imm/notes.txt", &s3.env(), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a .hvm artifact"), "{}", stderr(&o));
    assert_eq!(s3.get("imm", "notes.txt").unwrap(), b"not an artifact");
}

#[test]
fn failed_uploads_leave_no_object_and_no_parts() {
    let s3 = S3Server::start();
    s3.bucket("cut");
    // Every connection carrying more than 1 MiB up is cut: parts never arrive.
    let proxy = CutProxy::start(&s3.addr, Direction::Up, 1 << 20, usize::MAX);
    let mut env = s3.env();
    env.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL", proxy.endpoint()));
    let o = build_to(&layout(), "s3://cut/app.hvm", &env, &[]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("s3://cut/app.hvm"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    assert!(
        proxy.cut.load(std::sync::atomic::Ordering::SeqCst) > 1,
        "retried"
    );
    assert_eq!(s3.get("cut", "app.hvm"), None, "a partial object appeared");
    assert_eq!(
        s3.pending_uploads("cut"),
        0,
        "the multipart upload was not aborted"
    );

    // A push of a file that does not verify sends nothing at all.
    let bad = scratch().join("objstore-bad.hvm");
    let mut bytes = std::fs::read(busybox_artifact()).unwrap();
    let n = bytes.len();
    bytes[n - 5000] ^= 1;
    std::fs::write(&bad, &bytes).unwrap();
    let o = push(&bad, "s3://cut/bad.hvm", &s3.env(), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(s3.get("cut", "bad.hvm"), None);
    assert_eq!(s3.pending_uploads("cut"), 0);
}

#[test]
fn interrupted_transfers_are_retried() {
    let s3 = S3Server::start();
    s3.bucket("flaky");
    let local = std::fs::read(busybox_artifact()).unwrap();
    let via = |dir, after| {
        let proxy = CutProxy::start(&s3.addr, dir, after, 1);
        let mut env = s3.env();
        env.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
        env.push(("AWS_ENDPOINT_URL", proxy.endpoint()));
        (proxy, env)
    };
    let (up, env) = via(Direction::Up, 3 << 20);
    ok_json(&build_to(&layout(), "s3://flaky/app.hvm", &env, &[]));
    assert_eq!(up.cut.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(s3.get("flaky", "app.hvm").unwrap() == local);
    assert_eq!(s3.pending_uploads("flaky"), 0);

    let (down, env) = via(Direction::Down, 5 << 20);
    let cache = tempfile::tempdir().unwrap();
    let p = ok_json(&pull(cache.path(), "s3://flaky/app.hvm", &env));
    assert_eq!(down.cut.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(p["digest"], digest_of(busybox_artifact()));
    assert!(std::fs::read(p["path"].as_str().unwrap()).unwrap() == local);
}

#[test]
fn corrupt_missing_and_foreign_objects_are_refused_before_boot() {
    let s3 = S3Server::start();
    s3.bucket("bad");
    let mut bytes = std::fs::read(busybox_artifact()).unwrap();
    let n = bytes.len();
    bytes[n - 5000] ^= 0x40; // inside the last sections, past the header
    s3.put("bad", "tampered.hvm", &bytes);
    s3.put("bad", "junk.hvm", &vec![b'x'; 9000]);
    let cache = tempfile::tempdir().unwrap();
    let run = |url: &str| {
        with_env(hyperboot(), &s3.env())
            .env("XDG_CACHE_HOME", cache.path())
            .args([
                "--backend",
                "qemu",
                "--timeout",
                "60",
                url,
                "--",
                "echo",
                "must not run",
            ])
            .output()
            .unwrap()
    };
    for (url, want) in [
        ("s3://bad/tampered.hvm", "does not verify"),
        ("s3://bad/junk.hvm", "not a .hvm artifact"),
        ("s3://bad/missing.hvm", "no such object"),
        ("s3://no-such-bucket/app.hvm", "s3://no-such-bucket/app.hvm"),
    ] {
        let o = run(url);
        assert_eq!(o.status.code(), Some(125), "{url}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{url}: {}", stderr(&o));
        assert!(!String::from_utf8_lossy(&o.stdout).contains("must not run"));
    }
    let kept: Vec<_> = std::fs::read_dir(cache.path().join("hyper/artifacts/sha256"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(kept.is_empty(), "a bad artifact was cached: {kept:?}");

    let o = build_to(&layout(), "s3://no-such-bucket/app.hvm", &s3.env(), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no-such-bucket"), "{}", stderr(&o));
    let o = build_to(&layout(), "ftp://host/app.hvm", &s3.env(), &[]);
    assert_ne!(o.status.code(), Some(0));
}

#[test]
fn file_and_http_urls() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("bucket/app/v1.hvm");
    let url = format!("file://{}", dest.display());
    let j = ok_json(&build_to(&layout(), &url, &[], &[]));
    assert_eq!(j["outcome"], "written");
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(busybox_artifact()).unwrap());
    assert_eq!(
        std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o444
    );
    assert_eq!(
        ok_json(&build_to(&layout(), &url, &[], &[]))["outcome"],
        "already_present"
    );
    let o = push(other_artifact(), &url, &[], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let leftovers: Vec<_> = std::fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");
    let o = with_env(hyperboot(), &[])
        .args([
            "--backend",
            "qemu",
            "--timeout",
            "120",
            &url,
            "--",
            "echo",
            "from file url",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "from file url\n");

    // http://: a public object on the S3 server, fetched without credentials.
    let s3 = S3Server::start();
    s3.bucket("pub");
    ok_json(&push(
        busybox_artifact(),
        "s3://pub/app.hvm",
        &s3.env(),
        &[],
    ));
    s3.make_public("pub", "app.hvm");
    let cache = tempfile::tempdir().unwrap();
    let p = ok_json(&pull(
        cache.path(),
        &format!("http://{}/pub/app.hvm", s3.addr),
        &[],
    ));
    assert_eq!(p["digest"], digest_of(busybox_artifact()));
    let o = push(
        busybox_artifact(),
        &format!("http://{}/pub/x.hvm", s3.addr),
        &[],
        &[],
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("cannot publish over plain http"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn aws_profiles_supply_credentials_and_endpoint() {
    let s3 = S3Server::start();
    s3.bucket("prof");
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    let config = dir.path().join("config");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = wrong\n[ci]\naws_access_key_id = ci-key\naws_secret_access_key = ci-secret\n",
    )
    .unwrap();
    std::fs::write(
        &config,
        format!(
            "[profile ci]\nregion = us-east-1\nendpoint_url = {}\n",
            s3.endpoint()
        ),
    )
    .unwrap();
    let env = [
        ("AWS_PROFILE", "ci".to_string()),
        ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
        ("AWS_CONFIG_FILE", config.display().to_string()),
    ];
    let j = ok_json(&push(busybox_artifact(), "s3://prof/app.hvm", &env, &[]));
    assert_eq!(j["outcome"], "written");
    assert!(s3.get("prof", "app.hvm").is_some());
}

/// Runs `sh -c SCRIPT` with hyper's binaries first on PATH.
fn run_script(script: &str, dir: &Path, env: &[(&str, String)]) -> Output {
    let bins = bin_path("hyperbuild").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    with_env(Command::new("sh"), env)
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("PATH", path)
        .env("HYPER_KERNEL", kernel())
        .env("HYPER_INIT", init())
        .output()
        .expect("run sh")
}

fn validate_py() -> Command {
    Command::new(repo().join("tests/templates/validate.py"))
}

#[test]
fn templates_validate_and_their_ci_and_update_scripts_run() {
    // Every template renders and passes its validator (skips are reported).
    let v = validate_py().output().expect("run validate.py");
    let out = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(
        v.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(out.contains(" 0 failed"), "{out}");
    for line in out.lines().filter(|l| l.starts_with("SKIPPED")) {
        skip("objstore::templates (validator)", line);
    }

    // The CI templates' own build-and-publish shell, run against the bucket.
    let s3 = S3Server::start();
    s3.bucket("tmpl");
    let work = tempfile::tempdir().unwrap();
    let script = |ci: &str| {
        let o = validate_py().args(["emit-script", ci]).output().unwrap();
        assert!(o.status.success());
        String::from_utf8(o.stdout).unwrap()
    };
    // The GitHub job signs (its HYPER_SIGNING_KEY secret is set).
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("ci");
    let k = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ci", "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen (openssh-client)");
    assert!(k.status.success());
    let allowed = keys.path().join("allowed_signers");
    std::fs::write(
        &allowed,
        format!(
            "ci@example.org {}",
            std::fs::read_to_string(key.with_extension("pub")).unwrap()
        ),
    )
    .unwrap();
    let mut env = s3.env();
    env.extend([
        ("IMAGE", format!("oci:{}", layout().display())),
        ("BUCKET", "tmpl".into()),
        ("APP", "web".into()),
        ("GITHUB_SHA", "c1".into()),
        ("HYPER_SIGNING_KEY", std::fs::read_to_string(&key).unwrap()),
    ]);
    let o = run_script(&script("github"), work.path(), &env);
    assert!(o.status.success(), "github script: {}", stderr(&o));
    let first = std::fs::read(busybox_artifact()).unwrap();
    assert!(s3.get("tmpl", "web/c1.hvm").unwrap() == first);
    assert!(s3.get("tmpl", "web/current.hvm").unwrap() == first);
    for k in ["web/c1.hvm.sig", "web/current.hvm.sig"] {
        let sig = s3.get("tmpl", k).unwrap_or_default();
        assert!(sig.starts_with(b"-----BEGIN SSH SIGNATURE-----"), "{k}");
    }
    // A rerun of the same commit is a no-op.
    assert!(run_script(&script("github"), work.path(), &env)
        .status
        .success());

    // hyper-update --boot boots the current artifact and records its digest.
    let run_dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let update = repo().join("templates/systemd/hyper-update");
    let mut uenv = s3.env();
    uenv.extend([
        ("HYPER_URL", "s3://tmpl/web/current.hvm".to_string()),
        ("HYPER_RUN_DIR", run_dir.path().display().to_string()),
        ("XDG_CACHE_HOME", cache.path().display().to_string()),
        ("HYPER_ALLOWED_SIGNERS", allowed.display().to_string()),
    ]);
    let o = run_script(
        &format!(
            "{} --boot web --backend qemu --timeout 120 -- echo booted by hyper-update",
            update.display()
        ),
        work.path(),
        &uenv,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "booted by hyper-update\n"
    );
    let check = |env: &[(&str, String)]| {
        run_script(
            &format!("{} --check web", update.display()),
            work.path(),
            env,
        )
        .status
        .code()
    };
    assert_eq!(check(&uenv), Some(0), "unchanged");

    // The GitLab job publishes a new commit with a different image: the
    // pointer moves and the update check sees it.
    let mut genv = s3.env();
    other_artifact();
    genv.extend([
        (
            "IMAGE",
            format!("oci:{}", scratch().join("objstore-other-layout").display()),
        ),
        ("BUCKET", "tmpl".into()),
        ("APP", "web".into()),
        ("CI_COMMIT_SHA", "c2".into()),
    ]);
    let o = run_script(&script("gitlab"), work.path(), &genv);
    assert!(o.status.success(), "gitlab script: {}", stderr(&o));
    let second = std::fs::read(other_artifact()).unwrap();
    assert!(s3.get("tmpl", "web/c2.hvm").unwrap() == second);
    assert!(s3.get("tmpl", "web/current.hvm").unwrap() == second);
    assert!(
        s3.get("tmpl", "web/c1.hvm").unwrap() == first,
        "c1 stays immutable"
    );
    // The GitLab job above had no signing key: current.hvm moved, its old
    // signature no longer fits, and a host that checks refuses it.
    let o = run_script(
        &format!("{} --check web", update.display()),
        work.path(),
        &uenv,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("for another artifact"),
        "{}",
        stderr(&o)
    );
    let unchecked: Vec<(&str, String)> = uenv
        .iter()
        .filter(|(k, _)| *k != "HYPER_ALLOWED_SIGNERS")
        .cloned()
        .collect();
    assert_eq!(check(&unchecked), Some(10), "changed");

    // Without --check, the change is prepared and the unit restarted. This
    // host has no snapshots (QEMU backend): said, and the restart goes on.
    let stub = tempfile::tempdir().unwrap();
    let restarted = stub.path().join("restarted");
    let systemctl = stub.path().join("systemctl");
    std::fs::write(
        &systemctl,
        format!("#!/bin/sh\necho \"$@\" > {}\n", restarted.display()),
    )
    .unwrap();
    std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut env = unchecked.clone();
    env.push(("HYPER_ARGS", "--backend qemu --timeout 120".into()));
    let o = run_script(
        &format!(
            "PATH={}:$PATH {} web",
            stub.path().display(),
            update.display()
        ),
        work.path(),
        &env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no snapshot prepared for web") && stderr(&o).contains("QEMU"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(&restarted).unwrap(),
        "try-restart hyperboot@web.service\n"
    );
}
