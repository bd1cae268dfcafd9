//! The model store: content-addressed blobs on disk and a sled catalog of
//! models, versions and aliases.
//!
//! Layout of the data directory:
//!
//! ```text
//! <data>/blobs/sha256-<hex>   one file per distinct content, never modified
//! <data>/blobs/tmp-<pid>-<n>  an import in progress (removed on failure and at start-up)
//! <data>/catalog/             sled: one record per model (JSON), key = model name
//! ```
//!
//! Promises:
//!
//! - **Atomic versions.** An import streams into a temp file, is hashed,
//!   validated by the caller's inspector and fsynced, renamed to its digest
//!   name, and only then is the model record (with the new version) written
//!   to sled and flushed. A model's versions and aliases live in its one
//!   record, so a crash leaves either the old record or the new one: never a
//!   half version or a dangling alias. A crash after the rename but before
//!   the catalog write leaves an unreferenced blob; [`Store::open`] deletes
//!   it, along with every temp file.
//! - **Dedup.** Identical bytes are stored once; importing content identical
//!   to an existing version of the same model makes no new version.
//! - **GC.** Deleting a version deletes each of its blobs that no remaining
//!   version (of any model) references.
//! - **Ordering.** Catalog mutations are serialized by one mutex, which is
//!   also held across "rename blob + commit record" and across GC, so GC can
//!   never delete a blob an import is about to reference. Readers use an
//!   in-memory copy of the catalog and never wait on disk.

mod archive;
mod blobs;
mod catalog;
mod digest;
mod import;
mod names;
mod trust;

pub use archive::{Archive, MAX_MEMBERS};
pub use catalog::{Model, ModelConfig, Version, PRIORITIES};
pub use digest::Digest;
pub use import::{Imported, Upload};
pub use names::{normalize_path, parse_version_name, validate_name, LATEST, VERSION_FILES};
pub use trust::{Policy, Signer, Trust, MAX_SIGNATURE_BYTES};

pub(crate) use blobs::private_dir;
pub use blobs::Staged;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
pub struct Store {
    root: PathBuf,
    blobs: PathBuf,
    db: sled::Db,
    /// Readers' copy of the catalog; replaced record by record after each
    /// durable write.
    models: RwLock<BTreeMap<String, Arc<Model>>>,
    /// Serializes catalog mutations and blob renames/deletes (see header).
    writer: Mutex<()>,
    next_temp: AtomicU64,
    /// Bytes of all blobs on disk.
    bytes: AtomicU64,
    /// The store shared with other nodes, if this node has one (see
    /// [`Shared`]); set once, before the first write.
    shared: std::sync::OnceLock<Arc<dyn Shared>>,
    /// Each model's revision in the shared catalog, as this node last saw
    /// it: a write commits only if the record is still at it.
    revisions: Mutex<std::collections::HashMap<String, i64>>,
    /// Blobs being fetched from the shared store now, and the signal that
    /// one arrived: a blob wanted twice is fetched once, others meanwhile.
    fetching: (Mutex<std::collections::HashSet<Digest>>, std::sync::Condvar),
    /// With a shared store: the most bytes of blobs kept here (0: no
    /// bound), and when each was last used, for evicting the least
    /// recently used first.
    cache_limit: AtomicU64,
    last_used: Mutex<std::collections::HashMap<Digest, std::time::Instant>>,
    /// Sizes of blobs not here, as the shared store said (a blob's size
    /// never changes: it is named by its bytes).
    remote_sizes: Mutex<std::collections::HashMap<Digest, u64>>,
}

