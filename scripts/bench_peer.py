"""The benchmarks' peer: what users write by hand to serve a model over
HTTP. FastAPI + uvicorn + onnxruntime, speaking the KServe v2 JSON protocol
on 127.0.0.1.

    python scripts/bench_peer.py PORT NAME=MODEL.onnx [NAME=MODEL.onnx ...]
"""

import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}

app = FastAPI()
sessions = {}


@app.get("/v2/health/ready")
def ready():
    return {"ready": True}


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request):
    body = await request.json()
    session = sessions[name]
    feeds = {
        i["name"]: np.asarray(i["data"], dtype=DTYPES[i["datatype"]]).reshape(i["shape"]) for i in body["inputs"]
    }
    outputs = session.run(None, feeds)
    return {
        "model_name": name,
        "outputs": [
            {"name": o.name, "datatype": NAMES[v.dtype], "shape": list(v.shape), "data": v.ravel().tolist()}
            for o, v in zip(session.get_outputs(), outputs)
        ],
    }


if __name__ == "__main__":
    port = int(sys.argv[1])
    for arg in sys.argv[2:]:
        name, path = arg.split("=", 1)
        sessions[name] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=300)
