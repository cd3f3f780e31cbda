"""Stages 1 and 3: supervised fine-tuning with the loss on the answer (assistant) tokens only.

    gpt2mm train configs/tiny-synth.yaml                      # stage 1 on the synthetic world, offline
    gpt2mm train configs/seed-vqa.yaml --train.lr 5e-5       # stage 1 on VQA v2 (seed preset)
    gpt2mm train configs/seed-llava.yaml                     # stage 3 from a stage-1 checkpoint
    gpt2mm train configs/tiny-synth.yaml --resume            # continue the last complete checkpoint
    gpt2mm train configs/seed-llava.yaml --model.lora.r 8    # LoRA (peft) on GPT-2; checkpoints hold merged weights
    accelerate launch -m gpt2mm.cli train RECIPE.yaml        # several GPUs (DDP)
    accelerate launch --use_fsdp --fsdp_version 2 -m gpt2mm.cli train RECIPE.yaml   # FSDP2 (or --train.fsdp true)

The loop is ours, on top of accelerate (devices, DDP/FSDP, autocast), rather than transformers' Trainer,
for three measured needs: the LM head runs only on labelled positions (the model returns no logits in
training), evaluation is VQA accuracy by batched generation, and checkpoints are written atomically and
resume exactly (model, optimizer, scheduler, RNG and data position), so that a stopped-and-resumed run ends
with the same weights as an uninterrupted one. Simplifications: map-style data held in memory (token ids
and, for small image sets, preprocessed pixels); the data order is a function of (seed, epoch).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2mm.errors import UsageError

# --- configuration ---------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    r: int = field(default=0, metadata={"help": "LoRA rank on the language model (0: off; needs peft)"})
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])


@dataclass
class ModelConfig:
    preset: str = field(default="tiny", metadata={"help": "tiny | small | seed"})
    init_from: str | None = field(default=None, metadata={"help": "a gpt2mm model dir (e.g. a stage-1 run)"})
    pretrained: bool | None = field(default=None, metadata={"help": "load the preset's backbones"})
    overrides: dict = field(default_factory=dict, metadata={"help": "MultimodalGPT2Config fields"})
    freeze_lm: bool = field(default=False, metadata={"help": "train the projector (and vision) only"})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "eager | sdpa | flash_attention_2 ... (transformers'; default: the model's, sdpa)"},
    )
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    format: str = field(default="vqa", metadata={"help": "vqa | llava"})
    root: str = field(default="data/synth", metadata={"help": "relative paths resolve against it"})
    synth: bool = field(
        default=True, metadata={"help": "render the synthetic world into root if it is absent"}
    )
    synth_args: dict = field(
        default_factory=dict, metadata={"help": "gpt2mm.data.synthetic.write_world args"}
    )
    train_questions: str = "train_questions.json"
    train_annotations: str = "train_annotations.json"
    train_images: str = "images/train"
    val_questions: str = "val_questions.json"
    val_annotations: str = "val_annotations.json"
    val_images: str = "images/val"
    llava_train: str = "train_llava.json"
    llava_images: str = "images"
    conversation_mix: bool = field(
        default=False,
        metadata={
            "help": "format vqa: also train on the LLaVA conversations of llava_train (after packing), each with "
            "its first exchange moved to its end: the synthetic world's detailed description after its questions"
        },
    )
    vqa_mix: int = field(
        default=0,
        metadata={
            "help": "format llava: also train on the first N VQA questions (train_questions etc.), so that "
            "stage 3 keeps stage 1's short answers (-1: all of them)"
        },
    )
    answer_mode: str = field(default="multiple_choice", metadata={"help": "multiple_choice | sample"})
    limit: int | None = field(default=None, metadata={"help": "first N training questions (seed: 100000)"})
    val_limit: int = 500
    max_length: int = 256
    pack_questions: int = field(
        default=1, metadata={"help": "train on up to N questions about one image as one multi-turn sample"}
    )
    skip_bad: bool = False
    difficulty: str | None = field(
        default=None,
        metadata={"help": "objects: a synthetic sample's difficulty is its scene's object count"},
    )
    cache_pixels: bool = field(default=True, metadata={"help": "keep preprocessed images in memory"})
    feature_cache: str | None = field(
        default=None, metadata={"help": "dir of the frozen-vision feature cache (frozen tower only)"}
    )


@dataclass
class TrainConfig:
    output_dir: str = "runs/tiny-synth"
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "replace an earlier run in output_dir (its checkpoints, best, metrics) without --resume"
        },
    )
    seed: int = 0
    max_steps: int = 1000
    max_minutes: float | None = field(default=None, metadata={"help": "stop after this much training time"})
    batch_size: int = field(default=64, metadata={"help": "samples per optimizer step, all processes"})
    grad_accum: int = 1
    lr: float = 1e-3
    projector_lr: float | None = None
    vision_lr: float | None = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 50
    schedule: str = field(default="cosine", metadata={"help": "cosine | linear | constant"})
    min_lr_ratio: float = 0.0
    precision: str = field(default="fp32", metadata={"help": "fp32 | bf16 | fp16"})
    eval_every: int = 200
    eval_batch_size: int = 128
    save_every: int = 500
    keep_last: int = 2
    early_stopping_patience: int = field(default=0, metadata={"help": "evals without improvement (0: off)"})
    log_every: int = 10
    length_grouping: bool = True
    curriculum_steps: int = field(
        default=0,
        metadata={"help": "widen batches from the easiest samples to all over N steps (data.difficulty)"},
    )
    tensorboard: bool = True
    wandb: bool = field(
        default=False, metadata={"help": "log metrics.jsonl's rows to Weights & Biases too (needs wandb)"}
    )
    progress: bool = True
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile each transformer block (pays on a GPU; compiling takes ~20 s)"},
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "with several processes, shard parameters, gradients and optimizer state with FSDP2 "
            "(what accelerate launch --use_fsdp --fsdp_version 2 also selects)"
        },
    )


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        t = self.train
        if t.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be fp32, bf16 or fp16, got {t.precision!r}")
        if t.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.schedule must be cosine, linear or constant, got {t.schedule!r}")
        if t.batch_size < 1 or t.grad_accum < 1 or t.batch_size % t.grad_accum:
            raise ValueError(
                f"train.batch_size {t.batch_size} must be a positive multiple of grad_accum {t.grad_accum}"
            )
        check_counts(t)
        from gpt2mm.presets import PRESETS

        if self.model.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {', '.join(PRESETS)}, got {self.model.preset!r}")
        if self.data.format not in ("vqa", "llava"):
            raise ValueError(f"data.format must be vqa or llava, got {self.data.format!r}")
        if self.data.conversation_mix and self.data.format != "vqa":
            raise ValueError(
                "data.conversation_mix adds conversations to VQA questions: it needs format: vqa"
            )
        if self.data.vqa_mix and self.data.format != "llava":
            raise ValueError(
                "data.vqa_mix mixes VQA questions into LLaVA conversations: it needs format: llava"
            )
        if self.data.vqa_mix < -1:
            raise ValueError(
                f"data.vqa_mix must be a number of questions, or -1 for all; got {self.data.vqa_mix}"
            )


def check_counts(t) -> None:
    """Step counts, intervals and rates that make sense (a train section of stage 1, 2 or 3)."""
    for name in ("max_steps", "log_every"):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name} must be at least 1, got {getattr(t, name)}")
    for name in ("eval_every", "save_every", "keep_last", "warmup_steps"):
        if getattr(t, name, 0) < 0:
            raise ValueError(f"train.{name} must be 0 or more, got {getattr(t, name)}")
    if not t.lr > 0:
        raise ValueError(f"train.lr must be positive, got {t.lr}")
    if t.max_minutes is not None and not t.max_minutes > 0:
        raise ValueError(f"train.max_minutes must be positive (or left out), got {t.max_minutes}")


def earlier_run(out: Path) -> list[str]:
    """What an earlier run left in `out` (checkpoints, best, metrics): a new run would mix its metrics with
    them, and prune or replace its checkpoints."""
    if not out.is_dir():
        return []
    return sorted(
        p.name
        for p in out.iterdir()
        if p.name in ("best", "metrics.jsonl", "tensorboard") or is_checkpoint_name(p.name)
    )


def claim_output_dir(out: Path, resume, overwrite: bool, init_from: str | None = None) -> list[str]:
    """Checked before any work: a folder that holds an earlier run is refused unless the run resumes it or
    `overwrite` says to replace it. Returns the earlier run's files, for `replace_earlier_run` to remove once
    the new run has set itself up (so that a run that fails to start loses nothing); the rest of the folder
    stays."""
    found = [] if resume else earlier_run(out)
    if not found:
        return []
    if not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        resumable = "continue it with --resume, " if list_checkpoints(out) else ""
        raise UsageError(
            f"train.output_dir {out} holds an earlier run ({shown}): {resumable}give another train.output_dir, "
            "or replace it with --train.overwrite true"
        )
    if init_from:
        start = Path(init_from).resolve()
        if any((out / name).resolve() in (start, *start.parents) for name in found):
            raise UsageError(
                f"model.init_from {init_from} is part of the earlier run in {out} that --train.overwrite would "
                "remove: copy it elsewhere first, or give another train.output_dir"
            )
    return found


def replace_earlier_run(out: Path, names: list[str], log) -> None:
    """Remove what `claim_output_dir` found (with train.overwrite), on the main process, just before the run
    first writes into `out`."""
    for name in names:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if names:
        log(f"train.overwrite: removed the earlier run's {', '.join(names)} from {out}")


# --- model ---------------------------------------------------------------------------------------------------


def build_model_for_training(cfg: ModelConfig):
    """The model + processor a recipe asks for, with the freezing / LoRA / checkpointing options applied."""
    from gpt2mm.loading import build_model, load_model

    if cfg.init_from:
        model, processor = load_model(cfg.init_from)
        for key, value in cfg.overrides.items():
            setattr(model.config, key, value)
    else:
        model, processor = build_model(cfg.preset, pretrained=cfg.pretrained, **cfg.overrides)
    if cfg.attn_implementation:
        try:
            model.set_attn_implementation(cfg.attn_implementation)
        except (ValueError, ImportError) as e:
            raise UsageError(f"model.attn_implementation {cfg.attn_implementation!r}: {e}") from None
    if cfg.freeze_lm:
        model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    if cfg.lora.r > 0:
        inject_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model, processor


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing of every block, non-reentrant: transformers' own, under its newer
    name where it has one (the older one warns that it is deprecated)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    params = list(model.parameters())  # unique tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --- LoRA ----------------------------------------------------------------------------------------------------
# Training holds the base weights and the adapters apart (peft layers in the language model); a checkpoint
# holds them merged in `model.safetensors`, so that every checkpoint loads as a plain gpt2mm model, and the
# adapters alone in ADAPTER_FILE, so that `--resume` continues exactly. No `adapter_config.json` is written:
# transformers would take the directory for a peft adapter and apply it on top of the merged weights.

ADAPTER = "default"  # peft's adapter name: one adapter per run
ADAPTER_FILE = "adapter_model.safetensors"


def inject_lora(model, cfg: LoraConfig) -> None:
    """LoRA adapters (peft) on the GPT-2 blocks' projections; the whole language model (embeddings, blocks,
    final norm) and the tied LM head frozen. The projector and vision tower keep their own rules."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        raise UsageError(
            "model.lora.r > 0 (LoRA) needs peft: pip install peft (or pip install -e '.[train]')"
        ) from None
    from transformers.pytorch_utils import Conv1D

    lora = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        # GPT-2's projections are Conv1D, whose weight is (in, out), the transpose of nn.Linear's; peft would
        # switch this on by itself (with a warning); saying so keeps the merge below explicit
        fan_in_fan_out=True,
    )
    model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    try:
        inject_adapter_in_model(lora, model.language_model, adapter_name=ADAPTER)
    except ValueError as e:  # no module matched, or one peft cannot adapt
        raise UsageError(f"model.lora.target_modules {cfg.target_modules}: {e}") from None
    for name, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        if not (isinstance(layer, LoraLinear) and isinstance(base, Conv1D)):
            raise UsageError(
                f"model.lora.target_modules: {name} is a {type(base).__name__}; LoRA here adapts GPT-2's "
                "Conv1D projections only (c_attn, c_proj, c_fc)"
            )


