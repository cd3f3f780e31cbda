"""Stages 1 and 3 through the real `gpt2mm train` entry point, a few CPU steps on a tiny world."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import SMALL
from gpt2mm.cli import main
from gpt2mm.config import IGNORE_INDEX
from gpt2mm.data.collate import encode_samples
from gpt2mm.data.synthetic import DESCRIBE_PROMPT, write_world
from gpt2mm.modeling import answer_weights

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo-sft.yaml"
# the demo's stage-1 recipe made the small one these tests are about: one question per sample, no conversations or
# curriculum, the preset's vision layer and attention, fp32, a schedule by steps only (no time budget)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, n_train=24, n_val=6, n_test=6, seed=0)
    return root


def train_args(world: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", str(RECIPE), *SMALL,
        "--data.root", str(world), "--data.synth", "false", "--data.val_limit", "12",
        "--train.output_dir", str(out), "--train.batch_size", "8", "--train.max_steps", "6",
        "--train.warmup_steps", "2", "--train.eval_every", "3", "--train.save_every", "3",
        "--train.log_every", "1", "--train.progress", "false", "--train.log_with", "[]",
        *extra,
    ]  # fmt: skip


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_stage1_smoke_moves_trainable_keeps_frozen_and_writes_checkpoints(world, tmp_path, backbone_dirs):
    from gpt2mm.loading import from_backbones

    # start from a model with a frozen vision tower (the seed's set-up), saved like a stage-0 checkpoint
    model, processor = from_backbones(*backbone_dirs, projector_num_heads=4, projector_ffn_dim=64)
    init = tmp_path / "init"
    model.save_pretrained(init)
    processor.save_pretrained(init)
    out = tmp_path / "run"
    assert main(train_args(world, out, "--model.init_from", str(init), "--train.vision_lr", "none")) == 0
    before, after = weights(init), weights(out / "checkpoint-6")
    for key in before:
        if key.startswith("vision_tower."):
            assert torch.equal(before[key], after[key]), f"frozen {key} changed"
    for prefix in ("projector.", "language_model.h.0."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    assert (out / "best" / "model.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(r["grad_norm"] > 0 for r in rows if "loss" in r)
    assert sum("val_accuracy" in r for r in rows) == 2
    # each checkpoint stands alone (gpt2mm.hub): the model's code, a card with the run's metrics, the recipe
    card = (out / "checkpoint-6" / "README.md").read_text()
    assert "gpt2mm train" in card and "| best_val_accuracy |" in card and f"`{init}`" in card
    assert (out / "checkpoint-6" / "modeling_gpt2mm.py").is_file() and (
        out / "best" / "recipe.yaml"
    ).is_file()


@pytest.mark.parametrize("average", ["tokens", "answers"])
def test_the_logged_grad_norm_is_the_whole_gradients_norm_before_clipping(world, tmp_path, average):
    """`grad_norm` in metrics.jsonl is what transformers' Trainer logs: the norm of the whole model's gradient
    before clipping. Reference: the same micro-batches through a copy of the model, the norm summed by hand,
    the loss averaged over the whole batch's labelled tokens or (`train.loss_average: answers`) answers."""
    import copy
    import math

    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig
    from gpt2mm.train.sft import SFTTrainer

    # the recipe's own model (CNN stem trained, 8 px patches), batch 4 split into two micro-batches, clipped hard
    args = train_args(
        world, tmp_path / "run", "--model.overrides", "{vision_stem: cnn}", "--train.vision_lr", "1e-4"
    )
    args += ["--train.batch_size", "4", "--train.grad_accum", "2", "--train.grad_clip", "1e-3"]
    args += ["--train.loss_average", average, "--data.pack_questions", "3"]
    run = SFTTrainer(load_config(SFTConfig, RECIPE, args[2:]), log=lambda m: None)
    micro = run._micro_batches(run._next_batch())
    assert len(micro) == 2
    reference = copy.deepcopy(run.model)
    labelled = torch.tensor(float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)))
    weights = [answer_weights(b["labels"]) if average == "answers" else None for b in micro]
    if average == "answers":
        labelled = sum(w.sum() for w in weights)  # the batch's answers
        assert labelled > 4  # several answers a sample
    torch.manual_seed(0)
    for batch, w in zip(micro, weights):
        reference(**batch, num_items_in_batch=labelled, loss_weights=w).loss.backward()
    naive = math.sqrt(
        sum(float(p.grad.double().pow(2).sum()) for p in reference.parameters() if p.grad is not None)
    )
    torch.manual_seed(0)
    _, grad_norm = run._optimizer_step(micro)
    assert naive > 1e-3  # so the step was clipped, and the norm logged is the one before
    assert grad_norm == pytest.approx(naive, rel=1e-4)


CURRICULUM = ["--data.difficulty", "objects", "--train.curriculum_steps", "4", "--data.pack_questions", "3"]


