"""From samples to batches: encoding with the shared prompt format, dynamic padding, length grouping.

Every sample type (VQA, LLaVA conversations, CSV, Hugging Face) is a `Sample` of user/assistant turns, so
stage 1 and stage 3 share one prompt format and one labelling rule: labels on the assistant turns (the
answer, for VQA) and their end-of-text tokens, -100 elsewhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gpt2mm.data.samples import Sample
from gpt2mm.config import IGNORE_INDEX


@dataclass
class Encoded:
    """One training example: token ids, labels, and the images it needs (in the order of their `<image>` runs)."""

    input_ids: list[int]
    labels: list[int]
    images: list[str]
    index: int  # position of the sample in its source list
    difficulty: float | None = None
    grounding: list[tuple[int, float, float]] | None = None  # (token index, x, y): `gpt2mm.train.grounding`
    centres: tuple[int, list[float]] | None = None  # (first patch token, centres per patch): the same module


@dataclass
class EncodeReport:
    """What encoding kept, truncated and skipped (a skipped sample is counted, never silently dropped)."""

    kept: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        text = f"{self.kept} samples kept, {self.truncated} truncated, {skipped} skipped"
        if skipped:
            text += " (" + ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()) + ")"
        return text


def encode_samples(
    samples: Sequence[Sample], processor: Any, max_length: int
) -> tuple[list[Encoded], EncodeReport]:
    """Tokenize samples; over-long ones are truncated at the end, unless that would cut image tokens or the
    whole answer, in which case the sample is skipped and counted."""
    out: list[Encoded] = []
    report = EncodeReport()
    memo: dict[str, list[int]] = {}  # each distinct question, answer and prompt is tokenized once
    for i, s in enumerate(samples):
        enc = processor.encode_turns(s.encoder_turns(), memo=memo)
        ids, labels = enc["input_ids"], enc["labels"]
        if len(ids) > max_length:
            image_end = max((j + 1 for j, t in enumerate(ids) if t == processor.image_token_id), default=0)
            first_label = next((j for j, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
            if image_end > max_length:
                report.skipped["longer than max_length before the end of the image tokens"] += 1
                continue
            if first_label >= max_length:  # labels[j] is predicted from position j - 1 < max_length
                report.skipped["answer entirely beyond max_length"] += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            report.truncated += 1
        out.append(Encoded(ids, labels, s.images, i, s.difficulty))
        report.kept += 1
    return out, report


def independent_turns(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    end_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention and positions under which each exchange of a sample is learned as if it were asked alone.

    A pack of questions about one image (`data.pack_questions`) is one sequence, `Q: <image> q1 A: a1<end>Q: q2
    A: a2<end>...`. Under plain causal attention the answer to q2 also reads q1 and a1, and q2 stands further
    from the image than any question asked alone. Here a token of a later exchange attends only to the image
    prefix (the sequence up to its last `<image>` token) and its own exchange, whose opening tokens in common
    with what the first exchange has before the image (`Q:`) are hidden, and its positions go on from the
    image as the first question's do. So every answer gets the logits it would get as a sample of its own:
    packing saves encoding the image again, and changes nothing else. An exchange ends at a labelled end
    token. Rows without an image or a labelled end token, or with an `<image>` token after the first exchange,
    keep causal attention. Rows are right-padded (`attention_mask`), as the collator pads them for training.

    Returns a (B, 1, T, T) boolean mask (True: may attend; the model's forward takes it, see
    `layers.attention_bias`) and (B, T) position ids, or None where no row it applies to has a second exchange
    (plain causal attention is then the same, and keeps SDPA's fused causal kernel).

    Computed for the whole batch at once (tests/test_processing.py holds the row-by-row reference it equals).
    """
    batch, width = input_ids.shape
    if width == 0:
        return None
    t = torch.arange(width)
    real = attention_mask.bool()
    is_end = real & (input_ids == end_token_id) & (labels == input_ids)  # labelled end tokens
    is_image = real & (input_ids == image_token_id)
    # (B, 1): where the first image starts (`lead` is the tokens before it) and where the image prefix ends
    first_image = torch.where(is_image, t, width).amin(1, keepdim=True)
    prefix = torch.where(is_image, t, -1).amax(1, keepdim=True) + 1
    first_end = torch.where(is_end, t, width).amin(1, keepdim=True)
    applies = is_image.any(1, keepdim=True) & is_end.any(1, keepdim=True) & (prefix <= first_end)
    exchange = torch.cumsum(is_end, 1) - is_end.long()  # a token's exchange: the labelled ends before it
    later = applies & real & (exchange > 0)  # the tokens of every exchange after the first
    if not bool(later.any()):
        return None
    # each token's exchange starts after the last labelled end before it
    last_end = torch.cummax(torch.where(is_end, t, -1), 1).values
    start = torch.cat([torch.zeros(batch, 1, dtype=torch.long), last_end[:, :-1] + 1], 1)
    offset = t - start  # the token's place in its exchange
    # hidden: the exchange's opening tokens as long as they repeat `lead` (`Q:`), which a single question has
    # before the image
    leading = input_ids.gather(1, offset)  # lead[offset] (0 <= offset <= t)
    differs = ~(later & (offset < first_image) & (input_ids == leading))
    before = torch.cumsum(differs, 1) - differs.long()  # differences before each token
    hidden = ~differs & (before == before.gather(1, start))  # and none from its exchange's start up to it
    hidden_count = torch.zeros(batch, width + 1, dtype=torch.long).scatter_add_(1, exchange, hidden.long())
    positions = torch.where(later, prefix - hidden_count.gather(1, exchange) + offset, t)
    # a later exchange's token sees the image prefix and its own exchange's tokens that are not hidden
    own = (exchange.unsqueeze(2) == exchange.unsqueeze(1)) & ~hidden.unsqueeze(1)
    sees = (t < prefix).unsqueeze(1) | own  # (B, T, T)
    allowed = torch.ones(width, width, dtype=torch.bool).tril() & (sees | ~later.unsqueeze(2))
    allowed &= ~(applies & ~real).unsqueeze(1)  # padding, seen by nothing but itself
    allowed |= torch.eye(width, dtype=torch.bool)
    return allowed.unsqueeze(1), positions.masked_fill(attention_mask == 0, 0)


