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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::tensor::Signature;

/// A sha256 content digest. Parsed and validated before any path is built
/// from it; shown as `sha256:<hex>`, named on disk `sha256-<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
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

/// The alias the daemon keeps pointing at the newest version.
pub const LATEST: &str = "latest";

/// One immutable version of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub number: u32,
    /// sha256 of [`Version::manifest`].
    pub digest: Digest,
    /// File name → blob.
    pub files: BTreeMap<String, Digest>,
    /// Total bytes of the files.
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub format: String,
    pub backend: String,
    pub signature: Signature,
}

impl Version {
    /// The manifest whose sha256 is the version's digest: one line per file,
    /// `sha256:<hex>  <name>`, sorted by name (`sha256sum`'s shape).
    pub fn manifest(files: &BTreeMap<String, Digest>) -> String {
        files.iter().map(|(name, d)| format!("{d}  {name}\n")).collect()
    }

    /// The version's `meta.json`.
    pub fn meta_json(&self) -> serde_json::Value {
        let created = UNIX_EPOCH + std::time::Duration::from_secs(self.created);
        serde_json::json!({
            "format": self.format,
            "backend": self.backend,
            "size": self.size,
            "created": humantime::format_rfc3339_seconds(created).to_string(),
            "source": self.files.keys().next(),
            "files": self.files,
            "inputs": self.signature.inputs,
            "outputs": self.signature.outputs,
        })
    }
}

/// A model's scheduling settings: `models/<name>/config.json`.
/// Read from the catalog leniently (a key a later build drops must not
/// stop the daemon); [`ModelConfig::parse`] is strict with what users write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// `auto`, `cpu`, or a GPU id such as `gpu0`.
    pub device: String,
    /// Most rows stacked into one run (1: no batching).
    pub max_batch: u32,
    /// How long a batch may wait for more requests, in microseconds.
    pub batch_delay_us: u64,
    /// Loaded copies per device (0: one per worker of the device).
    pub instances: u32,
    /// Unload after this many idle seconds.
    pub keep_alive_s: u64,
    /// Default priority of its jobs (higher runs first).
    pub priority: i32,
    /// A job that outlives this fails with ETIMEDOUT.
    pub timeout_ms: u64,
    /// Queued jobs allowed before new ones fail with EAGAIN.
    pub max_queue: u32,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            device: "auto".into(),
            max_batch: 8,
            batch_delay_us: 500,
            instances: 0,
            keep_alive_s: 300,
            priority: 0,
            timeout_ms: 30_000,
            max_queue: 1024,
        }
    }
}

impl ModelConfig {
    /// Parses and validates a `config.json` written by a user. Keys left
    /// out take their defaults (the file is replaced, not merged).
    pub fn parse(text: &[u8]) -> Result<ModelConfig> {
        let value: serde_json::Value =
            serde_json::from_slice(text).map_err(|e| Error::InvalidArgument(format!("config.json: {e}")))?;
        let known = serde_json::to_value(ModelConfig::default()).expect("serializes");
        if let Some(unknown) = value.as_object().and_then(|o| o.keys().find(|k| known.get(k.as_str()).is_none())) {
            return Err(Error::InvalidArgument(format!(
                "config.json: unknown key {unknown:?} (known: device, max_batch, batch_delay_us, instances, keep_alive_s, priority, timeout_ms, max_queue)"
            )));
        }
        let config: ModelConfig =
            serde_json::from_value(value).map_err(|e| Error::InvalidArgument(format!("config.json: {e}")))?;
        let bad = |why: String| Err(Error::InvalidArgument(format!("config.json: {why}")));
        let device_ok = config.device == "auto"
            || config.device == "cpu"
            || config
                .device
                .strip_prefix("gpu")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !device_ok {
            return bad(format!("device {:?}: expected \"auto\", \"cpu\" or \"gpuN\"", config.device));
        }
        if config.max_batch == 0 {
            return bad("max_batch must be at least 1".into());
        }
        if config.max_queue == 0 {
            return bad("max_queue must be at least 1".into());
        }
        if config.timeout_ms == 0 {
            return bad("timeout_ms must be at least 1".into());
        }
        Ok(config)
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a config always serializes");
        s.push('\n');
        s
    }
}

