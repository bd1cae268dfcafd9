//! Imports: an [`Upload`] streams into a temp file in the blob directory;
//! [`Store::import`] hashes, checks (the caller's inspector), fsyncs,
//! renames it to its digest name and commits the version.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::backend::{Files, Inspected};
use crate::error::{Error, Result};

use super::blobs::{remove_file_if_present, sync_dir};
use super::names::{normalize_path, VERSION_FILES};
use super::{now_secs, Digest, Store, Version};

/// What a successful import did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Imported {
    /// A new version with this number.
    New(u32),
    /// The content equals this existing version; nothing was added.
    Existing(u32),
}

impl Store {
    /// Starts an import: a temp file in the blob directory (so the final
    /// rename never crosses file systems).
    pub fn begin_upload(&self) -> Result<Upload> {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        let path = self.blobs.join(format!("tmp-{}-{n}", std::process::id()));
        let file = OpenOptions::new()
            .mode(0o600)
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(path.display().to_string(), e))?;
        Ok(Upload { file, path: Some(path), len: 0 })
    }

    /// Commits uploads as the next version of `model`: `files` are its
    /// files by path (one for a model file copied in; an archive's members,
    /// see [`Store::unpack`]). `inspect` must load the version's files
    /// with a backend (it runs on the temp files before anything is
    /// committed); its error leaves nothing behind. The version records
    /// the backend it names. `signature` is a minisign signature of the
    /// version's manifest, if one came with it: the model's trust policy
    /// decides ([`super::Trust::check`]), and the version records who
    /// signed. Content equal to an existing version's (the same paths and
    /// bytes) makes no new version.
    pub fn import(
        &self,
        model: &str,
        files: Vec<(String, Upload)>,
        signature: Option<&[u8]>,
        inspect: impl FnOnce(&Files) -> Result<Inspected>,
    ) -> Result<Imported> {
        self.commit(model, files, signature, None, inspect)
    }

    /// Like [`Store::import`], but as version `number` exactly, recording
    /// where it came from (`origin`, e.g. a watched repository's directory).
    /// If `v<number>` exists: [`Imported::Existing`] when it has the same
    /// files, else EEXIST. Equal content under another number does not
    /// stop it (the number is what its source calls it).
    pub fn import_at(
        &self,
        model: &str,
        number: u32,
        origin: &str,
        files: Vec<(String, Upload)>,
        inspect: impl FnOnce(&Files) -> Result<Inspected>,
    ) -> Result<Imported> {
        self.commit(model, files, None, Some((number, origin)), inspect)
    }

    fn commit(
        &self,
        model: &str,
        files: Vec<(String, Upload)>,
        signature: Option<&[u8]>,
        at: Option<(u32, &str)>,
        inspect: impl FnOnce(&Files) -> Result<Inspected>,
    ) -> Result<Imported> {
        for (path, _) in &files {
            if normalize_path(path.as_bytes()).ok().flatten().as_deref() != Some(path.as_str()) {
                return Err(Error::InvalidName { name: path.clone(), why: "not a path inside a version" });
            }
            let top = path.split('/').next().unwrap_or(path);
            if VERSION_FILES.contains(&top) {
                return Err(Error::InvalidModel {
                    name: model.to_string(),
                    why: format!("{path}: {top} is reserved for the files aifs adds to every version"),
                });
            }
        }
        self.model(model)?;
        // The fsync, the sha256 and the backend's load each take a good
        // part of a large import; they overlap (all must succeed before the
        // commit). Hashing here rather than as the bytes arrive keeps it
        // off the writes' path: the files are still in the page cache.
        let (synced, digests, inspected) = std::thread::scope(|scope| {
            let sync = scope.spawn(|| files.iter().try_for_each(|(_, u)| u.sync()));
            let hash = scope.spawn(|| files.iter().map(|(_, u)| u.digest()).collect::<Result<Vec<_>>>());
            let inspected = self.staging().and_then(|mut staged| {
                for (path, upload) in &files {
                    staged.link(path, upload.path.as_deref().expect("a live upload has a path"))?;
                }
                inspect(staged.files())
            });
            (joined(sync.join(), "syncing"), joined(hash.join(), "hashing"), inspected)
        });
        synced?;
        let digests = digests?;
        let inspected = inspected?;
        let manifest: BTreeMap<String, Digest> =
            files.iter().zip(&digests).map(|((path, _), digest)| (path.clone(), *digest)).collect();

        let size = files.iter().map(|(_, u)| u.len).sum();
        let text = Version::manifest(&manifest);
        // A shared store has the blobs before any record names them; sent
        // from the files just hashed, before the writer lock (an upload
        // takes as long as the bytes do).
        if let Some(shared) = self.shared.get() {
            for ((_, upload), digest) in files.iter().zip(&digests) {
                shared.upload(digest, upload.path.as_deref().expect("a live upload has a path"))?;
            }
        }
        // Moved into the blob directory by the first try.
        let mut files = Some(files);
        let mut added: Vec<(Digest, u64)> = Vec::new();
        // Computed again if another node changed the model's record first.
        let committed = self.retrying(|| {
            let _w = self.writer.lock().unwrap();
            let current = self.model(model)?; // it may have been removed meanwhile
                                              // A model file is the same content under any name; a tree is
                                              // the same only with the same paths.
            let same = |v: &Version| {
                v.files == manifest
                    || (manifest.len() == 1 && v.files.len() == 1 && v.files.values().eq(manifest.values()))
            };
            let number = match at {
                None => match current.versions.values().find(|v| same(v)) {
                    Some(v) => return Ok(Imported::Existing(v.number)),
                    None => current.next_version,
                },
                Some((n, _)) if n == u32::MAX => {
                    return Err(Error::InvalidArgument(format!("models/{model}/v{n}: version numbers stop below {n}")))
                }
                Some((n, _)) => match current.versions.get(&n) {
                    Some(v) if v.files == manifest => return Ok(Imported::Existing(n)),
                    Some(_) => return Err(Error::Exists(format!("models/{model}/v{n} (with other files)"))),
                    None => n,
                },
            };
            let signed_by = current.trust.check(model, text.as_bytes(), signature)?;
            if let Some(files) = files.take() {
                for ((_, upload), digest) in files.into_iter().zip(&digests) {
                    let len = upload.len;
                    if upload.persist(&self.blob_path(digest))? {
                        added.push((*digest, len));
                    }
                }
                sync_dir(&self.blobs)?;
            }
            let mut record = (*current).clone();
            record.next_version = record.next_version.max(number + 1);
            record.versions.insert(
                number,
                Arc::new(Version {
                    number,
                    digest: Digest::of(text.as_bytes()),
                    files: manifest.clone(),
                    size,
                    created: now_secs(),
                    format: inspected.format.clone(),
                    backend: inspected.backend.clone(),
                    signature: inspected.signature.clone(),
                    signed_by,
                    details: inspected.details.clone(),
                    origin: at.map(|(_, origin)| origin.to_string()),
                }),
            );
            self.put(record)?;
            Ok(Imported::New(number))
        });
        match committed {
            Ok(Imported::New(number)) => {
                let added_bytes: u64 = added.iter().map(|(_, len)| len).sum();
                self.bytes.fetch_add(added_bytes, Ordering::Relaxed);
                Ok(Imported::New(number))
            }
            other => {
                // Blobs moved in for a version that was not committed: not
                // referenced by anything durable (unless an existing
                // version has the same bytes); take them back now rather
                // than waiting for the next start-up.
                let _w = self.writer.lock().unwrap();
                let referenced = self.referenced_blobs();
                for (digest, len) in &added {
                    if referenced.contains(digest) {
                        self.bytes.fetch_add(*len, Ordering::Relaxed);
                    } else {
                        let _ = remove_file_if_present(&self.blob_path(digest));
                    }
                }
                other
            }
        }
    }
}
/// An upload's bytes are handed to the disk in pieces this large.
const WRITEBACK_CHUNK: u64 = 8 << 20;

