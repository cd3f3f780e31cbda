"""The model a recipe's `model:` section asks for, ready to train: built from a preset or loaded from a
checkpoint, with freezing, LoRA, the attention implementation and activation checkpointing applied."""

from __future__ import annotations

import inspect
import typing

from gpt2mm.errors import UsageError
from gpt2mm.train.config import ModelConfig


def build_model_for_training(cfg: ModelConfig):
    """The model + processor a recipe asks for, with the freezing / LoRA / checkpointing options applied."""
    from huggingface_hub.errors import StrictDataclassError

    from gpt2mm.config import MultimodalGPT2Config
    from gpt2mm.layers import EAGER
    from gpt2mm.loading import build_model, load_model

    check_overrides(cfg.overrides)
    if cfg.init_from:
        model, processor = load_model(cfg.init_from)
        apply_overrides_to_loaded(model.config, cfg.overrides, cfg.init_from)
    else:
        try:  # a value its field refuses (`vision_config.patch_size: x`, `projector_num_layers: -1`): one line
            MultimodalGPT2Config.from_preset(cfg.preset, **cfg.overrides)
        except (TypeError, ValueError, StrictDataclassError) as e:
            message = " ".join(line.strip() for line in str(e).splitlines()).split(". Errors:")[0]
            raise UsageError(f"model.overrides: {message}") from None
        model, processor = build_model(cfg.preset, pretrained=cfg.pretrained, **cfg.overrides)
    if cfg.attn_implementation:
        try:
            model.set_attn_implementation(cfg.attn_implementation)
        except (ValueError, ImportError) as e:
            raise UsageError(
                f"model.attn_implementation {cfg.attn_implementation!r}: {e} (gpt2mm adds {EAGER!r} and 'auto')"
            ) from None
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


def typed_overrides(overrides: dict) -> dict:
    """`model.overrides` with the strings a command line gives (`--model.overrides.projector_num_layers 2`)
    read as the `MultimodalGPT2Config` field's type, as every other option is; inside `vision_config` /
    `text_config`, and for fields whose type is not declared, as YAML reads a scalar ("8" -> 8, "1e-5" ->
    1e-05). A value that does not fit its field is a one-line error naming it."""
    import yaml

    from gpt2mm.config import MultimodalGPT2Config
    from gpt2mm.train.args import _coerce

    def scalar(value: str):
        parsed = yaml.safe_load(value) if value.strip() else value
        if isinstance(parsed, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(parsed)
            except ValueError:
                return value
        return parsed

    declared = inspect.get_annotations(MultimodalGPT2Config, eval_str=True)  # its own fields (not the base's)
    out = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            value = {k: scalar(v) if isinstance(v, str) else v for k, v in value.items()}
        elif isinstance(value, str):
            tp = declared.get(key)
            if tp is None or typing.get_origin(tp) is typing.ClassVar:
                value = scalar(value)
            else:
                try:
                    value = _coerce(value, tp, f"model.overrides.{key}")
                except (TypeError, ValueError) as e:
                    raise UsageError(str(e)) from None
        out[key] = value
    return out


# Overrides that shape the modules or their initialisation: a loaded checkpoint already has them.
BUILT_IN = {
    "vision_config", "text_config", "vision_stem", "text_final_norm",
    "projector_num_layers", "projector_num_heads", "projector_ffn_dim", "projector_coordinates",
}  # fmt: skip
INIT_ONLY = {"text_init", "text_embedding_std"}


def apply_overrides_to_loaded(config, overrides: dict, source: str) -> None:
    """`model.overrides` on a model loaded with `init_from` (a recipe that inherits a from-scratch model's
    overrides, such as a stage continued from its checkpoint): what the checkpoint already has is kept,
    initialisation options do not apply, and a different architecture is a one-line error."""
    for key, value in overrides.items():
        if key in INIT_ONLY:
            continue
        current = getattr(config, key)
        if isinstance(value, dict):  # a sub-config: only the entries it names
            have = current.to_dict()
            differ = sorted(k for k, v in value.items() if have.get(k) != v)
        else:
            differ = [] if current == value else [key]
        if differ and key in BUILT_IN and isinstance(value, dict):
            raise UsageError(
                f"model.overrides {key}: {', '.join(differ)} differ(s) from the checkpoint {source}'s; a loaded "
                "model's architecture cannot change"
            )
        if differ and key in BUILT_IN:
            raise UsageError(
                f"model.overrides {key}: {value!r} differs from the checkpoint {source}'s {current!r}; a loaded "
                f"model's architecture cannot change (give --model.overrides.{key} {str(current).lower()})"
            )
        if differ:
            setattr(config, key, value)


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
