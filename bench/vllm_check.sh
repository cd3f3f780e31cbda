#!/usr/bin/env bash
# `vllm serve` beside `gpt2mm serve` on one GPU: the same checkpoint and questions, the answers compared and
# the throughput of each measured by bench/serve_compare.py (its last line, one JSON object, goes into
# bench/RESULTS.md). Needs a GPU; well inside 10 minutes.
#   bash bench/vllm_check.sh CHECKPOINT WORLD          # WORLD: a `gpt2mm synth` folder (its test split)
# vLLM pins its own torch and transformers (vLLM 0.26: torch 2.11, any transformers from 5.5.3; 0.31 and later
# cap it below 5.18-5.21), and gpt2mm needs transformers 5.24 or later, so each server runs with its own
# packages: VLLM_PYTHON / GPT2MM_PYTHON (interpreters, default python3) and VLLM_PYTHONPATH /
# GPT2MM_PYTHONPATH. Knobs: DTYPE (float32), LIMIT (questions, 1000), CONCURRENCY (requests in flight,
# "1,16,64"), READY_S (seconds for vLLM to come up, 240; then once more with --enforce-eager, no compilation
# or CUDA graphs), VLLM_ARGS, LOGDIR (bench), DEVICE (gpt2mm's, cuda; cpu for a dry run of the script).
set -uo pipefail
[ $# -eq 2 ] || { echo "usage: bash bench/vllm_check.sh CHECKPOINT WORLD" >&2; exit 2; }
ckpt=$1 world=$2
cd "$(dirname "$0")/.."
LOGDIR=${LOGDIR:-bench} DTYPE=${DTYPE:-float32} READY_S=${READY_S:-240}
VLLM_PYTHON=${VLLM_PYTHON:-python3} GPT2MM_PYTHON=${GPT2MM_PYTHON:-python3}
# offline: no hub, no hub kernels, no usage reports
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 USE_HUB_KERNELS=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

ready() {  # ready URL PID SECONDS: wait until URL/v1/models answers; fail if PID ends or time runs out
    local t0=$SECONDS
    local probe="import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/v1/models', timeout=2)"
    until python3 -c "$probe" "$1" 2>/dev/null; do
        kill -0 "$2" 2>/dev/null || return 1
        ((SECONDS - t0 > $3)) && return 1
        sleep 2
    done
    echo "ready after $((SECONDS - t0)) s: $1"
}

PYTHONPATH=${GPT2MM_PYTHONPATH:-src} $GPT2MM_PYTHON -m gpt2mm.cli serve "$ckpt" --port 8001 --device "${DEVICE:-cuda}" \
    --dtype "$DTYPE" --max-batch-size 64 --served-model-name gpt2mm >"$LOGDIR/vllm_check-gpt2mm.log" 2>&1 &
gpt2mm_pid=$!

vllm_pid=
start_vllm() {  # start_vllm EXTRA_ARGS...: vLLM's Transformers backend on the checkpoint's remote code
    PYTHONPATH=${VLLM_PYTHONPATH:-} $VLLM_PYTHON -m vllm.entrypoints.cli.main serve "$ckpt" --port 8002 \
        --trust-remote-code --dtype "$DTYPE" --max-model-len 512 --gpu-memory-utilization 0.3 \
        --attention-backend TRITON_ATTN --chat-template-content-format openai --served-model-name gpt2mm \
        ${VLLM_ARGS:-} "$@" >"$LOGDIR/vllm_check-vllm.log" 2>&1 &
    vllm_pid=$!
}
start_vllm
trap 'kill $gpt2mm_pid $vllm_pid 2>/dev/null' EXIT

if ! ready http://127.0.0.1:8001 $gpt2mm_pid 120; then
    echo "gpt2mm serve did not come up:"
    tail -n 30 "$LOGDIR/vllm_check-gpt2mm.log"
    exit 1
fi
if ! ready http://127.0.0.1:8002 $vllm_pid "$READY_S"; then
    echo "vllm serve did not come up; its log:" && grep -v -i warn "$LOGDIR/vllm_check-vllm.log" | tail -n 40
    kill $vllm_pid 2>/dev/null; wait $vllm_pid 2>/dev/null
    cp "$LOGDIR/vllm_check-vllm.log" "$LOGDIR/vllm_check-vllm-first.log"
    echo "### again with --enforce-eager" && start_vllm --enforce-eager
    if ! ready http://127.0.0.1:8002 $vllm_pid "$READY_S"; then
        grep -v -i warn "$LOGDIR/vllm_check-vllm.log" | tail -n 40
        exit 1
    fi
fi
PYTHONPATH=${GPT2MM_PYTHONPATH:-src} $GPT2MM_PYTHON bench/serve_compare.py "$world" --limit "${LIMIT:-1000}" \
    --concurrency "${CONCURRENCY:-1,16,64}" --server gpt2mm=http://127.0.0.1:8001 --server vllm=http://127.0.0.1:8002
