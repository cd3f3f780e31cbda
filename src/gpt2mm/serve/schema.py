"""The OpenAI chat-completions request, validated strictly, and errors in OpenAI's JSON shape.

Types are strict (a number where a string is expected, `"5"` for `max_tokens`, NaN: all 400s), unknown
fields are ignored. This module is the wire format only (the request's types and their validation,
`parse_request`; the answers' types); how the messages map onto the model's Q/A format, and the rest of
preparing a request for the engine, is `gpt2mm.serve.prepare`.

Both unions (`content`: string or parts; a part: by its `type`) are tagged, so an error names the real
problem (`messages.0.content.0.image_url.url: Field required`), not the first alternative that failed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
)

from gpt2mm.openapi import APIError, error_body  # noqa: F401  (the error shape, shared with the tagging app)

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


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
PART_TYPES = ("text", "image_url")


def _string_or_list(value: Any) -> str | None:
    return "string" if isinstance(value, str) else "list" if isinstance(value, list) else None


def _string_or_list_of(item: Any, what: str) -> Any:
    """`StrictStr | list[item]`, picked by the input's JSON type, so that the errors are those of the
    alternative the input meant (a smart union reports the first alternative's: `.str: Input should be a
    valid string` for a bad part)."""
    return Annotated[
        Annotated[StrictStr, Tag("string")] | Annotated[list[item], Tag("list")],
        Discriminator(
            _string_or_list,
            custom_error_type="string_or_list",
            custom_error_message=f"Input should be a string or a list of {what}",
        ),
    ]


Content = _string_or_list_of(Part, "content parts")
Stop = _string_or_list_of(StrictStr, "strings")


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: Content | None = None


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
    stop: Stop | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: StrictBool | None = None  # refused when true: see `refuse_unsupported`
    top_logprobs: StrictInt | None = None

    def refuse_unsupported(self) -> None:
        """OpenAI parameters this server does not implement, refused rather than silently ignored."""
        for param, asked in (
            ("logprobs", bool(self.logprobs)),
            ("top_logprobs", self.top_logprobs is not None),
        ):
            if asked:
                raise APIError(
                    400, f"{param}: not supported by this server", param=param, code="unsupported_parameter"
                )

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
        chat = ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        loc, msg = public_loc(err["loc"]), err["msg"]
        if err["type"] == "union_tag_not_found":  # a part without a (string) type
            loc, msg = [*loc, "type"], f"Field required ({' or '.join(map(repr, PART_TYPES))})"
        param = ".".join(str(x) for x in loc) or None
        missing = err["type"] in ("missing", "union_tag_not_found")
        message = f"{param}: {msg}" if param else str(msg)
        raise APIError(
            400, message, param=param, code="missing_field" if missing else "invalid_value"
        ) from None
    chat.refuse_unsupported()
    return chat


def public_loc(loc: tuple[int | str, ...]) -> list[int | str]:
    """pydantic's error location without the tags of the tagged unions, i.e. the path in the request:
    `messages.0.content.list.1.image_url.image_url.url` -> `messages.0.content.1.image_url.url`."""
    out = list(loc)
    if out[:1] == ["stop"] and out[1:2] in (["string"], ["list"]):
        del out[1]
    if len(out) > 3 and out[0] == "messages" and out[2] == "content" and out[3] in ("string", "list"):
        del out[3]  # now out[3] is the part's index and out[4] the tag of its type
        if len(out) > 4 and isinstance(out[3], int) and out[4] in PART_TYPES:
            del out[4]
    return out


def check_text(text: str, param: str) -> str:
    """Refuse strings that are not valid Unicode text (lone surrogates cannot be tokenized)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param}: not valid UTF-8 text", param=param, code="invalid_value") from None
    return text


# --- what the server answers (documented in its OpenAPI document: `gpt2mm.serve.api.openapi_document`) ----------


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length", "cancelled"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """A non-streamed answer (a streamed one is server-sent events of `chat.completion.chunk` objects)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    queue: int