/// A file being copied into the store. Hashes as bytes arrive in order
/// (the usual `cp` case) and re-reads the file only if writes came out of
/// order. Dropping it removes the temp file.
pub struct Upload {
    file: File,
    path: Option<PathBuf>,
    len: u64,
}

impl Upload {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, offset).map_err(|e| Error::io("writing upload", e))?;
        // Start writing back each full 8 MiB as it arrives (without waiting
        // for it), so the fsync at the end has little left to do.
        let end = offset + data.len() as u64;
        let chunk = WRITEBACK_CHUNK;
        if end / chunk > offset / chunk {
            let start = (end / chunk - 1) * chunk;
            // SAFETY: a plain syscall on a file descriptor this upload owns.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), start as i64, chunk as i64, libc::SYNC_FILE_RANGE_WRITE)
            };
        }
        self.len = self.len.max(offset + data.len() as u64);
        Ok(())
    }

    pub fn set_len(&mut self, len: u64) -> Result<()> {
        if len != self.len {
            self.file.set_len(len).map_err(|e| Error::io("truncating upload", e))?;
            self.len = len;
        }
        Ok(())
    }

    /// Moves the temp file to `dest` (the blob of its digest), replacing a
    /// blob already there: the same name means the same bytes, so this also
    /// repairs a blob damaged on disk. Returns whether a new blob was added.
    /// The caller syncs the directory.
    fn persist(mut self, dest: &Path) -> Result<bool> {
        let added = !dest.exists();
        let tmp = self.path.take().expect("a live upload has a path");
        if let Err(e) = fs::rename(&tmp, dest) {
            let _ = remove_file_if_present(&tmp);
            return Err(Error::io(dest.display().to_string(), e));
        }
        Ok(added)
    }

    /// The bytes written, from the start (for unpacking an archive).
    pub(super) fn reader(&self) -> Result<File> {
        let path = self.path.as_deref().expect("a live upload has a path");
        File::open(path).map_err(|e| Error::io("reading upload", e))
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io("syncing upload", e))
    }

    /// The sha256 of the bytes written, read back from the file.
    fn digest(&self) -> Result<Digest> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < self.len {
            let n = self.file.read_at(&mut buf, at).map_err(|e| Error::io("hashing upload", e))?;
            if n == 0 {
                return Err(Error::io("hashing upload", std::io::ErrorKind::UnexpectedEof.into()));
            }
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        Ok(Digest::finish(hasher))
    }
}

/// A scoped thread's result; its panic as an error.
fn joined<T>(r: std::thread::Result<Result<T>>, what: &str) -> Result<T> {
    r.unwrap_or_else(|_| Err(Error::Internal(format!("{what} the upload panicked"))))
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            if let Err(e) = remove_file_if_present(path) {
                tracing::warn!("{e}");
            }
        }
    }
}
