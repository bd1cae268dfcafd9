//! Resolving the tree: a name in a directory, a directory's entries, a
//! node's attributes, and the text of generated files.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::device::Probe;
use crate::engine::Status;
use crate::error::{Error, Result};
use crate::store::{self, Digest, Model, Version, LATEST};

use super::handles::Handle;
use super::node::{JOB_FILES, VERSION_FILES};
use super::{Fs, JobFile, Kind, Node, VersionFile};
/// Attributes of a node, as `stat` shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    /// Whether the kernel may cache this entry (false while it may vanish
    /// or change identity soon, like an upload).
    pub cacheable: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: String,
}

impl Fs {
    // ---- resolving names ------------------------------------------------

    pub(super) fn version(&self, model: &str, number: u32) -> Result<(Arc<Model>, Arc<Version>)> {
        let m = self.store.model(model)?;
        let v = m.versions.get(&number).cloned().ok_or_else(|| Error::NotFound(format!("models/{model}/v{number}")))?;
        Ok((m, v))
    }

    pub(super) fn device(&self, id: &str) -> Result<&dyn Probe> {
        self.engine
            .devices()
            .iter()
            .find(|d| d.id() == id)
            .map(|d| d.as_ref())
            .ok_or_else(|| Error::NotFound(format!("devices/{id}")))
    }

    /// The files of `devices/<id>/` and their values: the probe's reading,
    /// then the engine's `queue`, `running` and `models` (one per line).
    pub(super) fn device_files(&self, id: &str) -> Result<Vec<(&'static str, String)>> {
        let mut files = self.device(id)?.read().files();
        let state = self.engine.device_state(id).ok_or_else(|| Error::NotFound(format!("devices/{id}")))?;
        files.push(("queue", state.queue.to_string()));
        files.push(("running", state.running.to_string()));
        files.push(("models", state.models.join("\n")));
        Ok(files)
    }

    /// The node `name` names inside `parent`, if it exists.
    pub(super) fn child(&self, parent: &Node, name: &str) -> Result<Node> {
        let missing = || Error::NotFound(format!("{}/{name}", self.describe(parent)));
        Ok(match parent {
            // Small fixed directories: their listing is the one place that names them.
            Node::Version { model, number } if !VERSION_FILES.contains(&name) => {
                self.version_member(model, *number, name)?.ok_or_else(missing)?
            }
            Node::VersionDir { model, number, dir } => {
                self.version_member(model, *number, &format!("{dir}/{name}"))?.ok_or_else(missing)?
            }
            Node::Root | Node::Version { .. } | Node::Device(_) | Node::Job(_) => self
                .children(parent)?
                .into_iter()
                .find_map(|(n, node)| (n == name).then_some(node))
                .ok_or_else(missing)?,
            Node::Models => Node::Model(self.store.model(name)?.name.clone()),
            Node::Model(model) => {
                let m = self.store.model(model)?;
                if name == "config.json" {
                    Node::Config(model.clone())
                } else if name == "trust" {
                    Node::Trust(model.clone())
                } else if name == "status" && m.resolve_alias(name).is_none() {
                    // An alias made by an older build, before `status` was
                    // the model's, keeps the name (and can be removed).
                    Node::ModelStatus(model.clone())
                } else if let Some(number) = store::parse_version_name(name).filter(|n| m.versions.contains_key(n)) {
                    Node::Version { model: model.clone(), number }
                } else if m.resolve_alias(name).is_some() {
                    Node::Link { model: model.clone(), alias: name.to_string() }
                } else if let Some(number) = self.recently_imported(model, name) {
                    Node::Imported { model: model.clone(), file: name.to_string(), number }
                } else {
                    return Err(Error::NotFound(format!("models/{model}/{name}")));
                }
            }
            Node::Devices => Node::Device(self.device(name)?.id().to_string()),
            Node::Blobs => {
                let digest: Digest = name.parse().map_err(|_| missing())?;
                if !self.store.has_blob(&digest) {
                    return Err(missing());
                }
                Node::Blob(digest)
            }
            Node::Jobs => {
                let id: u64 = name.parse().map_err(|_| missing())?;
                self.job(id)?;
                Node::Job(id)
            }
            _ => return Err(Error::NotDir(self.describe(parent))),
        })
    }

