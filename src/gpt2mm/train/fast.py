"""`train.precision: auto` and `model.attn_implementation: auto`: the machine's fastest settings, chosen at run
set-up, so that a recipe file (the demo's among them) runs well on a CPU and on a GPU without naming either.

- precision `auto`: bf16 autocast where the hardware multiplies bf16 natively (a GPU that supports it; a CPU with
  AVX512-BF16 or AMX, elsewhere bf16 would be emulated and slower), else fp32. bf16 reached fp32's test accuracy
  on the demo's recipe.
- attn_implementation `auto`: eager attention in bf16 (`gpt2mm_eager`, `gpt2mm.layers.eager_attention`) where a
  CPU trains in bf16: at the demo's lengths (~150 tokens) the CPU flash-attention kernel's bf16 backward takes much
  of a step, and transformers' eager attention converts the scores to fp32 and back around its softmax (the demo's
  batches on an Intel Xeon with AMX: 269 ms a step against 311 and, SDPA, 477; not measured on a CPU without
  AMX); SDPA where a CPU trains in fp32, the faster there (`bench/cpu_attention.py`); on a GPU the model's
  default (SDPA).
"""

from __future__ import annotations

import dataclasses

import torch

from gpt2mm.layers import EAGER

AUTO = "auto"


def fast_precision() -> str:
    """bf16 where this machine computes it natively, else fp32."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = [
        getattr(torch.cpu, f, lambda: False) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return "bf16" if any(check() for check in native) else "fp32"


def fast_attn_implementation(precision: str) -> str | None:
    """On a CPU: gpt2mm's eager attention where it trains in bf16, else SDPA; None (the model's default, SDPA)
    on a GPU."""
    if torch.cuda.is_available():
        return None
    return EAGER if precision == "bf16" else "sdpa"


def resolve_auto(cfg):
    """A copy of an SFT recipe (`SFTConfig`) with `auto` in train.precision and model.attn_implementation
    replaced by this machine's choice; the recipe itself is left as it is (it still says `auto`)."""
    train, model = cfg.train, cfg.model
    if train.precision == AUTO:
        train = dataclasses.replace(train, precision=fast_precision())
    if model.attn_implementation == AUTO:
        model = dataclasses.replace(model, attn_implementation=fast_attn_implementation(train.precision))
    if train is cfg.train and model is cfg.model:
        return cfg
    return dataclasses.replace(cfg, train=train, model=model)
