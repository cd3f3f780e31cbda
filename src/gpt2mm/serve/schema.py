"""The OpenAI chat-completions request, validated strictly, and errors in OpenAI's JSON shape.

Types are strict (a number where a string is expected, `"5"` for `max_tokens`, NaN: all 400s), unknown
fields are ignored. Messages map onto the model's Q/A format:

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

from gpt2mm.data.samples import IMAGE_PLACEHOLDER
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


def message_text(text: str, param: str) -> str:
    """A text part (or string content), checked: valid Unicode without the `<image>` placeholder, which
    would become an image's tokens with no image."""
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
