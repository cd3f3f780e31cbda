"""The `gpt2mm` command: dispatch only, one subcommand per job.

Each subcommand lives in its own module, imported only when it runs (so `gpt2mm --help` is instant and a
missing optional dependency of one job does not break the others). A module provides:

    def configure(parser: argparse.ArgumentParser) -> None   # adds the job's arguments
    def run(args: argparse.Namespace) -> int | None          # does the job; returns the exit code
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gpt2mm.errors import DamagedFileError, DataError, UsageError, WriteError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("gpt2mm.commands.init", "write a ready-to-load random model + processor from a preset"),
    "convert-seed": ("gpt2mm.commands.convert_seed", "convert a state dict saved by the seed's code"),
    "train": ("gpt2mm.commands.train", "stages 1 and 3: answer-only fine-tuning from a YAML recipe"),
    "ppo": ("gpt2mm.commands.ppo", "stage 2: PPO (or RLOO / GRPO) on answer correctness"),
    "tag": ("gpt2mm.commands.tag", "a web page to tag model answers correct / incorrect; `tag export`"),
    "reward": ("gpt2mm.commands.reward", "`reward train`: a reward model predicting P(correct) from tags"),
    "plot": ("gpt2mm.commands.plot", "plot a run's loss and accuracy curves to a PNG"),
    "demo": (
        "gpt2mm.commands.demo",
        "the offline demo: synthetic world, tiny model, train, evaluate, summary",
    ),
    "synth": ("gpt2mm.commands.synth", "render the synthetic shapes world (VQA v2 + LLaVA formats)"),
    "vqa-score": ("gpt2mm.commands.vqa_score", "score VQA results with the official VQA v2 accuracy"),
    "eval": (
        "gpt2mm.commands.eval",
        "answer a split (VQA files, a Hugging Face dataset, a CSV) with a model and score it",
    ),
    "report": (
        "gpt2mm.commands.report",
        "compare checkpoints on VQA accuracy and description F1 in one table",
    ),
    "ask": ("gpt2mm.commands.ask", "answer a question about an image on the command line"),
    "serve": ("gpt2mm.commands.serve", "serve an OpenAI-compatible chat API and a web page, with batching"),
    "push": (
        "gpt2mm.commands.push",
        "publish a checkpoint on the Hugging Face Hub (loads there without gpt2mm)",
    ),
    "export": (
        "gpt2mm.commands.export",
        "`export onnx`: ONNX graphs + a runner that answers without PyTorch",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="gpt2mm", description="A small multimodal GPT-2.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])  # prints help or the "invalid choice" error and exits
        return 2
    name = argv[0]
    _quiet_libraries()
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"gpt2mm {name}", description=COMMANDS[name][1])
    module.configure(cmd_parser)
    takes_overrides = getattr(module, "TAKES_OVERRIDES", False)  # `--section.key value` recipe overrides
    if takes_overrides:
        args, extra = cmd_parser.parse_known_args(argv[1:])
    else:
        args = cmd_parser.parse_args(argv[1:])
    try:
        code = module.run(args, extra) if takes_overrides else module.run(args)
    except (WriteError, DamagedFileError) as e:  # a full disk, a damaged checkpoint: one line, no usage
        cmd_parser.exit(2, f"{cmd_parser.prog}: error: {e}\n")
    except (UsageError, DataError) as e:  # the user's input, not our bug: a message, no traceback
        cmd_parser.error(str(e))  # exits with code 2
    except BrokenPipeError:  # `gpt2mm ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    return int(code or 0)


def _quiet_libraries() -> None:
    """transformers' own progress bars and notices ("Writing model shards") drown ours."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging

    # transformers is imported already (by gpt2mm itself) and read the environment then; without this its
    # notices ("CLIPImageProcessor requires torchvision ...") and bars ("Writing model shards") reach every command
    logging.set_verbosity(logging.log_levels.get(os.environ["TRANSFORMERS_VERBOSITY"], logging.ERROR))
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"].strip().lower() in ("1", "true", "yes", "on"):
        logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
