#!/usr/bin/env bash
# The prepared GPU check of issue 16 (docs/megapixel_mnist.md, "GPU protocol"): Megapixel MNIST
# on the paper's protocol (1500 px, 5000 / 1000 images) with device-rendered data for about
# 7 minutes, then benchmark rows. Everything it keeps is written under $OUT, in at most 8 files
# (the device tool's limit): results.json, run.tar.gz (the whole run folder: checkpoints,
# metrics logs, figures; resumable), test_error.png, ats_test_00.png, ats_metrics.jsonl,
# bench_mnist.json, bench_slide.json (when openslide is there), gpu_check.log.
#
# Usage (repository root, ~9 min in all):  OUT=/some/dir bash scripts/gpu_check.sh
#   MNIST_DIR=...   folder with t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz);
#                   default .gpu_data/mnist, then ../shared/data/mnist (../shared does not
#                   travel to the device machine: copy the files into .gpu_data/mnist and carry
#                   .gpu_data)
#   RESUME_FROM=... a run.tar.gz (or run folder) of an earlier call: continue from its checkpoints
#   CONFIG=...      default configs/megapixel_mnist_gpu.yaml (accel.device_data: true selects the
#                   GPU protocol of python -m pipelines.megapixel_mnist)
#   DEVICE=...      default cuda (cpu works, for a dry run with a tiny CONFIG)
#   RUN_TIMEOUT=... seconds for the training run (default 480); BENCH=0 skips the benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that collects the results}"
mkdir -p "$OUT"
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/megapixel_mnist_gpu.yaml}
DEVICE=${DEVICE:-cuda}
RUN_DIR=${RUN_DIR:-/tmp/megapixel_mnist_gpu}
RUN_TIMEOUT=${RUN_TIMEOUT:-480}
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "gpu_check: $(date -u +%FT%TZ) config=$CONFIG device=$DEVICE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [ -z "${MNIST_DIR:-}" ]; then
  for d in .gpu_data/mnist ../shared/data/mnist; do
    if ls "$d"/t10k-images* >/dev/null 2>&1; then MNIST_DIR=$d; break; fi
  done
fi
if [ -z "${MNIST_DIR:-}" ]; then
  echo "error: no MNIST t10k files (set MNIST_DIR or copy them into .gpu_data/mnist)" >&2
  exit 2
fi
echo "digits: $MNIST_DIR"

resume=()
if [ -n "${RESUME_FROM:-}" ]; then
  rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR"
  if [ -d "$RESUME_FROM" ]; then cp -r "$RESUME_FROM"/. "$RUN_DIR"/
  else tar -xzf "$RESUME_FROM" -C "$RUN_DIR"; fi
  resume=(--resume)
  echo "resuming from $RESUME_FROM"
fi

# 1. The prepared run (its own time budgets end it; the timeout is a safety net).
t0=$(date +%s)
timeout "$RUN_TIMEOUT" "$PY" -m pipelines.megapixel_mnist --config "$CONFIG" \
  --mnist-dir "$MNIST_DIR" --out "$RUN_DIR" --device "$DEVICE" --no-progress "${resume[@]}"
echo "run: exit $? after $(( $(date +%s) - t0 )) s"
[ -f "$RUN_DIR/results.json" ] && cp "$RUN_DIR/results.json" "$OUT/"
[ -f "$RUN_DIR/ats_metrics.jsonl" ] && cp "$RUN_DIR/ats_metrics.jsonl" "$OUT/"
[ -f "$RUN_DIR/figures/test_error.png" ] && cp "$RUN_DIR/figures/test_error.png" "$OUT/"
[ -f "$RUN_DIR/figures/ats_test_00.png" ] && cp "$RUN_DIR/figures/ats_test_00.png" "$OUT/"
tar -czf "$OUT/run.tar.gz" -C "$RUN_DIR" . && ls -l "$OUT/run.tar.gz"
"$PY" - "$RUN_DIR/results.json" <<'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
for name, m in r["models"].items():
    print(f"{name:<13} epochs {m['epochs_completed']:>3}/{m['epochs_planned']}  "
          f"test error {m['test_error']}  best {m['best_test_error']}  "
          f"train samples/s {m.get('train_samples_per_s', 0):.0f}")
for c in r.get("step_costs", []):
    print(f"cost {c['canvas']} px B={c['batch']:<3} {c['model']:<20} train "
          f"{c['train_ms_per_sample']:.3f} ms/sample ({c.get('train_ms_per_sample_vs_ats', 0):.1f}x "
          f"ATS), peak {c['train_peak_mb_per_sample']:.1f} MB/sample")
EOF

# 2. Benchmark rows (each capped so the whole check stays inside ~9 minutes).
if [ "${BENCH:-1}" != 0 ]; then
  timeout 75 "$PY" -m pipelines.benchmark mnist --device "$DEVICE" --sizes 1500 --batch 4 \
    --repeats 3 --out "$OUT/bench_mnist.json"
  echo "bench mnist: exit $?"
  if "$PY" -c "import openslide" 2>/dev/null; then
    timeout 60 "$PY" -m pipelines.benchmark slide --device "$DEVICE" --sizes 10240 \
      --methods ats exhaustive --repeats 2 --out "$OUT/bench_slide.json"
    echo "bench slide: exit $?"
  else
    echo "bench slide: skipped (no openslide here; carry its wheels, see the device README)"
  fi
fi
echo "gpu_check: done after $(( $(date +%s) - t0 )) s"
