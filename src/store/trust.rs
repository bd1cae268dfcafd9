//! Signed versions: a model's [`Trust`] (public keys and a policy, the
//! `models/<name>/trust` file) and the check of an import's detached
//! minisign signature of the version's manifest.
//!
//! The `trust` file is text: a `policy off|warn|require` line and one
//! minisign public key (base64, as in `minisign.pub`) per line; blank lines,
//! `#` comments and minisign's `untrusted comment:` lines are skipped, so
//! `cat minisign.pub` makes a valid file. Without a policy line the policy
//! is `require` when there are keys, else `off`.
//!
//! What is signed is the version's manifest (its `digest` is the sha256 of
//! the same text): one line per file, `sha256:<hex>  <name>`, sorted by
//! name. For one file:
//! `printf 'sha256:%s  %s\n' "$(sha256sum < f.onnx | cut -d' ' -f1)" f.onnx | minisign -S -m - -x f.onnx.minisig`.

use serde::{Deserialize, Serialize};

use crate::error::{one_line, Error, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Signatures are not looked at.
    #[default]
    Off,
    /// A missing or bad signature is logged; the import goes on.
    Warn,
    /// An import without a good signature by one of the keys fails.
    Require,
}

/// A model's keys and policy, kept in its catalog record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    pub policy: Policy,
    /// Public keys, base64 as minisign writes them.
    pub keys: Vec<String>,
}

/// Who signed a version: the key that verified it and the signature's
/// trusted comment (minisign puts a timestamp and the file name there).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signer {
    pub key: String,
    pub trusted_comment: String,
}

/// Signatures are a few hundred bytes.
pub const MAX_SIGNATURE_BYTES: usize = 4096;

impl Trust {
    /// Parses a `trust` file (see the module header); EINVAL with the line
    /// that is wrong.
    pub fn parse(text: &[u8]) -> Result<Trust> {
        let bad = |why: String| Error::InvalidArgument(format!("trust: {why}"));
        let text = std::str::from_utf8(text).map_err(|_| bad("not UTF-8 text".into()))?;
        let mut policy = None;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
            if line.is_empty() || line.starts_with('#') || line.starts_with("untrusted comment:") {
                continue;
            }
            if let Some(p) = line.strip_prefix("policy") {
                policy = Some(match p.trim() {
                    "off" => Policy::Off,
                    "warn" => Policy::Warn,
                    "require" => Policy::Require,
                    other => {
                        return Err(bad(format!(
                            "line {n}: policy {:?}: expected off, warn or require",
                            one_line(other)
                        )))
                    }
                });
            } else if minisign_verify::PublicKey::from_base64(line).is_ok() {
                keys.push(line.to_string());
            } else {
                return Err(bad(format!("line {n}: not a minisign public key nor a policy line")));
            }
        }
        let policy = policy.unwrap_or(if keys.is_empty() { Policy::Off } else { Policy::Require });
        if policy != Policy::Off && keys.is_empty() {
            return Err(bad("a policy other than off needs at least one public key".into()));
        }
        Ok(Trust { policy, keys })
    }

    /// The `trust` file's text.
    pub fn to_text(&self) -> String {
        let policy = match self.policy {
            Policy::Off => "off",
            Policy::Warn => "warn",
            Policy::Require => "require",
        };
        let mut text = format!("policy {policy}\n");
        for key in &self.keys {
            text.push_str(key);
            text.push('\n');
        }
        text
    }

    /// Checks `signature` (a minisign signature file's text, if the import
    /// came with one) of `manifest` against the keys, under the policy:
    /// the signer if one of the keys signed it; `None` if unsigned and the
    /// policy lets it in. `model` names it in the reasons.
    pub fn check(&self, model: &str, manifest: &[u8], signature: Option<&[u8]>) -> Result<Option<Signer>> {
        if self.policy == Policy::Off {
            return Ok(None);
        }
        let verdict = match signature {
            None => Err(Error::Unsigned(format!(
                "models/{model} requires signed versions (its trust file); copy the .minisig of the manifest in first"
            ))),
            Some(signature) => self.verify(manifest, signature).map(Some),
        };
        match verdict {
            Err(e) if self.policy == Policy::Warn => {
                tracing::warn!(model, "importing anyway (trust policy warn): {e}");
                Ok(None)
            }
            verdict => verdict,
        }
    }

    fn verify(&self, manifest: &[u8], signature: &[u8]) -> Result<Signer> {
        let bad = |why: &str| Error::BadSignature(format!("the version's signature {why}"));
        let text = std::str::from_utf8(signature).map_err(|_| bad("is not a minisign signature"))?;
        let signature = minisign_verify::Signature::decode(text).map_err(|_| bad("is not a minisign signature"))?;
        for key in &self.keys {
            let Ok(public) = minisign_verify::PublicKey::from_base64(key) else { continue };
            if public.verify(manifest, &signature, false).is_ok() {
                let trusted_comment = one_line(signature.trusted_comment());
                return Ok(Signer { key: key.clone(), trusted_comment });
            }
        }
        Err(bad("is not by any key of the model's trust file, or not of this manifest"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair() -> (minisign::PublicKey, minisign::SecretKey) {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        (kp.pk, kp.sk)
    }

    fn sign(sk: &minisign::SecretKey, data: &[u8]) -> Vec<u8> {
        let sig = minisign::sign(None, sk, data, Some("file:m.onnx"), None).unwrap();
        sig.into_string().into_bytes()
    }

    #[test]
    fn trust_files_parse_and_print() {
        let (pk, _) = keypair();
        let b64 = pk.to_base64();
        let file = format!("# ours\nuntrusted comment: minisign public key\n{b64}\n");
        let t = Trust::parse(file.as_bytes()).unwrap();
        assert_eq!(t, Trust { policy: Policy::Require, keys: vec![b64.clone()] });
        assert_eq!(Trust::parse(t.to_text().as_bytes()).unwrap(), t);
        assert_eq!(Trust::parse(b"").unwrap(), Trust::default());
        for bad in [&b"policy maybe\n"[..], b"policy require\n", b"not a key\n", b"\xff"] {
            let e = Trust::parse(bad).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{e}");
            assert!(e.to_string().starts_with("trust: "), "{e}");
        }
    }

    #[test]
    fn imports_are_checked_under_each_policy() {
        let (pk, sk) = keypair();
        let (_, other) = keypair();
        let manifest = b"sha256:00  m.onnx\n";
        let trust = |policy| Trust { policy, keys: vec![pk.to_base64()] };
        let signer = trust(Policy::Require).check("m", manifest, Some(&sign(&sk, manifest))).unwrap().unwrap();
        assert_eq!((signer.key, signer.trusted_comment.as_str()), (pk.to_base64(), "file:m.onnx"));
        let unsigned = trust(Policy::Require).check("m", manifest, None).unwrap_err();
        assert_eq!(unsigned.errno(), libc::EACCES);
        for bad in [sign(&other, manifest), sign(&sk, b"sha256:11  m.onnx\n"), b"garbage".to_vec()] {
            let e = trust(Policy::Require).check("m", manifest, Some(&bad)).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{e}");
        }
        assert_eq!(trust(Policy::Warn).check("m", manifest, None).unwrap(), None);
        assert_eq!(trust(Policy::Warn).check("m", manifest, Some(b"garbage")).unwrap(), None);
        assert_eq!(trust(Policy::Off).check("m", manifest, Some(b"garbage")).unwrap(), None);
    }
}
