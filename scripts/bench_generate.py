"""Generation benchmark: time to first token and tokens per second for the
five prompts of tests/fixtures/smollm2_llamacpp.json (greedy, 32 tokens),
through an aifs mount, against the same forward pass in process (aifs's, on
candle), candle-transformers' quantized llama in process, and llama.cpp in
process, on the same GGUF, in the same run, with the same threads (2).
This machine's speed drifts by a fifth from minute to minute, so the mount
and its floors run in alternation, ROUNDS times (mount and floor taking
turns to go first), and each ratio is the median of the rounds' ratios.

    python3 scripts/bench_generate.py MNT GGUF [LLAMA_PYTHON]

MNT must have the GGUF imported as models/smollm (`cp GGUF MNT/models/smollm/`).
LLAMA_PYTHON: a Python with llama-cpp-python (see scripts/llamacpp_reference.py);
without it the llama.cpp row is skipped. The in-process floors are
`target/release/examples/generate_floor` (built first, so never older
than the daemon's code), release as the daemon should be
(`target/release/aifs-mountd`): in a debug build the daemon's own code
around each token (scheduling, streaming, FUSE) runs unoptimized, which
the floor has no counterpart for. Prints one JSON
object: per way, the median over rounds of each round's median time to
first token (ms) and tokens/s; the mount's ratios to each (the median of
the rounds' ratios); and every round's numbers.
"""

import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "tests/fixtures/smollm2_llamacpp.json")
TOKENS = 32
ROUNDS = 4

LLAMA = r"""
import json, sys, time
import llama_cpp, numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=2, n_batch=512, n_ubatch=512, flash_attn=False, verbose=False)
out = []
for case in json.load(open(sys.argv[2])):
    for _ in range(2):  # the first is a warm-up
        llm.reset()
        t = time.monotonic()
        llm.eval(case["prompt_ids"])
        n = llm.n_vocab()
        first = None
        for i in range(%d):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n,))
            tok = int(logits.argmax())
            if first is None:
                first = time.monotonic() - t
            llm.eval([tok])
        total = time.monotonic() - t
    out.append({"ttft_ms": first * 1e3, "tokens_per_s": (%d - 1) / (total - first)})
print(json.dumps(out))
""" % (TOKENS, TOKENS)


def mount(mnt):
    infer = os.path.join(mnt, "models/smollm/latest/infer")
    out = []
    for case in json.load(open(REFERENCE)):
        body = json.dumps({"messages": [{"role": "user", "content": case["prompt"]}],
                           "max_tokens": TOKENS}).encode()
        for _ in range(2):  # the first is a warm-up (and loads the model)
            f = os.open(infer, os.O_RDWR)
            t = time.monotonic()
            os.write(f, body)
            data = os.read(f, 1 << 16)
            first = time.monotonic() - t
            while chunk := os.read(f, 1 << 16):
                data += chunk
            total = time.monotonic() - t
            os.close(f)
        last = json.loads(data.splitlines()[-1])
        n = last["completion_tokens"]
        out.append({"ttft_ms": first * 1e3, "tokens_per_s": (n - 1) / (total - first), "tokens": n})
    return out


def floor(way, gguf):
    """`generate_floor`'s rows: `aifs` (the daemon's forward pass, in
    process) or `candle` (candle-transformers' quantized llama)."""
    binary = os.path.join(REPO, "target/release/examples/generate_floor")
    for _ in range(2):  # the first is a warm-up
        lines = subprocess.run([binary, way, gguf, REFERENCE, str(TOKENS)], check=True, capture_output=True,
                               text=True).stdout
    return [{"ttft_ms": d["ttft_ms"], "tokens_per_s": d["tokens_per_s"]} for d in map(json.loads, lines.splitlines())]


def median(rows, key):
    return round(statistics.median(r[key] for r in rows), 1)


def summary(rows):
    return {"ttft_ms": median(rows, "ttft_ms"), "tokens_per_s": median(rows, "tokens_per_s")}


def main():
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    mnt, gguf = sys.argv[1], sys.argv[2]
    subprocess.run(["cargo", "build", "--release", "--example", "generate_floor"], cwd=REPO, check=True)
    rounds = []
    for r in range(ROUNDS):
        # Mount and floor take turns going first: what ran just before
        # (llama.cpp, a build) must not favour one of them.
        if r % 2 == 0:
            ways = {"mount": mount(mnt), "in process": floor("aifs", gguf)}
        else:
            ways = {"in process": floor("aifs", gguf)}
            ways["mount"] = mount(mnt)
        if len(sys.argv) == 4:
            ways["llama.cpp"] = json.loads(subprocess.run([sys.argv[3], "-c", LLAMA, gguf, REFERENCE], check=True,
                                                          capture_output=True, text=True).stdout)
        rounds.append({way: summary(rows) for way, rows in ways.items()})
    # candle-transformers' model is far behind: once is enough.
    candle = summary(floor("candle", gguf))
    result = {way: {key: round(statistics.median(r[way][key] for r in rounds), 1) for key in ("ttft_ms", "tokens_per_s")}
              for way in rounds[0]}
    result["candle"] = candle
    for base in ("in process", "candle", "llama.cpp"):
        for key in ("tokens_per_s", "ttft_ms"):
            if base == "candle":
                result[f"mount/{base} {key}"] = round(result["mount"][key] / candle[key], 2)
            elif base in result:
                ratios = [r["mount"][key] / r[base][key] for r in rounds]
                result[f"mount/{base} {key}"] = round(statistics.median(ratios), 2)
                result[f"mount/{base} {key}, each round"] = [round(x, 2) for x in ratios]
    result["rounds"] = rounds
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
