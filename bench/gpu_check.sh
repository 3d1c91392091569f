#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on one GPU, stopped at 10 minutes whatever happens:
#   bench/gpu_check.sh [OUT]        -> OUT/gpu_check.json, OUT/noise.json (default /tmp/gpu_check)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/gpu_check}"
PY="${PYTHON:-.venv/bin/python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 600 "$PY" bench/gpu_check.py --device cuda --out "$OUT"
# the Gumbel noise's cost per decode step on the GPU, from the host's generators and on the device
timeout 120 "$PY" bench/noise.py --device cuda --out "$OUT/noise.json" || true
