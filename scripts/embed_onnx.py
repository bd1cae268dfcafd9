"""Sentence embeddings from the int8 ONNX export of all-MiniLM-L6-v2
(target/fixtures/models/minilm.onnx) through onnxruntime's Python API: the
cross-check of the candle backend against another runtime and another
quantization. Mean pooling over the tokens, then L2 normalization, as the
model's sentence-transformers config says.

    .venv/bin/python scripts/embed_onnx.py MODEL.onnx TOKENIZER.json MAX_TOKENS < sentences.json

stdin: a JSON list of strings; stdout: a JSON list of embeddings.
"""

import json
import sys

import numpy as np
import onnxruntime
from tokenizers import Tokenizer


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    model, tokenizer_file, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tokenizer = Tokenizer.from_file(tokenizer_file)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    embeddings = []
    for sentence in json.load(sys.stdin):
        ids = np.array([tokenizer.encode(sentence).ids], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        tokens = session.run(None, feeds)[0][0]
        v = tokens.mean(axis=0)
        embeddings.append((v / np.linalg.norm(v)).tolist())
    json.dump(embeddings, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
