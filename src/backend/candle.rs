//! Sentence embeddings on candle: a BERT-family encoder saved the way
//! sentence-transformers saves one, run as a text model.
//!
//! A version is a tree ([`Candle::handles`]): `config.json` (the encoder;
//! `model_type` must be `bert`), `model.safetensors` (its weights,
//! memory-mapped and read once into candle's tensors), `tokenizer.json`
//! (HF tokenizers), and optionally sentence-transformers' `modules.json`
//! (pooling directory, whether to normalize), `<pooling>/config.json`
//! (mean, CLS, max or mean-sqrt-len pooling; mean without it) and
//! `sentence_bert_config.json` (`max_seq_length`: longer inputs are
//! truncated; else the model's maximum).
//!
//! The signature is `text` (string, `[-1]`) to `embedding` (float32,
//! `[-1, H]`), both batched along `N`. A run tokenizes its rows, pads them
//! per chunk of [`CHUNK`] rows (so memory does not grow with the rows of a
//! request), runs the encoder, pools over the real tokens only, and
//! normalizes if the model says so. Runs on the CPU: this build has no
//! CUDA kernels for candle.

use std::path::Path;

use candle_core::{DType as CDType, Device, Tensor as CTensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde_json::Value;
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

use crate::device::Target;
use crate::error::{Error, Result};
use crate::tensor::{DType, Data, Signature, Tensor, TensorSpec};

use super::{first_line, Backend, Details, Files, Instance, Stop};

const NAME: &str = "candle";

/// Rows encoded at once: padding and attention memory grow with it.
const CHUNK: usize = 32;

/// The files a candle version must have, at its top.
const REQUIRED: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// The candle backend; it holds no state.
#[derive(Default)]
pub struct Candle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pooling {
    Mean,
    Cls,
    Max,
    MeanSqrtLen,
}

impl Pooling {
    fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Max => "max",
            Pooling::MeanSqrtLen => "mean_sqrt_len",
        }
    }
}

/// What the files say, before the weights are read.
struct Plan {
    config: Config,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_tokens: usize,
}

impl Plan {
    fn read(files: &Files) -> Result<Plan> {
        let config_value = json_file(files, "config.json")?;
        match config_value.get("model_type").and_then(Value::as_str) {
            Some("bert") => {}
            other => {
                return Err(invalid(format!(
                    "config.json: model_type {} is not supported (candle embeddings: bert)",
                    other.map_or("missing".into(), |t| format!("{t:?}"))
                )))
            }
        }
        let config: Config = serde_json::from_value(config_value)
            .map_err(|e| invalid(format!("config.json: {}", first_line(&e.to_string()))))?;
        // candle divides by the head count, and the tokenizer subtracts its
        // two special tokens from the length: refused here, not a panic.
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(invalid("config.json: hidden_size must be a multiple of num_attention_heads (> 0)".into()));
        }
        let modules = optional_json(files, "modules.json")?;
        let modules = modules.as_ref().and_then(Value::as_array);
        let module =
            |kind: &str| modules.and_then(|m| m.iter().find(|m| m.get("type").and_then(Value::as_str) == Some(kind)));
        let pooling_dir = module("sentence_transformers.models.Pooling")
            .and_then(|m| m.get("path").and_then(Value::as_str))
            .unwrap_or("1_Pooling");
        let pooling = match optional_json(files, &format!("{pooling_dir}/config.json"))? {
            Some(p) => pooling_of(&p)?,
            None => Pooling::Mean,
        };
        let normalize = module("sentence_transformers.models.Normalize").is_some();
        let max_tokens = optional_json(files, "sentence_bert_config.json")?
            .and_then(|c| c.get("max_seq_length").and_then(Value::as_u64))
            .map_or(config.max_position_embeddings, |n| (n as usize).min(config.max_position_embeddings));
        if max_tokens < 3 {
            return Err(invalid(format!("max_seq_length {max_tokens}: at least 3 tokens ([CLS], one, [SEP])")));
        }
        let mut tokenizer = Tokenizer::from_file(path(files, "tokenizer.json")?)
            .map_err(|e| invalid(format!("tokenizer.json: {}", first_line(&e.to_string()))))?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_tokens, ..Default::default() }))
            .map_err(|e| invalid(format!("tokenizer.json: {}", first_line(&e.to_string()))))?;
        tokenizer.with_padding(Some(PaddingParams { pad_id: config.pad_token_id as u32, ..Default::default() }));
        Ok(Plan { config, tokenizer, pooling, normalize, max_tokens })
    }

    fn signature(&self) -> Signature {
        let spec = |name: &str, dtype, shape: Vec<i64>, dims: &[&str]| TensorSpec {
            name: name.into(),
            dtype,
            shape,
            dim_names: dims.iter().map(|d| d.to_string()).collect(),
        };
        Signature {
            inputs: vec![spec("text", DType::String, vec![-1], &["N"])],
            outputs: vec![spec("embedding", DType::Float32, vec![-1, self.config.hidden_size as i64], &["N", ""])],
            generates: false,
        }
    }

    fn details(&self) -> Details {
        let details = serde_json::json!({
            "architecture": "bert",
            "hidden_size": self.config.hidden_size,
            "layers": self.config.num_hidden_layers,
            "pooling": self.pooling.name(),
            "normalize": self.normalize,
            "max_tokens": self.max_tokens,
        });
        let Value::Object(map) = details else { unreachable!("an object") };
        map
    }

    /// Reads the weights and builds the encoder.
    fn load(self, files: &Files) -> Result<Embedder> {
        let weights = path(files, "model.safetensors")?;
        // SAFETY: the file is a hard link to a verified, immutable blob in
        // the store's private staging directory; nothing writes to it while
        // it is mapped (blobs are only ever replaced by rename).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], CDType::F32, &Device::Cpu) }
            .map_err(|e| invalid(format!("model.safetensors: {}", first_line(&e.to_string()))))?;
        let model = BertModel::load(vb, &self.config)
            .map_err(|e| invalid(format!("model.safetensors: {}", first_line(&e.to_string()))))?;
        Ok(Embedder { model, plan: self })
    }
}

