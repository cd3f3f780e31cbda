"""Fixtures built in-process: tiny random CLIP and GPT-2 backbones saved to temp dirs (no hub, no network)."""

from __future__ import annotations

import contextlib
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
    from gpt2mm.loading import from_backbones

    torch.manual_seed(0)
    model, processor = from_backbones(*backbone_dirs, projector_num_heads=4, projector_ffn_dim=64)
    return model.eval(), processor


def make_image(seed: int, size: int = 40):
    """A random RGB PIL image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def wide_tiny_model():
    """The tiny preset with weights drawn wide enough that greedy answers differ from prompt to prompt."""
    from gpt2mm import build_model

    torch.manual_seed(0)
    model, processor = build_model("tiny")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15, generator=gen)
    return model.eval(), processor


# --- web pages: a real server, and Debian's Chromium driven by Playwright --------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover
    sync_playwright = None

# Needs `apt-get install -y chromium` and `pip install playwright` (never `playwright install`: the browser
# is the system one).
BROWSER_MARKS = [
    pytest.mark.skipif(
        sync_playwright is None,
        reason="the browser test needs the playwright package: pip install playwright (no `playwright install`)",
    ),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="the browser test needs Chromium at /usr/bin/chromium: apt-get install -y chromium",
    ),
]


def needs_browser(test):
    """Skips a test, with the reason, where Playwright or Chromium is missing."""
    for mark in BROWSER_MARKS:
        test = mark(test)
    return test


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, **config):
    """A real uvicorn server for `app` in a thread on a free localhost port; yields its URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


# A stage-1 run small enough for a test: the demo recipe without its extras (the preset's model, its tower
# frozen), fp32, no time budget.
SMALL = [
    "--model.overrides", "{}", "--model.attn_implementation", "none", "--data.pack_questions", "1",
    "--data.conversation_mix", "false", "--data.difficulty", "none", "--data.grounding", "none", "--data.max_length", "128",
    "--train.max_minutes", "none", "--train.lr", "2e-3", "--train.min_lr_ratio", "0", "--train.precision", "fp32",
    "--train.curriculum_steps", "0", "--train.vision_lr", "0",
]  # fmt: skip
