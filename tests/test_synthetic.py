"""The synthetic shapes world: determinism, formats, ground truth re-derived from the pixels, balance, hold-out,
description scoring and the `gpt2mm synth` command."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpt2mm.cli import main
from gpt2mm.data import synthetic as syn
from gpt2mm.errors import UsageError

# Written independently of the module: cell names by (row, col) and the relation test.
ROW_NAMES = ["top", "middle", "bottom"]
COL_NAMES = ["left", "centre", "right"]


def cell_name(r: int, c: int) -> str:
    if (r, c) == (1, 1):
        return "centre"
    return f"{ROW_NAMES[r]} {COL_NAMES[c]}"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    syn.write_world(out, n_train=40, n_val=10, n_test=30, seed=7, answer_noise=0.3)
    return out


def read(path: Path):
    return json.loads(path.read_text())


def objects_from_pixels(path: Path, scene: dict) -> list[dict]:
    """Scan each grid cell of the PNG: the one non-background colour there, its pixel count and fill ratio."""
    px = np.asarray(Image.open(path).convert("RGB")).astype(int)
    h, w, _ = px.shape
    assert (w, h) == (scene["width"], scene["height"])
    by_rgb = {rgb: name for name, rgb in syn.COLORS.items()}
    found = []
    for r in range(3):
        for c in range(3):
            cell = px[round(r * h / 3) : round((r + 1) * h / 3), round(c * w / 3) : round((c + 1) * w / 3)]
            fg = cell[(cell != syn.BACKGROUND).any(axis=-1)]
            if len(fg) == 0:
                continue
            colors = {tuple(int(v) for v in p) for p in fg}
            assert len(colors) == 1, f"cell {r},{c} of {path.name} mixes colours {colors}"
            ys, xs = np.nonzero((cell != syn.BACKGROUND).any(axis=-1))
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            found.append(
                {"row": r, "col": c, "color": by_rgb[colors.pop()], "pixels": len(fg), "fill": len(fg) / box}
            )
    return found


def check_scene_pixels(path: Path, scene: dict) -> list[dict]:
    """The rendering matches the record; returns the objects with colour and position taken from the pixels."""
    seen = objects_from_pixels(path, scene)
    objs = scene["objects"]
    assert [(o["row"], o["col"]) for o in seen] == [(o["row"], o["col"]) for o in objs]
    out = []
    for p, o in zip(seen, objs):
        assert p["color"] == o["color"]
        assert (p["fill"] > 0.99) == (o["shape"] == "square"), (o, p)
        out.append(
            {**o, "color": p["color"], "position": cell_name(p["row"], p["col"]), "pixels": p["pixels"]}
        )
    small = [o["pixels"] for o in out if o["size"] == "small"]
    large = [o["pixels"] for o in out if o["size"] == "large"]
    if small and large:
        assert max(small) < min(large)
    return out


SINGULAR = {
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "crosses": "cross",
    "diamonds": "diamond",
}


def select(objs: list[dict], ref: str) -> list[dict]:
    *adjs, noun = ref.split()
    keep = [o for o in objs if noun == "object" or o["shape"] == noun]
    for a in adjs:
        keep = [o for o in keep if a in (o["size"], o["color"])]
    return keep


def the(objs: list[dict], ref: str) -> dict:
    hits = select(objs, ref)
    assert len(hits) == 1, f"'{ref}' is ambiguous or absent"
    return hits[0]


def relation(a: dict, rel: str, b: dict) -> bool:
    dr, dc = a["row"] - b["row"], a["col"] - b["col"]
    return {"to the left of": dc < 0, "to the right of": dc > 0, "above": dr < 0, "below": dr > 0}[rel]


def answer(question: str, objs: list[dict]) -> str:
    """Re-derive an answer from the question text alone and the pixel-checked objects."""
    rel = "(to the left of|to the right of|above|below)"
    if m := re.fullmatch(r"What (color|shape) is the object in the (.+)\?", question):
        (o,) = [o for o in objs if o["position"] == m[2]]
        return o[m[1]]
    if m := re.fullmatch(rf"What color is the object {rel} the (.+)\?", question):
        b = the(objs, m[2])
        (a,) = [a for a in objs if a is not b and relation(a, m[1], b)]
        return a["color"]
    if m := re.fullmatch(r"What color is the (.+)\?", question):
        return the(objs, m[1])["color"]
    if m := re.fullmatch(r"What shape is the (.+)\?", question):
        return the(objs, m[1])["shape"]
    if question == "How many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return str(sum(o["color"] == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(sum(o["shape"] == SINGULAR[m[1]] for o in objs))
    if m := re.fullmatch(r"Is there an? (\w+ \w+)\?", question):
        return "yes" if select(objs, m[1]) else "no"
    if m := re.fullmatch(r"Where is the (.+)\?", question):
        return the(objs, m[1])["position"]
    if m := re.fullmatch(rf"Is the (.+) {rel} the (.+)\?", question):
        return "yes" if relation(the(objs, m[1]), m[2], the(objs, m[3])) else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_match_scene_and_pixels(world):
    checked = Counter()
    for split in ("train", "val", "test"):
        for scene in syn.load_scenes(world, split):
            png = world / "images" / split / f"COCO_{split}2014_{scene['image_id']:012d}.png"
            objs = check_scene_pixels(png, scene)
            assert 1 <= len(objs) <= 6
            for qa in scene["questions"]:
                assert answer(qa["question"], objs) == qa["answer"], qa
                checked[qa["family"]] += 1
    assert set(checked) == set(syn.FAMILIES)


def test_official_vqa_format(world):
    for split in ("train", "val", "test"):
        qs = read(world / f"{split}_questions.json")
        an = read(world / f"{split}_annotations.json")
        assert {"info", "task_type", "data_type", "data_subtype", "license", "questions"} <= set(qs)
        assert qs["task_type"] == "Open-Ended" and qs["data_subtype"] == split
        assert {"info", "license", "data_subtype", "annotations"} <= set(an)
        truth = {q["question_id"]: q["answer"] for s in syn.load_scenes(world, split) for q in s["questions"]}
        assert [q["question_id"] for q in qs["questions"]] == [a["question_id"] for a in an["annotations"]]
        assert len(truth) == len(qs["questions"]) == 5 * {"train": 40, "val": 10, "test": 30}[split]
        for q, a in zip(qs["questions"], an["annotations"]):
            assert set(q) == {"image_id", "question", "question_id"} and q["image_id"] == a["image_id"]
            assert a["answer_type"] in ("yes/no", "number", "other") and a["question_type"]
            assert a["multiple_choice_answer"] == truth[q["question_id"]]
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert all(x["answer_confidence"] == "yes" for x in a["answers"])
            votes = Counter(x["answer"] for x in a["answers"])
            assert votes.most_common(1)[0][0] == a["multiple_choice_answer"]
            assert votes[a["multiple_choice_answer"]] >= 4
            if a["answer_type"] == "number":
                assert a["multiple_choice_answer"].isdigit()
    noisy = [
        a
        for a in read(world / "train_annotations.json")["annotations"]
        if len({x["answer"] for x in a["answers"]}) > 1
    ]
    assert noisy, "answer_noise=0.3 should give some disagreeing human answers"


def test_llava_format(world):
    conv = read(world / "test_llava.json")
    scenes = {s["image_id"]: s for s in syn.load_scenes(world, "test")}
    assert len(conv) == 30
    for rec in conv:
        assert (world / "images" / rec["image"]).is_file()
        turns = rec["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"] == "<image>\nDescribe the image in detail."
        scene = scenes[int(rec["id"])]
        assert syn.score_description(turns[1]["value"], scene)["f1"] == 1.0
        assert [t["value"] for t in turns[3::2]] == [q["answer"] for q in scene["questions"]]
    manifest = read(world / "world.json")
    assert manifest["counts"]["test"]["images"] == 30 and "blind_accuracy" in manifest


def test_deterministic_by_seed(tmp_path):
    def files(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    args = dict(n_train=12, n_val=3, n_test=5, image_size=48)
    syn.write_world(tmp_path / "a", seed=1, **args)
    syn.write_world(tmp_path / "b", seed=1, **args)
    syn.write_world(tmp_path / "c", seed=2, **args)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a["train_questions.json"] != c["train_questions.json"]
    assert "images/val/COCO_val2014_000001000001.png" in a


def test_blind_accuracy_is_low():
    def scenes(split: str, n: int) -> list[dict]:
        rng = random.Random(f"blind/{split}")
        out = []
        for i in range(n):
            s = syn.make_scene(rng, i + 1, split)
            s["questions"] = syn.make_questions(s, rng, 5)
            out.append(s)
        return out

    blind = syn.blind_accuracy(scenes("train", 3000), scenes("test", 400))
    assert blind["questions"] == 2000
    assert blind["overall"] < 0.4, blind
    for family, acc in blind["by_family"].items():
        assert acc < (0.6 if family in ("exist",) else 0.45), blind


def test_holdout_combos_absent_from_train(tmp_path):
    held = [("red", "circle"), ("blue", "square")]
    syn.write_world(tmp_path, n_train=150, n_val=0, n_test=150, seed=3, holdout=held)
    combos = {
        s: Counter((o["color"], o["shape"]) for sc in syn.load_scenes(tmp_path, s) for o in sc["objects"])
        for s in ("train", "test")
    }
    assert not set(held) & set(combos["train"])
    assert all(combos["test"][c] > 0 for c in held)
    train_qs = [q["question"] for q in read(tmp_path / "train_questions.json")["questions"]]
    assert not [q for q in train_qs if "red circle" in q or "blue square" in q]
    assert read(tmp_path / "world.json")["params"]["holdout"] == [list(c) for c in held]


def test_score_description():
    rng = random.Random(0)
    scene = syn.make_scene(rng, 1, min_objects=3, max_objects=3)
    text = syn.describe(scene)
    assert syn.score_description(text, scene) == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "f1": 1.0, "correct": 12, "stated": 12, "facts": 12, "mentions": 3}
    )
    o = scene["objects"][0]
    other = next(c for c in syn.COLORS if c != o["color"])
    wrong = text.replace(f"{o['size']} {o['color']} {o['shape']}", f"{o['size']} {other} {o['shape']}", 1)
    s = syn.score_description(wrong, scene)
    assert s["precision"] < 1.0 and s["f1"] < 1.0
    missing = text.rsplit(" A", 1)[0]  # drop the last object's sentence
    s = syn.score_description(missing, scene)
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(8 / 12)
    s = syn.score_description(text + " A large white cross is in the centre.", scene)
    assert s["recall"] == 1.0 and s["precision"] < 1.0
    # free wording: synonyms, position before the noun, hyphens, a summary plural that is not a mention
    o0, o1 = scene["objects"][:2]
    free = (
        f"In the {o0['position'].replace(' ', '-')} corner there is a {o0['size']} {o0['color']} {o0['shape']}; "
        f"two shapes, one being a {'big' if o1['size'] == 'large' else 'little'} {o1['color']} {o1['shape']} "
        f"at the {o1['position']}."
    )
    s = syn.score_description(free, scene)
    assert s["precision"] == 1.0 and s["correct"] == 8
    assert syn.score_description("Nothing to see.", scene)["f1"] == 0.0


def test_bigger_images_render_on_the_grid():
    scene = syn.make_scene(random.Random(5), 1, image_size=224, min_objects=6, max_objects=6)
    img = syn.render(scene)
    assert img.size == (224, 224) and img.mode == "RGB"
    px = np.asarray(img)
    for o in scene["objects"]:
        x0, y0, x1, y1 = o["bbox"]
        assert x0 >= round(o["col"] * 224 / 3) and x1 <= round((o["col"] + 1) * 224 / 3)
        assert tuple(px[(y0 + y1) // 2, (x0 + x1) // 2]) == syn.COLORS[o["color"]]


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "synth"
    args = [
        "synth",
        str(out),
        "--train",
        "20",
        "--val",
        "4",
        "--test",
        "6",
        "--seed",
        "5",
        "--questions-per-image",
        "3",
    ]
    assert main([*args, "--holdout-combos", "red:circle,blue:square", "--image-size", "60"]) == 0
    printed = capsys.readouterr().out
    assert "train 20 images / 60 questions" in printed and "blind" in printed
    manifest = read(out / "world.json")
    assert manifest["params"]["image_size"] == 60 and manifest["params"]["holdout"] == [
        ["red", "circle"],
        ["blue", "square"],
    ]
    assert len(list((out / "images" / "train").glob("COCO_train2014_*.png"))) == 20
    assert Image.open(next((out / "images" / "test").iterdir())).size == (60, 60)

    # a second run into the same (now non-empty) directory is refused without --overwrite
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    # --overwrite rewrites the world (fewer images: stale ones go) but leaves other files alone
    (out / "notes.txt").write_text("mine")
    assert main([*args[:3], "8", *args[4:], "--overwrite"]) == 0
    assert len(list((out / "images" / "train").iterdir())) == 8
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_refuses_user_data_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(SystemExit) as e:
        main(["synth", str(out), "--train", "2", "--val", "0", "--test", "0"])
    assert e.value.code == 2 and "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    for bad in (
        ["--holdout-combos", "red:hexagon"],
        ["--image-size", "10"],
        ["--max-objects", "12"],
        ["--families", "colour"],
    ):
        with pytest.raises(SystemExit) as e:
            main(["synth", str(tmp_path / "new"), "--train", "2", *bad])
        assert e.value.code == 2
    with pytest.raises(UsageError):
        syn.parse_holdout("red")


# --- the free layout ------------------------------------------------------------------------------------
# Written independently of the module: regions by centre, the margin rules, pixel colours with noise.


@pytest.fixture(scope="module")
def free_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("free")
    syn.write_world(out, n_train=40, n_val=10, n_test=30, seed=7, layout="free")
    return out


def free_scenes(world: Path):
    for split in ("train", "val", "test"):
        for scene in syn.load_scenes(world, split):
            yield world / "images" / split / scene["file_name"], scene


def color_masks(img: Image.Image) -> dict[str, np.ndarray]:
    """Per colour, the pixels within the noise of it (every channel within NOISE levels)."""
    px = np.asarray(img.convert("RGB")).astype(int)
    return {name: (np.abs(px - rgb) <= syn.NOISE).all(axis=-1) for name, rgb in syn.COLORS.items()}


def alone(scene: dict, obj: dict) -> np.ndarray:
    """The pixels of the object's colour when it is rendered alone on the scene's background."""
    return color_masks(syn.render({**scene, "objects": [obj]}))[obj["color"]]


# Pixels a shape of extent e covers, / e^2 (diamonds 0.7 times as wide as tall, cross arms a third thick).
SHAPE_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.35, "cross": 5 / 9}


def test_free_scene_record_agrees_with_its_pixels(free_world):
    sizes = {"small": [], "large": []}
    for png, scene in free_scenes(free_world):
        img = Image.open(png)
        w, h = img.size
        assert (w, h) == (scene["width"], scene["height"]) == (48, 48) and scene["layout"] == "free"
        seen = color_masks(img)
        covered = np.zeros((h, w), bool)
        objs = scene["objects"]
        for o in objs:
            row, col = int(3 * o["y"] / h), int(3 * o["x"] / w)
            assert (o["row"], o["col"], o["position"]) == (row, col, cell_name(row, col))
            assert o["angle"] == 0 if o["shape"] == "circle" else abs(o["angle"]) <= 15
            mine = alone(scene, o)
            ys, xs = np.nonzero(mine)
            assert o["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # inside the image, tight
            area = SHAPE_AREA[o["shape"]] * o["extent"] ** 2
            assert 0.7 * area <= mine.sum() <= 1.3 * area + 4, o
            visible = seen[o["color"]] & mine
            assert visible.sum() >= 0.75 * mine.sum(), f"{o} of {png.name} is mostly hidden"
            assert visible[int(o["y"]), int(o["x"])], f"the centre of {o} in {png.name} is hidden"
            covered |= mine
            sizes[o["size"]].append(o["extent"])
        for a in objs:  # objects of one colour never touch: they stay countable
            for b in objs:
                if a is not b and a["color"] == b["color"]:
                    ma, mb = alone(scene, a), np.pad(alone(scene, b), 1)
                    near = [
                        mb[1 + dy : h + 1 + dy, 1 + dx : w + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                    ]
                    assert not (ma & np.any(near, axis=0)).any(), (a, b, png.name)
        background = np.asarray(img.convert("RGB")).astype(int)[~covered]
        assert not any(m[~covered].any() for m in seen.values())  # never mistaken for an object colour
        assert background.max() <= 110 and (background.max(-1) - background.min(-1)).max() <= 60
    assert max(sizes["small"]) < min(sizes["large"]) and min(sizes["small"]) >= 8
    assert max(sizes["large"]) <= 22


def clear_region(v: float, side: int) -> bool:
    return abs(v - side / 3) >= 0.1 * side and abs(v - 2 * side / 3) >= 0.1 * side


def maybe_in(o: dict, name: str, side: int) -> bool:
    """Whether o's centre is in the named region or within 10% of the image side outside its inner borders."""
    (r, c) = next((r, c) for r in range(3) for c in range(3) if cell_name(r, c) == name)
    m = 0.1 * side
    return all(
        k * side / 3 - (m if k else 0) <= v <= (k + 1) * side / 3 + (m if k < 2 else 0)
        for k, v in ((c, o["x"]), (r, o["y"]))
    )


