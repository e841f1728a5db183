#!/usr/bin/env bash
# What bounds the GPU grid's step on the device machine: the grid's calibration (24 steps of
# every row that starts from ImageNet, 27 processes at once) under NVIDIA MPS with the
# training augmentation on the GPU (data.augment_on: device, the GPU config's) and in the
# loader workers (loader), and one UniMatch run alone on the GPU. Each mode prints every
# row's s/iter and the share of it spent waiting for data; OUT/MODE/utilization.csv has the
# GPU and CPU load every 5 s. The first measurement (results/camvid-1_16-gpu/README.md) ran
# this script as of commit e630f7c: other modes (blocking waits, MPS or not), with the strong
# views on the GPU and the geometric crops in the loaders.
# Prepare and carry as for gpu_grid.sh, then run from the repository root (about 3 minutes):
#   bash benchmarks/gpu_contention.sh "$OUT"
set -uo pipefail
out="$1"
here="$(dirname "$0")"
declare -A modes=(
    [all-mps-device]="--mps on"
    [all-mps-loader]="--mps on --set data.augment_on=loader"
    [alone-device]="unimatch --calibrate-seeds 0 --mps off"
)
for name in all-mps-device all-mps-loader alone-device; do
    echo "== $name"
    # A mode that hangs is stopped after 150 s and the next one runs.
    # shellcheck disable=SC2086  # the mode's arguments are split on purpose
    timeout 150 bash "$here/gpu_grid.sh" --calibrate-only ${modes[$name]} --out "$out/$name" ||
        echo "== $name failed (exit $?)"
done
