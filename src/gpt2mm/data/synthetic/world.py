"""The shapes world's vocabulary, its scene records and their rendering: the ground truth everything else reads.

Colours are saturated and far apart and shapes are drawn without anti-aliasing, so a scene record is all a
question, answer or description needs. Two layouts:

- "grid": objects sit one per cell of a 3x3 grid (one cell per 16 px patch of the `tiny` preset's 48 px
  images) on a flat background, so a pixel's colour names its object exactly;
- "free": objects of two size ranges anywhere (continuous centres), polygons turned by a small angle
  (diamonds taller than wide, so a turned square never passes for one), overlapping a little, on a dark
  textured background with per-pixel noise, so a model must learn to see rather than read cells. Every
  object stays mostly visible and objects of one colour never touch, so counts and attributes stay
  readable. Positions are the 3x3 regions holding the centres; `clearly_in_region`, `near_region` and
  `relation_holds` say when a position or relation is clear enough from the pixels to be asked about.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
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

LAYOUTS: tuple[str, ...] = ("grid", "free")

# The free layout's knobs. Extent (the unrotated shape's side or diameter) / image side: two ranges far apart,
# so "small" and "large" stay clear whatever the shape and angle (9-12 px and 17-22 px at 48 px).
FREE_SIZE_RANGE: dict[str, tuple[float, float]] = {"small": (0.19, 0.25), "large": (0.35, 0.46)}
MAX_ANGLE = 15  # degrees either way for polygons
DIAMOND_WIDTH = 0.7  # a free-layout diamond's width / height: a turned square never passes for one
MAX_HIDDEN = 0.25  # most of an object's pixels that others may cover, whichever is drawn on top
REGION_MARGIN = 0.1  # a centre this far (x image side) from the region borders is clearly in its region
RELATION_MARGIN = 0.125  # centres this far apart (x image side) are clearly left/right of or above/below
NOISE = 8  # per-pixel noise: up to this many levels either way on every channel
PATTERNS: tuple[str, ...] = ("plain", "stripes", "checks")  # low-contrast background textures

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
    layout: str = "grid",
) -> dict[str, Any]:
    """A random scene record: min..max objects (1..6 by default), none of the `holdout` colour-shape combos.

    "grid": one object per cell, centred in it. "free": objects anywhere, of varied size and angle, on a
    textured background (the record gains "layout", "background" and per-object "x", "y", "extent", "angle").
    The record is plain JSON and is the ground truth every question, answer and description derives from.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {list(LAYOUTS)}")
    banned = set(holdout)
    n = rng.randint(min_objects, max_objects)
    scene: dict[str, Any] = {
        "image_id": image_id,
        "file_name": f"COCO_{split}2014_{image_id:012d}.png",
        "split": split,
        "width": image_size,
        "height": image_size,
    }
    if layout == "grid":
        scene["objects"] = _grid_objects(rng, n, banned, image_size)
    else:
        scene["layout"] = layout
        scene["background"] = _background(rng)
        scene["objects"] = _free_objects(rng, n, banned, image_size)
    return scene


def _pick_kind(rng: random.Random, banned: set[tuple[str, str]]) -> tuple[str, str]:
    """A random (colour, shape) that is not held out."""
    while True:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if (color, shape) not in banned:
            return color, shape


def _grid_objects(rng: random.Random, n: int, banned: set, image_size: int) -> list[dict[str, Any]]:
    """`n` objects in distinct cells, in reading order (descriptions list objects this way)."""
    cells = sorted(rng.sample(range(MAX_OBJECTS), n))
    objects = []
    for cell in cells:
        color, shape = _pick_kind(rng, banned)
        size = rng.choice(SIZES)
        row, col = divmod(cell, GRID)
        objects.append(_record(shape, color, size, row, col, bbox=_object_box(row, col, size, image_size)))
    return objects


def _record(shape: str, color: str, size: str, row: int, col: int, **more: Any) -> dict[str, Any]:
    """An object record: what it is, the 3x3 cell or region it is in (with its name), then `more` fields."""
    return {
        "shape": shape,
        "color": color,
        "size": size,
        "row": row,
        "col": col,
        "position": position_name(row, col),
        **more,
    }


