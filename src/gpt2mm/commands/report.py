"""`gpt2mm report`: one table comparing checkpoints (e.g. after stages 1, 2 and 3) on the same data.

    gpt2mm report runs/stage1 runs/stage2 runs/stage3 --questions test_questions.json \\
        --annotations test_annotations.json --images images/test [--limit N] \\
        [--world data/synth --split test] [--out report.md --png report.png] [--json report.json]
    gpt2mm report runs/stage1 runs/stage3 --data.format csv --data.csv_val data/test.csv

The split is `gpt2mm eval`'s (official VQA files, or `--recipe` / `--data.KEY VALUE`: see
`gpt2mm.commands.eval`).

Each argument is a training RUN directory (holding `best/` and/or `checkpoint-N/` model directories: its
`best/` is used when present, else its last checkpoint), a saved MODEL directory (used as is) or a hub id.
Rows are labelled by the argument's own name (`stage2`), so the table reads as the list typed.

Columns: the official VQA accuracy (overall and per answer type, the `evaluate` numbers `gpt2mm eval` and
`gpt2mm vqa-score` print for the same answers; on a split without official files, `gpt2mm eval`'s score,
named by its scoring: `VQA`, `exact match` or, when the split mixes them, `score`) and, with `--world` (a synthetic world written by
`gpt2mm synth`), the mean precision / recall / F1 of a free description of each image of the split
(prompt `DESCRIBE_PROMPT`, greedy, scored by `score_description` against the scene records). Both matter:
a later stage that improves descriptions but breaks short answers (or the reverse) shows up in one table.
`--limit N` caps both the questions (the first N) and the described images (the first N scenes).
`--skip-bad` skips (and counts) questions the loader refuses and those about an unreadable image, as
`gpt2mm eval --skip-bad` does, and leaves unreadable images out of the descriptions; the caption says how
many were skipped. `--out`, `--png` and `--json` may not name an input file (nor each other).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from gpt2mm.commands.eval import SPLIT_USAGE, add_split_arguments, load_split, split_config
from gpt2mm.devices import pick_device
from gpt2mm.errors import UsageError
from gpt2mm.eval.report import (
    DESCRIBE_MAX_NEW_TOKENS,
    description_samples,
    evaluate_checkpoint,
    format_markdown,
    labels_for,
    resolve_checkpoint,
    write_png,
)
from gpt2mm.eval.run_eval import check_outputs, load_for_eval, skipped_reasons
from gpt2mm.eval.vqa_files import write_json


def configure(parser: argparse.ArgumentParser) -> None:
    """Checkpoints to compare, the VQA split, the optional synthetic world, and the outputs."""
    parser.usage = f"gpt2mm report RUN_OR_MODEL ... {SPLIT_USAGE} [--world DIR] [--out FILE] [options]"
    parser.add_argument(
        "models", nargs="+", metavar="RUN_OR_MODEL", help="training run dirs, model dirs or hub ids"
    )
    add_split_arguments(parser)
    parser.add_argument(
        "--limit", type=int, default=None, help="first N questions (and first N images with --world)"
    )
    parser.add_argument("--world", type=Path, default=None, help="a synthetic world: add description F1")
    parser.add_argument("--split", default="test", help="the world's split to describe (default test)")
    parser.add_argument("--batch-size", type=int, default=64, help="questions per generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="longest VQA answer, in tokens")
    parser.add_argument(
        "--describe-max-new-tokens",
        type=int,
        default=DESCRIBE_MAX_NEW_TOKENS,
        help=f"longest description, in tokens (default {DESCRIBE_MAX_NEW_TOKENS})",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument("--png", type=Path, default=None, help="write a bar chart here (needs matplotlib)")
    parser.add_argument(
        "--json", dest="json_out", type=Path, default=None, metavar="OUT", help="write all numbers here"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Resolve every checkpoint first (a typo fails before any generation), then evaluate each in turn."""
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.describe_max_new_tokens < 1:
        raise UsageError("--batch-size and the --*max-new-tokens must be at least 1")
    if args.png is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--png needs matplotlib: pip install 'gpt2-multimodal[plot]'") from None
    cfg, inputs = split_config(args)
    check_outputs([("--out", args.out), ("--png", args.png), ("--json", args.json_out)], inputs)
    targets = [resolve_checkpoint(m) for m in args.models]
    labels = labels_for(args.models)
    device = pick_device(args.device)
    split = load_split(args, cfg)
    describe = None
    if args.world is not None:
        describe = description_samples(args.world, args.split, args.limit, skip_bad=args.skip_bad)

    rows = []
    for label, target in zip(labels, targets):
        print(f"== {label}: {target}")
        model, processor = load_for_eval(target, device)
        row = evaluate_checkpoint(
            model,
            processor,
            split,
            describe,
            args.batch_size,
            args.max_new_tokens,
            args.describe_max_new_tokens,
        )
        rows.append({"label": label, "model": str(target), **row})
        del model, processor
        gc.collect()

    scoring = "VQA accuracy" if split.official else rows[0]["vqa"]["scoring"].replace("vqa", "VQA")
    caption = f"{scoring[0].upper()}{scoring[1:]} (%) on {split.name}: {len(split.samples)} questions"
    if split.report.num_skipped:
        caption += f" ({split.report.num_skipped} skipped: {skipped_reasons(split.report)})"
    if describe is not None:
        caption += f"; descriptions (%) of {len(describe[1])} {args.split} images of {args.world.name}"
    table = format_markdown(rows, caption)
    print()
    print(table, end="")
    write_outputs(args, rows, table, caption)
    return 0


def write_outputs(args: argparse.Namespace, rows: list[dict], table: str, caption: str) -> None:
    """The table (`--out`), the chart (`--png`) and every number (`--json`), each where it was asked for."""
    if args.out is not None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table, encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--out {args.out}: cannot write ({e})") from None
        print(f"wrote {args.out}")
    if args.png is not None:
        write_png(rows, args.png, title=caption)
        print(f"wrote {args.png}")
    if args.json_out is not None:
        write_json(args.json_out, rows, "--json")
        print(f"wrote {args.json_out}")
