"""`gpt2mm train [RECIPE.yaml] [--section.key value ...] [--resume [CHECKPOINT]]`: stages 1 and 3 (SFT).

Without a recipe the defaults run (the synthetic world, the tiny preset). See gpt2mm.train.sft."""

from __future__ import annotations

import argparse

TAKES_OVERRIDES = True


def configure(parser: argparse.ArgumentParser) -> None:
    from gpt2mm.train.args import add_recipe_arguments
    from gpt2mm.train.config import SFTConfig

    add_recipe_arguments(parser, "train", SFTConfig)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from gpt2mm.train.args import load_recipe
    from gpt2mm.train.config import SFTConfig
    from gpt2mm.train.sft import SFTTrainer

    trainer = SFTTrainer(load_recipe(SFTConfig, extra), resume=args.resume)
    trainer.train()
    trainer.end()
    return 0
