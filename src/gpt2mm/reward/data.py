"""The reward trainer's data: tag files (a tag database or a JSONL export) -> examples (token ids, image path,
label, the optional `kind` / `family` keys), the held-out split by image, and `Batcher`, which packs the answers
to one question into one prefix tree per batch row."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt2mm.errors import DataError, UsageError

EXTRA_KEYS = ("kind", "family")  # optional JSONL keys reported per value (simulated tags carry them)
PACK_MODES = ("question", "image", "none")


@dataclass
class Example:
    """One tag, ready to batch: `Q: <image> {question} A: {answer}<|endoftext|>` as token ids, the image's
    path (None for a text-only item), whether the answer was tagged correct, and its `EXTRA_KEYS` values."""

    input_ids: list[int]
    image: str | None
    question: str
    label: bool
    extra: dict[str, str]


def read_extra(path: Path, n_records: int) -> list[dict[str, str]]:
    """The optional keys of each tag row, in `read_tags` order (JSONL only; the same skip rules)."""
    empty = [{} for _ in range(n_records)]
    with open(path, "rb") as f:
        if f.read(16) == b"SQLite format 3\x00":
            return empty
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)  # read_tags has checked it
            if row["label"] == "skip":
                continue
            out.append({k: str(row[k]) for k in EXTRA_KEYS if row.get(k)})
    return out if len(out) == n_records else empty


def load_tag_file(path: str | Path, what: str) -> tuple[list, list[dict[str, str]]]:
    """The correct / incorrect tags of a file (`what` is its flag, for the messages) and their optional keys;
    an unreadable or empty file is a `UsageError`."""
    from gpt2mm.tag.store import read_tags

    path = Path(path)
    try:
        records = read_tags(path)
    except DataError as e:
        raise UsageError(f"{what}: {e}") from None
    if not records:
        raise UsageError(f"{what} {path}: no correct / incorrect tags (skips are left out)")
    return records, read_extra(path, len(records))


def resolve_image(image: str, root: Path) -> str | None:
    """A tag's image: None for a text-only item (empty), else an absolute path (relative ones under root)."""
    if not image:
        return None
    p = Path(image)
    return str(p if p.is_absolute() else root / p)


def split_by_image(n: int, images: Sequence[str | None], questions: Sequence[str], share: float, seed: int):
    """Indices (train, held-out): a `share` of the distinct images (text-only items: of their questions)
    go to held-out, drawn by the seed, so that no held-out image is seen in training."""
    keys = [im if im is not None else f"text:{q}" for im, q in zip(images, questions)]
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise UsageError(
            f"--holdout needs tags about 2 images at least, got {len(distinct)}; pass --eval-tags"
        )
    random.Random(f"gpt2mm-reward-split/{seed}").shuffle(distinct)
    n_eval = min(len(distinct) - 1, max(1, round(share * len(distinct))))
    held = set(distinct[:n_eval])
    train = [i for i in range(n) if keys[i] not in held]
    evals = [i for i in range(n) if keys[i] in held]
    return train, evals


def make_examples(
    records: Sequence,
    extras: Sequence[dict],
    processor: Any,
    root: Path,
    max_len: int,
    skipped: Counter,
    skip_bad: bool,
    what: str,
) -> list[Example]:
    """Tags -> token ids + image path + label; a missing image is an error (or, with skip_bad, counted)."""
    from gpt2mm.reward.model import encode

    out, missing = [], []
    exists: dict[str, bool] = {}
    encoded: dict[tuple[str, str, bool], list[int]] = {}  # questions and answers repeat: tokenize once
    for r, extra in zip(records, extras):
        image = resolve_image(r.image, root)
        if image is not None:
            if image not in exists:
                exists[image] = Path(image).is_file()
            if not exists[image]:
                missing.append((r, image))
                continue
        key = (r.question, r.answer, image is not None)
        if key not in encoded:
            encoded[key] = encode(processor, r.question, r.answer, with_image=image is not None)
        ids = encoded[key]
        if len(ids) > max_len:
            skipped[f"{what}: longer than the model's {max_len} positions"] += 1
            continue
        out.append(Example(ids, image, r.question, bool(r.label), extra))
    if missing:
        r, image = missing[0]
        if not skip_bad:
            raise UsageError(
                f"{what}: {len(missing)} of {len(records)} tags name images that do not exist, e.g. "
                f"{image} (question_id {r.question_id}); set --image-root, or --skip-bad to skip them"
            )
        skipped[f"{what}: image not found"] += len(missing)
    return out


