"""Stages 1 and 3: supervised fine-tuning with the loss on the answer (assistant) tokens only.

    gpt2mm train configs/demo-sft.yaml                        # stage 1 on the synthetic world, offline
    gpt2mm train configs/seed-vqa.yaml --train.lr 5e-5       # stage 1 on VQA v2 (seed preset)
    gpt2mm train configs/seed-llava.yaml                     # stage 3 from a stage-1 checkpoint
    gpt2mm train configs/demo-sft.yaml --resume              # continue the last complete checkpoint
    gpt2mm train configs/seed-llava.yaml --model.lora.r 8    # LoRA (peft) on GPT-2; checkpoints hold merged weights
    accelerate launch -m gpt2mm.cli train RECIPE.yaml        # several GPUs (DDP)
    accelerate launch --use_fsdp --fsdp_version 2 -m gpt2mm.cli train RECIPE.yaml   # FSDP2 (or --train.fsdp true)

The loop is `gpt2mm.train.trainer.Trainer`'s, on top of accelerate (devices, DDP/FSDP, autocast), rather than
transformers' Trainer, for three needs: the LM head runs only on labelled positions (the model returns no
logits in training), evaluation is VQA accuracy by batched generation, and checkpoints are written atomically
and resume exactly (model, optimizer, scheduler, RNG and data position), so that a stopped-and-resumed run ends
with the same weights as an uninterrupted one. Simplifications: map-style data held in memory (token ids and,
for small image sets, preprocessed pixels); the data order is a function of (seed, epoch).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gpt2mm.errors import UsageError
from gpt2mm.train.checkpoints import (
    atomic_dir,
    claim_output_dir,
    clean_output_dir,
    load_resume_checkpoint,
    prune_checkpoints,
    replace_earlier_run,
    seed_everything,
    write_trainer_state,
    write_weights,
)
from gpt2mm.train.config import SFTConfig
from gpt2mm.train.grounding import CENTRE_KEYS, GROUNDING_KEYS, centres_loss, grounding_loss
from gpt2mm.train.trainer import Trainer

CURRICULUM_BLOCK = 50  # steps whose curriculum batches are drawn together and grouped by length, at most


def curriculum_block(curriculum_steps: int) -> int:
    """How many steps' curriculum batches are drawn together: 50 (`length_grouped_batches`' mega-batch), fewer for
    a short curriculum, so a block's samples (those allowed at its first step) lag the curriculum by at most a
    20th of it; 1 (each step draws its own batch) under 40 steps."""
    return max(1, min(CURRICULUM_BLOCK, curriculum_steps // 20))


class SFTTrainer(Trainer):
    """One SFT run: set-up, then `train()` (the shared loop) with one optimizer step per `train_step`."""

    COUNTERS = (*Trainer.COUNTERS, "epoch", "batch_in_epoch")
    rate_name = "samples_per_s"

    def __init__(self, cfg: SFTConfig, resume: str | bool | None = None, log=print):
        from gpt2mm.train.distributed import make_accelerator
        from gpt2mm.train.fast import resolve_auto

        cfg = resolve_auto(cfg)  # `auto` precision and attention: this machine's choice
        t = cfg.train
        out = Path(t.output_dir)
        self.acc, self.fsdp = make_accelerator(t, cfg.model.gradient_checkpointing, log)
        self.world = self.acc.num_processes
        log = log if self.acc.is_main_process else (lambda *args, **kwargs: None)  # one process speaks
        self.init_run(cfg, out, log, main=self.acc.is_main_process)
        earlier = claim_output_dir(out, resume, t.overwrite, cfg.model.init_from)
        if (t.batch_size // t.grad_accum) % self.world:
            raise UsageError(f"train.batch_size / grad_accum must divide among {self.world} processes")
        seed_everything(t.seed)
        if cfg.data.synth:
            self._ensure_synthetic_world()
        self._build_model()
        self._load_data()
        # --resume: the weights load into the whole model, before it is sharded (the rest after prepare)
        resumed = self._resume_weights(resume) if resume else None
        self._build_optimizer()
        self.epoch = 0
        self.batch_in_epoch = 0
        self._batches: tuple[int, list[list[int]]] | None = None  # (epoch, its batches)
        self._curriculum_block: tuple[int, list[list[int]]] | None = None  # (its first step, its batches)
        from gpt2mm.train.logging import check_trackers

        check_trackers(t.log_with)
        self.acc.wait_for_everyone()  # every process has looked at the folder (claim_output_dir) before it changes
        if self.main:
            replace_earlier_run(out, earlier, self.log)
            out.mkdir(parents=True, exist_ok=True)
            clean_output_dir(out, self.log)
        if resumed is not None:
            self._resume_state(*resumed)

    # --- set-up ---

    def _build_model(self) -> None:
        from gpt2mm.train.model import build_model_for_training, count_parameters

        cfg = self.cfg
        self.model, self.processor = build_model_for_training(cfg.model)
        if (
            cfg.train.vision_lr == 0
        ):  # a vision learning rate of 0 means a frozen tower (no backward through it)
            self.model.freeze_vision()
        self.lora = cfg.model.lora.r > 0
        if self.lora:
            trainable, total = count_parameters(self.model)
            self.log(
                f"LoRA r={cfg.model.lora.r} on {cfg.model.lora.target_modules}: training {trainable:,} of "
                f"{total:,} parameters ({100 * trainable / total:.2f}%)"
            )

    def _load_data(self) -> None:
        """Training examples (encoded), validation samples, and the image source the collator reads."""
        from gpt2mm.data.collate import Collator, encode_samples
        from gpt2mm.data.features import PixelStore
        from gpt2mm.data.splits import (
            has_split,
            load_conversations,
            load_samples,
            pack_by_image,
            set_difficulty,
        )

        d, t = self.cfg.data, self.cfg.train
        self.train_samples, train_report = load_samples(d, "train")
        if d.difficulty:
            set_difficulty(self.train_samples, d, "train")
        if d.pack_questions > 1:
            self.train_samples = pack_by_image(self.train_samples, d.pack_questions, t.seed)
        if d.conversation_mix:  # not packed: a conversation is already one image's questions
            # its first exchange (the synthetic world's description) goes last, so that no question reads its
            # answer there; with independent turns no question sees it, and it stays first, whole
            conversations, summary = load_conversations(d, first_exchange_last=not d.independent_turns)
            if d.difficulty:
                set_difficulty(conversations, d, "train")
            self.train_samples += conversations
            train_report += f"; mixed in {summary}"
        self.examples, enc_report = encode_samples(self.train_samples, self.processor, d.max_length)
        if not self.examples:
            raise UsageError(f"no training examples: {enc_report.summary()}")
        self.log(f"train data: {train_report}; {enc_report.summary()}")
        if d.grounding:
            self._ground_phrases()
        self.val_samples = []
        if t.eval_every > 0 and has_split(d, "val"):
            self.val_samples, val_report = load_samples(d, "val")
            self.log(f"val data: {val_report}")
        self.pixels = PixelStore(self.processor, cache=d.cache_pixels)
        if d.feature_cache:
            self._use_feature_cache()
        if d.skip_bad:
            self._drop_unreadable_images()
        turns = (
            (self.processor.image_token_id, self.processor.tokenizer.eos_token_id)
            if d.independent_turns
            else None
        )
        self.collate = Collator(self.processor.tokenizer.pad_token_id, self.pixels, self.image_key, turns)

    def _ground_phrases(self) -> None:
        """`data.grounding: objects`: each training example's phrase targets (`gpt2mm.train.grounding`)."""
        from gpt2mm.train.grounding import load_scene_objects, phrase_targets

        d = self.cfg.data
        layers = self.model.config.text_config.n_layer
        if self.cfg.train.grounding_layer > layers:
            raise UsageError(
                f"train.grounding_layer {self.cfg.train.grounding_layer}: GPT-2 has {layers} blocks"
            )
        scenes = load_scene_objects(Path(d.root), "train")
        placed, seen = phrase_targets(self.examples, self.train_samples, self.processor, scenes)
        if not placed:
            raise UsageError(
                f"data.grounding: no question of {d.root}'s train split names an object of its scenes"
            )
        self.log(f"grounding: {placed} of {seen} object phrases placed")
        if self.cfg.train.centres_weight > 0:
            from gpt2mm.train.grounding import centre_targets

            cls = not self.model.config.vision_drop_cls
            images = centre_targets(self.examples, self.train_samples, self.processor, scenes, cls)
            if not images:
                raise UsageError(
                    "train.centres_weight: no training example has one image of the scenes whose tokens are a "
                    "square grid of patches"
                )
            self.log(f"grounding: the object centres of {images} examples' images")

    @property
    def image_key(self) -> str:
        return self.pixels.key

    def _use_feature_cache(self) -> None:
        from gpt2mm.data.features import FeatureCache

        if not self.model.vision_frozen:
            raise UsageError("data.feature_cache needs a frozen vision tower (freeze_vision or vision_lr: 0)")
        self.pixels = FeatureCache(self.cfg.data.feature_cache, self.model, self.processor)
        paths = {path for s in self.train_samples + self.val_samples for path in s.images}
        added = self.pixels.build(
            sorted(paths), skip_bad=self.cfg.data.skip_bad, progress=self.cfg.train.progress
        )
        self.log(f"feature cache {self.pixels.dir}: {added} images added, {len(paths) - added} reused")

    def _drop_unreadable_images(self) -> None:
        """With `data.skip_bad`, every image is decoded once before training: the samples of an unreadable
        one are skipped and counted here, so that nothing fails mid-epoch."""
        from gpt2mm.errors import DataError

        paths = sorted(
            {p for e in self.examples for p in e.images} | {p for s in self.val_samples for p in s.images}
        )
        bad = set()
        for path in paths:
            try:
                self.pixels(path)
            except (DataError, KeyError):  # KeyError: the feature cache skipped it
                bad.add(path)
        if bad:
            n_train, n_val = len(self.examples), len(self.val_samples)
            self.examples = [e for e in self.examples if bad.isdisjoint(e.images)]
            self.val_samples = [s for s in self.val_samples if bad.isdisjoint(s.images)]
            self.log(
                f"skipped {n_train - len(self.examples)} training and {n_val - len(self.val_samples)} validation "
                f"samples: {len(bad)} unreadable images (e.g. {sorted(bad)[0]})"
            )
        if not self.examples:
            raise UsageError("no training examples left after skipping unreadable images")

    def _build_optimizer(self) -> None:
        from gpt2mm.train.distributed import optimizer_param_names, tied_copies
        from gpt2mm.train.optim import make_optimizer, make_scheduler

        t = self.cfg.train
        self.optimizer = make_optimizer(self.model.to(self.acc.device), t)
        # names taken before sharding (FSDP's activation checkpointing or torch.compile would add wrapper prefixes)
        self._param_names, self._param_position = optimizer_param_names(self.model, self.optimizer)
        self._tied_copies = tied_copies(self.model)
        self.scheduler = make_scheduler(self.optimizer, t, lambda: self.train_seconds)
        # the run's own heads, beside the model (gpt2mm.train.grounding): the phrases' (x, y) and each patch's count
        self.grounding_head = self.grounding_optimizer = self.centres_head = self.centres_optimizer = None
        width = self.model.config.text_config.n_embd
        for name, outputs, on in (("grounding", 2, True), ("centres", 1, t.centres_weight > 0)):
            if self.cfg.data.grounding and on:
                head = torch.nn.Linear(width, outputs).to(self.acc.device)
                setattr(self, f"{name}_head", head)
                # torch's AdamW defaults otherwise (betas 0.9, 0.999): what was measured
                setattr(
                    self,
                    f"{name}_optimizer",
                    torch.optim.AdamW(head.parameters(), lr=t.grounding_lr, weight_decay=0.0),
                )
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        if t.compile:
            self.acc.unwrap_model(self.model).compile_blocks()

    def _ensure_synthetic_world(self) -> None:
        from gpt2mm.data.splits import ensure_synthetic_world

        root, main = Path(self.cfg.data.root), self.acc.is_main_process
        ensure_synthetic_world(root, self.cfg.data.synth_args, self.log, write=main)
        self.acc.wait_for_everyone()

    # --- data order: a function of (seed, epoch), so resume can skip to the exact batch ---

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        from gpt2mm.data.collate import length_grouped_batches, shuffled_batches

        if self._batches is not None and self._batches[0] == epoch:
            return self._batches[1]
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1000003 + epoch)
        bs = self.cfg.train.batch_size
        if self.cfg.train.length_grouping:
            batches = length_grouped_batches([len(e.input_ids) for e in self.examples], bs, g)
        else:
            batches = shuffled_batches(len(self.examples), bs, g)
        batches = [
            b for b in batches if len(b) == bs
        ]  # full batches only: every step sees batch_size samples
        if not batches:
            raise UsageError(f"fewer training examples ({len(self.examples)}) than one batch ({bs})")
        self._batches = (epoch, batches)
        return batches

    def _curriculum_batch(self) -> list[int]:
        """A batch drawn from the samples no harder than the curriculum allows at this step: the limit grows
        linearly from the easiest difficulty to the hardest over `curriculum_steps`. A function of
        (seed, step), so a resumed run draws the same batches.

        With `length_grouping`, the batches of a block of consecutive steps (`curriculum_block`) are drawn
        together, without replacement, from the samples allowed at the block's first step and grouped by length
        as an epoch's batches are: a batch of random samples is padded to its longest, and the demo's samples
        (packed questions, a description) differ much in length: 84-88% of such a batch's tokens were not
        padding, over 99% of grouped ones'. Where fewer samples are allowed than the block takes, each of its
        steps draws its own batch (with replacement), as without `length_grouping`."""
        from gpt2mm.data.collate import length_grouped_batches

        t = self.cfg.train
        if not hasattr(self, "_by_difficulty"):
            levels = [e.difficulty for e in self.examples]
            if any(d is None for d in levels):
                raise UsageError(
                    "train.curriculum_steps needs every sample to have a difficulty (data.difficulty)"
                )
            self._by_difficulty = sorted(range(len(levels)), key=lambda i: levels[i])
            self._levels = sorted(levels)
        size = (
            curriculum_block(t.curriculum_steps)
            if t.length_grouping and self.step < t.curriculum_steps
            else 1
        )
        first = self.step - self.step % size
        if self._curriculum_block is None or self._curriculum_block[0] != first:
            steps = min(size, t.curriculum_steps - first) if size > 1 else 1
            pool, n = self._curriculum_pool(first), steps * t.batch_size
            if steps == 1 or len(pool) < n:
                # each step its own draw (with replacement): a block would repeat samples, and grouping by length
                # would put a sample's copies into one batch
                batches = [self._curriculum_draw(s) for s in range(first, first + steps)]
            else:
                g = self._curriculum_generator(first)
                drawn = [pool[i] for i in torch.randperm(len(pool), generator=g)[:n].tolist()]
                lengths = [len(self.examples[i].input_ids) for i in drawn]
                grouped = length_grouped_batches(lengths, t.batch_size, g, mega_batch_factor=steps)
                batches = [[drawn[j] for j in b] for b in grouped]
            self._curriculum_block = (first, batches)
        return self._curriculum_block[1][self.step - first]

    def _curriculum_pool(self, step: int) -> list[int]:
        """The samples no harder than the curriculum allows at `step`."""
        lo, hi = self._levels[0], self._levels[-1]
        limit = lo + (hi - lo) * step / max(1, self.cfg.train.curriculum_steps)
        return self._by_difficulty[: bisect.bisect_right(self._levels, limit)]

    def _curriculum_draw(self, step: int) -> list[int]:
        """`step`'s own batch: `batch_size` samples drawn with replacement from its pool, a function of (seed, step)."""
        t = self.cfg.train
        pool = self._curriculum_pool(step)
        g = self._curriculum_generator(step)
        return [pool[i] for i in torch.randint(len(pool), (t.batch_size,), generator=g).tolist()]

    def _curriculum_generator(self, step: int) -> torch.Generator:
        """The random numbers of the curriculum's draw at `step` (a block's: at its first step)."""
        return torch.Generator().manual_seed(self.cfg.train.seed * 1000003 + 7919 * (step + 1))

    def _next_batch(self) -> list[int]:
        """The curriculum's batch while it lasts, then the epoch's next batch (a new epoch when one is done)."""
        if self.step < self.cfg.train.curriculum_steps:
            self._epoch_batches(self.epoch)  # no batch at all is an error from the first step on
            return self._curriculum_batch()
        batches = self._epoch_batches(self.epoch)
        if self.batch_in_epoch >= len(batches):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            batches = self._epoch_batches(self.epoch)
        self.batch_in_epoch += 1
        return batches[self.batch_in_epoch - 1]

    def _micro_batches(self, batch: list[int]) -> list[dict[str, torch.Tensor]]:
        """This process's share of a global batch, cut into grad_accum micro-batches."""
        t = self.cfg.train
        per_proc = len(batch) // self.world
        mine = batch[self.acc.process_index * per_proc : (self.acc.process_index + 1) * per_proc]
        per_micro = per_proc // t.grad_accum
        return [
            self.collate([self.examples[i] for i in mine[j : j + per_micro]])
            for j in range(0, per_proc, per_micro)
        ]

    # --- the step, evaluation, summary ---

    def train(self) -> dict[str, Any]:
        self.model.train()
        return super().train()

    def train_step(self) -> tuple[dict[str, Any], int]:
        loss, grad_norm = self._optimizer_step(self._micro_batches(self._next_batch()))
        self.last_loss = loss
        row = {"loss": loss, "lr": self.scheduler.get_last_lr()[0]}
        if self.grounding_head is not None:
            row["grounding_loss"] = self.last_grounding_loss
        if self.centres_head is not None:
            row["centres_loss"] = self.last_centres_loss
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        return row, self.cfg.train.batch_size

    def _optimizer_step(self, micro: list[dict[str, torch.Tensor]]) -> tuple[float, float | None]:
        """One optimizer step over the micro-batches; the loss is normalised by the labelled tokens (or, with
        `train.loss_average: answers`, the answers) of the whole global batch, so any split among processes
        and micro-batches gives the same gradient. Returns the global mean loss and the gradient's norm
        before clipping (None without `grad_clip`)."""
        t = self.cfg.train
        if t.loss_average == "answers":
            from gpt2mm.modeling import answer_weights

            micro = [{**b, "loss_weights": answer_weights(b["labels"])} for b in micro]
            items = sum(float(b["loss_weights"][:, 1:].sum()) for b in micro)
        else:
            items = float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro))
        count = torch.tensor(items, device=self.acc.device)
        total = self.acc.reduce(count, reduction="sum") if self.world > 1 else count
        # DDP averages gradients over processes; scale so the result is sum(losses) / all labelled tokens
        denom = total / self.world

        def targets(mask: str) -> torch.Tensor:
            """A grounding loss's divisor: the whole batch's count of its targets (phrases, images), scaled as
            `denom` is, so that its sum over them gives the mean whatever the split."""
            n = torch.tensor(sum(float(b[mask].sum()) for b in micro if mask in b), device=self.acc.device)
            return (self.acc.reduce(n, reduction="sum") if self.world > 1 else n).clamp(min=1) / self.world

        phrases = targets("grounding_mask") if self.grounding_head is not None else None
        images = targets("centres_mask") if self.centres_head is not None else None
        loss_sum = grounding_sum = centres_sum = 0.0
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            grounded = {k: batch.pop(k) for k in GROUNDING_KEYS + CENTRE_KEYS if k in batch}
            sync = i == len(micro) - 1
            ctx = self.acc.no_sync(self.model) if not sync and self.world > 1 else contextlib.nullcontext()
            with ctx, self.acc.autocast():
                if self.grounding_head is None:
                    out = self.model(**batch, num_items_in_batch=denom)
                    objective = out.loss
                else:
                    out = self.model(**batch, num_items_in_batch=denom, output_hidden_states=True)
                    hidden = out.hidden_states[t.grounding_layer]
                    grounding = grounding_loss(hidden, self.grounding_head, grounded, phrases)
                    objective = out.loss + t.grounding_weight * grounding
                    grounding_sum += float(grounding.detach())
                    if self.centres_head is not None:
                        # a micro-batch without centre targets: 0, with a graph (the head's gradient is then 0)
                        centres = (
                            centres_loss(hidden, self.centres_head, grounded, images)
                            if "centres_mask" in grounded
                            else 0 * self.centres_head(hidden[:, :1].float()).sum()
                        )
                        objective = objective + t.centres_weight * centres
                        centres_sum += float(centres.detach())
            self.acc.backward(objective)
            loss_sum += float(out.loss.detach())
        grad_norm = None
        if t.grad_clip:
            grad_norm = float(self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip))
        self.optimizer.step()
        if self.grounding_head is not None:
            self._grounding_step()
            mean = (
                (lambda v: float(self.acc.reduce(torch.tensor(v, device=self.acc.device), reduction="mean")))
                if self.world > 1
                else float
            )
            self.last_grounding_loss = mean(grounding_sum)
            self.last_centres_loss = mean(centres_sum) if self.centres_head is not None else None
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # the global mean loss over labelled tokens (or answers)
        loss = torch.tensor(loss_sum, device=self.acc.device)
        return (float(self.acc.reduce(loss, reduction="mean")) if self.world > 1 else loss_sum), grad_norm

    def _heads(self) -> list[tuple[str, torch.nn.Module, torch.optim.Optimizer]]:
        """The grounding heads this run has: (name, head, its optimizer)."""
        names = ("grounding", "centres")
        return [
            (n, getattr(self, f"{n}_head"), getattr(self, f"{n}_optimizer"))
            for n in names
            if getattr(self, f"{n}_head") is not None
        ]

    def _grounding_step(self) -> None:
        """The grounding heads' step: each one's gradient averaged over processes, its rate `train.grounding_lr`
        under the schedule's factor of this step (the main optimizer's current rate over its base)."""
        # one schedule for every group: any group with a rate gives its factor
        base = max(self.scheduler.base_lrs)
        factor = self.scheduler.get_last_lr()[self.scheduler.base_lrs.index(base)] / base if base > 0 else 1.0
        for _, head, optimizer in self._heads():
            if self.world > 1:
                for p in head.parameters():
                    p.grad = self.acc.reduce(p.grad, reduction="mean")
            for group in optimizer.param_groups:
                group["lr"] = self.cfg.train.grounding_lr * factor
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def extra_state(self) -> dict[str, Any]:
        """The grounding heads and their optimizers (`data.grounding`), which the saved model does not hold."""
        state = {}
        for name, head, optimizer in self._heads():
            state[f"{name}_head"], state[f"{name}_optimizer"] = head.state_dict(), optimizer.state_dict()
        return state

    def has_validation(self) -> bool:
        return bool(self.val_samples)

    def evaluate(self) -> float:
        """VQA accuracy (official metric, percent) of greedy answers on the validation samples."""
        from gpt2mm.eval.evaluate import answer_questions, score_samples

        model = self.acc.unwrap_model(self.model)
        answers = answer_questions(
            model,
            self.processor,
            self.val_samples,
            self.cfg.train.eval_batch_size,
            self.pixels,
            image_key=self.image_key,
        )
        self.model.train()
        return score_samples(self.val_samples, answers)

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "samples_s": f"{row['samples_per_s']:.0f}"}

    def summary(self, stop_reason: str) -> dict[str, Any]:
        epochs = self.epoch + self.batch_in_epoch / max(1, len(self._epoch_batches(self.epoch)))
        summary = super().summary(stop_reason)
        return {
            **{k: summary[k] for k in ("steps",)},
            "epochs": epochs,
            **{k: summary[k] for k in ("samples_seen", "train_seconds")},
            "final_loss": getattr(self, "last_loss", float("nan")),
            **{k: summary[k] for k in ("best_val_accuracy", "stop_reason")},
        }

    def end(self) -> None:
        """The processes of a run end together (see `gpt2mm.train.distributed.end_together`)."""
        from gpt2mm.train.distributed import end_together

        end_together(self.world)

    # --- checkpoints ---

    def save(self, best: bool = False) -> None:
        """A checkpoint (or `best`, weights only). Under FSDP every process takes part in gathering the full
        tensors from the shards and the main one writes them: first the weights, then (once the weights are
        freed, so that the two are never in memory together) the optimizer state."""
        self.acc.wait_for_everyone()
        main = self.acc.is_main_process
        name = "best" if best else f"checkpoint-{self.step}"
        with atomic_dir(self.out / name) if main else contextlib.nullcontext() as tmp:
            state_dict = self.acc.get_state_dict(self.model)
            if main:
                write_weights(functools.partial(self._write_weights, state_dict), tmp, name)
            del state_dict
            if best:
                return
            optimizer_state = self._optimizer_state()
            if main:
                write_trainer_state(self.checkpoint_state(optimizer_state), tmp, name)
        if main:
            prune_checkpoints(self.out, self.cfg.train.keep_last)

    def _write_weights(self, state_dict: dict, out: Path) -> None:
        """model.safetensors (merged LoRA weights: a plain model), the processor, the remote code, recipe and
        card (`gpt2mm.hub.save_model`), and the LoRA adapters."""
        from gpt2mm.hub import recipe_provenance, save_model
        from gpt2mm.train.lora import ADAPTER_FILE, adapter_state_dict, merged_state_dict

        model = self.acc.unwrap_model(self.model)
        if self.fsdp:
            state_dict = {k: v for k, v in state_dict.items() if k not in self._tied_copies}
        adapter = None
        if self.lora:
            adapter = adapter_state_dict(model, state_dict)
            state_dict = merged_state_dict(model, state_dict)
        save_model(
            model,
            self.processor,
            out,
            stage="sft",
            state_dict=state_dict,
            recipe=asdict(self.cfg),
            **recipe_provenance(self.cfg.model),
        )
        if adapter is not None:
            from safetensors.torch import save_file

            lora = json.dumps(asdict(self.cfg.model.lora))
            save_file(adapter, str(out / ADAPTER_FILE), metadata={"format": "pt", "lora": lora})

    def _optimizer_state(self) -> dict | None:
        """The optimizer state in torch's own format (parameters by position), whatever the sharding: a checkpoint
        resumes with or without FSDP. Under FSDP, gathered from the shards (None on the other processes)."""
        if not self.fsdp:
            return self.optimizer.state_dict()
        from gpt2mm.train.distributed import gather_optimizer_state

        full = gather_optimizer_state(self.model, self.optimizer, self._param_position)
        return full if self.acc.is_main_process else None

    def _resume_weights(self, resume: str | bool) -> tuple[Path, dict]:
        """Load a checkpoint's weights into the (not yet prepared) model; returns (path, trainer state)."""
        from gpt2mm.train.lora import ADAPTER_FILE, restore_lora

        path, state, weights = load_resume_checkpoint(self.out, resume, self.log, set_aside=self.main)
        may_miss = {"lm_head.weight"}
        if (path / ADAPTER_FILE).is_file() != self.lora:
            raise UsageError(
                f"--resume: {path} was written by a run {'with' if not self.lora else 'without'} LoRA; "
                "resume it with the same model.lora.r"
            )
        if self.lora:
            may_miss |= restore_lora(self.model, path, weights)
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - may_miss:
            raise UsageError(
                f"--resume: {path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return path, state

    def _resume_state(self, path: Path, state: dict) -> None:
        """The rest of a checkpoint, once the model and optimizer are prepared: optimizer, schedule, position, RNG."""
        if not self.fsdp:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            from gpt2mm.train.distributed import scatter_optimizer_state

            scatter_optimizer_state(self.model, self.optimizer, state["optimizer"], self._param_names, path)
        self.scheduler.load_state_dict(state["scheduler"])
        settings = {"grounding": "data.grounding", "centres": "train.centres_weight (set it to 0 to resume)"}
        for name, head, optimizer in self._heads():
            if f"{name}_head" not in state:
                raise UsageError(f"--resume: {path} was written by a run without {settings[name]}")
            head.load_state_dict(state[f"{name}_head"])
            optimizer.load_state_dict(state[f"{name}_optimizer"])
        self.restore_counters(path, state)
