//! Multi-file versions: a tar archive (optionally gzipped) copied in as one
//! file is unpacked into one upload per member, and imported as one
//! version ([`Store::import`]) whose manifest lists every path.
//!
//! Unpacking refuses, with EINVAL and one line, anything that is not a
//! plain tree of regular files: links, devices, FIFOs, sparse members,
//! absolute paths or `..`, a name used twice (or as both a file and a
//! directory), a truncated archive. It is bounded before it allocates:
//! members' declared sizes against `max_bytes` (EFBIG) and the store's free
//! space (ENOSPC), the member count, and the bytes between members' data
//! (GNU long names and PAX headers, which the `tar` crate reads into
//! memory), so a small archive cannot unpack into a large anything.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

use crate::error::{Error, Result};

use super::names::normalize_path;
use super::{Store, Upload};

/// The archive formats a version may arrive as, by file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Archive {
    Tar,
    TarGz,
}

impl Archive {
    /// The format a file copied in as `name` is, if it is an archive.
    pub fn of(name: &str) -> Option<Archive> {
        if name.ends_with(".tar") {
            Some(Archive::Tar)
        } else if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            Some(Archive::TarGz)
        } else {
            None
        }
    }
}

/// Most members (files and directories) an archive may hold.
pub const MAX_MEMBERS: usize = 10_000;

/// Bytes an archive may spend outside its members' data: headers, long
/// names, PAX records. Real archives spend a few KiB per member.
const META_PER_MEMBER: u64 = 64 << 10;

impl Store {
    /// Unpacks `archive` (an upload of a `kind` archive, at most
    /// `max_bytes` of members) into one upload per regular file, by path
    /// relative to the archive's root (a leading `./` dropped), in archive
    /// order. `name` is how errors call it.
    pub fn unpack(&self, name: &str, archive: &Upload, kind: Archive, max_bytes: u64) -> Result<Vec<(String, Upload)>> {
        let bad = |why: String| Error::InvalidModel { name: name.to_string(), why };
        let budget = Rc::new(Budget::default());
        budget.allow(META_PER_MEMBER); // the first header
        let raw = archive.reader()?;
        let stream: Box<dyn Read> = match kind {
            Archive::Tar => Box::new(raw),
            Archive::TarGz => Box::new(flate2::read::MultiGzDecoder::new(raw)),
        };
        let mut tar = tar::Archive::new(Bounded { inner: stream, budget: budget.clone() });
        let entries = tar.entries().map_err(|e| bad(format!("not a tar archive: {e}")))?;
        let mut members: Vec<(String, Upload)> = Vec::new();
        let mut dirs: Vec<String> = Vec::new();
        let mut total = 0u64;
        for (i, entry) in entries.enumerate() {
            if i == MAX_MEMBERS {
                return Err(bad(format!("more than {MAX_MEMBERS} members")));
            }
            let mut entry = entry.map_err(|e| bad(reading(&e, &budget)))?;
            budget.allow(META_PER_MEMBER); // the next header (a file member adds its data below)
            let kind = entry.header().entry_type();
            let path = normalize_path(&entry.path_bytes()).map_err(|why| bad(why.to_string()))?;
            match kind {
                tar::EntryType::Regular | tar::EntryType::Continuous => {}
                tar::EntryType::Directory => {
                    if let Some(path) = path {
                        dirs.push(path);
                    }
                    continue;
                }
                // `git archive` writes a global PAX header first.
                tar::EntryType::XGlobalHeader => continue,
                other => {
                    let shown = path.as_deref().unwrap_or(".");
                    return Err(bad(format!("{shown}: {} members are not allowed, only files", kind_name(other))));
                }
            }
            let Some(path) = path else { return Err(bad("a file member named '.'".into())) };
            let size = entry.size();
            total = total.saturating_add(size);
            if total > max_bytes {
                return Err(Error::ImportTooBig { path: name.to_string(), limit: max_bytes });
            }
            if size > self.free_bytes() {
                let context = format!("{name}: {path} ({size} bytes) is larger than the store's free space");
                return Err(Error::io(context, io::Error::from_raw_os_error(libc::ENOSPC)));
            }
            // This member's data and padding, then the next header.
            budget.allow(size.next_multiple_of(512) + META_PER_MEMBER);
            let mut upload = self.begin_upload()?;
            let mut at = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = entry.read(&mut buf).map_err(|e| bad(format!("{path}: {}", reading(&e, &budget))))?;
                if n == 0 {
                    break;
                }
                upload.write_at(at, &buf[..n])?;
                at += n as u64;
            }
            if at != size {
                return Err(bad(format!("{path}: truncated archive ({at} of {size} bytes)")));
            }
            members.push((path, upload));
        }
        check_tree(&members, &dirs).map_err(bad)?;
        if members.is_empty() {
            return Err(bad("the archive holds no files".into()));
        }
        Ok(members)
    }
}

/// Whether the paths make a tree: none twice, none both a file and a
/// directory.
fn check_tree(members: &[(String, Upload)], dirs: &[String]) -> std::result::Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for (path, _) in members {
        if !seen.insert(path.as_str()) {
            return Err(format!("{path}: appears twice"));
        }
    }
    let parents = members.iter().map(|(p, _)| p.as_str()).chain(dirs.iter().map(String::as_str));
    for path in parents {
        let mut parent = path;
        while let Some((dir, _)) = parent.rsplit_once('/') {
            if seen.contains(dir) {
                return Err(format!("{dir}: both a file and a directory"));
            }
            parent = dir;
        }
    }
    Ok(())
}

fn kind_name(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Symlink => "symlink",
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char | tar::EntryType::Block => "device",
        tar::EntryType::Fifo => "FIFO",
        tar::EntryType::GNUSparse => "sparse",
        _ => "special",
    }
}

/// An error met reading the archive, as one line.
fn reading(e: &io::Error, budget: &Budget) -> String {
    if budget.exceeded.get() {
        "headers too large (long names or PAX records)".into()
    } else if e.kind() == io::ErrorKind::UnexpectedEof || e.to_string().contains("failed to read entire block") {
        "truncated archive".into()
    } else {
        format!("malformed archive: {}", crate::backend::first_line(&e.to_string()))
    }
}

/// How many bytes of the (decompressed) archive may still be read: grown
/// by each member's declared size and a header allowance.
#[derive(Default)]
struct Budget {
    left: Cell<u64>,
    exceeded: Cell<bool>,
}

impl Budget {
    /// What may be read from now on: an allowance left unused by one
    /// member does not carry over to the next.
    fn allow(&self, bytes: u64) {
        self.left.set(bytes);
    }
}

/// The archive's bytes, failing past the budget.
struct Bounded<R> {
    inner: R,
    budget: Rc<Budget>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.budget.left.get();
        if left == 0 {
            self.budget.exceeded.set(true);
            return Err(io::Error::other("archive headers exceed their allowance"));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.budget.left.set(left - n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_are_known_by_name() {
        assert_eq!(Archive::of("model.tar"), Some(Archive::Tar));
        assert_eq!(Archive::of("model.tar.gz"), Some(Archive::TarGz));
        assert_eq!(Archive::of("m.tgz"), Some(Archive::TarGz));
        assert_eq!(Archive::of("model.onnx"), None);
    }
}
