"""The OpenAI chat-completions request, validated strictly, and errors in OpenAI's JSON shape.

Types are strict (a number where a string is expected, `"5"` for `max_tokens`, NaN: all 400s), unknown
fields are ignored. Messages map onto the model's Q/A format:

- `system` and `developer` messages are ignored: the model was never trained with instructions.
- Consecutive messages of the same role are merged (their texts joined by a space).
- After that the turns must alternate user/assistant, start with user and end with user.
- Content is a string or a list of `text` and `image_url` parts; images belong to user turns, and each one
  becomes a run of `<image>` tokens after that turn's `Q:`, in order.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Model):
    type: Literal["text"]
    text: StrictStr


class ImageURL(_Model):
    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[Part] | None = None


class StreamOptions(_Model):
    include_usage: StrictBool = False


class ChatRequest(_Model):
    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    n: StrictInt = Field(1, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop", code="invalid_value")
        for s in stops:
            check_text(s, "stop")
        return tuple(s for s in stops if s)


def parse_request(data: Any) -> ChatRequest:
    """JSON value -> `ChatRequest`, or a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        missing = err["type"] == "missing"
        message = f"{param}: {err['msg']}" if param else str(err["msg"])
        raise APIError(
            400, message, param=param, code="missing_field" if missing else "invalid_value"
        ) from None


def check_text(text: str, param: str) -> str:
    """Refuse strings that are not valid Unicode text (lone surrogates cannot be tokenized)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param}: not valid UTF-8 text", param=param, code="invalid_value") from None
    return text


def messages_to_turns(messages: list[Message]) -> tuple[list[tuple[str, str, int]], list[tuple[str, str]]]:
    """Messages -> (role, text, number of images) turns for `Engine.prepare`, and the image URLs in order
    as (url, param) pairs (param names the part, for error messages)."""
    merged: list[list[Any]] = []  # [role, texts, n_images]
    urls: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            continue
        texts: list[str] = []
        n_images = 0
        if m.content is None:
            if m.role == "user":
                raise APIError(400, "user messages need content", param=f"messages.{i}.content")
        elif isinstance(m.content, str):
            texts.append(check_text(m.content, f"messages.{i}.content"))
        else:
            for j, part in enumerate(m.content):
                param = f"messages.{i}.content.{j}"
                if isinstance(part, TextPart):
                    texts.append(check_text(part.text, param + ".text"))
                else:
                    if m.role != "user":
                        raise APIError(400, "only user messages can hold images", param=param)
                    urls.append((part.image_url.url, param + ".image_url.url"))
                    n_images += 1
        text = " ".join(t.strip() for t in texts if t.strip())
        if merged and merged[-1][0] == m.role:
            merged[-1][1] = " ".join(t for t in (merged[-1][1], text) if t)
            merged[-1][2] += n_images
        else:
            merged.append([m.role, text, n_images])
    if not merged or merged[0][0] != "user":
        raise APIError(400, "the conversation must start with a user message", param="messages")
    if merged[-1][0] != "user":
        raise APIError(400, "the last message must be a user message", param="messages")
    return [(r, t, n) for r, t, n in merged], urls
