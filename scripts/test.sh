#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: installs what is missing
# (scripts/setup.sh), makes the model fixtures, builds, and runs every test
# (unit tests, the filesystem core without FUSE, and real mounts).
# Must run as root or as a user who may mount FUSE (tests mount in /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
.venv/bin/python scripts/fixtures.py target/fixtures
cargo build --workspace --locked
cargo test --workspace --locked "$@"
