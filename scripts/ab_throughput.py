"""Throughput and import of several daemon builds, in interleaved rounds:
for the rows of docs/BENCHMARKS.md that swing between full runs, whether
a change moved them (docs/BENCHMARKS-analysis.md cites it).

    .venv/bin/python scripts/ab_throughput.py OLD_BIN NEW_BIN [ROUNDS]

Each build is mounted in turn with the ONNX Runtime library of .deps/:
MiniLM batched and unbatched and ocr_rec, 32 clients for 5 s each, then a
`cp` of big.onnx into a new model. Build first (scripts/bench.sh does);
copy the old build aside before building the new one.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import FIXTURES, REPO, Daemon, clients_throughput, npy, one_handle  # noqa: E402

LIB = os.path.join(REPO, ".deps/onnxruntime/onnxruntime/capi/libonnxruntime.so.1.32.0")


def throughput(call, clients):
    return clients_throughput(call, clients, 5)


def main():
    binaries = sys.argv[1:3]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, (1, 16))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    body = json.dumps({k: v.tolist() for k, v in feed.items()}).encode()
    x_rec = npy(rng.standard_normal((1, 3, 48, 320)).astype(np.float32))
    minilm = os.path.join(FIXTURES, "models", "minilm.onnx")
    rec = os.path.join(FIXTURES, "models", "ocr_rec.onnx")
    big = os.path.join(FIXTURES, "big.onnx")
    mb = os.path.getsize(big) / 2**20
    for _ in range(rounds):
        for binary in binaries:
            work = tempfile.mkdtemp()
            d = Daemon(work, "--onnxruntime", LIB, binary=binary)
            b = os.path.join(d.add_model("mini_b", minilm, {"max_batch": 32, "batch_delay_us": 2000}), "infer")
            u = os.path.join(d.add_model("mini_u", minilm, {"max_batch": 1}), "infer")
            r = os.path.join(d.add_model("rec", rec, {"max_batch": 1}), "infer")
            batched = throughput(lambda: one_handle(b, body), 32)
            unbatched = throughput(lambda: one_handle(u, body), 32)
            recs = throughput(lambda: one_handle(r, x_rec), 32)
            os.mkdir(d.path("models", "imp"))
            os.sync()
            subprocess.run(["cat", big], stdout=subprocess.DEVNULL)
            t = time.perf_counter()
            subprocess.run(["cp", big, d.path("models", "imp") + "/"], check=True)
            imported = mb / (time.perf_counter() - t)
            d.stop()
            shutil.rmtree(work, ignore_errors=True)
            print(
                f"{binary}: MiniLM batched {batched:.0f} req/s, unbatched {unbatched:.0f}; "
                f"ocr_rec {recs:.0f} req/s; import {imported:.0f} MB/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
