"""The tagging app's JSON API as pydantic models and its OpenAPI document (`GET /openapi.json`; see
`gpt2mm.openapi`). The handlers in `gpt2mm.tag.app` check requests by hand (each error names its field); these
models say the same for clients and for the fuzz tests (tests/test_fuzz_api.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from gpt2mm.tag.app import MAX_BODY_BYTES, MAX_ITEM_ID, MAX_TAGGER_CHARS


class TagItem(BaseModel):
    item_id: int
    question_id: str
    question: str
    answer: str
    references: list[str]
    image_url: str


class TagStats(BaseModel):
    """Counts (`store.tag_stats`); `mine`, `mine_skipped` and `left_for_me` only when a tagger is named."""

    total: int
    done: int
    correct: int
    incorrect: int
    skipped: int
    taggers: int
    remaining: int
    mine: int | None = None
    mine_skipped: int | None = None
    left_for_me: int | None = None


class NextResponse(BaseModel):
    item: TagItem | None
    claimed_until: float | None
    stats: TagStats


class TagRequest(BaseModel):
    item_id: int = Field(ge=1, le=MAX_ITEM_ID)
    tagger: str = Field(min_length=1, max_length=MAX_TAGGER_CHARS)
    label: Literal["correct", "incorrect", "skip"]


class TagResponse(BaseModel):
    item_id: int
    tagger: str
    label: Literal["correct", "incorrect", "skip"]
    stats: TagStats


class TaggerRequest(BaseModel):
    tagger: str = Field(min_length=1, max_length=MAX_TAGGER_CHARS)


class UndoResponse(BaseModel):
    item: TagItem
    stats: TagStats


class ReleaseResponse(BaseModel):
    released: str


def openapi_document() -> dict[str, Any]:
    """The API as OpenAPI 3.1 (`GET /openapi.json`): what each operation takes and every status it answers."""
    from gpt2mm import __version__
    from gpt2mm.openapi import components, document, errors, json_content

    refs, schemas = components(
        [TagRequest, TaggerRequest], [NextResponse, TagResponse, UndoResponse, ReleaseResponse, TagStats]
    )

    def ok(name: str, what: str) -> dict[str, Any]:
        return {"description": what, "content": json_content(refs[name])}

    tagger = {"type": "string", "minLength": 1, "maxLength": MAX_TAGGER_CHARS}
    bad = errors(refs, _400="a missing or invalid field (named in `param`)")
    body_errors = {**bad, **errors(refs, _413=f"the body is over {MAX_BODY_BYTES} bytes")}

    def post(summary: str, request: str, answer: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, "content": json_content(refs[request])},
                "responses": {"200": answer, **body_errors, **more},
            }
        }

    def query(required: bool) -> list[dict[str, Any]]:
        return [{"name": "tagger", "in": "query", "required": required, "schema": tagger}]

    not_found = errors(refs, _404="no such item in the database")
    paths = {
        "/api/next": {
            "get": {
                "summary": "claim the tagger's next item (the one it holds, if any)",
                "parameters": query(True),
                "responses": {"200": ok("NextResponse", "the item, or null when none is left"), **bad},
            }
        },
        "/api/tag": post("record a label", "TagRequest", ok("TagResponse", "recorded"), **not_found),
        "/api/undo": post(
            "take back the tagger's last tag",
            "TaggerRequest",
            ok("UndoResponse", "the item, claimed again"),
            **errors(refs, _404="the tagger has no tag"),
        ),
        "/api/release": post(
            "give back the tagger's item", "TaggerRequest", ok("ReleaseResponse", "released")
        ),
        "/api/stats": {
            "get": {
                "summary": "counts, overall or the tagger's",
                "parameters": query(False),
                "responses": {"200": ok("TagStats", "counts"), **bad},
            }
        },
        "/images/{item_id}": {
            "get": {
                "summary": "the image of an item in the database",
                "parameters": [
                    {
                        "name": "item_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "the image",
                        "content": {"image/*": {"schema": {"type": "string"}}},
                    },
                    **errors(refs, _404="no such item, or its image is missing"),
                },
            }
        },
        "/": {
            "get": {
                "summary": "the tagging page",
                "responses": {
                    "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}
                },
            }
        },
    }
    return document("gpt2mm tag", __version__, paths, schemas)
