"""`gpt2mm demo` end to end on a small budget: the summary's numbers are the official tool's."""

from __future__ import annotations

import json
import re

import pytest

from gpt2mm.cli import main


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
    world = out / "world"
    assert main(["vqa-score", "--questions", str(world / "test_questions.json"), "--annotations",
                 str(world / "test_annotations.json"), "--results", str(out / "test_results.json"),
                 "--json", str(tmp_path / "scores.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "scores.json").read_text())["overall"] == summary["test_accuracy"]
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
    assert summary["instruct_steps"] >= 1 and summary["test_accuracy"] == summary["instruct_test_accuracy"]
    for key in ("instruct_description_scores", "description_scores_before_instruct"):
        assert set(summary[key]) == {"precision", "recall", "f1"}
        assert all(0 <= v <= 100 for v in summary[key].values())
    world = out / "world"
    for results, key in (
        ("test_results.json", "sft_test_accuracy"),
        ("ppo_test_results.json", "ppo_test_accuracy"),
        ("instruct_test_results.json", "instruct_test_accuracy"),
    ):
        scores = tmp_path / f"{key}.json"
        assert main(["vqa-score", "--questions", str(world / "test_questions.json"), "--annotations",
                     str(world / "test_annotations.json"), "--results", str(out / results),
                     "--json", str(scores)]) == 0  # fmt: skip
        assert json.loads(scores.read_text())["overall"] == summary[key]
    # the PPO run wrote its metrics, KL included
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("kl" in r and "reward" in r for r in rows)


def test_fast_settings_use_bf16_only_where_the_cpu_has_it(monkeypatch):
    import torch

    from gpt2mm.demo import fast_settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for native, precision in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        assert fast_settings() == {"precision": precision, "attn_implementation": "eager"}


def test_stage_minutes_default_to_shares_of_the_budget_and_bad_ones_are_refused(capsys):
    from argparse import Namespace

    from gpt2mm.demo import stage_minutes
    from gpt2mm.errors import UsageError

    def minutes(total, stages, ppo=None, instruct=None):
        args = Namespace(minutes=total, stages=",".join(stages), ppo_minutes=ppo, instruct_minutes=instruct)
        return stage_minutes(args, stages)

    assert minutes(15, ["sft", "ppo", "instruct"]) == pytest.approx((5.0, 3.0))
    assert minutes(2, ["sft", "ppo", "instruct"]) == pytest.approx((2 / 3, 0.4))  # fits any budget
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
