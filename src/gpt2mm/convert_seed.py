"""A state dict saved by the seed's code -> a gpt2mm model: the key mapping and its checks (the command
is `gpt2mm convert-seed`, `gpt2mm.commands.convert_seed`).

The seed's module held `text_model` (GPT2LMHeadModel), `vision_model` (CLIPVisionModel), `vision_projection`
(Linear 768 -> d), `norm_layer` (LayerNorm d) and `image_trans` (`nn.TransformerEncoderLayer(d_model=d,
nhead=8)` with its defaults: post-norm, ReLU, feed-forward 2048, dropout 0.1, batch_first=False). It added the
projected CLIP features (last hidden state, CLS included) to the embeddings at positions 1..50, where its
prompts held the `<image>` tokens. Because the seed fed a (batch, 50, d) tensor to a sequence-first layer,
each image token attended only to itself at its batch size of 1: the converted config sets
`projector_token_mixing=False` to reproduce exactly that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpt2mm.errors import UsageError

SEED_PREFIXES = {
    "text_model.transformer.": "language_model.",
    "vision_model.vision_model.": "vision_tower.",  # CLIPVisionModel as transformers 4 saved it
    "vision_model.": "vision_tower.",
    "vision_projection.": "projector.linear.",
    "norm_layer.": "projector.norm.",
    "image_trans.": "projector.layers.0.",
}


def map_seed_key(key: str) -> str | None:
    """The gpt2mm name of a seed state-dict key; None for keys that have no counterpart (the tied LM head)."""
    if key == "text_model.lm_head.weight":
        return None
    for old, new in SEED_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(key)


def load_seed_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the seed's checkpoint safely (`weights_only=True`: tensors only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad or unsafe file
        raise UsageError(f"{path}: not a state dict that loads with weights_only=True ({e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return state


def check_seed_keys(state: dict[str, torch.Tensor]) -> None:
    """Refuse, before any download, a state dict that is not the seed's."""
    unknown = [
        k
        for k in state
        if not any(k.startswith(p) for p in SEED_PREFIXES) and k != "text_model.lm_head.weight"
    ]
    if unknown:
        raise UsageError(f"not a seed checkpoint: unexpected keys {unknown[:5]} (of {len(unknown)})")
    for key in (
        "text_model.transformer.wte.weight",
        "image_trans.linear1.weight",
        "vision_projection.weight",
    ):
        if key not in state:
            raise UsageError(f"not a seed checkpoint: missing {key}")


def convert_seed_state_dict(
    state: dict[str, torch.Tensor],
    text_config: Any,
    vision_config: Any,
    image_token_id: int | None = None,
):
    """The seed's weights -> a `MultimodalGPT2ForConditionalGeneration`, every key and shape checked."""
    from gpt2mm.config import MultimodalGPT2Config
    from gpt2mm.modeling import MultimodalGPT2ForConditionalGeneration

    check_seed_keys(state)
    wte = state["text_model.transformer.wte.weight"]
    ffn = state["image_trans.linear1.weight"].shape[0]
    vocab_size, d = wte.shape
    text = text_config.to_dict()
    text.update(vocab_size=vocab_size, n_embd=d)
    base_vocab = text_config.vocab_size if text_config.vocab_size < vocab_size else vocab_size - 1
    config = MultimodalGPT2Config(
        vision_config=vision_config.to_dict(),
        text_config=text,
        image_token_id=base_vocab if image_token_id is None else image_token_id,
        projector_num_heads=8,
        projector_ffn_dim=ffn,
        projector_dropout=0.1,
        projector_activation="relu",
        projector_norm_first=False,
        projector_token_mixing=False,
        fusion="add",
    )
    model = MultimodalGPT2ForConditionalGeneration(config)
    ours = model.state_dict()
    mapped = {}
    for key, value in state.items():
        new = map_seed_key(key)
        if new is None:
            continue
        if new not in ours:
            raise UsageError(f"seed key {key} maps to {new}, which this model does not have")
        if ours[new].shape != value.shape:
            raise UsageError(f"seed key {key}: shape {tuple(value.shape)}, expected {tuple(ours[new].shape)}")
        mapped[new] = value
    missing = sorted(set(ours) - set(mapped) - {"lm_head.weight"})
    if missing:
        raise UsageError(f"the seed checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")
    model.load_state_dict(mapped, strict=False)
    model.tie_weights()
    if "text_model.lm_head.weight" in state and not torch.equal(state["text_model.lm_head.weight"], wte):
        raise UsageError("the seed's LM head is not tied to its token embeddings; gpt2mm ties them")
    return model