def free_relation(a: dict, rel: str, b: dict, side: int) -> bool | None:
    """By centres; None when the centres are within 1/8 of the image side along the axis (not asked)."""
    d = a["x"] - b["x"] if rel in ("to the left of", "to the right of") else a["y"] - b["y"]
    if abs(d) < side / 8:
        return None
    return d < 0 if rel in ("to the left of", "above") else d > 0


def free_answer(question: str, objs: list[dict], side: int) -> str:
    """Re-derive an answer from the record, asserting the free layout's rules for positions and relations."""
    rel = "(to the left of|to the right of|above|below)"
    if m := re.fullmatch(r"What (color|shape) is the object in the (.+)\?", question):
        (o,) = [o for o in objs if maybe_in(o, m[2], side)]
        assert clear_region(o["x"], side) and clear_region(o["y"], side)
        return o[m[1]]
    if m := re.fullmatch(rf"What color is the object {rel} the (.+)\?", question):
        b = the(objs, m[2])
        holds = [(a, free_relation(a, m[1], b, side)) for a in objs if a is not b]
        assert all(h is not None for _, h in holds), f"'{question}' has an unclear candidate"
        (a,) = [a for a, h in holds if h]
        return a["color"]
    if m := re.fullmatch(r"Where is the (.+)\?", question):
        o = the(objs, m[1])
        assert clear_region(o["x"], side) and clear_region(o["y"], side)
        return cell_name(int(3 * o["y"] / side), int(3 * o["x"] / side))
    if m := re.fullmatch(rf"Is the (.+) {rel} the (.+)\?", question):
        holds = free_relation(the(objs, m[1]), m[2], the(objs, m[3]), side)
        assert holds is not None, f"'{question}' is unclear"
        return "yes" if holds else "no"
    return answer(question, objs)


