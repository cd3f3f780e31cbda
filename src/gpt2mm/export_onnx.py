"""Export a checkpoint to ONNX (`gpt2mm export onnx MODEL OUT`) and check it against PyTorch.

OUT holds what the model needs to answer without PyTorch:
- `vision.onnx`: pixel values (N, 3, H, W) -> projected image features (N, num_image_tokens, C): the vision
  tower and the projector (`get_image_features`);
- `decoder.onnx`: `input_ids`, `image_embeds` (the features at the `<image>` positions, zeros elsewhere),
  `attention_mask` (past + new, left padding allowed), `position_ids` and the key/value cache of each layer
  (`past_key_values.{i}.key|value`, (B, heads, past, head_dim)) -> `logits` and `present.{i}.key|value`:
  the fusion (add, or replace) and GPT-2 with its cache, one graph for the prompt and for each new token;
- `tokenizer.json`, `gpt2mm_onnx.json` (the prompt format, image preprocessing, cache shapes, stop strings);
- `run_onnx.py`: `gpt2mm.onnx_runner`, copied (the same file, not a second copy kept by hand), which
  reproduces the processor and greedy decoding with onnxruntime, numpy, tokenizers and Pillow;
- `index.html`: the same in a web page, with onnxruntime-web (`gpt2mm/onnx_web/index.html`).

The graphs come from `torch.onnx.export(..., dynamo=False)`: it traces these modules in a second or two and
onnxruntime's results agree with PyTorch's to ~1e-5. The export is checked before it takes its name: on
questions about synthetic test images (`check_questions`), `run_onnx.py`'s greedy answers must be those of
`gpt2mm ask`'s engine, token for token; a difference is an error and OUT stays as it was.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2mm.errors import UsageError
from gpt2mm.outputs import atomic_dir
from gpt2mm.processing import ASSISTANT_PREFIX, STOP_STRINGS, USER_PREFIX

OPSET = 17
RUNNER_NAME = "run_onnx.py"


class _Vision(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)


class _Decoder(nn.Module):
    """One decoder step over tensors: the fusion, GPT-2 with a cache built from the flat past, the LM head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, image_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        model = self.model
        embeds = model.get_input_embeddings()(input_ids)
        if model.config.fusion == "add":
            embeds = embeds + image_embeds
        else:
            is_image = (input_ids == model.config.image_token_id).unsqueeze(-1)
            embeds = torch.where(is_image, image_embeds, embeds)
        cache = DynamicCache(config=model.config.text_config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = model.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (model.lm_head(out.last_hidden_state), *present)


def cache_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def runner_config(model: nn.Module, processor: Any) -> dict[str, Any]:
    """`gpt2mm_onnx.json`: what `run_onnx.py` needs besides the graphs and the tokenizer."""
    text = model.config.text_config
    ip = processor.image_processor
    if not type(ip).__name__.endswith("Pil"):
        raise UsageError(
            f"the checkpoint's image processor runs as {type(ip).__name__} (torchvision is installed); the ONNX "
            "runner reproduces the PIL path only: export where torchvision is not installed"
        )
    size, crop = dict(ip.size), dict(ip.crop_size)
    if "shortest_edge" not in size:
        raise UsageError(f"the image processor resizes to {size}; the ONNX runner knows shortest_edge only")
    tokenizer = processor.tokenizer
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        raise UsageError("the tokenizer cleans up tokenization spaces; the ONNX runner does not")
    return {
        "format": 1,
        "image_token": processor.image_token,
        "image_token_id": int(model.config.image_token_id),
        "num_image_tokens": int(model.config.num_image_tokens),
        "fusion": model.config.fusion,
        "hidden_size": int(text.n_embd),
        "num_layers": int(text.n_layer),
        "num_heads": int(text.n_head),
        "head_dim": int(text.n_embd // text.n_head),
        "context_length": int(text.n_positions),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": int(tokenizer.eos_token_id),
        "user_prefix": USER_PREFIX,
        "assistant_prefix": ASSISTANT_PREFIX,
        "stop_strings": list(STOP_STRINGS),
        "image_processor": {
            "do_convert_rgb": bool(ip.do_convert_rgb if ip.do_convert_rgb is not None else True),
            "do_resize": bool(ip.do_resize),
            "shortest_edge": int(size["shortest_edge"]),
            "resample": int(ip.resample),
            "do_center_crop": bool(ip.do_center_crop),
            "crop_height": int(crop["height"]),
            "crop_width": int(crop["width"]),
            "do_rescale": bool(ip.do_rescale),
            "rescale_factor": float(ip.rescale_factor),
            "do_normalize": bool(ip.do_normalize),
            "image_mean": [float(x) for x in ip.image_mean],
            "image_std": [float(x) for x in ip.image_std],
        },
    }


def export_graphs(model: nn.Module, out: Path, opset: int = OPSET) -> None:
    """Write `vision.onnx` and `decoder.onnx` (float32) for `model` into `out`."""
    model = model.float().eval()
    text = model.config.text_config
    vision = model.config.vision_config
    n_layers, heads, width = text.n_layer, text.n_head, text.n_embd
    pixels = torch.zeros(2, vision.num_channels, vision.image_size, vision.image_size)
    # traced with a left-padded row and a non-empty cache, so the graph keeps the general mask and cache paths
    batch, past_len, new_len = 2, 3, 4
    token = 0 if model.config.image_token_id != 0 else 1  # any id in the vocabulary but `<image>`
    ids = torch.full((batch, new_len), token)
    mask = torch.ones(batch, past_len + new_len, dtype=torch.long)
    mask[0, :2] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]
    past = [torch.zeros(batch, heads, past_len, width // heads) for _ in range(2 * n_layers)]
    inputs, outputs = cache_names(n_layers, "past_key_values"), cache_names(n_layers, "present")
    dynamic = {
        "input_ids": {0: "batch", 1: "new"},
        "image_embeds": {0: "batch", 1: "new"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "new"},
        "logits": {0: "batch", 1: "new"},
        **{name: {0: "batch", 2: "past"} for name in inputs},
        **{name: {0: "batch", 2: "total"} for name in outputs},
    }
    with _tracing():
        torch.onnx.export(
            _Vision(model).eval(),  # export restores the mode the wrapper had: eval
            (pixels,),
            str(out / "vision.onnx"),
            input_names=["pixel_values"],
            output_names=["image_features"],
            dynamic_axes={"pixel_values": {0: "images"}, "image_features": {0: "images"}},
            opset_version=opset,
            dynamo=False,
        )
        torch.onnx.export(
            _Decoder(model).eval(),
            (ids, torch.zeros(batch, new_len, width), mask, position_ids, *past),
            str(out / "decoder.onnx"),
            input_names=["input_ids", "image_embeds", "attention_mask", "position_ids", *inputs],
            output_names=["logits", *outputs],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    """No gradients, the tracer's notes on Python branches silenced (the example shapes cover them), and the
    projector's encoder layer on its plain path: its fused inference kernel has no ONNX operator."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def check_questions(
    n: int, image_size: int = 48, seed: int = 0, layout: str = "grid"
) -> list[tuple[str, Any]]:
    """`n` (question, PIL image) pairs about synthetic test scenes, two questions per scene; every other
    scene is drawn at 1.5 times `image_size`, so that resizing is checked too."""
    from gpt2mm.data.synthetic.questions import make_questions
    from gpt2mm.data.synthetic.world import make_scene, render

    rng = random.Random(seed)
    pairs: list[tuple[str, Any]] = []
    for k in itertools.count():
        if len(pairs) >= n:
            break
        size = image_size if k % 2 == 0 else image_size * 3 // 2
        scene = make_scene(rng, k, "test", image_size=size, layout=layout)
        image = render(scene)
        pairs += [(q["question"], image) for q in make_questions(scene, rng, k=2)]
    return pairs[:n]


@dataclass
class CheckResult:
    questions: int
    same: int
    torch_seconds: float
    onnx_seconds: float
    first_difference: str | None = None


def check_export(
    engine: Any, out: Path, pairs: list[tuple[str, Any]], max_new_tokens: int = 8
) -> CheckResult:
    """`run_onnx.py`'s greedy answers against `engine`'s (`gpt2mm ask`): new tokens (up to where the engine
    stopped) and answer texts must be equal for every question."""
    import importlib.util

    from gpt2mm.serve.engine import SamplingParams

    spec = importlib.util.spec_from_file_location("gpt2mm_run_onnx", out / RUNNER_NAME)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    vlm = runner.OnnxVLM(out, threads=torch.get_num_threads())
    same, first = 0, None
    t_torch = t_onnx = 0.0
    for question, image in pairs:
        t = time.perf_counter()
        ours = engine.ask(question, [image], SamplingParams(max_new_tokens=max_new_tokens)).choices[0]
        t_torch += time.perf_counter() - t
        t = time.perf_counter()
        ids = vlm.encode(question, 1)
        new, text, _ = vlm.generate(ids, [image], max_new_tokens)
        t_onnx += time.perf_counter() - t
        prompt = engine.prepare([("user", question, 1)], [image]).input_ids
        if ids == prompt and new[: len(ours.token_ids)] == ours.token_ids and text == ours.text:
            same += 1
        elif first is None:
            first = f"{question!r}: PyTorch {ours.text!r} {ours.token_ids}, ONNX {text!r} {new}"
            if ids != prompt:
                first += " (the prompts' ids differ)"
    return CheckResult(len(pairs), same, t_torch, t_onnx, first)


def export_onnx(
    model_path: str,
    out: Path,
    overwrite: bool = False,
    check: int = 32,
    opset: int = OPSET,
) -> tuple[dict[str, Any], CheckResult | None]:
    """Export `model_path` into `out` (written under `OUT.tmp`, renamed when done and checked); `check`:
    the number of synthetic questions whose answers must match PyTorch's (0: no check)."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise UsageError(
            f"gpt2mm export onnx needs onnx and onnxruntime ({e}): pip install 'gpt2-multimodal[onnx]'"
        ) from None
    from gpt2mm.onnx_runner import CONFIG_FILE
    from gpt2mm.serve.engine import load_engine

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise UsageError(
            f"{out} exists and is not an empty directory; choose another path or pass --overwrite"
        )
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent} is not a directory")
    engine = load_engine(model_path, "cpu", "float32", compile=False)
    model, processor = engine.model, engine.processor
    config = runner_config(model, processor)
    result = None
    with atomic_dir(out, f"the ONNX export {out}") as tmp:
        export_graphs(model, tmp, opset)
        processor.tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        shutil.copyfile(Path(__file__).with_name("onnx_runner.py"), tmp / RUNNER_NAME)
        shutil.copyfile(Path(__file__).with_name("onnx_web") / "index.html", tmp / "index.html")
        if check:
            pairs = check_questions(check, image_size=model.config.vision_config.image_size)
            result = check_export(engine, tmp, pairs)
            if result.same != result.questions:
                raise UsageError(
                    f"the ONNX export answers {result.questions - result.same} of {result.questions} check "
                    f"questions differently from PyTorch, first {result.first_difference}; {out} was not written"
                )
    return config, result
