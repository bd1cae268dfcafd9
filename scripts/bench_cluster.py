"""Two daemons sharing one store (docs/SCALE.md) on this machine: etcd
(Debian's etcd-server) and moto's S3 server (.venv), started and stopped
here, as in tests/cluster.rs. Measures:

- import-to-visible delay: `cp` of a new version on node A returns, until
  the version exists on node B (median of the identity fixtures, one
  version each);
- first-use fetch throughput: reading a 98 MB version file on node B, whose
  first use fetches the blob from the object store and checks its sha256,
  against a plain GET of the same object with boto3.

    .venv/bin/python scripts/bench_cluster.py   (after scripts/test.sh or cargo build + fixtures)

Prints one JSON object.
"""

import glob
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

import boto3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMON = os.path.join(REPO, "target/debug/aifs-mountd")
MODELS = os.path.join(REPO, "target/fixtures/models")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port):
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def until(path, timeout=10.0):
    start = time.monotonic()
    while not os.path.lexists(path):
        if time.monotonic() - start > timeout:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.0005)
    return time.monotonic() - start


def main():
    tmp = tempfile.mkdtemp()
    procs, mounts = [], []
    try:
        etcd_port, peer, s3_port = free_port(), free_port(), free_port()
        client, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer}"
        procs.append(subprocess.Popen(
            ["etcd", "--name=b", f"--data-dir={tmp}/etcd", f"--listen-client-urls={client}",
             f"--advertise-client-urls={client}", f"--listen-peer-urls={peer_url}",
             f"--initial-advertise-peer-urls={peer_url}", f"--initial-cluster=b={peer_url}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(
            [os.path.join(REPO, ".venv/bin/moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(etcd_port)
        wait_port(s3_port)
        endpoint = f"http://127.0.0.1:{s3_port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket="aifs")
        env = dict(os.environ, AWS_ENDPOINT=endpoint, AWS_ALLOW_HTTP="true", AWS_ACCESS_KEY_ID="test",
                   AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1")
        nodes = []
        for name in ("a", "b"):
            mnt = os.path.join(tmp, name, "mnt")
            os.makedirs(mnt)
            subprocess.run([DAEMON, mnt, "--data-dir", os.path.join(tmp, name, "data"),
                            "--catalog", f"etcd://127.0.0.1:{etcd_port}/bench", "--blobs", "s3://aifs/blobs",
                            "--node", name], env=env, check=True)
            mounts.append(mnt)
            nodes.append(mnt)
        a, b = nodes
        os.mkdir(f"{a}/models/ids")
        until(f"{b}/models/ids")
        delays = []
        for n, path in enumerate(sorted(glob.glob(f"{MODELS}/identity_*.onnx")), start=1):
            shutil.copy(path, f"{a}/models/ids/")
            delays.append(until(f"{b}/models/ids/v{n}"))

        gguf = f"{MODELS}/smollm2.gguf"
        os.mkdir(f"{a}/models/big")
        shutil.copy(gguf, f"{a}/models/big/")
        until(f"{b}/models/big/v1")
        size = os.path.getsize(gguf)
        start = time.monotonic()
        with open(f"{b}/models/big/v1/smollm2.gguf", "rb") as f:
            while f.read(1 << 20):
                pass
        through_b = time.monotonic() - start
        key = "blobs/sha256-" + hashlib.sha256(open(gguf, "rb").read()).hexdigest()
        start = time.monotonic()
        body = s3.get_object(Bucket="aifs", Key=key)["Body"]
        while body.read(1 << 20):
            pass
        plain_get = time.monotonic() - start
        mb = size / 1e6
        print(json.dumps({
            "import_to_visible_ms_median": round(statistics.median(delays) * 1e3, 2),
            "import_to_visible_ms_max": round(max(delays) * 1e3, 2),
            "versions": len(delays),
            "first_use_fetch_mb_per_s": round(mb / through_b, 1),
            "plain_get_mb_per_s": round(mb / plain_get, 1),
            "fetch_vs_get": round(plain_get / through_b, 2),
        }, indent=1))
    finally:
        for mnt in mounts:
            subprocess.run(["umount", mnt], check=False)
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
