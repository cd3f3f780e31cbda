"""The policy's side of a rollout: the logits (and value estimates) of sampled answer tokens recomputed in one
forward pass exactly as `generate` sampled them, the mask of each answer's tokens, and the `Rollout` that holds
one batch of sampled answers with everything the PPO update needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def answer_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vision_hidden_states: torch.Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    value_head: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (B, N, V) predicting the N answer tokens that follow a `prompt_len`-token (left-padded) prompt,
    as `generate` sampled them (divided by the temperature, `<image>` masked); and the value head's estimate
    (B, N) at the same positions (the state before each answer token)."""
    hidden = model.hidden_states(input_ids, attention_mask, vision_hidden_states=vision_hidden_states)
    h = hidden[:, prompt_len - 1 : -1]  # (B, N, C)
    logits = model.lm_head(h).float() / temperature
    logits[..., model.config.image_token_id] = float("-inf")
    values = value_head(h.float()).squeeze(-1) if value_head is not None else None
    return logits, values


def answer_mask(response: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on each answer's tokens up to and including its first end-of-text, 0 after (B, N)."""
    is_eos = (response == eos_token_id).long()
    return (is_eos.cumsum(1) - is_eos) == 0


@dataclass
class Rollout:
    samples: list  # one per answer (a question repeated samples_per_prompt times)
    input_ids: torch.Tensor  # (B, P + N) prompt (left-padded) + answer
    attention_mask: torch.Tensor  # (B, P + N), 0 on padding and after each answer's end
    vision: torch.Tensor  # (B, T_img, C_vision)
    prompt_len: int
    mask: torch.Tensor  # (B, N) answer tokens
    answers: list[str]
    scores: torch.Tensor  # (B,)
    logprobs: torch.Tensor  # (B, N) under the policy that sampled them
    ref_logprobs: torch.Tensor  # (B, N) under the frozen reference
    values: torch.Tensor | None  # (B, N) (ppo)
    entropy: torch.Tensor  # (B, N)
    kl: torch.Tensor = field(default=None)  # (B, N) per-token KL estimate in the reward
    advantages: torch.Tensor = field(default=None)
    returns: torch.Tensor = field(default=None)
