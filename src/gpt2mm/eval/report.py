"""`gpt2mm report`: one table comparing checkpoints (e.g. after stages 1, 2 and 3) on the same data.

    gpt2mm report runs/stage1 runs/stage2 runs/stage3 --questions test_questions.json \\
        --annotations test_annotations.json --images images/test [--limit N] \\
        [--world data/synth --split test] [--out report.md --png report.png] [--json report.json]

Each argument is a training RUN directory (holding `best/` and/or `checkpoint-N/` model directories: its
`best/` is used when present, else its last checkpoint), a saved MODEL directory (used as is) or a hub id.
Rows are labelled by the argument's own name (`stage2`), so the table reads as the list typed.

Columns: the official VQA accuracy (overall and per answer type, the `evaluate` numbers `gpt2mm eval` and
`gpt2mm vqa-score` print for the same answers) and, with `--world` (a synthetic world written by
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
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2mm.errors import UsageError
from gpt2mm.eval.run_eval import (
    answer_and_score,
    check_outputs,
    load_for_eval,
    load_questions_and_samples,
    pick_device,
    skipped_reasons,
    unreadable_images,
)
from gpt2mm.eval.vqa_files import write_json

DESCRIBE_MAX_NEW_TOKENS = 96
DESCRIPTION_KEYS = ("precision", "recall", "f1")


def configure(parser: argparse.ArgumentParser) -> None:
    """Checkpoints to compare, the VQA split, the optional synthetic world, and the outputs."""
    parser.add_argument(
        "models", nargs="+", metavar="RUN_OR_MODEL", help="training run dirs, model dirs or hub ids"
    )
    parser.add_argument("--questions", required=True, type=Path, help="official VQA v2 questions JSON")
    parser.add_argument("--annotations", required=True, type=Path, help="official VQA v2 annotations JSON")
    parser.add_argument("--images", required=True, type=Path, help="the split's image folder")
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
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip (and count) questions the loader refuses"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _step(p: Path) -> int:
    return int(p.name.split("-", 1)[1])


def resolve_checkpoint(arg: str | Path) -> str | Path:
    """The model a report argument means: a model dir as is; a run dir's `best/`, else its last
    `checkpoint-N/` (highest N, holding a config.json); a path that does not exist is left to the hub."""
    path = Path(arg)
    if not path.exists():
        return str(arg)
    if (path / "config.json").is_file():
        return path
    if (path / "best" / "config.json").is_file():
        return path / "best"
    ckpts = [
        p
        for p in path.glob("checkpoint-*")
        if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name) and (p / "config.json").is_file()
    ]
    if ckpts:
        return max(ckpts, key=_step)
    raise UsageError(
        f"{path} is neither a gpt2mm model directory (no config.json) nor a training run "
        "(no best/ or checkpoint-N/ model directory)"
    )


def labels_for(args: Sequence[str]) -> list[str]:
    """Each argument's own name (`runs/stage2/` -> `stage2`); the full argument where names repeat."""
    names = [Path(a).name or str(a) for a in args]
    return [n if names.count(n) == 1 else str(a) for n, a in zip(names, args)]


def description_samples(
    world: Path, split: str, limit: int | None = None, skip_bad: bool = False
) -> tuple[list[Any], list[dict]]:
    """(samples asking `DESCRIBE_PROMPT` about each image, their scene records) of a world's split; with
    `skip_bad`, missing and unreadable images are left out (and counted in a printed line) before the
    first `limit` are taken."""
    from gpt2mm.data.samples import Sample, Turn
    from gpt2mm.data.synthetic import DESCRIBE_PROMPT, load_scenes

    try:
        scenes = load_scenes(world, split)
    except (OSError, ValueError) as e:
        raise UsageError(f"--world {world}: cannot read the {split} scenes ({e})") from None
    if skip_bad:
        paths = [str(world / "images" / split / sc["file_name"]) for sc in scenes]
        bad = unreadable_images(paths)  # a missing file is unreadable too
        if bad:
            print(
                f"--world {world}: skipped {len(bad)} unreadable {split} images (e.g. {next(iter(bad.values()))})"
            )
            scenes = [sc for sc, p in zip(scenes, paths) if p not in bad]
    scenes = scenes[:limit] if limit is not None else scenes
    if not scenes:
        raise UsageError(f"--world {world}: the {split} split has no {'readable ' if skip_bad else ''}scenes")
    samples = []
    for sc in scenes:
        image = world / "images" / split / sc["file_name"]
        if not image.is_file():
            raise UsageError(f"--world {world}: image {image} not found")
        samples.append(
            Sample(id=str(sc["image_id"]), image=str(image), turns=[Turn("user", DESCRIBE_PROMPT)])
        )
    return samples, scenes


def generate_descriptions(
    model: Any,
    processor: Any,
    samples: Sequence[Any],
    batch_size: int = 64,
    max_new_tokens: int = DESCRIBE_MAX_NEW_TOKENS,
    progress: bool = False,
) -> list[str]:
    """Greedy descriptions through `answer_questions` (the same prompt format, batching and cut at
    end-of-text as the VQA answers), so a description is what the model says when asked."""
    import torch

    from gpt2mm.eval.evaluate import answer_questions

    with torch.inference_mode():
        return answer_questions(
            model, processor, samples, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress
        )


