"""`gpt2mm serve MODEL` (the command: `gpt2mm.commands.serve`): an OpenAI-compatible HTTP API and a web
page, with dynamic batching.

    gpt2mm serve ./my-model --port 8000 [--api-key KEY]
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"messages": [{"role":
      "user", "content": [{"type": "text", "text": "What color is it?"}, {"type": "image_url",
      "image_url": {"url": "data:image/png;base64,..."}}]}]}'

Endpoints: `POST /v1/chat/completions` (non-streamed or server-sent events), `GET /v1/models`,
`GET /health`, and the chat page at `/` (which calls the same endpoint). See `gpt2mm.serve.schema` for how
messages map onto the model's Q/A format.

Differences from OpenAI, on purpose: `temperature` defaults to 0 (greedy; `--default-temperature`),
`model` may be left out (a `model` other than the served name, `--served-model-name` or the MODEL
argument as given, is a 404 `model_not_found`, as OpenAI and vLLM answer), and when prompt + `max_tokens` would overflow the context,
`max_tokens` is reduced to what fits (`finish_reason` then says "length"); a prompt that alone fills the
context is a 400. `logprobs` and `top_logprobs` are not implemented: asking for them is a 400
`unsupported_parameter`, not silently ignored. Every user message needs text (see `gpt2mm.serve.schema`).

Untrusted input is refused with a 4xx OpenAI-shaped error, never a crash: bodies over `--max-body-bytes`
(by Content-Length and by the bytes actually read), bad JSON or fields, bad base64, non-images, truncated
images, images over the byte or pixel limits (decompression bombs), more images than `--max-images`,
prompts longer than the context. Images come as base64 `data:` URLs; `http(s)` URLs only under a prefix
given with `--allow-image-urls`, `file://` paths only inside a directory given with
`--allow-local-images` (resolved, symlinks included, before the check). When the queue is full the answer
is 503 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import posixpath
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from gpt2mm.errors import DataError
from gpt2mm.openapi import add_error_handlers
from gpt2mm.serve.batching import Batcher, QueueFull
from gpt2mm.serve.engine import Engine, GenerationRequest, SamplingParams

try:  # optional: `pip install 'gpt2-multimodal[serve]'` (`gpt2mm serve` says so when they are missing)
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
except ImportError:  # pragma: no cover
    FastAPI = Request = HTMLResponse = JSONResponse = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from PIL import Image

    from gpt2mm.serve.schema import ChatRequest

log = logging.getLogger(__name__)

MB = 1024 * 1024


@dataclass
class ServerSettings:
    """Limits and switches of the server (the `gpt2mm serve` flags)."""

    model_name: str = "gpt2mm"
    model_aliases: tuple[str, ...] = ()  # other names a request may give: the MODEL argument as given
    api_key: str | None = None
    max_body_bytes: int = 20 * MB
    max_image_bytes: int = 10 * MB
    max_image_pixels: int = 16_000_000
    max_images: int = 1
    default_max_tokens: int = 64
    max_tokens_limit: int = 512
    default_temperature: float = 0.0
    max_n: int = 4
    max_batch_size: int = 16
    batch_wait_ms: float = 10.0
    max_queue: int = 256
    retry_after_s: int = 1
    allow_image_urls: tuple[str, ...] = ()
    allow_local_images: tuple[Path, ...] = field(default_factory=tuple)
    url_timeout_s: float = 10.0


# --- images -------------------------------------------------------------------------------------------------


def load_image_url(url: str, settings: ServerSettings, param: str) -> Image.Image:
    """An `image_url` -> RGB image, with every check of `load_image_bytes`; `APIError` (400) otherwise."""
    from gpt2mm.data.images import load_image, load_image_bytes
    from gpt2mm.serve.schema import APIError

    def bad(message: str, code: str = "invalid_image") -> APIError:
        return APIError(400, f"{param}: {message}", param=param, code=code)

    limits = dict(max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    try:
        if scheme == "data":
            header, sep, payload = url[5:].partition(",")
            if not sep:
                raise bad("malformed data URL (no comma)", "invalid_image_url")
            mime, *options = header.split(";")
            if "base64" not in (o.strip().lower() for o in options):
                raise bad("data URLs must be base64-encoded (data:image/png;base64,...)", "invalid_image_url")
            if mime.strip() and not mime.strip().lower().startswith("image/"):
                raise bad(f"data URL of type {mime.strip()!r}, not an image", "invalid_image_url")
            payload = "".join(payload.split())
            if len(payload) > (settings.max_image_bytes // 3 + 2) * 4:
                raise bad(f"image over the limit of {settings.max_image_bytes} bytes", "image_too_large")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise bad("invalid base64 in the data URL", "invalid_base64") from None
            return load_image_bytes(data, name="image", **limits)
        if scheme in ("http", "https"):
            if not _remote_allowed(url, settings.allow_image_urls):
                raise bad(
                    "remote image URLs are refused (start the server with --allow-image-urls PREFIX to "
                    "allow some); send the image as a base64 data URL",
                    "image_url_not_allowed",
                )
            return load_image_bytes(_fetch(url, settings), name="image", **limits)
        if scheme == "file":
            path = _local_path(url, settings.allow_local_images)
            if path is None:
                raise bad(
                    "local image paths are refused outside the directories given with --allow-local-images",
                    "image_url_not_allowed",
                )
            return load_image(path, **limits)
        raise bad(
            "unsupported image URL: use a base64 data URL (data:image/png;base64,...)", "invalid_image_url"
        )
    except DataError as e:
        message = str(e)
        code = "image_too_large" if ("over the limit" in message or "bomb" in message) else "invalid_image"
        raise bad(message.removeprefix("image: "), code) from None


def _remote_allowed(url: str, prefixes: Sequence[str]) -> bool:
    """Whether `url` lies under an allowed prefix: same scheme, host and port, path inside the prefix's path
    (after resolving `.`/`..` and percent-escapes), no user info."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        return False
    if u.username is not None or u.password is not None or "\\" in url:
        return False
    segments = unquote(u.path).split("/")
    if any(s in (".", "..") for s in segments):
        return False
    path = posixpath.normpath(unquote(u.path) or "/")
    for prefix in prefixes:
        p = urlsplit(prefix)
        base = p.path if p.path.endswith("/") else p.path + "/"
        same_origin = (u.scheme.lower(), u.hostname, port) == (p.scheme.lower(), p.hostname, p.port)
        if same_origin and (path == p.path.rstrip("/") or (path + "/").startswith(base) or base == "/"):
            return True
    return False


