//! Which artifacts must be signed, and by whom: `--allowed-signers FILE`,
//! else the first rule of the policy file whose prefix the artifact's
//! source (a URL, or a path made absolute) starts with. The policy file is
//! `$HYPER_POLICY`, else `$XDG_CONFIG_HOME/hyper/policy.toml`
//! (`~/.config/hyper/policy.toml`):
//!
//! ```toml
//! [[require]]
//! prefix = "s3://prod-artifacts/"
//! allowed_signers = "/etc/hyper/allowed_signers"
//! ```
//!
//! A signature is checked on the artifact's header against its signatures
//! (see `hyper_remote::signature`) before anything is booted, and for a URL
//! before anything is downloaded or a cached copy used.

use std::path::{Path, PathBuf};

use hyper_remote::signature::{AllowedSigners, SignersError};
use serde::Deserialize;

/// Why the trust settings cannot be used, or an artifact is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read the policy {0}")]
    Read(String, #[source] std::io::Error),
    #[error("the policy {0} is not valid")]
    Policy(String, #[source] toml::de::Error),
    #[error(transparent)]
    Signers(#[from] SignersError),
    #[error(transparent)]
    Remote(#[from] hyper_remote::RemoteError),
    #[error("cannot read {0}")]
    Artifact(String, #[source] std::io::Error),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Policy {
    #[serde(default)]
    require: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    prefix: String,
    allowed_signers: PathBuf,
}

fn policy_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HYPER_POLICY") {
        return PathBuf::from(p);
    }
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".config")
        })
        .join("hyper/policy.toml")
}

/// The source as rules see it: URLs as given, paths absolute.
fn source_name(source: &str) -> String {
    if hyper_remote::is_url(source) {
        return source.to_string();
    }
    std::path::absolute(source).map_or(source.to_string(), |p| p.display().to_string())
}

/// The signers an artifact from `source` must be signed by, if any.
pub fn signers_for(
    source: &str,
    flag: Option<&Path>,
) -> Result<Option<AllowedSigners>, TrustError> {
    if let Some(f) = flag {
        return Ok(Some(AllowedSigners::load(f)?));
    }
    let path = policy_path();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrustError::Read(path.display().to_string(), e)),
    };
    let policy: Policy =
        toml::from_str(&text).map_err(|e| TrustError::Policy(path.display().to_string(), e))?;
    let name = source_name(source);
    match policy.require.iter().find(|r| name.starts_with(&r.prefix)) {
        Some(rule) => Ok(Some(AllowedSigners::load(&rule.allowed_signers)?)),
        None => Ok(None),
    }
}

/// Checks a local artifact against `PATH.sig`; returns the signer and the
/// digest its signature is for (boots pin it: a file replaced after the
/// check is not booted).
pub fn verify_file(path: &Path, signers: &AllowedSigners) -> Result<(String, String), TrustError> {
    let name = path.display().to_string();
    let mut header = vec![0u8; hvm::HEADER_LEN];
    let f = std::fs::File::open(path).map_err(|e| TrustError::Artifact(name.clone(), e))?;
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut header, 0)
        .map_err(|e| TrustError::Artifact(name.clone(), e))?;
    let sig_path = format!("{name}.sig");
    let found: Vec<Vec<u8>> = match std::fs::read(&sig_path) {
        Ok(b) => vec![b],
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(TrustError::Artifact(sig_path, e)),
    };
    let who = signers
        .verify_any(&name, &header, &found)
        .map_err(|e| TrustError::Remote(e.into()))?;
    let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&header).into();
    Ok((who, hvm::digest_string(&digest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_rules_by_prefix() {
        let d = tempfile::tempdir().unwrap();
        let signers = d.path().join("allowed");
        std::fs::write(
            &signers,
            "ci ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBHQF/R8xflcHHeUoT80RDfTp2CJMdDapBee/XpFKYOx\n",
        )
        .unwrap();
        let policy = d.path().join("policy.toml");
        std::fs::write(
            &policy,
            format!(
                "[[require]]\nprefix = \"s3://prod/\"\nallowed_signers = \"{}\"\n",
                signers.display()
            ),
        )
        .unwrap();
        std::env::set_var("HYPER_POLICY", &policy);
        assert!(signers_for("s3://prod/app.hvm", None).unwrap().is_some());
        assert!(signers_for("s3://dev/app.hvm", None).unwrap().is_none());
        std::fs::write(&policy, "[[require]]\nprefix = 3\n").unwrap();
        assert!(matches!(
            signers_for("s3://prod/app.hvm", None),
            Err(TrustError::Policy(..))
        ));
        std::env::remove_var("HYPER_POLICY");
    }
}
