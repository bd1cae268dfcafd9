#!/usr/bin/env bash
# Every benchmark of docs/BENCHMARKS.md in one run: builds release, mounts,
# measures aifs against its floors and the FastAPI peer, prints the table and
# rewrites docs/BENCHMARKS.md with the machine, the date and this command.
#
#   scripts/bench.sh [--quick]        (--quick: fewer requests, a smoke run)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
.venv/bin/pip install -q --disable-pip-version-check -r scripts/bench-requirements.txt
stamp=.venv-mlserver/.requirements
if ! cmp -s scripts/bench_mlserver/requirements.txt "$stamp"; then
  python3 -m venv .venv-mlserver
  .venv-mlserver/bin/pip install -q --disable-pip-version-check -r scripts/bench_mlserver/requirements.txt
  cp scripts/bench_mlserver/requirements.txt "$stamp"
fi
.venv/bin/python scripts/fixtures.py target/fixtures
cargo build --release --workspace --bins --examples --locked
exec .venv/bin/python scripts/bench.py "$@"
