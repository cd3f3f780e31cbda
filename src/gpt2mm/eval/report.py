"""The pieces of `gpt2mm report` (the command is `gpt2mm.commands.report`): which model a RUN_OR_MODEL
argument means, row labels, free descriptions of a synthetic world's images and their scores, one row of
scores per checkpoint, and the table as Markdown and as a bar chart.

A row holds the official VQA accuracy (the `evaluate` numbers `gpt2mm eval` and `gpt2mm vqa-score` print
for the same answers) and, given a world, the mean precision / recall / F1 of a description of each image
(prompt `DESCRIBE_PROMPT`, greedy, scored by `score_description` against the scene records): a later stage
that improves descriptions but breaks short answers (or the reverse) shows up in one table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2mm.errors import UsageError
from gpt2mm.eval.run_eval import (
    Split,
    answer_and_score,
    unreadable_images,
)

DESCRIBE_MAX_NEW_TOKENS = 96
DESCRIPTION_KEYS = ("precision", "recall", "f1")


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
    scoring = rows[0]["vqa"].get("scoring", "vqa accuracy") if rows else "vqa accuracy"
    name = {"vqa accuracy": "VQA", "exact match": "exact match"}.get(scoring, "score")  # score: both mixed
    cols = [(f"{name} overall", "vqa", "overall")]
    types = sorted({t for r in rows for t in r["vqa"]["perAnswerType"]})
    cols += [(f"{name} {t}", "perAnswerType", t) for t in types]
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
    split: Split,
    describe: tuple[Sequence[Any], Sequence[dict]] | None,
    batch_size: int,
    max_new_tokens: int,
    describe_max_new_tokens: int,
) -> dict[str, Any]:
    """One row of the report: `gpt2mm eval`'s scores of the split (without the per-question ones; official
    files: vqa-score's), throughput and, with a world, the description scores."""
    results, scores, seconds = answer_and_score(
        model,
        processor,
        split,
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
