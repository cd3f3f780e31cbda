"""Detailed descriptions of a scene: the reference text the world writes, and the scoring of free text.

`describe` writes the LLaVA-style description of a scene; `parse_description` reads the object mentions
out of any description (a model's, in other words than ours) and `score_description` scores the facts
they state against the scene record (precision, recall, F1), as `gpt2mm report` does.
"""

from __future__ import annotations

import re
from typing import Any

from gpt2mm.data.synthetic.world import COLORS, MAX_OBJECTS, PLURALS, SHAPES, article, position_name

DESCRIBE_PROMPT = "Describe the image in detail."


def describe(scene: dict[str, Any]) -> str:
    """A detailed description stating each object's size, colour, shape and position (reading order)."""
    objs = scene["objects"]
    n = len(objs)
    parts = [f"There {'is' if n == 1 else 'are'} {n} object{'' if n == 1 else 's'} in the image."]
    for o in objs:
        parts.append(
            f"{article(o['size']).capitalize()} {o['size']} {o['color']} {o['shape']} is in the {o['position']}."
        )
    return " ".join(parts)


# --- parsing free text ----------------------------------------------------------------------------------

# A description's words for each attribute, mapped to the world's own (synonyms, plurals).
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
