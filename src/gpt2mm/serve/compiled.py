"""Greedy answers with every forward compiled: the single-answer fast path (`gpt2mm serve --compile`).

`generate` runs the model eagerly, a Python call per layer per step, so on a GPU one short answer costs the
launch overhead of five forwards: 93 ms for the seed preset on an H100 (bench/RESULTS.md). Here the prompt is
left-padded to a width bucket, the KV cache is static (transformers' `StaticCache`) and `torch.compile`
(mode "reduce-overhead": CUDA graphs on a GPU) turns the prefill and the decoding step into two graphs that
are replayed: 11 ms for the same answer. Each new width compiles its prefill once (under a minute on a GPU).

    answer = CompiledGreedy(model, max_cache_len=1024)
    tokens = answer(input_ids, attention_mask, pixel_values, max_new_tokens=8)   # (1, W) left-padded
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gpt2mm.modeling import position_ids_from_mask


class CompiledGreedy:
    """Greedy decoding of one left-padded prompt at a time, the forward compiled whole (`generate`'s tokens:
    argmax with the `<image>` token suppressed). `max_cache_len` bounds prompt width + new tokens."""

    def __init__(self, model, max_cache_len: int, mode: str | None = None):
        from transformers import StaticCache

        self.model = model
        self.max_cache_len = max_cache_len
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config.text_config, max_cache_len=max_cache_len)
        with torch.no_grad():  # one eager forward allocates the cache: the graphs then see it initialised
            ones = torch.ones(1, max_cache_len, dtype=torch.long, device=self.device)
            model(input_ids=0 * ones[:, :1], attention_mask=ones, cache=self.cache, use_cache=True)
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self.forward = torch.compile(model.forward, mode=mode, dynamic=False)
        self.banned = model.config.image_token_id  # generate's suppress_tokens

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int,
        on_token: Callable[[int], bool] | None = None,
    ) -> list[int]:
        """Up to `max_new_tokens` greedy tokens for a (1, W) left-padded prompt. `on_token(token)` is called
        with each token as it comes and returns True to stop; without it, no step waits for the GPU."""
        width = input_ids.shape[1]
        if input_ids.shape[0] != 1 or width + max_new_tokens > self.max_cache_len:
            raise ValueError(
                f"one prompt at a time, width + max_new_tokens <= {self.max_cache_len}: got "
                f"{tuple(input_ids.shape)} and {max_new_tokens}"
            )
        self.cache.reset()
        # the cache's later positions are masked by causality; a full-length mask keeps every shape fixed
        mask = torch.cat([attention_mask, attention_mask.new_ones(1, self.max_cache_len - width)], dim=1)
        position = position_ids_from_mask(attention_mask)
        kw = dict(attention_mask=mask, cache=self.cache, use_cache=True, logits_to_keep=1)
        out = self.forward(input_ids=input_ids, pixel_values=pixel_values, position_ids=position, **kw)
        tokens = []
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            logits[:, self.banned] = -float("inf")
            token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
            tokens.append(token)
            if on_token is not None and on_token(int(token)):
                break
            if step + 1 < max_new_tokens:
                position = position[:, -1:] + 1
                out = self.forward(input_ids=token, position_ids=position.clone(), **kw)
        return torch.cat(tokens, dim=1)[0].tolist()
