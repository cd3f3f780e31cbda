"""Where a trained model keeps the positions a relation question needs, layer by layer (linear probes).

For each "Is the A left of / right of / above / below the B?" question of the synthetic world, the model reads
the prompt (`Q: <image> question A:`, as `gpt2mm eval` asks it) and GPT-2's hidden states are kept at three
places: A's last word, B's last word and the prompt's last token (where the answer is computed). A ridge
regression per layer, fitted on the train split's questions and scored on the test split's (R^2), asks whether
each place holds A's position (x and y), B's position, and at the last token the difference A - B that the answer
is the sign of. Positions are the objects' centres as a fraction of the image (free layout) or their cells
(grid). R^2 near 0: not linearly there; near 1: there.

    python bench/relation_probe.py MODEL WORLD [--train-questions 600] [--ridge 0.01]

MODEL: a checkpoint folder; WORLD: the folder `gpt2mm synth` wrote (its scenes/ and images/). Prints one row per
layer (0: the embeddings) and, last, one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpt2mm.data.images import load_image  # noqa: E402
from gpt2mm.loading import load_model  # noqa: E402
from position_errors import RELATION, find  # noqa: E402  (this folder's: the relation questions, their objects)

PLACES = ("A at A's word", "B at B's word", "A - B at the last token")


def position(obj: dict, scene: dict) -> tuple[float, float]:
    if scene.get("layout", "grid") == "grid":
        return float(obj["col"]), float(obj["row"])
    return obj["x"] / scene["width"], obj["y"] / scene["height"]


@torch.no_grad()
def collect(model, processor, world: Path, split: str, limit: int | None, seed: int = 0):
    """Hidden states (questions, layers + 1, 3 places, C) and targets (questions, 3 places, 2 axes)."""
    scenes = json.loads((world / "scenes" / f"{split}_scenes.json").read_text())
    items = []
    for scene in scenes:
        for q in scene["questions"]:
            m = RELATION.match(q["question"])
            if m and (a := find(scene, m.group(1))) and (b := find(scene, m.group(3))):
                items.append((scene, q["question"], m, a, b))
    random.Random(seed).shuffle(items)
    items = items[:limit]
    if len(items) < 2:
        raise SystemExit(
            f"{world}: {len(items)} relation questions in the {split} split, too few for a probe"
        )
    states, targets = [], []
    for scene, question, m, a, b in items:
        ids = processor.encode_turns([("user", question, 1)])["input_ids"]
        prompt = processor.expand_image_tokens(processor.format_prompt(question))
        # each token's end in the prompt's text; A's (B's) place is the token that ends where its words do
        ends = np.cumsum([len(processor.tokenizer.decode([t])) for t in ids])
        start = prompt.index(question)
        places = []
        for words in (f"Is the {m.group(1)}", f"Is the {m.group(1)} {m.group(2)} the {m.group(3)}"):
            hit = np.flatnonzero(ends == start + len(words))
            if len(hit) != 1:
                raise SystemExit(f"{question!r}: no token ends where {words!r} does")
            places.append(int(hit[0]))
        places.append(len(ids) - 1)
        pixels = processor.preprocess_images([load_image(world / "images" / split / scene["file_name"])])
        out = model(input_ids=torch.tensor([ids]), pixel_values=pixels, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states)[:, 0].float()  # (layers + 1, T, C)
        states.append(hidden[:, places].numpy())
        pa, pb = position(a, scene), position(b, scene)
        targets.append([pa, pb, (pa[0] - pb[0], pa[1] - pb[1])])
    return np.stack(states), np.array(targets)


def r2(x_fit, y_fit, x_test, y_test, ridge: float) -> float:
    """R^2 on the test rows of a ridge regression fitted on the fit rows (penalty ridge * rows)."""
    mean = x_fit.mean(0)
    a, b = x_fit - mean, x_test - mean
    w = np.linalg.solve(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ (y_fit - y_fit.mean()))
    pred = b @ w + y_fit.mean()
    return float(1 - ((pred - y_test) ** 2).sum() / ((y_test - y_test.mean()) ** 2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a checkpoint folder")
    ap.add_argument("world", type=Path, help="the world's folder (gpt2mm synth WORLD ...)")
    ap.add_argument(
        "--train-questions", type=int, default=600, help="relation questions to fit the probes on"
    )
    ap.add_argument("--ridge", type=float, default=0.01, help="the ridge penalty, per fitted question")
    args = ap.parse_args()
    for split in ("train", "test"):
        if not (args.world / "scenes" / f"{split}_scenes.json").is_file():
            ap.error(f"{args.world}: no scenes/{split}_scenes.json (give the folder gpt2mm synth wrote)")
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"{args.model}: not a checkpoint folder (it has no config.json)")
    model, processor = load_model(args.model)
    model.eval()
    x_fit, y_fit = collect(model, processor, args.world, "train", args.train_questions)
    x_test, y_test = collect(model, processor, args.world, "test", None)
    rows = []
    print(f"R^2 on {len(x_test)} test questions (probes fitted on {len(x_fit)} train questions)")
    print("layer  " + "  ".join(f"{p} x / y" for p in PLACES))
    for layer in range(x_fit.shape[1]):
        row = [
            [
                r2(x_fit[:, layer, p], y_fit[:, p, ax], x_test[:, layer, p], y_test[:, p, ax], args.ridge)
                for ax in (0, 1)
            ]
            for p in range(len(PLACES))
        ]
        rows.append(row)
        print(f"{layer:5d}  " + "  ".join(f"{x:6.2f} / {y:5.2f}" for x, y in row))
    print(
        json.dumps(
            {
                "layers": [
                    {p: {"x": round(x, 3), "y": round(y, 3)} for p, (x, y) in zip(PLACES, row)}
                    for row in rows
                ]
            }
        )
    )


if __name__ == "__main__":
    main()
