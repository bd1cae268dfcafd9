//! Blob files: `<data>/blobs/sha256-<hex>`, one per distinct content, never
//! modified; what start-up removes (temp files, unreferenced blobs); and
//! the streaming digest check every load makes.

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
                tracing::error!(blob = %digest, "catalog references a blob that is missing from the store");
            }
        }
        self.bytes.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn referenced_blobs(&self) -> BTreeSet<Digest> {
        let models = self.models.read().unwrap();
        models.values().flat_map(|m| m.versions.values()).flat_map(|v| v.files.values().copied()).collect()
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.file_name())
    }

    /// Bytes of all blobs on disk.
    pub fn size(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Digests of every blob in the store, sorted.
    pub fn blobs(&self) -> Vec<Digest> {
        self.referenced_blobs().into_iter().collect()
    }

    /// The version's files, each blob's sha256 checked by streaming it from
    /// disk (never the whole file in memory): what a backend may load. A
    /// blob whose bytes changed is [`Error::CorruptBlob`].
    pub fn verified_files(&self, version: &Version) -> Result<Files> {
        version
            .files
            .iter()
            .map(|(name, digest)| {
                let path = self.blob_path(digest);
                let actual = Digest::of_file(&path).map_err(|e| Error::io(path.display().to_string(), e))?;
                if actual != *digest {
                    return Err(Error::CorruptBlob { file: name.clone(), digest: *digest });
                }
                Ok((name.clone(), path))
            })
            .collect()
    }
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
