"""`gpt2mm ask` and `gpt2mm serve`: the OpenAI-compatible API, dynamic batching, errors, auth, 503, fuzzing.

Everything runs in-process on a tiny random model (no network, nothing fetched). Its weights are drawn
wider than the preset's init so that answers differ from prompt to prompt (the preset's init answers
everything with the same token, which would make the equality checks vacuous).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import make_image, wide_tiny_model  # noqa: E402
from gpt2mm.serve.api import create_app  # noqa: E402
from gpt2mm.serve.engine import Engine  # noqa: E402
from gpt2mm.serve.prepare import ServerSettings, _local_path, _remote_allowed  # noqa: E402


@pytest.fixture(scope="module")
def engine() -> Engine:
    model, processor = wide_tiny_model()
    return Engine(model, processor, device="cpu")


@pytest.fixture(scope="module")
def client(engine):
    settings = ServerSettings(model_name="tiny", max_image_pixels=1_000_000, max_image_bytes=200_000)
    with TestClient(create_app(engine, settings)) as c:
        yield c


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(text: str, image: Image.Image | None = None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    return {
        "role": "user",
        "content": [image_part(data_url(png_bytes(image))), {"type": "text", "text": text}],
    }


def direct_answer(engine: Engine, turns, image, max_new_tokens: int) -> tuple[str, int]:
    """The answer by plain `model.generate` on `processor.encode_conversation`, one request at a time."""
    processor = engine.processor
    ids = processor.encode_conversation(turns, with_image=image is not None)["input_ids"]
    kw = {} if image is None else {"pixel_values": processor.preprocess_images([image])}
    with torch.no_grad():
        out = engine.model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, **kw
        )
    return processor.postprocess_answer(processor.decode(out[0, len(ids) :])), len(ids)


def assert_openai_error(response, status: int | None = None, code: str | None = None) -> dict:
    assert status is None or response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert code is None or body["error"]["code"] == code, body
    return body["error"]


def sse_events(text: str) -> list:
    events = [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# --- the API ------------------------------------------------------------------------------------------------


def test_chat_completion_equals_plain_generate(client, engine):
    image = make_image(1)
    r = client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [user("What color is the circle?", image)], "max_tokens": 8},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    expected, n_prompt = direct_answer(engine, [("user", "What color is the circle?")], image, 8)
    assert (
        body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    )
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert expected  # a real answer, not an empty string
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["prompt_tokens"] == n_prompt and u["total_tokens"] == n_prompt + u["completion_tokens"]
    assert 1 <= u["completion_tokens"] <= 8
    assert choice["finish_reason"] == "length" or u["completion_tokens"] < 8 or expected


def test_multi_turn_history_and_system_message(client, engine):
    image = make_image(2)
    turns = [("user", "What is it?"), ("assistant", "a red circle"), ("user", "How many?")]
    messages = [
        {"role": "system", "content": "You are helpful."},  # ignored: the model has no system prompt
        user("What is it?", image),
        {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
        {"role": "user", "content": "How many?"},
    ]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6})
    assert r.status_code == 200, r.text
    expected, n_prompt = direct_answer(engine, turns, image, 6)
    assert r.json()["choices"][0]["message"]["content"] == expected
    assert r.json()["usage"]["prompt_tokens"] == n_prompt


def test_text_only_and_engine_prompt_equals_processor(engine):
    turns = [("user", "What color?", 1), ("assistant", "red", 0), ("user", "Why?", 0)]
    ids = engine.encode_turns(turns)
    assert ids == engine.processor.encode_conversation([t[:2] for t in turns])["input_ids"]
    assert (
        engine.encode_turns([("user", "Hi", 0)])
        == engine.processor.encode_conversation([("user", "Hi")], with_image=False)["input_ids"]
    )


def test_stream_concatenates_to_the_answer(client):
    body = {"messages": [user("How many squares?", make_image(3))], "max_tokens": 10}
    full = client.post("/v1/chat/completions", json=body).json()
    r = client.post(
        "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(r.text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) >= 2
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == full["choices"][0]["finish_reason"] and all(f is None for f in finish[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def test_n_seed_stop_and_finish_reasons(client):
    image = make_image(4)
    base = {"messages": [user("Describe it", image)], "max_tokens": 8}
    greedy = client.post("/v1/chat/completions", json=base).json()
    answer = greedy["choices"][0]["message"]["content"]
    assert greedy["choices"][0]["finish_reason"] == "length"  # this model rarely ends on its own

    # a stop string cuts the answer before it, with finish_reason "stop"
    stop_at = answer[len(answer) // 2 :][:3]
    cut = client.post("/v1/chat/completions", json={**base, "stop": [stop_at]}).json()["choices"][0]
    assert (
        cut["finish_reason"] == "stop"
        and cut["message"]["content"] == answer[: answer.index(stop_at)].strip()
    )

    one = client.post("/v1/chat/completions", json={**base, "max_tokens": 1}).json()
    assert one["usage"]["completion_tokens"] == 1

    sampled = {**base, "temperature": 1.5, "top_p": 0.95, "n": 3, "seed": 1234}
    a = client.post("/v1/chat/completions", json=sampled).json()
    b = client.post("/v1/chat/completions", json=sampled).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["message"] for c in a["choices"]] == [c["message"] for c in b["choices"]]  # same seed
    c = client.post("/v1/chat/completions", json={**sampled, "seed": 99}).json()
    assert [x["message"] for x in a["choices"]] != [x["message"] for x in c["choices"]]


def test_max_tokens_clamped_to_the_context(client, engine):
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "circle " * 230}], "max_tokens": 500},
    )
    assert r.status_code == 200, r.text
    u, choice = r.json()["usage"], r.json()["choices"][0]
    assert u["prompt_tokens"] + u["completion_tokens"] <= engine.context_length
    assert choice["finish_reason"] == "stop" or u["total_tokens"] == engine.context_length


def test_models_health_and_page(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    page = client.get("/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    assert_openai_error(client.get("/nope"), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)


# --- dynamic batching -------------------------------------------------------------------------------------


def test_64_concurrent_greedy_requests_are_batched_and_equal_one_at_a_time(engine):
    settings = ServerSettings(max_batch_size=16, batch_wait_ms=50, max_queue=128)
    app = create_app(engine, settings)
    questions = ["What color is it?", "How many circles?", "Is there a square?", "Where is the star?"]
    cases = []
    for i in range(64):
        image = make_image(100 + i % 8) if i % 5 else None  # some text-only rows in the same batches
        turns = [("user", questions[i % 4])]
        if i % 3 == 0:
            turns += [("assistant", "two red circles"), ("user", questions[(i + 1) % 4])]
        cases.append((turns, image, 3 + i % 6))  # per-request max_tokens inside one batch

    def body(turns, image, max_tokens):
        messages = [user(turns[0][1], image)] + [{"role": r, "content": t} for r, t in turns[1:]]
        return {"messages": messages, "max_tokens": max_tokens, "temperature": 0}

    async def send_all():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body(*case)) for case in cases))

    runs_before = engine.batches_run
    engine.max_rows_seen = 0
    responses = asyncio.run(send_all())
    batches = engine.batches_run - runs_before
    app.state.batcher.stop()
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    got = [r.json()["choices"][0]["message"]["content"] for r in responses]
    expected = [direct_answer(engine, turns, image, n)[0] for turns, image, n in cases]
    assert got == expected
    assert len(set(got)) > 10  # the answers really differ
    assert engine.max_rows_seen > 1 and batches < 64, (engine.max_rows_seen, batches)
    print(f"64 requests in {batches} generate calls, largest batch {engine.max_rows_seen} rows")


def test_full_queue_answers_503_with_retry_after_and_recovers(engine, monkeypatch):
    release = threading.Event()
    original = engine.generate

    def slow_generate(requests):
        release.wait(10)
        original(requests)

    monkeypatch.setattr(engine, "generate", slow_generate)
    app = create_app(engine, ServerSettings(max_batch_size=1, max_queue=1, batch_wait_ms=1, retry_after_s=2))
    body = {"messages": [user("What?", make_image(5))], "max_tokens": 2}

    async def send():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            timer = threading.Timer(1.0, release.set)
            timer.start()
            responses = await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(5)))
            health = await c.get("/health")
            after = await c.post("/v1/chat/completions", json=body)
            return responses, health, after

    responses, health, after = asyncio.run(send())
    app.state.batcher.stop()
    codes = sorted(r.status_code for r in responses)
    assert 503 in codes and 200 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "2"
    assert_openai_error(busy, 503, "queue_full")
    assert health.status_code == 200 and after.status_code == 200


def test_a_request_meeting_a_full_queue_is_refused_before_its_body_is_read(engine):
    """While the queue is full, a request is a 503 at once: even a body that is not JSON (a 400 otherwise)
    is neither read nor decoded."""
    app = create_app(engine, ServerSettings(max_queue=1, retry_after_s=3))
    batcher = app.state.batcher
    batcher._queue.put_nowait(object())  # the worker is not started: the queue stays full
    client = TestClient(app)
    busy = client.post("/v1/chat/completions", content=b"{not json")
    assert busy.status_code == 503 and busy.headers["retry-after"] == "3"
    assert_openai_error(busy, 503, "queue_full")
    batcher._queue.get_nowait()
    assert_openai_error(client.post("/v1/chat/completions", content=b"{not json"), 400, "invalid_json")


# --- bad input ----------------------------------------------------------------------------------------------


def truncated_png() -> bytes:
    data = png_bytes(make_image(6, size=64))
    return data[: len(data) // 2]


def bomb_png() -> bytes:
    """A small file declaring 1200 x 1200 = 1.44 M pixels, over the test server's 1 M."""
    return png_bytes(Image.new("RGB", (1200, 1200)))


