"""The synthetic shapes world: procedural scenes with checkable ground truth, written as VQA v2 and LLaVA data.

No dataset can be downloaded everywhere this project runs, so this module renders one. Every file has the
format of the real data (official VQA v2 questions/annotations, LLaVA conversations, COCO-style image names),
and every answer is computed from a plain scene record, so the whole pipeline (loading, training, scoring)
can be checked end to end offline.

The world is built to be LEARNABLE by the `tiny` preset (48 px ViT, 16 px patches): objects sit on a 3x3
grid, one object per cell and one cell per patch at the default size; colours are saturated and far apart;
shapes are drawn without anti-aliasing (so a pixel's colour names its object exactly); question templates
are few and regular. Answers are balanced within each template so that a question-only ("blind") model
cannot do well: `blind_accuracy` measures the best such predictor and `write_world` records it.

    gpt2mm synth data/synth --train 8000 --val 500 --test 500 --seed 0
    write_world("data/synth", 8000, 500, 500, seed=0, holdout=[("red", "circle")])

Layout of OUT_DIR (split is "train", "val" or "test"):

    images/{split}/COCO_{split}2014_{image_id:012d}.png
    scenes/{split}_scenes.json          # scene records (objects + the questions asked with their answers)
    {split}_questions.json              # VQA v2 questions, official format
    {split}_annotations.json            # VQA v2 annotations, official format (10 simulated human answers)
    {split}_llava.json                  # LLaVA conversations: a detailed description, then the Q&A turns
    world.json                          # parameters, counts and the blind accuracy; written last
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from gpt2mm.errors import UsageError

# --- vocabulary ---------------------------------------------------------------------------------------------

# Saturated, mutually distant colours on a dark grey background (white and cyan stay visible on it).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 190, 40),
    "blue": (30, 80, 255),
    "yellow": (255, 230, 0),
    "purple": (150, 40, 210),
    "orange": (255, 130, 0),
    "cyan": (0, 220, 230),
    "white": (245, 245, 245),
}
BACKGROUND: tuple[int, int, int] = (40, 40, 40)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
    "diamond": "diamonds",
}
SIZES: tuple[str, ...] = ("small", "large")
SIZE_FRACTION: dict[str, float] = {"small": 0.5, "large": 0.875}  # object extent / cell extent
GRID = 3
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "centre", "right")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top centre",
    "top right",
    "middle left",
    "centre",
    "middle right",
    "bottom left",
    "bottom centre",
    "bottom right",
)  # POSITIONS[row * 3 + col]
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
YES_NO: tuple[str, ...] = ("yes", "no")
MAX_OBJECTS = GRID * GRID
NUMBERS: tuple[str, ...] = tuple(
    str(i) for i in range(MAX_OBJECTS + 1)
)  # count answers are digits, as in VQA

SPLITS: tuple[str, ...] = ("train", "val", "test")
_ID_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}  # image ids unique across splits
_QID_FACTOR = 100  # question_id = image_id * 100 + k, as VQA derives question ids from image ids
DESCRIBE_PROMPT = "Describe the image in detail."

# template id -> (family, question_type, answer_type). question_type follows the official VQA habit of
# naming a template by its first words.
TEMPLATES: dict[str, tuple[str, str, str]] = {
    "color_of": ("color", "what color is the", "other"),  # What color is the square?
    "shape_of": ("shape", "what shape is the", "other"),  # What shape is the red object?
    "count_all": ("count", "how many objects are there", "number"),  # How many objects are there?
    "count_shape": ("count", "how many", "number"),  # How many circles are there?
    "count_color": ("count", "how many", "number"),  # How many blue objects are there?
    "exist": ("exist", "is there a", "yes/no"),  # Is there a blue triangle?
    "where": ("position", "where is the", "other"),  # Where is the green circle?
    "color_at": ("position", "what color is the object in the", "other"),  # ... in the top left?
    "shape_at": ("position", "what shape is the object in the", "other"),  # ... in the centre?
    "rel_color": ("relation", "what color is the object", "other"),  # ... to the left of the red square?
    "rel_yesno": ("relation", "is the", "yes/no"),  # Is the blue circle above the red square?
}
FAMILIES: tuple[str, ...] = ("color", "shape", "count", "exist", "position", "relation")

# Every word the templates, answers and descriptions use (for the tokenizer builder).
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [*COLORS, *SHAPES, *PLURALS.values(), *SIZES, *ROWS, *COLUMNS, *YES_NO, *NUMBERS]
        + "what color shape is the object objects in how many are there a an where to left right of above below"
        " describe image detail".split()
    )
)


# --- scenes ---------------------------------------------------------------------------------------------


def position_name(row: int, col: int) -> str:
    """The name of a grid cell: "top left", ..., "centre", ..., "bottom right"."""
    return POSITIONS[row * GRID + col]


def _cell_box(index: int, image_size: int) -> tuple[int, int]:
    """Pixel span [start, end) of grid row/column `index`; sizes not divisible by 3 round the borders."""
    return round(index * image_size / GRID), round((index + 1) * image_size / GRID)


def _object_box(row: int, col: int, size: str, image_size: int) -> list[int]:
    """[x0, y0, x1, y1) of an object: a square of the size's extent, centred in its cell."""
    x0, x1 = _cell_box(col, image_size)
    y0, y1 = _cell_box(row, image_size)
    w, h = x1 - x0, y1 - y0
    e = max(3, round(SIZE_FRACTION[size] * min(w, h)))
    ox, oy = x0 + (w - e) // 2, y0 + (h - e) // 2
    return [ox, oy, ox + e, oy + e]