@pytest.mark.parametrize("extra", [[], CURRICULUM], ids=["plain", "curriculum+packing"])
def test_resume_ends_with_the_same_weights(world, tmp_path, extra):
    full = tmp_path / "full"
    assert main(train_args(world, full, "--train.keep_last", "3", *extra)) == 0
    # the same run, stopped after step 3: keep its checkpoint-3 only, then resume to the end
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-3", part / "checkpoint-3")
    assert main(train_args(world, part, "--train.keep_last", "3", *extra) + ["--resume"]) == 0
    a, b = weights(full / "checkpoint-6"), weights(part / "checkpoint-6")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_run_into_an_earlier_runs_folder_is_refused_unless_resumed_or_overwritten(
    world, tmp_path, capsys
):
    out = tmp_path / "run"
    args = ["--train.max_steps", "3", "--train.eval_every", "3", "--train.save_every", "3"]
    assert main(train_args(world, out, *args)) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(train_args(world, out, "--train.max_steps", "2"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        "holds an earlier run (best, checkpoint-3, metrics.jsonl)" in err and "--train.overwrite true" in err
    )
    assert {
        p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "notes.txt"
    } == before
    # asked for: the earlier run's files go, the new run's are alone in its metrics; other files stay
    assert main(train_args(world, out, "--train.max_steps", "2", "--train.overwrite", "true", *args[2:])) == 0
    assert "removed the earlier run's best, checkpoint-3, metrics.jsonl" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_removes_the_earlier_run_only_once_the_new_one_has_started(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(world, out, "--train.max_steps", "3", "--train.eval_every", "3")) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    overwrite = ["--train.overwrite", "true"]
    for extra, message in (
        (["--data.root", str(tmp_path / "absent")], "no such file"),  # the set-up fails: nothing is lost
        (["--model.init_from", str(out / "best")], "is part of the earlier run"),  # would delete its start
    ):
        with pytest.raises(SystemExit):
            main([*train_args(world, out, *overwrite), *extra])
        assert message in capsys.readouterr().err
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # a run stopped before its first checkpoint: nothing to resume, so --resume is not offered
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    with pytest.raises(SystemExit):
        main(train_args(world, tmp_path / "early"))
    err = capsys.readouterr().err.splitlines()[-1]  # (the usage line above it names --resume)
    assert "holds an earlier run (metrics.jsonl): give another" in err and "--resume" not in err


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("max_steps", "-5", "train.max_steps must be at least 1"),
        ("lr", "0", "train.lr must be positive"),
        ("projector_lr", "-1e-3", "train.projector_lr must be 0 or more (or none: train.lr), got -0.001"),
        ("vision_lr", "nan", "train.vision_lr must be 0 or more"),
        ("save_every", "-1", "train.save_every must be 0 or more"),
        ("max_minutes", "0", "train.max_minutes must be positive"),
        ("loss_average", "samples", "train.loss_average must be tokens or answers, got 'samples'"),
        ("model.preset", "huge", "model.preset must be one of seed, small, tiny, got 'huge'"),
    ],
)
def test_values_that_make_no_sense_are_refused(world, tmp_path, capsys, option, value, message):
    option = option if "." in option else f"train.{option}"
    with pytest.raises(SystemExit) as e:
        main(train_args(world, tmp_path / "run", f"--{option}", value))
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_from_a_checkpoint_that_does_not_exist_says_so(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*train_args(world, tmp_path / "run"), "--resume", str(tmp_path / "nope")])
    assert (
        e.value.code == 2 and f"--resume {tmp_path / 'nope'}: no such checkpoint" in capsys.readouterr().err
    )


