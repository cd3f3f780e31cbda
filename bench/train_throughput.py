"""Training throughput: our step against a faithful re-implementation of the seed's loop, in one run.

    python bench/train_throughput.py --preset tiny --device cpu
    python bench/train_throughput.py --preset seed --device cuda --batch-size 64 --compile

Both loops train the same random-initialised model (built from the preset's config: no hub) on the same
synthetic VQA-shaped samples (image tokens + a 10-20 token question + a 1-3 token answer).

The seed's loop, as its write-up and code describe it: batch 1, every sample padded to 512 tokens, the
vision tower run every step, full (512, vocab) logits with the loss on the answer tokens, plain SGD, fp16
weights on a GPU (on a CPU, fp32: CPUs have no fast fp16, so this flatters the seed).
Ours: batches padded to their longest sample, the LM head on answer positions only, fused AdamW, bf16
autocast on a GPU, SDPA attention, optionally torch.compile and the frozen-vision feature cache.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpt2mm import MultimodalGPT2Config, MultimodalGPT2ForConditionalGeneration  # noqa: E402
from gpt2mm.modeling import IGNORE_INDEX  # noqa: E402


def make_samples(cfg: MultimodalGPT2Config, n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) shaped like the seed's prompts: `Q: <image>*T question A: answer<eos>`."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(cfg.text_config.vocab_size, 50257) - 1
    eos = cfg.text_config.eos_token_id if cfg.text_config.eos_token_id is not None else 0
    out = []
    for _ in range(n):
        q = torch.randint(2, vocab, (int(torch.randint(10, 21, (1,), generator=g)),), generator=g).tolist()
        a = torch.randint(2, vocab, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist() + [
            eos
        ]
        prompt = [2] + [cfg.image_token_id] * cfg.num_image_tokens + q + [3]
        out.append((prompt + a, [IGNORE_INDEX] * len(prompt) + a))
    return out


def pad(samples, width: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    width = width or max(len(s[0]) for s in samples)
    ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), IGNORE_INDEX)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, (x, y) in enumerate(samples):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def device_name(device: torch.device) -> str:
    """The card's name, or the CPU's thread count and kind: what a result row must say it ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_seed(cfg, samples, device, seconds: float) -> dict:
    """The seed's loop: batch 1, padded to 512, vision every step, full logits, SGD, fp16 weights on GPU."""
    torch.manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = MultimodalGPT2ForConditionalGeneration(cfg).to(device=device, dtype=dtype).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    size = cfg.vision_config.image_size
    width = min(512, cfg.text_config.n_positions)
    n, start, i = 0, None, 0
    while True:
        batch = pad([samples[i % len(samples)]], width, 0)
        batch = {k: v.to(device) for k, v in batch.items()}
        pixels = torch.randn(1, 3, size, size, device=device, dtype=dtype)
        out = model(**batch, pixel_values=pixels, return_logits=True)  # full (1, 512, vocab) logits
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        i += 1
        if i == 3:  # warm-up done
            sync(device)
            start = time.perf_counter()
        elif start is not None:
            n += 1
            if time.perf_counter() - start > seconds and n >= 5:
                break
    sync(device)
    dt = time.perf_counter() - start
    return {"samples_per_s": n / dt, "steps": n}


def bench_ours(
    cfg, samples, device, seconds: float, batch_size: int, compile_: bool, feature_cache: bool
) -> dict:
    torch.manual_seed(0)
    model = MultimodalGPT2ForConditionalGeneration(cfg).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    size = cfg.vision_config.image_size
    amp = device.type == "cuda"
    vision_states = None
    if feature_cache:  # frozen vision: its outputs were computed once, ahead of training
        if not model.vision_frozen:
            raise SystemExit("--feature-cache needs a frozen vision tower (seed/small presets)")
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            vision_states = model.get_vision_hidden_states(
                torch.randn(batch_size, 3, size, size, device=device)
            )
    step = torch.compile(model) if compile_ else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n, tokens, start, i = 0, 0, None, 0
    while True:
        chunk = [samples[(i * batch_size + j) % len(samples)] for j in range(batch_size)]
        batch = {k: v.to(device, non_blocking=True) for k, v in pad(chunk, None, 0).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if vision_states is not None:
                out = step(**batch, vision_hidden_states=vision_states)
            else:
                out = step(**batch, pixel_values=torch.randn(batch_size, 3, size, size, device=device))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        i += 1
        if i == 3:
            sync(device)
            start = time.perf_counter()
        elif start is not None:
            n += batch_size
            tokens += int(batch["attention_mask"].sum())
            if time.perf_counter() - start > seconds and n >= 5 * batch_size:
                break
    sync(device)
    dt = time.perf_counter() - start
    result = {"samples_per_s": n / dt, "tokens_per_s": tokens / dt, "batch_size": batch_size}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        # model FLOPs: 6 * trainable params * tokens (+ 2 * frozen params * image tokens) per second
        n_params = sum(p.numel() for p in model.language_model.parameters()) + sum(
            p.numel() for p in model.projector.parameters()
        )
        flops = 6 * n_params * tokens / dt
        result["model_tflops"] = flops / 1e12
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "seed"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per loop")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--feature-cache", action="store_true", help="frozen vision outputs computed once")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 matmul rate, for MFU")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = MultimodalGPT2Config.from_preset(args.preset, attn_implementation="sdpa")
    samples = make_samples(cfg, 512)
    seed = bench_seed(cfg, samples, device, args.seconds)
    print(f"seed loop: {seed['samples_per_s']:.1f} samples/s")
    ours = bench_ours(cfg, samples, device, args.seconds, args.batch_size, args.compile, args.feature_cache)
    print(f"ours: {ours['samples_per_s']:.1f} samples/s, {ours['tokens_per_s']:.0f} tokens/s")
    result = {
        "bench": "train_throughput",
        "preset": args.preset,
        "device": device_name(device),
        "torch": torch.__version__,
        **{k: v for k, v in ours.items()},
        "seed_samples_per_s": seed["samples_per_s"],
        "ratio": ours["samples_per_s"] / seed["samples_per_s"],
        "compile": args.compile,
        "feature_cache": args.feature_cache,
    }
    if args.peak_tflops and "model_tflops" in ours:
        result["mfu"] = ours["model_tflops"] / args.peak_tflops
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
