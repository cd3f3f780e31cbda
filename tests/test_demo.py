"""`gpt2mm demo` end to end on a small budget: the summary's numbers are the official tool's."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest

from gpt2mm.cli import main
from gpt2mm.train.args import load_config
from gpt2mm.train.config import SFTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def assert_official_scores(out: Path, tmp_path: Path, summary: dict, files: dict[str, str]) -> None:
    """Each summary figure (`files`: results file -> key) and its breakdown per answer type is what
    `gpt2mm vqa-score` gives on that file."""
    world = out / "world"
    for results, key in files.items():
        scores = tmp_path / f"{key}.json"
        assert main(["vqa-score", "--questions", str(world / "test_questions.json"), "--annotations",
                     str(world / "test_annotations.json"), "--results", str(out / results),
                     "--json", str(scores)]) == 0  # fmt: skip
        official = json.loads(scores.read_text())
        assert official["overall"] == summary[key]
        assert official["perAnswerType"] == summary[f"{key}_per_answer_type"]


def test_demo_writes_an_honest_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--minutes", "0.6", "--train-images", "60", "--test-images", "12"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_accuracy", "blind_accuracy", "train_seconds", "samples_seen", "sft_test_accuracy"):
        assert key in summary
    assert 0 <= summary["test_accuracy"] <= 100 and 0 <= summary["blind_accuracy"] < 50
    assert summary["samples_seen"] == summary["steps"] * 32
    # the reported accuracy is what the official scorer gives on the written results
    assert_official_scores(out, tmp_path, summary, {"test_results.json": "test_accuracy"})
    assert (out / "curves.png").is_file() and len(list((out / "examples").glob("*.png"))) >= 1
    printed = capsys.readouterr().out
    assert "truth:" in printed and "test accuracy" in printed
    # nothing already there is lost: a second run refuses, --overwrite replaces only a demo
    with pytest.raises(SystemExit):
        main(args)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "other"), "--overwrite"])
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        main([*args, "--overwrite", "--stages", "sft,instruct,ppo"])  # stages run in order


def test_demo_with_all_stages_records_each(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--minutes", "1.5", "--ppo-minutes", "0.1", "--instruct-minutes", "0.1",
            "--stages", "sft,ppo,instruct", "--train-images", "60", "--test-images", "12"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"] == ["sft", "ppo", "instruct"] and summary["ppo_updates"] >= 1
    assert summary["instruct_steps"] >= 1
    for figure in ("test_accuracy", "test_accuracy_per_answer_type", "test_accuracy_per_question_type"):
        assert summary[figure] == summary[f"instruct_{figure}"]  # the last stage's, breakdowns included
    for key in ("instruct_description_scores", "description_scores_before_instruct"):
        assert set(summary[key]) == {"precision", "recall", "f1"}
        assert all(0 <= v <= 100 for v in summary[key].values())
    assert_official_scores(out, tmp_path, summary, {
        "test_results.json": "sft_test_accuracy",
        "ppo_test_results.json": "ppo_test_accuracy",
        "instruct_test_results.json": "instruct_test_accuracy",
    })  # fmt: skip
    # the PPO run wrote its metrics, KL included
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("kl" in r and "reward" in r for r in rows)


def test_auto_settings_use_bf16_only_where_the_cpu_has_it(monkeypatch):
    import torch

    from gpt2mm.train.fast import fast_attn_implementation, fast_precision, resolve_auto

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    recipe = load_config(SFTConfig, CONFIGS / "demo-sft.yaml", [])
    assert (recipe.train.precision, recipe.model.attn_implementation) == ("auto", "auto")
    # gpt2mm's eager attention with bf16 on a CPU; SDPA in fp32
    for native, precision, attn in ((True, "bf16", "gpt2mm_eager"), (False, "fp32", "sdpa")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        assert (fast_precision(), fast_attn_implementation(precision)) == (precision, attn)
        resolved = resolve_auto(recipe)
        assert (resolved.train.precision, resolved.model.attn_implementation) == (precision, attn)
        assert recipe.train.precision == "auto"  # the recipe itself still says auto
    # a precision the recipe names decides the attention on a CPU with native bf16 too
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    fixed = load_config(SFTConfig, CONFIGS / "demo-sft.yaml", ["--train.precision", "fp32"])
    resolved = resolve_auto(fixed)
    assert (resolved.train.precision, resolved.model.attn_implementation) == ("fp32", "sdpa")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fast_attn_implementation("bf16") is None  # a GPU: the model's default (SDPA)


def demo_args(*argv: str):
    from gpt2mm.commands.demo import configure

    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(list(argv))


def fields(config) -> dict:
    return dataclasses.asdict(config)


def test_the_demo_trains_stage_1_with_configs_demo_sft(tmp_path):
    """The demo's stage 1 is configs/demo-sft.yaml with its world, output folder, seed and time budget only;
    at the demo's defaults the file's world (data.synth_args) is the demo's."""
    from gpt2mm import demo

    out = tmp_path / "demo"
    world = "{n_train: 10000, n_val: 100, n_test: 500, seed: 0, questions_per_image: 8, layout: free}"
    expected = load_config(SFTConfig, CONFIGS / "demo-sft.yaml", [
        "--data.root", str(out / "world"), "--data.synth_args", world,
        "--train.output_dir", str(out / "run"), "--train.seed", "0", "--train.max_minutes", "7.25",
    ])  # fmt: skip
    assert fields(demo.sft_config(demo_args("--out", str(out)), out, 7.25)) == fields(expected)
    recipe = load_config(SFTConfig, CONFIGS / "demo-sft.yaml", [])
    assert recipe.data.synth_args == demo.world_args(demo_args())
    assert recipe.data.synth and recipe.train.output_dir == "runs/demo-sft"
    # the demo's flags reach the world and the seed
    args = demo_args("--out", str(out), "--seed", "3", "--train-images", "60", "--test-images", "12")
    cfg = demo.sft_config(args, out, 1.5)
    assert cfg.data.synth_args == {
        "n_train": 60,
        "n_val": 100,
        "n_test": 12,
        "seed": 3,
        "questions_per_image": 8,
        "layout": "free",
    }
    assert demo.world_args(demo_args("--layout", "grid"))["layout"] == "grid"
    assert cfg.train.seed == 3 and cfg.train.max_minutes == 1.5
    # when stage 3 follows, stage 1 holds its peak rate (stage 3 decays from it); nothing else changes
    for stages, schedule in (
        ("sft,ppo", "wsd"),
        ("sft,instruct", "constant"),
        ("sft,ppo,instruct", "constant"),
    ):
        cfg = demo.sft_config(demo_args("--out", str(out), "--stages", stages), out, 7.25)
        assert fields(cfg) == fields(expected) | {"train": fields(expected.train) | {"schedule": schedule}}