    /// A directory's entries, without `.` and `..`. In a model directory
    /// links come before versions, so `rm -r` meets aliases first.
    pub(super) fn children(&self, node: &Node) -> Result<Vec<(String, Node)>> {
        Ok(match node {
            Node::Root => [
                ("README", Node::Readme),
                ("status", Node::Status),
                ("metrics", Node::Metrics),
                ("models", Node::Models),
                ("devices", Node::Devices),
                ("jobs", Node::Jobs),
                ("blobs", Node::Blobs),
            ]
            .into_iter()
            .map(|(n, node)| (n.to_string(), node))
            .collect(),
            Node::Models => self.store.models().iter().map(|m| (m.name.clone(), Node::Model(m.name.clone()))).collect(),
            Node::Model(model) => {
                let m = self.store.model(model)?;
                let link =
                    |alias: &str| (alias.to_string(), Node::Link { model: model.clone(), alias: alias.to_string() });
                [
                    ("config.json".to_string(), Node::Config(model.clone())),
                    ("trust".to_string(), Node::Trust(model.clone())),
                ]
                .into_iter()
                .chain(
                    (!m.aliases.contains_key("status"))
                        .then(|| ("status".to_string(), Node::ModelStatus(model.clone()))),
                )
                .chain(m.latest().map(|_| link(LATEST)))
                .chain(m.aliases.keys().map(|a| link(a)))
                .chain(
                    m.versions
                        .keys()
                        .map(|&number| (format!("v{number}"), Node::Version { model: model.clone(), number })),
                )
                .collect()
            }
            Node::VersionDir { model, number, dir } => self.version_listing(model, *number, &format!("{dir}/"))?,
            Node::Version { model, number } => {
                let file = |file| Node::VersionFile { model: model.clone(), number: *number, file };
                self.version_listing(model, *number, "")?
                    .into_iter()
                    .chain([
                        ("digest".to_string(), file(VersionFile::Digest)),
                        ("meta.json".to_string(), file(VersionFile::Meta)),
                        ("stats".to_string(), file(VersionFile::Stats)),
                        ("signature".to_string(), file(VersionFile::Signature)),
                        ("infer".to_string(), Node::Infer { model: model.clone(), number: *number }),
                        ("clone".to_string(), Node::Clone { model: model.clone(), number: *number }),
                        ("error".to_string(), Node::LastError { model: model.clone(), number: *number }),
                    ])
                    .collect()
            }
            Node::Devices => {
                self.engine.devices().iter().map(|d| (d.id().to_string(), Node::Device(d.id().to_string()))).collect()
            }
            Node::Device(id) => self
                .device_files(id)?
                .into_iter()
                .map(|(f, _)| (f.to_string(), Node::DeviceFile { device: id.clone(), file: f }))
                .collect(),
            Node::Blobs => self.store.blobs().into_iter().map(|d| (d.file_name(), Node::Blob(d))).collect(),
            Node::Jobs => self.engine.job_ids().into_iter().map(|id| (id.to_string(), Node::Job(id))).collect(),
            Node::Job(id) => {
                self.job(*id)?;
                JOB_FILES.iter().map(|(name, f)| (name.to_string(), Node::JobFile(*id, *f))).collect()
            }
            _ => return Err(Error::NotDir(format!("inode {}", self.ino(node)))),
        })
    }

    /// The file or directory at `path` inside a version, if there is one.
    fn version_member(&self, model: &str, number: u32, path: &str) -> Result<Option<Node>> {
        let (_, v) = self.version(model, number)?;
        let (model, dir_prefix) = (model.to_string(), format!("{path}/"));
        Ok(if v.files.contains_key(path) {
            Some(Node::VersionFile { model, number, file: VersionFile::Model(path.to_string()) })
        } else if v.files.range(dir_prefix.clone()..).next().is_some_and(|(p, _)| p.starts_with(&dir_prefix)) {
            Some(Node::VersionDir { model, number, dir: path.to_string() })
        } else {
            None
        })
    }

    /// The model files and directories of a version directly under `prefix`
    /// (`""` for its top, else a directory's path and `/`).
    fn version_listing(&self, model: &str, number: u32, prefix: &str) -> Result<Vec<(String, Node)>> {
        let (_, v) = self.version(model, number)?;
        let mut entries: Vec<(String, Node)> = Vec::new();
        // Paths with one prefix are contiguous in the sorted manifest.
        for path in v.files.range(prefix.to_string()..).map(|(p, _)| p).take_while(|p| p.starts_with(prefix)) {
            let (name, node) = match path[prefix.len()..].split_once('/') {
                Some((dir, _)) => {
                    if entries.last().is_some_and(|(last, _)| last == dir) {
                        continue;
                    }
                    let dir_path = format!("{prefix}{dir}");
                    (dir, Node::VersionDir { model: model.to_string(), number, dir: dir_path })
                }
                None => (
                    &path[prefix.len()..],
                    Node::VersionFile { model: model.to_string(), number, file: VersionFile::Model(path.clone()) },
                ),
            };
            entries.push((name.to_string(), node));
        }
        Ok(entries)
    }

    // ---- attributes and content -------------------------------------------

