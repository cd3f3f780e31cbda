"""Faults a user meets, injected: each must end in a clear one-line message and a run that resumes to the
weights of an uninterrupted one.

- SIGKILL during an evaluation, then during a save; a save interrupted between its two renames.
- A full disk while a checkpoint is written (a simulated file system with little space left: the real
  writers see ENOSPC mid-file, as on a full disk), the real writers' own errors (a file-size limit set with
  RLIMIT_FSIZE: the kernel refuses the write), no permission, the output folder removed mid-run; the same
  for every other writer (`eval --out`, `tag export`, the feature cache, the reward model, metrics rows).
- A truncated and a bit-flipped checkpoint (with and without a manifest), an image that becomes unreadable
  in the middle of training, the tagging store's SQLite database killed mid-write.

Bounded in time: the tiny world and model of tests/test_train.py, six steps; the killed runs are forks of
this process (no second interpreter to start), and every training run here uses one thread so that the
forks compute exactly what this process does. A size-limited tmpfs would need root, hence the simulation.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SMALL
from gpt2mm.cli import main
from gpt2mm.data.synthetic import write_world
from gpt2mm.errors import DamagedFileError, WriteError
from gpt2mm.outputs import MANIFEST, verify_manifest

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo-sft.yaml"
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run here on one thread: the forked runs must compute bit for bit what this process computes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, n_train=24, n_val=6, n_test=6, seed=0)
    return root


def train_args(world: Path, out: Path, *extra: str) -> list[str]:
    """Six steps of 8, evaluated and saved every 2 (checkpoint-2, -4, -6, all kept), `best` at step 2."""
    return [
        "train", str(RECIPE), *SMALL,
        "--data.root", str(world), "--data.synth", "false", "--data.val_limit", "6",
        "--train.output_dir", str(out), "--train.batch_size", "8", "--train.max_steps", "6",
        "--train.warmup_steps", "2", "--train.eval_every", "2", "--train.save_every", "2", "--train.keep_last", "5",
        "--train.log_every", "1", "--train.progress", "false", "--train.log_with", "[]",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> Path:
    """The uninterrupted run every faulty one must end like."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(world, out)) == 0
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (a, b)


def metric_steps(run: Path) -> list[tuple[int, bool]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], "loss" in r) for r in rows]


def error_line(capsys) -> str:
    """The error the CLI printed: one line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("gpt2mm "), err
    return line


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


# --- SIGKILL ------------------------------------------------------------------------------------------------


def killed_at(argv: list[str], marker: Path, hang) -> None:
    """Run `gpt2mm argv` in a fork of this process in which `hang(marker)` has been installed (it makes the
    run touch `marker` and sleep at the chosen point); SIGKILL it once `marker` appears."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            hang(marker)
            main(argv)
        finally:
            os._exit(1)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            done, _ = os.waitpid(pid, os.WNOHANG)
            assert not done, "the run ended before the point where it was to be killed"
            assert time.monotonic() < deadline, "the run never reached the point where it was to be killed"
            time.sleep(0.02)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def hang_in_evaluation_at_step(step: int):
    def install(marker: Path) -> None:
        from gpt2mm.train.sft import SFTTrainer

        evaluate = SFTTrainer.evaluate

        def slow(self):
            if self.step == step:
                marker.touch()
                time.sleep(600)
            return evaluate(self)

        SFTTrainer.evaluate = slow

    return install


def hang_before_renaming(name: str):
    def install(marker: Path) -> None:
        import gpt2mm.outputs as outputs

        commit = outputs.commit_dir

        def slow(tmp, final):
            if final.name == name:
                marker.touch()
                time.sleep(600)
            commit(tmp, final)

        outputs.commit_dir = slow

    return install


