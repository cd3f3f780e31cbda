"""Simulated taggers: correct / incorrect tags for answers about the synthetic world, from its ground truth.

    gpt2mm reward simulate --world data/demo-world --split train --out tags/train.jsonl
    gpt2mm reward simulate --world data/demo-world --split test --out tags/test.jsonl --base runs/demo-sft/best

Each question of the split gets `per_question` candidate answers, tagged as a person would tag them:

    positive       the true answer                                               correct
    near_miss      same answer family, wrong: another colour / shape (one in the   incorrect
                   scene when there is one, half of the time), a count off by one,
                   yes <-> no, a neighbouring grid position
    easy_negative  an answer of another family ("3" to a colour question)        incorrect
    model          (with --base) the model's greedy answer, when it differs from  correct iff its official VQA
                   the other candidates                                          accuracy against the 10 human
                                                                                 answers is 1.0 (>= 4 agree)

The true answer plus `per_question - 1` wrong ones, so the default `per_question=2` gives half positives.
Of the wrong ones, a share `near_miss_share` (default 0.6) are near misses and the rest easy negatives,
assigned by error diffusion so that the counts hold exactly (not only in expectation). Each row goes to
one of `taggers` simulated taggers, who flips the label with their `noise` rate (default 0: a perfect
tagger). The rows carry `kind`, `family` and `template` keys besides the tag store's, which
`gpt2mm.tag.store.read_tags` ignores and `gpt2mm reward train` reads for per-kind accuracy. Deterministic
in (world, split, options, seed). Held-out tags should come from another split (test), whose images the
reward model never sees. `extra_questions` asks each image more questions than the world did (of chosen
families, drawn the way the world draws its own), for training sets that need more of the hard families.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2mm.data.synthetic import (
    COLORS,
    FAMILIES,
    GRID,
    NUMBERS,
    POSITIONS,
    SHAPES,
    YES_NO,
    load_scenes,
    make_questions,
)
from gpt2mm.errors import UsageError
from gpt2mm.tag.store import TagRecord, write_jsonl

POSITIVE, NEAR_MISS, EASY_NEGATIVE, MODEL = "positive", "near_miss", "easy_negative", "model"
KINDS = (POSITIVE, NEAR_MISS, EASY_NEGATIVE, MODEL)
MODEL_CORRECT_AT = (
    1.0  # a model answer is tagged correct iff its VQA accuracy reaches this (>= 4 humans agree)
)

# The answer vocabularies by type; an easy negative is drawn from a vocabulary other than the question's.
VOCABS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "number": NUMBERS,
    "yesno": YES_NO,
    "position": POSITIONS,
}
_TEMPLATE_VOCAB = {
    "color_of": "color",
    "color_at": "color",
    "rel_color": "color",
    "shape_of": "shape",
    "shape_at": "shape",
    "count_all": "number",
    "count_shape": "number",
    "count_color": "number",
    "exist": "yesno",
    "rel_yesno": "yesno",
    "where": "position",
}


@dataclass
class SimulateConfig:
    world: str = field(metadata={"help": "a synthetic world directory (gpt2mm synth)"})
    out: str = field(metadata={"help": "the tag JSONL to write"})
    split: str = field(default="train", metadata={"help": "train | val | test"})
    per_question: int = field(
        default=2, metadata={"help": "candidate answers per question: the truth + K-1 wrong"}
    )
    near_miss_share: float = field(
        default=0.6, metadata={"help": "share of wrong answers that are near misses"}
    )
    taggers: int = field(default=3, metadata={"help": "simulated taggers (each row goes to one)"})
    noise: list[float] = field(
        default_factory=lambda: [0.0], metadata={"help": "label flip rate, one for all or one per tagger"}
    )
    images: int | None = field(default=None, metadata={"help": "only the first N images of the split"})
    extra_questions: int = field(
        default=0, metadata={"help": "N more questions per image, beyond the world's (answers balanced)"}
    )
    extra_families: list[str] = field(
        default_factory=lambda: list(FAMILIES),
        metadata={"help": "the families the extra questions come from"},
    )
    base: str | None = field(
        default=None, metadata={"help": "also tag this model's greedy answers (VQA metric)"}
    )
    batch_size: int = field(default=128, metadata={"help": "batch size for the model's answers"})
    seed: int = 0

    def __post_init__(self):
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {self.split!r}")
        if self.per_question < 2:
            raise ValueError(
                f"per_question must be >= 2 (the truth and a wrong answer), got {self.per_question}"
            )
        if not 0.0 <= self.near_miss_share <= 1.0:
            raise ValueError(f"near_miss_share must be in [0, 1], got {self.near_miss_share}")
        if self.taggers < 1:
            raise ValueError(f"taggers must be >= 1, got {self.taggers}")
        if len(self.noise) not in (1, self.taggers):
            raise ValueError(f"noise needs 1 or {self.taggers} (one per tagger) rates, got {len(self.noise)}")
        if self.extra_questions < 0:
            raise ValueError(f"extra_questions must be >= 0, got {self.extra_questions}")
        if bad := [f for f in self.extra_families if f not in FAMILIES]:
            raise ValueError(f"unknown extra_families {bad}; choose from {list(FAMILIES)}")
        if any(not 0.0 <= r <= 1.0 for r in self.noise):
            raise ValueError(f"noise rates must be in [0, 1], got {self.noise}")


@dataclass
class SimTag(TagRecord):
    """A tag record plus what the simulation knows about it (extra JSONL keys; the tag store ignores them)."""

    kind: str = ""
    family: str = ""
    template: str = ""


# --- wrong answers --------------------------------------------------------------------------------------


def near_misses(qa: dict[str, Any], scene: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Wrong answers of the question's own family: (preferred, others). Preferred ones are those a model is
    most likely to confuse: colours / shapes of other objects in the scene, counts off by one, the other of
    yes / no, the grid cells next to the true one (8-neighbourhood)."""
    truth, template = qa["answer"], qa["template"]
    vocab = _TEMPLATE_VOCAB[template]
    if vocab in ("color", "shape"):
        in_scene = {o[vocab] for o in scene["objects"]} - {truth}
        preferred = [a for a in VOCABS[vocab] if a in in_scene]
        others = [a for a in VOCABS[vocab] if a != truth and a not in in_scene]
        return preferred, others
    if vocab == "number":
        n = int(truth)
        return [str(k) for k in (n - 1, n + 1) if 0 <= k <= GRID * GRID], []
    if vocab == "yesno":
        return [a for a in YES_NO if a != truth], []
    row, col = divmod(POSITIONS.index(truth), GRID)
    around = [
        POSITIONS[r * GRID + c]
        for r in range(row - 1, row + 2)
        for c in range(col - 1, col + 2)
        if 0 <= r < GRID and 0 <= c < GRID and (r, c) != (row, col)
    ]
    return around, []


