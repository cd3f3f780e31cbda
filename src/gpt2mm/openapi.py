"""The OpenAPI documents of the two HTTP apps (`gpt2mm serve`, `gpt2mm tag`), served at `/openapi.json`.

Their handlers read the raw request (to bound the body's size and to answer every bad input with the error
shape below), so FastAPI cannot infer the schemas: each app describes its operations here, from the same
pydantic models the server validates with and with the limits the server enforces, so that a client (or a
fuzzer: tests/test_fuzz_api.py runs Schemathesis from these documents) sees what the server accepts and
every status it may answer. Every error, in both apps, has OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import logging
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


class APIError(Exception):
    """A request either app refuses: answered as `error_body(...)` with an HTTP status (and headers, such as
    a 503's Retry-After)."""

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


def add_error_handlers(app: Any, log: logging.Logger) -> None:
    """Every error of a FastAPI `app` in OpenAI's shape, never a bare 500 page: ours (`APIError`), routing
    (404, 405), request validation (400) and anything unexpected (500, logged to `log`)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def api_error(request: Any, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def http_error(request: Any, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(e.detail), kind), status_code=e.status_code, headers=getattr(e, "headers", None)
        )

    async def validation_error(request: Any, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid request", "invalid_request_error"), status_code=400)

    async def server_error(request: Any, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)


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
