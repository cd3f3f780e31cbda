#!/usr/bin/env bash
# Every GPU measurement of bench/, in one call well inside 10 minutes (a GPU is lent rarely and briefly).
#   bash bench/gpu_check.sh 2>&1 | tee gpu_check.log      # then copy the JSON lines into bench/RESULTS.md
# Needs a CUDA build of torch in .venv (make setup on the GPU machine) or on PATH's python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
S=${SECONDS_PER_LOOP:-8}
# training: seed preset, our loop vs the seed's, then the fast paths one at a time
$PY bench/train_throughput.py --preset seed --device cuda --batch-size 64 --seconds "$S" --peak-tflops 800
$PY bench/train_throughput.py --preset seed --device cuda --batch-size 128 --seconds "$S" --peak-tflops 800 --feature-cache
$PY bench/train_throughput.py --preset seed --device cuda --batch-size 64 --seconds "$S" --peak-tflops 800 --feature-cache --compile
# generation: batched vs one at a time, and the latency of one short answer
$PY bench/generate_throughput.py --preset seed --device cuda --batch-size 64 --seconds "$S"
$PY bench/generate_throughput.py --preset seed --device cuda --batch-size 256 --seconds "$S"