/// A loaded model.
struct Embedder {
    model: BertModel,
    plan: Plan,
}

impl Embedder {
    /// Embeddings of `texts`, `[texts.len(), H]` row-major.
    fn embed(&self, texts: &[String], stop: &Stop) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(texts.len() * self.plan.config.hidden_size);
        for chunk in texts.chunks(CHUNK) {
            if stop.is_stopped() {
                return Err(Error::Backend { backend: NAME, message: "stopped".into() });
            }
            let inputs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let encodings = self
                .plan
                .tokenizer
                .encode_batch(inputs, true)
                .map_err(|e| runtime(format!("tokenizing: {}", first_line(&e.to_string()))))?;
            let rows = encodings.len();
            let len = encodings.first().map_or(0, |e| e.len());
            let ids: Vec<u32> = encodings.iter().flat_map(|e| e.get_ids().iter().copied()).collect();
            let mask: Vec<u32> = encodings.iter().flat_map(|e| e.get_attention_mask().iter().copied()).collect();
            let pooled = self.forward(ids, mask, rows, len).map_err(|e| runtime(first_line(&e.to_string())))?;
            out.extend(pooled);
        }
        Ok(out)
    }

    fn forward(&self, ids: Vec<u32>, mask: Vec<u32>, rows: usize, len: usize) -> candle_core::Result<Vec<f32>> {
        let cpu = &Device::Cpu;
        let ids = CTensor::from_vec(ids, (rows, len), cpu)?;
        let mask = CTensor::from_vec(mask, (rows, len), cpu)?;
        let hidden = self.model.forward(&ids, &ids.zeros_like()?, Some(&mask))?; // [rows, len, H]
        let mask = mask.to_dtype(CDType::F32)?.unsqueeze(2)?; // [rows, len, 1]
        let tokens = mask.sum(1)?; // [rows, 1]
        let pooled = match self.plan.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => hidden.broadcast_mul(&mask)?.sum(1)?.broadcast_div(&tokens)?,
            Pooling::MeanSqrtLen => hidden.broadcast_mul(&mask)?.sum(1)?.broadcast_div(&tokens.sqrt()?)?,
            // Padding must never win: push it far below any real value.
            Pooling::Max => hidden.broadcast_add(&((mask - 1.0)? * 1e9)?)?.max(1)?,
        };
        let pooled = if self.plan.normalize {
            let norm = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        pooled.flatten_all()?.to_vec1::<f32>()
    }
}