def big_png() -> bytes:
    """About 300 KB of noise, over the test server's 200 KB image limit."""
    return png_bytes(make_image(7, size=320))


def with_image(url: str, text: str = "What?") -> dict:
    return {"messages": [{"role": "user", "content": [image_part(url), {"type": "text", "text": text}]}]}


BAD_REQUESTS = {
    "invalid base64": (with_image("data:image/png;base64,%%%not-base64!!"), "invalid_base64"),
    "not an image": (with_image(data_url(b"hello, I am text" * 20)), "invalid_image"),
    "truncated image": (with_image(data_url(truncated_png())), "invalid_image"),
    "pixel bomb": (with_image(data_url(bomb_png())), "image_too_large"),
    "over byte limit": (with_image(data_url(big_png())), "image_too_large"),
    "not an image type": (with_image("data:text/plain;base64,aGVsbG8="), "invalid_image_url"),
    "not base64 data url": (with_image("data:image/png,rawbytes"), "invalid_image_url"),
    "remote url": (with_image("http://169.254.169.254/latest/meta-data"), "image_url_not_allowed"),
    "local file": (with_image("file:///etc/passwd"), "image_url_not_allowed"),
    "plain path": (with_image("/etc/passwd"), "invalid_image_url"),
    "too many images": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [image_part(data_url(png_bytes(make_image(8))))] * 2
                    + [{"type": "text", "text": "Same?"}],
                }
            ]
        },
        "too_many_images",
    ),
    "prompt too long": (
        {"messages": [{"role": "user", "content": "circle " * 600}]},
        "context_length_exceeded",
    ),
    "prompt far too long": (
        {"messages": [{"role": "user", "content": "x" * 100_000}]},
        "context_length_exceeded",
    ),
    "missing messages": ({"model": "tiny"}, "missing_field"),
    "empty messages": ({"messages": []}, "invalid_value"),
    "messages not a list": ({"messages": "hi"}, "invalid_value"),
    "max_tokens as string": (
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
        "invalid_value",
    ),
    "max_tokens zero": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "invalid_value"),
    "max_tokens over limit": (
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
        "invalid_value",
    ),
    "temperature string": (
        {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        "invalid_value",
    ),
    "top_p zero": ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "invalid_value"),
    "n too large": ({"messages": [{"role": "user", "content": "hi"}], "n": 50}, "invalid_value"),
    "too many stops": (
        {"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")},
        "invalid_value",
    ),
    "bad role": ({"messages": [{"role": "tool", "content": "hi"}]}, "invalid_value"),
    "bad part type": (
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        "invalid_value",
    ),
    "ends with assistant": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        None,
    ),
    "only system": ({"messages": [{"role": "system", "content": "be nice"}]}, None),
    "image from assistant": (
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [image_part(data_url(png_bytes(make_image(9))))]},
                {"role": "user", "content": "and?"},
            ]
        },
        None,
    ),
    "lone surrogate": ({"messages": [{"role": "user", "content": "\ud800"}]}, "invalid_value"),
    "logprobs": (
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
        "unsupported_parameter",
    ),
    "top_logprobs": (
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": False, "top_logprobs": 2},
        "unsupported_parameter",
    ),
    "body not an object": ([1, 2, 3], "invalid_type"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors_and_server_stays_up(client, name):
    body, code = BAD_REQUESTS[name]
    r = client.post(
        "/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    err = assert_openai_error(r, 400, code)
    assert err["type"] == "invalid_request_error"
    assert client.get("/health").status_code == 200


def post_json(client, body: dict):
    return client.post(
        "/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(
    "content, param, message",
    [
        ([{"type": "image_url", "image_url": {}}], "messages.0.content.0.image_url.url", "Field required"),
        ([{"type": "image_url"}], "messages.0.content.0.image_url", "Field required"),
        ([{"type": "text"}], "messages.0.content.0.text", "Field required"),
        ([{"type": "text", "text": 5}], "messages.0.content.0.text", "valid string"),
        ([{"text": "hi"}], "messages.0.content.0.type", "Field required"),
        ([{"type": "input_audio"}], "messages.0.content.0", "'input_audio'"),
        (5, "messages.0.content", "a string or a list of content parts"),
    ],
)
def test_nested_field_errors_name_the_real_problem(client, content, param, message):
    """The error of a bad content part names the part's field, not the first alternative of `content`
    (`messages.0.content.str: Input should be a valid string`)."""
    err = assert_openai_error(post_json(client, {"messages": [{"role": "user", "content": content}]}), 400)
    assert err["param"] == param and err["message"].startswith(f"{param}: ") and message in err["message"], (
        err
    )
    assert ".str" not in err["message"] and ".list" not in err["message"]
    assert err["code"] == ("missing_field" if message == "Field required" else "invalid_value")


def test_bad_stop_names_the_field(client):
    err = assert_openai_error(post_json(client, {"messages": [user("hi")], "stop": 5}), 400, "invalid_value")
    assert err["param"] == "stop" and "a string or a list of strings" in err["message"], err
    err = assert_openai_error(post_json(client, {"messages": [user("hi")], "stop": ["a", 5]}), 400)
    assert err["param"] == "stop.1", err


@pytest.mark.parametrize(
    "messages, index",
    [
        ([{"role": "user", "content": ""}], 0),
        ([{"role": "user", "content": "   "}], 0),
        ([{"role": "user", "content": [{"type": "text", "text": " "}]}], 0),
        ([{"role": "user", "content": [image_part(data_url(png_bytes(make_image(20))))]}], 0),
        (
            [
                {"role": "user", "content": [image_part(data_url(png_bytes(make_image(21))))]},
                {"role": "user", "content": [{"type": "text", "text": ""}]},
            ],
            1,
        ),
        ([user(""), {"role": "assistant", "content": "a circle"}, user("How many?")], 0),
        ([user("What?"), {"role": "assistant", "content": "a circle"}, user(" \n ")], 2),
    ],
)
def test_empty_question_is_refused(client, messages, index):
    """Every user turn needs text: the model answers `Q: <image> {question} A:` and has no prompt of its
    own for an image alone (or for nothing)."""
    err = assert_openai_error(post_json(client, {"messages": messages}), 400, "empty_question")
    assert err["param"] == f"messages.{index}.content" and "the question is empty" in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_image_then_question_in_two_user_messages_is_one_turn(client, engine):
    """Consecutive user messages merge: an image-only message followed by the question is a question."""
    image = make_image(22)
    messages = [
        {"role": "user", "content": [image_part(data_url(png_bytes(image)))]},
        {"role": "user", "content": "What color is it?"},
    ]
    r = post_json(client, {"messages": messages, "max_tokens": 5})
    assert r.status_code == 200, r.text
    expected, _ = direct_answer(engine, [("user", "What color is it?")], image, 5)
    assert r.json()["choices"][0]["message"]["content"] == expected


def direct_turns_answer(engine: Engine, turns, images, max_new_tokens: int) -> tuple[str, int]:
    """The answer by plain `model.generate` on `processor.encode_turns` with the images in order."""
    processor = engine.processor
    ids = processor.encode_turns(turns, generation_prompt=True)["input_ids"]
    kw = {"pixel_values": processor.preprocess_images(images)} if images else {}
    with torch.no_grad():
        out = engine.model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, **kw
        )
    return processor.postprocess_answer(processor.decode(out[0, len(ids) :])), len(ids)


def two_image_message(a: Image.Image, b: Image.Image) -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": "Is"},
            image_part(data_url(png_bytes(a))),
            {"type": "text", "text": " like "},
            image_part(data_url(png_bytes(b))),
            {"type": "text", "text": "?"},
        ],
    }


