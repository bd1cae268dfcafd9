//! [`Digest`]: a sha256, parsed and validated before any path is built
//! from it.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
/// A sha256 content digest. Parsed and validated before any path is built
/// from it; shown as `sha256:<hex>`, named on disk `sha256-<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// A hasher for bytes that arrive in pieces ([`Digest::finish`]).
    pub fn hasher() -> Sha256 {
        Sha256::new()
    }

    /// The digest a hasher fed so far makes.
    pub fn finish(hasher: Sha256) -> Digest {
        Digest(hasher.finalize().into())
    }

    /// The sha256 of a file, read 1 MiB at a time (never the whole file in
    /// memory).
    pub fn of_file(path: &Path) -> io::Result<Digest> {
        Digest::of_reader(File::open(path)?)
    }

    /// The sha256 of what `file` reads to its end, 1 MiB at a time.
    pub fn of_reader(mut file: impl Read) -> io::Result<Digest> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match file.read(&mut buf) {
                Ok(0) => return Ok(Digest::finish(hasher)),
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    pub fn hex(&self) -> String {
        self.with_text(|t| t[7..].to_string())
    }

    /// Calls `f` with `sha256:<hex>`, made without allocating: every job
    /// record names a digest.
    fn with_text<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        let mut buf = [0u8; 71];
        buf[..7].copy_from_slice(b"sha256:");
        hex::encode_to_slice(self.0, &mut buf[7..]).expect("64 hex digits fill the rest");
        f(std::str::from_utf8(&buf).expect("ASCII"))
    }

    /// The blob's file name: `sha256-<hex>`.
    pub fn file_name(&self) -> String {
        format!("sha256-{}", self.hex())
    }
}

impl FromStr for Digest {
    type Err = Error;

    /// Accepts `sha256:<64 hex>` and `sha256-<64 hex>` (lower case only, so
    /// that one digest has exactly one file name).
    fn from_str(s: &str) -> Result<Digest> {
        let bad = |why| Error::InvalidArgument(format!("invalid digest {s:?}: {why}"));
        let hex_part = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("sha256-"))
            .ok_or_else(|| bad("expected sha256:<hex> or sha256-<hex>"))?;
        if hex_part.len() != 64 || !hex_part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad("expected 64 lower-case hex digits"));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| bad("not hex"))?;
        Ok(Digest(bytes))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_text(|t| f.write_str(t))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.with_text(|t| s.serialize_str(t))
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
