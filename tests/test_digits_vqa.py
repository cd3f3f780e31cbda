"""The second data set (bench/digits_vqa.py: scikit-learn's handwritten digits composed into pictures) reaches
gpt2mm in each of the four formats as the same questions, answers and pictures, and its held-out split holds
only digit scans that no training picture holds."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")
pytest.importorskip("datasets")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "digits_vqa.py"


def _module():
    spec = importlib.util.spec_from_file_location("digits_vqa", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    mod = _module()
    root = tmp_path_factory.mktemp("digits")
    mod.build(root, n_train=12, n_val=3, n_test=4, seed=1)
    return mod, root


def _pixels(path: str) -> bytes:
    return np.asarray(Image.open(path).convert("RGB")).tobytes()


def _triples(samples) -> Counter:
    """(picture's pixels, question, answer) of every question, packed conversations unrolled."""
    out = Counter()
    for s in samples:
        pix = _pixels(s.image)
        for q, a in zip(s.turns[::2], s.turns[1::2]):
            out[(pix, q.text, a.text)] += 1
    return out


def test_the_four_formats_hold_the_same_questions(digits, tmp_path):
    from gpt2mm.data.llava import load_llava
    from gpt2mm.data.sources import load_csv, load_hf
    from gpt2mm.data.vqa import load_vqa

    mod, root = digits
    vqa, _ = load_vqa(
        root / "vqa/train_questions.json",
        root / "vqa/train_annotations.json",
        root / "vqa/images/train",
        image_pattern="{image_id}.png",
    )
    llava, _ = load_llava(root / "llava/train_llava.json", root / "llava/images")
    csv_samples, _ = load_csv(root / "csv/train.csv")
    hf, _ = load_hf(root / "hf", split="train", image_cache=tmp_path / "cache")
    assert len(vqa) == 12 * len(mod.FAMILIES)
    expected = _triples(vqa)
    for other in (llava, csv_samples, hf):
        assert _triples(other) == expected
    assert {s.answers[0] for s in vqa} <= {*mod.COUNT_WORDS, *"0123456789", "yes", "no"}


def test_answers_follow_the_pictures_digits(digits):
    """Re-derive every answer from the composed digits (a naive second reading of the rules)."""
    import random

    mod, _ = digits
    pool = mod.digit_pools(1)["train"]
    rng = random.Random(5)
    for _ in range(30):
        _, placed = mod.compose(rng, pool)
        values = [p["value"] for p in placed]
        xs = [p["box"][0] + p["box"][2] for p in placed]
        assert xs == sorted(xs) and 1 <= len(values) <= 4
        for family, question, answer in mod.questions_for(rng, placed):
            if family == "count":
                assert answer == mod.COUNT_WORDS[len(values) - 1]
            elif family == "leftmost":
                assert answer == str(values[0])
            elif family == "largest":
                assert answer == str(max(values))
            else:
                asked = int(question.removeprefix("is there a ").removesuffix("?"))
                assert answer == ("yes" if asked in values else "no")


def test_held_out_scans_are_not_in_training():
    mod = _module()
    pools = mod.digit_pools(0)
    seen = {g.tobytes() for g, _ in pools["train"]}
    assert not any(g.tobytes() in seen for g, _ in pools["test"])
    assert len(pools["test"]) == mod.POOLS["test"] and len(pools["val"]) == mod.POOLS["val"]


def test_blind_baseline_is_the_question_prior(digits):
    mod, root = digits
    blind = mod.blind_baseline(root)
    assert set(blind) == {"all", *mod.FAMILIES}
    assert all(0.0 <= v <= 100.0 for v in blind.values())


def test_hf_rows_of_one_picture_share_one_cached_file_and_pack(digits, tmp_path):
    """The hf copy holds each picture's bytes once per question: the image cache names files by content, so
    the questions about one picture pack into one sample, as they do from the VQA files."""
    from gpt2mm.data.sources import load_hf
    from gpt2mm.data.splits import pack_by_image

    mod, root = digits
    hf, _ = load_hf(root / "hf", split="train", image_cache=tmp_path / "cache")
    assert len({s.image for s in hf}) == 12
    assert len(pack_by_image(hf, 8, seed=0)) == 12
