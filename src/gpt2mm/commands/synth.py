"""`gpt2mm synth OUT_DIR`: render the synthetic shapes world (VQA v2 + LLaVA formats) into a directory.

    gpt2mm synth data/synth --train 8000 --val 500 --test 500 --seed 0 --holdout-combos red:circle
    gpt2mm synth data/synth-free --layout free     # objects anywhere, varied sizes, textured backgrounds

Parses the arguments, calls `gpt2mm.data.synthetic.write_world` and prints the counts, the blind
(question-only) accuracy and the held-out combinations. OUT_DIR must be absent or empty unless
`--overwrite`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2mm.data.synthetic import FAMILIES, LAYOUTS, write_world
from gpt2mm.errors import UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    """The world's size, seed and knobs; each maps to one `write_world` argument."""
    parser.add_argument("out_dir", type=Path, help="directory to write (absent or empty, unless --overwrite)")
    parser.add_argument("--train", type=int, default=8000, help="training images")
    parser.add_argument("--val", type=int, default=500, help="validation images")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files)")
    parser.add_argument(
        "--layout",
        default="grid",
        choices=LAYOUTS,
        help="grid: one object per cell of a 3x3 grid on a flat background; free: objects anywhere, of "
        "varied size and angle, overlapping a little, on textured noisy backgrounds (positions are then "
        "the 3x3 regions holding the centres, asked about only where clear)",
    )
    parser.add_argument(
        "--image-size", type=int, default=48, help="image side in pixels (3x3 cells or regions)"
    )
    parser.add_argument("--questions-per-image", type=int, default=5, help="VQA questions per image")
    parser.add_argument("--min-objects", type=int, default=1, help="fewest objects per image")
    parser.add_argument("--max-objects", type=int, default=6, help="most objects per image (at most 9)")
    parser.add_argument(
        "--answer-noise", type=float, default=0.05, help="chance a simulated human answer is wrong"
    )
    parser.add_argument(
        "--holdout-combos",
        default="",
        help="colour:shape combos kept out of train images, e.g. red:circle,blue:square",
    )
    parser.add_argument(
        "--families",
        default="",
        help=f"comma-separated question families (default all: {','.join(FAMILIES)})",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")


def run(args: argparse.Namespace) -> int:
    """Refuse a non-empty OUT_DIR (unless --overwrite), write the world, print what it holds."""
    out: Path = args.out_dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} is not empty; choose another path or pass --overwrite")
    families = [f.strip() for f in args.families.split(",") if f.strip()] or None
    m = write_world(
        out,
        n_train=args.train,
        n_val=args.val,
        n_test=args.test,
        seed=args.seed,
        image_size=args.image_size,
        holdout=args.holdout_combos,
        questions_per_image=args.questions_per_image,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        answer_noise=args.answer_noise,
        families=families,
        layout=args.layout,
    )
    counts = ", ".join(
        f"{s} {c['images']} images / {c['questions']} questions" for s, c in m["counts"].items()
    )
    print(f"wrote the synthetic world to {out} in {m['seconds']:.1f}s: {counts}")
    blind = m["blind_accuracy"]
    if blind["overall"] is not None:
        fams = ", ".join(f"{f} {a:.1%}" for f, a in blind["by_family"].items())
        print(f"blind (question-only) accuracy on test: {blind['overall']:.1%} ({fams})")
    if m["params"]["holdout"]:
        held = ", ".join(f"{c} {s}" for c, s in m["params"]["holdout"])
        print(
            f"held out of train: {held}; test images containing them: {m['counts']['test']['images_with_holdout']}"
        )
    return 0
