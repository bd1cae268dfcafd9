//! Backends: what can load a version's files, say what the model takes and
//! returns, and run it.
//!
//! One trait, [`Backend`], over a *set of files* (name → path), because a
//! version is a manifest of files. The daemon holds a list of backends
//! ([`Backends`]): at import the first that [`Backend::handles`] the file
//! names inspects them, and its [`Backend::name`] is recorded in the
//! version; every later load goes to that backend by name, never
//! re-derived from a file name. The files a backend is given are staged by
//! the store ([`crate::store::Staged`]): all in one directory that holds
//! nothing else, each verified against its digest before a load. A
//! backend may read any of them, and no file beside them.
//!
//! A loaded model is an [`Instance`]: one request at a time runs on it
//! (ONNX Runtime sessions are not safe to run concurrently from `ort`), so
//! the engine keeps a pool of instances per version.
//!
//! Backends: ONNX Runtime ([`OnnxRuntime`], `ort.rs`); sentence embeddings
//! on candle ([`Candle`], `candle.rs`); language models from GGUF on
//! candle ([`Gguf`], `gguf/`: they generate, see [`Generation`]); a fake one for hermetic tests
//! (`fake.rs`, behind the `fake-backend` feature). No
//! backend panics on a missing library: failures are [`Error::Backend`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use crate::codec::prompt::{Message, Prompt, PromptInput};
use crate::device::Target;
use crate::error::{Error, Result};
use crate::tensor::{Signature, Tensor};

mod candle;
#[cfg(any(test, feature = "fake-backend"))]
pub mod fake;
pub mod gguf;
mod ort;

pub use self::candle::Candle;
pub use self::gguf::Gguf;
pub use self::ort::{find_onnxruntime, OnnxRuntime, ONNXRUNTIME_LIB};

/// Fixes the number of threads candle's CPU kernels use at the number it
/// would choose (its physical cores, or `RAYON_NUM_THREADS` or
/// `CANDLE_NUM_THREADS` when set), by setting `RAYON_NUM_THREADS`. Without
/// it candle reads /proc/cpuinfo again at every parallel operation: about
/// a millisecond a token for a small language model. Call it at the start
/// of `main`, before any other thread exists (it sets an environment
/// variable).
pub fn settle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::env::var("CANDLE_NUM_THREADS")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(candle_core::utils::get_num_threads);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// A version's files as a backend sees them: name → path of the bytes.
pub type Files = BTreeMap<String, PathBuf>;

/// What a backend says of a model beyond its signature, for `meta.json`.
pub type Details = serde_json::Map<String, serde_json::Value>;

pub trait Backend: Send + Sync {
    /// Short name shown in `meta.json` and `/status`, and recorded in each
    /// version it imports, e.g. `onnxruntime`.
    fn name(&self) -> &'static str;
    /// The model format it reads, e.g. `onnx`.
    fn format(&self) -> &'static str;
    /// Whether this backend reads a version made of files with these names.
    fn handles(&self, names: &[&str]) -> bool;
    /// Loads the model to check it and report its signature, and facts
    /// for `meta.json` (architecture, pooling, ...). An unloadable set of
    /// files is [`Error::InvalidModel`] with the reason on one line.
    fn inspect(&self, files: &Files) -> Result<(Signature, Details)>;
    /// Facts for `/status`.
    fn describe(&self) -> serde_json::Value;
    /// How many instances of one model to keep per device when its
    /// `config.json` leaves `instances` at 0. `None`: one per worker, for
    /// backends that run each request on one thread. A backend whose run
    /// already uses every core says 1: two runs at once would only halve
    /// the batches.
    fn default_instances(&self) -> Option<usize> {
        None
    }
    /// Loads a model from its (already verified) files, ready to run on
    /// `target`.
    fn load(&self, files: &Files, target: Target) -> Result<Box<dyn Instance>>;
}

/// One loaded copy of a model.
pub trait Instance: Send {
    /// Runs one request: inputs in the model's order (already checked
    /// against its signature; none for a model that takes none); outputs
    /// in the model's order. A backend that can end a run early registers
    /// how with `stop` ([`Stop::on_stop`]); the engine stops a run whose
    /// jobs have all ended (timed out, cancelled), and discards its result.
    fn run(&mut self, inputs: Vec<Tensor>, stop: &Stop) -> Result<Vec<Tensor>>;

    /// A language model's generation for one request (its own KV cache;
    /// the weights shared with the instance), stepped by the engine.
    /// `default_max_tokens` is the model's `config.json` `max_tokens`.
    fn generate(&mut self, _prompt: &Prompt, _default_max_tokens: u32) -> Result<Box<dyn Generation>> {
        Err(Error::BadInput("this model does not generate text".into()))
    }
}

