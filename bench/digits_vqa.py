"""A second small-image VQA set the project does not generate: real handwritten digits, composed into pictures.

The shapes world (`gpt2mm synth`) was designed together with the tiny model; this set was not. It takes the
1,797 handwritten digits scikit-learn ships (`sklearn.datasets.load_digits`, 8x8 scans by 43 people), splits
the *scans* into train / val / test pools (a test picture only holds digits no training picture holds), and
composes each picture from one to four of them: a 64 px canvas (not the model's 48), a random pale background
with noise, each digit scaled to 14-24 px in its own dark ink at a free position (crossing the tiny preset's
16 px patches). Questions use other words and another answer set than the shapes world:

    how many digits are there?       one | two | three | four
    which digit is on the far left?  0-9
    what is the largest digit?       0-9
    is there a 7?                    yes | no   (half about a digit that is there)

It is written in every input format gpt2mm reads, all from the same pictures and questions:

    DIR/vqa/    {split}_questions.json, {split}_annotations.json (10 answers each), images/{split}/{id}.png
                (not COCO-named: data.image_pattern '{image_id}.png'); scenes/{split}_scenes.json (each
                picture's digits and boxes, for experiments with data.difficulty: objects)
    DIR/llava/  {split}_llava.json (one record per picture, its questions as turns), images -> ../vqa/images
    DIR/hf/     a datasets.DatasetDict saved with save_to_disk (train / validation / test), image data inside
    DIR/csv/    {split}.csv in the seed's format (image path, "Q: ... A: ...")

Usage:
    python bench/digits_vqa.py build DIR [--train 6000 --val 100 --test 500]
    python bench/digits_vqa.py blind DIR         # the question-only baseline on the test split
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

CANVAS = 64
COUNT_WORDS = ("one", "two", "three", "four")
FAMILIES = ("count", "leftmost", "largest", "exists")
SPLITS = ("train", "val", "test")
ID_OFFSET = {"train": 0, "val": 100_000, "test": 200_000}
POOLS = {"val": 180, "test": 360}  # scans held out per split; the rest (1,257) are the training pool


def digit_pools(seed: int = 0) -> dict[str, list[tuple[np.ndarray, int]]]:
    """scikit-learn's digit scans, split (by scan) into disjoint train / val / test pools."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(f"digits-vqa/{seed}/pools").shuffle(order)
    pools, start = {}, 0
    for split in ("test", "val"):
        pools[split] = order[start : start + POOLS[split]]
        start += POOLS[split]
    pools["train"] = order[start:]
    return {s: [(digits.images[i] / 16.0, int(digits.target[i])) for i in idx] for s, idx in pools.items()}


