"""`gpt2mm eval`: answer a VQA v2 split with a model and score the answers with the official metric.

    gpt2mm eval runs/stage3/best --questions val_questions.json --annotations val_annotations.json \\
        --images val2014/ [--limit 1000] [--batch-size 64] [--max-new-tokens 8] \\
        [--out results.json] [--json scores.json] [--skip-bad] [--device cuda]

The model (a saved directory or a hub id) answers each question greedily, in batches with left padding
(`gpt2mm.eval.evaluate.answer_questions`, the code path of training-time evaluation). Each answer is
post-processed as `MultimodalGPT2Processor.postprocess_answer` documents: the generated text is cut at the
first end-of-text token (or a new `Q:` turn, or a blank line) and stripped; nothing else is changed, since
the official metric does its own normalization (punctuation, number words, articles, case).

The answers are written in the official results format (`[{"question_id", "answer"}]`, `--out`) and scored
by the very `evaluate` function of `gpt2mm vqa-score`, so the two commands print the same numbers for the
same results. With `--limit N` (the first N questions of the file) or `--skip-bad` (questions the loader
refuses are counted and skipped), the official questions and annotations are restricted to the answered
question ids, so the official coverage check (the results answer exactly the question set) still holds.
`--skip-bad` decodes every image once before answering (as `gpt2mm train --data.skip_bad true` does): the
questions about an unreadable image are skipped and counted too, and the scores are over the rest. The
report is vqa-score's, followed by the throughput (questions per second of generation) and, when questions
were skipped, how many. `--out` and `--json` may not name an input file (nor each other).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2mm.devices import pick_device
from gpt2mm.errors import UsageError
from gpt2mm.eval.run_eval import (
    answer_and_score,
    check_model_path,
    check_outputs,
    load_for_eval,
    load_questions_and_samples,
    skipped_line,
)
from gpt2mm.eval.score import format_report
from gpt2mm.eval.vqa_files import write_json


def configure(parser: argparse.ArgumentParser) -> None:
    """The model, the three official inputs, and where to write results and scores."""
    parser.add_argument("model", help="a saved model directory (config.json + processor) or a hub id")
    add_split_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    parser.add_argument("--batch-size", type=int, default=64, help="questions per generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="longest answer, in tokens")
    parser.add_argument(
        "--out", type=Path, default=None, help='write the answers here: [{"question_id", "answer"}, ...]'
    )
    parser.add_argument(
        "--json", dest="json_out", type=Path, default=None, metavar="OUT", help="write the scores here"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """The VQA split a model is scored on (eval, report): the official files, the images' names, and
    whether questions the loader refuses are skipped (what `load_split` reads, with `--limit`)."""
    parser.add_argument("--questions", required=True, type=Path, help="official VQA v2 questions JSON")
    parser.add_argument("--annotations", required=True, type=Path, help="official VQA v2 annotations JSON")
    parser.add_argument("--images", required=True, type=Path, help="the split's image folder")
    parser.add_argument(
        "--image-pattern",
        default=None,
        help="image file names, over {image_id} and {subtype}, e.g. '{image_id}.png' (default: COCO's)",
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip (and count) questions the loader refuses"
    )


def load_split(args: argparse.Namespace):
    """The split's samples and official records (`load_questions_and_samples`), its load report printed."""
    samples, questions, annotations, report = load_questions_and_samples(
        args.questions,
        args.annotations,
        args.images,
        limit=args.limit,
        skip_bad=args.skip_bad,
        progress=True,
        image_pattern=args.image_pattern,
    )
    print(report.summary())
    if report.examples:
        print(f"  e.g. {report.examples[0]}")
    return samples, questions, annotations, report


def run(args: argparse.Namespace) -> int:
    """Load, answer, write the results, score with vqa-score's `evaluate`, print vqa-score's report."""
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be at least 1")
    check_outputs(
        [("--out", args.out), ("--json", args.json_out)],
        [("--questions", args.questions), ("--annotations", args.annotations)],
    )
    device = pick_device(args.device)
    check_model_path(args.model)
    samples, questions, annotations, report = load_split(args)
    model, processor = load_for_eval(args.model, device)
    results_name = str(args.out) if args.out is not None else "results"
    results, scores, seconds = answer_and_score(
        model,
        processor,
        samples,
        questions,
        annotations,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=True,
        names=(str(args.questions), str(args.annotations), results_name),
    )
    if args.out is not None:
        write_json(args.out, results, "--out")
    n = len(results)
    qps = n / seconds if seconds > 0 else float("inf")
    print(format_report(scores, annotations))
    print(f"\nthroughput: {n} questions in {seconds:.1f}s = {qps:.1f} questions/s ({device})")
    if report.num_skipped:
        print(skipped_line(report, n))
    if args.out is not None:
        print(f"wrote {args.out}")
    if args.json_out is not None:
        meta = {
            "model": str(args.model),
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
