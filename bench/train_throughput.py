"""Training throughput: our step against a faithful re-implementation of the seed's loop, in one run.

    python bench/train_throughput.py --preset tiny --device cpu
    python bench/train_throughput.py --preset seed --device cuda --batch-size 128 --variants ablation
    python bench/train_throughput.py --preset seed --device cuda --variants memory --no-seed-loop

Every loop trains a random-initialised model built from the preset's config (no hub) on the same synthetic
VQA-shaped samples: `Q: <image>*T question A: answer<eos>`, a 10-20 token question and a 1-3 token answer,
5 questions per image (VQA v2 has 5.4).

The seed's loop, as its write-up and code describe it: batch 1, every sample padded to 512 tokens, the
vision tower run every step, full (512, vocab) logits with the loss on the answer tokens, plain SGD, fp16
weights on a GPU (on a CPU, fp32: CPUs have no fast fp16, so this flatters the seed).

Ours is the trainer's step (`gpt2mm train`): its optimizer (fused AdamW, as `make_optimizer` builds it) after
clipping the gradients' norm to 1 (`train.grad_clip`), its batching
(`length_grouped_batches`: batches of similar lengths padded to their longest), the model's LM head on the
labelled positions only, bf16 autocast on a GPU, SDPA attention, the frozen-vision feature cache (seed and
small presets) and, with `compile`, `model.compile_blocks()` (`train.compile`). Batches are collated before
the clock starts and copied to the device each step, as the trainer's data loader workers would hand them.
`--variants` runs several configurations one after another in the same process; `ablation` is ours, then
ours with each fast path taken away in turn, then packing. `memory` runs full fine-tuning and LoRA at batch
32 under a cap on the GPU memory the process may take (`--memory-cap-gb`, default 15 GB for full, 9 GB
for LoRA: 1 GB short of a 16 GB / 10 GB card, for the CUDA context); a run that does not fit fails with
an out-of-memory error, which is reported as such.

The last line printed is one JSON object with the figures (the first variant's, plus all rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpt2mm import MultimodalGPT2Config, MultimodalGPT2ForConditionalGeneration  # noqa: E402
from gpt2mm.config import IGNORE_INDEX  # noqa: E402
from gpt2mm.data.collate import length_grouped_batches, shuffled_batches  # noqa: E402
from gpt2mm.train.config import TrainConfig  # noqa: E402

QUESTIONS_PER_IMAGE = 5


@dataclass
class Options:
    """One configuration of our loop; the defaults are ours (every fast path on, compile off)."""

    batch_size: int | None = None  # None: --batch-size
    amp: bool = True  # bf16 autocast on a GPU (a CPU step stays fp32 unless cpu_bf16)
    cpu_bf16: bool = False  # bf16 autocast on a CPU too (what the demo does where the CPU has native bf16)
    fused_adamw: bool = True
    grad_clip: float = TrainConfig.grad_clip  # the trainer's default: the gradients' norm clipped every step
    attn: str = "sdpa"
    answer_only_head: bool = True
    padding: str = "grouped"  # grouped (length grouping + dynamic padding) | longest (dynamic only) | 512
    feature_cache: bool = True  # frozen vision only
    compile: bool = False
    gradient_checkpointing: bool = False
    lora: int = 0
    pack: int = 1  # questions per sequence (>1: an image's questions packed into one sequence)
    memory_cap_gb: float | None = None


ABLATION = {
    "ours + compile": Options(compile=True),
    "ours + compile (batch 256)": Options(compile=True, batch_size=256),
    "ours + compile (batch 320)": Options(compile=True, batch_size=320),
    "ours + compile (batch 384)": Options(compile=True, batch_size=384),
    "ours": Options(),
    "- length grouping (dynamic padding only)": Options(padding="longest"),
    "- dynamic padding (pad to 512)": Options(padding="512"),
    "- feature cache (vision every step)": Options(feature_cache=False),
    "- LM head on answers only (full logits)": Options(answer_only_head=False),
    "- bf16 autocast (fp32)": Options(amp=False),
    "- fused AdamW (foreach)": Options(fused_adamw=False),
    "- SDPA (eager attention)": Options(attn="eager"),
    "+ bf16 autocast on a CPU (SDPA)": Options(cpu_bf16=True),
    "+ bf16 autocast on a CPU, eager attention (the demo's settings)": Options(cpu_bf16=True, attn="eager"),
    f"+ packing ({QUESTIONS_PER_IMAGE} questions per sequence)": Options(pack=QUESTIONS_PER_IMAGE),
    f"+ packing ({QUESTIONS_PER_IMAGE} questions per sequence) + compile": Options(
        pack=QUESTIONS_PER_IMAGE, compile=True
    ),
}
MEMORY = {
    "full fine-tuning, batch 32, gradient checkpointing": Options(
        batch_size=32, gradient_checkpointing=True, memory_cap_gb=15.0
    ),
    "LoRA r=8, batch 32": Options(batch_size=32, lora=8, memory_cap_gb=9.0),
    "LoRA r=8, batch 32, gradient checkpointing": Options(
        batch_size=32, lora=8, gradient_checkpointing=True, memory_cap_gb=9.0
    ),
    "full fine-tuning, batch 32 (no cap, for reference)": Options(batch_size=32),
}
VARIANT_SETS = {"ours": {"ours": Options()}, "ablation": ABLATION, "memory": MEMORY}


# --- data ----------------------------------------------------------------------------------------------------


def make_samples(cfg: MultimodalGPT2Config, n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) shaped like the seed's prompts: `Q: <image>*T question A: answer<eos>`."""
    return [pack_sample(cfg, [qa]) for qa in make_qas(cfg, n, seed)]


