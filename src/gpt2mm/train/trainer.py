"""The loop every stage's trainer inherits: steps until `max_steps` or the time budget, metrics rows, periodic
evaluation that keeps `best`, early stopping, periodic checkpoints, the counters a checkpoint holds for an
exact `--resume`, and the freed heap memory handed back to the system as the run goes (`heap.HeapTrimmer`).

A stage subclasses `Trainer` and provides `train_step()` (one update: returns its metrics row and the samples
it took), `evaluate()` (validation accuracy, percent) and `write_model(dir)`; SFT overrides `save` for FSDP."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpt2mm.errors import DataError, WriteError, add_hint
from gpt2mm.train.checkpoints import list_checkpoints, rng_state, save_checkpoint, set_rng_state
from gpt2mm.train.heap import HeapTrimmer
from gpt2mm.train.logging import MetricsLog, ProgressBar, time_is_up, trim_metrics


class Trainer:
    """State and loop shared by the stages. A subclass calls `init_run` first (the config, with a `train`
    section, the output folder and the counters), then sets up `optimizer` and `scheduler`."""

    # the counters a checkpoint holds (trainer_state.pt); a subclass adds its own data position
    COUNTERS: tuple[str, ...] = ("step", "samples_seen", "train_seconds", "best", "evals_without_gain")
    desc = "train"  # the progress bar's label
    step_name = "step"  # how the log names one update
    samples_name = "samples_seen"  # the counter's name in metrics rows and the summary
    rate_name: str | None = None  # a logged throughput over the logging window (samples per second)
    evaluate_at_time_stop = False  # whether the step the time budget ends on is evaluated (and logged) first

    def init_run(self, cfg: Any, out: Path, log=print, main: bool = True) -> None:
        self.cfg, self.out, self.log, self.main = cfg, out, log, main
        self.step = 0
        self.samples_seen = 0
        self.train_seconds = 0.0
        self.best: float | None = None
        self.evals_without_gain = 0
        self.metrics: MetricsLog | None = None
        self.history: list[dict[str, Any]] = []

    # --- what a stage provides ---

    def train_step(self) -> tuple[dict[str, Any], int]:
        raise NotImplementedError

    def evaluate(self) -> float:
        raise NotImplementedError

    def write_model(self, out: Path) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the counters, optimizer, schedule, RNG and config."""
        return {}

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        """The progress bar's figures for a step's row."""
        return {"loss": f"{row['loss']:.4f}"} if "loss" in row else {}

    def on_train_begin(self) -> None:
        """Called once before the first step of `train` (PPO: the starting model's validation accuracy)."""

    def summary(self, stop_reason: str) -> dict[str, Any]:
        return {
            "steps": self.step,
            self.samples_name: self.samples_seen,
            "train_seconds": round(self.train_seconds, 2),
            "best_val_accuracy": self.best,
            "stop_reason": stop_reason,
        }

    def has_validation(self) -> bool:
        return True

    # --- the loop ---

    def train(self) -> dict[str, Any]:
        t = self.cfg.train
        self.metrics = MetricsLog(
            self.out, t.log_with, asdict(self.cfg), enabled=self.main, digits=self.digits
        )
        self.on_train_begin()
        bar = ProgressBar(t.progress and self.main, self.desc, self.step, t.max_steps, t.max_minutes)
        stop_reason = "max_steps"
        seconds_at_start = self.train_seconds
        window_samples, window_start = 0, time.perf_counter()
        trim_heap = HeapTrimmer()
        try:
            while self.step < t.max_steps:
                start = time.perf_counter()
                row, samples = self.train_step()
                trim_heap()  # inside the step's time: the budget pays for it
                self.step += 1
                self.samples_seen += samples
                self.train_seconds += time.perf_counter() - start
                window_samples += samples
                if self.rate_name:
                    row[self.rate_name] = window_samples / max(1e-9, time.perf_counter() - window_start)
                bar.update(
                    self.step, self.train_seconds - seconds_at_start, self.train_seconds, **self.postfix(row)
                )
                logged, stop = self._after_step(row)
                if logged:
                    window_samples, window_start = 0, time.perf_counter()
                if stop:
                    stop_reason = stop
                    break
            bar.close()
            self.save()
        except (WriteError, DataError) as e:  # a full disk, an image unreadable mid-run: say how to go on
            add_hint(e, self.resume_hint())
            raise
        finally:
            bar.close()
        self.metrics.close()
        summary = self.summary(stop_reason)
        self.log(f"done: {json.dumps(summary)}")
        return summary

    def _after_step(self, row: dict[str, Any]) -> tuple[bool, str | None]:
        """Log, evaluate (keeping `best`), save and check the time budget, in that order, as the intervals say.
        Returns (whether the row was logged, the reason to stop or None); the last step's row is always on
        record. The step a time budget ends on is evaluated first only where `evaluate_at_time_stop` (PPO)."""
        t = self.cfg.train
        time_up = time_is_up(t.max_minutes, self.train_seconds)
        final = self.step == t.max_steps or (time_up and self.evaluate_at_time_stop)
        logged = self.step % t.log_every == 0 or final
        if logged:
            self.record(row)
        stop = None
        due = bool(t.eval_every) and (self.step % t.eval_every == 0 or final)
        if due and self.has_validation() and self.evaluate_and_keep_best():
            stop = "early_stopping"
        if t.save_every and self.step % t.save_every == 0:
            self.save()
        if time_up:
            stop = "max_minutes"
        if stop and not logged:
            self.record(row)
            logged = True
        return logged, stop

    def evaluate_and_keep_best(self) -> bool:
        """Validation accuracy on record; a new best saved as `best`. True when early stopping's patience ran out."""
        acc = self.evaluate()
        self.record({"val_accuracy": acc})
        if self.best is None or acc > self.best:
            self.best = acc
            self.evals_without_gain = 0
            self.save(best=True)
        else:
            self.evals_without_gain += 1
        patience = getattr(self.cfg.train, "early_stopping_patience", 0)
        return bool(patience and self.evals_without_gain >= patience)

    digits: int | None = None  # round the metrics' float values (None: as they are)

    def record(self, values: dict[str, Any]) -> None:
        counters = {self.samples_name: self.samples_seen, "train_seconds": round(self.train_seconds, 3)}
        row = self.metrics.record(self.step, counters, values) if self.metrics else None
        if row is not None:
            self.history.append(row)
        if "val_accuracy" in values and self.main:
            self.log(f"{self.step_name} {self.step}: val accuracy {values['val_accuracy']:.2f}%")

    # --- checkpoints ---

    def checkpoint_state(self, optimizer_state: dict | None = None) -> dict[str, Any]:
        """trainer_state.pt: the counters, optimizer, schedule, RNG, config and the stage's extras."""
        return {
            **{key: getattr(self, key) for key in self.COUNTERS},
            "optimizer": self.optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            **self.extra_state(),
            "rng": rng_state(),
            "config": asdict(self.cfg),
        }

    def resume_hint(self) -> str:
        """Where a run that failed mid-way stands: the checkpoint `--resume` would continue from."""
        found = list_checkpoints(self.out) if self.main else []
        where = f"the run stopped after {self.step_name} {self.step}"
        if not found:
            return f"{where}, before its first checkpoint: start it again (with --train.overwrite true)"
        return f"{where}: once that is fixed, continue it from {found[-1].name} with --resume"

    def save(self, best: bool = False) -> None:
        """`best` (weights only) or `checkpoint-STEP`, written atomically; older checkpoints pruned."""
        state = None if best else self.checkpoint_state()
        save_checkpoint(self.out, self.step, self.write_model, state, self.cfg.train.keep_last)

    def restore_counters(self, path: Path, state: dict[str, Any]) -> None:
        """The counters and RNG of a checkpoint (a counter an older checkpoint lacks keeps its start value);
        metrics rows after its step, which the resumed run records again, are dropped."""
        for key in self.COUNTERS:
            setattr(self, key, state.get(key, getattr(self, key)))
        set_rng_state(state["rng"])
        self.log(f"resumed from {path} at {self.step_name} {self.step}")
        dropped = trim_metrics(self.out / "metrics.jsonl", self.step) if self.main else 0
        if dropped:
            self.log(f"metrics.jsonl: dropped {dropped} rows after {self.step_name} {self.step} (redone now)")
