"""`gpt2mm push DIR REPO_ID [--private] [--revision REV]`: publish a checkpoint on the Hugging Face Hub.

DIR is any model gpt2mm wrote (`init`, `train`, `ppo`, ...). Its remote code and model card are brought up
to date first (the card's example then loads REPO_ID), so the published model loads without gpt2mm:
`AutoModelForImageTextToText.from_pretrained(REPO_ID, trust_remote_code=True)`. The optimizer state of a
resumable checkpoint (trainer_state.pt) is not uploaded. Needs a token: `hf auth login`, or HF_TOKEN.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="the checkpoint directory to publish")
    parser.add_argument(
        "repo_id", help="the model repo on the Hub, e.g. you/gpt2mm-tiny-vqa (created if missing)"
    )
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="the branch to push to (created if missing; default: main)")


def run(args: argparse.Namespace) -> int:
    from gpt2mm.hub import push

    push(args.dir, args.repo_id, private=args.private, revision=args.revision)
    return 0
