"""`gpt2mm demo [--out DIR] [--minutes M] [--stages sft,ppo,instruct]`: the offline demo. See gpt2mm.demo."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("demo-out"), help="directory for everything it writes"
    )
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget of the whole demo")
    parser.add_argument(
        "--stages", default="sft", help="comma-separated: sft (stage 1), ppo (stage 2), instruct (stage 3)"
    )
    parser.add_argument(
        "--ppo-minutes",
        type=float,
        default=None,
        help="of the budget, for stage 2 (default: a tenth of it, a twentieth before stage 3; a third with "
        "--labelled-fraction)",
    )
    parser.add_argument(
        "--instruct-minutes",
        type=float,
        default=None,
        help="of the budget, for stage 3, which carries the run's learning-rate decay (default: three "
        "twentieths of it, and what the earlier stages left unused)",
    )
    parser.add_argument(
        "--labelled-fraction",
        type=float,
        default=None,
        help="with --stages sft,ppo: stage 1 on this share of the training images; stage 2 from tags with a "
        "reward model on the rest, against two baselines (gpt2mm.few_labels)",
    )
    parser.add_argument(
        "--tags", type=int, default=None, help="tagged stage-1 answers for the reward model (default 2000)"
    )
    parser.add_argument(
        "--tag-noise",
        type=float,
        default=None,
        help="share of tags the simulated taggers get wrong (default 0.05)",
    )
    parser.add_argument(
        "--layout",
        choices=("grid", "free"),
        default=None,
        help="the world: free (objects anywhere, varied sizes, textured backgrounds) or grid (one object per "
        "cell of a 3x3 grid); default: configs/demo-sft.yaml's",
    )
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")


def run(args: argparse.Namespace) -> int:
    from gpt2mm.demo import run

    return run(args)
