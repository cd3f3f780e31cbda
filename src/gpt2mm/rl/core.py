"""The RL math of stage 2, as small pure functions on tensors (each tested against a naive loop).

Shapes: a rollout batch holds B sampled answers of up to N tokens; `mask` (B, N) is 1 on the answer's
tokens (up to and including its end-of-text) and 0 on the padding after it. Per-token quantities are (B, N);
per-answer ones (B,).

    logprobs_from_logits   log pi(token | prefix)                         (B, N)
    entropy_from_logits    entropy of pi(. | prefix)                      (B, N)
    kl_estimate            log pi - log pi_ref and its k2 / k3 variants  (B, N)
    token_rewards          -kl_coef * KL at every token, + the score at the last one
    gae                    generalised advantage estimation -> advantages, returns
    masked_mean / masked_var / masked_whiten
    policy_loss            PPO's clipped surrogate (+ clip fraction, approximate KL)
    value_loss             the clipped value loss (+ clip fraction)
    group_advantages       RLOO (leave-one-out) and GRPO (group-normalised) per-answer advantages
    AdaptiveKLController   the KL coefficient of Ziegler et al. (2019), steered towards a target KL
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (mean added back when `shift_mean` is False); 0 off the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token]: (B, N, V), (B, N) -> (B, N), in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the vocabulary: (B, N, V) -> (B, N)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k1, k2, k3)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r with r = pi_ref / pi; >= 0
    raise ValueError(f"kl estimator must be k1, k2 or k3, got {kind!r}")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (B, N) mask of the form 1...10...0 (0 for an empty row)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The per-token reward of RLHF-style PPO: -kl_coef * KL at each answer token, plus the answer's score
    (B,) at its last token. 0 off the mask."""
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each answer; the state after the last token is terminal.

    advantages[t] = sum_k (gamma * lam)^k delta[t + k],  delta[t] = r[t] + gamma V[t + 1] - V[t],
    returns = advantages + values. Entries off the mask are 0.
    """
    m = mask.to(values.dtype)
    rewards, values = rewards * m, values * m
    n = rewards.shape[1]
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(n)):
        next_value = values[:, t + 1] if t + 1 < n else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * m


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, -min(r A, clip(r, 1 - eps, 1 + eps) A), averaged over answer tokens.

    Returns (loss, {"clipfrac": share of tokens where the clipped term was taken, "approx_kl": k3 estimate
    of KL(old || new)}).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2) over answer tokens (no clipping when eps is None)."""
    err = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(err, mask), {"vf_clipfrac": torch.zeros(())}
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).float(), mask)
    return loss, {"vf_clipfrac": clipfrac}


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str = "rloo") -> torch.Tensor:
    """Per-answer advantages with a baseline from the other answers to the same prompt (critic-free).

    `rewards` (B,) holds `group_size` consecutive answers per prompt. rloo: r_i - mean of the other answers'
    rewards (Ahmadian et al., 2024); grpo: (r_i - group mean) / (group std + 1e-4) (Shao et al., 2024).
    """
    if group_size < 2:
        raise ValueError(f"group advantages need at least 2 answers per prompt, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size)
    if kind == "rloo":
        baseline = (r.sum(1, keepdim=True) - r) / (group_size - 1)
        return (r - baseline).reshape(-1)
    if kind == "grpo":
        return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1)
    raise ValueError(f"group advantage kind must be rloo or grpo, got {kind!r}")


class AdaptiveKLController:
    """kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon (Ziegler et al., 2019).
    With `target` None the coefficient stays fixed."""

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: int = 10000):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None or not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
