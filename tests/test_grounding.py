"""Grounded phrases (`data.grounding: objects`): which objects a question names, where their phrases end in the
token sequence, the loss, and training with it (gpt2mm.train.grounding)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SMALL
from gpt2mm.cli import main
from gpt2mm.data.synthetic import (
    RELATIONS,
    find_object,
    object_centre,
    object_phrases,
    relation_holds,
    write_world,
)
from gpt2mm.errors import UsageError
from gpt2mm.train.grounding import centres_loss, collate_centres, collate_grounding, grounding_loss

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo-sft.yaml"


@pytest.fixture(scope="module", params=["grid", "free"])
def world(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"world-{request.param}")
    write_world(root, n_train=40, n_val=6, n_test=6, seed=0, layout=request.param, questions_per_image=8)
    return root


def scenes_of(world: Path, split: str = "train") -> list[dict]:
    return json.loads((world / "scenes" / f"{split}_scenes.json").read_text())


def test_the_objects_a_question_names_are_those_its_answer_is_about(world):
    """Reference: the world's own rules. The object a phrase finds has the colour, shape or position the answer
    gives; for "Is the A <relation> the B?" `relation_holds` on the two found objects gives the answer; for "What
    color is the object <relation> the B?" the one object in that relation to the found B has the answer's colour."""
    checked = {"color": 0, "shape": 0, "where": 0, "relation": 0, "relation color": 0}
    for scene in scenes_of(world):
        for q in scene["questions"]:
            text, answer = q["question"], q["answer"]
            phrases = object_phrases(text)
            for end, phrase in phrases:
                assert text[:end].endswith(" " + phrase)
            found = [find_object(scene, p) for _, p in phrases]
            assert all(o is not None for o in found), text  # the world asks only about objects it can name
            if text.startswith("Is the "):
                a, b = found
                rel = next(r for r in RELATIONS if f" {r} the " in text)
                assert relation_holds(a, rel, b, scene) == (answer == "yes")
                checked["relation"] += 1
            elif text.startswith("What color is the object ") and phrases:
                (b,) = found
                rel = next(r for r in RELATIONS if f" {r} the " in text)
                hits = [o for o in scene["objects"] if o is not b and relation_holds(o, rel, b, scene)]
                assert [o["color"] for o in hits] == [answer]
                checked["relation color"] += 1
            elif text.startswith("Where is the "):
                assert found[0]["position"] == answer
                checked["where"] += 1
            elif text.startswith(("What color is the ", "What shape is the ")) and phrases:
                key = "color" if text.startswith("What color") else "shape"
                assert found[0][key] == answer
                checked[key] += 1
            else:
                assert phrases == []  # counts, existence, "the object in the <region>"
    assert all(n > 0 for n in checked.values()), checked


def test_object_phrases_leave_out_questions_that_name_no_single_object():
    assert object_phrases("What color is the object in the top left?") == []
    assert object_phrases("Is there a red circle?") == []
    assert object_phrases("How many objects are there?") == []
    assert object_phrases("Is the red circle above the blue square?") == [
        (17, "red circle"),
        (39, "blue square"),
    ]
    assert object_centre({"bbox": [16, 0, 32, 16]}) == (24.0, 8.0)  # the grid's objects: their box's centre
    assert object_centre({"bbox": [10, 5, 19, 14], "x": 14.2, "y": 9.4}) == (14.2, 9.4)


