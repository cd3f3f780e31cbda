"""The reward model (`gpt2mm.reward`): AUC against a naive count, last-token reading under any padding,
the packed (prefix-tree) path against one answer at a time, save/load, the scorer, the simulated taggers
against the world's ground truth, `gpt2mm reward train` end to end, and its refusals of bad input."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_image
from gpt2mm.cli import main
from gpt2mm.data.synthetic import load_scenes, write_world
from gpt2mm.reward.data import split_by_image
from gpt2mm.reward.metrics import roc_auc
from gpt2mm.reward.model import (
    RewardModel,
    RewardScorer,
    encode,
    pack_prefix_trees,
    pad_right,
)
from gpt2mm.reward.simulate import _TEMPLATE_VOCAB, EASY_NEGATIVE, NEAR_MISS, POSITIVE, VOCABS, simulate_tags
from gpt2mm.tag.store import TagRecord, open_db, read_tags, write_jsonl

QA = [
    ("What color is the circle?", "red"),
    ("How many objects are there?", "3"),
    ("Is the blue square to the left of the red circle?", "no"),
    ("Where is the green cross?", "top left"),
]


@pytest.fixture(scope="module", params=[False, True], ids=["head", "lm_prior"])
def reward(tiny_pair, request) -> RewardModel:
    torch.manual_seed(1)
    model, processor = tiny_pair
    r = RewardModel(model, processor, lm_prior=request.param).eval()
    torch.nn.init.normal_(r.head.weight, std=0.5)  # a head that tells answers apart
    if r.lm_prior:
        r.lm_scale.data.fill_(0.7)
    return r


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, n_train=10, n_val=2, n_test=4, questions_per_image=4, seed=0)
    return root


@pytest.fixture(scope="module")
def base_dir(tiny_pair, tmp_path_factory) -> Path:
    """The tiny model saved like a stage-1 checkpoint."""
    model, processor = tiny_pair
    path = tmp_path_factory.mktemp("base") / "sft"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def pixels(processor, seeds) -> torch.Tensor:
    return processor.preprocess_images([make_image(s) for s in seeds])


def one_at_a_time(reward, ids, pix) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                reward(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long), pix[i : i + 1])
                for i, s in enumerate(ids)
            ]
        )


# --- metrics --------------------------------------------------------------------------------------------


def naive_auc(labels, scores) -> float:
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_the_naive_pairwise_count():
    rng = random.Random(0)
    for trial in range(50):
        n = rng.randint(2, 40)
        labels = [rng.random() < 0.4 for _ in range(n)]
        labels[0], labels[1] = True, False
        # few distinct values in half the trials: many ties
        scores = [rng.randint(0, 4) / 4 if trial % 2 else rng.random() for _ in range(n)]
        assert roc_auc(labels, scores) == pytest.approx(naive_auc(labels, scores), abs=1e-12)
    assert roc_auc([True, True], [0.1, 0.2]) is None
    assert roc_auc([True, False], [0.9, 0.1]) == 1.0 and roc_auc([True, False], [0.1, 0.9]) == 0.0


# --- the model ------------------------------------------------------------------------------------------


def test_reward_model_reads_the_last_real_token_with_any_padding(reward):
    processor = reward.processor
    ids = [encode(processor, q, a) for q, a in QA]
    assert len({len(s) for s in ids}) > 1  # different lengths: padding matters
    pix = pixels(processor, range(len(ids)))
    single = one_at_a_time(reward, ids, pix)
    right_ids, right_mask = pad_right(ids, processor.tokenizer.pad_token_id)
    width = right_ids.shape[1]
    left_ids = torch.stack(
        [torch.cat([torch.zeros(width - len(s), dtype=torch.long), torch.tensor(s)]) for s in ids]
    )
    left_mask = torch.stack(
        [torch.cat([torch.zeros(width - len(s)), torch.ones(len(s))]).long() for s in ids]
    )
    with torch.no_grad():
        right = reward(right_ids, right_mask, pix)
        left = reward(left_ids, left_mask, pix)
    assert right.shape == (len(ids),) and right.dtype == torch.float32
    torch.testing.assert_close(right, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, single, atol=1e-5, rtol=1e-5)
    assert single.std() > 1e-3  # the answers get different scores (a test that can fail)


def test_packed_prefix_trees_give_the_one_at_a_time_scores(reward):
    processor = reward.processor
    # two images: the first asked two questions with two answers each, the second one question
    groups = [
        [encode(processor, QA[0][0], "red"), encode(processor, QA[0][0], "blue"),
         encode(processor, QA[1][0], "3"), encode(processor, QA[1][0], "4")],
        [encode(processor, QA[3][0], "top left")],
    ]  # fmt: skip
    marker = reward.answer_marker if reward.lm_prior else None
    packed_inputs = pack_prefix_trees(groups, processor.tokenizer.pad_token_id, answer_marker=marker)
    width = packed_inputs["input_ids"].shape[1]
    assert width < sum(len(s) for s in groups[0]) / 2  # the image and the questions are shared
    pix = pixels(processor, [7, 8])
    with torch.no_grad():
        packed = reward.forward_packed(**packed_inputs, pixel_values=pix)
    flat = [s for g in groups for s in g]
    single = one_at_a_time(reward, flat, pix[[0, 0, 0, 0, 1]])
    torch.testing.assert_close(packed, single, atol=1e-5, rtol=1e-5)


def test_lm_prior_is_the_models_own_answer_log_likelihood(tiny_pair):
    """The lm_prior term against the reference: the causal-LM loss of the multimodal model on the answer
    tokens (labels from `encode_example`), summed."""
    model, processor = tiny_pair
    r = RewardModel(model, processor, lm_prior=True).eval()
    torch.nn.init.zeros_(r.head.weight)
    pix = pixels(processor, range(len(QA)))
    for i, (q, a) in enumerate(QA):
        enc = processor.encode_example(q, a)
        ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
        with torch.no_grad():
            loss = model(input_ids=ids, pixel_values=pix[i : i + 1], labels=labels).loss
            mine = r(ids, torch.ones_like(ids), pix[i : i + 1])
        n_answer = int((labels[:, 1:] != -100).sum())
        assert mine.item() == pytest.approx(-loss.item() * n_answer, rel=1e-5, abs=1e-5)


def test_pairwise_loss_and_the_logistic_fit_against_naive_versions():
    from gpt2mm.reward.metrics import fit_logistic_1d, pairwise_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, generator=g)
    targets = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0], dtype=torch.float)
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4])
    naive = [
        torch.nn.functional.softplus(logits[j] - logits[i])
        for i in range(12)
        for j in range(12)
        if group[i] == group[j] and targets[i] == 1 and targets[j] == 0
    ]  # group 2 has no correct answer, group 3 no incorrect one: no pairs
    assert len(naive) == 2 + 2 + 1
    torch.testing.assert_close(pairwise_loss(logits, targets, group), torch.stack(naive).mean())
    # the logistic fit recovers the parameters that generated the labels
    x = torch.randn(20000, generator=g) * 3
    y = (torch.rand(20000, generator=g) < torch.sigmoid(1.5 * x - 2.0)).float()
    a, b = fit_logistic_1d(x, y, torch.ones_like(x))
    assert a == pytest.approx(1.5, abs=0.1) and b == pytest.approx(-2.0, abs=0.1)


def test_save_load_gives_bit_identical_scores_and_the_scorer_matches(reward, tmp_path):
    processor = reward.processor
    out = tmp_path / "rm"
    reward.save_pretrained(out)
    assert not list(tmp_path.glob("*.tmp")) and (out / "reward_config.json").is_file()
    loaded = RewardModel.from_pretrained(out).eval()
    ids = [encode(processor, q, a) for q, a in QA]
    pix = pixels(processor, range(len(ids)))
    x, mask = pad_right(ids, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(reward(x, mask, pix), loaded(x, mask, pix))

    paths = []
    for i in range(len(ids)):
        make_image(i).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    images = [paths[0], None, paths[2], paths[3], paths[0]]
    questions = [q for q, _ in QA] + [QA[0][0]]
    answers = [a for _, a in QA] + ["blue"]
    scorer = RewardScorer(out, batch_size=2)
    got = scorer(images, questions, answers)
    assert len(got) == 5 and all(0.0 <= p <= 1.0 for p in got)
    from gpt2mm.data.images import load_image

    want = []
    with torch.no_grad():
        for im, q, a in zip(images, questions, answers):
            s = encode(processor, q, a, with_image=im is not None)
            pv = processor.preprocess_images([load_image(im)]) if im else None
            want.append(
                torch.sigmoid(reward(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long), pv)).item()
            )
    assert got == pytest.approx(want, abs=1e-5)
    assert scorer(images, questions, answers) == got  # again, from the image cache
    # a cache smaller than a batch: the new images evict cached ones of the same batch (a PPO run over more
    # images than the cache holds met this as a KeyError)
    small = RewardScorer(out, batch_size=5, max_cached_images=2)
    assert small(images[:3], questions[:3], answers[:3]) == pytest.approx(want[:3], abs=1e-5)
    order = [3, 2, 0, 4]  # 2 and 0 cached, 3 new: adding it evicts one of them
    assert small([images[i] for i in order], [questions[i] for i in order], [answers[i] for i in order]) == (
        pytest.approx([want[i] for i in order], abs=1e-5)
    )
    assert len(small._vision) == 2
    with pytest.raises(ValueError, match="differ in length"):
        scorer(images, questions, answers[:2])


# --- the simulated taggers ------------------------------------------------------------------------------


def test_simulated_tags_agree_with_the_ground_truth(world):
    truth = {
        qa["question_id"]: (qa, scene) for scene in load_scenes(world, "train") for qa in scene["questions"]
    }
    rows = simulate_tags(world, "train", per_question=3, near_miss_share=0.6, seed=0)
    assert len(rows) == 3 * len(truth)
    kinds = [r.kind for r in rows]
    assert kinds.count(POSITIVE) == len(truth)
    assert kinds.count(NEAR_MISS) >= kinds.count(EASY_NEGATIVE) > 0
    for r in rows:
        qa, scene = truth[int(r.question_id.split("/")[0])]
        assert Path(r.image).is_file() and r.image.endswith(scene["file_name"])
        vocab = VOCABS[_TEMPLATE_VOCAB[qa["template"]]]
        if r.kind == POSITIVE:
            assert r.label and r.answer == qa["answer"]
        else:
            assert not r.label and r.answer != qa["answer"]
            assert (r.answer in vocab) == (r.kind == NEAR_MISS)
        if r.kind == NEAR_MISS and qa["template"].startswith("count"):
            assert abs(int(r.answer) - int(qa["answer"])) == 1
    # the default: half positives, near misses at least as many as easy negatives
    rows2 = simulate_tags(world, "train", seed=0)
    assert sum(r.label for r in rows2) * 2 == len(rows2)
    assert sum(r.kind == NEAR_MISS for r in rows2) >= sum(r.kind == EASY_NEGATIVE for r in rows2)


def test_extra_questions_come_from_the_asked_families_and_are_new(world):
    rows = simulate_tags(world, "train", extra_questions=3, extra_families=["relation", "position"], seed=0)
    asked = {(s["image_id"], qa["question"]) for s in load_scenes(world, "train") for qa in s["questions"]}
    extra = [r for r in rows if "x" in r.question_id]
    assert extra and {r.family for r in extra} <= {"relation", "position"}
    by_image: dict[str, set[str]] = {}
    for r in extra:
        image_id = int(r.question_id.split("x")[0])
        assert (image_id, r.question) not in asked
        by_image.setdefault(image_id, set()).add(r.question)
    assert max(len(q) for q in by_image.values()) <= 3
    assert sum(r.label for r in rows) * 2 == len(rows)


def test_model_answers_are_tagged_by_the_vqa_metric(world):
    """Full VQA credit (at least 4 of the 10 human answers) is correct; 0.9 (3 of 10) is not."""
    qas = [qa for scene in load_scenes(world, "test") for qa in scene["questions"]][:3]
    refs = {qa["question_id"]: ["alpha"] * 4 + ["beta"] * 3 + [qa["answer"]] * 3 for qa in qas}
    answers = dict(zip([qa["question_id"] for qa in qas], ["alpha", "beta", qas[2]["answer"]]))
    rows = simulate_tags(world, "test", model_answers=answers, references=refs)
    model = {int(r.question_id.split("/")[0]): r for r in rows if r.kind == "model"}
    assert model[qas[0]["question_id"]].label and not model[qas[1]["question_id"]].label
    assert qas[2]["question_id"] not in model  # the truth is already a candidate: not repeated


def test_simulated_tags_are_deterministic_in_the_seed_and_noise_flips_labels(world, tmp_path):
    a, b = simulate_tags(world, "test", seed=3), simulate_tags(world, "test", seed=3)
    assert a == b
    assert [r.answer for r in simulate_tags(world, "test", seed=4)] != [r.answer for r in a]
    flipped = simulate_tags(world, "test", seed=3, noise=[1.0])
    assert [r.label for r in flipped] == [not r.label for r in a]
    # JSONL through the tag store: the extra keys are written, and read_tags ignores them
    path = tmp_path / "tags.jsonl"
    write_jsonl(a, path)
    assert json.loads(path.read_text().splitlines()[0])["kind"] == POSITIVE
    assert [(r.answer, r.label) for r in read_tags(path)] == [(r.answer, r.label) for r in a]


def test_holdout_split_is_by_image():
    images = [f"im{i % 7}.png" for i in range(50)]
    train, held = split_by_image(50, images, [""] * 50, 0.3, seed=0)
    assert sorted(train + held) == list(range(50)) and held
    assert not {images[i] for i in train} & {images[i] for i in held}


# --- the command ----------------------------------------------------------------------------------------


def test_reward_train_end_to_end(world, base_dir, tmp_path, capsys):
    tags, heldout = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    assert main(["reward", "simulate", "--world", str(world), "--split", "train", "--out", str(tags)]) == 0
    simulate_test = ["reward", "simulate", "--world", str(world), "--split", "test", "--out", str(heldout)]
    assert main([*simulate_test, "--base", str(base_dir), "--batch-size", "8"]) == 0  # + the model's answers
    assert "near_miss" in capsys.readouterr().out
    model_rows = [json.loads(line) for line in heldout.read_text().splitlines() if '"kind": "model"' in line]
    assert model_rows  # the random model's answers are new (never the truth, so tagged incorrect)
    assert not any(r["label"] for r in model_rows if r["answer"] != r["references"][0])
    out = tmp_path / "rm"
    args = ["reward", "train", "--tags", str(tags), "--eval-tags", str(heldout), "--base", str(base_dir),
            "--out", str(out), "--steps", "12", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "0",
            "--no-progress", "--log-every", "3"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out: accuracy" in printed and "near_miss" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    h = metrics["heldout"]
    assert {"accuracy", "auc", "n", "positives", "by_kind", "by_family"} <= set(h)
    assert h["n"] == len(read_tags(heldout)) and set(h["by_kind"]) == {
        POSITIVE,
        NEAR_MISS,
        EASY_NEGATIVE,
        "model",
    }
    assert metrics["steps"] == 12 and metrics["head_moved"] and metrics["packing_max_abs_diff"] < 1e-4
    assert [r["step"] for r in metrics["history"] if "loss" in r] == [3, 6, 9, 12]
    # trained: the head and the language model moved, the frozen vision tower did not
    before, after = load_file(str(base_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key in before:
        if key.startswith("vision_tower."):
            assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("language_model.h."))
    assert RewardScorer(out)([None], ["Is there a red circle?"], ["yes"])[0] > 0.0
    assert json.loads((out / "reward_config.json").read_text())["lm_prior"] is True
    assert {"lm_scale", "bias", "train_accuracy"} <= set(metrics["lm_prior_init"])
    # a reward model continues training from its directory (head and lm_scale included)
    more = [*args[: args.index("--base") + 1], str(out), "--out", str(tmp_path / "rm2"), "--steps", "2",
            "--no-progress"]  # fmt: skip
    assert main(more) == 0
    assert json.loads((tmp_path / "rm2" / "metrics.json").read_text())["lm_prior_init"] is None
    no_prior = [*more, "--no-lm-prior", "--out", str(tmp_path / "rm3")]
    assert "pass the same --lm-prior" in _error(no_prior, capsys)


def test_reward_train_on_a_learnable_sqlite_set_with_holdout(tmp_path, base_dir):
    """Tags from a tag database; the label is the answer ("yes" correct, "no" incorrect): learnable. With
    the vision tower trained too (pixels instead of cached vision states)."""
    db = tmp_path / "tags.sqlite"
    conn = open_db(db)
    for i in range(24):
        make_image(i).save(tmp_path / f"{i}.png")
        for j, answer in enumerate(("yes", "no")):
            conn.execute(
                "INSERT INTO items (question_id, image, question, answer) VALUES (?, ?, ?, ?)",
                (f"{i}/{j}", f"{i}.png", "Is there a red circle?", answer),  # relative: to the db's folder
            )
            conn.execute(
                "INSERT INTO tags (item_id, tagger, label) VALUES (last_insert_rowid(), 'me', ?)",
                ("correct" if answer == "yes" else "incorrect",),
            )
    conn.close()
    out = tmp_path / "rm"
    args = ["reward", "train", "--tags", str(db), "--holdout", "0.25", "--base", str(base_dir), "--out", str(out),
            "--epochs", "6", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2", "--no-progress",
            "--train-vision"]  # fmt: skip
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["tags"]["heldout"] == 12 and m["tags"]["train"] == 36  # 6 of the 24 images held out
    assert m["heldout"]["accuracy"] == 1.0 and m["heldout"]["auc"] == 1.0
    assert "by_kind" not in m["heldout"]
    before, after = load_file(str(base_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("vision_tower.encoder"))


def _error(args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_reward_train_refuses_bad_input(tmp_path, base_dir, backbone_dirs, capsys):
    def rows(labels, image):
        return [
            TagRecord(f"q{i}", image, "Is there a red circle?", "yes", lab) for i, lab in enumerate(labels)
        ]

    make_image(0).save(tmp_path / "a.png")
    good = tmp_path / "good.jsonl"
    write_jsonl(rows([True, False], str(tmp_path / "a.png")), good)
    cases = {
        "no tag file": tmp_path / "absent.jsonl",
        "no correct / incorrect tags": tmp_path / "empty.jsonl",
        "all 2 tags are correct": tmp_path / "one_class.jsonl",
        "name images that do not exist": tmp_path / "missing.jsonl",
    }
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(rows([True, True], str(tmp_path / "a.png")), cases["all 2 tags are correct"])
    write_jsonl(rows([True, False], str(tmp_path / "nowhere.png")), cases["name images that do not exist"])
    for message, tags in cases.items():
        err = _error(
            ["reward", "train", "--tags", str(tags), "--base", str(base_dir), "--out", str(tmp_path / "o")],
            capsys,
        )
        assert message in err, err
    gpt2 = backbone_dirs[1]  # a plain GPT-2: not a gpt2mm model
    for base, message in ((gpt2, "model_type 'gpt2'"), (tmp_path, "has no config.json")):
        err = _error(
            ["reward", "train", "--tags", str(good), "--base", str(base), "--out", str(tmp_path / "o")],
            capsys,
        )
        assert "not a gpt2mm model" in err and message in err, err
    assert "--tags" in _error(
        ["reward", "train", "--base", str(base_dir), "--out", str(tmp_path / "o")], capsys
    )
    assert "--lr" in _error(
        ["reward", "train", "--tags", str(good), "--base", str(base_dir), "--out", "o", "--lr", "x"], capsys
    )
    assert not (tmp_path / "o").exists()


def test_reward_train_never_replaces_its_base_or_a_folder_without_overwrite(tmp_path, base_dir, capsys):
    """--out is written whole at the end: checked before any work, it may not be --base (nor hold it), and a
    folder with files in it is replaced only with --overwrite."""
    make_image(0).save(tmp_path / "a.png")
    good = tmp_path / "good.jsonl"
    write_jsonl([TagRecord(f"q{i}", str(tmp_path / "a.png"), "Is there a red circle?", "yes", lab)
                 for i, lab in enumerate([True, False])], good)  # fmt: skip
    base = tmp_path / "run" / "best"
    shutil.copytree(base_dir, base)
    before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    train = ["reward", "train", "--tags", str(good), "--eval-tags", str(good), "--base", str(base), "--steps",
             "1", "--batch-size", "2", "--no-progress"]  # fmt: skip
    for out in (base, base.parent):
        assert "would replace --base" in _error([*train, "--out", str(out)], capsys)
    kept = tmp_path / "rm"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert "already holds files" in _error([*train, "--out", str(kept)], capsys)
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before
    assert (kept / "notes.txt").read_text() == "mine"
    assert main([*train, "--out", str(kept), "--overwrite"]) == 0  # asked for: replaced
    assert (kept / "reward_config.json").is_file() and not (kept / "notes.txt").exists()
    assert "already holds a reward model" in _error([*train, "--out", str(kept)], capsys)
