"""`gpt2mm tag`: a web page for people to judge a model's answers Correct / Incorrect / Skip.

    gpt2mm tag --model CKPT --questions val_questions.json --images images/val \\
        [--annotations val_annotations.json] [--db tags.sqlite] [--port 7861] [--reward-model DIR]
    gpt2mm tag export --db tags.sqlite --out tags.jsonl

At start the model answers every question not yet in the database, once (greedy, `answer_questions`: the
same path as `gpt2mm eval`), and the answers are stored as `items` (`gpt2mm.tag.store`). Rerunning on the
same database adds only new questions and never recomputes or drops an item or a tag, so the app resumes
where it stopped. The page (`tag/web/index.html`) shows the image, the question, the answer and the human
answers when annotations are given; labels go to SQLite with the tagger's name and the time.

Several taggers at once: `GET /api/next` claims its item for `--claim-minutes` in one `BEGIN IMMEDIATE`
transaction, so two taggers never get the same item while it is claimed; each request has its own
connection (WAL, busy timeout). An item is done once anyone tags it correct or incorrect; a skip takes it
off that tagger's list only. With `--reward-model`, every open item is scored at start and the next item is
the one the reward model is least sure about (`store.tagging_order`); without, insertion order.

Endpoints (JSON; errors are 4xx `{"error": {"message", "type"}}` naming what was wrong):
`GET /api/next?tagger=NAME`, `POST /api/tag {item_id, tagger, label}`, `POST /api/undo {tagger}`,
`POST /api/release {tagger}`, `GET /api/stats[?tagger=NAME]`, `GET /images/{item_id}` (only the image of
an item in the database: no path ever comes from the request), and the page at `/`.

Simplifications: no accounts (the tagger types a name; the app is meant for localhost or a trusted
network), and a tagger holds one item at a time (a reload shows the same item again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2mm.errors import DataError, UsageError
from gpt2mm.tag import store

try:  # optional: `pip install 'gpt2-multimodal[serve]'` (run() says so when they are missing)
    from fastapi import FastAPI, Request
except ImportError:  # pragma: no cover
    FastAPI = Request = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from gpt2mm.data.samples import Sample

log = logging.getLogger(__name__)

MAX_TAGGER_CHARS = 64
MAX_BODY_BYTES = 64 * 1024


@dataclass
class TagSettings:
    """How the app hands out items (the `gpt2mm tag` flags that matter once it serves)."""

    claim_s: float = 300.0  # how long `next` reserves an item for its tagger
    least_sure: bool = False  # order by reward-model sureness (scores in the DB) instead of insertion


# --- items: questions + the model's answers, into the database ---------------------------------------------


def read_questions(
    questions: str | Path,
    images: str | Path,
    annotations: str | Path | None = None,
    limit: int | None = None,
) -> list[Sample]:
    """The questions to tag, as samples with the image path and, given annotations, the human answers.

    With annotations this is `load_vqa` (same checks, same image naming); without, the questions file alone
    (`load_questions`), with images found the way `load_vqa` finds them (COCO names, .jpg else .png).
    """
    from gpt2mm.data.samples import Sample, Turn, strip_image_placeholder
    from gpt2mm.data.vqa import coco_image_name, load_vqa
    from gpt2mm.eval.vqa_files import load_questions, read_json

    if annotations is not None:
        samples, _ = load_vqa(questions, annotations, images, limit=limit)
        return [
            Sample(id=s.id, image=s.image, turns=s.turns[:1], answers=s.answers, question_id=s.question_id)
            for s in samples
        ]
    records = load_questions(questions)
    subtype = read_json(questions).get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        raise DataError(f"{questions}: no 'data_subtype' key (e.g. 'val2014'), needed to name the images")
    folder = Path(images)
    samples = []
    for i, q in enumerate(records[:limit] if limit is not None else records):
        if "image_id" not in q:
            raise DataError(f"{questions}: questions[{i}] (question_id {q['question_id']}) has no image_id")
        jpg = folder / coco_image_name(q["image_id"], subtype, ".jpg")
        path = jpg if jpg.is_file() else jpg.with_suffix(".png")
        if not path.is_file():
            raise DataError(f"{questions}: question_id {q['question_id']}: image {jpg} (or .png) not found")
        question = strip_image_placeholder(q["question"])
        if not question:
            raise DataError(f"{questions}: question_id {q['question_id']}: empty question")
        samples.append(
            Sample(
                id=str(q["question_id"]),
                image=str(path),
                turns=[Turn("user", question)],
                question_id=q["question_id"],
            )
        )
    return samples


def sync_items(
    conn: Any,
    samples: Sequence[Sample],
    answer: Callable[[list[Sample]], list[str]],
    chunk: int = 1024,
) -> int:
    """Answer the samples whose question is not in the database yet and store them as items; returns how
    many were added. Existing items (and their tags) are never touched. Chunks are stored as they are
    answered, so an interrupted start keeps what it did."""
    known = store.question_ids(conn)
    new = [s for s in samples if _question_id(s) not in known]
    added = 0
    for start in range(0, len(new), chunk):
        part = new[start : start + chunk]
        answers = answer(part)
        if len(answers) != len(part):
            raise RuntimeError(f"{len(answers)} answers for {len(part)} questions")
        added += store.add_items(
            conn,
            [
                store.Item(
                    question_id=_question_id(s),
                    image=str(Path(s.image).resolve()),
                    question=s.turns[0].text,
                    answer=a,
                    references=list(s.answers or []),
                )
                for s, a in zip(part, answers)
            ],
        )
    return added


def _question_id(s: Sample) -> str:
    return str(s.question_id if s.question_id is not None else s.id)


def score_items(
    conn: Any,
    scorer: Callable[[list[str], list[str], list[str]], list[float]],
    name: str = "",
    chunk: int = 256,
) -> int:
    """Score every open item with a reward model (P(correct)) and store the scores; returns the count."""
    items = store.open_items(conn)
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        probs = list(scorer([i.image for i in part], [i.question for i in part], [i.answer for i in part]))
        if len(probs) != len(part):
            raise DataError(f"reward model {name}: {len(probs)} scores for {len(part)} items")
        try:
            scores = {i.item_id: float(p) for i, p in zip(part, probs)}
        except (TypeError, ValueError) as e:
            raise DataError(f"reward model {name}: a score is not a number ({e})") from None
        store.set_scores(conn, scores, scorer=name)  # checks they are probabilities
    return len(items)


# --- the app -----------------------------------------------------------------------------------------------


class TagError(Exception):
    """A request the app refuses: becomes `{"error": {"message", "type"}}` with this status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type


