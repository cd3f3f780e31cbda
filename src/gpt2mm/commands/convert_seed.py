"""`gpt2mm convert-seed SEED.pth OUT_DIR`: turn a state dict saved by the seed's code into a gpt2mm model
(config + weights + processor), every key and shape checked; the mapping is `gpt2mm.convert_seed`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2mm.convert_seed import check_seed_keys, convert_seed_state_dict, load_seed_state_dict
from gpt2mm.errors import UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("seed_checkpoint", type=Path, help="state dict saved by the seed (torch.save)")
    parser.add_argument("out_dir", type=Path, help="directory to write the converted model + processor")
    parser.add_argument("--text", default="openai-community/gpt2-large", help="GPT-2 hub id or directory")
    parser.add_argument("--vision", default="openai/clip-vit-base-patch32", help="CLIP hub id or directory")
    parser.add_argument("--image-token-id", type=int, default=None, help="default: first id after GPT-2's")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor

    from gpt2mm.hub import save_model
    from gpt2mm.processing import MultimodalGPT2Processor, default_image_processor
    from gpt2mm.tokenizer import add_image_token

    out: Path = args.out_dir
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty; choose another path")
    state = load_seed_state_dict(args.seed_checkpoint)
    check_seed_keys(state)
    try:
        text_config = AutoConfig.from_pretrained(args.text)
        vision_config = AutoConfig.from_pretrained(args.vision)
        tokenizer = AutoTokenizer.from_pretrained(args.text)
    except OSError as e:
        raise UsageError(f"cannot load the backbones' configs ({args.text}, {args.vision}): {e}") from e
    vision_config = getattr(
        vision_config, "vision_config", vision_config
    )  # a full CLIP config has both towers
    model = convert_seed_state_dict(state, text_config, vision_config, args.image_token_id)
    token_id = add_image_token(tokenizer, model.config.image_token)
    if token_id != model.config.image_token_id:
        raise UsageError(
            f"the tokenizer gives {model.config.image_token} id {token_id}, but the model uses "
            f"{model.config.image_token_id}; pass --image-token-id"
        )
    try:
        image_processor = CLIPImageProcessor.from_pretrained(args.vision)
    except OSError:
        image_processor = default_image_processor(model.config)
    processor = MultimodalGPT2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=model.config.num_image_tokens,
        image_token=model.config.image_token,
    )
    save_model(
        model,
        processor,
        out,
        stage="convert-seed",
        vision_backbone=str(args.vision),
        text_backbone=str(args.text),
    )
    print(f"converted {args.seed_checkpoint} -> {out}")
    return 0