def make_qas(cfg: MultimodalGPT2Config, n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """n (question, answer + eos) token lists; consecutive groups of QUESTIONS_PER_IMAGE share an image."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(cfg.text_config.vocab_size, 50257) - 1
    eos = cfg.text_config.eos_token_id if cfg.text_config.eos_token_id is not None else 0
    out = []
    for _ in range(n):
        q = torch.randint(2, vocab, (int(torch.randint(10, 21, (1,), generator=g)),), generator=g).tolist()
        a = torch.randint(2, vocab, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        out.append((q, a + [eos]))
    return out


def pack_sample(cfg, qas) -> tuple[list[int], list[int]]:
    """One image's question(s) as one sequence; the labels are the answers."""
    ids = [2] + [cfg.image_token_id] * cfg.num_image_tokens
    labels = [IGNORE_INDEX] * len(ids)
    for q, a in qas:
        ids += q + [3] + a
        labels += [IGNORE_INDEX] * (len(q) + 1) + a
    return ids, labels


def pad(samples, width: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    width = width or max(len(s[0]) for s in samples)
    ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), IGNORE_INDEX)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, (x, y) in enumerate(samples):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def make_batches(cfg, opt: Options, batch_size: int, n_batches: int, images: torch.Tensor) -> list[dict]:
    """Collated CPU batches (pinned on a GPU machine) as the trainer's data loader would give them.
    `images` holds one row per image (pixels or vision states); sample i shows image i // 5."""
    n_seq = batch_size * n_batches
    qas = make_qas(cfg, n_seq * opt.pack)
    if opt.pack > 1:  # an image's questions in one sequence (the trainer's pack_by_image)
        seqs = [pack_sample(cfg, qas[i : i + opt.pack]) for i in range(0, len(qas), opt.pack)]
        image_of = list(range(len(seqs)))
    else:
        seqs = [pack_sample(cfg, [qa]) for qa in qas]
        image_of = [i // QUESTIONS_PER_IMAGE for i in range(len(seqs))]
    g = torch.Generator().manual_seed(0)
    if opt.padding == "grouped":
        order = length_grouped_batches([len(s[0]) for s in seqs], batch_size, g)
    else:
        order = shuffled_batches(len(seqs), batch_size, g)
    width = min(512, cfg.text_config.n_positions) if opt.padding == "512" else None
    batches = []
    for idx in order:
        if len(idx) < batch_size:
            continue
        b = pad([seqs[i] for i in idx], width, 0)
        b["images"] = images[torch.tensor([image_of[i] % len(images) for i in idx])]
        b["answers"] = len(idx) * opt.pack  # QA pairs: what samples/s counts
        if torch.cuda.is_available():
            b = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()}
        batches.append(b)
    return batches


