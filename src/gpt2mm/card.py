"""A checkpoint's model card (README.md, `huggingface_hub.ModelCard`): what the model is, how to use it without
gpt2mm (a snippet that runs), what made it (stage, backbones, data, recipe) and what the run measured (its
metrics.jsonl, the demo's summary.json, a reward model's metrics.json). `gpt2mm.hub.save_model` writes it with
every checkpoint; `gpt2mm.hub.push` rewrites it to name the repo."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpt2mm.hub import CARD_FILE, PACKAGE, RECIPE_FILE, read_json

# Where the usage snippet of a card not yet published names the model; `push` puts the repo id there.
LOCAL_MODEL_ID = "path/to/this/checkpoint"


def read_card_about(path: Path) -> dict[str, Any]:
    """The `gpt2mm` entry of a checkpoint's card metadata (stage, backbones, ...); {} without a card."""
    card = path / CARD_FILE
    if not card.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        about = ModelCard.load(card).data.to_dict().get(PACKAGE)
    except Exception:  # a card someone wrote by hand: no provenance, not an error
        return {}
    return dict(about) if isinstance(about, Mapping) else {}


def _hub_id(name: str | None) -> str | None:
    """`name` if it reads as a hub repo id (owner/name, not a local directory), else None."""
    if not name or Path(name).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return None
    return name


def _checkpoint_name(path: Path) -> str:
    return path.name.removesuffix(".tmp")  # checkpoints are written under NAME.tmp, then renamed


