"""How a model answers the synthetic world's position questions, axis by axis, from `gpt2mm eval --out`:

    gpt2mm eval MODEL --questions W/test_questions.json --annotations W/test_annotations.json \
        --images W/images --out answers.json
    python bench/position_errors.py W answers.json

- "Is the X left of / right of / above / below the Y?": accuracy by axis (x for left and right, y for above and
  below), by relation, by the true answer, and by how far apart the two centres are along the axis (the free
  layout asks only when they are at least `RELATION_MARGIN` of the side apart; the grid compares cells).
- "Where is the X?": how often the row word (top, middle, bottom) and the column word (left, centre, right) of
  the answer are right, each on its own ("centre" alone is the middle row's centre column).

The objects are found in the scene by the words of their description (colour, shape, size; "object" names
none). The last line printed is one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpt2mm.data.synthetic import COLUMNS, RELATIONS, ROWS, find_object, position_name  # noqa: E402

RELATION = re.compile(rf"Is the (.+?) ({'|'.join(RELATIONS)}) the (.+?)\?$")
# "top left" -> ("top", "left"), ..., "centre" -> ("middle", "centre"): the world's own names of its regions
WORDS = {position_name(r, c): (row, col) for r, row in enumerate(ROWS) for c, col in enumerate(COLUMNS)}


def row_and_column(answer: str) -> tuple[str | None, str | None]:
    """("top", "left") for "top left", ("middle", "centre") for "centre"; None where a word is not a position."""
    if answer in WORDS:
        return WORDS[answer]
    words = answer.split()
    if len(words) != 2:
        return None, None
    return (words[0] if words[0] in ROWS else None), (words[1] if words[1] in COLUMNS else None)


def tally(world: Path, answers: Path, split: str = "test") -> dict[str, dict[str, float]]:
    scenes = json.loads((world / "scenes" / f"{split}_scenes.json").read_text())
    given = {r["question_id"]: r["answer"] for r in json.loads(answers.read_text())}
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])

    def add(key: str, ok: bool) -> None:
        counts[key][0] += 1
        counts[key][1] += ok

    for scene in scenes:
        grid = scene.get("layout", "grid") == "grid"
        for q in scene["questions"]:
            answer = given.get(q["question_id"])
            if answer is None:
                continue
            m = RELATION.match(q["question"])
            if m and q["answer"] in ("yes", "no"):
                relation = m.group(2)
                axis = "x" if relation in ("to the left of", "to the right of") else "y"
                ok = answer == q["answer"]
                add("relation: all", ok)
                add(f"relation: {relation}", ok)
                add(f"relation {axis}: all", ok)
                add(f"relation {axis}: answer {q['answer']}", ok)
                a, b = find_object(scene, m.group(1)), find_object(scene, m.group(3))
                if a and b:
                    if grid:
                        d = abs(a["col"] - b["col"]) if axis == "x" else abs(a["row"] - b["row"])
                        add(f"relation {axis}: {d} cells apart", ok)
                    else:
                        d = abs(a["x"] - b["x"]) if axis == "x" else abs(a["y"] - b["y"])
                        lo = min(int(d // 8) * 8, 24)
                        add(f"relation {axis}: {lo}{'+' if lo == 24 else f'-{lo + 8}'} px apart", ok)
            elif q.get("question_type") == "where is the":
                true_row, true_col = row_and_column(q["answer"])
                row, col = row_and_column(answer)
                add("where: row word", row == true_row)
                add("where: column word", col == true_col)
                add("where: both", answer == q["answer"])
    return {k: {"n": n, "accuracy": round(100 * c / n, 2)} for k, (n, c) in sorted(counts.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("world", type=Path, help="the world's folder (gpt2mm synth WORLD ...)")
    ap.add_argument("answers", type=Path, help="the answers, from gpt2mm eval ... --out FILE")
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    scenes = args.world / "scenes" / f"{args.split}_scenes.json"
    if not scenes.is_file():
        ap.error(f"{scenes}: no such file (give the folder gpt2mm synth wrote)")
    if not args.answers.is_file():
        ap.error(f"{args.answers}: no such file (write it with gpt2mm eval MODEL ... --out FILE)")
    rows = tally(args.world, args.answers, args.split)
    if not rows:
        ap.error(f"no position question of {scenes} is answered in {args.answers}")
    for key, r in rows.items():
        print(f"{key:34s} {r['n']:5d}  {r['accuracy']:6.2f}%")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
