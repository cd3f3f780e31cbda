"""The cost of `data.independent_turns` on a CPU: the recipe's training step with and without it, side by side.

    python bench/packed_turns.py WORLD [--recipe configs/demo-sft.yaml] [--steps 8] [--rounds 3] [--threads 2]

WORLD is a folder the recipe reads, e.g. the demo's: `gpt2mm synth WORLD --train 10000 --val 100 --test 500
--seed 0 --questions-per-image 8 --layout free`. Arms: `causal` (`--data.independent_turns false`: plain causal
attention over each packed sample) and `independent` (true: each exchange sees the image and itself, a (B, 1, T,
T) mask and position ids built by the collator). Both trainers are built from the recipe with the same seed (the
same initial weights) at the precision and attention `auto` picks for this CPU, without the curriculum; each
times `--steps` steps of collating the same samples and one optimizer step on them (the collator is on the step's
path: it builds the mask), after two untimed steps. The arms take turns for `--rounds` rounds; each arm's figure is
its median round. Recipe overrides after `--` apply to both arms. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_attention import arguments, build, run_info  # noqa: E402  (bench/, this script's folder)
from gpt2mm.errors import DataError, UsageError  # noqa: E402
from gpt2mm.train.fast import fast_attn_implementation, fast_precision  # noqa: E402

ARMS = {"causal": "false", "independent": "true"}  # name -> data.independent_turns


def main() -> None:
    ap, args, extra = arguments(__doc__)
    precision = fast_precision()
    attn = fast_attn_implementation(precision)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trainers = {
                name: build(
                    args.recipe,
                    args.world,
                    Path(tmp) / name,
                    precision,
                    attn,
                    [*extra, "--data.independent_turns", on],
                )
                for name, on in ARMS.items()
            }
        except (UsageError, DataError, OSError) as e:  # a world or recipe that is not there
            ap.error(str(e))
        source = trainers["causal"]
        batches = [source._next_batch() for _ in range(2 + args.steps)]  # sample indices, the same for both
        for t in trainers.values():
            for batch in batches[:2]:
                t._optimizer_step(t._micro_batches(batch))
        times: dict[str, list[float]] = {name: [] for name in ARMS}
        for _ in range(args.rounds):
            for name, t in trainers.items():
                start = time.perf_counter()
                for batch in batches[2:]:
                    t._optimizer_step(t._micro_batches(batch))
                times[name].append((time.perf_counter() - start) / args.steps)
        mask = tuple(trainers["independent"]._micro_batches(batches[2])[0]["attention_mask"].shape)
    base = statistics.median(times["causal"])
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
        f"{precision} + {attn}; the independent arm's mask {mask}"
    )
    rows = []
    for name in ARMS:
        ms = 1000 * statistics.median(times[name])
        rows.append(
            {
                "arm": name,
                "step_ms": round(ms, 1),
                "ratio": round(ms / (1000 * base), 3),
                "rounds_ms": [round(1000 * s, 1) for s in times[name]],
            }
        )
        print(f"{name:12} {ms:8.1f} ms a step  x{rows[-1]['ratio']:.3f} the causal arm's time")
    print(
        json.dumps(
            {**run_info("packed_turns", args, extra), "precision": precision, "attn": attn, "rows": rows}
        )
    )


if __name__ == "__main__":
    main()
