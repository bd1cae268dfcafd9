//! The llama forward pass, on candle's tensors and quantized matmuls.
//!
//! The weights load once ([`Weights`], shared by every generation of a
//! version); a generation owns only its [`Cache`] (its keys and values in
//! f16, room for its prompt and `max_tokens` allocated at the start).
//! Q4_1 and Q8_0 weights run on our SIMD kernels (`aifs_kernels::q4_1`,
//! `aifs_kernels::q8_0`), Q5_0 and Q5_1 as Q8_0 (see [`load_tensor`]),
//! every other type on candle's. Everything else (RMS norm, RoPE,
//! attention, SwiGLU) is `aifs_kernels::ggml`: the float arithmetic of
//! llama.cpp's CPU backend, so that a model of those types gives its
//! logits to the bit (candle's kernels for other types sum in their own
//! order: close, not equal).
//!
//! Promises: [`Dims::of`] (at import, from the header alone) refuses with
//! the reason a file whose dimensions do not fit together or whose
//! tensors are missing or of another shape, a mixture of experts, RoPE
//! scaling; after it, [`Weights::load`] reads no tensor of an unexpected
//! shape. [`Weights::forward`] returns the logits of the last position
//! given, or an error (positions past the cache's room, an id outside the
//! vocabulary), never a panic.

use std::fs::File;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{bail, DType, Device, Module, Result, Tensor, D};

use aifs_kernels::{ggml, q4_1, q8_0};

/// One transformer block.
#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    /// Queries, keys and values.
    qkv: Stacked<3>,
    out: QMatMul,
    ffn_norm: Vec<f32>,
    /// The gate and the up projection.
    gate_up: Stacked<2>,
    down: QMatMul,
}

/// `N` matrices that multiply the same input. Stacked into one matrix
/// when they have the same type: one matmul then quantizes the input once
/// and splits one larger job among the threads, instead of `N`.
#[derive(Debug)]
enum Stacked<const N: usize> {
    One(QMatMul, [usize; N]),
    Apart(Vec<QMatMul>),
}

impl<const N: usize> Stacked<N> {
    fn new(parts: [QTensor; N]) -> Result<Self> {
        let dtype = parts[0].dtype();
        if parts.iter().any(|p| p.dtype() != dtype) {
            return Ok(Stacked::Apart(parts.into_iter().map(QMatMul::from_qtensor).collect::<Result<_>>()?));
        }
        let rows = parts.each_ref().map(|p| p.shape().dims()[0]);
        let cols = parts[0].shape().dims()[1];
        let mut bytes = Vec::new();
        for p in parts {
            bytes.extend_from_slice(&p.data()?);
        }
        let shape = (rows.iter().sum::<usize>(), cols);
        let t = match dtype {
            GgmlDType::Q4_1 => q4_1::qtensor(&bytes, shape)?,
            GgmlDType::Q8_0 => q8_0::qtensor(&bytes, shape)?,
            _ => QTensor::new(QStorage::from_data(bytes.into(), &Device::Cpu, dtype)?, shape)?,
        };
        Ok(Stacked::One(QMatMul::from_qtensor(t)?, rows))
    }

    /// Each matrix times `x`, in order.
    fn forward(&self, x: &Tensor) -> Result<[Tensor; N]> {
        let out: Vec<Tensor> = match self {
            Stacked::Apart(ms) => ms.iter().map(|m| m.forward(x)).collect::<Result<_>>()?,
            Stacked::One(m, rows) => {
                let y = m.forward(x)?;
                let mut start = 0;
                rows.iter()
                    .map(|&n| {
                        start += n;
                        y.narrow(D::Minus1, start - n, n)
                    })
                    .collect::<Result<_>>()?
            }
        };
        out.try_into().map_err(|_| candle_core::Error::Msg("stacked outputs".into()))
    }
}