def run_metrics(path: Path) -> dict[str, Any]:
    """What the run that wrote the checkpoint measured: the last value of each number in its metrics.jsonl
    (the run folder is the checkpoint's parent) with the best validation accuracy, the demo's summary.json
    (in the checkpoint, the run folder or the one above it) and a reward model's metrics.json."""
    found: dict[str, Any] = {}
    rows_file = path.parent / "metrics.jsonl"
    if rows_file.is_file():
        rows = []
        for line in rows_file.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written
        last: dict[str, float] = {}
        for row in rows:
            last.update({k: v for k, v in row.items() if _is_number(v)})
        accs = [row["val_accuracy"] for row in rows if _is_number(row.get("val_accuracy"))]
        if accs:
            last["best_val_accuracy"] = max(accs)
        if last:
            found["run (metrics.jsonl, last values)"] = last
    for folder in (path, path.parent, path.parent.parent):
        summary = folder / "summary.json"
        if summary.is_file():
            data = read_json(summary)
            numbers = {k: v for k, v in data.items() if _is_number(v)}
            if numbers:
                found[f"summary ({summary.parent.name}/summary.json)"] = numbers
            break
    reward = read_json(path / "metrics.json")
    heldout = reward.get("heldout")
    if isinstance(heldout, Mapping):
        found["reward model (held-out tags)"] = {k: v for k, v in heldout.items() if _is_number(v)}
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count_parameters(path: Path) -> int | None:
    """Parameters in the saved weights (a tied weight counts once), read from the safetensors headers."""
    from safetensors import safe_open

    files = sorted(path.glob("model*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


CARD_TEMPLATE = """\
---
{{ card_data }}
---

# {{ title }}

A gpt2mm model (a small multimodal GPT-2): a CLIP ViT vision tower, a projector (Linear -> LayerNorm ->
transformer layers) and GPT-2; each image's projected features are {{ fusion_verb }} the embeddings of
{{ image_tokens }} `<image>` tokens. Prompts read `Q: <image> {question} A: {answer}<|endoftext|>`, turn after
turn; the processor's chat template writes them from chat messages.

## Use it without gpt2mm

torch and transformers are enough; the model's code comes with it (`trust_remote_code=True`):

```python
{{ snippet }}
```

With gpt2mm installed: `gpt2mm ask {{ model_id }} --image image.png "What is in the picture?"` or
`gpt2mm serve {{ model_id }}` (an OpenAI-compatible API).

## Model

| part | what |
|---|---|
{% for name, value in model_rows %}| {{ name }} | {{ value }} |
{% endfor %}
## Training

{% for line in training %}- {{ line }}
{% endfor %}
{%- if recipe_note %}
{{ recipe_note }}
{% endif %}
{%- if metrics %}
## Metrics
{% for source, values in metrics.items() %}
{{ source }}:

| metric | value |
|---|---|
{% for name, value in values.items() %}| {{ name }} | {{ value }} |
{% endfor %}{% endfor %}
{%- endif %}
"""

SNIPPET = """\
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model_id = "{model_id}"
model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)

messages = [
    {{"role": "user", "content": [
        {{"type": "image", "image": Image.open("image.png")}},
        {{"type": "text", "text": "What is in the picture?"}},
    ]}},
]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
answer = processor.postprocess_answer(processor.decode(output[0, inputs["input_ids"].shape[1]:]))
print(answer)"""

STAGES = {
    "init": "`gpt2mm init` (untrained weights)",
    "convert-seed": "`gpt2mm convert-seed` (the seed's trained weights, converted)",
    "sft": "`gpt2mm train` (answer-only fine-tuning: stage 1, or stage 3 on conversations)",
    "ppo": "`gpt2mm ppo` (stage 2: RL on answer correctness)",
    "reward": "`gpt2mm reward train` (a reward model; transformers loads its language model, the reward head "
    "in reward_head.safetensors needs gpt2mm)",
}


def usage_snippet(model_id: str = LOCAL_MODEL_ID) -> str:
    """The card's Python example: load without gpt2mm, ask about image.png, print the answer."""
    return SNIPPET.format(model_id=model_id)


def model_card(path: str | os.PathLike, repo_id: str | None = None, about: Mapping[str, Any] | None = None):
    """The model card (`huggingface_hub.ModelCard`) of the checkpoint in `path`, from its files: config.json,
    the weights, recipe.yaml, the metrics of the run folder around it, and `about` (stage, backbones,
    init_from; default: what its current card says). `repo_id` names the model in the usage snippet (else
    `LOCAL_MODEL_ID`, for the reader to replace)."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(path)
    about = dict(read_card_about(path) if about is None else about)
    about = {k: v for k, v in about.items() if v is not None}
    config = read_json(path / "config.json")
    vision, text = config.get("vision_config", {}), config.get("text_config", {})
    recipe = yaml.safe_load((path / RECIPE_FILE).read_text()) if (path / RECIPE_FILE).is_file() else None
    recipe = recipe if isinstance(recipe, dict) else None

    stage = about.get("stage")
    backbones = [about.get("vision_backbone"), about.get("text_backbone")]
    hub_backbones = [b for b in map(_hub_id, backbones) if b]
    datasets = []
    data = (recipe or {}).get("data") or {}
    if data.get("format") == "hf" and _hub_id(data.get("hf_dataset")):
        datasets.append(data["hf_dataset"])
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=[PACKAGE, "custom_code", "vision-language", "gpt2", "clip"],
        base_model=hub_backbones or None,
        datasets=datasets or None,
        **{PACKAGE: about} if about else {},
    )

    if about.get("random_init"):
        no_backbones = "none: random initial weights"
    elif about.get("init_from"):
        no_backbones = "not recorded (the checkpoint it continued does not name them)"
    else:
        no_backbones = "not recorded"
    n_params = _count_parameters(path)
    image_tokens = _num_image_tokens(config)
    model_rows = [
        (
            "vision tower",
            f"CLIP ViT, {vision.get('num_hidden_layers')} layers, width {vision.get('hidden_size')}, "
            f"{vision.get('image_size')} px images in {vision.get('patch_size')} px patches"
            + {"conv": ", convolutional stem", "cnn": ", CNN stem (batch norm, max pooling)"}.get(
                config.get("vision_stem"), ""
            )
            + (", frozen" if config.get("freeze_vision", True) else ", trained"),
        ),
        (
            "projector",
            f"Linear -> LayerNorm -> transformer layers: {config.get('projector_num_layers')}"
            + (
                ", plus each patch centre's (x, y) along two learned directions"
                if config.get("projector_coordinates")
                else ""
            ),
        ),
        (
            "language model",
            f"GPT-2, {text.get('n_layer')} layers, width {text.get('n_embd')}, vocabulary {text.get('vocab_size')}, "
            f"context {text.get('n_positions')} tokens",
        ),
        ("image tokens", f"{image_tokens} per image, fusion `{config.get('fusion', 'add')}`"),
        ("backbones", ", ".join(b for b in backbones if b) or no_backbones),
    ]
    if n_params is not None:
        model_rows.append(("parameters", f"{n_params / 1e6:.1f} M"))

    training = [f"made by {STAGES.get(stage, stage or 'gpt2mm')}"]
    if about.get("init_from"):
        training.append(f"continued from the checkpoint `{about['init_from']}`")
    if recipe:
        model_cfg, train_cfg = recipe.get("model") or {}, recipe.get("train") or {}
        if not about.get("init_from") and model_cfg.get("preset"):
            training.append(f"preset `{model_cfg['preset']}`")
        if data:
            training.append(f"data: {_describe_data(data)}")
        keys = ("algo", "max_steps", "max_minutes", "batch_size", "lr", "precision", "seed")
        settings = [f"{k} {train_cfg[k]}" for k in keys if train_cfg.get(k) is not None]
        if settings:
            training.append("settings: " + ", ".join(settings))
    recipe_note = (
        f"The run's whole configuration is in [{RECIPE_FILE}]({RECIPE_FILE}) (a recipe `gpt2mm train` and "
        "`gpt2mm ppo` read)."
        if recipe
        else ""
    )
    model_id = repo_id or LOCAL_MODEL_ID
    title = repo_id.split("/")[-1] if repo_id else f"gpt2mm {stage or 'model'}: {_checkpoint_name(path)}"
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        title=title,
        fusion_verb="added to" if config.get("fusion", "add") == "add" else "put in place of",
        image_tokens=image_tokens,
        snippet=usage_snippet(model_id),
        model_id=model_id,
        model_rows=model_rows,
        training=training,
        recipe_note=recipe_note,
        metrics={src: {k: _fmt(v) for k, v in vals.items()} for src, vals in run_metrics(path).items()},
    )


def _num_image_tokens(config: Mapping[str, Any]) -> int | None:
    vision = config.get("vision_config") or {}
    try:
        side = vision["image_size"] // vision["patch_size"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return side * side + (0 if config.get("vision_drop_cls") else 1)


def _describe_data(data: Mapping[str, Any]) -> str:
    fmt = data.get("format", "vqa")
    if data.get("synth"):
        return f"the synthetic shapes world, rendered into `{data.get('root')}`"
    if fmt == "hf":
        return f"the Hugging Face dataset `{data.get('hf_dataset')}`"
    if fmt == "llava":
        return f"LLaVA conversations `{data.get('llava_train')}` under `{data.get('root')}`"
    if fmt == "csv":
        return f"the CSV `{data.get('csv_train')}` under `{data.get('root')}`"
    return f"VQA v2 files (`{data.get('train_questions')}`) under `{data.get('root')}`"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_model_card(path: str | os.PathLike, repo_id: str | None = None) -> None:
    """(Re)write a checkpoint's README.md from its files, keeping the provenance its card records."""
    path = Path(path)
    model_card(path, repo_id=repo_id).save(path / CARD_FILE)
