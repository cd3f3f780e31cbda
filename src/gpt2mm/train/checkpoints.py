"""Checkpoints and output folders, for every stage: atomic writes, listing and pruning, the resume point, the
random-number state, and the rule that a new run never mixes itself into an earlier run's folder.

A checkpoint is `checkpoint-STEP/`: the model (`config.json` + `model.safetensors`, loadable by itself), the
processor, `trainer_state.pt` (counters, optimizer, schedule, RNG, config) for an exact `--resume`, and
`manifest.json` (each file's size and SHA-256). It is written under `checkpoint-STEP.tmp` and renamed into
place, so a crash never leaves a half checkpoint under the final name, and an I/O failure is one line naming
the path and the free space (`gpt2mm.outputs`). `--resume` checks the manifest: a truncated or changed file is
named, and without a path the newest checkpoint that verifies is taken."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2mm.errors import DamagedFileError, UsageError
from gpt2mm.outputs import (  # atomic_dir, commit_dir: for the stages that write checkpoints themselves
    atomic_dir,
    commit_dir,  # noqa: F401
    recover_interrupted_saves,
    torch_save,
    verify_manifest,
    writing,
)

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


# --- writing ---------------------------------------------------------------------------------------------------


def atomic_save_dir(final: Path, write: Callable[[Path], None], what: str | None = None) -> None:
    """`write(folder)` into a temporary folder renamed into place, with a manifest (`gpt2mm.outputs.atomic_dir`:
    a crash or an I/O failure leaves no half folder under the final name)."""
    with atomic_dir(final, what) as tmp:
        write(tmp)


def save_checkpoint(
    out: Path, step: int, write_model: Callable[[Path], None], state: dict[str, Any] | None, keep_last: int
) -> None:
    """`best` (weights only: `state` None) or `checkpoint-STEP` (weights + `trainer_state.pt`); then all but
    the newest `keep_last` checkpoints removed."""
    name = "best" if state is None else f"checkpoint-{step}"
    with atomic_dir(out / name) as tmp:
        write_weights(write_model, tmp, name)
        if state is not None:
            write_trainer_state(state, tmp, name)
    if state is not None:
        prune_checkpoints(out, keep_last)


def write_weights(write_model: Callable[[Path], None], folder: Path, name: str) -> None:
    """`write_model(folder)`, its I/O failure named as `name`'s model weights and processor."""
    with writing(folder, f"{name} (model weights and processor)"):
        write_model(folder)


def write_trainer_state(state: dict[str, Any], folder: Path, name: str) -> None:
    """`trainer_state.pt`; a failed write names the file (torch's own error says only "unexpected pos")."""
    with writing(folder / "trainer_state.pt", f"{name} (trainer state)"):
        torch_save(state, folder / "trainer_state.pt")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary `.tmp` directory is never complete, and a damaged one
    set aside as `.damaged` is not listed)."""
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


def clean_output_dir(out: Path, log) -> None:
    """At the start of a run, after a crash: a `best` or checkpoint caught between `commit_dir`'s renames is
    put back, unfinished `.tmp` folders removed."""
    for name in recover_interrupted_saves(out):
        log(f"{out / name}: put back (a save was interrupted while replacing it)")


# --- resuming ------------------------------------------------------------------------------------------------


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint's trainer state and model weights, checked against its manifest first; a
    `DamagedFileError` names the file that fails (or that cannot be parsed, in a checkpoint written before
    manifests)."""
    from safetensors.torch import load_file

    verify_manifest(path)
    file = path / "trainer_state.pt"
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a dict")
        file = path / "model.safetensors"
        weights = load_file(str(file))
    except Exception as e:  # whatever a damaged pickle or safetensors file raises
        if isinstance(e, FileNotFoundError):
            raise DamagedFileError(f"{file}: missing") from None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DamagedFileError(f"{file}: cannot be read ({type(e).__name__}: {first})") from None
    return state, weights


def load_resume_checkpoint(
    run_dir: Path, resume: str | bool, log=print, set_aside: bool = True
) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """What `--resume` names: the given checkpoint, or the newest complete one in `run_dir` that verifies
    when it names none. Returns (path, trainer state, model weights).

    A named checkpoint that fails its manifest (or cannot be read) is a `DamagedFileError` naming the file.
    Without a name, a damaged checkpoint is skipped with one log line saying why, and (`set_aside`: the main
    process) renamed `checkpoint-N.damaged`, so that it is neither resumed nor counted by `keep_last` again;
    the run then continues from the newest checkpoint that verifies. A UsageError says what is missing."""
    path = Path(resume) if isinstance(resume, str) else None
    if path is not None:
        if not path.exists():
            raise UsageError(f"--resume {path}: no such checkpoint")
        if not (path / "trainer_state.pt").is_file():
            raise UsageError(f"--resume: {path} is not a complete checkpoint (no trainer_state.pt)")
        try:
            return (path, *load_checkpoint(path))
        except DamagedFileError as e:
            raise DamagedFileError(
                f"--resume {path}: damaged: {e}; resume an earlier checkpoint, or --resume without a path "
                "to take the newest that verifies"
            ) from None
    found = list_checkpoints(run_dir)
    if not found:
        raise UsageError(f"--resume: no complete checkpoint in {run_dir}")
    for candidate in reversed(found):
        try:
            return (candidate, *load_checkpoint(candidate))
        except DamagedFileError as e:
            note = ""
            if set_aside:
                aside = candidate.with_name(candidate.name + ".damaged")
                try:
                    if aside.exists():
                        shutil.rmtree(aside)
                    candidate.rename(aside)
                    note = f"; set aside as {aside.name}"
                except OSError as error:
                    note = f"; could not set it aside as {aside.name} ({error.strerror or error})"
            log(f"--resume: skipped {candidate.name}: {e}{note}")
    raise DamagedFileError(
        f"--resume: none of the {len(found)} checkpoints in {run_dir} verifies (see the lines above)"
    )


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
