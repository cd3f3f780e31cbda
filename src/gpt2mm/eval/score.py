"""The report `gpt2mm vqa-score` and `gpt2mm eval` print: official VQA v2 scores as readable tables.

One formatter for both commands, so the same results read the same whichever command scored them; and
`format_split_report` for what `gpt2mm eval` scores sample by sample (a Hugging Face dataset, a CSV), which
says whether the figure is the VQA accuracy or exact match.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


def format_report(scores: dict[str, Any], annotations: list[dict[str, Any]]) -> str:
    """The scores as readable tables, with the number of questions behind each figure."""
    n_answer = Counter(a["answer_type"] for a in annotations)
    n_question = Counter(a["question_type"] for a in annotations)
    lines = [f"VQA accuracy: {scores['overall']:.2f}  ({len(annotations)} questions)", ""]
    for title, key, counts in (
        ("answer type", "perAnswerType", n_answer),
        ("question type", "perQuestionType", n_question),
    ):
        width = max([len(title), *(len(t) for t in scores[key])])
        lines.append(f"{title:<{width}}  {'questions':>9}  {'accuracy':>8}")
        lines.append(f"{'-' * width}  {'-' * 9}  {'-' * 8}")
        for name, acc in scores[key].items():
            lines.append(f"{name:<{width}}  {counts[name]:>9}  {acc:>8.2f}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


SCORING_NOTES = {
    "vqa accuracy": "the official VQA accuracy against the human answers",
    "exact match": "the normalized answer equals a reference answer",
}


def format_split_report(scores: dict[str, Any]) -> str:
    """`score_split`'s scores: the overall figure named by its scoring, each scoring's own figure when a
    split mixes them, and a table by answer type when the samples have answer types."""
    scoring, n = scores["scoring"], scores["questions"]
    if len(scores["by_scoring"]) == 1:
        lines = [f"{scoring}: {scores['overall']:.2f}  ({n} questions; {SCORING_NOTES[scoring]})"]
    else:
        lines = [f"score: {scores['overall']:.2f}  ({n} questions: {scoring})"]
        for name, part in scores["by_scoring"].items():
            lines.append(
                f"  {name}: {part['overall']:.2f}  ({part['questions']} questions; {SCORING_NOTES[name]})"
            )
    if scores["perAnswerType"]:
        width = max(len("answer type"), *(len(t) for t in scores["perAnswerType"]))
        lines += ["", f"{'answer type':<{width}}  {'score':>8}", f"{'-' * width}  {'-' * 8}"]
        lines += [f"{t:<{width}}  {v:>8.2f}" for t, v in scores["perAnswerType"].items()]
    return "\n".join(lines)