def test_the_demo_trains_stages_2_and_3_with_configs_demo_ppo_and_instruct(tmp_path):
    from gpt2mm import demo
    from gpt2mm.rl.ppo import PPORecipe

    out, init = tmp_path / "demo", tmp_path / "demo" / "run" / "checkpoint-7"
    for name, cls, make in (
        ("ppo", PPORecipe, demo.ppo_config),
        ("instruct", SFTConfig, demo.instruct_config),
    ):
        expected = load_config(cls, CONFIGS / f"demo-{name}.yaml", [
            "--model.init_from", str(init), "--data.root", str(out / "world"),
            "--train.output_dir", str(out / name), "--train.seed", "0", "--train.max_minutes", "2.5",
        ])  # fmt: skip
        assert fields(make(out, 0, 2.5, init)) == fields(expected)
        recipe = load_config(cls, CONFIGS / f"demo-{name}.yaml", [])
        assert recipe.model.init_from.startswith("runs/demo-sft/") and recipe.data.root == "data/demo-world"

    # the files' time budgets are the demo's defaults (stage 2's as the last stage)
    def budgets(stages):
        args = argparse.Namespace(minutes=15.0, stages=stages, ppo_minutes=None, instruct_minutes=None)
        return demo.stage_minutes(args, stages.split(","))

    files = [load_config(cls, CONFIGS / f"demo-{name}.yaml", []).train.max_minutes
             for name, cls in (("ppo", PPORecipe), ("instruct", SFTConfig))]  # fmt: skip
    assert [budgets("sft,ppo")[0], budgets("sft,ppo,instruct")[1]] == pytest.approx(files)


