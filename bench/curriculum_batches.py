"""The curriculum's batches drawn step by step (as until 2026-12-07) and in blocks grouped by length (now), side by
side in one run; and the collator's `independent_turns` against the row-by-row function it replaced.

    python bench/curriculum_batches.py WORLD [--recipe configs/demo-sft.yaml] [--steps 8] [--rounds 3] [--threads 2]

WORLD is a folder the recipe reads, e.g. the demo's: `gpt2mm synth WORLD --train 10000 --val 100 --test 500
--seed 0 --questions-per-image 8 --layout free`. Arms: `per_step`, each curriculum step draws its own batch
(`--train.length_grouping false`); `blocks`, the batches of up to 50 steps drawn together and grouped by length
(`gpt2mm.train.sft.curriculum_block`). For each arm the recipe's stage-1 trainer is built with the same seed (the
same initial weights), at the precision and attention `auto` picks on this machine. Printed per arm:
- the share of the batches' tokens that are not padding, and the samples a batch holds twice, over every step of
  the curriculum (no model run);
- seconds an optimizer step on `--steps` of its batches spread over the curriculum, after two untimed steps; the
  arms take turns for `--rounds` rounds and each arm's figure is its median round;
- the collator's milliseconds a batch on those batches, with `independent_turns` and with the row-by-row
  reference (`naive_independent_turns` in tests/test_processing.py, the function until 2026-12-07).
Recipe overrides after `--` apply to both arms. Last, one JSON line.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))

from cpu_attention import arguments, build, run_info  # noqa: E402  (bench/, this script's folder)
from gpt2mm.data import collate  # noqa: E402
from gpt2mm.errors import DataError, UsageError  # noqa: E402
from gpt2mm.train.fast import fast_attn_implementation, fast_precision  # noqa: E402
from test_processing import naive_independent_turns  # noqa: E402

ARMS = {"per_step": ["--train.length_grouping", "false"], "blocks": []}


def curriculum(trainer) -> list[list[int]]:
    """Every curriculum step's batch (sample indices), in order."""
    batches = []
    for step in range(trainer.cfg.train.curriculum_steps):
        trainer.step = step
        batches.append(trainer._curriculum_batch())
    trainer.step = 0
    return batches


def filled(trainer, batches: list[list[int]]) -> float:
    """The share of the batches' tokens that are not padding."""
    lengths = [[len(trainer.examples[i].input_ids) for i in b] for b in batches]
    return sum(map(sum, lengths)) / sum(len(b) * max(b) for b in lengths)


def repeats(batches: list[list[int]]) -> float:
    """Samples a batch holds more than once, on average (a sample drawn twice counts once)."""
    return sum(len(b) - len(set(b)) for b in batches) / len(batches)


def collate_ms(trainer, batches: list[list[int]], rounds: int) -> float:
    """The collator's median milliseconds a batch over the rounds."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for b in batches:
            trainer.collate([trainer.examples[i] for i in b])
        times.append((time.perf_counter() - start) / len(batches))
    return 1000 * statistics.median(times)


def main() -> None:
    ap, args, extra = arguments(__doc__)
    precision = fast_precision()
    attn = fast_attn_implementation(precision)
    total = _recipe_curriculum(args, extra)  # the curriculum's steps
    if not total:
        ap.error(f"{args.recipe} has no curriculum (train.curriculum_steps)")
    with tempfile.TemporaryDirectory() as tmp:
        try:  # build() turns the curriculum off; the recipe's back on, with the arm's flags
            trainers = {
                arm: build(
                    args.recipe, args.world, Path(tmp) / arm, precision, attn,
                    [*extra, *flags, "--train.curriculum_steps", str(total)],
                )
                for arm, flags in ARMS.items()
            }  # fmt: skip
        except (UsageError, DataError, OSError) as e:  # a world or recipe that is not there
            ap.error(str(e))
        every = {arm: curriculum(t) for arm, t in trainers.items()}
        picks = [i * total // args.steps for i in range(args.steps)]
        micro = {
            arm: [t._micro_batches(every[arm][i]) for i in [0, 1, *picks]] for arm, t in trainers.items()
        }
        for arm, t in trainers.items():
            for m in micro[arm][:2]:
                t._optimizer_step(m)
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for _ in range(args.rounds):
            for arm, t in trainers.items():
                start = time.perf_counter()
                for m in micro[arm][2:]:
                    t._optimizer_step(m)
                times[arm].append((time.perf_counter() - start) / args.steps)
        blocks = trainers["blocks"]
        timed = [every["blocks"][i] for i in picks]
        collate_now = collate_ms(blocks, timed, args.rounds)
        with mock.patch.object(collate, "independent_turns", naive_independent_turns):
            collate_before = collate_ms(blocks, timed, args.rounds)
    rows = []
    base = statistics.median(times["per_step"])
    for arm in ARMS:
        ms = 1000 * statistics.median(times[arm])
        rows.append(
            {
                "arm": arm,
                "not_padding": round(filled(trainers[arm], every[arm]), 4),
                "repeats_per_batch": round(repeats(every[arm]), 3),
                "step_ms": round(ms, 1),
                "speedup": round(1000 * base / ms, 3),
                "rounds_ms": [round(1000 * s, 1) for s in times[arm]],
            }
        )
        print(
            f"{arm:9} {100 * rows[-1]['not_padding']:5.1f}% of the tokens not padding, "
            f"{rows[-1]['repeats_per_batch']:.2f} repeated samples a batch, {ms:7.1f} ms a step "
            f"x{rows[-1]['speedup']:.2f} ({precision}, {attn}; steps {picks[0]}-{picks[-1]} of {total})"
        )
    print(f"collate: {collate_before:.1f} ms a batch row by row, {collate_now:.1f} ms with independent_turns")
    collated = {"row_by_row_ms": round(collate_before, 2), "independent_turns_ms": round(collate_now, 2)}
    print(json.dumps({**run_info("curriculum_batches", args, extra), "rows": rows, "collate": collated}))


def _recipe_curriculum(args, extra: list[str]) -> int:
    """The recipe's `train.curriculum_steps` (with the overrides after `--`)."""
    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig

    argv = ["--data.root", args.world, "--data.synth", "false", *extra]
    return load_config(SFTConfig, args.recipe, argv).train.curriculum_steps


if __name__ == "__main__":
    main()
