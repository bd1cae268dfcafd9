"""One benchmark scenario at a time, for profiling: what docs/BENCHMARKS.md's
"why" sections were measured with. Mounts the release daemon (and echofs,
the trivial FUSE floor) like scripts/bench.py, then:

    .venv/bin/python scripts/profile.py latency [N]   pinned MLP round trips: p50 against
                                                      echofs, CPU time per request
    .venv/bin/python scripts/profile.py large [N]     64 MB .npy round trips, per phase
    .venv/bin/python scripts/profile.py loop SECONDS  MLP round trips, pinned, for
                                                      `perf record -a -C 0 -g -- sleep 3`
    .venv/bin/python scripts/profile.py ab BIN...     pinned MLP p50 of several daemon builds
                                                      (and echofs), in interleaved rounds; keep
                                                      each copy in target/release/ so it finds
                                                      ONNX Runtime; name one twice to see noise

Build first: cargo build --release --workspace --bins --examples.
"""

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import ECHOFS, FIXTURES, Daemon, cleanup, npy, one_handle, pctl, pin, timed_rounds, wait_mounted  # noqa: E402


def cpu_seconds(pid):
    """User and system CPU seconds of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def per_request(call, n, pid):
    """Median latency (us) and the process's CPU time per request (us)."""
    for _ in range(200):
        call()
    u0, s0 = cpu_seconds(pid)
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t) * 1e6)
    u1, s1 = cpu_seconds(pid)
    return pctl(samples)[0], (u1 - u0) * 1e6 / n, (s1 - s0) * 1e6 / n


def compare_builds(work, binaries, n=8000):
    """p50 of the same pinned MLP round trip through each build."""
    os.sched_setaffinity(0, {0})
    body = npy(np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32))
    echo_mnt = os.path.join(work, "echo")
    os.makedirs(echo_mnt)
    echo = subprocess.Popen([ECHOFS, echo_mnt], stderr=subprocess.DEVNULL)
    wait_mounted(echo_mnt, echo, "echofs")
    pin(echo.pid, "0")
    calls = {"echofs": lambda: one_handle(os.path.join(echo_mnt, "echo"), body)}
    for i, binary in enumerate(binaries):
        d = Daemon(os.path.join(work, f"d{i}"), binary=os.path.abspath(binary))
        pin(d.proc.pid, "0")
        infer = os.path.join(d.add_model("mlp", os.path.join(FIXTURES, "mlp.onnx"), {"max_batch": 1}), "infer")
        calls[f"{i}: {binary}"] = lambda infer=infer: one_handle(infer, body)
    results = timed_rounds(calls, n, rounds=20)
    floor = results["echofs"][0]
    for name, (p50, p99) in results.items():
        print(f"{name:<40} p50 {p50:6.1f} us  p99 {p99:6.1f} us  {p50 / floor:.2f}x")


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "latency"
    work = tempfile.mkdtemp(prefix="aifs-profile-")
    if what == "ab":
        try:
            compare_builds(work, sys.argv[2:])
        finally:
            cleanup()
            shutil.rmtree(work, ignore_errors=True)
        return
    arg = float(sys.argv[2]) if len(sys.argv) > 2 else None
    try:
        d = Daemon(work)
        if what == "large":
            ident = d.add_model("ident", os.path.join(FIXTURES, "models", "identity_float32.onnx"))
            body = npy(np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32))
            for _ in range(int(arg or 8)):
                u0, s0 = cpu_seconds(d.proc.pid)
                t = time.perf_counter()
                with open(os.path.join(ident, "infer"), "r+b", buffering=0) as f:
                    f.write(body)
                    wrote = time.perf_counter()
                    f.read()
                done = time.perf_counter()
                u1, s1 = cpu_seconds(d.proc.pid)
                print(f"write {wrote - t:.3f} s, read {done - wrote:.3f} s: {len(body) / 2**20 / (done - t):.0f} MB/s; "
                      f"daemon CPU user {u1 - u0:.2f} s, system {s1 - s0:.2f} s")
            return
        os.sched_setaffinity(0, {0})
        pin(d.proc.pid, "0")
        infer = os.path.join(d.add_model("mlp", os.path.join(FIXTURES, "mlp.onnx"), {"max_batch": 1}), "infer")
        body = npy(np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32))
        if what == "loop":
            stop = time.time() + (arg or 10)
            while time.time() < stop:
                one_handle(infer, body)
            return
        echo_mnt = os.path.join(work, "echo")
        os.makedirs(echo_mnt)
        echo = subprocess.Popen([ECHOFS, echo_mnt], stderr=subprocess.DEVNULL)
        wait_mounted(echo_mnt, echo, "echofs")
        pin(echo.pid, "0")
        n = int(arg or 5000)
        for name, path, pid in (("echofs", os.path.join(echo_mnt, "echo"), echo.pid), ("aifs", infer, d.proc.pid)):
            p50, user, system = per_request(lambda: one_handle(path, body), n, pid)
            print(f"{name:<7} p50 {p50:4.0f} us; server CPU per request: user {user:3.0f} us, system {system:3.0f} us")
    finally:
        cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
