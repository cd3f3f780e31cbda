"""`gpt2mm reward train`: a reward model that predicts P(correct) for an answer, from correct/incorrect tags.

    gpt2mm reward simulate --world data/demo-world --split train --out tags/train.jsonl  # or `gpt2mm tag`'s
    gpt2mm reward simulate --world data/demo-world --split test --out tags/test.jsonl
    gpt2mm reward train --tags tags/train.jsonl --eval-tags tags/test.jsonl --base runs/demo-sft/best \\
        --out runs/reward --epochs 4
    gpt2mm reward train --tags tags.sqlite --holdout 0.1 --base runs/demo-sft/best --out runs/reward

The model is the stage-1 checkpoint with a scalar head on the last token of `Q: <image> {question} A:
{answer}<|endoftext|>` (`gpt2mm.reward.model.RewardModel`); the logit also gets the model's own scaled
log-likelihood of the answer, fitted on the tags before training starts (`--no-lm-prior` drops it). The
loss: binary cross-entropy against the tags (classes weighted to half each, `--balance`), plus a pairwise
loss that ranks a correct answer above an incorrect one to the same question (`--rank-weight`). Held-out
tags are `--eval-tags`, or else a `--holdout` share of the images (split by image, so no held-out image is
seen in training). The report, also in DIR/metrics.json: held-out accuracy (threshold 0.5), ROC AUC, and
accuracy per `kind` / `family` when the tags carry those keys (simulated tags do). PPO uses the result
with `reward: model:DIR`.

Why the defaults (docs/rl.md and docs/experiments.md have the measurements): batches of many different
images and questions, with the answers to one question together (`--pack question`: their shared prefix,
the image and the question, is computed once; `--pack image` shares more but puts few images in a batch);
a learning rate of at most 1e-3 (higher ones learn to judge answers without looking at the image).

Simplifications: the tags are held in memory; the vision tower stays frozen (as in stage 1 of the tiny
and seed recipes) unless `--train-vision`, and its outputs are then computed once per image; repeated tags
of one item by several taggers are kept as separate examples (disagreements become soft targets).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gpt2mm.data.features import PixelStore, VisionStates
from gpt2mm.devices import pick_device
from gpt2mm.errors import UsageError
from gpt2mm.reward.data import Batcher, Example, load_tag_file, make_examples, split_by_image
from gpt2mm.reward.evaluate import evaluate, format_report, packing_error
from gpt2mm.reward.metrics import fit_logistic_1d, pairwise_loss
from gpt2mm.train.checkpoints import atomic_save_dir, seed_everything
from gpt2mm.train.config import RunConfig
from gpt2mm.train.logging import ProgressBar, time_is_up
from gpt2mm.train.optim import make_optimizer, make_scheduler


@dataclass
class RewardTrainConfig:
    """`gpt2mm reward train`'s options, one `--flag` each (`gpt2mm.commands.reward`); all of them are recorded in
    metrics.json. `run_config` gives the run layer's view of the schedule."""

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
        default=True,  # held-out accuracy gains ~3 points on the synthetic world (docs/experiments.md)
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

    def run_config(self, max_steps: int) -> RunConfig:
        """The run layer's config for `make_optimizer` and `make_scheduler`: AdamW, warmup (a fifth of the run at
        most) then cosine decay over `max_steps`, or over the time budget when that ends the run sooner."""
        return RunConfig(
            seed=self.seed,
            max_steps=max_steps,
            max_minutes=self.max_minutes,
            lr=self.lr,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            warmup_steps=min(self.warmup_steps, max_steps // 5),
            schedule="cosine",
        )


# --- set-up: the base model, the output folder, lm_prior's start -------------------------------------------


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


# --- the trainer ---------------------------------------------------------------------------------------------


class RewardTrainer:
    """Reads the tags, sets up the model, its image source and the optimizer (`__init__`); `train` runs the loop,
    evaluates and writes DIR. Its counters (`step`, `rows_seen`, `train_seconds`) and `history` are what
    metrics.json reports."""

    def __init__(self, cfg: RewardTrainConfig, log=print):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # ours is the one to watch
        check_out(Path(cfg.out), Path(cfg.base), cfg.overwrite)
        self.cfg, self.log = cfg, log
        self.t0 = time.perf_counter()
        seed_everything(cfg.seed)
        self.device = torch.device(pick_device(cfg.device))
        tags, eval_tags = self.read_tag_files()
        self.reward = load_base(cfg.base, cfg.lm_prior)
        self.skipped: Counter = Counter()
        self.train_ex, self.eval_ex = self.examples(tags, eval_tags)
        self.n_pos = sum(e.label for e in self.train_ex)
        self.paths = sorted({e.image for e in self.train_ex + self.eval_ex if e.image is not None})
        images = self.prepare_model()
        marker = self.reward.answer_marker if self.reward.lm_prior else None
        pad_id = self.reward.processor.tokenizer.pad_token_id
        self.batcher = Batcher(self.train_ex + self.eval_ex, pad_id, images, cfg.pack, answer_marker=marker)
        self.train_idx = list(range(len(self.train_ex)))
        self.eval_idx = list(range(len(self.train_ex), len(self.batcher.examples)))
        self.train_groups = self.batcher.groups(self.train_idx)
        self.class_weight = self.balanced_weights()
        per_epoch = len(self.batcher.batches(self.train_groups, cfg.batch_size))
        self.max_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))
        self.prior_fit = self.start_lm_prior()
        self.step, self.rows_seen, self.train_seconds, self.stop_reason = 0, 0, 0.0, "max_steps"
        self.window_loss, self.window_n = 0.0, 0
        self.history: list[dict[str, Any]] = []
        run = cfg.run_config(self.max_steps)
        self.optimizer = make_optimizer(self.reward, run)
        self.scheduler = make_scheduler(self.optimizer, run, lambda: self.train_seconds)
        self.head_before = self.reward.head.weight.detach().clone()

    # --- set-up ---

    def read_tag_files(self) -> tuple[tuple, tuple | None]:
        """(records, extras) of --tags and of --eval-tags (None without); --tags must hold both classes."""
        cfg = self.cfg
        tags_path = Path(cfg.tags)
        records, extras = load_tag_file(tags_path, "--tags")
        eval_tags = load_tag_file(cfg.eval_tags, "--eval-tags") if cfg.eval_tags else None
        labels = Counter(bool(r.label) for r in records)
        if len(labels) < 2:
            only = "correct" if True in labels else "incorrect"
            raise UsageError(
                f"--tags {tags_path}: all {len(records)} tags are {only}; a reward model needs both correct and "
                "incorrect answers"
            )
        return (records, extras), eval_tags

    def examples(self, tags: tuple, eval_tags: tuple | None) -> tuple[list[Example], list[Example]]:
        """Training and held-out examples: --eval-tags, or else a --holdout share of the images."""
        cfg, processor = self.cfg, self.reward.processor
        max_len = self.reward.config.text_config.n_positions
        tags_path = Path(cfg.tags)
        root = Path(cfg.image_root) if cfg.image_root else tags_path.parent
        train_ex = make_examples(*tags, processor, root, max_len, self.skipped, cfg.skip_bad, "--tags")
        if eval_tags is not None:
            eval_root = Path(cfg.image_root) if cfg.image_root else Path(cfg.eval_tags).parent
            eval_ex = make_examples(
                *eval_tags, processor, eval_root, max_len, self.skipped, cfg.skip_bad, "--eval-tags"
            )
        elif cfg.holdout > 0:
            images, questions = [e.image for e in train_ex], [str(e.input_ids) for e in train_ex]
            tr, ev = split_by_image(len(train_ex), images, questions, cfg.holdout, cfg.seed)
            train_ex, eval_ex = [train_ex[i] for i in tr], [train_ex[i] for i in ev]
        else:
            eval_ex = []
        if not train_ex:
            raise UsageError(f"--tags {tags_path}: no training tags left ({dict(self.skipped)})")
        if len({e.label for e in train_ex}) < 2:
            raise UsageError(
                f"--tags {tags_path}: the training share holds one class only; more tags are needed"
            )
        self.log(
            f"tags: {len(train_ex)} train ({sum(e.label for e in train_ex)} correct), {len(eval_ex)} held out "
            f"({sum(e.label for e in eval_ex)} correct)"
            + (f"; skipped {dict(self.skipped)}" if self.skipped else "")
        )
        return train_ex, eval_ex

    def prepare_model(self) -> Any:
        """The vision tower frozen, its outputs computed once per image (`VisionStates`), unless --train-vision
        (then pixels, `PixelStore`); the model on its device. Returns the image source."""
        cfg, reward = self.cfg, self.reward
        model = reward.model
        if cfg.train_vision:
            model.config.freeze_vision = False
            model.vision_tower.requires_grad_(True)
            model.vision_tower.post_layernorm.requires_grad_(False)
        else:
            model.config.freeze_vision = True
            model.freeze_vision()
        reward.to(self.device)
        if cfg.train_vision:
            return PixelStore(reward.processor, cache=True)
        images = VisionStates(model, reward.processor, self.device)
        start = time.perf_counter()
        images.build(self.paths, progress=cfg.progress)
        self.log(f"vision states of {len(self.paths)} images in {time.perf_counter() - start:.0f}s")
        return images

    def balanced_weights(self) -> torch.Tensor:
        """The loss weight of [incorrect, correct]: with --balance each class makes half the loss."""
        n, n_pos = len(self.train_idx), self.n_pos
        if not self.cfg.balance:
            return torch.ones(2, device=self.device)
        return torch.tensor([n / (2 * (n - n_pos)), n / (2 * n_pos)], device=self.device)

    def start_lm_prior(self) -> dict | None:
        """A fresh head's lm_prior fitted on up to 4096 training tags (a saved reward model keeps its own)."""
        from gpt2mm.reward.model import is_reward_dir

        cfg = self.cfg
        if not self.reward.lm_prior or is_reward_dir(cfg.base):
            return None
        sample = sorted(random.Random(cfg.seed).sample(self.train_idx, min(len(self.train_idx), 4096)))
        fit = init_lm_prior(self.reward, self.batcher, sample, cfg.eval_batch_size, self.class_weight)
        self.log(
            f"lm_prior: logit = {fit['lm_scale']:.3f} * log P(answer) + {fit['bias']:.3f} to start "
            f"(accuracy {100 * fit['train_accuracy']:.2f}% on {fit['rows']} training tags)"
        )
        return fit

    # --- the loop ---

    def train(self) -> dict[str, Any]:
        """Train, evaluate, write DIR (model + processor + metrics.json); returns the metrics."""
        self.fit()
        metrics = self.final_metrics()
        self.write(metrics)
        return metrics

    def fit(self) -> None:
        """Steps until max_steps or the time budget. Each step takes whole groups (the answers to one question)
        until it holds batch_size answers; the groups are shuffled per epoch."""
        cfg = self.cfg
        bar = ProgressBar(cfg.progress, "reward", 0, self.max_steps, cfg.max_minutes)
        if cfg.eval_every and self.eval_idx:
            self.record_heldout()
        self.reward.train()
        epoch = 0
        while self.step < self.max_steps and self.stop_reason == "max_steps":
            for groups in self.batcher.batches(self.shuffled_groups(epoch), cfg.batch_size):
                if self.step >= self.max_steps:
                    break
                loss = self.train_step(groups)
                bar.update(self.step, self.train_seconds, self.train_seconds, loss=f"{loss:.4f}")
                self.after_step(loss)
                if time_is_up(cfg.max_minutes, self.train_seconds):
                    self.stop_reason = "max_minutes"
                    break
            epoch += 1
        bar.close()
        if self.window_n:
            self.record_loss()

    def shuffled_groups(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
        return [self.train_groups[i] for i in torch.randperm(len(self.train_groups), generator=g).tolist()]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, groups: Sequence[list[int]]) -> torch.Tensor:
        """Class-weighted binary cross-entropy against the tags, plus --rank-weight times the pairwise loss
        within each group."""
        weights = self.class_weight[targets.long()]  # (N,): each class half the loss with --balance
        loss = (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weights).mean()
        if self.cfg.rank_weight:
            owner = torch.repeat_interleave(
                torch.arange(len(groups), device=self.device),
                torch.tensor([len(g) for g in groups], device=self.device),
            )
            loss = loss + self.cfg.rank_weight * pairwise_loss(logits, targets, owner)
        return loss

    def train_step(self, groups: Sequence[list[int]]) -> float:
        """One optimizer step on one packed batch; returns its loss."""
        start = time.perf_counter()
        batch, rows = self.batcher.collate(groups)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        targets = batch.pop("labels")
        logits = self.reward.forward_packed(**batch)  # (N,)
        loss = self.loss(logits, targets, groups)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.reward.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.rows_seen += len(rows)
        self.train_seconds += time.perf_counter() - start
        return float(loss.detach())

    def after_step(self, loss: float) -> None:
        """The loss averaged over --log-every steps into the history; held-out metrics every --eval-every."""
        cfg = self.cfg
        self.window_loss += loss
        self.window_n += 1
        if self.step % cfg.log_every == 0 or self.step == self.max_steps:
            mean = self.record_loss()
            if not cfg.progress:
                self.log(f"step {self.step}: loss {mean:.4f} ({self.train_seconds:.0f}s)")
        if (
            cfg.eval_every
            and self.eval_idx
            and self.step % cfg.eval_every == 0
            and self.step < self.max_steps
        ):
            self.record_heldout()

    def record_loss(self) -> float:
        mean = self.window_loss / self.window_n
        self.history.append({"step": self.step, "train_seconds": round(self.train_seconds, 2), "loss": mean})
        self.window_loss, self.window_n = 0.0, 0
        return mean

    def record_heldout(self) -> None:
        m = evaluate(self.reward, self.batcher, self.eval_idx, self.cfg.eval_batch_size)
        self.history.append({"step": self.step, "heldout_accuracy": m["accuracy"], "heldout_auc": m["auc"]})
        self.log(f"step {self.step}: held-out accuracy {m['accuracy']:.4f}, AUC {m['auc']}")

    # --- evaluation and writing ---

    def final_metrics(self) -> dict[str, Any]:
        """Held-out metrics, a sample of the training tags (to see over-fitting), and the packed path checked
        against the scorer's one-answer-at-a-time path on a few held-out tags; with the run's counters."""
        cfg, reward, batcher = self.cfg, self.reward, self.batcher
        train_idx, eval_idx = self.train_idx, self.eval_idx
        sample = sorted(random.Random(cfg.seed).sample(train_idx, min(len(train_idx), 2000)))
        train_metrics = evaluate(reward, batcher, sample, cfg.eval_batch_size)
        heldout = evaluate(reward, batcher, eval_idx, cfg.eval_batch_size) if eval_idx else None
        parity = packing_error(reward, batcher, (eval_idx or train_idx)[:128], cfg.eval_batch_size)
        if parity > 1e-3:
            raise RuntimeError(f"packed and one-at-a-time scores differ by {parity:.2e}: a bug in packing")
        return {
            "heldout": heldout,
            "train_sample": train_metrics,
            "tags": {
                "train": len(self.train_ex),
                "train_correct": self.n_pos,
                "heldout": len(self.eval_ex),
                "heldout_correct": sum(e.label for e in self.eval_ex),
                "images": len(self.paths),
                "skipped": dict(self.skipped),
            },
            "steps": self.step,
            "epochs": round(self.rows_seen / len(train_idx), 3),
            "rows_seen": self.rows_seen,
            "train_seconds": round(self.train_seconds, 2),
            "total_seconds": round(time.perf_counter() - self.t0, 2),
            "stop_reason": self.stop_reason,
            "final_loss": next((h["loss"] for h in reversed(self.history) if "loss" in h), None),
            "head_moved": not torch.equal(self.head_before, reward.head.weight.detach()),
            "packing_max_abs_diff": parity,
            "lm_prior_init": self.prior_fit,
            "history": self.history,
            "base": str(cfg.base),
            "config": dataclasses.asdict(cfg),
        }

    def write(self, metrics: dict[str, Any]) -> None:
        """DIR, atomically: the reward model, its processor, metrics.json; then the report."""

        def write(tmp: Path) -> None:
            # metrics.json first: the model card reads it
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            self.reward.write_files(tmp, base=self.cfg.base)

        out = Path(self.cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_dir(out, write, what="the reward model")
        self.log(format_report(metrics))
        self.log(f"wrote {out}")


def train_reward(cfg: RewardTrainConfig, log=print) -> dict[str, Any]:
    """Read the tags, train, evaluate, write DIR (model + processor + metrics.json); returns the metrics."""
    return RewardTrainer(cfg, log).train()
