"""Overload, measured: many concurrent clients against `gpt2mm serve` with a bounded queue.

    python bench/overload.py                                   # 256 clients, queue 32, batches of 8, +50 ms a batch
    python bench/overload.py --clients 512 --max-queue 64 --delay-ms 200

A real server (uvicorn on a free localhost port, in a thread) serves the tiny preset (random weights drawn wide
so that answers differ from prompt to prompt; no hub) with `--max-queue` waiting requests and batches of
`--max-batch-size`; `--delay-ms` adds that long to every batch's generation, standing in for a bigger model
(the tiny one answers in milliseconds). `--clients` clients each send one request at once over HTTP
(one of 8 prompts, with an image, greedy), and the figures are:

- the queue's bound: `max_queue` requests wait, up to `max_batch_size` more are being generated;
- how many got 200, 503 (each must carry `Retry-After`) and anything else (must be none);
- whether every 200 is the right answer (the prompt's greedy answer computed directly, one at a time);
- the latency of the accepted requests (p50 / p95) and of the refused ones (p50: a refusal is immediate);
- a second wave of `--max-queue` clients after the burst: all 200 (the server recovered).

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

QUESTIONS = ["What color is it?", "How many?", "Is there a circle?", "Where is the square?"]


def wide_tiny_engine():
    """The tiny preset with weights drawn wide enough that greedy answers differ (the serve tests' model)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import wide_tiny_model
    from gpt2mm.serve.engine import Engine

    model, processor = wide_tiny_model()
    return Engine(model, processor, device="cpu")


def prompts() -> list[dict]:
    """8 requests: 4 questions x 2 images (PNG data URLs), greedy, 6 tokens."""
    import numpy as np
    from PIL import Image

    out = []
    for seed in (1, 2):
        pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        for q in QUESTIONS:
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q}]
            out.append(
                {"messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0}
            )
    return out


def expected_answers(engine, bodies: list[dict]) -> list[str]:
    """Each prompt's answer through the engine alone, one request at a time (no server, no batching)."""
    from gpt2mm.serve.prepare import ServerSettings, build_request
    from gpt2mm.serve.schema import parse_request

    answers = []
    for body in bodies:
        gen = build_request(parse_request(body), engine, ServerSettings())
        engine.generate([gen])
        answers.append(gen.choices[0].text)
    return answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", backlog=4096)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


async def wave(url: str, bodies: list[dict], n: int) -> list[tuple[int, float, str | None, str | None, int]]:
    """`n` clients at once, client i sending prompt i % len(bodies): (status, seconds, answer, Retry-After,
    prompt index) each."""
    import httpx

    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start_line = asyncio.Event()

        async def one(i: int):
            await start_line.wait()
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=bodies[i % len(bodies)])
            seconds = time.perf_counter() - t0
            answer = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
            return r.status_code, seconds, answer, r.headers.get("retry-after"), i % len(bodies)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0.2)  # every client ready before any sends
        start_line.set()
        return await asyncio.gather(*tasks)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=256, help="concurrent clients in the burst")
    parser.add_argument(
        "--max-queue", type=int, default=32, help="waiting requests before 503 (serve --max-queue)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=8, help="rows per generate (serve --max-batch-size)"
    )
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="wait to fill a batch")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="added to every batch's generation")
    parser.add_argument("--retry-after", type=int, default=1, help="the Retry-After the server answers")
    args = parser.parse_args()

    import torch

    from gpt2mm.serve.api import create_app
    from gpt2mm.serve.prepare import ServerSettings

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, min(2, cpus)))
    engine = wide_tiny_engine()
    bodies = prompts()
    expected = expected_answers(engine, bodies)
    generate = engine.generate

    def slow_generate(requests):
        time.sleep(args.delay_ms / 1000)
        return generate(requests)

    engine.generate = slow_generate
    settings = ServerSettings(
        model_name="tiny",
        max_queue=args.max_queue,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        retry_after_s=args.retry_after,
    )
    batches_before = engine.batches_run  # the expected answers' own calls
    server, thread, url = start_server(create_app(engine, settings))
    try:
        t0 = time.perf_counter()
        burst = asyncio.run(wave(url, bodies, args.clients))
        burst_seconds = time.perf_counter() - t0
        after = asyncio.run(wave(url, bodies, args.max_queue))
    finally:
        server.should_exit = True
        thread.join(30)

    def summary(results):
        ok = [r for r in results if r[0] == 200]
        busy = [r for r in results if r[0] == 503]
        return {
            "requests": len(results),
            "200": len(ok),
            "503": len(busy),
            "other": sorted({r[0] for r in results} - {200, 503}),
            "wrong_answers": sum(r[2] != expected[r[4]] for r in ok),
            "503_without_retry_after": sum(r[3] != str(args.retry_after) for r in busy),
            "accepted_p50_s": percentile([r[1] for r in ok], 50),
            "accepted_p95_s": percentile([r[1] for r in ok], 95),
            "refused_p50_s": percentile([r[1] for r in busy], 50),
        }

    figures = {
        "clients": args.clients,
        "max_queue": args.max_queue,
        "max_batch_size": args.max_batch_size,
        "bound": f"{args.max_queue} waiting + up to {args.max_batch_size} generating",
        "delay_ms_per_batch": args.delay_ms,
        "server_batches": engine.batches_run - batches_before,
        "burst_seconds": round(burst_seconds, 3),
        "burst": summary(burst),
        "after": summary(after),
        "distinct_answers": len(set(expected)),
        "cpu_threads": torch.get_num_threads(),
        "cpus_available": cpus,
    }
    b, a = figures["burst"], figures["after"]
    print(
        f"burst of {args.clients}: {b['200']} x 200, {b['503']} x 503 ({b['503_without_retry_after']} without "
        f"Retry-After), other {b['other']}; wrong answers {b['wrong_answers']}; accepted p50 "
        f"{b['accepted_p50_s']:.3f} s, p95 {b['accepted_p95_s']:.3f} s; refused p50 "
        f"{(b['refused_p50_s'] or 0):.3f} s"
    )
    print(
        f"then {args.max_queue} more: {a['200']} x 200, {a['503']} x 503, wrong answers {a['wrong_answers']}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
