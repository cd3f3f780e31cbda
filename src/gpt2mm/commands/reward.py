"""`gpt2mm reward train` (a reward model from correct / incorrect tags: `gpt2mm.reward.train`) and `gpt2mm reward
simulate` (tags from a synthetic world's ground truth: `gpt2mm.reward.simulate`). One `--flag` per field of
their config dataclasses, which stay the single source of truth for names, defaults and help."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence

from gpt2mm.errors import UsageError


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--name` per dataclass field (help from its metadata); values are parsed by `train.args.build`,
    so the dataclass stays the single source of truth. Booleans are flags (`--x`, or `--no-x` when on)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = (
            None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        )
        help_ = f.metadata.get("help", "")
        if hints[f.name] is bool:
            if default:
                parser.add_argument(
                    "--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const", const="false",
                    default=argparse.SUPPRESS, help=f"{help_} (default on; this turns it off)",
                )  # fmt: skip
            else:
                parser.add_argument(
                    flag,
                    dest=f.name,
                    action="store_const",
                    const="true",
                    default=argparse.SUPPRESS,
                    help=help_,
                )
            continue
        parser.add_argument(
            flag,
            dest=f.name,
            required=required,
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            help=help_ if required or (default is None and help_) else f"{help_} (default {default!r})",
        )


def config_from_args(cls: type, args: argparse.Namespace, skip: Sequence[str] = ("action",)):
    """The dataclass from the parsed flags, each value parsed by its field's type (`train.args.build`); an
    error names the flag as the user typed it."""
    from gpt2mm.train.args import build

    try:
        return build(cls, {k: v for k, v in vars(args).items() if k not in skip})
    except UsageError as e:  # "lr: expected float" -> "--lr: expected float", as the user typed it
        name = str(e).split(":", 1)[0]
        if name in {f.name for f in dataclasses.fields(cls)}:
            raise UsageError("--" + name.replace("_", "-") + str(e)[len(name) :]) from None
        raise


def configure(parser: argparse.ArgumentParser) -> None:
    from gpt2mm.reward import simulate, train

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions = (
        ("train", "train a reward model on tags", train, train.RewardTrainConfig),
        (
            "simulate",
            "simulated tags from a synthetic world's ground truth",
            simulate,
            simulate.SimulateConfig,
        ),
    )
    for name, help_, module, cls in actions:
        formatter = argparse.RawDescriptionHelpFormatter
        add_config_args(
            sub.add_parser(name, help=help_, description=module.__doc__, formatter_class=formatter), cls
        )


def run(args: argparse.Namespace) -> int:
    if args.action == "simulate":
        from gpt2mm.reward.simulate import SimulateConfig, run_simulate

        return run_simulate(config_from_args(SimulateConfig, args))
    from gpt2mm.reward.train import RewardTrainConfig, train_reward

    train_reward(config_from_args(RewardTrainConfig, args))
    return 0
