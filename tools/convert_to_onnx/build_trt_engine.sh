#!/usr/bin/env bash
# Build a TensorRT FP16 engine from an exported model and time it (run on the Jetson).
#
#   tools/convert_to_onnx/build_trt_engine.sh model.onnx [engine.plan]
#
# Environment (optional):
#   TRTEXEC      trtexec binary (default: trtexec on PATH, else /usr/src/tensorrt/bin/trtexec,
#                where JetPack installs it)
#   BATCH        batch to optimise and time for a dynamic-batch model (default 8); a static
#                model's own batch is always used
#   MAX_BATCH    largest batch the engine accepts for a dynamic model (default BATCH)
#   WORKSPACE_MB builder scratch memory in MiB (default 2048; Orin Nano: 1024)
#   DLA_CORE     0 or 1 to put supported layers on a DLA core (Orin AGX/NX), GPU fallback on
#   EXTRA_FLAGS  anything else for trtexec (e.g. "--verbose")
#
# Writes ENGINE (default: model.onnx with .plan), ENGINE.timing.json (per-run latencies),
# ENGINE.build.log, and a timing cache (model.onnx.timing.cache) that makes rebuilds fast.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,19p' "$0"
  exit 2
fi
ONNX="$1"
ENGINE="${2:-${ONNX%.onnx}.plan}"
[[ -f "$ONNX" ]] || { echo "build_trt_engine.sh: $ONNX does not exist" >&2; exit 2; }

TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
[[ -x "$TRTEXEC" ]] || {
  echo "build_trt_engine.sh: trtexec not found (JetPack: /usr/src/tensorrt/bin/trtexec; set TRTEXEC)" >&2
  exit 2
}
BATCH="${BATCH:-8}"
MAX_BATCH="${MAX_BATCH:-$BATCH}"
WORKSPACE_MB="${WORKSPACE_MB:-2048}"

# The input is always `images` [N, S, S, C]; N, S and C are read from the model (needs python3
# with the onnx package, which JetPack's TensorRT python samples install).
read -r STATIC_BATCH SIDE CHANNELS < <(python3 - "$ONNX" <<'EOF' 2>/dev/null || echo "? ? ?"
import sys, onnx
dims = onnx.load(sys.argv[1], load_external_data=False).graph.input[0].type.tensor_type.shape.dim
print(*[d.dim_value if d.HasField("dim_value") else "dynamic" for d in dims[:1]], dims[1].dim_value, dims[3].dim_value)
EOF
)

SHAPE_FLAGS=()
if [[ "$STATIC_BATCH" == "dynamic" ]]; then
  # A dynamic-batch graph needs an optimisation profile: TensorRT tunes kernels for optShapes
  # and accepts any batch in [minShapes, maxShapes].
  SHAPE_FLAGS=(
    "--minShapes=images:1x${SIDE}x${SIDE}x${CHANNELS}"
    "--optShapes=images:${BATCH}x${SIDE}x${SIDE}x${CHANNELS}"
    "--maxShapes=images:${MAX_BATCH}x${SIDE}x${SIDE}x${CHANNELS}"
    "--shapes=images:${BATCH}x${SIDE}x${SIDE}x${CHANNELS}"
  )
elif [[ "$STATIC_BATCH" == "?" ]]; then
  echo "build_trt_engine.sh: python3 with onnx not found; assuming a static-batch model" >&2
fi

DLA_FLAGS=()
if [[ -n "${DLA_CORE:-}" ]]; then
  # DLA runs FP16/INT8 only; layers it cannot run (Loop, TopK, Einsum, ...) fall back to the GPU.
  DLA_FLAGS=("--useDLACore=${DLA_CORE}" "--allowGPUFallback")
fi

# Flags:
#   --fp16                 allow FP16 kernels (TensorRT keeps FP32 where a layer needs it;
#                          the ONNX graph itself stays FP32 unless exported with --fp16)
#   --memPoolSize          builder workspace (TensorRT >= 8.4 syntax)
#   --timingCacheFile      reuse kernel timings between builds of similar engines
#   --saveEngine           the serialized engine (plan) for onnxruntime/TensorRT runtimes; an
#                          engine is tied to the TensorRT version and the GPU it was built on
#   --useSpinWait          spin instead of blocking on CUDA events: steadier latencies
#   --warmUp / --duration  milliseconds of warm-up, then seconds of timed inference
#   --exportTimes          per-inference latencies as JSON
#   --separateProfileRun   profile layers in a separate run so the timing run is not perturbed
set -x
"$TRTEXEC" \
  --onnx="$ONNX" \
  --saveEngine="$ENGINE" \
  --fp16 \
  --memPoolSize=workspace:"${WORKSPACE_MB}" \
  --timingCacheFile="${ONNX}.timing.cache" \
  "${SHAPE_FLAGS[@]}" \
  "${DLA_FLAGS[@]}" \
  --useSpinWait \
  --warmUp=500 \
  --duration=10 \
  --exportTimes="${ENGINE}.timing.json" \
  --separateProfileRun \
  ${EXTRA_FLAGS:-} 2>&1 | tee "${ENGINE}.build.log"
set +x
# trtexec prints "Throughput: X qps" (queries = batches per second) and latency percentiles.
grep -E "Throughput|Latency: min|GPU Compute Time: min" "${ENGINE}.build.log" || true
echo "engine: $ENGINE (images/s = qps x batch)"
