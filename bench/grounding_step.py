"""What `data.grounding: objects` and `train.centres_weight` cost the demo recipe's training step on a CPU, side by
side in one run.

    python bench/grounding_step.py WORLD [--recipe configs/demo-sft.yaml] [--steps 8] [--rounds 3] [--threads 2]

WORLD is a synthetic world the recipe reads, e.g. the demo's: `gpt2mm synth WORLD --train 10000 --val 100 --test
500 --seed 0 --questions-per-image 8 --layout free`. Three arms, the recipe's stage-1 trainer at this CPU's
precision and attention (`auto`) with the same seed, without the curriculum (full-length scenes): the answers' loss
alone (`--data.grounding none`), with the grounded phrases' loss (`gpt2mm.train.grounding`), and with the object
centres' loss too (`--train.centres_weight 1`). They time `--steps` optimizer steps on the same batches (which hold
both kinds of targets; an arm ignores those it does not use) after two untimed steps, taking turns for `--rounds`
rounds; each arm's figure is its median round. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_attention import arguments, build, run_info, time_arms, timing_row  # noqa: E402

ARMS = (("answers",), ("answers+grounding",), ("answers+grounding+centres",))


def main() -> None:
    ap, args, extra = arguments(__doc__)

    def make(arm, out):
        grounding = "none" if arm == ARMS[0] else "objects"
        centres = "1" if arm == ARMS[2] else "0"
        overrides = [*extra, "--data.grounding", grounding, "--train.centres_weight", centres]
        return build(args.recipe, args.world, out, "auto", "auto", overrides)

    # the centres arm draws the batches, so they carry the phrase and centre targets
    losses, times, batches = time_arms(ap, args, make, ARMS[::-1])
    lengths = [int(m[0]["input_ids"].shape[1]) for m in batches]
    targets = sum(int(m[0]["grounding_mask"].sum()) for m in batches[2:]) / args.steps
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
        f"lengths {min(lengths)}-{max(lengths)}; {targets:.0f} phrase targets a batch"
    )
    base = statistics.median(times[ARMS[0]])
    rows = []
    for arm in ARMS:
        row = {"arm": arm[0], **timing_row(arm, times, losses, base)}
        rows.append(row)
        print(
            f"{arm[0]:26} {row['step_ms']:8.1f} ms a step  x{row['speedup']:.3f}  rounds {row['rounds_ms']}"
        )
    print(json.dumps({**run_info("grounding_step", args, extra), "targets_a_batch": targets, "rows": rows}))


if __name__ == "__main__":
    main()
