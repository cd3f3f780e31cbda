"""LoRA (peft) on GPT-2's projections.

Training holds the base weights and the adapters apart (peft layers in the language model); a checkpoint holds
them merged in `model.safetensors`, so that every checkpoint loads as a plain gpt2mm model, and the adapters
alone in ADAPTER_FILE, so that `--resume` continues exactly. No `adapter_config.json` is written: transformers
would take the directory for a peft adapter and apply it on top of the merged weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpt2mm.errors import UsageError
from gpt2mm.train.config import LoraConfig

ADAPTER = "default"  # peft's adapter name: one adapter per run


ADAPTER_FILE = "adapter_model.safetensors"


def inject_lora(model, cfg: LoraConfig) -> None:
    """LoRA adapters (peft) on the GPT-2 blocks' projections; the whole language model (embeddings, blocks,
    final norm) and the tied LM head frozen. The projector and vision tower keep their own rules."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        raise UsageError(
            "model.lora.r > 0 (LoRA) needs peft: pip install peft (or pip install -e '.[train]')"
        ) from None
    from transformers.pytorch_utils import Conv1D

    lora = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        # GPT-2's projections are Conv1D, whose weight is (in, out), the transpose of nn.Linear's; peft would
        # switch this on by itself (with a warning); saying so keeps the merge below explicit
        fan_in_fan_out=True,
    )
    model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    try:
        inject_adapter_in_model(lora, model.language_model, adapter_name=ADAPTER)
    except ValueError as e:  # no module matched, or one peft cannot adapt
        raise UsageError(f"model.lora.target_modules {cfg.target_modules}: {e}") from None
    for name, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        if not (isinstance(layer, LoraLinear) and isinstance(base, Conv1D)):
            raise UsageError(
                f"model.lora.target_modules: {name} is a {type(base).__name__}; LoRA here adapts GPT-2's "
                "Conv1D projections only (c_attn, c_proj, c_fc)"
            )


def lora_layers(model) -> dict[str, Any]:
    """Module name -> peft LoRA layer, for every adapted layer of the model."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_state_dict(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a LoRA model as a plain model's: each adapted layer's weight is W + scaling * B @ A
    under the layer's own key, with no `lora_*` or `base_layer` keys. The merged weights are new tensors:
    the live model goes on training its unmerged base + adapters."""
    plain = {}
    for key, value in state_dict.items():
        if ".lora_" not in key:
            plain[key.replace(".base_layer.", ".", 1)] = value
    for name, layer in lora_layers(model).items():
        a = state_dict[f"{name}.lora_A.{ADAPTER}.weight"]  # (r, in)
        b = state_dict[f"{name}.lora_B.{ADAPTER}.weight"]  # (out, r)
        w = state_dict[f"{name}.base_layer.weight"]  # Conv1D: (in, out)
        delta = (b.float() @ a.float()) * layer.scaling[ADAPTER]  # (out, in)
        if layer.fan_in_fan_out:
            delta = delta.T  # (in, out), Conv1D's layout
        plain[f"{name}.weight"] = (w.float() + delta.to(w.device)).to(w.dtype)
    return plain


def adapter_state_dict(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights alone (peft's keys, relative to the language model: `h.0.attn.c_attn.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    prefix = "language_model."
    lm = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    adapter = get_peft_model_state_dict(model.language_model, state_dict=lm, adapter_name=ADAPTER)
    return {k: v.detach().contiguous() for k, v in adapter.items()}


def restore_lora(model, path: Path, weights: dict[str, torch.Tensor]) -> set[str]:
    """Resume a LoRA checkpoint's adapters into the live model. The unmerged base weights are not in the
    checkpoint: they are the frozen ones this run rebuilt (model.init_from / preset / seed), and the
    checkpoint's merged weights must equal them + the saved adapters, or the base changed since. Pops the
    merged weights off `weights` (the rest loads as usual); returns the model keys the rest need not cover."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = load_file(str(path / ADAPTER_FILE))
    try:
        result = set_peft_model_state_dict(model.language_model, adapter, adapter_name=ADAPTER)
    except RuntimeError as e:  # size mismatch: another rank
        raise UsageError(f"--resume: {path / ADAPTER_FILE} does not fit this run's model.lora: {e}") from None
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise UsageError(
            f"--resume: {path / ADAPTER_FILE} does not fit this run's model.lora "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    live = model.state_dict()
    expected = merged_state_dict(model, live)
    for name in lora_layers(model):
        for key in (f"{name}.weight", f"{name}.bias"):
            if key not in expected:
                continue
            if key not in weights:
                raise UsageError(f"--resume: {path}/model.safetensors has no {key}")
            saved = weights.pop(key).to(expected[key].device)
            if not torch.allclose(saved, expected[key], rtol=1e-5, atol=1e-6):
                raise UsageError(
                    f"--resume: {path}: the saved {key} is not this run's frozen base + the saved adapters; the "
                    "base weights changed since the checkpoint (model.init_from, model.preset or train.seed?)"
                )
    return {k for k in live if ".lora_" in k or ".base_layer." in k}
