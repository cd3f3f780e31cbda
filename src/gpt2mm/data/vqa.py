"""Official VQA v2 files (questions json + annotations json + image folder) as `Sample`s.

    samples, report = load_vqa("v2_OpenEnded_mscoco_train2014_questions.json",
                               "v2_mscoco_train2014_annotations.json", "train2014/", limit=100_000)
    print(report.summary())

Image file names follow the COCO convention `COCO_{subtype}_{image_id:012d}.jpg`, with a `.png` accepted
when the `.jpg` is absent (the synthetic world writes PNGs). The subtype comes from the questions file's
`data_subtype` key (or the `data_subtype` argument): a subtype with a year is used as is (`train2014`,
`val2014`, `test2015`); one without a year gets `2014` appended (`train` -> `train2014`), since the
synthetic world writes `data_subtype: "train"` and files `COCO_train2014_*.png`. Other names: `image_pattern`,
a format string over `image_id` and `subtype` (`"{image_id}.png"`, `"{subtype}/{image_id:06d}.jpg"`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from gpt2mm.data.samples import LoadReport, Sample, Turn, strip_image_placeholder
from gpt2mm.errors import DataError, UsageError
from gpt2mm.eval.vqa_files import _is_int, read_json  # one reader for the official files

ANSWER_MODES = ("multiple_choice", "sample")


def coco_subtype(data_subtype: str) -> str:
    """The subtype in COCO file names: `train2014` stays, a year-less `train` becomes `train2014`."""
    return data_subtype if re.search(r"\d{4}$", data_subtype) else f"{data_subtype}2014"


def coco_image_name(image_id: int, data_subtype: str, ext: str = ".jpg") -> str:
    """`COCO_{subtype}_{image_id:012d}{ext}`, e.g. `COCO_val2014_000000000042.jpg`."""
    return f"COCO_{coco_subtype(data_subtype)}_{int(image_id):012d}{ext}"


def pick_answer(answers: list[str], question_id: int, seed: int) -> str:
    """One of the human answers, drawn by a hash of (seed, question id): the same draw in every run and
    process, independent of the order or subset of questions loaded."""
    digest = hashlib.sha256(f"{seed}:{question_id}".encode()).digest()
    return answers[int.from_bytes(digest[:8], "big") % len(answers)]


def check_image_pattern(pattern: str) -> None:
    """A pattern names each image by its id (`{image_id}`, with any format spec) and may use `{subtype}`."""
    try:
        a, b = pattern.format(image_id=1, subtype="x"), pattern.format(image_id=2, subtype="x")
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
        raise UsageError(
            f"image_pattern {pattern!r}: {e!r}; it may use {{image_id}} (e.g. {{image_id:012d}}) and {{subtype}}"
        ) from None
    if a == b:
        raise UsageError(
            f"image_pattern {pattern!r} does not use {{image_id}}: every image would be one file"
        )


def _read_files(
    questions: str | os.PathLike,
    annotations: str | os.PathLike,
    data_subtype: str | None,
    needs_subtype: bool = True,
) -> tuple[list[Any], dict[int, dict], str]:
    """The questions list, the annotations by question id and the COCO subtype; `DataError` on a wrong file."""
    qdata = read_json(questions)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise DataError(
            f"{questions}: expected a JSON object with a 'questions' list (VQA v2 questions file)"
        )
    adata = read_json(annotations)
    if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
        raise DataError(
            f"{annotations}: expected a JSON object with an 'annotations' list (VQA v2 annotations file)"
        )
    subtype = data_subtype or qdata.get("data_subtype") or ("" if not needs_subtype else None)
    if not isinstance(subtype, str) or (needs_subtype and not subtype):
        raise DataError(
            f"{questions}: no 'data_subtype' key (e.g. 'train2014'); pass data_subtype= to name the images"
        )
    by_qid: dict[int, dict] = {}
    for ann in adata["annotations"]:
        if isinstance(ann, dict) and _is_int(ann.get("question_id")):
            by_qid[ann["question_id"]] = ann  # malformed annotations surface as "no annotation" later
    return qdata["questions"], by_qid, subtype


class _CocoImages:
    """Image id -> path of its `.jpg` (else `.png`) in a folder, or None when missing; each id looked up once.
    With a `pattern`, the path is the pattern's name, with no other extension tried.

    Without `check_images` there is no file system access per image: the extension is that of the first
    image found, `.jpg` when none is.
    """

    def __init__(self, folder: Path, subtype: str, check_images: bool, pattern: str | None = None) -> None:
        self.folder, self.subtype, self.check_images, self.pattern = folder, subtype, check_images, pattern
        self.paths: dict[Any, str | None] = {}
        self.fixed_ext: str | None = None

    def expected(self, image_id: int) -> str:
        """Where the image should be, for a message."""
        if self.pattern is not None:
            return str(self.folder / self.pattern.format(image_id=image_id, subtype=self.subtype))
        return f"{self.folder / coco_image_name(image_id, self.subtype, '.jpg')} (or .png)"

    def __call__(self, image_id: int) -> str | None:
        if image_id in self.paths:
            return self.paths[image_id]
        if self.pattern is not None:
            path = self.folder / self.pattern.format(image_id=image_id, subtype=self.subtype)
            self.paths[image_id] = str(path) if not self.check_images or path.is_file() else None
            return self.paths[image_id]
        jpg = self.folder / coco_image_name(image_id, self.subtype, ".jpg")
        if self.check_images or self.fixed_ext is None:
            png = jpg.with_suffix(".png")
            found = jpg if jpg.is_file() else png if png.is_file() else None
            if not self.check_images:
                self.fixed_ext = found.suffix if found is not None else ".jpg"
                found = jpg.with_suffix(self.fixed_ext)
        else:
            found = jpg.with_suffix(self.fixed_ext)
        self.paths[image_id] = None if found is None else str(found)
        return self.paths[image_id]


def _annotation_of(
    q: Any,
    i: int,
    questions: str | os.PathLike,
    annotations: str | os.PathLike,
    by_qid: dict[int, dict],
    seen: set[int],
    report: LoadReport,
) -> dict | None:
    """The annotation of question record `i`, or None once `report` has refused the record (bad schema,
    duplicate id, no annotation, an annotation of another image)."""
    where = f"{questions}: question {i}"
    if not (
        isinstance(q, dict)
        and _is_int(q.get("question_id"))
        and _is_int(q.get("image_id"))
        and isinstance(q.get("question"), str)
    ):
        report.bad("bad schema", f"{where}: expected {{image_id: int, question: str, question_id: int}}")
        return None
    qid = q["question_id"]
    where = f"{questions}: question_id {qid}"
    if qid in seen:
        report.bad("duplicate id", f"{where}: duplicate question id")
        return None
    seen.add(qid)
    ann = by_qid.get(qid)
    if ann is None:
        report.bad("no annotation", f"{where}: no annotation in {annotations}")
        return None
    answers = ann.get("answers")
    if not (
        isinstance(ann.get("multiple_choice_answer"), str)
        and isinstance(answers, list)
        and answers
        and all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers)
    ):
        report.bad(
            "bad schema",
            f"{annotations}: annotation of question_id {qid}: expected multiple_choice_answer: str and "
            "answers: [{answer: str, ...}]",
        )
        return None
    if ann.get("image_id", q["image_id"]) != q["image_id"]:
        report.bad("bad schema", f"{where}: image_id {q['image_id']} but {ann['image_id']} in {annotations}")
        return None
    return ann


def _sample(
    q: dict,
    ann: dict,
    questions: str | os.PathLike,
    answer_mode: str,
    seed: int,
    images: _CocoImages,
    report: LoadReport,
) -> Sample | None:
    """The sample of a checked question and its annotation, or None once `report` has refused it (an empty
    question or answer, a missing image)."""
    qid = q["question_id"]
    where = f"{questions}: question_id {qid}"
    human = [a["answer"].strip() for a in ann["answers"]]
    if answer_mode == "sample":
        nonempty = [a for a in human if a]
        target = pick_answer(nonempty, qid, seed) if nonempty else ""
    else:
        target = ann["multiple_choice_answer"].strip()
    question = strip_image_placeholder(q["question"])
    if not question or not target:
        report.bad("bad schema", f"{where}: empty question or answer")
        return None
    path = images(q["image_id"])
    if path is None:
        report.bad("missing image", f"{where}: image {images.expected(q['image_id'])} not found")
        return None
    return Sample(
        id=str(qid),
        image=path,
        turns=[Turn("user", question), Turn("assistant", target)],
        answers=human,
        question_id=qid,
        image_id=q["image_id"],
        answer_type=ann.get("answer_type"),
        question_type=ann.get("question_type"),
    )


def load_vqa(
    questions: str | os.PathLike,
    annotations: str | os.PathLike,
    images: str | os.PathLike,
    answer_mode: str = "multiple_choice",
    seed: int = 0,
    limit: int | None = None,
    data_subtype: str | None = None,
    check_images: bool = True,
    skip_bad: bool = False,
    image_pattern: str | None = None,
) -> tuple[list[Sample], LoadReport]:
    """VQA v2 questions with their annotations, as samples `[user: question, assistant: answer]`.

    answer_mode: "multiple_choice" answers with the annotation's `multiple_choice_answer`; "sample" with one
        of the 10 human answers, drawn deterministically per (seed, question id) (see `pick_answer`).
    limit: keep the first N samples in the questions file's order (the seed used the first 100k); with
        `skip_bad`, skipped questions do not count towards N.
    check_images: check that each image file exists (.jpg, else .png); without it, no file system access
        per image: the extension is that of the first image found, .jpg when none is.
    skip_bad: count bad questions (no annotation, bad schema, missing image, duplicate id) in the report
        instead of raising `DataError`.
    image_pattern: image file names under `images`, a format string over `image_id` and `subtype` (the
        questions file's `data_subtype`, needed only when the pattern uses it); None: the COCO names.
    """
    if answer_mode not in ANSWER_MODES:
        raise UsageError(f"answer_mode must be one of {', '.join(ANSWER_MODES)}, not {answer_mode!r}")
    report = LoadReport(str(questions), skip_bad=skip_bad)
    if image_pattern is not None:
        check_image_pattern(image_pattern)
    needs_subtype = image_pattern is None or "{subtype" in image_pattern
    records, by_qid, subtype = _read_files(questions, annotations, data_subtype, needs_subtype)
    find_image = _CocoImages(Path(images), subtype, check_images, image_pattern)
    samples: list[Sample] = []
    seen: set[int] = set()
    for i, q in enumerate(records):
        if limit is not None and len(samples) >= limit:
            break
        ann = _annotation_of(q, i, questions, annotations, by_qid, seen, report)
        if ann is None:
            continue
        sample = _sample(q, ann, questions, answer_mode, seed, find_image, report)
        if sample is not None:
            samples.append(sample)
    report.loaded = len(samples)
    return samples, report
