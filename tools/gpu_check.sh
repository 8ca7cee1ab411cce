#!/usr/bin/env bash
# GPU throughput check (issue 12): the jitted step alone against the whole
# trainer, side by side, per batch size and score-matmul precision.
#
#   tools/gpu_check.sh                      # defaults: d=100, 500 batch + 500 uniform negatives
#   EDGES=50000000 NODES=5000000 tools/gpu_check.sh
#   PRECISIONS="float32 tf32 bfloat16" tools/gpu_check.sh
#   BATCH_PREP=device tools/gpu_check.sh    # only the device-side batch path
#   tools/gpu_check.sh --table runs/gpu_check   # only print the table of an earlier run
#   TWHIN_DATA_DIR=../shared/data tools/gpu_check.sh   # also FB15k-237's MRR per precision
#   BACKGROUND="auto off" SYNC="checkpoint none" PROFILE=1 tools/gpu_check.sh
#       # checkpoints behind the steps or not, synced once or never; a cProfile
#       # of the trainer process ($OUT/profile_*.txt, all threads on Python 3.12)
#
# A CPU-sized smoke run of the whole script (the same code paths):
#   JAX_PLATFORMS=cpu PYTHON=.venv/bin/python NODES=20000 EDGES=100000 STEP_ROWS=20000 \
#     BATCH=1000 CHUNK=50 UNIFORM=50 CALLS=3 OUT=/tmp/gpu_check tools/gpu_check.sh
#
# 1. tools/bench_step.py: the jitted step alone, batches already on the device
#    (the device's ceiling);
# 2. tools/bench_train.py: the whole trainer (import, batch preparation,
#    TensorStore tables) on a generated power-law graph, P=1, last of 3 epochs,
#    once per batch preparation in $BATCH_PREP (default "host device": numpy
#    on the host, batching.py, or inside jit, device_batching.py).
# 3. tools/kg_small.py: FB15k-237 (configs/fb15k237.py, 10 epochs, whole test
#    split) once per score-matmul precision in $FB_PRECISIONS (default
#    "float32 tf32 bfloat16" on a GPU), when $TWHIN_DATA_DIR/kg/fb15k-237
#    exists: whether reduced precision holds the model's quality. It runs
#    before the trainer rows of the second and later batch preparations, so a
#    device lease that runs out cuts the least needed rows ($OUT/fb.jsonl).
# Each prints JSON lines (edges/s, device peak memory) into $OUT (step.jsonl,
# train.jsonl); the table (trainer / step ratio per batch and precision) goes
# to stdout and $OUT/table.md. Commit $OUT under docs/gpu/.
# Wheels the machine lacks (it cannot download) may be carried in .device/wheels
# or .whl; the H200 image of 2026-11-29 lacked ml_collections, duckdb and
# tensorboardX (pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 -d .whl ml_collections duckdb tensorboardX).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

print_table() {
  "$PY" - "$1" <<'EOF'
import json, os, sys
out = sys.argv[1]
def read(name):
  path = os.path.join(out, name)
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if line.startswith("{"):
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          sys.exit(f"{path}:{number}: not JSON ({e})")
  return rows
step = {(r.get("batch", "-"), r.get("precision", "-")): r for r in read("step.jsonl")}
# Rows written before a field existed: batch_preparation was the host path.
# Rows written before background checkpoints existed wrote them in the foreground.
# Rows written before storage.sync existed synced every write.
train = {(r.get("batch", "-"), r.get("precision", "-"), r.get("batch_preparation", "host"),
          ("background" if r.get("background_checkpoints") else "foreground")
          + ", sync " + r.get("sync", "write")
          + (f", every {r['checkpoint_every_seconds']:g} s" if r.get("checkpoint_every_seconds")
             else "")): r
         for r in read("train.jsonl")}
keys = set(train) | {k + ("-", "-") for k in step if not any(t[:2] == k for t in train)}
print("| batch | matmuls | batches | checkpoints | step alone edges/s | whole trainer edges/s | "
      "trainer / step | device peak MiB step / trainer |")
print("|---:|---|---|---|---:|---:|---:|---|")
for key in sorted(keys, key=lambda k: (len(str(k[0])), str(k[0]), str(k[1]), k[2], k[3])):
  s, t = step.get(key[:2]), train.get(key)
  fmt = lambda r, k: f"{r[k]:,.0f}" if r else "-"
  ratio = f"{t['edges_per_s'] / s['edges_per_s']:.1%}" if s and t else "-"
  print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {fmt(s, 'edges_per_s')} | "
        f"{fmt(t, 'edges_per_s')} | {ratio} | "
        f"{fmt(s, 'device_peak_mib')} / {fmt(t, 'device_peak_mib')} |")