def _fetch(url: str, settings: ServerSettings) -> bytes:
    """GET an allow-listed URL: no redirects (they could leave the allow-list), a timeout, a byte limit."""
    import urllib.request

    from gpt2mm.serve.schema import APIError

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=settings.url_timeout_s) as response:
            return response.read(settings.max_image_bytes + 1)
    except Exception as e:
        raise APIError(400, f"could not fetch the image URL: {e}", code="image_fetch_failed") from None


def _local_path(url: str, allowed: Sequence[Path]) -> Path | None:
    """The resolved path of a `file://` URL if it lies inside an allowed directory, else None."""
    if not allowed:
        return None
    try:
        u = urlsplit(url)
    except ValueError:
        return None
    if u.netloc not in ("", "localhost") or "\x00" in url:
        return None
    raw = Path(unquote(u.path))
    if not raw.is_absolute():
        return None
    try:
        path = raw.resolve()
    except (OSError, RuntimeError):
        return None
    for d in allowed:
        if path.is_relative_to(d.resolve()):
            return path
    return None


# --- the app ------------------------------------------------------------------------------------------------


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app: routes, error handlers and the batcher (its worker starts with the first request).

    The handlers are the module's functions below; they find the engine, the settings and the batcher on
    `app.state`, so one app's state never leaks into another's."""
    from contextlib import asynccontextmanager

    settings = settings or ServerSettings()
    batcher = Batcher(
        engine,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.batch_wait_ms,
        max_queue=settings.max_queue,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(
        title="gpt2mm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json"
    )
    document = openapi_document(settings)
    app.openapi = lambda: document  # type: ignore[method-assign]  (FastAPI cannot infer it: see below)
    app.state.engine = engine
    app.state.batcher = batcher
    app.state.settings = settings
    add_error_handlers(app, log)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


def openapi_document(settings: ServerSettings) -> dict[str, Any]:
    """The API as OpenAPI 3.1 (`GET /openapi.json`), with this server's limits: the request schema is the
    one `parse_request` validates with, narrowed by the settings (`max_tokens`, `n`, at most 4 stops, no
    logprobs), and every status an operation may answer is listed, errors in OpenAI's shape."""
    from gpt2mm import __version__
    from gpt2mm.openapi import components, document, errors, json_content
    from gpt2mm.serve.schema import ChatCompletion, ChatRequest, Health, ModelList

    refs, schemas = components([ChatRequest], [ChatCompletion, ModelList, Health])
    props = schemas["ChatRequest"]["properties"]
    for name in ("max_tokens", "max_completion_tokens"):
        props[name]["anyOf"][0]["maximum"] = settings.max_tokens_limit
    props["n"]["maximum"] = min(settings.max_n, settings.max_batch_size)
    props["stop"]["anyOf"][0]["oneOf"][1]["maxItems"] = 4
    unsupported = "not supported by this server: anything but this is a 400"
    props["logprobs"] = {"anyOf": [{"const": False}, {"type": "null"}], "description": unsupported}
    props["top_logprobs"] = {"type": "null", "description": unsupported}

    def operation(summary: str, ok: dict[str, Any], keyed: bool, **more: Any) -> dict[str, Any]:
        """An operation: its 200 and more responses; where `keyed` and the server has a key, a 401 too."""
        responses = {"200": ok, **more.pop("responses", {})}
        if keyed and settings.api_key is not None:
            more["security"] = [{"bearer": []}]
            responses.update(errors(refs, _401="missing or incorrect API key"))
        return {"summary": summary, **more, "responses": responses}

    busy = errors(refs, _503="the queue is full: retry after Retry-After seconds")
    busy["503"]["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 0}, "required": True}}
    event = {  # one server-sent event: a `chat.completion.chunk` as JSON in `data`, the last one `[DONE]`
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    }
    answer = {
        "description": "the answer, whole or as server-sent events (`stream`)",
        "content": {**json_content(refs["ChatCompletion"]), "text/event-stream": {"schema": event}},
    }
    failures = errors(
        refs,
        _400="invalid JSON, fields, images or conversation; a prompt over the context",
        _404="`model` names another model than the served one",
        _413=f"the body is over {settings.max_body_bytes} bytes",
        _500="generation failed",
    )
    html = {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}
    paths = {
        "/v1/chat/completions": {
            "post": operation(
                "answer a conversation about images (OpenAI's chat completions)",
                answer,
                keyed=True,
                requestBody={"required": True, "content": json_content(refs["ChatRequest"])},
                responses={**failures, **busy},
            )
        },
        "/v1/models": {
            "get": operation(
                "the served model", {"description": "one", "content": json_content(refs["ModelList"])}, True
            )
        },
        "/health": {
            "get": operation(
                "up, which model, how many requests wait (no key needed)",
                {"description": "up", "content": json_content(refs["Health"])},
                keyed=False,
            )
        },
        "/": {"get": operation("the chat page", html, keyed=False)},
    }
    security = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
    return document("gpt2mm", __version__, paths, schemas, **(security if settings.api_key else {}))


def check_auth(request: Request, settings: ServerSettings) -> None:
    """With `--api-key`, a 401 unless the request sends `Authorization: Bearer KEY` (compared in constant
    time)."""
    from gpt2mm.serve.schema import APIError

    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.strip().encode(), settings.api_key.encode()
    ):
        raise APIError(
            401,
            "missing or incorrect API key: send `Authorization: Bearer KEY`",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


# --- the routes ---------------------------------------------------------------------------------------------


async def health(request: Request) -> dict[str, Any]:
    """`GET /health`: up, which model, how many requests wait (no key needed: for load balancers)."""
    state = request.app.state
    return {"status": "ok", "model": state.settings.model_name, "queue": state.batcher.queue_size}


async def index() -> HTMLResponse:
    """`GET /`: the chat page, which calls `/v1/chat/completions` like any client."""
    from importlib.resources import files

    return HTMLResponse((files("gpt2mm.serve") / "web" / "index.html").read_text(encoding="utf-8"))


async def models(request: Request) -> dict[str, Any]:
    """`GET /v1/models`: the one served model, as OpenAI lists models."""
    settings = request.app.state.settings
    check_auth(request, settings)
    return {
        "object": "list",
        "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "gpt2mm"}],
    }


async def chat_completions(request: Request) -> Any:
    """`POST /v1/chat/completions`: check, prepare the prompt (in a thread), queue it for the batcher, then
    answer with the whole completion or stream it as server-sent events."""
    from fastapi.responses import StreamingResponse

    from gpt2mm.serve.schema import APIError

    state = request.app.state
    settings: ServerSettings = state.settings
    check_auth(request, settings)
    if state.batcher.full:  # refused at once, before its body is read and its image decoded
        raise queue_full(settings)
    chat = await read_chat(request, settings)
    gen = await asyncio.to_thread(build_request, chat, state.engine, settings)
    prompt_tokens = len(gen.prompt.input_ids)
    events = submit(gen, state.batcher, settings, stream=chat.stream)
    meta = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=settings.model_name)
    if chat.stream:
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        return StreamingResponse(
            stream_events(gen, events, meta, prompt_tokens, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        await events.get()
    finally:
        gen.cancelled.set()  # a no-op when finished; stops the rows when the client went away
    if gen.error is not None:
        log.error("generation failed: %r", gen.error)
        raise APIError(500, "generation failed", type="server_error")
    return completion(meta, gen, prompt_tokens)


async def read_chat(request: Request, settings: ServerSettings) -> ChatRequest:
    """The body as a validated `ChatRequest` for the served model: 413 over the size limit, 400 for bad JSON
    or fields, 404 `model_not_found` for another model's name."""
    from gpt2mm.serve.schema import APIError, parse_request

    body = await read_body(request, settings.max_body_bytes)
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}"[:500], code="invalid_json") from None
    chat = parse_request(data)
    if chat.model is not None and chat.model not in (settings.model_name, *settings.model_aliases):
        raise APIError(
            404,
            f"The model `{chat.model}` does not exist: this server serves `{settings.model_name}` "
            "(send it as `model`, or leave `model` out)",
            param="model",
            code="model_not_found",
        )
    return chat


def submit(
    gen: GenerationRequest, batcher: Batcher, settings: ServerSettings, stream: bool
) -> asyncio.Queue[tuple[Any, ...]]:
    """Queue `gen` for the batcher; its deltas (when streamed) and its end arrive on the returned queue, on
    this event loop. A full queue is a 503 with `Retry-After`."""
    events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def put(event: tuple[Any, ...]) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is gone: the client went away with it
            gen.cancelled.set()

    if stream:
        gen.on_delta = lambda i, text: put(("delta", i, text))
    gen.on_done = lambda r: put(("done",))
    try:
        batcher.submit(gen)
    except QueueFull:
        raise queue_full(settings) from None
    return events


def queue_full(settings: ServerSettings) -> Exception:
    """The 503 of a full queue, with `Retry-After`."""
    from gpt2mm.serve.schema import APIError

    return APIError(
        503,
        "the server is busy: too many requests are waiting; retry shortly",
        type="server_error",
        code="queue_full",
        headers={"Retry-After": str(settings.retry_after_s)},
    )


def completion(meta: dict[str, Any], gen: GenerationRequest, prompt_tokens: int) -> dict[str, Any]:
    """A finished request as an OpenAI `chat.completion` object."""
    return {
        **meta,
        "object": "chat.completion",
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for c in gen.choices
        ],
        "usage": usage(prompt_tokens, gen.completion_tokens),
        "system_fingerprint": None,
    }


