//! Blob files: `<data>/blobs/sha256-<hex>`, one per distinct content, never
//! modified; what start-up removes (temp files, unreferenced blobs); and
//! [`Staged`] files, what a backend is given to load: the streaming digest
//! check every load makes happens there.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::backend::Files;
use crate::error::{Error, Result};

use super::{Digest, Store, Version};

impl Store {
    /// Deletes temp files and unreferenced blobs; counts the bytes kept.
    pub(super) fn recover(&self) -> Result<()> {
        let _w = self.writer.lock().unwrap();
        let referenced = self.referenced_blobs();
        let mut bytes = 0;
        let dir = fs::read_dir(&self.blobs).map_err(|e| Error::io(self.blobs.display().to_string(), e))?;
        for entry in dir {
            let entry = entry.map_err(|e| Error::io(self.blobs.display().to_string(), e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let keep = name.parse::<Digest>().is_ok_and(|d| referenced.contains(&d));
            if keep {
                bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
            } else {
                tracing::info!(file = %name, "removing leftover from an interrupted import or delete");
                remove_file_if_present(&entry.path())?;
            }
        }
        for digest in &referenced {
            if !self.blob_path(digest).exists() {
                // Alone, a loss; with a shared store (set after this), a
                // blob not fetched yet or evicted.
                tracing::warn!(blob = %digest, "catalog references a blob that is not here (lost, or in a shared store)");
            }
        }
        self.bytes.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Removes those of `digests` no version references any more (they
    /// belonged to a version just gone). Under the writer lock. A blob
    /// that cannot be removed now is collected at the next start.
    pub(super) fn drop_unreferenced<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) {
        let referenced = self.referenced_blobs();
        for digest in digests.into_iter().filter(|d| !referenced.contains(d)) {
            let path = self.blob_path(digest);
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match remove_file_if_present(&path) {
                Ok(()) => {
                    self.bytes.fetch_sub(len, Ordering::Relaxed);
                    self.last_used.lock().unwrap().remove(digest);
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }

    pub(super) fn referenced_blobs(&self) -> BTreeSet<Digest> {
        let models = self.models.read().unwrap();
        models.values().flat_map(|m| m.blobs()).collect()
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.file_name())
    }

    /// A blob's size: from the shared store if it is not here (without
    /// fetching it: `ls -l` is not a first use).
    pub fn blob_len(&self, digest: &Digest) -> Result<u64> {
        let path = self.blob_path(digest);
        match (fs::metadata(&path), self.shared.get()) {
            (Ok(meta), _) => Ok(meta.len()),
            (Err(e), Some(shared)) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(&len) = self.remote_sizes.lock().unwrap().get(digest) {
                    return Ok(len);
                }
                let len = shared.size(digest)?;
                self.remote_sizes.lock().unwrap().insert(*digest, len);
                Ok(len)
            }
            (Err(e), _) => Err(Error::io(path.display().to_string(), e)),
        }
    }

    /// The path of a blob on this node: with a shared store, a blob not in
    /// the local cache is fetched first, and refused
    /// ([`Error::CorruptBlob`]) if its bytes do not hash to its name.
    pub fn local_blob(&self, digest: &Digest) -> Result<PathBuf> {
        let path = self.blob_path(digest);
        if self.shared.get().is_some() {
            self.last_used.lock().unwrap().insert(*digest, std::time::Instant::now());
        }
        let Some(shared) = self.shared.get().filter(|_| !path.is_file()) else { return Ok(path) };
        let (fetching, arrived) = &self.fetching;
        {
            let mut now = fetching.lock().unwrap();
            while now.contains(digest) {
                now = arrived.wait(now).unwrap();
            }
            if path.is_file() {
                return Ok(path);
            }
            now.insert(*digest);
        }
        // Whatever the fetch's end (a panic included), others may try.
        struct Done<'a>(&'a (std::sync::Mutex<std::collections::HashSet<Digest>>, std::sync::Condvar), Digest);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0 .0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
                self.0 .1.notify_all();
            }
        }
        let done = Done(&self.fetching, *digest);
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        let tmp = self.blobs.join(format!("tmp-{}-fetch-{n}", std::process::id()));
        let fetched = shared.download(digest, &tmp).and_then(|actual| {
            if actual != *digest {
                return Err(Error::CorruptBlob { file: digest.file_name(), digest: *digest });
            }
            let len = fs::metadata(&tmp).map_err(|e| Error::io(tmp.display().to_string(), e))?.len();
            fs::rename(&tmp, &path).map_err(|e| Error::io(path.display().to_string(), e))?;
            sync_dir(&self.blobs)?;
            self.bytes.fetch_add(len, Ordering::Relaxed);
            Ok(())
        });
        if fetched.is_err() {
            let _ = remove_file_if_present(&tmp);
        }
        drop(done);
        fetched?;
        self.evict(digest);
        Ok(path)
    }

    /// Past the cache's bound ([`Store::set_blob_cache_limit`]), removes
    /// the least recently used blobs here but `keep`: they are in the
    /// shared store, and a loaded model keeps its staged links. Under the
    /// writer lock, so no import is between moving a blob in and
    /// uploading it.
    fn evict(&self, keep: &Digest) {
        let limit = self.cache_limit.load(Ordering::Relaxed);
        if limit == 0 || self.bytes.load(Ordering::Relaxed) <= limit {
            return;
        }
        let _w = self.writer.lock().unwrap();
        let Ok(dir) = fs::read_dir(&self.blobs) else { return };
        let last_used = self.last_used.lock().unwrap().clone();
        // Never used since the start: oldest.
        let mut here: Vec<(Option<std::time::Instant>, Digest, u64)> = dir
            .filter_map(|e| {
                let e = e.ok()?;
                let digest: Digest = e.file_name().to_string_lossy().parse().ok()?;
                Some((last_used.get(&digest).copied(), digest, e.metadata().ok()?.len()))
            })
            .filter(|(_, digest, _)| digest != keep)
            .collect();
        here.sort();
        for (_, digest, len) in here {
            if self.bytes.load(Ordering::Relaxed) <= limit {
                break;
            }
            if remove_file_if_present(&self.blob_path(&digest)).is_ok() {
                self.bytes.fetch_sub(len, Ordering::Relaxed);
                self.last_used.lock().unwrap().remove(&digest);
                tracing::debug!(blob = %digest, "evicted from the local cache");
            }
        }
    }

    /// Bytes of all blobs on disk.
    pub fn size(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether a version references the blob `digest`.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        let models = self.models.read().unwrap();
        models.values().any(|m| m.blobs().any(|d| d == *digest))
    }

    /// Digests of every blob in the store, sorted.
    pub fn blobs(&self) -> Vec<Digest> {
        self.referenced_blobs().into_iter().collect()
    }

    /// The version's files staged for a backend to load (see [`Staged`]),
    /// each blob's sha256 checked by streaming it from disk (never the
    /// whole file in memory), through the link the backend will open. A
    /// blob whose bytes changed is [`Error::CorruptBlob`].
    pub fn stage(&self, version: &Version) -> Result<Staged> {
        let mut staged = self.staging()?;
        for (name, digest) in &version.files {
            let path = staged.link(name, &self.local_blob(digest)?)?;
            let actual = Digest::of_file(&path).map_err(|e| Error::io(path.display().to_string(), e))?;
            if actual != *digest {
                return Err(Error::CorruptBlob { file: name.clone(), digest: *digest });
            }
        }
        Ok(staged)
    }

    /// A new, empty staging directory.
    pub(super) fn staging(&self) -> Result<Staged> {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join(STAGING).join(format!("{}-{n}", std::process::id()));
        private_dir(&dir)?;
        Ok(Staged { dir, files: Files::new() })
    }
}
/// Makes `dir` (and missing parents) a directory only the daemon's user
/// can enter, also when it exists with a wider mode: what the daemon keeps
/// there (models, requests, outputs) is every user's.
/// Where [`Staged`] directories are made: `<data>/staging/`, emptied at
/// start.
pub(super) const STAGING: &str = "staging";

/// A version's files as a backend loads them: hard links to their blobs
/// (or to an import's temp file), under the version's own file names, in a
/// private directory that holds nothing else. So a model file that names
/// other files (ONNX external data) finds its version's files and no
/// other: not the blobs of other models, not an upload still being
/// written. Import checks and loads go through the same kind of directory,
/// so what an import accepted is what runs. Removed when dropped.
pub struct Staged {
    dir: PathBuf,
    files: Files,
}

impl Staged {
    /// Name -> path, for [`crate::backend::Backend::inspect`] and `load`.
    pub fn files(&self) -> &Files {
        &self.files
    }

    /// Links `target` in as `name` (a path inside a version: its
    /// directories are made); returns the link's path.
    pub(super) fn link(&mut self, name: &str, target: &Path) -> Result<PathBuf> {
        let path = self.dir.join(name);
        if let Some(parent) = path.parent().filter(|p| *p != self.dir) {
            fs::create_dir_all(parent).map_err(|e| Error::io(format!("staging {name}"), e))?;
        }
        fs::hard_link(target, &path).map_err(|e| Error::io(format!("staging {name}"), e))?;
        self.files.insert(name.to_string(), path.clone());
        Ok(path)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!("removing {}: {e}", self.dir.display());
        }
    }
}

pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |e| Error::io(dir.display().to_string(), e);
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)
}

pub(super) fn remove_file_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(Error::io(path.display().to_string(), e)),
        _ => Ok(()),
    }
}

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir.display().to_string(), e))
}
