"""The chat page in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

A real uvicorn server on a free localhost port serves a tiny random model saved to a temp dir. The page
gets an image file and a question, streams the answer in, and takes a follow-up question; both answers must
equal what the API gives for the same conversation (greedy).

Needs `apt-get install -y chromium` and `pip install playwright` (never `playwright install`: the browser is
the system one); skipped otherwise.
"""

from __future__ import annotations

import base64

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import (  # noqa: E402
    BROWSER_MARKS,
    launch_chromium,
    make_image,
    running,
    sync_playwright,
    wide_tiny_model,
)

pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A uvicorn server in a thread, serving a tiny random model loaded from disk; yields its URL."""
    from gpt2mm.serve.api import create_app
    from gpt2mm.serve.engine import Engine
    from gpt2mm.serve.prepare import ServerSettings

    model_dir = tmp_path_factory.mktemp("model")
    model, processor = wide_tiny_model()  # answers depend on the prompt
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)

    engine = Engine.from_pretrained(model_dir, device="cpu")
    app = create_app(engine, ServerSettings(model_name="tiny"))
    with running(app, lifespan="on") as base:
        yield base


def api_answer(base: str, messages: list) -> str:
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json={"messages": messages, "max_tokens": 64, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_page_answers_like_the_api_and_follows_up(server, tmp_path):
    image_path = tmp_path / "shapes.png"
    make_image(5, size=64).save(image_path)
    url = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
    q1, q2 = "What color is the circle?", "How many squares?"

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.set_input_files("#image-input", str(image_path))
            page.wait_for_function("document.getElementById('preview').style.display === 'block'")

            page.fill("#question", q1)
            page.click("#ask")
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
            answers = page.locator(".msg.assistant")
            first = answers.nth(0).locator(".text").text_content()
            assert "error" not in (answers.nth(0).get_attribute("class") or "")

            page.fill("#question", q2)
            page.click("#ask")
            page.wait_for_function(
                "document.querySelectorAll(\".msg.assistant[data-done='true']\").length === 2", timeout=60_000
            )
            second = answers.nth(1).locator(".text").text_content()
            assert "error" not in (answers.nth(1).get_attribute("class") or "")
            assert page.locator(".msg.user").count() == 2
        finally:
            browser.close()

    user1 = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q1}],
    }
    expected_first = api_answer(server, [user1])
    assert first == expected_first and first  # streamed into the page = the API's answer, and not empty
    expected_second = api_answer(
        server, [user1, {"role": "assistant", "content": first}, {"role": "user", "content": q2}]
    )
    assert second == expected_second and second
