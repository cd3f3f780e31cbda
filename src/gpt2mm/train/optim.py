"""The optimizer and the learning-rate schedule every stage uses: AdamW with per-part learning rates and no
weight decay on biases, norms and embeddings; warmup then cosine / linear / constant / warmup-stable-decay,
which a time budget can drive."""

from __future__ import annotations

import math
from typing import Any

import torch

from gpt2mm.errors import UsageError
from gpt2mm.train.config import RunConfig


def param_groups(model, cfg: RunConfig) -> list[dict[str, Any]]:
    """AdamW groups: projector / vision learning rates if set; no weight decay on biases, norms, embeddings."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = cfg.lr
        projector_lr, vision_lr = getattr(cfg, "projector_lr", None), getattr(cfg, "vision_lr", None)
        if name.startswith("projector.") and projector_lr is not None:
            lr = projector_lr
        elif name.startswith("vision_tower.") and vision_lr is not None:
            lr = vision_lr
        no_decay = p.ndim < 2 or "wte" in name or "wpe" in name or "embedding" in name
        groups.setdefault((lr, 0.0 if no_decay else cfg.weight_decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def make_optimizer(model, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW over the model's trainable parameters, in `param_groups`' groups."""
    return adamw(param_groups(model, cfg), cfg.lr)


def adamw(groups: list[dict[str, Any]], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The AdamW every stage trains with (betas 0.9 / 0.95), over the given parameter groups; `weight_decay`
    for a group that names none."""
    if not any(g["params"] for g in groups):
        raise UsageError("nothing to train: every parameter is frozen")
    device = next(p for g in groups for p in g["params"]).device
    # fused AdamW: one kernel for all parameters, on CUDA and (torch >= 2.4) CPU
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, fused=fused
    )


def lr_lambda(cfg: RunConfig, elapsed=None):
    """Warmup, then constant / linear / cosine decay to `min_lr_ratio`, or `wsd` (warmup-stable-decay, as
    MiniCPM trains): the peak rate until the last `decay_fraction` of the run, then linear. With a time budget
    (`max_minutes`), `elapsed()` (training seconds so far) also drives the decay, so a run stopped by
    the clock ends its schedule on time (the learning rate then depends on the machine's speed)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        if cfg.max_minutes and elapsed is not None:
            progress = max(progress, min(1.0, elapsed() / (60 * cfg.max_minutes)))
        if cfg.schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        elif cfg.schedule == "wsd":
            decay = min(1.0, (1 - progress) / cfg.decay_fraction)
        else:
            decay = 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, elapsed=None):
    """`lr_lambda`'s schedule on the optimizer (`elapsed()`: training seconds so far, for a time budget)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, elapsed))
