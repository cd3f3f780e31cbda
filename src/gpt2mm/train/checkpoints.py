"""Checkpoints and output folders, for every stage: atomic writes, listing and pruning, the resume point, the
random-number state, and the rule that a new run never mixes itself into an earlier run's folder.

A checkpoint is `checkpoint-STEP/`: the model (`config.json` + `model.safetensors`, loadable by itself), the
processor, and `trainer_state.pt` (counters, optimizer, schedule, RNG, config) for an exact `--resume`. It is
written under `checkpoint-STEP.tmp` and renamed into place, so a crash never leaves a half checkpoint under the
final name."""

from __future__ import annotations

import contextlib
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2mm.errors import UsageError

# --- output folders ------------------------------------------------------------------------------------------


def earlier_run(out: Path) -> list[str]:
    """What an earlier run left in `out` (checkpoints, best, metrics): a new run would mix its metrics with
    them, and prune or replace its checkpoints."""
    if not out.is_dir():
        return []
    return sorted(
        p.name
        for p in out.iterdir()
        if p.name in ("best", "metrics.jsonl", "tensorboard") or is_checkpoint_name(p.name)
    )


def claim_output_dir(out: Path, resume, overwrite: bool, init_from: str | None = None) -> list[str]:
    """Checked before any work: a folder that holds an earlier run is refused unless the run resumes it or
    `overwrite` says to replace it. Returns the earlier run's files, for `replace_earlier_run` to remove once
    the new run has set itself up (so that a run that fails to start loses nothing); the rest of the folder
    stays."""
    found = [] if resume else earlier_run(out)
    if not found:
        return []
    if not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        resumable = "continue it with --resume, " if list_checkpoints(out) else ""
        raise UsageError(
            f"train.output_dir {out} holds an earlier run ({shown}): {resumable}give another train.output_dir, "
            "or replace it with --train.overwrite true"
        )
    if init_from:
        start = Path(init_from).resolve()
        if any((out / name).resolve() in (start, *start.parents) for name in found):
            raise UsageError(
                f"model.init_from {init_from} is part of the earlier run in {out} that --train.overwrite would "
                "remove: copy it elsewhere first, or give another train.output_dir"
            )
    return found


def replace_earlier_run(out: Path, names: list[str], log) -> None:
    """Remove what `claim_output_dir` found (with train.overwrite), on the main process, just before the run
    first writes into `out`."""
    for name in names:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if names:
        log(f"train.overwrite: removed the earlier run's {', '.join(names)} from {out}")


# --- writing -------------------------------------------------------------------------------------------------


def atomic_save_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a directory under a temporary name, then rename it into place (a crash leaves no half
    checkpoint under the final name; stale temporaries are removed on the next start)."""
    with atomic_dir(final) as tmp:
        write(tmp)


@contextlib.contextmanager
def atomic_dir(final: Path):
    """`atomic_save_dir` as a context: the body writes into the temporary directory it is given, which takes
    the final name when the body ends without an error."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    commit_dir(tmp, final)


def commit_dir(tmp: Path, final: Path) -> None:
    """Give a written temporary directory its final name, replacing what had it."""
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old)


def save_checkpoint(
    out: Path, step: int, write_model: Callable[[Path], None], state: dict[str, Any] | None, keep_last: int
) -> None:
    """`best` (weights only: `state` None) or `checkpoint-STEP` (weights + `trainer_state.pt`); then all but
    the newest `keep_last` checkpoints removed."""
    name = "best" if state is None else f"checkpoint-{step}"
    with atomic_dir(out / name) as tmp:
        write_model(tmp)
        if state is not None:
            torch.save(state, tmp / "trainer_state.pt")
    if state is not None:
        prune_checkpoints(out, keep_last)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary `.tmp` directory is never complete)."""
    found = []
    for p in run_dir.glob("checkpoint-*"):
        if p.is_dir() and is_checkpoint_name(p.name) and (p / "trainer_state.pt").is_file():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def is_checkpoint_name(name: str) -> bool:
    return name.startswith("checkpoint-") and name.split("-", 1)[1].isdigit()


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0: keep all)."""
    for old in list_checkpoints(run_dir)[: -keep_last or None]:
        shutil.rmtree(old)


# --- resuming ------------------------------------------------------------------------------------------------


def load_resume_checkpoint(run_dir: Path, resume: str | bool) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """What `--resume` names: the given checkpoint, or the last complete one in `run_dir` when it names
    none. Returns (path, trainer state, model weights); a UsageError says what is missing."""
    from safetensors.torch import load_file

    path = Path(resume) if isinstance(resume, str) else None
    if path is None:
        found = list_checkpoints(run_dir)
        if not found:
            raise UsageError(f"--resume: no complete checkpoint in {run_dir}")
        path = found[-1]
    if not path.exists():
        raise UsageError(f"--resume {path}: no such checkpoint")
    if not (path / "trainer_state.pt").is_file():
        raise UsageError(f"--resume: {path} is not a complete checkpoint (no trainer_state.pt)")
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    return path, state, load_file(str(path / "model.safetensors"))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators from one seed."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
