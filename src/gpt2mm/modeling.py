"""MultimodalGPT2ForConditionalGeneration: CLIP ViT -> projector -> added to `<image>` token embeddings -> GPT-2.

Read top to bottom, it follows the architecture figure:

    pixel_values (N, 3, H, W)
      -> vision tower (CLIP ViT, frozen)                 (N, T_img, C_vision)    T_img = 50 for ViT-B/32
      -> projector: Linear -> LayerNorm -> transformer   (N, T_img, C_text)
    input_ids (B, T) with N * T_img `<image>` tokens
      -> token embeddings                                (B, T, C_text)
      -> image features added at the `<image>` positions (or replacing them, fusion="replace")
      -> GPT-2 -> LM head                                (B, T, vocab)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionModel,
    GenerationConfig,
    GenerationMixin,
    GPT2Model,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.pytorch_utils import Conv1D

from gpt2mm.config import IGNORE_INDEX, MultimodalGPT2Config
from gpt2mm.layers import (
    STEMS,
    CNNStem,
    ConvStem,
    GPT2AttentionAnyLayout,
    MultimodalProjector,
    attention_bias,
)


def init_like_linear(gpt2: nn.Module) -> None:
    """Every GPT-2 matrix and bias (`Conv1D`, weight (fan_in, fan_out)) drawn as `nn.Linear` draws its own:
    uniform in +-1/sqrt(fan_in) (`text_init="pytorch"`)."""
    for module in gpt2.modules():
        if isinstance(module, Conv1D):
            bound = module.weight.shape[0] ** -0.5
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.uniform_(module.bias, -bound, bound)


class MultimodalGPT2PreTrainedModel(PreTrainedModel):
    config_class = MultimodalGPT2Config
    config: MultimodalGPT2Config
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2Block", "CLIPEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        # CLIP and GPT-2 initialise their own modules; this covers the projector and the LM head.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MultimodalProjector):
            module.reset_coordinates()  # (its Linear and LayerNorm come here on their own)
        elif isinstance(module, (ConvStem, CNNStem)):
            for layer in module:
                if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d)):
                    layer.reset_parameters()  # PyTorch's init (also after a meta-device build)

    def _build_modules(self, config: MultimodalGPT2Config) -> None:
        """The vision tower, the projector and GPT-2, under the names every checkpoint uses."""
        self.vision_tower = CLIPVisionModel(config.vision_config)
        if config.vision_stem in STEMS:
            vc = config.vision_config
            self.vision_tower.embeddings.patch_embedding = STEMS[config.vision_stem](
                vc.num_channels, vc.hidden_size, vc.patch_size
            )
        self.projector = MultimodalProjector(config)
        self.language_model = GPT2Model(config.text_config)
        # GPT-2 ignores old checkpoints' causal-mask buffers by the patterns "attn.bias" and
        # "crossattention.bias", which as regular expressions match every `c_attn.bias` too: vLLM drops the
        # weights they match when it loads a model through transformers. These match the buffers alone.
        self.language_model._keys_to_ignore_on_load_unexpected = {
            r"(^|\.)attn\.bias$",
            r"(^|\.)crossattention\.bias$",
        }
        if not config.text_final_norm:
            self.language_model.ln_f = nn.Identity()

    def _init_text_model(self) -> None:
        """The `text_init` and `text_embedding_std` options, after GPT-2 has initialised itself (a model built
        from scratch; loading a checkpoint then replaces these values)."""
        if self.config.text_init == "pytorch":
            init_like_linear(self.language_model)
        if self.config.text_embedding_std is not None:
            nn.init.normal_(self.language_model.wte.weight, std=self.config.text_embedding_std)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.wte = value

    @property
    def vision_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vision_tower.parameters())

    def get_vision_hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the vision tower gives the projector: (num_images, num_image_tokens, vision_hidden_size).

        With a frozen tower these can be computed once per image and cached (see `gpt2mm.data.features`).
        """
        tower = self.vision_tower
        layers = tower.encoder.layers
        # hidden state k (of 0..n, or -1..-(n+1) from the end) is the output of the first k encoder layers:
        # the layers after it are not run
        keep = self.config.vision_feature_layer % (len(layers) + 1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.vision_frozen):
            states = tower.pre_layrnorm(tower.embeddings(pixel_values.to(tower.dtype)))
            for layer in layers[:keep]:
                states = layer(states, None)  # (N, 1 + P, C_v); no mask: every patch sees every patch
        if self.config.vision_drop_cls:
            states = states[:, 1:]  # (N, P, C_v)
        return states

    def _projected(
        self, pixel_values: torch.Tensor | None = None, vision_hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The projector's output for the images, (num_images, num_image_tokens, text_hidden_size)."""
        if vision_hidden_states is None:
            if pixel_values is None:
                raise ValueError("get_image_features needs pixel_values or vision_hidden_states")
            vision_hidden_states = self.get_vision_hidden_states(pixel_values)
        return self.projector(vision_hidden_states.to(self.projector.linear.weight.dtype))

    def _embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        vision_hidden_states: torch.Tensor | None,
        cache: Any | None,
    ) -> torch.Tensor:
        """Token embeddings with the image features fused in at the `<image>` positions."""
        embeds = self.get_input_embeddings()(input_ids)  # (B, T, C)
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        have_images = pixel_values is not None or vision_hidden_states is not None
        # The checks below read device values on the host; a compiled forward (static-cache generation)
        # skips them, since they would split its graph.
        checked = not torch.compiler.is_compiling()
        if not have_images:
            # A prompt's <image> tokens need its images; decoding steps (the image already in the KV cache)
            # are not checked.
            if not checked:
                return embeds
            in_prefill = cache is None or cache.get_seq_length() == 0
            if in_prefill and image_mask.any():
                raise ValueError(
                    f"input_ids hold {int(image_mask.sum())} {self.config.image_token} tokens but no "
                    "pixel_values were given"
                )
            return embeds
        n_images = (pixel_values if pixel_values is not None else vision_hidden_states).shape[0]
        per_image = self.config.num_image_tokens
        n_tokens = int(image_mask.sum()) if checked else n_images * per_image
        if n_tokens != n_images * per_image:
            raise ValueError(
                f"input_ids hold {n_tokens} {self.config.image_token} tokens but {n_images} images were given, "
                f"which need {n_images} x {per_image} = {n_images * per_image} {self.config.image_token} tokens"
            )
        per_row = image_mask.sum(dim=1)
        if checked and bool((per_row % per_image).any()):
            raise ValueError(
                f"each image fills {per_image} consecutive {self.config.image_token} tokens, but the samples "
                f"hold {per_row.tolist()} of them"
            )
        features = self._projected(pixel_values, vision_hidden_states)  # (N, T_img, C)
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)  # (N * T_img, C), in order
        if self.config.fusion == "add":  # (the features scattered onto zeros: no data-dependent shapes)
            return embeds + torch.zeros_like(embeds).masked_scatter(image_mask.unsqueeze(-1), features)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features)


