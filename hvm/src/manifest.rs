//! The `manifest` section: what was built, from what, and how to run it.
//!
//! Stored as canonical JSON: object keys sorted, no insignificant white space,
//! absent optional fields omitted (see [`Manifest::to_canonical_json`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub image: ImageInfo,
    pub config: ImageConfig,
    pub kernel: KernelInfo,
    pub rootfs: RootfsInfo,
    pub builder: BuilderInfo,
    /// The initrd's init; absent in artifacts built before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitInfo>,
}

/// What the initrd's init (hyperinit) speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitInfo {
    /// The host-guest contract version (`hyper-contract`): the runner MUST
    /// refuse an artifact whose init speaks a version newer than its own.
    /// Absent (no `init` record): version 1.
    pub contract: u32,
}

/// Where the image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The reference as the user typed it (`oci:./layout:latest`, `nginx:latest`).
    pub reference: String,
    /// Digest of the image manifest that was built (`sha256:…`); for a
    /// docker-archive, which has no manifest, the image id (config digest).
    pub digest: String,
    /// The image index (manifest list) the manifest was picked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<String>,
    pub platform: Platform,
}

/// An OCI platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// The runtime part of the OCI image config, with the OCI field names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// `"80/tcp"`-style keys, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stop_signal: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
}

/// The kernel section's identity and the command line the builder recommends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub version: String,
    pub cmdline: String,
}

/// The root filesystem section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsInfo {
    /// Filesystem type; `erofs` for now.
    #[serde(rename = "type")]
    pub fs_type: String,
    pub size: u64,
}

/// Which builder wrote the artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuilderInfo {
    pub name: String,
    pub version: String,
}

impl Manifest {
    /// Canonical JSON: sorted keys, compact, UTF-8.
    pub fn to_canonical_json(&self) -> Vec<u8> {
        // serde_json's Value map is ordered by key (no `preserve_order`), so
        // going through Value sorts every object.
        let value = serde_json::to_value(self).expect("manifest serializes");
        serde_json::to_vec(&value).expect("value serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_is_sorted_and_compact() {
        let m = Manifest {
            image: ImageInfo {
                reference: "oci:x".into(),
                digest: "sha256:00".into(),
                index_digest: None,
                platform: Platform {
                    os: "linux".into(),
                    architecture: "amd64".into(),
                    variant: None,
                },
            },
            config: ImageConfig {
                cmd: Some(vec!["sh".into()]),
                env: vec!["A=1".into()],
                ..Default::default()
            },
            kernel: KernelInfo {
                version: "6.12".into(),
                cmdline: "console=ttyS0".into(),
            },
            rootfs: RootfsInfo {
                fs_type: "erofs".into(),
                size: 4096,
            },
            builder: BuilderInfo {
                name: "hyperbuild".into(),
                version: "0.1.0".into(),
            },
            init: None,
        };
        let json = String::from_utf8(m.to_canonical_json()).unwrap();
        assert_eq!(
            json,
            r#"{"builder":{"name":"hyperbuild","version":"0.1.0"},"config":{"Cmd":["sh"],"Env":["A=1"]},"image":{"digest":"sha256:00","platform":{"architecture":"amd64","os":"linux"},"reference":"oci:x"},"kernel":{"cmdline":"console=ttyS0","version":"6.12"},"rootfs":{"size":4096,"type":"erofs"}}"#
        );
        assert_eq!(Manifest::from_json(json.as_bytes()).unwrap(), m);
    }
}
