#!/usr/bin/env bash
# What bounds the GPU grid's step on the device machine. The grid's calibration (24 steps of
# every row that starts from ImageNet: 27 processes at once) under blocking waits
# (train.cuda_sync=block), under NVIDIA MPS, and under both; one UniMatch run alone; the 9
# seed-0 runs under both. Compare with the calibration of `gpu_grid.sh --mps off` (CUDA's
# default spinning waits, no MPS). Each mode prints every row's s/iter and the share of it
# spent waiting for data; OUT/MODE/utilization.csv has the GPU and CPU load every 5 s.
# Prepare and carry as for gpu_grid.sh, then run from the repository root:
#   bash benchmarks/gpu_contention.sh "$OUT"
set -uo pipefail
out="$1"
here="$(dirname "$0")"
mode() {
    local name="$1"
    shift
    echo "== $name"
    # MPS modes come last: a hung MPS client is killed here, and cannot slow the others.
    timeout 150 bash "$here/gpu_grid.sh" --calibrate-only "$@" --out "$out/$name" ||
        echo "== $name failed (exit $?)"
}
mode alone-default unimatch --calibrate-seeds 0 --mps off
mode all-block --cuda-sync block --mps off
mode all-mps --mps on
mode all-mps-block --mps on --cuda-sync block
mode seed0-mps-block --mps on --cuda-sync block --calibrate-seeds 0
