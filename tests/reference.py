"""Checks aifs outputs against onnxruntime's, through a live mount.

    python tests/reference.py MOUNTPOINT FIXTURES_DIR

For every case in FIXTURES_DIR/cases (made by scripts/models.py: a model,
its inputs, and the outputs onnxruntime's Python API computed for them), it
imports the model by copying it into MOUNTPOINT/models/<case>/, sends the
inputs in every codec that fits the model, each by one of the three ways
(one handle; write then read; clone + jobs/<id>/input), decodes the
response with numpy/json (not with aifs's code) and compares: floats
within 1e-5 relative (1e-6 absolute, for values near zero), integers and
booleans exactly, dtypes and shapes exactly. Prints one line per check and
exits 1 if any failed.
"""

import io
import json
import os
import shutil
import sys

import numpy as np

KSERVE = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}


def one_handle(version_dir, body):
    with open(os.path.join(version_dir, "infer"), "r+b", buffering=0) as f:
        f.write(body)
        return f.read()


def write_then_read(version_dir, body):
    path = os.path.join(version_dir, "infer")
    with open(path, "wb") as f:
        f.write(body)
    with open(path, "rb") as f:
        return f.read()


def by_clone(version_dir, body):
    mnt = os.path.dirname(os.path.dirname(os.path.dirname(version_dir)))  # <mnt>/models/<name>/v1
    with open(os.path.join(version_dir, "clone")) as f:
        job = os.path.join(mnt, "jobs", f.read().strip())
    with open(os.path.join(job, "input"), "wb") as f:
        f.write(body)
    with open(os.path.join(job, "output"), "rb") as f:
        return f.read()


def kserve_request(inputs):
    return json.dumps({
        "id": "ref",
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": KSERVE[a.dtype.name], "data": a.ravel().tolist()}
            for n, a in inputs.items()
        ],
    }).encode()


def npz_bytes(arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def decode(codec, raw, expected):
    """The response as {output name: array}, decoded independently."""
    if codec == "npz":
        with np.load(io.BytesIO(raw)) as z:
            return {k: z[k] for k in z.files}
    if codec == "npy":
        return {next(iter(expected)): np.load(io.BytesIO(raw))}
    doc = json.loads(raw)
    if codec == "kserve":
        assert doc["id"] == "ref", doc.get("id")
        out = {}
        for o in doc["outputs"]:
            dtype = expected[o["name"]].dtype
            assert o["datatype"] == KSERVE[dtype.name], f'{o["name"]}: datatype {o["datatype"]}'
            out[o["name"]] = np.array(o["data"], dtype=dtype).reshape(o["shape"])
        return out
    if codec == "json-array" and len(expected) == 1:
        doc = {next(iter(expected)): doc}
    return {k: np.array(v, dtype=expected[k].dtype).reshape(expected[k].shape) if k in expected else v
            for k, v in doc.items()}


def compare(got, expected):
    problems = []
    if set(got) != set(expected):
        return [f"outputs {sorted(got)} != {sorted(expected)}"]
    for name, want in expected.items():
        have = np.asarray(got[name])
        if have.dtype != want.dtype or have.shape != want.shape:
            problems.append(f"{name}: {have.dtype}{list(have.shape)} != {want.dtype}{list(want.shape)}")
        elif want.dtype.kind == "f":
            if not np.allclose(have.astype(np.float64), want.astype(np.float64), rtol=1e-5, atol=1e-6, equal_nan=True):
                worst = np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)))
                problems.append(f"{name}: max abs difference {worst}")
        elif not np.array_equal(have, want):
            problems.append(f"{name}: values differ")
    return problems


def main():
    mnt, fixtures = sys.argv[1], sys.argv[2]
    cases_dir = os.path.join(fixtures, "cases")
    passed = failed = 0
    for case in sorted(os.listdir(cases_dir)):
        cdir = os.path.join(cases_dir, case)
        with open(os.path.join(cdir, "model")) as f:
            model_file = f.read().strip()
        model_dir = os.path.join(mnt, "models", case)
        os.mkdir(model_dir)
        shutil.copyfile(os.path.join(fixtures, "models", model_file), os.path.join(model_dir, model_file))
        version_dir = os.path.join(model_dir, "v1")
        with np.load(os.path.join(cdir, "input.npz")) as z:
            inputs = {k: z[k] for k in z.files}
        with np.load(os.path.join(cdir, "expected.npz")) as z:
            expected = {k: z[k] for k in z.files}
        with open(os.path.join(cdir, "input.json"), "rb") as f:
            json_object = f.read()
        checks = [
            ("npz", one_handle, npz_bytes(inputs)),
            ("json-object", write_then_read, json_object),
            ("kserve", by_clone, kserve_request(inputs)),
        ]
        if len(inputs) == 1:
            only = next(iter(inputs.values()))
            checks += [
                ("npy", one_handle, npy_bytes(only)),
                ("json-array", write_then_read, json.dumps(json.loads(json_object)[next(iter(inputs))]).encode()),
            ]
        for codec, way, body in checks:
            want = expected if codec != "npy" else dict([next(iter(expected.items()))])
            try:
                problems = compare(decode(codec, way(version_dir, body), want), want)
            except (OSError, AssertionError, ValueError, KeyError) as e:
                problems = [f"{type(e).__name__}: {e}"]
            label = f"{case} {codec} {way.__name__}"
            if problems:
                failed += 1
                print(f"FAIL {label}: {'; '.join(problems)}")
            else:
                passed += 1
                print(f"ok   {label}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