def test_a_save_that_fails_leaves_the_checkpoint_before_it_as_it_was(tmp_path):
    from gpt2mm.train.checkpoints import atomic_dir, list_checkpoints

    final = tmp_path / "checkpoint-2"
    final.mkdir()
    (final / "trainer_state.pt").write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_dir(final) as tmp:
        (tmp / "trainer_state.pt").write_text("new")
        raise OSError("disk full")
    assert (final / "trainer_state.pt").read_text() == "old"
    assert list_checkpoints(tmp_path) == [final]  # the half-written one is not taken for a checkpoint
    with atomic_dir(final) as tmp:  # the next save clears the stale temporary and replaces the old one
        (tmp / "trainer_state.pt").write_text("new")
    assert (final / "trainer_state.pt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_stage1_labels_are_exactly_the_answer(world):
    from gpt2mm import build_model
    from gpt2mm.data.vqa import load_vqa

    _, processor = build_model("tiny")
    samples, _ = load_vqa(
        world / "val_questions.json", world / "val_annotations.json", world / "images" / "val"
    )
    encoded, report = encode_samples(samples, processor, max_length=128)
    assert report.kept == len(samples)
    eos = processor.tokenizer.eos_token_id
    for s, e in zip(samples, encoded):
        kept = [t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]
        assert processor.tokenizer.decode(kept) == " " + s.turns[1].text + "<|endoftext|>"
        assert kept[-1] == eos


def test_stage3_llava_from_stage1_checkpoint_labels_assistant_turns(world, tmp_path):
    from gpt2mm import build_model
    from gpt2mm.data.llava import load_llava

    stage1 = tmp_path / "stage1"
    assert main(train_args(world, stage1, "--train.max_steps", "2", "--train.eval_every", "0")) == 0
    out = tmp_path / "stage3"
    args = train_args(world, out, "--data.format", "llava", "--data.llava_train", "train_llava.json",
                      "--model.init_from", str(stage1 / "checkpoint-2"), "--train.eval_every", "0",
                      "--data.max_length", "400")  # fmt: skip
    assert main(args) == 0
    a, b = weights(stage1 / "checkpoint-2"), weights(out / "checkpoint-6")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    _, processor = build_model("tiny")
    samples, _ = load_llava(world / "train_llava.json", world / "images")
    encoded, _ = encode_samples(samples[:3], processor, max_length=400)
    for s, e in zip(samples, encoded):
        kept = [t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]
        expected = "".join(" " + t.text + "<|endoftext|>" for t in s.turns if t.role == "assistant")
        assert processor.tokenizer.decode(kept) == expected


def test_stage3_vqa_mix_adds_the_first_vqa_questions_to_the_conversations(world):
    from gpt2mm.data.llava import load_llava
    from gpt2mm.data.splits import load_samples
    from gpt2mm.data.vqa import load_vqa
    from gpt2mm.train.args import build
    from gpt2mm.train.config import SFTConfig

    conversations, _ = load_llava(world / "train_llava.json", world / "images")
    questions, _ = load_vqa(
        world / "train_questions.json", world / "train_annotations.json", world / "images/train"
    )
    data = {"root": str(world), "synth": False, "format": "llava"}
    for mix, expected in ((0, []), (5, questions[:5]), (-1, questions)):
        cfg = build(SFTConfig, {"data": data | {"vqa_mix": mix}})
        samples, summary = load_samples(cfg.data, "train")
        assert [(s.id, s.turns) for s in samples] == [(s.id, s.turns) for s in conversations + expected]
        assert ("mixed in" in summary) == bool(mix)
    # a VQA question and the conversation about the same image name the same file
    assert {Path(s.image).resolve() for s in conversations} == {Path(s.image).resolve() for s in questions}
    with pytest.raises(ValueError, match="vqa_mix.*format: llava"):
        build(SFTConfig, {"data": {"vqa_mix": 5}})
    with pytest.raises(ValueError, match="vqa_mix must be"):
        build(SFTConfig, {"data": data | {"vqa_mix": -2}})


@pytest.mark.parametrize("independent", [False, True], ids=["causal", "independent_turns"])
def test_conversation_mix_adds_each_conversation_with_its_description_last_unless_turns_are_independent(
    world, tmp_path, independent
):
    from gpt2mm.data.llava import load_llava
    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig
    from gpt2mm.train.sft import SFTTrainer

    conversations, _ = load_llava(world / "train_llava.json", world / "images")
    scenes = {sc["file_name"]: sc for sc in json.loads((world / "scenes" / "train_scenes.json").read_text())}
    args = train_args(world, tmp_path / "run", *CURRICULUM, "--data.pack_questions", "8")[2:]
    args += ["--data.independent_turns", str(independent).lower()]
    plain = SFTTrainer(load_config(SFTConfig, RECIPE, args), log=lambda m: None)
    mixed = SFTTrainer(
        load_config(SFTConfig, RECIPE, [*args, "--data.conversation_mix", "true"]), log=lambda m: None
    )
    n = len(plain.train_samples)
    assert [x.turns for x in mixed.train_samples[:n]] == [x.turns for x in plain.train_samples]  # packed VQA
    added = mixed.train_samples[n:]
    if independent:  # no question sees the description: it stays first, as the file has it, and whole
        assert [x.turns for x in added] == [c.turns for c in conversations]
        assert all(x.turns[0].text == DESCRIBE_PROMPT for x in added)
    else:  # after the questions, so that none reads its answer there
        assert [x.turns for x in added] == [c.turns[2:] + c.turns[:2] for c in conversations]
        assert all(x.turns[-2].text == DESCRIBE_PROMPT for x in added)
    # the curriculum's difficulty of a conversation (no image id in LLaVA records) comes by its file name
    assert [x.difficulty for x in added] == [len(scenes[Path(x.image).name]["objects"]) for x in added]
    with pytest.raises(ValueError, match="conversation_mix.*format: vqa"):
        load_config(SFTConfig, RECIPE, [*args, "--data.conversation_mix", "true", "--data.format", "llava"])


def test_truncation_never_cuts_the_image_or_the_whole_answer():
    from gpt2mm import build_model
    from gpt2mm.data.samples import Sample, Turn

    _, processor = build_model("tiny")
    long_answer = Sample("1", "x.png", [Turn("user", "Describe it."), Turn("assistant", "word " * 50)])
    long_question = Sample("2", "x.png", [Turn("user", "why " * 60), Turn("assistant", "yes")])
    encoded, report = encode_samples([long_answer, long_question], processor, max_length=40)
    assert [e.index for e in encoded] == [0] and report.truncated == 1
    assert report.skipped == {"answer entirely beyond max_length": 1}
    tiny, report = encode_samples([long_answer], processor, max_length=8)  # the image itself would be cut
    assert not tiny and "before the end of the image tokens" in report.summary()


def test_bad_recipe_options_name_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", str(RECIPE), "--train.lr", "fast"])
    assert "train.lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(RECIPE), "--train.nonsense", "1"])
    assert "unknown option train.nonsense" in capsys.readouterr().err


def test_feature_cache_training_matches_pixels(world, tmp_path):
    """With a frozen tower, training on cached vision features follows the pixel run (float16 cache)."""
    losses = {}
    for name, extra in (("pixels", []), ("cache", ["--data.feature_cache", str(tmp_path / "features")])):
        out = tmp_path / name
        assert main(train_args(world, out, "--train.vision_lr", "0", "--train.eval_every", "0", *extra)) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if "loss" in r]
    assert list((tmp_path / "features").iterdir())  # the cache was written
    assert losses["pixels"] == pytest.approx(losses["cache"], rel=1e-2)