def test_sigkill_in_an_evaluation_then_in_a_save_resumes_to_the_uninterrupted_weights(
    world, reference, tmp_path
):
    out = tmp_path / "run"
    # 1. killed while evaluating step 4: checkpoint-2, best (step 2) and metrics rows up to step 4 are there
    killed_at(train_args(world, out), tmp_path / "evaluating", hang_in_evaluation_at_step(4))
    assert sorted(p.name for p in out.iterdir()) == ["best", "checkpoint-2", "metrics.jsonl"]
    # 2. resumed, and killed while saving checkpoint-4: written in full, not yet renamed into place
    killed_at(train_args(world, out, "--resume"), tmp_path / "saving", hang_before_renaming("checkpoint-4"))
    assert (out / "checkpoint-4.tmp" / MANIFEST).is_file() and not (out / "checkpoint-4").exists()
    # 3. resumed to the end: checkpoint-2 again (a .tmp is never taken), the .tmp removed
    assert main(train_args(world, out, "--resume")) == 0
    assert not list(out.glob("*.tmp"))
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6", "best"):
        assert verify_manifest(out / name)
        assert_same_weights(reference / name, out / name)
    assert metric_steps(out) == metric_steps(reference)  # each step once: rows after a resume point dropped


def test_a_save_killed_between_its_two_renames_is_put_back(tmp_path):
    """`commit_dir` moves the old folder aside, then renames the new one in: a kill in between leaves
    `best.old` and `best.tmp` but no `best`; the next start puts `best.old` back and removes the rest."""
    from gpt2mm.train.checkpoints import clean_output_dir

    (tmp_path / "best.old").mkdir()
    (tmp_path / "best.old" / "model.safetensors").write_text("old")
    (tmp_path / "best.tmp").mkdir()
    (tmp_path / "checkpoint-4.old").mkdir()  # its replacement took the name: the old one is just removed
    (tmp_path / "checkpoint-4").mkdir()
    said: list[str] = []
    clean_output_dir(tmp_path, said.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoint-4"]
    assert (tmp_path / "best" / "model.safetensors").read_text() == "old"
    assert len(said) == 1 and "best: put back" in said[0]


# --- I/O failures while saving --------------------------------------------------------------------------------


class _Filling:
    """A file open for writing on a `FullDisk`: writes succeed while space is left, then the part that fits
    is written and the write fails with ENOSPC, as on a full disk."""

    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, data):
        n = len(data)
        if n <= self._disk.free:
            self._disk.free -= n
            return self._f.write(data)
        self._f.write(data[: self._disk.free])
        self._disk.free = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


class FullDisk:
    """A file system with `free` bytes left for the files whose path contains `where`. Python's `open` and
    safetensors' writer (the model weights) write to it; once it is full they fail as on a real full disk:
    OSError ENOSPC, and safetensors' `SafetensorError: Error while serializing: I/O error: No space left on
    device (os error 28)`. `error` makes opening such a file fail at once instead (e.g. PermissionError)."""

    def __init__(self, monkeypatch, where: str, free: int = 0, error: OSError | None = None):
        import safetensors.torch
        import transformers.modeling_utils
        from safetensors import SafetensorError

        self.where, self.free, self.error = where, free, error
        real_open, real_save = builtins.open, safetensors.torch.save_file

        def fake_open(file, mode="r", *args, **kwargs):
            ours = isinstance(file, (str, os.PathLike)) and where in str(file) and set(mode) & set("wax+")
            if ours and self.error is not None:
                raise type(self.error)(self.error.errno, self.error.strerror, str(file))
            f = real_open(file, mode, *args, **kwargs)
            return _Filling(f, self) if ours else f

        def fake_save_file(tensors, filename, metadata=None):
            if where not in str(filename):
                return real_save(tensors, filename, metadata)
            data = safetensors.torch.save(tensors, metadata)
            try:
                with fake_open(filename, "wb") as f:
                    f.write(data)
            except OSError as e:
                message = f"Error while serializing: I/O error: {e.strerror} (os error {e.errno})"
                raise SafetensorError(message) from None

        for module in (builtins, io):
            monkeypatch.setattr(module, "open", fake_open)
        monkeypatch.setattr(safetensors.torch, "save_file", fake_save_file)
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fake_save_file)


def assert_one_line_about(message: str, *words: str) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word in message, (word, message)


