"""What a run shows and records, for every stage: metrics rows (`metrics.jsonl`, the file `gpt2mm plot` and
`gpt2mm report` read, and the trackers accelerate knows: TensorBoard, Weights & Biases, MLflow, ...), the
progress bar, and the time budget."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from gpt2mm.errors import UsageError
from gpt2mm.outputs import append_line, write_text


def check_trackers(names: list[str]) -> None:
    """Refuse, before any work, a tracker accelerate does not know or whose package is missing. TensorBoard,
    the default, is skipped quietly where it is not installed (metrics.jsonl is always written)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UsageError(
                f"train.log_with: unknown tracker {name!r} (known: {', '.join(LOGGER_TYPE_TO_CLASS)})"
            )
        if name not in available and name != "tensorboard":
            raise UsageError(f"train.log_with: {name} needs its package: pip install {name}")


def start_trackers(names: list[str], out: Path, config: dict[str, Any]) -> list:
    """accelerate's trackers, started as `Accelerator.init_trackers` starts them: TensorBoard into
    OUT/tensorboard, Weights & Biases in project $WANDB_PROJECT (else gpt2mm) with the run named after OUT."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, filter_trackers, get_available_trackers

    # without their packages (TensorBoard, the default, where it is not installed) trackers are left out here:
    # accelerate's own filter would log that through its logger, which needs an accelerator state (PPO's
    # and the reward trainer's runs start none)
    available = {str(t) for t in get_available_trackers()}
    trackers = []
    for kind in filter_trackers([n for n in names if n in available], logging_dir=out):
        cls = LOGGER_TYPE_TO_CLASS[str(kind)]
        if str(kind) == "tensorboard":
            tracker = cls("tensorboard", out)
        elif str(kind) == "wandb":
            tracker = cls(os.environ.get("WANDB_PROJECT", "gpt2mm"), name=out.name, dir=str(out))
        elif cls.requires_logging_directory:
            tracker = cls("gpt2mm", out)
        else:
            tracker = cls("gpt2mm")
        if hasattr(tracker, "start"):  # accelerate >= 1.2 starts a tracker here, older ones in __init__
            tracker.start()
        if str(kind) != "tensorboard":  # its hparams table takes scalars only; the config is in trainer_state
            tracker.store_init_configuration(config)
        trackers.append(tracker)
    return trackers


class MetricsLog:
    """Rows `{"step": ..., <counters>, <values>}` appended to OUT/metrics.jsonl (whole rows only, even on a
    full disk) and sent to the trackers. Only the main process records (`enabled`)."""

    def __init__(
        self,
        out: Path,
        log_with: list[str],
        config: dict[str, Any],
        enabled: bool = True,
        digits: int | None = None,
    ):
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self.digits = digits  # round float values to this many digits (None: as they are)
        self.trackers = start_trackers(log_with, out, config) if enabled else []

    def record(self, step: int, counters: dict[str, Any], values: dict[str, Any]) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        if self.digits is not None:
            values = {k: (round(v, self.digits) if isinstance(v, float) else v) for k, v in values.items()}
        row = {"step": step, **counters, **values}
        append_line(self.path, json.dumps(row), "a metrics row")
        for tracker in self.trackers:
            tracker.log({k: v for k, v in row.items() if k != "step"}, step=step)
        return row

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def trim_metrics(path: Path, step: int) -> int:
    """Drop the rows of `path` (metrics.jsonl) after `step`, and any torn row: a resumed run redoes those
    steps and records them again, so that the file holds each step once. Returns how many were dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = json.loads(line)["step"]
            if not isinstance(row_step, int) or row_step > step:
                raise ValueError(row_step)
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        keep.append(line + "\n")
    if dropped:
        write_text(path, "".join(keep), "metrics.jsonl")
    return dropped


class ProgressBar:
    """A tqdm bar over steps (nothing when off). Under a time budget it ends at the step the budget is projected
    to reach at this session's pace, not at a max_steps set high to leave the budget in charge."""

    def __init__(self, enabled: bool, desc: str, step: int, max_steps: int, max_minutes: float | None):
        self.bar = None
        self.max_steps, self.max_minutes = max_steps, max_minutes
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=max_steps, initial=step, desc=desc, dynamic_ncols=True, file=sys.stderr, mininterval=2.0
            )

    def update(self, step: int, seconds_this_session: float, seconds: float, **postfix: str) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(refresh=False, **postfix)
        budget_bar_total(self.bar, self.max_minutes, self.max_steps, step, seconds_this_session, seconds)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def budget_bar_total(
    bar, max_minutes: float | None, max_steps: int, step: int, seconds_this_session: float, seconds: float
) -> None:
    """Set the bar's total to the step a time budget of `max_minutes` reaches at this session's pace (its
    `initial` step to `step` in `seconds_this_session`; `seconds` of the budget spent in all)."""
    if max_minutes is not None and step > bar.initial:
        per_step = max(1e-9, seconds_this_session) / (step - bar.initial)
        left = max(0.0, 60 * max_minutes - seconds)
        bar.total = min(max_steps, step + round(left / per_step))


def time_is_up(max_minutes: float | None, seconds: float) -> bool:
    """Whether a run with a budget of `max_minutes` of training time has spent it."""
    return max_minutes is not None and seconds > 60 * max_minutes
