"""Nested dataclass configs <- YAML recipe <- `--section.key value` overrides. One source of truth per option.

A recipe is a YAML mapping of sections (`model:`, `data:`, `train:`) whose keys are the fields of the
config dataclasses; defaults fill the rest. Overrides on the command line use the same dotted names, and
their strings are parsed with the field's type. Unknown sections or keys are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gpt2mm.errors import UsageError

T = TypeVar("T")

# options of earlier recipes -> what replaced them (said instead of "unknown option")
RENAMED = {
    "tensorboard": "log_with: [tensorboard] ([] for none)",
    "wandb": "log_with: [wandb] (with tensorboard: [tensorboard, wandb])",
}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Parse a YAML value or a command-line string as the field's type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"{name}: cannot read {value!r} as {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return build(tp, value, prefix=f"{name}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = (
                yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            )
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [(_coerce(v, inner, name) if inner is not Any else v) for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        try:
            number = float(value) if tp is float else int(str(value).replace("_", ""))
        except ValueError:
            raise ValueError(f"{name}: expected {tp.__name__}, got {value!r}") from None
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise TypeError(f"{name}: unsupported config type {tp}")


def build(cls: type[T], values: dict[str, Any] | None = None, prefix: str = "") -> T:
    """`cls(**values)` with every value parsed by its field type; unknown keys name themselves."""
    values = dict(values or {})
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        if unknown[0] in RENAMED:
            raise UsageError(f"option {prefix}{unknown[0]} is now {prefix}{RENAMED[unknown[0]]}")
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise UsageError(f"unknown option {prefix}{unknown[0]} (known: {known})")
    kwargs = {}
    for key, value in values.items():
        try:
            kwargs[key] = _coerce(value, types_[key], prefix + key)
        except (TypeError, ValueError) as e:
            raise UsageError(str(e)) from None
    try:
        return cls(**kwargs)
    except UsageError:  # already names its option in full
        raise
    except (TypeError, ValueError) as e:
        raise UsageError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def read_recipe(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file as a mapping. `base: OTHER.yaml` (relative to the file) starts from that recipe: each
    section of the file is merged into the base's section key by key, the file's values winning."""
    if not path.is_file():
        raise UsageError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise UsageError(
            f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or type(e).__name__})"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / str(base)).resolve()
    if base_path in _seen:
        raise UsageError(f"{path}: base {base} includes itself")
    return _merge(read_recipe(base_path, (*_seen, path.resolve())), data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Sections merged key by key; a value inside a section (a number, a list, a mapping such as
    model.overrides) replaces the base's whole."""
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def load_config(cls: type[T], path: str | Path | None, overrides: list[str]) -> T:
    """A recipe file (optional) plus `--section.key value` / `--section.key=value` overrides."""
    data: dict[str, Any] = {} if path is None else read_recipe(Path(path))
    for key, value in parse_overrides(overrides):
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--{key}: {p} is not a section")
        node[leaf] = value
    return build(cls, data)


def load_section(
    cls: type[T],
    path: str | Path | None,
    section: str,
    overrides: dict[str, Any],
    defaults: dict[str, Any] | None = None,
) -> T:
    """One section of a recipe file (optional; its other sections are not read) with `defaults` under it and
    `overrides` (key -> value as typed) over it: how `gpt2mm eval` reads a training recipe's `data:`."""
    values = dict(defaults or {})
    if path is not None:
        recipe = read_recipe(Path(path)).get(section) or {}
        if not isinstance(recipe, dict):
            raise UsageError(f"{path}: {section}: expected a mapping, got {type(recipe).__name__}")
        values.update(recipe)
    values.update({k: _flow_value(v) if isinstance(v, str) else v for k, v in overrides.items()})
    return build(cls, values, prefix=f"{section}.")


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`["--train.lr", "1e-3", "--data.skip_bad=true"]` -> `[("train.lr", "1e-3"), ("data.skip_bad", "true")]`."""
    out = []
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise UsageError(f"unexpected argument {item!r}; overrides look like --section.key value")
        item = item[2:]
        if "=" in item:
            key, value = item.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise UsageError(f"--{item} needs a value")
            key, value = item, items[i + 1]
            i += 2
        out.append((key.replace("-", "_"), _flow_value(value)))
    return out


def _flow_value(value: str) -> Any:
    """A YAML list or mapping (`[a, b]`, `{k: v}`) as one; any other string, `{image_id}.png` too, as it is."""
    if value.strip().startswith(("[", "{")):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per option (`--section.key  type  default  help`), for `--help`."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, prefix=f"{prefix}{f.name}.")
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        help_ = f.metadata.get("help", "")
        lines.append(f"  --{prefix}{f.name} (default {default!r}) {help_}".rstrip())
    return lines


def add_section_arguments(
    parser, section: str, cls: type, exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None
) -> None:
    """`--{section}.{field} VALUE` for every field of `cls` but `exclude` (generated, not copied: one source
    of truth), each absent from the namespace unless given; `section_overrides` collects them. `defaults`:
    the defaults the command uses instead of the dataclass's, for the help."""
    import argparse

    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        default = (defaults or {}).get(f.name, default)
        help_ = f.metadata.get("help", "")
        parser.add_argument(
            f"--{section}.{f.name}",
            dest=f"{section}.{f.name}",
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f"(default {default!r}) {help_}".rstrip(),
        )


def section_overrides(args: Any, section: str) -> dict[str, str]:
    """The `--{section}.key` values given on the command line (`add_section_arguments`), by key."""
    prefix = f"{section}."
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}


def add_recipe_arguments(parser, command: str, cls: type) -> None:
    """A recipe command's arguments: the recipe and its overrides (taken by `load_recipe` from the left-over
    arguments, so that an override's value, "--x.y 3", is never mistaken for the recipe), and `--resume`."""
    import argparse

    parser.usage = f"gpt2mm {command} [RECIPE.yaml] [--section.key value ...] [--resume [CHECKPOINT]]"
    parser.add_argument(
        "--resume", nargs="?", const=True, default=None, help="continue the last (or given) checkpoint"
    )
    parser.epilog = "options (override as --section.key value):\n" + "\n".join(describe(cls))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def load_recipe(cls: type[T], extra: list[str]) -> T:
    """The config from `[RECIPE.yaml] --section.key value ...` (the left-over command-line arguments)."""
    recipe = None
    if extra and not extra[0].startswith("--"):
        recipe, extra = extra[0], extra[1:]
    return load_config(cls, recipe, extra)
