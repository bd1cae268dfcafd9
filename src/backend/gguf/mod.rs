//! Language models from one GGUF file, on candle: the llama family, CPU
//! only. The forward pass is `llama.rs`; Q4_1 and Q8_0 weights run on our
//! own kernels, and the rest of the arithmetic is llama.cpp's (the
//! `aifs-kernels` crate).
//!
//! The GGUF alone is enough: the tokenizer (vocabulary, merges, special
//! tokens) and the chat template come from its metadata. A version loads
//! once ([`Llama`], the weights shared); each request is a [`Generation`](super::Generation)
//! with its own KV cache, allocated for its prompt and `max_tokens` when
//! it starts. The engine steps
//! generations one token at a time (`engine/generate.rs`).
//!
//! Promises: an import is refused with the reason when the file is not
//! GGUF, is truncated, holds a tensor type candle cannot read, is of an
//! architecture not in [`ARCHITECTURES`], is not a llama `llama.rs` runs
//! ([`llama::Dims::of`]: shapes, experts, RoPE scaling), or has a
//! tokenizer or chat template that does not load. Tokens are decoded incrementally and only
//! whole UTF-8 characters are returned.

use std::fs::File;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokenizers::Tokenizer;

use crate::codec::prompt::{Prompt, PromptInput};
use crate::device::Target;
use crate::error::{Error, Result};
use crate::tensor::{DType, Signature, TensorSpec};

use super::{first_line, Backend, Details, Files, Instance, Stop};
use crate::tensor::Tensor;

pub mod llama;

/// The `general.architecture`s that load (Mistral and other llama-shaped
/// models say `llama`; mixtures of experts are refused, see `llama.rs`).
pub const ARCHITECTURES: &[&str] = &["llama"];

/// Control tokens that end a turn, besides the file's own EOS/EOT ids (as
/// llama.cpp treats them).
const END_OF_TURN: &[&str] = &["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>"];

const NAME: &str = "candle-gguf";

/// The longest context a version is given, whatever its file says: its
/// RoPE tables are made for that many positions at load.
const MAX_CONTEXT: usize = 4096;

/// The most instructions one rendering of a chat template may take.
const TEMPLATE_FUEL: u64 = 1_000_000;

pub struct Gguf;

impl Backend for Gguf {
    fn name(&self) -> &'static str {
        NAME
    }

    fn format(&self) -> &'static str {
        "gguf"
    }

    fn handles(&self, names: &[&str]) -> bool {
        matches!(names, [only] if only.to_ascii_lowercase().ends_with(".gguf"))
    }

    fn inspect(&self, files: &Files) -> Result<(Signature, Details)> {
        let (name, model) = Model::open(files)?;
        let mut details = Details::new();
        let meta = &model.content.metadata;
        let parameters: usize = model.content.tensor_infos.values().map(|t| t.shape.elem_count()).sum();
        details.insert("generates".into(), "text".into());
        details.insert("architecture".into(), model.arch.clone().into());
        details.insert("parameters".into(), parameters.into());
        details.insert("quantization".into(), quantization(&model.content).into());
        details.insert("context_length".into(), model.text.context.into());
        details.insert("chat_template".into(), model.text.template.is_some().into());
        if let Some(Value::String(n)) = meta.get("general.name") {
            details.insert("name".into(), n.clone().into());
        }
        tracing::debug!(file = %name, "inspected a GGUF");
        Ok((signature(), details))
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "name": self.name(), "format": self.format(), "architectures": ARCHITECTURES })
    }

    /// Its runs use every core: one per device at a time (generations
    /// take turns token by token, see `engine/generate.rs`).
    fn default_instances(&self) -> Option<usize> {
        Some(1)
    }

    fn load(&self, files: &Files, target: Target) -> Result<Box<dyn Instance>> {
        if target != Target::Cpu {
            return Err(Error::Backend { backend: NAME, message: "it runs on the CPU only".into() });
        }
        let (name, model) = Model::open(files)?;
        let path = &files[&name];
        let mut file = File::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
        let invalid =
            |e: candle_core::Error| Error::InvalidModel { name: name.clone(), why: first_line(&e.to_string()) };
        let weights = llama::Weights::load(&model.content, &mut file, model.text.context).map_err(invalid)?;
        Ok(Box::new(Llama(Arc::new(Loaded { weights, text: model.text }))))
    }
}

