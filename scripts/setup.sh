#!/usr/bin/env bash
# Installs, idempotently, what a fresh Debian 12 machine lacks to build,
# run and test aifs:
#   - Debian's fuse3 (fusermount3, for unprivileged mounts and unmounts);
#   - the ONNX Runtime library from PyPI's onnxruntime wheel, into .deps/
#     (aifs-mountd finds it there with nothing exported);
#   - the Python tools the fixtures and tests use, into .venv/.
# Everything lands inside the checkout (git-ignored) except the apt package.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION=1.32.0

if ! command -v fusermount3 >/dev/null 2>&1; then
  echo "setup: installing fuse3"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq fuse3 >/dev/null
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