# --- loops ---------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The card's name, or the CPU's thread count and kind: what a result row must say it ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(
    cfg: MultimodalGPT2Config, device: torch.device, dtype=None
) -> MultimodalGPT2ForConditionalGeneration:
    """The random-initialised model, built directly on the device (seconds, not a minute, for the seed)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = MultimodalGPT2ForConditionalGeneration(cfg)
    return model.to(dtype) if dtype is not None else model


def bench_seed(cfg, device, seconds: float) -> dict:
    """The seed's loop: batch 1, padded to 512, vision every step, full logits, SGD, fp16 weights on GPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build(cfg, device, dtype).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    size = cfg.vision_config.image_size
    width = min(512, cfg.text_config.n_positions)
    samples = make_samples(cfg, 512)
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
    del model, opt
    return {"samples_per_s": n / dt, "steps": n}


def step_flops(cfg, model, batch, vision_ran: bool) -> float:
    """Model FLOPs of one training step (what the model needs, not what an implementation spends):
    6 x trainable matmul parameters per token through the GPT-2 blocks and the projector, attention
    (12 x layers x width x T^2 per sequence), the LM head on the labelled tokens alone (6 x width x vocab
    each), and the frozen vision tower's forward (2 x its parameters per patch token) when it runs."""
    tc = cfg.text_config
    lengths = batch["attention_mask"].sum(dim=1).double()
    tokens = float(lengths.sum())
    blocks = sum(p.numel() for n, p in model.language_model.named_parameters() if n.startswith("h."))
    proj = sum(p.numel() for p in model.projector.parameters())
    n_images = batch["images"].shape[0]
    answers = float((batch["labels"] != IGNORE_INDEX).sum())
    flops = 6 * blocks * tokens + 12 * tc.n_layer * tc.n_embd * float((lengths**2).sum())
    flops += 6 * proj * n_images * cfg.num_image_tokens + 6 * tc.n_embd * tc.vocab_size * answers
    if vision_ran:
        vision = sum(p.numel() for p in model.vision_tower.parameters())
        flops += 2 * vision * n_images * (cfg.num_image_tokens + 1)
    return flops


