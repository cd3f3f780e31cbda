"""Writing a world to disk in the real datasets' formats (VQA v2, LLaVA, COCO names) and reading it back.

Same arguments give byte-identical files: each split draws from its own `random.Random` seeded from
(seed, split), and `world.json` (the manifest) is written last, so its presence means the world is complete.
"""

from __future__ import annotations

import inspect
import json
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gpt2mm.data.synthetic.descriptions import DESCRIBE_PROMPT, describe
from gpt2mm.data.synthetic.questions import (
    FAMILIES,
    QID_FACTOR,
    answer_vocab,
    blind_accuracy,
    human_answers,
    make_questions,
    qa_rows,
)
from gpt2mm.data.synthetic.world import (
    COLORS,
    GRID,
    LAYOUTS,
    MAX_OBJECTS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    make_scene,
    render,
)
from gpt2mm.errors import UsageError

SPLITS: tuple[str, ...] = ("train", "val", "test")
ID_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}  # image ids unique across splits


def parse_holdout(spec: str | Iterable[Any] | None) -> list[tuple[str, str]]:
    """Colour-shape combos from "red:circle,blue:square", ["red:circle"] or [["red", "circle"]]."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    combos = []
    for item in items:
        parts = item.split(":") if isinstance(item, str) else list(item)
        parts = [p.strip().lower() for p in parts]
        if len(parts) != 2 or parts[0] not in COLORS or parts[1] not in SHAPES:
            raise UsageError(
                f"bad hold-out combo {item!r}: expected colour:shape with colour in {list(COLORS)} "
                f"and shape in {list(SHAPES)}"
            )
        combos.append((parts[0], parts[1]))
    if len(set(combos)) >= len(COLORS) * len(SHAPES):
        raise UsageError(
            "the hold-out list covers every colour-shape combination; nothing is left to train on"
        )
    return sorted(set(combos), key=combos.index)


def _check_params(
    counts: Sequence[int],
    image_size: int,
    questions_per_image: int,
    min_objects: int,
    max_objects: int,
    answer_noise: float,
    families: Sequence[str],
    layout: str,
) -> None:
    """Refuse arguments the formats cannot hold (ids, grid cells) before anything is written."""
    for name, v in zip(("n_train", "n_val", "n_test"), counts):
        if not 0 <= v < QID_FACTOR * 10_000:
            raise UsageError(f"{name} must be in [0, 999999], got {v}")
    if not 24 <= image_size <= 2048:
        raise UsageError(f"image_size must be in [24, 2048] (cells of 8 px at least), got {image_size}")
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise UsageError(
            f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}..{max_objects}"
        )
    if not 1 <= questions_per_image < QID_FACTOR:
        raise UsageError(f"questions_per_image must be in [1, {QID_FACTOR - 1}], got {questions_per_image}")
    if not 0.0 <= answer_noise <= 1.0:
        raise UsageError(f"answer_noise must be in [0, 1], got {answer_noise}")
    if bad := [f for f in families if f not in FAMILIES]:
        raise UsageError(f"unknown question families {bad}; choose from {list(FAMILIES)}")
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; choose from {list(LAYOUTS)}")


def _prepare_dir(out_dir: str | Path) -> Path:
    """Create `out_dir` and mark it incomplete (no `world.json`) until the manifest is rewritten."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)
    return out


# --- one split's files ----------------------------------------------------------------------------------


def _dump(path: Path, obj: Any, indent: int | None = None) -> None:
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def _info(split: str) -> dict[str, Any]:
    return {
        "description": f"gpt2mm synthetic shapes world, {split} split",
        "version": "1.0",
        "contributor": "gpt2mm.data.synthetic",
    }


_LICENSE = {
    "name": "CC0 1.0 (procedurally generated)",
    "url": "https://creativecommons.org/publicdomain/zero/1.0/",
}


