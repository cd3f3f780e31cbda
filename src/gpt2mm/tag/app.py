"""The tagging app of `gpt2mm tag` (the command: `gpt2mm.commands.tag`): a web page for people to judge a
model's answers Correct / Incorrect / Skip.

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

Endpoints (JSON; errors are 4xx `{"error": {"message", "type", "param", "code"}}`, OpenAI's shape, naming what
was wrong; the OpenAPI document is at `/openapi.json`):
`GET /api/next?tagger=NAME`, `POST /api/tag {item_id, tagger, label}`, `POST /api/undo {tagger}`,
`POST /api/release {tagger}`, `GET /api/stats[?tagger=NAME]`, `GET /images/{item_id}` (only the image of
an item in the database: no path ever comes from the request), and the page at `/`.

Simplifications: no accounts (the tagger types a name; the app is meant for localhost or a trusted
network), and a tagger holds one item at a time (a reload shows the same item again).
"""

from __future__ import annotations

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

from gpt2mm.devices import pick_device
from gpt2mm.errors import DataError, UsageError
from gpt2mm.openapi import APIError, add_error_handlers
from gpt2mm.tag import store

try:  # optional: `pip install 'gpt2-multimodal[serve]'` (`gpt2mm tag` says so when they are missing)
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
except ImportError:  # pragma: no cover
    FastAPI = Request = FileResponse = HTMLResponse = JSONResponse = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from gpt2mm.data.samples import Sample

log = logging.getLogger(__name__)

MAX_TAGGER_CHARS = 64
MAX_BODY_BYTES = 64 * 1024
MAX_ITEM_ID = 2**63 - 1  # SQLite's largest integer


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


