"""Checkpoints that stand on their own: remote code, a model card, and publishing to the Hugging Face Hub.

Every model gpt2mm writes (`init`, `convert-seed`, `train`, `ppo`, `reward`, and so `demo`) goes through
`save_model`, which writes, next to the weights and the processor:

- the remote code: configuration_gpt2mm.py, modeling_gpt2mm.py, processing_gpt2mm.py and what they import
  of gpt2mm (layers_gpt2mm.py, presets_gpt2mm.py), GENERATED from this package's own config.py, modeling.py, processing.py
  (`remote_code`: the files as they are, their `from gpt2mm.X import` lines made relative), plus the
  `auto_map` entries in config.json and processor_config.json that point transformers at them. So where
  torch and transformers are installed but gpt2mm is not,

      AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)
      AutoProcessor.from_pretrained(DIR, trust_remote_code=True)

  load the checkpoint, and `generate` answers token for token as `gpt2mm ask` does (a test checks it in a
  process where gpt2mm cannot be imported). Where gpt2mm is installed, its own registered classes load the
  checkpoint as before (transformers takes them where `trust_remote_code=True` is not given).
- README.md, a model card (`model_card`): backbones, data, recipe, metrics of the run that made it, and a
  usage snippet that runs without gpt2mm.
- recipe.yaml, for checkpoints of a run: the run's whole configuration.

`push` (`gpt2mm push DIR REPO_ID`) publishes such a directory with huggingface_hub.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpt2mm.errors import UsageError

PACKAGE = "gpt2mm"
PACKAGE_DIR = Path(__file__).resolve().parent
# The modules a checkpoint's remote code starts from; what they import of gpt2mm comes along (`remote_code`).
REMOTE_ENTRY_MODULES = ("config", "modeling", "processing")
CONFIG_CLASS = "MultimodalGPT2Config"
MODEL_CLASS = "MultimodalGPT2ForConditionalGeneration"
BASE_MODEL_CLASS = "MultimodalGPT2Model"  # without the LM head: AutoModel, and vLLM's Transformers backend
PROCESSOR_CLASS = "MultimodalGPT2Processor"
CARD_FILE = "README.md"
RECIPE_FILE = "recipe.yaml"
# What `push` leaves out: the optimizer state of a resumable checkpoint (large, and of no use to a user).
PUSH_IGNORE = ["trainer_state.pt", "*.tmp", ".cache/*"]
# Where the usage snippet of a card not yet published names the model; `push` puts the repo id there.
LOCAL_MODEL_ID = "path/to/this/checkpoint"


# --- remote code ----------------------------------------------------------------------------------------


def remote_module_name(name: str) -> str:
    """gpt2mm's module `name` -> its file name in a checkpoint, without .py (transformers' naming)."""
    return "configuration_gpt2mm" if name == "config" else f"{name}_gpt2mm"


def _gpt2mm_imports(tree: ast.AST, name: str, rewritten: bool = False) -> list[str]:
    """The gpt2mm modules that module `name` imports (`from gpt2mm.X import ...`, anywhere in it). Other ways
    to import gpt2mm cannot be made relative and are refused, and so are relative imports, unless the
    module is `rewritten` (its imports made relative already)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != PACKAGE:
                continue
            if len(parts) != 2:
                raise ValueError(
                    f"gpt2mm/{name}.py line {node.lineno}: remote code needs `from gpt2mm.X import`"
                )
            found.append(parts[1])
        elif isinstance(node, ast.ImportFrom) and node.level and not rewritten:
            raise ValueError(f"gpt2mm/{name}.py line {node.lineno}: a relative import; use `from gpt2mm.X`")
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise ValueError(f"gpt2mm/{name}.py line {node.lineno}: remote code needs `from gpt2mm.X import`")
    return found


