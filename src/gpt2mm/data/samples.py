"""The one sample type every loader yields, and the report of what a loader skipped.

VQA questions, LLaVA conversations, the seed's CSV and Hugging Face datasets all become a `Sample` of
user/assistant turns, so that stage 1 and stage 3 share one prompt format and one labelling rule (the
processor encodes `Q: <image> {question} A: {answer}<|endoftext|>`). Loaders never tokenize, and the user
text of a sample with one image never holds the `<image>` placeholder: the processor places the image itself,
after the first `Q:`. A sample with several images (`Sample.images`) keeps its user turns' placeholders
where they stand, one per image, in order; without any, its images all go after the first `Q:`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from gpt2mm.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
# The placeholder with the newline next to it (LLaVA writes "<image>\n{question}" or "{question}\n<image>"),
# or the space before it in running text.
_PLACEHOLDER_RE = re.compile(r"<image>\n|\n<image>| ?<image>")


@dataclass
class Turn:
    role: Literal["user", "assistant"]
    text: str


@dataclass
class Sample:
    id: str  # unique within its source (question id for VQA, record id for LLaVA)
    image: str | None  # path to the image file, or None for a text-only record
    turns: list[Turn]  # alternating user/assistant, starting with user; VQA: [question, answer]
    answers: list[str] | None = None  # VQA: the human answers (10), for the metric / the RL reward
    question_id: int | None = None
    image_id: int | str | None = None
    answer_type: str | None = None
    question_type: str | None = None
    difficulty: float | None = None  # for curricula, e.g. the number of objects in a synthetic scene
    more_images: list[str] = field(default_factory=list)  # the paths of the images after `image`, in order

    def __post_init__(self) -> None:
        if self.more_images and self.image is None:
            raise ValueError(f"sample {self.id}: more_images without a first image")

    @property
    def images(self) -> list[str]:
        """Every image's path, in the order of their `<image>` runs: `[image, *more_images]`, [] without one."""
        return [] if self.image is None else [self.image, *self.more_images]

    def encoder_turns(self) -> list[tuple[str, str, int]]:
        """(role, text, number of images) per turn, as `MultimodalGPT2Processor.encode_turns` takes them: a
        user turn holds as many images as `<image>` placeholders; with none anywhere (every single-image
        sample), all the images go to the first turn. `ValueError` when the placeholders do not count the
        images."""
        counts = [t.text.count(IMAGE_PLACEHOLDER) if t.role == "user" else 0 for t in self.turns]
        if not any(counts) and self.turns:
            counts[0] = len(self.images)
        elif sum(counts) != len(self.images):
            raise ValueError(
                f"sample {self.id}: its user turns hold {sum(counts)} {IMAGE_PLACEHOLDER} placeholders but "
                f"it has {len(self.images)} images"
            )
        return [(t.role, t.text, n) for t, n in zip(self.turns, counts)]


def strip_image_placeholder(text: str) -> str:
    """User text without `<image>` (and the newline next to it), stripped: the processor places the image."""
    return _PLACEHOLDER_RE.sub("", text).strip()


@dataclass
class LoadReport:
    """What a loader kept and skipped, per reason, so that no record is dropped silently.

    `bad(reason, message)` raises `DataError(message)` unless the loader runs with `skip_bad=True`, in which
    case the record is counted under `reason` and its message kept (the first few) for the log.
    """

    source: str
    skip_bad: bool = False
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)  # kept records that were changed (e.g. renamed ids)
    examples: list[str] = field(default_factory=list)  # the first messages of skipped records

    max_examples = 5

    def bad(self, reason: str, message: str) -> None:
        """Refuse a record: raise, or count it when skipping bad records."""
        if not self.skip_bad:
            raise DataError(message)
        self.skipped[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line for the log, e.g. `x.json: 97 samples; skipped 3 records: 2 missing image, 1 bad schema`."""
        n = self.num_skipped
        text = f"{self.source}: {self.loaded} samples; "
        if n:
            reasons = ", ".join(f"{k} {why}" for why, k in self.skipped.most_common())
            text += f"skipped {n} record{'s' if n != 1 else ''}: {reasons}"
        else:
            text += "nothing skipped"
        if self.notes:
            text += " (" + ", ".join(f"{k} {what}" for what, k in self.notes.most_common()) + ")"
        return text
