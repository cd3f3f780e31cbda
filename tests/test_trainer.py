"""The loop every stage inherits (gpt2mm.train.trainer.Trainer), on a stand-in stage with no model: when rows
are logged, evaluation runs, `best` and checkpoints are written, and why a run stops."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

import gpt2mm.train.trainer as trainer_module
from gpt2mm.train.config import RunConfig
from gpt2mm.train.trainer import Trainer


@dataclass
class Recipe:
    train: RunConfig = field(default_factory=RunConfig)


class Stage(Trainer):
    """Steps that cost nothing; validation accuracies from a list; a model file per save."""

    def __init__(self, out, accuracies, **train):
        train = {"log_with": [], "progress": False, "warmup_steps": 0, **train}
        self.init_run(Recipe(RunConfig(output_dir=str(out), **train)), out, log=lambda m: None)
        self.accuracies = list(accuracies)
        state = SimpleNamespace(state_dict=lambda: {})
        self.optimizer, self.scheduler = state, state
        out.mkdir(parents=True, exist_ok=True)

    def train_step(self):
        return {"loss": float(self.step + 1)}, 4

    def evaluate(self):
        return self.accuracies.pop(0)

    def write_model(self, out):
        (out / "model.txt").write_text(str(self.step))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_plain_run_logs_evaluates_saves_and_ends_at_max_steps(tmp_path):
    s = Stage(tmp_path, [50.0, 70.0, 60.0], max_steps=6, log_every=2, eval_every=2, save_every=3, keep_last=5)
    summary = s.train()
    assert summary["stop_reason"] == "max_steps" and summary["steps"] == 6 and summary["samples_seen"] == 24
    assert [(r["step"], "loss" in r) for r in rows(tmp_path)] == [
        (2, True), (2, False), (4, True), (4, False), (6, True), (6, False),
    ]  # fmt: skip
    assert s.best == 70.0 and (tmp_path / "best" / "model.txt").read_text() == "4"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_early_stopping_keeps_the_last_steps_row(tmp_path):
    s = Stage(
        tmp_path, [50.0, 40.0, 30.0], max_steps=20, log_every=5, eval_every=3, early_stopping_patience=2
    )
    assert s.train()["stop_reason"] == "early_stopping" and s.step == 9
    steps = [(r["step"], "loss" in r) for r in rows(tmp_path)]
    assert steps == [
        (3, False),
        (5, True),
        (6, False),
        (9, False),
        (9, True),
    ]  # the stop's row after its eval


@pytest.mark.parametrize("at_stop", [False, True], ids=["sft", "ppo"])
def test_a_time_budget_stop_evaluates_only_where_the_stage_says(tmp_path, monkeypatch, at_stop):
    monkeypatch.setattr(trainer_module, "time_is_up", lambda minutes, seconds: s.step >= 5)
    s = Stage(tmp_path, [50.0, 60.0], max_steps=100, max_minutes=1.0, log_every=4, eval_every=4)
    s.evaluate_at_time_stop = at_stop
    assert s.train()["stop_reason"] == "max_minutes" and s.step == 5
    expected = (
        [(4, True), (4, False), (5, True), (5, False)] if at_stop else [(4, True), (4, False), (5, True)]
    )
    assert [(r["step"], "loss" in r) for r in rows(tmp_path)] == expected
    assert (tmp_path / "checkpoint-5" / "trainer_state.pt").is_file()  # the final checkpoint


def test_a_stop_by_time_and_patience_at_once_is_the_time_budgets(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "time_is_up", lambda minutes, seconds: s.step >= 4)
    s = Stage(tmp_path, [50.0, 40.0], max_steps=100, max_minutes=1.0, eval_every=2, early_stopping_patience=1)
    assert s.train()["stop_reason"] == "max_minutes" and s.step == 4


def test_default_tracker_starts_without_an_accelerator_state(tmp_path):
    """TensorBoard, the default tracker, in a process that started no accelerator (PPO, the reward trainer):
    a tracker when its package is there, left out quietly when not; never accelerate's state error."""
    import subprocess
    import sys

    code = (
        "from pathlib import Path; from accelerate.tracking import get_available_trackers;"
        "from gpt2mm.train.logging import start_trackers;"
        f"t = start_trackers(['tensorboard'], Path({str(tmp_path)!r}), {{}});"
        "have = 'tensorboard' in {str(k) for k in get_available_trackers()};"
        "assert len(t) == int(have), (t, have); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_schedules_follow_their_formulas_by_steps_and_by_the_clock(schedule):
    """Each schedule's multiplier, step by step, against its formula written out (warmup, then the decay to
    min_lr_ratio); wsd: the peak until the last decay_fraction of the steps after warmup, then a straight line.
    With a time budget the clock moves the decay on when it is ahead of the steps."""
    import math

    from gpt2mm.train.optim import lr_lambda

    cfg = RunConfig(schedule=schedule, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, decay_fraction=0.25)
    f = lr_lambda(cfg)

    def expected(step: int, done: float) -> float:  # done: the share of the 100 steps after warmup
        if step < 10:
            return (step + 1) / 11
        decay = {
            "cosine": (1 + math.cos(math.pi * done)) / 2,
            "linear": 1 - done,
            "constant": 1.0,
            "wsd": 1.0 if done <= 0.75 else (1 - done) / 0.25,
        }[schedule]
        return 1.0 if schedule == "constant" else 0.1 + 0.9 * decay

    for step in range(0, 121):
        assert f(step) == pytest.approx(expected(step, min(1, (step - 10) / 100)), abs=1e-12), step
    if schedule == "wsd":
        assert [round(f(s), 6) for s in (10, 85, 90, 110)] == [1.0, 1.0, 0.82, 0.1]
    # a 10-minute budget: at 9 minutes (90% of it) the decay is where step 100 of 110 would put it
    timed = lr_lambda(RunConfig(**{**vars(cfg), "max_minutes": 10.0}), elapsed=lambda: 540.0)
    assert timed(20) == pytest.approx(expected(20, 0.9), abs=1e-12)
    with pytest.raises(ValueError, match="train.decay_fraction"):
        RunConfig(schedule="wsd", decay_fraction=0).check()


def glibc_heap() -> bool:
    from gpt2mm.train.heap import _malloc_trim, resident_bytes

    return _malloc_trim() is not None and resident_bytes() is not None


@pytest.mark.skipif(not glibc_heap(), reason="needs Linux with glibc (malloc_trim, /proc/self/statm)")
def test_the_heap_trimmer_gives_freed_heap_memory_back_once_it_has_grown():
    """Blocks freed between live ones stay in the process (glibc keeps the holes) until malloc_trim: the
    trimmer trims once the resident size is `growth` above its floor, and the resident size falls.

    Run in a fresh interpreter: late in the suite this process's heap already holds freed holes, which
    would serve the test's blocks without the resident size rising."""
    code = """
from gpt2mm.train.heap import HeapTrimmer, resident_bytes

mib = 2**20
trim = HeapTrimmer(growth=64 * mib)
assert not trim() and trim.floor is not None  # the first call sets the floor
blocks = [bytearray(64 * 1024) for _ in range(4096)]  # 256 MiB from the heap (below the mmap threshold)
kept = blocks[7::8]  # one block in eight stays live: the freed ones are holes, not the heap's top
del blocks
held = resident_bytes()
assert held >= trim.floor + 64 * mib, (held, trim.floor)  # the holes are still resident
assert trim() and trim.trims == 1
after = resident_bytes()
assert after < held - 128 * mib, (after, held)  # most of the 224 MiB freed went back to the system
assert not trim() and not trim()  # a new floor, then no growth: nothing to do
assert len(kept) == 512
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_heap_trimmer_waits_its_interval_between_trims(monkeypatch):
    """However often the size grows, trims come at least `interval` seconds apart (each costs the page faults of
    a working set that comes back); growth is still what starts one."""
    import gpt2mm.train.heap as heap

    trimmed, now, size, grows = [], [0.0], [1000], [True]

    def resident():
        size[0] += 100 if grows[0] else 0  # `growth` more at every call while it grows
        return size[0]

    monkeypatch.setattr(heap, "_malloc_trim", lambda: trimmed.append)
    monkeypatch.setattr(heap, "resident_bytes", resident)
    trim = heap.HeapTrimmer(growth=100, interval=60.0, clock=lambda: now[0])
    assert not trim()  # the first call sets the floor
    assert trim() and trimmed == [0]  # grown, and no trim before: trims at once
    at = []
    for second in range(1, 181):
        now[0] = float(second)
        if trim():
            at.append(second)
    assert at == [60, 120, 180]  # grown at every call, trimmed once a minute
    grows[0] = False
    for second in range(181, 1000):  # no growth: no trim, however long it waits
        now[0] = float(second)
        assert not trim()
    assert trim.trims == len(trimmed) == 4


def test_the_loop_trims_the_heap_once_a_step_and_never_where_there_is_no_glibc(tmp_path, monkeypatch):
    import gpt2mm.train.heap as heap

    trimmers = []

    class Counted(heap.HeapTrimmer):
        def __init__(self):
            super().__init__(growth=-(2**40), interval=0.0)  # any size counts as grown: trim whenever allowed
            self.calls = 0
            trimmers.append(self)

        def __call__(self):
            self.calls += 1
            return super().__call__()

    monkeypatch.setattr(trainer_module, "HeapTrimmer", Counted)
    Stage(tmp_path / "a", [], max_steps=6, eval_every=0).train()
    assert trimmers[0].calls == 6 and trimmers[0].trims == (
        3 if glibc_heap() else 0
    )  # floor, trim, floor, ...
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    Stage(tmp_path / "b", [], max_steps=6, eval_every=0).train()
    assert trimmers[1].calls == 6 and trimmers[1].trims == 0