def bench_ours(
    preset: str, device, seconds: float, opt: Options, default_batch: int, profile_steps: int = 0
) -> dict:
    from gpt2mm.train.config import LoraConfig
    from gpt2mm.train.lora import inject_lora
    from gpt2mm.train.model import enable_checkpointing

    bs = opt.batch_size or default_batch
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()  # what an out-of-memory variant before this one left
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        total = torch.cuda.get_device_properties(device).total_memory
        cap = opt.memory_cap_gb * 1e9 if opt.memory_cap_gb else total
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    cfg = MultimodalGPT2Config.from_preset(preset, attn_implementation=opt.attn)
    model = build(cfg, device).train()
    if opt.lora:
        inject_lora(model, LoraConfig(r=opt.lora))
    if opt.gradient_checkpointing:
        enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=opt.fused_adamw, foreach=not opt.fused_adamw)
    amp = opt.amp and (cuda or opt.cpu_bf16)
    use_cache = opt.feature_cache and model.vision_frozen
    n_images = 256
    size = cfg.vision_config.image_size
    if use_cache:  # frozen vision: its outputs were computed once, ahead of training (float16 on disk)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            images = torch.cat(
                [
                    model.get_vision_hidden_states(torch.randn(64, 3, size, size, device=device))
                    for _ in range(4)
                ]
            )
        images = images.half().cpu()
    else:
        images = torch.randn(n_images, 3, size, size)
    batches = make_batches(cfg, opt, bs, 24, images)
    batch_flops = [step_flops(cfg, model, b, vision_ran=not use_cache) for b in batches]
    if opt.compile:
        torch._dynamo.reset()  # compile as a fresh run would, not from the graphs of a variant before
        model.compile_blocks()
    # bf16 autocast keeps a bf16 copy of each weight for the whole forward; under gradient checkpointing
    # that copy is most of what checkpointing saves, so the trainer turns the cache off (AutocastKwargs)
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=not opt.gradient_checkpointing
    )
    key = "vision_hidden_states" if use_cache else "pixel_values"

    def train_step(b: dict) -> None:
        batch = {k: b[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "attention_mask")}
        images_b = b["images"].to(device, non_blocking=True)
        with autocast:
            out = model(**batch, **{key: images_b.float()}, return_logits=not opt.answer_only_head)
        out.loss.backward()
        if opt.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    n = tokens = padded = flops = 0.0
    start, i, compile_s, t0 = None, 0, None, time.perf_counter()
    warmup = 10 if opt.compile else 3
    while True:
        b = batches[i % len(batches)]
        train_step(b)
        i += 1
        if i == warmup:  # warm-up (and compilation: a batch with no padding takes its own graph) done
            sync(device)
            compile_s = time.perf_counter() - t0
            start = time.perf_counter()
        elif start is not None:
            n += b["answers"]
            tokens += float(b["attention_mask"].sum())
            padded += b["input_ids"].numel()
            flops += batch_flops[(i - 1) % len(batches)]
            if time.perf_counter() - start > seconds and i >= warmup + 5:
                break
    sync(device)
    dt = time.perf_counter() - start
    result = {
        "samples_per_s": n / dt,
        "tokens_per_s": tokens / dt,
        "batch_size": bs,
        "steps": i - warmup,
        "warmup_s": compile_s,
        "padding_fraction": 1 - tokens / padded,
    }
    if cuda:
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        result["model_tflops"] = flops / dt / 1e12
    if profile_steps:
        result["profile"] = profile(
            lambda j: train_step(batches[(i + j) % len(batches)]), profile_steps, device
        )
    return result  # the model, its optimizer and the batches go with this frame


def profile(step, n: int, device: torch.device) -> dict:
    """n more steps under torch.profiler: where the time goes. Prints the operators (kernels on a GPU) that
    took most of it; on a GPU also how much of the steps' wall-clock the GPU was busy (summed kernel time:
    well under 100% means the host, not the GPU, sets the pace)."""
    from torch.profiler import ProfilerActivity

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        t = time.perf_counter()
        for j in range(n):
            step(j)
        sync(device)
        wall = time.perf_counter() - t
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=15, max_name_column_width=70), flush=True)
    out = {"steps": n, "step_ms": 1e3 * wall / n}
    if cuda:
        from torch.autograd import DeviceType

        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6  # the table's total; us -> s
        out["gpu_busy_fraction"] = busy / wall
        print(
            f"profiled {n} steps: {out['step_ms']:.1f} ms a step, the GPU busy {100 * busy / wall:.1f}% of it"
        )
    else:
        print(f"profiled {n} steps: {out['step_ms']:.1f} ms a step")
    return out