def remote_code() -> dict[str, str]:
    """File name -> source of the checkpoint's remote code: config.py, modeling.py, processing.py and every
    gpt2mm module they import (transitively), read from this package and renamed (`remote_module_name`),
    each `from gpt2mm.X import` made `from .X_gpt2mm import`. Generated on every save, so a checkpoint's code
    is the code that wrote it; nothing is kept by hand twice."""
    from gpt2mm import __version__

    todo, seen, files = list(REMOTE_ENTRY_MODULES), set(), {}
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        source = (PACKAGE_DIR / f"{name}.py").read_text(encoding="utf-8")
        imported = _gpt2mm_imports(ast.parse(source), name)
        todo += imported

        def relative(match: re.Match) -> str:
            return f"{match.group(1)}from .{remote_module_name(match.group(2))} import"

        source = re.sub(r"^(\s*)from gpt2mm\.(\w+) import", relative, source, flags=re.MULTILINE)
        left = _gpt2mm_imports(ast.parse(source), name, rewritten=True)
        if left:  # e.g. an import split over lines in a way the rewrite did not see
            raise ValueError(f"gpt2mm/{name}.py: could not make its imports of {left} relative")
        header = (
            f"# Generated by gpt2mm {__version__} from gpt2mm/{name}.py, its gpt2mm imports made relative, so that\n"
            "# this checkpoint loads without gpt2mm (trust_remote_code=True). Written anew with every save.\n"
        )
        files[f"{remote_module_name(name)}.py"] = header + source
    return files


def auto_maps() -> tuple[dict[str, str], dict[str, str]]:
    """The `auto_map` of config.json and of processor_config.json: Auto class -> module.Class."""
    model = f"{remote_module_name('modeling')}.{MODEL_CLASS}"
    config_map = {
        "AutoConfig": f"{remote_module_name('config')}.{CONFIG_CLASS}",
        "AutoModel": f"{remote_module_name('modeling')}.{BASE_MODEL_CLASS}",
        "AutoModelForImageTextToText": model,
    }
    return config_map, {"AutoProcessor": f"{remote_module_name('processing')}.{PROCESSOR_CLASS}"}


def write_remote_code(path: str | os.PathLike) -> None:
    """Write the remote code into a saved model directory and point its configs' `auto_map` at it."""
    path = Path(path)
    for name, source in remote_code().items():
        (path / name).write_text(source, encoding="utf-8")
    config_map, processor_map = auto_maps()
    _update_json(path / "config.json", {"auto_map": config_map})
    _update_json(path / "processor_config.json", {"auto_map": processor_map})


def _update_json(file: Path, values: dict[str, Any]) -> None:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; save the model and its processor first")
    data = json.loads(file.read_text(encoding="utf-8"))
    data.update(values)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --- saving ---------------------------------------------------------------------------------------------


def save_model(
    model: Any,
    processor: Any,
    path: str | os.PathLike,
    *,
    stage: str,
    state_dict: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    vision_backbone: str | None = None,
    text_backbone: str | None = None,
    init_from: str | os.PathLike | None = None,
    random_init: bool = False,
) -> None:
    """Write a self-contained checkpoint into `path`: the weights (`state_dict`, if given, instead of the
    model's own), the processor (with its chat template), the remote code and `auto_map`, the recipe of the
    run (`recipe`, as recipe.yaml) and a model card. What made it goes into the card: `stage` (init,
    convert-seed, sft, ppo, reward), the pretrained backbones (hub ids or directories), `random_init` (it
    started from random weights instead), or `init_from`, the checkpoint it continued (whose card's
    backbones it inherits)."""
    path = Path(path)
    model.save_pretrained(path, **({"state_dict": state_dict} if state_dict is not None else {}))
    processor.save_pretrained(path)
    write_remote_code(path)
    if recipe is not None:
        import yaml

        text = yaml.safe_dump(_plain(recipe), sort_keys=False)
        (path / RECIPE_FILE).write_text(f"# the configuration of the run that wrote this checkpoint\n{text}")
    about: dict[str, Any] = {
        "stage": stage,
        "vision_backbone": vision_backbone,
        "text_backbone": text_backbone,
    }
    if init_from is not None:
        about["init_from"] = str(init_from)
        parent = read_card_about(Path(init_from))
        for key in ("vision_backbone", "text_backbone", "random_init"):
            if about.get(key) is None:
                about[key] = parent.get(key)
    elif random_init:
        about["random_init"] = True
    model_card(path, about=about).save(path / CARD_FILE)