/// A catalog and blob store shared by many nodes (docs/SCALE.md; built by
/// `crate::cluster`). The local catalog (sled and the readers' copy) is
/// then a mirror of the shared one: every write is committed there first,
/// only if the model's record is unchanged since this node read it, and
/// others' writes arrive through [`Store::apply_remote`]. The local blob
/// directory is a cache: new blobs are uploaded before the commit that
/// names them, and missing ones fetched on first use.
pub trait Shared: Send + Sync {
    /// Writes model `name`'s record (`None`: deletes it) if its revision
    /// is still `seen` (0: absent). Returns the new revision, or the
    /// record as it is now (bytes, revision; `None` if absent) if another
    /// node changed it.
    fn commit(&self, name: &str, record: Option<&[u8]>, seen: i64) -> Result<Committed>;
    /// Puts a blob into the shared store if it is not there (create-only:
    /// an object named by its digest already holds these bytes).
    fn upload(&self, digest: &Digest, path: &Path) -> Result<()>;
    /// A blob's size, without fetching it.
    fn size(&self, digest: &Digest) -> Result<u64>;
    /// Fetches a blob into `to` (a new file); returns the digest of the
    /// bytes written, hashed as they came.
    fn download(&self, digest: &Digest, to: &Path) -> Result<Digest>;
    /// For `/status`.
    fn describe(&self) -> serde_json::Value;
}

/// A model's record in the shared catalog: name, record, revision.
pub type SharedRecord = (String, Vec<u8>, i64);

/// What [`Shared::commit`] did.
pub enum Committed {
    /// Written, at this revision.
    At(i64),
    /// Not written: the record (bytes and revision) as another node left it.
    Changed(Option<(Vec<u8>, i64)>),
}

/// How many times a write is computed again after others' changes.
const WRITE_RETRIES: usize = 16;