def compose(rng: random.Random, pool: list[tuple[np.ndarray, int]]) -> tuple[Image.Image, list[dict]]:
    """One picture: 1-4 digits at free, non-overlapping positions; returns the image and its digits
    (value, box) sorted left to right."""
    n = rng.randint(1, 4)
    bg = np.array([rng.randint(170, 255) for _ in range(3)], dtype=np.float32)
    canvas = np.ones((CANVAS, CANVAS, 3), np.float32) * bg
    nprng = np.random.default_rng(rng.getrandbits(32))
    canvas += nprng.normal(0, rng.uniform(0, 14), canvas.shape)
    placed: list[dict] = []
    while len(placed) < n:
        size = rng.randint(14, 24)
        x, y = rng.randint(0, CANVAS - size), rng.randint(0, CANVAS - size)
        box = (x, y, x + size, y + size)
        overlaps = any(
            not (box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1])
            for b in (p["box"] for p in placed)
        )
        too_close = any(abs((x + size / 2) - (p["box"][0] + p["box"][2]) / 2) < 4 for p in placed)
        if overlaps or too_close:  # "far left" must be clear
            continue
        glyph, value = pool[rng.randrange(len(pool))]
        alpha = (
            np.asarray(
                Image.fromarray((glyph * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR),
                np.float32,
            )[..., None]
            / 255.0
        )
        ink = np.array([rng.randint(0, 110) for _ in range(3)], dtype=np.float32)
        region = canvas[y : y + size, x : x + size]
        canvas[y : y + size, x : x + size] = region * (1 - alpha) + ink * alpha
        placed.append({"value": value, "box": box})
    placed.sort(key=lambda p: p["box"][0] + p["box"][2])
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return image, placed


def questions_for(rng: random.Random, digits: list[dict]) -> list[tuple[str, str, str]]:
    """(family, question, answer) for each family, in a random order."""
    values = [d["value"] for d in digits]
    asked = (
        rng.choice(values) if rng.random() < 0.5 else rng.choice([v for v in range(10) if v not in values])
    )
    qs = [
        ("count", "how many digits are there?", COUNT_WORDS[len(values) - 1]),
        ("leftmost", "which digit is on the far left?", str(values[0])),
        ("largest", "what is the largest digit?", str(max(values))),
        ("exists", f"is there a {asked}?", "yes" if asked in values else "no"),
    ]
    rng.shuffle(qs)
    return qs


def build(out: str | Path, n_train: int = 6000, n_val: int = 100, n_test: int = 500, seed: int = 0) -> Path:
    """Write the set in the four formats under `out` (see the module's docstring); returns `out`."""
    out = Path(out)
    pools = digit_pools(seed)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    rows: dict[str, list[dict]] = {}
    for split in SPLITS:
        rng = random.Random(f"digits-vqa/{seed}/{split}")
        image_dir = out / "vqa" / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        rows[split], scenes = [], []
        for i in range(counts[split]):
            image_id = ID_OFFSET[split] + i + 1
            image, digits = compose(rng, pools[split])
            image.save(image_dir / f"{image_id}.png")
            scenes.append({"image_id": image_id, "file_name": f"{image_id}.png", "objects": digits})
            for k, (family, question, answer) in enumerate(questions_for(rng, digits)):
                rows[split].append(
                    dict(image_id=image_id, question_id=image_id * 10 + k, family=family,
                         question=question, answer=answer, image=f"images/{split}/{image_id}.png")
                )  # fmt: skip
        # what the picture holds, as the shapes world's scene records (data.difficulty: objects reads them:
        # for experiments only; the general recipe does not use them)
        (out / "vqa" / "scenes").mkdir(exist_ok=True)
        (out / "vqa" / "scenes" / f"{split}_scenes.json").write_text(json.dumps(scenes))
    _write_vqa(out / "vqa", rows)
    _write_llava(out / "llava", rows)
    _write_csv(out / "csv", rows)
    _write_hf(out / "hf", rows, out / "vqa")
    (out / "manifest.json").write_text(json.dumps({"seed": seed, **counts, "families": FAMILIES}) + "\n")
    return out


def _write_vqa(folder: Path, rows: dict[str, list[dict]]) -> None:
    for split, rs in rows.items():
        questions = [{"image_id": r["image_id"], "question": r["question"], "question_id": r["question_id"]}
                     for r in rs]  # fmt: skip
        annotations = [
            {"image_id": r["image_id"], "question_id": r["question_id"], "question_type": r["family"],
             "answer_type": "yes/no" if r["family"] == "exists" else "other",
             "multiple_choice_answer": r["answer"],
             "answers": [{"answer": r["answer"], "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]}
            for r in rs
        ]  # fmt: skip
        info = {"description": f"digits VQA ({split})", "data_subtype": split}
        (folder / f"{split}_questions.json").write_text(
            json.dumps(
                {"info": info, "task_type": "Open-Ended", "data_subtype": split, "questions": questions}
            )
        )
        (folder / f"{split}_annotations.json").write_text(
            json.dumps({"info": info, "data_subtype": split, "annotations": annotations})
        )


def _write_llava(folder: Path, rows: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "images").exists():
        (folder / "images").symlink_to("../vqa/images")
    for split, rs in rows.items():
        by_image: dict[int, list[dict]] = defaultdict(list)
        for r in rs:
            by_image[r["image_id"]].append(r)
        records = []
        for image_id, qs in by_image.items():
            turns = []
            for j, r in enumerate(qs):
                turns += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + r["question"]},
                          {"from": "gpt", "value": r["answer"]}]  # fmt: skip
            records.append({"id": str(image_id), "image": qs[0]["image"].removeprefix("images/"),
                            "conversations": turns})  # fmt: skip
        (folder / f"{split}_llava.json").write_text(json.dumps(records))


def _write_csv(folder: Path, rows: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rs in rows.items():
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "text"])
            for r in rs:
                w.writerow([f"../vqa/{r['image']}", f"Q: <image> {r['question']} A: {r['answer']}"])


def _write_hf(folder: Path, rows: dict[str, list[dict]], vqa: Path) -> None:
    import datasets

    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")), "question_id": datasets.Value("int64"),
        "image_id": datasets.Value("int64"), "question_type": datasets.Value("string"),
    })  # fmt: skip

    def table(rs: list[dict]) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                "image": [{"bytes": (vqa / r["image"]).read_bytes(), "path": None} for r in rs],
                "question": [r["question"] for r in rs],
                "answer": [r["answer"] for r in rs],
                "answers": [[r["answer"]] * 10 for r in rs],
                "question_id": [r["question_id"] for r in rs],
                "image_id": [r["image_id"] for r in rs],
                "question_type": [r["family"] for r in rs],
            },
            features=features,
        )

    names = {"train": "train", "val": "validation", "test": "test"}
    datasets.DatasetDict({names[s]: table(rs) for s, rs in rows.items()}).save_to_disk(str(folder))


def blind_baseline(root: str | Path) -> dict[str, float]:
    """The best question-only answers: each test question gets the training set's most common answer to the
    same question text. Returns its accuracy overall and per family (VQA accuracy = exact match here: the 10
    answers are equal)."""
    root = Path(root) / "vqa"

    def load(split: str) -> list[tuple[str, str, str]]:
        qs = {
            q["question_id"]: q["question"]
            for q in json.loads((root / f"{split}_questions.json").read_text())["questions"]
        }
        anns = json.loads((root / f"{split}_annotations.json").read_text())["annotations"]
        return [(a["question_type"], qs[a["question_id"]], a["multiple_choice_answer"]) for a in anns]

    prior: dict[str, Counter] = defaultdict(Counter)
    for _, q, a in load("train"):
        prior[q][a] += 1
    hits: dict[str, list[bool]] = defaultdict(list)
    for family, q, a in load("test"):
        guess = prior[q].most_common(1)[0][0] if prior[q] else ""
        hits[family].append(guess == a)
        hits["all"].append(guess == a)
    return {k: 100.0 * sum(v) / len(v) for k, v in hits.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the set in the four formats")
    b.add_argument("out")
    b.add_argument("--train", type=int, default=6000)
    b.add_argument("--val", type=int, default=100)
    b.add_argument("--test", type=int, default=500)
    b.add_argument("--seed", type=int, default=0)
    bl = sub.add_parser("blind", help="the question-only baseline on the test split")
    bl.add_argument("root")
    args = p.parse_args()
    if args.cmd == "build":
        build(args.out, args.train, args.val, args.test, args.seed)
        print(f"wrote {args.out} ({args.train} / {args.val} / {args.test} pictures, 4 questions each)")
    else:
        print(json.dumps({k: round(v, 2) for k, v in blind_baseline(args.root).items()}))


if __name__ == "__main__":
    main()
