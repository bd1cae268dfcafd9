#!/usr/bin/env bash
# Installs, idempotently, what a fresh Debian 12 machine lacks to build,
# run and test aifs:
#   - Debian's fuse3 (fusermount3, for unprivileged mounts and unmounts;
#     mount.fuse3), busybox-static and systemd (for the operations tests),
#     etcd-server and protobuf-compiler (the shared store and its tests);
#   - the ONNX Runtime library from PyPI's onnxruntime wheel, into .deps/
#     (aifs-mountd finds it there with nothing exported);
#   - the Python tools the fixtures and tests use, into .venv/.
# Everything lands inside the checkout (git-ignored) except the apt package.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION=1.32.0

# fuse3: fusermount3 and mount.fuse3 (mount -t fuse.aifs); busybox-static:
# the minimal root of the container tests; systemd: systemd-analyze, which
# checks deploy/systemd/aifs.service.
missing=""
command -v fusermount3 >/dev/null 2>&1 || missing="$missing fuse3"
# The container tests copy busybox into an empty root: the static build.
dpkg -s busybox-static >/dev/null 2>&1 || missing="$missing busybox-static"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
# The shared store (docs/SCALE.md): etcd for the two-daemon tests, and
# protoc, which etcd-client's build runs on etcd's .proto files.
command -v etcd >/dev/null 2>&1 || missing="$missing etcd-server"
command -v protoc >/dev/null 2>&1 || missing="$missing protobuf-compiler"
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
fi

lib=.deps/onnxruntime/onnxruntime/capi/libonnxruntime.so.$ORT_VERSION
if [ ! -f "$lib" ]; then
  echo "setup: installing the ONNX Runtime $ORT_VERSION library into .deps/"
  rm -rf .deps/onnxruntime
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target .deps/onnxruntime "onnxruntime==$ORT_VERSION"
fi
[ -f "$lib" ] || { echo "setup: $lib missing after install" >&2; exit 1; }

stamp=.venv/.requirements
if [ ! -x .venv/bin/python ] || ! cmp -s scripts/requirements.txt "$stamp"; then
  echo "setup: installing Python test tools into .venv/"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements.txt
  cp scripts/requirements.txt "$stamp"
fi