def two_image_llava(world: Path, path: Path) -> Path:
    """LLaVA records about two images each (placeholders where they stand, or none), and one single-image
    record, from the world's training scenes."""
    scenes = json.loads((world / "scenes" / "train_scenes.json").read_text())
    records = []
    for i, (a, b) in enumerate(zip(scenes, scenes[1:] + scenes[:1])):
        n_a, n_b = len(a["objects"]), len(b["objects"])
        files = [f"train/{a['file_name']}", f"train/{b['file_name']}"]
        question = (
            "Image 1: <image>\nImage 2: <image>\nHow many objects are there in all?"
            if i % 2
            else "How many objects are there in all?"  # no placeholder: both images before the question
        )
        records.append(
            {
                "id": f"pair{i}",
                "image": files,
                "conversations": [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": str(n_a + n_b)},
                ],
            }
        )
    records.append(
        {
            "id": "one",
            "image": [f"train/{scenes[0]['file_name']}"],
            "conversations": [
                {"from": "human", "value": "<image>\nHow many?"},
                {"from": "gpt", "value": "3"},
            ],
        }
    )
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("cache", [False, True], ids=["pixels", "feature-cache"])
def test_training_on_two_image_llava_records(world, tmp_path, cache):
    """A few steps of stage 3 on LLaVA records with two images each: the batches carry every image (the
    model checks tokens against images) and the loss is finite; with a frozen tower the feature cache
    (keyed by image path) serves the images of every record."""
    from gpt2mm import build_model
    from gpt2mm.data.llava import load_llava

    data = two_image_llava(world, tmp_path / "pairs.json")
    samples, _ = load_llava(data, world / "images")
    encoded, report = encode_samples(samples, build_model("tiny")[1], max_length=128)
    assert report.kept == len(samples) == 25 and sum(len(e.images) == 2 for e in encoded) == 24
    out = tmp_path / "run"
    extra = ["--train.vision_lr", "0", "--data.feature_cache", str(tmp_path / "features")] if cache else []
    args = train_args(world, out, "--data.format", "llava", "--data.llava_train", str(data),
                      "--train.eval_every", "0", "--train.max_steps", "3", "--train.save_every", "3",
                      *extra)  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert (out / "checkpoint-3" / "model.safetensors").is_file()
    if cache:
        assert list((tmp_path / "features").iterdir())


