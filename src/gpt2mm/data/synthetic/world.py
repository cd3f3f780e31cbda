"""The shapes world's vocabulary, its scene records and their rendering: the ground truth everything else reads.

Colours are saturated and far apart, objects sit one per cell of a 3x3 grid (one cell per 16 px patch of the
`tiny` preset's 48 px images) and shapes are drawn without anti-aliasing, so a pixel's colour names its
object exactly and a scene record is all a question, answer or description needs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from PIL import Image, ImageDraw

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


def article(word: str) -> str:
    """The indefinite article before `word` ("an orange", "a red")."""
    return "an" if word[0] in "aeiou" else "a"
