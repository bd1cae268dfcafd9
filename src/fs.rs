//! The aifs tree and its semantics, as plain Rust: no FUSE types here, so
//! every rule is testable without a kernel (see `tests/fs.rs`).
//!
//! ```text
//! /README  /status
//! /models/<name>/{latest,<alias>} -> v<N>
//! /models/<name>/v<N>/{<model file>,digest,meta.json}
//! /metrics
//! /models/<name>/config.json
//! /models/<name>/v<N>/{infer,clone,stats}
//! /devices/<id>/{name,util,memory.total,memory.used,queue,running,models}
//! /jobs/
//! /blobs/sha256-<hex>
//! ```
//!
//! **Inodes.** A [`Node`] says what a path *is* (model `m`, version 3 of
//! `m`, ...). Inode numbers are interned from nodes on first sight and
//! never reused, so a number always means the same thing; a node that no
//! longer exists answers ENOENT. The kernel's `forget` is ignored: the
//! table grows with the number of distinct names ever looked up, which is
//! small for models and versions; job inodes are computed, not stored, and
//! an upload's inode is dropped when it is released.
//!
//! **Handles.** `open` snapshots generated files (status, device values,
//! meta.json) so that one read sequence sees one consistent text; model
//! files and blobs are read straight from the blob file. Only a handle
//! that may hold writes for its `close()` gets a `flush` from the kernel
//! ([`Opened::no_flush`]); `infer` opened for reading too sends by its
//! read, by its session's next reader, or by its release (see [`Session`]).
//!
//! **Imports.** `create` in `models/<name>/` starts an [`Upload`]: a temp
//! file in the store. The first `flush` (the `close()` a process sees)
//! after data was written commits it as the next version, or fails the `close()` with the reason (EINVAL for a model no
//! backend loads), leaving nothing behind. A `flush` with no data yet
//! reports EINVAL ("empty file") but keeps the upload open, because shells
//! close a duplicate of the descriptor before the program writes to it.
//! For a few seconds after the commit the name still resolves, read-only,
//! to the file in its version, and accepts chmod/chown/utimes as no-ops:
//! `install` and Python's `shutil.copy` set the mode of what they copied.
//!
//! **Removal.** Files inside a version cannot be removed one by one:
//! `unlink` of them succeeds only if the whole version could be deleted, and
//! changes nothing; the version goes when `rmdir v<N>` comes. That is what
//! makes `rm -r models/<name>/v<N>` work. `latest` likewise accepts `unlink`
//! as a no-op: it is derived from the versions and goes with the last one.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backend::Backends;
use crate::codec;
use crate::device::Probe;
use crate::engine::{Engine, EngineConfig, Job, Status};
use crate::error::{Error, Result};
use crate::store::{self, Digest, Imported, Model, Store, Upload, Version, LATEST};

pub const ROOT_INO: u64 = 1;

/// Names a version directory holds besides its model files.
const VERSION_FILES: [&str; 5] = ["digest", "meta.json", "infer", "clone", "stats"];

/// Job inodes are computed, not interned: `JOB_INO_BASE + id * 16` for the
/// directory, `+ 1 + index in JOB_FILES` for its files. So any number of
/// jobs costs the inode table nothing.
const JOB_INO_BASE: u64 = 1 << 48;

/// The files of `jobs/<id>/`, in listing order.
const JOB_FILES: [(&str, JobFile); 9] = [
    ("status", JobFile::Status),
    ("model", JobFile::Model),
    ("input", JobFile::Input),
    ("output", JobFile::Output),
    ("error", JobFile::Error),
    ("priority", JobFile::Priority),
    ("device", JobFile::Device),
    ("times", JobFile::Times),
    ("ctl", JobFile::Ctl),
];

/// What a path in the tree is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    Root,
    Readme,
    Status,
    Metrics,
    Models,
    Devices,
    Jobs,
    Blobs,
    Model(String),
    /// `models/<name>/config.json`.
    Config(String),
    /// A model file just copied in, under the name it was copied to (see
    /// the module header).
    Imported {
        model: String,
        file: String,
        number: u32,
    },
    /// `latest` or a user alias: a symlink to `v<N>`.
    Link {
        model: String,
        alias: String,
    },
    Version {
        model: String,
        number: u32,
    },
    VersionFile {
        model: String,
        number: u32,
        file: VersionFile,
    },
    /// `vN/infer`: write a request, read its response (a stream).
    Infer {
        model: String,
        number: u32,
    },
    /// `vN/clone`: each open allocates a new job.
    Clone {
        model: String,
        number: u32,
    },
    Job(u64),
    JobFile(u64, JobFile),
    Device(String),
    DeviceFile {
        device: String,
        file: &'static str,
    },
    Blob(Digest),
    /// A model file being copied in; the number is its file handle.
    Upload(u64),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum VersionFile {
    /// A model file, by name.
    Model(String),
    Digest,
    Meta,
    Stats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobFile {
    Status,
    Model,
    Input,
    Output,
    Error,
    Priority,
    Device,
    Times,
    Ctl,
}

impl JobFile {
    fn index(self) -> u64 {
        JOB_FILES.iter().position(|(_, f)| *f == self).expect("every file is listed") as u64
    }

    fn name(self) -> &'static str {
        JOB_FILES[self.index() as usize].0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

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

/// Who is asking: from the FUSE request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// An open file: its handle and how the kernel should cache it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    /// Content is generated per open: bypass the page cache and `i_size`.
    pub direct_io: bool,
    /// Content never changes: keep the page cache across opens.
    pub keep_cache: bool,
    /// A stream, not a file with offsets (`infer`): reads and writes
    /// ignore positions.
    pub stream: bool,
    /// `close()` has nothing to do: the handle cannot have been written,
    /// or (`infer` opened for reading too) its request is sent by its read
    /// or its release. The kernel then skips the `flush` round trip.
    pub no_flush: bool,
}

/// `setattr` changes; `None` leaves a field alone. Time changes are
/// accepted and ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
}

/// `statfs` numbers: those of the file system under the data directory.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

enum Handle {
    Content(Vec<u8>),
    Blob(File),
    Upload(Mutex<Pending>),
    /// `config.json` opened for writing: the new text, applied at close.
    Config(String, Mutex<Option<Vec<u8>>>),
    Infer(Mutex<InferStream>),
    JobInput(Mutex<JobInput>),
    JobOutput(Arc<Job>),
    /// `ctl` or `priority` opened for writing: each write is one command.
    JobCommand(Arc<Job>, JobFile),
}

/// An open `infer`: the request being written, then the job answering it.
struct InferStream {
    model: String,
    number: u32,
    caller: Caller,
    /// The caller's session (getsid), for the write-then-read way; `None`
    /// when the caller's pid is not visible to the daemon.
    sid: Option<u32>,
    /// Opened for reading too: the kernel sends no `flush`, so a request
    /// left unread is sent by the session's next reader or at release.
    no_flush: bool,
    /// When the input being written began (see [`Session`]); 0 for none.
    stamp: u64,
    input: Vec<u8>,
    /// The request sent from this handle (or, for a handle that wrote
    /// nothing, the session's last one), once there is one.
    job: Option<Arc<Job>>,
    /// Bytes of the response already read.
    read_pos: usize,
}