impl Instance for Embedder {
    fn run(&mut self, inputs: Vec<Tensor>, stop: &Stop) -> Result<Vec<Tensor>> {
        let Some(Data::String(texts)) = inputs.into_iter().next().map(|t| t.data) else {
            return Err(runtime("expected one text input".into()));
        };
        let embeddings = self.embed(&texts, stop)?;
        let shape = vec![texts.len(), self.plan.config.hidden_size];
        Ok(vec![Tensor::new("embedding", shape, Data::Float32(embeddings))?])
    }
}

impl Backend for Candle {
    fn name(&self) -> &'static str {
        NAME
    }

    fn format(&self) -> &'static str {
        "safetensors"
    }

    fn handles(&self, names: &[&str]) -> bool {
        REQUIRED.iter().all(|required| names.contains(required))
    }

    fn inspect(&self, files: &Files) -> Result<(Signature, Details)> {
        let plan = Plan::read(files)?;
        let (signature, details) = (plan.signature(), plan.details());
        plan.load(files)?; // the weights must load, too
        Ok((signature, details))
    }

    fn describe(&self) -> Value {
        serde_json::json!({
            "name": NAME,
            "format": self.format(),
            "models": "sentence embeddings: bert (sentence-transformers layout)",
            "devices": ["cpu"],
        })
    }

    /// candle's matrix kernels use every core in one run.
    fn default_instances(&self) -> Option<usize> {
        Some(1)
    }

    fn load(&self, files: &Files, target: Target) -> Result<Box<dyn Instance>> {
        if let Target::Cuda(_) = target {
            return Err(Error::Backend {
                backend: NAME,
                message: "this build runs candle models on the CPU only: set \"device\": \"cpu\" in config.json".into(),
            });
        }
        Ok(Box::new(Plan::read(files)?.load(files)?))
    }
}

/// How a sentence-transformers pooling config pools: one mode.
fn pooling_of(config: &Value) -> Result<Pooling> {
    let on = |key: &str| config.get(key).and_then(Value::as_bool) == Some(true);
    let modes: Vec<Pooling> = [
        ("pooling_mode_mean_tokens", Pooling::Mean),
        ("pooling_mode_cls_token", Pooling::Cls),
        ("pooling_mode_max_tokens", Pooling::Max),
        ("pooling_mode_mean_sqrt_len_tokens", Pooling::MeanSqrtLen),
    ]
    .into_iter()
    .filter(|(key, _)| on(key))
    .map(|(_, mode)| mode)
    .collect();
    match modes.as_slice() {
        [one] => Ok(*one),
        [] => Err(invalid("pooling config: no pooling mode is on (supported: mean, cls, max, mean_sqrt_len)".into())),
        _ => Err(invalid("pooling config: several pooling modes at once are not supported".into())),
    }
}

fn path<'a>(files: &'a Files, name: &str) -> Result<&'a Path> {
    files.get(name).map(|p| p.as_path()).ok_or_else(|| invalid(format!("{name} is missing")))
}

fn json_file(files: &Files, name: &str) -> Result<Value> {
    optional_json(files, name)?.ok_or_else(|| invalid(format!("{name} is missing")))
}

/// A JSON file of the version, if it has one.
fn optional_json(files: &Files, name: &str) -> Result<Option<Value>> {
    let Some(path) = files.get(name) else { return Ok(None) };
    let bytes = std::fs::read(path).map_err(|e| Error::io(name.to_string(), e))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| invalid(format!("{name}: not JSON: {}", first_line(&e.to_string()))))
}

fn invalid(why: String) -> Error {
    Error::InvalidModel { name: "candle model".into(), why }
}

fn runtime(message: String) -> Error {
    Error::Backend { backend: NAME, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_modes_from_sentence_transformers_configs() {
        let mode = |json: &str| pooling_of(&serde_json::from_str(json).unwrap());
        assert_eq!(mode(r#"{"pooling_mode_mean_tokens": true}"#).unwrap(), Pooling::Mean);
        assert_eq!(
            mode(r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#).unwrap(),
            Pooling::Cls
        );
        assert!(mode("{}").unwrap_err().to_string().contains("no pooling mode"));
        let two = mode(r#"{"pooling_mode_cls_token": true, "pooling_mode_max_tokens": true}"#).unwrap_err();
        assert_eq!(two.errno(), libc::EINVAL);
    }

    #[test]
    fn the_backend_is_chosen_by_the_trees_files() {
        assert!(Candle.handles(&["config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"]));
        assert!(!Candle.handles(&["config.json", "model.safetensors"]));
        assert!(!Candle.handles(&["model.onnx"]));
    }
}