/// A llama model's weights and shape.
#[derive(Debug)]
pub struct Weights {
    embed: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: QMatMul,
    dims: Dims,
    /// RoPE's cosines and sines, `head_dim / 2` a position.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Positions of a prompt run at once: llama.cpp's default micro-batch
/// (`n_ubatch`), which matters to the bit: ggml sums a batch's attention
/// otherwise than one position's (see `aifs_kernels::ggml`).
pub const CHUNK: usize = 512;

/// One generation's keys and values, and how many positions it holds.
pub struct Cache {
    layers: Vec<ggml::KvCache>,
    len: usize,
    /// Positions it has room for.
    room: usize,
    /// A forward pass failed midway: the layers disagree on `len`.
    broken: bool,
}

impl Cache {
    /// Positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A llama's dimensions, from its metadata, checked against every tensor
/// the forward pass reads: from the header alone, no weight read.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    layers: usize,
    width: usize,
    ff: usize,
    vocab: usize,
    eps: f64,
    base: f32,
}

/// Tensors in each block.
const BLOCK_TENSORS: [&str; 9] =
    ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"];

impl Dims {
    /// The dimensions of the llama in `content`, or why it cannot run:
    /// a mixture of experts, RoPE scaling or partial RoPE, dimensions that
    /// do not fit together, a tensor missing or of another shape.
    pub fn of(content: &Content) -> Result<Dims> {
        let meta = |key: &str| content.metadata.get(&format!("llama.{key}"));
        let number = |key: &str| -> Result<Option<usize>> {
            meta(key)
                .map(|v| {
                    v.to_u64()
                        .or_else(|_| v.to_u32().map(u64::from))
                        .map(|n| n as usize)
                        .map_err(|_| candle_core::Error::Msg(format!("metadata llama.{key} is not a count")))
                })
                .transpose()
        };
        let count =
            |key: &str| number(key)?.ok_or_else(|| candle_core::Error::Msg(format!("metadata llama.{key} is missing")));
        let real = |key: &str| meta(key).and_then(|v| v.to_f32().ok().or_else(|| v.to_f64().ok().map(|f| f as f32)));
        if number("expert_count")?.is_some_and(|n| n > 0) {
            bail!("mixture-of-experts llama models are not supported");
        }
        if let Some(kind) = meta("rope.scaling.type").and_then(|v| v.to_string().ok()).filter(|k| *k != "none") {
            bail!("RoPE scaling ({kind}) is not supported");
        }
        let (heads, kv_heads, layers, width) = (
            count("attention.head_count")?,
            count("attention.head_count_kv")?,
            count("block_count")?,
            count("embedding_length")?,
        );
        if width == 0
            || heads == 0
            || kv_heads == 0
            || heads % kv_heads != 0
            || width % heads != 0
            || (width / heads) % 2 != 0
        {
            bail!("{heads} heads, {kv_heads} key/value heads and width {width} do not fit together");
        }
        let head_dim = width / heads;
        if let Some(rope) = number("rope.dimension_count")?.filter(|&r| r != head_dim) {
            bail!("partial RoPE ({rope} of {head_dim} dimensions) is not supported");
        }
        if layers == 0 || layers > content.tensor_infos.len() / BLOCK_TENSORS.len() {
            bail!("block_count {layers} does not fit the file's {} tensors", content.tensor_infos.len());
        }
        let shape = |name: &str| {
            content
                .tensor_infos
                .get(name)
                .map(|i| i.shape.dims().to_vec())
                .ok_or_else(|| candle_core::Error::Msg(format!("tensor {name} is missing")))
        };
        let (vocab, ff) = match (&shape("token_embd.weight")?[..], &shape("blk.0.ffn_gate.weight")?[..]) {
            ([vocab, w], [ff, w2]) if *w == width && *w2 == width && *vocab > 0 && *ff > 0 => (*vocab, *ff),
            (e, g) => bail!("token_embd.weight {e:?} and blk.0.ffn_gate.weight {g:?} do not fit width {width}"),
        };
        let dims = Dims {
            heads,
            kv_heads,
            head_dim,
            layers,
            width,
            ff,
            vocab,
            eps: real("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64,
            base: real("rope.freq_base").unwrap_or(10_000.0),
        };
        for i in 0..layers {
            for what in BLOCK_TENSORS {
                let name = format!("blk.{i}.{what}.weight");
                let want = dims.shape(what);
                if shape(&name)? != want {
                    bail!("{name} is {:?}, not {want:?}", shape(&name)?);
                }
            }
        }
        for (name, want) in [
            ("output_norm.weight", vec![width]),
            ("output.weight", vec![vocab, width]),
            ("rope_freqs.weight", vec![head_dim / 2]),
        ] {
            match shape(name) {
                Ok(got) if got != want => bail!("{name} is {got:?}, not {want:?}"),
                Err(e) if name == "output_norm.weight" => return Err(e),
                _ => {}
            }
        }
        Ok(dims)
    }

    /// Bytes of KV cache a position takes: keys and values, f16, every layer.
    pub fn kv_bytes_per_token(&self) -> u64 {
        [self.layers, self.kv_heads, self.head_dim].iter().fold(2 * 2, |b: u64, &n| b.saturating_mul(n as u64))
    }

    /// The shape of a block's tensor.
    fn shape(&self, what: &str) -> Vec<usize> {
        let kv = self.kv_heads * self.head_dim;
        match what {
            "attn_norm" | "ffn_norm" => vec![self.width],
            "attn_k" | "attn_v" => vec![kv, self.width],
            "ffn_gate" | "ffn_up" => vec![self.ff, self.width],
            "ffn_down" => vec![self.width, self.ff],
            _ => vec![self.width, self.width],
        }
    }
}

impl Weights {
    /// The weights of `content` (read from `file`), for at most `context`
    /// positions.
    pub fn load(content: &Content, file: &mut File, context: usize) -> Result<Self> {
        let dims = Dims::of(content)?;
        let mut tensor = |name: &str| load_tensor(content, file, name);
        // Llama 3.1's long-context frequency factors, when the file has them.
        let factors = if content.tensor_infos.contains_key("rope_freqs.weight") {
            Some(tensor("rope_freqs.weight")?.dequantize(&Device::Cpu)?.to_vec1::<f32>()?)
        } else {
            None
        };
        let (cos, sin) = rope_tables(context, dims.head_dim, dims.base, factors.as_deref())?;
        let vector = |t: QTensor| t.dequantize(&Device::Cpu)?.to_vec1::<f32>();
        // Shared by the input and the output when the file has no output.weight.
        let embed = Arc::new(tensor("token_embd.weight")?);
        let output = if content.tensor_infos.contains_key("output.weight") {
            QMatMul::from_qtensor(tensor("output.weight")?)?
        } else {
            QMatMul::from_arc(embed.clone())?
        };
        let norm = vector(tensor("output_norm.weight")?)?;
        let mut layers = Vec::new();
        for i in 0..dims.layers {
            let mut t = |what: &str| tensor(&format!("blk.{i}.{what}.weight"));
            layers.push(Layer {
                attn_norm: vector(t("attn_norm")?)?,
                qkv: Stacked::new([t("attn_q")?, t("attn_k")?, t("attn_v")?])?,
                out: QMatMul::from_qtensor(t("attn_output")?)?,
                ffn_norm: vector(t("ffn_norm")?)?,
                gate_up: Stacked::new([t("ffn_gate")?, t("ffn_up")?])?,
                down: QMatMul::from_qtensor(t("ffn_down")?)?,
            });
        }
        Ok(Weights { embed, layers, norm, output, dims, cos, sin })
    }

