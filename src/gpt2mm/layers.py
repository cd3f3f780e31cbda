"""The building blocks the model adds to CLIP and GPT-2: the projector from vision to text width, the two
convolutional stems that can replace CLIP's patch embedding (`vision_stem`: `conv` or `cnn`), and attention: the
masks the model hands GPT-2 (`attention_bias`), an attention function for a CPU in bf16 (`attn_implementation:
gpt2mm_eager`) and GPT-2's attention layer for functions that return another layout (`GPT2AttentionAnyLayout`,
vLLM's)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, eager_attention_forward

from gpt2mm.config import MultimodalGPT2Config

EAGER = "gpt2mm_eager"  # the name `attn_implementation` takes for `eager_attention`


class MultimodalProjector(nn.Module):
    """Vision width -> text width: Linear -> LayerNorm -> `projector_num_layers` transformer layers (the seed's)."""

    def __init__(self, config: MultimodalGPT2Config):
        super().__init__()
        d = config.text_config.hidden_size
        self.linear = nn.Linear(config.vision_config.hidden_size, d)
        self.norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=d,
                nhead=config.projector_num_heads,
                dim_feedforward=config.projector_ffn_dim,
                dropout=config.projector_dropout,
                activation=config.projector_activation,
                norm_first=config.projector_norm_first,
                batch_first=True,
            )
            for _ in range(config.projector_num_layers)
        )
        self.token_mixing = config.projector_token_mixing
        self.coord_embedding = None  # (2, C_text): the directions of x and y (`projector_coordinates`)
        if config.projector_coordinates:
            self.coord_embedding = nn.Parameter(torch.empty(2, d))
            self.reset_coordinates()

    def reset_coordinates(self) -> None:
        """u and v from N(0, COORD_STD): about half the size of the layer-normalised features they are added to."""
        if self.coord_embedding is not None:
            nn.init.normal_(self.coord_embedding, std=COORD_STD)

    def forward(self, vision_states: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.linear(vision_states))  # (N, T_img, C_text)
        mask = None
        if not self.token_mixing:  # each image token attends only to itself (the seed at batch 1)
            t = x.shape[1]
            mask = ~torch.eye(t, dtype=torch.bool, device=x.device)  # True = may not attend
        # PyTorch's default attention kernel, on a CPU too: the unfused one is faster there (the layer 13.9 against
        # 21.4 ms on the demo's batch in bf16) and computes the same function, but no run that trained with it
        # beside the channels-last stem learned the grid world's size questions (docs/experiments.md, 2026-12-06,
        # thirty-seventh session).
        for layer in self.layers:
            x = layer(x, src_mask=mask)
        if self.coord_embedding is not None:
            coords = image_token_coordinates(x.shape[1], dtype=x.dtype, device=x.device)
            x = x + coords @ self.coord_embedding.to(x.dtype)
        return x


COORD_STD = 0.5


def image_token_coordinates(num_tokens: int, dtype=None, device=None) -> torch.Tensor:
    """(num_tokens, 2): each image token's (x, y), the centre of its patch on a square grid in raster order (x
    varies fastest), from -1 (left, top) to 1 (right, bottom); a leading CLS token (num_tokens = side^2 + 1)
    gets (0, 0)."""
    side = math.isqrt(num_tokens)
    cls = num_tokens - side * side
    if cls not in (0, 1) or side < 2:
        raise ValueError(f"{num_tokens} image tokens are not a square grid of patches (with or without CLS)")
    steps = torch.linspace(-1, 1, side, dtype=dtype, device=device)
    ys, xs = torch.meshgrid(steps, steps, indexing="ij")
    grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    return torch.cat([grid.new_zeros(cls, 2), grid])


