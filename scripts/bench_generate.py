"""Generation benchmark: time to first token and tokens per second for the
five prompts of tests/fixtures/smollm2_llamacpp.json (greedy, 32 tokens),
through an aifs mount, against the same forward pass in process (aifs's, on
candle), candle-transformers' quantized llama in process, and llama.cpp in
process, on the same GGUF, in the same run, with the same threads (2).

Every way does the same work: it stops at 32 tokens or at the end of the
turn, and a rate counts the steps after the first token, the one that
produced the end of the turn included (as llama.cpp's timings and the
daemon's `times` do).

This machine's speed drifts by a fifth from minute to minute, so the ways
take turns request by request: each way loads once and then waits for the
next prompt (the mount is one; `generate_floor --serve` and a llama.cpp
process read a prompt's index per line), and each sample is one prompt run
by every way in a row, the order rotating from sample to sample. A ratio
is the median over the samples of the per-sample ratio: a slow minute
slows both sides of it.

    python3 scripts/bench_generate.py MNT GGUF [LLAMA_PYTHON]

MNT must have the GGUF imported as models/smollm (`cp GGUF MNT/models/smollm/`).
LLAMA_PYTHON: a Python with llama-cpp-python (see scripts/llamacpp_reference.py);
without it the llama.cpp row is skipped. The in-process floors are
`target/release/examples/generate_floor` (built first, so never older
than the daemon's code), release as the daemon should be
(`target/release/aifs-mountd`): in a debug build the daemon's own code
around each token (scheduling, streaming, FUSE) runs unoptimized, which
the floor has no counterpart for. Prints one JSON object: per way, the
median time to first token (ms) and tokens/s over the samples; the
mount's ratios to each (median, and the quartiles, of the per-sample
ratios).
"""

import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "tests/fixtures/smollm2_llamacpp.json")
FLOOR = os.path.join(REPO, "target/release/examples/generate_floor")
TOKENS = 32
ROUNDS = 8  # samples = ROUNDS x prompts

LLAMA = r"""
import json, sys, time
import llama_cpp, numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=2, n_batch=512, n_ubatch=512, flash_attn=False, verbose=False)
cases = json.load(open(sys.argv[2]))
vocab = llama_cpp.llama_model_get_vocab(llm.model)
for line in sys.stdin:
    case = cases[int(line)]
    llm.reset()
    t = time.monotonic()
    llm.eval(case["prompt_ids"])
    n = llm.n_vocab()
    first, tokens, steps = None, 0, 0
    while True:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n,))
        tok = int(logits.argmax())
        steps += 1
        if first is None:
            first = time.monotonic() - t
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            break
        tokens += 1
        if tokens == %d:
            break
        llm.eval([tok])
    total = time.monotonic() - t
    print(json.dumps({"ttft_ms": first * 1e3, "tokens_per_s": (steps - 1) / (total - first), "tokens": tokens}),
          flush=True)
""" % TOKENS


class Mount:
    def __init__(self, mnt, cases):
        self.infer = os.path.join(mnt, "models/smollm/latest/infer")
        self.bodies = [json.dumps({"messages": [{"role": "user", "content": c["prompt"]}],
                                   "max_tokens": TOKENS}).encode() for c in cases]
        self.prompt_tokens = [len(c["prompt_ids"]) for c in cases]

    def run(self, i):
        f = os.open(self.infer, os.O_RDWR)
        t = time.monotonic()
        os.write(f, self.bodies[i])
        data = os.read(f, 1 << 16)
        first = time.monotonic() - t
        while chunk := os.read(f, 1 << 16):
            data += chunk
        total = time.monotonic() - t
        os.close(f)
        last = json.loads(data.splitlines()[-1])
        # The end of the turn takes a step, like a token (no stop strings
        # here: "stop" is the end-of-turn token).
        steps = last["completion_tokens"] + (last["finish_reason"] == "stop")
        if last["prompt_tokens"] != self.prompt_tokens[i]:
            raise SystemExit(f"prompt {i}: the mount's prompt is {last['prompt_tokens']} tokens, "
                             f"the reference's {self.prompt_tokens[i]}")
        return {"ttft_ms": first * 1e3, "tokens_per_s": (steps - 1) / (total - first),
                "tokens": last["completion_tokens"]}


class Served:
    """A process that loads the model once and runs the prompt whose
    index each input line names, answering with one JSON line."""

    def __init__(self, argv):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, i):
        self.p.stdin.write(f"{i}\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"{self.p.args[0]} ended")
        d = json.loads(line)
        if d.get("equal") is False:
            raise SystemExit(f"prompt {i}: {self.p.args[0]}'s tokens differ from llama.cpp's at {d['first_diff']}")
        tokens = d["tokens"] if "tokens" in d else len(d["ids"])
        return {"ttft_ms": d["ttft_ms"], "tokens_per_s": d["tokens_per_s"], "tokens": tokens}

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def quartiles(values):
    q = statistics.quantiles(values, n=4)
    return [round(q[0], 2), round(statistics.median(values), 2), round(q[2], 2)]


def main():
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    mnt, gguf = sys.argv[1], sys.argv[2]
    subprocess.run(["cargo", "build", "--release", "--example", "generate_floor"], cwd=REPO, check=True)
    cases = json.load(open(REFERENCE))
    ways = {"mount": Mount(mnt, cases), "in process": Served([FLOOR, "aifs", gguf, REFERENCE, str(TOKENS), "--serve"])}
    if len(sys.argv) == 4:
        ways["llama.cpp"] = Served([sys.argv[3], "-c", LLAMA, gguf, REFERENCE])
    names = list(ways)
    for i in range(len(cases)):  # warm-up (the mount loads the model)
        for way in ways.values():
            way.run(i)
    samples = []
    for s in range(ROUNDS * len(cases)):
        i = s % len(cases)
        order = names[s % len(names):] + names[:s % len(names)]
        sample = {name: ways[name].run(i) for name in order}
        # Equal work: every way stopped where llama.cpp's reference did.
        if any(r["tokens"] != len(cases[i]["ids"]) for r in sample.values()):
            raise SystemExit(f"prompt {i}: answers of unequal length: {sample}")
        samples.append(sample)
    for way in ways.values():
        if isinstance(way, Served):
            way.close()
    # candle-transformers' model is far behind: one pass is enough.
    lines = subprocess.run([FLOOR, "candle", gguf, REFERENCE, str(TOKENS)], check=True, capture_output=True,
                           text=True).stdout.splitlines()
    candle = [json.loads(line) for line in lines]
    result = {}
    for name in names:
        result[name] = {key: round(statistics.median(s[name][key] for s in samples), 1)
                        for key in ("ttft_ms", "tokens_per_s")}
    result["candle"] = {key: round(statistics.median(d[key] for d in candle), 1) for key in ("ttft_ms", "tokens_per_s")}
    for base in names[1:]:
        for key in ("tokens_per_s", "ttft_ms"):
            result[f"mount/{base} {key} (quartiles)"] = quartiles([s["mount"][key] / s[base][key] for s in samples])
    for key in ("tokens_per_s", "ttft_ms"):
        result[f"mount/candle {key}"] = round(result["mount"][key] / result["candle"][key], 2)
    result["samples"] = len(samples)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