class Collator:
    """Pads a list of examples to the batch's longest (right padding for training), stacks the images (each
    example's in order, the examples in order: the order of the `<image>` runs in the batch). With
    `independent_turns` (the `<image>` and end-of-text token ids), each exchange of an example is attended
    to as if asked alone (the function `independent_turns`): where an example has several, the batch holds a
    (B, 1, T, T) mask and position ids."""

    def __init__(
        self,
        pad_token_id: int,
        pixel_source: Callable[[str], torch.Tensor] | None = None,
        image_key: str = "pixel_values",
        independent_turns: tuple[int, int] | None = None,
    ):
        self.pad_token_id = pad_token_id
        self.pixel_source = pixel_source  # image path -> (3, H, W) pixel values, or cached vision states
        self.image_key = image_key  # "vision_hidden_states" when pixel_source is a FeatureCache
        self.independent_turns = independent_turns

    def __call__(self, examples: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.independent_turns is not None:
            turns = independent_turns(ids, labels, mask, *self.independent_turns)
            if turns is not None:
                batch["attention_mask"], batch["position_ids"] = turns
        images = [path for e in examples for path in e.images]
        if images:
            if self.pixel_source is None:
                raise ValueError("examples have images but the collator has no pixel_source")
            batch[self.image_key] = torch.stack([self.pixel_source(p) for p in images])
        if any(e.grounding is not None for e in examples):
            from gpt2mm.train.grounding import collate_grounding

            batch.update(collate_grounding(examples))
        if any(e.centres is not None for e in examples):
            from gpt2mm.train.grounding import collate_centres

            batch.update(collate_centres(examples))
        return batch


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator, mega_batch_factor: int = 50
) -> list[list[int]]:
    """Shuffled batches of similar lengths (less padding): shuffle, cut into mega-batches of
    `mega_batch_factor` batches, sort each by length, split into batches, shuffle the batches."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = batch_size * mega_batch_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[j : j + batch_size] for j in range(0, n, batch_size)]
