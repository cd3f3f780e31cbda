"""Fixtures built in-process: tiny random CLIP and GPT-2 backbones saved to temp dirs (no hub, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def backbone_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny pretrained-style CLIP (32 px, patch 16: 4 patches + CLS) and GPT-2 with its own tokenizer."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        GPT2Config,
        GPT2LMHeadModel,
    )

    from gpt2mm.tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=16,
            projection_dim=16,
        )
    )
    vision.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip"
    )
    tok = build_tiny_tokenizer(with_image_token=False)
    text = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    text.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    return root / "clip", root / "gpt2"


@pytest.fixture(scope="session")
def tiny_pair(backbone_dirs):
    """(model, processor) from the real `from_backbones` path, in eval mode."""
    from gpt2mm import MultimodalGPT2ForConditionalGeneration

    torch.manual_seed(0)
    model, processor = MultimodalGPT2ForConditionalGeneration.from_backbones(
        *backbone_dirs, projector_num_heads=4, projector_ffn_dim=64
    )
    return model.eval(), processor


def make_image(seed: int, size: int = 40):
    """A random RGB PIL image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