def test_free_answers_follow_the_record_and_the_margin_rules(free_world):
    checked = Counter()
    for _, scene in free_scenes(free_world):
        assert 1 <= len(scene["objects"]) <= 6
        for qa in scene["questions"]:
            assert free_answer(qa["question"], scene["objects"], scene["width"]) == qa["answer"], qa
            checked[qa["template"]] += 1
    assert set(checked) == set(syn.TEMPLATES), checked


def test_free_descriptions_and_conversations(free_world):
    conv = read(free_world / "test_llava.json")
    scenes = {s["image_id"]: s for s in syn.load_scenes(free_world, "test")}
    for rec in conv:
        scene = scenes[int(rec["id"])]
        turns = rec["conversations"]
        assert syn.score_description(turns[1]["value"], scene)["f1"] == 1.0
        assert [t["value"] for t in turns[3::2]] == [q["answer"] for q in scene["questions"]]
    manifest = read(free_world / "world.json")
    assert manifest["params"]["layout"] == "free" and manifest["blind_accuracy"]["overall"] is not None


def test_free_blind_accuracy_is_low():
    def scenes(split: str, n: int) -> list[dict]:
        rng = random.Random(f"blind/{split}")
        out = []
        for i in range(n):
            s = syn.make_scene(rng, i + 1, split, layout="free")
            s["questions"] = syn.make_questions(s, rng, 5)
            out.append(s)
        return out

    blind = syn.blind_accuracy(scenes("train", 1500), scenes("test", 300))
    assert blind["questions"] == 1500
    assert blind["overall"] < 0.4, blind
    for family, acc in blind["by_family"].items():
        assert acc < (0.6 if family in ("exist",) else 0.45), blind


