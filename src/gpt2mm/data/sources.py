"""Samples from a Hugging Face `datasets` dataset (with a column mapping) and from the seed's CSV.

Hugging Face: `load_hf(source, columns={"image": "image", "question": "question", ...})`, where the source is
a `datasets` object, a `save_to_disk` folder, a folder (or one file) of parquet / JSON / CSV data files
(`datasets.load_dataset` infers the format and the splits from the file names), or a hub id. With
`streaming=True` rows are read one at a time as they are iterated (an `IterableDataset`): data files are
not converted to Arrow first, and with `limit` the rows after the first N samples are never read. A
`Sample.image` is always a path: image columns that hold image data (a `datasets.Image` feature, or dicts
of `{"bytes", "path"}`) are written once, as they are encoded (no re-encoding), into
`{image_cache}/{dataset key}/{content hash}.{format}` and reused by later loads of the same dataset (rows
holding the same picture share one file, so their questions pack into one sample like VQA's; the
key is the dataset's fingerprint, which a `load_from_disk` or `load_dataset` dataset keeps from run to run;
one built in memory may get a new one each run; a streamed one's key hashes its source, split and, for
local files, their names, sizes and modification times). String columns are paths, relative to
`image_root` when given.

CSV: rows of `image path, "Q: {question} A: {answer}"`, with or without a header line, as the seed wrote
them. See `load_csv`.
"""

from __future__ import annotations

import csv
import hashlib
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


def _cache_image(data: bytes, folder: Path) -> Path:
    """Write image bytes once (atomically), named by their SHA-256 with their format's extension: the same
    picture in several rows is one file."""
    import hashlib

    from PIL import Image

    try:
        fmt = Image.open(io.BytesIO(data)).format  # the header only
    except Exception as e:
        raise ValueError(f"image data that is not an image ({e})") from e
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.{(fmt or 'img').lower()}"
    if not (path.is_file() and path.stat().st_size == len(data)):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


# data files a single-file source may be, by suffix: the `datasets` builder that reads them
DATA_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".arrow": "arrow",
}
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _first_line(e: BaseException) -> str:
    """`Type: first line` of an exception, or of its cause when it only wraps one (datasets' build errors)."""
    if e.__cause__ is not None and type(e).__name__ == "DatasetGenerationError":
        e = e.__cause__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _stream_key(*parts: Any, files: Path | None = None) -> str:
    """The image cache's key for a streamed dataset (which has no fingerprint): a hash of its source, split
    and, for local files, their names, sizes and modification times (so edited files get a new key)."""
    h = hashlib.sha256(repr(parts).encode())
    if files is not None:
        for f in sorted(files.rglob("*")) if files.is_dir() else [files]:
            if f.is_file():
                st = f.stat()
                h.update(
                    f"{f.relative_to(files) if files.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode()
                )
    return "stream-" + h.hexdigest()[:16]


def _load_dataset(
    hf: Any,
    args: tuple,
    source: str,
    split: str,
    streaming: bool,
    what: str = "cannot load it",
    **kwargs: Any,
) -> datasets.Dataset | datasets.IterableDataset:
    """`datasets.load_dataset(*args, split=...)` with its failures as one-line `DataError`s naming `source`
    and saying `what` went wrong."""
    try:
        return hf.load_dataset(*args, split=split, streaming=streaming, **kwargs)
    except ValueError as e:
        if "split" in str(e).lower():  # 'Unknown split "validation". Should be one of ['train'].'
            raise DataError(f"{source}: no split {split!r} ({_first_line(e)})") from None
        raise DataError(f"{source}: {what} ({_first_line(e)})") from None
    except (OSError, hf.exceptions.DatasetsError) as e:
        raise DataError(f"{source}: {what} ({_first_line(e)})") from None


