"""The model a recipe's `model:` section asks for, ready to train: built from a preset or loaded from a
checkpoint, with freezing, LoRA, the attention implementation and activation checkpointing applied."""

from __future__ import annotations

from gpt2mm.errors import UsageError
from gpt2mm.train.config import ModelConfig


def build_model_for_training(cfg: ModelConfig):
    """The model + processor a recipe asks for, with the freezing / LoRA / checkpointing options applied."""
    from gpt2mm.loading import build_model, load_model

    check_overrides(cfg.overrides)
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
        from gpt2mm.train.lora import inject_lora

        inject_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model, processor


def check_overrides(overrides: dict) -> None:
    """A `model.overrides` key that is no `MultimodalGPT2Config` field is an error, not a silent extra attribute
    (YAML reads `{vision_stem:cnn}`, without a space after the colon, as a key named "vision_stem:cnn")."""
    from gpt2mm.config import MultimodalGPT2Config

    fields = {name for cls in MultimodalGPT2Config.__mro__ for name in getattr(cls, "__annotations__", {})}
    unknown = [key for key in overrides if key not in fields]
    if unknown:
        hint = (
            " (write 'key: value', with a space after the colon)"
            if any(":" in str(k) for k in unknown)
            else ""
        )
        raise UsageError(
            f"model.overrides: unknown MultimodalGPT2Config field(s) {', '.join(map(repr, unknown))}{hint}"
        )


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
