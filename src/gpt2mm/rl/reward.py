"""Stage 2's reward: what a sampled answer scores. The official VQA accuracy against the question's human
answers (normalized exact match against a sample's single answer: the score `gpt2mm eval`
reports), a learned reward model's P(correct), or a weighted sum of them, as the recipe's `reward:` spec
says."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2mm.errors import UsageError


def parse_reward(spec: str) -> list[tuple[float, str]]:
    """`"vqa"`, `"model:DIR"` or a weighted sum `"0.7*vqa+0.3*model:DIR"` -> [(weight, source), ...]."""
    terms = []
    for part in str(spec).split("+"):
        part = part.strip()
        weight = 1.0
        if "*" in part:
            w, part = part.split("*", 1)
            try:
                weight = float(w)
            except ValueError:
                raise ValueError(f"reward {spec!r}: {w!r} is not a weight") from None
            part = part.strip()
        if part != "vqa" and not (part.startswith("model:") and len(part) > len("model:")):
            raise ValueError(f"reward {spec!r}: each term is vqa or model:DIR (with an optional weight*)")
        terms.append((weight, part))
    return terms


class Reward:
    """Answers -> scores (B,): the weighted sum of the recipe's terms. `vqa` is the official VQA accuracy
    against each sample's human answers, or normalized exact match against a sample's single answer
    (`gpt2mm.eval.vqa_metric.answer_score`, the score of every evaluation in the project);
    `model:DIR` is a reward model's P(correct)."""

    def __init__(self, spec: str, device: str | torch.device = "cpu"):
        self.terms = parse_reward(spec)
        self.scorers = {}
        for _, source in self.terms:
            if source.startswith("model:") and source not in self.scorers:
                from gpt2mm.reward.model import RewardScorer

                path = source[len("model:") :]
                if not Path(path).is_dir():
                    raise UsageError(f"reward: no reward model directory at {path}")
                self.scorers[source] = RewardScorer(path, device=device)

    def __call__(self, samples: list, answers: list[str]) -> torch.Tensor:
        from gpt2mm.eval.evaluate import references
        from gpt2mm.eval.vqa_metric import answer_score

        total = torch.zeros(len(answers))
        for weight, source in self.terms:
            if source == "vqa":
                values = [answer_score(a, references(s)) for s, a in zip(samples, answers)]
            else:
                values = self.scorers[source](
                    [s.image for s in samples], [s.turns[0].text for s in samples], answers
                )
            total += weight * torch.tensor(values, dtype=torch.float32)
        return total
