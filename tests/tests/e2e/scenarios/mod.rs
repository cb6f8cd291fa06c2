//! Scenario bodies written once and run on both backends. Each file holds
//! the bodies of one group (`fn NAME(b: Backend)`) and a macro listing
//! them; a tier module instantiates that macro with its backend, so
//! `qemu::app::NAME` and `kvm_app::app::NAME` run the very same code.

use std::fs;

use hyper_tests::*;

/// Turns scenario bodies into tests on one backend: `scenarios!(BACKEND;
/// GROUP: NAME, ...)` defines `#[test] fn NAME()` calling
/// `scenarios::GROUP::NAME(BACKEND)`, or recording a loud skip where the
/// backend cannot run full guests.
macro_rules! scenarios {
    ($backend:expr; $group:ident: $($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let backend: hyper_tests::Backend = $backend;
            let test = concat!(module_path!(), "::", stringify!($name));
            if backend.available(test.trim_start_matches("e2e::")) {
                crate::scenarios::$group::$name(backend)
            }
        }
    )*};
}

#[macro_use]
pub mod app;
#[macro_use]
pub mod detached;
#[macro_use]
pub mod net;
#[macro_use]
pub mod objstore;

pub fn assert_run(r: &Run, code: i32, stdout: &str) {
    assert_eq!(
        r.code,
        Some(code),
        "exit code; stdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(r.stdout, stdout, "stdout; stderr:\n{}", r.stderr);
}

/// The busybox layout plus one more (uncompressed) layer.
pub fn layout_with_layer(name: &str, layer: &[u8]) -> std::path::PathBuf {
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

/// An OCI layout holding one uncompressed layer and an image config.
pub fn oci_layout_of(out: &std::path::Path, layer: &[u8], config: &str) {
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
