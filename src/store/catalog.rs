//! The catalog's records (a [`Model`] with its [`Version`]s, aliases and
//! [`ModelConfig`]) and the [`Store`] methods that change them. One record
//! per model, written durably before readers see it, under the store's one
//! writer lock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tensor::Signature;

use super::names::{resolve_target, validate_alias, validate_name, LATEST};
use super::trust::{Signer, Trust};
use super::{now_secs, Committed, Digest, Store};
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
    /// Who signed its manifest, when the model's trust policy checked it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<Signer>,
    /// Where it came from when not copied in through the mount: a watched
    /// repository's version directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The backend's facts for `meta.json` (see [`crate::backend::Details`]).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: crate::backend::Details,
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
        let mut meta = serde_json::json!({
            "format": self.format,
            "backend": self.backend,
            "size": self.size,
            "created": humantime::format_rfc3339_seconds(created).to_string(),
            // The file copied in; a tree has no one source.
            "source": (self.files.len() == 1).then(|| self.files.keys().next()),
            "files": self.files,
            "inputs": self.signature.inputs,
            "outputs": self.signature.outputs,
        });
        if let Some(origin) = &self.origin {
            meta["origin"] = origin.as_str().into();
        }
        meta.as_object_mut().expect("an object").extend(self.details.clone());
        meta
    }
}

/// The priorities a job or a model may have: higher runs first.
pub const PRIORITIES: std::ops::RangeInclusive<i32> = -100..=100;

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
    /// A language model's answer length when a request gives none.
    pub max_tokens: u32,
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
            max_tokens: 256,
        }
    }
}

