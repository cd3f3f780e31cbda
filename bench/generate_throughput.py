"""Generation throughput: batched answers against the seed's one-question-at-a-time generation, in one run.

    python bench/generate_throughput.py --preset tiny --device cpu
    python bench/generate_throughput.py --preset seed --device cuda --batch-size 64

Both answer the same VQA-shaped prompts (image tokens + a 10-20 token question) with the same random-
initialised model (built from the preset's config: no hub), greedy, exactly `--new-tokens` tokens each.
The seed's way: one prompt at a time, padded to 512 tokens, fp16 weights on a GPU, no KV cache (each new
token re-runs the whole sequence, as a hand-written loop over `model(...)` does). Ours: `generate` on
left-padded batches with the KV cache, the image encoded once in the prefill, bf16 autocast on a GPU.
Also timed: the latency of one short answer (batch 1, with the cache), median of `--latency-runs`.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpt2mm import MultimodalGPT2Config, MultimodalGPT2ForConditionalGeneration  # noqa: E402
from train_throughput import device_name, make_samples, sync  # noqa: E402


def prompts(cfg, n: int) -> list[list[int]]:
    out = []
    for ids, labels in make_samples(cfg, n):
        answer_start = next(i for i, lab in enumerate(labels) if lab != -100)
        out.append(ids[:answer_start])
    return out


@torch.no_grad()
def bench_seed(model, cfg, device, prompt_ids, new_tokens: int, seconds: float) -> float:
    """One prompt at a time, padded to 512 (right), no cache: the sequence is re-run for every token."""
    size = cfg.vision_config.image_size
    width = min(512, cfg.text_config.n_positions)
    dtype = next(model.parameters()).dtype
    n, start = 0, time.perf_counter()
    while True:
        ids = prompt_ids[n % len(prompt_ids)]
        pixels = torch.randn(1, 3, size, size, device=device, dtype=dtype)
        seq = list(ids)
        for _ in range(new_tokens):
            x = torch.full((1, width), 0, device=device)
            x[0, : len(seq)] = torch.tensor(seq, device=device)
            mask = torch.zeros_like(x)
            mask[0, : len(seq)] = 1
            logits = model(input_ids=x, attention_mask=mask, pixel_values=pixels).logits
            seq.append(int(logits[0, len(seq) - 1].argmax()))
        n += 1
        if time.perf_counter() - start > seconds and n >= 3:
            break
    sync(device)
    return n / (time.perf_counter() - start)


@torch.no_grad()
def bench_ours(model, cfg, device, prompt_ids, new_tokens: int, seconds: float, batch_size: int) -> float:
    size = cfg.vision_config.image_size
    amp = device.type == "cuda"
    n, i, start = 0, 0, None
    while True:
        chunk = [prompt_ids[(i * batch_size + j) % len(prompt_ids)] for j in range(batch_size)]
        width = max(len(c) for c in chunk)
        ids = torch.zeros((batch_size, width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, c in enumerate(chunk):  # left padding
            ids[r, width - len(c) :] = torch.tensor(c)
            mask[r, width - len(c) :] = 1
        pixels = torch.randn(batch_size, 3, size, size, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                pixel_values=pixels,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        i += 1
        if i == 2:
            sync(device)
            start = time.perf_counter()
        elif start is not None:
            n += batch_size
            if time.perf_counter() - start > seconds and n >= 3 * batch_size:
                break
    sync(device)
    return n / (time.perf_counter() - start)


@torch.no_grad()
def latency_ms(model, cfg, device, prompt_ids, new_tokens: int, runs: int) -> float:
    size = cfg.vision_config.image_size
    amp = device.type == "cuda"
    times = []
    for r in range(runs + 2):
        ids = torch.tensor([prompt_ids[r % len(prompt_ids)]], device=device)
        pixels = torch.randn(1, 3, size, size, device=device)
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model.generate(
                input_ids=ids, pixel_values=pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens
            )
        sync(device)
        if r >= 2:
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "seed"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--latency-runs", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = MultimodalGPT2Config.from_preset(args.preset, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = MultimodalGPT2ForConditionalGeneration(cfg).to(device).eval()
    ids = prompts(cfg, 256)
    seed_model = model.half() if device.type == "cuda" else model
    seed = bench_seed(seed_model, cfg, device, ids, args.new_tokens, args.seconds)
    model = model.float()
    print(f"seed (one at a time, no cache): {seed:.2f} answers/s")
    ours = bench_ours(model, cfg, device, ids, args.new_tokens, args.seconds, args.batch_size)
    print(f"ours (batched by {args.batch_size}, KV cache): {ours:.1f} answers/s")
    lat = latency_ms(model, cfg, device, ids, args.new_tokens, args.latency_runs)
    print(f"one answer of {args.new_tokens} tokens: {lat:.1f} ms median")
    result = {
        "bench": "generate_throughput",
        "preset": args.preset,
        "device": device_name(device),
        "torch": torch.__version__,
        "new_tokens": args.new_tokens,
        "batch_size": args.batch_size,
        "answers_per_s": round(ours, 2),
        "seed_answers_per_s": round(seed, 2),
        "ratio": round(ours / seed, 2),
        "latency_ms_median": round(lat, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
