"""Several processes: FSDP2 through accelerate, and the optimizer state in either keying.

FSDP2 (torch's `fully_shard`) comes through accelerate's FullyShardedDataParallelPlugin, selected by
`accelerate launch --use_fsdp --fsdp_version 2` (or an accelerate config file saying so: both set the
ACCELERATE_USE_FSDP / FSDP_* variables) or by `train.fsdp: true`. The optimizer is built before sharding and
accelerate swaps its parameters for the sharded ones (FSDP2 keeps each parameter as itself, frozen or not, so
the frozen vision tower and the tied embedding / LM head need nothing special). FSDP1 is not offered: it needs
the optimizer built after wrapping, over flattened parameters (use_orig_params for the frozen tower)."""

from __future__ import annotations

import os
from typing import Any

import torch

from gpt2mm.errors import UsageError

FSDP_WRAP = ["GPT2Block", "CLIPEncoderLayer"]  # one FSDP unit per GPT-2 block and per CLIP encoder layer


def fsdp_from_env() -> bool:
    """Whether the launcher asked for FSDP (`accelerate launch --use_fsdp`, or its config file)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_fsdp_plugin():
    """accelerate's FSDP2 plugin: units per GPT-2 block and CLIP encoder layer (then accelerate's own unit for the
    tied embedding + LM head, and the root) unless the launcher's FSDP_* variables say otherwise; the other
    settings (resharding, CPU offload, activation checkpointing, ...) come from them as accelerate reads them."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if "fsdp_version" not in FullyShardedDataParallelPlugin.__dataclass_fields__:
        raise UsageError("FSDP here is FSDP2, which needs accelerate >= 1.6: pip install -U accelerate")
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise UsageError(
            f"FSDP_VERSION={version}: gpt2mm train shards with FSDP2 only (FSDP1 would need the optimizer built "
            "after wrapping, over flattened parameters); launch with accelerate launch --use_fsdp --fsdp_version 2 "
            "(fsdp_version: 2 in an accelerate config file)"
        )
    kwargs: dict[str, Any] = {"fsdp_version": 2}
    if "FSDP_AUTO_WRAP_POLICY" not in os.environ:
        kwargs["auto_wrap_policy"] = "transformer_based_wrap"
    if "FSDP_TRANSFORMER_CLS_TO_WRAP" not in os.environ:
        # accelerate's default, the model's _no_split_modules, names CLIP modules this model does not hold
        kwargs["transformer_cls_names_to_wrap"] = list(FSDP_WRAP)
    return FullyShardedDataParallelPlugin(**kwargs)


def shard_on_cpu(acc, plugin) -> None:
    """Switch an Accelerator of several CPU processes (gloo) from DDP to FSDP. accelerate (1.x) selects FSDP for
    accelerator devices only: on CPU it keeps DDP and drops the plugin, although FSDP2 itself runs there. This sets
    what accelerate sets on GPUs (the distributed type, the plugin, its mixed precision), so that `prepare`,
    `backward`, `clip_grad_norm_`, `no_sync` and `get_state_dict` take their FSDP2 paths, as they do on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = acc.state  # AcceleratorState: one state shared by every instance
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    if not acc.is_fsdp2:
        raise RuntimeError("could not switch accelerate's state to FSDP2 on CPU")


def tied_copies(model) -> set[str]:
    """The names under which a parameter appears a second time (the LM head tied to the embeddings). A state dict
    gathered from FSDP shards holds a separate copy under each, which save_pretrained (it recognises tied weights
    by shared storage) would write twice; an unsharded model's checkpoint holds the first name only."""
    seen: set[int] = set()
    copies = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            copies.add(name)
        seen.add(id(p))
    return copies


def optimizer_param_names(model, optimizer) -> tuple[list[str], dict[str, int]]:
    """The optimizer's parameters by name, in its order (the first name of a tied parameter), and every name of
    each (the tied LM head's too) -> its position: the two keyings of an optimizer state dict."""
    position = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    names: list[str | None] = [None] * len(position)
    by_name = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        i = position.get(id(p))
        if i is not None:
            by_name[name] = i
            names[i] = names[i] or name
    if any(n is None for n in names):
        raise RuntimeError("an optimizer parameter is not a parameter of the model")
    return names, by_name  # type: ignore[return-value]


