//! Watched model repositories (`--repository DIR`): Triton's layout,
//! `DIR/<name>/<N>/<files>`, kept in step with `models/<name>/vN`.
//!
//! Owns the scan of each repository, the watch that wakes it (inotify,
//! through `notify`), and what it knows of each version directory:
//! imported, waiting, or refused and why (`/status`, the log). Promises:
//!
//! - **Complete or not at all.** A version directory is imported only once
//!   nothing under it changed for the settle time and no process has a
//!   file under it open for writing (read from `/proc`), or as soon as it
//!   is moved into place (`mv DIR/.staging DIR/<name>/4`) and nothing under
//!   it is open for writing. The import is the mount's own: every file
//!   hashed into the store, checked by a backend, committed as `v<N>`
//!   ([`Store::import_at`]), or nothing.
//! - **Changes follow.** A new `<N>` is a new version; a removed `<N>` (or
//!   `<name>`) removes the versions the repository made, retried while an
//!   alias or a job holds one; `<name>/config.json` is the model's config.
//!   Files edited in an imported version leave the version as it is (it is
//!   immutable): that is reported, and a new `<N>` is the way to change it.
//! - **Nothing is followed out.** A symlink anywhere fails its version;
//!   hidden and editor files (`.*`, `*~`, `*.swp`) are ignored; names
//!   follow the mount's rules. A repository that vanishes or cannot be
//!   read is reported, and the versions it made are kept.
//! - **Restarts** rescan: content already imported is not imported again,
//!   and versions made through the mount keep their numbers (a repository
//!   `<N>` that collides with one is refused, and says so).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use notify::{EventKind, RecursiveMode, Watcher};

use crate::backend::Backends;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::store::{parse_version_name, validate_name, Imported, ModelConfig, Store, Upload};

/// How often every repository is scanned again with no event: retries of
/// removals that were refused, and anything a watch missed.
const RESCAN: Duration = Duration::from_secs(5);

/// How soon a version still open for writing is looked at again.
const WRITER_POLL: Duration = Duration::from_millis(250);

