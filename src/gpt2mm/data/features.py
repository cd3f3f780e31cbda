"""How an image reaches the model: an image source turns an image path into what the collator stacks, under
the model input named by its `key`. `PixelStore` gives preprocessed pixels (`pixel_values`); `FeatureCache`
gives the frozen vision tower's outputs (`vision_hidden_states`), computed once and memory-mapped from disk;
`VisionStates` gives the same outputs computed once and held in memory (no files).

The frozen-vision feature cache: vision-tower outputs computed once per image, memory-mapped from disk.

With the vision tower frozen, its output for an image never changes, and VQA asks about 5 questions per
image: decoding JPEGs and running CLIP every step is wasted work that starves a fast GPU. The cache lives in
`ROOT/<key>/`, where the key hashes the vision weights, the vision config, the feature layer / CLS choice and
the image preprocessing, so a change of any of them gives a new, empty cache instead of stale features.
Within a cache, an image is identified by its path, size and modification time.

    cache = FeatureCache(root, model, processor)
    cache.build(image_paths)               # computes what is missing, atomically
    states = cache[path]                   # (num_image_tokens, vision_hidden_size), float16 memory map
    model(input_ids=..., vision_hidden_states=torch.stack([...]))
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2mm.errors import DataError, UsageError
from gpt2mm.outputs import atomic_file, write_text, writing


class PixelStore:
    """Image path -> preprocessed pixel values, decoded once (optionally kept in memory)."""

    key = "pixel_values"

    def __init__(self, processor, cache: bool = True, max_pixels: int | None = None):
        self.processor = processor
        self.cache: dict[str, torch.Tensor] | None = {} if cache else None
        self.max_pixels = max_pixels

    def __call__(self, path: str) -> torch.Tensor:
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        from gpt2mm.data.images import load_image

        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        pixels = self.processor.preprocess_images([load_image(path, **kwargs)])[0]
        if self.cache is not None:
            self.cache[path] = pixels
        return pixels


class VisionStates:
    """Image path -> vision-tower output, computed once per image (the tower is frozen) and kept in memory: the
    reward trainer's source, for tag sets whose images fit in memory and need no cache on disk. `build` first."""

    key = "vision_hidden_states"

    def __init__(self, model: Any, processor: Any, device: torch.device):
        self.model, self.processor, self.device = model, processor, device
        self.states: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def build(self, paths: Sequence[str], batch_size: int = 256, progress: bool = False) -> None:
        """Compute the states of the images not yet held, `batch_size` at a time (an unreadable image is a
        `UsageError` that names it)."""
        from gpt2mm.data.images import load_image

        todo = sorted(set(paths) - set(self.states))
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="vision states", file=sys.stderr, mininterval=2.0)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            try:
                pixels = self.processor.preprocess_images([load_image(p) for p in chunk])
            except DataError as e:
                raise UsageError(str(e)) from None
            states = self.model.get_vision_hidden_states(pixels.to(self.device))  # (n, T_img, C_vision)
            for p, s in zip(chunk, states):
                self.states[p] = s
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()

    def __call__(self, path: str) -> torch.Tensor:
        return self.states[path]


def cache_key(model: Any, processor: Any) -> str:
    """A hash of everything that determines the vision features of an image."""
    h = hashlib.sha256()
    cfg = model.config
    h.update(json.dumps(cfg.vision_config.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"layer={cfg.vision_feature_layer};drop_cls={cfg.vision_drop_cls}".encode())
    h.update(json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.vision_tower.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def image_identity(path: str | Path) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


class FeatureCache:
    """Image path -> the frozen vision tower's output, from a memory-mapped cache on disk (see the module)."""

    key = "vision_hidden_states"

    def __init__(self, root: str | Path, model: Any, processor: Any):
        if not model.vision_frozen:
            raise ValueError("the feature cache needs a frozen vision tower (freeze_vision=True)")
        self.model = model
        self.processor = processor
        self.dir = Path(root) / cache_key(model, processor)
        self.index: dict[str, int] = {}
        self.array: np.ndarray | None = None
        self.skipped: Counter = Counter()
        self._load()

    def _load(self) -> None:
        index_file = self.dir / "index.json"
        if index_file.is_file():
            self.index = json.loads(index_file.read_text())
            self.array = np.load(self.dir / "features.npy", mmap_mode="r")

    def __contains__(self, path: str | Path) -> bool:
        return image_identity(path) in self.index

    def __getitem__(self, path: str | Path) -> torch.Tensor:
        try:
            row = self.index[image_identity(path)]
        except (KeyError, FileNotFoundError):
            raise KeyError(f"{path} is not in the feature cache {self.dir}; run build() first") from None
        return torch.from_numpy(np.asarray(self.array[row], dtype=np.float32))

    def __call__(self, path: str | Path) -> torch.Tensor:
        """The collator's image source: path -> cached vision states."""
        return self[path]

    @torch.no_grad()
    def build(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 64,
        skip_bad: bool = False,
        progress: bool = False,
    ) -> int:
        """Compute the features of the images not yet cached; returns how many were added.

        The new cache (old rows + new rows) is written under temporary names and renamed into place, so an
        interrupted build leaves the previous cache intact.
        """
        from gpt2mm.data.images import load_image

        todo = list(dict.fromkeys(str(p) for p in paths if image_identity(p) not in self.index))
        if not todo:
            return 0
        device = next(self.model.vision_tower.parameters()).device
        new_rows: list[np.ndarray] = []
        new_ids: list[str] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="vision features")
        for start in range(0, len(todo), batch_size):
            chunk, images = [], []
            for p in todo[start : start + batch_size]:
                try:
                    images.append(load_image(p))
                    chunk.append(p)
                except DataError:
                    if not skip_bad:
                        raise
                    self.skipped["unreadable image"] += 1
            if images:
                pixels = self.processor.preprocess_images(images).to(device)
                states = self.model.get_vision_hidden_states(pixels).float().cpu().numpy().astype(np.float16)
                new_rows.append(states)
                new_ids += [image_identity(p) for p in chunk]
            if bar is not None:
                bar.update(len(todo[start : start + batch_size]))
        if bar is not None:
            bar.close()
        if not new_rows:
            return 0
        added = np.concatenate(new_rows)
        old = np.asarray(self.array) if self.array is not None else added[:0]
        merged = np.concatenate([old, added])
        index = dict(self.index)
        for i, ident in enumerate(new_ids):
            index[ident] = len(old) + i
        # the array first: it keeps the old rows where they were, so the old index still fits it when the
        # index's write fails; each file is whole or not written (a full disk: a one-line WriteError)
        with writing(self.dir, "the feature cache"):
            self.dir.mkdir(parents=True, exist_ok=True)
        with (
            atomic_file(self.dir / "features.npy", "the feature cache's features") as tmp,
            open(tmp, "wb") as f,
        ):
            np.save(f, merged)
        write_text(self.dir / "index.json", json.dumps(index), "the feature cache's index")
        self.array = None
        self._load()
        return len(new_ids)
