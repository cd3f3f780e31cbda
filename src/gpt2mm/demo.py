"""`gpt2mm demo [--out DIR]`: the offline main job, on a fresh machine with no GPU and no network.

    gpt2mm demo --out demo-out                  # about 15 minutes on 2 CPU cores
    gpt2mm demo --out demo-out --minutes 3      # a quicker, weaker run
    gpt2mm demo --stages sft,ppo,instruct       # all three stages in the same budget (a third, a fifth for 2, 3)

It renders the synthetic shapes world, builds the `tiny` preset and its tokenizer (trained in-process),
trains stage 1 from scratch with the answer-only loss, evaluates on the held-out test split with the
official VQA metric, answers a few test questions (printing question, answer and truth; the images are
saved next to them), plots the learning curve and writes `DIR/summary.json`. With `--stages sft,ppo` it
then runs stage 2 (PPO with the VQA-accuracy reward, `gpt2mm.rl.ppo`) from the stage-1 model and scores it
the same way; with `instruct`, stage 3 on the world's LLaVA conversations (detailed descriptions), scoring
the descriptions of test images against their scenes. Each stage's numbers go into the summary
(`sft_test_accuracy`, `ppo_test_accuracy`, `instruct_test_accuracy`, `instruct_description_scores`);
`test_accuracy` is the last stage's.

The recipe, and why (measured on the 2-core machine; see README "The demo"):
- the vision tower stays at its random initialisation (`vision_lr: 0`): a random ViT with 16 px patches
  already separates colours and shapes per cell, while training it jointly from scratch with AdamW wiped
  that signal out before the language model learnt to read it (the loss stayed at the answer prior);
- the language model reads the vision tower's patch embeddings (`vision_feature_layer: 0`): per cell, a
  random linear projection of its pixels, not yet mixed with the other cells by random attention layers;
- questions about one image are packed into one multi-turn sample (`pack_questions: 8`): the image is
  encoded once for 8 answers, and the prompt of each answer is still the stage-1 format;
- a curriculum on the number of objects (`curriculum_steps: 1000`): batches start with one-object scenes
  and widen to all scenes by step 1000; without it the model sat on a plateau near 44% (the answer prior
  of most families) for thousands of steps;
- cosine decay of the learning rate over the time budget;
- the world's conversations mixed in (`conversation_mix`), each with its detailed description after its
  questions: a dense target naming every object's position ("where is ..." 34% -> 88%);
- twice the steps in the same time (`fast_settings`, and in the model: the vision tower runs only up to the
  layer it is read at, GPT-2's tanh GELU is one fused kernel): bf16 autocast where the CPU has it, eager
  attention. The questions that find an object by its shape ("what color is the circle?", "how many
  circles?") are learnt late, after 2,000-3,000 steps; with the extra steps the test accuracy went from
  83-85.5% to 94%.
Simplifications: one fixed seed; the time budget covers the whole demo, training gets what is left.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from gpt2mm.errors import UsageError

STAGES = ("sft", "ppo", "instruct")
VQA_MIX = 10_000  # stage 3: VQA questions mixed into the 10,000 conversations (data.vqa_mix)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("demo-out"), help="directory for everything it writes"
    )
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget of the whole demo")
    parser.add_argument(
        "--stages", default="sft", help="comma-separated: sft (stage 1), ppo (stage 2), instruct (stage 3)"
    )
    parser.add_argument(
        "--ppo-minutes", type=float, default=None, help="of the budget, for stage 2 (default: a third of it)"
    )
    parser.add_argument(
        "--instruct-minutes",
        type=float,
        default=None,
        help="of the budget, for stage 3 (default: a fifth of it)",
    )
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages or stages[0] != "sft":
        raise UsageError(f"--stages takes sft first, then any of ppo, instruct; got {args.stages!r}")
    if len(set(stages)) != len(stages) or stages != sorted(stages, key=STAGES.index):
        raise UsageError(
            f"--stages runs each stage once, in the order sft, ppo, instruct; got {args.stages!r}"
        )
    ppo_minutes, instruct_minutes = stage_minutes(args, stages)
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise UsageError(f"{out} is not empty; pass --overwrite to replace an earlier demo there")
        if not (out / "summary.json").is_file() and not (out / "world" / "world.json").is_file():
            raise UsageError(f"{out} holds files that are not a demo's; refusing to overwrite them")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from gpt2mm.data.synthetic import write_world

    torch.set_num_threads(max(1, torch.get_num_threads()))
    # 1. the world
    world = out / "world"
    print(f"[demo] rendering the synthetic world into {world}")
    manifest = write_world(
        world,
        n_train=args.train_images,
        n_val=100,
        n_test=args.test_images,
        seed=args.seed,
        questions_per_image=8,
    )
    blind = manifest["blind_accuracy"]
    blind_pct = 100.0 * (blind["overall"] if isinstance(blind, dict) else blind)
    print(f"[demo] blind (question-only) accuracy on the test split: {blind_pct:.1f}%")

    # 2. stage 1 from scratch, within what is left of the budget
    from gpt2mm.train.args import build
    from gpt2mm.train.config import SFTConfig
    from gpt2mm.train.sft import SFTTrainer

    eval_reserve = 60.0 * len(stages)  # seconds kept for each stage's test evaluation, examples and plot
    budget_min = max(
        0.5,
        (args.minutes * 60 - (time.perf_counter() - start) - eval_reserve) / 60
        - ppo_minutes
        - instruct_minutes,
    )
    fast = fast_settings()
    cfg = build(
        SFTConfig,
        {
            "model": {
                "preset": "tiny",
                "overrides": {"vision_feature_layer": 0},
                "attn_implementation": fast["attn_implementation"],
            },
            "data": {
                "root": str(world),
                "val_limit": 400,
                "pack_questions": 8,
                "conversation_mix": True,  # + each image's conversation, its description after the questions
                "max_length": 192,
                "difficulty": "objects",
            },
            "train": {
                "output_dir": str(out / "run"),
                "seed": args.seed,
                "max_steps": 100_000,  # the time budget ends training
                "max_minutes": budget_min,
                "schedule": "cosine",  # decays over the time budget
                "min_lr_ratio": 0.1,
                "batch_size": 32,
                "lr": 1e-3,
                "vision_lr": 0.0,
                "precision": fast["precision"],
                "warmup_steps": 100,
                "curriculum_steps": 1000,
                "eval_every": 400,
                "save_every": 0,
                "log_every": 25,
                "log_with": [],
            },
        },
    )
    print(f"[demo] training stage 1 for up to {budget_min:.1f} minutes")
    run_ = SFTTrainer(cfg, log=lambda m: print(f"[demo] {m}"))
    train_summary = run_.train()

    # 3. the held-out test split, official metric
    model = run_.acc.unwrap_model(run_.model)
    summary = evaluate_and_report(model, run_.processor, run_.pixels, run_.image_key, world, out)
    summary["sft_test_accuracy"] = summary["test_accuracy"]
    print(f"[demo] stage 1 test accuracy {summary['test_accuracy']:.2f}%")

    # 4. stage 2: PPO on answer correctness, from the stage-1 model
    if "ppo" in stages:
        ppo_summary, trainer = run_ppo(out, world, args.seed, ppo_minutes)
        ppo_scores = evaluate_and_report(
            trainer.policy, trainer.processor, trainer.pixels, "pixel_values", world, out, tag="ppo_"
        )
        summary.update(
            {
                "ppo_test_accuracy": ppo_scores["test_accuracy"],
                "ppo_test_accuracy_per_answer_type": ppo_scores["test_accuracy_per_answer_type"],
                "ppo_updates": ppo_summary["steps"],
                "ppo_train_seconds": ppo_summary["train_seconds"],
                "ppo_final_kl": ppo_summary["final"].get("kl"),
                "ppo_final_reward": ppo_summary["final"].get("reward"),
                "test_accuracy": ppo_scores["test_accuracy"],
            }
        )
        print(
            f"[demo] stage 2 (PPO) test accuracy {ppo_scores['test_accuracy']:.2f}% "
            f"(stage 1: {summary['sft_test_accuracy']:.2f}%), KL to stage 1 {summary['ppo_final_kl']:.3f}"
        )
    # 5. stage 3: conversations with long descriptions (the world's LLaVA JSON), from the last stage's model
    if "instruct" in stages:
        from gpt2mm.train.checkpoints import list_checkpoints

        init = list_checkpoints(out / ("ppo" if "ppo" in stages else "run"))[-1]
        summary.update(run_instruct(out, world, args.seed, instruct_minutes, init))
        summary["test_accuracy"] = summary["instruct_test_accuracy"]
    summary.update(
        {
            "blind_accuracy": round(blind_pct, 2),
            "train_seconds": train_summary["train_seconds"],
            "samples_seen": train_summary["samples_seen"],
            "steps": train_summary["steps"],
            "total_seconds": round(time.perf_counter() - start, 1),
            "stages": stages,
            "recipe": cfg.train.__dict__
            | {
                "pack_questions": cfg.data.pack_questions,
                "attn_implementation": cfg.model.attn_implementation,
            },
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"[demo] test accuracy {summary['test_accuracy']:.2f}% (blind {blind_pct:.1f}%), "
        f"{summary['samples_seen']} samples in {summary['train_seconds']:.0f} s of training, "
        f"{summary['total_seconds']:.0f} s in all -> {out / 'summary.json'}"
    )
    return 0


def stage_minutes(args: argparse.Namespace, stages: list[str]) -> tuple[float, float]:
    """The minutes of stages 2 and 3 (0 for a stage not run): as given, or a third and a fifth of --minutes
    (5 and 3 of 15). Stage 1 gets the rest."""
    if not args.minutes > 0:
        raise UsageError(f"--minutes must be positive, got {args.minutes}")
    minutes = {}
    for stage, given, share in (("ppo", args.ppo_minutes, 1 / 3), ("instruct", args.instruct_minutes, 1 / 5)):
        flag = f"--{stage}-minutes"
        if given is not None and stage not in stages:
            raise UsageError(f"{flag} is for stage {stage}, which --stages {args.stages!r} does not run")
        if given is not None and given < 0:
            raise UsageError(f"{flag} must be 0 or more, got {given}")
        minutes[stage] = 0.0 if stage not in stages else share * args.minutes if given is None else given
    if sum(minutes.values()) >= args.minutes:  # never with the default shares
        raise UsageError(
            f"--ppo-minutes and --instruct-minutes must leave part of --minutes ({args.minutes}) to stage 1; "
            f"got {minutes['ppo']} and {minutes['instruct']}"
        )
    return minutes["ppo"], minutes["instruct"]


def fast_settings() -> dict[str, str | None]:
    """Precision and attention kernel for this machine's training steps. On a CPU: bf16 autocast where the
    CPU multiplies bf16 natively (AVX512-BF16 or AMX; elsewhere it would be emulated), and transformers'
    eager attention, since at these lengths (~150 tokens) the CPU flash-attention kernel's bf16 backward took
    45% of a step. Measured on the project machine (demo batches, 2 cores): 206 ms a step before (fp32, SDPA),
    174 ms with the fused GELU, 160 ms bf16 + SDPA, 99 ms bf16 + eager; bf16 reached fp32's test accuracy
    (72.5% vs 72.8% after 1,500 steps). With a GPU: bf16 where supported, SDPA."""
    import torch

    if torch.cuda.is_available():
        return {
            "precision": "bf16" if torch.cuda.is_bf16_supported() else "fp32",
            "attn_implementation": None,
        }
    native = [
        getattr(torch.cpu, f, lambda: False) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return {
        "precision": "bf16" if any(check() for check in native) else "fp32",
        "attn_implementation": "eager",
    }


def run_ppo(out: Path, world: Path, seed: int, minutes: float):
    """Stage 2 from the stage-1 model just trained: PPO with the VQA-accuracy reward (configs/tiny-ppo.yaml's
    recipe) for `minutes` of training time."""
    from gpt2mm.rl.ppo import PPORecipe, PPOTrainer
    from gpt2mm.train.args import build
    from gpt2mm.train.checkpoints import list_checkpoints

    init = list_checkpoints(out / "run")[-1]  # the final stage-1 weights
    cfg = build(
        PPORecipe,
        {
            "model": {"init_from": str(init)},
            "data": {"root": str(world), "val_limit": 400},
            "rollout": {"prompts": 64, "max_new_tokens": 8},
            "train": {
                "output_dir": str(out / "ppo"),
                "seed": seed,
                "max_steps": 100_000,  # the time budget ends training
                "max_minutes": minutes,
                "lr": 3e-5,
                "value_lr": 1e-3,
                "eval_every": 0,
                "save_every": 0,
                "log_with": [],
            },
        },
    )
    print(f"[demo] stage 2: PPO from {init} for up to {minutes:.1f} minutes")
    trainer = PPOTrainer(cfg, log=lambda m: print(f"[demo] {m}"))
    return trainer.train(), trainer


def run_instruct(out: Path, world: Path, seed: int, minutes: float, init: Path) -> dict:
    """Stage 3 from `init`: the world's LLaVA conversations (a detailed description, then questions), loss on
    the assistant turns, for `minutes` of training time. Scores the descriptions of test images (object
    precision / recall / F1 against the scene records) before and after, and the VQA test accuracy after."""
    from gpt2mm.eval.report import description_samples, generate_descriptions, score_descriptions
    from gpt2mm.loading import load_model
    from gpt2mm.train.args import build
    from gpt2mm.train.config import SFTConfig
    from gpt2mm.train.sft import SFTTrainer

    fast = fast_settings()  # as stage 1
    d_samples, scenes = description_samples(world, "test", limit=100)
    before_model, before_processor = load_model(init)
    before = score_descriptions(generate_descriptions(before_model, before_processor, d_samples), scenes)
    del before_model
    cfg = build(
        SFTConfig,
        {
            "model": {"init_from": str(init), "attn_implementation": fast["attn_implementation"]},
            "data": {
                "root": str(world),
                "synth": False,
                "format": "llava",
                "vqa_mix": VQA_MIX,  # keeps stage 1's short answers (without: VQA accuracy fell to 8%)
                "max_length": 256,
            },
            "train": {
                "output_dir": str(out / "instruct"),
                "seed": seed,
                "max_steps": 100_000,  # the time budget ends training
                "max_minutes": minutes,
                "schedule": "cosine",
                "min_lr_ratio": 0.1,
                "batch_size": 16,
                "lr": 5e-4,
                "vision_lr": 0.0,
                "precision": fast["precision"],
                "warmup_steps": 20,
                "eval_every": 0,
                "save_every": 0,
                "log_every": 25,
                "log_with": [],
            },
        },
    )
    print(f"[demo] stage 3: conversations from {init} for up to {minutes:.1f} minutes")
    run_ = SFTTrainer(cfg, log=lambda m: print(f"[demo] {m}"))
    done = run_.train()
    model = run_.acc.unwrap_model(run_.model)
    texts = generate_descriptions(model, run_.processor, d_samples)
    after = score_descriptions(texts, scenes)
    vqa = evaluate_and_report(model, run_.processor, run_.pixels, run_.image_key, world, out, tag="instruct_")
    print(
        f"[demo] stage 3: description F1 {after['f1']:.1f}% (before {before['f1']:.1f}%), VQA test accuracy "
        f"{vqa['test_accuracy']:.2f}%; e.g. {texts[0]!r}"
    )
    return {
        "instruct_test_accuracy": vqa["test_accuracy"],
        "instruct_description_scores": after,
        "description_scores_before_instruct": before,
        "instruct_description_example": texts[0],
        "instruct_steps": done["steps"],
        "instruct_train_seconds": done["train_seconds"],
    }


def evaluate_and_report(
    model, processor, pixels, image_key: str, world: Path, out: Path, tag: str = ""
) -> dict:
    """Test accuracy with the official metric, a few printed answers with their images, the plot.
    Files get the prefix `tag` (stage 2 writes `ppo_test_results.json`)."""
    from gpt2mm.data.images import load_image
    from gpt2mm.data.vqa import load_vqa
    from gpt2mm.eval.evaluate import answer_questions
    from gpt2mm.eval.vqa_files import load_annotations, load_questions
    from gpt2mm.eval.vqa_metric import evaluate
    from gpt2mm.train.plot import plot_run, read_metrics

    samples, _ = load_vqa(
        world / "test_questions.json", world / "test_annotations.json", world / "images" / "test"
    )
    t0 = time.perf_counter()
    answers = answer_questions(model, processor, samples, 256, pixels, image_key=image_key)
    seconds = time.perf_counter() - t0
    results = [{"question_id": s.question_id, "answer": a} for s, a in zip(samples, answers)]
    (out / f"{tag}test_results.json").write_text(json.dumps(results))
    scores = evaluate(
        load_questions(world / "test_questions.json"),
        load_annotations(world / "test_annotations.json"),
        results,
    )
    summary = {
        "test_accuracy": scores["overall"],
        "test_accuracy_per_answer_type": scores["perAnswerType"],
        "test_accuracy_per_question_type": scores["perQuestionType"],
        "test_questions": len(samples),
        "test_answers_per_s": round(len(samples) / seconds, 1),
    }
    if tag:  # a later stage: the numbers only
        return summary
    examples_dir = out / "examples"
    examples_dir.mkdir(exist_ok=True)
    examples = []
    for s, a in list(zip(samples, answers))[:: max(1, len(samples) // 8)][:8]:
        name = f"{s.question_id}.png"
        load_image(s.image).save(examples_dir / name)
        truth = s.turns[1].text
        print(f"[demo] {name}: Q: {s.turns[0].text}  A: {a}  (truth: {truth})")
        examples.append(
            {"image": f"examples/{name}", "question": s.turns[0].text, "answer": a, "truth": truth}
        )
    png = plot_run(out / "run", out / "curves.png")
    curve = [
        {"step": r["step"], "train_seconds": r["train_seconds"], "val_accuracy": r["val_accuracy"]}
        for r in read_metrics(out / "run")
        if "val_accuracy" in r
    ]
    return summary | {"learning_curve": curve, "examples": examples, "plot": png.name}
