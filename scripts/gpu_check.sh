#!/usr/bin/env bash
# The GPU check in one command: the CUDA tests, the layer grid and the model step on CUDA.
# Budget: under 10 minutes on one GPU. Run from a checkout with `make install` done (the venv's torch must be a
# CUDA build on the GPU machine: PY=/path/to/python overrides .venv/bin/python). Writes everything to $OUT.
#
#   scripts/gpu_check.sh                 # OUT=artifacts/gpu
#   OUT=/tmp/gpu PY=python3 scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-artifacts/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
export RUNLORA_NB_CACHE=${RUNLORA_NB_CACHE:-$(mktemp -d)}  # a fresh cache: the calibration is this GPU's own

"$PY" - <<'PYEOF' || exit 3
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device; install a CUDA build of torch here")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

status=0
step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.txt, say which step failed
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "gpu_check: step '$name' exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/steps.txt"
    [ "$rc" = 0 ] || status=1
}
step cuda_tests 360 "$PY" -m pytest -q -m cuda tests/cuda -p no:cacheprovider -rs
step layer_grid 180 "$PY" -m runlora_nb.app.cli bench grid --device cuda --reps 7 --csv "$OUT/grid.csv"
step model_step 90 "$PY" -m runlora_nb.app.cli bench model --model llama-135m-shapes --batch 4 --seq 256 \
    --rank 16 --dropout 0.05 --device cuda --reps 5 --csv "$OUT/model_fp32.csv"
step model_step_bf16 90 "$PY" -m runlora_nb.app.cli bench model --model llama-135m-shapes --batch 4 --seq 256 \
    --rank 16 --dropout 0.05 --dtype bf16 --device cuda --reps 5 --csv "$OUT/model_bf16.csv"
echo "gpu_check: done (status $status); figures in $OUT"
exit $status
