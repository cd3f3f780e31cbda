"""Two OpenAI-compatible servers, the same questions: are the answers equal, how fast does each answer them?

    python bench/serve_compare.py WORLD --server gpt2mm=http://localhost:8001 --server vllm=http://localhost:8002
    python bench/serve_compare.py WORLD --server a=URL --limit 200 --concurrency 1,64

WORLD is a folder of `gpt2mm synth` (its `test_questions.json`, `test_annotations.json` and `images/`). Each
question goes to `/v1/chat/completions` as a user message of one image (a PNG data URL) and the question's
text, greedy (`temperature` 0), at most `--max-tokens` tokens: what `gpt2mm serve` and `vllm serve` of the
same checkpoint both accept, with the stop strings `gpt2mm serve` applies anyway (`STOP_STRINGS`; vLLM applies
none of its own beyond the end-of-text token). Per server: the answers, their VQA accuracy (the official
rules, `gpt2mm.eval`), and at each `--concurrency` (that many requests in flight) the requests and completion
tokens a second over the whole set (after one unmeasured warm-up pass). Then the answers of every server are
compared with the first one's, question for question. The last line printed is one JSON object with every
figure.

Standard library only, plus gpt2mm's VQA loader and metric: it runs beside either server's environment.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def load_world(world: Path, limit: int) -> list[dict]:
    """The test split's first `limit` questions (gpt2mm's VQA loader), each with its image as a data URL."""
    from gpt2mm.data.vqa import load_vqa

    samples, _ = load_vqa(
        world / "test_questions.json", world / "test_annotations.json", world / "images" / "test", limit=limit
    )
    urls: dict[str, str] = {}
    for s in samples:
        if s.image not in urls:
            urls[s.image] = "data:image/png;base64," + base64.b64encode(Path(s.image).read_bytes()).decode()
    return [{"question": s.turns[0].text, "url": urls[s.image], "answers": s.answers} for s in samples]


def ask(base: str, model: str, item: dict, max_tokens: int, timeout: float) -> tuple[str, int]:
    """One chat completion: the answer's text and its completion tokens (an error: its text and 0)."""
    from gpt2mm.processing import STOP_STRINGS

    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": item["url"]}},
                    {"type": "text", "text": item["question"]},
                ],
            }
        ],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stop": list(STOP_STRINGS),
    }
    request = urllib.request.Request(
        base.rstrip("/") + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read())
    except (OSError, ValueError) as e:  # HTTP errors, timeouts, a broken reply: an answer that differs
        return f"<error: {e}>", 0
    return reply["choices"][0]["message"]["content"], reply.get("usage", {}).get("completion_tokens", 0)


def served_model(base: str, timeout: float) -> str:
    with urllib.request.urlopen(base.rstrip("/") + "/v1/models", timeout=timeout) as response:
        return json.loads(response.read())["data"][0]["id"]


def run_all(base: str, model: str, items: list[dict], concurrency: int, max_tokens: int, timeout: float):
    """Every item, `concurrency` in flight: the answers in item order, the seconds, the completion tokens."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda item: ask(base, model, item, max_tokens, timeout), items))
    return [text for text, _ in results], time.perf_counter() - start, sum(n for _, n in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("world", type=Path)
    parser.add_argument(
        "--server", action="append", required=True, help="NAME=BASE_URL; the first is the reference"
    )
    parser.add_argument("--limit", type=int, default=500, help="questions from the test split")
    parser.add_argument("--concurrency", default="1,64", help="requests in flight, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    from gpt2mm.eval.vqa_metric import vqa_accuracy

    if any("=" not in s for s in args.server):
        parser.error("--server takes NAME=BASE_URL, e.g. gpt2mm=http://localhost:8000")
    servers = [tuple(s.split("=", 1)) for s in args.server]
    items = load_world(args.world, args.limit)
    levels = [int(c) for c in args.concurrency.split(",")]
    figures: dict = {
        "bench": "serve_compare",
        "questions": len(items),
        "max_tokens": args.max_tokens,
        "servers": {},
    }
    answers: dict[str, list[str]] = {}
    for name, base in servers:
        model = served_model(base, args.timeout)
        run_all(base, model, items[: max(levels)], max(levels), args.max_tokens, args.timeout)  # warm-up
        row: dict = {"model": model, "throughput": {}}
        for level in levels:
            texts, seconds, tokens = run_all(base, model, items, level, args.max_tokens, args.timeout)
            answers.setdefault(name, texts)
            row["throughput"][level] = {
                "requests_per_s": round(len(items) / seconds, 2),
                "completion_tokens_per_s": round(tokens / seconds, 1),
                "seconds": round(seconds, 2),
            }
            if texts != answers[name]:
                row.setdefault("answers_change_with_concurrency", []).append(level)
        row["vqa_accuracy"] = round(
            100 * sum(vqa_accuracy(t, item["answers"]) for t, item in zip(answers[name], items)) / len(items),
            2,
        )
        row["errors"] = sum(text.startswith("<error:") for text in answers[name])
        figures["servers"][name] = row
        print(f"{name}: {row}", flush=True)
    reference = servers[0][0]
    for name, _ in servers[1:]:
        differ = [
            i for i, (a, b) in enumerate(zip(answers[reference], answers[name])) if a.strip() != b.strip()
        ]
        figures["servers"][name]["answers_equal_to_" + reference] = len(items) - len(differ)
        for i in differ[:10]:
            print(
                f"differs: {items[i]['question']!r}: {reference} {answers[reference][i]!r}, {name} {answers[name][i]!r}"
            )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