def test_free_layout_is_deterministic_and_grid_is_the_default(tmp_path):
    def files(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    args = dict(n_train=8, n_val=2, n_test=4)
    syn.write_world(tmp_path / "a", seed=1, layout="free", **args)
    syn.write_world(tmp_path / "b", seed=1, layout="free", **args)
    syn.write_world(tmp_path / "c", seed=2, layout="free", **args)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a["train_questions.json"] != c["train_questions.json"]
    syn.write_world(tmp_path / "grid", seed=1, layout="grid", **args)
    syn.write_world(tmp_path / "default", seed=1, **args)
    assert files(tmp_path / "grid") == files(tmp_path / "default")
    assert "layout" not in read(tmp_path / "grid" / "world.json")["params"]
    assert "layout" not in syn.load_scenes(tmp_path / "grid", "train")[0]


def test_free_layout_scales_and_packs_nine_objects():
    for size in (24, 96):
        scene = syn.make_scene(
            random.Random(size), 1, image_size=size, min_objects=9, max_objects=9, layout="free"
        )
        assert len(scene["objects"]) == 9 and syn.render(scene).size == (size, size)
        for o in scene["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
    with pytest.raises(ValueError, match="layout"):
        syn.make_scene(random.Random(0), 1, layout="hex")
    with pytest.raises(UsageError, match="layout"):
        syn.write_world(Path("unused"), layout="hex")


def test_cli_layout_flag(tmp_path, capsys):
    out = tmp_path / "free"
    assert main(["synth", str(out), "--train", "6", "--val", "0", "--test", "4", "--layout", "free"]) == 0
    assert "blind" in capsys.readouterr().out
    assert read(out / "world.json")["params"]["layout"] == "free"
    assert all(s["layout"] == "free" for s in syn.load_scenes(out, "train"))
    with pytest.raises(SystemExit) as e:
        main(["synth", str(tmp_path / "bad"), "--layout", "hex"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "invalid choice: 'hex'" in err[-1] and not (tmp_path / "bad").exists()


def test_recipe_synth_args_carry_the_layout(tmp_path):
    from gpt2mm.data.splits import ensure_synthetic_world
    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig

    recipe = Path(__file__).resolve().parents[1] / "configs" / "demo-sft.yaml"
    world = "{n_train: 4, n_val: 1, n_test: 2, layout: free}"
    cfg = load_config(SFTConfig, recipe, ["--data.synth_args", world])
    ensure_synthetic_world(tmp_path / "w", cfg.data.synth_args, log=lambda *_: None)
    assert read(tmp_path / "w" / "world.json")["params"]["layout"] == "free"


def test_a_world_rendered_with_other_arguments_is_refused_not_reused(tmp_path):
    """Training on data.root that holds another world (the grid one, when the recipe asks for the free one)
    would train on the wrong data without a word: it is a one-line error, and the world stays as it was."""
    from gpt2mm.data.splits import ensure_synthetic_world

    root, args = tmp_path / "w", {"n_train": 4, "n_val": 1, "n_test": 2, "seed": 1}
    syn.write_world(root, **args)  # a grid world
    before = (root / "world.json").read_bytes()

    def mismatch(where, **asked):
        return syn.world_mismatch(where, syn.world_params(**(args | asked)))

    assert mismatch(root) is None
    assert mismatch(root, layout="grid", holdout=None) is None  # defaults filled in
    assert mismatch(root, layout="free") == ("layout", "grid", "free")
    assert mismatch(root, seed=2) == ("seed", 1, 2)
    ensure_synthetic_world(root, args, log=lambda *_: None)  # the same world: used as it is
    with pytest.raises(UsageError, match=r"holds a synthetic world with layout 'grid' where .* for 'free'"):
        ensure_synthetic_world(root, args | {"layout": "free"}, log=lambda *_: None)
    for where in (root, tmp_path / "absent"):  # a misspelt argument, whether or not the world is there
        with pytest.raises(UsageError, match="data.synth_args: .*'colour'"):
            ensure_synthetic_world(where, args | {"colour": "red"}, log=lambda *_: None)
    assert (root / "world.json").read_bytes() == before and not (tmp_path / "absent").exists()
    syn.write_world(tmp_path / "held", **args, holdout="red:circle,blue:square")
    assert mismatch(tmp_path / "held", holdout="blue:square,red:circle") is None  # a set
    assert mismatch(tmp_path / "held", holdout="red:circle")[0] == "holdout"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "world.json").write_text('{"generator": "someone else"}')
    with pytest.raises(UsageError, match="world.json is not a synthetic world's manifest"):
        ensure_synthetic_world(tmp_path / "other", args, log=lambda *_: None)
