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
    token. Rows without an image, or with an `<image>` token after the first exchange, keep causal attention.

    Returns a (B, 1, T, T) boolean mask (True: may attend; the model's forward takes it, see
    `layers.attention_bias`) and (B, T) position ids, or None where no row has a second exchange (plain
    causal attention is then the same, and keeps SDPA's fused causal kernel).
    """
    batch, width = input_ids.shape
    allowed = torch.ones(width, width, dtype=torch.bool).tril().repeat(batch, 1, 1)  # causal to start with
    positions = torch.arange(width).repeat(batch, 1)
    changed = False
    for b in range(batch):
        n = int(attention_mask[b].sum())
        ids, labs = input_ids[b, :n].tolist(), labels[b, :n].tolist()
        images = [t for t, i in enumerate(ids) if i == image_token_id]
        ends = [t for t, (i, lab) in enumerate(zip(ids, labs, strict=True)) if i == end_token_id and lab == i]
        if not images or not ends or images[-1] > ends[0]:
            continue
        prefix, lead = images[-1] + 1, ids[: images[0]]  # the image prefix; the first turn's tokens before it
        starts = [e + 1 for e in ends if e + 1 < n]
        changed |= bool(starts)
        for s, e in zip(starts, [*ends[1:], n - 1], strict=False):
            # its opening tokens in common with `lead` (`Q:`) are hidden: a single question has them before
            # the image
            hidden = next((j for j in range(len(lead)) if s + j > e or ids[s + j] != lead[j]), len(lead))
            block = slice(s, e + 1)
            allowed[b, block, prefix:s] = False  # earlier exchanges
            allowed[b, block, s : s + hidden] = False
            positions[b, block] = torch.arange(prefix - hidden, prefix - hidden + e + 1 - s)
        allowed[b, :, n:] = False  # padding, seen by nothing but itself
    if not changed:
        return None
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
