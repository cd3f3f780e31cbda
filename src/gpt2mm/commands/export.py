"""`gpt2mm export onnx MODEL OUT`: the model as ONNX graphs that answer without PyTorch.

    gpt2mm export onnx runs/tiny/best onnx-tiny
    python onnx-tiny/run_onnx.py onnx-tiny --image scene.png "What color is the circle?"

Writes `vision.onnx`, `decoder.onnx` (with its key/value cache), `tokenizer.json`, `gpt2mm_onnx.json`,
`run_onnx.py` (needs onnxruntime, numpy, tokenizers and Pillow only) and `index.html` (the same in a browser,
with onnxruntime-web: `cd OUT && python -m http.server`); see `gpt2mm.export_onnx`. Before OUT
takes its name, `--check N` synthetic test questions are answered both ways: the ONNX answers must be
`gpt2mm ask`'s, token for token (greedy), or nothing is written. Needs `pip install 'gpt2-multimodal[onnx]'`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2mm.errors import UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=["onnx"], help="the export format (onnx)")
    parser.add_argument("model", help="model directory or hub id")
    parser.add_argument("out", type=Path, help="directory to write (absent or empty, unless --overwrite)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT (only once the export is checked)"
    )
    parser.add_argument(
        "--check",
        type=int,
        default=32,
        metavar="N",
        help="synthetic questions to compare with PyTorch (0: none)",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")


def run(args: argparse.Namespace) -> int:
    from gpt2mm.export_onnx import export_onnx

    if args.check < 0:
        raise UsageError("--check must be 0 or more")
    config, result = export_onnx(
        args.model, args.out, overwrite=args.overwrite, check=args.check, opset=args.opset
    )
    sizes = {p.name: p.stat().st_size for p in args.out.glob("*.onnx")}
    print(
        f"wrote {args.out}: vision.onnx ({sizes['vision.onnx'] / 1e6:.1f} MB), decoder.onnx "
        f"({sizes['decoder.onnx'] / 1e6:.1f} MB, {config['num_layers']} layers with their cache), run_onnx.py, "
        "index.html (the browser page: serve OUT over HTTP)"
    )
    if result is not None:
        print(
            f"checked: {result.same}/{result.questions} synthetic test questions answered as PyTorch answers them "
            f"(greedy, token for token); PyTorch {result.torch_seconds:.2f} s, onnxruntime {result.onnx_seconds:.2f} s"
        )
    print(f'try it: python {args.out / "run_onnx.py"} {args.out} --image IMAGE "QUESTION"')
    return 0
