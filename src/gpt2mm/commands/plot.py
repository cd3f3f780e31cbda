"""`gpt2mm plot RUN_DIR [--out curves.png]`: the loss (stages 1 and 3) or the reward and KL (stage 2) of a
training run, with its validation accuracy.

`--out` is a file whose extension names the format (.png, .pdf, .svg, ... : what matplotlib writes) or a
directory (an existing one, or a path ending in `/`), which gets `curves.png`; missing parent directories
are created. The path printed is the file written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2mm.train.plot import DEFAULT_NAME, plot_run


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a training run directory (holds metrics.jsonl)")
    parser.add_argument(
        "--out",
        default=None,
        help=f"image to write: .png, .pdf, .svg, ...; or a directory, for {DEFAULT_NAME} in it "
        f"(default RUN_DIR/{DEFAULT_NAME})",
    )


def run(args: argparse.Namespace) -> int:
    out = plot_run(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0
