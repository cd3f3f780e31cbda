"""MultimodalGPT2Config, and the constants that the model, the processor and the data code share.

The model is the seed's: a CLIP ViT vision tower, a projector (Linear -> LayerNorm -> transformer layer(s))
and GPT-2, with the projected image features *added* to the embeddings of `<image>` tokens (one token per
image feature: 50 for ViT-B/32 at 224 px, i.e. 49 patches + CLS).

Presets (`gpt2mm.presets`) are embedded configs, so `MultimodalGPT2Config.from_preset(name)` works offline.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from transformers import CLIPVisionConfig, GPT2Config, PreTrainedConfig

from gpt2mm.presets import get_preset

# The label of a position that has no target: prompt tokens, images and padding (PyTorch's cross-entropy default).
IGNORE_INDEX = -100


class MultimodalGPT2Config(PreTrainedConfig):
    """Configuration of `MultimodalGPT2ForConditionalGeneration`.

    Args:
        vision_config: the CLIP vision tower (`CLIPVisionConfig` or its dict).
        text_config: the language model (`GPT2Config` or its dict); its `vocab_size` includes `<image>`.
        image_token: the placeholder token that image features land on.
        image_token_id: its id (the first id after GPT-2's base vocabulary, 50257, for the seed).
        vision_feature_layer: which hidden state of the vision tower to use (-1: the last one).
        vision_drop_cls: drop the CLS feature, keeping patch features only (49 instead of 50 for ViT-B/32).
        projector_num_layers: transformer layers after Linear -> LayerNorm (the seed: 1).
        projector_num_heads / projector_ffn_dim / projector_dropout / projector_activation /
        projector_norm_first: that layer's settings (the seed: `nn.TransformerEncoderLayer(d, nhead=8)`
            defaults: 8 heads, feed-forward 2048, dropout 0.1, ReLU, post-norm).
        projector_token_mixing: whether image tokens attend to each other in the projector. The seed fed a
            (batch, 50, d) tensor to a sequence-first layer, so for its batch size of 1 each image token
            attended only to itself; `False` reproduces that (used by `convert-seed`).
        projector_coordinates: add x * u + y * v to each image feature after the projector, where (x, y) is the
            centre of the token's patch in [-1, 1] (the CLS feature: 0) and u, v are learned vectors
            (`projector.coord_embedding`), so that GPT-2 reads both coordinates along straight lines from the
            start instead of learning them in position tables (docs/experiments.md, 2026-12-05).
        fusion: "add" (the seed's: token embedding + image feature) or "replace" (LLaVA-style).
        freeze_vision: keep the vision tower frozen (no gradients, eval mode).
        vision_stem: how the tower cuts an image into patch vectors: "patch" (CLIP's: one linear map of each
            patch's pixels) or "conv" (a stack of overlapping 3x3 convolutions, each halving the resolution, down
            to the same grid: local, shift-tolerant features that a small tower trained from scratch learns
            quickly; the patch size must then be a power of 2) or "cnn" (a small convolutional network with batch
            norm and max pooling down to the same grid, which learns to read digits from random weights,
            through GPT-2 with the three `text_*` options below, docs/experiments.md; also a power of 2).
        text_embedding_std: the standard deviation of the token embeddings at initialisation (None: GPT-2's
            `initializer_range`, 0.02). Image features reach GPT-2 layer-normalised (about 1 per element) and
            are added to token embeddings; at 0.02 the question's own tokens are a few percent of what the
            answer position reads.
        text_final_norm: keep GPT-2's final LayerNorm (`ln_f`); False drops it.
        text_init: "gpt2" (every GPT-2 matrix from N(0, initializer_range)) or "pytorch" (`nn.Linear`'s
            init: weights and biases uniform in +-1/sqrt(fan_in)).
        The three `text_*` options are for a GPT-2 built from scratch (a checkpoint's weights replace what
        they initialise): with all three, a vision tower trained from random weights learns to read digits
        through GPT-2 within 800 steps; the combinations of one or two of them that were tried stay near the
        answer prior for 800 steps or more (docs/experiments.md).
    """

    model_type = "gpt2mm"
    sub_configs_defaults: ClassVar[dict] = {"vision_config": CLIPVisionConfig, "text_config": GPT2Config}
    # transformers before 5.20 (what vLLM pins) reads `sub_configs` and builds no sub-config from the defaults
    sub_configs: ClassVar[dict] = sub_configs_defaults

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token: str = "<image>"
    image_token_id: int = 50257
    vision_feature_layer: int = -1
    vision_drop_cls: bool = False
    projector_num_layers: int = 1
    projector_num_heads: int = 8
    projector_ffn_dim: int = 2048
    projector_dropout: float = 0.1
    projector_activation: str = "relu"
    projector_norm_first: bool = False
    projector_token_mixing: bool = True
    projector_coordinates: bool = False
    fusion: Literal["add", "replace"] = "add"
    freeze_vision: bool = True
    vision_stem: Literal["patch", "conv", "cnn"] = "patch"
    text_embedding_std: float | None = None
    text_final_norm: bool = True
    text_init: Literal["gpt2", "pytorch"] = "gpt2"
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # Build the sub-configs here (transformers 5.20+ would, older versions would not); by default GPT-2's
        # vocabulary, grown to hold `<image>`, so that `MultimodalGPT2Config()` is valid (older versions build
        # one to compare with)
        for key, config_class in self.sub_configs.items():
            value = getattr(self, key)
            if value is None:
                value = {"vocab_size": max(50257, self.image_token_id + 1)} if key == "text_config" else {}
            if isinstance(value, dict):
                setattr(self, key, config_class(**value))
        super().__post_init__(**kwargs)
        if self.fusion not in ("add", "replace"):
            raise ValueError(f"fusion must be 'add' or 'replace', got {self.fusion!r}")
        if self.projector_num_layers < 0:
            raise ValueError(f"projector_num_layers must be >= 0, got {self.projector_num_layers}")
        d = self.text_config.hidden_size
        if self.projector_num_layers and d % self.projector_num_heads:
            raise ValueError(
                f"the text hidden size {d} is not divisible by projector_num_heads={self.projector_num_heads}"
            )
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} is outside the text vocabulary "
                f"(vocab_size={self.text_config.vocab_size})"
            )
        if self.vision_stem not in ("patch", "conv", "cnn"):
            raise ValueError(f"vision_stem must be 'patch', 'conv' or 'cnn', got {self.vision_stem!r}")
        if self.text_init not in ("gpt2", "pytorch"):
            raise ValueError(f"text_init must be 'gpt2' or 'pytorch', got {self.text_init!r}")
        if self.text_embedding_std is not None and not self.text_embedding_std > 0:
            raise ValueError(
                f"text_embedding_std must be positive (or None), got {self.text_embedding_std!r}"
            )
        patch = self.vision_config.patch_size
        if self.vision_stem != "patch" and (patch < 2 or patch & (patch - 1)):
            raise ValueError(
                f"vision_stem={self.vision_stem!r} needs a patch size that is a power of 2, got {patch}"
            )
        n_layers = self.vision_config.num_hidden_layers
        if not -(n_layers + 1) <= self.vision_feature_layer <= n_layers:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} is out of range for a vision tower "
                f"with {n_layers} layers"
            )

    @property
    def num_image_tokens(self) -> int:
        """Image features per image: one per patch, plus CLS unless `vision_drop_cls`."""
        per_side = self.vision_config.image_size // self.vision_config.patch_size
        return per_side * per_side + (0 if self.vision_drop_cls else 1)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MultimodalGPT2Config:
        """The config of a named preset (offline: configs are embedded, weights are not)."""
        preset = get_preset(name)
        kwargs = {
            "vision_config": CLIPVisionConfig(**preset.vision),
            "text_config": GPT2Config(**preset.text),
            **preset.model,
        }
        for key in ("vision_config", "text_config"):
            sub = overrides.pop(key, None)
            if isinstance(sub, dict):
                kwargs[key] = type(kwargs[key])(**{**kwargs[key].to_dict(), **sub})
            elif sub is not None:
                kwargs[key] = sub
        kwargs.update(overrides)
        return cls(**kwargs)