def trainer(world: Path, out: Path, *extra: str):
    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig
    from gpt2mm.train.sft import SFTTrainer

    args = [
        *SMALL, "--data.root", str(world), "--data.synth", "false", "--data.grounding", "objects",
        "--train.output_dir", str(out), "--train.batch_size", "4", "--train.eval_every", "0",
        "--train.progress", "false", "--train.log_with", "[]", *extra,
    ]  # fmt: skip
    return SFTTrainer(load_config(SFTConfig, RECIPE, args), log=lambda m: None)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--data.pack_questions", "8", "--data.conversation_mix", "true", "--data.independent_turns", "true"],
        [
            "--data.pack_questions",
            "8",
            "--data.max_length",
            "80",
        ],  # packs cut short: phrases past the cut drop
    ],
    ids=["single", "packs+conversations", "truncated"],
)
def test_each_target_sits_on_its_phrases_last_token_and_holds_the_objects_centre(world, tmp_path, extra):
    """Reference: the decoded sequence. For every target, the text up to its token ends with an object phrase of
    the question being asked there, and the target is that object's centre as a fraction of the image in [-1, 1];
    every phrase of every question in the kept tokens has a target."""
    run = trainer(world, tmp_path / "run", *extra)
    scenes = {s["file_name"]: s for s in scenes_of(world)}
    tok = run.processor.tokenizer
    targets = expected = 0
    for e in run.examples:
        sample = run.train_samples[e.index]
        scene = scenes[Path(sample.image).name]
        text = tok.decode(e.input_ids)
        questions = [t.text for t in sample.turns if t.role == "user"]
        for index, x, y in e.grounding:
            before = tok.decode(e.input_ids[: index + 1])
            question = before.rsplit("Q:", 1)[1].replace(run.processor.image_token, "").strip()
            # the question asked there, cut at one of its phrases' ends (two questions may share that beginning)
            matches = {p for q in questions for end, p in object_phrases(q) if q[:end] == question}
            assert len(matches) == 1, (before, questions)
            obj = find_object(scene, matches.pop())
            cx, cy = object_centre(obj)
            assert (x, y) == pytest.approx((2 * cx / scene["width"] - 1, 2 * cy / scene["height"] - 1))
            assert -1 <= x <= 1 and -1 <= y <= 1
            targets += 1
        # every phrase the sequence holds whole, in any question (one cut after the phrase included)
        plain = " ".join(text.replace(run.processor.image_token, " ").split())
        starts = {f"Q: {q[:end]}" for q in questions for end, _ in object_phrases(q)}
        expected += sum(plain.count(start) for start in starts)
    assert targets == expected > 0


def test_the_loss_is_the_mean_squared_error_over_the_batchs_phrases(world):
    """Reference: a loop over the targets."""
    torch.manual_seed(0)

    class E:
        def __init__(self, grounding):
            self.grounding = grounding

    examples = [E([(3, 0.5, -0.25), (7, -1.0, 1.0)]), E([]), E([(0, 0.1, 0.2)]), E(None)]
    batch = collate_grounding(examples)
    hidden = torch.randn(4, 9, 6)
    head = torch.nn.Linear(6, 2)
    naive = []
    with torch.no_grad():
        for i, e in enumerate(examples):
            for t, x, y in e.grounding or ():
                p = head(hidden[i, t])
                naive.append((p[0] - x) ** 2 + (p[1] - y) ** 2)
        loss = grounding_loss(hidden, head, batch, len(naive))
        assert float(loss) == pytest.approx(float(sum(naive) / len(naive)), rel=1e-6)
        empty = collate_grounding([E([]), E(None)])
        assert float(grounding_loss(hidden[:2], head, empty, 1)) == 0.0