/// The watched repositories; dropping it stops the watch.
pub struct Repositories {
    shared: Arc<Shared>,
    tx: Mutex<Sender<Msg>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

enum Msg {
    /// Something changed (already noted in the state): look again after
    /// the settle time, or at once for a directory moved into place.
    Wake {
        now: bool,
    },
    Stop,
}

struct Shared {
    store: Arc<Store>,
    backends: Backends,
    engine: Arc<Engine>,
    /// Absolute paths, as given.
    roots: Vec<PathBuf>,
    settle: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Version directories by path: the files last seen, and whether they
    /// became the version.
    seen: HashMap<PathBuf, Seen>,
    /// Config files by path: the fingerprint last applied (or refused).
    configs: HashMap<PathBuf, Fingerprint>,
    /// The last event under each version directory.
    changed: HashMap<PathBuf, Instant>,
    /// Version directories moved into place, not yet imported.
    moved_in: HashSet<PathBuf>,
    /// What is wrong, by path: the reason, one line.
    problems: BTreeMap<PathBuf, String>,
    /// Version directories waiting to settle or for a writer.
    waiting: BTreeMap<PathBuf, &'static str>,
}

struct Seen {
    files: Fingerprint,
    imported: bool,
}

/// A directory's files: (path inside it, size, mtime), sorted.
type Fingerprint = Vec<(String, u64, SystemTime)>;

impl Repositories {
    /// Watches the repositories on a thread of its own, which first scans
    /// them all (importing what is complete).
    pub fn start(
        roots: Vec<PathBuf>,
        settle: Duration,
        store: Arc<Store>,
        backends: Backends,
        engine: Arc<Engine>,
    ) -> Result<Repositories> {
        let roots = roots
            .into_iter()
            .map(|r| std::path::absolute(&r).map_err(|e| Error::io(r.display().to_string(), e)))
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared { store, backends, engine, roots, settle, state: Mutex::default() });
        let (tx, rx) = channel();
        let events = tx.clone();
        let noted = shared.clone();
        // Changes are noted here, as they happen, not when the scanning
        // thread gets to them: a long import must not make a copy that
        // went on meanwhile look quiet.
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
            let moved_to = match event.kind {
                // Reading changes nothing (and the scan itself reads).
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => None,
                EventKind::Access(_) => return,
                EventKind::Modify(ModifyKind::Name(RenameMode::To)) => event.paths.first(),
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => event.paths.get(1),
                _ => None,
            };
            for path in &event.paths {
                noted.note(path, Some(path) == moved_to);
            }
            let _ = events.send(Msg::Wake { now: moved_to.is_some() });
        })
        .map_err(|e| Error::Internal(format!("watching repositories: {e}")))?;
        let mut watched: HashSet<PathBuf> = HashSet::new();
        let mut watch = move |shared: &Shared, watched: &mut HashSet<PathBuf>| {
            for root in &shared.roots {
                if !watched.contains(root) && watcher.watch(root, RecursiveMode::Recursive).is_ok() {
                    watched.insert(root.clone());
                }
            }
        };
        watch(&shared, &mut watched);
        // The first scan runs on the thread: versions already imported are
        // in the catalog, and the mount need not wait to check them.
        let mut next = Instant::now();
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("repository".into())
            .spawn(move || loop {
                // A stream of events must not keep a due pass from running.
                if Instant::now() >= next {
                    watch(&worker, &mut watched); // a repository that appeared
                    next = Instant::now() + worker.guarded_pass();
                }
                match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                    Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                    Ok(Msg::Wake { now: true }) => next = Instant::now(),
                    Ok(Msg::Wake { now: false }) => next = next.min(Instant::now() + worker.settle),
                    Err(RecvTimeoutError::Timeout) => {}
                }
            })
            .map_err(|e| Error::Internal(format!("starting the repository thread: {e}")))?;
        Ok(Repositories { shared, tx: Mutex::new(tx), thread: Mutex::new(Some(thread)) })
    }

    /// For `/status`: each repository, what waits, and what is wrong.
    pub fn status(&self) -> serde_json::Value {
        let st = self.shared.state.lock().unwrap();
        let under = |root: &Path, map: &BTreeMap<PathBuf, String>| -> Vec<serde_json::Value> {
            map.iter()
                .filter(|(p, _)| p.starts_with(root))
                .map(|(p, why)| serde_json::json!({ "path": p, "reason": why }))
                .collect()
        };
        let waiting: BTreeMap<PathBuf, String> = st.waiting.iter().map(|(p, w)| (p.clone(), w.to_string())).collect();
        self.shared
            .roots
            .iter()
            .map(|root| {
                let imported = st.seen.iter().filter(|(p, s)| p.starts_with(root) && s.imported).count();
                serde_json::json!({
                    "path": root,
                    "imported": imported,
                    "waiting": under(root, &waiting),
                    "problems": under(root, &st.problems),
                })
            })
            .collect()
    }
}

impl std::fmt::Debug for Repositories {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repositories").field("roots", &self.shared.roots).finish()
    }
}

impl Repositories {
    /// Stops watching, after the import in progress, if any.
    pub fn stop(&self) {
        let _ = self.tx.lock().unwrap().send(Msg::Stop);
        if let Some(thread) = self.thread.lock().unwrap().take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Repositories {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    /// Notes an event at `path`: the version directory it is under changed
    /// (or, `moved`, was moved into place).
    fn note(&self, path: &Path, moved: bool) {
        let Some(dir) = self.version_dir_of(path) else { return };
        let mut st = self.state.lock().unwrap();
        if moved && dir == path {
            st.moved_in.insert(dir);
        } else {
            st.changed.insert(dir, Instant::now());
        }
    }

    /// `root/<name>/<N>` for a path at or under it.
    fn version_dir_of(&self, path: &Path) -> Option<PathBuf> {
        let root = self.roots.iter().find(|r| path.starts_with(r))?;
        let mut parts = path.strip_prefix(root).ok()?.components();
        let (name, number) = (parts.next()?, parts.next()?);
        Some(root.join(name).join(number))
    }

    /// [`Shared::pass`], with a panic (a bug, or a library's on odd input)
    /// logged and the watch kept alive.
    fn guarded_pass(&self) -> Duration {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.pass())).unwrap_or_else(|_| {
            tracing::error!("a repository scan panicked; scanning again in {RESCAN:?}");
            RESCAN
        })
    }

