//! Signatures of artifacts, in OpenSSH's format (`ssh-keygen -Y sign`), so
//! that `ssh-keygen -Y verify` checks them without hyper.
//!
//! What is signed is the artifact's 4 KiB header: it holds every section's
//! sha256, and the artifact digest is its sha256, so a signature of the
//! header is a signature of the whole artifact. The namespace is
//! [`NAMESPACE`]; the hash SHA-512 (ssh-keygen's default). With OpenSSH:
//!
//! ```text
//! head -c 4096 app.hvm | ssh-keygen -Y sign -f KEY -n hyper-artifact > app.hvm.sig
//! head -c 4096 app.hvm | ssh-keygen -Y verify -f allowed_signers -I ID -n hyper-artifact -s app.hvm.sig
//! ```
//!
//! Trusted keys come from an OpenSSH `allowed_signers` file (`principals
//! [options] keytype key [comment]`); a line's `namespaces="…"` option is
//! honoured; certificate authorities and validity windows are not
//! supported, and such lines are refused rather than half-honoured.

use std::path::Path;

use ssh_key::{HashAlg, PrivateKey, PublicKey, SshSig};

/// The signature namespace of hyper artifacts.
pub const NAMESPACE: &str = "hyper-artifact";

/// Why an artifact could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot read the key {0}")]
    Read(String, #[source] std::io::Error),
    #[error("{0} is not an OpenSSH private key")]
    Key(String, #[source] ssh_key::Error),
    #[error("{0} is encrypted: hyperbuild signs with an unencrypted key (ssh-keygen -p -N '' -f KEY on a copy, kept safe)")]
    Encrypted(String),
    #[error("{0}: only ed25519 and ECDSA keys sign hyper artifacts")]
    Algorithm(String),
    #[error("cannot sign with {0}")]
    Sign(String, #[source] ssh_key::Error),
}

/// Signs `header` (an artifact's first 4 KiB) with the key at `key`;
/// returns the armored signature.
pub fn sign(key: &Path, header: &[u8]) -> Result<String, SignError> {
    let name = key.display().to_string();
    let text = std::fs::read_to_string(key).map_err(|e| SignError::Read(name.clone(), e))?;
    // Keys pasted into CI secrets often gain blank lines or CRs around them.
    let text = text.replace('\r', "");
    let k = PrivateKey::from_openssh(format!("{}\n", text.trim()))
        .map_err(|e| SignError::Key(name.clone(), e))?;
    if k.is_encrypted() {
        return Err(SignError::Encrypted(name));
    }
    if !matches!(
        k.algorithm(),
        ssh_key::Algorithm::Ed25519 | ssh_key::Algorithm::Ecdsa { .. }
    ) {
        return Err(SignError::Algorithm(name));
    }
    let sig = k
        .sign(NAMESPACE, HashAlg::Sha512, header)
        .map_err(|e| SignError::Sign(name.clone(), e))?;
    sig.to_pem(ssh_key::LineEnding::LF)
        .map_err(|e| SignError::Sign(name, e))
}

/// Why a signature does not admit an artifact: one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("{0} is not signed (no signature found)")]
    Unsigned(String),
    #[error("{0}: the signature is not an OpenSSH signature")]
    Malformed(String),
    #[error("{what}: signed for namespace {found:?}, not {NAMESPACE:?}")]
    Namespace { what: String, found: String },
    #[error("{what}: signed by a key not in {signers} ({fingerprint})")]
    UnknownKey {
        what: String,
        signers: String,
        fingerprint: String,
    },
    #[error("{0}: the signature is for another artifact, or was altered")]
    Mismatch(String),
}

/// One trusted key.
#[derive(Debug, Clone)]
struct Signer {
    principals: String,
    key: PublicKey,
    namespaces: Option<Vec<String>>,
}

/// An OpenSSH `allowed_signers` file.
#[derive(Debug, Clone)]
pub struct AllowedSigners {
    pub path: String,
    signers: Vec<Signer>,
}

/// A file of trusted keys that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SignersError {
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    #[error("{path}:{line}: {why}")]
    Line {
        path: String,
        line: usize,
        why: String,
    },
    #[error("{0} lists no keys")]
    Empty(String),
}

