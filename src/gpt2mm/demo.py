"""`gpt2mm demo [--out DIR]`: the offline main job, on a fresh machine with no GPU and no network.

    gpt2mm demo --out demo-out                  # about 15 minutes on 2 CPU cores
    gpt2mm demo --out demo-out --minutes 3      # a quicker, weaker run
    gpt2mm demo --stages sft,ppo,instruct       # all three stages in the same budget

It renders the synthetic shapes world, trains stage 1 from scratch (the `tiny` preset, its tokenizer trained
in-process, the answer-only loss), evaluates on the held-out test split with the official VQA metric, answers a
few test questions (printing question, answer and truth; the images are saved next to them), plots the learning
curve and writes `DIR/summary.json`. With `--stages sft,ppo` it then runs stage 2 (PPO with the VQA-accuracy
reward) from the stage-1 model and scores it the same way; with `instruct`, stage 3 on the world's LLaVA
conversations (detailed descriptions), scoring the descriptions of test images against their scenes. Each
stage's numbers go into the summary (`sft_test_accuracy`, `ppo_test_accuracy`, `instruct_test_accuracy`, each
with its breakdowns per answer and question type, and `instruct_description_scores`); `test_accuracy` and its
breakdowns are the last stage's.

The recipes are files, configs/demo-sft.yaml, demo-ppo.yaml and demo-instruct.yaml (their comments say why each
value), and `gpt2mm train configs/demo-sft.yaml` reproduces stage 1. The demo changes only where they write
(DIR/run, DIR/ppo, DIR/instruct; the world in DIR/world), the seed, the world's size (--train-images,
--test-images) and the time budgets. Simplifications: one fixed seed; the time budget covers the whole demo,
stage 1 gets what the world's rendering, the later stages and a minute of evaluation per stage leave.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from gpt2mm.errors import UsageError

STAGES = ("sft", "ppo", "instruct")
RECIPES = Path(__file__).resolve().parents[2] / "configs"  # the source checkout's recipes
# Seconds kept for each stage's start (its data read and encoded, its model built) and its test evaluation,
# examples and plot: about 10 s and 7 s for stage 1 on a 2-core AMD EPYC (bench/stage_setup.py; docs/experiments.md).
EVAL_RESERVE_S = 30.0


def _say(message: str) -> None:
    print(f"[demo] {message}")


# --- the recipes -------------------------------------------------------------------------------------------


def recipe_path(stage: str) -> Path:
    """configs/demo-STAGE.yaml (`sft`, `ppo` or `instruct`)."""
    path = RECIPES / f"demo-{stage}.yaml"
    if not path.is_file():
        raise UsageError(
            f"{path}: no such recipe; the demo runs the recipes in configs/ of a gpt2mm checkout"
        )
    return path


def world_args(args: argparse.Namespace) -> dict:
    """`write_world`'s arguments: the stage-1 recipe's data.synth_args, with the demo's image counts and seed."""
    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig

    synth = load_config(SFTConfig, recipe_path("sft"), []).data.synth_args
    layout = {"layout": args.layout} if getattr(args, "layout", None) else {}
    return synth | {"n_train": args.train_images, "n_test": args.test_images, "seed": args.seed} | layout


def sft_overrides(args: argparse.Namespace, out: Path, minutes: float) -> list[str]:
    """What the demo changes in configs/demo-sft.yaml: the world, the output folder, the seed, the time budget;
    and, when stage 3 follows, the schedule: stage 1 holds its peak rate (`constant` after the warmup) and
    stage 3 (configs/demo-instruct.yaml) decays from it, so the run's one decay is on the final data mix."""
    hold_peak = "instruct" in parse_stages(getattr(args, "stages", "sft"))
    return [
        "--data.root", str(out / "world"), "--data.synth_args", json.dumps(world_args(args)),
        "--train.output_dir", str(out / "run"), "--train.seed", str(args.seed),
        "--train.max_minutes", repr(minutes), *(["--train.schedule", "constant"] if hold_peak else []),
    ]  # fmt: skip


def later_overrides(out: Path, name: str, seed: int, minutes: float, init: Path) -> list[str]:
    """What the demo changes in configs/demo-ppo.yaml and demo-instruct.yaml: the starting checkpoint, the world,
    the output folder (DIR/`name`), the seed, the time budget."""
    return [
        "--model.init_from", str(init), "--data.root", str(out / "world"),
        "--train.output_dir", str(out / name), "--train.seed", str(seed), "--train.max_minutes", repr(minutes),
    ]  # fmt: skip


