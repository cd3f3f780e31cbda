"""`gpt2mm ppo [RECIPE.yaml] [--section.key value ...] [--resume [CHECKPOINT]]`: stage 2, PPO (or RLOO / GRPO)
on answer correctness from a stage-1 checkpoint. See gpt2mm.rl.ppo."""

from __future__ import annotations

import argparse

TAKES_OVERRIDES = True


def configure(parser: argparse.ArgumentParser) -> None:
    from gpt2mm.rl.config import PPORecipe
    from gpt2mm.train.args import add_recipe_arguments

    add_recipe_arguments(parser, "ppo", PPORecipe)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from gpt2mm.rl.config import PPORecipe
    from gpt2mm.rl.ppo import PPOTrainer
    from gpt2mm.train.args import load_recipe

    PPOTrainer(load_recipe(PPORecipe, extra), resume=args.resume).train()
    return 0