def lora_layers(model) -> dict[str, Any]:
    """Module name -> peft LoRA layer, for every adapted layer of the model."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_state_dict(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a LoRA model as a plain model's: each adapted layer's weight is W + scaling * B @ A
    under the layer's own key, with no `lora_*` or `base_layer` keys. The merged weights are new tensors:
    the live model goes on training its unmerged base + adapters."""
    plain = {}
    for key, value in state_dict.items():
        if ".lora_" not in key:
            plain[key.replace(".base_layer.", ".", 1)] = value
    for name, layer in lora_layers(model).items():
        a = state_dict[f"{name}.lora_A.{ADAPTER}.weight"]  # (r, in)
        b = state_dict[f"{name}.lora_B.{ADAPTER}.weight"]  # (out, r)
        w = state_dict[f"{name}.base_layer.weight"]  # Conv1D: (in, out)
        delta = (b.float() @ a.float()) * layer.scaling[ADAPTER]  # (out, in)
        if layer.fan_in_fan_out:
            delta = delta.T  # (in, out), Conv1D's layout
        plain[f"{name}.weight"] = (w.float() + delta.to(w.device)).to(w.dtype)
    return plain


def adapter_state_dict(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights alone (peft's keys, relative to the language model: `h.0.attn.c_attn.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    prefix = "language_model."
    lm = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    adapter = get_peft_model_state_dict(model.language_model, state_dict=lm, adapter_name=ADAPTER)
    return {k: v.detach().contiguous() for k, v in adapter.items()}


def restore_lora(model, path: Path, weights: dict[str, torch.Tensor]) -> set[str]:
    """Resume a LoRA checkpoint's adapters into the live model. The unmerged base weights are not in the
    checkpoint: they are the frozen ones this run rebuilt (model.init_from / preset / seed), and the
    checkpoint's merged weights must equal them + the saved adapters, or the base changed since. Pops the
    merged weights off `weights` (the rest loads as usual); returns the model keys the rest need not cover."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = load_file(str(path / ADAPTER_FILE))
    try:
        result = set_peft_model_state_dict(model.language_model, adapter, adapter_name=ADAPTER)
    except RuntimeError as e:  # size mismatch: another rank
        raise UsageError(f"--resume: {path / ADAPTER_FILE} does not fit this run's model.lora: {e}") from None
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise UsageError(
            f"--resume: {path / ADAPTER_FILE} does not fit this run's model.lora "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    live = model.state_dict()
    expected = merged_state_dict(model, live)
    for name in lora_layers(model):
        for key in (f"{name}.weight", f"{name}.bias"):
            if key not in expected:
                continue
            if key not in weights:
                raise UsageError(f"--resume: {path}/model.safetensors has no {key}")
            saved = weights.pop(key).to(expected[key].device)
            if not torch.allclose(saved, expected[key], rtol=1e-5, atol=1e-6):
                raise UsageError(
                    f"--resume: {path}: the saved {key} is not this run's frozen base + the saved adapters; the "
                    "base weights changed since the checkpoint (model.init_from, model.preset or train.seed?)"
                )
    return {k for k in live if ".lora_" in k or ".base_layer." in k}


def param_groups(model, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: projector / vision learning rates if set; no weight decay on biases, norms, embeddings."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = cfg.lr
        if name.startswith("projector.") and cfg.projector_lr is not None:
            lr = cfg.projector_lr
        elif name.startswith("vision_tower.") and cfg.vision_lr is not None:
            lr = cfg.vision_lr
        no_decay = p.ndim < 2 or "wte" in name or "wpe" in name or "embedding" in name
        groups.setdefault((lr, 0.0 if no_decay else cfg.weight_decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if not groups:
        raise UsageError("nothing to train: every parameter is frozen")
    device = next(p for g in groups for p in g["params"]).device
    # fused AdamW: one kernel for all parameters, on CUDA and (torch >= 2.4) CPU
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def lr_lambda(cfg: TrainConfig, elapsed=None):
    """Warmup, then constant / linear / cosine decay to `min_lr_ratio`. With a time budget
    (`max_minutes`), `elapsed()` (training seconds so far) also drives the decay, so a run stopped by
    the clock ends its schedule on time (the learning rate then depends on the machine's speed)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        if cfg.max_minutes and elapsed is not None:
            progress = max(progress, min(1.0, elapsed() / (60 * cfg.max_minutes)))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


# --- data ------------------------------------------------------------------------------------------------


class PixelStore:
    """Image path -> preprocessed pixel values, decoded once (optionally kept in memory)."""

    def __init__(self, processor, cache: bool = True, max_pixels: int | None = None):
        self.processor = processor
        self.cache: dict[str, torch.Tensor] | None = {} if cache else None
        self.max_pixels = max_pixels

    def __call__(self, path: str) -> torch.Tensor:
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        from gpt2mm.data.images import load_image

        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        pixels = self.processor.preprocess_images([load_image(path, **kwargs)])[0]
        if self.cache is not None:
            self.cache[path] = pixels
        return pixels


def resolve(root: str, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


def load_samples(cfg: DataConfig, split: str) -> tuple[list, str]:
    """Training or validation samples of the recipe's format; returns (samples, load report summary)."""
    if split == "train" and cfg.format == "llava":
        samples, summary = load_conversations(cfg)
        if cfg.vqa_mix:  # LLaVA-1.5's remedy for forgetting short answers: VQA samples in the same stream
            vqa, vqa_summary = load_vqa_split(cfg, "train", None if cfg.vqa_mix == -1 else cfg.vqa_mix)
            samples, summary = samples + vqa, f"{summary}; mixed in {vqa_summary}"
        return samples, summary
    return load_vqa_split(cfg, split, cfg.limit if split == "train" else cfg.val_limit)


def load_conversations(cfg: DataConfig, first_exchange_last: bool = False) -> tuple[list, str]:
    """The LLaVA training conversations; `first_exchange_last` moves each one's first exchange (user turn and
    reply) to its end."""
    from gpt2mm.data.llava import load_llava

    samples, report = load_llava(
        resolve(cfg.root, cfg.llava_train), resolve(cfg.root, cfg.llava_images), skip_bad=cfg.skip_bad
    )
    samples = samples[: cfg.limit] if cfg.limit else samples
    if first_exchange_last:
        for s in samples:
            s.turns = s.turns[2:] + s.turns[:2]
    return samples, report.summary()


def load_vqa_split(cfg: DataConfig, split: str, limit: int | None) -> tuple[list, str]:
    from gpt2mm.data.vqa import load_vqa

    q, a, im = (
        (cfg.train_questions, cfg.train_annotations, cfg.train_images)
        if split == "train"
        else (
            cfg.val_questions,
            cfg.val_annotations,
            cfg.val_images,
        )
    )
    samples, report = load_vqa(
        resolve(cfg.root, q),
        resolve(cfg.root, a),
        resolve(cfg.root, im),
        answer_mode=cfg.answer_mode,
        limit=limit,
        skip_bad=cfg.skip_bad,
        seed=0,
    )
    return samples, report.summary()


def set_difficulty(samples: list, cfg: DataConfig, split: str) -> None:
    """Difficulty for a curriculum: `objects` reads the synthetic world's scene records."""
    if cfg.difficulty != "objects":
        raise UsageError(f"data.difficulty must be 'objects' (the synthetic world), got {cfg.difficulty!r}")
    path = resolve(cfg.root, f"scenes/{split}_scenes.json")
    if not path.is_file():
        raise UsageError(f"data.difficulty: objects needs the synthetic world's {path}")
    scenes = json.loads(path.read_text())
    by_id = {scene["image_id"]: len(scene["objects"]) for scene in scenes}
    by_file = {scene["file_name"]: len(scene["objects"]) for scene in scenes}  # LLaVA records: no image id
    for s in samples:
        s.difficulty = (
            by_id.get(s.image_id) if s.image_id is not None else by_file.get(Path(s.image or "").name)
        )


def pack_by_image(samples: list, k: int, seed: int) -> list:
    """Questions about the same image as multi-turn samples of up to `k` Q/A pairs (the image is encoded
    once for k answers). The prompt format is the conversation format, whose first turn is stage 1's."""
    from gpt2mm.data.samples import Sample

    by_image: dict[Any, list] = {}
    for s in samples:
        by_image.setdefault(s.image, []).append(s)
    rng = random.Random(seed)
    packed = []
    for image, group in by_image.items():
        if image is None:
            packed += group
            continue
        rng.shuffle(group)
        for start in range(0, len(group), k):
            chunk = group[start : start + k]
            turns = [t for s in chunk for t in s.turns]
            packed.append(
                Sample(
                    id="+".join(s.id for s in chunk),
                    image=image,
                    turns=turns,
                    image_id=chunk[0].image_id,
                    difficulty=chunk[0].difficulty,
                )
            )
    return packed


# --- checkpoints -----------------------------------------------------------------------------------------


def atomic_save_dir(final: Path, write) -> None:
    """Write a directory under a temporary name, then rename it into place (a crash leaves no half
    checkpoint under the final name; stale temporaries are removed on the next start)."""
    with atomic_dir(final) as tmp:
        write(tmp)


@contextlib.contextmanager
def atomic_dir(final: Path):
    """`atomic_save_dir` as a context: the body writes into the temporary directory it is given, which takes
    the final name when the body ends without an error."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    delay = float(os.environ.get("GPT2MM_TEST_SAVE_DELAY", "0"))  # tests kill a run mid-save
    if delay:
        time.sleep(delay)
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary `.tmp` directory is never complete)."""
    found = []
    for p in run_dir.glob("checkpoint-*"):
        if p.is_dir() and is_checkpoint_name(p.name) and (p / "trainer_state.pt").is_file():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def is_checkpoint_name(name: str) -> bool:
    return name.startswith("checkpoint-") and name.split("-", 1)[1].isdigit()


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0: keep all)."""
    for old in list_checkpoints(run_dir)[: -keep_last or None]:
        shutil.rmtree(old)


def load_resume_checkpoint(run_dir: Path, resume: str | bool) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """What `--resume` names: the given checkpoint, or the last complete one in `run_dir` when it names
    none. Returns (path, trainer state, model weights); a UsageError says what is missing."""
    from safetensors.torch import load_file

    path = Path(resume) if isinstance(resume, str) else None
    if path is None:
        found = list_checkpoints(run_dir)
        if not found:
            raise UsageError(f"--resume: no complete checkpoint in {run_dir}")
        path = found[-1]
    if not path.exists():
        raise UsageError(f"--resume {path}: no such checkpoint")
    if not (path / "trainer_state.pt").is_file():
        raise UsageError(f"--resume: {path} is not a complete checkpoint (no trainer_state.pt)")
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    return path, state, load_file(str(path / "model.safetensors"))


def budget_bar_total(bar, t, step: int, seconds_this_session: float, seconds: float) -> None:
    """Under a time budget (`t.max_minutes`), a progress bar ends at the step the budget is projected to
    reach at this session's pace (not at a max_steps set high to leave the budget in charge)."""
    if t.max_minutes is not None and step > bar.initial:
        per_step = max(1e-9, seconds_this_session) / (step - bar.initial)
        left = max(0.0, 60 * t.max_minutes - seconds)
        bar.total = min(t.max_steps, step + round(left / per_step))


def tensorboard_writer(run_dir: Path, enabled: bool):
    """A TensorBoard writer into RUN_DIR/tensorboard, or None when off or tensorboard is not installed."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- FSDP ------------------------------------------------------------------------------------------------
# FSDP2 (torch's `fully_shard`) through accelerate's FullyShardedDataParallelPlugin, selected by
# `accelerate launch --use_fsdp --fsdp_version 2` (or an accelerate config file saying so: both set the
# ACCELERATE_USE_FSDP / FSDP_* variables) or by `train.fsdp: true`. The optimizer is built before sharding and
# accelerate swaps its parameters for the sharded ones (FSDP2 keeps each parameter as itself, frozen or not, so
# the frozen vision tower and the tied embedding / LM head need nothing special). FSDP1 is not offered: it needs
# the optimizer built after wrapping, over flattened parameters (use_orig_params for the frozen tower).

FSDP_WRAP = ["GPT2Block", "CLIPEncoderLayer"]  # one FSDP unit per GPT-2 block and per CLIP encoder layer


def fsdp_from_env() -> bool:
    """Whether the launcher asked for FSDP (`accelerate launch --use_fsdp`, or its config file)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_fsdp_plugin():
    """accelerate's FSDP2 plugin: units per GPT-2 block and CLIP encoder layer (then accelerate's own unit for the
    tied embedding + LM head, and the root) unless the launcher's FSDP_* variables say otherwise; the other
    settings (resharding, CPU offload, activation checkpointing, ...) come from them as accelerate reads them."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if "fsdp_version" not in FullyShardedDataParallelPlugin.__dataclass_fields__:
        raise UsageError("FSDP here is FSDP2, which needs accelerate >= 1.6: pip install -U accelerate")
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise UsageError(
            f"FSDP_VERSION={version}: gpt2mm train shards with FSDP2 only (FSDP1 would need the optimizer built "
            "after wrapping, over flattened parameters); launch with accelerate launch --use_fsdp --fsdp_version 2 "
            "(fsdp_version: 2 in an accelerate config file)"
        )
    kwargs: dict[str, Any] = {"fsdp_version": 2}
    if "FSDP_AUTO_WRAP_POLICY" not in os.environ:
        kwargs["auto_wrap_policy"] = "transformer_based_wrap"
    if "FSDP_TRANSFORMER_CLS_TO_WRAP" not in os.environ:
        # accelerate's default, the model's _no_split_modules, names CLIP modules this model does not hold
        kwargs["transformer_cls_names_to_wrap"] = list(FSDP_WRAP)
    return FullyShardedDataParallelPlugin(**kwargs)


def shard_on_cpu(acc, plugin) -> None:
    """Switch an Accelerator of several CPU processes (gloo) from DDP to FSDP. accelerate (1.x) selects FSDP for
    accelerator devices only: on CPU it keeps DDP and drops the plugin, although FSDP2 itself runs there. This sets
    what accelerate sets on GPUs (the distributed type, the plugin, its mixed precision), so that `prepare`,
    `backward`, `clip_grad_norm_`, `no_sync` and `get_state_dict` take their FSDP2 paths, as they do on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = acc.state  # AcceleratorState: one state shared by every instance
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    if not acc.is_fsdp2:
        raise RuntimeError("could not switch accelerate's state to FSDP2 on CPU")


def tied_copies(model) -> set[str]:
    """The names under which a parameter appears a second time (the LM head tied to the embeddings). A state dict
    gathered from FSDP shards holds a separate copy under each, which save_pretrained (it recognises tied weights
    by shared storage) would write twice; an unsharded model's checkpoint holds the first name only."""
    seen: set[int] = set()
    copies = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            copies.add(name)
        seen.add(id(p))
    return copies


def optimizer_param_names(model, optimizer) -> tuple[list[str], dict[str, int]]:
    """The optimizer's parameters by name, in its order (the first name of a tied parameter), and every name of
    each (the tied LM head's too) -> its position: the two keyings of an optimizer state dict."""
    position = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    names: list[str | None] = [None] * len(position)
    by_name = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        i = position.get(id(p))
        if i is not None:
            by_name[name] = i
            names[i] = names[i] or name
    if any(n is None for n in names):
        raise RuntimeError("an optimizer parameter is not a parameter of the model")
    return names, by_name  # type: ignore[return-value]


def optimizer_state_by_name(state: dict, names: list[str]) -> dict:
    """torch's optimizer state dict (parameters by position) keyed by parameter name instead, the form of
    torch.distributed.checkpoint's full optimizer state dict."""
    return {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def optimizer_state_by_position(state: dict, position: dict[str, int]) -> dict:
    """The inverse of `optimizer_state_by_name`: what `optimizer.state_dict()` of the unsharded model gives."""
    return {
        "state": {position[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in state["param_groups"]],
    }


# --- the loop --------------------------------------------------------------------------------------------


_LAST_BARRIER: list = []  # see Run.end


class Run:
    """One training run: set-up, the step loop, evaluation, checkpoints. `Run(cfg).train()`."""

    def __init__(self, cfg: SFTConfig, resume: str | bool | None = None, log=print):
        from accelerate import Accelerator, PartialState
        from accelerate.state import AcceleratorState
        from accelerate.utils import AutocastKwargs, DistributedType
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # ours is the one to watch
        self.cfg = cfg
        self.log = log
        t = cfg.train
        self.out = Path(t.output_dir)
        # on a machine without CUDA, processes started by torchrun / accelerate launch talk over gloo
        cpu = not torch.cuda.is_available()
        plugin = None
        if t.fsdp or fsdp_from_env():
            plugin = make_fsdp_plugin()
            if PartialState(cpu=cpu).num_processes == 1 and not fsdp_from_env():
                # (given a plugin, accelerate would set ACCELERATE_USE_FSDP for the rest of the process)
                plugin = None
                log("train.fsdp: a single process has nothing to shard; training unsharded")
        # bf16/fp16 autocast keeps a cast copy of every weight for the whole forward; under gradient
        # checkpointing that copy is much of what checkpointing saves (1.5 GB for the seed), so it is off
        autocast = AutocastKwargs(cache_enabled=not cfg.model.gradient_checkpointing)
        precision = {"fp32": "no"}.get(t.precision, t.precision)
        state = AcceleratorState._shared_state
        if state and state.get("_mixed_precision") != precision:
            # accelerate keeps one state per process and refuses another precision; a later run in the same
            # process (the demo's fp32 stage 3 after its bf16 stage 1) starts a fresh one. The process
            # group (PartialState) stays.
            AcceleratorState._reset_state()
        self.acc = Accelerator(
            mixed_precision=precision,
            cpu=cpu,
            fsdp_plugin=plugin,
            kwargs_handlers=[autocast],
        )
        if plugin is not None and self.acc.distributed_type == DistributedType.MULTI_CPU:
            shard_on_cpu(self.acc, plugin)
        if not self.acc.is_main_process:  # one process speaks for all (errors still come from each)
            self.log = log = lambda *args, **kwargs: None
        earlier = claim_output_dir(self.out, resume, t.overwrite, cfg.model.init_from)
        self.fsdp = self.acc.distributed_type == DistributedType.FSDP
        self.world = self.acc.num_processes
        if self.fsdp:
            policy = getattr(plugin.auto_wrap_policy, "__name__", None)
            units = (
                plugin.transformer_cls_names_to_wrap if policy == "transformer_auto_wrap_policy" else policy
            )
            log(f"FSDP2 over {self.world} processes (units: {units or 'none below the embeddings and root'})")
        if (t.batch_size // t.grad_accum) % self.world:
            raise UsageError(f"train.batch_size / grad_accum must divide among {self.world} processes")
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed)

        if cfg.data.synth:
            self._ensure_synthetic_world()
        self.model, self.processor = build_model_for_training(cfg.model)
        if t.vision_lr == 0:  # a vision learning rate of 0 means a frozen tower (no backward through it)
            self.model.freeze_vision()
        self.lora = cfg.model.lora.r > 0
        if self.lora:
            trainable, total = count_parameters(self.model)
            self.log(
                f"LoRA r={cfg.model.lora.r} on {cfg.model.lora.target_modules}: training {trainable:,} of "
                f"{total:,} parameters ({100 * trainable / total:.2f}%)"
            )
        self.train_samples, train_report = load_samples(cfg.data, "train")
        if cfg.data.difficulty:
            set_difficulty(self.train_samples, cfg.data, "train")
        if cfg.data.pack_questions > 1:
            self.train_samples = pack_by_image(self.train_samples, cfg.data.pack_questions, t.seed)
        if cfg.data.conversation_mix:  # not packed: a conversation is already one image's questions
            conversations, summary = load_conversations(cfg.data, first_exchange_last=True)
            if cfg.data.difficulty:
                set_difficulty(conversations, cfg.data, "train")
            self.train_samples += conversations
            train_report += f"; mixed in {summary}"
        from gpt2mm.data.collate import Collator, encode_samples

        self.examples, enc_report = encode_samples(self.train_samples, self.processor, cfg.data.max_length)
        if not self.examples:
            raise UsageError(f"no training examples: {enc_report.summary()}")
        self.log(f"train data: {train_report}; {enc_report.summary()}")
        self.val_samples = []
        if t.eval_every > 0 and resolve(cfg.data.root, cfg.data.val_questions).exists():
            self.val_samples, val_report = load_samples(cfg.data, "val")
            self.log(f"val data: {val_report}")
        self.image_key = "pixel_values"
        self.pixels = PixelStore(self.processor, cache=cfg.data.cache_pixels)
        if cfg.data.feature_cache:
            from gpt2mm.data.features import FeatureCache

            if not self.model.vision_frozen:
                raise UsageError(
                    "data.feature_cache needs a frozen vision tower (freeze_vision or vision_lr: 0)"
                )
            self.pixels = FeatureCache(cfg.data.feature_cache, self.model, self.processor)
            paths = {s.image for s in self.train_samples + self.val_samples if s.image is not None}
            added = self.pixels.build(sorted(paths), skip_bad=cfg.data.skip_bad, progress=t.progress)
            self.log(f"feature cache {self.pixels.dir}: {added} images added, {len(paths) - added} reused")
            self.image_key = "vision_hidden_states"
        if cfg.data.skip_bad:
            self._drop_unreadable_images()
        self.collate = Collator(self.processor.tokenizer.pad_token_id, self.pixels, self.image_key)

        # --resume: the weights load into the whole model, before it is sharded (the rest after prepare)
        resumed = self._resume_weights(resume) if resume else None
        self.optimizer = make_optimizer(self.model.to(self.acc.device), t)
        # names taken before sharding (FSDP's activation checkpointing or torch.compile would add wrapper prefixes)
        self._param_names, self._param_position = optimizer_param_names(self.model, self.optimizer)
        self._tied_copies = tied_copies(self.model)
        self.train_seconds = 0.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t, lambda: self.train_seconds)
        )
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        if t.compile:
            self.acc.unwrap_model(self.model).compile_blocks()
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.samples_seen = 0
        self.best: float | None = None
        self.evals_without_gain = 0
        self.history: list[dict[str, Any]] = []
        self.wandb = None  # the Weights & Biases run while train() runs (train.wandb)
        if t.wandb and self.acc.is_main_process:
            try:
                import wandb  # noqa: F401  (checked here, before any work; started in train())
            except ImportError:
                raise UsageError("train.wandb: true needs wandb: pip install wandb") from None
        self.acc.wait_for_everyone()  # every process has looked at the folder (claim_output_dir) before it changes
        if self.acc.is_main_process:
            replace_earlier_run(self.out, earlier, self.log)
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.glob("*.tmp"):
                shutil.rmtree(stale)
        if resumed is not None:
            self._resume_state(*resumed)

    def _drop_unreadable_images(self) -> None:
        """With `data.skip_bad`, every image is decoded once before training: the samples of an unreadable
        one are skipped and counted here, so that nothing fails mid-epoch."""
        from gpt2mm.errors import DataError

        paths = sorted(
            {e.image for e in self.examples if e.image} | {s.image for s in self.val_samples if s.image}
        )
        bad = set()
        for path in paths:
            try:
                self.pixels(path)
            except (DataError, KeyError):  # KeyError: the feature cache skipped it
                bad.add(path)
        if bad:
            n_train, n_val = len(self.examples), len(self.val_samples)
            self.examples = [e for e in self.examples if e.image not in bad]
            self.val_samples = [s for s in self.val_samples if s.image not in bad]
            self.log(
                f"skipped {n_train - len(self.examples)} training and {n_val - len(self.val_samples)} validation "
                f"samples: {len(bad)} unreadable images (e.g. {sorted(bad)[0]})"
            )
        if not self.examples:
            raise UsageError("no training examples left after skipping unreadable images")

    # data order: a function of (seed, epoch), so resume can skip to the exact batch
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        from gpt2mm.data.collate import length_grouped_batches, shuffled_batches

        g = torch.Generator().manual_seed(self.cfg.train.seed * 1000003 + epoch)
        bs = self.cfg.train.batch_size
        if self.cfg.train.length_grouping:
            batches = length_grouped_batches([len(e.input_ids) for e in self.examples], bs, g)
        else:
            batches = shuffled_batches(len(self.examples), bs, g)
        return [b for b in batches if len(b) == bs]  # full batches only: every step sees batch_size samples

    def _curriculum_batch(self) -> list[int]:
        """A batch drawn from the samples no harder than the curriculum allows at this step: the limit grows
        linearly from the easiest difficulty to the hardest over `curriculum_steps`. A function of
        (seed, step), so a resumed run draws the same batches."""
        t = self.cfg.train
        if not hasattr(self, "_by_difficulty"):
            levels = [e.difficulty for e in self.examples]
            if any(d is None for d in levels):
                raise UsageError(
                    "train.curriculum_steps needs every sample to have a difficulty (data.difficulty)"
                )
            self._by_difficulty = sorted(range(len(levels)), key=lambda i: levels[i])
            self._levels = sorted(levels)
        lo, hi = self._levels[0], self._levels[-1]
        limit = lo + (hi - lo) * self.step / max(1, t.curriculum_steps)
        import bisect

        pool = self._by_difficulty[: bisect.bisect_right(self._levels, limit)]
        g = torch.Generator().manual_seed(t.seed * 1000003 + 7919 * (self.step + 1))
        return [pool[i] for i in torch.randint(len(pool), (t.batch_size,), generator=g).tolist()]

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

    def train(self) -> dict[str, Any]:
        t = self.cfg.train
        model = self.model
        model.train()
        metrics_file = self.out / "metrics.jsonl"
        writer = tensorboard_writer(self.out, self.cfg.train.tensorboard and self.acc.is_main_process)
        self.wandb = self._wandb()
        bar = None
        if t.progress and self.acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=t.max_steps,
                initial=self.step,
                desc="train",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=2.0,
            )
        stop_reason = "max_steps"
        last_loss = float("nan")
        window_samples, window_start = 0, time.perf_counter()
        seconds_at_start = self.train_seconds
        while self.step < t.max_steps:
            batches = self._epoch_batches(self.epoch)
            if not batches:
                raise UsageError(
                    f"fewer training examples ({len(self.examples)}) than one batch ({t.batch_size})"
                )
            while self.batch_in_epoch < len(batches) and self.step < t.max_steps:
                step_start = time.perf_counter()
                in_curriculum = self.step < t.curriculum_steps
                batch = self._curriculum_batch() if in_curriculum else batches[self.batch_in_epoch]
                micro = self._micro_batches(batch)
                loss = self._optimizer_step(micro)
                self.batch_in_epoch += 0 if in_curriculum else 1
                self.step += 1
                self.samples_seen += t.batch_size
                self.train_seconds += time.perf_counter() - step_start
                window_samples += t.batch_size
                last_loss = loss
                if bar is not None:
                    rate = window_samples / max(1e-9, time.perf_counter() - window_start)
                    bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.0f}", refresh=False)
                    budget_bar_total(
                        bar, t, self.step, self.train_seconds - seconds_at_start, self.train_seconds
                    )
                    bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    rate = window_samples / max(1e-9, time.perf_counter() - window_start)
                    window_samples, window_start = 0, time.perf_counter()
                    self._record(
                        metrics_file,
                        writer,
                        {"loss": loss, "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate},
                    )
                if (
                    t.eval_every
                    and self.val_samples
                    and (self.step % t.eval_every == 0 or self.step == t.max_steps)
                ):
                    acc = self.evaluate()
                    self._record(metrics_file, writer, {"val_accuracy": acc})
                    improved = self.best is None or acc > self.best
                    if improved:
                        self.best = acc
                        self.evals_without_gain = 0
                        self._save(best=True)
                    else:
                        self.evals_without_gain += 1
                    model.train()
                    if t.early_stopping_patience and self.evals_without_gain >= t.early_stopping_patience:
                        stop_reason = "early_stopping"
                if t.save_every and self.step % t.save_every == 0:
                    self._save()
                if t.max_minutes is not None and self.train_seconds > 60 * t.max_minutes:
                    stop_reason = "max_minutes"
                if stop_reason != "max_steps":
                    if self.step % t.log_every:  # the last step is always on record
                        rate = window_samples / max(1e-9, time.perf_counter() - window_start)
                        row = {"loss": loss, "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate}
                        self._record(metrics_file, writer, row)
                    break
            if stop_reason != "max_steps":
                break
            if self.batch_in_epoch >= len(batches):
                self.epoch += 1
                self.batch_in_epoch = 0
        if bar is not None:
            bar.close()
        self._save()
        if writer is not None:
            writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        summary = {
            "steps": self.step,
            "epochs": self.epoch + self.batch_in_epoch / max(1, len(self._epoch_batches(self.epoch))),
            "samples_seen": self.samples_seen,
            "train_seconds": round(self.train_seconds, 2),
            "final_loss": last_loss,
            "best_val_accuracy": self.best,
            "stop_reason": stop_reason,
        }
        self.log(f"done: {json.dumps(summary)}")
        return summary

    def _optimizer_step(self, micro: list[dict[str, torch.Tensor]]) -> float:
        """One optimizer step over the micro-batches; the loss is normalised by the labelled tokens of the
        whole global batch, so any split among processes and micro-batches gives the same gradient."""
        t = self.cfg.train
        count = torch.tensor(
            float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)), device=self.acc.device
        )
        total = self.acc.reduce(count, reduction="sum") if self.world > 1 else count
        # DDP averages gradients over processes; scale so the result is sum(losses) / all labelled tokens
        denom = total / self.world
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            sync = i == len(micro) - 1
            ctx = self.acc.no_sync(self.model) if not sync and self.world > 1 else contextlib.nullcontext()
            with ctx, self.acc.autocast():
                out = self.model(**batch, num_items_in_batch=denom)
            self.acc.backward(out.loss)
            loss_sum += float(out.loss.detach())
        if t.grad_clip:
            self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # the global mean loss over labelled tokens
        loss = torch.tensor(loss_sum, device=self.acc.device)
        return float(self.acc.reduce(loss, reduction="mean")) if self.world > 1 else loss_sum

    def end(self) -> None:
        """The processes of a run end together: the main one may still be writing the last checkpoint.

        The final barrier stays referenced until the process exits. gloo frees a finished work, and the works
        a barrier waited on (FSDP's gathers, whose tensors need the GIL to be freed), when the work's last
        reference goes: held here, that is the main thread; dropped at once, it could be a gloo thread racing
        the interpreter's shutdown, which then aborts the process ("terminate called without an active
        exception") after a complete run."""
        if self.world == 1 or not torch.distributed.is_initialized():
            return
        work = torch.distributed.barrier(async_op=True)
        work.wait()
        _LAST_BARRIER.append(work)

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
        return score_samples(self.val_samples, answers)

    def _record(self, path: Path, writer, values: dict[str, float]) -> None:
        if not self.acc.is_main_process:
            return
        row = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "train_seconds": round(self.train_seconds, 3),
            **values,
        }
        self.history.append(row)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for k, v in values.items():
                writer.add_scalar(k, v, self.step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=self.step)
        if "val_accuracy" in values:
            self.log(f"step {self.step}: val accuracy {values['val_accuracy']:.2f}%")

    def _wandb(self):
        """A Weights & Biases run that gets metrics.jsonl's rows (project: $WANDB_PROJECT, else gpt2mm)."""
        if not (self.cfg.train.wandb and self.acc.is_main_process):
            return None
        import wandb

        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "gpt2mm"),
            name=self.out.name,
            dir=str(self.out),
            config=asdict(self.cfg),
        )

    # --- checkpoints ---

    def _save(self, best: bool = False) -> None:
        """A checkpoint (or `best`, weights only). Under FSDP every process takes part in gathering the full
        tensors from the shards and the main one writes them: first the weights, then (once the weights are
        freed, so that the two are never in memory together) the optimizer state."""
        self.acc.wait_for_everyone()
        main = self.acc.is_main_process
        model = self.acc.unwrap_model(self.model)
        name = "best" if best else f"checkpoint-{self.step}"
        with atomic_dir(self.out / name) if main else contextlib.nullcontext() as tmp:
            state_dict = self.acc.get_state_dict(self.model)
            if main:
                self._write_weights(model, state_dict, tmp)
            del state_dict
            if best:
                return
            optimizer_state = self._optimizer_state()
            if main:
                state = {
                    "step": self.step,
                    "epoch": self.epoch,
                    "batch_in_epoch": self.batch_in_epoch,
                    "samples_seen": self.samples_seen,
                    "train_seconds": self.train_seconds,
                    "best": self.best,
                    "evals_without_gain": self.evals_without_gain,
                    "optimizer": optimizer_state,
                    "scheduler": self.scheduler.state_dict(),
                    "rng": rng_state(),
                    "config": asdict(self.cfg),
                }
                torch.save(state, tmp / "trainer_state.pt")
        if main:
            prune_checkpoints(self.out, self.cfg.train.keep_last)

    def _write_weights(self, model, state_dict: dict, out: Path) -> None:
        """model.safetensors (merged LoRA weights: a plain model), the processor, and the LoRA adapters."""
        if self.fsdp:
            state_dict = {k: v for k, v in state_dict.items() if k not in self._tied_copies}
        adapter = None
        if self.lora:
            adapter = adapter_state_dict(model, state_dict)
            state_dict = merged_state_dict(model, state_dict)
        model.save_pretrained(out, state_dict=state_dict)
        self.processor.save_pretrained(out)
        if adapter is not None:
            from safetensors.torch import save_file

            lora = json.dumps(asdict(self.cfg.model.lora))
            save_file(adapter, str(out / ADAPTER_FILE), metadata={"format": "pt", "lora": lora})

    def _optimizer_state(self) -> dict | None:
        """The optimizer state in torch's own format (parameters by position), whatever the sharding: a checkpoint
        resumes with or without FSDP. Under FSDP, gathered from the shards (None on the other processes)."""
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(
            self.model,
            getattr(self.optimizer, "optimizer", self.optimizer),  # the torch optimizer under accelerate's
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        return optimizer_state_by_position(full, self._param_position) if self.acc.is_main_process else None

    def _load_optimizer_state(self, saved: dict, path: Path) -> None:
        if not self.fsdp:
            self.optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        live = [len(g["params"]) for g in self.optimizer.param_groups]
        if [len(g["params"]) for g in saved["param_groups"]] != live:
            raise UsageError(f"--resume: the optimizer state in {path} does not fit this run's parameters")
        # every process read the whole state from the checkpoint; each keeps its shards
        set_optimizer_state_dict(
            self.model,
            getattr(self.optimizer, "optimizer", self.optimizer),
            optimizer_state_by_name(saved, self._param_names),
            options=StateDictOptions(full_state_dict=True),
        )

    def _resume_weights(self, resume: str | bool) -> tuple[Path, dict]:
        """Load a checkpoint's weights into the (not yet prepared) model; returns (path, trainer state)."""
        path, state, weights = load_resume_checkpoint(self.out, resume)
        model = self.model
        may_miss = {"lm_head.weight"}
        if (path / ADAPTER_FILE).is_file() != self.lora:
            raise UsageError(
                f"--resume: {path} was written by a run {'with' if not self.lora else 'without'} LoRA; "
                "resume it with the same model.lora.r"
            )
        if self.lora:
            may_miss |= restore_lora(model, path, weights)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - may_miss:
            raise UsageError(
                f"--resume: {path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return path, state

    def _resume_state(self, path: Path, state: dict) -> None:
        """The rest of a checkpoint, once the model and optimizer are prepared: optimizer, schedule, position, RNG."""
        self._load_optimizer_state(state["optimizer"], path)
        self.scheduler.load_state_dict(state["scheduler"])
        for key in (
            "step",
            "epoch",
            "batch_in_epoch",
            "samples_seen",
            "train_seconds",
            "best",
            "evals_without_gain",
        ):
            setattr(self, key, state[key])
        set_rng_state(state["rng"])
        self.log(f"resumed from {path} at step {self.step}")

    def _ensure_synthetic_world(self) -> None:
        root = Path(self.cfg.data.root)
        if (root / "world.json").is_file():
            return
        if root.exists() and any(root.iterdir()):
            raise UsageError(
                f"data.root {root} holds files but no synthetic world (world.json); "
                "for your own data set data.synth: false"
            )
        if self.acc.is_main_process:
            from gpt2mm.data.synthetic import write_world

            self.log(f"rendering the synthetic world into {root}")
            write_world(root, **self.cfg.data.synth_args)
        self.acc.wait_for_everyone()


# --- the command -----------------------------------------------------------------------------------------


TAKES_OVERRIDES = True


def configure(parser) -> None:
    from gpt2mm.train.args import describe

    # the recipe is taken by run() from the left-over arguments, so that an override's value ("--x.y 3")
    # is never mistaken for it; without a recipe the defaults run (the synthetic world, the tiny preset)
    parser.usage = "gpt2mm train [RECIPE.yaml] [--section.key value ...] [--resume [CHECKPOINT]]"
    parser.add_argument(
        "--resume", nargs="?", const=True, default=None, help="continue the last (or given) checkpoint"
    )
    parser.epilog = "options (override as --section.key value):\n" + "\n".join(describe(SFTConfig))
    parser.formatter_class = __import__("argparse").RawDescriptionHelpFormatter


def run(args, extra: list[str]) -> int:
    from gpt2mm.train.args import load_config

    recipe = None
    if extra and not extra[0].startswith("--"):
        recipe, extra = extra[0], extra[1:]
    cfg = load_config(SFTConfig, recipe, extra)
    trainer = Run(cfg, resume=args.resume)
    trainer.train()
    trainer.end()
    return 0