def _open_dataset(
    dataset: Any, split: str | None, hf: Any, config: str | None = None, streaming: bool = False
) -> tuple[datasets.Dataset | datasets.IterableDataset, str, str]:
    """(the rows, the name reports give them, the image cache's key for them). `dataset` is a `datasets`
    object, a `save_to_disk` folder (its `split` when a `DatasetDict`), a folder or file of data files
    (`load_dataset`, `split` default train), or a hub id (`load_dataset(id, config)`); `hf` is the
    imported `datasets` package. With `streaming`, an `IterableDataset` that reads rows as they are asked for."""
    if isinstance(dataset, hf.IterableDataset):
        from datasets.fingerprint import Hasher

        return (
            dataset,
            f"streamed dataset {dataset.info.dataset_name or ''}".strip(),
            _stream_key(Hasher.hash(dataset)),
        )
    if isinstance(dataset, hf.Dataset):
        files = dataset.cache_files
        name = files[0]["filename"] if files else f"in-memory dataset {dataset._fingerprint}"
        return (dataset.to_iterable_dataset() if streaming else dataset), name, dataset._fingerprint
    path, source = Path(dataset), str(dataset)
    if path.is_dir() and any(
        (path / f).is_file()
        for f in (hf.config.DATASET_STATE_JSON_FILENAME, hf.config.DATASETDICT_JSON_FILENAME)
    ):
        loaded = hf.load_from_disk(str(path))  # memory-mapped Arrow files: nothing is read into memory
        if isinstance(loaded, hf.DatasetDict):
            if split not in loaded:
                raise DataError(f"{source}: a DatasetDict; pass split= one of {', '.join(loaded)}")
            loaded = loaded[split]
        elif split not in (None, "train"):  # one Dataset has no splits: never validate on the training rows
            raise DataError(
                f"{source}: one dataset without splits, so no split {split!r}: use data.hf_val_split null "
                "(no validation), 'train' (all its rows), or save a DatasetDict"
            )
        return (loaded.to_iterable_dataset() if streaming else loaded), source, loaded._fingerprint
    split = split or "train"
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"{source}: not a data file datasets reads ({', '.join(DATA_FILE_BUILDERS)}), nor a folder"
            )
        rows = _load_dataset(hf, (builder,), source, split, streaming, data_files={"train": str(path)})
    elif path.is_dir():  # data files: load_dataset infers their format and splits from the names
        rows = _load_dataset(hf, (str(path),), source, split, streaming, name=config)
    elif isinstance(dataset, str) and _HUB_ID_RE.fullmatch(dataset):
        what = "not a local folder or file, and the Hugging Face hub did not give it"
        try:
            rows = _load_dataset(hf, (dataset,), source, split, streaming, what, name=config)
        except DataError as e:
            if f"no split {split!r}" in str(e):
                raise
            raise DataError(f"{e}; offline, point at a save_to_disk folder or data files instead") from None
    else:
        raise DataError(f"{source}: no such folder or file")
    if streaming:
        return rows, source, _stream_key(source, config, split, files=path if path.exists() else None)
    return rows, source, rows._fingerprint


def _rows(dataset: Any, source: str, hf: Any) -> Any:
    """(index, row) in order; a data file that cannot be read (streaming reads it here) is a `DataError`."""
    it = iter(dataset)
    i = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except (ValueError, OSError, hf.exceptions.DatasetsError) as e:
            raise DataError(f"{source}: row {i}: cannot read the data ({_first_line(e)})") from None
        yield i, row
        i += 1


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
        return _cache_image(image["bytes"], cache_dir)
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
    dataset: datasets.Dataset | datasets.IterableDataset | str | os.PathLike,
    columns: dict[str, str] | None = None,
    split: str | None = None,
    image_cache: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    limit: int | None = None,
    check_images: bool = True,
    skip_bad: bool = False,
    config: str | None = None,
    streaming: bool = False,
) -> tuple[list[Sample], LoadReport]:
    """Rows of a Hugging Face dataset as samples. The dataset: a `datasets` object; a folder saved with
    `save_to_disk`; a folder (or one file) of parquet / JSON / CSV data files, read by `load_dataset`, its
    splits from the file names (`train-*.parquet`, `data/validation.jsonl`, ...; one file: train); or a hub
    id (`load_dataset(id, config)`, online).

    columns: field -> column, fields from `HF_FIELDS`; a row needs `question` + `answer` (VQA style) or
        `conversations` (LLaVA style, parsed like `load_llava`). None maps each field to the column of the
        same name. Without an `id` column, the id is the question id, else the row index.
    split: which split (of a `DatasetDict` folder, of the data files, of the hub dataset; default train
        but for a plain `save_to_disk` folder, which has one). image_cache: the folder for image data held
        in the dataset (required when there is any). limit: the first N samples in row order.
    skip_bad: count bad rows (bad schema, missing image, bad image) instead of raising `DataError`.
    streaming: read rows one at a time (an `IterableDataset`): data files are not converted to Arrow in
        datasets' cache first, and with `limit` only the rows up to the N-th sample are read. Either way the
        returned samples hold text and image paths; image data goes to `image_cache`, not to memory.
    """
    try:
        import datasets
    except ImportError as e:
        raise UsageError(
            "loading a Hugging Face dataset needs the datasets package (pip install datasets)"
        ) from e

    dataset, source, key = _open_dataset(dataset, split, datasets, config=config, streaming=streaming)
    report = LoadReport(source, skip_bad=skip_bad)
    names = dataset.column_names
    if names is None:  # a streamed dataset of unknown features: the first row's keys
        names = list(next((row for _, row in _rows(dataset, source, datasets)), {}))  # read errors: one line
    columns = _check_columns(columns, list(names), source)
    dataset = dataset.select_columns(sorted(set(columns.values())))
    image_col = columns.get("image")
    features = dataset.features or {}
    if image_col is not None and isinstance(features.get(image_col), datasets.Image):
        dataset = dataset.cast_column(image_col, datasets.Image(decode=False))  # bytes as stored, no decode
    cache_dir = None if image_cache is None else Path(image_cache) / key

    samples: list[Sample] = []
    seen: set[str] = set()
    for i, row in _rows(dataset, source, datasets):
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
        if limit is not None and len(samples) >= limit:
            break  # before the next row is read: a stream stops here
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
