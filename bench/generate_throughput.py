"""Generation throughput: batched answers against the seed's one-question-at-a-time generation, in one run.

    python bench/generate_throughput.py --preset tiny --device cpu
    python bench/generate_throughput.py --preset seed --device cuda --batch-size 64,256 --latency generate,compiled

Both answer the same VQA-shaped prompts (image tokens + a 10-20 token question) with the same random-
initialised model (built from the preset's config: no hub), greedy, exactly `--new-tokens` tokens each.
The seed's way: one prompt at a time, padded to 512 tokens, fp16 weights on a GPU, no KV cache (each new
token re-runs the whole sequence, as a hand-written loop over `model(...)` does). Ours: `generate` on
left-padded batches with the KV cache, the image encoded once in the prefill, bf16 weights on a GPU (what
`gpt2mm serve --dtype bfloat16` loads). Also timed: the latency of one short answer (batch 1), the median
of `--latency-runs`, from pixels and token ids on the device to the answer's tokens, with `generate`, with
`generate` on transformers' static KV cache (whose decoding step it compiles: CUDA graphs on a GPU), or
with `gpt2mm.serve.compiled.CompiledGreedy` (prefill and decoding steps compiled whole on a static cache:
the single-answer path of `gpt2mm serve --compile`).

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

from gpt2mm import MultimodalGPT2Config  # noqa: E402
from train_throughput import build, device_name, make_samples, sync  # noqa: E402


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


def left_padded(
    chunk: list[list[int]], device, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask, `width` wide (default: the longest prompt's length)."""
    width = width or max(len(c) for c in chunk)
    ids = torch.zeros((len(chunk), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, c in enumerate(chunk):
        ids[r, width - len(c) :] = torch.tensor(c)
        mask[r, width - len(c) :] = 1
    return ids.to(device), mask.to(device)


def static_kwargs(device) -> dict:
    """`generate`'s static KV cache, whose decoding step transformers compiles (CUDA graphs on a GPU; on a
    CPU only when asked, which the tests do)."""
    from transformers import CompileConfig

    kw: dict = {"cache_implementation": "static"}
    if device.type != "cuda":
        cc = CompileConfig(fullgraph=True, mode="default")
        cc._compile_all_devices = True
        kw["compile_config"] = cc
    return kw


def greedy(model, ids, mask, pixels, new_tokens: int, **extra) -> torch.Tensor:
    """`generate`, greedy, exactly `new_tokens` new tokens."""
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        **extra,
    )


@torch.no_grad()
def bench_ours(model, cfg, device, prompt_ids, new_tokens, seconds, batch_size) -> float:
    size = cfg.vision_config.image_size
    dtype = next(model.parameters()).dtype
    n, i, start = 0, 0, None
    while True:
        chunk = [prompt_ids[(i * batch_size + j) % len(prompt_ids)] for j in range(batch_size)]
        ids, mask = left_padded(chunk, device)
        pixels = torch.randn(batch_size, 3, size, size, device=device, dtype=dtype)
        greedy(model, ids, mask, pixels, new_tokens)
        i += 1
        if i == 3:  # warm-up done
            sync(device)
            start = time.perf_counter()
        elif start is not None:
            n += batch_size
            if time.perf_counter() - start > seconds and n >= 3 * batch_size:
                break
    sync(device)
    return n / (time.perf_counter() - start)


@torch.no_grad()
def latency_ms(model, cfg, device, prompt_ids, new_tokens: int, runs: int, static=False) -> float:
    size = cfg.vision_config.image_size
    dtype = next(model.parameters()).dtype
    extra = static_kwargs(device) if static else {}
    # A static cache is as long as the prompt plus the new tokens, and each length is a graph of its own
    # (compiled, then captured): prompts are left-padded to one width, as a server would bucket them.
    width = -(-max(map(len, prompt_ids)) // 16) * 16 if static else None
    times = []
    for r, prompt in enumerate(prompt_ids[: runs + 3]):
        ids, mask = left_padded([prompt], device, width)
        pixels = torch.randn(1, 3, size, size, device=device, dtype=dtype)
        sync(device)
        t = time.perf_counter()
        greedy(model, ids, mask, pixels, new_tokens, **extra)
        sync(device)
        if r >= 3:  # warm-up (and, with the static cache, compilation and graph capture) done
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


@torch.no_grad()
def compiled_latency_ms(model, cfg, device, prompt_ids, new_tokens: int, runs: int) -> tuple[float, float]:
    """(median ms, fraction of prompts whose answer equals `generate`'s) for `gpt2mm.serve.compiled`'s
    `CompiledGreedy` (what `gpt2mm serve --compile` answers single questions with), its cache as long as
    the bucketed prompt plus the answer."""
    from gpt2mm.serve.compiled import CompiledGreedy

    size = cfg.vision_config.image_size
    dtype = next(model.parameters()).dtype
    width = -(-max(map(len, prompt_ids)) // 16) * 16
    answer = CompiledGreedy(model, max_cache_len=width + new_tokens)
    times, same = [], 0
    for r, prompt in enumerate(prompt_ids[: runs + 3]):
        ids, mask = left_padded([prompt], device, width)
        pixels = torch.randn(1, 3, size, size, device=device, dtype=dtype)
        sync(device)
        t = time.perf_counter()
        tokens = answer(ids, mask, pixels, new_tokens)
        sync(device)
        if r >= 3:
            times.append(1000 * (time.perf_counter() - t))
        if r < 8:  # the same answer as generate's, from the same padded prompt
            ref = greedy(model, ids, mask, pixels, new_tokens)[0, width:].tolist()
            same += ref == tokens
    return statistics.median(times), same / min(8, runs + 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "seed"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", default="64", help="one or more, comma-separated: 64,256")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument(
        "--latency",
        default="generate",
        help="how to time one answer, comma-separated: generate (KV cache), static (generate with a static "
        "KV cache: transformers compiles its decoding step), compiled (CompiledGreedy: every forward compiled)",
    )
    args = ap.parse_args()
    modes = args.latency.split(",")
    if unknown := set(modes) - {"generate", "static", "compiled"}:
        raise SystemExit(f"--latency: unknown {sorted(unknown)}; choose from generate, static, compiled")
    device = torch.device(args.device)
    cfg = MultimodalGPT2Config.from_preset(args.preset, attn_implementation="sdpa")
    batch_sizes = [int(b) for b in args.batch_size.split(",")]
    ids = prompts(cfg, 256)
    # the seed: fp16 weights on a GPU (fp32 on a CPU), one prompt at a time, no cache
    seed_model = build(cfg, device, torch.float16 if device.type == "cuda" else None).eval()
    seed = bench_seed(seed_model, cfg, device, ids, args.new_tokens, args.seconds)
    del seed_model
    print(f"seed (one at a time, no cache): {seed:.2f} answers/s", flush=True)
    # ours: bf16 weights on a GPU (gpt2mm serve --dtype bfloat16), fp32 on a CPU
    model = build(cfg, device, torch.bfloat16 if device.type == "cuda" else None).eval()
    rows = []
    for bs in batch_sizes:
        rate = bench_ours(model, cfg, device, ids, args.new_tokens, args.seconds, bs)
        rows.append({"what": f"batched by {bs}, KV cache", "answers_per_s": rate, "ratio": rate / seed})
        print(f"ours ({rows[-1]['what']}): {rate:.1f} answers/s, {rate / seed:.1f}x the seed", flush=True)
    for static in [m == "static" for m in modes if m != "compiled"]:
        cache = "static KV cache, compiled decoding" if static else "KV cache"
        lat = latency_ms(model, cfg, device, ids, args.new_tokens, args.latency_runs, static)
        rows.append({"what": f"one answer of {args.new_tokens} tokens, {cache}", "latency_ms_median": lat})
        print(f"ours (one answer of {args.new_tokens} tokens, {cache}): {lat:.1f} ms median", flush=True)
    if "compiled" in modes:
        lat, agree = compiled_latency_ms(model, cfg, device, ids, args.new_tokens, args.latency_runs)
        what = f"one answer of {args.new_tokens} tokens, static KV cache, whole forward compiled"
        rows.append({"what": what, "latency_ms_median": lat, "same_as_generate": agree})
        print(
            f"ours ({what}): {lat:.1f} ms median; answers equal to generate's: {100 * agree:.0f}%", flush=True
        )
    best = max((r for r in rows if "answers_per_s" in r), key=lambda r: r["answers_per_s"])
    fastest = min((r for r in rows if "latency_ms_median" in r), key=lambda r: r["latency_ms_median"])
    result = {
        "bench": "generate_throughput",
        "preset": args.preset,
        "device": device_name(device),
        "torch": torch.__version__,
        "new_tokens": args.new_tokens,
        "answers_per_s": round(best["answers_per_s"], 2),
        "best": best["what"],
        "seed_answers_per_s": round(seed, 2),
        "ratio": round(best["answers_per_s"] / seed, 2),
        "latency_ms_median": round(fastest["latency_ms_median"], 2),
        "rows": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