def measure_peak_tflops(device: torch.device) -> float:
    """The card's bf16 matrix-product rate, measured: 8192^3 products on random data, mean of 10."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "seed"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per loop")
    ap.add_argument("--variants", default="ours", help="ours | ablation | memory | comma-separated names")
    ap.add_argument("--compile", action="store_true", help="(with --variants ours) compile_blocks")
    ap.add_argument("--no-seed-loop", action="store_true", help="skip the seed's loop (memory runs)")
    ap.add_argument(
        "--profile", type=int, default=0, metavar="N", help="then profile N steps of the first variant"
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 rate for MFU (default: measured)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = MultimodalGPT2Config.from_preset(args.preset, attn_implementation="sdpa")
    if args.variants in VARIANT_SETS:
        variants = dict(VARIANT_SETS[args.variants])
    else:
        every = {**ABLATION, **MEMORY}
        unknown = [v for v in args.variants.split(",") if v not in every]
        if unknown:
            raise SystemExit(
                f"unknown variant(s) {unknown}; choose from {list(every)} or {list(VARIANT_SETS)}"
            )
        variants = {v: every[v] for v in args.variants.split(",")}
    if args.compile and args.variants == "ours":
        variants = {"ours + compile": Options(compile=True)}
    peak = args.peak_tflops
    if device.type == "cuda" and peak is None:
        peak = measure_peak_tflops(device)
        print(f"measured bf16 matmul rate: {peak:.0f} TFLOP/s")

    seed = None
    if not args.no_seed_loop:
        seed = bench_seed(cfg, device, args.seconds)
        print(f"seed loop: {seed['samples_per_s']:.1f} samples/s", flush=True)
    rows = []
    for name, opt in variants.items():
        if not opt.feature_cache and not cfg.freeze_vision:
            continue  # a preset that trains its vision tower (tiny) has no feature cache to take away
        if opt.cpu_bf16 and device.type != "cpu":
            continue  # a GPU step is bf16 already
        try:
            profile_steps = 0 if any("profile" in r for r in rows) else args.profile  # the first that runs
            r = bench_ours(args.preset, device, args.seconds, opt, args.batch_size, profile_steps)
        except torch.cuda.OutOfMemoryError as e:
            cap = f"the {opt.memory_cap_gb} GB cap" if opt.memory_cap_gb else "the whole card"
            r = {"error": f"out of memory under {cap}: {str(e).splitlines()[0]}"}
        r = {
            "variant": name,
            **{k: v for k, v in dataclasses.asdict(opt).items() if v != getattr(Options(), k)},
            **r,
        }
        if seed and "samples_per_s" in r:
            r["ratio"] = r["samples_per_s"] / seed["samples_per_s"]
        if peak and "model_tflops" in r:
            r["mfu"] = r["model_tflops"] / peak
        rows.append(r)
        print(summary(r), flush=True)
    print()
    print(
        f"| variant | samples/s | tokens/s | batch | {'MFU | peak GB | ' if device.type == 'cuda' else ''}ratio to seed |"
    )
    print(f"|---|---|---|---|{'---|---|' if device.type == 'cuda' else ''}---|")
    for r in rows:
        print(table_row(r, device.type == "cuda"))
    head = next((r for r in rows if "samples_per_s" in r), rows[0])
    result = {
        "bench": "train_throughput",
        "preset": args.preset,
        "device": device_name(device),
        "torch": torch.__version__,
        **{k: v for k, v in head.items()},
        "seed_samples_per_s": seed["samples_per_s"] if seed else None,
        "peak_tflops": peak,
        "rows": rows,
    }
    print(json.dumps(rounded(result)))


def summary(r: dict) -> str:
    if "error" in r:
        return f"{r['variant']}: {r['error']}"
    text = f"{r['variant']}: {r['samples_per_s']:.1f} samples/s, {r['tokens_per_s']:.0f} tokens/s"
    if "mfu" in r:
        text += f", MFU {100 * r['mfu']:.1f}%"
    if "peak_memory_gb" in r:
        text += f", peak {r['peak_memory_gb']:.2f} GB allocated / {r['peak_reserved_gb']:.2f} GB reserved"
    if "ratio" in r:
        text += f", {r['ratio']:.1f}x the seed"
    return text + f" (warm-up {r['warmup_s']:.1f} s)"


def table_row(r: dict, cuda: bool) -> str:
    if "error" in r:
        return f"| {r['variant']} | {r['error']} |"
    gpu = f" {100 * r.get('mfu', 0):.1f}% | {r['peak_reserved_gb']:.2f} |" if cuda else ""
    ratio = f"{r['ratio']:.1f}x" if "ratio" in r else ""
    return f"| {r['variant']} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['batch_size']} |{gpu} {ratio} |"


def rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v) for v in x]
    return x


if __name__ == "__main__":
    main()
