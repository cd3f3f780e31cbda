"""Stage 2: PPO (or the critic-free RLOO / GRPO) on answer correctness, from a stage-1 checkpoint.

    gpt2mm ppo configs/tiny-ppo.yaml                                 # offline, the synthetic world
    gpt2mm ppo configs/seed-ppo.yaml --reward "0.5*vqa+0.5*model:runs/rm"
    gpt2mm ppo configs/tiny-ppo.yaml --train.algo rloo --rollout.samples_per_prompt 4
    gpt2mm ppo configs/tiny-ppo.yaml --resume

The questions come from official VQA files, a Hugging Face dataset or the seed's CSV (`data.format`, as in
`gpt2mm train`). One update: sample answers from the policy for a batch of training questions (a rollout);
score each answer (the reward: the official VQA accuracy against the human answers, or normalized exact
match against a single answer, the very function `gpt2mm eval` uses; or a learned reward model, or a
weighted sum); compute the log-probabilities of the sampled tokens
under the policy and under the frozen stage-1 reference, and the value head's estimates; turn them into
per-token rewards (score at the last token, -kl_coef * KL at every token), advantages (GAE) and returns;
then a few epochs of minibatch steps on the clipped policy loss + the clipped value loss. The math lives in
`gpt2mm.rl.core`, as pure functions; the recipe in `gpt2mm.rl.config`, the reward in `gpt2mm.rl.reward`, the
policy's forward and the rollout batch in `gpt2mm.rl.policy`. The loop, metrics rows, evaluation keeping `best`,
checkpoints and `--resume` are the run layer's (`gpt2mm.train.trainer.Trainer`).

Choices: the vision tower is frozen in stage 2 (its features are computed once per rollout and reused by the
reference and every minibatch), the projector and the language model are trained; dropout is off
(`model.eval()`: the log-probabilities of a token must not change between two passes); the value head is a
linear layer on the language model's final hidden states (shared trunk); the sampled tokens' log-probabilities
are recomputed by one forward pass with the same position ids as `generate`, the `<image>` token masked
as `generate` masks it, and the logits divided by the sampling temperature.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2mm.devices import pick_device
from gpt2mm.errors import UsageError
from gpt2mm.rl import core
from gpt2mm.rl.config import PPORecipe
from gpt2mm.rl.policy import Rollout, answer_logits, answer_mask
from gpt2mm.rl.reward import Reward
from gpt2mm.train.checkpoints import (
    claim_output_dir,
    clean_output_dir,
    load_resume_checkpoint,
    replace_earlier_run,
    seed_everything,
)
from gpt2mm.train.trainer import Trainer


class PPOTrainer(Trainer):
    """`PPOTrainer(recipe).train()`: the run layer's loop (`Trainer`) with one rollout and its optimisation per
    update, until `max_steps` or `max_minutes`; checkpoints are plain gpt2mm models (loadable by `gpt2mm eval`,
    `ask`, `serve`) plus the value head and the trainer state."""

    COUNTERS = (*Trainer.COUNTERS, "epoch", "position", "initial_val_accuracy")
    desc = "ppo"
    step_name = "update"
    samples_name = "answers_sampled"
    digits = 6
    evaluate_at_time_stop = True

    def __init__(self, cfg: PPORecipe, resume: str | bool | None = None, log=print):
        from transformers.utils import logging as hf_logging

        from gpt2mm.train.logging import check_trackers

        hf_logging.disable_progress_bar()  # ours is the one to watch
        t = cfg.train
        self.init_run(cfg, Path(t.output_dir), log)
        earlier = claim_output_dir(self.out, resume, t.overwrite, cfg.model.init_from)
        check_trackers(t.log_with)
        self.device = torch.device(pick_device(None))
        seed_everything(t.seed)
        self._build_models()
        self._load_data()
        self.reward = Reward(cfg.reward, device=self.device)
        self._build_optimizer()
        self.kl_ctl = core.AdaptiveKLController(t.kl_coef, t.kl_target, t.kl_horizon)
        self.epoch = 0
        self.position = 0  # questions of this epoch's order already used
        self.initial_val_accuracy: float | None = None
        replace_earlier_run(self.out, earlier, self.log)
        self.out.mkdir(parents=True, exist_ok=True)
        clean_output_dir(self.out, self.log)
        if resume:
            self._resume(resume)

    # --- set-up ---

    def _build_models(self) -> None:
        """The policy (vision frozen, dropout off), its frozen copy as the reference, and the value head (ppo)."""
        from gpt2mm.loading import load_model

        cfg = self.cfg
        init = Path(cfg.model.init_from)
        if not (init / "config.json").is_file():
            raise UsageError(
                f"model.init_from: no gpt2mm checkpoint at {init} (train stage 1 first: gpt2mm train ...)"
            )
        self.policy, self.processor = load_model(init)
        self.policy.freeze_vision()
        if cfg.model.freeze_projector:
            self.policy.projector.requires_grad_(False)
        # no dropout: a token's log-probability is a function of the weights
        self.policy.to(self.device).eval()
        self.ref = copy.deepcopy(self.policy).requires_grad_(False).eval()
        self.value_head = None
        if cfg.train.algo == "ppo":
            self.value_head = nn.Linear(self.policy.config.text_config.hidden_size, 1).to(self.device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        tok = self.processor.tokenizer
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos

    def _load_data(self) -> None:
        """The training and validation questions, and the image source the rollouts and evaluation read:
        preprocessed pixels, or the frozen tower's cached outputs (`data.feature_cache`)."""
        from gpt2mm.data.features import FeatureCache, PixelStore

        d, t = self.cfg.data, self.cfg.train
        self.train_samples = self._load_split("train")
        self.val_samples = self._load_split("val") if t.eval_every else []
        missing = sum(s.image is None for s in self.train_samples)
        if missing:
            raise UsageError(
                f"{missing} training questions have no image; PPO here is for questions about images"
            )
        self.pixels = PixelStore(self.processor, cache=d.cache_pixels)  # also what the demo scores with
        self.images = self.pixels
        if d.feature_cache:
            self.images = FeatureCache(d.feature_cache, self.policy, self.processor)
            paths = sorted({s.image for s in self.train_samples + self.val_samples})
            added = self.images.build(paths, skip_bad=d.skip_bad, progress=t.progress)
            self.log(f"feature cache {self.images.dir}: {added} images added, {len(paths) - added} reused")

    def _load_split(self, split: str) -> list:
        """A split's questions, in the recipe's format; no validation data means no evaluation, no training
        data is an error."""
        from gpt2mm.data.splits import has_split, load_samples, split_location

        d = self.cfg.data
        if not has_split(d, split):
            if split == "val":
                self.log(f"no validation questions at {split_location(d, 'val')}: no evaluation")
                return []
            raise UsageError(f"data: no training questions at {split_location(d, 'train')}")
        samples, summary = load_samples(d, split)
        if not samples:
            raise UsageError(f"no {split} questions: {summary}")
        self.log(f"{split} data: {summary}")
        return samples

    def _build_optimizer(self) -> None:
        """AdamW (the run layer's) over the policy's trainable parameters, with one weight decay for all of
        them, and the value head's group at its own learning rate; the schedule as every stage's."""
        from gpt2mm.train.optim import adamw, make_scheduler

        t = self.cfg.train
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": t.lr}]
        if self.value_head is not None:
            groups.append({"params": list(self.value_head.parameters()), "lr": t.value_lr or t.lr})
        self.optimizer = adamw(groups, t.lr, t.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, t, lambda: self.train_seconds)

    # --- data ---

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

    # --- one update ---

    def train_step(self) -> tuple[dict[str, Any], int]:
        """A rollout, its optimisation, and the KL controller's update; the metrics row and the answers sampled."""
        start = time.perf_counter()
        ro = self.rollout(self._next_prompts())
        rollout_seconds = time.perf_counter() - start
        stats = self.optimise(ro)
        seq_kl = float(ro.kl.sum(1).mean())
        self.kl_ctl.update(seq_kl, len(ro.samples))
        seconds = time.perf_counter() - start
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
        return row, len(ro.samples)

    # --- rollouts ---

    def _vision_states(self, prompts: list) -> torch.Tensor:
        """The frozen tower's outputs for the prompts' images (B, T_img, C_vision): read from the feature
        cache, or computed from the pixels."""
        stacked = torch.stack([self.images(s.image) for s in prompts]).to(self.device)
        if self.images.key == "vision_hidden_states":
            return stacked
        with self._autocast():
            return self.policy.get_vision_hidden_states(stacked)

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
        vision = self._vision_states(prompts).repeat_interleave(r.samples_per_prompt, dim=0)
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

    # --- evaluation, progress, summary ---

    def has_validation(self) -> bool:
        return bool(self.val_samples)

    def on_train_begin(self) -> None:
        """The starting policy's validation accuracy, on record at update 0 (not a `best`)."""
        if self.step == 0 and self.val_samples:
            self.initial_val_accuracy = self.evaluate()
            self.record({"val_accuracy": self.initial_val_accuracy})

    def evaluate(self) -> float:
        """VQA accuracy (official metric, percent) of the policy's greedy answers on the validation set."""
        from gpt2mm.eval.evaluate import answer_questions, score_samples

        answers = answer_questions(
            self.policy,
            self.processor,
            self.val_samples,
            self.cfg.train.eval_batch_size,
            self.images,
            image_key=self.images.key,
        )
        return score_samples(self.val_samples, answers)

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"reward": f"{row['reward']:.3f}", "kl": f"{row['kl']:.3f}"}

    def summary(self, stop_reason: str) -> dict[str, Any]:
        base = super().summary(stop_reason)
        return {
            **{k: base[k] for k in ("steps", self.samples_name, "train_seconds")},
            "initial_val_accuracy": self.initial_val_accuracy,
            "best_val_accuracy": self.best,
            "final": self.history[-1] if self.history else {},
            "stop_reason": stop_reason,
        }

    def _autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        import contextlib

        return contextlib.nullcontext()

    # --- checkpoints ---

    def write_model(self, out: Path) -> None:
        """The policy (a plain gpt2mm model, self-contained: `gpt2mm.hub.save_model`), its processor and the
        value head (value_head.safetensors)."""
        from dataclasses import asdict

        from safetensors.torch import save_file

        from gpt2mm.hub import save_model

        init = self.cfg.model.init_from
        save_model(self.policy, self.processor, out, stage="ppo", recipe=asdict(self.cfg), init_from=init)
        if self.value_head is not None:
            save_file(
                {k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                out / "value_head.safetensors",
            )

    def extra_state(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def _resume(self, resume: str | bool) -> None:
        from safetensors.torch import load_file

        path, state, weights = load_resume_checkpoint(self.out, resume, self.log)
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
        self.restore_counters(path, state)