def build_request(chat: ChatRequest, engine: Engine, settings: ServerSettings) -> GenerationRequest:
    """Validated request -> prompt ids, pixel values, sampling settings (runs in a thread: it decodes
    images and tokenizes)."""
    from gpt2mm.serve.schema import APIError, messages_to_turns

    turns, urls = messages_to_turns(chat.messages)
    if len(urls) > settings.max_images:
        raise APIError(
            400,
            f"{len(urls)} images in the request; this server takes at most {settings.max_images}",
            param="messages",
            code="too_many_images",
        )
    max_n = min(settings.max_n, settings.max_batch_size)  # the n choices of a request share a batch
    if chat.n > max_n:
        raise APIError(400, f"n must be at most {max_n}", param="n", code="invalid_value")
    wanted = chat.max_completion_tokens or chat.max_tokens or settings.default_max_tokens
    if wanted > settings.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens must be at most {settings.max_tokens_limit}",
            param="max_tokens",
            code="invalid_value",
        )
    stops = chat.stop_strings()
    # Cheap bound before tokenizing a huge text: no token holds 32 characters.
    chars = sum(len(t) for _, t, _ in turns)
    if chars > 32 * engine.context_length:
        raise_too_long(engine, None)
    images = [load_image_url(url, settings, param) for url, param in urls]
    prompt = engine.prepare(turns, images)
    if len(prompt.input_ids) >= engine.context_length:
        raise_too_long(engine, len(prompt.input_ids))
    temperature = settings.default_temperature if chat.temperature is None else chat.temperature
    params = SamplingParams(
        max_new_tokens=wanted,
        temperature=float(temperature),
        top_p=1.0 if chat.top_p is None else float(chat.top_p),
        n=chat.n,
        stop=stops,
        seed=chat.seed,
    )
    return GenerationRequest(prompt, params)


