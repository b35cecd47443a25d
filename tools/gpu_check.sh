#!/usr/bin/env bash
# The prepared GPU check (one call of the device tool, well under 8 minutes of wall time):
#
#   make gpu-wheels                      # here: the small wheels the device lacks, in .gpu_wheels
#   run(command="bash tools/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=540)
#
# On the device (python3 there has jax, flax, optax, orbax, torch, but no ml_collections and no
# TensorFlow) it installs the carried wheels, then runs tools/benchmark.py (m2u-benchmark, with
# the checkout on PYTHONPATH instead of an install) on ViT-S and ViT-B at 256 px bf16: train and
# inference MFU, the MC-dropout ratio, the PyTorch reference ratio and the compile time. JSON
# files and logs go to $OUT (the device tool brings them back); record the numbers in
# docs/performance.md. There is no real-data training here: the input pipeline is tf.data and
# TensorFlow is neither on the device nor small enough to carry; the train mode times the same
# jitted step on in-memory batches.
#
# GPU_CHECK_DRY=1 runs the same steps with configs/tiny.py and one repeat (a CPU smoke test of
# this script; `make gpu-check-dry`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
if [ -d .gpu_wheels ] && ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps .gpu_wheels/*.whl 2>&1 | tail -2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -c "import jax; print('devices:', jax.devices())" | tee "$OUT/devices.txt"

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  RUNS=("tiny configs/tiny.py infer,mc")
  REPEATS=(--warmup 1 --repeats 1 --steps-per-repeat 1 --batch-size 8)
else
  RUNS=(
    "S256 configs/benchmark.py:S256_bf16 train,infer,mc,torch,compile"
    "B256 configs/benchmark.py:B256_bf16 train,infer,torch"
  )
  REPEATS=()
fi
status=0
for run in "${RUNS[@]}"; do
  read -r name config modes <<<"$run"
  echo "== $name: $config ($modes)"
  start=$(date +%s)
  timeout 240 "$PYTHON" tools/benchmark.py --config "$config" --modes "$modes" \
    "${REPEATS[@]}" --out "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "   failed (exit $rc; 124 = over 240 s): tail of $OUT/$name.log"
    tail -5 "$OUT/$name.log"
    status=1
  else
    tail -n 25 "$OUT/$name.log"
  fi
  echo "   $(( $(date +%s) - start )) s"
done
exit $status
