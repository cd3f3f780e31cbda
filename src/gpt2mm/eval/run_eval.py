"""The pieces of `gpt2mm eval` (and of `gpt2mm report`, which shares them): load a model for
evaluation, load a VQA v2 split restricted to the questions answered, answer and score with the official
metric, and refuse outputs that would overwrite an input. The command itself is `gpt2mm.commands.eval`.

Answers are greedy, in batches with left padding (`gpt2mm.eval.evaluate.answer_questions`, the code path
of training-time evaluation), and are scored by the very `evaluate` function of `gpt2mm vqa-score`, so the
commands print the same numbers for the same results. When only some questions are answered (`--limit`,
`--skip-bad`), the official questions and annotations are restricted to the answered question ids, so the
official coverage check (the results answer exactly the question set) still holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2mm.errors import DataError, UsageError


def check_model_path(name_or_path: str | Path) -> None:
    """Refuse an existing path that holds no model before any slow work (a hub id passes)."""
    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        hint = ""
        if path.is_dir() and ((path / "best").is_dir() or any(path.glob("checkpoint-*"))):
            hint = " (it looks like a training run: pass its best/ or a checkpoint-N/ directory)"
        raise UsageError(f"{path} is not a gpt2mm model directory: it has no config.json{hint}")


def load_for_eval(name_or_path: str | Path, device: str) -> tuple[Any, Any]:
    """(model, processor) in eval mode on `device`; a path that is no model becomes a `UsageError`
    (exit code 2) instead of a loader traceback."""
    from gpt2mm.loading import load_model

    check_model_path(name_or_path)
    try:
        model, processor = load_model(name_or_path)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"cannot load the model {name_or_path!s}: not a gpt2mm model directory, nor a hub id that "
            f"could be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return model.to(device).eval(), processor


def check_outputs(outputs: Sequence[tuple[str, Path | None]], inputs: Sequence[tuple[str, Path]]) -> None:
    """Refuse an output (flag, path) that is an input file or another output: writing it would destroy
    the input (or the other output) without a word."""
    seen: list[tuple[str, Path]] = []
    for flag, path in outputs:
        if path is None:
            continue
        for other_flag, other in inputs:
            if _same_file(path, other):
                raise UsageError(
                    f"{flag} {path}: is the {other_flag} file, which writing would overwrite; "
                    "choose another path"
                )
        for other_flag, other in seen:
            if _same_file(path, other):
                raise UsageError(f"{flag} {path}: is also the {other_flag} file; choose another path")
        seen.append((flag, path))


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links included when both exist)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def unreadable_images(paths: Sequence[str], progress: bool = False) -> dict[str, str]:
    """{path: why} of the images `load_image` refuses, each decoded once, in threads (decoding releases
    the GIL); with the limits `answer_questions` loads them with, so what passes here loads there."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from gpt2mm.data.images import load_image

    def why(path: str) -> str | None:
        try:
            load_image(path)
        except DataError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = list(
            tqdm(
                pool.map(why, paths), total=len(paths), desc="check images", disable=not progress or not paths
            )
        )
    return {p: w for p, w in zip(paths, found) if w is not None}


def load_vqa_skipping_unreadable(
    questions: Path,
    annotations: Path,
    images: Path,
    limit: int | None = None,
    progress: bool = False,
    image_pattern: str | None = None,
) -> tuple[list[Any], Any]:
    """`load_vqa(..., skip_bad=True)` that also skips (and counts, as "unreadable image") the questions
    about an image that does not decode; as there, skipped questions do not count towards `limit`."""
    from gpt2mm.data.vqa import load_vqa

    bad: dict[str, str] = {}
    checked: set[str] = set()
    want = limit
    while True:
        samples, report = load_vqa(
            questions, annotations, images, limit=want, skip_bad=True, image_pattern=image_pattern
        )
        new = sorted({s.image for s in samples if s.image and s.image not in checked})
        bad.update(unreadable_images(new, progress=progress))
        checked.update(new)
        n_bad = sum(s.image in bad for s in samples)
        if limit is None or len(samples) - n_bad >= limit or len(samples) < want:
            break  # enough readable questions, or no more in the file
        want = limit + n_bad  # more than before: these samples held more unreadable images than last time
    for s in samples:
        if s.image in bad:
            report.bad("unreadable image", f"{questions}: question_id {s.question_id}: {bad[s.image]}")
    kept = [s for s in samples if s.image not in bad]
    report.loaded = len(kept)
    return kept, report


