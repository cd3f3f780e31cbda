"""A training run's curves as an image: the loss (stages 1 and 3) or the reward and KL (stage 2), with the
validation accuracy; `gpt2mm plot` (`gpt2mm.commands.plot`) and the demo draw them.

The output is a file whose extension names the format (.png, .pdf, .svg, ... : what matplotlib writes) or a
directory (an existing one, or a path ending in `/`), which gets `curves.png`; missing parent directories
are created.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gpt2mm.errors import UsageError

DEFAULT_NAME = "curves.png"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no metrics.jsonl: is it a gpt2mm training run directory?")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(path.read_text().splitlines()):  # a run killed mid-write leaves a partial last line
                break
            raise UsageError(f"{path}: line {n} is not JSON") from None
    return rows


def output_path(run_dir: Path, out: str | os.PathLike | None) -> Path:
    """The file `--out` means (see the module docstring); a `UsageError` for an extension matplotlib
    cannot write, or none at all (matplotlib would silently append `.png`)."""
    from matplotlib.backend_bases import FigureCanvasBase

    if out is None or str(out) == "":
        return run_dir / DEFAULT_NAME
    path = Path(out)
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        return path / DEFAULT_NAME
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    ext = path.suffix[1:].lower()
    names = ", ".join(f".{f}" for f in formats)
    if not ext:
        raise UsageError(
            f"--out {out}: no file extension; name a file ending in one of {names} "
            f"(or a directory, for {DEFAULT_NAME} in it)"
        )
    if ext not in formats:
        raise UsageError(
            f"--out {out}: .{ext} is not a format the plot can be written in; use one of {names}"
        )
    return path


def plot_run(run_dir: Path, out: str | os.PathLike | None = None) -> Path:
    """Draw the run's curves into `output_path(run_dir, out)` (parent directories created); the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = output_path(run_dir, out)
    rows = read_metrics(run_dir)
    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    reward = [(r["step"], r["reward"]) for r in rows if "reward" in r]  # a PPO run
    kl = [(r["step"], r["kl"]) for r in rows if "kl" in r]
    acc = [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if loss:
        ax.plot(*zip(*loss), color="tab:blue", label="train loss (answer tokens)")
        ax.set_ylabel("loss", color="tab:blue")
    elif reward:
        ax.plot(*zip(*reward), color="tab:blue", label="mean reward of sampled answers")
        if kl:
            ax.plot(*zip(*kl), "--", color="tab:gray", label="KL to the reference (per answer)")
        ax.set_ylabel("reward, KL", color="tab:blue")
        ax.legend(loc="upper left")
    ax.set_xlabel("update" if reward and not loss else "step")
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), "o-", color="tab:red", label="val VQA accuracy (%)")
        ax2.set_ylabel("val VQA accuracy (%)", color="tab:red")
        ax2.set_ylim(0, 100)
    ax.set_title(run_dir.name)
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write ({e})") from None
    finally:
        plt.close(fig)
    return out