class MultimodalGPT2ForConditionalGeneration(MultimodalGPT2PreTrainedModel, GenerationMixin):
    """The seed's multimodal GPT-2 as a `transformers` model: forward, loss, `generate`, save/load."""

    _tied_weights_keys = {"lm_head.weight": "language_model.wte.weight"}

    def __init__(self, config: MultimodalGPT2Config):
        super().__init__(config)
        self._build_modules(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        self._init_text_model()
        tc = config.text_config
        self.generation_config = GenerationConfig(
            bos_token_id=tc.bos_token_id,
            eos_token_id=tc.eos_token_id,
            pad_token_id=tc.pad_token_id if tc.pad_token_id is not None else tc.eos_token_id,
            suppress_tokens=[config.image_token_id],  # the model never writes an `<image>` itself
        )
        self._apply_freezing()

    def _apply_freezing(self) -> None:
        # CLIP's pooled-output norm never reaches our features: it gets no gradient, so it is kept out of
        # training (DDP would otherwise wait for its gradient).
        self.vision_tower.post_layernorm.requires_grad_(False)
        if self.config.freeze_vision:
            self.freeze_vision()

    # --- plumbing that transformers expects ---------------------------------------------------------------

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def freeze_vision(self) -> None:
        """No gradients and eval mode for the vision tower (it stays in eval mode through `.train()`)."""
        self.vision_tower.requires_grad_(False)
        self.vision_tower.eval()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        model._apply_freezing()  # loading materialises fresh parameters: freeze them again
        return loaded

    def train(self, mode: bool = True):
        super().train(mode)
        # a frozen tower stays in eval mode (a CNN stem's batch-norm statistics must not move)
        if self.config.freeze_vision or self.vision_frozen:
            self.vision_tower.eval()
        # compiled blocks (compile_blocks) run in training only: evaluation and generation carry a KV cache
        # that changes at every step, and each layer would be compiled again and again
        for block in self._blocks():
            if hasattr(block, "_compiled_for_training"):
                block._compiled_call_impl = block._compiled_for_training if mode else None
        return self

    def _blocks(self) -> list[nn.Module]:
        return [*self.language_model.h, *self.vision_tower.encoder.layers]

    def compile_blocks(self, **kwargs: Any) -> None:
        """`torch.compile` each transformer block for training, in place (regional compilation): the
        GPT-2 blocks and the CLIP encoder layers. Blocks of a kind share one compiled graph, so compiling
        takes seconds rather than minutes; the glue between them (the image fusion, whose positions depend on
        the data, and the LM head on the labelled positions alone) stays eager. Parameter names, and so
        checkpoints, are unchanged; in eval mode the blocks run eager (see `train`). `kwargs` go to
        `torch.compile`; shapes are dynamic unless they say otherwise, since batch widths vary (a static
        first graph would only be compiled again)."""
        kwargs.setdefault("dynamic", True)
        for block in self._blocks():
            block.compile(**kwargs)
            block._compiled_for_training = block._compiled_call_impl
        self.train(self.training)

    # --- the image path ---------------------------------------------------------------------------------

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, vision_hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected image features, (num_images, num_image_tokens, text_hidden_size): what is added to
        (with fusion="replace": what replaces) the embeddings of the `<image>` tokens. (The base model's
        `MultimodalGPT2Model.get_image_features` gives the embeddings after fusion instead.)"""
        return self._projected(pixel_values, vision_hidden_states)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """GPT-2's final hidden states (B, T, C) for a prompt with its images, without the LM head or a cache:
        what a scalar head (reward, value) or an LM head on chosen positions reads.

        Position ids come from the mask as `generate` gives them (left or right padding alike) unless
        `position_ids` are given; a float `attention_mask` is an additive bias, e.g. (B, 1, T, T) for
        packed prefix trees, which then need their own `position_ids`.
        """
        embeds = self._embed(input_ids, pixel_values, vision_hidden_states, cache=None)  # (B, T, C)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        if attention_mask.is_floating_point():
            attention_mask = attention_mask.to(embeds.dtype)
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state  # (B, T, C)

    # --- forward -----------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: Any | None = None,
        cache: Any | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_hidden_states: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The usual causal-LM forward, with images.

        Args:
            pixel_values: (num_images, 3, H, W), in the order of the images' `<image>` runs in `input_ids`.
            vision_hidden_states: precomputed vision-tower outputs (a frozen-vision feature cache) instead
                of `pixel_values`.
            labels: (B, T); positions labelled -100 are ignored, the rest are predicted from the previous
                position (shifted inside, as in transformers).
            past_key_values / cache: the KV cache (`cache` is the transformers 5 name; both are accepted).
            loss_weights: (B, T), a weight for each label (`answer_weights(labels)`: each answer counts once);
                the loss is then sum(weight * cross-entropy) / sum(weight), instead of the mean over labels.
            num_items_in_batch: the loss's denominator, under gradient accumulation the whole batch's (labels,
                or the weights' sum); by default this micro-batch's.
            return_logits: whether to return logits. By default they are skipped only when training with
                labels: the LM head then runs on the labelled positions alone, never building the full
                (B, T, vocab) tensor.
        """
        if past_key_values is not None and cache is not None:
            raise ValueError("pass the KV cache as `cache` or `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids, pixel_values, vision_hidden_states, cache)
        elif pixel_values is not None or vision_hidden_states is not None:
            raise ValueError("images need input_ids (to find the <image> positions), not inputs_embeds")

        if return_logits is None:
            return_logits = labels is None or not self.training
        if use_cache is None and labels is not None:
            use_cache = False  # a forward for a loss needs no KV cache (GPT-2 would build one by default)
        if (
            labels is not None
            and attention_mask is not None
            and cache is None
            and position_ids is None
            and not (return_logits or output_attentions or output_hidden_states)
            and right_padded(attention_mask, labels)
        ):
            # Right padding under causal attention: no real token sees a later pad, and pads carry no label,
            # so the loss is the same without the mask, and SDPA can run its fused causal (flash) kernel.
            attention_mask = None
        if attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4:
            implementation = self.language_model.config._attn_implementation
            attention_mask = attention_bias(attention_mask, inputs_embeds.dtype, implementation)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = out.last_hidden_state  # (B, T, C)

        logits = loss = None
        if return_logits:
            kept = (
                hidden[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else hidden[:, logits_to_keep]
            )
            logits = self.lm_head(kept)  # (B, T_kept, vocab)
        if labels is not None:
            if logits is not None and logits.shape[1] == hidden.shape[1]:
                loss = causal_lm_loss_from_logits(logits, labels, num_items_in_batch, loss_weights)
            else:
                loss = causal_lm_loss(hidden, labels, self.lm_head, num_items_in_batch, loss_weights)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=out.cache if use_cache is not False else None,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    # --- generation --------------------------------------------------------------------------------------

    def prepare_inputs_for_generation(
        self, *args: Any, is_first_iteration: bool | None = False, **kwargs: Any
    ):
        # Precomputed vision states go in with the prompt only, like pixel_values (which transformers drops
        # after the prefill itself): later steps feed one new token and read the image from the KV cache.
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            inputs.pop("vision_hidden_states", None)
        return inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **kw):
        # Beams and `num_return_sequences` repeat each sample; its images (possibly several) go with it.
        images = {k: kw.pop(k) for k in ("pixel_values", "vision_hidden_states") if kw.get(k) is not None}
        if images and expand_size > 1:
            per_sample = (input_ids == self.config.image_token_id).sum(1) // self.config.num_image_tokens
            owner = torch.repeat_interleave(
                torch.arange(len(per_sample), device=per_sample.device), per_sample
            )
            for key, value in images.items():
                chunks = [value[owner == i] for i in range(len(per_sample))]
                images[key] = torch.cat([c for c in chunks for _ in range(expand_size)])
        input_ids, kw = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **kw
        )
        kw.update(images)
        return input_ids, kw


class MultimodalGPT2Model(MultimodalGPT2PreTrainedModel):
    """The model without its LM head: what `AutoModel` loads, and what vLLM's Transformers backend builds.

    The vision tower, the projector and GPT-2 go by the names of `MultimodalGPT2ForConditionalGeneration`, so
    one checkpoint loads as either. `get_image_features(pixel_values)` gives what the `<image>` positions'
    embeddings become under the config's fusion: the projected features plus the `<image>` token's own
    embedding ("add"), or the features alone ("replace"). Putting them in place of those embeddings, which is
    how vLLM (and `forward`, given `pixel_values`) merges every multimodal model's images, is then exactly the
    full model's fusion. `forward` returns GPT-2's final hidden states; its attention layers accept any
    registered attention function (`GPT2AttentionAnyLayout`). No KV cache: this class is for scoring and for
    serving engines that keep their own.
    """

    _supports_attention_backend = True

    def __init__(self, config: MultimodalGPT2Config):
        super().__init__(config)
        self._build_modules(config)
        for block in self.language_model.h:
            block.attn.__class__ = GPT2AttentionAnyLayout  # same parameters, same names
        self.post_init()
        self._init_text_model()

    def get_image_features(
        self, pixel_values: torch.Tensor, return_dict: bool = False, **kwargs: Any
    ) -> torch.Tensor | BaseModelOutputWithPooling:
        """(num_images, num_image_tokens, C): the `<image>` positions' embeddings after fusion; with
        `return_dict`, as `pooler_output` (the vision tower's states as `last_hidden_state`). Unlike
        `MultimodalGPT2ForConditionalGeneration.get_image_features` (what is added), this includes the
        `<image>` token's embedding under fusion="add": it replaces, it is not added."""
        states = self.get_vision_hidden_states(pixel_values)
        features = self.projector(states.to(self.projector.linear.weight.dtype))
        if self.config.fusion == "add":  # through the layer: a serving engine may have swapped in its own
            token_id = torch.tensor([self.config.image_token_id], device=features.device)
            features = features + self.get_input_embeddings()(token_id).to(features.dtype)
        if return_dict:
            return BaseModelOutputWithPooling(last_hidden_state=states, pooler_output=features)
        return features

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ):
        """GPT-2's final hidden states (B, T, C) for `input_ids` (with `pixel_values`: their images fused at
        the `<image>` positions) or for given `inputs_embeds`; a tuple `(hidden_states,)` with
        `return_dict=False`. Position ids, unless given, come from `attention_mask` as `generate` gives them
        (left padding alike), or are 0, 1, ... without a mask."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if (
            inputs_embeds is None
        ):  # images: the full model's fusion (the same sum as replacing by our features)
            if pixel_values is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            else:
                inputs_embeds = self._embed(input_ids, pixel_values, None, cache=None)
        elif pixel_values is not None:
            raise ValueError("images need input_ids (to find the <image> positions), not inputs_embeds")
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            return_dict=True,
            **kwargs,
        )
        return out if return_dict is not False else (out.last_hidden_state,)


def right_padded(attention_mask: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether each row is its tokens then padding (no token after a pad) and no pad has a label."""
    real = attention_mask.bool()
    no_token_after_pad = (real[:, 1:] <= real[:, :-1]).all()
    no_label_on_pad = (labels.masked_fill(real, IGNORE_INDEX) == IGNORE_INDEX).all()
    return bool(no_token_after_pad & no_label_on_pad)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids `generate` gives a padded batch: 0, 1, 2, ... over each row's real tokens, 0 on
    padding, so a left-padded row reads as an unpadded one. (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


# --- the loss ------------------------------------------------------------------------------------------------


def causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    num_items_in_batch: int | torch.Tensor | None = None,
    loss_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy with the LM head run only on the positions that have a label.

    hidden (B, T, C) at position t predicts labels[:, t + 1]; labels of -100 are ignored. Equal to the
    loss on full logits (a test checks it) without the (B, T, vocab) tensor: the answer tokens are a few
    of the ~70 positions of a VQA sample. `loss_weights` (B, T): each label's weight (see `forward`).
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    logits = lm_head(hidden[:, :-1][keep])  # (M, vocab)
    return _reduce(logits, targets[keep], keep, num_items_in_batch, loss_weights)


def causal_lm_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    loss_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return _reduce(logits[:, :-1][keep], targets[keep], keep, num_items_in_batch, loss_weights)


def _reduce(logits, targets, keep, num_items_in_batch, loss_weights) -> torch.Tensor:
    # The (weighted) mean over labelled tokens; under gradient accumulation the trainer passes the
    # denominator of the whole batch.
    if loss_weights is None:
        total = F.cross_entropy(logits.float(), targets, reduction="sum")
        denom = keep.sum().clamp(min=1)
    else:
        weights = loss_weights[:, 1:][keep].float()
        total = (F.cross_entropy(logits.float(), targets, reduction="none") * weights).sum()
        denom = weights.sum().clamp(min=1e-12)
    if num_items_in_batch is not None:
        denom = num_items_in_batch
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / denom


def answer_weights(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) float: 1 / the length of the answer each label belongs to (an answer: a run of consecutive
    labelled positions), 0 where there is no label. As `loss_weights` every answer counts once, whatever its
    length: a one-word answer as much as a paragraph (the weights of a batch sum to its number of answers)."""
    keep = labels != IGNORE_INDEX
    starts = keep.clone()
    starts[:, 1:] &= ~keep[:, :-1]
    answer = starts.flatten().long().cumsum(0).view_as(keep) - 1  # the answer each position belongs to
    lengths = torch.bincount(answer[keep], minlength=int(starts.sum()))
    weights = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    weights[keep] = 1.0 / lengths[answer[keep]].float()
    return weights
