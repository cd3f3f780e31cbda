"""The demo recipe's training step on a CPU as the package runs it and as it ran before, side by side in one run.

    python bench/cpu_step.py WORLD [--recipe configs/demo-sft.yaml] [--steps 8] [--rounds 3] [--threads 2]

WORLD is a folder the recipe reads, e.g. the demo's: `gpt2mm synth WORLD --train 10000 --val 100 --test 500
--seed 0 --questions-per-image 8 --layout free`. Arms (`ARMS`): `before`, PyTorch's default layouts (as until
2026-12-06); `now`, the CPU layouts (`gpt2mm.layers.cpu_layout`: the CNN stem on channels-last tensors, the
projector's attention through PyTorch's unfused kernel). Recipe overrides after `--` apply to every arm. For each
precision this CPU runs (fp32 always, bf16 where it is native) with the attention `auto` picks for it,
the recipe's stage-1 trainer is built once per arm with the same seed (the same initial weights) and times
`--steps` optimizer steps on the same batches, drawn after the curriculum, after two untimed steps. The arms take
turns for `--rounds` rounds, so a machine that slows down or speeds up affects them alike; each arm's figure is its
median round. Each arm's loss on the next batch is printed: the arms compute the same function (they differ by
rounding). Prints a table and, last, one JSON line.
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
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpt2mm import layers  # noqa: E402
from gpt2mm.errors import DataError, UsageError  # noqa: E402
from gpt2mm.train.args import load_config  # noqa: E402
from gpt2mm.train.config import SFTConfig  # noqa: E402
from gpt2mm.train.fast import fast_attn_implementation, fast_precision  # noqa: E402
from gpt2mm.train.sft import SFTTrainer  # noqa: E402

ARMS = {"before": False, "now": True}  # name -> the CPU layouts on


def layout(on: bool):
    """A context in which the model runs with or without the CPU layouts."""
    return contextlib.nullcontext() if on else mock.patch.object(layers, "cpu_layout", lambda x: False)


def build(recipe: str, world: str, out: Path, precision: str, extra: list[str]) -> SFTTrainer:
    """The recipe's stage-1 trainer on WORLD at this precision with `auto`'s attention, without the curriculum
    (its seed, so every arm starts from the same weights)."""
    attn = fast_attn_implementation(precision)
    argv = ["--data.root", world, "--data.synth", "false", "--train.output_dir", str(out)]
    argv += [
        "--train.precision",
        precision,
        "--model.attn_implementation",
        attn,
        "--train.curriculum_steps",
        "0",
    ]
    trainer = SFTTrainer(load_config(SFTConfig, recipe, argv + extra), log=lambda *a, **k: None)
    trainer.model.train()
    return trainer


def loss_on(trainer: SFTTrainer, micro: list[dict[str, torch.Tensor]]) -> float:
    """The model's loss on the first micro-batch, without a gradient."""
    with torch.no_grad(), trainer.acc.autocast():
        return float(trainer.model(**micro[0]).loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("world")
    ap.add_argument("--recipe", default="configs/demo-sft.yaml")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per arm and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    torch.set_num_threads(args.threads)
    precisions = ["fp32"] + (["bf16"] if fast_precision() == "bf16" else [])
    arms = [(p, name) for p in precisions for name in ARMS]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trainers = {
                arm: build(args.recipe, args.world, Path(tmp) / "-".join(arm), arm[0], extra) for arm in arms
            }
        except (UsageError, DataError, OSError) as e:  # a world or recipe that is not there
            ap.error(str(e))
        source = trainers[arms[0]]
        batches = [source._micro_batches(source._next_batch()) for _ in range(2 + args.steps)]
        losses = {}
        for arm, t in trainers.items():
            with layout(ARMS[arm[1]]):
                for micro in batches[:2]:
                    t._optimizer_step(micro)
                losses[arm] = loss_on(t, batches[2])
        times: dict[tuple[str, str], list[float]] = {arm: [] for arm in arms}
        for _ in range(args.rounds):
            for arm, t in trainers.items():
                with layout(ARMS[arm[1]]):
                    start = time.perf_counter()
                    for micro in batches[2:]:
                        t._optimizer_step(micro)
                    times[arm].append((time.perf_counter() - start) / args.steps)
    lengths = [int(m[0]["input_ids"].shape[1]) for m in batches]
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
        f"batch {source.cfg.train.batch_size}, lengths {min(lengths)}-{max(lengths)}"
    )
    rows = []
    for precision in precisions:
        base = statistics.median(times[(precision, "before")])
        for name in ARMS:
            ms = 1000 * statistics.median(times[(precision, name)])
            loss = losses[(precision, name)]
            rows.append(
                {
                    "precision": precision,
                    "attn": fast_attn_implementation(precision),
                    "arm": name,
                    "step_ms": round(ms, 1),
                    "speedup_over_before": round(1000 * base / ms, 3),
                    "rounds_ms": [round(1000 * s, 1) for s in times[(precision, name)]],
                    "loss_after_2_steps": round(loss, 6),
                }
            )
            print(
                f"{precision:5} {fast_attn_implementation(precision):6} {name:8} {ms:8.1f} ms a step  "
                f"x{1000 * base / ms:.2f}  (loss {loss:.6f})"
            )
    print(
        json.dumps(
            {
                "bench": "cpu_step",
                "recipe": args.recipe,
                "extra": extra,
                "cpu": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "threads": args.threads,
                "steps": args.steps,
                "rounds": args.rounds,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
