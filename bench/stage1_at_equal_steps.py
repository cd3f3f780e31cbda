"""The demo's stage-1 recipe for a fixed number of steps (no time budget: the schedule is step-driven), then the
accuracy on the world's test split. Run it on two code trees to compare them at equal steps:

    PYTHONPATH=OLD_CHECKOUT/src python bench/stage1_at_equal_steps.py 500 /tmp/world /tmp/old > old.json
    PYTHONPATH=src             python bench/stage1_at_equal_steps.py 500 /tmp/world /tmp/new > new.json

It runs on the code before the shared run layer (f3f56cd: `Run`, `train.tensorboard`) and after it
(`SFTTrainer`, `train.log_with`); the settings are configs/demo-sft.yaml's with fp32 and eager attention (what
`auto` gives on a CPU without native bf16), so two trees on one machine should give the same numbers.
"""

import json
import sys
import time
from pathlib import Path

steps, world, out = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
from gpt2mm.data.synthetic import write_world  # noqa: E402

if not (world / "world.json").is_file():
    write_world(world, n_train=10000, n_val=100, n_test=500, seed=0, questions_per_image=8)
from gpt2mm.train.args import build  # noqa: E402

try:
    from gpt2mm.train.config import SFTConfig
    from gpt2mm.train.sft import SFTTrainer as Run

    quiet = {"log_with": []}
except ImportError:  # the code before the shared run layer
    from gpt2mm.train.sft import Run, SFTConfig

    quiet = {"tensorboard": False}
train = {
    "output_dir": str(out), "seed": 0, "max_steps": steps, "schedule": "cosine", "min_lr_ratio": 0.1,
    "batch_size": 32, "lr": 1e-3, "vision_lr": 0.0, "precision": "fp32", "warmup_steps": 100,
    "curriculum_steps": 1000, "eval_every": 400, "save_every": 0, "log_every": 25, "progress": False, **quiet,
}  # fmt: skip
data = {
    "root": str(world), "val_limit": 400, "pack_questions": 8, "conversation_mix": True, "max_length": 192,
    "difficulty": "objects", "synth": False,
}  # fmt: skip
model = {"preset": "tiny", "overrides": {"vision_feature_layer": 0}, "attn_implementation": "eager"}
cfg = build(SFTConfig, {"model": model, "data": data, "train": train})
t0 = time.time()
run = Run(cfg, log=lambda m: None)
summary = run.train()
from gpt2mm.data.vqa import load_vqa  # noqa: E402

run.val_samples, _ = load_vqa(
    world / "test_questions.json", world / "test_annotations.json", world / "images/test"
)
result = {
    "steps": summary["steps"],
    "final_loss": summary["final_loss"],
    "best_val_accuracy": summary["best_val_accuracy"],
    "test_accuracy": run.evaluate(),
    "seconds": round(time.time() - t0),
}
print(json.dumps(result))
