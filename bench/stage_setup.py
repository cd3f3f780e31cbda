"""How long a training stage takes to start (its data read and encoded, its model built), as the package does it
now and as it did before, side by side in one run.

    python bench/stage_setup.py WORLD [--recipe configs/demo-sft.yaml] [--rounds 3] [--threads 2] [-- OVERRIDES]

WORLD is a folder the recipe reads, e.g. the demo's: `gpt2mm synth WORLD --train 10000 --val 100 --test 500
--seed 0 --questions-per-image 8 --layout free` (configs/demo-instruct.yaml also needs `-- --model.init_from
CHECKPOINT`). Arms (`ARMS`): `before`, every part of every sample tokenized on its own (as until 2026-12-06);
`now`, `encode_samples` remembering each distinct part's tokens (questions, answers and prompts repeat). Each
round builds the recipe's trainer once per arm, the arms taking turns, and times the whole construction and
`encode_samples` within it; each arm's figure is its median round. The arms' encoded examples are compared
token for token. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cpu_attention import arguments, run_info  # noqa: E402  (bench/, this script's folder)
from gpt2mm.data import collate  # noqa: E402
from gpt2mm.errors import DataError, UsageError  # noqa: E402
from gpt2mm.processing import MultimodalGPT2Processor  # noqa: E402
from gpt2mm.train.args import load_config  # noqa: E402
from gpt2mm.train.config import SFTConfig  # noqa: E402
from gpt2mm.train.sft import SFTTrainer  # noqa: E402

ARMS = {"before": False, "now": True}  # name -> tokens remembered across samples
_tokens = MultimodalGPT2Processor._tokens


def memo(on: bool):
    """A context in which the processor remembers tokens (the package now) or tokenizes every part anew."""
    if on:
        return contextlib.nullcontext()
    return mock.patch.object(
        MultimodalGPT2Processor, "_tokens", lambda self, text, memo=None: _tokens(self, text)
    )


def build(recipe: str, world: str, out: Path, extra: list[str]) -> tuple[SFTTrainer, float, float]:
    """The recipe's trainer on WORLD; returns it, the seconds its construction took, and those spent encoding."""
    spent = []
    encode = collate.encode_samples

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        result = encode(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
        return result

    argv = ["--data.root", world, "--data.synth", "false", "--train.output_dir", str(out)]
    cfg = load_config(SFTConfig, recipe, argv + extra)
    t0 = time.perf_counter()
    with mock.patch.object(collate, "encode_samples", timed):
        trainer = SFTTrainer(cfg, log=lambda *a, **k: None)
    return trainer, time.perf_counter() - t0, sum(spent)


def main() -> None:
    ap, args, extra = arguments(__doc__)
    totals: dict[str, list[float]] = {name: [] for name in ARMS}
    encoding: dict[str, list[float]] = {name: [] for name in ARMS}
    examples = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, on in ARMS.items():
                try:
                    with memo(on):
                        trainer, total, enc = build(args.recipe, args.world, Path(tmp) / f"{name}{r}", extra)
                except (UsageError, DataError, OSError) as e:  # a world or recipe that is not there
                    ap.error(str(e))
                totals[name].append(total)
                encoding[name].append(enc)
                examples[name] = [(e.input_ids, e.labels, e.images) for e in trainer.examples]
                del trainer
    same = examples["before"] == examples["now"]
    base = statistics.median(totals["before"])
    rows = {}
    print(f"{len(examples['now'])} training examples; the arms' examples identical: {same}")
    print("| arm | stage setup (median) | of which encoding | rounds (setup) |")
    print("|---|---|---|---|")
    for name in ARMS:
        total, enc = statistics.median(totals[name]), statistics.median(encoding[name])
        rows[name] = {
            "setup_s": round(total, 2),
            "encoding_s": round(enc, 2),
            "speedup": round(base / total, 3),
            "rounds_s": [round(t, 2) for t in totals[name]],
        }
        print(f"| {name} | {total:.2f} s ({base / total:.2f}x) | {enc:.2f} s | {rows[name]['rounds_s']} |")
    info = run_info("stage_setup", args, extra)
    info.pop("steps")
    print(json.dumps(info | {"examples": len(examples["now"]), "identical": same, "arms": rows}))
    if not same:
        sys.exit("the arms encoded different examples")


if __name__ == "__main__":
    main()
