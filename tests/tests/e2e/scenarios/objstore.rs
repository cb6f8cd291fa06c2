//! The object-storage scenario that boots: an artifact published to a real
//! S3-compatible server on loopback (moto) boots from the bucket through the
//! digest-keyed cache. The objstore tier runs it on the QEMU backend, the
//! nested tier on the KVM backend; the rest of that tier is backend-free.

use std::path::PathBuf;

use hyper_tests::objstore::S3Server;
use hyper_tests::*;

use crate::objstore::{build_to, digest_of, layout, ok_json, pull, push, stderr, with_env};

/// Every scenario of this file, as a test on `$backend`.
macro_rules! objstore_scenarios {
    ($backend:expr) => {
        scenarios!($backend; objstore: published_artifact_boots_from_the_bucket_and_is_cached);
    };
}

pub fn published_artifact_boots_from_the_bucket_and_is_cached(b: Backend) {
    let s3 = S3Server::start();
    s3.bucket("artifacts");
    let url = "s3://artifacts/app/v1.hvm";
    let j = ok_json(&build_to(&layout(), url, &s3.env(), &[]));
    let local = std::fs::read(busybox_artifact()).unwrap();
    assert_eq!(j["digest"], digest_of(busybox_artifact()));
    assert_eq!(j["outcome"], "written");
    assert_eq!(j["output"], url);
    assert_eq!(j["size"], local.len() as u64);
    // Streamed in parts out of order, yet byte-identical to a local build.
    assert!(s3.get("artifacts", "app/v1.hvm").unwrap() == local);
    assert_eq!(s3.pending_uploads("artifacts"), 0);

    let cache = tempfile::tempdir().unwrap();
    let p = ok_json(&pull(cache.path(), url, &s3.env()));
    assert_eq!(p["digest"], j["digest"]);
    assert_eq!(p["transferred"], local.len() as u64);
    let path = PathBuf::from(p["path"].as_str().unwrap());
    assert!(path.starts_with(cache.path()), "{path:?}");
    assert!(std::fs::read(&path).unwrap() == local);

    // Booting by URL: served from the cache, nothing transferred again.
    let o = with_env(b.hyperboot(), &s3.env())
        .env("XDG_CACHE_HOME", cache.path())
        .args(["--timeout", "120", url, "--", "echo", "booted from s3"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "booted from s3\n");
    assert!(!stderr(&o).contains("fetching"), "{}", stderr(&o));
    let again = ok_json(&pull(cache.path(), url, &s3.env()));
    assert_eq!(again["transferred"], 0);
    assert_eq!(again["path"], p["path"]);

    // A second URL naming the same artifact reuses the cached file too.
    ok_json(&push(
        busybox_artifact(),
        "s3://artifacts/app/current.hvm",
        &s3.env(),
        &[],
    ));
    let other = ok_json(&pull(
        cache.path(),
        "s3://artifacts/app/current.hvm",
        &s3.env(),
    ));
    assert_eq!(other["transferred"], 0);
    assert_eq!(other["path"], p["path"]);
}