def score_descriptions(texts: Sequence[str], scenes: Sequence[dict]) -> dict[str, float]:
    """Mean precision, recall and F1 (percent) of `score_description` over the images."""
    from gpt2mm.data.synthetic import score_description

    if len(texts) != len(scenes) or not scenes:
        raise ValueError("one description per scene, at least one")
    totals = dict.fromkeys(DESCRIPTION_KEYS, 0.0)
    for text, scene in zip(texts, scenes):
        s = score_description(text, scene)
        for k in DESCRIPTION_KEYS:
            totals[k] += s[k]
    return {k: 100.0 * v / len(scenes) for k, v in totals.items()}


def _columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(header, section, key) of every column, answer types in sorted order across all rows."""
    cols = [("VQA overall", "vqa", "overall")]
    types = sorted({t for r in rows for t in r["vqa"]["perAnswerType"]})
    cols += [(f"VQA {t}", "perAnswerType", t) for t in types]
    if any(r.get("description") for r in rows):
        cols += [(f"desc {k}", "description", k) for k in DESCRIPTION_KEYS]
    return cols


def _value(row: dict[str, Any], section: str, key: str) -> float | None:
    if section == "vqa":
        return row["vqa"][key]
    if section == "perAnswerType":
        return row["vqa"]["perAnswerType"].get(key)
    return (row.get("description") or {}).get(key)


def format_markdown(rows: Sequence[dict[str, Any]], caption: str = "") -> str:
    """The comparison as a Markdown table, one row per checkpoint, numbers in percent to 2 decimals."""
    cols = _columns(rows)
    header = ["checkpoint", *(c[0] for c in cols), "questions/s"]
    lines = [f"{caption}\n" if caption else ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---", *("---:" for _ in header[1:])]) + "|")
    for r in rows:
        cells = [r["label"]]
        for _, section, key in cols:
            v = _value(r, section, key)
            cells.append("" if v is None else f"{v:.2f}")
        cells.append(f"{r['questions_per_second']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def write_png(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """A grouped bar chart (metrics on x, one bar per checkpoint), drawn with the Agg backend so it works
    on a machine without a display."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--png needs matplotlib: pip install 'gpt2-multimodal[plot]'") from None
    cols = _columns(rows)
    fig = Figure(figsize=(max(6.0, 1.2 * len(cols) + 2), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    n = len(rows)
    width = 0.8 / n
    for i, r in enumerate(rows):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(cols))]
        ys = [_value(r, s, k) or 0.0 for _, s, k in cols]
        ax.bar(xs, ys, width=width, label=r["label"])
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([c[0] for c in cols], rotation=20, ha="right")
    ax.set_ylabel("percent")
    ax.set_ylim(0, 100)
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png")
    except OSError as e:
        raise UsageError(f"--png {path}: cannot write ({e})") from None


def evaluate_checkpoint(
    model: Any,
    processor: Any,
    vqa: tuple[Sequence[Any], Sequence[dict], Sequence[dict]],
    describe: tuple[Sequence[Any], Sequence[dict]] | None,
    batch_size: int,
    max_new_tokens: int,
    describe_max_new_tokens: int,
) -> dict[str, Any]:
    """One row of the report: vqa-score's scores (without the per-question ones), throughput and, with a
    world, the description scores."""
    samples, questions, annotations = vqa
    results, scores, seconds = answer_and_score(
        model,
        processor,
        samples,
        questions,
        annotations,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    row: dict[str, Any] = {
        "vqa": {k: v for k, v in scores.items() if k != "perQuestion"},
        "questions": len(results),
        "seconds": seconds,
        "questions_per_second": len(results) / seconds if seconds > 0 else float("inf"),
    }
    if describe is not None:
        d_samples, scenes = describe
        texts = generate_descriptions(
            model,
            processor,
            d_samples,
            batch_size=batch_size,
            max_new_tokens=describe_max_new_tokens,
            progress=True,
        )
        row["description"] = score_descriptions(texts, scenes)
        row["description_examples"] = texts[:3]
    return row


def run(args: argparse.Namespace) -> int:
    """Resolve every checkpoint first (a typo fails before any generation), then evaluate each in turn."""
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.describe_max_new_tokens < 1:
        raise UsageError("--batch-size and the --*max-new-tokens must be at least 1")
    if args.png is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--png needs matplotlib: pip install 'gpt2-multimodal[plot]'") from None
    check_outputs(
        [("--out", args.out), ("--png", args.png), ("--json", args.json_out)],
        [("--questions", args.questions), ("--annotations", args.annotations)],
    )
    targets = [resolve_checkpoint(m) for m in args.models]
    labels = labels_for(args.models)
    device = pick_device(args.device)
    samples, questions, annotations, load_report = load_questions_and_samples(
        args.questions, args.annotations, args.images, limit=args.limit, skip_bad=args.skip_bad, progress=True
    )
    print(load_report.summary())
    if load_report.examples:
        print(f"  e.g. {load_report.examples[0]}")
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
            (samples, questions, annotations),
            describe,
            args.batch_size,
            args.max_new_tokens,
            args.describe_max_new_tokens,
        )
        rows.append({"label": label, "model": str(target), **row})
        del model, processor
        gc.collect()

    caption = f"VQA accuracy (%) on {args.questions.name}: {len(samples)} questions"
    if load_report.num_skipped:
        caption += f" ({load_report.num_skipped} skipped: {skipped_reasons(load_report)})"
    if describe is not None:
        caption += f"; descriptions (%) of {len(describe[1])} {args.split} images of {args.world.name}"
    table = format_markdown(rows, caption)
    print()
    print(table, end="")
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
    return 0
