"""LoRA (peft) in stages 1 and 3: a few CPU steps of the real `SFTTrainer` on the tiny preset and a tiny world."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from gpt2mm.data.synthetic import write_world
from gpt2mm.errors import UsageError
from gpt2mm.train.args import load_config
from gpt2mm.train.config import LoraConfig, ModelConfig, SFTConfig
from gpt2mm.train.lora import ADAPTER_FILE, lora_layers, merged_state_dict
from gpt2mm.train.model import build_model_for_training
from gpt2mm.train.sft import SFTTrainer

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo-sft.yaml"


def lora_config(world: Path, out: Path, *extra: str) -> SFTConfig:
    """The demo's stage-1 recipe (frozen vision tower) with LoRA r=4, on unpacked questions only, in fp32, with a
    schedule by steps: 4 steps, checkpoints at 2 and 4, one eval."""
    args = [
        "--data.root", str(world), "--data.synth", "false", "--data.val_limit", "4",
        "--data.pack_questions", "1", "--data.conversation_mix", "false", "--data.max_length", "128",
        "--train.precision", "fp32", "--train.max_minutes", "none",
        "--train.output_dir", str(out), "--train.batch_size", "4", "--train.max_steps", "4",
        "--train.warmup_steps", "1", "--train.eval_every", "4", "--train.save_every", "2",
        "--train.keep_last", "3", "--train.log_every", "1", "--train.progress", "false",
        "--train.log_with", "[]", "--model.lora.r", "4", "--train.vision_lr", "0",
        *extra,
    ]  # fmt: skip
    return load_config(SFTConfig, RECIPE, args)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, n_train=24, n_val=6, n_test=6, seed=0)
    return root


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """(run, weights before training, log lines) of one 4-step LoRA run."""
    out = tmp_path_factory.mktemp("lora") / "run"
    lines: list[str] = []
    run = SFTTrainer(lora_config(world, out), log=lines.append)
    before = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    run.train()
    return run, before, lines


def test_only_adapters_and_projector_train(trained):
    run, before, lines = trained
    after = run.model.state_dict()
    assert before.keys() == after.keys()
    lora = {k for k in after if ".lora_" in k}
    # A and B in each block's attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj
    assert len(lora) == 2 * 4 * run.model.config.text_config.n_layer
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable == lora | {n for n in after if n.startswith("projector.")}
    for key in after:
        if key in lora:
            assert not torch.equal(before[key], after[key]), f"adapter {key} did not train"
        elif not key.startswith("projector."):  # base LM, tied LM head, frozen vision tower
            assert torch.equal(before[key], after[key]), f"frozen {key} changed"
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("projector."))
    assert any("LoRA r=4" in line and "parameters" in line for line in lines)  # trainable vs total


def test_merge_matches_peft_and_leaves_the_live_model_alone(trained):
    run, before, _ = trained
    live = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    merged = merged_state_dict(run.model, run.model.state_dict())
    assert not any(".lora_" in k or ".base_layer." in k for k in merged)
    reference = copy.deepcopy(run.model)
    for layer in lora_layers(reference).values():
        layer.merge(adapter_names=["default"])  # peft's own merge, in place on the copy
    peft_merged = reference.state_dict()
    for name in lora_layers(reference):
        key = f"{name}.weight"
        torch.testing.assert_close(merged[key], peft_merged[f"{name}.base_layer.weight"])
        assert not torch.equal(merged[key], before[f"{name}.base_layer.weight"])  # the adapters count
    assert all(torch.equal(live[k], v) for k, v in run.model.state_dict().items())


@pytest.mark.parametrize("name", ["checkpoint-4", "best"])
def test_checkpoint_loads_as_a_plain_model_with_the_live_logits(trained, name):
    from gpt2mm.loading import load_model

    run, _, _ = trained
    path = Path(run.cfg.train.output_dir) / name
    adapter = load_file(str(path / ADAPTER_FILE))
    assert adapter and all(".lora_" in k for k in adapter)
    assert not (path / "adapter_config.json").exists()  # transformers would re-apply the adapter on load
    model, _ = load_model(path)
    assert not any(".lora_" in k or ".base_layer." in k for k in model.state_dict())
    saved = json.loads((path / "config.json").read_text())
    assert "modeling_gpt2mm" in saved.pop("auto_map")["AutoModel"]  # self-contained: loads without gpt2mm
    assert saved == json.loads(run.model.config.to_json_string())
    batch = run.collate(run.examples[:4])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    run.model.eval()
    with torch.no_grad():
        expected = run.model(**inputs).logits  # unmerged: base + adapters
        got = model.eval()(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_resume_ends_with_the_same_weights(trained, tmp_path):
    run, _, _ = trained
    full = Path(run.cfg.train.output_dir)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")  # the same run, stopped after step 2
    world = Path(run.cfg.data.root)
    resumed = SFTTrainer(lora_config(world, part), resume=True, log=lambda m: None)
    assert resumed.step == 2
    resumed.train()
    for file in ("model.safetensors", ADAPTER_FILE):
        a, b = load_file(str(full / "checkpoint-4" / file)), load_file(str(part / "checkpoint-4" / file))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), file


def test_resume_refuses_a_checkpoint_of_another_set_up(trained, tmp_path):
    run, _, _ = trained
    world, checkpoint = Path(run.cfg.data.root), Path(run.cfg.train.output_dir) / "checkpoint-2"
    with pytest.raises(UsageError, match="with LoRA"):
        SFTTrainer(
            lora_config(world, tmp_path / "a", "--model.lora.r", "0"), resume=str(checkpoint), log=print
        )
    # another seed builds other random base weights: the merged weights no longer fit base + adapters
    with pytest.raises(UsageError, match="base weights changed"):
        SFTTrainer(lora_config(world, tmp_path / "b", "--train.seed", "1"), resume=str(checkpoint), log=print)


def test_missing_peft_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(UsageError, match="pip install peft"):
        build_model_for_training(ModelConfig(lora=LoraConfig(r=4)))


@pytest.mark.parametrize("targets", [["nonexistent"], ["wte"]])
def test_bad_target_modules_are_a_usage_error(targets):
    with pytest.raises(UsageError, match="model.lora.target_modules"):
        build_model_for_training(ModelConfig(lora=LoraConfig(r=4, target_modules=targets)))


# --- Weights & Biases through accelerate's tracker (train.log_with: [wandb]), with a stand-in `wandb` module:
# wandb itself is not a dependency -------------------------------------------------------------------------


class FakeWandb:
    """Records what accelerate's WandBTracker asks of `wandb`: init(...) gives a run whose log/finish are
    recorded; `config.update` stores the run's configuration."""

    def __init__(self):
        self.inits: list[dict] = []
        self.logs: list[tuple[dict, int]] = []
        self.configs: list[dict] = []
        self.finished = 0
        self.config = SimpleNamespace(update=lambda values, **kwargs: self.configs.append(values))

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, values: dict, step: int) -> None:
        self.logs.append((values, step))

    def finish(self) -> None:
        self.finished += 1


def test_wandb_gets_the_rows_of_metrics_jsonl(world, tmp_path, monkeypatch):
    import accelerate.tracking

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    available = [*accelerate.tracking._available_trackers, accelerate.tracking.LoggerType.WANDB]
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", available)
    out = tmp_path / "run"
    extra = ["--model.lora.r", "0", "--train.max_steps", "2", "--train.eval_every", "2"]
    SFTTrainer(lora_config(world, out, *extra, "--train.log_with", "[wandb]"), log=lambda m: None).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2]  # loss at steps 1 and 2, then val_accuracy
    assert fake.logs == [({k: v for k, v in r.items() if k != "step"}, r["step"]) for r in rows]
    assert len(fake.inits) == 1 and fake.inits[0]["name"] == out.name
    assert fake.configs[0]["train"]["max_steps"] == 2
    assert fake.finished == 1


def test_wandb_missing_is_a_usage_error(world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(UsageError, match="pip install wandb"):
        SFTTrainer(lora_config(world, tmp_path / "run", "--train.log_with", "[wandb]"), log=lambda m: None)