def test_two_images_with_max_images_2_stand_where_their_parts_do(client, engine):
    a, b = make_image(30), make_image(31)
    body = {"messages": [two_image_message(a, b)], "max_tokens": 6}
    settings = ServerSettings(model_name="tiny", max_images=2)
    with TestClient(create_app(engine, settings)) as two:
        r = post_json(two, body)
        assert r.status_code == 200, r.text
        expected, n_prompt = direct_turns_answer(
            engine, [("user", "Is <image> like <image> ?", 2)], [a, b], 6
        )
        assert r.json()["choices"][0]["message"]["content"] == expected
        assert r.json()["usage"]["prompt_tokens"] == n_prompt
        # the other order is the other prompt: the images go in as their parts stand
        swapped = post_json(two, {"messages": [two_image_message(b, a)], "max_tokens": 6})
        expected, _ = direct_turns_answer(engine, [("user", "Is <image> like <image> ?", 2)], [b, a], 6)
        assert swapped.json()["choices"][0]["message"]["content"] == expected
        three = {"messages": [two_image_message(a, b), user("and?", b)]}
        assert_openai_error(post_json(two, three), 400, "too_many_images")
    # the default server (--max-images 1) refuses it
    err = assert_openai_error(post_json(client, body), 400, "too_many_images")
    assert "at most 1" in err["message"]


