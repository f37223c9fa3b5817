#!/usr/bin/env bash
# GPU readiness in one command, on a machine with an NVIDIA GPU and the project installed as the
# README says (with tensorflow[and-cuda] in place of tensorflow-cpu, as the worker image has it):
#   1. what TensorFlow sees;
#   2. extraction images/s for lite, lite-gpu and resnet50, one by one and batched, and how closely
#      batched features agree with one-by-one ones (benchmarks/gpu_check.py);
#   3. a 1,000-image local Beam build (synthetic photos, training mode) with the GPU visible
#      (benchmarks/pipeline_throughput.py --parts scaling).
# Figures are printed and written as JSON under $OUT (default bench_results/gpu_check/).
#
#   bash benchmarks/gpu_check.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench_results/gpu_check}"
mkdir -p "$out"
limit=17
size=1000
if [[ "${1:-}" == "--quick" ]]; then
  limit=5
  size=100
fi
python=${PYTHON:-python}

echo "== devices"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
"$python" -c 'import tensorflow as tf; print("tensorflow", tf.__version__, "GPUs:", tf.config.list_physical_devices("GPU"))'

echo "== extraction per preset"
"$python" benchmarks/gpu_check.py --limit "$limit" --json "$out/extraction.json"

echo "== a ${size}-image local Beam build"
"$python" benchmarks/pipeline_throughput.py --parts scaling --sizes "$size" --json "$out/build.json"