class Batcher:
    """Examples -> packed batches. Answers that share a prefix become one prefix tree (`pack_prefix_trees`),
    which computes the shared tokens once and gives the same scores as one answer at a time. `pack`:
    "question" groups the answers to one question about one image (they share `Q: <image> {question} A:`;
    half the tokens of unpacked answers with two answers per question); "image" groups all the answers
    about an image (a third of the tokens, but few images per batch, and it learned much slower);
    "none" packs nothing. A batch takes groups, in the given order, until it holds `rows` answers. `images` is
    an image source of `gpt2mm.data.features` (path -> tensor), whose `key` names the model input it fills."""

    def __init__(
        self,
        examples: Sequence[Example],
        pad_id: int,
        images: Any,
        pack: str = "question",
        max_group_rows: int = 32,
        answer_marker: Sequence[int] | None = None,
    ):
        if pack not in PACK_MODES:
            raise UsageError(f"pack must be one of {', '.join(PACK_MODES)}, got {pack!r}")
        self.examples, self.pad_id, self.images, self.image_key = examples, pad_id, images, images.key
        self.pack, self.max_group_rows, self.answer_marker = pack, max_group_rows, answer_marker

    def groups(self, indices: Sequence[int]) -> list[list[int]]:
        """Indices grouped by image, or by (image, question), or one per group; in chunks of at most
        max_group_rows."""
        by: dict[Any, list[int]] = defaultdict(list)
        for i in indices:
            e = self.examples[i]
            key = e.image if self.pack == "image" else (e.image, e.question) if self.pack == "question" else i
            by[key].append(i)
        m = self.max_group_rows
        return [rows[k : k + m] for rows in by.values() for k in range(0, len(rows), m)]

    @staticmethod
    def batches(groups: Sequence[list[int]], rows: int) -> list[list[list[int]]]:
        """Consecutive groups, as many as make `rows` answers (at least one group per batch)."""
        out, current, n = [], [], 0
        for g in groups:
            current.append(g)
            n += len(g)
            if n >= rows:
                out.append(current)
                current, n = [], 0
        if current:
            out.append(current)
        return out

    def collate(self, groups: Sequence[list[int]]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """One packed batch (the model's `forward_packed` arguments + labels) and its rows, in order."""
        from gpt2mm.reward.model import pack_prefix_trees

        ex = self.examples
        batch = pack_prefix_trees(
            [[ex[i].input_ids for i in g] for g in groups], self.pad_id, answer_marker=self.answer_marker
        )
        paths = [ex[g[0]].image for g in groups if ex[g[0]].image is not None]
        if paths:
            batch[self.image_key] = torch.stack([self.images(p) for p in paths])
        rows = [i for g in groups for i in g]
        batch["labels"] = torch.tensor([float(ex[i].label) for i in rows])
        return batch, rows

    def collate_plain(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """One right-padded batch for `forward` (the scorer's path), to check the packed one against."""
        from gpt2mm.reward.model import pad_right

        ex = [self.examples[i] for i in rows]
        input_ids, mask = pad_right([e.input_ids for e in ex], self.pad_id)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        paths = [e.image for e in ex if e.image is not None]
        if paths:
            batch[self.image_key] = torch.stack([self.images(p) for p in paths])
        return batch