def test_messages_to_turns_places_several_images_and_keeps_one_after_q():
    from gpt2mm.serve.prepare import messages_to_turns
    from gpt2mm.serve.schema import APIError, ChatRequest

    def turns(messages):
        return messages_to_turns(ChatRequest.model_validate({"messages": messages}).messages)[0]

    url = image_part("data:image/png;base64,AAAA")
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    # one image, wherever its part stands: after `Q:`, as the seed's format has it (no placeholder)
    for content in ([text("What?"), url], [url, text("What?")], [text("Wh"), url, text("at?")]):
        assert turns([{"role": "user", "content": content}])[0][2] == 1
    assert turns([{"role": "user", "content": [text("What?"), url]}]) == [("user", "What?", 1)]
    # several: a placeholder where each part stands, across merged messages too
    messages = [
        {"role": "user", "content": [url, text(" Compare ")]},
        {"role": "user", "content": [url, text("and")]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [text("Now"), url]},
    ]
    assert turns(messages) == [
        ("user", "<image> Compare <image> and", 2),
        ("assistant", "ok", 0),
        ("user", "Now", 1),
    ]
    with pytest.raises(APIError, match=r"messages.0.content.1.text: text may not hold <image>"):
        turns([{"role": "user", "content": [url, text("what is <image>?")]}])
    with pytest.raises(APIError, match=r"messages.1.content: text may not hold <image>"):
        turns([user("Hi"), {"role": "assistant", "content": "<image>"}, user("Hi")])