def easy_negatives(qa: dict[str, Any]) -> list[list[str]]:
    """Answers of the other answer families, one list per family (a family is drawn first, then a word)."""
    own = _TEMPLATE_VOCAB[qa["template"]]
    return [list(v) for name, v in VOCABS.items() if name != own]


def _draw_near(qa: dict, scene: dict, rng: random.Random, used: set[str]) -> str | None:
    preferred, others = near_misses(qa, scene)
    preferred = [a for a in preferred if a not in used]
    others = [a for a in others if a not in used]
    pools = [p for p in (preferred, others) if p]
    if not pools:
        return None
    pool = pools[0] if len(pools) == 1 or rng.random() < 0.5 else pools[1]
    return rng.choice(pool)


def _draw_easy(qa: dict, rng: random.Random, used: set[str]) -> str | None:
    families = [[a for a in f if a not in used] for f in easy_negatives(qa)]
    families = [f for f in families if f]
    return rng.choice(rng.choice(families)) if families else None


# --- the taggers ----------------------------------------------------------------------------------------


def image_path(world: Path, split: str, scene: dict[str, Any]) -> str:
    return str((world / "images" / split / scene["file_name"]).resolve())


def simulate_tags(
    world: str | Path,
    split: str = "train",
    per_question: int = 2,
    near_miss_share: float = 0.6,
    taggers: int = 3,
    noise: float | list[float] = 0.0,
    seed: int = 0,
    images: int | None = None,
    model_answers: dict[int, str] | None = None,
    references: dict[int, list[str]] | None = None,
    extra_questions: int = 0,
    extra_families: list[str] | tuple[str, ...] = FAMILIES,
) -> list[SimTag]:
    """Tags for every question of the world's split (or its first `images` images); see the module
    docstring. `model_answers` (question id -> answer) adds the model's answers, labelled with the VQA
    metric against `references` (question id -> human answers). `extra_questions` asks each image that many
    more questions of `extra_families` (drawn as the world draws its own: `make_questions`), so that a
    training set can hold more of the hard families; their question ids are `{image_id}x{k}`."""
    from gpt2mm.eval.vqa_metric import vqa_accuracy

    world = Path(world)
    scenes_file = world / "scenes" / f"{split}_scenes.json"
    if not scenes_file.is_file():
        raise UsageError(f"{world} is not a synthetic world with a {split} split: no {scenes_file}")
    scenes = load_scenes(world, split)[:images]
    rates = [noise] * taggers if isinstance(noise, (int, float)) else list(noise)
    rates = rates * taggers if len(rates) == 1 else rates
    rng = random.Random(f"gpt2mm-reward-sim/{seed}/{split}")
    phase = rng.random()  # error diffusion of near misses vs easy negatives: exact shares, random phase
    rows: list[SimTag] = []

    def add(qa: dict, scene: dict, j: int, answer: str, correct: bool, kind: str) -> None:
        tagger = rng.randrange(taggers)
        label = correct if rng.random() >= rates[tagger] else not correct
        rows.append(
            SimTag(
                question_id=f"{qa['question_id']}/{j}",
                image=image_path(world, split, scene),
                question=qa["question"],
                answer=answer,
                label=label,
                tagger=f"sim-{tagger}",
                references=[qa["answer"]],
                kind=kind,
                family=qa["family"],
                template=qa["template"],
            )
        )

    extra_rng = random.Random(f"gpt2mm-reward-sim-extra/{seed}/{split}")
    for scene in scenes:
        questions = list(scene["questions"])
        if extra_questions:
            asked = {qa["question"] for qa in questions}
            more = make_questions(scene, extra_rng, extra_questions + len(asked), extra_families)
            more = [qa for qa in more if qa["question"] not in asked][:extra_questions]
            questions += [{**qa, "question_id": f"{scene['image_id']}x{k}"} for k, qa in enumerate(more)]
        for qa in questions:
            truth = qa["answer"]
            used = {truth}
            add(qa, scene, 0, truth, True, POSITIVE)
            for j in range(1, per_question):
                phase += near_miss_share
                want_near = phase >= 1.0
                phase -= 1.0 if want_near else 0.0
                answer = _draw_near(qa, scene, rng, used) if want_near else _draw_easy(qa, rng, used)
                kind = NEAR_MISS if want_near else EASY_NEGATIVE
                if answer is None:  # that kind ran out of distinct answers: the other kind
                    answer = _draw_easy(qa, rng, used) if want_near else _draw_near(qa, scene, rng, used)
                    kind = EASY_NEGATIVE if want_near else NEAR_MISS
                if answer is None:
                    break
                used.add(answer)
                add(qa, scene, j, answer, False, kind)
            if model_answers is not None:
                answer = model_answers.get(qa["question_id"])
                if answer is not None and answer not in used:
                    refs = (references or {}).get(qa["question_id"]) or [truth]
                    add(
                        qa, scene, per_question, answer, vqa_accuracy(answer, refs) >= MODEL_CORRECT_AT, MODEL
                    )
    return rows


