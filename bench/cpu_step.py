"""The demo recipe's training step on a CPU as the package runs it and as it ran before, side by side in one run.

    python bench/cpu_step.py WORLD [--recipe configs/demo-sft.yaml] [--steps 8] [--rounds 3] [--threads 2]

WORLD is a folder the recipe reads, e.g. the demo's: `gpt2mm synth WORLD --train 10000 --val 100 --test 500
--seed 0 --questions-per-image 8 --layout free`. Arms (`ARMS`): `before`, PyTorch's default layouts (as until
2026-12-06); `now`, the CPU layout (`gpt2mm.layers.cpu_layout`: the CNN stem on channels-last tensors; from 3db22c1
to 5f8ed95 the projector's attention took PyTorch's unfused kernel too). Recipe overrides after `--` apply to every
arm. For each precision this CPU runs (fp32 always, bf16 where it is native) with the attention `auto` picks for it,
the recipe's stage-1 trainer is built once per arm with the same seed (the same initial weights) and times
`--steps` optimizer steps on the same batches, drawn after the curriculum, after two untimed steps. The arms take
turns for `--rounds` rounds, so a machine that slows down or speeds up affects them alike; each arm's figure is its
median round. Each arm's loss on the next batch is printed: the arms compute the same function (they differ by
rounding). Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cpu_attention import arguments, build, run_info, time_arms, timing_row  # noqa: E402  (bench/, this script's folder)
from gpt2mm import layers  # noqa: E402
from gpt2mm.train.fast import fast_attn_implementation, fast_precision  # noqa: E402

ARMS = {"before": False, "now": True}  # name -> the CPU layouts on


def layout(on: bool):
    """A context in which the model runs with or without the CPU layouts."""
    return contextlib.nullcontext() if on else mock.patch.object(layers, "cpu_layout", lambda x: False)


def main() -> None:
    ap, args, extra = arguments(__doc__)
    precisions = ["fp32"] + (["bf16"] if fast_precision() == "bf16" else [])
    arms = [(p, name) for p in precisions for name in ARMS]

    def make(arm, out):  # the recipe's trainer at this precision with the attention `auto` picks for it
        return build(args.recipe, args.world, out, arm[0], fast_attn_implementation(arm[0]), extra)

    losses, times, batches = time_arms(ap, args, make, arms, context=lambda arm: layout(ARMS[arm[1]]))
    lengths = [int(m[0]["input_ids"].shape[1]) for m in batches]
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
        f"batch {sum(int(m['input_ids'].shape[0]) for m in batches[0])}, lengths {min(lengths)}-{max(lengths)}"
    )
    rows = []
    for precision in precisions:
        base = statistics.median(times[(precision, "before")])
        for name in ARMS:
            attn = fast_attn_implementation(precision)
            row = {"precision": precision, "attn": attn, "arm": name}
            rows.append({**row, **timing_row((precision, name), times, losses, base)})
            print(
                f"{precision:5} {attn:6} {name:8} {rows[-1]['step_ms']:8.1f} ms a step  x{rows[-1]['speedup']:.2f}  "
                f"(loss {rows[-1]['loss_after_2_steps']:.6f})"
            )
    print(json.dumps({**run_info("cpu_step", args, extra), "rows": rows}))


if __name__ == "__main__":
    main()