def sft_config(args: argparse.Namespace, out: Path, minutes: float):
    """Stage 1's config: configs/demo-sft.yaml with `sft_overrides`."""
    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig

    return load_config(SFTConfig, recipe_path("sft"), sft_overrides(args, out, minutes))


def ppo_config(out: Path, seed: int, minutes: float, init: Path):
    """Stage 2's config: configs/demo-ppo.yaml from `init`."""
    from gpt2mm.rl.ppo import PPORecipe
    from gpt2mm.train.args import load_config

    return load_config(PPORecipe, recipe_path("ppo"), later_overrides(out, "ppo", seed, minutes, init))


def instruct_config(out: Path, seed: int, minutes: float, init: Path):
    """Stage 3's config: configs/demo-instruct.yaml from `init`."""
    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig

    overrides = later_overrides(out, "instruct", seed, minutes, init)
    return load_config(SFTConfig, recipe_path("instruct"), overrides)


# --- the command ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """The whole demo: checks, the world, the stages asked for, the summary."""
    start = time.perf_counter()
    stages = parse_stages(args.stages)
    check_few_labels(args, stages)
    ppo_minutes, instruct_minutes = stage_minutes(args, stages)
    out: Path = args.out
    prepare_out(out, args.overwrite)

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    blind_pct = render_world(args, out)
    elapsed = time.perf_counter() - start
    budget_min = max(
        0.5,
        (args.minutes * 60 - elapsed - EVAL_RESERVE_S * len(stages)) / 60 - ppo_minutes - instruct_minutes,
    )
    few = getattr(args, "labelled_fraction", None) is not None
    if few:  # stage 2 from tags with a reward model, on unlabelled images, against two baselines
        from gpt2mm import few_labels

        summary, train_summary, cfg = few_labels.run(args, out, budget_min, ppo_minutes)
    else:
        summary, train_summary, cfg = run_sft(sft_config(args, out, budget_min), out)
    if "ppo" in stages and not few:
        summary.update(run_ppo(out, args.seed, ppo_minutes, summary["sft_test_accuracy"]))
    if "instruct" in stages:
        from gpt2mm.train.checkpoints import list_checkpoints

        init = list_checkpoints(out / ("ppo" if "ppo" in stages else "run"))[-1]
        deadline = None if args.instruct_minutes is not None else start + 60 * args.minutes
        summary.update(run_instruct(out, args.seed, instruct_minutes, init, deadline))
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
    _say(
        f"test accuracy {summary['test_accuracy']:.2f}% (blind {blind_pct:.1f}%), "
        f"{summary['samples_seen']} samples in {summary['train_seconds']:.0f} s of training, "
        f"{summary['total_seconds']:.0f} s in all -> {out / 'summary.json'}"
    )
    return 0


def parse_stages(given: str) -> list[str]:
    """`--stages`: sft first, then any of ppo, instruct, each once, in that order."""
    stages = [s.strip() for s in given.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages or stages[0] != "sft":
        raise UsageError(f"--stages takes sft first, then any of ppo, instruct; got {given!r}")
    if len(set(stages)) != len(stages) or stages != sorted(stages, key=STAGES.index):
        raise UsageError(f"--stages runs each stage once, in the order sft, ppo, instruct; got {given!r}")
    return stages


def check_few_labels(args: argparse.Namespace, stages: list[str]) -> None:
    """`--labelled-fraction` (with `--tags`, `--tag-noise`) runs the few-labels scenario: `--stages sft,ppo`."""
    fraction = getattr(args, "labelled_fraction", None)
    if fraction is None:
        given = [
            f"--{f}" for f in ("tags", "tag-noise") if getattr(args, f.replace("-", "_"), None) is not None
        ]
        if given:
            raise UsageError(f"{' and '.join(given)} go with --labelled-fraction (the few-labels scenario)")
        return
    if stages != ["sft", "ppo"]:
        raise UsageError(f"--labelled-fraction runs --stages sft,ppo; got {args.stages!r}")
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"--labelled-fraction must be between 0 and 1 (exclusive), got {fraction}")
    args.tags = 2000 if args.tags is None else args.tags
    args.tag_noise = 0.05 if args.tag_noise is None else args.tag_noise
    if args.tags < 1:
        raise UsageError(f"--tags must be at least 1, got {args.tags}")
    if not 0.0 <= args.tag_noise < 0.5:
        raise UsageError(f"--tag-noise must be in [0, 0.5), got {args.tag_noise}")