def model_answers_for(
    world: str | Path, split: str, base: str | Path, batch_size: int = 128, images: int | None = None
) -> tuple[dict[int, str], dict[int, list[str]]]:
    """A model's greedy answers to the split's questions, and the questions' human answers (for the metric)."""
    from gpt2mm.data.vqa import load_vqa
    from gpt2mm.eval.evaluate import answer_questions
    from gpt2mm.loading import load_model

    world = Path(world)
    try:
        model, processor = load_model(base)
    except (OSError, ValueError) as e:
        raise UsageError(f"--base {base}: cannot load a gpt2mm model ({e})") from None
    samples, report = load_vqa(
        world / f"{split}_questions.json", world / f"{split}_annotations.json", world / "images" / split
    )
    if images is not None:
        keep = {s["image_id"] for s in load_scenes(world, split)[:images]}
        samples = [s for s in samples if s.image_id in keep]
    answers = answer_questions(model.eval(), processor, samples, batch_size, progress=True)
    return (
        {s.question_id: a for s, a in zip(samples, answers)},
        {s.question_id: list(s.answers or []) for s in samples},
    )


def summarize(rows: list[SimTag]) -> str:
    kinds = Counter(r.kind for r in rows)
    pos = sum(r.label for r in rows)
    parts = ", ".join(f"{kinds[k]} {k}" for k in KINDS if kinds[k])
    return f"{len(rows)} tags ({pos} correct, {len(rows) - pos} incorrect): {parts}"


def run_simulate(cfg: SimulateConfig) -> int:
    answers = refs = None
    if cfg.base:
        answers, refs = model_answers_for(cfg.world, cfg.split, cfg.base, cfg.batch_size, cfg.images)
    rows = simulate_tags(
        cfg.world,
        cfg.split,
        per_question=cfg.per_question,
        near_miss_share=cfg.near_miss_share,
        taggers=cfg.taggers,
        noise=cfg.noise,
        seed=cfg.seed,
        images=cfg.images,
        extra_questions=cfg.extra_questions,
        extra_families=cfg.extra_families,
        model_answers=answers,
        references=refs,
    )
    if not rows:
        raise UsageError(f"{cfg.world}: the {cfg.split} split has no questions")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, out)
    print(f"wrote {out}: {summarize(rows)}")
    return 0
