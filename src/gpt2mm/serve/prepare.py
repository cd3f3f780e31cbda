"""An OpenAI chat request made ready for the engine: the server's limits (`ServerSettings`, the
`gpt2mm serve` flags), the body read and validated (`read_chat`), the messages mapped onto the model's Q/A
turns (`messages_to_turns`), the images decoded from their URLs (`load_image_url`), and all of it checked
against the limits and encoded as one `GenerationRequest` (`build_request`).

This is apart from the app (`gpt2mm.serve.api`: the routes, the batcher, the answers) so that a request is
prepared the same way with or without a server: `bench/overload.py` computes its expected answers through
`parse_request` + `build_request` and the engine alone.

Messages map onto the model's Q/A format:

- `system` and `developer` messages are ignored: the model was never trained with instructions.
- Consecutive messages of the same role are merged (their texts joined by a space).
- After that the turns must alternate user/assistant, start with user and end with user.
- Content is a string or a list of `text` and `image_url` parts; images belong to user turns. A turn with
  one image has it after its `Q:` (the seed's `Q: <image> {question} A:`, wherever the part stands); a turn
  with several (`gpt2mm serve --max-images N`) has each where its part stands among the text parts,
  `Q: Compare <image> and <image> . A:`. Text may not hold `<image>` itself: images are `image_url` parts.
- Every user turn needs text (the question): the model answers `Q: <image> {question} A:` and has no prompt
  of its own for an image alone, so an empty or blank question (an image-only message included) is a 400;
  to get a description, ask for one ("Describe the image in detail.").

Untrusted input is refused with a 4xx OpenAI-shaped error (`APIError`), never a crash: bodies over
`--max-body-bytes` (by Content-Length and by the bytes actually read), bad JSON or fields, bad base64,
non-images, truncated images, images over the byte or pixel limits (decompression bombs), more images than
`--max-images`, prompts longer than the context. Images come as base64 `data:` URLs; `http(s)` URLs only
under a prefix given with `--allow-image-urls`, `file://` paths only inside a directory given with
`--allow-local-images` (resolved, symlinks included, before the check).

pydantic and FastAPI (the `serve` extra) are imported where they are used, as in `gpt2mm.serve.api`, so
that this module, and with it `gpt2mm serve --help`, imports without them.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from gpt2mm.data.samples import IMAGE_PLACEHOLDER
from gpt2mm.errors import DataError
from gpt2mm.serve.engine import Engine, GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from fastapi import Request
    from PIL import Image

    from gpt2mm.serve.schema import ChatRequest, Message


# --- the limits ---------------------------------------------------------------------------------------------


MB = 1024 * 1024


@dataclass
class ServerSettings:
    """Limits and switches of the server (the `gpt2mm serve` flags). Here, with the code that enforces
    most of them; the app (`gpt2mm.serve.api`) reads the rest: the key, the batching and the queue."""

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


# --- the body -----------------------------------------------------------------------------------------------


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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


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


# --- messages -> turns --------------------------------------------------------------------------------------


def message_text(text: str, param: str) -> str:
    """A text part (or string content), checked: valid Unicode without the `<image>` placeholder, which
    would become an image's tokens with no image."""
    from gpt2mm.serve.schema import APIError, check_text

    if IMAGE_PLACEHOLDER in check_text(text, param):
        raise APIError(
            400,
            f"{param}: text may not hold {IMAGE_PLACEHOLDER}; send images as image_url parts",
            param=param,
            code="invalid_value",
        )
    return text


def messages_to_turns(messages: list[Message]) -> tuple[list[tuple[str, str, int]], list[tuple[str, str]]]:
    """Messages -> (role, text, number of images) turns for `Engine.prepare`, and the image URLs in order
    as (url, param) pairs (param names the part, for error messages). A user turn with several images gets
    an `<image>` placeholder where each stands among its text parts; with one, none (it goes after `Q:`)."""
    from gpt2mm.serve.schema import APIError, TextPart

    # [role, pieces (texts and IMAGE_PLACEHOLDER, in order), index of the turn's last message]
    merged: list[list[Any]] = []
    urls: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            continue
        pieces: list[str] = []
        if m.content is None:
            if m.role == "user":
                raise APIError(400, "user messages need content", param=f"messages.{i}.content")
        elif isinstance(m.content, str):
            pieces.append(message_text(m.content, f"messages.{i}.content"))
        else:
            for j, part in enumerate(m.content):
                param = f"messages.{i}.content.{j}"
                if isinstance(part, TextPart):
                    pieces.append(message_text(part.text, param + ".text"))
                else:
                    if m.role != "user":
                        raise APIError(400, "only user messages can hold images", param=param)
                    urls.append((part.image_url.url, param + ".image_url.url"))
                    pieces.append(IMAGE_PLACEHOLDER)
        if merged and merged[-1][0] == m.role:
            merged[-1][1] += pieces
            merged[-1][2] = i
        else:
            merged.append([m.role, pieces, i])
    if not merged or merged[0][0] != "user":
        raise APIError(400, "the conversation must start with a user message", param="messages")
    if merged[-1][0] != "user":
        raise APIError(400, "the last message must be a user message", param="messages")
    turns: list[tuple[str, str, int]] = []
    for role, pieces, i in merged:
        words = [p.strip() for p in pieces if p.strip()]
        text = " ".join(w for w in words if w != IMAGE_PLACEHOLDER)
        n_images = words.count(IMAGE_PLACEHOLDER)
        # one image keeps the seed's place after `Q:`; several stand where their parts do
        turns.append((role, " ".join(words) if n_images > 1 else text, n_images))
        if role == "user" and not text:
            what = "only an image" if n_images == 1 else "only images" if n_images else "no text"
            raise APIError(
                400,
                f"messages.{i}.content: the question is empty (the user message has {what}): ask a "
                "question, e.g. 'Describe the image in detail.'",
                param=f"messages.{i}.content",
                code="empty_question",
            )
    return turns, urls


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


# --- the generation request ---------------------------------------------------------------------------------


def build_request(chat: ChatRequest, engine: Engine, settings: ServerSettings) -> GenerationRequest:
    """Validated request -> prompt ids, pixel values, sampling settings (runs in a thread: it decodes
    images and tokenizes)."""
    from gpt2mm.serve.schema import APIError

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