    /// Brings every repository in step; returns how soon to look again.
    fn pass(&self) -> Duration {
        let mut soonest = RESCAN;
        for root in &self.roots {
            soonest = soonest.min(self.pass_root(root));
        }
        // What was said of paths that are gone no longer holds, but for
        // versions whose removal waits.
        let origins: HashSet<PathBuf> = self
            .store
            .models()
            .iter()
            .flat_map(|m| m.versions.values().filter_map(|v| v.origin.as_ref().map(PathBuf::from)).collect::<Vec<_>>())
            .collect();
        let mut st = self.state.lock().unwrap();
        st.problems.retain(|path, _| path.exists() || self.roots.contains(path) || origins.contains(path));
        st.waiting.retain(|path, _| path.exists());
        st.seen.retain(|path, seen| seen.imported || path.exists());
        st.moved_in.retain(|path| path.exists());
        st.changed.retain(|path, _| path.exists());
        soonest
    }

    /// Returns how soon to look again (a version waits to settle).
    fn pass_root(&self, root: &Path) -> Duration {
        let entries = match fs::read_dir(root) {
            Ok(entries) => entries,
            Err(e) => {
                // Perhaps an unmounted disk: report, and keep its versions.
                self.problem(root, format!("cannot read the repository: {e}; its versions are kept"));
                return RESCAN;
            }
        };
        self.solved(root);
        let mut soonest = RESCAN;
        let mut names = HashSet::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if ignored(&name) || !entry.file_type().is_ok_and(|t| t.is_dir() || t.is_symlink()) {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                self.problem(&path, "a symlink: not followed out of the repository".into());
                continue;
            }
            if let Err(e) = validate_name(name.as_bytes()) {
                self.problem(&path, format!("not a model name: {e}"));
                continue;
            }
            names.insert(name.clone());
            soonest = soonest.min(self.pass_model(&name, &path));
        }
        // Models whose directory is gone: their repository versions go too.
        for model in self.store.models() {
            if !names.contains(&model.name) {
                self.remove_gone(&model.name, &root.join(&model.name));
            }
        }
        soonest
    }

    fn pass_model(&self, name: &str, dir: &Path) -> Duration {
        self.solved(dir);
        let config = dir.join("config.json");
        match fs::symlink_metadata(&config) {
            Ok(meta) if meta.is_file() => self.apply_config(name, &config),
            Ok(_) => self.problem(&config, "not a regular file (symlinks are not followed)".into()),
            Err(_) => {}
        }
        let mut soonest = RESCAN;
        let Ok(entries) = fs::read_dir(dir) else { return RESCAN };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if ignored(&file) || file == "config.json" {
                continue;
            }
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            match parse_version_name(&format!("v{file}")).filter(|_| is_dir) {
                Some(number) => {
                    soonest = soonest.min(self.pass_version(name, number, &path).unwrap_or(RESCAN));
                }
                None if is_dir => self.problem(&path, "not a version number (1, 2, ...): ignored".into()),
                None => {} // other files beside the versions (Triton's config.pbtxt...)
            }
        }
        self.remove_gone(name, dir);
        soonest
    }

    /// Imports `dir` as `v<number>` of `model` if it is complete and new.
    fn pass_version(&self, model: &str, number: u32, dir: &Path) -> Option<Duration> {
        let files = match fingerprint(dir) {
            Ok(files) => files,
            Err(why) => {
                self.wait(dir, None);
                self.problem(dir, why);
                return None;
            }
        };
        let mut st = self.state.lock().unwrap();
        if let Some(seen) = st.seen.get(dir) {
            if seen.files == files {
                return None;
            }
            if seen.imported {
                drop(st);
                self.problem(
                    dir,
                    format!(
                        "edited after it became models/{model}/v{number}, which keeps its files (versions are \
                         immutable): put the new files in a new version directory"
                    ),
                );
                return None;
            }
        }
        if files.is_empty() {
            st.waiting.insert(dir.to_path_buf(), "empty");
            return None;
        }
        let moved = st.moved_in.contains(dir);
        let last_event = st.changed.get(dir).copied();
        drop(st);
        if !moved {
            // Quiet: no event and no file modified within the settle time.
            let newest = files.iter().map(|f| f.2).max().unwrap_or(SystemTime::UNIX_EPOCH);
            // A clock ahead of ours (a future mtime) says nothing: events decide.
            let since_mtime = newest.elapsed().unwrap_or(Duration::MAX);
            let since_event = last_event.map_or(Duration::MAX, |t| t.elapsed());
            let quiet = since_mtime.min(since_event);
            if quiet < self.settle {
                self.wait(dir, Some("settling"));
                return Some(self.settle - quiet);
            }
        }
        if open_for_writing(dir) {
            self.wait(dir, Some("open for writing"));
            return Some(WRITER_POLL);
        }
        self.wait(dir, None);
        let result = match self.import(model, number, dir, &files) {
            Ok(Some(imported)) => Ok(imported),
            Ok(None) => {
                self.wait(dir, Some("changed while being copied in"));
                return Some(self.settle);
            }
            Err(e) => Err(e),
        };
        let mut st = self.state.lock().unwrap();
        st.moved_in.remove(dir);
        st.changed.remove(dir);
        st.seen.insert(dir.to_path_buf(), Seen { files, imported: result.is_ok() });
        drop(st);
        match result {
            Ok(Imported::New(n)) => {
                tracing::info!(model, version = n, from = %dir.display(), "imported from the repository");
                self.solved(dir);
            }
            Ok(Imported::Existing(_)) => self.solved(dir),
            Err(e) => {
                tracing::warn!(model, from = %dir.display(), "not imported: {e}");
                self.problem(dir, e.to_string());
            }
        }
        None
    }

    /// Imports `dir`'s `files` as `v<number>`; `None` if they changed while
    /// being copied in (the caller waits, and tries again).
    fn import(&self, model: &str, number: u32, dir: &Path, files: &Fingerprint) -> Result<Option<Imported>> {
        let origin = dir.display().to_string();
        // After a restart: the same files as the version they made are
        // recognized by hashing in place, with no copy and no load.
        if let Some(v) = self.store.model(model).ok().and_then(|m| m.versions.get(&number).cloned()) {
            if v.origin.as_deref() == Some(origin.as_str()) && v.files.len() == files.len() {
                let same = files.iter().all(|(path, _, _)| {
                    let digest = self.open_in_repository(&dir.join(path)).and_then(crate::store::Digest::of_reader);
                    v.files.get(path).is_some_and(|d| digest.ok() == Some(*d))
                });
                if same {
                    return Ok(Some(Imported::Existing(number)));
                }
            }
        }
        let created = self.ensure_model(model)?;
        let imported = self.copy_and_import(model, number, dir, files, &origin);
        if created && !matches!(imported, Ok(Some(_))) {
            let _ = self.store.remove_model(model); // only if still empty
        }
        imported
    }

    fn copy_and_import(
        &self,
        model: &str,
        number: u32,
        dir: &Path,
        files: &Fingerprint,
        origin: &str,
    ) -> Result<Option<Imported>> {
        let mut uploads = Vec::new();
        for (path, len, _) in files {
            match self.copy_in(&dir.join(path), *len)? {
                Some(upload) => uploads.push((path.clone(), upload)),
                None => return Ok(None),
            }
        }
        if fingerprint(dir).ok().as_ref() != Some(files) {
            return Ok(None);
        }
        self.store.import_at(model, number, origin, uploads, |files| self.backends.inspect(files)).map(Some)
    }

    /// A file's bytes into an upload (within the store's free space);
    /// `None` if it is no longer the regular file of `len` bytes the scan
    /// saw. Opened without following a symlink, and without blocking on a
    /// FIFO put in its place since.
    fn copy_in(&self, path: &Path, len: u64) -> Result<Option<Upload>> {
        let io = |e| Error::io(path.display().to_string(), e);
        let mut file = match self.open_in_repository(path) {
            Ok(file) => file,
            // A symlink or a path that leaves the repository now: the scan
            // that follows says which.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOENT | libc::ENXIO | libc::EXDEV)) => {
                return Ok(None)
            }
            Err(e) => return Err(io(e)),
        };
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() || meta.len() != len {
            return Ok(None);
        }
        if len > self.store.free_bytes() {
            let context = format!("{}: larger than the store's free space", path.display());
            return Err(Error::io(context, std::io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        let mut upload = self.store.begin_upload()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                return Ok(Some(upload));
            }
            upload.write_at(at, &buf[..n])?;
            at += n as u64;
        }
    }

    /// Makes `models/<model>` (the daemon's, mode 0755) if it is not there;
    /// returns whether it did.
    fn ensure_model(&self, model: &str) -> Result<bool> {
        if self.store.model(model).is_ok() {
            return Ok(false);
        }
        // SAFETY: plain calls with no arguments.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        match self.store.create_model(model, uid, gid, 0o755) {
            Ok(_) => Ok(true),
            Err(Error::Exists(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A file under one of the repositories, opened by [`open_beneath`].
    fn open_in_repository(&self, path: &Path) -> std::io::Result<fs::File> {
        let root = self.roots.iter().find(|r| path.starts_with(r)).ok_or(std::io::ErrorKind::NotFound)?;
        open_beneath(root, path.strip_prefix(root).expect("under its root"))
    }

    /// `<name>/config.json`, applied when it changed.
    fn apply_config(&self, model: &str, path: &Path) {
        let Ok(meta) = fs::metadata(path) else { return };
        let print = vec![(String::new(), meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH))];
        if self.state.lock().unwrap().configs.get(path) == Some(&print) {
            return;
        }
        let mut text = Vec::new();
        let applied = self
            .open_in_repository(path)
            .and_then(|mut f| f.read_to_end(&mut text))
            .map_err(|e| Error::io(path.display().to_string(), e))
            .and_then(|_| ModelConfig::parse(&text))
            .and_then(|config| {
                self.ensure_model(model)?;
                self.store.set_config(model, config)
            });
        self.state.lock().unwrap().configs.insert(path.to_path_buf(), print);
        match applied {
            Ok(()) => {
                tracing::info!(model, "config.json from the repository applied");
                self.solved(path);
            }
            Err(e) => {
                tracing::warn!(model, "config.json from the repository not applied: {e}");
                self.problem(path, e.to_string());
            }
        }
    }

    /// Removes the versions of `model` that came from under `dir` and whose
    /// directory is gone; one in use stays, and is tried again later.
    fn remove_gone(&self, model: &str, dir: &Path) {
        let Ok(m) = self.store.model(model) else { return };
        let mut removed_any = false;
        for v in m.versions.values() {
            let Some(origin) = v.origin.as_deref().map(Path::new) else { continue };
            if !origin.starts_with(dir) || origin.exists() {
                continue;
            }
            let removed = match self.engine.active_jobs(model, v.number).as_slice() {
                [] => self.store.delete_version(model, v.number),
                ids => Err(Error::Busy(format!("models/{model}/v{}: in use by job {ids:?}", v.number))),
            };
            let mut st = self.state.lock().unwrap();
            match removed {
                Ok(()) => {
                    self.engine.abandon_new_jobs(model, v.number);
                    removed_any = true;
                    st.seen.remove(origin);
                    st.problems.remove(origin);
                    tracing::info!(model, version = v.number, "removed: its repository directory is gone");
                }
                Err(e) => {
                    st.problems.insert(origin.to_path_buf(), format!("removed from the repository; {e}; retried"));
                }
            }
        }
        // A model the repository emptied goes with its directory.
        if removed_any && !dir.exists() && self.store.model(model).is_ok_and(|m| m.versions.is_empty()) {
            let _ = self.store.remove_model(model);
        }
    }

    fn problem(&self, path: &Path, why: String) {
        let why = crate::error::one_line(&why);
        let mut st = self.state.lock().unwrap();
        if st.problems.get(path) != Some(&why) {
            tracing::warn!(path = %path.display(), "repository: {why}");
            st.problems.insert(path.to_path_buf(), why);
        }
    }

    fn solved(&self, path: &Path) {
        self.state.lock().unwrap().problems.remove(path);
    }

    fn wait(&self, dir: &Path, why: Option<&'static str>) {
        let mut st = self.state.lock().unwrap();
        match why {
            Some(why) => st.waiting.insert(dir.to_path_buf(), why),
            None => st.waiting.remove(dir),
        };
    }
}

/// Opens `rel` (`<name>/<N>/<path>`) under the repository `root` for
/// reading: no symlink in any component and nothing outside `root`
/// (openat2's RESOLVE_NO_SYMLINKS and RESOLVE_BENEATH, so a directory
/// swapped for a link after the scan leads nowhere), and no blocking on a
/// FIFO swapped in for a file.
fn open_beneath(root: &Path, rel: &Path) -> std::io::Result<fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    let dir = fs::File::open(root)?;
    let rel = std::ffi::CString::new(rel.as_os_str().as_bytes())?;
    // SAFETY: open_how is plain integers, for which all zeros is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: openat2 reads the path and the open_how struct (of the size
    // given) and keeps neither; `dir` stays open for the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat2, dir.as_raw_fd(), rel.as_ptr(), &how, std::mem::size_of::<libc::open_how>())
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor openat2 just returned, owned by nothing else.
    Ok(unsafe { fs::File::from_raw_fd(fd as i32) })
}

