//! The aifs tree and its semantics, as plain Rust: no FUSE types here, so
//! every rule is testable without a kernel (see `tests/fs.rs`). [`Fs`] is
//! built from its parts (a store, an engine, the backends) and answers
//! the operations the FUSE adapter forwards; this file holds the
//! operations that dispatch on what a node or handle is.
//!
//! | file | owns |
//! |---|---|
//! | `node.rs` | [`Node`]: what a path is, and its path for messages |
//! | `inodes.rs` | inode numbers for nodes |
//! | `handles.rs` | open files and their bytes |
//! | `tree.rs` | names, listings, attributes, generated files |
//! | `models.rs` | mkdir/rmdir, versions' removal, aliases, chmod/chown |
//! | `upload.rs` | imports: create, write, commit at close |
//! | `infer.rs` | `infer` handles and sessions |
//! | `jobs.rs` | `jobs/<id>/` |
//! | `status.rs` | `status` and `README` |
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
//! **Imports.** `create` in `models/<name>/` starts an [`Upload`](crate::store::Upload): a temp
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

mod handles;
mod heavy;
mod infer;
mod inodes;
mod jobs;
mod models;
mod node;
mod status;
pub use status::node_entry;
mod tree;
mod upload;

pub use handles::Opened;
pub use models::SetAttr;
pub use node::Kind;
use node::{JobFile, Node, VersionFile};
pub use tree::{Attr, DirEntry};

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime};

use crate::backend::Backends;
use crate::codec;
use crate::engine::{Engine, Status};
use crate::error::{Error, Result};
use crate::store::{self, Store};

use handles::{read_answer, read_file_at, read_in_order, slice_at, write_into, Handle, Written};
use heavy::{decode_work, Heavy, Work};
use infer::{session_of, InferStream, Session, SessionKey};
use inodes::Inodes;
use jobs::JobInput;
use upload::HeldSignature;
pub const ROOT_INO: u64 = 1;

/// Who is asking: from the FUSE request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
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

pub struct Fs {
    store: Arc<Store>,
    engine: Arc<Engine>,
    backends: Backends,
    /// The requests of each (version, session, uid): what `cat infer`
    /// reads. Weak: a job retired from `jobs/` is gone here too.
    sessions: Mutex<HashMap<SessionKey, Session>>,
    /// The next input's stamp (see [`Session`]).
    stamps: AtomicU64,
    /// Signatures copied in for imports to come.
    signatures: Mutex<HashMap<(String, String, u32), HeldSignature>>,
    /// Files just imported: (model, name) -> (version, when).
    imported: Mutex<HashMap<(String, String), (u32, Instant)>>,
    /// Imports in flight, for `/status` (gone with their handles).
    in_flight: Mutex<Vec<Weak<upload::Progress>>>,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    config: FsConfig,
    /// Owner of the daemon's own nodes (root, README, ...).
    uid: u32,
    gid: u32,
    started: SystemTime,
    started_at: Instant,
    /// Where large requests decode, and where imports commit (see `heavy.rs`).
    heavy: Heavy,
    imports: Heavy,
    /// Itself, for the work handed to `heavy`.
    me: Weak<Fs>,
}

/// The tree's own settings.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// Where it is mounted: only for the README's copy-paste examples.
    pub mountpoint: PathBuf,
    /// The largest model file an import takes (EFBIG past it); a sparse
    /// file counts as big as it claims.
    pub max_import_bytes: u64,
    /// The watched repositories, for `/status`.
    pub repositories: Option<Arc<crate::repository::Repositories>>,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig { mountpoint: PathBuf::from("/mnt/aifs"), max_import_bytes: 64 << 30, repositories: None }
    }
}

