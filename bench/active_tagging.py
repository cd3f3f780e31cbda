"""Active tagging, measured: how many tags does `gpt2mm tag --reward-model`'s order (least sure first) save
against tagging in random order, for the same reward-model accuracy?

    python bench/active_tagging.py --world DEMO/world --base DEMO/run/checkpoint-N
    python bench/active_tagging.py --world W --base CKPT --pool-images 400 --batch 200 --rounds 6 --seeds 0 1

The loop the tagging app implies, with simulated taggers (the synthetic world's truth, `--noise` of the tags
flipped): the base model (a stage-1 checkpoint) answers the questions of `--pool-images` training images
(greedily) and of `--heldout-images` others; a first `--batch` of pool answers is tagged in random order;
then each round a reward model is trained from the base on the tags so far (`gpt2mm reward train`'s code,
the same settings every round) and scored on the held-out tags, and `--batch` more answers are tagged:
either the ones that reward model is least sure of (`gpt2mm.tag.store.tagging_order`, the app's order) or
random ones. Both orders start from the same first batch. The last training images of the world are used
(a few-labels demo labels its first ones). Prints one table row per round and order, then one JSON line:
the held-out accuracies and AUCs, for each seed the tags the uncertainty order needed to reach random
order's final accuracy and final AUC, and each order's mean over the rounds after the first batch. The
reward model weighs the two classes equally, so its accuracy at 0.5 depends on where its threshold falls as
much as on how it ranks answers; the AUC measures the ranking alone (from a strong base, where nine answers
in ten are tagged correct, the two can disagree).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def tags_for(samples, answers, noise: float, rng: random.Random):
    """Simulated taggers' tags: correct iff the answer's VQA accuracy is 1.0, flipped with prob. `noise`."""
    from gpt2mm.eval.evaluate import references
    from gpt2mm.eval.vqa_metric import vqa_accuracy
    from gpt2mm.reward.simulate import MODEL_CORRECT_AT
    from gpt2mm.tag.store import TagRecord

    rows = []
    for s, a in zip(samples, answers):
        correct = vqa_accuracy(a, references(s)) >= MODEL_CORRECT_AT
        label = correct if rng.random() >= noise else not correct
        rows.append(TagRecord(str(s.question_id), str(Path(s.image).resolve()), s.turns[0].text, a, label))
    return rows


def train_and_score(tags, heldout: Path, base: str, out: Path, seed: int) -> tuple[float, float | None]:
    """A reward model trained from `base` on `tags`: its held-out accuracy (percent) and AUC."""
    from gpt2mm.reward.train import RewardTrainConfig, train_reward
    from gpt2mm.tag.store import write_jsonl

    write_jsonl(tags, out.with_suffix(".jsonl"))
    cfg = RewardTrainConfig(
        tags=str(out.with_suffix(".jsonl")), eval_tags=str(heldout), base=base, out=str(out), overwrite=True,
        epochs=3.0, batch_size=64, warmup_steps=10, seed=seed, progress=False, log_every=10**6,
    )  # fmt: skip
    metrics = train_reward(cfg, log=lambda m: None)
    h = metrics["heldout"]
    return 100 * h["accuracy"], h["auc"]


def tags_to_reach(curve, column: int, target: float | None) -> int | None:
    """The fewest tags at which `curve`'s `column` (1: accuracy, 2: AUC) is at least `target` (None: never)."""
    if target is None:
        return None
    return next((row[0] for row in curve if row[column] is not None and row[column] >= target), None)


