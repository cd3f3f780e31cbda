"""Building and loading a model + processor in one call: from pretrained backbones, a preset, a directory or
a hub id. Every loader returns `(model, processor)`; what cannot be loaded is one `ModelNotFoundError` line.

    model, processor = build_model("tiny")                       # random weights, offline
    model, processor = from_backbones("openai/clip-vit-base-patch32", "openai-community/gpt2")
    model, processor = load_model("runs/sft/final")              # a saved gpt2mm directory
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2mm.config import MultimodalGPT2Config
from gpt2mm.errors import DamagedFileError, ModelNotFoundError
from gpt2mm.modeling import MultimodalGPT2ForConditionalGeneration
from gpt2mm.presets import get_preset
from gpt2mm.processing import MultimodalGPT2Processor, default_image_processor
from gpt2mm.tokenizer import add_image_token, build_tiny_tokenizer


def from_backbones(
    vision: str | os.PathLike,
    text: str | os.PathLike,
    tokenizer: Any | None = None,
    **overrides: Any,
) -> tuple[MultimodalGPT2ForConditionalGeneration, MultimodalGPT2Processor]:
    """Build the model from a pretrained CLIP (vision tower only) and a pretrained GPT-2.

    `vision` / `text` are hub ids or local directories. `<image>` is added to the GPT-2 tokenizer (or
    to `tokenizer`), the embeddings are resized, and every pretrained weight is copied with an explicit
    check that the key sets and shapes match. Returns `(model, processor)`.
    """
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, GPT2LMHeadModel

    scratch_only = ("text_init", "text_final_norm", "text_embedding_std")  # their defaults: GPT-2 as it is
    changed = [k for k in scratch_only if k in overrides and overrides[k] != getattr(MultimodalGPT2Config, k)]
    if changed:
        raise ValueError(
            f"{', '.join(changed)}: for a GPT-2 built from scratch; a pretrained GPT-2 keeps its own weights "
            "and final LayerNorm"
        )
    clip = CLIPVisionModel.from_pretrained(vision)
    gpt2 = GPT2LMHeadModel.from_pretrained(text)
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(text)
    image_token = overrides.get("image_token", "<image>")
    image_token_id = add_image_token(tokenizer, image_token)
    vocab_size = max(len(tokenizer), gpt2.config.vocab_size)
    gpt2.resize_token_embeddings(vocab_size, mean_resizing=True)

    text_config = gpt2.config.to_dict()
    text_config["vocab_size"] = vocab_size
    text_config["pad_token_id"] = tokenizer.pad_token_id
    config = MultimodalGPT2Config(
        vision_config=clip.config.to_dict(),
        text_config=text_config,
        image_token_id=image_token_id,
        **overrides,
    )
    model = MultimodalGPT2ForConditionalGeneration(config)
    copy_state(clip, model.vision_tower, "vision tower")
    copy_state(gpt2.transformer, model.language_model, "GPT-2")
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, gpt2.lm_head.weight), "LM head not tied to the embeddings"
    try:
        image_processor = CLIPImageProcessor.from_pretrained(vision)
    except OSError:
        image_processor = default_image_processor(config)
    processor = MultimodalGPT2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        image_token=config.image_token,
    )
    return model, processor


def copy_state(src: nn.Module, dst: nn.Module, what: str) -> None:
    """Copy a pretrained module's weights, asserting that keys and shapes match one to one (nanoGPT style)."""
    s, d = src.state_dict(), dst.state_dict()
    missing, unexpected = sorted(set(d) - set(s)), sorted(set(s) - set(d))
    if missing or unexpected:
        raise ValueError(f"{what}: state dicts differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in s.items():
        if value.shape != d[key].shape:
            raise ValueError(f"{what}: {key} has shape {tuple(value.shape)}, expected {tuple(d[key].shape)}")
    dst.load_state_dict(s, strict=True)


def build_model(
    preset: str, pretrained: bool | None = None, **overrides: Any
) -> tuple[MultimodalGPT2ForConditionalGeneration, MultimodalGPT2Processor]:
    """A model + processor for a preset.

    `pretrained=True` loads the preset's pretrained backbones (hub ids or directories; needs them to be
    reachable); `False` builds random weights from the embedded configs, offline. The default is pretrained
    for presets that name backbones and random for `tiny`.
    """
    p = get_preset(preset)
    has_backbones = p.vision_backbone is not None and p.text_backbone is not None
    pretrained = has_backbones if pretrained is None else pretrained
    if pretrained:
        if not has_backbones:
            raise ValueError(f"preset {preset!r} has no pretrained backbones; use pretrained=False")
        with hub_errors(f"preset {preset!r}: its backbones {p.vision_backbone} and {p.text_backbone}"):
            return from_backbones(p.vision_backbone, p.text_backbone, **{**p.model, **overrides})
    config = MultimodalGPT2Config.from_preset(preset, **overrides)
    model = MultimodalGPT2ForConditionalGeneration(config)
    return model, processor_for(config, preset)


def processor_for(config: MultimodalGPT2Config, preset: str) -> MultimodalGPT2Processor:
    """The processor that goes with a randomly initialised preset (offline)."""
    if preset == "tiny":
        tokenizer = build_tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        name = get_preset(preset).text_backbone
        with hub_errors(f"preset {preset!r}: its tokenizer {name} (random weights need only the tokenizer)"):
            tokenizer = AutoTokenizer.from_pretrained(name)
        add_image_token(tokenizer, config.image_token)
    if tokenizer.convert_tokens_to_ids(config.image_token) != config.image_token_id:
        raise ValueError("the tokenizer's image token id does not match the config's")
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size")
    return MultimodalGPT2Processor(
        image_processor=default_image_processor(config),
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        image_token=config.image_token,
    )


def load_model(
    name_or_path: str | os.PathLike, verify: bool = True, **kwargs: Any
) -> tuple[MultimodalGPT2ForConditionalGeneration, MultimodalGPT2Processor]:
    """Load a saved model and its processor from a directory or a hub id.

    A directory written with a manifest (every checkpoint, `best`, the reward model) is checked against it
    first (`verify`): a missing, truncated or changed file is a `DamagedFileError` naming it, as is a
    weights file that cannot be parsed in a directory without one (written before manifests)."""
    from safetensors import SafetensorError

    from gpt2mm.outputs import verify_manifest

    path = Path(name_or_path)
    if not path.exists() and str(name_or_path).startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"{path}: no such model directory")  # a path, not a hub id
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a gpt2mm model directory: it has no config.json")
    local = path.exists()
    if local and verify:
        verify_manifest(path)
    try:
        with hub_errors(str(path) if local else f"{name_or_path}: no such directory; as a hub id", not local):
            model = MultimodalGPT2ForConditionalGeneration.from_pretrained(name_or_path, **kwargs)
            processor = MultimodalGPT2Processor.from_pretrained(name_or_path)
    except SafetensorError as e:
        weights = path / "model.safetensors"
        raise DamagedFileError(f"{weights if weights.is_file() else path}: cannot be read ({e})") from None
    return model, processor


@contextlib.contextmanager
def hub_errors(what: str, from_hub: bool = True):
    """transformers' OSError for what cannot be loaded (offline, a typo, a file missing from a directory) as
    one line naming what was being loaded; `from_hub`: it was to come from the hub."""
    try:
        yield
    except ModelNotFoundError:
        raise
    except OSError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = " (offline, only local directories and the tiny preset load)" if from_hub else ""
        raise ModelNotFoundError(f"{what}: cannot be loaded: {first}{hint}") from e