def clean_tagger(value: Any, where: str = "tagger") -> str:
    """A tagger's name: a non-empty string of at most 64 printable characters (stripped)."""
    if not isinstance(value, str) or not value.strip():
        raise APIError(400, f"{where}: give the tagger's name (a non-empty string)", param="tagger")
    name = value.strip()
    if len(name) > MAX_TAGGER_CHARS:
        raise APIError(
            400, f"{where}: the name is {len(name)} characters; at most {MAX_TAGGER_CHARS}", param="tagger"
        )
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise APIError(400, f"{where}: the name holds control characters", param="tagger")
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
    """The FastAPI app over a tag database (items loaded beforehand: see `sync_items`).

    The handlers are the module's functions below; they find the settings and the database path on
    `app.state`."""
    settings = settings or TagSettings()
    db_path = Path(db_path)
    store.open_db(db_path).close()  # the schema and WAL mode, once; requests then use plain connections
    app = FastAPI(title="gpt2mm tag", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    from gpt2mm.tag.schema import openapi_document

    document = openapi_document()
    app.openapi = lambda: document  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.db_path = db_path
    add_error_handlers(app, log)
    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/api/next", api_next, methods=["GET"])
    app.add_api_route("/api/tag", api_tag, methods=["POST"])
    app.add_api_route("/api/undo", api_undo, methods=["POST"])
    app.add_api_route("/api/release", api_release, methods=["POST"])
    app.add_api_route("/api/stats", api_stats, methods=["GET"])
    app.add_api_route("/images/{item_id}", image, methods=["GET"])
    return app


async def db(request: Request, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(conn, *args)` in a thread, on a connection of its own to the app's database (sqlite3 objects
    are not shared between threads)."""

    def with_db() -> Any:
        conn = store.connect(request.app.state.db_path)
        try:
            return fn(conn, *args)
        finally:
            conn.close()

    return await asyncio.to_thread(with_db)


async def json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object: 413 over `MAX_BODY_BYTES` (declared or sent), 400 when not an object."""
    declared = request.headers.get("content-length")
    too_large = APIError(
        413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes", code="body_too_large"
    )
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise APIError(400, "the body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_type")
    return data


def next_for(conn: Any, tagger: str, settings: TagSettings) -> dict[str, Any]:
    """Claim the tagger's next item for `settings.claim_s`; with the tagger's counts."""
    now = time.time()
    item = store.claim_next(conn, tagger, now, settings.claim_s, least_sure=settings.least_sure)
    return {
        "item": None if item is None else item_json(item),
        "claimed_until": None if item is None else now + settings.claim_s,
        "stats": store.tag_stats(conn, tagger),
    }


def tag_and_count(conn: Any, item_id: int, tagger: str, label: str) -> dict[str, Any]:
    """Record the label; a `APIError` 404 for an item not in the database."""
    try:
        store.tag_item(conn, item_id, tagger, label)
    except LookupError:
        raise APIError(
            404,
            f"item_id: no item {item_id} in this database",
            "not_found_error",
            "item_id",
            "item_not_found",
        ) from None
    return {"item_id": item_id, "tagger": tagger, "label": label, "stats": store.tag_stats(conn, tagger)}


def undo_for(conn: Any, tagger: str, claim_s: float) -> dict[str, Any]:
    """Take back the tagger's last tag, its item claimed by them again; 404 when there is none."""
    item = store.undo_last(conn, tagger, time.time(), claim_s)
    if item is None:
        raise APIError(404, f"tagger {tagger!r} has no tag to undo", "not_found_error", "tagger", "no_tag")
    return {"item": item_json(item), "stats": store.tag_stats(conn, tagger)}


def image_of(conn: Any, item_id: int) -> Path:
    """The image file of an item in the database; 404 for an unknown item or a file gone missing."""
    item = store.get_item(conn, item_id)
    if item is None:
        raise APIError(
            404, f"no item {item_id} in this database", "not_found_error", "item_id", "item_not_found"
        )
    path = Path(item.image)
    if not path.is_file():
        raise APIError(
            404,
            f"the image of item {item_id} is missing on the server",
            "not_found_error",
            "item_id",
            "image_missing",
        )
    return path


# --- the routes ----------------------------------------------------------------------------------------------


async def index() -> HTMLResponse:
    """`GET /`: the tagging page."""
    from importlib.resources import files

    return HTMLResponse((files("gpt2mm.tag") / "web" / "index.html").read_text(encoding="utf-8"))


async def api_next(request: Request) -> dict[str, Any]:
    """`GET /api/next?tagger=NAME`: claim the tagger's next item (the one it holds, if any)."""
    tagger = clean_tagger(request.query_params.get("tagger"), "tagger (query parameter)")
    return await db(request, next_for, tagger, request.app.state.settings)


async def api_tag(request: Request) -> dict[str, Any]:
    """`POST /api/tag {item_id, tagger, label}`: record a label; 404 for an item not in the database."""
    body = await json_body(request)
    item_id = body.get("item_id")
    if not isinstance(item_id, int) or isinstance(item_id, bool):
        raise APIError(400, f"item_id: expected an integer item id, got {item_id!r:.40}", param="item_id")
    if not 1 <= item_id <= MAX_ITEM_ID:  # SQLite's integers are 64-bit: a larger one would be a 500
        raise APIError(
            400, f"item_id: {str(item_id)[:40]} is not an item id (1 to {MAX_ITEM_ID})", param="item_id"
        )
    tagger = clean_tagger(body.get("tagger"))
    label = body.get("label")
    if label not in store.LABELS:
        raise APIError(
            400, f"label: expected one of {', '.join(store.LABELS)}, got {label!r:.40}", param="label"
        )
    return await db(request, tag_and_count, item_id, tagger, label)


async def api_undo(request: Request) -> dict[str, Any]:
    """`POST /api/undo {tagger}`: take back the tagger's last tag and hand its item back to them."""
    tagger = clean_tagger((await json_body(request)).get("tagger"))
    return await db(request, undo_for, tagger, request.app.state.settings.claim_s)


async def api_release(request: Request) -> dict[str, Any]:
    """`POST /api/release {tagger}`: give back the item the tagger holds (the page calls it on leaving)."""
    tagger = clean_tagger((await json_body(request)).get("tagger"))
    await db(request, store.release_claims, tagger)
    return {"released": tagger}


async def api_stats(request: Request) -> dict[str, Any]:
    """`GET /api/stats[?tagger=NAME]`: counts, overall or the tagger's."""
    raw = request.query_params.get("tagger")
    tagger = None if raw is None else clean_tagger(raw, "tagger (query parameter)")
    return await db(request, store.tag_stats, tagger)


async def image(request: Request, item_id: str) -> FileResponse:
    """`GET /images/{item_id}`: the image of an item in the database; no path ever comes from the request."""
    if not (item_id.isascii() and item_id.isdigit() and len(item_id) <= 18):
        raise APIError(
            404, f"no image {item_id!r:.40}: images are addressed by item id", "not_found_error", "item_id"
        )
    path = await db(request, image_of, int(item_id))
    return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})


# --- serving it: the port, the models, uvicorn -------------------------------------------------------------


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


def answerer(model_path: str, device: str | None, batch_size: int) -> Callable[[list[Sample]], list[str]]:
    """The model's greedy answers (`answer_questions`); the model loads on first use, so a resume with
    nothing new to answer does not load it."""
    loaded: list[Any] = []

    def answer(samples: list[Sample]) -> list[str]:
        from gpt2mm.eval.evaluate import answer_questions
        from gpt2mm.loading import load_model

        if not loaded:
            try:
                model, processor = load_model(model_path)
            except (OSError, ValueError) as e:
                raise UsageError(f"--model {model_path}: cannot load the model ({e})") from None
            loaded[:] = [model.to(pick_device(device)).eval(), processor]
        print(f"answering {len(samples)} questions with {model_path} ...", flush=True)
        return answer_questions(
            loaded[0], loaded[1], samples, batch_size=batch_size, progress=len(samples) > 256
        )

    return answer


def reward_scorer(path: Path, device: str | None) -> Callable[[list[str], list[str], list[str]], list[float]]:
    """The reward model's P(correct) of (image, question, answer) triples, for `score_items`."""
    try:
        from gpt2mm.reward.model import RewardScorer
    except ImportError as e:
        raise UsageError(
            f"--reward-model needs gpt2mm.reward.model, which is not available here ({e})"
        ) from None
    try:
        return RewardScorer(str(path), device=pick_device(device))
    except (OSError, ValueError) as e:
        raise UsageError(f"--reward-model {path}: cannot load it ({e})") from None


def serve(app: FastAPI, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve on an already bound socket until interrupted (tests replace this)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