    /// An empty cache with room for `positions`.
    pub fn cache(&self, positions: usize) -> Cache {
        let room = positions.min(self.cos.len() / (self.dims.head_dim / 2));
        let layers =
            self.layers.iter().map(|_| ggml::KvCache::new(self.dims.kv_heads, self.dims.head_dim, room)).collect();
        Cache { layers, len: 0, room, broken: false }
    }

    /// Runs `ids` at the cache's next positions; the logits of the last.
    /// A long prompt runs in chunks of [`CHUNK`] positions, which bounds
    /// the attention's scores in memory. After an error the cache is
    /// unusable (some layers may hold positions others do not).
    pub fn forward(&self, ids: &[u32], cache: &mut Cache) -> Result<Tensor> {
        let start = cache.len;
        let room = cache.room;
        if cache.broken {
            bail!("this generation's cache was left incomplete by a failed step");
        }
        if ids.is_empty() || start + ids.len() > room {
            bail!(
                "positions {start}..{} are outside the {room} the cache and context have room for",
                start + ids.len()
            );
        }
        if let Some(id) = ids.iter().find(|&&id| id as usize >= self.dims.vocab) {
            bail!("token id {id} is outside the vocabulary of {}", self.dims.vocab);
        }
        cache.broken = true;
        let mut logits = None;
        for chunk in ids.chunks(CHUNK) {
            logits = Some(self.forward_chunk(chunk, cache)?);
        }
        cache.broken = false;
        logits.ok_or_else(|| candle_core::Error::Msg("no positions".into()))
    }

