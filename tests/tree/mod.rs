//! Test harness for the tree driven through `aifs::fs::Fs` directly: no
//! FUSE, no kernel, no runtime library. A real store on disk, the real
//! engine, and the fake backend (`aifs::backend::fake`): models are
//! `.fake` files.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use aifs::backend::fake::{Fake, Spec};
use aifs::backend::{Backend, Backends};
use aifs::device::{Cpu, Probe};
use aifs::engine::{Engine, EngineConfig};
use aifs::fs::{Caller, Fs, FsConfig, ROOT_INO};
use aifs::store::Store;

pub struct Tree {
    pub fs: Arc<Fs>,
    pub dir: tempfile::TempDir,
}

pub const ME: Caller = Caller { uid: 1000, gid: 1000, pid: 1 };

pub fn tree() -> Tree {
    tree_with(EngineConfig { workers: 2, ..Default::default() })
}

pub fn tree_with(engine: EngineConfig) -> Tree {
    tree_with_config(engine, FsConfig::default())
}

pub fn tree_with_config(engine: EngineConfig, config: FsConfig) -> Tree {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let fake: Arc<dyn Backend> = Arc::new(Fake::default());
    let backends = Backends::new(vec![fake]);
    let devices: Vec<Arc<dyn Probe>> = vec![Arc::new(Cpu::new())];
    let engine = Arc::new(Engine::start(store.clone(), backends.clone(), devices, engine).unwrap());
    let fs = Fs::new(store, engine, backends, config);
    Tree { fs, dir }
}

impl Tree {
    /// The inode of a path like `models/m/v1`.
    pub fn ino(&self, path: &str) -> u64 {
        self.try_ino(path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    pub fn try_ino(&self, path: &str) -> aifs::Result<u64> {
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = self.fs.lookup(ino, OsStr::new(part))?.ino;
        }
        Ok(ino)
    }

    pub fn names(&self, path: &str) -> Vec<String> {
        self.fs.readdir(self.ino(path)).unwrap().into_iter().map(|e| e.name).collect()
    }

    /// `close()`: a flush, waiting for its (possibly deferred) answer.
    pub fn flush(&self, fh: u64) -> aifs::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.fs.flush(fh, ME.pid, move |r| tx.send(r).unwrap());
        rx.recv_timeout(std::time::Duration::from_secs(30)).expect("flush answered")
    }

    /// The last close of a handle, waiting for its answer.
    pub fn release(&self, fh: u64) -> aifs::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.fs.release(fh, move |r| tx.send(r).unwrap());
        rx.recv_timeout(std::time::Duration::from_secs(30)).expect("release answered")
    }

    /// One read, waiting for its (possibly deferred) answer.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> aifs::Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.fs.read(fh, offset, size, move |r| tx.send(r).is_ok());
        rx.recv_timeout(std::time::Duration::from_secs(30)).expect("read answered")
    }

    pub fn read_all(&self, path: &str) -> Vec<u8> {
        let o = self.fs.open(self.ino(path), libc::O_RDONLY, ME).unwrap();
        let mut out = Vec::new();
        loop {
            let chunk = self.read(o.fh, out.len() as u64, 4096).unwrap();
            if chunk.is_empty() {
                break;
            }
            out.extend(chunk);
        }
        self.release(o.fh).unwrap();
        out
    }

    /// One request through `path` (an `infer` file) on one handle: write,
    /// then read to the end.
    pub fn infer(&self, path: &str, request: &[u8]) -> aifs::Result<Vec<u8>> {
        let o = self.fs.open(self.ino(path), libc::O_RDWR, ME)?;
        self.fs.write(o.fh, 0, request)?;
        let mut out = Vec::new();
        let result = loop {
            match self.read(o.fh, out.len() as u64, 1 << 16) {
                Ok(chunk) if chunk.is_empty() => break Ok(out),
                Ok(chunk) => out.extend(chunk),
                Err(e) => break Err(e),
            }
        };
        self.release(o.fh).ok();
        result
    }

    /// What `cp <bytes> models/<model>/<name>` does: create, write, close.
    pub fn copy_in(&self, model: &str, name: &str, bytes: &[u8]) -> aifs::Result<()> {
        let (_, o) = self.fs.create(self.ino(&format!("models/{model}")), OsStr::new(name), 0o644, ME)?;
        for (i, chunk) in bytes.chunks(1000).enumerate() {
            self.fs.write(o.fh, (i * 1000) as u64, chunk)?;
        }
        let flushed = self.flush(o.fh);
        self.release(o.fh).ok();
        flushed
    }

    /// `models/m/v1`: the MLP fixture.
    pub fn add_mlp(&self) {
        self.mkdir(b"m").unwrap();
        self.copy_in("m", "mlp.fake", &fixture("mlp.fake")).unwrap();
    }

    pub fn mkdir(&self, name: &[u8]) -> aifs::Result<()> {
        self.fs.mkdir(self.ino("models"), OsStr::from_bytes(name), 0o755, ME).map(|_| ())
    }

    /// Files in the data dir's blob directory (temp files included).
    pub fn blob_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// The bytes of a model file: `.fake` models of several shapes, and bad
/// ones that no backend loads.
pub fn fixture(name: &str) -> Vec<u8> {
    match name {
        "mlp.fake" => Spec::scaled(16, 2.0).to_file(),
        "a.fake" => Spec::scaled(4, 3.0).to_file(),
        "b.fake" => Spec::scaled(4, 5.0).to_file(),
        "empty.fake" => Vec::new(),
        "garbage.fake" => (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect(),
        "truncated.fake" => {
            let good = fixture("mlp.fake");
            good[..good.len() / 2].to_vec()
        }
        _ => panic!("no fixture {name}"),
    }
}
