"""Which vision encoder and which language-model block learn to see, away from the rest of the pipeline.

A stripped-down VQA learner on a VQA-format folder (written for `bench/digits_vqa.py`'s handwritten digits):
image -> encoder -> image tokens, the question (one embedding per distinct question text) as a last token, a
4-layer transformer of width 128 (the tiny preset's LM size), and a linear classifier over the answers read at
that last token. No tokenizer, no generation, no packing: each step is 32 random (image, question) pairs, AdamW
at 1e-3 with 100 warm-up steps and cosine decay. It answers in minutes what a `gpt2mm train` run answers in an
hour: whether an encoder + block combination gets past the answer prior at all.

    --enc  patch-frozen   a frozen random 8 px patch embedding (the tiny recipe's tower)
           patch          the same, trained
           conv           gpt2mm's ConvStem (three 3x3 stride-2 convolutions, GELU between), trained
           cnn            3x3 convolutions + NORM + GELU + 2x2 max pooling (gpt2mm's CNNStem layout), trained
           gpt2mm         gpt2mm's own tower (vision_stem: cnn, patch --patch) and projector, trained
    --norm bn | gn | ln | none       the norm of --enc cnn
    --lm   encoder        nn.TransformerEncoder, pre-norm, PyTorch's default init, no final norm
           encoder-ln     the same with a final LayerNorm (as GPT-2's ln_f)
           encoder-0.02   the same as encoder with every matrix drawn from N(0, 0.02) (GPT-2's init)
           encoder-causal the same as encoder with a causal mask (as GPT-2's)
           gpt2           transformers' GPT2Model (learned positions, final ln_f), GPT-2's init
           gpt2-noln      the same without the final ln_f; gpt2-torchinit: PyTorch's Linear init (uniform,
                          1/sqrt(fan_in)) for every matrix and bias; gpt2-noln-torchinit: both

Usage:
    python bench/digits_vqa.py build data/digits
    python bench/vision_probe.py --root data/digits/vqa --enc gpt2mm --lm encoder [--steps 600 --seed 0]

Prints, every 200 steps, the step, seconds, the last batch's loss and the test split's accuracy (exact match
of the argmax answer, all and per question type).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

WIDTH = 128


def load_split(root: str, split: str, size: int):
    """(images as a float tensor in [-1, 1], [(image index, question, answer, question type)])."""
    questions = json.load(open(f"{root}/{split}_questions.json"))["questions"]
    notes = {a["question_id"]: a for a in json.load(open(f"{root}/{split}_annotations.json"))["annotations"]}
    ids = sorted({q["image_id"] for q in questions})
    index = {image_id: k for k, image_id in enumerate(ids)}
    images = np.stack(
        [
            np.asarray(
                Image.open(f"{root}/images/{split}/{i}.png")
                .convert("RGB")
                .resize((size, size), Image.BICUBIC)
            )
            for i in ids
        ]
    )
    images = torch.tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    rows = [
        (index[q["image_id"]], q["question"], notes[q["question_id"]]["multiple_choice_answer"],
         notes[q["question_id"]]["question_type"])
        for q in questions
    ]  # fmt: skip
    return images, rows


def norm(kind: str, channels: int) -> nn.Module:
    return {
        "bn": lambda: nn.BatchNorm2d(channels),
        "gn": lambda: nn.GroupNorm(8, channels),
        "ln": lambda: nn.GroupNorm(1, channels),
        "none": nn.Identity,
    }[kind]()


class Encoder(nn.Module):
    """Image -> (batch, tokens, WIDTH)."""

    def __init__(self, kind: str, norm_kind: str, size: int, patch: int):
        super().__init__()
        self.kind = kind
        if kind == "gpt2mm":
            from gpt2mm.config import MultimodalGPT2Config
            from gpt2mm.modeling import MultimodalGPT2ForConditionalGeneration

            cfg = MultimodalGPT2Config.from_preset(
                "tiny", vision_stem="cnn", vision_config={"patch_size": patch, "image_size": size},
                vision_feature_layer=0,
            )  # fmt: skip
            model = MultimodalGPT2ForConditionalGeneration(cfg)
            self.tower, self.projector = model.vision_tower, model.projector
            self.vision_states = model.get_vision_hidden_states
            return
        if kind in ("patch", "patch-frozen"):
            self.stem = nn.Conv2d(3, WIDTH, 8, 8)
            self.stem.requires_grad_(kind == "patch")
        elif kind == "conv":
            from gpt2mm.layers import ConvStem

            self.stem = ConvStem(3, WIDTH, 8)
        elif kind == "cnn":
            w = WIDTH // 4
            layers: list[nn.Module] = []
            for c_in, c_out, pool in (
                (3, w, True),
                (w, 2 * w, True),
                (2 * w, 4 * w, False),
                (4 * w, 4 * w, True),
            ):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), norm(norm_kind, c_out), nn.GELU()]
                layers += [nn.MaxPool2d(2)] if pool else []
            self.stem = nn.Sequential(*layers, nn.Conv2d(4 * w, WIDTH, 1))
        else:
            raise SystemExit(f"--enc {kind!r}: unknown")
        self.position = nn.Parameter(torch.randn(1, (size // 8) ** 2, WIDTH) * 0.02)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "gpt2mm":
            return self.projector(self.vision_states(images))
        return self.norm(self.stem(images).flatten(2).transpose(1, 2) + self.position)


class Learner(nn.Module):
    def __init__(self, args, n_questions: int, n_answers: int):
        super().__init__()
        self.encoder = Encoder(args.enc, args.norm, args.size, args.patch)
        self.question = nn.Embedding(n_questions, WIDTH)
        self.lm = args.lm
        if args.lm.startswith("gpt2"):
            from transformers import GPT2Config, GPT2Model

            self.blocks = GPT2Model(
                GPT2Config(vocab_size=8, n_positions=128, n_embd=WIDTH, n_layer=4, n_head=4, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0)
            )  # fmt: skip
            if "noln" in args.lm:
                self.blocks.ln_f = nn.Identity()
            if "torchinit" in args.lm:
                from gpt2mm.modeling import init_like_linear

                init_like_linear(self.blocks)
        elif args.lm.startswith("encoder"):
            layer = nn.TransformerEncoderLayer(
                WIDTH, 4, 4 * WIDTH, 0.0, "gelu", batch_first=True, norm_first=True
            )
            final = nn.LayerNorm(WIDTH) if args.lm == "encoder-ln" else None
            self.blocks = nn.TransformerEncoder(layer, 4, norm=final, enable_nested_tensor=False)
            if args.lm == "encoder-0.02":
                for p in self.blocks.parameters():
                    if p.ndim == 2:
                        nn.init.normal_(p, std=0.02)
        else:
            raise SystemExit(f"--lm {args.lm!r}: unknown")
        self.head = nn.Linear(WIDTH, n_answers)

    def forward(self, images: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.encoder(images), self.question(questions)[:, None]], 1)
        if self.lm.startswith("gpt2"):
            hidden = self.blocks(inputs_embeds=tokens).last_hidden_state
        elif self.lm == "encoder-causal":
            mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
            hidden = self.blocks(tokens, mask=mask, is_causal=True)
        else:
            hidden = self.blocks(tokens)
        return self.head(hidden[:, -1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="data/digits/vqa")
    p.add_argument("--enc", default="gpt2mm")
    p.add_argument("--norm", default="bn", choices=("bn", "gn", "ln", "none"))
    p.add_argument("--lm", default="encoder")
    p.add_argument("--patch", type=int, default=8, help="patch size of --enc gpt2mm (the others use 8)")
    p.add_argument("--size", type=int, default=48, help="image side (the tiny preset's 48)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    train_images, train_rows = load_split(args.root, "train", args.size)
    test_images, test_rows = load_split(args.root, "test", args.size)
    question_ids = {q: i for i, q in enumerate(sorted({r[1] for r in train_rows}))}
    answers = sorted({r[2] for r in train_rows})
    answer_ids = {a: i for i, a in enumerate(answers)}
    model = Learner(args, len(question_ids), len(answers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
        ),
    )
    image_of = torch.tensor([r[0] for r in train_rows])
    question_of = torch.tensor([question_ids[r[1]] for r in train_rows])
    answer_of = torch.tensor([answer_ids[r[2]] for r in train_rows])

    @torch.no_grad()
    def evaluate() -> tuple[float, dict[str, float]]:
        model.eval()
        right: dict[str, list[bool]] = {}
        for k in range(0, len(test_rows), 250):
            rows = test_rows[k : k + 250]
            logits = model(
                test_images[[r[0] for r in rows]], torch.tensor([question_ids.get(r[1], 0) for r in rows])
            )
            for r, guess in zip(rows, logits.argmax(-1).tolist()):
                right.setdefault(r[3], []).append(answers[guess] == r[2])
        model.train()
        total = sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())
        return round(100 * total, 2), {k: round(100 * sum(v) / len(v), 1) for k, v in right.items()}

    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(1, args.steps + 1):
        pick = torch.randint(len(train_rows), (32,), generator=generator)
        loss = F.cross_entropy(model(train_images[image_of[pick]], question_of[pick]), answer_of[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == args.steps:
            accuracy, families = evaluate()
            print(
                f"step {step} {time.time() - start:.0f}s loss {loss.item():.3f} test {accuracy} {families}",
                flush=True,
            )


if __name__ == "__main__":
    main()