impl InferStream {
    fn session_key(&self) -> Option<SessionKey> {
        self.sid.map(|sid| (self.model.clone(), self.number, sid, self.caller.uid))
    }
}

/// `jobs/<id>/input` opened for writing.
struct JobInput {
    job: Arc<Job>,
    input: Vec<u8>,
    written: bool,
}

/// An import in progress (see the module header).
struct Pending {
    model: String,
    file_name: String,
    uid: u32,
    gid: u32,
    perm: u16,
    /// The free space of the store when it began: no file can be larger.
    limit: u64,
    /// `None` once committed or failed.
    upload: Option<Upload>,
}

/// A JSON request of zeros for a signature (free dimensions 1), for the
/// README's examples; `None` for types or sizes that make a poor example.
fn example_request(sig: &crate::tensor::Signature) -> Option<String> {
    use crate::tensor::DType;
    let mut inputs = serde_json::Map::new();
    for spec in &sig.inputs {
        let zero = match spec.dtype {
            DType::Bool => serde_json::json!(false),
            DType::Float16 | DType::Float32 | DType::Float64 => serde_json::json!(0.0),
            DType::String | DType::Bfloat16 | DType::Other => return None,
            _ => serde_json::json!(0),
        };
        let dims: Vec<usize> = spec.shape.iter().map(|&d| if d < 0 { 1 } else { d as usize }).collect();
        if dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > 64) {
            return None;
        }
        let value = dims.iter().rev().fold(zero, |inner, &n| serde_json::Value::Array(vec![inner; n]));
        inputs.insert(spec.name.clone(), value);
    }
    Some(serde_json::Value::Object(inputs).to_string())
}

/// (model, version, session id, uid): whose last request `cat infer` reads.
type SessionKey = (String, u32, u32, u32);

/// A session's requests to one version, for the write-then-read way.
///
/// Inputs are stamped in the order their writing began, and the session's
/// last request is the sent one with the latest stamp: a request sent late
/// (by a release the kernel queued without waiting) does not displace a
/// later one. A `no_flush` handle's input is sent by its read, else by its
/// release, which may come after the next reader's read; so that reader
/// first sends what the session's handles hold unsent (as their `close()`
/// would have, had it had a `flush`), then reads the last request.
#[derive(Default)]
struct Session {
    last: Weak<Job>,
    last_stamp: u64,
    /// `no_flush` handles holding written, unsent input, with its stamp.
    unsent: Vec<(u64, Weak<Handle>)>,
}

/// The largest `config.json` accepted.
const CONFIG_MAX_BYTES: u64 = 1 << 20;

/// How long an imported file's name still resolves after the commit.
const IMPORTED_NAME_GRACE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Inodes {
    next: u64,
    by_node: HashMap<Node, u64>,
    by_ino: HashMap<u64, Node>,
}

pub struct Fs {
    store: Arc<Store>,
    engine: Engine,
    backends: Backends,
    /// The requests of each (version, session, uid): what `cat infer`
    /// reads. Weak: a job retired from `jobs/` is gone here too.
    sessions: Mutex<HashMap<SessionKey, Session>>,
    /// The next input's stamp (see [`Session`]).
    stamps: AtomicU64,
    /// Files just imported: (model, name) -> (version, when).
    imported: Mutex<HashMap<(String, String), (u32, Instant)>>,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    mountpoint: PathBuf,
    /// Owner of the daemon's own nodes (root, README, ...).
    uid: u32,
    gid: u32,
    started: SystemTime,
    started_at: Instant,
}