impl ModelConfig {
    /// Parses and validates a `config.json` written by a user. Keys left
    /// out take their defaults (the file is replaced, not merged).
    pub fn parse(text: &[u8]) -> Result<ModelConfig> {
        let value: serde_json::Value =
            serde_json::from_slice(text).map_err(|e| Error::InvalidArgument(format!("config.json: {e}")))?;
        let Some(object) = value.as_object() else {
            return Err(Error::InvalidArgument("config.json: expected a JSON object of settings".into()));
        };
        let known = serde_json::to_value(ModelConfig::default()).expect("serializes");
        if let Some(unknown) = object.keys().find(|k| known.get(k.as_str()).is_none()) {
            return Err(Error::InvalidArgument(format!(
                "config.json: unknown key {unknown:?} (known: device, max_batch, batch_delay_us, instances, keep_alive_s, priority, timeout_ms, max_queue, max_tokens)"
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
        let c = &config;
        let ranges: [(&str, i64, std::ops::RangeInclusive<i64>); 8] = [
            ("max_batch", c.max_batch.into(), 1..=1024),
            ("batch_delay_us", c.batch_delay_us as i64, 0..=1_000_000),
            ("instances", c.instances.into(), 0..=64),
            ("keep_alive_s", c.keep_alive_s as i64, 0..=86_400),
            ("priority", c.priority.into(), (*PRIORITIES.start()).into()..=(*PRIORITIES.end()).into()),
            ("timeout_ms", c.timeout_ms as i64, 1..=3_600_000),
            ("max_queue", c.max_queue.into(), 1..=65_536),
            ("max_tokens", c.max_tokens.into(), 1..=crate::codec::prompt::MAX_TOKENS.into()),
        ];
        for (key, value, range) in ranges {
            if !range.contains(&value) {
                return bad(format!("{key} must be between {} and {}", range.start(), range.end()));
            }
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
    /// Keys and policy for signed versions (`models/<name>/trust`).
    #[serde(default)]
    pub trust: Trust,
}

impl Model {
    pub fn latest(&self) -> Option<u32> {
        self.versions.keys().next_back().copied()
    }

    /// The blobs its versions reference (a blob twice if two do).
    pub fn blobs(&self) -> impl Iterator<Item = Digest> + '_ {
        self.versions.values().flat_map(|v| v.files.values().copied())
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

impl Store {
    /// Writes `model` durably, then publishes it to readers.
    pub(super) fn put(&self, model: Model) -> Result<Arc<Model>> {
        self.check_room()?;
        self.put_unchecked(model)
    }

    /// [`Store::put`] without the free-space check: for changes that free
    /// space (deleting a version), which must work on a full disk.
    pub(super) fn put_unchecked(&self, model: Model) -> Result<Arc<Model>> {
        let json = serde_json::to_vec(&model).expect("a model record always serializes");
        let model = Arc::new(model);
        let publish = || self.models.write().unwrap().insert(model.name.clone(), model.clone());
        // Committed for every node: readers see it even if the local disk
        // fails now (it is the record later writes start from). Alone, it
        // is published once durable.
        let shared = self.commit_shared(&model.name, Some(&json))?;
        if shared {
            publish();
        }
        self.db.insert(model.name.as_bytes(), json)?;
        self.db.flush()?;
        if !shared {
            publish();
        }
        Ok(model)
    }

    /// With a shared store: commits model `name`'s new record (`None`:
    /// its removal) there first. If another node changed it since this
    /// node read it, the newer record is mirrored here and the write fails
    /// with [`Error::Conflict`], for [`Store::retrying`] to compute again.
    /// The caller holds the writer lock.
    /// Returns whether it committed to a shared store (`false`: none).
    pub(super) fn commit_shared(&self, name: &str, record: Option<&[u8]>) -> Result<bool> {
        let Some(shared) = self.shared.get() else { return Ok(false) };
        let seen = self.revisions.lock().unwrap().get(name).copied().unwrap_or(0);
        match shared.commit(name, record, seen)? {
            Committed::At(revision) => {
                let mut revisions = self.revisions.lock().unwrap();
                match record {
                    Some(_) => revisions.insert(name.to_string(), revision),
                    // Absent again: created against 0 next time.
                    None => revisions.remove(name),
                };
                Ok(true)
            }
            Committed::Changed(now) => {
                match &now {
                    Some((bytes, revision)) => self.apply_remote_locked(name, Some(bytes), *revision)?,
                    None => self.apply_remote_locked(name, None, i64::MAX)?,
                }
                Err(Error::Conflict(name.to_string()))
            }
        }
    }

    /// Applies `change` to a copy of the model's record and stores it
    /// (again, from the newer record, if another node changed it first).
    pub(super) fn update<T>(&self, name: &str, mut change: impl FnMut(&mut Model) -> Result<T>) -> Result<T> {
        self.retrying(|| {
            let _w = self.writer.lock().unwrap();
            let mut model = (*self.model(name)?).clone();
            let out = change(&mut model)?;
            self.put(model)?;
            Ok(out)
        })
    }

    pub fn create_model(&self, name: &str, uid: u32, gid: u32, mode: u32) -> Result<Arc<Model>> {
        validate_name(name.as_bytes())?;
        self.retrying(|| self.create_model_once(name, uid, gid, mode))
    }

    fn create_model_once(&self, name: &str, uid: u32, gid: u32, mode: u32) -> Result<Arc<Model>> {
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
            trust: Trust::default(),
        })
    }

    /// Removes a model that has no versions.
    pub fn remove_model(&self, name: &str) -> Result<()> {
        self.retrying(|| {
            let _w = self.writer.lock().unwrap();
            let model = self.model(name)?;
            if !model.versions.is_empty() {
                return Err(Error::NotEmpty(format!("models/{name}")));
            }
            // As in put_unchecked: gone for readers once committed.
            let shared = self.commit_shared(name, None)?;
            if shared {
                self.models.write().unwrap().remove(name);
            }
            self.db.remove(name.as_bytes())?;
            self.db.flush()?;
            if !shared {
                self.models.write().unwrap().remove(name);
            }
            Ok(())
        })
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

    pub fn set_trust(&self, name: &str, trust: Trust) -> Result<()> {
        self.update(name, |m| {
            m.trust = trust.clone();
            Ok(())
        })
    }

    pub fn set_config(&self, name: &str, config: ModelConfig) -> Result<()> {
        self.update(name, |m| {
            m.config = config.clone();
            Ok(())
        })
    }

    /// Deletes a version (EBUSY while a user alias points at it) and every
    /// blob that no other version references.
    pub fn delete_version(&self, model: &str, number: u32) -> Result<()> {
        self.retrying(|| self.delete_version_once(model, number))
    }

    fn delete_version_once(&self, model: &str, number: u32) -> Result<()> {
        let _w = self.writer.lock().unwrap();
        let mut record = (*self.model(model)?).clone();
        self.check_deletable(&record, number)?;
        let removed = record.versions.remove(&number).expect("checked above");
        self.put_unchecked(record)?;
        self.drop_unreferenced(removed.files.values());
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

    /// Works on a full disk, like deleting a version (an alias can pin the
    /// version that would free the space).
    pub fn remove_alias(&self, model: &str, alias: &str) -> Result<()> {
        self.retrying(|| {
            let _w = self.writer.lock().unwrap();
            let mut record = (*self.model(model)?).clone();
            record.aliases.remove(alias).ok_or_else(|| Error::NotFound(format!("models/{model}/{alias}")))?;
            self.put_unchecked(record).map(drop)
        })
    }
}
