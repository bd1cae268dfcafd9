//! Imports through the tree: `create` in a model directory starts an
//! upload; its `close()` commits the version (see the module header of
//! `fs`).

use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::store::{self, Archive, Imported, Store, Upload};

use super::handles::{Handle, Opened, Written};
use super::node::VERSION_FILES;
use super::{Attr, Caller, Fs, Node};
/// An import in progress (see the module header).
pub(super) struct Pending {
    pub(super) model: String,
    pub(super) file_name: String,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) perm: u16,
    /// The free space of the store when it began: no file can be larger.
    pub(super) free: u64,
    /// `--max-import-bytes`.
    pub(super) max: u64,
    /// The size at which `free` was last read.
    pub(super) checked: u64,
    /// `None` once committed or failed.
    pub(super) upload: Option<Upload>,
    /// What `/status` shows of it (it goes with the handle).
    pub(super) progress: Arc<Progress>,
    /// The process (thread group) that opened it: its close commits (see
    /// [`Fs::flush`]); `None` if `/proc` could not tell.
    pub(super) opener: Option<u32>,
}

/// An import in flight as `/status` shows it: read without the upload's
/// lock, so a long commit does not hold up `cat status`.
pub(crate) struct Progress {
    pub(super) path: String,
    pub(super) uid: u32,
    pub(super) since: Instant,
    pub(super) bytes: AtomicU64,
    pub(super) phase: Mutex<&'static str>,
}

impl Progress {
    pub(super) fn set(&self, phase: &'static str) {
        *self.phase.lock().unwrap() = phase;
    }

    pub(super) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path,
            "uid": self.uid,
            "bytes": self.bytes.load(Ordering::Relaxed),
            "phase": *self.phase.lock().unwrap(),
            "seconds": self.since.elapsed().as_secs(),
        })
    }
}

/// How long an imported file's name still resolves after the commit.
pub(super) const IMPORTED_NAME_GRACE: Duration = Duration::from_secs(10);

impl Fs {
    /// The version a file just imported under `name` went to, within the
    /// grace period.
    pub(super) fn recently_imported(&self, model: &str, name: &str) -> Option<u32> {
        let mut imported = self.imported.lock().unwrap();
        imported.retain(|_, (_, at)| at.elapsed() < IMPORTED_NAME_GRACE);
        imported.get(&(model.to_string(), name.to_string())).map(|(n, _)| *n)
    }

