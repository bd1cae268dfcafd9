#!/usr/bin/env bash
# Run a model with nothing but echo and cat: write a request, read its answer.
# Each request is a job; `cat` gets the output of this shell session's last one.
#
#   examples/infer.sh [MOUNTPOINT] [MODEL]      defaults: mnt mlp (what scripts/run.sh sets up)
set -euo pipefail
mnt=${1:-mnt}
model=${2:-mlp}
infer=$mnt/models/$model/latest/infer

# The sample MLP takes rows of 16 numbers: a JSON nested array is its only input.
echo '[[0.5, -1, 2, 0, 1, 1, 1, 1, 0, 0, 0, 0, 3, 3, 3, 3]]' > "$infer"
cat "$infer"

# Inputs by name work too (the sample's input is called x), two rows at once:
echo '{"x": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]]}' > "$infer"
cat "$infer"

# One handle, read and write (a second shell or a script would do the same):
exec 3<>"$infer"
echo '[[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]]' >&3
cat <&3
exec 3<&-