/// What a generating model takes and returns: text.
pub fn signature() -> Signature {
    let text = |name: &str| TensorSpec { name: name.into(), dtype: DType::String, shape: vec![-1], dim_names: vec![] };
    Signature { inputs: vec![text("prompt")], outputs: vec![text("text")], generates: true }
}

/// A GGUF's header read and checked, with what it says of text.
struct Model {
    content: Content,
    arch: String,
    text: Text,
}

/// What turns a request into tokens and tokens into text, and the limits
/// on them: all from the file's metadata.
struct Text {
    tokenizer: Tokenizer,
    /// The chat template, compiled once.
    template: Option<minijinja::Environment<'static>>,
    /// Tokens that end a turn.
    ends: Vec<u32>,
    bos: String,
    eos: String,
    context: usize,
    /// Bytes of KV cache per token: keys and values, f16, every layer.
    kv_bytes_per_token: u64,
}

impl Model {
    fn open(files: &Files) -> Result<(String, Model)> {
        let (name, path) = files.iter().next().ok_or_else(|| Error::Internal("a version with no files".into()))?;
        let invalid = |why: String| Error::InvalidModel { name: name.clone(), why };
        let mut file = File::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path.display().to_string(), e))?.len();
        let mut magic = [0u8; 4];
        use std::io::Read;
        if file.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(invalid("not a GGUF file (no GGUF magic)".into()));
        }
        use std::io::Seek;
        file.rewind().map_err(|e| Error::io(path.display().to_string(), e))?;
        // candle bounds every length it reads by the file's size; a panic
        // in a parser that is not ours must still not take the daemon down.
        let content = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut file)))
            .map_err(|_| invalid("malformed GGUF header".into()))?
            .map_err(|e| invalid(format!("malformed or unsupported GGUF: {}", first_line(&e.to_string()))))?;
        for (tensor, info) in &content.tensor_infos {
            let (elems, block) = (info.shape.elem_count(), info.ggml_dtype.block_size());
            let bytes = (elems / block.max(1)) as u64 * info.ggml_dtype.type_size() as u64;
            let end = content.tensor_data_offset.saturating_add(info.offset).saturating_add(bytes);
            if elems % block.max(1) != 0 || end > file_len {
                return Err(invalid(format!(
                    "truncated: tensor {tensor} ends at byte {end}, the file has {file_len} (or its shape does not fit its type)"
                )));
            }
        }
        let meta = &content.metadata;
        let text = |key: &str| match meta.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let number = |key: &str| meta.get(key).and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)));
        let arch = text("general.architecture").unwrap_or_default();
        if !ARCHITECTURES.contains(&arch.as_str()) {
            return Err(invalid(format!(
                "architecture {arch:?} is not supported (supported: {})",
                ARCHITECTURES.join(", ")
            )));
        }
        let dims = llama::Dims::of(&content).map_err(|e| invalid(first_line(&e.to_string())))?;
        let kv_bytes_per_token = dims.kv_bytes_per_token();
        let context = (number(&format!("{arch}.context_length")).unwrap_or(2048) as usize).min(MAX_CONTEXT);
        let mut tokenizer = Tokenizer::from_gguf(&content)
            .map_err(|e| invalid(format!("its tokenizer does not load: {}", first_line(&e.to_string()))))?;
        if text("tokenizer.ggml.pre").as_deref() == Some("smollm") {
            // llama.cpp's SmolLM pre-tokenizer: each digit alone, then GPT-2's.
            use tokenizers::pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence};
            tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])));
        }
        let token = |id: Option<u64>| id.and_then(|id| tokenizer.id_to_token(id as u32));
        let bos = token(number("tokenizer.ggml.bos_token_id")).unwrap_or_default();
        let eos = token(number("tokenizer.ggml.eos_token_id")).unwrap_or_default();
        let ends = end_of_turn_ids(&content);
        let template = text("tokenizer.chat_template")
            .map(|t| chat_environment(&t))
            .transpose()
            .map_err(|e| invalid(format!("its chat template does not load: {e}")))?;
        let text = Text { tokenizer, template, ends, bos, eos, context, kv_bytes_per_token };
        Ok((name.clone(), Model { content, arch, text }))
    }
}

