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
- README.md, a model card (`gpt2mm.card.model_card`): backbones, data, recipe, metrics of the run that made
  it, and a usage snippet that runs without gpt2mm.
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


def read_json(file: Path) -> dict[str, Any]:
    """The JSON object in `file`; {} if it is missing, unreadable or not an object."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


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
    from gpt2mm.card import model_card, read_card_about

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


# --- publishing ---------------------------------------------------------------------------------------------


def check_checkpoint(path: Path) -> None:
    """A `UsageError` unless `path` is a gpt2mm checkpoint: config.json of model type gpt2mm, weights, and
    the processor's files."""
    config = path / "config.json"
    if not path.is_dir():
        raise UsageError(f"{path}: no such directory")
    if not config.is_file() or read_json(config).get("model_type") != PACKAGE:
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
    from gpt2mm.card import write_model_card
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