    fn forward_chunk(&self, ids: &[u32], cache: &mut Cache) -> Result<Tensor> {
        let Dims { heads, kv_heads, head_dim: d, eps, .. } = self.dims;
        let (t, start, eps) = (ids.len(), cache.len, eps as f32);
        let mut x = self.embed.embedding(&Tensor::new(ids, &Device::Cpu)?)?.unsqueeze(0)?; // (1, t, width)
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let [q, k, v] = layer.qkv.forward(&rms_norm(&x, &layer.attn_norm, eps)?)?;
            // Position by position, head by head.
            let (mut q, mut k) = (values(&q)?, values(&k)?);
            let pairs = d / 2;
            for (i, (q, k)) in q.chunks_mut(heads * d).zip(k.chunks_mut(kv_heads * d)).enumerate() {
                let at = (start + i) * pairs..(start + i + 1) * pairs;
                ggml::rope(q, d, &self.cos[at.clone()], &self.sin[at.clone()]);
                ggml::rope(k, d, &self.cos[at.clone()], &self.sin[at]);
            }
            kv.store(start, &k, &values(&v)?);
            let o = Tensor::from_vec(kv.attend(&q, heads, start), (1, t, heads * d), &Device::Cpu)?;
            x = (x + layer.out.forward(&o)?)?;
            let [gate, up] = layer.gate_up.forward(&rms_norm(&x, &layer.ffn_norm, eps)?)?;
            let mut g = values(&gate)?;
            ggml::swiglu(&mut g, &values(&up)?, self.dims.ff);
            x = (x + layer.down.forward(&Tensor::from_vec(g, gate.shape(), &Device::Cpu)?)?)?;
        }
        cache.len += t;
        let last = rms_norm(&x.narrow(1, t - 1, 1)?, &self.norm, eps)?;
        self.output.forward(&last)?.flatten_all()
    }
}

/// A tensor's values in order, as a vector.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// A tensor of the file, as it runs best: a Q4_1 or Q8_0 matrix on our
/// kernels ([`q4_1`], [`q8_0`]); Q5_0 and Q5_1, whose kernels in candle are
/// scalar, as Q8_0 (about twice as fast, and finer than their 5-bit steps,
/// for 8.5 bits a weight instead of 5.5-6); every other type as candle
/// reads it.
fn load_tensor(content: &Content, file: &mut File, name: &str) -> Result<QTensor> {
    let t = content.tensor(file, name, &Device::Cpu)?;
    if t.rank() != 2 {
        return Ok(t);
    }
    let shape = t.shape().dims2()?;
    match t.dtype() {
        GgmlDType::Q4_1 => q4_1::qtensor(&t.data()?, shape),
        GgmlDType::Q8_0 => q8_0::qtensor(&t.data()?, shape),
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            q8_0::qtensor(&QTensor::quantize(&t.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?.data()?, shape)
        }
        _ => Ok(t),
    }
}

/// RoPE's tables as ggml computes them: the angle of pair `i` at position
/// `p` is `p·base^(-2i/d)`, the power taken by repeated multiplication in
/// f32, divided by the pair's frequency factor when there is one.
fn rope_tables(positions: usize, head_dim: usize, base: f32, factors: Option<&[f32]>) -> Result<(Vec<f32>, Vec<f32>)> {
    let pairs = head_dim / 2;
    if factors.is_some_and(|f| f.len() != pairs) {
        bail!("rope_freqs has {} factors, not {pairs}", factors.map_or(0, <[f32]>::len));
    }
    let scale = base.powf(-2.0 / head_dim as f32);
    let (mut cos, mut sin) = (Vec::with_capacity(positions * pairs), Vec::with_capacity(positions * pairs));
    for p in 0..positions {
        let mut theta = p as f32;
        for i in 0..pairs {
            let angle = theta / factors.map_or(1.0, |f| f[i]);
            cos.push(angle.cos());
            sin.push(angle.sin());
            theta *= scale;
        }
    }
    Ok((cos, sin))
}

/// RMS normalization as ggml computes it ([`ggml::rms_norm`]).
fn rms_norm(x: &Tensor, weight: &[f32], eps: f32) -> Result<Tensor> {
    let mut v = values(x)?;
    ggml::rms_norm(&mut v, weight, eps);
    Tensor::from_vec(v, x.shape(), &Device::Cpu)
}

/// The largest logit's index (greedy decoding).
pub fn argmax(logits: &Tensor) -> Result<u32> {
    logits.to_dtype(DType::F32)?.argmax(D::Minus1)?.to_scalar::<u32>()
}

#[cfg(test)]
mod tests {
    use std::io::Seek;