/// Splits a line into words, keeping quoted option values whole.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl AllowedSigners {
    pub fn load(path: &Path) -> Result<AllowedSigners, SignersError> {
        let name = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| SignersError::Read(name.clone(), e))?;
        Self::parse(&name, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<AllowedSigners, SignersError> {
        let mut signers = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |why: String| SignersError::Line {
                path: path.to_string(),
                line: n + 1,
                why,
            };
            let w = words(line);
            // principals, then options unless the next word is a key type.
            let principals = w.first().ok_or_else(|| err("empty".into()))?.clone();
            let is_type =
                |s: &str| s.starts_with("ssh-") || s.starts_with("ecdsa-") || s.starts_with("sk-");
            let (options, key_at) = match w.get(1) {
                Some(t) if is_type(t) => (None, 1),
                Some(o) => (Some(o.clone()), 2),
                None => return Err(err("no key".into())),
            };
            let mut namespaces = None;
            if let Some(o) = options {
                for opt in o.split(',').map(str::trim) {
                    let (k, v) = opt.split_once('=').unwrap_or((opt, ""));
                    match k.to_ascii_lowercase().as_str() {
                        "namespaces" => {
                            namespaces = Some(
                                v.trim_matches('"')
                                    .split(',')
                                    .map(|s| s.trim().to_string())
                                    .collect(),
                            )
                        }
                        other => {
                            return Err(err(format!(
                                "option {other:?} is not supported (namespaces= is)"
                            )))
                        }
                    }
                }
            }
            let key_text = w[key_at..].join(" ");
            let key = PublicKey::from_openssh(&key_text)
                .map_err(|e| err(format!("not a public key: {e}")))?;
            signers.push(Signer {
                principals,
                key,
                namespaces,
            });
        }
        if signers.is_empty() {
            return Err(SignersError::Empty(path.to_string()));
        }
        Ok(AllowedSigners {
            path: path.to_string(),
            signers,
        })
    }

    /// Checks that `signature` (armored) is a signature by a trusted key, in
    /// our namespace, of `header`; returns the signer's principals.
    pub fn verify(
        &self,
        what: &str,
        header: &[u8],
        signature: &[u8],
    ) -> Result<String, VerifyError> {
        let sig = std::str::from_utf8(signature)
            .ok()
            .and_then(|s| SshSig::from_pem(s.trim()).ok())
            .ok_or_else(|| VerifyError::Malformed(what.to_string()))?;
        if sig.namespace() != NAMESPACE {
            return Err(VerifyError::Namespace {
                what: what.to_string(),
                found: sig.namespace().to_string(),
            });
        }
        let key = PublicKey::from(sig.public_key().clone());
        let signer = self
            .signers
            .iter()
            .find(|s| s.key.key_data() == key.key_data())
            .filter(|s| {
                s.namespaces
                    .as_ref()
                    .is_none_or(|ns| ns.iter().any(|n| n == NAMESPACE || n == "*"))
            })
            .ok_or_else(|| VerifyError::UnknownKey {
                what: what.to_string(),
                signers: self.path.clone(),
                fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
            })?;
        signer
            .key
            .verify(NAMESPACE, header, &sig)
            .map_err(|_| VerifyError::Mismatch(what.to_string()))?;
        Ok(signer.principals.clone())
    }

    /// Checks the signatures found for an artifact: the first that a trusted
    /// key made for it admits it; else the most telling refusal.
    pub fn verify_any(
        &self,
        what: &str,
        header: &[u8],
        signatures: &[Vec<u8>],
    ) -> Result<String, VerifyError> {
        let mut last = VerifyError::Unsigned(what.to_string());
        for s in signatures {
            match self.verify(what, header, s) {
                Ok(p) => return Ok(p),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &Path, name: &str, seed: u8) -> (std::path::PathBuf, String) {
        let kp = ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]);
        let k = PrivateKey::from(kp);
        let path = dir.join(name);
        std::fs::write(
            &path,
            k.to_openssh(ssh_key::LineEnding::LF).unwrap().as_bytes(),
        )
        .unwrap();
        (path, k.public_key().to_openssh().unwrap())
    }

    #[test]
    fn sign_then_verify_and_every_refusal() {
        let d = tempfile::tempdir().unwrap();
        let (ours, ours_pub) = key(d.path(), "ours", 1);
        let (theirs, _) = key(d.path(), "theirs", 2);
        let header = vec![7u8; 4096];
        let sig = sign(&ours, &header).unwrap();
        assert!(sig.starts_with("-----BEGIN SSH SIGNATURE-----"));
        let allowed =
            AllowedSigners::parse("allowed", &format!("# ci\nci@example.org {ours_pub}\n"))
                .unwrap();
        assert_eq!(
            allowed.verify("app.hvm", &header, sig.as_bytes()),
            Ok("ci@example.org".into())
        );
        // Another artifact's header.
        assert!(matches!(
            allowed.verify("app.hvm", &[8u8; 4096], sig.as_bytes()),
            Err(VerifyError::Mismatch(_))
        ));
        // Another key.
        let other = sign(&theirs, &header).unwrap();
        assert!(matches!(
            allowed.verify("app.hvm", &header, other.as_bytes()),
            Err(VerifyError::UnknownKey { .. })
        ));
        // Garbage, and no signature at all.
        assert!(matches!(
            allowed.verify("app.hvm", &header, b"nope"),
            Err(VerifyError::Malformed(_))
        ));
        assert!(matches!(
            allowed.verify_any("app.hvm", &header, &[]),
            Err(VerifyError::Unsigned(_))
        ));
        // A namespace restriction that excludes ours.
        let narrow = AllowedSigners::parse(
            "allowed",
            &format!("ci@example.org namespaces=\"git\" {ours_pub}\n"),
        )
        .unwrap();
        assert!(matches!(
            narrow.verify("app.hvm", &header, sig.as_bytes()),
            Err(VerifyError::UnknownKey { .. })
        ));
        // Lines we do not honour are refused, not half-read.
        assert!(AllowedSigners::parse("a", &format!("x cert-authority {ours_pub}")).is_err());
        assert!(AllowedSigners::parse("a", "# nothing\n").is_err());
    }
}