    pub(super) fn attr(&self, node: &Node) -> Result<Attr> {
        let daemon_dir = |perm| (Kind::Dir, 0u64, perm, self.uid, self.gid, self.started);
        let (kind, size, perm, uid, gid, mtime) = match node {
            Node::Root | Node::Devices | Node::Jobs => daemon_dir(0o755),
            // Blobs are every model's bytes: only the daemon's user reads them
            // here; others go through the models they may see.
            Node::Blobs => daemon_dir(0o700),
            // Anyone may create a model; only its owner may remove it (/tmp's rule).
            Node::Models => daemon_dir(0o1777),
            Node::Device(id) => {
                self.device(id)?;
                daemon_dir(0o555)
            }
            Node::Model(model) => {
                let m = self.store.model(model)?;
                (Kind::Dir, 0, m.mode as u16, m.uid, m.gid, secs(m.created))
            }
            Node::Config(model) => {
                let m = self.store.model(model)?;
                (Kind::File, m.config.to_json().len() as u64, 0o644, m.uid, m.gid, secs(m.created))
            }
            Node::Trust(model) => {
                let m = self.store.model(model)?;
                (Kind::File, m.trust.to_text().len() as u64, 0o644, m.uid, m.gid, secs(m.created))
            }
            Node::ModelStatus(model) => {
                let m = self.store.model(model)?;
                (Kind::File, self.content(node)?.len() as u64, 0o444, m.uid, m.gid, secs(m.created))
            }
            Node::Link { model, alias } => {
                let m = self.store.model(model)?;
                let n = m.resolve_alias(alias).ok_or_else(|| Error::NotFound(format!("models/{model}/{alias}")))?;
                let len = format!("v{n}").len() as u64;
                (Kind::Symlink, len, 0o777, m.uid, m.gid, secs(m.created))
            }
            Node::Version { model, number } | Node::VersionDir { model, number, .. } => {
                let (m, v) = self.version(model, *number)?;
                // Writable in mode so that the kernel lets `rm -r` reach us;
                // every change inside is refused (EROFS) but removal.
                (Kind::Dir, 0, 0o755, m.uid, m.gid, secs(v.created))
            }
            Node::VersionFile { model, number, file } => {
                let (m, v) = self.version(model, *number)?;
                let size = match file {
                    VersionFile::Model(name) => self.blob_len(&v.files[name])?,
                    _ => self.content(node)?.len() as u64,
                };
                (Kind::File, size, 0o444, m.uid, m.gid, secs(v.created))
            }
            Node::Infer { model, number } | Node::Clone { model, number } | Node::LastError { model, number } => {
                let (m, v) = self.version(model, *number)?;
                let perm = if matches!(node, Node::Infer { .. }) { 0o666 } else { 0o444 };
                (Kind::File, 0, perm, m.uid, m.gid, secs(v.created))
            }
            Node::Job(id) => {
                let job = self.job(*id)?;
                (Kind::Dir, 0, 0o700, job.uid, job.gid, job.snapshot().created)
            }
            Node::JobFile(id, file) => {
                let job = self.job(*id)?;
                let state = job.snapshot();
                let (size, perm) = match file {
                    JobFile::Input if state.status == Status::New => (0, 0o600),
                    JobFile::Input => (state.input.len() as u64, 0o400),
                    JobFile::Output => {
                        (state.outcome.as_ref().and_then(|o| o.as_ref().ok()).map_or(0, |o| o.len() as u64), 0o400)
                    }
                    JobFile::Priority => (self.content(node)?.len() as u64, 0o600),
                    JobFile::Ctl => (0, 0o200),
                    _ => (self.content(node)?.len() as u64, 0o400),
                };
                (Kind::File, size, perm, job.uid, job.gid, state.created)
            }
            Node::Imported { model, file, number } => {
                let (m, v) = self.version(model, *number)?;
                // An archive is not a file of its version: it shows empty.
                let size = v.files.get(file).map_or(Ok(0), |digest| self.blob_len(digest))?;
                (Kind::File, size, 0o444, m.uid, m.gid, secs(v.created))
            }
            Node::Blob(digest) => (Kind::File, self.blob_len(digest)?, 0o444, self.uid, self.gid, self.started),
            Node::Upload(fh) => {
                let handle = self.handle(*fh).map_err(|_| Error::NotFound(format!("upload {fh}")))?;
                match &*handle {
                    Handle::Upload(pending) => {
                        let p = pending.lock().unwrap();
                        let len = p.upload.as_ref().map_or(0, |u| u.len());
                        (Kind::File, len, p.perm, p.uid, p.gid, SystemTime::now())
                    }
                    Handle::Text(_, model, text) => {
                        let m = self.store.model(model)?;
                        let len = text.lock().unwrap().as_ref().map_or(0, Vec::len) as u64;
                        (Kind::File, len, 0o644, m.uid, m.gid, SystemTime::now())
                    }
                    _ => return Err(Error::NotFound(format!("upload {fh}"))),
                }
            }
            Node::Readme | Node::Status | Node::Metrics | Node::DeviceFile { .. } => {
                (Kind::File, self.content(node)?.len() as u64, 0o444, self.uid, self.gid, self.started)
            }
        };
        Ok(Attr {
            ino: self.ino(node),
            kind,
            size,
            perm,
            uid,
            gid,
            mtime,
            cacheable: !matches!(node, Node::Upload(_) | Node::Imported { .. }),
        })
    }

