"""The pieces of `gpt2mm eval` (and of `gpt2mm report`, which shares them): load a model for
evaluation, load the split to score (official VQA v2 files restricted to the questions answered, or the
validation split of a Hugging Face dataset or a CSV), answer and score, and refuse outputs that would
overwrite an input. The command itself is `gpt2mm.commands.eval`.

Answers are greedy, in batches with left padding (`gpt2mm.eval.evaluate.answer_questions`, the code path
of training-time evaluation). Official files are scored by the very `evaluate` function of `gpt2mm
vqa-score`, so the commands print the same numbers for the same results; when only some questions are
answered (`--limit`, `--skip-bad`), the official questions and annotations are restricted to the answered
question ids, so the official coverage check (the results answer exactly the question set) still holds.
Other splits are scored sample by sample (`gpt2mm.eval.evaluate.score_split`): the official VQA accuracy
where a sample has human answers (VQA's 10), normalized exact match where it has a single reference.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from gpt2mm.errors import DamagedFileError, DataError, UsageError


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
    except DamagedFileError:  # names the damaged file itself
        raise
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


def load_skipping_unreadable(
    load: Callable[[int | None], tuple[list[Any], Any]],
    limit: int | None,
    where: Callable[[Any], str],
    progress: bool = False,
) -> tuple[list[Any], Any]:
    """`load(limit)` (a loader run with skip_bad, returning samples and its load report) that also skips,
    and counts as "unreadable image", the samples with an image that does not decode, the report naming each as
    `where(sample)`; as for the loaders' own skips, skipped samples do not count towards `limit`."""
    bad: dict[str, str] = {}
    checked: set[str] = set()
    want = limit
    while True:
        samples, report = load(want)
        new = sorted({p for s in samples for p in s.images if p not in checked})
        bad.update(unreadable_images(new, progress=progress))
        checked.update(new)
        n_bad = sum(any(p in bad for p in s.images) for s in samples)
        if limit is None or len(samples) - n_bad >= limit or len(samples) < want:
            break  # enough readable samples, or no more in the source
        want = limit + n_bad  # more than before: these samples held more unreadable images than last time
    for s in samples:
        for p in s.images:
            if p in bad:
                report.bad("unreadable image", f"{where(s)}: {bad[p]}")
                break
    kept = [s for s in samples if not any(p in bad for p in s.images)]
    report.loaded = len(kept)
    return kept, report


def load_vqa_skipping_unreadable(
    questions: Path,
    annotations: Path,
    images: Path,
    limit: int | None = None,
    progress: bool = False,
    image_pattern: str | None = None,
) -> tuple[list[Any], Any]:
    """`load_vqa(..., skip_bad=True)` that also skips (and counts, as "unreadable image") the questions
    about an image that does not decode (`load_skipping_unreadable`)."""
    from gpt2mm.data.vqa import load_vqa

    def load(n: int | None) -> tuple[list[Any], Any]:
        return load_vqa(questions, annotations, images, limit=n, skip_bad=True, image_pattern=image_pattern)

    return load_skipping_unreadable(
        load, limit, lambda s: f"{questions}: question_id {s.question_id}", progress
    )


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


@dataclass
class Split:
    """What `eval` and `report` score: the samples, their load report and a name for captions; for official
    VQA files also their question and annotation records, restricted to the samples (scored by vqa-score's
    `evaluate`), and those files' names; otherwise the samples are scored one by one (`score_split`)."""

    name: str
    samples: list[Any]
    report: Any
    official: tuple[list[dict[str, Any]], list[dict[str, Any]], tuple[str, str]] | None = None


def load_eval_split(cfg: Any, limit: int | None = None, progress: bool = False) -> Split:
    """The validation split of a data config (`train.config.QuestionDataConfig`, format vqa, hf, csv or llava:
    its `val_questions` / `hf_val_split` / `csv_val` / `llava_val`, LLaVA records cut to their first exchange), the first `limit` samples; with `cfg.skip_bad`, bad
    records and the samples of an unreadable image are skipped and counted. Data errors are `UsageError`s."""
    from gpt2mm.data.splits import load_csv_split, load_first_exchanges, load_hf_split, resolve

    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, not {limit}")
    if cfg.format == "vqa":
        q, a = resolve(cfg.root, cfg.val_questions), resolve(cfg.root, cfg.val_annotations)
        samples, questions, annotations, report = load_questions_and_samples(
            q, a, resolve(cfg.root, cfg.val_images), limit, cfg.skip_bad, progress, cfg.image_pattern
        )
        return Split(q.name, samples, report, (questions, annotations, (str(q), str(a))))
    if cfg.format == "hf" and cfg.hf_val_split is None:
        raise UsageError("data.hf_val_split is null: set it to the split to score (--data.hf_val_split NAME)")
    hf_name = f"{cfg.hf_dataset} ({cfg.hf_val_split})"
    sources = {  # format: (name for captions, loader, where a sample is named, what its id is)
        "hf": (hf_name, partial(load_hf_split, cfg, "val"), hf_name, "id"),
        "csv": (Path(cfg.csv_val).name, partial(load_csv_split, cfg, "val"), resolve(cfg.root, cfg.csv_val),
                "line"),  # a CSV sample's id is its line
        "llava": (Path(cfg.llava_val).name, partial(load_first_exchanges, cfg), resolve(cfg.root, cfg.llava_val),
                  "record id"),
    }  # fmt: skip
    if cfg.format not in sources:
        raise UsageError(f"data.format {cfg.format!r}: eval scores vqa, hf, csv or llava data")
    name, load, place, label = sources[cfg.format]

    def where(s: Any) -> str:
        return f"{place}: {label} {s.id}"

    try:
        if cfg.skip_bad:
            samples, report = load_skipping_unreadable(load, limit, where, progress)
        else:
            samples, report = load(limit)
    except DataError as e:
        raise UsageError(str(e)) from None
    if not samples:
        raise UsageError(f"{report.source}: no question could be loaded ({report.summary()})")
    return Split(name, samples, report)


def answer_and_score(
    model: Any,
    processor: Any,
    split: Split,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    progress: bool = True,
    results_name: str = "results",
) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    """(results, scores, generation seconds): one code path for `eval` and `report`. Official files: the
    official results format and vqa-score's `evaluate` scores, so both commands print the number `vqa-score`
    gives on the same results. Other splits: a result per sample (`id`, `question_id` when it has one,
    `question`, `answer`, and the `references` it is scored against) and `score_split`'s scores."""
    import torch

    from gpt2mm.eval.evaluate import answer_questions, references, score_split
    from gpt2mm.eval.vqa_metric import evaluate

    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            answers = answer_questions(
                model,
                processor,
                split.samples,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                progress=progress,
            )
    except DataError as e:  # an image that does not decode
        raise UsageError(f"{e} (--skip-bad skips the questions about unreadable images)") from None
    seconds = time.perf_counter() - start
    if split.official is None:
        results = [
            {
                "id": s.id,
                **({"question_id": s.question_id} if s.question_id is not None else {}),
                "question": s.turns[0].text,
                "answer": a,
                "references": references(s),
            }
            for s, a in zip(split.samples, answers, strict=True)
        ]
        return results, score_split(split.samples, answers), seconds
    questions, annotations, (q_name, a_name) = split.official
    results = [
        {"question_id": s.question_id, "answer": a} for s, a in zip(split.samples, answers, strict=True)
    ]
    try:
        scores = evaluate(questions, annotations, results, names=(q_name, a_name, results_name))
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