@pytest.mark.parametrize("centres", ["0", "1"], ids=["phrases", "phrases+centres"])
def test_a_step_is_the_same_whatever_the_micro_batches(world, tmp_path, centres):
    """The grounding losses are divided by the whole batch's phrases and images, as the answers' loss by its
    answers: one micro-batch of 8 or two of 4 (with different phrase counts) give the same step to rounding."""
    runs = [
        trainer(
            world,
            tmp_path / f"r{k}",
            "--train.batch_size",
            "8",
            "--train.grad_accum",
            str(k),
            "--train.centres_weight",
            centres,
        )
        for k in (1, 2)
    ]
    batch = runs[0]._next_batch()
    if centres == "1":  # the second run's first micro-batch without centre targets (an image without a scene)
        for run in runs:
            for i in batch[:4]:
                run.examples[i].centres = None
    counts = []
    for run in runs:
        micro = run._micro_batches(batch)
        counts.append([int(b["grounding_mask"].sum()) for b in micro])
        run._optimizer_step(micro)
    assert len(counts[1]) == 2 and counts[1][0] != counts[1][1] and sum(counts[1]) == counts[0][0]
    a, b = (dict(r.model.named_parameters()) for r in runs)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)
    assert torch.allclose(runs[0].grounding_head.weight, runs[1].grounding_head.weight, atol=1e-6, rtol=1e-5)
    if centres == "1":
        assert "centres_mask" not in runs[1]._micro_batches(batch)[0]
        for name in ("weight", "bias"):
            a, b = (getattr(r.centres_head, name) for r in runs)
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        "{}",
        "{vision_stem: cnn, vision_config: {patch_size: 8}, vision_feature_layer: 0}",
        "{vision_drop_cls: true}",
    ],
    ids=["patches", "cnn-stem", "no-class-token"],
)
def test_centre_targets_count_the_objects_whose_centre_lies_in_each_patch(world, tmp_path, overrides):
    """Reference: each patch's own pixel square (objects whose centre falls in it, counted by a loop over
    patches), and the vision tower itself for which token is which patch: changing one patch's pixels changes
    the tower's features most at the token the targets give that patch (CLIP's patch embedding and the demo's
    CNN stem with the class token first, and without a class token)."""
    run = trainer(world, tmp_path / "run", "--train.centres_weight", "1", "--model.overrides", overrides)
    scenes = {s["file_name"]: s for s in scenes_of(world)}
    image = run.processor.image_token_id
    cls = int(not run.model.config.vision_drop_cls)
    side = round((run.processor.num_image_tokens - cls) ** 0.5)
    assert side * side + cls == run.processor.num_image_tokens and side == (6 if "cnn" in overrides else 3)
    for e in run.examples:
        start, cells = e.centres
        scene = scenes[Path(run.train_samples[e.index].image).name]
        assert e.input_ids[start - cls : start + side * side] == [image] * (cls + side * side)
        assert start - cls == 0 or e.input_ids[start - cls - 1] != image  # the image's first token
        pw, ph = scene["width"] / side, scene["height"] / side
        naive = []
        for row in range(side):
            for col in range(side):
                inside = [
                    o for o in scene["objects"]
                    if col * pw <= object_centre(o)[0] < (col + 1) * pw
                    and row * ph <= object_centre(o)[1] < (row + 1) * ph
                ]  # fmt: skip
                naive.append(float(len(inside)))
        assert cells == naive and sum(cells) == len(scene["objects"])
    # which token is which patch: the class token first, then the patches in raster order
    size = run.model.config.vision_config.image_size
    patch = size // side
    pixels = torch.zeros(1, 3, size, size)
    run.model.eval()
    with torch.no_grad():
        base = run.model.get_vision_hidden_states(pixels)
        for row, col in ((0, side - 1), (side - 1, 0), (side // 2, side // 2)):
            changed = pixels.clone()
            changed[..., row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = 1.0
            moved = (run.model.get_vision_hidden_states(changed) - base).norm(dim=-1)[0, cls:]
            assert int(moved.argmax()) == row * side + col


def test_the_centres_loss_is_the_squared_error_summed_over_each_images_patches():
    """Reference: a loop over the images and their patches."""
    torch.manual_seed(0)

    class E:
        def __init__(self, centres):
            self.centres = centres

    examples = [E((2, [0.0, 1.0, 2.0, 0.0])), E(None), E((0, [1.0, 0.0, 0.0, 1.0]))]
    batch = collate_centres(examples)
    hidden = torch.randn(3, 8, 6)
    head = torch.nn.Linear(6, 1)
    with torch.no_grad():
        naive = 0.0
        for i, e in enumerate(examples):
            if e.centres is not None:
                start, cells = e.centres
                naive += sum((float(head(hidden[i, start + k])) - c) ** 2 for k, c in enumerate(cells))
        assert float(centres_loss(hidden, head, batch, 2)) == pytest.approx(naive / 2, rel=1e-6)


def train_args(world: Path, out: Path, grounding: str = "objects") -> list[str]:
    return [
        "train", str(RECIPE), *SMALL, "--data.root", str(world), "--data.synth", "false",
        "--data.grounding", grounding, "--data.val_limit", "12", "--train.output_dir", str(out),
        "--train.batch_size", "8", "--train.max_steps", "6", "--train.warmup_steps", "2", "--train.eval_every", "3",
        "--train.save_every", "3", "--train.keep_last", "3", "--train.log_every", "1", "--train.progress", "false",
        "--train.log_with", "[]",
    ]  # fmt: skip


def test_training_with_grounding_resumes_exactly_and_saves_a_plain_model(world, tmp_path):
    centres = ["--train.centres_weight", "1"]
    full = tmp_path / "full"
    assert main(train_args(world, full) + centres) == 0
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grounding_loss"] > 0 and r["centres_loss"] > 0 for r in rows if "loss" in r)
    state = torch.load(full / "checkpoint-3" / "trainer_state.pt", weights_only=False)
    assert set(state["grounding_head"]) == set(state["centres_head"]) == {"weight", "bias"}
    # the same run stopped after step 3, then resumed: the same weights at the end (the heads' state resumed too)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-3", part / "checkpoint-3")
    assert main(train_args(world, part) + centres + ["--resume"]) == 0
    a, b = (
        load_file(str(full / "checkpoint-6" / "model.safetensors")),
        load_file(str(part / "checkpoint-6" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the model is the model without grounding: the same keys; and the loss moved it elsewhere
    # (train.centres_weight applies with data.grounding only)
    plain = tmp_path / "plain"
    assert main(train_args(world, plain, grounding="none") + centres) == 0
    rows = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert not any("centres_loss" in r or "grounding_loss" in r for r in rows)
    c = load_file(str(plain / "checkpoint-6" / "model.safetensors"))
    assert c.keys() == a.keys()
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("language_model.h.0."))


def test_a_resume_without_the_heads_state_is_refused(world, tmp_path):
    plain = tmp_path / "plain"
    assert main(train_args(world, plain, grounding="none")) == 0
    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig
    from gpt2mm.train.sft import SFTTrainer

    with pytest.raises(UsageError, match="without data.grounding"):
        SFTTrainer(
            load_config(SFTConfig, RECIPE, train_args(world, plain)[2:]), resume=True, log=lambda m: None
        )
    phrases = tmp_path / "phrases"
    assert main(train_args(world, phrases) + ["--train.centres_weight", "0"]) == 0
    with pytest.raises(UsageError, match="without train.centres_weight"):
        args = train_args(world, phrases)[2:] + ["--train.centres_weight", "1"]
        SFTTrainer(load_config(SFTConfig, RECIPE, args), resume=True, log=lambda m: None)


def test_bad_grounding_settings_name_what_is_wrong(world, tmp_path):
    with pytest.raises(ValueError, match="data.grounding must be one of objects"):
        trainer(world, tmp_path / "a", "--data.grounding", "boxes")
    with pytest.raises(UsageError, match="grounding_layer 9: GPT-2 has 4 blocks"):
        trainer(world, tmp_path / "b", "--train.grounding_layer", "9")
    with pytest.raises(ValueError, match="grounding_weight"):
        trainer(world, tmp_path / "c", "--train.grounding_weight", "0")
    with pytest.raises(ValueError, match="data.grounding needs train.precision"):
        trainer(world, tmp_path / "e", "--train.precision", "fp16")
    with pytest.raises(ValueError, match="train.centres_weight must be 0 or more"):
        trainer(world, tmp_path / "f", "--train.centres_weight", "-1")
    bare = tmp_path / "bare"
    shutil.copytree(world, bare)
    shutil.rmtree(bare / "scenes")
    with pytest.raises(UsageError, match="needs the synthetic world's"):
        trainer(bare, tmp_path / "d")