/// A model: owner, mode, versions and aliases, stored as one catalog record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Model {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    pub created: u64,
    /// Version numbers are never reused, even after a delete.
    pub next_version: u32,
    pub versions: BTreeMap<u32, Arc<Version>>,
    /// User aliases (never `latest`, which is derived).
    pub aliases: BTreeMap<String, u32>,
    #[serde(default)]
    pub config: ModelConfig,
}

impl Model {
    pub fn latest(&self) -> Option<u32> {
        self.versions.keys().next_back().copied()
    }

    /// The version an alias (or `latest`) points at.
    pub fn resolve_alias(&self, alias: &str) -> Option<u32> {
        if alias == LATEST {
            self.latest()
        } else {
            self.aliases.get(alias).copied()
        }
    }
}

/// What a successful import did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Imported {
    /// A new version with this number.
    New(u32),
    /// The content equals this existing version; nothing was added.
    Existing(u32),
}

/// Format facts the inspector returns along with the signature.
pub struct Inspected {
    pub format: String,
    pub backend: String,
    pub signature: Signature,
}

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
}

impl Store {
    /// Opens (creating if needed) the store in `root`, then recovers from any
    /// crash: removes temp files and blobs no version references.
    pub fn open(root: &Path) -> Result<Store> {
        let blobs = root.join("blobs");
        fs::create_dir_all(&blobs).map_err(|e| Error::io(blobs.display().to_string(), e))?;
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
        };
        store.recover()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The catalog database, for other trees (the engine's job records).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Deletes temp files and unreferenced blobs; counts the bytes kept.
    fn recover(&self) -> Result<()> {
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

    fn referenced_blobs(&self) -> BTreeSet<Digest> {
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

    pub fn models(&self) -> Vec<Arc<Model>> {
        self.models.read().unwrap().values().cloned().collect()
    }

    pub fn model(&self, name: &str) -> Result<Arc<Model>> {
        self.models.read().unwrap().get(name).cloned().ok_or_else(|| Error::NotFound(format!("models/{name}")))
    }

    /// Writes `model` durably, then publishes it to readers.
    fn put(&self, model: Model) -> Result<Arc<Model>> {
        let json = serde_json::to_vec(&model).expect("a model record always serializes");
        self.db.insert(model.name.as_bytes(), json)?;
        self.db.flush()?;
        let model = Arc::new(model);
        self.models.write().unwrap().insert(model.name.clone(), model.clone());
        Ok(model)
    }

    /// Applies `change` to a copy of the model's record and stores it.
    fn update<T>(&self, name: &str, change: impl FnOnce(&mut Model) -> Result<T>) -> Result<T> {
        let _w = self.writer.lock().unwrap();
        let mut model = (*self.model(name)?).clone();
        let out = change(&mut model)?;
        self.put(model)?;
        Ok(out)
    }

    pub fn create_model(&self, name: &str, uid: u32, gid: u32, mode: u32) -> Result<Arc<Model>> {
        validate_name(name.as_bytes())?;
        let _w = self.writer.lock().unwrap();
        if self.models.read().unwrap().contains_key(name) {
            return Err(Error::Exists(format!("models/{name}")));
        }
        self.put(Model {
            name: name.to_string(),
            uid,
            gid,
            mode: mode & 0o7777,
            created: now_secs(),
            next_version: 1,
            versions: BTreeMap::new(),
            aliases: BTreeMap::new(),
            config: ModelConfig::default(),
        })
    }

    /// Removes a model that has no versions.
    pub fn remove_model(&self, name: &str) -> Result<()> {
        let _w = self.writer.lock().unwrap();
        let model = self.model(name)?;
        if !model.versions.is_empty() {
            return Err(Error::NotEmpty(format!("models/{name}")));
        }
        self.db.remove(name.as_bytes())?;
        self.db.flush()?;
        self.models.write().unwrap().remove(name);
        Ok(())
    }

    /// chmod/chown of a model directory; `None` leaves a field as it is.
    pub fn set_owner_mode(
        &self,
        name: &str,
        uid: Option<u32>,
        gid: Option<u32>,
        mode: Option<u32>,
    ) -> Result<Arc<Model>> {
        self.update(name, |m| {
            m.uid = uid.unwrap_or(m.uid);
            m.gid = gid.unwrap_or(m.gid);
            m.mode = mode.map_or(m.mode, |mode| mode & 0o7777);
            Ok(())
        })?;
        self.model(name)
    }

    pub fn set_config(&self, name: &str, config: ModelConfig) -> Result<()> {
        self.update(name, |m| {
            m.config = config;
            Ok(())
        })
    }

    /// Starts an import: a temp file in the blob directory (so the final
    /// rename never crosses file systems).
    pub fn begin_upload(&self) -> Result<Upload> {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        let path = self.blobs.join(format!("tmp-{}-{n}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(path.display().to_string(), e))?;
        Ok(Upload { file, path: Some(path), len: 0 })
    }

    /// Commits an upload as the next version of `model`, file name
    /// `file_name`. `inspect` must load the file with a backend (it runs on
    /// the temp file before anything is committed); its error leaves nothing
    /// behind.
    pub fn import(
        &self,
        model: &str,
        file_name: &str,
        upload: Upload,
        inspect: impl FnOnce(&Path) -> Result<Inspected>,
    ) -> Result<Imported> {
        validate_name(file_name.as_bytes())?;
        self.model(model)?;
        // The fsync, the sha256 and the backend's load each take a good
        // part of a large import; they overlap (all must succeed before the
        // commit). Hashing here rather than as the bytes arrive keeps it
        // off the writes' path: the file is still in the page cache.
        let (synced, digest, inspected) = std::thread::scope(|scope| {
            let sync = scope.spawn(|| upload.sync());
            let hash = scope.spawn(|| upload.digest());
            let inspected = inspect(upload.path.as_deref().expect("a live upload has a path"));
            (joined(sync.join(), "syncing"), joined(hash.join(), "hashing"), inspected)
        });
        synced?;
        let finished = Finished { digest: digest?, upload };
        let inspected = inspected?;

        let _w = self.writer.lock().unwrap();
        let current = self.model(model)?; // it may have been removed meanwhile
        if let Some(v) =
            current.versions.values().find(|v| v.files.len() == 1 && v.files.values().next() == Some(&finished.digest))
        {
            return Ok(Imported::Existing(v.number));
        }
        let digest = finished.digest;
        let size = finished.upload.len;
        let added = finished.persist(&self.blob_path(&digest))?;
        let files = BTreeMap::from([(file_name.to_string(), digest)]);
        let mut record = (*current).clone();
        let number = record.next_version;
        record.next_version += 1;
        record.versions.insert(
            number,
            Arc::new(Version {
                number,
                digest: Digest::of(Version::manifest(&files).as_bytes()),
                files,
                size,
                created: now_secs(),
                format: inspected.format,
                backend: inspected.backend,
                signature: inspected.signature,
            }),
        );
        if let Err(e) = self.put(record) {
            if added {
                // Not referenced by anything durable: take it back now rather
                // than waiting for the next start-up.
                let _ = remove_file_if_present(&self.blob_path(&digest));
            }
            return Err(e);
        }
        if added {
            self.bytes.fetch_add(size, Ordering::Relaxed);
        }
        Ok(Imported::New(number))
    }

    /// Deletes a version (EBUSY while a user alias points at it) and every
    /// blob that no other version references.
    pub fn delete_version(&self, model: &str, number: u32) -> Result<()> {
        let _w = self.writer.lock().unwrap();
        let mut record = (*self.model(model)?).clone();
        self.check_deletable(&record, number)?;
        let removed = record.versions.remove(&number).expect("checked above");
        self.put(record)?;
        let referenced = self.referenced_blobs();
        // The version is gone; a blob that cannot be removed now is
        // collected at the next start.
        for digest in removed.files.values().filter(|d| !referenced.contains(d)) {
            let path = self.blob_path(digest);
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match remove_file_if_present(&path) {
                Ok(()) => {
                    self.bytes.fetch_sub(len, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
        Ok(())
    }

    /// Whether [`Store::delete_version`] would succeed right now.
    pub fn check_deletable(&self, model: &Model, number: u32) -> Result<()> {
        if !model.versions.contains_key(&number) {
            return Err(Error::NotFound(format!("models/{}/v{number}", model.name)));
        }
        let aliases: Vec<&str> = model.aliases.iter().filter(|(_, v)| **v == number).map(|(a, _)| a.as_str()).collect();
        if !aliases.is_empty() {
            return Err(Error::Busy(format!(
                "models/{}/v{number}: in use by alias {}",
                model.name,
                aliases.join(", ")
            )));
        }
        Ok(())
    }

    /// `ln -s v<N> <alias>`: creates an alias (EEXIST if the name is taken).
    pub fn create_alias(&self, model: &str, alias: &str, target: &str) -> Result<u32> {
        validate_alias(alias)?;
        self.update(model, |m| {
            if m.aliases.contains_key(alias) {
                return Err(Error::Exists(format!("models/{model}/{alias}")));
            }
            let number = resolve_target(m, target)?;
            m.aliases.insert(alias.to_string(), number);
            Ok(number)
        })
    }

    /// `rename(from, to)` of aliases in one model, replacing `to` if it is an
    /// alias (what `ln -sfn` does). Atomic: one record write.
    pub fn rename_alias(&self, model: &str, from: &str, to: &str, no_replace: bool) -> Result<()> {
        validate_alias(to)?;
        self.update(model, |m| {
            let number = *m.aliases.get(from).ok_or_else(|| Error::NotFound(format!("models/{model}/{from}")))?;
            if no_replace && m.aliases.contains_key(to) {
                return Err(Error::Exists(format!("models/{model}/{to}")));
            }
            m.aliases.remove(from);
            m.aliases.insert(to.to_string(), number);
            Ok(())
        })
    }

    pub fn remove_alias(&self, model: &str, alias: &str) -> Result<()> {
        self.update(model, |m| {
            m.aliases.remove(alias).map(|_| ()).ok_or_else(|| Error::NotFound(format!("models/{model}/{alias}")))
        })
    }
}

/// Alias names: valid names that do not look like a version or `latest`.
fn validate_alias(alias: &str) -> Result<()> {
    validate_name(alias.as_bytes())?;
    if alias == LATEST {
        return Err(Error::NotPermitted(format!("{LATEST} is kept by the daemon")));
    }
    if alias == "config.json" {
        return Err(Error::InvalidName { name: alias.to_string(), why: "config.json is the model's settings" });
    }
    if alias.starts_with('v') && alias[1..].bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::InvalidName { name: alias.to_string(), why: "v<N> names versions, not aliases" });
    }
    Ok(())
}

/// The version a symlink target names: `v<N>` or `./v<N>`.
fn resolve_target(model: &Model, target: &str) -> Result<u32> {
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
        Ok(Digest(hasher.finalize().into()))
    }
}

/// A scoped thread's result; its panic as an error.
fn joined<T>(r: std::thread::Result<Result<T>>, what: &str) -> Result<T> {
    r.unwrap_or_else(|_| Err(Error::Runtime(format!("{what} the upload panicked"))))
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

/// An upload whose digest is known and whose bytes are on disk.
struct Finished {
    digest: Digest,
    upload: Upload,
}

impl Finished {
    /// Moves the temp file to `dest`, replacing a blob already there: the
    /// same name means the same bytes, so this also repairs a blob damaged
    /// on disk. Returns whether a new blob was added.
    fn persist(mut self, dest: &Path) -> Result<bool> {
        let added = !dest.exists();
        let tmp = self.upload.path.take().expect("a live upload has a path");
        if let Err(e) = fs::rename(&tmp, dest) {
            let _ = remove_file_if_present(&tmp);
            return Err(Error::io(dest.display().to_string(), e));
        }
        sync_dir(dest.parent().expect("blob paths have a parent"))?;
        Ok(added)
    }
}

fn remove_file_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(Error::io(path.display().to_string(), e)),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir.display().to_string(), e))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DType, TensorSpec};

    fn ok_inspect(_: &Path) -> Result<Inspected> {
        Ok(Inspected {
            format: "onnx".into(),
            backend: "test".into(),
            signature: Signature {
                inputs: vec![TensorSpec {
                    name: "x".into(),
                    dtype: DType::Float32,
                    shape: vec![-1],
                    dim_names: vec![],
                }],
                outputs: vec![],
            },
        })
    }

    fn upload(store: &Store, bytes: &[u8]) -> Upload {
        let mut u = store.begin_upload().unwrap();
        u.write_at(0, bytes).unwrap();
        u
    }

    /// Everything in the blob directory, by name.
    fn blob_dir(store: &Store) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&store.blobs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Opens a store just dropped in this process: sled's flusher thread
    /// may hold the file lock a moment longer (a new process never waits).
    fn reopen(dir: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Store::open(dir) {
                Ok(store) => return store,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn new_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_model("m", 0, 0, 0o755).unwrap();
        (dir, store)
    }

    #[test]
    fn digest_parses_both_spellings_and_rejects_the_rest() {
        let d = Digest::of(b"abc");
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert_eq!(d.file_name().parse::<Digest>().unwrap(), d);
        assert_eq!(d.to_string(), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        for bad in [
            "",
            "sha256:",
            "md5:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a",
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad0",
            "sha256-../../../../etc/passwd",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn names_are_validated() {
        assert_eq!(validate_name(b"resnet-50_v2.onnx").unwrap(), "resnet-50_v2.onnx");
        assert!(validate_name(&[b'a'; 255]).is_ok());
        for bad in [&b""[..], b".", b"..", b".hidden", b"a/b", b"a\0b", &[b'a'; 256], b"\xff"] {
            let err = validate_name(bad).unwrap_err();
            assert_eq!(err.errno(), libc::EINVAL, "{bad:?}");
        }
    }

    #[test]
    fn version_names() {
        assert_eq!(parse_version_name("v1"), Some(1));
        assert_eq!(parse_version_name("v42"), Some(42));
        for bad in ["v", "v0", "v01", "1", "V1", "v1a", "latest", "v99999999999"] {
            assert_eq!(parse_version_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn import_commits_a_version_atomically() {
        let (_dir, store) = new_store();
        let got = store.import("m", "a.onnx", upload(&store, b"model bytes"), ok_inspect).unwrap();
        assert_eq!(got, Imported::New(1));
        let m = store.model("m").unwrap();
        let v = &m.versions[&1];
        let blob = Digest::of(b"model bytes");
        assert_eq!(v.files, BTreeMap::from([("a.onnx".to_string(), blob)]));
        assert_eq!(v.digest, Digest::of(format!("{blob}  a.onnx\n").as_bytes()));
        assert_eq!(fs::read(store.blob_path(&blob)).unwrap(), b"model bytes");
        assert_eq!(blob_dir(&store), vec![blob.file_name()]);
        assert_eq!(store.size(), 11);
        assert_eq!(m.latest(), Some(1));
    }

    #[test]
    fn failed_inspection_leaves_nothing() {
        let (_dir, store) = new_store();
        let err = store
            .import("m", "a.onnx", upload(&store, b"garbage"), |_| {
                Err(Error::InvalidModel { name: "a.onnx".into(), why: "nope".into() })
            })
            .unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL);
        assert!(store.model("m").unwrap().versions.is_empty());
        assert_eq!(blob_dir(&store), Vec::<String>::new());
        assert_eq!(store.size(), 0);
    }

    #[test]
    fn identical_content_makes_no_new_version_and_is_stored_once() {
        let (_dir, store) = new_store();
        store.create_model("other", 0, 0, 0o755).unwrap();
        assert_eq!(store.import("m", "a.onnx", upload(&store, b"one"), ok_inspect).unwrap(), Imported::New(1));
        assert_eq!(store.import("m", "a.onnx", upload(&store, b"one"), ok_inspect).unwrap(), Imported::Existing(1));
        assert_eq!(store.import("m", "b.onnx", upload(&store, b"one"), ok_inspect).unwrap(), Imported::Existing(1));
        assert_eq!(store.import("m", "a.onnx", upload(&store, b"two"), ok_inspect).unwrap(), Imported::New(2));
        // Same bytes in another model: a version there, one blob on disk.
        assert_eq!(store.import("other", "a.onnx", upload(&store, b"one"), ok_inspect).unwrap(), Imported::New(1));
        assert_eq!(blob_dir(&store).len(), 2);
        assert_eq!(store.size(), 6);
    }

    #[test]
    fn out_of_order_writes_hash_the_final_bytes() {
        let (_dir, store) = new_store();
        let mut u = store.begin_upload().unwrap();
        u.write_at(3, b"def").unwrap();
        u.write_at(0, b"abc").unwrap();
        store.import("m", "a.onnx", u, ok_inspect).unwrap();
        let v = &store.model("m").unwrap().versions[&1];
        assert_eq!(v.files["a.onnx"], Digest::of(b"abcdef"));
    }

    #[test]
    fn delete_collects_unreferenced_blobs_only() {
        let (_dir, store) = new_store();
        store.create_model("other", 0, 0, 0o755).unwrap();
        store.import("m", "a.onnx", upload(&store, b"shared"), ok_inspect).unwrap();
        store.import("m", "a.onnx", upload(&store, b"mine"), ok_inspect).unwrap();
        store.import("other", "a.onnx", upload(&store, b"shared"), ok_inspect).unwrap();
        store.delete_version("m", 1).unwrap();
        assert_eq!(blob_dir(&store).len(), 2, "shared blob still used by other/v1");
        store.delete_version("m", 2).unwrap();
        assert_eq!(blob_dir(&store), vec![Digest::of(b"shared").file_name()]);
        assert_eq!(store.size(), 6);
        // Numbers are not reused.
        assert_eq!(store.import("m", "a.onnx", upload(&store, b"new"), ok_inspect).unwrap(), Imported::New(3));
    }

    #[test]
    fn aliases_pin_versions() {
        let (_dir, store) = new_store();
        store.import("m", "a.onnx", upload(&store, b"1"), ok_inspect).unwrap();
        store.import("m", "a.onnx", upload(&store, b"2"), ok_inspect).unwrap();
        store.create_alias("m", "stable", "v1").unwrap();
        assert_eq!(store.create_alias("m", "stable", "v2").unwrap_err().errno(), libc::EEXIST);
        assert_eq!(store.create_alias("m", "x", "v9").unwrap_err().errno(), libc::ENOENT);
        assert_eq!(store.create_alias("m", "x", "../other").unwrap_err().errno(), libc::EINVAL);
        assert_eq!(store.create_alias("m", "latest", "v1").unwrap_err().errno(), libc::EPERM);
        assert_eq!(store.create_alias("m", "v7", "v1").unwrap_err().errno(), libc::EINVAL);
        assert_eq!(store.create_alias("m", "config.json", "v1").unwrap_err().errno(), libc::EINVAL);
        assert_eq!(store.delete_version("m", 1).unwrap_err().errno(), libc::EBUSY);
        // ln -sfn v2 stable: a temp alias renamed over the old one.
        store.create_alias("m", "tmp123", "./v2").unwrap();
        store.rename_alias("m", "tmp123", "stable", false).unwrap();
        let m = store.model("m").unwrap();
        assert_eq!(m.aliases, BTreeMap::from([("stable".to_string(), 2)]));
        store.delete_version("m", 1).unwrap();
        store.remove_alias("m", "stable").unwrap();
        assert_eq!(store.remove_model("m").unwrap_err().errno(), libc::ENOTEMPTY);
        store.delete_version("m", 2).unwrap();
        store.remove_model("m").unwrap();
        assert_eq!(store.model("m").unwrap_err().errno(), libc::ENOENT);
    }

    #[test]
    fn config_is_validated_and_kept() {
        let (dir, store) = new_store();
        assert_eq!(store.model("m").unwrap().config, ModelConfig::default());
        let c = ModelConfig::parse(br#"{"device": "gpu0", "max_batch": 16}"#).unwrap();
        assert_eq!((c.device.as_str(), c.max_batch, c.max_queue), ("gpu0", 16, 1024));
        for bad in
            [&br#"{"device": "tpu"}"#[..], br#"{"max_batch": 0}"#, br#"{"nope": 1}"#, br#"{"max_batch": -1}"#, b"{"]
        {
            let e = ModelConfig::parse(bad).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL);
            assert!(e.to_string().starts_with("config.json: "), "{e}");
        }
        store.set_config("m", c.clone()).unwrap();
        drop(store);
        assert_eq!(reopen(dir.path()).model("m").unwrap().config, c);
    }

    #[test]
    fn reopen_keeps_everything_and_removes_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let blob = Digest::of(b"kept");
        {
            let store = Store::open(dir.path()).unwrap();
            store.create_model("m", 1000, 1000, 0o700).unwrap();
            store.import("m", "a.onnx", upload(&store, b"kept"), ok_inspect).unwrap();
            store.create_alias("m", "stable", "v1").unwrap();
            // A crash mid-import (temp file) and after the blob rename but
            // before the catalog write (orphan blob):
            std::mem::forget(upload(&store, b"half"));
            fs::write(store.blob_path(&Digest::of(b"orphan")), b"orphan").unwrap();
        }
        let store = reopen(dir.path());
        assert_eq!(blob_dir(&store), vec![blob.file_name()]);
        let m = store.model("m").unwrap();
        assert_eq!((m.uid, m.gid, m.mode), (1000, 1000, 0o700));
        assert_eq!(m.aliases["stable"], 1);
        assert_eq!(store.size(), 4);
    }
}