    /// Starts copying a model file into `models/<name>/`.
    pub fn create(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> Result<(Attr, Opened)> {
        let model = match self.node(parent)? {
            Node::Model(model) => model,
            node @ (Node::Version { .. } | Node::VersionDir { .. } | Node::Blobs) => {
                return Err(Error::ReadOnly(self.describe(&node)))
            }
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
        let fh = match file_name.strip_suffix(".minisig").filter(|t| !t.is_empty()) {
            // A signature for the import of <file> that is to follow.
            Some(target) => {
                let kind = Written::Signature(target.to_string(), caller.uid);
                let signature = Handle::Text(kind, model, Mutex::new(None));
                self.add_handle(signature)
            }
            None => self.start_upload(model, file_name, mode, caller)?,
        };
        let attr = self.attr(&Node::Upload(fh))?;
        Ok((attr, Opened { fh, direct_io: false, keep_cache: false, stream: false, no_flush: false }))
    }

    /// A new upload of `file_name` into a model; returns its handle.
    pub(super) fn start_upload(&self, model: String, file_name: &str, mode: u32, caller: Caller) -> Result<u64> {
        // An archive's backend is known once its members are.
        if Archive::of(file_name).is_none() {
            self.backends.for_files(&[file_name])?;
        }
        let progress = Arc::new(Progress {
            path: format!("models/{model}/{file_name}"),
            uid: caller.uid,
            since: Instant::now(),
            bytes: AtomicU64::new(0),
            phase: Mutex::new("receiving"),
        });
        let mut in_flight = self.in_flight.lock().unwrap();
        in_flight.retain(|p| p.strong_count() > 0);
        in_flight.push(Arc::downgrade(&progress));
        drop(in_flight);
        let pending = Pending {
            progress,
            opener: process_of(caller.pid),
            model,
            file_name: file_name.to_string(),
            uid: caller.uid,
            gid: caller.gid,
            perm: (mode & 0o777) as u16,
            free: self.store.free_bytes(),
            max: self.config.max_import_bytes,
            checked: 0,
            upload: Some(self.store.begin_upload()?),
        };
        Ok(self.add_handle(Handle::Upload(Mutex::new(pending))))
    }

    pub(super) fn commit(&self, p: &mut Pending) -> Result<()> {
        let upload = p.upload.take().expect("caller checked");
        let bytes = upload.len();
        let file_name = p.file_name.clone();
        let signature = self.signatures.lock().unwrap().remove(&(p.model.clone(), file_name.clone(), p.uid));
        let signature = signature.filter(|(_, at)| at.elapsed() < SIGNATURE_WAIT).map(|(s, _)| s);
        let files = match Archive::of(&file_name) {
            Some(kind) => {
                p.progress.set("unpacking");
                let members =
                    self.store.unpack(&p.path(), &upload, kind, p.max).inspect_err(|_| p.progress.set("failed"))?;
                drop(upload); // the archive itself is not kept
                members
            }
            None => vec![(file_name.clone(), upload)],
        };
        p.progress.set("hashing, checking, syncing");
        let inspect = |files: &_| self.backends.inspect(files);
        let imported = self.store.import(&p.model, files, signature.as_deref(), inspect);
        p.progress.set(if imported.is_ok() { "committed" } else { "failed" });
        let imported = imported?;
        let (number, what) = match imported {
            Imported::New(n) => (n, "imported new version"),
            Imported::Existing(n) => (n, "content identical to an existing version; no new version"),
        };
        tracing::info!(model = %p.model, version = number, file = %file_name, bytes, "{what}");
        self.imported.lock().unwrap().insert((p.model.clone(), file_name), (number, Instant::now()));
        Ok(())
    }

    /// Keeps `<target>.minisig`, just written by `uid`, for that user's
    /// import of `target` into `model` (see [`crate::store::Trust`]) that
    /// follows within [`SIGNATURE_WAIT`]; it is used up by that import.
    pub(super) fn hold_signature(&self, model: &str, target: &str, uid: u32, signature: Vec<u8>) {
        let mut held = self.signatures.lock().unwrap();
        held.retain(|_, (_, at)| at.elapsed() < SIGNATURE_WAIT);
        held.insert((model.to_string(), target.to_string(), uid), (signature, Instant::now()));
        tracing::info!(model, file = target, "signature held for the import to come");
    }
}

/// The process (thread group id) of thread `tid`, as FUSE names callers by
/// thread: a program may open a file on one thread and close it on another.
pub(super) fn process_of(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

/// A signature copied in for (model, file), and when: see
/// [`Fs::hold_signature`].
pub(super) type HeldSignature = (Vec<u8>, Instant);

/// How long a signature copied in waits for its file.
pub(super) const SIGNATURE_WAIT: Duration = Duration::from_secs(600);

impl Pending {
    fn path(&self) -> String {
        format!("models/{}/{}", self.model, self.file_name)
    }

    /// Whether the upload may reach `end` bytes: its size, counted up to
    /// its last byte (a sparse file counts as big as it claims), within
    /// `--max-import-bytes` (EFBIG) and the store's free space (ENOSPC).
    /// The free space is read again every 64 MiB of growth: uploads side
    /// by side each find what the others left.
    pub(super) fn room_for(&mut self, end: u64, store: &Store) -> Result<()> {
        if end > self.max {
            return Err(Error::ImportTooBig { path: self.path(), limit: self.max });
        }
        if end > self.checked.saturating_add(64 << 20) || end > self.free {
            let len = self.upload.as_ref().map_or(0, |u| u.len());
            self.free = store.free_bytes().saturating_add(len);
            self.checked = end;
        }
        if end > self.free {
            let context = format!("{}: larger than the store's free space ({} bytes)", self.path(), self.free);
            return Err(Error::io(context, std::io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        Ok(())
    }
}
