"""`gpt2mm reward train`: a reward model that predicts P(correct) for an answer, from correct/incorrect tags.

    gpt2mm reward simulate --world data/synth --split train --out tags/train.jsonl   # or tags from `gpt2mm tag`
    gpt2mm reward simulate --world data/synth --split test --out tags/test.jsonl
    gpt2mm reward train --tags tags/train.jsonl --eval-tags tags/test.jsonl --base runs/tiny-synth/best \\
        --out runs/reward --epochs 4      # 95.5-95.8% held-out on the demo world
    gpt2mm reward train --tags tags.sqlite --holdout 0.1 --base runs/tiny-synth/best --out runs/reward

The model is the stage-1 checkpoint with a scalar head on the last token of `Q: <image> {question} A:
{answer}<|endoftext|>` (`gpt2mm.reward.model.RewardModel`); the logit also gets the model's own scaled
log-likelihood of the answer, fitted on the tags before training starts (`--no-lm-prior` drops it). The
loss: binary cross-entropy against the tags (classes weighted to half each, `--balance`), plus a pairwise
loss that ranks a correct answer above an incorrect one to the same question (`--rank-weight`). Held-out
tags are `--eval-tags`, or else a `--holdout` share of the images (split by image, so no held-out image is
seen in training). The report, also in DIR/metrics.json: held-out accuracy (threshold 0.5), ROC AUC, and
accuracy per `kind` / `family` when the tags carry those keys (simulated tags do). PPO uses the result
with `reward: model:DIR`.

What was measured to matter (the synthetic world, README): batches of many different images and
questions, with the answers to one question together (`--pack question`: their shared prefix, the image
and the question, is computed once; `--pack image` shares more but puts few images in a batch and did not
learn); a learning rate of at most 1e-3 (2e-3 got stuck judging answers without looking at the image); and
on a busy shared CPU, `OMP_NUM_THREADS=1` (a step was 3 to 6 times faster than with 2 threads there).

Simplifications: the tags are held in memory; the vision tower stays frozen (as in stage 1 of the tiny
and seed recipes) unless `--train-vision`, and its outputs are then computed once per image; repeated tags
of one item by several taggers are kept as separate examples (disagreements become soft targets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
import typing
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gpt2mm.errors import DataError, UsageError

# --- configuration ---------------------------------------------------------------------------------------


@dataclass
class RewardTrainConfig:
    tags: str = field(metadata={"help": "training tags: a tag database (.sqlite) or a JSONL export"})
    base: str = field(metadata={"help": "the stage-1 checkpoint to start from (or a reward model dir)"})
    out: str = field(metadata={"help": "the reward model directory to write"})
    overwrite: bool = field(default=False, metadata={"help": "replace --out if it exists and is not empty"})
    eval_tags: str | None = field(default=None, metadata={"help": "held-out tags (else --holdout)"})
    holdout: float = field(default=0.1, metadata={"help": "share of the images held out when no --eval-tags"})
    image_root: str | None = field(
        default=None,
        metadata={"help": "relative image paths resolve against it (default: the tag file's dir)"},
    )
    epochs: float = field(default=1.0, metadata={"help": "passes over the training tags"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides --epochs)"})
    max_minutes: float | None = field(default=None, metadata={"help": "stop after this much training time"})
    batch_size: int = field(default=128, metadata={"help": "answers per optimizer step"})
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = field(default=0, metadata={"help": "held-out evaluation every N steps (0: at the end)"})
    eval_batch_size: int = 256
    balance: bool = field(
        default=True,
        metadata={"help": "weight the classes to half the loss each (for tags that are not half correct)"},
    )
    rank_weight: float = field(
        default=1.0,
        metadata={"help": "weight of a pairwise loss: correct above incorrect answers to one question"},
    )
    lm_prior: bool = field(
        default=True,  # measured: 92.9% held-out accuracy against 89.5% without (README)
        metadata={"help": "add the model's scaled log-likelihood of the answer to the logit (RewardModel)"},
    )
    pack: str = field(
        default="question",
        metadata={"help": "share prefixes among the answers to one question | image | none (see Batcher)"},
    )
    train_vision: bool = field(default=False, metadata={"help": "train the vision tower too"})
    skip_bad: bool = field(default=False, metadata={"help": "skip (and count) tags whose image is missing"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    log_every: int = 50
    progress: bool = field(default=True, metadata={"help": "a progress bar on stderr"})

    def __post_init__(self):
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")


# --- metrics -------------------------------------------------------------------------------------------


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


@torch.no_grad()
def init_lm_prior(
    reward, batcher, indices: Sequence[int], batch_rows: int, class_weight: torch.Tensor
) -> dict:
    """Start lm_prior at the best logistic fit of P(correct) on the answer's log-likelihood alone (the head's
    weight stays near 0): training starts from the stage-1 model's own judgement, not from a coin."""
    was_training = reward.training
    reward.eval()
    device = next(reward.parameters()).device
    lms, labels = [], []
    for groups in batcher.batches(batcher.groups(indices), batch_rows):
        batch, rows = batcher.collate(groups)
        labels.append(batch.pop("labels"))
        _, lm = reward.forward_packed(**{k: v.to(device) for k, v in batch.items()}, return_parts=True)
        lms.append(lm.cpu())
    x, y = torch.cat(lms), torch.cat(labels)
    a, b = fit_logistic_1d(x, y, class_weight.cpu()[y.long()])
    reward.lm_scale.fill_(a)
    reward.head.bias.fill_(b)
    reward.train(was_training)
    accuracy = float(((a * x + b > 0).double() == y.double()).double().mean())
    return {"lm_scale": a, "bias": b, "train_accuracy": accuracy, "rows": len(y)}


