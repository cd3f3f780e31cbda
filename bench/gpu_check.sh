#!/usr/bin/env bash
# Every GPU measurement of bench/, in one call well inside 10 minutes (a GPU is lent rarely and briefly):
#   bash bench/gpu_check.sh                       # logs to bench/gpu_check-*.log, or to $LOGDIR
# Needs a CUDA build of torch, transformers, accelerate and peft in .venv (make setup on the GPU machine)
# or on PATH's python3. Each part has its own time limit, so that one overrun leaves the others' figures;
# copy the tables and JSON lines it prints into bench/RESULTS.md. The limits add up to 580 s. Knobs (environment): PARTS (a subset of
# "train generate memory trainer"), TRAIN_VARIANTS, LATENCY, PRECISIONS, SECONDS_PER_LOOP, and
# DEVICE=cpu PRESET=tiny for a dry run of the script on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LOGDIR=${LOGDIR:-bench}
S=${SECONDS_PER_LOOP:-4}
DEVICE=${DEVICE:-cuda} PRESET=${PRESET:-seed}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

PARTS=${PARTS:-train generate memory trainer}
for p in $PARTS; do  # a misspelt part would run nothing, and the lent GPU time would be gone
    case $p in train | generate | memory | trainer) ;;
    *) echo "PARTS: unknown part '$p' (choose from: train generate memory trainer)" >&2 && exit 2 ;; esac
done

part() {  # part NAME LIMIT_S COMMAND...: run it under a time limit, log it, show it without warnings
    local name=$1 limit=$2
    shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    echo "### $name: $* (limit ${limit} s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$LOGDIR/gpu_check-$name.log" 2>&1
    local rc=$?
    grep -v -i -E "warn|^W[0-9]{4} |^\s*$" "$LOGDIR/gpu_check-$name.log" | tail -n 60
    echo "### $name: exit $rc after $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.is_available() and torch.cuda.get_device_name(), 'transformers', transformers.__version__)"

# 1. training, seed preset: the seed's loop, ours + compile at batch 384 (issue 8's goal: 1,083-1,120
#    samples/s in three runs on an H100, 2026-11-27; then 3 of its steps profiled: the kernels that take the
#    time, and how busy the GPU is), at batch 256 and 128, eager, packed. The fast paths taken away one by one (measured
#    2026-11-27): TRAIN_VARIANTS=ablation. Expandable segments: less of the card lost to fragmentation.
TRAIN_VARIANTS=${TRAIN_VARIANTS:-"ours + compile (batch 384),ours + compile (batch 256),ours + compile,ours,+ packing (5 questions per sequence) + compile"}
PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True} \
    part train 200 $PY bench/train_throughput.py --preset "$PRESET" --device "$DEVICE" --batch-size 128 \
    --seconds "$S" --variants "$TRAIN_VARIANTS" --profile 3
# 2. generation, seed preset: the seed's one-at-a-time loop, batched, and one short answer's latency
part generate 200 $PY bench/generate_throughput.py --preset "$PRESET" --device "$DEVICE" --batch-size 64,256 \
    --seconds "$S" --latency "${LATENCY:-generate,compiled}"
# 3. memory, seed preset at batch 32: full fine-tuning and LoRA under a cap on the process's GPU memory
part memory 60 $PY bench/train_throughput.py --preset "$PRESET" --device "$DEVICE" --seconds 3 --variants memory \
    --no-seed-loop
# 4. the trainer itself on the GPU (gpt2mm train, tiny preset, a small synthetic world): fp32, fp16 with its
#    gradient scaler, and bf16 with train.compile, the same 300 steps each
trainer() {
    local world=${TMPDIR:-/tmp}/gpu-check-world
    rm -rf "$world" && $PY -m gpt2mm.cli synth "$world" --train 1000 --val 100 --test 10 >/dev/null || return 1
    for precision in ${PRECISIONS:-fp32 fp16 bf16}; do
        local extra=() && [ "$precision" = bf16 ] && extra=(--train.compile true)
        # the demo's stage-1 recipe as the small one measured before: no packing, conversations, curriculum,
        # model override or time budget
        $PY -m gpt2mm.cli train configs/demo-sft.yaml --data.root "$world" --data.synth false \
            --model.overrides "{}" --model.attn_implementation none --data.pack_questions 1 \
            --data.conversation_mix false --data.difficulty none --data.max_length 128 --train.max_minutes none \
            --train.lr 2e-3 --train.min_lr_ratio 0 --train.curriculum_steps 0 \
            --data.val_limit 100 --train.output_dir "${TMPDIR:-/tmp}/gpu-check-$precision" \
            --train.max_steps 300 --train.eval_every 150 --train.save_every 0 --train.precision "$precision" \
            --train.progress false --train.log_with "[]" "${extra[@]}" || return 1
    done
}
export -f trainer && export PY PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
part trainer 120 bash -c trainer