/// The ids that end a turn: the file's EOS and EOT ids, and the
/// [`END_OF_TURN`] tokens its vocabulary has.
pub fn end_of_turn_ids(content: &Content) -> Vec<u32> {
    let meta = &content.metadata;
    let vocabulary = match meta.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => tokens.as_slice(),
        _ => &[],
    };
    let named = vocabulary.iter().enumerate().filter_map(|(id, token)| match token {
        Value::String(t) if END_OF_TURN.contains(&t.as_str()) => Some(id as u32),
        _ => None,
    });
    let mut ends: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|key| {
            let id = meta.get(*key)?;
            id.to_u32().ok().or_else(|| id.to_u64().ok().map(|id| id as u32))
        })
        .chain(named)
        .collect();
    ends.sort_unstable();
    ends.dedup();
    ends
}

/// The most common tensor type among the weights, e.g. `Q4_1`.
fn quantization(content: &Content) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for info in content.tensor_infos.values().filter(|i| i.shape.rank() == 2) {
        *counts.entry(format!("{:?}", info.ggml_dtype)).or_insert(0usize) += info.shape.elem_count();
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map_or_else(|| "unknown".into(), |(t, _)| t)
}

/// A chat template compiled, with the Python string methods templates use.
fn chat_environment(template: &str) -> std::result::Result<minijinja::Environment<'static>, minijinja::Error> {
    let mut env = minijinja::Environment::new();
    // A template comes with an untrusted file: its work is bounded.
    env.set_fuel(Some(TEMPLATE_FUEL));
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_template_owned("chat", template.to_string())?;
    Ok(env)
}

struct Loaded {
    weights: llama::Weights,
    text: Text,
}

/// A loaded GGUF: the weights and tokenizer, shared by its generations.
struct Llama(Arc<Loaded>);

impl Instance for Llama {
    fn run(&mut self, _inputs: Vec<Tensor>, _stop: &Stop) -> Result<Vec<Tensor>> {
        Err(Error::Internal("a language model is run by generation, not as a tensor model".into()))
    }

    fn generate(&mut self, prompt: &Prompt, default_max_tokens: u32) -> Result<Box<dyn super::Generation>> {
        let m = &self.0.text;
        let ids = m.prompt_ids(prompt)?;
        if ids.is_empty() {
            return Err(Error::BadInput("the prompt is no tokens".into()));
        }
        if ids.len() >= m.context {
            return Err(Error::BadInput(format!(
                "the prompt is {} tokens; the model's context is {} tokens",
                ids.len(),
                m.context
            )));
        }
        let room = m.context - ids.len();
        let max_tokens = match prompt.max_tokens {
            Some(n) if n as usize > room => {
                return Err(Error::BadInput(format!(
                    "max_tokens {n} + prompt {} = {} tokens: more than the model's context of {} tokens",
                    ids.len(),
                    n as usize + ids.len(),
                    m.context
                )))
            }
            Some(n) => n as usize,
            None => (default_max_tokens as usize).min(room),
        };
        let sampling = if prompt.temperature <= 0.0 {
            Sampling::ArgMax
        } else if prompt.top_p < 1.0 {
            Sampling::TopP { p: prompt.top_p, temperature: prompt.temperature }
        } else {
            Sampling::All { temperature: prompt.temperature }
        };
        Ok(Box::new(LlamaGeneration {
            cache: self.0.weights.cache(ids.len() + max_tokens),
            shared: self.0.clone(),
            prompt: ids,
            generated: Vec::new(),
            max_tokens,
            sampler: LogitsProcessor::from_sampling(prompt.seed, sampling),
            decoded: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }))
    }
}

