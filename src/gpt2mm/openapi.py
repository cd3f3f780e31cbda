"""The OpenAPI documents of the two HTTP apps (`gpt2mm serve`, `gpt2mm tag`), served at `/openapi.json`.

Their handlers read the raw request (to bound the body's size and to answer every bad input with the error
shape below), so FastAPI cannot infer the schemas: each app describes its operations here, from the same
pydantic models the server validates with and with the limits the server enforces, so that a client (or a
fuzzer: tests/test_fuzz_api.py runs Schemathesis from these documents) sees what the server accepts and
every status it may answer. Every error, in both apps, has OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    model_config = ConfigDict(title="ErrorDetail")
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error either app answers, as OpenAI's API does."""

    error: ErrorDetail


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def components(
    requests: list[type[BaseModel]], responses: list[type[BaseModel]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model name -> `$ref` schema, the component schemas) for request models (as validated) and response
    models (as serialized), ErrorResponse included."""
    pairs = [(m, "validation") for m in requests] + [
        (m, "serialization") for m in [*responses, ErrorResponse]
    ]
    refs, defs = models_json_schema(pairs, ref_template=REF)
    return {model.__name__: refs[(model, mode)] for model, mode in pairs}, defs.get("$defs", {})


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def errors(refs: dict[str, Any], **described: str) -> dict[str, Any]:
    """Error responses by status: `errors(refs, 400="bad input", ...)` (keys as `_400`, `_404`, ...)."""
    return {
        key.lstrip("_"): {"description": text, "content": json_content(refs["ErrorResponse"])}
        for key, text in described.items()
    }


def document(title: str, version: str, paths: dict[str, Any], schemas: dict[str, Any], **extra: Any) -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": schemas, **extra},
    }
