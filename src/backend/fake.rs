//! A fake backend for hermetic tests: no runtime library, deterministic
//! arithmetic, and knobs that make scheduling observable. Compiled for the
//! crate's own tests and, with the `fake-backend` feature, for `tests/`.
//!
//! A fake model is one `.fake` file holding JSON:
//!
//! ```json
//! {"inputs":  [{"name": "x", "dtype": "float32", "shape": [-1, 4], "dim_names": ["N", ""]}],
//!  "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4], "dim_names": ["N", ""]}],
//!  "scale": 2.0, "fill": 1.0, "run_ms": 0, "fail": null, "gated": false, "panics": false}
//! ```
//!
//! Output `i` is input `i` times `scale` (float32 only); a model with no
//! inputs returns its outputs' shapes (free dimensions 1) filled with
//! `fill`. `run_ms` sleeps in every run; `fail` makes every run fail with
//! that message; `panics` makes it panic; a `gated` model's runs wait
//! while the backend's [`Gate`] (shared with the test) is closed. A file
//! that is not such JSON is an invalid model. With `"generates": N` it is a
//! language model whose answer is `t0 t1 ... t{N-1} `, a token per `run_ms`.
//!
//! The
//! [`Counters`] tell how many loads and runs happened and the most runs in
//! progress at once.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::device::Target;
use crate::error::{Error, Result};
use crate::tensor::{DType, Data, Signature, Tensor, TensorSpec};

use super::{Backend, Details, Files, Instance, Stop};

const NAME: &str = "fake";

/// What a `.fake` file says.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    #[serde(default = "one")]
    pub scale: f32,
    #[serde(default = "one")]
    pub fill: f32,
    #[serde(default)]
    pub run_ms: u64,
    #[serde(default)]
    pub fail: Option<String>,
    /// Runs wait for the backend's [`Gate`].
    #[serde(default)]
    pub gated: bool,
    /// Runs panic (a backend bug, for the engine to contain).
    #[serde(default)]
    pub panics: bool,
    /// A language model: each request generates this many tokens (`t0 `,
    /// `t1 `, ...), `run_ms` each.
    #[serde(default)]
    pub generates: Option<usize>,
}

fn one() -> f32 {
    1.0
}

impl Spec {
    /// A model `x[N,width] float32 -> y[N,width] = x * scale`, batchable
    /// along `N`.
    pub fn scaled(width: i64, scale: f32) -> Spec {
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            dtype: DType::Float32,
            shape: vec![-1, width],
            dim_names: vec!["N".into(), String::new()],
        };
        Spec {
            inputs: vec![spec("x")],
            outputs: vec![spec("y")],
            scale,
            fill: 1.0,
            run_ms: 0,
            fail: None,
            gated: false,
            panics: false,
            generates: None,
        }
    }

    /// The bytes of its `.fake` file.
    pub fn to_file(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a spec serializes")
    }

    fn read(path: &Path, name: &str) -> Result<Spec> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path.display().to_string(), e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::InvalidModel { name: name.to_string(), why: format!("not a fake model: {e}") })
    }
}

/// Holds every run while closed.
#[derive(Default)]
pub struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    pub fn close(&self) {
        *self.closed.lock().unwrap() = true;
    }

    pub fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.opened.notify_all();
    }

    /// Waits while the gate is closed, unless the run is stopped.
    fn pass(&self, stop: &Stop) {
        let mut closed = self.closed.lock().unwrap();
        while *closed && !stop.is_stopped() {
            closed = self.opened.wait_timeout(closed, Duration::from_millis(5)).unwrap().0;
        }
    }
}

/// What the fake backend has done.
#[derive(Default)]
pub struct Counters {
    pub loads: AtomicUsize,
    pub runs: AtomicUsize,
    pub running: AtomicUsize,
    pub max_running: AtomicUsize,
    /// Runs that ended early because they were stopped.
    pub stopped: AtomicUsize,
}

#[derive(Clone, Default)]
pub struct Fake {
    pub gate: Arc<Gate>,
    pub counters: Arc<Counters>,
}

/// The version's one `.fake` file (other files may come with it, and are
/// ignored).
fn the_file(files: &Files) -> Result<(&str, &Path)> {
    let mut fakes = files.iter().filter(|(name, _)| name.ends_with(".fake"));
    match (fakes.next(), fakes.next()) {
        (Some((name, path)), None) => Ok((name, path)),
        _ => Err(Error::InvalidModel { name: "fake".into(), why: "a fake version has one .fake file".into() }),
    }
}