def test_engine_refuses_an_empty_question(engine):
    for question in ("", "  "):
        with pytest.raises(ValueError, match="the question is empty"):
            engine.ask(question, make_image(23))


def test_model_name_must_be_the_served_one(client):
    """A request for another model is a 404 `model_not_found` naming the served model (OpenAI and vLLM
    answer so); the served name and no `model` at all are answered."""
    body = {"messages": [user("hi")], "max_tokens": 2}
    for model in ("gpt-4o", "", "TINY"):
        err = assert_openai_error(post_json(client, {**body, "model": model}), 404, "model_not_found")
        assert err["param"] == "model" and f"`{model}`" in err["message"] and "`tiny`" in err["message"], err
    assert post_json(client, {**body, "model": "tiny"}).status_code == 200
    assert post_json(client, body).status_code == 200
    assert post_json(client, {**body, "logprobs": False}).status_code == 200


def test_the_model_argument_as_given_is_a_served_name_too(engine):
    """`gpt2mm serve runs/x/best` answers to `best` (the listed id) and to `runs/x/best` (what vLLM serves a
    path as); with --served-model-name, to that name alone."""
    import argparse

    from gpt2mm.commands.serve import configure, settings_from_args

    parser = argparse.ArgumentParser()
    configure(parser)
    settings = settings_from_args(parser.parse_args(["runs/x/best"]))
    assert (settings.model_name, settings.model_aliases) == ("best", ("runs/x/best",))
    named = settings_from_args(parser.parse_args(["runs/x/best", "--served-model-name", "mine"]))
    assert (named.model_name, named.model_aliases) == ("mine", ())
    body = {"messages": [user("hi")], "max_tokens": 2}
    with TestClient(create_app(engine, settings)) as c:
        for model in ("best", "runs/x/best"):
            assert post_json(c, {**body, "model": model}).status_code == 200
        assert_openai_error(post_json(c, {**body, "model": "runs/x"}), 404, "model_not_found")