class ConvStem(nn.Sequential):
    """A convolutional patch embedding: log2(patch) 3x3 convolutions of stride 2 (GELU between them), widths
    doubling up to the tower's, so an image of side S becomes the same (S / patch)^2 grid of vectors as CLIP's
    patch embedding, each seeing an overlapping window instead of its own patch alone (a ViT's "early
    convolutions", Xiao et al. 2021). Drop-in for `CLIPVisionEmbeddings.patch_embedding`."""

    def __init__(self, in_channels: int, width: int, patch_size: int):
        n = patch_size.bit_length() - 1  # patch_size = 2 ** n
        widths = [in_channels] + [max(8, width >> (n - 1 - i)) for i in range(n)]
        layers: list[nn.Module] = []
        for i in range(n):
            layers.append(nn.Conv2d(widths[i], widths[i + 1], kernel_size=3, stride=2, padding=1))
            if i < n - 1:
                layers.append(nn.GELU())
        super().__init__(*layers)

    @property
    def weight(self) -> torch.Tensor:
        """The first convolution's weight: CLIP reads the stem's dtype from `patch_embedding.weight`."""
        return self[0].weight


class CNNStem(nn.Sequential):
    """A small convolutional network in place of the patch embedding: per halving of the resolution, a 3x3
    convolution, batch norm, GELU and 2x2 max pooling (one more convolution before the last pooling), widths
    doubling up to the tower's, then a 1x1 convolution to the tower's width. An image of side S becomes the same
    (S / patch)^2 grid of vectors as CLIP's patch embedding, each seeing a window of about 2.5 patches.

    Unlike `ConvStem` and a trained patch embedding, it learns to read handwritten digits from random weights
    within 1,000 steps of question answering when plain pre-norm blocks follow it (`bench/vision_probe.py`);
    batch norm is what makes the difference (with group norm, layer norm or no norm it learns to count but not
    to read). Through GPT-2 it learns when GPT-2 is built from scratch with `text_init="pytorch"`,
    `text_final_norm=False` and `text_embedding_std=0.3` (configs/tiny-vqa.yaml; docs/experiments.md).
    Its batch-norm statistics are buffers, frozen with the tower (`.train()` keeps a frozen tower in eval mode)."""

    def __init__(self, in_channels: int, width: int, patch_size: int):
        n = patch_size.bit_length() - 1  # patch_size = 2 ** n
        widths = [in_channels] + [max(16, width >> (n - 1 - i)) for i in range(n)]
        layers: list[nn.Module] = []
        for i in range(n):
            convs = [(widths[i], widths[i + 1])] + ([(widths[i + 1], widths[i + 1])] if i == n - 1 else [])
            for c_in, c_out in convs:
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.GELU()]
            layers.append(nn.MaxPool2d(2))
        layers.append(nn.Conv2d(widths[-1], width, 1))
        super().__init__(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if cpu_layout(pixel_values):
            # On a CPU, max pooling is an order of magnitude faster on channels-last tensors and the convolutions
            # faster too (the stem's forward and backward 38 against 56 ms on the demo's batch in bf16;
            # bench/cpu_step.py times the whole step); the same function, the layout of the values only.
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return super().forward(pixel_values)

    @property
    def weight(self) -> torch.Tensor:
        """The first convolution's weight: CLIP reads the stem's dtype from `patch_embedding.weight`."""
        return self[0].weight


STEMS = {"conv": ConvStem, "cnn": CNNStem}


def cpu_layout(x: torch.Tensor) -> bool:
    """Whether the CPU's faster layout applies (a tensor on a CPU): the CNN stem in channels-last memory. GPUs keep
    the default (not measured there)."""
    return x.device.type == "cpu"


def attention_bias(mask: torch.Tensor, dtype: torch.dtype, implementation: str) -> torch.Tensor:
    """A (B, 1, T, T) boolean mask (True: may attend) as the attention function takes it: eager attention
    (transformers' and `eager_attention`) adds its mask to the scores, so for it 0 where True and the
    dtype's lowest value elsewhere; SDPA takes the booleans as they are."""
    if implementation not in ("eager", EAGER):
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention (scaled scores, mask, softmax, weighted sum of the values) in the dtype of
    `query`, `key` and `value`, under autocast too: the `attn_implementation` that `auto` picks where a CPU trains
    in bf16 (`gpt2mm.train.fast`). `set_attn_implementation` gives it to every attention of the model: GPT-2's and,
    where the tower runs, CLIP's.

    Under bf16 autocast transformers' eager attention scales the bf16 scores, adds an fp32 mask (the sum comes out
    in fp32), takes the softmax in fp32 and casts the weights back to bf16: four passes over the (B, H, T, T) scores,
    two of them conversions. Here the scale goes into the matrix product, the mask is added in the scores' dtype,
    and the softmax reads and writes bf16 (PyTorch's CPU kernel accumulates in fp32 either way), so the weights
    differ from transformers' by rounding only (tests/test_model.py). In fp32 the same values as transformers' up
    to rounding.

    `attention_mask` is additive (0, or a large negative value where a query may not attend; transformers'
    `eager_mask` and `attention_bias` make it in fp32) or boolean (True: may attend); masked scores get the
    dtype's lowest value, so a row that may attend to nothing (a query on left padding) gets uniform weights, as
    in transformers' eager attention. In fp16, whose range is too small for that (its lowest value plus -20 is
    -inf, and such a row's weights NaN), the scores are brought to fp32 for the mask and the softmax, as in
    transformers'.
    Returns ((B, T, H, D) output, (B, H, T, S) weights), as transformers' attention functions do."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    device = query.device.type  # (autocast refuses some device types, e.g. "meta")
    off = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
    with off:
        batch, heads, t, d = query.shape
        s = key.shape[-2]
        scores = torch.baddbmm(  # (B*H, T, S): alpha scales inside the product, before it is rounded
            query.new_zeros(()),
            query.reshape(batch * heads, t, d),
            key.reshape(batch * heads, s, d).transpose(1, 2),
            beta=0.0,
            alpha=scaling,
        ).view(batch, heads, t, s)
        if attention_mask is not None:
            if scores.dtype == torch.float16:
                scores = scores.float()
            lowest = torch.finfo(scores.dtype).min
            if attention_mask.dtype == torch.bool:
                zero = scores.new_zeros(())
                attention_mask = torch.where(attention_mask, zero, zero + lowest)
            elif attention_mask.dtype != scores.dtype:
                attention_mask = attention_mask.clamp(min=lowest).to(scores.dtype)
            # an additive mask: on a CPU several times faster than masked_fill
            scores = scores + attention_mask
        weights = torch.softmax(scores, dim=-1).to(value.dtype)
        if dropout > 0:
            weights = nn.functional.dropout(weights, p=dropout, training=module.training)
        return torch.matmul(weights, value).transpose(1, 2), weights


AttentionInterface.register(EAGER, eager_attention)
# the masks transformers builds (padding, a KV cache) as it builds them for its eager attention
AttentionMaskInterface.register(EAGER, eager_mask)


class GPT2AttentionAnyLayout(GPT2Attention):
    """GPT-2's attention, also for attention functions registered from outside transformers that return
    (tokens, heads * head_dim) where transformers' return (batch, tokens, heads, head_dim): vLLM's. GPT-2 merges
    the last two dimensions of the output, which would fold vLLM's tokens in too; this layer shapes the output
    by the input's (batch, tokens) instead. Self-attention without a KV cache takes this path (vLLM keeps
    its own cache); a cache, cross-attention or eager attention with `reorder_and_upcast_attn` take GPT-2's."""

    def forward(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None, **kwargs):
        upcast = self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn
        if (
            cache is not None
            or encoder_hidden_states is not None
            or upcast
            or kwargs.get("past_key_values") is not None
        ):
            return super().forward(
                hidden_states,
                cache=cache,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                **kwargs,
            )
        kwargs.pop("output_attentions", None)
        kwargs.pop("use_cache", None)
        kwargs.pop("past_key_values", None)
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query, key, value = (t.view(shape).transpose(1, 2) for t in (query, key, value))
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attn_dropout.p if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()  # (B, T, C), whatever layout came back
        return self.resid_dropout(self.c_proj(out)), weights