def test_stage_3_is_the_decay_of_stage_1s_schedule(tmp_path):
    """Before stage 3 the demo's stage 1 stays at its peak rates; stage 3 starts from those same rates, every
    parameter group's, and decays them to stage 1's final ratio over its time budget."""
    from gpt2mm import demo
    from gpt2mm.train.optim import lr_lambda

    out = tmp_path / "demo"
    stage1 = demo.sft_config(demo_args("--out", str(out), "--stages", "sft,ppo,instruct"), out, 10.0).train
    stage3 = demo.instruct_config(out, 0, 2.25, out / "ppo" / "checkpoint-9").train
    for group in ("lr", "projector_lr", "vision_lr"):
        assert getattr(stage1, group) > 0 and getattr(stage3, group) == getattr(stage1, group)
    assert stage3.min_lr_ratio == stage1.min_lr_ratio
    seconds = [0.0]
    peak1, peak3 = lr_lambda(stage1, lambda: seconds[0]), lr_lambda(stage3, lambda: seconds[0])
    seconds[0] = 60 * stage1.max_minutes  # stage 1's last step: still the peak
    assert peak1(stage1.warmup_steps) == peak1(10**6) == 1.0
    seconds[0] = 0.0
    assert peak3(stage3.warmup_steps) == pytest.approx(1.0, abs=1e-4)
    seconds[0] = 30 * stage3.max_minutes
    halfway = (1 + stage3.min_lr_ratio) / 2  # linear in the clock
    assert peak3(stage3.warmup_steps + 1) == pytest.approx(halfway, abs=1e-3)
    seconds[0] = 60 * stage3.max_minutes
    assert peak3(stage3.warmup_steps + 1) == pytest.approx(stage3.min_lr_ratio)


def test_the_last_stage_takes_what_is_left_of_the_budget():
    """Stage 3 (at the demo's default share) trains until the demo's deadline less its evaluation time, when
    the earlier stages left more than its share; never less than its share."""
    import time

    from gpt2mm.demo import EVAL_RESERVE_S, last_stage_minutes

    assert last_stage_minutes(2.25, None) == 2.25
    assert last_stage_minutes(2.25, time.perf_counter() - 5) == 2.25  # past the deadline: its share
    left = last_stage_minutes(2.25, time.perf_counter() + 600)
    assert (600 - EVAL_RESERVE_S - 1) / 60 < left <= (600 - EVAL_RESERVE_S) / 60


def test_stage_minutes_default_to_shares_of_the_budget_and_bad_ones_are_refused(capsys):
    from argparse import Namespace

    from gpt2mm.demo import stage_minutes
    from gpt2mm.errors import UsageError

    def minutes(total, stages, ppo=None, instruct=None):
        args = Namespace(minutes=total, stages=",".join(stages), ppo_minutes=ppo, instruct_minutes=instruct)
        return stage_minutes(args, stages)

    # stage 3 carries the decay: three twentieths; stage 2 a tenth, a twentieth before stage 3
    assert minutes(15, ["sft", "ppo", "instruct"]) == pytest.approx((0.75, 2.25))
    assert minutes(15, ["sft", "ppo"]) == pytest.approx((1.5, 0.0))
    assert minutes(15, ["sft", "instruct"]) == pytest.approx((0.0, 2.25))
    assert minutes(2, ["sft", "ppo", "instruct"]) == pytest.approx((0.1, 0.3))  # fits any budget
    few = Namespace(
        minutes=15, stages="sft,ppo", ppo_minutes=None, instruct_minutes=None, labelled_fraction=0.1
    )
    # the few-labels demo's subject is stage 2: it keeps a third
    assert stage_minutes(few, ["sft", "ppo"]) == pytest.approx((5.0, 0.0))
    assert minutes(2, ["sft", "instruct"], instruct=1.5) == (0.0, 1.5)
    assert minutes(15, ["sft"]) == (0.0, 0.0)
    for args, message in (
        ((0, ["sft"]), "--minutes must be positive, got 0"),
        ((15, ["sft"], 2.0), "--ppo-minutes is for stage ppo, which --stages 'sft' does not run"),
        ((15, ["sft", "ppo"], -1.0), "--ppo-minutes must be 0 or more"),
        ((2, ["sft", "ppo", "instruct"], 1.5, 0.5), "must leave part of --minutes (2) to stage 1"),
    ):
        with pytest.raises(UsageError, match=re.escape(message)):
            minutes(*args)


