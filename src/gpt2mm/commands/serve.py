"""`gpt2mm serve MODEL`: an OpenAI-compatible HTTP API and a web page, with dynamic batching.

    gpt2mm serve ./my-model --port 8000 [--api-key KEY]

The flags become a `ServerSettings` (nonsense limits and allow-list entries refused here, exit code 2);
the app and its endpoints are `gpt2mm.serve.api`, the limits and what they refuse `gpt2mm.serve.prepare`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from urllib.parse import urlsplit

from gpt2mm.errors import UsageError
from gpt2mm.serve.api import create_app
from gpt2mm.serve.engine import add_engine_arguments
from gpt2mm.serve.prepare import ServerSettings


def configure(parser: argparse.ArgumentParser) -> None:
    d = ServerSettings()
    parser.add_argument("model", help="model directory or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535 (default 8000)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("GPT2MM_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1 (default: $GPT2MM_API_KEY, else no key)",
    )
    parser.add_argument("--served-model-name", help="the model id in responses (default: the MODEL name)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_engine_arguments(parser)
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="rows per generate")
    parser.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms, help="wait to fill a batch")
    parser.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before 503")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    parser.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    parser.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    parser.add_argument(
        "--max-images",
        type=int,
        default=d.max_images,
        help=f"images per request (default {d.max_images}); above 1, a user message's images stand where "
        "their parts do among its text parts (Q: Compare <image> and <image> . A:)",
    )
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens_limit, help="largest max_tokens")
    parser.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    parser.add_argument("--default-temperature", type=float, default=d.default_temperature)
    parser.add_argument("--max-n", type=int, default=d.max_n, help="largest n (choices per request)")
    parser.add_argument(
        "--allow-image-urls",
        nargs="+",
        default=[],
        metavar="PREFIX",
        help="fetch http(s) image URLs under these prefixes (e.g. https://images.example.com/public/)",
    )
    parser.add_argument(
        "--allow-local-images", nargs="+", default=[], metavar="DIR", help="read file:// images inside DIRs"
    )
    parser.add_argument("--log-level", default="info")


def port_number(text: str) -> int:
    """`--port`: a TCP port, refused at argument parsing (exit code 2) when out of range."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Flags -> settings, refusing nonsense limits and allow-list entries."""
    for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_image_bytes", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_images < 0 or args.max_n < 1 or args.max_tokens < 1 or args.default_max_tokens < 1:
        raise UsageError("--max-images must be >= 0; --max-n, --max-tokens, --default-max-tokens >= 1")
    for prefix in args.allow_image_urls:
        u = urlsplit(prefix)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UsageError(f"--allow-image-urls {prefix}: give http(s)://host/path/ prefixes")
    dirs = []
    for d in args.allow_local_images:
        path = Path(d).resolve()
        if not path.is_dir():
            raise UsageError(f"--allow-local-images {d}: not a directory")
        dirs.append(path)
    name = args.served_model_name or Path(str(args.model).rstrip("/")).name or str(args.model)
    return ServerSettings(
        model_name=name,
        model_aliases=() if args.served_model_name else (str(args.model),),
        api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        default_max_tokens=args.default_max_tokens,
        max_tokens_limit=args.max_tokens,
        default_temperature=args.default_temperature,
        max_n=args.max_n,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        allow_image_urls=tuple(args.allow_image_urls),
        allow_local_images=tuple(dirs),
    )


def run(args: argparse.Namespace) -> int:
    from gpt2mm.serve.engine import load_engine

    settings = settings_from_args(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UsageError(
            f"serving needs FastAPI and uvicorn: pip install 'gpt2-multimodal[serve]' ({e})"
        ) from e
    engine = load_engine(args.model, args.device, args.dtype, args.compile)
    app = create_app(engine, settings)
    print(f"serving {settings.model_name} on http://{args.host}:{args.port}/ (API at /v1/chat/completions)")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
