"""`gpt2mm eval`: answer a split with a model and score the answers.

    gpt2mm eval runs/stage3/best --questions val_questions.json --annotations val_annotations.json \\
        --images val2014/ [--limit 1000] [--batch-size 64] [--max-new-tokens 8] \\
        [--out results.json] [--json scores.json] [--skip-bad] [--device cuda]
    gpt2mm eval runs/stage1/best --recipe configs/my-recipe.yaml [--data.KEY VALUE ...]
    gpt2mm eval runs/stage1/best --data.format csv --data.csv_val data/val.csv
    gpt2mm eval runs/stage1/best --data.format hf --data.hf_dataset data/vqa-parquet --data.hf_val_split test

The split: official VQA v2 files (`--questions`, `--annotations`, `--images`), or the validation split of a
data source as a training recipe's `data:` section names it (`--recipe RECIPE.yaml`, whose other sections
are not read, and/or `--data.KEY VALUE` for any key of `QuestionDataConfig`: format vqa, hf, csv or llava,
as in `gpt2mm train`): `val_questions` / `val_annotations` / `val_images`, `hf_val_split` of `hf_dataset`,
`csv_val`, or `llava_val` (each record's first user turn, with its images, answered and scored against its
first reply by exact match). Without `--recipe`, `data.root` is the current folder. `data.limit` and `data.val_limit` are
not read: `--limit N` takes the first N questions.

The model (a saved directory or a hub id) answers each question greedily, in batches with left padding
(`gpt2mm.eval.evaluate.answer_questions`, the code path of training-time evaluation). Each answer is
post-processed as `MultimodalGPT2Processor.postprocess_answer` documents: the generated text is cut at the
first end-of-text token (or a new `Q:` turn, or a blank line) and stripped; nothing else is changed, since
the metric does its own normalization (punctuation, number words, articles, case).

Official files: the answers are written in the official results format (`[{"question_id", "answer"}]`,
`--out`) and scored by the very `evaluate` function of `gpt2mm vqa-score`, so the two commands print the
same numbers for the same results. With `--limit N` (the first N questions of the file) or `--skip-bad`
(questions the loader refuses are counted and skipped), the official questions and annotations are
restricted to the answered question ids, so the official coverage check (the results answer exactly the
question set) still holds. Other formats: each sample is scored by the official VQA accuracy when it has 10
human answers (a Hugging Face `answers` column, as VQA v2's), by exact match after the official
normalization ("Two." == "2") against its answer(s) otherwise (a CSV, an `answer` column); the report
names the scoring (`vqa accuracy:` or `exact match:`, both when a split mixes them), and `--out` holds
`[{"id", "question", "answer", "references"}]`.

`--skip-bad` (or `data.skip_bad`) decodes every image once before answering (as `gpt2mm train --data.skip_bad
true` does): the questions about an unreadable image are skipped and counted too, and the scores are over
the rest. The report is followed by the throughput (questions per second of generation) and, when questions
were skipped, how many. `--out` and `--json` may not name an input file (nor each other).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2mm.devices import pick_device
from gpt2mm.errors import UsageError
from gpt2mm.eval.run_eval import (
    Split,
    answer_and_score,
    check_model_path,
    check_outputs,
    load_eval_split,
    load_for_eval,
    skipped_line,
)
from gpt2mm.eval.score import format_report, format_split_report
from gpt2mm.eval.vqa_files import write_json


def configure(parser: argparse.ArgumentParser) -> None:
    """The model, the split, and where to write results and scores."""
    parser.usage = f"gpt2mm eval MODEL {SPLIT_USAGE} [--limit N] [--out FILE] [--json FILE] [options]"
    parser.add_argument("model", help="a saved model directory (config.json + processor) or a hub id")
    add_split_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    parser.add_argument("--batch-size", type=int, default=64, help="questions per generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="longest answer, in tokens")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help='write the answers here: [{"question_id", "answer"}, ...] (other formats: id, question, '
        "answer, references)",
    )
    parser.add_argument(
        "--json", dest="json_out", type=Path, default=None, metavar="OUT", help="write the scores here"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


OFFICIAL_FLAGS = ("questions", "annotations", "images")
# the data options eval does not read (the training split, the caps --limit replaces, training's caches)
NOT_READ = (
    "train_questions", "train_annotations", "train_images", "limit", "val_limit", "cache_pixels",
    "feature_cache", "hf_train_split", "csv_train", "llava_train",
)  # fmt: skip
DATA_DEFAULTS = {"root": "."}  # without a recipe
SPLIT_USAGE = (
    "(--questions FILE --annotations FILE --images DIR | --recipe RECIPE.yaml | --data.KEY VALUE ...)"
)


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """The split a model is scored on (eval, report): official VQA files, or a data source as a recipe's
    `data:` section names it (`--recipe`, `--data.KEY VALUE`); the images' names, and whether records the
    loader refuses are skipped (what `split_config` and `load_split` read, with `--limit`)."""
    from gpt2mm.train.args import add_section_arguments
    from gpt2mm.train.config import QuestionDataConfig

    parser.add_argument("--questions", type=Path, default=None, help="official VQA v2 questions JSON")
    parser.add_argument("--annotations", type=Path, default=None, help="official VQA v2 annotations JSON")
    parser.add_argument("--images", type=Path, default=None, help="the split's image folder")
    parser.add_argument(
        "--image-pattern",
        default=None,
        help="image file names, over {image_id} and {subtype}, e.g. '{image_id}.png' (default: COCO's)",
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip (and count) questions the loader refuses"
    )
    group = parser.add_argument_group(
        "a data source instead of official files",
        "the validation split of a recipe's data: section (vqa, hf or csv; see gpt2mm train), any key "
        "overridden as --data.KEY VALUE; without --recipe, data.root is the current folder; point the val "
        "options (val_questions ..., hf_val_split, csv_val) at the split to score",
    )
    group.add_argument(
        "--recipe", "--config", type=Path, default=None, help="a training recipe whose data: section to read"
    )
    add_section_arguments(group, "data", QuestionDataConfig, exclude=NOT_READ, defaults=DATA_DEFAULTS)


def split_config(args: argparse.Namespace):
    """(the data config of the split to score, the input files outputs may not overwrite, as (flag, path)).
    Official files become format vqa with those files as the validation split."""
    from gpt2mm.data.splits import resolve
    from gpt2mm.train.args import load_section, section_overrides
    from gpt2mm.train.config import DataConfig

    overrides = section_overrides(args, "data")
    official = [f for f in OFFICIAL_FLAGS if getattr(args, f) is not None]
    if official:
        if len(official) < len(OFFICIAL_FLAGS):
            missing = ", ".join(f"--{f}" for f in OFFICIAL_FLAGS if f not in official)
            raise UsageError(
                f"official VQA files need --questions, --annotations and --images (missing {missing})"
            )
        if args.recipe is not None or overrides:
            raise UsageError(
                "give either the official files (--questions ...) or a data source (--recipe, --data.*)"
            )
        cfg = DataConfig(
            format="vqa",
            root=".",
            val_questions=str(args.questions),
            val_annotations=str(args.annotations),
            val_images=str(args.images),
            image_pattern=args.image_pattern,
        )
        inputs = [("--questions", args.questions), ("--annotations", args.annotations)]
    elif args.recipe is None and not overrides:
        raise UsageError(
            "no split to score: give the official files (--questions, --annotations, --images), "
            "a recipe (--recipe RECIPE.yaml) or a data source (--data.format hf|csv ...)"
        )
    else:
        # any training recipe's data: section (DataConfig reads them all); eval itself takes vqa, hf or csv
        defaults = {} if args.recipe is not None else DATA_DEFAULTS
        cfg = load_section(DataConfig, args.recipe, "data", overrides, defaults)
        try:
            cfg.check(formats=("vqa", "hf", "csv", "llava"))
        except ValueError as e:
            raise UsageError(str(e)) from None
        if args.image_pattern is not None:
            cfg.image_pattern = args.image_pattern
        inputs = {
            "vqa": [("data.val_questions", cfg.val_questions), ("data.val_annotations", cfg.val_annotations)],
            "csv": [("data.csv_val", cfg.csv_val)],
            "hf": [("data.hf_dataset", cfg.hf_dataset)],
            "llava": [("data.llava_val", cfg.llava_val)],
        }[cfg.format]
        inputs = [(flag, resolve(cfg.root, path)) for flag, path in inputs]
    cfg.skip_bad = cfg.skip_bad or args.skip_bad
    return cfg, inputs


def load_split(args: argparse.Namespace, cfg=None) -> Split:
    """The split's samples (and, for official files, its official records), its load report printed."""
    if cfg is None:
        cfg, _ = split_config(args)
    split = load_eval_split(cfg, limit=args.limit, progress=True)
    print(split.report.summary())
    if split.report.examples:
        print(f"  e.g. {split.report.examples[0]}")
    return split


