"""Stage 2: PPO (or the critic-free RLOO / GRPO) on answer correctness, from a stage-1 checkpoint.

    gpt2mm ppo configs/tiny-ppo.yaml                                 # offline, the synthetic world
    gpt2mm ppo configs/seed-ppo.yaml --reward "0.5*vqa+0.5*model:runs/rm"
    gpt2mm ppo configs/tiny-ppo.yaml --train.algo rloo --rollout.samples_per_prompt 4
    gpt2mm ppo configs/tiny-ppo.yaml --resume

One update: sample answers from the policy for a batch of training questions (a rollout); score each answer
(the reward: the official VQA accuracy against the 10 human answers, the very function `gpt2mm eval`
uses, or a learned reward model, or a weighted sum); compute the log-probabilities of the sampled tokens
under the policy and under the frozen stage-1 reference, and the value head's estimates; turn them into
per-token rewards (score at the last token, -kl_coef * KL at every token), advantages (GAE) and returns;
then a few epochs of minibatch steps on the clipped policy loss + the clipped value loss. The math lives in
`gpt2mm.rl.core`, as pure functions.

Choices: the vision tower is frozen in stage 2 (its features are computed once per rollout and reused by the
reference and every minibatch), the projector and the language model are trained; dropout is off
(`model.eval()`: the log-probabilities of a token must not change between two passes); the value head is a
linear layer on the language model's final hidden states (shared trunk); the sampled tokens' log-probabilities
are recomputed by one forward pass with the same position ids as `generate`, the `<image>` token masked
as `generate` masks it, and the logits divided by the sampling temperature.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpt2mm.errors import UsageError
from gpt2mm.rl import core
from gpt2mm.train.config import TRACKERS_HELP

# --- configuration ---------------------------------------------------------------------------------------


@dataclass
class PolicyConfig:
    init_from: str = field(
        default="runs/tiny-synth/best", metadata={"help": "the stage-1 checkpoint (policy and reference)"}
    )
    freeze_projector: bool = False


@dataclass
class PPODataConfig:
    root: str = field(default="data/synth", metadata={"help": "relative paths resolve against it"})
    train_questions: str = "train_questions.json"
    train_annotations: str = "train_annotations.json"
    train_images: str = "images/train"
    val_questions: str = "val_questions.json"
    val_annotations: str = "val_annotations.json"
    val_images: str = "images/val"
    limit: int | None = field(default=None, metadata={"help": "first N training questions"})
    val_limit: int = 500
    skip_bad: bool = False
    cache_pixels: bool = field(default=True, metadata={"help": "keep preprocessed images in memory"})
    feature_cache: str | None = field(
        default=None, metadata={"help": "dir of the frozen-vision feature cache (e.g. stage 1's)"}
    )


@dataclass
class RolloutConfig:
    prompts: int = field(default=64, metadata={"help": "questions per rollout"})
    samples_per_prompt: int = field(default=1, metadata={"help": "answers per question (rloo/grpo: >= 2)"})
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = field(default=0, metadata={"help": "0: off (sample from the whole distribution)"})
    top_p: float = 1.0


@dataclass
class PPOTrainConfig:
    output_dir: str = "runs/tiny-ppo"
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "replace an earlier run in output_dir (its checkpoints, best, metrics) without --resume"
        },
    )
    seed: int = 0
    algo: str = field(default="ppo", metadata={"help": "ppo | rloo | grpo"})
    max_steps: int = field(default=200, metadata={"help": "updates (one rollout each)"})
    max_minutes: float | None = field(default=None, metadata={"help": "stop after this much training time"})
    lr: float = 1e-4
    value_lr: float | None = field(default=None, metadata={"help": "the value head's (default: lr)"})
    weight_decay: float = 0.0
    warmup_steps: int = 5
    schedule: str = field(default="constant", metadata={"help": "constant | linear | cosine"})
    min_lr_ratio: float = 0.0
    ppo_epochs: int = 2
    minibatch_size: int = 32
    clip_range: float = 0.2
    clip_range_value: float | None = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_target: float | None = field(default=None, metadata={"help": "adaptive KL coefficient (None: fixed)"})
    kl_horizon: int = 10000
    kl_estimator: str = field(default="k1", metadata={"help": "k1 | k2 | k3, in the reward"})
    whiten_advantages: bool = True
    grad_clip: float = 1.0
    precision: str = field(default="fp32", metadata={"help": "fp32 | bf16"})
    eval_every: int = 50
    eval_batch_size: int = 256
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={"help": TRACKERS_HELP})
    progress: bool = True


@dataclass
class PPORecipe:
    model: PolicyConfig = field(default_factory=PolicyConfig)
    data: PPODataConfig = field(default_factory=PPODataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    reward: str = field(
        default="vqa", metadata={"help": "vqa | model:DIR | a weighted sum, e.g. 0.5*vqa+0.5*model:DIR"}
    )

    def __post_init__(self):
        t, r = self.train, self.rollout
        if t.algo not in ("ppo", "rloo", "grpo"):
            raise ValueError(f"train.algo must be ppo, rloo or grpo, got {t.algo!r}")
        if t.algo != "ppo" and r.samples_per_prompt < 2:
            raise ValueError(f"train.algo {t.algo} needs rollout.samples_per_prompt >= 2")
        if t.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be fp32 or bf16, got {t.precision!r}")
        if t.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"train.schedule must be constant, linear or cosine, got {t.schedule!r}")
        if t.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"train.kl_estimator must be k1, k2 or k3, got {t.kl_estimator!r}")
        if r.prompts < 1 or r.max_new_tokens < 1 or t.minibatch_size < 1 or t.ppo_epochs < 1:
            raise ValueError(
                "rollout.prompts, rollout.max_new_tokens, train.minibatch_size and ppo_epochs must be >= 1"
            )
        if r.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0, got {r.temperature}")
        from gpt2mm.train.config import RunConfig

        RunConfig.check(t, precisions=("fp32", "bf16"))
        parse_reward(self.reward)


# --- the reward ------------------------------------------------------------------------------------------


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
    against each sample's human answers (`gpt2mm.eval.vqa_metric.vqa_accuracy`, the metric of every
    evaluation in the project); `model:DIR` is a reward model's P(correct)."""

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
        from gpt2mm.eval.vqa_metric import vqa_accuracy

        total = torch.zeros(len(answers))
        for weight, source in self.terms:
            if source == "vqa":
                values = [vqa_accuracy(a, s.answers or [s.turns[1].text]) for s, a in zip(samples, answers)]
            else:
                values = self.scorers[source](
                    [s.image for s in samples], [s.turns[0].text for s in samples], answers
                )
            total += weight * torch.tensor(values, dtype=torch.float32)
        return total