impl Text {
    /// The prompt's token ids: its messages through the chat template (a
    /// model without one gets the text alone), or the raw prompt.
    fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let (text, special) = match (&prompt.input, &self.template) {
            (PromptInput::Chat(messages), Some(env)) => {
                let ctx = minijinja::context! {
                    messages => messages
                        .iter()
                        .map(|m| minijinja::Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
                        .collect::<Vec<_>>(),
                    add_generation_prompt => true,
                    bos_token => self.bos.as_str(),
                    eos_token => self.eos.as_str(),
                };
                let text = env.get_template("chat").and_then(|t| t.render(ctx)).map_err(|e| {
                    Error::BadInput(format!(
                        "the model's chat template refused the messages: {}",
                        first_line(&e.to_string())
                    ))
                })?;
                (text, false)
            }
            (PromptInput::Chat(messages), None) => {
                (messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"), true)
            }
            (PromptInput::Raw(text), _) => (text.clone(), true),
        };
        let encoding = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| Error::BadInput(format!("the prompt does not tokenize: {}", first_line(&e.to_string()))))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// One request's generation: its KV cache, its tokens.
struct LlamaGeneration {
    cache: llama::Cache,
    shared: Arc<Loaded>,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    max_tokens: usize,
    sampler: LogitsProcessor,
    /// Incremental decoding state (`tokenizers::step_decode_stream`).
    decoded: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl super::Generation for LlamaGeneration {
    fn prompt_tokens(&self) -> usize {
        self.prompt.len()
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn kv_bytes(&self) -> u64 {
        ((self.prompt.len() + self.max_tokens) as u64).saturating_mul(self.shared.text.kv_bytes_per_token)
    }

    fn step(&mut self) -> Result<super::Token> {
        let fail = |e: candle_core::Error| Error::Backend { backend: NAME, message: first_line(&e.to_string()) };
        let input = match self.generated.last() {
            None => self.prompt.as_slice(),
            Some(last) => std::slice::from_ref(last),
        };
        let logits = self.shared.weights.forward(input, &mut self.cache).map_err(fail)?;
        let id = self.sampler.sample(&logits).map_err(fail)?;
        if self.shared.text.ends.contains(&id) {
            return Ok(super::Token { id, text: String::new(), end: Some(super::Finish::Stop) });
        }
        self.generated.push(id);
        let text = tokenizers::tokenizer::step_decode_stream(
            &self.shared.text.tokenizer,
            vec![id],
            false,
            &mut self.decoded,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(|e| Error::Backend { backend: NAME, message: format!("decoding token {id}: {e}") })?
        .unwrap_or_default();
        // max_tokens fits the context (checked in `generate`).
        let end = (self.generated.len() >= self.max_tokens).then_some(super::Finish::Length);
        Ok(super::Token { id, text, end })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::gguf_file::VersionedMagic;

    use super::*;

    #[test]
    fn a_turn_ends_at_the_files_ids_and_the_named_end_tokens_it_has() {
        let tokens = ["a", "<|im_end|>", "b", "<|endoftext|>", "<|eot_id|>", "<end>"];
        let metadata = [
            ("tokenizer.ggml.tokens", Value::Array(tokens.iter().map(|t| Value::String(t.to_string())).collect())),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.eot_token_id", Value::U64(5)),
        ];
        let content = Content {
            magic: VersionedMagic::GgufV3,
            metadata: metadata.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        assert_eq!(end_of_turn_ids(&content), [1, 2, 3, 4, 5]);
    }
}