def run(args: argparse.Namespace) -> int:
    """Load, answer, write the results, score (official files: vqa-score's `evaluate`), print the report."""
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be at least 1")
    cfg, inputs = split_config(args)
    check_outputs([("--out", args.out), ("--json", args.json_out)], inputs)
    device = pick_device(args.device)
    check_model_path(args.model)
    split = load_split(args, cfg)
    model, processor = load_for_eval(args.model, device)
    results, scores, seconds = answer_and_score(
        model,
        processor,
        split,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=True,
        results_name=str(args.out) if args.out is not None else "results",
    )
    if args.out is not None:
        write_json(args.out, results, "--out")
    n = len(results)
    qps = n / seconds if seconds > 0 else float("inf")
    print(format_report(scores, split.official[1]) if split.official else format_split_report(scores))
    print(f"\nthroughput: {n} questions in {seconds:.1f}s = {qps:.1f} questions/s ({device})")
    report = split.report
    if report.num_skipped:
        print(skipped_line(report, n))
    if args.out is not None:
        print(f"wrote {args.out}")
    if args.json_out is not None:
        meta = {
            "model": str(args.model),
            "split": split.name,
            "scoring": scores.get("scoring", "vqa accuracy"),
            "questions": n,
            "seconds": seconds,
            "questions_per_second": qps,
            "device": device,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "skipped": dict(report.skipped),
        }
        write_json(args.json_out, {**scores, "eval": meta}, "--json")
        print(f"wrote {args.json_out}")
    return 0
