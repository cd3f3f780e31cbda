"""Questions about a scene in the VQA v2 manner, their simulated human answers, and the blind baseline.

Eleven regular templates in six families; answers are balanced within each template (`make_questions`),
so a question-only ("blind") model cannot do well: `blind_accuracy` measures the best such predictor.
In the free layout a position or relation question is asked only when the pixels make its answer clear
(`clearly_in_region`, `near_region`, `relation_holds` in `world`).
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from gpt2mm.data.synthetic.world import (
    COLORS,
    NUMBERS,
    PLURALS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    YES_NO,
    article,
    clearly_in_region,
    near_region,
    relation_holds,
)

QID_FACTOR = 100  # question_id = image_id * 100 + k, as VQA derives question ids from image ids


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


def _alone_in_region(obj: dict, scene: dict) -> bool:
    """Whether "the object in the <obj's position>" can only mean `obj`: it is clearly in its region and no
    other object could be taken for one there."""
    objs = scene["objects"]
    return (
        clearly_in_region(obj, scene)
        and sum(near_region(o, obj["row"], obj["col"], scene) for o in objs) == 1
    )


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
                    out.append((f"Is there {article(c)} {c} {s}?", "yes" if (c, s) in present else "no"))
    elif template == "where":
        for o in objs:
            if clearly_in_region(o, scene) and (ref := _refer(objs, o, "where")):
                out.append((f"Where is the {ref}?", o["position"]))
    elif template in ("color_at", "shape_at"):
        key = "color" if template == "color_at" else "shape"
        for o in objs:
            if _alone_in_region(o, scene):
                out.append((f"What {key} is the object in the {o['position']}?", o[key]))
    elif template == "rel_color":
        for b in objs:
            if not (ref := _refer(objs, b, "anchor")):
                continue
            for rel in RELATIONS:
                holds = [(a, relation_holds(a, rel, b, scene)) for a in objs if a is not b]
                hits = [a for a, h in holds if h]
                if len(hits) == 1 and all(h is not None for _, h in holds):  # none in doubt
                    out.append((f"What color is the object {rel} the {ref}?", hits[0]["color"]))
    elif template == "rel_yesno":
        refs = [(o, r) for o in objs if (r := _refer(objs, o, "anchor"))]
        for a, ra in refs:
            for b, rb in refs:
                if a is not b:
                    for rel in RELATIONS:
                        if (holds := relation_holds(a, rel, b, scene)) is not None:
                            out.append((f"Is the {ra} {rel} the {rb}?", "yes" if holds else "no"))
    else:
        raise ValueError(f"unknown template {template!r}")
    return out


# The object phrases of the templates that name objects, by the end of each phrase in the question (the
# phrase's last word is where `object_phrases` places it); "the object in the <position>" names a region, and
# "Is there a ...?" may match several objects: neither is listed.
_RELATION_WORDS = "|".join(RELATIONS)
_PHRASE_PATTERNS = (
    re.compile(rf"^Is the (?P<a>.+?) (?:{_RELATION_WORDS}) the (?P<b>.+?)\?$"),  # rel_yesno
    re.compile(rf"^What color is the object (?:{_RELATION_WORDS}) the (?P<b>.+?)\?$"),  # rel_color
    re.compile(r"^Where is the (?P<a>.+?)\?$"),  # where
    re.compile(r"^What (?:color|shape) is the (?P<a>(?!object in the ).+?)\?$"),  # color_of, shape_of
)


def object_phrases(question: str) -> list[tuple[int, str]]:
    """(end of the phrase in `question`, phrase) for each object the question names by its words, in order:
    "Is the red circle above the blue square?" -> [(17, "red circle"), (39, "blue square")]."""
    for pattern in _PHRASE_PATTERNS:
        if m := pattern.match(question):
            return [(m.end(g), m.group(g)) for g in ("a", "b") if g in pattern.groupindex]
    return []


def find_object(scene: dict[str, Any], phrase: str) -> dict[str, Any] | None:
    """The one object of the scene that every word of the phrase names (colour, shape, size; "object" names
    none), else None."""
    words = [w for w in phrase.split() if w != "object"]
    found = [o for o in scene["objects"] if all(w in (o["shape"], o["color"], o["size"]) for w in words)]
    return found[0] if len(found) == 1 else None


def object_centre(obj: dict[str, Any]) -> tuple[float, float]:
    """An object's centre in pixels: the free layout's (x, y), the grid's bounding-box centre."""
    x0, y0, x1, y1 = obj["bbox"]
    return obj.get("x", (x0 + x1) / 2), obj.get("y", (y0 + y1) / 2)


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
                    "question_id": scene["image_id"] * QID_FACTOR + len(out),
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


def answer_vocab(template: str, max_objects: int) -> tuple[str, ...]:
    """Every answer a template's questions can have: what a simulated human picks a wrong answer from."""
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


def qa_rows(scenes: Iterable[dict]) -> Iterable[dict]:
    """The question records of scenes, in order."""
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
    for r in qa_rows(train_scenes):
        by_q[r["question"]][r["answer"]] += 1
        by_t[r["template"]][r["answer"]] += 1
        every[r["answer"]] += 1

    def predict(r: dict) -> str | None:
        for table in (by_q.get(r["question"]), by_t.get(r["template"]), every):
            if table:
                return table.most_common(1)[0][0]
        return None

    hits: dict[str, list[int]] = defaultdict(list)
    for r in qa_rows(test_scenes):
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