/// One request's text generation, one token per [`Generation::step`].
pub trait Generation: Send {
    fn prompt_tokens(&self) -> usize;
    /// The most tokens it generates.
    fn max_tokens(&self) -> usize;
    /// The memory its KV cache takes at its longest.
    fn kv_bytes(&self) -> u64;
    /// The next token: the first call reads the prompt. Its text is whole
    /// UTF-8 characters (empty while a character's bytes are incomplete).
    fn step(&mut self) -> Result<Token>;
}

/// A generated token: its id, the text it completes, and whether the
/// generation ended with it (an end-of-turn token has no text and is not
/// counted).
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub end: Option<Finish>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The model ended its turn, or a stop sequence came.
    Stop,
    /// `max_tokens`, or the model's context, was reached.
    Length,
}

impl Finish {
    pub fn name(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// A request to end a run in progress, and what ends it.
#[derive(Default)]
pub struct Stop {
    state: Mutex<StopState>,
}

#[derive(Default)]
struct StopState {
    stopped: bool,
    hooks: Vec<Box<dyn FnOnce() + Send>>,
}

impl Stop {
    /// Ends the run: calls every hook registered, and any registered later
    /// at once.
    pub fn stop(&self) {
        let hooks = {
            let mut st = self.state.lock().unwrap();
            st.stopped = true;
            std::mem::take(&mut st.hooks)
        };
        hooks.into_iter().for_each(|hook| hook());
    }

    pub fn is_stopped(&self) -> bool {
        self.state.lock().unwrap().stopped
    }

    /// What [`Stop::stop`] calls to end the run (at once if it was called).
    pub fn on_stop(&self, hook: impl FnOnce() + Send + 'static) {
        let mut st = self.state.lock().unwrap();
        if st.stopped {
            drop(st);
            hook();
        } else {
            st.hooks.push(Box::new(hook));
        }
    }
}

/// What a backend found in the files of an import.
#[derive(Clone, Debug)]
pub struct Inspected {
    pub format: String,
    pub backend: String,
    pub signature: Signature,
    pub details: Details,
}

/// The backends a daemon runs with, in order of preference.
#[derive(Clone, Default)]
pub struct Backends(Vec<Arc<dyn Backend>>);

impl Backends {
    pub fn new(list: Vec<Arc<dyn Backend>>) -> Self {
        Backends(list)
    }

    /// The backend that reads files with these names (an import's).
    pub fn for_files(&self, names: &[&str]) -> Result<&Arc<dyn Backend>> {
        self.0.iter().find(|b| b.handles(names)).ok_or_else(|| {
            let formats: Vec<&str> = self.0.iter().map(|b| b.format()).collect();
            Error::InvalidModel {
                name: names.join(", "),
                why: format!("no backend reads this file type (known: {})", formats.join(", ")),
            }
        })
    }

    /// The backend a version was imported with.
    pub fn get(&self, name: &str) -> Result<&Arc<dyn Backend>> {
        self.0.iter().find(|b| b.name() == name).ok_or_else(|| {
            Error::Internal(format!("the version was imported with backend {name:?}, which this daemon does not have"))
        })
    }

    /// Checks an import's files with the backend that reads them: the
    /// store's inspector. Empty files are refused before any backend sees
    /// them.
    pub fn inspect(&self, files: &Files) -> Result<Inspected> {
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        let backend = self.for_files(&names)?;
        for (name, path) in files {
            let size = std::fs::metadata(path).map_err(|e| Error::io(path.display().to_string(), e))?.len();
            if size == 0 {
                return Err(Error::InvalidModel { name: name.clone(), why: "empty file".into() });
            }
        }
        let (signature, details) = backend.inspect(files)?;
        Ok(Inspected { format: backend.format().to_string(), backend: backend.name().to_string(), signature, details })
    }

    pub fn describe(&self) -> Vec<serde_json::Value> {
        self.0.iter().map(|b| b.describe()).collect()
    }
}

/// The first non-empty line of a library's (often multi-line) message.
pub(crate) fn first_line(s: &str) -> String {
    s.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("unknown error").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_file_types_are_refused_by_name() {
        let backends = Backends::default();
        let err = backends.for_files(&["weights.bin"]).err().unwrap();
        assert_eq!(err.errno(), libc::EINVAL);
        assert!(err.to_string().contains("no backend reads this file type"), "{err}");
    }

    #[test]
    fn a_version_goes_to_the_backend_it_was_imported_with() {
        let backends = Backends::new(vec![Arc::new(fake::Fake::default())]);
        assert_eq!(backends.get("fake").unwrap().name(), "fake");
        let err = backends.get("onnxruntime").err().unwrap();
        assert_eq!(err.errno(), libc::EIO);
        assert!(err.to_string().contains("does not have"), "{err}");
    }
}