def test_web_page_sends_no_model_name():
    """The chat page leaves `model` out, so it works whatever name the server was started with."""
    from importlib.resources import files

    page = (files("gpt2mm.serve") / "web" / "index.html").read_text(encoding="utf-8")
    body = page[page.index("const body = {") : page.index("};", page.index("const body = {"))]
    assert "messages:" in body and "model" not in body


def test_bad_bodies(client):
    url = "/v1/chat/completions"
    assert_openai_error(client.post(url, content=b"{not json"), 400, "invalid_json")
    assert_openai_error(client.post(url, content=b"\xff\xfe\x00"), 400, "invalid_json")
    assert_openai_error(client.post(url, content=b'{"messages": NaN}'), 400, "invalid_json")
    assert_openai_error(client.post(url, content=b"[" * 100_000), 400, "invalid_json")
    # over the body limit by Content-Length, refused before reading
    big = b" " * (21 * 1024 * 1024)
    assert_openai_error(client.post(url, content=big), 413, "body_too_large")

    # over the limit without a Content-Length (chunked): counted while reading
    def chunks():
        for _ in range(22):
            yield b" " * (1024 * 1024)

    assert_openai_error(client.post(url, content=chunks()), 413, "body_too_large")
    assert client.get("/health").status_code == 200


def test_body_larger_than_content_length_is_refused(engine):
    async def app_call():
        app = create_app(engine, ServerSettings(max_body_bytes=1000))
        sent = []

        async def receive():
            return {"type": "http.request", "body": b" " * 4000, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-length", b"10"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
            "server": ("test", 80),
        }
        await app(scope, receive, send)
        return sent

    sent = asyncio.run(app_call())
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "body_too_large"


