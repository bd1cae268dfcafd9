"""One-handle latency of several daemon builds, in interleaved rounds: for
the small-request latency row of docs/BENCHMARKS.md, whether a change
moved it (docs/BENCHMARKS-analysis.md cites it). Client and daemon pinned
to CPU 0, as in the full run.

    .venv/bin/python scripts/ab_latency.py OLD_BIN NEW_BIN [ROUNDS]

Each build is mounted in turn with the ONNX Runtime library of .deps/;
the MLP, max_batch 1, .npy on one handle, 2000 requests a round.
"""

import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import FIXTURES, REPO, Daemon, npy, one_handle, pin, timed  # noqa: E402

LIB = os.path.join(REPO, ".deps/onnxruntime/onnxruntime/capi/libonnxruntime.so.1.32.0")


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    builds = {"old": sys.argv[1], "new": sys.argv[2]}
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    body = npy(np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32))
    os.sched_setaffinity(0, {0})
    p50s = {name: [] for name in builds}
    for _ in range(rounds):
        for name, binary in builds.items():
            work = tempfile.mkdtemp(prefix="aifs-ab-")
            d = Daemon(work, "--onnxruntime", LIB, binary=binary)
            try:
                pin(d.proc.pid, "0")
                v1 = d.add_model("mlp", os.path.join(FIXTURES, "mlp.onnx"), {"max_batch": 1})
                infer = os.path.join(v1, "infer")
                p50, _ = timed(lambda: one_handle(infer, body), 2000, warmup=200)
                p50s[name].append(round(p50))
            finally:
                d.stop()
                shutil.rmtree(work, ignore_errors=True)
    for name, values in p50s.items():
        print(f"{name}: one-handle .npy p50 per round (us): {values}")


if __name__ == "__main__":
    main()