def optimizer_state_by_name(state: dict, names: list[str]) -> dict:
    """torch's optimizer state dict (parameters by position) keyed by parameter name instead, the form of
    torch.distributed.checkpoint's full optimizer state dict."""
    return {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def optimizer_state_by_position(state: dict, position: dict[str, int]) -> dict:
    """The inverse of `optimizer_state_by_name`: what `optimizer.state_dict()` of the unsharded model gives."""
    return {
        "state": {position[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def make_accelerator(t, gradient_checkpointing: bool, log=print):
    """The run's Accelerator: precision, and DDP or FSDP2 over the processes the launcher started. Returns
    (accelerator, whether it shards with FSDP)."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import AutocastKwargs, DistributedType
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours is the one to watch
    # on a machine without CUDA, processes started by torchrun / accelerate launch talk over gloo
    cpu = not torch.cuda.is_available()
    plugin = None
    if t.fsdp or fsdp_from_env():
        plugin = make_fsdp_plugin()
        if PartialState(cpu=cpu).num_processes == 1 and not fsdp_from_env():
            # (given a plugin, accelerate would set ACCELERATE_USE_FSDP for the rest of the process)
            plugin = None
            log("train.fsdp: a single process has nothing to shard; training unsharded")
    # bf16/fp16 autocast keeps a cast copy of every weight for the whole forward; under gradient
    # checkpointing that copy is much of what checkpointing saves (1.5 GB for the seed), so it is off
    autocast = AutocastKwargs(cache_enabled=not gradient_checkpointing)
    precision = {"fp32": "no"}.get(t.precision, t.precision)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        # accelerate keeps one state per process and refuses another precision; a later run in the same
        # process (the demo's fp32 stage 3 after its bf16 stage 1) starts a fresh one. The process
        # group (PartialState) stays.
        AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=precision, cpu=cpu, fsdp_plugin=plugin, kwargs_handlers=[autocast])
    if plugin is not None and acc.distributed_type == DistributedType.MULTI_CPU:
        shard_on_cpu(acc, plugin)
    fsdp = acc.distributed_type == DistributedType.FSDP
    if fsdp and acc.is_main_process:
        policy = getattr(plugin.auto_wrap_policy, "__name__", None)
        units = plugin.transformer_cls_names_to_wrap if policy == "transformer_auto_wrap_policy" else policy
        log(
            f"FSDP2 over {acc.num_processes} processes (units: {units or 'none below the embeddings and root'})"
        )
    return acc, fsdp


def gather_optimizer_state(model, optimizer, position: dict[str, int]) -> dict:
    """The full optimizer state of a sharded model, in torch's own format (parameters by position)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(
        model,
        getattr(optimizer, "optimizer", optimizer),  # the torch optimizer under accelerate's
        options=StateDictOptions(full_state_dict=True, cpu_offload=True),
    )
    return optimizer_state_by_position(full, position) if torch.distributed.get_rank() == 0 else None


def scatter_optimizer_state(model, optimizer, saved: dict, names: list[str], path) -> None:
    """Load a full optimizer state (torch's format) into a sharded model's optimizer; each process keeps its
    shards (every process read the whole state from the checkpoint)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    live = [len(g["params"]) for g in optimizer.param_groups]
    if [len(g["params"]) for g in saved["param_groups"]] != live:
        raise UsageError(f"--resume: the optimizer state in {path} does not fit this run's parameters")
    set_optimizer_state_dict(
        model,
        getattr(optimizer, "optimizer", optimizer),
        optimizer_state_by_name(saved, names),
        options=StateDictOptions(full_state_dict=True),
    )


_LAST_BARRIER: list = []  # see end_together


def end_together(world: int) -> None:
    """The processes of a run end together: the main one may still be writing the last checkpoint.

    The final barrier stays referenced until the process exits. gloo frees a finished work, and the works
    a barrier waited on (FSDP's gathers, whose tensors need the GIL to be freed), when the work's last
    reference goes: held here, that is the main thread; dropped at once, it could be a gloo thread racing
    the interpreter's shutdown, which then aborts the process ("terminate called without an active
    exception") after a complete run."""
    if world == 1 or not torch.distributed.is_initialized():
        return
    work = torch.distributed.barrier(async_op=True)
    work.wait()
    _LAST_BARRIER.append(work)