def _scene_rows(
    scene: dict[str, Any], rng: random.Random, max_objects: int, answer_noise: float
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """A scene's VQA questions, VQA annotations (simulated human answers) and LLaVA conversation."""
    image_id, split = scene["image_id"], scene["split"]
    questions, annotations = [], []
    turns = [
        {"from": "human", "value": f"<image>\n{DESCRIBE_PROMPT}"},
        {"from": "gpt", "value": describe(scene)},
    ]
    for qa in scene["questions"]:
        questions.append({"image_id": image_id, "question": qa["question"], "question_id": qa["question_id"]})
        vocab = answer_vocab(qa["template"], max_objects)
        annotations.append(
            {
                "image_id": image_id,
                "question_id": qa["question_id"],
                "question_type": qa["question_type"],
                "answer_type": qa["answer_type"],
                "multiple_choice_answer": qa["answer"],
                "answers": human_answers(qa["answer"], vocab, rng, answer_noise),
            }
        )
        turns += [{"from": "human", "value": qa["question"]}, {"from": "gpt", "value": qa["answer"]}]
    llava = {"id": f"{image_id:012d}", "image": f"{split}/{scene['file_name']}", "conversations": turns}
    return questions, annotations, llava


def _write_split_files(
    out: Path,
    split: str,
    scenes: list[dict],
    questions: list[dict],
    annotations: list[dict],
    llava: list[dict],
) -> None:
    """The split's scene records, VQA v2 questions and annotations (official format) and LLaVA file."""
    (out / "scenes").mkdir(exist_ok=True)
    _dump(out / "scenes" / f"{split}_scenes.json", scenes)
    _dump(
        out / f"{split}_questions.json",
        {
            "info": _info(split),
            "task_type": "Open-Ended",
            "data_type": "synthetic",
            "data_subtype": split,
            "license": _LICENSE,
            "questions": questions,
        },
    )
    _dump(
        out / f"{split}_annotations.json",
        {"info": _info(split), "license": _LICENSE, "data_subtype": split, "annotations": annotations},
    )
    _dump(out / f"{split}_llava.json", llava)


def _write_split(
    out: Path,
    split: str,
    n: int,
    seed: int,
    image_size: int,
    holdout: list[tuple[str, str]],
    questions_per_image: int,
    min_objects: int,
    max_objects: int,
    answer_noise: float,
    families: Sequence[str],
    layout: str,
) -> list[dict[str, Any]]:
    """Render `n` scenes of a split with their images and files; return the scene records."""
    rng = random.Random(f"gpt2mm-synth/{seed}/{split}")  # string seeds hash with SHA-512: stable everywhere
    banned = holdout if split == "train" else []
    held = set(holdout)
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    scenes, questions, annotations, llava = [], [], [], []
    for i in range(n):
        scene_id = ID_OFFSET[split] + i + 1
        scene = make_scene(rng, scene_id, split, image_size, min_objects, max_objects, banned, layout)
        scene["holdout"] = any((o["color"], o["shape"]) in held for o in scene["objects"])
        scene["questions"] = make_questions(scene, rng, questions_per_image, families, banned)
        render(scene).save(img_dir / scene["file_name"], format="PNG")
        q, a, conversation = _scene_rows(scene, rng, max_objects, answer_noise)
        questions += q
        annotations += a
        llava.append(conversation)
        scenes.append(scene)
    # Remove images of an earlier, larger world in this directory (only our own naming pattern).
    keep = {s["file_name"] for s in scenes}
    for p in img_dir.glob(f"COCO_{split}2014_*.png"):
        if p.name not in keep:
            p.unlink()
    _write_split_files(out, split, scenes, questions, annotations, llava)
    return scenes


# --- the world ------------------------------------------------------------------------------------------


def _manifest(params: dict[str, Any], scenes: dict[str, list[dict]]) -> dict[str, Any]:
    """`world.json`: the parameters, the vocabulary, per-split counts and the blind (question-only) accuracy."""
    blind = blind_accuracy(scenes["train"], scenes["test"])
    return {
        "generator": "gpt2mm.data.synthetic",
        "format_version": 1,
        "params": params,
        "vocab": {
            "colors": list(COLORS),
            "shapes": list(SHAPES),
            "sizes": list(SIZES),
            "positions": list(POSITIONS),
            "relations": list(RELATIONS),
        },
        "counts": {
            split: {
                "images": len(s),
                "questions": sum(len(x["questions"]) for x in s),
                "images_with_holdout": sum(x["holdout"] for x in s),
                "questions_by_family": dict(sorted(Counter(q["family"] for q in qa_rows(s)).items())),
            }
            for split, s in scenes.items()
        },
        "blind_accuracy": blind,
    }


def write_world(
    out_dir: str | Path,
    n_train: int = 8000,
    n_val: int = 500,
    n_test: int = 500,
    seed: int = 0,
    image_size: int = 48,
    holdout: str | Iterable[Any] | None = None,
    questions_per_image: int = 5,
    min_objects: int = 1,
    max_objects: int = 6,
    answer_noise: float = 0.05,
    families: Sequence[str] | None = None,
    layout: str = "grid",
) -> dict[str, Any]:
    """Render a world into `out_dir` and return its manifest (also written to `out_dir/world.json`, last,
    so its presence means the world is complete). Same arguments -> byte-identical files: each split
    draws from its own `random.Random` seeded from (seed, split), so split sizes do not affect each other.
    Files of the world's own names are overwritten; nothing else in `out_dir` is touched except stale
    `images/{split}/COCO_{split}2014_*.png` of an earlier world. `layout`: "grid" (one object per cell of a
    3x3 grid) or "free" (objects anywhere, varied sizes and angles, textured backgrounds; see `world`)."""
    holdout_list = parse_holdout(holdout)
    families = tuple(families) if families else FAMILIES
    counts = (n_train, n_val, n_test)
    _check_params(
        counts, image_size, questions_per_image, min_objects, max_objects, answer_noise, families, layout
    )
    out = _prepare_dir(out_dir)
    t0 = time.perf_counter()
    scenes: dict[str, list[dict]] = {}
    for split, n in zip(SPLITS, counts):
        scenes[split] = _write_split(
            out, split, n, seed, image_size, holdout_list, questions_per_image, min_objects, max_objects,
            answer_noise, families, layout,
        )  # fmt: skip
    params = _params(
        counts, seed, image_size, holdout_list, questions_per_image, min_objects, max_objects, answer_noise,
        families, layout,
    )  # fmt: skip
    manifest = _manifest(params, scenes)
    _dump(out / "world.json", manifest, indent=2)
    manifest["seconds"] = round(time.perf_counter() - t0, 2)  # not in the file: it would break byte-identity
    return manifest


def _params(
    counts, seed, image_size, holdout_list, questions_per_image, min_objects, max_objects, answer_noise,
    families, layout,
) -> dict[str, Any]:  # fmt: skip
    """world.json's "params": the arguments a world was rendered with."""
    n_train, n_val, n_test = counts
    return {
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "seed": seed,
        "image_size": image_size,
        "grid": GRID,
        "holdout": [list(c) for c in holdout_list],
        "questions_per_image": questions_per_image,
        "min_objects": min_objects,
        "max_objects": max_objects,
        "answer_noise": answer_noise,
        "families": list(families),
        **({"layout": layout} if layout != "grid" else {}),  # absent: a grid world
    }


def world_params(**world_args: Any) -> dict[str, Any]:
    """The "params" that `write_world(out_dir, **world_args)` records in world.json (defaults filled in).
    TypeError for an argument `write_world` does not take."""
    bound = inspect.signature(write_world).bind("unused", **world_args)
    bound.apply_defaults()
    a = bound.arguments
    return _params(
        (a["n_train"], a["n_val"], a["n_test"]), a["seed"], a["image_size"], parse_holdout(a["holdout"]),
        a["questions_per_image"], a["min_objects"], a["max_objects"], a["answer_noise"],
        tuple(a["families"]) if a["families"] else FAMILIES, a["layout"],
    )  # fmt: skip


def world_mismatch(out_dir: str | Path, wanted: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """None when the world written in `out_dir` has the parameters `wanted` (`world_params`), else the first
    that differs, as (name, written, wanted). Only the parameters its world.json records are compared, so a
    world written by an older version with the same arguments matches (even where its pixels differ); the
    holdout is a set. ValueError if world.json is not a world's manifest."""
    manifest = json.loads((Path(out_dir) / "world.json").read_text(encoding="utf-8"))
    if manifest.get("generator") != "gpt2mm.data.synthetic":
        raise ValueError(f"its generator is {manifest.get('generator')!r}")
    written, wanted = {"layout": "grid"} | manifest["params"], {"layout": "grid"} | wanted
    written["holdout"], wanted["holdout"] = sorted(written.get("holdout", [])), sorted(wanted["holdout"])
    for name, value in written.items():
        if name in wanted and wanted[name] != value:
            return name, value, wanted[name]
    return None


def load_scenes(out_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The scene records (with their questions and answers) of a written world's split."""
    return json.loads((Path(out_dir) / "scenes" / f"{split}_scenes.json").read_text(encoding="utf-8"))
