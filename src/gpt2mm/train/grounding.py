"""Grounded phrases: an auxiliary loss that puts each named object's position onto its words.

A question such as "Is the red circle to the left of the blue square?" is answered by finding two objects and
comparing their positions. Trained on the answer alone, GPT-2 forms that comparison by chance along each axis
(the tiny recipe's relation questions: one axis often stays at chance after 3,000 steps). With
`data.grounding: objects`, each phrase that names one object of the synthetic world's scene (`object_phrases`)
gets a target: the object's centre, as fractions of the image's width and height mapped to [-1, 1]. A linear
head reads it from GPT-2's hidden state at the phrase's last token after block `train.grounding_layer`, and
`train.grounding_weight` times its mean squared error (summed over x and y) is added to the loss. The head
belongs to the run, not to the model: checkpoints keep it in their trainer state, and the saved model has no
trace of it. 3,000 steps on the two seeds whose x axis stayed at chance: free world 94.42 -> 97.77%, grid world
99.46% (docs/experiments.md).

Object centres (`train.centres_weight` > 0, with `data.grounding`): a second linear head reads, at each patch's
image token after the same block, how many of the scene's objects have their centre in that patch. Its squared
error, summed over the image's patches and averaged over the batch's images, times the weight joins the loss.
"How many objects are there?" then has a count per patch to sum; trained without it, that count was mostly wrong
by being too high, on scenes whose objects overlap (docs/experiments.md, 2026-12-08).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gpt2mm.errors import UsageError

GROUNDINGS = ("objects",)


def load_scene_objects(root: Path, split: str) -> dict[str, dict[str, Any]]:
    """The synthetic world's scene records of a split (`load_scenes`) by image file name."""
    from gpt2mm.data.synthetic import load_scenes

    path = root / "scenes" / f"{split}_scenes.json"
    if not path.is_file():
        raise UsageError(f"data.grounding: objects needs the synthetic world's {path}")
    return {scene["file_name"]: scene for scene in load_scenes(root, split)}


def phrase_targets(
    examples: Sequence, samples: Sequence, processor: Any, scenes: dict[str, dict]
) -> tuple[int, int]:
    """Set each example's `grounding`: (token index of a phrase's last token, x, y) for every object phrase of
    its user turns that names one object of its image's scene, x and y its centre in [-1, 1]. The indices are
    those of `encode_turns`' sequence (each user turn's prompt tokenized on its own): a phrase's last token is
    the last of its prompt's prefix up to the phrase's end. Returns (phrases placed, object phrases seen)."""
    from gpt2mm.data.synthetic import find_object, object_centre, object_phrases

    placed = seen = 0
    memo: dict[str, list[int]] = {}
    for e in examples:
        sample = samples[e.index]
        e.grounding = []
        scene = scenes.get(Path(sample.image).name) if sample.image is not None else None
        # one image's scene: in a sample of several images a phrase could name an object of any of them
        if scene is None or sample.more_images:
            continue
        offset = 0
        for role, text, n_images in sample.encoder_turns():
            if role == "assistant":
                offset += len(processor._tokens(" " + text.strip(), memo)) + 1  # + its end-of-text
                continue
            prompt = processor.expand_image_tokens(processor.format_prompt(text, num_images=n_images))
            part = processor._tokens(prompt, memo)
            question = text.replace(processor.image_token, "").strip()
            start = prompt.rfind(question)
            for end, phrase in object_phrases(question) if start >= 0 else []:
                seen += 1
                obj = find_object(scene, phrase)
                if obj is None:
                    continue
                prefix = processor._tokens(prompt[: start + end], memo)
                index = offset + len(prefix) - 1
                if part[: len(prefix)] != prefix or index >= len(e.input_ids):  # a word cut, or truncated
                    continue
                x, y = object_centre(obj)
                e.grounding.append((index, 2 * x / scene["width"] - 1, 2 * y / scene["height"] - 1))
                placed += 1
            offset += len(part)
    return placed, seen


