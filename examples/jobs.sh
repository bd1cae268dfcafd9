#!/usr/bin/env bash
# Asynchronous jobs, Plan 9 style: clone a job, write its input, watch its
# status, read its output; cancel another.
#
#   examples/jobs.sh [MOUNTPOINT] [MODEL]       defaults: mnt mlp
set -euo pipefail
mnt=${1:-mnt}
model=${2:-mlp}

id=$(cat "$mnt/models/$model/latest/clone")       # a new job, state "new"
echo "job $id: $(cat "$mnt/jobs/$id/status")"
cat "$mnt/jobs/$id/model"
echo '[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]' > "$mnt/jobs/$id/input"   # closing it submits
cat "$mnt/jobs/$id/output"                          # waits until the job ends
echo "job $id: $(cat "$mnt/jobs/$id/status") on $(cat "$mnt/jobs/$id/device")"
cat "$mnt/jobs/$id/times"

other=$(cat "$mnt/models/$model/latest/clone")
echo cancel > "$mnt/jobs/$other/ctl"
echo "job $other: $(cat "$mnt/jobs/$other/status")"
cat "$mnt/jobs/$other/output" 2>/dev/null || echo "job $other: reading its output fails: cancelled"