@pytest.mark.parametrize("recipe", sorted((RECIPE.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses(recipe):
    from gpt2mm.rl.ppo import PPORecipe
    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig

    if "ppo" in recipe.name:  # stage 2's recipes are `gpt2mm ppo`'s
        cfg = load_config(PPORecipe, recipe, [])
        assert cfg.model.init_from and cfg.reward
        return
    cfg = load_config(SFTConfig, recipe, [])
    assert cfg.train.batch_size % cfg.train.grad_accum == 0


def test_two_processes_match_one_with_the_same_global_batch(world, tmp_path):
    """DDP on CPU (gloo), 2 processes x 4 samples == 1 process x 8: same losses, same weights."""
    args = ["--train.eval_every", "0", "--train.save_every", "0", "--train.max_steps", "3"]
    single = tmp_path / "single"
    assert main(train_args(world, single, *args)) == 0
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "gpt2mm.cli", *train_args(world, ddp, *args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    assert len(losses(ddp)) == 3
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-4)
    assert_same_training(single / "checkpoint-3", ddp / "checkpoint-3")


def assert_same_training(one: Path, two: Path) -> None:
    """Two checkpoints of the same steps, one trained by a single process and one by two: the same gradients and
    the same weights, to the rounding of a batch summed in another order.

    The gradients are compared through the optimizer's moments (AdamW's `exp_avg` is linear in them), at 1e-4 of
    each tensor's largest, the losses' tolerance. The weights cannot be held to that: AdamW divides each entry's
    gradient by its own running RMS, so an entry whose gradient is a thousandth of its tensor's largest turns a
    rounding difference at the tensor's scale into a percent of its step (measured: 1.1% of a step on a CPU with
    AMX, under 0.5% on one without). They are compared to a tenth of one step at the largest learning rate; a
    real difference moves most entries past that (a batch of 6 instead of 8: 76-90% of each matrix's entries,
    by up to 4 steps)."""
    oa, ob = (torch.load(c / "trainer_state.pt", weights_only=False)["optimizer"] for c in (one, two))
    assert [g["params"] for g in oa["param_groups"]] == [g["params"] for g in ob["param_groups"]]
    for i, state in oa["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            a = state[name]
            torch.testing.assert_close(ob["state"][i][name], a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    step = max(g["initial_lr"] for g in oa["param_groups"])
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()  # no sharded or duplicated (tied LM head) tensors
    for key in a:
        torch.testing.assert_close(
            b[key], a[key], rtol=0, atol=0.1 * step, msg=lambda m, key=key: f"{key}: {m}"
        )


def test_unreadable_image_fails_clearly_or_is_skipped_and_counted(tmp_path, capsys):
    world = tmp_path / "world"
    write_world(world, n_train=24, n_val=6, n_test=6, seed=1)
    victim = sorted((world / "images" / "train").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated PNG
    out = tmp_path / "run"
    with pytest.raises(SystemExit):  # without --data.skip_bad: a clear error that names the file
        main(train_args(world, out, "--train.eval_every", "0"))
    assert victim.name in capsys.readouterr().err
    assert (
        main(train_args(world, tmp_path / "run2", "--train.eval_every", "0", "--data.skip_bad", "true")) == 0
    )
    assert "1 unreadable images" in capsys.readouterr().out


def test_curriculum_starts_with_the_easiest_samples(world, tmp_path):
    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig
    from gpt2mm.train.sft import SFTTrainer

    args = train_args(world, tmp_path / "run", *CURRICULUM, "--train.curriculum_steps", "10")[2:]
    run = SFTTrainer(load_config(SFTConfig, RECIPE, args), log=lambda m: None)
    levels = [e.difficulty for e in run.examples]
    assert min(levels) < max(levels)
    first = run._curriculum_batch()
    assert {run.examples[i].difficulty for i in first} == {min(levels)}
    run.step = 10
    assert max(run.examples[i].difficulty for i in run._curriculum_batch()) > min(levels)
    run.step = 0
    assert run._curriculum_batch() == first  # a function of (seed, step)


def test_curriculum_blocks_group_their_batches_by_length(world, tmp_path):
    """A curriculum of 45 steps draws two steps' batches at a time (`curriculum_block`), without replacement, from
    the samples its first step allows, and groups them by length: the shorter batch's longest sample is no longer
    than the other's shortest. Where fewer samples are allowed than a block takes, the last step (alone in its
    block), steps past the end and runs without `length_grouping`, each step draws its own batch, as before blocks.
    A resumed run (a new trainer) draws the same batch for a step, in any order."""
    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig
    from gpt2mm.train.sft import SFTTrainer, curriculum_block

    assert [curriculum_block(n) for n in (19, 39, 40, 45, 1000, 5000)] == [1, 1, 2, 2, 50, 50]
    args = train_args(world, tmp_path / "run", *CURRICULUM, "--train.curriculum_steps", "45")[2:]

    def trainer(*extra):
        return SFTTrainer(load_config(SFTConfig, RECIPE, [*args, *extra]), log=lambda m: None)

    run = trainer()
    length = {i: len(e.input_ids) for i, e in enumerate(run.examples)}
    assert len(set(length.values())) > 1
    levels = sorted(e.difficulty for e in run.examples)
    by_level = sorted(range(len(run.examples)), key=lambda i: run.examples[i].difficulty)

    def own_batch(step):  # the per-step draw, as before blocks
        limit = levels[0] + (levels[-1] - levels[0]) * step / 45
        pool = by_level[: sum(d <= limit for d in levels)]
        g = torch.Generator().manual_seed(run.cfg.train.seed * 1000003 + 7919 * (step + 1))
        return [pool[i] for i in torch.randint(len(pool), (8,), generator=g).tolist()]

    batches, kinds = {}, Counter()
    for first in range(0, 44, 2):
        run.step = first
        a = run._curriculum_batch()
        run.step = first + 1
        b = run._curriculum_batch()
        batches[first], batches[first + 1] = a, b
        limit = levels[0] + (levels[-1] - levels[0]) * first / 45  # the block's first step's
        if sum(d <= limit for d in levels) < 16:
            assert (a, b) == (own_batch(first), own_batch(first + 1))
            kinds["own"] += 1
            continue
        assert len(a) == len(b) == 8 and len(set(a + b)) == 16  # without replacement
        assert all(run.examples[i].difficulty <= limit for i in a + b)
        short, long = sorted([a, b], key=lambda batch: max(length[i] for i in batch))
        assert max(length[i] for i in short) <= min(
            length[i] for i in long
        )  # the shorter half, the longer half
        kinds["block"] += 1
    assert kinds["own"] and kinds["block"], kinds  # both ways were tested
    for step in (44, 45, 47):  # the last block holds one step; past the end too
        run.step = step
        assert run._curriculum_batch() == own_batch(step)
    # the same batches from a new trainer, asked for in another order (a resumed run)
    again = trainer()
    for step in sorted(batches, reverse=True):
        again.step = step
        assert again._curriculum_batch() == batches[step]
    # without length grouping every step draws its own batch
    plain = trainer("--train.length_grouping", "false")
    for step in (0, 1, 21, 39):
        plain.step = step
        assert plain._curriculum_batch() == own_batch(step)


def test_defaults_run_without_a_recipe(world, tmp_path):
    args = train_args(world, tmp_path / "run", "--train.max_steps", "2", "--train.eval_every", "0")
    assert args[1] == str(RECIPE)
    assert main(["train", *args[2:]]) == 0  # "--train.max_steps 2": the 2 is a value, not a recipe
    assert (tmp_path / "run" / "checkpoint-2").is_dir()


def test_refuses_to_render_the_world_into_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        main(["train", "--data.root", str(tmp_path), "--train.output_dir", str(tmp_path / "run")])
    assert (
        "no synthetic world" in capsys.readouterr().err and (tmp_path / "mine.txt").read_text() == "keep me"
    )


# --- FSDP2 (accelerate's FSDP plugin) on 2 CPU processes (gloo) -------------------------------------------

FSDP_ARGS = ["--train.eval_every", "3", "--train.max_steps", "3", "--train.save_every", "2",
             "--train.keep_last", "5"]  # fmt: skip


def two_processes(world: Path, out: Path, port: int, *extra: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "gpt2mm.cli", *train_args(world, out, *FSDP_ARGS, *extra)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("FSDP2 over 2 processes") == 1  # the main process logs for both
    assert done.stdout.count("done: ") == 1


def losses(run: Path, key: str = "loss") -> list[float]:
    """The run's logged training losses (or another per-step figure: `key`), step by step."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def fsdp_run(world, tmp_path_factory) -> Path:
    """3 steps under FSDP2, selected as `accelerate launch --use_fsdp --fsdp_version 2` selects it (its
    environment variables); checkpoints at steps 2 and 3."""
    out = tmp_path_factory.mktemp("fsdp")
    two_processes(world, out, 29532, env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    return out


def test_fsdp_two_processes_match_one_with_the_same_global_batch(world, tmp_path, fsdp_run):
    """FSDP2 on CPU (gloo), 2 processes x 4 samples == 1 process x 8: same losses; the checkpoints are whole
    plain models (written by the main process from the gathered shards) with the same weights and optimizer
    state (`assert_same_training`: the gradient is summed over processes in another order)."""
    from gpt2mm import MultimodalGPT2ForConditionalGeneration

    single = tmp_path / "single"
    assert main(train_args(world, single, *FSDP_ARGS)) == 0
    assert len(losses(fsdp_run)) == 3
    assert losses(fsdp_run) == pytest.approx(losses(single), rel=1e-4)
    # the logged gradient norm is the whole model's, over both processes' shards
    assert losses(fsdp_run, "grad_norm") == pytest.approx(losses(single, "grad_norm"), rel=1e-4)
    # whole plain checkpoints, the optimizer state in torch's own format (parameters by position) as a single
    # process writes it: the same gradients and weights
    for step in ("checkpoint-2", "checkpoint-3"):
        assert_same_training(single / step, fsdp_run / step)
    b = weights(fsdp_run / "checkpoint-3")
    # evaluation (greedy generation, every process in step) and the best checkpoint it writes
    rows = [json.loads(line) for line in (fsdp_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_accuracy" in r] == [3]
    best = weights(fsdp_run / "best")
    assert best.keys() == b.keys() and all(torch.equal(best[k], b[k]) for k in b)
    model = MultimodalGPT2ForConditionalGeneration.from_pretrained(fsdp_run / "checkpoint-3")
    assert model.lm_head.weight is model.language_model.wte.weight
    assert all(torch.equal(v, b[k]) for k, v in model.state_dict().items() if k in b)


def test_fsdp_resume_ends_with_the_same_weights(world, tmp_path, fsdp_run):
    """The same FSDP run stopped after step 2 and resumed (the shards of the full optimizer state saved at step
    2) ends with the weights of the uninterrupted one; FSDP selected by the recipe option this time."""
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(fsdp_run / "checkpoint-2", part / "checkpoint-2")
    two_processes(world, part, 29533, "--train.fsdp", "true", "--resume")
    assert losses(part) == losses(fsdp_run)[2:]
    a, b = weights(fsdp_run / "checkpoint-3"), weights(part / "checkpoint-3")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_with_one_process_trains_unsharded_and_fsdp1_is_refused(world, tmp_path, capsys, monkeypatch):
    # one process: nothing to shard, a note, and no ACCELERATE_USE_FSDP left behind for the next run
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    args = train_args(world, tmp_path / "run", "--train.max_steps", "1", "--train.eval_every", "0")
    assert main([*args, "--train.fsdp", "true"]) == 0
    assert "single process has nothing to shard" in capsys.readouterr().out
    assert "ACCELERATE_USE_FSDP" not in os.environ
    # `accelerate launch --use_fsdp` alone asks for FSDP1: refused with the flag to add
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(SystemExit):
        main(args)
    assert "--fsdp_version 2" in capsys.readouterr().err


def test_compiled_training_follows_eager_training(world, tmp_path):
    """`train.compile` (torch.compile of each block) trains the same model: the same losses, step by step."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--train.compile", "true"])):
        out = tmp_path / name
        assert main(train_args(world, out, "--train.eval_every", "0", "--train.save_every", "0", *extra)) == 0
        runs[name] = losses(out)
    assert len(runs["eager"]) == 6
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)


def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward():
    """`model.gradient_checkpointing`: every GPT-2 block recomputed in the backward, with no deprecation warning,
    and the same loss and gradients as the model without it (dropout off: the recompute would redraw it)."""
    import warnings

    from gpt2mm.train.config import ModelConfig
    from gpt2mm.train.model import build_model_for_training

    grads, losses_ = {}, {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            model, _ = build_model_for_training(ModelConfig(gradient_checkpointing=ckpt))
        model.train()
        blocks = model.language_model.h
        assert all(b.gradient_checkpointing is ckpt for b in blocks)
        g = torch.Generator().manual_seed(1)
        cfg = model.config
        ids = torch.randint(2, 200, (2, cfg.num_image_tokens + 6), generator=g)
        ids[:, : cfg.num_image_tokens] = cfg.image_token_id
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -2:] = ids[:, -2:]
        size = cfg.vision_config.image_size
        pixels = torch.rand(2, 3, size, size, generator=g)
        calls, mlp_forward = 0, blocks[0].mlp.forward

        def counted(*args, mlp_forward=mlp_forward, **kwargs):  # (the recompute skips the module's hooks)
            nonlocal calls
            calls += 1
            return mlp_forward(*args, **kwargs)

        blocks[0].mlp.forward = counted
        loss = model(input_ids=ids, labels=labels, pixel_values=pixels).loss
        loss.backward()
        assert calls == (2 if ckpt else 1)  # the block's MLP ran again in the backward
        losses_[ckpt] = loss.item()
        grads[ckpt] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert losses_[True] == losses_[False]
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_turns_off_the_autocast_weight_cache(world, tmp_path):
    """Under gradient checkpointing, bf16 autocast must not keep a cast copy of every weight for the whole
    forward (that copy is much of the memory checkpointing saves)."""
    from gpt2mm.train.config import SFTConfig
    from gpt2mm.train.sft import SFTTrainer

    for ckpt in (False, True):
        cfg = SFTConfig()
        cfg.data.root, cfg.data.synth, cfg.train.output_dir = str(world), False, str(tmp_path / str(ckpt))
        cfg.train.precision, cfg.train.log_with = "bf16", []
        cfg.model.gradient_checkpointing = ckpt
        run = SFTTrainer(cfg, log=lambda *a: None)
        with run.acc.autocast():
            assert torch.is_autocast_enabled("cpu")
            assert torch.is_autocast_cache_enabled() is (not ckpt)
    # accelerate's state is one per process: a later run in it with another precision gets a fresh one
    cfg.train.precision = "fp32"
    run = SFTTrainer(cfg, log=lambda *a: None)
    assert run.acc.mixed_precision == "no"
    with run.acc.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_attention_implementation_option_trains_the_same_model(world, tmp_path, capsys):
    """`model.attn_implementation eager` and `gpt2mm_eager` (the demo's choice on a CPU in bf16) follow SDPA's
    losses step by step; a name transformers does not know is refused, naming the option."""
    runs = {}
    for name in ("sdpa", "eager", "gpt2mm_eager"):
        out = tmp_path / name
        extra = ["--train.eval_every", "0", "--train.save_every", "0", "--model.attn_implementation", name]
        assert main(train_args(world, out, *extra)) == 0
        runs[name] = losses(out)
    assert len(runs["eager"]) == 6
    assert runs["eager"] == pytest.approx(runs["sdpa"], rel=1e-4)
    assert runs["gpt2mm_eager"] == pytest.approx(runs["sdpa"], rel=1e-4)
    with pytest.raises(SystemExit):
        main(train_args(world, tmp_path / "bad", "--model.attn_implementation", "fastest"))
    assert "model.attn_implementation 'fastest'" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_a_time_budgets_progress_bar_ends_where_the_budget_is_projected_to_end():
    from types import SimpleNamespace

    from gpt2mm.train.logging import budget_bar_total

    bar = SimpleNamespace(initial=20, total=100_000)  # resumed at step 20 (30 s spent before this session)
    budget_bar_total(bar, 1.0, 100_000, step=30, seconds_this_session=5.0, seconds=35.0)
    assert bar.total == 30 + 50  # 0.5 s a step, 25 s of the minute left
    budget_bar_total(bar, 1.0, 60, 30, 5.0, 35.0)
    assert bar.total == 60  # max_steps comes first
    budget_bar_total(bar, None, 100_000, 30, 5.0, 35.0)
    assert bar.total == 60  # no time budget: left as it was


def test_stage1_trains_from_the_seeds_csv_and_from_a_hugging_face_dataset_folder(
    world, tmp_path, monkeypatch
):
    """data.format csv and hf reach `gpt2mm train`: the same questions in the three formats give the same
    training examples, and a run from each writes a checkpoint."""
    import csv

    datasets = pytest.importorskip("datasets")
    from gpt2mm.data.splits import load_samples
    from gpt2mm.train.args import build
    from gpt2mm.train.config import SFTConfig

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    vqa, _ = load_samples(build(SFTConfig, {"data": {"root": str(world)}}).data, "train")
    rows = [(s.image, f"Q: {s.turns[0].text} A: {s.turns[1].text}") for s in vqa]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    columns = {"image": [r[0] for r in rows], "question": [s.turns[0].text for s in vqa]}
    columns["answer"] = [s.turns[1].text for s in vqa]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)}).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "pq").mkdir()  # the same rows as parquet data files, read at once and streamed
    datasets.Dataset.from_dict(columns).to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    for fmt, extra in (
        ("csv", {}),
        ("hf", {}),
        ("hf", {"hf_dataset": "pq"}),
        ("hf", {"hf_dataset": "pq", "hf_streaming": True}),
    ):
        data = {"root": str(tmp_path), "format": fmt, "hf_dataset": "hf", "hf_val_split": None, **extra}
        samples, _ = load_samples(build(SFTConfig, {"data": data}).data, "train")
        assert [(s.image, s.turns) for s in samples] == [(s.image, s.turns) for s in vqa], extra
    for fmt in ("csv", "hf"):
        out = tmp_path / f"run-{fmt}"
        args = train_args(
            world, out, "--data.root", str(tmp_path), "--data.format", fmt, "--train.max_steps", "2"
        )
        args += ["--data.hf_dataset", "hf", "--data.hf_val_split", "none", "--train.eval_every", "0"]
        assert main(args) == 0 and (out / "checkpoint-2" / "model.safetensors").is_file()


