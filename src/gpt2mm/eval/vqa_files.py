"""Loading and checking the official VQA v2 JSON files (questions, annotations, results).

Shared by `gpt2mm vqa-score` and `gpt2mm eval`. Every problem raises a `DataError` whose message names the
file and the record (index and question_id), so a bad file never ends in a bare traceback. Only the fields
the scoring uses are required; other keys (info, license, image_id, answer_confidence, ...) may be there.

    questions.json    {"questions": [{"image_id", "question", "question_id"}, ...], "info", "task_type", ...}
    annotations.json  {"annotations": [{"question_id", "question_type", "answer_type",
                                       "answers": [{"answer", "answer_confidence", "answer_id"} x 10],
                                       "image_id", "multiple_choice_answer"}, ...], ...}
    results.json      [{"question_id": int, "answer": str}, ...]
"""

from __future__ import annotations

import json
import os
from typing import Any

from gpt2mm.errors import DataError

PathLike = str | os.PathLike


def read_json(path: PathLike) -> Any:
    """Parsed JSON, or a `DataError` naming the file (missing, unreadable, not UTF-8 or not JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a JSON file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _where(path: PathLike, key: str, i: int, rec: Any) -> str:
    qid = rec.get("question_id") if isinstance(rec, dict) else None
    return f"{path}: {key}[{i}]" + (f" (question_id {qid})" if qid is not None else "")


def _records(data: Any, path: PathLike, key: str | None) -> list[Any]:
    """The list of records: `data[key]` for a file that is an object, `data` itself when key is None."""
    if key is None:
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with a '{key}' list, got {type(data).__name__}")
    if key not in data:
        raise DataError(f"{path}: no '{key}' key (keys: {', '.join(sorted(map(str, data))) or 'none'})")
    records = data[key]
    if not isinstance(records, list):
        raise DataError(f"{path}: '{key}' must be a list, got {type(records).__name__}")
    return records


def _check_record(rec: Any, path: PathLike, key: str, i: int, fields: dict[str, type]) -> None:
    """Each field present with its type; question ids unique is checked by the caller."""
    if not isinstance(rec, dict):
        raise DataError(f"{path}: {key}[{i}] must be an object, got {type(rec).__name__}")
    for name, typ in fields.items():
        if name not in rec:
            raise DataError(f"{_where(path, key, i, rec)}: missing '{name}'")
        value = rec[name]
        ok = _is_int(value) if typ is int else isinstance(value, typ)
        if not ok:
            raise DataError(
                f"{_where(path, key, i, rec)}: '{name}' must be {typ.__name__}, got {type(value).__name__} {value!r:.60}"
            )


def _check_unique(records: list[dict[str, Any]], path: PathLike, key: str) -> None:
    seen: dict[int, int] = {}
    for i, rec in enumerate(records):
        qid = rec["question_id"]
        if qid in seen:
            raise DataError(f"{path}: {key}[{i}] repeats question_id {qid} (first at {key}[{seen[qid]}])")
        seen[qid] = i


def load_questions(path: PathLike) -> list[dict[str, Any]]:
    """The `questions` records of an official questions file, checked: question_id (int, unique) and
    question (str); image_id must be an int where present."""
    records = _records(read_json(path), path, "questions")
    for i, rec in enumerate(records):
        _check_record(rec, path, "questions", i, {"question_id": int, "question": str})
        if "image_id" in rec and not _is_int(rec["image_id"]):
            raise DataError(
                f"{_where(path, 'questions', i, rec)}: 'image_id' must be int, got {rec['image_id']!r:.60}"
            )
    _check_unique(records, path, "questions")
    return records


def load_annotations(path: PathLike) -> list[dict[str, Any]]:
    """The `annotations` records of an official annotations file, checked: question_id (int, unique),
    question_type and answer_type (str), answers (a non-empty list of {answer: str})."""
    records = _records(read_json(path), path, "annotations")
    fields = {"question_id": int, "question_type": str, "answer_type": str, "answers": list}
    for i, rec in enumerate(records):
        _check_record(rec, path, "annotations", i, fields)
        answers = rec["answers"]
        if not answers:
            raise DataError(f"{_where(path, 'annotations', i, rec)}: 'answers' is empty")
        for j, a in enumerate(answers):
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                raise DataError(
                    f"{_where(path, 'annotations', i, rec)}: answers[{j}] must be an object with a string 'answer', got {a!r:.60}"
                )
    _check_unique(records, path, "annotations")
    return records


def load_results(path: PathLike) -> list[dict[str, Any]]:
    """An official results file: a list of {question_id: int, answer: str}, one per question."""
    records = _records(read_json(path), path, None)
    for i, rec in enumerate(records):
        _check_record(rec, path, "results", i, {"question_id": int, "answer": str})
    _check_unique(records, path, "results")
    return records


def check_pairing(
    questions: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    questions_path: PathLike,
    annotations_path: PathLike,
) -> None:
    """Questions and annotations describe the same question ids, with the same image where both say.
    Mixing files of two splits is the usual cause of a failure here."""
    ann_by_id = {a["question_id"]: a for a in annotations}
    q_ids = set()
    for i, q in enumerate(questions):
        qid = q["question_id"]
        q_ids.add(qid)
        ann = ann_by_id.get(qid)
        if ann is None:
            raise DataError(
                f"{questions_path}: questions[{i}] (question_id {qid}) has no annotation in {annotations_path}"
            )
        if "image_id" in q and "image_id" in ann and q["image_id"] != ann["image_id"]:
            raise DataError(
                f"{annotations_path}: question_id {qid}: image_id {ann['image_id']} but {questions_path} says {q['image_id']}"
            )
    for i, a in enumerate(annotations):
        if a["question_id"] not in q_ids:
            raise DataError(
                f"{annotations_path}: annotations[{i}] (question_id {a['question_id']}) is not a question of {questions_path}"
            )


def write_json(path: PathLike, obj: Any, flag: str) -> None:
    """Write a command's JSON output atomically (an earlier file is replaced only by a whole new one); an
    unwritable path or a full disk is a one-line `WriteError` naming the flag, the path and the free space."""
    from pathlib import Path

    from gpt2mm.outputs import write_text, writing

    path = Path(path)
    with writing(path, f"the {flag} file"):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(obj, indent=1) + "\n", f"the {flag} file")