def stage_minutes(args: argparse.Namespace, stages: list[str]) -> tuple[float, float]:
    """The minutes of stages 2 and 3 (0 for a stage not run): as given, or shares of --minutes. Stage 3 gets
    three twentieths (2.25 of 15): it carries the run's learning-rate decay, about a fifth of the training time
    as in stage 1 alone. Stage 2 gets a tenth, a twentieth before stage 3 (the three-stage demo, 30 minutes on
    one core, one seed: 97.04% with these shares, 96.22% with a tenth each; docs/experiments.md). The
    few-labels demo (--labelled-fraction), whose subject is stage 2, gives stage 2 a third."""
    if not args.minutes > 0:
        raise UsageError(f"--minutes must be positive, got {args.minutes}")
    if getattr(args, "labelled_fraction", None) is not None:
        ppo_share = 1 / 3
    else:
        ppo_share = 1 / 20 if "instruct" in stages else 1 / 10
    minutes = {}
    for stage, given, share in (
        ("ppo", args.ppo_minutes, ppo_share),
        ("instruct", args.instruct_minutes, 3 / 20),
    ):
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


def prepare_out(out: Path, overwrite: bool) -> None:
    """An empty `out`; an earlier demo there is replaced only with --overwrite, anything else never."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"{out} is not empty; pass --overwrite to replace an earlier demo there")
        if not (out / "summary.json").is_file() and not (out / "world" / "world.json").is_file():
            raise UsageError(f"{out} holds files that are not a demo's; refusing to overwrite them")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def render_world(args: argparse.Namespace, out: Path) -> float:
    """The synthetic world in DIR/world (stage 1's data.synth_args); returns its blind accuracy, percent."""
    from gpt2mm.data.synthetic import write_world

    world = out / "world"
    _say(f"rendering the synthetic world into {world}")
    manifest = write_world(world, **world_args(args))
    blind = manifest["blind_accuracy"]
    blind_pct = 100.0 * (blind["overall"] if isinstance(blind, dict) else blind)
    _say(f"blind (question-only) accuracy on the test split: {blind_pct:.1f}%")
    return blind_pct


# --- the stages ----------------------------------------------------------------------------------------------


def run_sft(cfg, out: Path):
    """Stage 1 from scratch, then the test split with the official metric, examples and plot. Returns (the
    summary so far, the training summary, the config as it ran: `auto` resolved)."""
    from gpt2mm.train.sft import SFTTrainer

    _say(f"training stage 1 for up to {cfg.train.max_minutes:.1f} minutes")
    run_ = SFTTrainer(cfg, log=_say)
    train_summary = run_.train()
    model = run_.acc.unwrap_model(run_.model)
    summary = evaluate_and_report(model, run_.processor, run_.pixels, run_.image_key, out)
    summary |= stage_figures("sft", summary)
    _say(f"stage 1 test accuracy {summary['test_accuracy']:.2f}%")
    return summary, train_summary, run_.cfg


def run_ppo(out: Path, seed: int, minutes: float, sft_accuracy: float) -> dict:
    """Stage 2 from the stage-1 model just trained (its last checkpoint): PPO with the VQA-accuracy reward for
    `minutes` of training time, scored on the test split."""
    from gpt2mm.train.checkpoints import list_checkpoints

    init = list_checkpoints(out / "run")[-1]  # the final stage-1 weights
    cfg = ppo_config(out, seed, minutes, init)
    _say(f"stage 2: PPO from {init} for up to {minutes:.1f} minutes")
    summary = ppo_and_score(cfg, out)
    _say(
        f"stage 2 (PPO) test accuracy {summary['ppo_test_accuracy']:.2f}% "
        f"(stage 1: {sft_accuracy:.2f}%), KL to stage 1 {summary['ppo_final_kl']:.3f}"
    )
    return summary


def ppo_and_score(cfg, out: Path) -> dict:
    """Stage 2 as `cfg` says, then its test accuracy: the summary's `ppo_*` figures."""
    from gpt2mm.rl.ppo import PPOTrainer

    trainer = PPOTrainer(cfg, log=_say)
    done = trainer.train()
    scores = evaluate_and_report(
        trainer.policy, trainer.processor, trainer.pixels, "pixel_values", out, tag="ppo_"
    )
    return stage_figures("ppo", scores) | {
        "ppo_updates": done["steps"],
        "ppo_train_seconds": done["train_seconds"],
        "ppo_final_kl": done["final"].get("kl"),
        "ppo_final_reward": done["final"].get("reward"),
    }


def last_stage_minutes(minutes: float, deadline: float | None) -> float:
    """`minutes`, or what is left until `deadline` (a `time.perf_counter()` value) less the time kept for the
    stage's evaluation, if that is more."""
    if deadline is None:
        return minutes
    return max(minutes, (deadline - time.perf_counter() - EVAL_RESERVE_S) / 60)


def run_instruct(out: Path, seed: int, minutes: float, init: Path, deadline: float | None = None) -> dict:
    """Stage 3 from `init`: the world's LLaVA conversations (a detailed description, then questions) and stage
    1's packed questions (configs/demo-instruct.yaml), loss on the assistant turns, for `minutes` of training
    time, or until `deadline` if that is longer (`last_stage_minutes`): the last stage takes what the earlier
    stages' evaluations left unused. Scores the descriptions of test images (object precision / recall / F1
    against the scene records) before and after, and the VQA test accuracy after."""
    from gpt2mm.eval.report import description_samples, generate_descriptions, score_descriptions
    from gpt2mm.loading import load_model
    from gpt2mm.train.sft import SFTTrainer

    d_samples, scenes = description_samples(out / "world", "test", limit=100)
    before_model, before_processor = load_model(init)
    before = score_descriptions(generate_descriptions(before_model, before_processor, d_samples), scenes)
    del before_model
    minutes = last_stage_minutes(minutes, deadline)
    cfg = instruct_config(out, seed, minutes, init)
    _say(f"stage 3: conversations from {init} for up to {minutes:.1f} minutes")
    run_ = SFTTrainer(cfg, log=_say)
    done = run_.train()
    model = run_.acc.unwrap_model(run_.model)
    texts = generate_descriptions(model, run_.processor, d_samples)
    after = score_descriptions(texts, scenes)
    vqa = evaluate_and_report(model, run_.processor, run_.pixels, run_.image_key, out, tag="instruct_")
    _say(
        f"stage 3: description F1 {after['f1']:.1f}% (before {before['f1']:.1f}%), VQA test accuracy "
        f"{vqa['test_accuracy']:.2f}%; e.g. {texts[0]!r}"
    )
    return stage_figures("instruct", vqa) | {
        "instruct_description_scores": after,
        "description_scores_before_instruct": before,
        "instruct_description_example": texts[0],
        "instruct_steps": done["steps"],
        "instruct_train_seconds": done["train_seconds"],
    }


# --- evaluation ----------------------------------------------------------------------------------------------

STAGE_FIGURES = ("test_accuracy", "test_accuracy_per_answer_type", "test_accuracy_per_question_type")


def stage_figures(stage: str, scores: dict) -> dict:
    """A stage's test figures under its prefix (`ppo_test_accuracy`, ...) and unprefixed: the summary's
    `test_accuracy` and its breakdowns are always those of the last stage that ran, never a mix."""
    return {f"{stage}_{k}": scores[k] for k in STAGE_FIGURES} | {k: scores[k] for k in STAGE_FIGURES}


def evaluate_and_report(model, processor, pixels, image_key: str, out: Path, tag: str = "") -> dict:
    """Test accuracy with the official metric; for stage 1 (no `tag`) also a few printed answers with their
    images and the plot. Files get the prefix `tag` (stage 2 writes `ppo_test_results.json`)."""
    from gpt2mm.data.vqa import load_vqa
    from gpt2mm.eval.evaluate import answer_questions
    from gpt2mm.eval.vqa_files import load_annotations, load_questions
    from gpt2mm.eval.vqa_metric import evaluate

    world = out / "world"
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
    examples = write_examples(samples, answers, out)
    curve, png = learning_curve(out)
    return summary | {"learning_curve": curve, "examples": examples, "plot": png.name}


def write_examples(samples, answers, out: Path) -> list[dict]:
    """Eight test questions spread over the split: printed with answer and truth, images saved in DIR/examples."""
    from gpt2mm.data.images import load_image

    examples_dir = out / "examples"
    examples_dir.mkdir(exist_ok=True)
    examples = []
    for s, a in list(zip(samples, answers))[:: max(1, len(samples) // 8)][:8]:
        name = f"{s.question_id}.png"
        load_image(s.image).save(examples_dir / name)
        truth = s.turns[1].text
        _say(f"{name}: Q: {s.turns[0].text}  A: {a}  (truth: {truth})")
        examples.append(
            {"image": f"examples/{name}", "question": s.turns[0].text, "answer": a, "truth": truth}
        )
    return examples


def learning_curve(out: Path) -> tuple[list[dict], Path]:
    """Stage 1's validation accuracy over time (from its metrics) and its plot, DIR/curves.png."""
    from gpt2mm.train.plot import plot_run, read_metrics

    png = plot_run(out / "run", out / "curves.png")
    curve = [
        {"step": r["step"], "train_seconds": r["train_seconds"], "val_accuracy": r["val_accuracy"]}
        for r in read_metrics(out / "run")
        if "val_accuracy" in r
    ]
    return curve, png