impl Store {
    /// Opens (creating if needed) the store in `root`, then recovers from any
    /// crash: removes temp files and blobs no version references.
    pub fn open(root: &Path) -> Result<Store> {
        let blobs = root.join("blobs");
        // Private whatever the data directory's mode (an admin's `mkdir -p`).
        private_dir(&blobs)?;
        private_dir(&root.join("catalog"))?;
        // Staged files of the last run: links, nothing is lost with them.
        let staging = root.join(blobs::STAGING);
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|e| Error::io(staging.display().to_string(), e))?;
        }
        let db = sled::Config::new().path(root.join("catalog")).mode(sled::Mode::LowSpace).open()?;
        let mut models = BTreeMap::new();
        for entry in db.iter() {
            let (key, value) = entry?;
            let key = String::from_utf8_lossy(&key).into_owned();
            let model: Model = serde_json::from_slice(&value)
                .map_err(|e| Error::CorruptRecord { key: key.clone(), why: e.to_string() })?;
            models.insert(key, Arc::new(model));
        }
        let store = Store {
            root: root.to_path_buf(),
            blobs,
            db,
            models: RwLock::new(models),
            writer: Mutex::new(()),
            next_temp: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            shared: std::sync::OnceLock::new(),
            revisions: Mutex::new(Default::default()),
            fetching: Default::default(),
            cache_limit: AtomicU64::new(0),
            last_used: Mutex::new(Default::default()),
            remote_sizes: Mutex::new(Default::default()),
        };
        store.recover()?;
        Ok(store)
    }

    /// Shares this store with other nodes from now on (see [`Shared`]);
    /// the caller then mirrors the shared catalog ([`Store::resync`]).
    pub fn share(&self, shared: Arc<dyn Shared>) {
        let _ = self.shared.set(shared);
    }

    /// Bounds the blobs kept here when the store is shared: past `bytes`,
    /// the least recently used go (they are fetched again when next used).
    pub fn set_blob_cache_limit(&self, bytes: u64) {
        self.cache_limit.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn shared(&self) -> Option<&Arc<dyn Shared>> {
        self.shared.get()
    }

    /// Runs a write, computed again from the newer record each time
    /// another node changed it first ([`Error::Conflict`]).
    pub(crate) fn retrying<T>(&self, mut write: impl FnMut() -> Result<T>) -> Result<T> {
        let mut tries = 0;
        loop {
            match write() {
                Err(Error::Conflict(name)) if tries < WRITE_RETRIES => {
                    tracing::debug!(model = %name, "changed by another node; writing again");
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    /// Another node's write of model `name` (`None`: removed) at
    /// `revision`, from the shared catalog: applied unless this node has
    /// that revision or a later one.
    pub fn apply_remote(&self, name: &str, record: Option<&[u8]>, revision: i64) -> Result<()> {
        let _w = self.writer.lock().unwrap();
        self.apply_remote_locked(name, record, revision)
    }

    fn apply_remote_locked(&self, name: &str, record: Option<&[u8]>, revision: i64) -> Result<()> {
        let mut revisions = self.revisions.lock().unwrap();
        if revisions.get(name).is_some_and(|&seen| seen >= revision) {
            return Ok(());
        }
        // The blobs of the record replaced: those no version references
        // now go from this node's cache too (below).
        let before: Vec<Digest> =
            self.models.read().unwrap().get(name).map(|m| m.blobs().collect()).unwrap_or_default();
        // Readers' copy first: it is what later writes are computed from,
        // and it must not fall behind the revision recorded (below) if the
        // local disk fails.
        match record {
            Some(bytes) => {
                let model: Model = serde_json::from_slice(bytes)
                    .map_err(|e| Error::CorruptRecord { key: name.to_string(), why: e.to_string() })?;
                self.models.write().unwrap().insert(name.to_string(), Arc::new(model));
                revisions.insert(name.to_string(), revision);
                self.db.insert(name.as_bytes(), bytes)?;
            }
            None => {
                self.models.write().unwrap().remove(name);
                // An absent model's revision is 0, as etcd has it: a new
                // one of that name is created against 0.
                revisions.remove(name);
                self.db.remove(name.as_bytes())?;
            }
        }
        self.db.flush()?;
        self.drop_unreferenced(&before);
        Ok(())
    }

    /// Makes the local catalog the shared one as read at revision `read`:
    /// `records` is every model (name, record, revision); models not among
    /// them are removed here, unless this node wrote them after the read.
    pub fn resync(&self, records: Vec<SharedRecord>, read: i64) -> Result<()> {
        let _w = self.writer.lock().unwrap();
        let names: std::collections::BTreeSet<&str> = records.iter().map(|(n, _, _)| n.as_str()).collect();
        let gone: Vec<String> = {
            let revisions = self.revisions.lock().unwrap();
            let models = self.models.read().unwrap();
            models
                .keys()
                .filter(|n| !names.contains(n.as_str()) && revisions.get(*n).is_none_or(|&r| r <= read))
                .cloned()
                .collect()
        };
        for name in gone {
            self.revisions.lock().unwrap().remove(&name);
            self.apply_remote_locked(&name, None, 0)?;
        }
        for (name, record, revision) in &records {
            self.apply_remote_locked(name, Some(record), *revision)?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes free on the data directory's file system beyond
    /// [`RESERVE`]: what an import may use.
    pub fn free_bytes(&self) -> u64 {
        self.free_space().map_or(u64::MAX, |free| free.saturating_sub(RESERVE))
    }

    /// `statvfs(2)` of the data directory's file system.
    pub fn statvfs(&self) -> std::io::Result<libc::statvfs> {
        let path = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes())?;
        // SAFETY: statvfs is plain old data, for which all zeros is valid.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string, and a struct statvfs only writes into.
        if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }

    /// Bytes available to the daemon there.
    fn free_space(&self) -> std::io::Result<u64> {
        self.statvfs().map(|s| s.f_bavail * s.f_frsize)
    }

    /// ENOSPC unless [`RESERVE`] bytes are free: checked before every
    /// catalog write. sled does not come back from a failed write (after
    /// ENOSPC it answered nothing more until restarted, here); refused
    /// first, a write succeeds again once space is freed.
    pub fn check_room(&self) -> Result<()> {
        match self.free_space() {
            Ok(free) if free < RESERVE => Err(Error::io(
                format!("the data directory's file system has {free} bytes free; the catalog keeps {RESERVE}"),
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            )),
            _ => Ok(()),
        }
    }

    /// The catalog database, for other trees (the engine's job records).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn models(&self) -> Vec<Arc<Model>> {
        self.models.read().unwrap().values().cloned().collect()
    }

    pub fn model(&self, name: &str) -> Result<Arc<Model>> {
        self.models.read().unwrap().get(name).cloned().ok_or_else(|| Error::NotFound(format!("models/{name}")))
    }
}
/// Bytes kept free for the catalog and the job records: imports stop
/// short of them, and catalog writes are refused (ENOSPC) below them.
pub const RESERVE: u64 = 32 << 20;

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