def test_local_images_only_inside_allowed_dirs(engine, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    make_image(10).save(allowed / "ok.png")
    make_image(11).save(tmp_path / "secret.png")
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    settings = ServerSettings(allow_local_images=(allowed,))
    with TestClient(create_app(engine, settings)) as c:
        ok = c.post("/v1/chat/completions", json={**with_image(f"file://{allowed}/ok.png"), "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        for url in (
            f"file://{allowed}/../secret.png",
            f"file://{allowed}/%2e%2e/secret.png",
            f"file://{allowed}/link.png",
            "file:///etc/passwd",
            f"file://evil.example{allowed}/ok.png",
        ):
            assert_openai_error(
                c.post("/v1/chat/completions", json=with_image(url)), 400, "image_url_not_allowed"
            )
        missing = c.post("/v1/chat/completions", json=with_image(f"file://{allowed}/missing.png"))
        assert_openai_error(missing, 400, "invalid_image")
    assert _local_path(f"file://{allowed}/ok.png", ()) is None


def test_remote_url_allow_list():
    prefixes = ("https://img.example.com/public/",)
    assert _remote_allowed("https://img.example.com/public/a.png", prefixes)
    for url in (
        "http://img.example.com/public/a.png",  # another scheme
        "https://img.example.com/private/a.png",
        "https://img.example.com/public/../private/a.png",
        "https://img.example.com/public/%2e%2e/private/a.png",
        "https://img.example.com.evil.com/public/a.png",
        "https://user:pw@img.example.com/public/a.png",
        "https://img.example.com:444/public/a.png",
        "https://img.example.com/publicity/a.png",
    ):
        assert not _remote_allowed(url, prefixes), url
    assert not _remote_allowed("https://img.example.com/public/a.png", ())


def test_api_key(engine):
    settings = ServerSettings(api_key="s3cret")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with TestClient(create_app(engine, settings)) as c:
        err = assert_openai_error(c.post("/v1/chat/completions", json=body), 401, "invalid_api_key")
        assert err["type"] == "authentication_error"
        wrong = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert_openai_error(wrong, 401)
        assert_openai_error(c.get("/v1/models"), 401)
        good = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200


# --- the fuzz test ------------------------------------------------------------------------------------------


def test_fuzz_never_5xx(engine):
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    app_settings = ServerSettings(
        max_tokens_limit=6, default_max_tokens=3, max_image_pixels=1_000_000, max_image_bytes=200_000
    )
    good_url = data_url(png_bytes(make_image(12)))
    urls = st.sampled_from(
        [
            good_url,
            data_url(truncated_png()),
            data_url(bomb_png()),
            "data:image/png;base64,!!!",
            "data:image/png;base64,",
            "data:;base64,aGVsbG8=",
            "http://127.0.0.1:1/x.png",
            "file:///etc/passwd",
            "",
        ]
    ) | st.text(max_size=30)
    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
    json_values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=8,
    )
    parts = (
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40)})
        | st.fixed_dictionaries(
            {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": urls})}
        )
        | st.dictionaries(st.sampled_from(["type", "text", "image_url"]), json_values, max_size=3)
    )
    roles = st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | json_values
    contents = st.text(max_size=60) | st.lists(parts, max_size=3) | json_values
    messages = st.lists(
        st.fixed_dictionaries({"role": roles, "content": contents}) | json_values, min_size=0, max_size=4
    )
    small_ints = st.integers(-3, 8)
    requests = st.fixed_dictionaries(
        {"messages": messages},
        optional={
            "max_tokens": small_ints | json_values,
            "temperature": st.floats(-1, 3) | json_values,
            "top_p": st.floats(-0.5, 1.5) | json_values,
            "n": st.integers(-1, 5) | json_values,
            "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | json_values,
            "seed": st.integers(-(2**65), 2**65) | json_values,
            "stream": st.booleans() | json_values,
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
            "model": json_values,
        },
    )

    @st.composite
    def valid_requests(draw) -> dict:  # well-formed requests with valid settings: generation runs
        texts = st.text(max_size=30)
        first = draw(texts)
        content = [image_part(good_url), {"type": "text", "text": first}] if draw(st.booleans()) else first
        messages = [{"role": "user", "content": content}]
        for _ in range(draw(st.integers(0, 2))):
            messages += [
                {"role": "assistant", "content": draw(texts)},
                {"role": "user", "content": draw(texts)},
            ]
        body = {"messages": messages}
        body.update(
            draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "max_tokens": st.integers(1, 6),
                        "temperature": st.floats(0, 2),
                        "top_p": st.floats(0.01, 1),
                        "n": st.integers(1, 3),
                        "stop": st.lists(st.text(max_size=3), max_size=4),
                        "seed": st.integers(0, 2**32),
                        "stream": st.booleans(),
                    },
                )
            )
        )
        return body

    bodies = (
        valid_requests().map(lambda d: json.dumps(d).encode())
        | requests.map(lambda d: json.dumps(d).encode())
        | json_values.map(lambda v: json.dumps(v).encode())
        | st.binary(max_size=64)
    )

    with TestClient(create_app(engine, app_settings), raise_server_exceptions=False) as c:
        seen: dict[int, int] = {}

        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,  # the same examples on every run: a CI failure reproduces locally
        )
        @given(body=bodies)
        def check(body: bytes) -> None:
            r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (r.status_code, r.text, body[:300])
            if r.status_code != 200:
                assert_openai_error(r)
            elif r.headers["content-type"].startswith("text/event-stream"):
                assert r.text.endswith("data: [DONE]\n\n")
            else:
                assert r.json()["object"] == "chat.completion"

        check()
        assert c.get("/health").status_code == 200
    print("fuzz status codes:", seen)


# --- gpt2mm ask -----------------------------------------------------------------------------------------------