def _plain(value: Any) -> Any:
    """Mappings, lists and scalars only (tuples and paths as YAML writes them safely)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def preset_backbones(preset: str, pretrained: bool | None) -> tuple[str | None, str | None]:
    """The (vision, text) backbones a preset is built from: its pretrained ones, or none for random weights
    (`pretrained=None`: the preset's default, as `build_model` decides it)."""
    from gpt2mm.presets import get_preset

    p = get_preset(preset)
    has = p.vision_backbone is not None and p.text_backbone is not None
    if pretrained is False or not has:
        return None, None
    return p.vision_backbone, p.text_backbone


def recipe_provenance(model_cfg: Any) -> dict[str, Any]:
    """`save_model`'s provenance keywords for a run whose recipe has this `model:` section: the checkpoint it
    starts from, or the preset's backbones."""
    if getattr(model_cfg, "init_from", None):
        return {"init_from": model_cfg.init_from}
    vision, text = preset_backbones(model_cfg.preset, getattr(model_cfg, "pretrained", None))
    return {"vision_backbone": vision, "text_backbone": text, "random_init": vision is None}


# --- the model card --------------------------------------------------------------------------------------


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
            data = _read_json(summary)
            numbers = {k: v for k, v in data.items() if _is_number(v)}
            if numbers:
                found[f"summary ({summary.parent.name}/summary.json)"] = numbers
            break
    reward = _read_json(path / "metrics.json")
    heldout = reward.get("heldout")
    if isinstance(heldout, Mapping):
        found["reward model (held-out tags)"] = {k: v for k, v in heldout.items() if _is_number(v)}
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


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
    config = _read_json(path / "config.json")
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


# --- publishing ---------------------------------------------------------------------------------------------


def check_checkpoint(path: Path) -> None:
    """A `UsageError` unless `path` is a gpt2mm checkpoint: config.json of model type gpt2mm, weights, and
    the processor's files."""
    config = path / "config.json"
    if not path.is_dir():
        raise UsageError(f"{path}: no such directory")
    if not config.is_file() or _read_json(config).get("model_type") != PACKAGE:
        raise UsageError(f"{path} is not a gpt2mm checkpoint (no config.json of model type gpt2mm)")
    if not any(path.glob("model*.safetensors")):
        raise UsageError(f"{path} is not a gpt2mm checkpoint: it has no model.safetensors")
    if not (path / "processor_config.json").is_file():
        raise UsageError(f"{path} is not a gpt2mm checkpoint: it has no processor_config.json")


def push(
    path: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    log=print,
) -> str:
    """Publish a checkpoint to the Hub as `repo_id`; returns the commit's URL.

    The directory's remote code and model card are brought up to date first (the card then names
    `repo_id`), so that what is uploaded loads without gpt2mm; the optimizer state (`PUSH_IGNORE`) stays
    home. The repo is created if needed (`private` then applies), `revision` is a branch (created from main
    if missing). Without a token (`hf auth login`, or HF_TOKEN) a `UsageError` says so before anything runs.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    path = Path(path)
    check_checkpoint(path)
    token = token or get_token()
    if not token:
        raise UsageError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN")
    from gpt2mm.outputs import verify_manifest, write_manifest

    had_manifest = verify_manifest(path)  # a damaged checkpoint is not published
    write_remote_code(path)
    write_model_card(path, repo_id=repo_id)
    if had_manifest:
        write_manifest(path)  # the refreshed code and card, so the folder still verifies
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=path,
            repo_type="model",
            revision=revision,
            commit_message=f"Upload {path.name} with gpt2mm push",
            ignore_patterns=PUSH_IGNORE,
        )
    except HfHubHTTPError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"pushing to {repo_id} failed: {first}") from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    log(f"pushed {path} to {url}")
    return url
