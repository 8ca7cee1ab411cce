#!/usr/bin/env bash
# GPU throughput check (issue 3, item 7): run on a machine with a GPU and jax[cuda].
#
#   tools/gpu_check.sh                      # defaults: d=100, 500 batch + 500 uniform negatives
#   EDGES=50000000 NODES=5000000 tools/gpu_check.sh
#
# 1. tools/bench_step.py: the jitted step alone, batches already on the device
#    (the device's ceiling);
# 2. tools/bench_train.py: the whole trainer (import, host batch pipeline,
#    TensorStore tables) on a generated power-law graph, P=1.
# Each prints JSON lines (edges/s, device peak memory) into $OUT.
# Wheels the machine lacks (it cannot download) may be carried in .device/wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".device/wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-deps --no-index .device/wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
NODES=${NODES:-4000000}
EDGES=${EDGES:-20000000}
STEP_ROWS=${STEP_ROWS:-4000000}
DIM=${DIM:-100}
CHUNK=${CHUNK:-500}
UNIFORM=${UNIFORM:-500}
BATCH=${BATCH:-10000}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) | tee "$OUT/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
for batch in $BATCH $((BATCH * 4)); do
  python3 tools/bench_step.py --rows "$STEP_ROWS" --dim "$DIM" --chunk "$CHUNK" \
    --uniform "$UNIFORM" --batch "$batch" --calls 30 --json | tee -a "$OUT/step.jsonl"
done
# The second batch size reuses the generated and imported graph.
for batch in $BATCH $((BATCH * 4)); do
  python3 tools/bench_train.py --nodes "$NODES" --edges "$EDGES" --dim "$DIM" --chunk "$CHUNK" \
    --uniform "$UNIFORM" --batch "$batch" --partitions 1 --epochs 3 \
    --dir "${SCRATCH:-/tmp/twhin_gpu_scratch}" --json | tee -a "$OUT/train.jsonl"
done
rm -rf "${SCRATCH:-/tmp/twhin_gpu_scratch}"