    use candle_core::quantized::gguf_file::{self, Value};

    use super::*;

    const WIDTH: usize = 64;
    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const FF: usize = 96;
    const VOCAB: usize = 40;
    const LAYERS: usize = 2;
    const HEAD_DIM: usize = WIDTH / HEADS;

    /// Numbers from a fixed generator, in [-scale, scale).
    fn numbers(seed: &mut u32, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((*seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// A tiny llama's tensors (name, rows, columns, values): norms near 1,
    /// matrices small enough that activations stay in range.
    fn tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut seed = 7;
        let mut t = vec![("token_embd.weight".to_string(), vec![VOCAB, WIDTH], numbers(&mut seed, VOCAB * WIDTH, 1.0))];
        let norm = |seed: &mut u32| numbers(seed, WIDTH, 0.2).into_iter().map(|x| 1.0 + x).collect::<Vec<_>>();
        for i in 0..LAYERS {
            let kv = KV_HEADS * HEAD_DIM;
            for (what, rows, cols) in [
                ("attn_q", WIDTH, WIDTH),
                ("attn_k", kv, WIDTH),
                ("attn_v", kv, WIDTH),
                ("attn_output", WIDTH, WIDTH),
                ("ffn_gate", FF, WIDTH),
                ("ffn_up", FF, WIDTH),
                ("ffn_down", WIDTH, FF),
            ] {
                let scale = 1.0 / (cols as f32).sqrt();
                t.push((format!("blk.{i}.{what}.weight"), vec![rows, cols], numbers(&mut seed, rows * cols, scale)));
            }
            t.push((format!("blk.{i}.attn_norm.weight"), vec![WIDTH], norm(&mut seed)));
            t.push((format!("blk.{i}.ffn_norm.weight"), vec![WIDTH], norm(&mut seed)));
        }
        t.push(("output_norm.weight".to_string(), vec![WIDTH], norm(&mut seed)));
        t
    }

    /// The tensors as a GGUF file, matrices of type `dtype` (those named in
    /// `q8_0` of type Q8_0), with `extra` metadata; and its content read back.
    fn gguf_mixed(
        tensors: &[(String, Vec<usize>, Vec<f32>)],
        dtype: GgmlDType,
        q8_0: &[&str],
        extra: &[(&str, Value)],
    ) -> (File, Content) {
        let mut meta: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.attention.head_count", Value::U32(HEADS as u32)),
            ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
            ("llama.block_count", Value::U32(LAYERS as u32)),
            ("llama.embedding_length", Value::U32(WIDTH as u32)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.rope.freq_base", Value::F32(10_000.0)),
        ];
        meta.extend(extra.iter().cloned());
        let q: Vec<(&str, QTensor)> = tensors
            .iter()
            .map(|(name, shape, values)| {
                let t = Tensor::from_vec(values.clone(), shape.as_slice(), &Device::Cpu).unwrap();
                let dtype = match shape.len() {
                    2 if q8_0.contains(&name.as_str()) => GgmlDType::Q8_0,
                    2 => dtype,
                    _ => GgmlDType::F32,
                };
                (name.as_str(), QTensor::quantize(&t, dtype).unwrap())
            })
            .collect();
        let mut file = tempfile::tempfile().unwrap();
        let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let q: Vec<(&str, &QTensor)> = q.iter().map(|(k, t)| (*k, t)).collect();
        gguf_file::write(&mut file, &meta, &q).unwrap();
        file.rewind().unwrap();
        let content = Content::read(&mut file).unwrap();
        (file, content)
    }

    fn gguf(tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: GgmlDType, extra: &[(&str, Value)]) -> (File, Content) {
        gguf_mixed(tensors, dtype, &[], extra)
    }

    /// Each tensor of the file as its blocks stand for, in f32.
    fn dequantized(file: &mut File, content: &Content) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let q = content.tensor(file, name, &Device::Cpu).unwrap();
                let values = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (name.clone(), q.shape().dims().to_vec(), values)
            })
            .collect()
    }