# --- the free layout ------------------------------------------------------------------------------------

_PLACE_TRIES = 100  # random placements tried per object before the scene starts over
_SCENE_TRIES = 200


def region_of(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """(row, col) of the 3x3 region holding the point (x, y)."""
    return min(GRID - 1, int(y * GRID / height)), min(GRID - 1, int(x * GRID / width))


def _free_objects(rng: random.Random, n: int, banned: set, image_size: int) -> list[dict[str, Any]]:
    """`n` objects placed one by one at random (each kept clearly visible, see `_fits`), in reading order:
    by region, then top to bottom, left to right."""
    for _ in range(_SCENE_TRIES):
        objects: list[dict[str, Any]] = []
        masks: list[np.ndarray] = []
        for _ in range(n):
            color, shape = _pick_kind(rng, banned)
            placed = _place(rng, color, shape, rng.choice(SIZES), image_size, objects, masks)
            if placed is None:
                break  # crowded: start the scene over
            objects.append(placed[0])
            masks.append(placed[1])
        else:
            return sorted(objects, key=lambda o: (o["row"], o["col"], o["y"], o["x"]))
    raise RuntimeError(f"could not place {n} objects in a {image_size} px image")


def _place(
    rng: random.Random,
    color: str,
    shape: str,
    size: str,
    image_size: int,
    objects: list[dict],
    masks: list[np.ndarray],
) -> tuple[dict[str, Any], np.ndarray] | None:
    """A random extent, angle and centre (the whole shape inside the image) that `_fits` among `objects`,
    with its pixel mask; None after `_PLACE_TRIES` misses."""
    lo, hi = (max(3, round(f * image_size)) for f in FREE_SIZE_RANGE[size])
    cover = np.sum(masks, axis=0) if masks else np.zeros((image_size, image_size), dtype=int)
    for _ in range(_PLACE_TRIES):
        extent = rng.randint(lo, hi)
        angle = 0 if shape == "circle" else rng.randint(-MAX_ANGLE, MAX_ANGLE)
        wx, wy = _half_spans(shape, extent, angle)
        x = round(rng.uniform(wx, image_size - wx), 1)
        y = round(rng.uniform(wy, image_size - wy), 1)
        obj = _free_object(shape, color, size, x, y, extent, angle, image_size)
        if cover[_centre_pixel(obj, image_size, image_size)]:
            continue  # its centre would be hidden (checked before drawing: the commonest miss)
        mask = object_mask(obj, image_size, image_size)
        if _fits(obj, mask, objects, masks, cover):
            ys, xs = np.nonzero(mask)
            obj["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            return obj, mask
    return None


def _free_object(
    shape: str, color: str, size: str, x: float, y: float, extent: int, angle: int, image_size: int
) -> dict[str, Any]:
    """A free-layout object record (without its bbox): the grid's fields, "row", "col" and "position" naming
    the region that holds its centre, then the centre, extent and angle the rendering draws from."""
    row, col = region_of(x, y, image_size, image_size)
    return _record(shape, color, size, row, col, x=x, y=y, extent=extent, angle=angle)


def _corners(shape: str, h: float) -> list[tuple[float, float]]:
    """The outline's extreme points of an unrotated polygon of half-extent `h`, centred on (0, 0)."""
    t = h / 3  # half the cross's arm thickness (a third of its extent, as on the grid)
    return {
        "square": [(-h, -h), (h, -h), (h, h), (-h, h)],
        "triangle": [(0, -h), (h, h), (-h, h)],
        "diamond": [(0, -h), (DIAMOND_WIDTH * h, 0), (0, h), (-DIAMOND_WIDTH * h, 0)],
        "cross": [(-h, -t), (-h, t), (h, -t), (h, t), (-t, -h), (t, -h), (-t, h), (t, h)],
    }[shape]


def _half_spans(shape: str, extent: int, angle: float) -> tuple[float, float]:
    """Half the width and height of a shape turned by `angle` degrees."""
    h = extent / 2
    if shape == "circle":
        return h, h
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    pts = [(u * c - v * s, u * s + v * c) for u, v in _corners(shape, h)]
    return max(abs(px) for px, _ in pts), max(abs(py) for _, py in pts)


@functools.lru_cache(maxsize=8)
def _pixel_centres(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y of every pixel's centre (height x width each; read-only, shared)."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    xs.flags.writeable = ys.flags.writeable = False
    return xs, ys


def object_mask(obj: dict[str, Any], width: int, height: int) -> np.ndarray:
    """The pixels (height x width booleans) a free-layout object covers when drawn alone: those whose centre
    lies inside the shape turned by obj["angle"] degrees (clockwise on screen) about (obj["x"], obj["y"])."""
    xs, ys = _pixel_centres(width, height)
    dx, dy = xs - obj["x"], ys - obj["y"]
    c, s = math.cos(math.radians(obj["angle"])), math.sin(math.radians(obj["angle"]))
    u, v = dx * c + dy * s, dy * c - dx * s  # back into the shape's own frame
    h = obj["extent"] / 2
    au, av = np.abs(u), np.abs(v)
    shape = obj["shape"]
    if shape == "circle":
        return u * u + v * v <= h * h
    if shape == "square":
        return (au <= h) & (av <= h)
    if shape == "triangle":  # apex up, base down, as on the grid
        return (v <= h) & (au <= (v + h) / 2)
    if shape == "diamond":
        return au / DIAMOND_WIDTH + av <= h
    if shape == "cross":
        return ((au <= h) & (av <= h / 3)) | ((au <= h / 3) & (av <= h))
    raise ValueError(f"unknown shape {shape!r}")


def _centre_pixel(obj: dict[str, Any], width: int, height: int) -> tuple[int, int]:
    """(row, column) index of the pixel holding an object's centre."""
    return min(height - 1, int(obj["y"])), min(width - 1, int(obj["x"]))


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask and its 8 neighbours of every pixel."""
    g = mask.copy()
    g[1:] |= mask[:-1]
    g[:-1] |= mask[1:]
    out = g.copy()
    out[:, 1:] |= g[:, :-1]
    out[:, :-1] |= g[:, 1:]
    return out


def _fits(
    obj: dict[str, Any], mask: np.ndarray, objects: list[dict], masks: list[np.ndarray], cover: np.ndarray
) -> bool:
    """Whether a new object keeps every object clearly visible and countable: whichever is drawn on top, at
    most MAX_HIDDEN of any object's pixels lie under the others and none lies over another's centre pixel;
    objects of one colour never touch (they would merge into one blob). `cover`: how many of `objects`
    cover each pixel."""
    h, w = mask.shape
    if not objects:
        return True
    if cover[_centre_pixel(obj, w, h)] or any(mask[_centre_pixel(o, w, h)] for o in objects):
        return False
    cover = cover + mask
    for m in [*masks, mask]:
        if (m & (cover - m > 0)).sum() > MAX_HIDDEN * m.sum():
            return False
    grown = _grow(mask)
    return not any(o["color"] == obj["color"] and (grown & m).any() for o, m in zip(objects, masks))


def _background(rng: random.Random) -> dict[str, Any]:
    """A random dark, muted background: a tint, a linear gradient, a low-contrast pattern and the seed of the
    per-pixel noise. Its channels stay under about 95 and close together, far from every object colour."""
    level = rng.randint(15, 50)
    return {
        "tint": [level + rng.randint(-12, 12) for _ in range(3)],
        "gradient": [rng.randint(-30, 30), rng.randint(-30, 30)],  # levels gained across the image, x and y
        "pattern": rng.choice(PATTERNS),
        "cycles": rng.randint(3, 8),  # pattern periods across the image
        "pattern_angle": rng.randint(0, 179),  # direction of the stripes, degrees
        "contrast": rng.randint(3, 8),  # pattern amplitude, levels either way
        "noise_seed": rng.getrandbits(32),
    }


def _background_pixels(bg: dict[str, Any], width: int, height: int) -> np.ndarray:
    """The background's (height, width, 3) float levels before noise."""
    xs, ys = _pixel_centres(width, height)
    fx, fy = xs / width, ys / height
    level = bg["gradient"][0] * (fx - 0.5) + bg["gradient"][1] * (fy - 0.5)
    if bg["pattern"] == "stripes":
        a = math.radians(bg["pattern_angle"])
        phase = bg["cycles"] * (fx * math.cos(a) + fy * math.sin(a))
        level = level + bg["contrast"] * np.sin(2 * math.pi * phase)
    elif bg["pattern"] == "checks":
        checks = (np.floor(fx * bg["cycles"]) + np.floor(fy * bg["cycles"])) % 2
        level = level + bg["contrast"] * (2 * checks - 1)
    return np.asarray(bg["tint"], dtype=float) + level[..., None]


def _render_free(scene: dict[str, Any]) -> Image.Image:
    """Background, then each object's flat colour in record order, then the per-pixel noise (seeded by the
    record, so a record always renders to the same pixels)."""
    w, h = scene["width"], scene["height"]
    px = _background_pixels(scene["background"], w, h)
    for obj in scene["objects"]:
        px[object_mask(obj, w, h)] = COLORS[obj["color"]]
    noise = random.Random(scene["background"]["noise_seed"]).randbytes(h * w * 3)
    px += np.frombuffer(noise, dtype=np.uint8).reshape(h, w, 3).astype(int) % (2 * NOISE + 1) - NOISE
    return Image.fromarray(np.clip(np.rint(px), 0, 255).astype(np.uint8), "RGB")


# --- regions and relations (what may be asked) ------------------------------------------------------------


def _axis_clear(v: float, side: int) -> bool:
    """Whether a coordinate is at least REGION_MARGIN x side away from both inner region borders."""
    return all(abs(v - k * side / GRID) >= REGION_MARGIN * side for k in range(1, GRID))


def clearly_in_region(obj: dict[str, Any], scene: dict[str, Any]) -> bool:
    """Whether an object's position (its region) is clear from the pixels: always on the grid; in the free
    layout when its centre is REGION_MARGIN of the image side or more from the inner region borders."""
    if scene.get("layout", "grid") == "grid":
        return True
    return _axis_clear(obj["x"], scene["width"]) and _axis_clear(obj["y"], scene["height"])


def near_region(obj: dict[str, Any], row: int, col: int, scene: dict[str, Any]) -> bool:
    """Whether an object could be taken for one in region (row, col): in that cell on the grid; in the free
    layout when its centre is in the region grown by REGION_MARGIN of the image side across inner borders."""
    if scene.get("layout", "grid") == "grid":
        return (obj["row"], obj["col"]) == (row, col)

    def near(v: float, index: int, side: int) -> bool:
        m = REGION_MARGIN * side
        lo = index * side / GRID - (m if index > 0 else 0)
        hi = (index + 1) * side / GRID + (m if index < GRID - 1 else 0)
        return lo <= v < hi or (index == GRID - 1 and v == side)

    return near(obj["x"], col, scene["width"]) and near(obj["y"], row, scene["height"])


def relation_holds(a: dict[str, Any], relation: str, b: dict[str, Any], scene: dict[str, Any]) -> bool | None:
    """Whether `a` is `relation` `b` ("to the left of" compares columns or x only, "above" rows or y only,
    anywhere in the image). Grid: by cells, never in doubt. Free: by centres, None (not clear from the pixels,
    so not asked) when they are closer than RELATION_MARGIN of the image side along that axis."""
    horizontal = relation in ("to the left of", "to the right of")
    if scene.get("layout", "grid") == "grid":
        d = (a["col"] - b["col"]) if horizontal else (a["row"] - b["row"])
    else:
        d = (a["x"] - b["x"]) if horizontal else (a["y"] - b["y"])
        if abs(d) < RELATION_MARGIN * (scene["width"] if horizontal else scene["height"]):
            return None
    return d < 0 if relation in ("to the left of", "above") else d > 0


def render(scene: dict[str, Any]) -> Image.Image:
    """Draw a scene record without anti-aliasing. Grid: flat background and flat-coloured shapes (exact pixel
    colours); free: see `_render_free`."""
    if scene.get("layout", "grid") == "free":
        return _render_free(scene)
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