def clean_tagger(value: Any, where: str = "tagger") -> str:
    """A tagger's name: a non-empty string of at most 64 printable characters (stripped)."""
    if not isinstance(value, str) or not value.strip():
        raise TagError(400, f"{where}: give the tagger's name (a non-empty string)")
    name = value.strip()
    if len(name) > MAX_TAGGER_CHARS:
        raise TagError(400, f"{where}: the name is {len(name)} characters; at most {MAX_TAGGER_CHARS}")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise TagError(400, f"{where}: the name holds control characters")
    return name


def item_json(item: store.Item) -> dict[str, Any]:
    return {
        "item_id": item.item_id,
        "question_id": item.question_id,
        "question": item.question,
        "answer": item.answer,
        "references": item.references,
        "image_url": f"/images/{item.item_id}",
    }


def create_app(db_path: str | Path, settings: TagSettings | None = None) -> FastAPI:
    """The FastAPI app over a tag database (items loaded beforehand: see `sync_items`)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or TagSettings()
    db_path = Path(db_path)
    store.open_db(db_path).close()  # the schema and WAL mode, once; requests then use plain connections
    app = FastAPI(title="gpt2mm tag", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings

    def error(status: int, message: str, type: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": type}}, status_code=status)

    @app.exception_handler(TagError)
    async def _tag_error(request: Request, e: TagError) -> JSONResponse:
        return error(e.status, e.message, e.type)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(e.status_code, str(e.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error(400, "invalid request")

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error(500, "internal server error", "server_error")

    def with_db(fn: Callable[..., Any], *args: Any) -> Any:
        conn = store.connect(db_path)  # one connection per request: sqlite3 objects are not shared
        try:
            return fn(conn, *args)
        finally:
            conn.close()

    async def db(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(with_db, fn, *args)

    async def json_body(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise TagError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > MAX_BODY_BYTES:
                raise TagError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise TagError(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise TagError(400, "the body must be a JSON object")
        return data

    def next_for(conn: Any, tagger: str) -> dict[str, Any]:
        now = time.time()
        item = store.claim_next(conn, tagger, now, settings.claim_s, least_sure=settings.least_sure)
        return {
            "item": None if item is None else item_json(item),
            "claimed_until": None if item is None else now + settings.claim_s,
            "stats": store.tag_stats(conn, tagger),
        }

    def tag_and_count(conn: Any, item_id: int, tagger: str, label: str) -> dict[str, Any]:
        try:
            store.tag_item(conn, item_id, tagger, label)
        except LookupError:
            raise TagError(404, f"item_id: no item {item_id} in this database", "not_found_error") from None
        return {"item_id": item_id, "tagger": tagger, "label": label, "stats": store.tag_stats(conn, tagger)}

    def undo_for(conn: Any, tagger: str) -> dict[str, Any]:
        item = store.undo_last(conn, tagger, time.time(), settings.claim_s)
        if item is None:
            raise TagError(404, f"tagger {tagger!r} has no tag to undo", "not_found_error")
        return {"item": item_json(item), "stats": store.tag_stats(conn, tagger)}

    def image_of(conn: Any, item_id: int) -> Path:
        item = store.get_item(conn, item_id)
        if item is None:
            raise TagError(404, f"no item {item_id} in this database", "not_found_error")
        path = Path(item.image)
        if not path.is_file():
            raise TagError(404, f"the image of item {item_id} is missing on the server", "not_found_error")
        return path

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        from importlib.resources import files

        return HTMLResponse((files("gpt2mm.tag") / "web" / "index.html").read_text(encoding="utf-8"))

    @app.get("/api/next")
    async def api_next(request: Request) -> dict[str, Any]:
        tagger = clean_tagger(request.query_params.get("tagger"), "tagger (query parameter)")
        return await db(next_for, tagger)

    @app.post("/api/tag")
    async def api_tag(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        item_id = body.get("item_id")
        if not isinstance(item_id, int) or isinstance(item_id, bool):
            raise TagError(400, f"item_id: expected an integer item id, got {item_id!r:.40}")
        tagger = clean_tagger(body.get("tagger"))
        label = body.get("label")
        if label not in store.LABELS:
            raise TagError(400, f"label: expected one of {', '.join(store.LABELS)}, got {label!r:.40}")
        return await db(tag_and_count, item_id, tagger, label)

    @app.post("/api/undo")
    async def api_undo(request: Request) -> dict[str, Any]:
        tagger = clean_tagger((await json_body(request)).get("tagger"))
        return await db(undo_for, tagger)

    @app.post("/api/release")
    async def api_release(request: Request) -> dict[str, Any]:
        tagger = clean_tagger((await json_body(request)).get("tagger"))
        await db(store.release_claims, tagger)
        return {"released": tagger}

    @app.get("/api/stats")
    async def api_stats(request: Request) -> dict[str, Any]:
        raw = request.query_params.get("tagger")
        tagger = None if raw is None else clean_tagger(raw, "tagger (query parameter)")
        return await db(store.tag_stats, tagger)

    @app.get("/images/{item_id}")
    async def image(item_id: str) -> FileResponse:
        if not (item_id.isascii() and item_id.isdigit() and len(item_id) <= 18):
            raise TagError(
                404, f"no image {item_id!r:.40}: images are addressed by item id", "not_found_error"
            )
        path = await db(image_of, int(item_id))
        return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    return app


# --- the command -------------------------------------------------------------------------------------------


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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        n = store.write_jsonl(records, out)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write ({e})") from None
    correct = sum(r.label for r in records)
    print(f"wrote {n} tags ({correct} correct, {n - correct} incorrect; skips left out) from {db} to {out}")
    return 0


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, taken before the slow start so that a port in use fails at once."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: not a port number (0 to 65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(
            f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); another server may be "
            "using it: choose another --port"
        ) from None
    return sock


def serve_command(args: argparse.Namespace) -> int:
    """Check the inputs, take the port, fill the database (answers, scores), then serve until Ctrl+C."""
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
    store.check_tag_db(args.db)
    sock = bind_socket(args.host, args.port)
    try:
        conn = store.open_db(args.db)
        try:
            samples = read_questions(args.questions, args.images, args.annotations, args.limit)
            t0 = time.perf_counter()
            added = sync_items(conn, samples, answerer(args.model, args.device, args.batch_size))
            seconds = time.perf_counter() - t0
            if args.reward_model is not None:
                n = score_items(conn, reward_scorer(args.reward_model, args.device), str(args.reward_model))
                print(f"scored {n} open items with the reward model {args.reward_model}")
            stats = store.tag_stats(conn)
        finally:
            conn.close()
        answered = f" ({added} new, answered in {seconds:.1f} s)" if added else " (nothing new)"
        print(
            f"{args.db}: {stats['total']} items{answered}; {stats['done']} done, {stats['remaining']} left; "
            f"order: {'least sure first' if args.reward_model else 'as in the questions file'}"
        )
        app = create_app(
            args.db, TagSettings(args.claim_minutes * 60, least_sure=args.reward_model is not None)
        )
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"tagging page on http://{shown}:{sock.getsockname()[1]}/ (Ctrl+C to stop)", flush=True)
        serve(app, sock, args.log_level)
    finally:
        sock.close()
    return 0


def answerer(model_path: str, device: str | None, batch_size: int) -> Callable[[list[Sample]], list[str]]:
    """The model's greedy answers (`answer_questions`); the model loads on first use, so a resume with
    nothing new to answer does not load it."""
    loaded: list[Any] = []

    def answer(samples: list[Sample]) -> list[str]:
        import torch

        from gpt2mm.eval.evaluate import answer_questions
        from gpt2mm.loading import load_model

        if not loaded:
            try:
                model, processor = load_model(model_path)
            except (OSError, ValueError) as e:
                raise UsageError(f"--model {model_path}: cannot load the model ({e})") from None
            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            loaded[:] = [model.to(dev).eval(), processor]
        print(f"answering {len(samples)} questions with {model_path} ...", flush=True)
        return answer_questions(
            loaded[0], loaded[1], samples, batch_size=batch_size, progress=len(samples) > 256
        )

    return answer


def reward_scorer(path: Path, device: str | None) -> Callable[[list[str], list[str], list[str]], list[float]]:
    try:
        from gpt2mm.reward.model import RewardScorer
    except ImportError as e:
        raise UsageError(
            f"--reward-model needs gpt2mm.reward.model, which is not available here ({e})"
        ) from None
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return RewardScorer(str(path), device=device)
    except (OSError, ValueError) as e:
        raise UsageError(f"--reward-model {path}: cannot load it ({e})") from None


def serve(app: FastAPI, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve on an already bound socket until interrupted (tests replace this)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