# --- data ------------------------------------------------------------------------------------------------

EXTRA_KEYS = ("kind", "family")  # optional JSONL keys reported per value (simulated tags carry them)
PACK_MODES = ("question", "image", "none")


@dataclass
class Example:
    input_ids: list[int]
    image: str | None
    question: str
    label: bool
    extra: dict[str, str]


def read_extra(path: Path, n_records: int) -> list[dict[str, str]]:
    """The optional keys of each tag row, in `read_tags` order (JSONL only; the same skip rules)."""
    empty = [{} for _ in range(n_records)]
    with open(path, "rb") as f:
        if f.read(16) == b"SQLite format 3\x00":
            return empty
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)  # read_tags has checked it
            if row["label"] == "skip":
                continue
            out.append({k: str(row[k]) for k in EXTRA_KEYS if row.get(k)})
    return out if len(out) == n_records else empty


def load_tag_file(path: str | Path, what: str) -> tuple[list, list[dict[str, str]]]:
    from gpt2mm.tag.store import read_tags

    path = Path(path)
    try:
        records = read_tags(path)
    except DataError as e:
        raise UsageError(f"{what}: {e}") from None
    if not records:
        raise UsageError(f"{what} {path}: no correct / incorrect tags (skips are left out)")
    return records, read_extra(path, len(records))


def resolve_image(image: str, root: Path) -> str | None:
    """A tag's image: None for a text-only item (empty), else an absolute path (relative ones under root)."""
    if not image:
        return None
    p = Path(image)
    return str(p if p.is_absolute() else root / p)


def split_by_image(n: int, images: Sequence[str | None], questions: Sequence[str], share: float, seed: int):
    """Indices (train, held-out): a `share` of the distinct images (text-only items: of their questions)
    go to held-out, drawn by the seed, so that no held-out image is seen in training."""
    keys = [im if im is not None else f"text:{q}" for im, q in zip(images, questions)]
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise UsageError(
            f"--holdout needs tags about 2 images at least, got {len(distinct)}; pass --eval-tags"
        )
    random.Random(f"gpt2mm-reward-split/{seed}").shuffle(distinct)
    n_eval = min(len(distinct) - 1, max(1, round(share * len(distinct))))
    held = set(distinct[:n_eval])
    train = [i for i in range(n) if keys[i] not in held]
    evals = [i for i in range(n) if keys[i] in held]
    return train, evals