def test_disk_full_while_a_checkpoint_is_written_is_one_line_and_the_run_resumes(
    world, reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    FullDisk(
        monkeypatch, where="checkpoint-4.tmp", free=1_000_000
    )  # the disk fills while writing the weights
    assert run_cli(train_args(world, out)) == 2
    line = error_line(capsys)
    assert_one_line_about(
        line, "gpt2mm train: error: cannot write checkpoint-4", str(out / "checkpoint-4.tmp"),
        "No space left on device (ENOSPC)", f"free on {out}", "checkpoint-4.tmp was removed",
        "continue it from checkpoint-2 with --resume",
    )  # fmt: skip
    # nothing half-written; what was there is as it was
    assert sorted(p.name for p in out.iterdir()) == ["best", "checkpoint-2", "metrics.jsonl"]
    for name in ("best", "checkpoint-2"):
        assert verify_manifest(out / name)
        assert_same_weights(reference / name, out / name)
    assert metric_steps(out) == [s for s in metric_steps(reference) if s[0] <= 4]
    monkeypatch.undo()  # room again
    assert main(train_args(world, out, "--resume")) == 0
    assert_same_weights(reference / "checkpoint-6", out / "checkpoint-6")
    assert metric_steps(out) == metric_steps(reference)


@pytest.fixture(scope="module")
def tiny():
    from gpt2mm import build_model

    torch.manual_seed(0)
    return build_model("tiny")


@contextmanager
def file_size_limit(n_bytes: int):
    """The kernel refuses any write past `n_bytes` of a file (EFBIG): the real writers' real errors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("fault", ["no space", "file size limit", "no permission", "folder removed"])
def test_a_failed_save_names_path_what_and_free_space_and_leaves_the_rest(tiny, tmp_path, monkeypatch, fault):
    from gpt2mm.train.checkpoints import save_checkpoint

    model, processor = tiny

    def write_model(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    out = tmp_path / "run"
    out.mkdir()
    state = {"step": 1, "optimizer": {"m": torch.zeros(300_000)}}
    save_checkpoint(out, 1, write_model, state, keep_last=5)
    expected = ["cannot write checkpoint-2"]
    if fault == "no space":  # the trainer state (torch's writer) fills the disk
        FullDisk(monkeypatch, where="checkpoint-2.tmp/trainer_state.pt", free=100_000)
        expected += [str(out / "checkpoint-2.tmp" / "trainer_state.pt"), "No space left on device (ENOSPC)"]
    elif fault == "file size limit":  # the real safetensors writer, refused by the kernel
        expected += [str(out / "checkpoint-2.tmp"), "File too large (EFBIG)"]
    elif fault == "no permission":
        FullDisk(
            monkeypatch, where="checkpoint-2.tmp/config.json", error=PermissionError(13, "Permission denied")
        )
        expected += [str(out / "checkpoint-2.tmp" / "config.json"), "Permission denied (EACCES)"]
    else:
        shutil.rmtree(out)
        expected += [f"the folder {out} is gone", f"free on {tmp_path}"]
    with pytest.raises(WriteError) as e:
        if fault == "file size limit":
            with file_size_limit(1_000_000):
                save_checkpoint(out, 2, write_model, state, keep_last=5)
        else:
            save_checkpoint(out, 2, write_model, state, keep_last=5)
    assert_one_line_about(str(e.value), *expected, "free on")
    if fault != "folder removed":
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]  # no .tmp; the earlier one intact
        assert verify_manifest(out / "checkpoint-1")


def test_every_other_writer_fails_in_one_line_and_keeps_what_was_there(
    world, reference, tiny_pair, tmp_path, monkeypatch, capsys
):
    """`eval --out`, `tag export` (the commands), the feature cache, the reward model and a metrics row,
    each on a disk that fills while it writes: one line, nothing half-written, the earlier file intact."""
    from gpt2mm.data.features import FeatureCache
    from gpt2mm.reward.model import RewardModel
    from gpt2mm.tag import store
    from gpt2mm.train.logging import MetricsLog

    # gpt2mm eval --out: an earlier results file stays as it was
    results = tmp_path / "results.json"
    results.write_text("earlier")
    split = [
        "--questions",
        str(world / "val_questions.json"),
        "--annotations",
        str(world / "val_annotations.json"),
    ]
    split += ["--images", str(world / "images" / "val"), "--limit", "4"]
    with monkeypatch.context() as m:
        FullDisk(m, where="results.json", free=10)
        assert run_cli(["eval", str(reference / "best"), *split, "--out", str(results)]) == 2
    assert_one_line_about(error_line(capsys), "cannot write the --out file to", "ENOSPC", "free on")
    assert results.read_text() == "earlier" and sorted(tmp_path.iterdir()) == [results]

    # gpt2mm tag export
    db = tmp_path / "tags.sqlite"
    conn = store.open_db(db)
    image = str(next((world / "images" / "val").iterdir()))
    store.add_items(conn, [store.Item(str(i), image, f"q{i}?", "a") for i in range(20)])
    for i in range(1, 21):
        store.tag_item(conn, i, "t", "correct")
    conn.close()
    export = tmp_path / "tags.jsonl"
    with monkeypatch.context() as m:
        FullDisk(m, where="tags.jsonl", free=500)
        assert run_cli(["tag", "export", "--db", str(db), "--out", str(export)]) == 2
    assert_one_line_about(error_line(capsys), "cannot write the tag export to", "ENOSPC", "free on")
    assert not list(tmp_path.glob("*tags.jsonl*"))

    # the feature cache: an interrupted build leaves the earlier cache readable
    model, processor = tiny_pair
    images = sorted((world / "images" / "train").iterdir())
    cache = FeatureCache(tmp_path / "cache", model, processor)
    assert cache.build(images[:2]) == 2
    before = [cache[p].clone() for p in images[:2]]
    with monkeypatch.context() as m:
        FullDisk(m, where=str(tmp_path / "cache"), free=100)
        with pytest.raises(WriteError, match="cannot write the feature cache's features .*ENOSPC"):
            cache.build(images[2:4])
    again = FeatureCache(tmp_path / "cache", model, processor)
    assert all(torch.equal(again[p], b) for p, b in zip(images[:2], before)) and images[2] not in again
    assert not list(cache.dir.glob("*.tmp"))

    # the reward model (`reward train` writes it the same way): the earlier one stays whole
    reward = RewardModel(model, processor)
    reward.save_pretrained(tmp_path / "reward")
    with monkeypatch.context() as m:
        FullDisk(m, where="reward.tmp", free=10_000)
        with pytest.raises(WriteError, match="cannot write the reward model to .*reward.tmp.*ENOSPC"):
            reward.save_pretrained(tmp_path / "reward")
    assert verify_manifest(tmp_path / "reward") and not (tmp_path / "reward.tmp").exists()

    # a metrics row is whole or not there: a write cut short is cut back off
    log = MetricsLog(tmp_path, [], {})
    log.record(1, {}, {"loss": 1.0})
    real_write = os.write

    def short_then_full(fd, data):
        if len(data) > 10:
            return real_write(fd, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "write", short_then_full)
        with pytest.raises(WriteError, match="cannot write a metrics row"):
            log.record(2, {}, {"loss": 0.5})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_ppo_and_reward_train_on_a_filling_disk_end_in_one_line_and_keep_what_was_there(
    world, reference, tmp_path, monkeypatch, capsys
):
    """The two other training commands, end to end: `gpt2mm ppo` whose second checkpoint meets a full disk
    (the policy's weights or its value head), then resumes; `gpt2mm reward train` whose output cannot be
    written, with an earlier reward model in its place."""
    ppo_recipe = RECIPE.parent / "tiny-ppo.yaml"

    def ppo(out: Path, *extra: str) -> list[str]:
        return [
            "ppo", str(ppo_recipe), "--model.init_from", str(reference / "best"), "--data.root", str(world),
            "--data.val_limit", "4", "--train.output_dir", str(out), "--train.max_steps", "4",
            "--train.max_minutes", "none", "--rollout.prompts", "4", "--train.minibatch_size", "4",
            "--train.eval_every", "2", "--train.save_every", "2", "--train.keep_last", "3",
            "--train.progress", "false", "--train.log_with", "[]", "--train.precision", "fp32", *extra,
        ]  # fmt: skip

    full = tmp_path / "ppo-full"
    assert main(ppo(full)) == 0
    for where, free in [("checkpoint-4.tmp/model", 20_000), ("checkpoint-4.tmp/value_head", 100)]:
        out = tmp_path / f"ppo-{free}"
        with monkeypatch.context() as m:
            FullDisk(m, where=where, free=free)
            assert run_cli(ppo(out)) == 2
        assert_one_line_about(
            error_line(capsys), "gpt2mm ppo: error: cannot write checkpoint-4", "ENOSPC", f"free on {out}",
            "checkpoint-4.tmp was removed", "continue it from checkpoint-2 with --resume",
        )  # fmt: skip
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["best", "checkpoint-2"]
        assert verify_manifest(out / "checkpoint-2")
        assert_same_weights(full / "checkpoint-2", out / "checkpoint-2")
        assert main(ppo(out, "--resume")) == 0  # room again: the same weights as the run that never failed
        assert_same_weights(full / "checkpoint-4", out / "checkpoint-4")

    tags = tmp_path / "tags.jsonl"
    assert main(["reward", "simulate", "--world", str(world), "--split", "train", "--out", str(tags)]) == 0
    rm = tmp_path / "rm"
    train = ["reward", "train", "--tags", str(tags), "--holdout", "0.25", "--base", str(reference / "best"),
             "--out", str(rm), "--steps", "2", "--batch-size", "8", "--no-progress"]  # fmt: skip
    assert main(train) == 0
    before = weights(rm)
    capsys.readouterr()
    with monkeypatch.context() as m:
        FullDisk(m, where="rm.tmp", free=20_000)
        assert run_cli([*train, "--overwrite"]) == 2  # over the earlier model, which must survive
    assert_one_line_about(
        error_line(capsys), "gpt2mm reward: error: cannot write the reward model to", "ENOSPC", "free on",
        "rm is as it was",
    )  # fmt: skip
    assert verify_manifest(rm) and not (tmp_path / "rm.tmp").exists()
    after = weights(rm)
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- damaged checkpoints ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no manifest"])
def test_a_truncated_newest_checkpoint_is_skipped_and_the_run_resumes(
    world, reference, tmp_path, capsys, manifest
):
    """--resume without a path takes the newest checkpoint that verifies; one written before manifests
    (none here) is taken only if it can be read."""
    out = tmp_path / "run"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("checkpoint-6"))
    if not manifest:
        for name in ("checkpoint-2", "checkpoint-4"):
            (out / name / MANIFEST).unlink()
    victim = out / "checkpoint-4" / "model.safetensors"
    size = victim.stat().st_size
    os.truncate(victim, size // 2)
    assert main(train_args(world, out, "--resume")) == 0
    said = capsys.readouterr().out
    skipped = next(line for line in said.splitlines() if line.startswith("--resume: skipped"))
    why = f"{size // 2:,} bytes, its manifest says {size:,} (truncated)" if manifest else "cannot be read"
    assert skipped.startswith(f"--resume: skipped checkpoint-4: {victim}: ") and why in skipped, skipped
    assert skipped.endswith("set aside as checkpoint-4.damaged")
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in said
    assert_same_weights(reference / "checkpoint-6", out / "checkpoint-6")
    assert_same_weights(reference / "checkpoint-4", out / "checkpoint-4")  # written again
    with pytest.raises(DamagedFileError, match=f"{out / 'checkpoint-4.damaged'}/model.safetensors"):
        from gpt2mm.loading import load_model

        load_model(out / "checkpoint-4.damaged")


@pytest.mark.parametrize("file", ["model.safetensors", "trainer_state.pt"])
def test_a_bit_flipped_checkpoint_is_named_by_resume_and_by_load_model(
    world, reference, tmp_path, capsys, file
):
    from gpt2mm.loading import load_model

    ckpt = tmp_path / "run" / "checkpoint-4"
    shutil.copytree(reference / "checkpoint-4", ckpt)
    data = bytearray((ckpt / file).read_bytes())
    data[len(data) * 2 // 3] ^= 0x10  # one bit, in the middle of the tensors
    (ckpt / file).write_bytes(bytes(data))
    assert run_cli(train_args(world, ckpt.parent, "--resume", str(ckpt))) == 2
    line = error_line(capsys)
    assert_one_line_about(
        line, f"gpt2mm train: error: --resume {ckpt}: damaged: {ckpt / file}: its SHA-256 differs from its manifest's",
        "--resume without a path",
    )  # fmt: skip
    if file == "model.safetensors":
        with pytest.raises(DamagedFileError, match="SHA-256 differs"):
            load_model(ckpt)
        load_model(ckpt, verify=False)  # the flip is in the data: it parses, and would load silently


# --- bad data mid-run ----------------------------------------------------------------------------------------


def test_an_image_unreadable_mid_training_is_named_and_the_run_resumes(
    reference, tmp_path, monkeypatch, capsys
):
    from gpt2mm.train.sft import SFTTrainer

    world = tmp_path / "world"
    write_world(world, n_train=24, n_val=6, n_test=6, seed=0)  # the module's world, to damage
    images = sorted((world / "images" / "train").iterdir())
    saved = {p: p.read_bytes() for p in images}
    step = SFTTrainer.train_step

    def damage_after_step_3(self):
        if self.step == 3:  # a disk or a sync job damages the image files under the running job
            for p in images:
                p.write_bytes(saved[p][:40])
        return step(self)

    out = tmp_path / "run"
    args = train_args(world, out, "--data.cache_pixels", "false")
    with monkeypatch.context() as m:
        m.setattr(SFTTrainer, "train_step", damage_after_step_3)
        assert run_cli(args) == 2
    line = error_line(capsys)
    assert str(world / "images" / "train") in line and ".png" in line
    assert line.endswith(
        "the run stopped after step 3: once that is fixed, continue it from checkpoint-2 with --resume"
    )
    for p, data in saved.items():
        p.write_bytes(data)
    assert main([*args, "--resume"]) == 0
    assert_same_weights(reference / "checkpoint-6", out / "checkpoint-6")


# --- the tagging store, killed mid-write ---------------------------------------------------------------------

# A writer that imports only gpt2mm.tag.store (the package's __init__ would import torch: seconds per start).
# It claims and tags items like the app does, printing each item id once its transaction is committed.
TAGGER = """
import sys, time, types
pkg = types.ModuleType("gpt2mm"); pkg.__path__ = [sys.argv[1]]; sys.modules["gpt2mm"] = pkg
from gpt2mm.tag import store
conn = store.connect(sys.argv[2])
if sys.argv[3] == "items":  # add items in transactions of 500
    n = int(sys.argv[4])
    while True:
        store.add_items(conn, [store.Item(f"q{n + i}", "img.png", "q?", "a") for i in range(500)])
        n += 500
        print(n, flush=True)
while True:
    item = store.claim_next(conn, sys.argv[3], time.time(), 300)
    store.tag_item(conn, item.item_id, sys.argv[3], "correct" if item.item_id % 2 else "incorrect")
    print(item.item_id, flush=True)
"""


def killed_writer(db: Path, *args: str) -> list[int]:
    """Start the writer, SIGKILL it at a random moment after its first commits; the ids it acknowledged."""
    proc = subprocess.Popen(
        [sys.executable, "-c", TAGGER, str(SRC / "gpt2mm"), str(db), *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked = [int(proc.stdout.readline())]
    time.sleep(random.uniform(0.0, 0.15))
    proc.send_signal(signal.SIGKILL)
    acked += [int(line) for line in proc.stdout.read().split()]
    proc.wait()
    return acked


def test_the_tag_store_killed_mid_write_loses_and_doubles_nothing(tmp_path):
    from gpt2mm.tag import store

    random.seed(0)
    db = tmp_path / "tags.sqlite"
    store.open_db(db).close()

    def count_items() -> int:
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            return conn.execute("SELECT count(*) FROM items").fetchone()[0]
        finally:
            conn.close()

    for _ in range(3):  # killed while adding items: whole transactions only
        acked = killed_writer(db, "items", str(count_items()))
        assert count_items() in (acked[-1], acked[-1] + 500)
    tagged: set[int] = set()
    for round_ in range(4):  # killed while claiming and tagging
        acked = killed_writer(db, f"tagger{round_ % 2}")
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT item_id FROM tags").fetchall()
        conn.close()
        ids = [r[0] for r in rows]
        assert len(ids) == len(set(ids))  # no item tagged twice (another tagger never gets a done item)
        assert tagged | set(acked) <= set(ids)  # nothing acknowledged is lost
        assert len(set(ids) - tagged - set(acked)) <= 1  # at most the commit the kill cut off from its print
        tagged = set(ids)
    assert len(tagged) > 8