# --- the policy's forward --------------------------------------------------------------------------------


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


# --- the trainer ---------------------------------------------------------------------------------------------


class PPOTrainer:
    """`PPOTrainer(recipe).train()`: updates until `max_steps` or `max_minutes`; checkpoints are plain gpt2mm
    models (loadable by `gpt2mm eval`, `ask`, `serve`) plus the value head and the trainer state."""

    def __init__(self, cfg: PPORecipe, resume: str | bool | None = None, log=print):
        from transformers.utils import logging as hf_logging

        from gpt2mm.data.features import PixelStore
        from gpt2mm.loading import load_model

        hf_logging.disable_progress_bar()  # ours is the one to watch
        self.cfg = cfg
        self.log = log
        t = cfg.train
        self.out = Path(t.output_dir)
        from gpt2mm.train.checkpoints import claim_output_dir, replace_earlier_run

        earlier = claim_output_dir(self.out, resume, t.overwrite, cfg.model.init_from)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._seed_everything(t.seed)

        init = Path(cfg.model.init_from)
        if not (init / "config.json").is_file():
            raise UsageError(
                f"model.init_from: no gpt2mm checkpoint at {init} (train stage 1 first: gpt2mm train ...)"
            )
        self.policy, self.processor = load_model(init)
        self.policy.freeze_vision()
        if cfg.model.freeze_projector:
            self.policy.projector.requires_grad_(False)
        self.policy.to(
            self.device
        ).eval()  # no dropout: a token's log-probability is a function of the weights
        self.ref = copy.deepcopy(self.policy).requires_grad_(False).eval()
        self.value_head = None
        if t.algo == "ppo":
            self.value_head = nn.Linear(self.policy.config.text_config.hidden_size, 1).to(self.device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        tok = self.processor.tokenizer
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos

        self.train_samples = self._load("train")
        self.val_samples = self._load("val") if t.eval_every else []
        missing = sum(s.image is None for s in self.train_samples)
        if missing:
            raise UsageError(f"{missing} training questions have no image; PPO here is for VQA-format data")
        self.pixels = PixelStore(self.processor, cache=cfg.data.cache_pixels)
        self.features = None
        if cfg.data.feature_cache:
            from gpt2mm.data.features import FeatureCache

            self.features = FeatureCache(cfg.data.feature_cache, self.policy, self.processor)
            paths = sorted({s.image for s in self.train_samples + self.val_samples})
            added = self.features.build(paths, skip_bad=cfg.data.skip_bad, progress=t.progress)
            self.log(f"feature cache {self.features.dir}: {added} images added, {len(paths) - added} reused")
        self.reward = Reward(cfg.reward, device=self.device)

        groups = [
            {"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": t.lr},
        ]
        if self.value_head is not None:
            groups.append({"params": list(self.value_head.parameters()), "lr": t.value_lr or t.lr})
        fused = self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(
            groups, lr=t.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=t.weight_decay, fused=fused
        )
        from gpt2mm.train.optim import lr_lambda

        self.train_seconds = 0.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t, lambda: self.train_seconds)
        )
        self.kl_ctl = core.AdaptiveKLController(t.kl_coef, t.kl_target, t.kl_horizon)
        self.step = 0
        self.epoch = 0
        self.position = 0  # questions of this epoch's order already used
        self.samples_seen = 0
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []
        replace_earlier_run(self.out, earlier, self.log)
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob("*.tmp"):
            shutil.rmtree(stale)
        if resume:
            self._resume(resume)

    # --- data ---

    def _load(self, split: str) -> list:
        from gpt2mm.data.splits import resolve
        from gpt2mm.data.vqa import load_vqa

        d = self.cfg.data
        q, a, im = (
            (d.train_questions, d.train_annotations, d.train_images)
            if split == "train"
            else (d.val_questions, d.val_annotations, d.val_images)
        )
        if not resolve(d.root, q).is_file():
            if split == "val":
                self.log(f"no validation questions at {resolve(d.root, q)}: no evaluation")
                return []
            raise UsageError(f"data: no training questions at {resolve(d.root, q)}")
        samples, report = load_vqa(
            resolve(d.root, q),
            resolve(d.root, a),
            resolve(d.root, im),
            limit=d.limit if split == "train" else d.val_limit,
            skip_bad=d.skip_bad,
        )
        if not samples:
            raise UsageError(f"no {split} questions: {report.summary()}")
        self.log(f"{split} data: {report.summary()}")
        return samples

    def _next_prompts(self) -> list:
        """The next `rollout.prompts` questions of a shuffled pass over the training set; the order is a
        function of (seed, epoch), so a resumed run continues with the same questions."""
        n = self.cfg.rollout.prompts
        chosen = []
        while len(chosen) < n:
            g = torch.Generator().manual_seed(self.cfg.train.seed * 1000003 + self.epoch)
            order = torch.randperm(len(self.train_samples), generator=g).tolist()
            take = order[self.position : self.position + n - len(chosen)]
            chosen += [self.train_samples[i] for i in take]
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return chosen

    # --- rollouts ---

    @torch.no_grad()
    def rollout(self, prompts: list) -> Rollout:
        r = self.cfg.rollout
        samples = [s for s in prompts for _ in range(r.samples_per_prompt)]
        tok = self.processor.tokenizer
        prompts_ids = [
            self.processor.encode_turns([("user", s.turns[0].text, 1)], generation_prompt=True)["input_ids"]
            for s in samples
        ]
        enc = tok.pad({"input_ids": prompts_ids}, padding=True, padding_side="left", return_tensors="pt")
        ids, am = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        if self.features is not None:
            vision = torch.stack([self.features(s.image) for s in prompts]).to(self.device)
        else:
            pixels = torch.stack([self.pixels(s.image) for s in prompts]).to(self.device)
            with self._autocast():
                vision = self.policy.get_vision_hidden_states(pixels)
        vision = vision.repeat_interleave(r.samples_per_prompt, dim=0)
        with self._autocast():
            out = self.policy.generate(
                input_ids=ids,
                attention_mask=am,
                vision_hidden_states=vision,
                do_sample=True,
                temperature=r.temperature,
                top_k=r.top_k,
                top_p=r.top_p,
                max_new_tokens=r.max_new_tokens,
                pad_token_id=self.pad,
                eos_token_id=self.eos,
            )
        prompt_len = ids.shape[1]
        response = out[:, prompt_len:]
        mask = answer_mask(response, self.eos)
        full_mask = torch.cat([am, mask.long()], dim=1)
        answers = [
            self.processor.postprocess_answer(tok.decode(row[m].tolist(), skip_special_tokens=False))
            for row, m in zip(response, mask)
        ]
        scores = self.reward(samples, answers).to(self.device)
        with self._autocast():
            logits, values = answer_logits(
                self.policy, out, full_mask, vision, prompt_len, r.temperature, self.value_head
            )
            ref_logits, _ = answer_logits(self.ref, out, full_mask, vision, prompt_len, r.temperature)
        ro = Rollout(
            samples=samples,
            input_ids=out,
            attention_mask=full_mask,
            vision=vision,
            prompt_len=prompt_len,
            mask=mask,
            answers=answers,
            scores=scores,
            logprobs=core.logprobs_from_logits(logits, response),
            ref_logprobs=core.logprobs_from_logits(ref_logits, response),
            values=values.float() if values is not None else None,
            entropy=core.entropy_from_logits(logits),
        )
        self._advantages(ro)
        return ro

    def _advantages(self, ro: Rollout) -> None:
        """KL-shaped rewards -> advantages (and returns for the value head)."""
        t = self.cfg.train
        ro.kl = core.kl_estimate(ro.logprobs, ro.ref_logprobs, t.kl_estimator) * ro.mask
        if t.algo == "ppo":
            rewards = core.token_rewards(ro.scores, ro.kl, ro.mask, self.kl_ctl.value)
            ro.advantages, ro.returns = core.gae(rewards, ro.values, ro.mask, t.gamma, t.lam)
        else:
            shaped = ro.scores - self.kl_ctl.value * ro.kl.sum(1)
            per_answer = core.group_advantages(shaped, self.cfg.rollout.samples_per_prompt, t.algo)
            ro.advantages = per_answer[:, None] * ro.mask
        if t.whiten_advantages:
            ro.advantages = core.masked_whiten(ro.advantages, ro.mask)

    # --- optimisation ---

    def optimise(self, ro: Rollout) -> dict[str, float]:
        """`ppo_epochs` passes of minibatch steps over the rollout; returns the mean statistics."""
        t = self.cfg.train
        n = len(ro.samples)
        g = torch.Generator().manual_seed(t.seed * 1000003 + 104729 * (self.step + 1))
        stats: dict[str, list[float]] = {}
        params = [p for grp in self.optimizer.param_groups for p in grp["params"]]
        for _ in range(t.ppo_epochs):
            order = torch.randperm(n, generator=g)
            for start in range(0, n, t.minibatch_size):
                mb = order[start : start + t.minibatch_size].to(self.device)
                with self._autocast():
                    logits, values = answer_logits(
                        self.policy,
                        ro.input_ids[mb],
                        ro.attention_mask[mb],
                        ro.vision[mb],
                        ro.prompt_len,
                        self.cfg.rollout.temperature,
                        self.value_head,
                    )
                response = ro.input_ids[mb, ro.prompt_len :]
                mask = ro.mask[mb]
                logp = core.logprobs_from_logits(logits, response)
                pg_loss, pg_stats = core.policy_loss(
                    logp, ro.logprobs[mb], ro.advantages[mb], mask, t.clip_range
                )
                loss = pg_loss
                step_stats = {"pg_loss": pg_loss.detach(), **pg_stats}
                if values is not None:
                    vf_loss, vf_stats = core.value_loss(
                        values.float(), ro.values[mb], ro.returns[mb], mask, t.clip_range_value
                    )
                    loss = loss + t.vf_coef * vf_loss
                    step_stats.update({"vf_loss": vf_loss.detach(), **vf_stats})
                if t.ent_coef:
                    entropy = core.masked_mean(core.entropy_from_logits(logits), mask)
                    loss = loss - t.ent_coef * entropy
                loss.backward()
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for k, v in step_stats.items():
                    stats.setdefault(k, []).append(float(v))
        self.scheduler.step()
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def train(self) -> dict[str, Any]:
        t = self.cfg.train
        from gpt2mm.train.logging import budget_bar_total

        writer = None
        metrics_file = self.out / "metrics.jsonl"
        if self.step == 0 and self.val_samples:
            acc = self.evaluate()
            self.initial_val_accuracy = acc
            self._record(metrics_file, writer, {"val_accuracy": acc})
        bar = None
        if t.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=t.max_steps,
                initial=self.step,
                desc="ppo",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=2.0,
            )
        stop_reason = "max_steps"
        seconds_at_start = self.train_seconds
        while self.step < t.max_steps:
            start = time.perf_counter()
            ro = self.rollout(self._next_prompts())
            rollout_seconds = time.perf_counter() - start
            stats = self.optimise(ro)
            seq_kl = float(ro.kl.sum(1).mean())
            self.kl_ctl.update(seq_kl, len(ro.samples))
            self.step += 1
            self.samples_seen += len(ro.samples)
            seconds = time.perf_counter() - start
            self.train_seconds += seconds
            row = {
                "reward": float(ro.scores.mean()),
                "kl": seq_kl,
                "kl_coef": self.kl_ctl.value,
                "entropy": float(core.masked_mean(ro.entropy, ro.mask)),
                "answer_length": float(ro.mask.sum(1).float().mean()),
                "lr": self.scheduler.get_last_lr()[0],
                "answers_per_s": len(ro.samples) / seconds,
                "rollout_share": rollout_seconds / seconds,
                **stats,
            }
            if bar is not None:
                bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{seq_kl:.3f}", refresh=False)
                budget_bar_total(
                    bar,
                    t.max_minutes,
                    t.max_steps,
                    self.step,
                    self.train_seconds - seconds_at_start,
                    self.train_seconds,
                )
                bar.update(1)
            if t.max_minutes is not None and self.train_seconds > 60 * t.max_minutes:
                stop_reason = "max_minutes"
            last = stop_reason != "max_steps" or self.step == t.max_steps
            if self.step % t.log_every == 0 or last:
                self._record(metrics_file, writer, row)
            if self.val_samples and t.eval_every and (self.step % t.eval_every == 0 or last):
                acc = self.evaluate()
                self._record(metrics_file, writer, {"val_accuracy": acc})
                if self.best is None or acc > self.best:
                    self.best = acc
                    self._save(best=True)
            if t.save_every and self.step % t.save_every == 0:
                self._save()
            if stop_reason != "max_steps":
                break
        if bar is not None:
            bar.close()
        self._save()
        if writer is not None:
            writer.close()
        summary = {
            "steps": self.step,
            "answers_sampled": self.samples_seen,
            "train_seconds": round(self.train_seconds, 2),
            "initial_val_accuracy": getattr(self, "initial_val_accuracy", None),
            "best_val_accuracy": self.best,
            "final": self.history[-1] if self.history else {},
            "stop_reason": stop_reason,
        }
        self.log(f"done: {json.dumps(summary)}")
        return summary

    def evaluate(self) -> float:
        """VQA accuracy (official metric, percent) of the policy's greedy answers on the validation set."""
        from gpt2mm.eval.evaluate import answer_questions, score_samples

        source, key = (
            (self.features, "vision_hidden_states") if self.features else (self.pixels, "pixel_values")
        )
        answers = answer_questions(
            self.policy,
            self.processor,
            self.val_samples,
            self.cfg.train.eval_batch_size,
            source,
            image_key=key,
        )
        return score_samples(self.val_samples, answers)

    def _autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        import contextlib

        return contextlib.nullcontext()

    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    def _record(self, path: Path, writer, values: dict[str, float]) -> None:
        row = {
            "step": self.step,
            "answers_sampled": self.samples_seen,
            "train_seconds": round(self.train_seconds, 3),
        }
        row.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()})
        self.history.append(row)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for k, v in values.items():
                writer.add_scalar(k, v, self.step)
        if "val_accuracy" in values:
            self.log(f"update {self.step}: val accuracy {values['val_accuracy']:.2f}%")

    # --- checkpoints ---

    def _save(self, best: bool = False) -> None:
        from safetensors.torch import save_file

        from gpt2mm.train.checkpoints import atomic_save_dir, prune_checkpoints, rng_state

        name = "best" if best else f"checkpoint-{self.step}"
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "samples_seen": self.samples_seen,
            "train_seconds": self.train_seconds,
            "best": self.best,
            "initial_val_accuracy": getattr(self, "initial_val_accuracy", None),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "rng": rng_state(),
            "config": asdict(self.cfg),
        }

        def write(tmp: Path) -> None:
            self.policy.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            if self.value_head is not None:
                save_file(
                    {k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                    tmp / "value_head.safetensors",
                )
            if not best:
                torch.save(state, tmp / "trainer_state.pt")

        atomic_save_dir(self.out / name, write)
        if not best:
            prune_checkpoints(self.out, self.cfg.train.keep_last)

    def _resume(self, resume: str | bool) -> None:
        from safetensors.torch import load_file

        from gpt2mm.train.checkpoints import load_resume_checkpoint, set_rng_state

        path, state, weights = load_resume_checkpoint(self.out, resume)
        if state["config"]["train"]["algo"] != self.cfg.train.algo:
            raise UsageError(f"--resume: {path} was trained with algo {state['config']['train']['algo']}")
        missing, unexpected = self.policy.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise UsageError(f"--resume: {path} does not fit this model")
        self.policy.tie_weights()
        if self.value_head is not None:
            self.value_head.load_state_dict(load_file(str(path / "value_head.safetensors")))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        for key in (
            "step",
            "epoch",
            "position",
            "samples_seen",
            "train_seconds",
            "best",
            "initial_val_accuracy",
        ):
            setattr(self, key, state[key])
        set_rng_state(state["rng"])
        self.log(f"resumed from {path} at update {self.step}")


# --- the command ---------------------------------------------------------------------------------------------

TAKES_OVERRIDES = True


def configure(parser) -> None:
    import argparse

    from gpt2mm.train.args import describe

    parser.usage = "gpt2mm ppo [RECIPE.yaml] [--section.key value ...] [--resume [CHECKPOINT]]"
    parser.add_argument(
        "--resume", nargs="?", const=True, default=None, help="continue the last (or given) checkpoint"
    )
    parser.epilog = "options (override as --section.key value):\n" + "\n".join(describe(PPORecipe))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def run(args, extra: list[str]) -> int:
    from gpt2mm.train.args import load_config

    recipe = None
    if extra and not extra[0].startswith("--"):
        recipe, extra = extra[0], extra[1:]
    cfg = load_config(PPORecipe, recipe, extra)
    PPOTrainer(cfg, resume=args.resume).train()
    return 0
