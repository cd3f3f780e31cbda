"""`gpt2mm serve MODEL` (the command: `gpt2mm.commands.serve`): an OpenAI-compatible HTTP API and a web
page, with dynamic batching.

    gpt2mm serve ./my-model --port 8000 [--api-key KEY]
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"messages": [{"role":
      "user", "content": [{"type": "text", "text": "What color is it?"}, {"type": "image_url",
      "image_url": {"url": "data:image/png;base64,..."}}]}]}'

Endpoints: `POST /v1/chat/completions` (non-streamed or server-sent events), `GET /v1/models`,
`GET /health`, and the chat page at `/` (which calls the same endpoint). This module is the app: its routes,
the batcher they share and the answers (whole or streamed); a request is read, checked against the limits
(`ServerSettings`) and made into the engine's `GenerationRequest` by `gpt2mm.serve.prepare`, which also
says how messages map onto the model's Q/A format.

Differences from OpenAI, on purpose: `temperature` defaults to 0 (greedy; `--default-temperature`),
`model` may be left out (a `model` other than the served name, `--served-model-name` or the MODEL
argument as given, is a 404 `model_not_found`, as OpenAI and vLLM answer), and when prompt + `max_tokens` would overflow the context,
`max_tokens` is reduced to what fits (`finish_reason` then says "length"); a prompt that alone fills the
context is a 400. `logprobs` and `top_logprobs` are not implemented: asking for them is a 400
`unsupported_parameter`, not silently ignored. Every user message needs text (see `gpt2mm.serve.prepare`).

Untrusted input is refused with a 4xx OpenAI-shaped error, never a crash (what is checked, and the image
sources allowed: `gpt2mm.serve.prepare`). When the queue is full the answer is 503 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from gpt2mm.openapi import add_error_handlers
from gpt2mm.serve.batching import Batcher, QueueFull
from gpt2mm.serve.engine import Engine, GenerationRequest
from gpt2mm.serve.prepare import ServerSettings, build_request, read_chat

try:  # optional: `pip install 'gpt2-multimodal[serve]'` (`gpt2mm serve` says so when they are missing)
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
except ImportError:  # pragma: no cover
    FastAPI = Request = HTMLResponse = JSONResponse = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)


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
