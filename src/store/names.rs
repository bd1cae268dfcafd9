//! What a user may type as a name: models, aliases, model files, and
//! `v<N>` for versions. Every name is checked here before it reaches the
//! catalog or a path.

use crate::error::{Error, Result};

use super::Model;
/// Names of models, aliases and model files: what a user may type as one
/// path component. Returns the name back as `&str` when valid.
pub fn validate_name(name: &[u8]) -> Result<&str> {
    let invalid = |why| Error::InvalidName { name: String::from_utf8_lossy(name).into_owned(), why };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > 255 {
        return Err(invalid("longer than 255 bytes"));
    }
    if name.contains(&b'/') {
        return Err(invalid("contains '/'"));
    }
    if name.contains(&0) {
        return Err(invalid("contains NUL"));
    }
    // A newline or an escape in a name garbles every listing and log line
    // that shows it.
    if name.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(invalid("contains a control character"));
    }
    if name[0] == b'.' {
        return Err(invalid("starts with '.'"));
    }
    std::str::from_utf8(name).map_err(|_| invalid("not UTF-8"))
}

/// `v<N>` names a version; anything else in a model directory is an alias.
pub fn parse_version_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix('v')?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Names a version directory holds besides its model files: no file of a
/// version may have one as its first component.
pub const VERSION_FILES: [&str; 7] = ["digest", "meta.json", "infer", "clone", "error", "stats", "signature"];

/// Longest path a file of a version may have.
const MAX_PATH: usize = 4096;

/// A path inside a version (a multi-file version's member, e.g.
/// `1_Pooling/config.json`) as the version stores it: relative,
/// `/`-separated, `.` components dropped, each component a name as in
/// [`validate_name`] except that it may start with `.` (`.gitattributes`
/// belongs to a model's tree). `None` for the root itself (`./`).
pub fn normalize_path(raw: &[u8]) -> std::result::Result<Option<String>, &'static str> {
    if raw.starts_with(b"/") {
        return Err("absolute paths are not allowed");
    }
    if raw.len() > MAX_PATH {
        return Err("a path longer than 4096 bytes");
    }
    let mut parts = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => continue,
            b".." => return Err("paths with '..' are not allowed"),
            _ => {}
        }
        if part.len() > 255 {
            return Err("a path component longer than 255 bytes");
        }
        if part.iter().any(|&b| b < 0x20 || b == 0x7f) {
            return Err("a path with a control character");
        }
        parts.push(std::str::from_utf8(part).map_err(|_| "a path that is not UTF-8")?);
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// The alias the daemon keeps pointing at the newest version.
pub const LATEST: &str = "latest";

/// Alias names: valid names that do not look like a version or `latest`.
pub(super) fn validate_alias(alias: &str) -> Result<()> {
    validate_name(alias.as_bytes())?;
    if alias == LATEST {
        return Err(Error::NotPermitted(format!("{LATEST} is kept by the daemon")));
    }
    if alias == "config.json" || alias == "trust" || alias == "status" {
        return Err(Error::InvalidName {
            name: alias.to_string(),
            why: "config.json, trust and status are the model's own files",
        });
    }
    if alias.starts_with('v') && alias[1..].bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::InvalidName { name: alias.to_string(), why: "v<N> names versions, not aliases" });
    }
    Ok(())
}

/// The version a symlink target names: `v<N>` or `./v<N>`.
pub(super) fn resolve_target(model: &Model, target: &str) -> Result<u32> {
    let name = target.strip_prefix("./").unwrap_or(target);
    let number = parse_version_name(name).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "alias target {target:?}: an alias points at a version of the same model, e.g. v1"
        ))
    })?;
    if !model.versions.contains_key(&number) {
        return Err(Error::NotFound(format!("models/{}/{name}", model.name)));
    }
    Ok(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_paths_are_relative_and_clean() {
        assert_eq!(normalize_path(b"./1_Pooling/config.json"), Ok(Some("1_Pooling/config.json".into())));
        assert_eq!(normalize_path(b"./"), Ok(None));
        assert_eq!(normalize_path(b".gitattributes"), Ok(Some(".gitattributes".into())));
        assert_eq!(normalize_path(b"/etc/passwd"), Err("absolute paths are not allowed"));
        assert_eq!(normalize_path(b"a/../../b"), Err("paths with '..' are not allowed"));
        assert_eq!(normalize_path(b"a\nb"), Err("a path with a control character"));
        assert_eq!(normalize_path(b"\xff"), Err("a path that is not UTF-8"));
    }
}
