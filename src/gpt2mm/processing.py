"""MultimodalGPT2Processor: tokenizer + CLIP image processor + THE prompt format.

The prompt format is the seed's, `Q: <image> {question} A: {answer}<|endoftext|>`, where each `<image>`
placeholder is expanded to `num_image_tokens` tokens (the transformers convention for LLaVA-style
processors). Training labels are -100 everywhere except the answer tokens and the end-of-text token (the
seed's answer-only loss). Conversations (stage 3) chain the same format turn after turn, so stage 1 and
stage 3 share it:

    Q: <image> {user 1} A: {assistant 1}<|endoftext|>Q: {user 2} A: {assistant 2}<|endoftext|>

Several images (a LLaVA record with a list of images, a request with several image parts) stand where the
user text's `<image>` placeholders do, `Q: Compare <image> and <image> . A:`, or, without placeholders, all
after the first `Q:` (`Q: <image> <image> {user 1} A:`); one image keeps the seed's place after `Q:`.

`MultimodalGPT2Processor.encode_turns` is the one encoder of that format: training (`encode_conversation`,
`encode_example`), serving (`gpt2mm.serve.engine.Engine.encode_turns`), PPO's rollout prompts and the reward
model's inputs all go through it, so their ids agree token for token. `STOP_STRINGS` are what end an answer
besides end-of-text, for `postprocess_answer` and the serving engine alike. The processor's chat template
(`CHAT_TEMPLATE_SOURCE`) writes the same format from chat messages, for `apply_chat_template` where gpt2mm is
not installed (this module is shipped with every checkpoint: `gpt2mm.hub`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from gpt2mm.config import IGNORE_INDEX, MultimodalGPT2Config

USER_PREFIX = "Q:"
ASSISTANT_PREFIX = " A:"
# What ends an answer besides end-of-text: the model starting a new turn, or a blank line.
STOP_STRINGS = (f"\n{USER_PREFIX}", f" {USER_PREFIX} ", "\n\n")

# The prompt format as a Jinja chat template, for `processor.apply_chat_template` (and so for code that knows
# transformers but not gpt2mm). It renders what `encode_turns` encodes, the way the server maps OpenAI
# messages onto turns (gpt2mm.serve.prepare.messages_to_turns): system and developer messages are skipped;
# consecutive messages of one role are merged, their text parts stripped and joined by a space; a user turn
# with one image has it after `Q:`, with several each where its part stands; ` A:` opens each assistant turn
# and, with `add_generation_prompt`, the answer to come; an answer ends with end-of-text. Image parts are
# `{"type": "image"}` (transformers turns OpenAI's `image_url` parts into these). __IMAGE__ is replaced by
# the processor's image token. Tests check that its ids are `encode_turns`'s for every shape the API takes.
CHAT_TEMPLATE_SOURCE = """\
{#- gpt2mm: Q: <image> {question} A: {answer}<|endoftext|>Q: {question} A: ... -#}
{%- set image = '__IMAGE__' -%}
{%- set ns = namespace(turns=[], role=none, pieces=[], message=[]) -%}
{%- for message in messages if message['role'] not in ['system', 'developer'] -%}
    {%- if message['role'] not in ['user', 'assistant'] -%}
        {{- raise_exception('gpt2mm conversations hold user and assistant messages, not ' ~ message['role']) -}}
    {%- endif -%}
    {%- set content = message.get('content') -%}
    {%- if content is none -%}
        {%- set content = [] -%}
    {%- elif content is string -%}
        {%- set content = [{'type': 'text', 'text': content}] -%}
    {%- endif -%}
    {%- set ns.message = [] -%}
    {%- for part in content -%}
        {%- if part['type'] == 'text' -%}
            {%- if image in part['text'] -%}
                {{- raise_exception('text may not hold ' ~ image ~ '; send images as image parts') -}}
            {%- endif -%}
            {%- set ns.message = ns.message + [part['text'] | trim] -%}
        {%- elif part['type'] in ['image', 'image_url'] -%}
            {%- if message['role'] != 'user' -%}
                {{- raise_exception('only user messages can hold images') -}}
            {%- endif -%}
            {%- set ns.message = ns.message + [image] -%}
        {%- else -%}
            {{- raise_exception('gpt2mm reads text and image parts, not ' ~ part['type']) -}}
        {%- endif -%}
    {%- endfor -%}
    {%- if message['role'] == ns.role -%}
        {%- set ns.pieces = ns.pieces + ns.message -%}
    {%- else -%}
        {%- if ns.role is not none -%}
            {%- set ns.turns = ns.turns + [[ns.role, ns.pieces]] -%}
        {%- endif -%}
        {%- set ns.role = message['role'] -%}
        {%- set ns.pieces = ns.message -%}
    {%- endif -%}
{%- endfor -%}
{%- if ns.role is not none -%}
    {%- set ns.turns = ns.turns + [[ns.role, ns.pieces]] -%}
{%- endif -%}
{%- if not ns.turns or ns.turns[0][0] != 'user' -%}
    {{- raise_exception('the conversation must start with a user message') -}}
{%- endif -%}
{%- if add_generation_prompt and ns.turns[-1][0] != 'user' -%}
    {{- raise_exception('the last message must be a user message to answer') -}}
{%- endif -%}
{%- for role, pieces in ns.turns -%}
    {%- set words = pieces | reject('equalto', '') | list -%}
    {%- set text = words | reject('equalto', image) | join(' ') -%}
    {%- set n_images = words | select('equalto', image) | list | length -%}
    {%- if role == 'user' -%}
        {%- if add_generation_prompt and not text -%}
            {{- raise_exception('the question is empty: ask something, e.g. Describe the image in detail.') -}}
        {%- endif -%}
        {%- if n_images > 1 -%}
            {{- 'Q: ' ~ words | join(' ') -}}
        {%- else -%}
            {{- 'Q:' ~ (' ' ~ image) * n_images ~ ' ' ~ text -}}
        {%- endif -%}
        {%- if not loop.last or add_generation_prompt -%}
            {{- ' A:' -}}
        {%- endif -%}
    {%- else -%}
        {{- ' ' ~ text ~ eos_token -}}
    {%- endif -%}
{%- endfor -%}
"""


def default_chat_template(image_token: str = "<image>") -> str:
    """The chat template for a processor whose image placeholder is `image_token`."""
    return CHAT_TEMPLATE_SOURCE.replace("__IMAGE__", image_token.replace("\\", "\\\\").replace("'", "\\'"))


class MultimodalGPT2Processor(ProcessorMixin):
    """Turns text with `<image>` placeholders and images into `input_ids`, `attention_mask`, `pixel_values`.

    `processor(text="Q: <image> What color is the dog? A:", images=image)` expands the placeholder to
    `num_image_tokens` `<image>` tokens. For training examples with answer-only labels use
    `encode_example` (one question and answer) or `encode_conversation` (several turns).
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int = 50,
        image_token: str = "<image>",
        chat_template: str | None = None,
        **kwargs: Any,
    ):
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        if chat_template is None:  # a processor saved before it had one gets it too
            chat_template = default_chat_template(image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        vocab = tokenizer.get_vocab()
        if image_token not in vocab:
            raise ValueError(f"the tokenizer has no {image_token!r} token; add it with add_image_token()")
        self.image_token_id = vocab[image_token]
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    # --- the transformers-style call --------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        padding: bool | str = True,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize `text` (each `<image>` placeholder expanded) and preprocess `images` (in placeholder order).

        Raises ValueError when the number of placeholders differs from the number of images. Images are PIL
        images, arrays, or paths and URLs (what `apply_chat_template` collects from image parts).
        """
        for other in ("videos", "audio"):  # apply_chat_template passes every modality
            if kwargs.pop(other, None) is not None:
                raise ValueError(f"gpt2mm reads text and images, not {other}")
        # what serving engines ask for (vLLM): where each placeholder was expanded, which tokens are images
        want_offsets = kwargs.pop("return_text_replacement_offsets", False)
        want_token_types = kwargs.pop("return_mm_token_type_ids", False)
        flat_images = _flatten_images(images)
        data: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            n_placeholders = sum(t.count(self.image_token) for t in texts)
            if images is not None and n_placeholders != len(flat_images):
                raise ValueError(
                    f"the text holds {n_placeholders} {self.image_token} placeholders but {len(flat_images)} "
                    "images were given"
                )
            expanded = [self.expand_image_tokens(t) for t in texts]
            data.update(
                self.tokenizer(
                    expanded,
                    padding=padding,
                    padding_side=padding_side,
                    return_tensors=return_tensors,
                    **kwargs,
                )
            )
            if want_offsets:
                runs = [self.replace_image_token(None, i) for i in range(n_placeholders)]
                data["text_replacement_offsets"] = self.get_text_with_replacements(list(texts), runs)[1]
            if want_token_types:
                ids = data["input_ids"]
                rows = ids.tolist() if hasattr(ids, "tolist") else ids
                is_image = [[int(t == self.image_token_id) for t in row] for row in rows]
                data["mm_token_type_ids"] = torch.tensor(is_image) if return_tensors == "pt" else is_image
        if images is not None:
            data["pixel_values"] = self.preprocess_images(flat_images)
        return BatchFeature(data=data, tensor_type=None)

    def expand_image_tokens(self, text: str) -> str:
        return text.replace(self.image_token, self.image_token * self.num_image_tokens)

    def replace_image_token(self, image_inputs: Any = None, image_idx: int = 0, **kwargs: Any) -> str:
        """What one `<image>` placeholder becomes in the text: `num_image_tokens` of them (any image size).
        transformers' `get_text_with_replacements` and vLLM read it."""
        return self.image_token * self.num_image_tokens

    def _get_num_multimodal_tokens(self, image_sizes: Sequence[Any] | None = None, **kwargs: Any):
        """The tokens and patches each image takes, for serving engines (vLLM) that plan memory by them."""
        from transformers.processing_utils import MultiModalData

        n = len(image_sizes or [])
        return MultiModalData(num_image_tokens=[self.num_image_tokens] * n, num_image_patches=[1] * n)

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images (any size, converted to RGB), arrays, paths or URLs -> (N, 3, H, W) float pixel values."""
        from transformers.image_utils import load_image

        images = [load_image(im) if isinstance(im, str) else im for im in images]
        images = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    # --- the seed's prompt format and its labels --------------------------------------------------------

    def format_prompt(self, question: str, with_image: bool = True, num_images: int | None = None) -> str:
        """`Q: <image> {question} A:`: what the model sees before it answers; `num_images` placeholders
        (default: one if `with_image`), each expanded later by `expand_image_tokens`.

        A question that holds `<image>` placeholders itself keeps them where they stand, one space on each
        side (`Q: Compare <image> and <image> . A:`); `num_images`, if given, must be their count. Placed at
        the start, they give the same string as `num_images` placeholders before a question without them.
        """
        placed = question.count(self.image_token)
        if placed:
            if num_images is not None and num_images != placed:
                raise ValueError(
                    f"the question holds {placed} {self.image_token} placeholders but {num_images} images "
                    "were given"
                )
            return f"{USER_PREFIX} {self.space_image_placeholders(question)}{ASSISTANT_PREFIX}"
        n = int(with_image) if num_images is None else num_images
        return f"{USER_PREFIX}{f' {self.image_token}' * n} {question.strip()}{ASSISTANT_PREFIX}"

    def space_image_placeholders(self, text: str) -> str:
        """Text with each `<image>` placeholder between single spaces, the whitespace around it dropped
        (`"Image 1: <image>\\nImage 2:<image>"` -> `"Image 1: <image> Image 2: <image>"`), stripped."""
        pieces = [p.strip() for p in text.split(self.image_token)]
        words = [pieces[0]]
        for piece in pieces[1:]:
            words += [self.image_token, piece]
        return " ".join(w for w in words if w)

    def encode_turns(
        self,
        turns: Sequence[tuple[str, str, int]],
        generation_prompt: bool = False,
        memo: dict[str, list[int]] | None = None,
    ) -> dict[str, list[int]]:
        """THE encoding: (role, text, number of images) turns, user first, alternating -> `input_ids` and
        `labels` (-100 except on the assistant turns' tokens and their end-of-text).

        A user turn with k images gets k `<image>` runs after `Q:`, in the order of the images, unless its
        text holds k `<image>` placeholders: then each run stands where its placeholder does (`format_prompt`);
        a count that differs from k is a `ValueError`. Each part is tokenized on its own, so the label
        boundaries are exact and a prompt's tokens are the same whether it is encoded alone (to be answered)
        or with its answer (to be trained on).
        `generation_prompt`: the conversation is a prompt to answer, so it must end with a user turn and
        every question needs text (a `ValueError` otherwise: `Q: <image> A:` asks nothing).
        `memo`: a dict that keeps each part's tokens from call to call, for encoding a whole data set, whose
        questions, answers and prompts repeat: each distinct part is tokenized once (the same ids).
        """
        ids: list[int] = []
        labels: list[int] = []
        for i, (role, text, n_images) in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"turn {i} has role {role!r}; turns alternate user/assistant, user first")
            if role == "user":
                if generation_prompt and not text.replace(self.image_token, "").strip():
                    raise ValueError(f"turn {i}: the question is empty")
                try:
                    prompt = self.format_prompt(text, num_images=n_images)
                except ValueError as e:
                    raise ValueError(f"turn {i}: {e}") from None
                part = self._tokens(self.expand_image_tokens(prompt), memo)
                ids += part
                labels += [IGNORE_INDEX] * len(part)
            else:
                if n_images or self.image_token in text:
                    raise ValueError(f"turn {i}: assistant turns cannot hold images")
                part = self._tokens(" " + text.strip(), memo) + [self.tokenizer.eos_token_id]
                ids += part
                labels += part
        if generation_prompt and (not turns or turns[-1][0] != "user"):
            raise ValueError("the conversation must end with a user turn")
        return {"input_ids": ids, "labels": labels}

    def encode_example(self, question: str, answer: str, with_image: bool = True) -> dict[str, list[int]]:
        """One VQA sample: `input_ids` and `labels` (-100 except on the answer tokens and end-of-text)."""
        return self.encode_conversation([("user", question), ("assistant", answer)], with_image=with_image)

    def encode_conversation(
        self, turns: Sequence[tuple[str, str]], with_image: bool = True
    ) -> dict[str, list[int]]:
        """Alternating (role, text) turns, user first -> `input_ids` and `labels` on the assistant turns only
        (`encode_turns`, with the image, if any, in the first user turn)."""
        n_images = [int(with_image and i == 0) for i in range(len(turns))]
        return self.encode_turns([(role, text, n) for (role, text), n in zip(turns, n_images)])

    def _tokens(self, text: str, memo: dict[str, list[int]] | None = None) -> list[int]:
        """`text`'s token ids (no special tokens), from `memo` where it holds them (callers do not change
        the list they get)."""
        if memo is None:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if text not in memo:
            memo[text] = self._tokens(text)
        return memo[text]

    def postprocess_answer(self, text: str) -> str:
        """A generated continuation -> the answer: up to end-of-text or the next `Q:`, trimmed."""
        for stop in (self.tokenizer.eos_token, *STOP_STRINGS):
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        return text.strip()


def _flatten_images(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        out: list[Any] = []
        for item in images:
            out.extend(_flatten_images(item) if isinstance(item, (list, tuple)) else [item])
        return out
    return [images]


def default_image_processor(config: MultimodalGPT2Config):
    """A CLIP image processor sized for the vision tower (CLIP's normalisation statistics)."""
    from transformers import CLIPImageProcessor

    size = config.vision_config.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
