"""Samples from a Hugging Face `datasets` dataset (with a column mapping) and from the seed's CSV.

Hugging Face: `load_hf(dataset_or_path, columns={"image": "image", "question": "question", ...})`. A
`Sample.image` is always a path: image columns that hold image data (a `datasets.Image` feature, or dicts of
`{"bytes", "path"}`) are written once, as they are encoded (no re-encoding), into
`{image_cache}/{dataset fingerprint}/{row index:08d}.{format}` and reused by later loads of the same
dataset (a dataset from `load_from_disk` keeps its fingerprint; one built in memory may get a new one each
run). String columns are paths, relative to `image_root` when given.

CSV: rows of `image path, "Q: {question} A: {answer}"`, with or without a header line, as the seed wrote
them. See `load_csv`.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2mm.data.llava import parse_conversation
from gpt2mm.data.samples import IMAGE_PLACEHOLDER, LoadReport, Sample, Turn, strip_image_placeholder
from gpt2mm.errors import DataError, UsageError

if TYPE_CHECKING:
    import datasets

HF_FIELDS = (
    "id",
    "image",
    "question",
    "answer",
    "answers",
    "conversations",
    "question_id",
    "image_id",
    "answer_type",
    "question_type",
)


def _default_columns(names: list[str]) -> dict[str, str]:
    """Each field from the column of the same name; the answer from `multiple_choice_answer` (VQA v2 on the
    hub) when there is no `answer` column."""
    columns = {f: f for f in HF_FIELDS if f in names}
    if "answer" not in columns and "multiple_choice_answer" in names:
        columns["answer"] = "multiple_choice_answer"
    return columns


def _answers(value: Any) -> list[str] | None:
    """Human answers as strings: from a list of strings or of VQA `{answer: ...}` dicts."""
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(a, str) for a in value):
        return [a.strip() for a in value]
    if isinstance(value, list) and all(
        isinstance(a, dict) and isinstance(a.get("answer"), str) for a in value
    ):
        return [a["answer"].strip() for a in value]
    if isinstance(value, dict) and isinstance(value.get("answer"), list):  # a struct of lists (columnar)
        return _answers(value["answer"])
    raise ValueError("answers must be a list of strings or of {answer: str} objects")


def _cache_image(data: bytes, folder: Path, index: int) -> Path:
    """Write image bytes once (atomically) under a name with their format's extension."""
    from PIL import Image

    try:
        fmt = Image.open(io.BytesIO(data)).format  # the header only
    except Exception as e:
        raise ValueError(f"image data that is not an image ({e})") from e
    path = folder / f"{index:08d}.{(fmt or 'img').lower()}"
    if not (path.is_file() and path.stat().st_size == len(data)):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def _open_dataset(dataset: Any, split: str | None, hf: Any) -> tuple[datasets.Dataset, str]:
    """The dataset object (loaded from disk when given a folder, its `split` of a `DatasetDict`) and the name
    reports give it. `hf` is the imported `datasets` package."""
    if isinstance(dataset, hf.Dataset):
        files = dataset.cache_files
        return dataset, files[0]["filename"] if files else f"in-memory dataset {dataset._fingerprint}"
    try:
        loaded = hf.load_from_disk(str(dataset))
    except FileNotFoundError as e:
        raise DataError(f"{dataset}: not a dataset saved with save_to_disk ({e})") from e
    if isinstance(loaded, hf.DatasetDict):
        if split not in loaded:
            raise DataError(f"{dataset}: a DatasetDict; pass split= one of {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded, str(dataset)


def _check_columns(columns: dict[str, str] | None, names: list[str], source: str) -> dict[str, str]:
    """The column mapping (the default one when None), refused when it names unknown fields or columns, or
    maps neither conversations nor question + answer."""
    if columns is None:
        columns = _default_columns(names)
    unknown = sorted(set(columns) - set(HF_FIELDS))
    if unknown:
        raise UsageError(
            f"unknown fields in the column mapping: {', '.join(unknown)} (known: {', '.join(HF_FIELDS)})"
        )
    missing = sorted(c for c in columns.values() if c not in names)
    if missing:
        raise DataError(f"{source}: no column {', '.join(map(repr, missing))} (columns: {', '.join(names)})")
    if "conversations" not in columns and not {"question", "answer"} <= set(columns):
        raise UsageError(f"{source}: map either 'conversations' or both 'question' and 'answer' to columns")
    return columns


def _image_path(
    image: Any, i: int, cache_dir: Path | None, image_root: str | os.PathLike | None, source: str
) -> Path | None:
    """A row's image as a path: its data written to the cache, or its path (under `image_root` when given);
    None for a text-only row. `ValueError` when it is neither; `UsageError` for data without a cache."""
    if isinstance(image, dict) and image.get("bytes") is not None:
        if cache_dir is None:
            raise UsageError(f"{source}: the dataset holds image data; pass image_cache= (a folder)")
        return _cache_image(image["bytes"], cache_dir, i)
    if isinstance(image, dict | str):
        p = image.get("path") if isinstance(image, dict) else image
        if not isinstance(p, str) or not p:
            raise ValueError("image has neither bytes nor a path")
        return Path(image_root) / p if image_root is not None else Path(p)
    if image is not None:
        raise ValueError(f"image column holds {type(image).__name__}, not a path or image data")
    return None


def _row_turns(
    get: Callable[[str], Any], conversational: bool, has_image: bool, report: LoadReport
) -> list[Turn]:
    """A row's turns: its LLaVA conversation, or its question and answer; `ValueError` saying what is wrong."""
    if conversational:
        turns, dropped = parse_conversation(get("conversations"), has_image=has_image)
        if dropped:
            report.notes["system turns dropped"] += dropped
        return turns
    question, answer = get("question"), get("answer")
    if not isinstance(question, str) or not isinstance(answer, str):
        raise ValueError("question and answer must be strings")
    question, answer = strip_image_placeholder(question), answer.strip()
    if not answer or (not question and not has_image) or IMAGE_PLACEHOLDER in answer:
        raise ValueError("empty question or answer, or <image> in the answer")
    return [Turn("user", question), Turn("assistant", answer)]


def _row_sample(
    row: dict,
    i: int,
    columns: dict[str, str],
    source: str,
    cache_dir: Path | None,
    image_root: str | os.PathLike | None,
    check_images: bool,
    report: LoadReport,
) -> Sample | None:
    """Row `i` as a sample (its id not yet made unique), or None once `report` has refused it (bad image,
    bad schema, missing image)."""
    where = f"{source}: row {i}"

    def get(field: str) -> Any:
        return row[columns[field]] if field in columns else None

    try:
        path = _image_path(get("image"), i, cache_dir, image_root, source)
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        report.bad("bad image", f"{where}: {e}")
        return None
    try:
        turns = _row_turns(get, "conversations" in columns, path is not None, report)
        answers = _answers(get("answers"))
        qid = get("question_id")
        if qid is not None and not (isinstance(qid, int) and not isinstance(qid, bool)):
            raise ValueError(f"question_id must be an integer, not {qid!r}")
    except ValueError as e:
        report.bad("bad schema", f"{where}: {e}")
        return None
    if path is not None and check_images and not path.is_file():
        report.bad("missing image", f"{where}: image {path} not found")
        return None
    rid = get("id")
    return Sample(
        id=str(rid if rid is not None else qid if qid is not None else i),
        image=None if path is None else str(path),
        turns=turns,
        answers=answers,
        question_id=qid,
        image_id=get("image_id"),
        answer_type=get("answer_type"),
        question_type=get("question_type"),
    )


def load_hf(
    dataset: datasets.Dataset | str | os.PathLike,
    columns: dict[str, str] | None = None,
    split: str | None = None,
    image_cache: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    limit: int | None = None,
    check_images: bool = True,
    skip_bad: bool = False,
) -> tuple[list[Sample], LoadReport]:
    """Rows of a Hugging Face dataset (an object, or a folder for `datasets.load_from_disk`) as samples.

    columns: field -> column, fields from `HF_FIELDS`; a row needs `question` + `answer` (VQA style) or
        `conversations` (LLaVA style, parsed like `load_llava`). None maps each field to the column of the
        same name. Without an `id` column, the id is the question id, else the row index.
    split: which split of a `DatasetDict` folder. image_cache: the folder for image data held in the
        dataset (required when there is any). limit: the first N samples in row order.
    skip_bad: count bad rows (bad schema, missing image, bad image) instead of raising `DataError`.
    """
    try:
        import datasets
    except ImportError as e:
        raise UsageError(
            "loading a Hugging Face dataset needs the datasets package (pip install datasets)"
        ) from e

    dataset, source = _open_dataset(dataset, split, datasets)
    report = LoadReport(source, skip_bad=skip_bad)
    columns = _check_columns(columns, list(dataset.column_names), source)
    fingerprint = dataset._fingerprint  # before select/cast, which change it
    dataset = dataset.select_columns(sorted(set(columns.values())))
    image_col = columns.get("image")
    if image_col is not None and isinstance(dataset.features[image_col], datasets.Image):
        dataset = dataset.cast_column(image_col, datasets.Image(decode=False))  # bytes as stored, no decode
    cache_dir = None if image_cache is None else Path(image_cache) / fingerprint

    samples: list[Sample] = []
    seen: set[str] = set()
    for i, row in enumerate(dataset):
        if limit is not None and len(samples) >= limit:
            break
        sample = _row_sample(row, i, columns, source, cache_dir, image_root, check_images, report)
        if sample is None:
            continue
        if sample.id in seen:
            sample.id = f"{sample.id}#{i}"
            report.notes["duplicate ids renamed"] += 1
        seen.add(sample.id)
        samples.append(sample)
    report.loaded = len(samples)
    return samples, report


# --- the seed's CSV ---------------------------------------------------------------------------------------

_QA_RE = re.compile(r"^\s*Q:\s*(?P<q>.*?)\s*\bA:\s*(?P<a>.*?)\s*$", re.DOTALL)
_EOS = "<|endoftext|>"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def parse_qa_text(text: str) -> tuple[str, str]:
    """(question, answer) from `Q: [<image>] {question} A: {answer}[<|endoftext|>]`; `ValueError` otherwise.
    The answer starts at the first `A:` after the question."""
    m = _QA_RE.match(text)
    if m is None:
        raise ValueError(f"text {text[:60]!r} is not of the form 'Q: ... A: ...'")
    question = strip_image_placeholder(m["q"])
    answer = m["a"].removesuffix(_EOS).strip()
    if not question or not answer:
        raise ValueError(f"text {text[:60]!r} has an empty question or answer")
    return question, answer


def load_csv(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    header: bool | None = None,
    limit: int | None = None,
    check_images: bool = True,
    skip_bad: bool = False,
) -> tuple[list[Sample], LoadReport]:
    """The seed's CSV, rows of (image path, "Q: ... A: ..."), as samples with the line number as id.

    image_root: relative image paths resolve against it (default: the CSV's folder).
    header: whether the first line is a header; None detects it: a header is a first line whose text
        field is not "Q: ... A: ..." and whose first field is not an image file name (.jpg, .png, ...;
        such a line is data, and refused if bad, never taken for a header). A header whose first field is empty (pandas' index column) makes
        the first column of every row ignored.
    limit: the first N samples in file order. skip_bad: count bad rows (bad row, missing image) instead of
    raising `DataError` naming the file and line.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    report = LoadReport(str(path), skip_bad=skip_bad)
    try:
        f = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    samples: list[Sample] = []
    with f:
        reader = csv.reader(f)
        skip_first_column = False
        line = 1
        try:
            for n, row in enumerate(reader):
                start, line = line, reader.line_num + 1  # a quoted field may span lines
                where = f"{path}: line {start}"
                if n == 0:
                    is_header = header
                    if is_header is None:
                        looks_like_data = bool(row) and Path(row[0].strip()).suffix.lower() in _IMAGE_SUFFIXES
                        is_header = not looks_like_data and (len(row) < 2 or _QA_RE.match(row[-1]) is None)
                    if is_header:
                        skip_first_column = len(row) == 3 and row[0].strip() == ""
                        continue
                if limit is not None and len(samples) >= limit:
                    break
                if not row or all(not c.strip() for c in row):
                    continue  # blank line
                fields = row[1:] if skip_first_column else row
                if len(fields) != 2:
                    report.bad("bad row", f"{where}: expected 2 fields (image path, text), got {len(fields)}")
                    continue
                image, text = fields[0].strip(), fields[1]
                try:
                    if not image:
                        raise ValueError("empty image path")
                    question, answer = parse_qa_text(text)
                except ValueError as e:
                    report.bad("bad row", f"{where}: {e}")
                    continue
                image_path = root / image
                if check_images and not image_path.is_file():
                    report.bad("missing image", f"{where}: image {image_path} not found")
                    continue
                samples.append(
                    Sample(
                        id=str(start),
                        image=str(image_path),
                        turns=[Turn("user", question), Turn("assistant", answer)],
                    )
                )
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}: line {reader.line_num}: not valid UTF-8 CSV ({e})") from e
    report.loaded = len(samples)
    return samples, report
