"""LLaVA conversation JSON as `Sample`s: instruct-150k / mix-665k (multi-turn, text-only records allowed)
and pretrain-558k (one instruction + `<image>` turn, one caption turn); the schema is the same:

    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}]}]

Roles: "human" (or "user") -> user, "gpt" (or "assistant") -> assistant. "system" turns are dropped (the
prompt format has no place for them) and counted in the report's notes. After that a conversation must
alternate user/assistant, start with the user and end with the assistant. The `<image>` placeholder (and
the newline next to it) is removed from user text; in assistant text it is a schema error, since the
processor would read it as an image token. Extra keys ("model", ...) are ignored.

Several images per record: `"image": ["a.jpg", "b.jpg"]`, with one `<image>` placeholder per image, in order,
where each image stands in the user turns (kept there: the processor puts each image's tokens at its
placeholder); a count that differs is a schema error. A record with no placeholder at all puts its images
after the first `Q:`. A list of one image is the same record as the plain string (the placeholder removed).

Record ids are not unique in every LLaVA file (the same COCO image id appears in several sub-datasets of
mix-665k): a repeated id becomes `{id}#{record index}`, counted in the report's notes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gpt2mm.data.samples import IMAGE_PLACEHOLDER, LoadReport, Sample, Turn, strip_image_placeholder
from gpt2mm.data.vqa import read_json
from gpt2mm.errors import DataError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def parse_conversation(
    conversation: Any, has_image: bool = False, num_images: int | None = None
) -> tuple[list[Turn], int]:
    """Turns of a LLaVA `conversations` list, and the number of system turns dropped; `ValueError` saying
    what is wrong with it. `num_images` (default: one if `has_image`): with two or more, the user turns keep
    their `<image>` placeholders, which must be none or one per image. Only a user turn that holds images
    may be empty (the image is the prompt): the first one of a record with images, or one with a placeholder
    in a multi-image record."""
    n_images = int(has_image) if num_images is None else num_images
    placed = n_images >= 2  # placeholders kept where they stand
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("'conversations' must be a non-empty list")
    turns: list[Turn] = []
    dropped = 0
    for j, t in enumerate(conversation):
        if (
            not isinstance(t, dict)
            or not isinstance(t.get("from"), str)
            or not isinstance(t.get("value"), str)
        ):
            raise ValueError(f"turn {j}: expected {{from: str, value: str}}")
        if t["from"] == "system":
            dropped += 1
            continue
        role = ROLES.get(t["from"])
        if role is None:
            raise ValueError(f"turn {j}: unknown role {t['from']!r} (expected human, gpt or system)")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"turn {j}: {t['from']!r} where a {expected} turn was expected (turns must alternate)"
            )
        if role == "user":
            text = strip_image_placeholder(t["value"])
            holds_image = (n_images and not turns) or (placed and IMAGE_PLACEHOLDER in t["value"])
            if not text and not holds_image:
                raise ValueError(f"turn {j}: empty user turn")
            if placed:
                text = t["value"].strip()
        else:
            if IMAGE_PLACEHOLDER in t["value"]:
                raise ValueError(f"turn {j}: {IMAGE_PLACEHOLDER} in an assistant turn")
            text = t["value"].strip()
            if not text:
                raise ValueError(f"turn {j}: empty assistant turn")
        turns.append(Turn(role, text))
    if not turns:
        raise ValueError("no user or assistant turns")
    if turns[-1].role != "assistant":
        raise ValueError("the conversation ends with a user turn (no answer to learn)")
    if placed:
        count = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
        if count not in (0, n_images):
            raise ValueError(
                f"the user turns hold {count} {IMAGE_PLACEHOLDER} placeholders for {n_images} images "
                "(one per image, or none)"
            )
    return turns, dropped


def image_list(image: Any) -> list[str] | None:
    """A record's `image` as a list of relative paths (None: the record has none); `ValueError` otherwise."""
    if image is None:
        return None
    if isinstance(image, str) and image:
        return [image]
    if isinstance(image, list) and image and all(isinstance(p, str) and p for p in image):
        return image
    raise ValueError("'image' must be a relative path (a string) or a non-empty list of them")


def load_llava(
    path: str | os.PathLike,
    images: str | os.PathLike,
    limit: int | None = None,
    check_images: bool = True,
    skip_bad: bool = False,
) -> tuple[list[Sample], LoadReport]:
    """Records of a LLaVA JSON file as samples; image paths are relative to the `images` folder.

    limit: keep the first N samples in file order. check_images: check that each image file exists.
    skip_bad: count bad records (bad schema, missing image) in the report instead of raising `DataError`.
    """
    report = LoadReport(str(path), skip_bad=skip_bad)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (LLaVA format), got {type(data).__name__}")
    folder = Path(images)
    samples: list[Sample] = []
    seen: set[str] = set()
    for i, rec in enumerate(data):
        if limit is not None and len(samples) >= limit:
            break
        rid = rec.get("id") if isinstance(rec, dict) else None
        where = f"{path}: record {i}" + (f" (id {rid!r})" if rid is not None else "")
        if not isinstance(rec, dict):
            report.bad("bad schema", f"{where}: expected a JSON object")
            continue
        if not isinstance(rid, str | int) or isinstance(rid, bool) or rid == "":
            report.bad("bad schema", f"{where}: missing 'id' (a string or integer)")
            continue
        if "conversations" not in rec:
            report.bad("bad schema", f"{where}: missing 'conversations'")
            continue
        try:
            image = image_list(rec.get("image"))
            turns, dropped = parse_conversation(rec["conversations"], num_images=len(image or ()))
        except ValueError as e:
            report.bad("bad schema", f"{where}: {e}")
            continue
        paths = [str(folder / p) for p in image or ()]
        missing = [p for p in paths if check_images and not Path(p).is_file()]
        if missing:
            report.bad("missing image", f"{where}: image {missing[0]} not found")
            continue
        sid = str(rid)
        if sid in seen:
            sid = f"{sid}#{i}"
            report.notes["duplicate ids renamed"] += 1
        seen.add(sid)
        if dropped:
            report.notes["system turns dropped"] += dropped
        samples.append(Sample(id=sid, image=paths[0] if paths else None, turns=turns, more_images=paths[1:]))
    report.loaded = len(samples)
    return samples, report