    /// The llama equations written out plainly, in f32, on the tensors'
    /// own values, with attention's inputs rounded to f16 as llama.cpp
    /// rounds them: the logits after `ids`.
    fn reference(tensors: &[(String, Vec<usize>, Vec<f32>)], ids: &[u32]) -> Vec<f32> {
        let w = |name: &str| &tensors.iter().find(|(n, _, _)| n == name).unwrap().2;
        let matvec = |m: &[f32], x: &[f32]| {
            m.chunks(x.len()).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect::<Vec<f32>>()
        };
        let norm = |x: &[f32], g: &[f32]| {
            let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + 1e-5).sqrt();
            x.iter().zip(g).map(|(v, g)| v / rms * g).collect::<Vec<f32>>()
        };
        let rope = |x: &mut [f32], pos: usize| {
            for head in x.chunks_mut(HEAD_DIM) {
                for i in 0..HEAD_DIM / 2 {
                    let angle = pos as f32 * 10_000f32.powf(-2.0 * i as f32 / HEAD_DIM as f32);
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * angle.cos() - b * angle.sin();
                    head[2 * i + 1] = a * angle.sin() + b * angle.cos();
                }
            }
        };
        let f16 = |x: &f32| half::f16::from_f32(*x).to_f32();
        let embed = w("token_embd.weight");
        let mut xs: Vec<Vec<f32>> = ids.iter().map(|&id| embed[id as usize * WIDTH..][..WIDTH].to_vec()).collect();
        for l in 0..LAYERS {
            let w = |what: &str| w(&format!("blk.{l}.{what}.weight"));
            let (mut ks, mut vs) = (Vec::new(), Vec::new());
            let mut outs = Vec::new();
            for (pos, x) in xs.iter().enumerate() {
                let h = norm(x, w("attn_norm"));
                let mut q = matvec(w("attn_q"), &h);
                let mut k = matvec(w("attn_k"), &h);
                rope(&mut q, pos);
                rope(&mut k, pos);
                ks.push(k.iter().map(f16).collect::<Vec<_>>());
                vs.push(matvec(w("attn_v"), &h).iter().map(f16).collect::<Vec<_>>());
                let mut o = vec![0f32; WIDTH];
                for head in 0..HEADS {
                    let kvh = head / (HEADS / KV_HEADS);
                    let qh = &q[head * HEAD_DIM..][..HEAD_DIM];
                    let scores: Vec<f32> = ks
                        .iter()
                        .map(|k| {
                            qh.iter().zip(&k[kvh * HEAD_DIM..][..HEAD_DIM]).map(|(a, b)| f16(a) * b).sum::<f32>()
                                / (HEAD_DIM as f32).sqrt()
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f32 = e.iter().sum();
                    for (p, v) in e.iter().zip(&vs) {
                        for d in 0..HEAD_DIM {
                            o[head * HEAD_DIM + d] += f16(&(p / sum)) * v[kvh * HEAD_DIM + d];
                        }
                    }
                }
                outs.push(matvec(w("attn_output"), &o));
            }
            for (x, o) in xs.iter_mut().zip(outs) {
                x.iter_mut().zip(o).for_each(|(x, o)| *x += o);
                let h = norm(x, w("ffn_norm"));
                let (g, u) = (matvec(w("ffn_gate"), &h), matvec(w("ffn_up"), &h));
                let f: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                x.iter_mut().zip(matvec(w("ffn_down"), &f)).for_each(|(x, d)| *x += d);
            }
        }
        matvec(embed, &norm(xs.last().unwrap(), w("output_norm.weight")))
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
    }

    const IDS: [u32; 6] = [3, 17, 29, 5, 39, 0];

    #[test]
    fn the_forward_pass_is_the_llama_equations() {
        let t = tensors();
        let (mut file, content) = gguf(&t, GgmlDType::F32, &[]);
        let w = Weights::load(&content, &mut file, 16).unwrap();
        let want = reference(&t, &IDS);
        // The prompt at once, and then token by token: the same logits.
        let mut cache = w.cache(IDS.len());
        let got = w.forward(&IDS, &mut cache).unwrap().to_vec1::<f32>().unwrap();
        // Equal but for the order of sums (and an f16 rounding it may flip).
        let close = want.iter().fold(0f32, |m, x| m.max(x.abs())) * 1e-5;
        assert!(max_diff(&got, &want) < close, "{got:?}\n{want:?}");
        let mut cache = w.cache(IDS.len());
        w.forward(&IDS[..2], &mut cache).unwrap();
        let mut last = None;
        for id in &IDS[2..] {
            last = Some(w.forward(&[*id], &mut cache).unwrap().to_vec1::<f32>().unwrap());
        }
        assert!(max_diff(&last.unwrap(), &want) < close);
        assert_eq!(cache.len(), IDS.len());
        // Past the cache's room, or the vocabulary: an error, not a panic.
        assert!(w.forward(&[1], &mut cache).is_err());
        let mut cache = w.cache(4);
        let err = w.forward(&[VOCAB as u32], &mut cache).unwrap_err().to_string();
        assert!(err.contains("token id 40 is outside the vocabulary of 40"), "{err}");
    }

    /// A prompt longer than a chunk (its last chunk one position, which
    /// ggml sums otherwise), in a cache with room to spare.
    #[test]
    fn a_prompt_longer_than_a_chunk_is_the_llama_equations() {
        let t = tensors();
        let (mut file, content) = gguf(&t, GgmlDType::F32, &[]);
        let w = Weights::load(&content, &mut file, 600).unwrap();
        let ids: Vec<u32> = (0..CHUNK as u32 + 1).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
        let want = reference(&t, &ids);
        let got = w.forward(&ids, &mut w.cache(600)).unwrap().to_vec1::<f32>().unwrap();
        let close = want.iter().fold(0f32, |m, x| m.max(x.abs())) * 1e-5;
        assert!(max_diff(&got, &want) < close, "{got:?}\n{want:?}");
    }

    /// The logits of `IDS` from the file, against the equations on what
    /// its blocks stand for: close, as activations are rounded to 8 bits
    /// before each quantized matmul.
    fn close_to_the_equations(mut file: File, content: Content) {
        let w = Weights::load(&content, &mut file, 16).unwrap();
        let want = reference(&dequantized(&mut file, &content), &IDS);
        let got = w.forward(&IDS, &mut w.cache(IDS.len())).unwrap().to_vec1::<f32>().unwrap();
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max_diff(&got, &want) < 0.05 * scale, "{got:?}\n{want:?}");
    }

