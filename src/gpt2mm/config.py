"""MultimodalGPT2Config and the presets.

The model is the seed's: a CLIP ViT vision tower, a projector (Linear -> LayerNorm -> transformer layer(s))
and GPT-2, with the projected image features *added* to the embeddings of `<image>` tokens (one token per
image feature: 50 for ViT-B/32 at 224 px, i.e. 49 patches + CLS).

Presets are embedded configs, so `MultimodalGPT2Config.from_preset(name)` works offline; the `seed` and
`small` presets also name the pretrained backbones that `MultimodalGPT2ForConditionalGeneration.from_backbones`
loads for real training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from transformers import CLIPVisionConfig, GPT2Config, PreTrainedConfig


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
        fusion: "add" (the seed's: token embedding + image feature) or "replace" (LLaVA-style).
        freeze_vision: keep the vision tower frozen (no gradients, eval mode).
    """

    model_type = "gpt2mm"
    sub_configs_defaults: ClassVar[dict] = {"vision_config": CLIPVisionConfig, "text_config": GPT2Config}

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
    fusion: Literal["add", "replace"] = "add"
    freeze_vision: bool = True
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
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


# --- presets -------------------------------------------------------------------------------------------

# CLIP ViT-B/32 (openai/clip-vit-base-patch32), vision tower only.
_CLIP_VIT_B32 = dict(
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=512,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_GPT2_BASE = dict(vocab_size=50258, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
_GPT2_LARGE = dict(vocab_size=50258, n_positions=1024, n_embd=1280, n_layer=36, n_head=20)


@dataclass(frozen=True)
class Preset:
    """A named model size: embedded configs, plus the pretrained backbones for real training."""

    name: str
    description: str
    vision: dict
    text: dict
    model: dict
    vision_backbone: str | None = None  # hub id or directory of a pretrained CLIP
    text_backbone: str | None = None  # hub id or directory of a pretrained GPT-2


PRESETS: dict[str, Preset] = {
    "seed": Preset(
        name="seed",
        description="the seed's model: CLIP ViT-B/32 (frozen) + GPT-2 large, one projector layer (< 1B params)",
        vision=_CLIP_VIT_B32,
        text=_GPT2_LARGE,
        model=dict(image_token_id=50257),
        vision_backbone="openai/clip-vit-base-patch32",
        text_backbone="openai-community/gpt2-large",
    ),
    "small": Preset(
        name="small",
        description="CLIP ViT-B/32 (frozen) + GPT-2 (124M)",
        vision=_CLIP_VIT_B32,
        text=_GPT2_BASE,
        model=dict(image_token_id=50257),
        vision_backbone="openai/clip-vit-base-patch32",
        text_backbone="openai-community/gpt2",
    ),
    # Random init, sized for the synthetic shapes world on 2 CPU cores: 48 px images and 16 px patches make
    # a 3x3 grid of patches, one per cell of the world's grid. The vision tower trains (nothing pretrained).
    # Its tokenizer is trained in-process (gpt2mm.tokenizer.build_tiny_tokenizer); the vocab size matches it.
    "tiny": Preset(
        name="tiny",
        description="random init, 48 px ViT (patch 16) + 4-layer GPT-2 of width 128, own tokenizer; offline",
        vision=dict(
            hidden_size=128,
            intermediate_size=512,
            projection_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_channels=3,
            image_size=48,
            patch_size=16,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
        text=dict(
            vocab_size=1024,
            n_positions=512,
            n_embd=128,
            n_layer=4,
            n_head=4,
            activation_function="gelu_pytorch_tanh",  # GPT-2's tanh GELU in one kernel: 16% faster steps on a CPU
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        ),
        model=dict(
            image_token_id=1,
            projector_num_heads=4,
            projector_ffn_dim=512,
            projector_dropout=0.0,
            freeze_vision=False,
        ),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