def collate_grounding(examples: Sequence) -> dict[str, torch.Tensor]:
    """The batch's phrase targets, padded to its longest list: `grounding_index` (B, K) token indices,
    `grounding_target` (B, K, 2) and `grounding_mask` (B, K), 1 where a target is."""
    k = max(1, max(len(e.grounding or ()) for e in examples))
    index = torch.zeros(len(examples), k, dtype=torch.long)
    target = torch.zeros(len(examples), k, 2)
    mask = torch.zeros(len(examples), k)
    for i, e in enumerate(examples):
        for j, (t, x, y) in enumerate(e.grounding or ()):
            index[i, j], target[i, j, 0], target[i, j, 1], mask[i, j] = t, x, y, 1.0
    return {"grounding_index": index, "grounding_target": target, "grounding_mask": mask}


GROUNDING_KEYS = ("grounding_index", "grounding_target", "grounding_mask")


def states_at(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The (B, K, D) rows of `hidden` (B, T, D) at the token indices `index` (B, K), in fp32 for a head."""
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])).float()


def grounding_loss(
    hidden: torch.Tensor, head: torch.nn.Module, batch: dict[str, torch.Tensor], phrases: torch.Tensor | float
) -> torch.Tensor:
    """The squared error (x and y summed) of `head` at each phrase's last token of `hidden` (B, T, D), summed
    over the batch's phrases and divided by `phrases` (the whole batch's count, over micro-batches and processes,
    as the answers' loss is: any split gives the same gradient); 0 (with a graph) when the batch has none."""
    index, target, mask = (batch[k] for k in GROUNDING_KEYS)
    error = ((head(states_at(hidden, index)) - target) ** 2).sum(-1)
    return (error * mask).sum() / phrases


CENTRE_KEYS = ("centres_start", "centres_target", "centres_mask")


def centre_targets(
    examples: Sequence, samples: Sequence, processor: Any, scenes: dict[str, dict], cls: bool
) -> int:
    """Set each example's `centres`: (index of its first patch token, how many objects of its image's scene have
    their centre in each patch's cell, in the raster order of the square grid of patches; `cls`: the image's
    tokens start with the vision tower's class token). Returns the number of examples that have them."""
    from gpt2mm.data.synthetic import object_centre

    n = processor.num_image_tokens - int(cls)
    side = round(n**0.5)
    if side * side != n:
        return 0
    count = 0
    for e in examples:
        sample = samples[e.index]
        e.centres = None
        scene = scenes.get(Path(sample.image).name) if sample.image is not None else None
        if scene is None or sample.more_images or processor.image_token_id not in e.input_ids:
            continue
        start = e.input_ids.index(processor.image_token_id) + int(cls)
        if start + n > len(e.input_ids):
            continue
        cells = [0.0] * n
        for obj in scene["objects"]:
            x, y = object_centre(obj)
            col = min(side - 1, int(x * side / scene["width"]))
            row = min(side - 1, int(y * side / scene["height"]))
            cells[row * side + col] += 1.0
        e.centres = (start, cells)
        count += 1
    return count


def collate_centres(examples: Sequence) -> dict[str, torch.Tensor]:
    """`centres_start` (B,), `centres_target` (B, N) and `centres_mask` (B,), 1 where an example has them."""
    n = next(len(e.centres[1]) for e in examples if e.centres is not None)
    start = torch.zeros(len(examples), dtype=torch.long)
    target = torch.zeros(len(examples), n)
    mask = torch.zeros(len(examples))
    for i, e in enumerate(examples):
        if e.centres is not None:
            start[i], mask[i] = e.centres[0], 1.0
            target[i] = torch.tensor(e.centres[1])
    return {"centres_start": start, "centres_target": target, "centres_mask": mask}


def centres_loss(
    hidden: torch.Tensor, head: torch.nn.Module, batch: dict[str, torch.Tensor], images: torch.Tensor | float
) -> torch.Tensor:
    """The squared error of `head`'s count of centres at each patch token, summed over an image's patches and the
    batch's images and divided by `images` (the whole batch's count, as `grounding_loss`)."""
    start, target, mask = (batch[k] for k in CENTRE_KEYS)
    index = start.unsqueeze(1) + torch.arange(target.shape[1], device=start.device)
    error = ((head(states_at(hidden, index)).squeeze(-1) - target) ** 2).sum(-1)
    return (error * mask).sum() / images
