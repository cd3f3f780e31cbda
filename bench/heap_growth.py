"""The resident memory of a CPU training run, with and without `HeapTrimmer`, side by side in one run.

    python bench/heap_growth.py WORLD --minutes 12 [--recipe configs/demo-sft.yaml] [--cores 0,1]
    python bench/heap_growth.py WORLD --minutes 7 --threads 2 -- --train.eval_every 100
    python bench/heap_growth.py --render --minutes 15
    python bench/heap_growth.py --render --minutes 8 --threads 2 --arms trimmed,every,untrimmed

Runs the recipe's stage-1 trainer (`gpt2mm train RECIPE --data.root WORLD --data.synth false`, plus any overrides
after `--`) once for each arm, each with its own output folder under a temporary directory: `trimmed`, as the
trainer runs (`HeapTrimmer` on); `untrimmed`, with a trimmer that never trims (the loop before it); and, when
`--arms` names it, `every`, a trimmer that trims whenever the size has grown, however soon after its last trim (the
loop before 2026-12-06). With `--threads 1` (the default) two arms run at the same time, each on one of `--cores`;
with more threads the arms run one after the other, each on all of `--cores`. Each process reads its resident size
after every step (before the loop's trimmer runs, so a trimmed arm's figures are its highest of the step). WORLD is
a folder the recipe reads, e.g. the demo's: `gpt2mm synth WORLD --train 10000 --val 100 --test 500 --seed 0
--questions-per-image 8 --layout free`; with `--render` in its place, each arm renders the recipe's world in its
own process first, as the demo does (the case where the untrimmed loop's memory grows fastest). Prints a table
and, last, one JSON line: per arm the steps, seconds a step, the resident size (MiB) at the start, its peak, its
end and after every 100th step, and the trims.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("trimmed", "untrimmed", "every")


def child(
    arm: str, recipe: str, world: str, minutes: float, out: Path, extra: list[str], render: bool
) -> None:
    """One arm in this process: the trainer with its steps watched (and, untrimmed, no trimming)."""
    import gpt2mm.train.trainer as trainer_module
    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig
    from gpt2mm.train.heap import INTERVAL, HeapTrimmer, resident_bytes
    from gpt2mm.train.sft import SFTTrainer

    trimmers: list[HeapTrimmer] = []

    class Watched(HeapTrimmer):
        def __init__(self):
            super().__init__(interval=0.0 if arm == "every" else INTERVAL)
            if arm == "untrimmed":
                self.trim = None
            trimmers.append(self)

    trainer_module.HeapTrimmer = Watched
    overrides = [
        "--data.root", str(out / "world") if render else world, "--data.synth", str(render).lower(),
        "--train.output_dir", str(out / "run"),
        "--train.max_minutes", repr(minutes), "--train.progress", "false", "--train.overwrite", "true", *extra,
    ]  # fmt: skip
    cfg = load_config(SFTConfig, recipe, overrides)
    trainer = SFTTrainer(cfg, log=lambda message: None)
    start_mib = resident_bytes() / 2**20
    sizes: list[float] = []
    step = trainer.train_step

    def watched_step():
        result = step()
        sizes.append(resident_bytes() / 2**20)
        return result

    trainer.train_step = watched_step
    summary = trainer.train()
    row = {
        "arm": arm,
        "steps": summary["steps"],
        "s_per_step": round(summary["train_seconds"] / max(1, summary["steps"]), 3),
        "start_mib": round(start_mib),
        "peak_mib": round(max(sizes)),
        "end_mib": round(sizes[-1]),
        "trims": trimmers[0].trims if trimmers else 0,
        "mib_every_100_steps": [round(m) for m in sizes[99::100]],
        "best_val_accuracy": summary["best_val_accuracy"],
    }
    (out / "result.json").write_text(json.dumps(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "world", nargs="?", help="the data folder the recipe trains on (data.root; not with --render)"
    )
    parser.add_argument("--minutes", type=float, default=12.0, help="each arm's time budget")
    parser.add_argument("--recipe", default="configs/demo-sft.yaml")
    parser.add_argument("--cores", default="0,1", help="the cores (with --threads 1: two, one an arm)")
    parser.add_argument(
        "--threads", type=int, default=1, help="threads an arm (more than 1: one arm at a time)"
    )
    parser.add_argument(
        "--render", action="store_true",
        help="each arm renders the recipe's world in its own process first, as `gpt2mm train` and the demo do "
        "when the world is not there (WORLD is then not read)",
    )  # fmt: skip
    parser.add_argument(
        "--arms", default="trimmed,untrimmed", help=f"which arms, in order, from {', '.join(ARMS)}"
    )
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.overrides = argv[cut + 1 :]  # recipe overrides, after --
    if args.child:
        child(args.child, args.recipe, args.world, args.minutes, Path(args.out), args.overrides, args.render)
        return 0
    if args.render == bool(args.world):
        parser.error("give WORLD or --render (each arm renders its own world), one of the two")
    if not args.render and not Path(args.world).is_dir():
        parser.error(f"{args.world}: no such folder (make one with gpt2mm synth WORLD ...)")
    arms = args.arms.split(",")
    if any(arm not in ARMS for arm in arms) or len(set(arms)) != len(arms):
        parser.error(f"--arms {args.arms}: give distinct arms from {', '.join(ARMS)}")
    cores = args.cores.split(",")
    together = args.threads == 1
    if together and (len(cores) != 2 or len(arms) != 2):
        parser.error(f"--cores {args.cores} --arms {args.arms}: with --threads 1 give two cores and two arms")
    tmp = Path(tempfile.mkdtemp(prefix="heap_growth_"))
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    started, procs = time.time(), []
    for i, arm in enumerate(arms):
        (tmp / arm).mkdir()
        command = [
            "taskset", "-c", cores[i] if together else args.cores, sys.executable, __file__,
            *([args.world] if args.world else []), *(["--render"] if args.render else []),
            "--minutes", repr(args.minutes), "--recipe", args.recipe, "--child", arm, "--out", str(tmp / arm),
            "--", *args.overrides,
        ]  # fmt: skip
        procs.append(subprocess.Popen(command, env=env))
        if not together:
            procs[-1].wait()  # one arm at a time
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"heap_growth.py: an arm failed (exit codes {codes}); its output is above", file=sys.stderr)
        return 1
    rows = [json.loads((tmp / arm / "result.json").read_text()) for arm in arms]
    how = "side by side, one core each" if together else f"one after the other, {args.threads} threads each"
    print(f"{len(arms)} arms {how}, {time.time() - started:.0f} s")
    print(
        f"{'arm':<10} {'steps':>6} {'s/step':>7} {'start MiB':>10} {'peak MiB':>9} {'end MiB':>8} {'trims':>6}"
    )
    for r in rows:
        print(
            f"{r['arm']:<10} {r['steps']:>6} {r['s_per_step']:>7} {r['start_mib']:>10} {r['peak_mib']:>9} "
            f"{r['end_mib']:>8} {r['trims']:>6}"
        )
    print(
        json.dumps(
            {
                "minutes": args.minutes,
                "recipe": args.recipe,
                "overrides": args.overrides,
                "threads": args.threads,
                "render": args.render,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
