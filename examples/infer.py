"""Run a model from Python with open(), write() and read(): a NumPy .npy in,
a .npy out. No client library, no server, no protocol.

    python examples/infer.py [MOUNTPOINT] [MODEL]    defaults: mnt mlp
"""

import io
import sys

import numpy as np

mnt = sys.argv[1] if len(sys.argv) > 1 else "mnt"
model = sys.argv[2] if len(sys.argv) > 2 else "mlp"

x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
request = io.BytesIO()
np.save(request, x)

# One handle: write the whole input, then read; the first read waits for the output.
with open(f"{mnt}/models/{model}/latest/infer", "r+b", buffering=0) as f:
    f.write(request.getvalue())
    y = np.load(io.BytesIO(f.read()))

print(f"input {x.dtype}{list(x.shape)} -> output {y.dtype}{list(y.shape)}")
print(y)
