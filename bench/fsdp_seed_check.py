"""FSDP2 on the seed preset's model: 2 CPU processes (gloo) against one, the same 3 steps, compared.

    python bench/fsdp_seed_check.py [--workdir DIR] [--steps 3] [--batch-size 4]

The seed preset's model (CLIP ViT-B/32 frozen + GPT-2 large, 874M parameters) is built with random weights
from its embedded configs. Its real processor needs GPT-2's tokenizer from the hub, so the model is saved
with the `tiny` preset's tokenizer instead (`<image>` = id 1, which the config is given): the ids are
different, the shapes and the sharding are the seed's. Dropout is off so that the two runs can agree number
for number. Then `gpt2mm train` runs the demo's stage-1 recipe, made small, from that model
(`--model.init_from`) on a small synthetic world, once as one process and once as
`torchrun --nproc_per_node 2 ... --train.fsdp true` (FSDP2 units: each GPT2Block and CLIPEncoderLayer), and
this compares their logged losses and final checkpoints: the weights agree to float32 rounding, the frozen vision tower is bit-identical to the
initial weights, every trainable tensor moved.

Each part is a subprocess of its own and they run one after another: the FSDP pair holds about 2 x 7 GB
(a whole fp32 model each while loading, then half the parameters, gradients and AdamW state each), which a
24 GB machine holds only without a third copy beside it. The comparison reads one tensor at a time.
Exits 1 if the runs disagree. Prints, as its last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "demo-sft.yaml"
# the demo's recipe without its packing, conversations, curriculum, model override, time budget and `auto` settings
SMALL = [
    "--model.overrides", "{}", "--model.attn_implementation", "none", "--data.pack_questions", "1",
    "--data.conversation_mix", "false", "--data.difficulty", "none", "--data.max_length", "128",
    "--train.max_minutes", "none", "--train.min_lr_ratio", "0", "--train.precision", "fp32",
    "--train.curriculum_steps", "0",
]  # fmt: skip


def make_init(path: Path) -> None:
    """The seed preset's model, random, dropout off, saved with the tiny tokenizer (run in a subprocess)."""
    import torch

    from gpt2mm import MultimodalGPT2Config, MultimodalGPT2ForConditionalGeneration, MultimodalGPT2Processor
    from gpt2mm.processing import default_image_processor
    from gpt2mm.tokenizer import build_tiny_tokenizer

    cfg = MultimodalGPT2Config.from_preset("seed", image_token_id=1)
    cfg.text_config.resid_pdrop = cfg.text_config.embd_pdrop = cfg.text_config.attn_pdrop = 0.0
    cfg.projector_dropout = 0.0
    torch.manual_seed(0)
    model = MultimodalGPT2ForConditionalGeneration(cfg)
    processor = MultimodalGPT2Processor(
        image_processor=default_image_processor(cfg),
        tokenizer=build_tiny_tokenizer(),
        num_image_tokens=cfg.num_image_tokens,
        image_token=cfg.image_token,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters")


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run a command, its output to a log: the seconds it took and the largest resident set (GB) of it or of
    any process under it (torchrun's workers). Raises, with the log's tail, if it fails."""
    t = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed (exit {code}); {log}:\n{tail}")
    return time.perf_counter() - t, usage.ru_maxrss / 2**20  # ru_maxrss: KiB on Linux


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def compare(init: Path, single: Path, fsdp: Path) -> dict:
    """Weights of the two final checkpoints, one tensor at a time, and each against the initial weights."""
    from safetensors import safe_open

    files = [safe_open(d / "model.safetensors", "pt") for d in (init, single, fsdp)]
    keys = [set(f.keys()) for f in files]
    if keys[1] != keys[2]:
        raise SystemExit(f"the checkpoints hold different tensors: {sorted(keys[1] ^ keys[2])[:5]}")
    diff = update = 0.0
    vision_changed, moved, still = [], 0, []
    for key in sorted(keys[1]):
        a, b = files[1].get_tensor(key), files[2].get_tensor(key)
        diff = max(diff, float((a - b).abs().max()))
        if key not in keys[0]:
            continue
        before = files[0].get_tensor(key)
        change = float((a - before).abs().max())
        if key.startswith("vision_tower."):
            if change != 0.0 or float((b - before).abs().max()) != 0.0:
                vision_changed.append(key)
        elif change > 0:
            moved, update = moved + 1, max(update, change)
        else:
            still.append(key)
    return {
        "tensors": len(keys[1]),
        "max_weight_diff": diff,
        "max_update": update,
        "trainable_moved": moved,
        "trainable_not_moved": still,
        "vision_changed": vision_changed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--workdir",
        type=Path,
        help="a new or empty directory for the model, world and runs (default: a temp dir)",
    )
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4, help="global batch (2 x half under FSDP)")
    ap.add_argument("--port", type=int, default=29541)
    ap.add_argument("--make-init", type=Path, help=argparse.SUPPRESS)  # the subprocess's part
    args = ap.parse_args()
    if args.make_init:
        return make_init(args.make_init)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fsdp-seed-"))
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--workdir {work} is not empty: give a new or empty directory")
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    init, world = work / "seed-init", work / "world"
    t_init, _ = run([py, __file__, "--make-init", str(init)], work / "init.log")
    run([py, "-m", "gpt2mm.cli", "synth", str(world), "--train", "40", "--val", "8", "--test", "4"],
        work / "synth.log")  # fmt: skip
    train = [
        "-m", "gpt2mm.cli", "train", str(RECIPE), "--model.init_from", str(init), "--data.root", str(world),
        "--data.synth", "false", "--train.max_steps", str(args.steps), "--train.batch_size", str(args.batch_size),
        "--train.lr", "1e-4", "--train.warmup_steps", "0", "--train.eval_every", "0",
        "--train.save_every", str(args.steps), "--train.keep_last", "1", "--train.progress", "false",
        "--train.log_with", "[]", "--train.log_every", "1",
        *SMALL,
    ]  # fmt: skip
    single, fsdp = work / "single", work / "fsdp"
    t_single, rss_single = run([py, *train, "--train.output_dir", str(single)], work / "single.log")
    torchrun = [py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(args.port)]
    fsdp_cmd = [*torchrun, *train, "--train.output_dir", str(fsdp), "--train.fsdp", "true"]
    t_fsdp, rss_fsdp = run(fsdp_cmd, work / "fsdp.log")
    units = re.search(r"FSDP2 over \d+ processes \([^)]*\)", (work / "fsdp.log").read_text())
    if units is None:
        raise SystemExit(f"{work / 'fsdp.log'}: the run did not say it sharded with FSDP2")

    step = f"checkpoint-{args.steps}"
    cmp = compare(init, single / step, fsdp / step)
    la, lb = losses(single), losses(fsdp)
    params = re.search(r"([\d,]+) parameters", (work / "init.log").read_text())
    print(f"model: the seed preset's, {params and params[1]} parameters; {units[0]}")
    print(f"seconds: making the model {t_init:.0f}, one process {t_single:.0f}, FSDP2 x 2 {t_fsdp:.0f}")
    print(f"largest resident set of one process (GB): one process {rss_single:.1f}, FSDP2 x 2 {rss_fsdp:.1f}")
    print()
    print("| | " + " | ".join(f"step {i + 1}" for i in range(len(la))) + " |")
    print("|---|" + "---|" * len(la))
    print("| loss, FSDP2 over 2 processes | " + " | ".join(f"{x:.5f}" for x in lb) + " |")
    print("| loss, one process | " + " | ".join(f"{x:.5f}" for x in la) + " |")
    print()
    print(
        f"final checkpoints, {cmp['tensors']} tensors: largest weight difference {cmp['max_weight_diff']:.2g} "
        f"(largest update {cmp['max_update']:.2g}); vision tower changed in {len(cmp['vision_changed'])} "
        f"tensors; trainable tensors moved: {cmp['trainable_moved']} of "
        f"{cmp['trainable_moved'] + len(cmp['trainable_not_moved'])}"
    )
    rel = max(abs(a - b) / abs(a) for a, b in zip(la, lb, strict=True)) if len(la) == len(lb) else None
    ok = (
        len(la) == len(lb) == args.steps
        and rel is not None
        and rel < 1e-4
        and cmp["max_weight_diff"] < 1e-4 * max(cmp["max_update"], 1e-12) + 1e-5
        and not cmp["vision_changed"]
        and not cmp["trainable_not_moved"]
    )
    print(("PASS" if ok else "FAIL") + f": work dir {work}")
    result = {
        "bench": "fsdp_seed_check",
        "ok": ok,
        "losses_single": la,
        "losses_fsdp": lb,
        "max_loss_rel_diff": rel,
        **{k: v for k, v in cmp.items() if k != "trainable_not_moved"},
        "trainable_not_moved": len(cmp["trainable_not_moved"]),
        "seconds": {"init": t_init, "single": t_single, "fsdp": t_fsdp},
        "max_rss_gb": {"single": rss_single, "fsdp_per_process": rss_fsdp},
    }
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
