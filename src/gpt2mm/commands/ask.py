"""`gpt2mm ask MODEL --image PATH "question"`: one answer on the command line.

Several images: `--image` once per image, in order; each stands where the question's `<image>` placeholders
do (`gpt2mm ask MODEL --image a.jpg --image b.jpg "Compare <image> and <image> ."`), or, without
placeholders, all before the question.

Goes through the same `Engine.generate` as the server, so an answer here is the answer the API gives for the
same settings. `--stream` prints the text as it is generated.
"""

from __future__ import annotations

import argparse
import sys

from gpt2mm.errors import DataError, UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory or hub id")
    parser.add_argument(
        "question", help="the question about the image (not empty); <image> marks where each image stands"
    )
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        help="image file; repeat for several, in the order of the question's <image> placeholders "
        "(omit for a text-only question)",
    )
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    from gpt2mm.serve.engine import add_engine_arguments

    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from gpt2mm.data.images import load_image
    from gpt2mm.data.samples import IMAGE_PLACEHOLDER
    from gpt2mm.serve.engine import SamplingParams, load_engine

    if not args.question.replace(IMAGE_PLACEHOLDER, "").strip():
        raise UsageError(
            "the question is empty: ask something"
            + (" about the image, e.g. 'Describe the image in detail.'" if args.image else "")
        )
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if not 0 <= args.temperature <= 100 or not 0 < args.top_p <= 1:
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    placed = args.question.count(IMAGE_PLACEHOLDER)
    if placed and placed != len(args.image):
        raise UsageError(
            f"the question holds {placed} {IMAGE_PLACEHOLDER} placeholders but {len(args.image)} --image "
            "files were given (one per placeholder, or no placeholder)"
        )
    try:
        images = [load_image(path) for path in args.image]
    except DataError as e:
        raise UsageError(str(e)) from e
    engine = load_engine(args.model, args.device, args.dtype, args.compile)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )

    def show(_: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        request = engine.ask(args.question, images, params, on_delta=show if args.stream else None)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.stream:
        print()
    else:
        print(request.choices[0].text)
    return 0