def raise_too_long(engine: Engine, n_tokens: int | None) -> None:
    """The 400 `context_length_exceeded` for a prompt that leaves no room for an answer."""
    from gpt2mm.serve.schema import APIError

    size = f"{n_tokens} tokens" if n_tokens is not None else "too long"
    raise APIError(
        400,
        f"the prompt is {size}; the model's context is {engine.context_length} tokens including the answer"
        f" (each image takes {engine.num_image_tokens})",
        param="messages",
        code="context_length_exceeded",
    )


async def stream_events(
    gen: GenerationRequest,
    events: asyncio.Queue[tuple[Any, ...]],
    meta: dict[str, Any],
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The server-sent events of a streamed request: the role, each delta, the finish reasons, the usage
    when asked for, `[DONE]`; the request is cancelled when the client goes away."""
    from gpt2mm.serve.schema import error_body

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {**meta, "object": "chat.completion.chunk", "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def choice(i: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

    try:
        yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(gen.params.n)])
        while True:
            event = await events.get()
            if event[0] == "delta":
                yield chunk([choice(event[1], {"content": event[2]})])
                continue
            break
        if gen.error is not None:
            log.error("generation failed: %r", gen.error)
            yield f"data: {json.dumps(error_body('generation failed', 'server_error'))}\n\n"
        else:
            yield chunk([choice(c.index, {}, c.finish_reason) for c in gen.choices])
            if include_usage:
                yield chunk([], usage=usage(prompt_tokens, gen.completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        gen.cancelled.set()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 when Content-Length or the bytes actually sent exceed `limit`."""
    from gpt2mm.serve.schema import APIError

    too_large = APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large
        except ValueError:
            raise APIError(400, "invalid Content-Length header", code="invalid_header") from None
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)