def make_examples(
    records: Sequence,
    extras: Sequence[dict],
    processor: Any,
    root: Path,
    max_len: int,
    skipped: Counter,
    skip_bad: bool,
    what: str,
) -> list[Example]:
    """Tags -> token ids + image path + label; a missing image is an error (or, with skip_bad, counted)."""
    from gpt2mm.reward.model import encode

    out, missing = [], []
    exists: dict[str, bool] = {}
    encoded: dict[tuple[str, str, bool], list[int]] = {}  # questions and answers repeat: tokenize once
    for r, extra in zip(records, extras):
        image = resolve_image(r.image, root)
        if image is not None:
            if image not in exists:
                exists[image] = Path(image).is_file()
            if not exists[image]:
                missing.append((r, image))
                continue
        key = (r.question, r.answer, image is not None)
        if key not in encoded:
            encoded[key] = encode(processor, r.question, r.answer, with_image=image is not None)
        ids = encoded[key]
        if len(ids) > max_len:
            skipped[f"{what}: longer than the model's {max_len} positions"] += 1
            continue
        out.append(Example(ids, image, r.question, bool(r.label), extra))
    if missing:
        r, image = missing[0]
        if not skip_bad:
            raise UsageError(
                f"{what}: {len(missing)} of {len(records)} tags name images that do not exist, e.g. "
                f"{image} (question_id {r.question_id}); set --image-root, or --skip-bad to skip them"
            )
        skipped[f"{what}: image not found"] += len(missing)
    return out


class VisionStates:
    """Image path -> vision-tower output, computed once per image (the tower is frozen), kept in memory."""

    def __init__(self, model: Any, processor: Any, device: torch.device):
        self.model, self.processor, self.device = model, processor, device
        self.states: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def build(self, paths: Sequence[str], batch_size: int = 256, progress: bool = False) -> None:
        from gpt2mm.data.images import load_image

        todo = sorted(set(paths) - set(self.states))
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="vision states", file=sys.stderr, mininterval=2.0)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            try:
                pixels = self.processor.preprocess_images([load_image(p) for p in chunk])
            except DataError as e:
                raise UsageError(str(e)) from None
            states = self.model.get_vision_hidden_states(pixels.to(self.device))  # (n, T_img, C_vision)
            for p, s in zip(chunk, states):
                self.states[p] = s
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()

    def __call__(self, path: str) -> torch.Tensor:
        return self.states[path]


