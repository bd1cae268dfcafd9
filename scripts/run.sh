#!/usr/bin/env bash
# Sets up, builds, and mounts aifs at ./mnt (data in the default data dir,
# $XDG_DATA_HOME/aifs or ~/.local/share/aifs) with a small sample model
# imported as models/mlp. Running it again is harmless.
# Unmount with: umount ./mnt   (or: fusermount3 -u ./mnt)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
.venv/bin/python scripts/fixtures.py target/fixtures
cargo build --workspace --locked
mkdir -p mnt
if ! mountpoint -q mnt || ! [ -e mnt/status ]; then
  target/debug/aifs-mountd mnt     # returns once the mount is ready; logs to the data dir
fi
mkdir -p mnt/models/mlp
cp target/fixtures/mlp.onnx mnt/models/mlp/   # same bytes again make no new version

cat <<MSG

aifs is mounted at $PWD/mnt, with the sample model models/mlp (a 16x16 MLP).
Try:
  cat mnt/README
  ls mnt/models/mlp/
  cat mnt/models/mlp/latest/meta.json
  cat mnt/devices/cpu/util
Unmount with: umount mnt
MSG
