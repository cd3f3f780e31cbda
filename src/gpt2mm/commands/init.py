"""`gpt2mm init --preset tiny OUT_DIR`: write a ready-to-load model + processor.

Random weights from the preset's embedded config (offline); `--pretrained` loads the preset's
backbones instead (hub ids or directories, so a network or a local copy is needed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2mm.errors import UsageError
from gpt2mm.presets import PRESETS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="directory to write (must be empty or absent)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size")
    parser.add_argument("--pretrained", action="store_true", help="load the preset's pretrained backbones")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the random weights")


def run(args: argparse.Namespace) -> int:
    import torch

    from gpt2mm.hub import preset_backbones, save_model
    from gpt2mm.loading import build_model

    out: Path = args.out_dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory; choose another path")
    torch.manual_seed(args.seed)
    try:
        model, processor = build_model(args.preset, pretrained=args.pretrained)
    except ValueError as e:
        raise UsageError(str(e)) from e
    vision, text = preset_backbones(args.preset, args.pretrained)
    save_model(
        model,
        processor,
        out,
        stage="init",
        vision_backbone=vision,
        text_backbone=text,
        random_init=vision is None,
    )
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.preset} model ({n / 1e6:.1f}M parameters) and processor to {out}")
    return 0
