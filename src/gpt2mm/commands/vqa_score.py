"""`gpt2mm vqa-score`: score a results file with the official VQA v2 accuracy.

    gpt2mm vqa-score --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --results results.json [--json scores.json]

Prints the overall accuracy, then per answer type and per question type; `--json` writes the official keys
(overall, perAnswerType, perQuestionType, perQuestion). Any problem with the files is an error naming the
file and the record (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2mm.errors import DataError, UsageError
from gpt2mm.eval.score import format_report
from gpt2mm.eval.vqa_files import check_pairing, load_annotations, load_questions, load_results, write_json
from gpt2mm.eval.vqa_metric import evaluate


def configure(parser: argparse.ArgumentParser) -> None:
    """The three official files in, an optional JSON out."""
    parser.add_argument("--questions", required=True, type=Path, help="official VQA v2 questions JSON")
    parser.add_argument("--annotations", required=True, type=Path, help="official VQA v2 annotations JSON")
    parser.add_argument(
        "--results", required=True, type=Path, help='results JSON: [{"question_id": int, "answer": str}, ...]'
    )
    parser.add_argument(
        "--json",
        dest="json_out",
        type=Path,
        default=None,
        metavar="OUT",
        help="also write the scores to this JSON file",
    )


def run(args: argparse.Namespace) -> int:
    """Load and check the files, score, print; data problems become `UsageError`s (exit code 2)."""
    try:
        questions = load_questions(args.questions)
        annotations = load_annotations(args.annotations)
        check_pairing(questions, annotations, args.questions, args.annotations)
        results = load_results(args.results)
        scores = evaluate(
            questions,
            annotations,
            results,
            names=(str(args.questions), str(args.annotations), str(args.results)),
        )
    except DataError as e:
        raise UsageError(str(e)) from None
    print(format_report(scores, annotations))
    if args.json_out is not None:
        write_json(args.json_out, scores, "--json")
        print(f"\nwrote {args.json_out}")
    return 0