def make_scene(
    rng: random.Random,
    image_id: int,
    split: str = "train",
    image_size: int = 48,
    min_objects: int = 1,
    max_objects: int = 6,
    holdout: Iterable[tuple[str, str]] = (),
) -> dict[str, Any]:
    """A random scene record: 1..6 objects in distinct cells, none of the `holdout` colour-shape combos.

    The record is plain JSON and is the ground truth every question, answer and description derives from.
    """
    banned = set(holdout)
    n = rng.randint(min_objects, max_objects)
    cells = sorted(rng.sample(range(MAX_OBJECTS), n))  # reading order: descriptions list objects this way
    objects = []
    for cell in cells:
        while True:
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            if (color, shape) not in banned:
                break
        size = rng.choice(SIZES)
        row, col = divmod(cell, GRID)
        objects.append(
            {
                "shape": shape,
                "color": color,
                "size": size,
                "row": row,
                "col": col,
                "position": position_name(row, col),
                "bbox": _object_box(row, col, size, image_size),
            }
        )
    return {
        "image_id": image_id,
        "file_name": f"COCO_{split}2014_{image_id:012d}.png",
        "split": split,
        "width": image_size,
        "height": image_size,
        "objects": objects,
    }


def render(scene: dict[str, Any]) -> Image.Image:
    """Draw a scene record: flat background, flat-coloured shapes, no anti-aliasing (exact pixel colours)."""
    img = Image.new("RGB", (scene["width"], scene["height"]), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["bbox"]
        x1, y1 = x1 - 1, y1 - 1  # inclusive corners, as ImageDraw takes them
        fill = COLORS[obj["color"]]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        shape = obj["shape"]
        if shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif shape == "diamond":
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        elif shape == "cross":
            e = x1 - x0 + 1
            t = max(2, round(e / 3))
            a = (e - t) // 2
            draw.rectangle([x0, y0 + a, x1, y0 + a + t - 1], fill=fill)
            draw.rectangle([x0 + a, y0, x0 + a + t - 1, y1], fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    return img


def describe(scene: dict[str, Any]) -> str:
    """A detailed description stating each object's size, colour, shape and position (reading order)."""
    objs = scene["objects"]
    n = len(objs)
    parts = [f"There {'is' if n == 1 else 'are'} {n} object{'' if n == 1 else 's'} in the image."]
    for o in objs:
        parts.append(
            f"{_article(o['size']).capitalize()} {o['size']} {o['color']} {o['shape']} is in the {o['position']}."
        )
    return " ".join(parts)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --- questions ------------------------------------------------------------------------------------------


def _matches(obj: dict, attrs: dict[str, str]) -> bool:
    return all(obj[k] == v for k, v in attrs.items())


def _phrase(attrs: dict[str, str]) -> str:
    """A noun phrase in fixed word order: [size] [color] (shape | "object")."""
    words = [attrs[k] for k in ("size", "color") if k in attrs]
    return " ".join([*words, attrs.get("shape", "object")])


# Which attributes a referring expression may use, tried in order (the first that is unique wins).
_REF_ORDER = {
    "color_of": (("shape",), ("size", "shape")),
    "shape_of": (("color",), ("size", "color")),
    "where": (("color", "shape"), ("size", "color", "shape")),
    "anchor": (("color", "shape"), ("size", "color", "shape")),
}


def _refer(objs: list[dict], obj: dict, kind: str) -> str | None:
    """The shortest allowed phrase that picks out `obj` alone, or None (then the question is not asked)."""
    for keys in _REF_ORDER[kind]:
        attrs = {k: obj[k] for k in keys}
        if sum(_matches(o, attrs) for o in objs) == 1:
            return _phrase(attrs)
    return None


def _holds(a: dict, relation: str, b: dict) -> bool:
    """Grid relations: "left of" compares columns only, "above" rows only (anywhere in the image)."""
    if relation == "to the left of":
        return a["col"] < b["col"]
    if relation == "to the right of":
        return a["col"] > b["col"]
    if relation == "above":
        return a["row"] < b["row"]
    return a["row"] > b["row"]


def _candidates(scene: dict, template: str, banned: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every (question, answer) of a template that is well-defined on the scene."""
    objs = scene["objects"]
    out: list[tuple[str, str]] = []
    if template == "color_of":
        for o in objs:
            if ref := _refer(objs, o, "color_of"):
                out.append((f"What color is the {ref}?", o["color"]))
    elif template == "shape_of":
        for o in objs:
            if ref := _refer(objs, o, "shape_of"):
                out.append((f"What shape is the {ref}?", o["shape"]))
    elif template == "count_all":
        out.append(("How many objects are there?", str(len(objs))))
    elif template == "count_shape":
        for s in SHAPES:
            out.append((f"How many {PLURALS[s]} are there?", str(sum(o["shape"] == s for o in objs))))
    elif template == "count_color":
        for c in COLORS:
            out.append((f"How many {c} objects are there?", str(sum(o["color"] == c for o in objs))))
    elif template == "exist":
        present = {(o["color"], o["shape"]) for o in objs}
        for c in COLORS:
            for s in SHAPES:
                if (c, s) in present or (c, s) not in banned:  # never ask about held-out combos in train
                    out.append((f"Is there {_article(c)} {c} {s}?", "yes" if (c, s) in present else "no"))
    elif template == "where":
        for o in objs:
            if ref := _refer(objs, o, "where"):
                out.append((f"Where is the {ref}?", o["position"]))
    elif template in ("color_at", "shape_at"):
        key = "color" if template == "color_at" else "shape"
        for o in objs:
            out.append((f"What {key} is the object in the {o['position']}?", o[key]))
    elif template == "rel_color":
        for b in objs:
            if not (ref := _refer(objs, b, "anchor")):
                continue
            for rel in RELATIONS:
                hits = [a for a in objs if a is not b and _holds(a, rel, b)]
                if len(hits) == 1:
                    out.append((f"What color is the object {rel} the {ref}?", hits[0]["color"]))
    elif template == "rel_yesno":
        refs = [(o, r) for o in objs if (r := _refer(objs, o, "anchor"))]
        for a, ra in refs:
            for b, rb in refs:
                if a is not b:
                    for rel in RELATIONS:
                        out.append((f"Is the {ra} {rel} the {rb}?", "yes" if _holds(a, rel, b) else "no"))
    else:
        raise ValueError(f"unknown template {template!r}")
    return out


def _family_templates(family: str) -> list[str]:
    return [t for t, (f, _, _) in TEMPLATES.items() if f == family]


def make_questions(
    scene: dict[str, Any],
    rng: random.Random,
    k: int = 5,
    families: Sequence[str] = FAMILIES,
    holdout: Iterable[tuple[str, str]] = (),
) -> list[dict[str, Any]]:
    """Up to `k` distinct questions about a scene, each from a different family while families last.

    Balancing, so that the question alone does not give the answer away: a template is drawn uniformly
    among the family's usable ones, then an answer uniformly among the answers its questions have on this
    scene, then a question with that answer. `holdout` combos are never asked about ("Is there a red
    circle?" -> "no" would teach the held-out combination's absence).
    """
    banned = set(holdout)
    asked: set[str] = set()
    out: list[dict[str, Any]] = []
    while len(out) < k:
        progress = False
        order = list(families)
        rng.shuffle(order)
        for family in order:
            if len(out) >= k:
                break
            usable = {}
            for t in _family_templates(family):
                cands = [qa for qa in _candidates(scene, t, banned) if qa[0] not in asked]
                if cands:
                    usable[t] = cands
            if not usable:
                continue
            template = rng.choice(sorted(usable))
            by_answer: dict[str, list[str]] = defaultdict(list)
            for q, a in usable[template]:
                by_answer[a].append(q)
            answer = rng.choice(sorted(by_answer))
            question = rng.choice(by_answer[answer])
            asked.add(question)
            _, qtype, atype = TEMPLATES[template]
            out.append(
                {
                    "question_id": scene["image_id"] * _QID_FACTOR + len(out),
                    "question": question,
                    "answer": answer,
                    "family": family,
                    "template": template,
                    "question_type": qtype,
                    "answer_type": atype,
                }
            )
            progress = True
        if not progress:
            break
    return out


def _answer_vocab(template: str, max_objects: int) -> tuple[str, ...]:
    family, _, atype = TEMPLATES[template]
    if atype == "yes/no":
        return YES_NO
    if atype == "number":
        return NUMBERS[: max_objects + 1]
    if template in ("color_of", "color_at", "rel_color"):
        return tuple(COLORS)
    if template in ("shape_of", "shape_at"):
        return SHAPES
    return POSITIONS


def human_answers(truth: str, vocab: Sequence[str], rng: random.Random, noise: float) -> list[dict[str, Any]]:
    """Ten simulated VQA answers: each wrong with probability `noise`, but never more than 3 wrong, so the
    truth always keeps the majority (>= 7 of 10) while the leave-one-out VQA metric is still exercised."""
    wrong = [a for a in vocab if a != truth]
    answers, n_wrong = [], 0
    for i in range(10):
        a = truth
        if wrong and noise > 0 and n_wrong < 3 and rng.random() < noise:
            a, n_wrong = rng.choice(wrong), n_wrong + 1
        answers.append({"answer": a, "answer_confidence": "yes", "answer_id": i + 1})
    return answers


# --- blind baseline -------------------------------------------------------------------------------------


def _qa_rows(scenes: Iterable[dict]) -> Iterable[dict]:
    for s in scenes:
        yield from s.get("questions", ())


def blind_accuracy(train_scenes: Iterable[dict], test_scenes: Iterable[dict]) -> dict[str, Any]:
    """Accuracy of the best question-only predictor, to show the images are needed.

    Fit on train: for every question string its most frequent answer (falling back to the template's, then
    to the overall most frequent one for strings never seen). Score on test by exact match with the true
    answer. Returns {"overall": acc, "by_family": {family: acc}, "by_template": {...}, "questions": n}
    (accuracies are None without test questions).
    """
    by_q: dict[str, Counter] = defaultdict(Counter)
    by_t: dict[str, Counter] = defaultdict(Counter)
    every: Counter = Counter()
    for r in _qa_rows(train_scenes):
        by_q[r["question"]][r["answer"]] += 1
        by_t[r["template"]][r["answer"]] += 1
        every[r["answer"]] += 1

    def predict(r: dict) -> str | None:
        for table in (by_q.get(r["question"]), by_t.get(r["template"]), every):
            if table:
                return table.most_common(1)[0][0]
        return None

    hits: dict[str, list[int]] = defaultdict(list)
    for r in _qa_rows(test_scenes):
        ok = int(predict(r) == r["answer"])
        for key in ("all", f"family:{r['family']}", f"template:{r['template']}"):
            hits[key].append(ok)

    def acc(key: str) -> float | None:
        return round(sum(hits[key]) / len(hits[key]), 4) if hits.get(key) else None

    return {
        "overall": acc("all"),
        "by_family": {f: acc(f"family:{f}") for f in FAMILIES if hits.get(f"family:{f}")},
        "by_template": {t: acc(f"template:{t}") for t in TEMPLATES if hits.get(f"template:{t}")},
        "questions": len(hits.get("all", [])),
    }


# --- writing a world ------------------------------------------------------------------------------------


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
) -> list[dict[str, Any]]:
    rng = random.Random(f"gpt2mm-synth/{seed}/{split}")  # string seeds hash with SHA-512: stable everywhere
    banned = holdout if split == "train" else []
    held = set(holdout)
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    scenes, questions, annotations, llava = [], [], [], []
    for i in range(n):
        image_id = _ID_OFFSET[split] + i + 1
        scene = make_scene(rng, image_id, split, image_size, min_objects, max_objects, banned)
        scene["holdout"] = any((o["color"], o["shape"]) in held for o in scene["objects"])
        qas = make_questions(scene, rng, questions_per_image, families, banned)
        scene["questions"] = qas
        render(scene).save(img_dir / scene["file_name"], format="PNG")
        turns = [
            {"from": "human", "value": f"<image>\n{DESCRIBE_PROMPT}"},
            {"from": "gpt", "value": describe(scene)},
        ]
        for qa in qas:
            questions.append(
                {"image_id": image_id, "question": qa["question"], "question_id": qa["question_id"]}
            )
            vocab = _answer_vocab(qa["template"], max_objects)
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
        llava.append(
            {"id": f"{image_id:012d}", "image": f"{split}/{scene['file_name']}", "conversations": turns}
        )
        scenes.append(scene)
    # Remove images of an earlier, larger world in this directory (only our own naming pattern).
    keep = {s["file_name"] for s in scenes}
    for p in img_dir.glob(f"COCO_{split}2014_*.png"):
        if p.name not in keep:
            p.unlink()
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
    return scenes


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
) -> dict[str, Any]:
    """Render a world into `out_dir` and return its manifest (also written to `out_dir/world.json`, last,
    so its presence means the world is complete). Same arguments -> byte-identical files: each split
    draws from its own `random.Random` seeded from (seed, split), so split sizes do not affect each other.
    Files of the world's own names are overwritten; nothing else in `out_dir` is touched except stale
    `images/{split}/COCO_{split}2014_*.png` of an earlier world."""
    holdout_list = parse_holdout(holdout)
    families = tuple(families) if families else FAMILIES
    for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not 0 <= v < _QID_FACTOR * 10_000:
            raise UsageError(f"{name} must be in [0, 999999], got {v}")
    if not 24 <= image_size <= 2048:
        raise UsageError(f"image_size must be in [24, 2048] (cells of 8 px at least), got {image_size}")
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise UsageError(
            f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}..{max_objects}"
        )
    if not 1 <= questions_per_image < _QID_FACTOR:
        raise UsageError(f"questions_per_image must be in [1, {_QID_FACTOR - 1}], got {questions_per_image}")
    if not 0.0 <= answer_noise <= 1.0:
        raise UsageError(f"answer_noise must be in [0, 1], got {answer_noise}")
    if bad := [f for f in families if f not in FAMILIES]:
        raise UsageError(f"unknown question families {bad}; choose from {list(FAMILIES)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)  # incomplete until rewritten at the end
    t0 = time.perf_counter()
    scenes: dict[str, list[dict]] = {}
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        scenes[split] = _write_split(
            out, split, n, seed, image_size, holdout_list, questions_per_image, min_objects, max_objects,
            answer_noise, families,
        )  # fmt: skip
    blind = blind_accuracy(scenes["train"], scenes["test"])
    manifest = {
        "generator": "gpt2mm.data.synthetic",
        "format_version": 1,
        "params": {
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
        },
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
                "questions_by_family": dict(sorted(Counter(q["family"] for q in _qa_rows(s)).items())),
            }
            for split, s in scenes.items()
        },
        "blind_accuracy": blind,
    }
    _dump(out / "world.json", manifest, indent=2)
    manifest["seconds"] = round(time.perf_counter() - t0, 2)  # not in the file: it would break byte-identity
    return manifest


def load_scenes(out_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The scene records (with their questions and answers) of a written world's split."""
    return json.loads((Path(out_dir) / "scenes" / f"{split}_scenes.json").read_text(encoding="utf-8"))


# --- scoring descriptions -------------------------------------------------------------------------------

_COLOR_WORDS = {**{c: c for c in COLORS}, "violet": "purple", "aqua": "cyan", "turquoise": "cyan"}
_SIZE_WORDS = {
    "small": "small",
    "little": "small",
    "tiny": "small",
    "large": "large",
    "big": "large",
    "huge": "large",
}
_SHAPE_WORDS = {
    **{s: s for s in SHAPES},
    **{p: s for s, p in PLURALS.items()},
    "plus": "cross",
    "rhombus": "diamond",
}
_GENERIC = {"object", "shape", "thing"}  # plurals ("two green shapes: ...") usually summarise, not mention
_NUM_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine".split())}
_ROW_WORDS = {"top": 0, "upper": 0, "middle": 1, "centre": 1, "center": 1, "bottom": 2, "lower": 2}
_COL_WORDS = {"left": 0, "middle": 1, "centre": 1, "center": 1, "right": 2}
_STOP = {".", ";", "!", "?"}
FACT_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position")


def _parse_position(tokens: list[str], i: int) -> tuple[str | None, int]:
    """A position phrase at tokens[i] ("in/at/on the top left [corner]"): (name, next index) or (None, i)."""
    if i + 1 >= len(tokens) or tokens[i] not in ("in", "at", "on") or tokens[i + 1] != "the":
        return None, i
    words = []
    j = i + 2
    while j < len(tokens) and len(words) < 2 and (tokens[j] in _ROW_WORDS or tokens[j] in _COL_WORDS):
        words.append(tokens[j])
        j += 1
    if not words:
        return None, i
    if j < len(tokens) and tokens[j] == "corner":
        j += 1
    if len(words) == 1:
        w = words[0]
        row, col = (1, _COL_WORDS[w]) if w in ("left", "right") else (_ROW_WORDS[w], 1)
    else:
        a, b = words
        if a in ("left", "right") and b in _ROW_WORDS:  # "left top"
            a, b = b, a
        row, col = _ROW_WORDS.get(a, 1), _COL_WORDS.get(b, 1)
    return position_name(row, col), j


def parse_description(text: str) -> list[dict[str, str]]:
    """The object mentions of a free-text description, each a dict of the attributes it states.

    A mention is a shape noun ("circle", "squares"), or a singular generic noun ("object", "shape", "thing")
    with at least one colour or size word right before it. A position phrase ("in the top left") belongs to
    the mention before it in the same sentence, or to the next one if none came first ("In the centre is a
    red square."). A plural with a number ("two red circles") counts as that many mentions, without position.
    """
    tokens = re.findall(r"[a-z]+|\d+|[.,;!?]", text.lower().replace("-", " "))
    mentions: list[dict[str, str]] = []
    last: dict[str, str] | None = None  # the sentence's latest mention, which a position phrase attaches to
    pending: str | None = None
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in _STOP:
            last, pending = None, None
            i += 1
            continue
        pos, j = _parse_position(tokens, i)
        if pos is not None:
            if last is not None and "position" not in last and last.get("_n", "1") == "1":
                last["position"] = pos
            elif last is None:
                pending = pos
            i = j
            continue
        if tok in _SHAPE_WORDS or tok in _GENERIC:
            attrs: dict[str, str] = {}
            k = i - 1
            while k >= 0 and (tokens[k] in _COLOR_WORDS or tokens[k] in _SIZE_WORDS):
                if tokens[k] in _COLOR_WORDS:
                    attrs.setdefault("color", _COLOR_WORDS[tokens[k]])
                else:
                    attrs.setdefault("size", _SIZE_WORDS[tokens[k]])
                k -= 1
            if tok in _SHAPE_WORDS:
                attrs["shape"] = _SHAPE_WORDS[tok]
            if attrs:
                count = 1
                if k >= 0 and (tokens[k] in _NUM_WORDS or tokens[k].isdigit()):
                    count = _NUM_WORDS.get(tokens[k]) if tokens[k] in _NUM_WORDS else int(tokens[k])
                    count = max(1, min(count, MAX_OBJECTS))
                if count == 1 and pending is not None:
                    attrs["position"] = pending
                    pending = None
                first = dict(attrs)
                mentions.append(first)
                mentions.extend(dict(attrs) for _ in range(count - 1))
                last = first if count == 1 else {"_n": str(count)}
        i += 1
    return mentions


def score_description(text: str, scene: dict[str, Any]) -> dict[str, float]:
    """Precision, recall and F1 of the facts a description states about a scene.

    Facts: one per (object, attribute) pair, attributes being colour, shape, size and position (the cell's
    name). The scene holds 4 facts per object; a description states the attributes it gives for each object
    it mentions (see `parse_description`). Mentions are matched one-to-one to scene objects greedily, best
    agreement first (ties: earlier mention, then earlier object). A stated fact is correct when it equals
    the matched object's attribute; facts of unmatched mentions (hallucinated objects) are all wrong.
    precision = correct / stated, recall = correct / (4 * objects), F1 their harmonic mean (0 when both 0).
    """
    mentions = parse_description(text)
    objs = scene["objects"]
    pairs = []
    for mi, m in enumerate(mentions):
        for oi, o in enumerate(objs):
            agree = sum(o[a] == m[a] for a in FACT_ATTRIBUTES if a in m)
            if agree:
                pairs.append((-agree, mi, oi))
    pairs.sort()
    used_m, used_o, correct = set(), set(), 0
    for neg, mi, oi in pairs:
        if mi not in used_m and oi not in used_o:
            used_m.add(mi)
            used_o.add(oi)
            correct -= neg
    stated = sum(sum(a in m for a in FACT_ATTRIBUTES) for m in mentions)
    true = len(FACT_ATTRIBUTES) * len(objs)
    precision = correct / stated if stated else 0.0
    recall = correct / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "correct": correct,
        "stated": stated,
        "facts": true,
        "mentions": len(mentions),
    }


# --- the command ----------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="directory to write (absent or empty, unless --overwrite)")
    parser.add_argument("--train", type=int, default=8000, help="training images")
    parser.add_argument("--val", type=int, default=500, help="validation images")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files)")
    parser.add_argument(
        "--image-size", type=int, default=48, help="image side in pixels (a 3x3 grid of cells)"
    )
    parser.add_argument("--questions-per-image", type=int, default=5, help="VQA questions per image")
    parser.add_argument("--min-objects", type=int, default=1, help="fewest objects per image")
    parser.add_argument("--max-objects", type=int, default=6, help="most objects per image (at most 9)")
    parser.add_argument(
        "--answer-noise", type=float, default=0.05, help="chance a simulated human answer is wrong"
    )
    parser.add_argument(
        "--holdout-combos",
        default="",
        help="colour:shape combos kept out of train images, e.g. red:circle,blue:square",
    )
    parser.add_argument(
        "--families",
        default="",
        help=f"comma-separated question families (default all: {','.join(FAMILIES)})",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")


def run(args: argparse.Namespace) -> int:
    out: Path = args.out_dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} is not empty; choose another path or pass --overwrite")
    families = [f.strip() for f in args.families.split(",") if f.strip()] or None
    m = write_world(
        out,
        n_train=args.train,
        n_val=args.val,
        n_test=args.test,
        seed=args.seed,
        image_size=args.image_size,
        holdout=args.holdout_combos,
        questions_per_image=args.questions_per_image,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        answer_noise=args.answer_noise,
        families=families,
    )
    counts = ", ".join(
        f"{s} {c['images']} images / {c['questions']} questions" for s, c in m["counts"].items()
    )
    print(f"wrote the synthetic world to {out} in {m['seconds']:.1f}s: {counts}")
    blind = m["blind_accuracy"]
    if blind["overall"] is not None:
        fams = ", ".join(f"{f} {a:.1%}" for f, a in blind["by_family"].items())
        print(f"blind (question-only) accuracy on test: {blind['overall']:.1%} ({fams})")
    if m["params"]["holdout"]:
        held = ", ".join(f"{c} {s}" for c, s in m["params"]["holdout"])
        print(
            f"held out of train: {held}; test images containing them: {m['counts']['test']['images_with_holdout']}"
        )
    return 0