def test_ask_cli_prints_the_api_answer(engine, tmp_path, capsys):
    from gpt2mm.cli import main

    engine.model.save_pretrained(tmp_path / "model")
    engine.processor.save_pretrained(tmp_path / "model")
    image = make_image(13)
    image.save(tmp_path / "img.png")
    expected, _ = direct_answer(engine, [("user", "What color is it?")], Image.open(tmp_path / "img.png"), 7)
    argv = ["ask", str(tmp_path / "model"), "--image", str(tmp_path / "img.png"), "What color is it?"]
    assert main(argv + ["--max-new-tokens", "7"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(argv + ["--max-new-tokens", "7", "--stream"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(argv + ["--temperature", "1.0", "--seed", "3", "--max-new-tokens", "5"]) == 0
    sampled = capsys.readouterr().out
    assert main(argv + ["--temperature", "1.0", "--seed", "3", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == sampled
    with pytest.raises(SystemExit) as e:
        main(["ask", str(tmp_path / "model"), "--image", str(tmp_path / "nope.png"), "What?"])
    assert e.value.code == 2


def test_ask_cli_with_two_images(engine, tmp_path, capsys):
    from gpt2mm.cli import main

    engine.model.save_pretrained(tmp_path / "model")
    engine.processor.save_pretrained(tmp_path / "model")
    for i in range(2):
        make_image(32 + i).save(tmp_path / f"{i}.png")
    a, b = (Image.open(tmp_path / f"{i}.png") for i in range(2))
    images = ["--image", str(tmp_path / "0.png"), "--image", str(tmp_path / "1.png")]
    question = "Is <image> like <image> ?"
    expected, _ = direct_turns_answer(engine, [("user", question, 2)], [a, b], 6)
    assert main(["ask", str(tmp_path / "model"), *images, question, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    # without placeholders both images go before the question
    expected, _ = direct_turns_answer(engine, [("user", "Same?", 2)], [a, b], 6)
    assert main(["ask", str(tmp_path / "model"), *images, "Same?", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    err = _usage_error(capsys, ["ask", str(tmp_path / "nomodel"), *images[:2], question], "ask")
    assert "the question holds 2 <image> placeholders but 1 --image files were given" in err


def _usage_error(capsys, argv: list[str], command: str) -> str:
    from gpt2mm.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"gpt2mm {command}: error:" in err and "Traceback" not in err, err
    return err


def test_ask_cli_refuses_an_empty_question(tmp_path, capsys):
    make_image(14).save(tmp_path / "img.png")
    for question in ("", "   "):
        # the model need not exist: the question is checked first
        err = _usage_error(
            capsys, ["ask", str(tmp_path / "nomodel"), "--image", str(tmp_path / "img.png"), question], "ask"
        )
        assert "the question is empty" in err
        assert capsys.readouterr().out == ""


def test_ask_and_serve_refuse_unusable_devices(engine, tmp_path, capsys, monkeypatch):
    """`--device` goes through `gpt2mm eval`'s check: a usage error, not a torch traceback."""
    engine.model.save_pretrained(tmp_path / "model")
    engine.processor.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make_image(15).save(tmp_path / "img.png")
    ask = ["ask", str(tmp_path / "model"), "--image", str(tmp_path / "img.png"), "What?"]
    serve = ["serve", str(tmp_path / "model")]
    for device, message in (
        ("cuda", "--device cuda: CUDA is not available on this machine"),
        ("cuda:1", "--device cuda:1: CUDA is not available on this machine"),
        ("gpu", "--device gpu: not a device name"),
    ):
        assert message in _usage_error(capsys, [*ask, "--device", device], "ask")
        assert message in _usage_error(capsys, [*serve, "--device", device], "serve")


@pytest.mark.parametrize("port", ["99999", "-1", "0", "http"])
def test_serve_refuses_a_bad_port_at_argument_parsing(tmp_path, capsys, port):
    err = _usage_error(capsys, ["serve", str(tmp_path / "nomodel"), "--port", port], "serve")
    assert f"argument --port: {port!r}" in err or f"argument --port: {port} " in err
    assert "1-65535" in err


def test_compiled_single_answers_equal_generate_and_stream_the_same(engine):
    """`compile=True`: one greedy question about one image goes through the compiled static-cache path
    (gpt2mm.serve.compiled) with the same tokens, text, finish reason and streamed deltas as `generate`;
    anything else (no image, sampling) still goes through `generate`."""
    from gpt2mm.serve.engine import SamplingParams

    compiled = Engine(engine.model, engine.processor, device="cpu", compile=True)
    cases = [
        ("What color is the circle?", 0, SamplingParams(max_new_tokens=12)),
        ("How many squares are there in this picture, left to right?", 1, SamplingParams(max_new_tokens=1)),
        ("Describe it", 2, SamplingParams(max_new_tokens=20)),
    ]
    reference = engine.ask("Describe it", make_image(52), SamplingParams(max_new_tokens=20))
    text = reference.choices[0].text
    cases.append(("Describe it", 2, SamplingParams(max_new_tokens=20, stop=(text[len(text) // 2 :][:3],))))
    for question, seed, params in cases:
        answers = []
        for e in (engine, compiled):
            deltas = []
            r = e.ask(
                question, make_image(50 + seed), params, on_delta=lambda i, d, deltas=deltas: deltas.append(d)
            )
            c = r.choices[0]
            answers.append((c.text, c.token_ids, c.finish_reason, "".join(deltas)))
        assert answers[1] == answers[0], question
        assert answers[0][3] == answers[0][0]
    assert compiled.compiled_answers == len(cases)
    assert answers[0][2] == "stop"  # the last case ended on its stop string
    compiled.ask("What color is the circle?", None, SamplingParams(max_new_tokens=4))  # no image
    compiled.ask("What?", make_image(60), SamplingParams(max_new_tokens=4, temperature=1.0, seed=3))
    assert compiled.compiled_answers == len(cases)