def test_the_continued_baseline_goes_on_at_the_rates_stage_1_ended_on(tmp_path):
    """The "stage 1 continued" baseline trains every parameter group (GPT-2, projector, vision tower) at a
    constant rate: the one stage 1's own schedule reached at its end, read from that schedule."""
    from gpt2mm.few_labels import STAGE1_OVERRIDES, continued_config
    from gpt2mm.train.optim import lr_lambda

    overrides = ["--train.projector_lr", "1e-3", *STAGE1_OVERRIDES]  # the few-labels demo's stage 1
    stage1 = load_config(SFTConfig, CONFIGS / "demo-sft.yaml", overrides).train
    end = lr_lambda(stage1)(stage1.max_steps)  # the schedule's multiplier at its last step
    assert end > 0  # something to continue at
    cont = continued_config(tmp_path, "sft_continued", "labelled", tmp_path / "init", 0, 2.0, stage1).train
    for group in ("lr", "projector_lr", "vision_lr"):
        assert getattr(stage1, group) > 0
        assert getattr(cont, group) == pytest.approx(getattr(stage1, group) * end)
    assert (cont.schedule, cont.warmup_steps, cont.curriculum_steps, cont.max_minutes) == (
        "constant",
        0,
        0,
        2.0,
    )
    stage1 = dataclasses.replace(stage1, projector_lr=None)  # a group without its own rate follows lr
    assert (
        continued_config(tmp_path, "c", "labelled", tmp_path / "init", 0, 2.0, stage1).train.projector_lr
        is None
    )


def test_the_few_labels_demo_runs_stage_2_on_unlabelled_images_against_two_baselines(tmp_path, capsys):
    """`--labelled-fraction`: stage 1 on a tenth of the images; tags on its answers; a reward model; PPO on
    the rest with that reward alone (no answer of an unlabelled image reaches it); two baselines. Every
    accuracy in the summary is the official scorer's on the results file it wrote."""
    from gpt2mm.few_labels import UNLABELLED
    from gpt2mm.tag.store import read_tags

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--minutes", "0.8", "--ppo-minutes", "0.05", "--stages", "sft,ppo",
            "--labelled-fraction", "0.1", "--tags", "40", "--train-images", "200", "--test-images", "12"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    world = out / "world"
    # the split: 20 labelled images with their answers and descriptions, 180 whose answers are hidden
    labelled = json.loads((world / "labelled_train_annotations.json").read_text())["annotations"]
    hidden = json.loads((world / "unlabelled_train_annotations.json").read_text())["annotations"]
    everything = json.loads((world / "train_annotations.json").read_text())["annotations"]
    assert len({a["image_id"] for a in labelled}) == 20 and len({a["image_id"] for a in hidden}) == 180
    assert sorted(a["question_id"] for a in labelled + hidden) == sorted(a["question_id"] for a in everything)
    assert all({x["answer"] for x in a["answers"]} == {UNLABELLED} for a in hidden)
    truth = {a["question_id"]: a for a in everything}
    assert all(a == truth[a["question_id"]] for a in labelled)
    llava = json.loads((world / "labelled_train_llava.json").read_text())
    assert {int(r["id"]) for r in llava} == {a["image_id"] for a in labelled}
    # stage 2 read the hidden files, with the reward model alone
    recipe = (out / "ppo" / f"checkpoint-{summary['ppo_updates']}" / "recipe.yaml").read_text()
    assert "unlabelled_train_annotations.json" in recipe and f"reward: model:{out / 'reward'}" in recipe
    # the tags: the stage-1 model's answers about unlabelled images, 40 of them
    tags = read_tags(out / "tags.jsonl")
    assert len(tags) == summary["tags"] == 40
    assert {int(t.question_id) for t in tags} <= {a["question_id"] for a in hidden}
    assert (
        summary["tags_correct"] == sum(t.label for t in tags)
        and summary["reward_heldout_accuracy"] is not None
    )
    # every accuracy is the official scorer's on the answers written
    assert_official_scores(out, tmp_path, summary, {
        "test_results.json": "sft_test_accuracy",
        "ppo_test_results.json": "ppo_test_accuracy",
        "sft_continued_test_results.json": "baseline_sft_continued_test_accuracy",
        "self_training_test_results.json": "baseline_self_training_test_accuracy",
    })  # fmt: skip
    best = max(
        summary["baseline_sft_continued_test_accuracy"], summary["baseline_self_training_test_accuracy"]
    )
    assert summary["ppo_gain_over_best_baseline"] == round(summary["ppo_test_accuracy"] - best, 2)
    for name in ("sft_continued", "self_training"):  # the same training time as stage 2, give or take a step
        assert summary[f"baseline_{name}_train_seconds"] >= summary["ppo_train_seconds"] - 1
    # the scenario's options are refused where they do not apply
    capsys.readouterr()
    for extra, message in (
        (["--tags", "5"], "--tags go with --labelled-fraction"),
        (["--labelled-fraction", "0.1", "--stages", "sft"], "--labelled-fraction runs --stages sft,ppo"),
        (["--labelled-fraction", "1.0", "--stages", "sft,ppo"], "between 0 and 1"),
    ):
        with pytest.raises(SystemExit):
            main(["demo", "--out", str(tmp_path / "refused"), *extra])
        assert message in capsys.readouterr().err