def load_questions_and_samples(
    questions: Path,
    annotations: Path,
    images: Path,
    limit: int | None = None,
    skip_bad: bool = False,
    progress: bool = False,
    image_pattern: str | None = None,
) -> tuple[list[Any], list[dict[str, Any]], list[dict[str, Any]], Any]:
    """(samples, official questions, official annotations, load report), the official records restricted
    to the samples' question ids (in file order) so that `evaluate`'s coverage check holds. With
    `skip_bad`, questions about unreadable images are skipped too (`load_vqa_skipping_unreadable`)."""
    from gpt2mm.data.vqa import load_vqa
    from gpt2mm.eval.vqa_files import check_pairing, load_annotations, load_questions

    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, not {limit}")
    try:
        if skip_bad:
            samples, report = load_vqa_skipping_unreadable(
                questions, annotations, images, limit, progress, image_pattern
            )
        else:
            samples, report = load_vqa(
                questions, annotations, images, limit=limit, image_pattern=image_pattern
            )
        all_q = load_questions(questions)
        all_a = load_annotations(annotations)
    except DataError as e:
        raise UsageError(str(e)) from None
    if not samples:
        raise UsageError(f"{questions}: no question could be loaded ({report.summary()})")
    ids = {s.question_id for s in samples}
    q_sub = [q for q in all_q if q["question_id"] in ids]
    a_sub = [a for a in all_a if a["question_id"] in ids]
    try:
        check_pairing(q_sub, a_sub, questions, annotations)
    except DataError as e:
        raise UsageError(str(e)) from None
    return samples, q_sub, a_sub, report


def answer_and_score(
    model: Any,
    processor: Any,
    samples: Sequence[Any],
    questions: Sequence[dict[str, Any]],
    annotations: Sequence[dict[str, Any]],
    batch_size: int = 64,
    max_new_tokens: int = 8,
    progress: bool = True,
    names: tuple[str, str, str] = ("questions", "annotations", "results"),
) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    """(official results, official scores, generation seconds): one code path for `eval` and `report`, so
    both print the number `vqa-score` gives on the same results."""
    import torch

    from gpt2mm.eval.evaluate import answer_questions
    from gpt2mm.eval.vqa_metric import evaluate

    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            answers = answer_questions(
                model,
                processor,
                samples,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                progress=progress,
            )
    except DataError as e:  # an image that does not decode
        raise UsageError(f"{e} (--skip-bad skips the questions about unreadable images)") from None
    seconds = time.perf_counter() - start
    results = [{"question_id": s.question_id, "answer": a} for s, a in zip(samples, answers, strict=True)]
    try:
        scores = evaluate(questions, annotations, results, names=names)
    except DataError as e:
        raise UsageError(str(e)) from None
    return results, scores, seconds


def skipped_line(report: Any, scored: int) -> str:
    """How many questions `--skip-bad` left out, and why, for the end of the output."""
    n = report.num_skipped
    return f"skipped {n} question{'s' if n != 1 else ''} ({skipped_reasons(report)}): the scores are over the {scored} others"


def skipped_reasons(report: Any) -> str:
    """`2 unreadable image, 1 bad schema`: the load report's skip counts, most frequent first."""
    return ", ".join(f"{k} {why}" for why, k in report.skipped.most_common())
