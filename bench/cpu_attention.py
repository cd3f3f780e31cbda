"""The demo recipe's training step on a CPU with each attention implementation, side by side in one run.

    python bench/cpu_attention.py WORLD [--recipe configs/demo-sft.yaml] [--steps 8] [--rounds 3] [--threads 2]
    python bench/cpu_attention.py WORLD -- --model.overrides.text_config.n_head 8

WORLD is a folder the recipe reads, e.g. the demo's: `gpt2mm synth WORLD --train 10000 --val 100 --test 500
--seed 0 --questions-per-image 8 --layout free`. For each precision this CPU runs (fp32 always, bf16 where it is
native: AVX512-BF16 or AMX) and each attention implementation (transformers' eager and SDPA, and gpt2mm's eager
attention in the inputs' dtype, `gpt2mm_eager`: `gpt2mm.layers.eager_attention`), the recipe's stage-1
trainer is built with the same seed (so the same initial weights) and times `--steps` optimizer steps on the same
batches, drawn after the curriculum (full-length scenes), after two untimed steps. The arms take turns for
`--rounds` rounds, so a machine that slows down or speeds up during the run affects them alike; each arm's figure
is its median round. After the two untimed steps, each implementation's loss on the next batch is compared with
transformers' eager attention's at each precision (the same function: they differ by rounding only). Prints a
table and, last, one JSON line. What `attn_implementation: auto` picks on this machine is printed beside it
(`gpt2mm.train.fast`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpt2mm.errors import DataError, UsageError  # noqa: E402
from gpt2mm.train.args import load_config  # noqa: E402
from gpt2mm.train.config import SFTConfig  # noqa: E402
from gpt2mm.train.fast import fast_attn_implementation, fast_precision  # noqa: E402
from gpt2mm.train.grounding import CENTRE_KEYS, GROUNDING_KEYS  # noqa: E402
from gpt2mm.train.sft import SFTTrainer  # noqa: E402

ATTENTION = ("eager", "sdpa", "gpt2mm_eager")  # transformers' two, then gpt2mm.layers.eager_attention


def build(recipe: str, world: str, out: Path, precision: str, attn: str, extra: list[str]) -> SFTTrainer:
    """The recipe's stage-1 trainer on WORLD at this precision and attention, without the curriculum (its seed, so
    every arm starts from the same weights)."""
    argv = [
        "--data.root",
        world,
        "--data.synth",
        "false",
        "--train.output_dir",
        str(out),
        "--train.precision",
    ]
    argv += [precision, "--model.attn_implementation", attn, "--train.curriculum_steps", "0"]
    trainer = SFTTrainer(load_config(SFTConfig, recipe, argv + extra), log=lambda *a, **k: None)
    trainer.model.train()
    return trainer


def loss_on(trainer: SFTTrainer, micro: list[dict[str, torch.Tensor]]) -> float:
    """The model's loss on the first micro-batch's answers, without a gradient (grounding targets left out)."""
    batch = {k: v for k, v in micro[0].items() if k not in GROUNDING_KEYS + CENTRE_KEYS}
    with torch.no_grad(), trainer.acc.autocast():
        return float(trainer.model(**batch).loss)


def arguments(doc: str) -> tuple[argparse.ArgumentParser, argparse.Namespace, list[str]]:
    """The command line these CPU benches share (WORLD, --recipe, --steps, --rounds, --threads; recipe overrides
    after `--`); sets the thread count."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("world")
    ap.add_argument("--recipe", default="configs/demo-sft.yaml")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per arm and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args, extra = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    return ap, args, [a for a in extra if a != "--"]


def time_arms(ap, args, make, arms, context=lambda arm: contextlib.nullcontext()):
    """Each arm's trainer (`make(arm, out_dir)`), two untimed steps, its loss on the next batch, then `--rounds`
    rounds in which the arms take turns timing `--steps` steps on the same batches (each inside `context(arm)`).
    Returns (losses, seconds a step per round, batches)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trainers = {arm: make(arm, Path(tmp) / "-".join(arm)) for arm in arms}
        except (UsageError, DataError, OSError) as e:  # a world or recipe that is not there
            ap.error(str(e))
        source = trainers[arms[0]]
        batches = [source._micro_batches(source._next_batch()) for _ in range(2 + args.steps)]
        losses = {}
        for arm, t in trainers.items():
            with context(arm):
                for micro in batches[:2]:
                    t._optimizer_step(micro)
                losses[arm] = loss_on(t, batches[2])
        times: dict[tuple[str, str], list[float]] = {arm: [] for arm in arms}
        for _ in range(args.rounds):
            for arm, t in trainers.items():
                with context(arm):
                    start = time.perf_counter()
                    for micro in batches[2:]:
                        t._optimizer_step(micro)
                    times[arm].append((time.perf_counter() - start) / args.steps)
    return losses, times, batches


def run_info(bench: str, args, extra: list[str]) -> dict:
    """What a result line records about its run: the bench, its recipe and overrides, the machine, the counts."""
    return {
        "bench": bench,
        "recipe": args.recipe,
        "extra": extra,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "rounds": args.rounds,
    }


def timing_row(arm, times, losses, base: float) -> dict:
    """An arm's figures: its median seconds a step over the rounds, its speed-up over `base` (seconds a step),
    each round, and its loss after the two untimed steps."""
    ms = 1000 * statistics.median(times[arm])
    return {
        "step_ms": round(ms, 1),
        "speedup": round(1000 * base / ms, 3),
        "rounds_ms": [round(1000 * s, 1) for s in times[arm]],
        "loss_after_2_steps": round(losses[arm], 6),
    }


def main() -> None:
    ap, args, extra = arguments(__doc__)
    precisions = ["fp32"] + (["bf16"] if fast_precision() == "bf16" else [])
    arms = [(p, a) for p in precisions for a in ATTENTION]

    def make(arm, out):  # the recipe's trainer at this precision and attention
        return build(args.recipe, args.world, out, *arm, extra)

    losses, times, batches = time_arms(ap, args, make, arms)
    lengths = [int(m[0]["input_ids"].shape[1]) for m in batches]
    auto = fast_attn_implementation(fast_precision())  # on a CPU: gpt2mm_eager or sdpa
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
        f"batch {sum(int(m['input_ids'].shape[0]) for m in batches[0])}, lengths {min(lengths)}-{max(lengths)}; "
        f"auto picks {fast_precision()} + {auto}"
    )
    rows = []
    for precision in precisions:
        base = statistics.median(times[(precision, "eager")])
        for attn in ATTENTION:
            row = {"precision": precision, "attn": attn, **timing_row((precision, attn), times, losses, base)}
            gap = abs(losses[(precision, "eager")] - losses[(precision, attn)])
            rows.append(row)
            print(
                f"{precision:5} {attn:12} {row['step_ms']:8.1f} ms a step  x{row['speedup']:.2f}  "
                f"(loss {row['loss_after_2_steps']:.6f}, gap to eager {gap:.1e})"
            )
    print(
        json.dumps({**run_info("cpu_attention", args, extra), "auto": [fast_precision(), auto], "rows": rows})
    )


if __name__ == "__main__":
    main()
