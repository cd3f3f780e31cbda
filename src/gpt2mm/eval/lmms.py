"""gpt2mm in lmms-eval: the model's registration, and a VQA v2-format split as an lmms-eval task.

    python -m gpt2mm.eval.lmms --questions W/test_questions.json --annotations W/test_annotations.json \\
        --images W/images/test --name synth_test --out TASKS
    lmms-eval --model gpt2mm --model_args pretrained=CKPT --include_path TASKS --tasks synth_test

The model: lmms-eval (>= 0.7) reads the entry point `lmms_eval.models: gpt2mm = gpt2mm.eval.lmms:manifest`
(pyproject.toml) when it builds its registry, so `--model gpt2mm` is `gpt2mm.eval.lmms_model.GPT2MM`: no fork,
no environment variable. This module imports nothing of lmms-eval's until lmms-eval calls it.

The task: `write_task` reads the split with gpt2mm's own VQA loader (the question texts and image files
`gpt2mm eval` uses) into TASKS/NAME.jsonl, one document per question, and writes TASKS/NAME.yaml, a `json`
dataset over it whose metric is the official VQA accuracy computed by `gpt2mm.eval.vqa_metric.evaluate` (the
function of `gpt2mm vqa-score` and `gpt2mm eval`) over the answered questions in file order, so the task's
`vqa_accuracy` is `gpt2mm eval`'s on the same questions.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

MODEL_CLASS = "gpt2mm.eval.lmms_model.GPT2MM"

YAML = """\
# Written by `python -m gpt2mm.eval.lmms`: {source}
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl   # relative: lmms-eval resolves it against this file's folder
test_split: test
output_type: generate_until
doc_to_visual: !function gpt2mm.eval.lmms.doc_to_visual
doc_to_text: !function gpt2mm.eval.lmms.doc_to_text
doc_to_target: multiple_choice_answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function gpt2mm.eval.lmms.process_results
metric_list:
  - metric: vqa_accuracy
    aggregation: !function gpt2mm.eval.lmms.aggregate
    higher_is_better: true
metadata:
  version: 0
"""


def manifest():
    """What the `lmms_eval.models` entry point gives lmms-eval: `gpt2mm` -> `GPT2MM` (a simple model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="gpt2mm", simple_class_path=MODEL_CLASS)


# --- the task's functions (named in the YAML) ---------------------------------------------------------------


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    from PIL import Image

    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """Per question, what `aggregate` needs to rebuild the official records; `score` (percent) is what
    lmms-eval's CLT standard error reads."""
    from gpt2mm.eval.vqa_metric import vqa_accuracy

    answer = results[0]
    item = {k: doc[k] for k in ("index", "question_id", "question_type", "answer_type", "answers")}
    return {"vqa_accuracy": {**item, "answer": answer, "score": 100 * vqa_accuracy(answer, doc["answers"])}}


def aggregate(items: list[dict[str, Any]]) -> float:
    """The official overall accuracy (percent, 2 decimals) of the answered questions, in file order."""
    from gpt2mm.eval.vqa_metric import evaluate

    items = sorted(items, key=lambda x: x["index"])
    questions = [{"question_id": x["question_id"]} for x in items]
    annotations = [
        {
            "question_id": x["question_id"],
            "question_type": x["question_type"],
            "answer_type": x["answer_type"],
            "answers": [{"answer": a} for a in x["answers"]],
        }
        for x in items
    ]
    results = [{"question_id": x["question_id"], "answer": x["answer"]} for x in items]
    return evaluate(questions, annotations, results)["overall"]


# --- writing a task -------------------------------------------------------------------------------------------


def write_task(
    questions: str | Path,
    annotations: str | Path,
    images: str | Path,
    out_dir: str | Path,
    name: str,
    image_pattern: str | None = None,
    max_new_tokens: int = 8,
) -> Path:
    """Write OUT_DIR/NAME.jsonl and OUT_DIR/NAME.yaml (the split as `gpt2mm eval` reads it); returns the YAML."""
    from gpt2mm.data.vqa import load_vqa
    from gpt2mm.errors import DataError
    from gpt2mm.outputs import write_text

    samples, _ = load_vqa(questions, annotations, images, image_pattern=image_pattern)
    if not samples:
        raise DataError(f"{questions} holds no questions: nothing to evaluate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = []
    for i, s in enumerate(samples):
        doc = {
            "index": i,
            "question_id": s.question_id,
            "image_id": s.image_id,
            "images": [str(Path(p).resolve()) for p in s.images],
            "question": s.turns[0].text,
            "multiple_choice_answer": s.turns[1].text,
            "answers": list(s.answers),
            "question_type": s.question_type,
            "answer_type": s.answer_type,
        }
        docs.append(json.dumps(doc) + "\n")
    write_text(out / f"{name}.jsonl", "".join(docs), f"the lmms-eval task {name}")
    yaml = out / f"{name}.yaml"
    source = f"{Path(questions).name}, {Path(annotations).name}, {Path(images)}"
    write_text(yaml, YAML.format(name=name, max_new_tokens=max_new_tokens, source=source), f"the task {name}")
    return yaml


def main(argv: list[str] | None = None) -> int:
    from gpt2mm.errors import DataError, UsageError

    parser = argparse.ArgumentParser(
        prog="python -m gpt2mm.eval.lmms", description="Write a VQA v2-format split as an lmms-eval task."
    )
    parser.add_argument("--questions", required=True, type=Path)
    parser.add_argument("--annotations", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument(
        "--image-pattern", help="image file names, as `gpt2mm eval --image-pattern` reads them"
    )
    parser.add_argument("--name", required=True, help="the task's name (lmms-eval --tasks NAME)")
    parser.add_argument("--out", required=True, type=Path, help="folder for NAME.yaml and NAME.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        parser.error(
            f"--name {args.name!r}: letters, digits, '_', '.' and '-' only (it is a task name and a file)"
        )
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    try:
        path = write_task(
            args.questions,
            args.annotations,
            args.images,
            args.out,
            args.name,
            args.image_pattern,
            args.max_new_tokens,
        )
    except (DataError, UsageError, OSError) as e:
        parser.error(str(e))
    print(f"wrote {path} and {path.with_suffix('.jsonl')}")
    print(
        f"run: lmms-eval --model gpt2mm --model_args pretrained=MODEL --include_path {args.out} --tasks {args.name}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
