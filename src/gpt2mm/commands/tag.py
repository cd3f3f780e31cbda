"""`gpt2mm tag`: a web page for people to judge a model's answers Correct / Incorrect / Skip.

    gpt2mm tag --model CKPT --questions val_questions.json --images images/val \\
        [--annotations val_annotations.json] [--db tags.sqlite] [--port 7861] [--reward-model DIR]
    gpt2mm tag export --db tags.sqlite --out tags.jsonl

Checks the flags, takes the port (so a port in use fails before the slow start), has the model answer the
questions not yet in the database (and the reward model score the open items), then serves the page until
Ctrl+C. The app, its endpoints and the database are `gpt2mm.tag.app` and `gpt2mm.tag.store`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gpt2mm.devices import pick_device
from gpt2mm.errors import UsageError
from gpt2mm.tag import app as tag_app
from gpt2mm.tag import store


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        choices=["export"],
        help="`export`: write the correct/incorrect tags of --db as JSONL to --out; without it, serve the page",
    )
    parser.add_argument(
        "--db", type=Path, default="tags.sqlite", metavar="FILE", help="tag database (%(default)s)"
    )
    tagging = parser.add_argument_group("tagging (gpt2mm tag --model ... --questions ... --images ...)")
    tagging.add_argument(
        "--model", metavar="CKPT", help="model directory (or hub id) whose answers are judged"
    )
    tagging.add_argument("--questions", type=Path, metavar="Q.json", help="VQA v2 questions JSON")
    tagging.add_argument("--images", type=Path, metavar="DIR", help="the questions' images (COCO file names)")
    tagging.add_argument(
        "--annotations", type=Path, metavar="A.json", help="VQA v2 annotations: show human answers"
    )
    tagging.add_argument("--limit", type=int, metavar="N", help="only the first N questions of the file")
    tagging.add_argument("--reward-model", type=Path, metavar="DIR", help="hand out least-sure items first")
    tagging.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    tagging.add_argument("--port", type=int, default=7861, help="(default: %(default)s)")
    tagging.add_argument("--claim-minutes", type=float, default=5.0, help="how long a tagger holds an item")
    tagging.add_argument("--batch-size", type=int, default=32, help="questions per batch when answering")
    tagging.add_argument("--device", help="cpu, cuda, ... for the models (default: cuda if available)")
    tagging.add_argument("--log-level", default="warning", help="uvicorn's (default: %(default)s)")
    export = parser.add_argument_group("export (gpt2mm tag export --db ... --out ...)")
    export.add_argument("--out", type=Path, metavar="FILE.jsonl", help="the JSONL file to write")


def run(args: argparse.Namespace) -> int:
    if args.action == "export":
        return export(args.db, args.out)
    return serve_command(args)


def export(db: Path, out: Path | None) -> int:
    """`gpt2mm tag export`: the correct/incorrect tags as JSONL (skips left out)."""
    if out is None:
        raise UsageError("tag export needs --out FILE.jsonl")
    if not db.is_file():
        raise UsageError(f"--db {db}: no such file")
    store.check_tag_db(db)
    records = store.read_tags(db)
    n = store.write_jsonl(records, out)  # a full disk or an unwritable --out: a one-line WriteError
    correct = sum(r.label for r in records)
    print(f"wrote {n} tags ({correct} correct, {n - correct} incorrect; skips left out) from {db} to {out}")
    return 0


def check_serve_args(args: argparse.Namespace) -> None:
    """Refuse missing or unusable inputs, and a missing FastAPI, before the port is taken or a model loads."""
    missing = [f"--{n}" for n in ("model", "questions", "images") if getattr(args, n) is None]
    if missing:
        raise UsageError(f"gpt2mm tag needs {', '.join(missing)} (or `gpt2mm tag export --db ... --out ...`)")
    if not args.questions.is_file():
        raise UsageError(f"--questions {args.questions}: no such file")
    if not args.images.is_dir():
        raise UsageError(f"--images {args.images}: no such directory")
    if args.annotations is not None and not args.annotations.is_file():
        raise UsageError(f"--annotations {args.annotations}: no such file")
    if args.reward_model is not None and not args.reward_model.exists():
        raise UsageError(f"--reward-model {args.reward_model}: no such file or directory")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.batch_size < 1 or args.claim_minutes <= 0:
        raise UsageError("--batch-size must be at least 1 and --claim-minutes above 0")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(
            f"the tagging page needs FastAPI and uvicorn: pip install 'gpt2-multimodal[serve]' ({e})"
        ) from None


def fill_database(args: argparse.Namespace, device: str) -> None:
    """Answer the new questions (the model loads only when there are some), score the open items with
    `--reward-model`, and print what the database holds."""
    conn = store.open_db(args.db)
    try:
        samples = tag_app.read_questions(args.questions, args.images, args.annotations, args.limit)
        t0 = time.perf_counter()
        added = tag_app.sync_items(conn, samples, tag_app.answerer(args.model, device, args.batch_size))
        seconds = time.perf_counter() - t0
        if args.reward_model is not None:
            scorer = tag_app.reward_scorer(args.reward_model, device)
            n = tag_app.score_items(conn, scorer, str(args.reward_model))
            print(f"scored {n} open items with the reward model {args.reward_model}")
        stats = store.tag_stats(conn)
    finally:
        conn.close()
    answered = f" ({added} new, answered in {seconds:.1f} s)" if added else " (nothing new)"
    print(
        f"{args.db}: {stats['total']} items{answered}; {stats['done']} done, {stats['remaining']} left; "
        f"order: {'least sure first' if args.reward_model else 'as in the questions file'}"
    )


def serve_command(args: argparse.Namespace) -> int:
    """Check the inputs, take the port, fill the database (answers, scores), then serve until Ctrl+C."""
    check_serve_args(args)
    device = pick_device(args.device)
    store.check_tag_db(args.db)
    sock = tag_app.bind_socket(args.host, args.port)
    try:
        fill_database(args, device)
        settings = tag_app.TagSettings(args.claim_minutes * 60, least_sure=args.reward_model is not None)
        app = tag_app.create_app(args.db, settings)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"tagging page on http://{shown}:{sock.getsockname()[1]}/ (Ctrl+C to stop)", flush=True)
        tag_app.serve(app, sock, args.log_level)
    finally:
        sock.close()
    return 0
