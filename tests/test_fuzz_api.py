"""Both HTTP APIs fuzzed with Schemathesis from their own OpenAPI documents (`/openapi.json`).

Schemathesis generates requests that fit each operation's schema (positive) and requests that break it
(negative), sends them to the ASGI app in-process and checks every answer: no 5xx but 503, every error in
OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), every status and body as the document
says, and schema-breaking requests refused with a 4xx. Afterwards the server is alive and answers a fixed
greedy request exactly as it did before (the tagging app: its database intact and its flow working).

The default run sends a bounded number of requests (a few seconds, derandomized: a CI failure reproduces
locally); the `slow` variant sends many more.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402

from conftest import make_image, wide_tiny_model  # noqa: E402
from gpt2mm.serve.api import create_app  # noqa: E402
from gpt2mm.serve.engine import Engine  # noqa: E402
from gpt2mm.serve.prepare import ServerSettings  # noqa: E402

FAST, LONG = 40, 1500  # requests generated after the coverage phase: the default run, the slow one


def no_server_error_but_503(ctx, response, case) -> None:
    """A 5xx is a bug of ours, except 503 (the queue is full), which must say when to retry."""
    assert response.status_code < 500 or response.status_code == 503, (response.status_code, response.text)
    if response.status_code == 503:
        assert response.headers.get("retry-after")


def openai_error_shape(ctx, response, case) -> None:
    """Every error is `{"error": {"message", "type", "param", "code"}}` with a message saying something."""
    if response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body
    assert all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")), body


CHECKS = [
    no_server_error_but_503,
    openai_error_shape,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
    st_checks.negative_data_rejection,
]


def coverage_cases(schema):
    """Schemathesis' coverage phase: for every operation, deterministic requests at each field's boundaries
    and just past them (a maximum and one more, a missing required field, a wrong type), schema-fitting
    and schema-breaking."""
    for result in schema.get_all_operations():
        operation = result.ok()
        yield from schema.iter_coverage_cases(
            operation,
            generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
            generation_config=schema.config.generation_for(operation=operation, phase="coverage"),
        )


def fuzz(app, n: int, examples: tuple[tuple[str, str, dict], ...] = ()) -> tuple[Counter, int]:
    """`examples` (path, method, JSON body: requests that succeed, so that every answer's documented shape
    is checked at least once), the coverage phase's requests, then `n` generated ones (positive and
    negative, random within the schemas), to `app`, each answer checked. Returns the status counts and how
    many came before the generated ones; fails listing every failing request."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen: Counter = Counter()
    failures: list[str] = []

    def send(case) -> None:
        try:
            response = case.call()
        except Exception as e:  # the app raised: a client gets a 500, and Schemathesis' own client this
            seen[500] += 1
            failures.append(f"the app raised {type(e).__name__}: {e}\n    {case.as_curl_command()}")
            return
        seen[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as e:  # schemathesis' FailureGroup: the check that failed, the request as curl
            failures.append(str(e))

    for path, method, body in examples:
        send(schema[path][method].Case(body=body, media_type="application/json"))
    for case in coverage_cases(schema):
        send(case)
    covered = sum(seen.values())
    strategy = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)
    )

    @settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case) -> None:
        send(case)

    run()
    assert not failures, f"{len(failures)} of {sum(seen.values())} requests failed:\n" + "\n".join(
        failures[:5]
    )
    return seen, covered


@pytest.fixture(scope="module")
def engine() -> Engine:
    model, processor = wide_tiny_model()
    return Engine(model, processor, device="cpu")


def chat_body(**extra) -> dict:
    from test_serve import data_url, png_bytes

    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(make_image(3)))}}
    content = [image, {"type": "text", "text": "What color?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def greedy_answer(client) -> str:
    r = client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("n", [FAST, pytest.param(LONG, marks=pytest.mark.slow)], ids=["fast", "long"])
def test_serve_api_fuzzed_from_its_openapi_document(engine, n):
    app = create_app(
        engine,
        ServerSettings(model_name="tiny", max_tokens_limit=4, default_max_tokens=3, max_images=2, max_n=2),
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        before = greedy_answer(client)
        answers = tuple(
            ("/v1/chat/completions", "POST", chat_body(stream=stream, n=2)) for stream in (False, True)
        )
        seen, covered = fuzz(app, n, answers)
        assert client.get("/health").json()["status"] == "ok"
        assert greedy_answer(client) == before
    print(
        f"serve: {sum(seen.values())} requests ({covered} before the generated ones), {dict(sorted(seen.items()))}"
    )
    assert sum(seen.values()) >= n // 2 and any(400 <= s < 500 for s in seen) and 200 in seen


@pytest.fixture()
def tag_db(tmp_path) -> Path:
    from gpt2mm.data.synthetic import write_world
    from gpt2mm.tag import store

    world = tmp_path / "world"
    write_world(world, n_train=0, n_val=2, n_test=0, seed=3)
    images = sorted((world / "images" / "val").glob("*.png"))
    conn = store.open_db(tmp_path / "tags.sqlite")
    store.add_items(
        conn,
        [store.Item(str(k), str(images[k % 2].resolve()), f"Question {k}?", f"answer {k}") for k in range(6)],
    )
    conn.close()
    return tmp_path / "tags.sqlite"


@pytest.mark.parametrize("n", [FAST, pytest.param(LONG, marks=pytest.mark.slow)], ids=["fast", "long"])
def test_tag_api_fuzzed_from_its_openapi_document(tag_db, n):
    from gpt2mm.tag import app as tag_app

    app = tag_app.create_app(tag_db)
    with TestClient(app, raise_server_exceptions=False) as client:
        flow = (
            ("/api/tag", "POST", {"item_id": 1, "tagger": "fuzz", "label": "correct"}),
            ("/api/undo", "POST", {"tagger": "fuzz"}),
            ("/api/release", "POST", {"tagger": "fuzz"}),
        )
        seen, covered = fuzz(app, n, flow)
        conn = sqlite3.connect(tag_db)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        item = client.get("/api/next", params={"tagger": "after the fuzz"}).json()["item"]
        if item is not None:  # the fuzz may have tagged every item
            r = client.post(
                "/api/tag", json={"item_id": item["item_id"], "tagger": "after the fuzz", "label": "skip"}
            )
            assert (
                r.status_code == 200
                and client.post("/api/undo", json={"tagger": "after the fuzz"}).status_code == 200
            )
        assert client.get("/images/1").status_code == 200
    print(
        f"tag: {sum(seen.values())} requests ({covered} before the generated ones), {dict(sorted(seen.items()))}"
    )
    assert sum(seen.values()) >= n // 2 and any(400 <= s < 500 for s in seen) and 200 in seen