def mean_auc(rows) -> float | None:
    """The mean AUC of curve rows (None if any round had no AUC: held-out tags all of one class)."""
    aucs = [row[2] for row in rows]
    return None if not aucs or None in aucs else round(sum(aucs) / len(aucs), 4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=Path, required=True)
    parser.add_argument("--base", required=True, help="the stage-1 checkpoint whose answers are tagged")
    parser.add_argument("--pool-images", type=int, default=400)
    parser.add_argument("--heldout-images", type=int, default=150)
    parser.add_argument("--batch", type=int, default=200, help="tags added per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()

    import torch

    from gpt2mm.data.synthetic import load_scenes
    from gpt2mm.data.vqa import load_vqa
    from gpt2mm.eval.evaluate import answer_questions
    from gpt2mm.loading import load_model
    from gpt2mm.reward.model import RewardScorer
    from gpt2mm.tag.store import tagging_order, write_jsonl

    torch.manual_seed(0)
    w = args.world
    samples, _ = load_vqa(w / "train_questions.json", w / "train_annotations.json", w / "images" / "train")
    ids = [s["image_id"] for s in load_scenes(w, "train")]
    held_ids = set(ids[-args.heldout_images :])
    pool_ids = set(ids[-args.heldout_images - args.pool_images : -args.heldout_images])
    pool = [s for s in samples if s.image_id in pool_ids]
    held = [s for s in samples if s.image_id in held_ids]
    model, processor = load_model(args.base)
    t0 = time.perf_counter()
    pool_answers = answer_questions(model, processor, pool, 256)
    held_answers = answer_questions(model, processor, held, 256)
    del model
    need = args.batch * (args.rounds + 1)
    if need > len(pool):
        raise SystemExit(f"--batch x (--rounds + 1) = {need} tags, but the pool has {len(pool)} answers")
    print(f"answers: {len(pool)} pool, {len(held)} held out ({time.perf_counter() - t0:.0f} s)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in args.seeds:
            rng = random.Random(seed)
            pool_tags = tags_for(pool, pool_answers, args.noise, rng)  # a tag per answer, drawn once
            held_tags = tags_for(held, held_answers, args.noise, rng)
            write_jsonl(held_tags, tmp / "heldout.jsonl")
            truth_share = sum(t.label for t in held_tags) / len(held_tags)
            print(f"seed {seed}: held-out tags {len(held_tags)}, {100 * truth_share:.1f}% tagged correct")
            first = rng.sample(range(len(pool)), args.batch)
            curves = {}
            for order in ("random", "least_sure"):
                order_rng = random.Random(f"{seed}/{order}")
                chosen = list(first)
                curve = []
                for r in range(args.rounds + 1):
                    out = tmp / f"rm-{seed}-{order}-{r}"
                    acc, auc = train_and_score(
                        [pool_tags[i] for i in chosen], tmp / "heldout.jsonl", args.base, out, seed
                    )
                    curve.append((len(chosen), round(acc, 2), None if auc is None else round(auc, 4)))
                    print(
                        f"seed {seed} {order:10s} tags {len(chosen):5d}: held-out accuracy {acc:.2f}%,"
                        f" AUC {'n/a' if auc is None else f'{auc:.4f}'}",
                        flush=True,
                    )
                    if r == args.rounds:
                        break
                    taken = set(chosen)
                    rest = [i for i in range(len(pool)) if i not in taken]
                    if order == "random":
                        chosen += order_rng.sample(rest, args.batch)
                    else:
                        scorer = RewardScorer(out, batch_size=128)
                        p = scorer([pool[i].image for i in rest], [pool[i].turns[0].text for i in rest],
                                   [pool_answers[i] for i in rest])  # fmt: skip
                        chosen += tagging_order(rest, dict(zip(rest, p)))[: args.batch]
                curves[order] = curve
            final = curves["random"][-1]
            results[seed] = {
                "curves": curves,
                "random_tags": final[0],
                "random_final": final[1],
                "least_sure_tags_to_reach_it": tags_to_reach(curves["least_sure"], 1, final[1]),
                "random_final_auc": final[2],
                "least_sure_tags_to_reach_its_auc": tags_to_reach(curves["least_sure"], 2, final[2]),
                # each order's mean over the rounds after the shared first batch: the tags-to-reach figures
                # read one point of a noisy curve, these every point
                "mean_after_first": {
                    order: {
                        "accuracy": round(sum(row[1] for row in c[1:]) / max(1, len(c) - 1), 2),
                        "auc": mean_auc(c[1:]),
                    }
                    for order, c in curves.items()
                },
            }
    print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
