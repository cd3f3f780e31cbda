"""Tokenizers: GPT-2's (with `<image>` added) and the `tiny` preset's own, trained in-process.

The tiny tokenizer is a byte-level BPE like GPT-2's (so any text encodes), trained offline on an embedded
corpus of the words that visual questions, answers and scene descriptions use. Nothing touches the hub, and
the same code gives the same vocabulary on every machine.
"""

from __future__ import annotations

import itertools
import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Tokenizer

EOS_TOKEN = "<|endoftext|>"
IMAGE_TOKEN = "<image>"

# Words of visual question answering and of the synthetic shapes world. Each becomes (about) one token.
_WORDS = """
Q A Q: A: what which who where when why how many much is are was were there a an the this that these those
it its of in on at to from by with and or not no yes none zero one two three four five six seven eight nine
ten 0 1 2 3 4 5 6 7 8 9 10 color colour colors shape shapes size object objects thing things image picture
photo scene describe detail details left right top bottom middle center centre above below under over next
beside between near far front behind side corner row column red green blue yellow purple orange cyan white
black gray grey brown pink magenta circle circles square squares triangle triangles cross crosses diamond
diamonds star stars ring rings small large big little tiny huge person people man woman dog cat car table
do does has have can you see any all both each other same different than more fewer less most only also
I image shows contains there's total count number kind type position located
""".split()


def _corpus() -> list[str]:
    """Deterministic training text: the words alone, in pairs, and in question-like templates."""
    lines = [" ".join(_WORDS)]
    lines += (
        [f" {w}" for w in _WORDS] + [f" {w.capitalize()}" for w in _WORDS] + [w.capitalize() for w in _WORDS]
    )
    lines += [f"Q: {a} {b} A: {b}" for a, b in itertools.product(_WORDS[:40], _WORDS[40:120])]
    return lines * 3


def build_tiny_tokenizer(vocab_size: int = 1024, with_image_token: bool = True) -> GPT2Tokenizer:
    """A byte-level BPE with `<|endoftext|>` = 0 and `<image>` = 1, as the `tiny` preset expects.

    `with_image_token=False` gives a plain GPT-2-style tokenizer (as a pretrained GPT-2 ships), which
    `from_backbones` extends with `<image>`; the tests use it as a stand-in for GPT-2's.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, IMAGE_TOKEN] if with_image_token else [EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]  # the trained vocab and merges, as GPT-2 stores them
    vocab = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    if with_image_token:
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        tok.pad_token = EOS_TOKEN
        assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == 1 and tok.eos_token_id == 0, (
            "tiny tokenizer ids moved"
        )
    return tok


def add_image_token(tokenizer, image_token: str = IMAGE_TOKEN) -> int:
    """Add `<image>` as a special token (if missing) and give GPT-2 a pad token; returns the image token id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(image_token)


__all__ = ["EOS_TOKEN", "IMAGE_TOKEN", "add_image_token", "build_tiny_tokenizer"]