def test_stage1_on_streamed_parquet_files_stops_at_a_bad_row_or_skips_and_counts_it(
    world, tmp_path, monkeypatch, capsys
):
    """data.format hf on parquet data files read row by row: a bad row is a one-line error naming the files
    and the row, and with data.skip_bad it is counted in the printed load report and training goes on."""
    datasets = pytest.importorskip("datasets")
    from gpt2mm.data.vqa import load_vqa

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    vqa, _ = load_vqa(
        world / "train_questions.json", world / "train_annotations.json", world / "images" / "train"
    )
    columns = {"image": [s.image for s in vqa], "question": [s.turns[0].text for s in vqa]}
    columns["answer"] = [s.turns[1].text for s in vqa]
    columns["answer"][5] = ""  # row 5: no answer to learn
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict(columns).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    out = tmp_path / "run"
    args = train_args(
        world, out, "--data.root", str(tmp_path), "--data.format", "hf", "--train.max_steps", "2"
    )
    args += ["--data.hf_dataset", "pq", "--data.hf_streaming", "true", "--data.hf_val_split", "none"]
    args += ["--train.eval_every", "0"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last
        == f"gpt2mm train: error: {tmp_path / 'pq'}: row 5: empty question or answer, or <image> in the answer"
    )
    assert main([*args, "--data.skip_bad", "true"]) == 0
    assert (
        f"{tmp_path / 'pq'}: {len(vqa) - 1} samples; skipped 1 record: 1 bad schema"
        in capsys.readouterr().out
    )
    assert (out / "checkpoint-2" / "model.safetensors").is_file()


def test_stage1_trains_on_vqa_files_whose_images_are_not_coco_named(world, tmp_path):
    """data.image_pattern: the world's images renamed to {image_id}.png in one folder train as before."""
    import shutil as sh

    flat = tmp_path / "flat"
    flat.mkdir()
    for split in ("train", "val"):
        for p in (world / "images" / split).iterdir():
            sh.copy(p, flat / f"{int(p.stem.rsplit('_', 1)[1])}.png")
        for kind in ("questions", "annotations"):
            sh.copy(world / f"{split}_{kind}.json", tmp_path / f"{split}_{kind}.json")
    out = tmp_path / "run"
    args = train_args(world, out, "--data.root", str(tmp_path), "--data.train_images", "flat")
    args += ["--data.val_images", "flat", "--data.image_pattern", "{image_id}.png", "--train.max_steps", "2"]
    assert main(args) == 0 and (out / "checkpoint-2" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in r for r in rows)  # the validation split's images were found too
