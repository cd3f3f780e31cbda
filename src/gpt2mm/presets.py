"""The presets: named model sizes as embedded configs (offline), plus the pretrained backbones of real training.

`MultimodalGPT2Config.from_preset(name)` builds a preset's config; `gpt2mm.loading.build_model(name)` its
model and processor (`from_backbones` loads the named backbones for the `seed` and `small` presets).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    # The recipes (configs/tiny-vqa.yaml, the demo's) build it with overrides that learn on any layout: a CNN
    # stem on an 8 px grid, a GPT-2 built to let the tower learn through it, and each patch's coordinates
    # added to its image feature (docs/experiments.md).
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