impl Backend for Fake {
    fn name(&self) -> &'static str {
        NAME
    }

    fn format(&self) -> &'static str {
        "fake"
    }

    fn handles(&self, names: &[&str]) -> bool {
        names.iter().filter(|name| name.ends_with(".fake")).count() == 1
    }

    fn inspect(&self, files: &Files) -> Result<(Signature, Details)> {
        let (name, path) = the_file(files)?;
        let spec = Spec::read(path, name)?;
        if spec.generates.is_some() {
            return Ok((super::gguf::signature(), Details::new()));
        }
        Ok((Signature { inputs: spec.inputs, outputs: spec.outputs, generates: false }, Details::new()))
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"name": NAME, "format": "fake"})
    }

    fn load(&self, files: &Files, _target: Target) -> Result<Box<dyn Instance>> {
        let (name, path) = the_file(files)?;
        let spec = Spec::read(path, name)?;
        self.counters.loads.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(FakeInstance { spec, fake: self.clone() }))
    }
}

struct FakeInstance {
    spec: Spec,
    fake: Fake,
}

impl Instance for FakeInstance {
    fn run(&mut self, inputs: Vec<Tensor>, stop: &Stop) -> Result<Vec<Tensor>> {
        let c = &self.fake.counters;
        let now = c.running.fetch_add(1, Ordering::SeqCst) + 1;
        c.max_running.fetch_max(now, Ordering::SeqCst);
        if self.spec.gated {
            self.fake.gate.pass(stop);
        }
        assert!(!self.spec.panics, "a fake model that panics");
        let until = std::time::Instant::now() + Duration::from_millis(self.spec.run_ms);
        while std::time::Instant::now() < until && !stop.is_stopped() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let result = if stop.is_stopped() {
            c.stopped.fetch_add(1, Ordering::SeqCst);
            Err(Error::Backend { backend: NAME, message: "stopped".into() })
        } else {
            self.compute(inputs)
        };
        c.running.fetch_sub(1, Ordering::SeqCst);
        c.runs.fetch_add(1, Ordering::SeqCst);
        result
    }

    fn generate(&mut self, prompt: &super::Prompt, default_max_tokens: u32) -> Result<Box<dyn super::Generation>> {
        let tokens = self.spec.generates.ok_or_else(|| Error::BadInput("this model does not generate text".into()))?;
        let max_tokens = prompt.max_tokens.unwrap_or(default_max_tokens) as usize;
        Ok(Box::new(FakeGeneration { tokens, max_tokens, next: 0, spec: self.spec.clone() }))
    }
}

/// A fake generation: `t0 `, `t1 `, ... then the end of its turn.
struct FakeGeneration {
    tokens: usize,
    max_tokens: usize,
    next: usize,
    spec: Spec,
}

impl super::Generation for FakeGeneration {
    fn prompt_tokens(&self) -> usize {
        1
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn kv_bytes(&self) -> u64 {
        1000
    }

    fn step(&mut self) -> Result<super::Token> {
        std::thread::sleep(Duration::from_millis(self.spec.run_ms));
        if let Some(message) = &self.spec.fail {
            return Err(Error::Backend { backend: NAME, message: message.clone() });
        }
        let id = self.next as u32;
        self.next += 1;
        if self.next > self.tokens {
            return Ok(super::Token { id: 0, text: String::new(), end: Some(super::Finish::Stop) });
        }
        let end = (self.next == self.max_tokens).then_some(super::Finish::Length);
        Ok(super::Token { id, text: format!("t{id} "), end })
    }
}

impl FakeInstance {
    fn compute(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if let Some(message) = &self.spec.fail {
            return Err(Error::Backend { backend: NAME, message: message.clone() });
        }
        if inputs.is_empty() {
            return self
                .spec
                .outputs
                .iter()
                .map(|o| {
                    let shape: Vec<usize> = o.shape.iter().map(|&d| d.max(1) as usize).collect();
                    let n = shape.iter().product();
                    Tensor::new(&o.name, shape, Data::Float32(vec![self.spec.fill; n]))
                })
                .collect();
        }
        inputs
            .into_iter()
            .zip(&self.spec.outputs)
            .map(|(t, o)| match t.data {
                Data::Float32(v) => {
                    Tensor::new(&o.name, t.shape, Data::Float32(v.iter().map(|x| x * self.spec.scale).collect()))
                }
                other => Tensor::new(&o.name, t.shape, other),
            })
            .collect()
    }
}
