"""How good a reward model is on tags: P(correct) by the packed path, accuracy / AUC (per `kind` and `family`
when the tags carry them), the packed path checked against the scorer's one-answer-at-a-time path, and the
report printed at the end of training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gpt2mm.reward.data import EXTRA_KEYS, Batcher
from gpt2mm.reward.metrics import binary_metrics, grouped_accuracy


@torch.no_grad()
def predict(reward, batcher: Batcher, indices: Sequence[int], batch_rows: int) -> dict[int, float]:
    """P(correct) of the examples at `indices`, by the packed path."""
    was_training = reward.training
    reward.eval()
    device = next(reward.parameters()).device
    probs: dict[int, float] = {}
    for groups in batcher.batches(batcher.groups(indices), batch_rows):
        batch, rows = batcher.collate(groups)
        batch.pop("labels")
        logits = reward.forward_packed(**{k: v.to(device) for k, v in batch.items()})
        probs.update(zip(rows, torch.sigmoid(logits).tolist()))
    reward.train(was_training)
    return probs


@torch.no_grad()
def packing_error(reward, batcher: Batcher, indices: Sequence[int], batch_rows: int) -> float:
    """Largest |P(packed) - P(one at a time, right-padded)| over the examples: a run-time parity check."""
    packed = predict(reward, batcher, indices, batch_rows)
    reward.eval()
    device = next(reward.parameters()).device
    worst = 0.0
    for start in range(0, len(indices), batch_rows):
        rows = list(indices[start : start + batch_rows])
        batch = batcher.collate_plain(rows)
        plain = torch.sigmoid(reward(**{k: v.to(device) for k, v in batch.items()})).tolist()
        worst = max([worst] + [abs(p - packed[i]) for i, p in zip(rows, plain)])
    return worst


def evaluate(reward, batcher: Batcher, indices: Sequence[int], batch_rows: int) -> dict[str, Any]:
    """Accuracy, AUC, and accuracy per kind / family (when the tags carry them) of the examples at indices."""
    by_index = predict(reward, batcher, indices, batch_rows)
    examples = [batcher.examples[i] for i in indices]
    probs = [by_index[i] for i in indices]
    labels = [e.label for e in examples]
    out = binary_metrics(labels, probs)
    for key in EXTRA_KEYS:
        groups = [e.extra.get(key) for e in examples]
        if any(groups):
            out[f"by_{key}"] = grouped_accuracy(labels, probs, groups)
    return out


def format_report(metrics: dict[str, Any]) -> str:
    """The lines printed at the end of a run: steps, loss, the accuracies (held-out per kind / family)."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    lines = [
        f"trained {metrics['steps']} steps ({metrics['epochs']} epochs) in {metrics['train_seconds']:.0f}s "
        f"({metrics['stop_reason']}); final loss {metrics['final_loss']:.4f}",
        f"train sample: accuracy {pct(metrics['train_sample']['accuracy'])}",
    ]
    h = metrics["heldout"]
    if h is None:
        lines.append("no held-out tags (--holdout 0 and no --eval-tags)")
        return "\n".join(lines)
    auc = "n/a" if h["auc"] is None else f"{h['auc']:.4f}"
    lines.append(
        f"held-out: accuracy {pct(h['accuracy'])}, AUC {auc} ({h['n']} tags, {h['positives']} correct)"
    )
    for key in EXTRA_KEYS:
        for name, g in h.get(f"by_{key}", {}).items():
            lines.append(f"  {key} {name:<14} {pct(g['accuracy']):>8}  ({g['n']})")
    return "\n".join(lines)
