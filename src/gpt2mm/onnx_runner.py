"""Answer questions about images with a gpt2mm model exported to ONNX: onnxruntime, numpy, tokenizers and
Pillow, without PyTorch, transformers or gpt2mm.

`gpt2mm export onnx MODEL OUT` copies this file into OUT as `run_onnx.py`, beside the two graphs it runs:

    python OUT/run_onnx.py OUT --image photo.png "What color is the car?"

    from run_onnx import OnnxVLM
    vlm = OnnxVLM("OUT")
    vlm.ask("What color is the car?", [Image.open("photo.png")])   # -> "red"

What each step reproduces, so that the answers are `gpt2mm ask`'s (greedy):
- the prompt: the processor's single-question format (`Q: <image> question A:`, each `<image>` expanded to
  `num_image_tokens` tokens, or the images standing where the question's placeholders do), tokenized by the
  checkpoint's own `tokenizer.json`;
- the pixels: the CLIP image processor's PIL path (RGB, shortest edge resized with its resampling, centre
  crop, rescale, normalise);
- the fusion: `vision.onnx` gives the projected image features, scattered in order onto the `<image>`
  positions; `decoder.onnx` adds them to (or puts them in place of) the token embeddings;
- decoding: greedy, one token at a time with the key/value cache, ending at end-of-text, at a stop string
  (a new `Q:` turn, a blank line) or at the context's end; the answer is cut there and stripped.

Batch size 1 (the graphs take any batch size and a left-padded attention mask, for whoever batches).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

CONFIG_FILE = "gpt2mm_onnx.json"


class OnnxVLM:
    """A gpt2mm model exported by `gpt2mm export onnx`: `ask(question, images)` -> the greedy answer."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{path} holds no {CONFIG_FILE}: export a model with `gpt2mm export onnx`"
            )
        self.config = json.loads((path / CONFIG_FILE).read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.vision = ort.InferenceSession(str(path / "vision.onnx"), options, providers=providers)
        self.decoder = ort.InferenceSession(str(path / "decoder.onnx"), options, providers=providers)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.cache_names = [
            i.name for i in self.decoder.get_inputs() if i.name.startswith("past_key_values.")
        ]

    # --- inputs --------------------------------------------------------------------------------------------

    def prompt(self, question: str, num_images: int) -> str:
        """The prompt text, placeholders not yet expanded (`MultimodalGPT2Processor.format_prompt`)."""
        c = self.config
        image, user, assistant = c["image_token"], c["user_prefix"], c["assistant_prefix"]
        placed = question.count(image)
        if placed:
            if placed != num_images:
                raise ValueError(
                    f"the question holds {placed} {image} placeholders but {num_images} images were given"
                )
            pieces = [p.strip() for p in question.split(image)]
            words = [pieces[0]]
            for piece in pieces[1:]:
                words += [image, piece]
            return f"{user} {' '.join(w for w in words if w)}{assistant}"
        return f"{user}{f' {image}' * num_images} {question.strip()}{assistant}"

    def encode(self, question: str, num_images: int) -> list[int]:
        """The prompt's token ids, each `<image>` expanded to `num_image_tokens` tokens."""
        if not question.replace(self.config["image_token"], "").strip():
            raise ValueError("the question is empty")
        text = self.prompt(question, num_images)
        text = text.replace(
            self.config["image_token"], self.config["image_token"] * self.config["num_image_tokens"]
        )
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def pixel_values(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Images -> (N, 3, H, W) float32, as the checkpoint's CLIP image processor prepares them."""
        p = self.config["image_processor"]
        out = []
        for image in images:
            image = image.convert("RGB")  # as the processor does, whatever the image processor says
            if p["do_resize"]:
                width, height = image.size
                short, long = (width, height) if width <= height else (height, width)
                new_short, new_long = p["shortest_edge"], int(p["shortest_edge"] * long / short)
                size = (new_short, new_long) if width <= height else (new_long, new_short)  # (w, h)
                image = image.resize(size, resample=Image.Resampling(p["resample"]))
            array = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # (3, H, W)
            if p["do_center_crop"]:
                array = _center_crop(array, p["crop_height"], p["crop_width"])
            array = array.astype(np.float32)
            if p["do_rescale"]:
                array = (array.astype(np.float64) * p["rescale_factor"]).astype(np.float32)
            if p["do_normalize"]:
                mean = np.asarray(p["image_mean"], dtype=np.float32)[:, None, None]
                std = np.asarray(p["image_std"], dtype=np.float32)[:, None, None]
                array = (array - mean) / std
            out.append(array.astype(np.float32))
        return np.stack(out)

    # --- the model -----------------------------------------------------------------------------------------

    def image_embeds(self, ids: list[int], images: Sequence[Image.Image]) -> np.ndarray:
        """(1, T, C): the images' projected features at the `<image>` positions, in order; zeros elsewhere."""
        c = self.config
        embeds = np.zeros((1, len(ids), c["hidden_size"]), dtype=np.float32)
        positions = np.flatnonzero(np.asarray(ids) == c["image_token_id"])
        if len(positions) != len(images) * c["num_image_tokens"]:
            raise ValueError(
                f"the prompt holds {len(positions)} {c['image_token']} tokens but {len(images)} images were given"
            )
        if images:
            (features,) = self.vision.run(None, {"pixel_values": self.pixel_values(images)})
            embeds[0, positions] = features.reshape(-1, features.shape[-1])
        return embeds

    def generate(
        self, ids: list[int], images: Sequence[Image.Image] = (), max_new_tokens: int = 64
    ) -> tuple[list[int], str, str]:
        """Greedy decoding -> (new token ids, answer, finish reason "stop" or "length")."""
        c = self.config
        limit = max(0, min(max_new_tokens, c["context_length"] - len(ids)))
        feeds: dict[str, np.ndarray] = {
            name: np.zeros((1, c["num_heads"], 0, c["head_dim"]), dtype=np.float32)
            for name in self.cache_names
        }
        step_ids, step_embeds = ids, self.image_embeds(ids, images)
        new: list[int] = []
        finish = "length"
        while len(new) < limit:
            past = len(ids) + len(new) - len(step_ids)
            feeds.update(
                input_ids=np.asarray([step_ids], dtype=np.int64),
                image_embeds=step_embeds,
                attention_mask=np.ones((1, past + len(step_ids)), dtype=np.int64),
                position_ids=np.arange(past, past + len(step_ids), dtype=np.int64)[None],
            )
            logits, *present = self.decoder.run(None, feeds)
            feeds.update(zip(self.cache_names, present))
            token = int(np.argmax(logits[0, -1]))
            new.append(token)
            if token == c["eos_token_id"] or any(s in self.decode(new) for s in c["stop_strings"]):
                finish = "stop"
                break
            step_ids, step_embeds = [token], np.zeros((1, 1, c["hidden_size"]), dtype=np.float32)
        return new, self.answer(self.decode(new)), finish

    def ask(self, question: str, images: Sequence[Image.Image] = (), max_new_tokens: int = 64) -> str:
        """One question about `images` (standing where the question's `<image>` placeholders do, or all
        before the question) -> the greedy answer."""
        images = list(images)
        return self.generate(self.encode(question, len(images)), images, max_new_tokens)[1]

    # --- outputs -------------------------------------------------------------------------------------------

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def answer(self, text: str) -> str:
        """A continuation -> the answer: up to end-of-text or a stop string, stripped
        (`MultimodalGPT2Processor.postprocess_answer`)."""
        for stop in (self.config["eos_token"], *self.config["stop_strings"]):
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        return text.strip()


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """(3, H, W) -> (3, height, width) around the centre, zero-padded where the image is smaller: transformers'
    `center_crop`, offsets included."""
    _, h, w = array.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top < 0 or left < 0:
        new_h, new_w = max(h, height), max(w, width)
        top_pad, left_pad = -((h - new_h) // 2), -((w - new_w) // 2)  # ceil((new - old) / 2)
        padded = np.zeros((array.shape[0], new_h, new_w), dtype=array.dtype)
        padded[:, top_pad : top_pad + h, left_pad : left_pad + w] = array
        array, top, left = padded, top + top_pad, left + left_pad
    return array[:, top : top + height, left : left + width]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Answer a question about images with an exported gpt2mm model."
    )
    parser.add_argument("model", help="the directory `gpt2mm export onnx` wrote")
    parser.add_argument("question")
    parser.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    args = parser.parse_args(argv)
    try:
        vlm = OnnxVLM(args.model, args.threads)
        images = [Image.open(p) for p in args.image]
        print(vlm.ask(args.question, images, args.max_new_tokens))
    except (OSError, ValueError) as e:
        parser.exit(2, f"run_onnx: error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