impl Fs {
    /// The tree over a store, with jobs run by an engine on `devices`
    /// (the CPU first). `mountpoint` only serves the README's copy-paste
    /// examples. Fails if the job records cannot be read.
    pub fn new(
        store: Store,
        backends: Backends,
        devices: Vec<Arc<dyn Probe>>,
        mountpoint: &Path,
        engine: EngineConfig,
    ) -> Result<Fs> {
        let mut inodes = Inodes { next: ROOT_INO + 1, ..Default::default() };
        inodes.by_node.insert(Node::Root, ROOT_INO);
        inodes.by_ino.insert(ROOT_INO, Node::Root);
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let store = Arc::new(store);
        Ok(Fs {
            engine: Engine::start(store.clone(), backends.clone(), devices, engine)?,
            store,
            backends,
            sessions: Mutex::new(HashMap::new()),
            stamps: AtomicU64::new(1),
            imported: Mutex::new(HashMap::new()),
            inodes: Mutex::new(inodes),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            mountpoint: mountpoint.to_path_buf(),
            uid,
            gid,
            started: SystemTime::now(),
            started_at: Instant::now(),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    // ---- inodes -------------------------------------------------------

    fn ino(&self, node: &Node) -> u64 {
        match node {
            Node::Job(id) => return JOB_INO_BASE + id * 16,
            Node::JobFile(id, f) => return JOB_INO_BASE + id * 16 + 1 + f.index(),
            _ => {}
        }
        let mut t = self.inodes.lock().unwrap();
        if let Some(&ino) = t.by_node.get(node) {
            return ino;
        }
        let ino = t.next;
        t.next += 1;
        t.by_node.insert(node.clone(), ino);
        t.by_ino.insert(ino, node.clone());
        ino
    }

    /// After a rename the kernel keeps the inode under its new name, so the
    /// inode must mean the new node from now on.
    fn move_ino(&self, from: &Node, to: &Node) {
        let mut t = self.inodes.lock().unwrap();
        if let Some(ino) = t.by_node.remove(from) {
            t.by_ino.insert(ino, to.clone());
            t.by_node.insert(to.clone(), ino);
        }
    }

    fn node(&self, ino: u64) -> Result<Node> {
        if ino >= JOB_INO_BASE {
            let (id, k) = ((ino - JOB_INO_BASE) / 16, (ino - JOB_INO_BASE) % 16);
            return match k {
                0 => Ok(Node::Job(id)),
                k => JOB_FILES
                    .get(k as usize - 1)
                    .map(|(_, f)| Node::JobFile(id, *f))
                    .ok_or_else(|| Error::NotFound(format!("inode {ino}"))),
            };
        }
        self.inodes.lock().unwrap().by_ino.get(&ino).cloned().ok_or_else(|| Error::NotFound(format!("inode {ino}")))
    }

    // ---- resolving names ------------------------------------------------

    fn version(&self, model: &str, number: u32) -> Result<(Arc<Model>, Arc<Version>)> {
        let m = self.store.model(model)?;
        let v = m.versions.get(&number).cloned().ok_or_else(|| Error::NotFound(format!("models/{model}/v{number}")))?;
        Ok((m, v))
    }

    fn device(&self, id: &str) -> Result<&dyn Probe> {
        self.engine
            .devices()
            .iter()
            .find(|d| d.id() == id)
            .map(|d| d.as_ref())
            .ok_or_else(|| Error::NotFound(format!("devices/{id}")))
    }

    /// The files of `devices/<id>/` and their values: the probe's reading,
    /// then the engine's `queue`, `running` and `models` (one per line).
    fn device_files(&self, id: &str) -> Result<Vec<(&'static str, String)>> {
        let mut files = self.device(id)?.read().files();
        let state = self.engine.device_state(id).ok_or_else(|| Error::NotFound(format!("devices/{id}")))?;
        files.push(("queue", state.queue.to_string()));
        files.push(("running", state.running.to_string()));
        files.push(("models", state.models.join("\n")));
        Ok(files)
    }

    /// The node `name` names inside `parent`, if it exists.
    fn child(&self, parent: &Node, name: &str) -> Result<Node> {
        let missing = || Error::NotFound(format!("{}/{name}", self.describe(parent)));
        Ok(match parent {
            // Small fixed directories: their listing is the one place that names them.
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
                if !self.store.blob_path(&digest).is_file() {
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
    fn children(&self, node: &Node) -> Result<Vec<(String, Node)>> {
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
                std::iter::once(("config.json".to_string(), Node::Config(model.clone())))
                    .chain(m.latest().map(|_| link(LATEST)))
                    .chain(m.aliases.keys().map(|a| link(a)))
                    .chain(
                        m.versions
                            .keys()
                            .map(|&number| (format!("v{number}"), Node::Version { model: model.clone(), number })),
                    )
                    .collect()
            }
            Node::Version { model, number } => {
                let (_, v) = self.version(model, *number)?;
                let file = |file| Node::VersionFile { model: model.clone(), number: *number, file };
                v.files
                    .keys()
                    .map(|name| (name.clone(), file(VersionFile::Model(name.clone()))))
                    .chain([
                        ("digest".to_string(), file(VersionFile::Digest)),
                        ("meta.json".to_string(), file(VersionFile::Meta)),
                        ("stats".to_string(), file(VersionFile::Stats)),
                        ("infer".to_string(), Node::Infer { model: model.clone(), number: *number }),
                        ("clone".to_string(), Node::Clone { model: model.clone(), number: *number }),
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

    // ---- attributes and content -------------------------------------------

    fn attr(&self, node: &Node) -> Result<Attr> {
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
            Node::Link { model, alias } => {
                let m = self.store.model(model)?;
                let n = m.resolve_alias(alias).ok_or_else(|| Error::NotFound(format!("models/{model}/{alias}")))?;
                let len = format!("v{n}").len() as u64;
                (Kind::Symlink, len, 0o777, m.uid, m.gid, secs(m.created))
            }
            Node::Version { model, number } => {
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
            Node::Infer { model, number } | Node::Clone { model, number } => {
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
                let digest = v.files.get(file).ok_or_else(|| Error::NotFound(format!("models/{model}/{file}")))?;
                (Kind::File, self.blob_len(digest)?, 0o444, m.uid, m.gid, secs(v.created))
            }
            Node::Blob(digest) => (Kind::File, self.blob_len(digest)?, 0o444, self.uid, self.gid, self.started),
            Node::Upload(fh) => {
                let handle = self.handle(*fh).map_err(|_| Error::NotFound(format!("upload {fh}")))?;
                let Handle::Upload(pending) = &*handle else {
                    return Err(Error::NotFound(format!("upload {fh}")));
                };
                let p = pending.lock().unwrap();
                let len = p.upload.as_ref().map_or(0, |u| u.len());
                (Kind::File, len, p.perm, p.uid, p.gid, SystemTime::now())
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

    fn blob_len(&self, digest: &Digest) -> Result<u64> {
        let path = self.store.blob_path(digest);
        std::fs::metadata(&path).map(|m| m.len()).map_err(|e| Error::io(path.display().to_string(), e))
    }

    /// The text of a generated file.
    fn content(&self, node: &Node) -> Result<Vec<u8>> {
        let text = match node {
            Node::Readme => self.readme(),
            Node::Status => pretty(&self.status()),
            Node::Metrics => self.engine.metrics_text(),
            Node::Config(model) => self.store.model(model)?.config.to_json(),
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
                    JobFile::Status => match (state.status, failure) {
                        (Status::Failed, Some(f)) => format!("failed\n{}\n", f.reason),
                        (status, _) => format!("{}\n", status.name()),
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

    /// EBUSY while queued or running jobs use the version.
    fn check_no_jobs(&self, model: &str, number: u32) -> Result<()> {
        match self.engine.active_jobs(model, number).as_slice() {
            [] => Ok(()),
            ids => Err(Error::Busy(format!("models/{model}/v{number}: in use by job {ids:?}"))),
        }
    }

    /// The version a file just imported under `name` went to, within the
    /// grace period.
    fn recently_imported(&self, model: &str, name: &str) -> Option<u32> {
        let mut imported = self.imported.lock().unwrap();
        imported.retain(|_, (_, at)| at.elapsed() < IMPORTED_NAME_GRACE);
        imported.get(&(model.to_string(), name.to_string())).map(|(n, _)| *n)
    }

    fn job(&self, id: u64) -> Result<Arc<Job>> {
        self.engine.job(id).ok_or_else(|| Error::NotFound(format!("jobs/{id}")))
    }

    /// `/status`: daemon facts as JSON.
    pub fn status(&self) -> serde_json::Value {
        let models = self.store.models();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started_at.elapsed().as_secs(),
            "mountpoint": self.mountpoint,
            "data_dir": self.store.root(),
            "store": {
                "bytes": self.store.size(),
                "blobs": self.store.blobs().len(),
                "models": models.len(),
                "versions": models.iter().map(|m| m.versions.len()).sum::<usize>(),
            },
            "backends": self.backends.describe(),
            "devices": self.engine.devices().iter().map(|d| {
                let state = self.engine.device_state(d.id());
                serde_json::json!({
                    "id": d.id(),
                    "name": d.read().name,
                    "queue": state.as_ref().map(|s| s.queue),
                    "running": state.as_ref().map(|s| s.running),
                    "models": state.map(|s| s.models),
                })
            }).collect::<Vec<_>>(),
        })
    }

    /// `/README`, with examples written for this mount point and, where one
    /// exists, a real model in it, so that they work by copy-paste.
    fn readme(&self) -> String {
        let mnt = self.mountpoint.display();
        // A model already here makes the examples concrete: its file to
        // copy, and a request of zeros shaped for it.
        let sample = self.store.models().into_iter().find_map(|m| {
            let v = m.versions.values().next_back()?.clone();
            let file = v.files.keys().next()?.clone();
            Some((m.name.clone(), v, file))
        });
        let source = match &sample {
            Some((name, v, file)) => format!("cp {mnt}/models/{name}/v{}/{file} /tmp/model.onnx", v.number),
            None => "cp /path/to/your/model.onnx /tmp/model.onnx".to_string(),
        };
        let request =
            sample.as_ref().and_then(|(_, v, _)| example_request(&v.signature)).unwrap_or_else(|| "[[0.0]]".into());
        format!(
            "aifs: AI models as files.

The tree
  README            this help
  status            daemon facts as JSON (version, uptime, store size, backends, devices)
  metrics           Prometheus text: requests, failures, latencies, batch sizes, devices
  models/<name>/    mkdir makes a model; cp a model file into it to make a new version
    config.json     scheduling settings: device, max_batch, batch_delay_us, priority, timeout_ms, ...
    latest -> vN    the newest version (kept by the daemon)
    <alias> -> vN   your symlinks: ln -s v1 stable; ln -sfn v2 stable; rm stable
    vN/             an immutable version: the model file, digest, meta.json, and
      infer         write a request (JSON, KServe v2 JSON, .npy, .npz), read the response
      clone         read it: a new job id for this version
      stats         requests, failures, batches, latency p50/p99
  devices/<id>/     name, util (percent over the last second), memory.total, memory.used,
                    queue, running, models
  jobs/<id>/        status, model, input, output, error, priority, device, times, ctl
  blobs/            the content-addressed store: sha256-<hex>

Example 1: look around
  ls {mnt}/models/
  cat {mnt}/status
  cat {mnt}/devices/cpu/util

Example 2: import a model as a new version
  {source}
  mkdir {mnt}/models/demo
  cp /tmp/model.onnx {mnt}/models/demo/
  ls {mnt}/models/demo/
  cat {mnt}/models/demo/v1/meta.json
  cat {mnt}/models/demo/latest/digest

Example 3: run it (the request is JSON: inputs by name)
  echo '{request}' > {mnt}/models/demo/latest/infer
  cat {mnt}/models/demo/latest/infer
  id=$(cat {mnt}/models/demo/v1/clone)
  echo '{request}' > {mnt}/jobs/$id/input
  cat {mnt}/jobs/$id/output
  cat {mnt}/jobs/$id/times

Example 4: aliases and removal
  ln -s v1 {mnt}/models/demo/stable
  readlink {mnt}/models/demo/stable
  cat {mnt}/models/demo/stable/digest
  rm {mnt}/models/demo/stable
  rm -r {mnt}/models/demo/v1
  rmdir {mnt}/models/demo

Errors are errnos, with the reason in the job's error file and the daemon
log: EINVAL for a file no backend can load or a request that does not fit
the model, EROFS for writes into a version, EBUSY for removing a version in
use, EAGAIN when a model's queue is full, ETIMEDOUT, ECANCELED.
"
        )
    }

    // ---- operations ---------------------------------------------------------

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        let parent = self.node(parent)?;
        let name = name.to_str().ok_or_else(|| Error::NotFound(name.to_string_lossy().into_owned()))?;
        let child = self.child(&parent, name)?;
        self.attr(&child)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        self.attr(&self.node(ino)?)
    }

    pub fn setattr(&self, ino: u64, change: SetAttr) -> Result<Attr> {
        let node = self.node(ino)?;
        let owner_or_mode = change.mode.is_some() || change.uid.is_some() || change.gid.is_some();
        match &node {
            Node::Model(model) => {
                if change.size.is_some() {
                    return Err(Error::IsDir(format!("models/{model}")));
                }
                if owner_or_mode {
                    self.store.set_owner_mode(model, change.uid, change.gid, change.mode)?;
                }
            }
            Node::Upload(fh) => {
                if let Some(size) = change.size {
                    self.with_pending(*fh, |p| match &mut p.upload {
                        Some(_) if size > p.limit => Err(no_space(&p.model, &p.file_name, p.limit)),
                        Some(u) => u.set_len(size),
                        None => Ok(()),
                    })?;
                }
            }
            // What `install` or `shutil.copy` do after copying (mode, times), or
            // the truncation of a second `cp` (which gets a new upload): no change.
            Node::Imported { .. } if change.size.is_none_or(|s| s == 0) => {}
            // `>` truncates before writing a request, command or config: nothing to truncate.
            Node::Infer { .. }
            | Node::Config(_)
            | Node::JobFile(_, JobFile::Input | JobFile::Priority | JobFile::Ctl)
                if !owner_or_mode && change.size.is_none_or(|s| s == 0) => {}
            Node::Version { .. }
            | Node::VersionFile { .. }
            | Node::Blob(_)
            | Node::Link { .. }
            | Node::Infer { .. }
            | Node::Clone { .. }
            | Node::JobFile(..) => {
                if owner_or_mode || change.size.is_some() {
                    return Err(Error::ReadOnly(self.describe(&node)));
                }
            }
            _ => {
                if owner_or_mode || change.size.is_some() {
                    return Err(Error::NotPermitted(format!("{}: belongs to the daemon", self.describe(&node))));
                }
            }
        }
        self.attr(&node)
    }

    pub fn readlink(&self, ino: u64) -> Result<String> {
        match self.node(ino)? {
            Node::Link { model, alias } => {
                let n = self
                    .store
                    .model(&model)?
                    .resolve_alias(&alias)
                    .ok_or_else(|| Error::NotFound(format!("models/{model}/{alias}")))?;
                Ok(format!("v{n}"))
            }
            _ => Err(Error::InvalidArgument("not a symlink".into())),
        }
    }

    pub fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let node = self.node(ino)?;
        let entries = self.children(&node)?;
        Ok(entries
            .into_iter()
            .map(|(name, child)| DirEntry {
                ino: self.ino(&child),
                kind: match child {
                    Node::Link { .. } => Kind::Symlink,
                    Node::Root | Node::Models | Node::Devices | Node::Jobs | Node::Blobs => Kind::Dir,
                    Node::Model(_) | Node::Version { .. } | Node::Device(_) | Node::Job(_) => Kind::Dir,
                    _ => Kind::File,
                },
                name,
            })
            .collect())
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> Result<Attr> {
        match self.node(parent)? {
            Node::Models => {
                let name = store::validate_name(name.as_encoded_bytes())?;
                let m = self.store.create_model(name, caller.uid, caller.gid, mode)?;
                tracing::info!(model = %m.name, uid = caller.uid, "created model");
                self.attr(&Node::Model(m.name.clone()))
            }
            Node::Model(model) => Err(Error::NotPermitted(format!(
                "models/{model}: versions are made by copying a model file in, not by mkdir"
            ))),
            node @ (Node::Version { .. } | Node::Blobs) => Err(Error::ReadOnly(self.describe(&node))),
            node => Err(Error::NotPermitted(format!("{}: cannot make directories here", self.describe(&node)))),
        }
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        let parent = self.node(parent)?;
        let name = name.to_str().ok_or_else(|| Error::NotFound(name.to_string_lossy().into_owned()))?;
        match self.child(&parent, name)? {
            Node::Model(model) => {
                self.store.remove_model(&model)?;
                tracing::info!(model = %model, "removed model");
                Ok(())
            }
            Node::Version { model, number } => {
                self.check_no_jobs(&model, number)?;
                self.store.delete_version(&model, number)?;
                self.engine.abandon_new_jobs(&model, number);
                tracing::info!(model = %model, version = number, "deleted version");
                Ok(())
            }
            node @ (Node::Link { .. } | Node::VersionFile { .. } | Node::Blob(_)) => {
                Err(Error::NotDir(self.describe(&node)))
            }
            node => Err(Error::NotPermitted(format!("{}: belongs to the daemon", self.describe(&node)))),
        }
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        let parent = self.node(parent)?;
        let name = name.to_str().ok_or_else(|| Error::NotFound(name.to_string_lossy().into_owned()))?;
        match self.child(&parent, name)? {
            // Derived from the model; they go with it (so `rm -r` of a model works).
            Node::Link { alias, .. } if alias == LATEST => Ok(()),
            Node::Config(_) => Ok(()),
            Node::Link { model, alias } => {
                self.store.remove_alias(&model, &alias)?;
                tracing::info!(model = %model, alias = %alias, "removed alias");
                Ok(())
            }
            Node::VersionFile { model, number, .. } | Node::Infer { model, number } | Node::Clone { model, number } => {
                self.store.check_deletable(&*self.store.model(&model)?, number)?;
                self.check_no_jobs(&model, number)
            }
            node @ Node::Imported { .. } => Err(Error::NotFound(self.describe(&node))),
            node @ (Node::Model(_) | Node::Version { .. }) => Err(Error::IsDir(self.describe(&node))),
            node @ Node::Blob(_) => Err(Error::ReadOnly(self.describe(&node))),
            node => Err(Error::NotPermitted(format!("{}: belongs to the daemon", self.describe(&node)))),
        }
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &Path) -> Result<Attr> {
        match self.node(parent)? {
            Node::Model(model) => {
                let alias = store::validate_name(name.as_encoded_bytes())?;
                let target =
                    target.to_str().ok_or_else(|| Error::InvalidArgument("alias target is not UTF-8".into()))?;
                let number = self.store.create_alias(&model, alias, target)?;
                tracing::info!(model = %model, alias = %alias, version = number, "created alias");
                self.attr(&Node::Link { model, alias: alias.to_string() })
            }
            node => Err(Error::NotPermitted(format!(
                "{}: symlinks are aliases and live in a model directory",
                self.describe(&node)
            ))),
        }
    }

    /// Renames an alias within one model (what `ln -sfn` does), replacing
    /// the target alias unless `no_replace`.
    pub fn rename(&self, parent: u64, name: &OsStr, new_parent: u64, new_name: &OsStr, no_replace: bool) -> Result<()> {
        let parent_node = self.node(parent)?;
        let name = name.to_str().ok_or_else(|| Error::NotFound(name.to_string_lossy().into_owned()))?;
        let new_name = store::validate_name(new_name.as_encoded_bytes())?;
        match self.child(&parent_node, name)? {
            Node::Link { model, alias } if alias != LATEST && parent == new_parent => {
                // Only another user alias can be replaced.
                match self.child(&parent_node, new_name) {
                    Ok(Node::Link { alias, .. }) if alias != LATEST => {}
                    Ok(Node::Imported { .. }) | Err(_) => {}
                    Ok(existing) => {
                        return Err(Error::NotPermitted(format!("{}: cannot be replaced", self.describe(&existing))))
                    }
                }
                self.store.rename_alias(&model, &alias, new_name, no_replace)?;
                let renamed = Node::Link { model: model.clone(), alias: new_name.to_string() };
                self.move_ino(&Node::Link { model: model.clone(), alias: alias.clone() }, &renamed);
                tracing::info!(model = %model, from = %alias, to = %new_name, "renamed alias");
                Ok(())
            }
            node => Err(Error::NotPermitted(format!(
                "{}: only aliases can be renamed, within their model",
                self.describe(&node)
            ))),
        }
    }

    pub fn open(&self, ino: u64, flags: i32, caller: Caller) -> Result<Opened> {
        let node = self.node(ino)?;
        let writing = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        let generated = |handle: Handle| (handle, true, false);
        let (handle, direct_io, keep_cache) = match &node {
            Node::VersionFile { .. } | Node::Blob(_) | Node::Clone { .. } if writing => {
                return Err(Error::ReadOnly(self.describe(&node)))
            }
            Node::Config(model) if writing => {
                self.store.model(model)?;
                (Handle::Config(model.clone(), Mutex::new(None)), true, false)
            }
            Node::Readme | Node::Status | Node::Metrics | Node::DeviceFile { .. } if writing => {
                return Err(Error::AccessDenied(self.describe(&node)))
            }
            // Writing the name just imported again (a second `cp`): a new upload.
            Node::Imported { model, file, .. } if writing => {
                let fh = self.start_upload(model.clone(), file, 0o644, caller)?;
                return Ok(Opened { fh, direct_io: false, keep_cache: false, stream: false, no_flush: false });
            }
            Node::VersionFile { model, number, file: VersionFile::Model(name) }
            | Node::Imported { model, number, file: name } => {
                let (_, v) = self.version(model, *number)?;
                let digest = v.files.get(name).ok_or_else(|| Error::NotFound(self.describe(&node)))?;
                (Handle::Blob(self.open_blob(digest)?), false, true)
            }
            Node::Blob(digest) => (Handle::Blob(self.open_blob(digest)?), false, true),
            Node::VersionFile { .. }
            | Node::Readme
            | Node::Status
            | Node::Metrics
            | Node::Config(_)
            | Node::DeviceFile { .. } => (Handle::Content(self.content(&node)?), true, false),
            Node::Infer { model, number } => {
                self.version(model, *number)?;
                let no_flush = flags & libc::O_ACCMODE != libc::O_WRONLY;
                let stream = InferStream {
                    model: model.clone(),
                    number: *number,
                    caller,
                    sid: (caller.pid != 0).then(|| session_of(caller.pid)),
                    no_flush,
                    stamp: 0,
                    input: Vec::new(),
                    job: None,
                    read_pos: 0,
                };
                let fh = self.add_handle(Handle::Infer(Mutex::new(stream)));
                return Ok(Opened { fh, direct_io: true, keep_cache: false, stream: true, no_flush });
            }
            Node::Clone { model, number } => {
                let job = self.engine.create_job(caller.uid, caller.gid, model, *number)?;
                tracing::debug!(job = job.id, model = %model, version = number, "cloned a new job");
                (Handle::Content(format!("{}\n", job.id).into_bytes()), true, false)
            }
            Node::JobFile(id, file) => {
                let job = self.job(*id)?;
                match file {
                    JobFile::Input if writing => {
                        if job.status() != Status::New {
                            return Err(Error::ReadOnly(format!("jobs/{id}/input: already submitted")));
                        }
                        generated(Handle::JobInput(Mutex::new(JobInput { job, input: Vec::new(), written: false })))
                    }
                    JobFile::Input => generated(Handle::Content(job.snapshot().input.to_vec())),
                    JobFile::Output if writing => return Err(Error::ReadOnly(format!("jobs/{id}/output"))),
                    JobFile::Output => generated(Handle::JobOutput(job)),
                    JobFile::Priority | JobFile::Ctl if writing => generated(Handle::JobCommand(job, *file)),
                    JobFile::Ctl => generated(Handle::Content(Vec::new())),
                    _ if writing => return Err(Error::AccessDenied(format!("jobs/{id}/{}", file.name()))),
                    _ => generated(Handle::Content(self.content(&node)?)),
                }
            }
            Node::Upload(_) => return Err(Error::Busy(format!("{}: being copied in", self.describe(&node)))),
            Node::Link { .. } => return Err(Error::InvalidArgument("cannot open a symlink".into())),
            _ => return Err(Error::IsDir(self.describe(&node))),
        };
        let fh = self.add_handle(handle);
        Ok(Opened { fh, direct_io, keep_cache, stream: false, no_flush: !writing })
    }

    /// Reads from an open file and calls `done` with the bytes. Most reads
    /// answer at once; reads of a response (`infer`, `jobs/<id>/output`)
    /// answer when the job ends, from the thread that ends it: no thread
    /// waits meanwhile.
    pub fn read(&self, fh: u64, offset: u64, size: u32, done: impl FnOnce(Result<Vec<u8>>) + Send + 'static) {
        let handle = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return done(Err(e)),
        };
        let size = size as usize;
        match &*handle {
            Handle::Content(bytes) => done(Ok(slice_at(bytes, offset as usize, size))),
            Handle::Blob(file) => done(read_file_at(file, offset, size)),
            Handle::JobOutput(job) => {
                let reader = job.clone();
                job.when_done(move |outcome| {
                    done(outcome.as_ref().map_err(|f| f.to_error()).map(|out| {
                        let bytes = slice_at(out, offset as usize, size);
                        if offset as usize + bytes.len() >= out.len() {
                            reader.mark_output_read();
                        }
                        bytes
                    }))
                })
            }
            Handle::Infer(stream) => {
                let (job, sent) = match self.infer_job(&mut stream.lock().unwrap()) {
                    Ok(found) => found,
                    Err(e) => return done(Err(e)),
                };
                if sent {
                    // This reader waits for the reply: it may run the job itself.
                    self.engine.run_or_wake(&job);
                }
                let handle = handle.clone();
                let reader = job.clone();
                job.when_done(move |outcome| {
                    let Handle::Infer(stream) = &*handle else { unreachable!("an infer handle") };
                    done(match outcome {
                        Ok(out) => {
                            let mut st = stream.lock().unwrap();
                            let bytes = slice_at(out, st.read_pos, size);
                            st.read_pos += bytes.len();
                            if st.read_pos >= out.len() {
                                reader.mark_output_read();
                            }
                            Ok(bytes)
                        }
                        Err(f) => Err(f.to_error()),
                    })
                });
            }
            Handle::Upload(_) | Handle::Config(..) | Handle::JobInput(_) | Handle::JobCommand(..) => {
                done(Err(Error::BadHandle(fh)))
            }
        }
    }

    /// The job a read of `infer` answers with: this handle's request (sent
    /// now if it was written but not yet sent: then `true`, and the caller
    /// must call [`Engine::run_or_wake`]), else the session's last.
    fn infer_job(&self, st: &mut InferStream) -> Result<(Arc<Job>, bool)> {
        let mut sent = false;
        if st.job.is_none() {
            if !st.input.is_empty() {
                self.send_request(st, true)?;
                sent = true;
            } else {
                let job = st.session_key().and_then(|key| self.session_last(key, st.stamp));
                st.job =
                    Some(job.ok_or_else(|| Error::NoRequest(format!("models/{}/v{}/infer", st.model, st.number)))?);
            }
        }
        Ok((st.job.clone().expect("set above"), sent))
    }

    /// Makes a job of the handle's request and submits it; it becomes the
    /// session's last request whether or not it was accepted. A reader
    /// (`for_reader`) runs it or wakes a worker itself, once it holds no
    /// lock: [`Engine::submit_for_reader`].
    fn send_request(&self, st: &mut InferStream, for_reader: bool) -> Result<()> {
        let job = self.engine.create_job(st.caller.uid, st.caller.gid, &st.model, st.number)?;
        let input = std::mem::take(&mut st.input);
        let result =
            if for_reader { self.engine.submit_for_reader(&job, input) } else { self.engine.submit(&job, input) };
        self.remember(st, Some(job));
        result
    }

    /// The last request of a session, after sending what its handles
    /// hold unsent (see [`Session`]). `own` is the reader's stamp: its own
    /// handle is never among those it sends.
    fn session_last(&self, key: SessionKey, own: u64) -> Option<Arc<Job>> {
        let unsent: Vec<Arc<Handle>> = {
            let mut sessions = self.sessions.lock().unwrap();
            let session = sessions.get_mut(&key)?;
            session.unsent.retain(|(_, h)| h.strong_count() > 0);
            session.unsent.iter().filter(|(stamp, _)| *stamp != own).filter_map(|(_, h)| h.upgrade()).collect()
        };
        for handle in unsent {
            let Handle::Infer(stream) = &*handle else { continue };
            let mut st = stream.lock().unwrap();
            if st.job.is_none() && !st.input.is_empty() {
                if let Err(e) = self.send_request(&mut st, false) {
                    tracing::info!(model = %key.0, version = key.1, "a held request was not sent: {e}");
                }
            }
        }
        self.sessions.lock().unwrap().get(&key)?.last.upgrade()
    }

    /// Stamps the input a handle begins to write; a `no_flush` handle's is
    /// listed as unsent in its session.
    fn begin_input(&self, st: &mut InferStream, handle: &Arc<Handle>) {
        st.stamp = self.stamps.fetch_add(1, Ordering::Relaxed);
        if let Some(key) = st.session_key().filter(|_| st.no_flush) {
            self.sessions.lock().unwrap().entry(key).or_default().unsent.push((st.stamp, Arc::downgrade(handle)));
        }
    }

    /// Makes `job` (if any: `None` when the input was dropped unsent) the
    /// handle's request and, unless a later input was sent already, its
    /// session's last; the input is no longer unsent.
    fn remember(&self, st: &mut InferStream, job: Option<Arc<Job>>) {
        let stamp = std::mem::take(&mut st.stamp);
        if let Some(key) = st.session_key().filter(|_| job.is_some() || stamp != 0) {
            let mut sessions = self.sessions.lock().unwrap();
            let session = sessions.entry(key).or_default();
            if let Some(job) = job.as_ref().filter(|_| stamp >= session.last_stamp) {
                session.last = Arc::downgrade(job);
                session.last_stamp = stamp;
            }
            if st.no_flush && stamp != 0 {
                session.unsent.retain(|(s, _)| *s != stamp);
            }
        }
        if job.is_some() {
            st.job = job;
        }
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let limit = self.engine.config().max_input_bytes;
        let handle = self.handle(fh)?;
        match &*handle {
            Handle::Upload(_) => self.with_pending(fh, |p| match &mut p.upload {
                Some(_) if offset + data.len() as u64 > p.limit => Err(no_space(&p.model, &p.file_name, p.limit)),
                Some(u) => u.write_at(offset, data),
                None => Err(Error::InvalidArgument(format!(
                    "models/{}/{}: already committed; open it again to make another version",
                    p.model, p.file_name
                ))),
            })?,
            Handle::Infer(stream) => {
                let mut st = stream.lock().unwrap();
                if st.job.is_some() {
                    // A write after a request was sent starts the next one.
                    st.job = None;
                    st.read_pos = 0;
                }
                if st.stamp == 0 {
                    self.begin_input(&mut st, &handle);
                }
                if (st.input.len() + data.len()) as u64 > limit {
                    st.input = Vec::new();
                    let e = Error::TooBig { limit };
                    let job = self.engine.create_job(st.caller.uid, st.caller.gid, &st.model, st.number);
                    let job = job.inspect_err(|_| self.remember(&mut st, None))?;
                    self.engine.fail(&job, &e);
                    self.remember(&mut st, Some(job));
                    return Err(e);
                }
                if st.input.is_empty() {
                    // Grown once, not doubled: a 64 MB tensor otherwise
                    // copies itself and faults in fresh pages six times.
                    // Only a hint: a header may lie, so no more than the
                    // limit and no abort if memory is short.
                    if let Some(declared) = codec::declared_len(data).filter(|&n| n <= limit) {
                        let _ = st.input.try_reserve(declared as usize);
                    }
                }
                st.input.extend_from_slice(data);
            }
            Handle::JobInput(w) => {
                let mut w = w.lock().unwrap();
                if w.job.status() != Status::New {
                    return Err(Error::ReadOnly(format!("jobs/{}/input: already submitted", w.job.id)));
                }
                if let Err(e) = write_into(&mut w.input, offset, data, limit) {
                    self.engine.fail(&w.job, &e);
                    return Err(e);
                }
                w.written = true;
            }
            Handle::JobCommand(job, file) => {
                let text = std::str::from_utf8(data).map_err(|_| Error::InvalidArgument("not UTF-8 text".into()))?;
                let text = text.trim();
                match file {
                    JobFile::Ctl if text == "cancel" => self.engine.cancel(job)?,
                    JobFile::Ctl => {
                        return Err(Error::InvalidArgument(format!(
                            "jobs/{}/ctl: unknown command {text:?} (known: cancel)",
                            job.id
                        )))
                    }
                    _ => {
                        let p = text.parse().map_err(|_| {
                            Error::InvalidArgument(format!("jobs/{}/priority: {text:?} is not an integer", job.id))
                        })?;
                        self.engine.set_priority(job, p)?
                    }
                }
            }
            Handle::Config(_, text) => {
                write_into(text.lock().unwrap().get_or_insert_with(Vec::new), offset, data, CONFIG_MAX_BYTES)?
            }
            Handle::Content(_) | Handle::Blob(_) | Handle::JobOutput(_) => return Err(Error::BadHandle(fh)),
        }
        Ok(data.len() as u32)
    }

    /// `close()`: commits an upload, or sends a written request (see the
    /// module header). Errors reach the caller's `close()`.
    pub fn flush(&self, fh: u64) -> Result<()> {
        self.finish_writes(&*self.handle(fh)?)
    }

    fn finish_writes(&self, handle: &Handle) -> Result<()> {
        match handle {
            Handle::Config(model, text) => {
                // Applied when closed after a write; an invalid config fails
                // the close() and changes nothing.
                let Some(text) = text.lock().unwrap().take() else { return Ok(()) };
                let config = store::ModelConfig::parse(&text)?;
                self.store.set_config(model, config)?;
                tracing::info!(model = %model, "config.json updated");
                Ok(())
            }
            Handle::Upload(pending) => {
                let mut p = pending.lock().unwrap();
                match &p.upload {
                    None => Ok(()),
                    Some(u) if u.is_empty() => Err(Error::EmptyUpload(p.file_name.clone())),
                    Some(_) => self.commit(&mut p),
                }
            }
            Handle::Infer(stream) => {
                let mut st = stream.lock().unwrap();
                if st.job.is_none() && !st.input.is_empty() {
                    self.send_request(&mut st, false)?;
                }
                Ok(())
            }
            Handle::JobInput(w) => {
                let mut w = w.lock().unwrap();
                if !w.written {
                    return Ok(());
                }
                w.written = false;
                if w.job.status() != Status::New {
                    // Another writer's close submitted first: this one's bytes would be lost.
                    return Err(Error::ReadOnly(format!("jobs/{}/input: already submitted", w.job.id)));
                }
                let input = std::mem::take(&mut w.input);
                self.engine.submit(&w.job, input)
            }
            _ => Ok(()),
        }
    }

    pub fn fsync(&self, fh: u64) -> Result<()> {
        self.with_pending(fh, |p| p.upload.as_ref().map_or(Ok(()), |u| u.sync())).or_else(|e| {
            if matches!(e, Error::BadHandle(_)) {
                Ok(())
            } else {
                Err(e)
            }
        })
    }

    /// The last close of a handle. What its `flush` would have done and did
    /// not (an upload with data, a written request) is done now; the error
    /// can only be logged.
    pub fn release(&self, fh: u64) -> Result<()> {
        let handle = self.handles.lock().unwrap().remove(&fh).ok_or(Error::BadHandle(fh))?;
        if let Handle::Upload(pending) = &*handle {
            let mut t = self.inodes.lock().unwrap();
            if let Some(ino) = t.by_node.remove(&Node::Upload(fh)) {
                t.by_ino.remove(&ino);
            }
            drop(t);
            let p = pending.lock().unwrap();
            if p.upload.as_ref().is_some_and(|u| u.is_empty()) {
                tracing::info!("invalid model {:?}: empty file, discarded", p.file_name);
                return Ok(());
            }
        }
        let result = self.finish_writes(&handle);
        if let Handle::Infer(stream) = &*handle {
            // Sent or not, its input is no longer held for the session.
            self.remember(&mut stream.lock().unwrap(), None);
        }
        result
    }

    fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.store.blob_path(digest);
        File::open(&path).map_err(|e| Error::io(path.display().to_string(), e))
    }

    /// Starts copying a model file into `models/<name>/`.
    pub fn create(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> Result<(Attr, Opened)> {
        let model = match self.node(parent)? {
            Node::Model(model) => model,
            node @ (Node::Version { .. } | Node::Blobs) => return Err(Error::ReadOnly(self.describe(&node))),
            Node::Models => {
                return Err(Error::NotPermitted(
                    "models/ holds model directories: mkdir models/NAME, then copy the model file into it".into(),
                ))
            }
            node => return Err(Error::NotPermitted(format!("{}: cannot create files here", self.describe(&node)))),
        };
        let file_name = store::validate_name(name.as_encoded_bytes())?;
        if VERSION_FILES.contains(&file_name) {
            return Err(Error::InvalidName {
                name: file_name.to_string(),
                why: "reserved for the files aifs adds to every version",
            });
        }
        match self.child(&Node::Model(model.clone()), file_name) {
            Ok(Node::Imported { .. }) | Err(_) => {}
            Ok(node) => return Err(Error::Exists(self.describe(&node))),
        }
        let fh = self.start_upload(model, file_name, mode, caller)?;
        let attr = self.attr(&Node::Upload(fh))?;
        Ok((attr, Opened { fh, direct_io: false, keep_cache: false, stream: false, no_flush: false }))
    }

    /// A new upload of `file_name` into a model; returns its handle.
    fn start_upload(&self, model: String, file_name: &str, mode: u32, caller: Caller) -> Result<u64> {
        self.backends.for_file(file_name)?;
        let pending = Pending {
            model,
            file_name: file_name.to_string(),
            uid: caller.uid,
            gid: caller.gid,
            perm: (mode & 0o777) as u16,
            limit: self.statfs().map_or(u64::MAX, |s| s.bavail * s.frsize as u64),
            upload: Some(self.store.begin_upload()?),
        };
        Ok(self.add_handle(Handle::Upload(Mutex::new(pending))))
    }

    fn commit(&self, p: &mut Pending) -> Result<()> {
        let upload = p.upload.take().expect("caller checked");
        let bytes = upload.len();
        let file_name = p.file_name.clone();
        let imported =
            self.store.import(&p.model, &file_name, upload, |path| self.backends.inspect(path, &file_name))?;
        let (number, what) = match imported {
            Imported::New(n) => (n, "imported new version"),
            Imported::Existing(n) => (n, "content identical to an existing version; no new version"),
        };
        tracing::info!(model = %p.model, version = number, file = %file_name, bytes, "{what}");
        self.imported.lock().unwrap().insert((p.model.clone(), file_name), (number, Instant::now()));
        Ok(())
    }

    pub fn statfs(&self) -> Result<StatFs> {
        let path = std::ffi::CString::new(self.store.root().as_os_str().as_encoded_bytes())
            .map_err(|_| Error::InvalidArgument("data dir path has a NUL".into()))?;
        // SAFETY: statvfs only writes into the zeroed struct we pass.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
            return Err(Error::io("statfs", std::io::Error::last_os_error()));
        }
        Ok(StatFs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: 255,
            frsize: s.f_frsize as u32,
        })
    }

    // ---- helpers ------------------------------------------------------------

    fn add_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, Arc::new(handle));
        fh
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles.lock().unwrap().get(&fh).cloned().ok_or(Error::BadHandle(fh))
    }

    fn with_pending<T>(&self, fh: u64, f: impl FnOnce(&mut Pending) -> Result<T>) -> Result<T> {
        let handle = self.handle(fh)?;
        let Handle::Upload(pending) = &*handle else {
            return Err(Error::BadHandle(fh));
        };
        let mut p = pending.lock().unwrap();
        f(&mut p)
    }

    /// A node's path in the tree, for error messages.
    fn describe(&self, node: &Node) -> String {
        match node {
            Node::Root => "/".into(),
            Node::Readme => "README".into(),
            Node::Status => "status".into(),
            Node::Metrics => "metrics".into(),
            Node::Config(m) => format!("models/{m}/config.json"),
            Node::Imported { model, file, .. } => format!("models/{model}/{file}"),
            Node::Models => "models".into(),
            Node::Devices => "devices".into(),
            Node::Jobs => "jobs".into(),
            Node::Blobs => "blobs".into(),
            Node::Model(m) => format!("models/{m}"),
            Node::Link { model, alias } => format!("models/{model}/{alias}"),
            Node::Version { model, number } => format!("models/{model}/v{number}"),
            Node::VersionFile { model, number, file } => {
                let name = match file {
                    VersionFile::Model(name) => name.as_str(),
                    VersionFile::Digest => "digest",
                    VersionFile::Meta => "meta.json",
                    VersionFile::Stats => "stats",
                };
                format!("models/{model}/v{number}/{name}")
            }
            Node::Infer { model, number } => format!("models/{model}/v{number}/infer"),
            Node::Clone { model, number } => format!("models/{model}/v{number}/clone"),
            Node::Job(id) => format!("jobs/{id}"),
            Node::JobFile(id, f) => format!("jobs/{id}/{}", f.name()),
            Node::Device(id) => format!("devices/{id}"),
            Node::DeviceFile { device, file } => format!("devices/{device}/{file}"),
            Node::Blob(d) => format!("blobs/{}", d.file_name()),
            Node::Upload(fh) => self
                .with_pending(*fh, |p| Ok(format!("models/{}/{}", p.model, p.file_name)))
                .unwrap_or_else(|_| format!("upload {fh}")),
        }
    }
}

/// Pretty JSON and a final newline: what `cat` users expect of a file.
fn pretty(value: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(value).expect("JSON values serialize");
    s.push('\n');
    s
}

/// Writes `data` at `offset` into a buffer that may not grow past `limit`.
fn write_into(buf: &mut Vec<u8>, offset: u64, data: &[u8], limit: u64) -> Result<()> {
    let end = offset.saturating_add(data.len() as u64);
    if end > limit {
        return Err(Error::TooBig { limit });
    }
    let (start, end) = (offset as usize, end as usize);
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[start..end].copy_from_slice(data);
    Ok(())
}

fn no_space(model: &str, file: &str, free: u64) -> Error {
    let context = format!("models/{model}/{file}: larger than the store's free space ({free} bytes)");
    Error::io(context, std::io::Error::from_raw_os_error(libc::ENOSPC))
}

/// The session (getsid) of a process; its own pid if it is gone.
fn session_of(pid: u32) -> u32 {
    // SAFETY: getsid has no memory effects.
    let sid = unsafe { libc::getsid(pid as libc::pid_t) };
    if sid < 0 {
        pid
    } else {
        sid as u32
    }
}

fn slice_at(bytes: &[u8], offset: usize, size: usize) -> Vec<u8> {
    let start = offset.min(bytes.len());
    bytes[start..(start + size).min(bytes.len())].to_vec()
}

fn read_file_at(file: &File, offset: u64, size: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let mut filled = 0;
    while filled < size {
        let n = file.read_at(&mut buf[filled..], offset + filled as u64).map_err(|e| Error::io("reading blob", e))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(buf)
}

fn secs(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}