    #[test]
    fn q4_1_weights_run_on_our_kernel_close_to_the_equations() {
        let (file, content) = gguf(&tensors(), GgmlDType::Q4_1, &[]);
        close_to_the_equations(file, content);
    }

    #[test]
    fn matrices_of_mixed_types_run_apart() {
        // As in Q4_K_M files: some of q/k/v and gate/up of another type.
        let (file, content) =
            gguf_mixed(&tensors(), GgmlDType::Q4_1, &["blk.0.attn_v.weight", "blk.1.ffn_up.weight"], &[]);
        close_to_the_equations(file, content);
    }

    #[test]
    fn files_that_do_not_fit_are_refused_with_the_reason() {
        let t = tensors();
        let err = |t: &[(String, Vec<usize>, Vec<f32>)], extra: &[(&str, Value)]| {
            let (mut file, content) = gguf(t, GgmlDType::F32, extra);
            Weights::load(&content, &mut file, 16).unwrap_err().to_string()
        };
        assert!(err(&t, &[("llama.expert_count", Value::U32(8))]).contains("mixture-of-experts"));
        assert!(err(&t, &[("llama.attention.head_count_kv", Value::U32(3))]).contains("do not fit together"));
        assert!(err(&t, &[("llama.rope.scaling.type", Value::String("yarn".into()))]).contains("RoPE scaling (yarn)"));
        // Hostile counts are refused before anything is allocated for them.
        let e = err(&t, &[("llama.block_count", Value::U64(1 << 40))]);
        assert!(e.contains("block_count 1099511627776 does not fit the file's 20 tensors"), "{e}");
        let e = err(&t, &[("llama.embedding_length", Value::U64(1 << 40))]);
        assert!(e.contains("do not fit width 1099511627776"), "{e}");
        let mut wrong = t.clone();
        let k = wrong.iter_mut().find(|(n, _, _)| n == "blk.1.attn_k.weight").unwrap();
        k.1 = vec![HEAD_DIM, WIDTH];
        k.2.truncate(HEAD_DIM * WIDTH);
        let e = err(&wrong, &[]);
        assert!(e.contains("blk.1.attn_k.weight is [16, 64], not [32, 64]"), "{e}");
        let missing: Vec<_> = t.iter().filter(|(n, _, _)| n != "blk.0.ffn_up.weight").cloned().collect();
        let e = err(&missing, &[]);
        assert!(e.contains("blk.0.ffn_up.weight"), "{e}");
    }
}