class Batcher:
    """Examples -> packed batches. Answers that share a prefix become one prefix tree (`pack_prefix_trees`),
    which computes the shared tokens once and gives the same scores as one answer at a time. `pack`:
    "question" groups the answers to one question about one image (they share `Q: <image> {question} A:`;
    half the tokens of unpacked answers with two answers per question); "image" groups all the answers
    about an image (a third of the tokens, but few images per batch: it learned much slower, measured);
    "none" packs nothing. A batch takes groups, in the given order, until it holds `rows` answers."""

    def __init__(
        self,
        examples: Sequence[Example],
        pad_id: int,
        images: Callable[[str], torch.Tensor],
        image_key: str,
        pack: str = "question",
        max_group_rows: int = 32,
        answer_marker: Sequence[int] | None = None,
    ):
        if pack not in PACK_MODES:
            raise UsageError(f"pack must be one of {', '.join(PACK_MODES)}, got {pack!r}")
        self.examples, self.pad_id, self.images, self.image_key = examples, pad_id, images, image_key
        self.pack, self.max_group_rows, self.answer_marker = pack, max_group_rows, answer_marker

    def groups(self, indices: Sequence[int]) -> list[list[int]]:
        """Indices grouped by image, or by (image, question), or one per group; in chunks of at most
        max_group_rows."""
        by: dict[Any, list[int]] = defaultdict(list)
        for i in indices:
            e = self.examples[i]
            key = e.image if self.pack == "image" else (e.image, e.question) if self.pack == "question" else i
            by[key].append(i)
        m = self.max_group_rows
        return [rows[k : k + m] for rows in by.values() for k in range(0, len(rows), m)]

    @staticmethod
    def batches(groups: Sequence[list[int]], rows: int) -> list[list[list[int]]]:
        """Consecutive groups, as many as make `rows` answers (at least one group per batch)."""
        out, current, n = [], [], 0
        for g in groups:
            current.append(g)
            n += len(g)
            if n >= rows:
                out.append(current)
                current, n = [], 0
        if current:
            out.append(current)
        return out

    def collate(self, groups: Sequence[list[int]]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """One packed batch (the model's `forward_packed` arguments + labels) and its rows, in order."""
        from gpt2mm.reward.model import pack_prefix_trees

        ex = self.examples
        batch = pack_prefix_trees(
            [[ex[i].input_ids for i in g] for g in groups], self.pad_id, answer_marker=self.answer_marker
        )
        paths = [ex[g[0]].image for g in groups if ex[g[0]].image is not None]
        if paths:
            batch[self.image_key] = torch.stack([self.images(p) for p in paths])
        rows = [i for g in groups for i in g]
        batch["labels"] = torch.tensor([float(ex[i].label) for i in rows])
        return batch, rows

    def collate_plain(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """One right-padded batch for `forward` (the scorer's path), to check the packed one against."""
        from gpt2mm.reward.model import pad_right

        ex = [self.examples[i] for i in rows]
        input_ids, mask = pad_right([e.input_ids for e in ex], self.pad_id)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        paths = [e.image for e in ex if e.image is not None]
        if paths:
            batch[self.image_key] = torch.stack([self.images(p) for p in paths])
        return batch


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


# --- the model -------------------------------------------------------------------------------------------


def load_base(path: str, lm_prior: bool = False) -> Any:
    """The reward model to train: a fresh head on a gpt2mm checkpoint, or a saved reward model to continue."""
    from gpt2mm.reward.model import RewardModel, is_reward_dir

    p = Path(path)
    config = p / "config.json"
    if not config.is_file():
        raise UsageError(f"--base {p} is not a gpt2mm model directory: it has no config.json")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise UsageError(f"--base {config} is not a JSON object") from None
    if model_type != "gpt2mm":
        raise UsageError(f"--base {p} is not a gpt2mm model: its config.json has model_type {model_type!r}")
    try:
        reward = (
            RewardModel.from_pretrained(p)
            if is_reward_dir(p)
            else RewardModel.from_base(p, lm_prior=lm_prior)
        )
    except (OSError, ValueError) as e:
        raise UsageError(f"--base {p}: cannot load the model ({e})") from None
    if reward.lm_prior != lm_prior:
        raise UsageError(
            f"--base {p} is a reward model with lm_prior {reward.lm_prior}; pass the same --lm-prior "
            "setting (on by default, --no-lm-prior turns it off)"
        )
    return reward


# --- training --------------------------------------------------------------------------------------------


def check_out(out: Path, base: Path, overwrite: bool) -> None:
    """Before any work: --out is written whole at the end and replaces what is there, so it must not be (or
    hold) --base, and a folder with files in it is replaced only with --overwrite."""
    out_r, base_r = out.resolve(), base.resolve()
    if out_r == base_r or out_r in base_r.parents:
        raise UsageError(
            f"--out {out} would replace --base {base}, the model training starts from: give another --out"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        from gpt2mm.reward.model import is_reward_dir

        what = "a reward model" if is_reward_dir(out) else "files"
        raise UsageError(
            f"--out {out} already holds {what}: give another --out, or replace it with --overwrite"
        )


def train_reward(cfg: RewardTrainConfig, log=print) -> dict[str, Any]:
    """Read the tags, train, evaluate, write DIR (model + processor + metrics.json); returns the metrics."""
    from transformers.utils import logging as hf_logging

    from gpt2mm.reward.model import RewardModel, is_reward_dir
    from gpt2mm.train.checkpoints import atomic_save_dir
    from gpt2mm.train.config import TrainConfig
    from gpt2mm.train.optim import lr_lambda, make_optimizer

    hf_logging.disable_progress_bar()  # ours is the one to watch
    check_out(Path(cfg.out), Path(cfg.base), cfg.overwrite)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )

    # 1. tags: read, check both classes, split off the held-out set (by image)
    tags_path = Path(cfg.tags)
    records, extras = load_tag_file(tags_path, "--tags")
    if cfg.eval_tags:
        eval_records, eval_extras = load_tag_file(cfg.eval_tags, "--eval-tags")
    labels = Counter(bool(r.label) for r in records)
    if len(labels) < 2:
        only = "correct" if True in labels else "incorrect"
        raise UsageError(
            f"--tags {tags_path}: all {len(records)} tags are {only}; a reward model needs both correct and "
            "incorrect answers"
        )
    reward: RewardModel = load_base(cfg.base, cfg.lm_prior)
    processor = reward.processor
    max_len = reward.config.text_config.n_positions
    skipped: Counter = Counter()
    root = Path(cfg.image_root) if cfg.image_root else tags_path.parent
    train_ex = make_examples(records, extras, processor, root, max_len, skipped, cfg.skip_bad, "--tags")
    if cfg.eval_tags:
        eval_root = Path(cfg.image_root) if cfg.image_root else Path(cfg.eval_tags).parent
        eval_ex = make_examples(
            eval_records, eval_extras, processor, eval_root, max_len, skipped, cfg.skip_bad, "--eval-tags"
        )
    elif cfg.holdout > 0:
        tr, ev = split_by_image(
            len(train_ex),
            [e.image for e in train_ex],
            [str(e.input_ids) for e in train_ex],
            cfg.holdout,
            cfg.seed,
        )
        train_ex, eval_ex = [train_ex[i] for i in tr], [train_ex[i] for i in ev]
    else:
        eval_ex = []
    if not train_ex:
        raise UsageError(f"--tags {tags_path}: no training tags left ({dict(skipped)})")
    if len({e.label for e in train_ex}) < 2:
        raise UsageError(f"--tags {tags_path}: the training share holds one class only; more tags are needed")
    n_pos = sum(e.label for e in train_ex)
    log(
        f"tags: {len(train_ex)} train ({n_pos} correct), {len(eval_ex)} held out "
        f"({sum(e.label for e in eval_ex)} correct)" + (f"; skipped {dict(skipped)}" if skipped else "")
    )

    # 2. the model: vision frozen (its outputs computed once per image) unless --train-vision
    model = reward.model
    if cfg.train_vision:
        model.config.freeze_vision = False
        model.vision_tower.requires_grad_(True)
        model.vision_tower.post_layernorm.requires_grad_(False)
    else:
        model.config.freeze_vision = True
        model.freeze_vision()
    reward.to(device)
    paths = sorted({e.image for e in train_ex + eval_ex if e.image is not None})
    if cfg.train_vision:
        from gpt2mm.data.features import PixelStore

        image_source, image_key = PixelStore(processor, cache=True), "pixel_values"
    else:
        image_source, image_key = VisionStates(model, processor, device), "vision_hidden_states"
        start = time.perf_counter()
        image_source.build(paths, progress=cfg.progress)
        log(f"vision states of {len(paths)} images in {time.perf_counter() - start:.0f}s")
    examples = train_ex + eval_ex
    train_idx = list(range(len(train_ex)))
    eval_idx = list(range(len(train_ex), len(examples)))
    marker = reward.answer_marker if reward.lm_prior else None
    batcher = Batcher(
        examples, processor.tokenizer.pad_token_id, image_source, image_key, cfg.pack, answer_marker=marker
    )
    train_groups = batcher.groups(train_idx)
    n_neg = len(train_idx) - n_pos
    class_weight = torch.ones(2, device=device)  # [incorrect, correct]
    if cfg.balance:
        class_weight = torch.tensor(
            [len(train_idx) / (2 * n_neg), len(train_idx) / (2 * n_pos)], device=device
        )

    # 3. the loop: AdamW, warmup + cosine decay (sft's), BCE (+ the pairwise loss); each step takes whole
    #    groups (the answers to one question) until it holds batch_size answers; groups shuffled per epoch
    per_epoch = len(batcher.batches(train_groups, cfg.batch_size))
    max_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))
    tcfg = TrainConfig(
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=min(cfg.warmup_steps, max_steps // 5),
        max_steps=max_steps,
        max_minutes=cfg.max_minutes,
        schedule="cosine",
        grad_clip=cfg.grad_clip,
    )
    prior_fit = None
    if reward.lm_prior and not is_reward_dir(cfg.base):
        sample = sorted(random.Random(cfg.seed).sample(train_idx, min(len(train_idx), 4096)))
        prior_fit = init_lm_prior(reward, batcher, sample, cfg.eval_batch_size, class_weight)
        log(
            f"lm_prior: logit = {prior_fit['lm_scale']:.3f} * log P(answer) + {prior_fit['bias']:.3f} to start "
            f"(accuracy {100 * prior_fit['train_accuracy']:.2f}% on {prior_fit['rows']} training tags)"
        )
    train_seconds = 0.0
    optimizer = make_optimizer(reward, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, lambda: train_seconds))
    head_before = reward.head.weight.detach().clone()
    history: list[dict[str, Any]] = []
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, desc="reward", file=sys.stderr, dynamic_ncols=True, mininterval=2.0)
    if cfg.eval_every and eval_idx:
        m = evaluate(reward, batcher, eval_idx, cfg.eval_batch_size)
        history.append({"step": 0, "heldout_accuracy": m["accuracy"], "heldout_auc": m["auc"]})
        log(f"step 0: held-out accuracy {m['accuracy']:.4f}, AUC {m['auc']}")
    reward.train()
    step, epoch, rows_seen, stop_reason = 0, 0, 0, "max_steps"
    window_loss, window_n = 0.0, 0
    while step < max_steps and stop_reason == "max_steps":
        g = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
        shuffled = [train_groups[i] for i in torch.randperm(len(train_groups), generator=g).tolist()]
        for groups in batcher.batches(shuffled, cfg.batch_size):
            if step >= max_steps:
                break
            step_start = time.perf_counter()
            batch, rows = batcher.collate(groups)
            batch = {k: v.to(device) for k, v in batch.items()}
            targets = batch.pop("labels")
            logits = reward.forward_packed(**batch)  # (N,)
            weights = class_weight[targets.long()]  # (N,): each class half the loss with --balance
            loss = (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weights).mean()
            if cfg.rank_weight:
                owner = torch.repeat_interleave(
                    torch.arange(len(groups), device=device),
                    torch.tensor([len(g) for g in groups], device=device),
                )
                loss = loss + cfg.rank_weight * pairwise_loss(logits, targets, owner)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(reward.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            rows_seen += len(rows)
            train_seconds += time.perf_counter() - step_start
            window_loss += float(loss.detach())
            window_n += 1
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                bar.update(1)
            if step % cfg.log_every == 0 or step == max_steps:
                history.append(
                    {"step": step, "train_seconds": round(train_seconds, 2), "loss": window_loss / window_n}
                )
                if bar is None:
                    log(f"step {step}: loss {window_loss / window_n:.4f} ({train_seconds:.0f}s)")
                window_loss, window_n = 0.0, 0
            if cfg.eval_every and eval_idx and step % cfg.eval_every == 0 and step < max_steps:
                m = evaluate(reward, batcher, eval_idx, cfg.eval_batch_size)
                history.append({"step": step, "heldout_accuracy": m["accuracy"], "heldout_auc": m["auc"]})
                log(f"step {step}: held-out accuracy {m['accuracy']:.4f}, AUC {m['auc']}")
            if cfg.max_minutes is not None and train_seconds > 60 * cfg.max_minutes:
                stop_reason = "max_minutes"
                break
        epoch += 1
    if bar is not None:
        bar.close()
    if window_n:
        history.append(
            {"step": step, "train_seconds": round(train_seconds, 2), "loss": window_loss / window_n}
        )

    # 4. evaluate: held-out, a sample of the training tags (to see over-fitting), and the packed path
    #    against the scorer's one-answer-at-a-time path on a few held-out tags
    sample = sorted(random.Random(cfg.seed).sample(train_idx, min(len(train_idx), 2000)))
    train_metrics = evaluate(reward, batcher, sample, cfg.eval_batch_size)
    heldout = evaluate(reward, batcher, eval_idx, cfg.eval_batch_size) if eval_idx else None
    check = (eval_idx or train_idx)[:128]
    parity = packing_error(reward, batcher, check, cfg.eval_batch_size)
    if parity > 1e-3:
        raise RuntimeError(f"packed and one-at-a-time scores differ by {parity:.2e}: a bug in packing")
    metrics = {
        "heldout": heldout,
        "train_sample": train_metrics,
        "tags": {
            "train": len(train_ex),
            "train_correct": n_pos,
            "heldout": len(eval_ex),
            "heldout_correct": sum(e.label for e in eval_ex),
            "images": len(paths),
            "skipped": dict(skipped),
        },
        "steps": step,
        "epochs": round(rows_seen / len(train_idx), 3),
        "rows_seen": rows_seen,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "stop_reason": stop_reason,
        "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "head_moved": not torch.equal(head_before, reward.head.weight.detach()),
        "packing_max_abs_diff": parity,
        "lm_prior_init": prior_fit,
        "history": history,
        "base": str(cfg.base),
        "config": dataclasses.asdict(cfg),
    }

    # 5. write DIR atomically: the reward model, its processor, metrics.json
    def write(tmp: Path) -> None:
        reward.write_files(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_dir(out, write)
    log(format_report(metrics))
    log(f"wrote {out}")
    return metrics


def format_report(metrics: dict[str, Any]) -> str:
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


# --- the command -----------------------------------------------------------------------------------------


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--name` per dataclass field (help from its metadata); values are parsed by `train.args.build`,
    so the dataclass stays the single source of truth. Booleans are flags (`--x`, or `--no-x` when on)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = (
            None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        )
        help_ = f.metadata.get("help", "")
        if hints[f.name] is bool:
            if default:
                parser.add_argument(
                    "--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const", const="false",
                    default=argparse.SUPPRESS, help=f"{help_} (default on; this turns it off)",
                )  # fmt: skip
            else:
                parser.add_argument(
                    flag,
                    dest=f.name,
                    action="store_const",
                    const="true",
                    default=argparse.SUPPRESS,
                    help=help_,
                )
            continue
        parser.add_argument(
            flag,
            dest=f.name,
            required=required,
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            help=help_ if required or (default is None and help_) else f"{help_} (default {default!r})",
        )


def config_from_args(cls: type, args: argparse.Namespace, skip: Sequence[str] = ("action",)):
    from gpt2mm.train.args import build

    try:
        return build(cls, {k: v for k, v in vars(args).items() if k not in skip})
    except UsageError as e:  # "lr: expected float" -> "--lr: expected float", as the user typed it
        name = str(e).split(":", 1)[0]
        if name in {f.name for f in dataclasses.fields(cls)}:
            raise UsageError("--" + name.replace("_", "-") + str(e)[len(name) :]) from None
        raise


def configure(parser: argparse.ArgumentParser) -> None:
    from gpt2mm.reward.simulate import SimulateConfig

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add_config_args(sub.add_parser("train", help="train a reward model on tags", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter), RewardTrainConfig)  # fmt: skip
    from gpt2mm.reward import simulate

    add_config_args(
        sub.add_parser(
            "simulate",
            help="simulated tags from a synthetic world's ground truth",
            description=simulate.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        ),
        SimulateConfig,
    )


def run(args: argparse.Namespace) -> int:
    if args.action == "simulate":
        from gpt2mm.reward.simulate import SimulateConfig, run_simulate

        return run_simulate(config_from_args(SimulateConfig, args))
    train_reward(config_from_args(RewardTrainConfig, args))
    return 0
