"""Checkpoints written by earlier code still load and resume.

tests/fixtures/sft-run-f3f56cd holds a run made by the code of commit f3f56cd (before the run layer was shared
by every stage; `MADE_BY.sh` is the command): its checkpoint-2 (weights, processor, trainer state) and the
weights it reached at step 4. Today's code resumes checkpoint-2 and must reach the same step-4 weights, and
`load_model` must load the checkpoint as it is."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2mm.cli import main
from gpt2mm.data.synthetic import write_world

OLD = Path(__file__).parent / "fixtures" / "sft-run-f3f56cd"
SMALL = (
    "{text_config: {n_embd: 16, n_layer: 1, n_head: 2}, "
    "vision_config: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2}}"
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, n_train=16, n_val=4, n_test=4, seed=0)  # MADE_BY.sh's world
    return root


def test_an_earlier_codes_checkpoint_loads_as_a_model():
    from gpt2mm.loading import load_model

    model, processor = load_model(OLD / "checkpoint-2")
    saved = load_file(str(OLD / "checkpoint-2" / "model.safetensors"))
    live = model.state_dict()
    assert all(torch.equal(live[k], v) for k, v in saved.items())
    assert processor.num_image_tokens == model.config.num_image_tokens


def test_an_earlier_codes_checkpoint_resumes_to_the_weights_that_code_reached(world, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(OLD / "checkpoint-2", out / "checkpoint-2")
    args = [
        "train", "--data.root", str(world), "--data.synth", "false", "--data.val_limit", "8",
        "--model.overrides", SMALL,
        "--train.output_dir", str(out), "--train.batch_size", "8", "--train.max_steps", "4",
        "--train.warmup_steps", "1", "--train.eval_every", "2", "--train.save_every", "2", "--train.keep_last", "2",
        "--train.log_every", "1", "--train.progress", "false", "--train.log_with", "[]", "--resume",
    ]  # fmt: skip
    assert main(args) == 0
    expected = load_file(str(OLD / "checkpoint-4" / "model.safetensors"))
    reached = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert expected.keys() == reached.keys()
    for key, value in expected.items():  # another CPU may round differently: equal to float32 noise
        torch.testing.assert_close(reached[key], value, rtol=1e-5, atol=1e-6, msg=key)