    pub(super) fn blob_len(&self, digest: &Digest) -> Result<u64> {
        self.store.blob_len(digest)
    }

    /// The text of a generated file.
    pub(super) fn content(&self, node: &Node) -> Result<Vec<u8>> {
        let text = match node {
            Node::Readme => self.readme(),
            Node::Status => pretty(&self.status()),
            Node::Metrics => self.engine.metrics_text(),
            Node::Config(model) => self.store.model(model)?.config.to_json(),
            Node::Trust(model) => self.store.model(model)?.trust.to_text(),
            Node::ModelStatus(model) => pretty(&self.model_status(model)?),
            Node::VersionFile { model, number, file: VersionFile::Signature } => {
                match &self.version(model, *number)?.1.signed_by {
                    Some(s) => format!("signed by {}\ntrusted comment: {}\n", s.key, s.trusted_comment),
                    None => "unsigned\n".to_string(),
                }
            }
            Node::DeviceFile { device, file } => {
                let files = self.device_files(device)?;
                let (_, value) =
                    files.into_iter().find(|(f, _)| f == file).ok_or_else(|| Error::NotFound(file.to_string()))?;
                if value.is_empty() {
                    value
                } else {
                    format!("{value}\n")
                }
            }
            Node::VersionFile { model, number, file: VersionFile::Stats } => {
                self.version(model, *number)?;
                pretty(&self.engine.stats_json(model, *number))
            }
            Node::VersionFile { model, number, file: VersionFile::Digest } => {
                format!("{}\n", self.version(model, *number)?.1.digest)
            }
            Node::VersionFile { model, number, file: VersionFile::Meta } => {
                pretty(&self.version(model, *number)?.1.meta_json())
            }
            Node::JobFile(id, file) => {
                let job = self.job(*id)?;
                let state = job.snapshot();
                let failure = state.outcome.as_ref().and_then(|o| o.as_ref().err());
                match file {
                    JobFile::Status => match (state.status, failure, &state.generation) {
                        (Status::Failed, Some(f), _) => format!("failed\n{}\n", f.reason),
                        (Status::Running, _, Some(g)) => {
                            format!("running {}/{} tokens {:.0} tok/s\n", g.tokens, g.max_tokens, g.tokens_per_s)
                        }
                        (status, _, _) => format!("{}\n", status.name()),
                    },
                    JobFile::Model => format!("{}/v{} {}\n", job.model, job.version, job.digest),
                    JobFile::Error => failure.map_or(String::new(), |f| format!("{}\n", f.reason)),
                    JobFile::Priority => format!("{}\n", state.priority),
                    JobFile::Device => format!("{}\n", state.device),
                    JobFile::Times => {
                        let time = |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339_micros(t).to_string());
                        pretty(&serde_json::json!({
                            "created": time(Some(state.created)),
                            "submitted": time(state.submitted),
                            "started": time(state.started),
                            "finished": time(state.finished),
                            "queue_us": state.queue_us,
                            "compute_us": state.compute_us,
                            "batch_size": state.batch_size,
                            // A language model's: its tokens, and how fast they came.
                            "prompt_tokens": state.generation.as_ref().map(|g| g.prompt_tokens),
                            "tokens": state.generation.as_ref().map(|g| g.tokens),
                            "first_token_us": state.generation.as_ref().and_then(|g| g.first_token_us),
                            "tokens_per_s": state.generation.as_ref().map(|g| g.tokens_per_s),
                        }))
                    }
                    JobFile::Input | JobFile::Output | JobFile::Ctl => {
                        return Err(Error::InvalidArgument("not a generated file".into()))
                    }
                }
            }
            _ => return Err(Error::InvalidArgument("not a generated file".into())),
        };
        Ok(text.into_bytes())
    }
}
/// Pretty JSON and a final newline: what `cat` users expect of a file.
pub(super) fn pretty(value: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(value).expect("JSON values serialize");
    s.push('\n');
    s
}

pub(super) fn secs(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}