if os.path.exists(os.path.join(out, "fb.jsonl")):
  print("\n| FB15k-237 score matmuls | test MRR | Hits@10 | epochs (best) | seconds |")
  print("|---|---:|---:|---:|---:|")
  for r in read("fb.jsonl"):
    precision = [o.split("=", 1)[1] for o in r["overrides"] if o.startswith("model.matmul_precision=")]
    print(f"| {precision[0] if precision else 'auto'} | {r['mrr']:.4f} | {r['hits@10']:.4f} | "
          f"{r['epochs_run']} ({r['best_epoch'] + 1}) | {r['seconds']:.1f} |")
EOF
}

if [[ "${1:-}" == "--table" ]]; then
  print_table "${2:?usage: tools/gpu_check.sh --table OUT_DIR}"
  exit 0
fi

for wheels in .device/wheels .whl; do
  if compgen -G "$wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-deps --no-index --target /tmp/twhin_gpu_site "$wheels"/*.whl \
      || echo "gpu_check: the wheels in $wheels did not install (another Python?)" >&2
    export PYTHONPATH="/tmp/twhin_gpu_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
rm -f "$OUT/step.jsonl" "$OUT/train.jsonl"
NODES=${NODES:-4000000}
EDGES=${EDGES:-20000000}
STEP_ROWS=${STEP_ROWS:-4000000}
DIM=${DIM:-100}
CHUNK=${CHUNK:-500}
UNIFORM=${UNIFORM:-500}
BATCH=${BATCH:-10000}
CALLS=${CALLS:-30}
# auto: tf32 on a GPU (JAX's default for fp32 matmuls), float32 on CPU.
PRECISIONS=${PRECISIONS:-auto bfloat16}
BATCH_PREP=${BATCH_PREP:-device host}
# train.background_checkpoints per trainer row (auto: on on a GPU); "auto off"
# measures what writing checkpoints behind the steps gains.
BACKGROUND=${BACKGROUND:-auto}
# storage.sync per trainer row: "checkpoint" (one syncfs per checkpoint),
# "write" (an fsync per chunk file, as before 2026-11-29), "none".
SYNC=${SYNC:-checkpoint}
# TRAIN_BATCHES: the trainer rows' batch sizes (default: BATCH and 4 x BATCH).
# CKPT_EVERY: train.checkpoint_every_seconds (default auto: 60 on a GPU, so
# of the 3 epochs only the last saves, after its time is taken; 0: a
# checkpoint per epoch, the default before 2026-11-30).
SCRATCH=${SCRATCH:-/tmp/twhin_gpu_scratch}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) | tee "$OUT/gpu.txt"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
for precision in $PRECISIONS; do
  for batch in $BATCH $((BATCH * 4)); do
    "$PY" tools/bench_step.py --rows "$STEP_ROWS" --dim "$DIM" --chunk "$CHUNK" \
      --uniform "$UNIFORM" --batch "$batch" --calls "$CALLS" --precision "$precision" --json \
      | tee -a "$OUT/step.jsonl"
  done
done
# Later settings reuse the generated and imported graph.
train_rows() {  # $1: a batch preparation
  for precision in $PRECISIONS; do
    for batch in ${TRAIN_BATCHES:-$BATCH $((BATCH * 4))}; do
      for background in $BACKGROUND; do
        for sync in $SYNC; do
          profile=()
          # PROFILE=1: a cProfile of the training process, once per batch size.
          [[ -n "${PROFILE:-}" && "$background $sync" == "${BACKGROUND%% *} ${SYNC%% *}" ]] \
            && profile=(--profile "$OUT/profile_${1}_${batch}.txt")
          "$PY" tools/bench_train.py --nodes "$NODES" --edges "$EDGES" --dim "$DIM" \
            --chunk "$CHUNK" --uniform "$UNIFORM" --batch "$batch" --partitions 1 --epochs 3 \
            --precision "$precision" --batch-preparation "$1" \
            --background-checkpoints "$background" --sync "$sync" "${profile[@]}" \
            --checkpoint-every-seconds "${CKPT_EVERY:-auto}" \
            --dir "$SCRATCH" --json | tee -a "$OUT/train.jsonl"
        done
      done
    done
  done
}
read -r -a preparations <<< "$BATCH_PREP"
train_rows "${preparations[0]}"
FB_DIR="${TWHIN_DATA_DIR:-}/kg/fb15k-237"
if [[ -n "${TWHIN_DATA_DIR:-}" && -d "$FB_DIR" ]]; then
  default_fb="float32 bfloat16"
  "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" && default_fb="float32 tf32 bfloat16"
  rm -f "$OUT/fb.jsonl"
  for precision in ${FB_PRECISIONS-$default_fb}; do
    # shellcheck disable=SC2086  # FB_SET: extra FIELD=VALUE overrides, word-split on purpose
    "$PY" tools/kg_small.py --datasets fb15k237 --set "model.matmul_precision=$precision" \
      ${FB_SET:+$(printf -- '--set %s ' $FB_SET)} --out "$SCRATCH/fb.jsonl" | grep '^{' \
      | tee -a "$OUT/fb.jsonl"
  done
fi
for preparation in "${preparations[@]:1}"; do
  train_rows "$preparation"
done
rm -rf "$SCRATCH"
print_table "$OUT" | tee "$OUT/table.md"
