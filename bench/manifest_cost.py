"""What a checkpoint's manifest costs: writing a ~1 GB checkpoint (weights with safetensors, an optimizer-like
state with torch) against hashing it for `manifest.json` and checking it again, as `--resume` does.

    python bench/manifest_cost.py [--gb 1.0] [--dir /tmp]

Prints one line: the seconds of each part (the flush to disk, `os.sync`, timed apart).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpt2mm.outputs import torch_save, verify_manifest, write_manifest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size, half weights, half state")
    parser.add_argument("--dir", default=None, help="where to write it (default: the system's temp folder)")
    args = parser.parse_args()
    n = max(1, round(args.gb * 1e9 / 2 / (1024 * 16384 * 4)))  # 64 MB float32 tensors per half
    torch.manual_seed(0)
    weights = {f"w{i}": torch.randn(1024, 16384) for i in range(n)}
    state = {"exp_avg": [torch.randn(1024, 16384) for _ in range(n)]}
    folder = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        times = {}
        t = time.perf_counter()
        save_file(weights, str(folder / "model.safetensors"))
        times["safetensors"] = time.perf_counter() - t
        t = time.perf_counter()
        torch_save(state, folder / "trainer_state.pt")
        times["torch.save"] = time.perf_counter() - t
        t = time.perf_counter()
        os.sync()
        times["sync"] = time.perf_counter() - t
        t = time.perf_counter()
        write_manifest(folder)
        times["manifest (sha256)"] = time.perf_counter() - t
        t = time.perf_counter()
        verify_manifest(folder)
        times["verify"] = time.perf_counter() - t
        size = sum(p.stat().st_size for p in folder.iterdir()) / 1e9
    finally:
        shutil.rmtree(folder)
    print(f"{size:.2f} GB: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
