"""Sentence embeddings from a sentence-transformers BERT model directory
(such as all-MiniLM-L6-v2 in target/fixtures/models/minilm-st), computed
independently of the Rust candle backend, so that the integration tests can
check that backend against it.

Independent: no candle, torch, transformers, sentence-transformers or
safetensors package. It reads model.safetensors by hand, runs the BERT
encoder in float64 NumPy from config.json, and pools and normalizes as
modules.json and the Pooling module's config.json say. Only tokenization is
shared in kind with the backend: the model's own tokenizer.json, run by the
Python `tokenizers` package. One sentence at a time, so there is no padding
and the attention mask is all ones.

    .venv/bin/python scripts/embed_reference.py MODEL_DIR < sentences.json > embeddings.json

stdin: a JSON list of strings; stdout: a JSON list of embeddings (lists of floats).
"""

import json
import math
import os
import struct
import sys

import numpy as np
from tokenizers import Tokenizer

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}
MODULES = "sentence_transformers.models."
erf = np.frompyfunc(math.erf, 1, 1)


def read_safetensors(path):
    """{name: float64 array} of the file's float tensors (integer ones, such as
    position_ids, as they are)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data = f.read()
    tensors = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        raw = data[start:end]
        if t["dtype"] == "BF16":  # the top half of a float32
            a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif t["dtype"] in DTYPES:
            a = np.frombuffer(raw, DTYPES[t["dtype"]])
        else:
            raise SystemExit(f"embed_reference: {name}: unsupported dtype {t['dtype']}")
        a = a.reshape(t["shape"])
        tensors[name] = a.astype(np.float64) if a.dtype.kind == "f" else a
    return tensors


def layer_norm(x, w, prefix, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w[prefix + ".weight"] + w[prefix + ".bias"]


def linear(x, w, prefix):
    return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]


def gelu(x):
    """The exact (erf) GELU, as BERT's "gelu"."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)).astype(np.float64))


def bert(ids, w, config):
    """The last hidden state, [tokens, hidden], of token ids with token type 0."""
    eps = config["layer_norm_eps"]
    heads = config["num_attention_heads"]
    n, hidden = len(ids), config["hidden_size"]
    d = hidden // heads
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, w, "embeddings.LayerNorm", eps)
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (
            linear(x, w, p + "attention.self." + m).reshape(n, heads, d).transpose(1, 0, 2)
            for m in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(n, hidden)
        attended = linear(context, w, p + "attention.output.dense") + x
        x = layer_norm(attended, w, p + "attention.output.LayerNorm", eps)
        inner = gelu(linear(x, w, p + "intermediate.dense"))
        x = layer_norm(linear(inner, w, p + "output.dense") + x, w, p + "output.LayerNorm", eps)
    return x


def pool(tokens, config):
    """sentence-transformers' Pooling: the enabled modes, concatenated in its order."""
    modes = {
        "pooling_mode_cls_token": lambda t: t[0],
        "pooling_mode_max_tokens": lambda t: t.max(0),
        "pooling_mode_mean_tokens": lambda t: t.mean(0),
        "pooling_mode_mean_sqrt_len_tokens": lambda t: t.sum(0) / math.sqrt(len(t)),
    }
    unsupported = [k for k, on in config.items() if k.startswith("pooling_mode") and on and k not in modes]
    chosen = [f(tokens) for k, f in modes.items() if config.get(k)]
    if unsupported or not chosen:
        raise SystemExit(f"embed_reference: unsupported pooling {unsupported or config}")
    return np.concatenate(chosen)


def load_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    model = sys.argv[1]
    config = load_json(model, "config.json")
    if config.get("model_type") != "bert" or config.get("position_embedding_type", "absolute") != "absolute":
        raise SystemExit("embed_reference: only BERT with absolute position embeddings")
    if config["hidden_act"] != "gelu":
        raise SystemExit(f"embed_reference: unsupported hidden_act {config['hidden_act']}")

    modules = {m["type"].removeprefix(MODULES): m["path"] for m in load_json(model, "modules.json")}
    if not set(modules) <= {"Transformer", "Pooling", "Normalize"} or "Pooling" not in modules:
        raise SystemExit(f"embed_reference: unsupported modules {sorted(modules)}")
    pooling = load_json(model, modules["Pooling"], "config.json")

    # Checkpoints saved from BertModel name tensors "embeddings...", those from
    # a task model "bert.embeddings...": take either.
    tensors = read_safetensors(os.path.join(model, "model.safetensors"))
    weights = {k.removeprefix("bert."): v for k, v in tensors.items()}

    max_len = config["max_position_embeddings"]
    if os.path.exists(os.path.join(model, "sentence_bert_config.json")):
        max_len = min(max_len, load_json(model, "sentence_bert_config.json").get("max_seq_length") or max_len)
    tokenizer = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_len)  # counting [CLS] and [SEP]

    embeddings = []
    for sentence in json.load(sys.stdin):
        ids = tokenizer.encode(sentence).ids  # with [CLS] and [SEP]
        e = pool(bert(np.array(ids), weights, config), pooling)
        if "Normalize" in modules:
            e = e / max(np.linalg.norm(e), 1e-12)
        embeddings.append(e.tolist())
    json.dump(embeddings, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
