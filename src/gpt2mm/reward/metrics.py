"""The reward trainer's numbers: ROC AUC, accuracy and log loss, accuracy per group, the pairwise ranking loss,
and the one-feature logistic fit that starts `lm_prior`. Pure functions of lists and tensors, tested against
naive versions."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """ROC AUC by the rank formula (Mann-Whitney U): the chance that a random positive scores above a random
    negative, ties counting one half. Tied scores share their average rank. None with a single class."""
    n = len(scores)
    n_pos = sum(bool(y) for y in labels)
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(n), key=lambda i: scores[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # 1-based average rank of the tie group
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def binary_metrics(labels: Sequence[bool], probs: Sequence[float], threshold: float = 0.5) -> dict[str, Any]:
    """Accuracy at the threshold, AUC, counts and the mean log loss."""
    n = len(labels)
    correct = sum((p >= threshold) == bool(y) for y, p in zip(labels, probs))
    eps = 1e-7
    log_loss = -sum(
        math.log(min(max(p, eps), 1 - eps)) if y else math.log(1 - min(max(p, eps), 1 - eps))
        for y, p in zip(labels, probs)
    )
    auc = roc_auc(labels, probs)
    return {
        "n": n,
        "positives": sum(bool(y) for y in labels),
        "accuracy": correct / n if n else None,
        "auc": auc,
        "log_loss": log_loss / n if n else None,
    }


def grouped_accuracy(
    labels: Sequence[bool], probs: Sequence[float], groups: Sequence[str | None]
) -> dict[str, dict[str, Any]]:
    """Accuracy (and count) per group value; rows without a value are left out."""
    by: dict[str, list[int]] = defaultdict(list)
    for y, p, g in zip(labels, probs, groups):
        if g:
            by[g].append(int((p >= 0.5) == bool(y)))
    return {g: {"n": len(v), "accuracy": sum(v) / len(v)} for g, v in sorted(by.items())}


def pairwise_loss(logits: torch.Tensor, targets: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Mean over (correct i, incorrect j) pairs of one group (answers to one question) of
    softplus(logit_j - logit_i): the Bradley-Terry loss that the correct answer scores higher. 0 without pairs."""
    pos = targets > 0.5
    pairs = (group[:, None] == group[None, :]) & pos[:, None] & ~pos[None, :]  # (N, N): i correct, j not
    if not bool(pairs.any()):
        return logits.sum() * 0.0
    margin = logits[None, :] - logits[:, None]  # (N, N): logit_j - logit_i
    return F.softplus(margin[pairs]).mean()


def fit_logistic_1d(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, iters: int = 50, ridge: float = 1e-6
) -> tuple[float, float]:
    """(a, b) minimising the weighted log loss of sigmoid(a * x + b) against y, by Newton's method."""
    x, y, w = x.double(), y.double(), w.double()
    theta = torch.zeros(2, dtype=torch.float64)
    features = torch.stack([x, torch.ones_like(x)], dim=1)  # (n, 2)
    for _ in range(iters):
        p = torch.sigmoid(features @ theta)
        grad = features.T @ (w * (p - y))
        hess = features.T @ (features * (w * p * (1 - p))[:, None]) + ridge * torch.eye(
            2, dtype=torch.float64
        )
        step = torch.linalg.solve(hess, grad)
        theta -= step
        if float(step.abs().max()) < 1e-10:
            break
    return float(theta[0]), float(theta[1])
