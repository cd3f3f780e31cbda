"""The report `gpt2mm vqa-score` and `gpt2mm eval` print: official VQA v2 scores as readable tables.

One formatter for both commands, so the same results read the same whichever command scored them.
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