/// Hidden and editor files, which are never part of a model.
fn ignored(name: &str) -> bool {
    name.starts_with('.') || name.ends_with('~') || name.ends_with(".swp") || name.ends_with(".swx")
}

/// The files under a version directory (not ignored ones), or why it
/// cannot be a version: a symlink, a name the store refuses.
fn fingerprint(dir: &Path) -> std::result::Result<Fingerprint, String> {
    fn walk(root: &Path, rel: &str, out: &mut Fingerprint) -> std::result::Result<(), String> {
        let dir = root.join(rel);
        let entries = fs::read_dir(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if ignored(&name) {
                continue;
            }
            let path = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
            let meta = fs::symlink_metadata(entry.path()).map_err(|e| format!("{path}: {e}"))?;
            if meta.file_type().is_symlink() {
                return Err(format!("{path}: a symlink, not followed out of the repository"));
            }
            if crate::store::normalize_path(path.as_bytes()).ok().flatten().as_deref() != Some(path.as_str()) {
                return Err(format!("{path}: not a name a version may hold"));
            }
            if meta.is_dir() {
                walk(root, &path, out)?;
            } else if meta.is_file() {
                out.push((path, meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
            } else {
                return Err(format!("{path}: not a regular file"));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, "", &mut files)?;
    files.sort();
    Ok(files)
}

/// Whether any process has a file under `dir` open for writing, as far as
/// `/proc` shows this daemon (all processes when it runs as root; its own
/// user's otherwise, and then the settle time alone decides).
fn open_for_writing(dir: &Path) -> bool {
    let Ok(procs) = fs::read_dir("/proc") else { return false };
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    for process in procs.flatten() {
        if !process.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = fs::read_dir(process.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if !fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(&dir)) {
                continue;
            }
            let info = fs::read_to_string(process.path().join("fdinfo").join(fd.file_name())).unwrap_or_default();
            let flags =
                info.lines().find_map(|l| l.strip_prefix("flags:")).and_then(|f| u32::from_str_radix(f.trim(), 8).ok());
            if flags.is_some_and(|f| f & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32) {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editor_and_hidden_files_are_ignored() {
        for name in [".staging", ".DS_Store", "model.onnx~", ".model.onnx.swp", "x.swx"] {
            assert!(ignored(name), "{name}");
        }
        assert!(!ignored("model.onnx"));
    }

    #[test]
    fn a_file_open_for_writing_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        let writer = fs::File::create(&path).unwrap();
        assert!(open_for_writing(dir.path()));
        drop(writer);
        let _reader = fs::File::open(&path).unwrap();
        assert!(!open_for_writing(dir.path()));
    }

    #[test]
    fn fingerprints_refuse_symlinks_and_skip_hidden_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/a"), b"a").unwrap();
        fs::write(dir.path().join(".hidden"), b"h").unwrap();
        let files = fingerprint(dir.path()).unwrap();
        assert_eq!(files.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(), ["sub/a"]);
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        assert!(fingerprint(dir.path()).unwrap_err().contains("link: a symlink"));
    }
}