impl Fs {
    /// The tree over a store, with jobs run by `engine` and imports checked
    /// by `backends`.
    pub fn new(store: Arc<Store>, engine: Arc<Engine>, backends: Backends, config: FsConfig) -> Arc<Fs> {
        let mut inodes = Inodes { next: ROOT_INO + 1, ..Default::default() };
        inodes.by_node.insert(Node::Root, ROOT_INO);
        inodes.by_ino.insert(ROOT_INO, Node::Root);
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let heavy = Heavy::start("requests", std::thread::available_parallelism().map_or(2, |n| n.get().max(2)));
        let imports = Heavy::start("imports", 2);
        Arc::new_cyclic(|me| Fs {
            engine,
            store,
            backends,
            sessions: Mutex::new(HashMap::new()),
            stamps: AtomicU64::new(1),
            imported: Mutex::new(HashMap::new()),
            in_flight: Mutex::default(),
            signatures: Mutex::new(HashMap::new()),
            inodes: Mutex::new(inodes),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            config,
            uid,
            gid,
            started: SystemTime::now(),
            started_at: Instant::now(),
            heavy,
            imports,
            me: me.clone(),
        })
    }

    /// Runs `work` where `how` says (see `heavy.rs`), and calls `done`
    /// with its result.
    fn run<T: 'static>(
        &self,
        how: Work,
        work: impl FnOnce(&Fs) -> T + Send + 'static,
        done: impl FnOnce(T) + Send + 'static,
    ) {
        let pool = match how {
            Work::Here => return done(work(self)),
            Work::Request => &self.heavy,
            Work::Import => &self.imports,
        };
        let me = self.me.upgrade().expect("a filesystem serving requests is alive");
        pool.run(move || done(work(&me)));
    }

    pub fn store(&self) -> &Store {
        &self.store
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
                    Node::Model(_)
                    | Node::Version { .. }
                    | Node::VersionDir { .. }
                    | Node::Device(_)
                    | Node::Job(_) => Kind::Dir,
                    _ => Kind::File,
                },
                name,
            })
            .collect())
    }

    pub fn open(&self, ino: u64, flags: i32, caller: Caller) -> Result<Opened> {
        let node = self.node(ino)?;
        let writing = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        let generated = |handle: Handle| (handle, true, false);
        let (handle, direct_io, keep_cache) = match &node {
            Node::VersionFile { .. } | Node::Blob(_) | Node::Clone { .. } | Node::LastError { .. } if writing => {
                return Err(Error::ReadOnly(self.describe(&node)))
            }
            Node::Config(model) | Node::Trust(model) if writing => {
                self.store.model(model)?;
                let kind = if matches!(node, Node::Config(_)) { Written::Config } else { Written::Trust };
                (Handle::Text(kind, model.clone(), Mutex::new(None)), true, false)
            }
            Node::Readme | Node::Status | Node::ModelStatus(_) | Node::Metrics | Node::DeviceFile { .. } if writing => {
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
            | Node::ModelStatus(_)
            | Node::Metrics
            | Node::Config(_)
            | Node::Trust(_)
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
                    sent_here: false,
                    reading: false,
                };
                let fh = self.add_handle(Handle::Infer(Mutex::new(stream)));
                return Ok(Opened { fh, direct_io: true, keep_cache: false, stream: true, no_flush });
            }
            Node::LastError { model, number } => {
                self.version(model, *number)?;
                (Handle::Stream(self.last_error(model, *number, caller)?.into_bytes(), Mutex::new(0)), true, false)
            }
            Node::Clone { model, number } => {
                let job = self.engine.create_job(caller.uid, caller.gid, model, *number)?;
                tracing::debug!(job = job.id, model = %model, version = number, "cloned a new job");
                (Handle::Stream(format!("{}\n", job.id).into_bytes(), Mutex::new(0)), true, false)
            }
            Node::JobFile(id, file) => {
                let job = self.job(*id)?;
                match file {
                    JobFile::Input if writing => {
                        if job.status() != Status::New {
                            return Err(Error::ReadOnly(format!("jobs/{id}/input: already submitted")));
                        }
                        generated(Handle::JobInput(Mutex::new(JobInput {
                            job,
                            input: Vec::new(),
                            written: false,
                            received: 0,
                        })))
                    }
                    JobFile::Input => generated(Handle::Content(job.snapshot().input.to_vec())),
                    JobFile::Output if writing => return Err(Error::ReadOnly(format!("jobs/{id}/output"))),
                    JobFile::Output => generated(Handle::JobOutput(job, Mutex::new(0))),
                    JobFile::Priority | JobFile::Ctl if writing => generated(Handle::JobCommand(job, *file, caller)),
                    JobFile::Ctl => generated(Handle::Content(Vec::new())),
                    _ if writing => return Err(Error::AccessDenied(format!("jobs/{id}/{}", file.name()))),
                    _ => generated(Handle::Content(self.content(&node)?)),
                }
            }
            Node::Upload(_) => return Err(Error::Busy(format!("{}: being copied in", self.describe(&node)))),
            Node::Link { .. } => return Err(Error::InvalidArgument("cannot open a symlink".into())),
            _ => return Err(Error::IsDir(self.describe(&node))),
        };
        let stream = matches!(handle, Handle::Stream(..) | Handle::JobOutput(..));
        let fh = self.add_handle(handle);
        Ok(Opened { fh, direct_io, keep_cache, stream, no_flush: !writing })
    }

    /// Reads from an open file and calls `done` with the bytes. Most reads
    /// answer at once; reads of a response (`infer`, `jobs/<id>/output`)
    /// answer when the job ends, from the thread that ends it: no thread
    /// waits meanwhile. `done` says whether the reader got the bytes (not
    /// when a signal ended its wait first): only then is the response
    /// consumed.
    pub fn read(&self, fh: u64, offset: u64, size: u32, done: impl FnOnce(Result<Vec<u8>>) -> bool + Send + 'static) {
        let handle = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => {
                done(Err(e));
                return;
            }
        };
        let size = size as usize;
        match &*handle {
            Handle::Content(bytes) => {
                done(Ok(slice_at(bytes, offset as usize, size)));
            }
            Handle::Stream(bytes, pos) => {
                read_in_order(pos, bytes, size, done);
            }
            Handle::Blob(file) => {
                done(read_file_at(file, offset, size));
            }
            // A job with no input yet has nothing to wait for: a tree walker
            // (`grep -r`) that read `clone` must not block here.
            Handle::JobOutput(job, _) if job.status() == Status::New => {
                done(Err(Error::NoInput(job.id)));
            }
            Handle::JobOutput(job, _) => {
                read_answer(job.clone(), handle.clone(), size, done);
            }
            Handle::Infer(stream) => {
                // The first read of a written request sends it: decoding a
                // large one is not for a FUSE thread.
                let how = {
                    let st = stream.lock().unwrap();
                    if st.job.is_some() {
                        Work::Here
                    } else {
                        decode_work(&st.input)
                    }
                };
                let handle = handle.clone();
                self.run(how, move |fs| fs.read_infer(handle, size, how == Work::Here, done), |()| ());
            }
            Handle::Upload(_) | Handle::Text(..) | Handle::JobInput(_) | Handle::JobCommand(..) => {
                done(Err(Error::BadHandle(fh)));
            }
        }
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let limit = self.engine.config().max_input_bytes;
        let handle = self.handle(fh)?;
        match &*handle {
            Handle::Upload(_) => self.with_pending(fh, |p| {
                if p.upload.is_none() {
                    return Err(Error::InvalidArgument(format!(
                        "models/{}/{}: already committed; open it again to make another version",
                        p.model, p.file_name
                    )));
                }
                p.room_for(offset.saturating_add(data.len() as u64), &self.store)?;
                let upload = p.upload.as_mut().expect("checked above");
                upload.write_at(offset, data)?;
                p.progress.bytes.store(upload.len(), std::sync::atomic::Ordering::Relaxed);
                Ok(())
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
                let what = format!("jobs/{}/input", w.job.id);
                let received = w.received + data.len() as u64;
                if let Err(e) = write_into(&mut w.input, offset, data, limit, received, &what) {
                    self.engine.fail(&w.job, &e);
                    return Err(e);
                }
                w.received = received;
                w.written = true;
            }
            Handle::JobCommand(job, file, caller) => self.job_command(job, *file, *caller, data)?,
            Handle::Text(kind, model, text) => {
                let what = format!("models/{model}: {}", kind.name());
                // Its limit (at most 1 MiB) bounds it: no write window to keep.
                let received = 0;
                write_into(
                    text.lock().unwrap().get_or_insert_with(Vec::new),
                    offset,
                    data,
                    kind.limit(),
                    received,
                    &what,
                )?
            }
            Handle::Content(_) | Handle::Stream(..) | Handle::Blob(_) | Handle::JobOutput(..) => {
                return Err(Error::BadHandle(fh))
            }
        }
        Ok(data.len() as u32)
    }

    /// `close()` by thread `pid`: commits an upload, or sends a written
    /// request (see the module header). Errors reach the caller's
    /// `close()`. An upload commits only at a close by the process that
    /// opened it: a child that inherited the descriptor (`dd >&3` in a
    /// shell that holds `3>`, any fork) closes its copy while the owner
    /// may still write; the last close (release) commits in any case.
    pub fn flush(&self, fh: u64, pid: u32, done: impl FnOnce(Result<()>) + Send + 'static) {
        match self.handle(fh) {
            Ok(handle) => {
                if let Handle::Upload(pending) = &*handle {
                    let opener = pending.lock().unwrap().opener;
                    if let (Some(opener), Some(closer)) = (opener, upload::process_of(pid)) {
                        if opener != closer {
                            return done(Ok(()));
                        }
                    }
                }
                self.run(handle.close_work(), move |fs| fs.finish_writes(&handle), done)
            }
            Err(e) => done(Err(e)),
        }
    }

    fn finish_writes(&self, handle: &Handle) -> Result<()> {
        match handle {
            Handle::Text(kind, model, text) => {
                // Applied when closed after a write; an invalid one fails
                // the close() and changes nothing.
                let Some(text) = text.lock().unwrap().take() else { return Ok(()) };
                match kind {
                    Written::Config => self.store.set_config(model, store::ModelConfig::parse(&text)?)?,
                    Written::Trust => self.store.set_trust(model, store::Trust::parse(&text)?)?,
                    Written::Signature(target, uid) => {
                        self.hold_signature(model, target, *uid, text);
                        return Ok(());
                    }
                }
                tracing::info!(model = %model, "{} updated", kind.name());
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
    pub fn release(&self, fh: u64, done: impl FnOnce(Result<()>) + Send + 'static) {
        let Some(handle) = self.handles.lock().unwrap().remove(&fh) else {
            return done(Err(Error::BadHandle(fh)));
        };
        // An upload's (or a signature's) inode goes with its handle.
        let mut t = self.inodes.lock().unwrap();
        if let Some(ino) = t.by_node.remove(&Node::Upload(fh)) {
            t.by_ino.remove(&ino);
        }
        drop(t);
        if let Handle::Upload(pending) = &*handle {
            let p = pending.lock().unwrap();
            if p.upload.as_ref().is_some_and(|u| u.is_empty()) {
                tracing::info!("invalid model {:?}: empty file, discarded", p.file_name);
                return done(Ok(()));
            }
        }
        let how = handle.close_work();
        let work = move |fs: &Fs| {
            let result = fs.finish_writes(&handle);
            if let Handle::Infer(stream) = &*handle {
                let mut st = stream.lock().unwrap();
                // Sent or not, its input is no longer held for the session.
                fs.remember(&mut st, None);
                // A one-handle reader that gives up before the answer's
                // end (Ctrl-C on a generation) cancels its request: with
                // the handle unlocked, as a read interrupted meanwhile is
                // still waiting, and the cancel answers it.
                let abandoned = st.job.clone().filter(|j| st.sent_here && st.reading && !j.status().is_finished());
                drop(st);
                if let Some(job) = abandoned {
                    let _ = fs.engine.cancel(&job);
                }
            }
            result
        };
        self.run(how, work, done);
    }

    pub fn statfs(&self) -> Result<StatFs> {
        let s = self.store.statvfs().map_err(|e| Error::io("statfs", e))?;
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
}
