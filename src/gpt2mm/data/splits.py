"""The samples a recipe's `data:` section names: its training and validation splits (VQA files, a Hugging Face
dataset, the seed's CSV or LLaVA conversations, mixed as the recipe says), packing several questions about one image into one sample, and the
difficulty a curriculum sorts by."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2mm.data.samples import IMAGE_PLACEHOLDER
from gpt2mm.errors import UsageError

if TYPE_CHECKING:
    from gpt2mm.train.config import DataConfig, QuestionDataConfig, VQADataConfig


def resolve(root: str, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


def split_location(cfg: QuestionDataConfig, split: str) -> str:
    """Where the recipe's `split` (train or val) is read from, for messages."""
    train = split == "train"
    if cfg.format == "hf":
        return f"{cfg.hf_dataset} split {cfg.hf_train_split if train else cfg.hf_val_split}"
    if cfg.format == "csv":
        return str(resolve(cfg.root, cfg.csv_train if train else cfg.csv_val))
    if train and cfg.format == "llava":
        return str(resolve(cfg.root, cfg.llava_train))
    return str(resolve(cfg.root, cfg.train_questions if train else cfg.val_questions))


def has_split(cfg: QuestionDataConfig, split: str) -> bool:
    """Whether the recipe's data has `split` (train or val) on disk (a Hugging Face dataset: whether a split
    is named; a missing one is an error when it is loaded)."""
    if cfg.format == "hf":
        return split == "train" or cfg.hf_val_split is not None
    if cfg.format == "csv":
        return resolve(cfg.root, cfg.csv_train if split == "train" else cfg.csv_val).is_file()
    if split == "train" and cfg.format == "llava":
        return resolve(cfg.root, cfg.llava_train).is_file()
    return resolve(cfg.root, cfg.train_questions if split == "train" else cfg.val_questions).is_file()


def load_samples(cfg: QuestionDataConfig, split: str) -> tuple[list, str]:
    """Training or validation samples of the recipe's format (`DataConfig`'s: LLaVA too); returns (samples,
    load report summary). `data.limit` / `val_limit` cap them."""
    limit = cfg.limit if split == "train" else cfg.val_limit
    if cfg.format in ("hf", "csv"):
        samples, report = (
            load_hf_split(cfg, split, limit) if cfg.format == "hf" else load_csv_split(cfg, split, limit)
        )
        return samples, report.summary()
    if split == "train" and cfg.format == "llava":
        samples, summary = load_conversations(cfg)
        if cfg.vqa_mix:  # LLaVA-1.5's remedy for forgetting short answers: VQA samples in the same stream
            vqa, vqa_summary = load_vqa_split(cfg, "train", None if cfg.vqa_mix == -1 else cfg.vqa_mix)
            samples, summary = samples + vqa, f"{summary}; mixed in {vqa_summary}"
        return samples, summary
    return load_vqa_split(cfg, split, limit)


def load_first_exchanges(cfg: QuestionDataConfig, limit: int | None):
    """The LLaVA records of `data.llava_val` cut to their first exchange: the first user turn (with its
    images) to answer, the first reply as the reference (what `gpt2mm eval` scores, by exact match).
    Returns (samples, load report)."""
    from gpt2mm.data.llava import load_llava

    samples, report = load_llava(
        resolve(cfg.root, cfg.llava_val),
        resolve(cfg.root, cfg.llava_images),
        limit=limit,
        skip_bad=cfg.skip_bad,
    )
    for s in samples:
        per_turn = [t.text.count(IMAGE_PLACEHOLDER) for t in s.turns if t.role == "user"]
        if s.more_images and sum(per_turn):  # images stand where their placeholders do: the first turn's only
            first = s.images[: per_turn[0]]
            s.image, s.more_images = (first[0] if first else None), first[1:]
        s.turns = s.turns[:2]
    return samples, report


def hf_source(cfg: QuestionDataConfig) -> str | Path:
    """`data.hf_dataset` as a path under `data.root` when one is there, else as written (a hub id)."""
    path = resolve(cfg.root, cfg.hf_dataset)
    return path if path.exists() else cfg.hf_dataset


def load_hf_split(cfg: QuestionDataConfig, split: str, limit: int | None):
    """A split of the Hugging Face dataset `data.hf_dataset` (a save_to_disk folder, data files or a hub id),
    its columns mapped by `hf_columns`, read row by row when `hf_streaming`."""
    from gpt2mm.data.sources import load_hf
    from gpt2mm.errors import DataError

    source = hf_source(cfg)
    try:
        return load_hf(
            source,
            columns=cfg.hf_columns or None,
            split=cfg.hf_train_split if split == "train" else cfg.hf_val_split,
            image_cache=resolve(cfg.root, cfg.hf_image_cache),
            image_root=cfg.root,
            limit=limit,
            skip_bad=cfg.skip_bad,
            config=cfg.hf_config,
            streaming=cfg.hf_streaming,
        )
    except DataError as e:
        if isinstance(source, Path):
            raise
        raise DataError(
            f"no {resolve(cfg.root, cfg.hf_dataset)}, so data.hf_dataset was tried as a hub id: {e}"
        ) from None


def load_csv_split(cfg: QuestionDataConfig, split: str, limit: int | None):
    """The seed's CSV of `split` (rows of image path, "Q: ... A: ..."; images relative to the CSV's folder)."""
    from gpt2mm.data.sources import load_csv

    return load_csv(
        resolve(cfg.root, cfg.csv_train if split == "train" else cfg.csv_val),
        limit=limit,
        skip_bad=cfg.skip_bad,
    )


def load_conversations(cfg: DataConfig, first_exchange_last: bool = False) -> tuple[list, str]:
    """The LLaVA training conversations; `first_exchange_last` moves each one's first exchange (user turn and
    reply) to its end."""
    from gpt2mm.data.llava import load_llava

    samples, report = load_llava(
        resolve(cfg.root, cfg.llava_train), resolve(cfg.root, cfg.llava_images), skip_bad=cfg.skip_bad
    )
    samples = samples[: cfg.limit] if cfg.limit else samples
    if first_exchange_last:
        for s in samples:
            if not s.more_images:  # several images stand in their turns: moving turns would move them
                s.turns = s.turns[2:] + s.turns[:2]
    return samples, report.summary()


def load_vqa_split(cfg: VQADataConfig, split: str, limit: int | None) -> tuple[list, str]:
    """The official-format VQA files of `split` (train or val) under `cfg.root`; `cfg.answer_mode`, where the
    config has it, picks each question's training answer (default: VQA's multiple-choice answer)."""
    from gpt2mm.data.vqa import load_vqa

    q, a, im = (
        (cfg.train_questions, cfg.train_annotations, cfg.train_images)
        if split == "train"
        else (
            cfg.val_questions,
            cfg.val_annotations,
            cfg.val_images,
        )
    )
    samples, report = load_vqa(
        resolve(cfg.root, q),
        resolve(cfg.root, a),
        resolve(cfg.root, im),
        answer_mode=getattr(cfg, "answer_mode", "multiple_choice"),
        limit=limit,
        skip_bad=cfg.skip_bad,
        seed=0,
        image_pattern=cfg.image_pattern,
    )
    return samples, report.summary()


DIFFICULTIES = ("objects", "answer_length", "question_length")


def set_difficulty(samples: list, cfg: DataConfig, split: str) -> None:
    """Difficulty for a curriculum. `answer_length` and `question_length` (in words, over a sample's turns)
    work on any data set; `objects` reads the synthetic world's scene records (its scenes' object counts)."""
    if cfg.difficulty not in DIFFICULTIES:
        raise UsageError(f"data.difficulty must be one of {', '.join(DIFFICULTIES)}, got {cfg.difficulty!r}")
    if cfg.difficulty != "objects":
        role = "assistant" if cfg.difficulty == "answer_length" else "user"
        for s in samples:
            s.difficulty = max(len(t.text.split()) for t in s.turns if t.role == role)
        return
    path = resolve(cfg.root, f"scenes/{split}_scenes.json")
    if not path.is_file():
        raise UsageError(f"data.difficulty: objects needs the synthetic world's {path}")
    scenes = json.loads(path.read_text())
    by_id = {scene["image_id"]: len(scene["objects"]) for scene in scenes}
    by_file = {scene["file_name"]: len(scene["objects"]) for scene in scenes}  # LLaVA records: no image id
    for s in samples:
        s.difficulty = (
            by_id.get(s.image_id) if s.image_id is not None else by_file.get(Path(s.image or "").name)
        )


def pack_by_image(samples: list, k: int, seed: int) -> list:
    """Questions about the same image as multi-turn samples of up to `k` Q/A pairs (the image is encoded
    once for k answers). The prompt format is the conversation format, whose first turn is stage 1's.
    Samples without an image or with several, and conversations (more than one exchange: a LLaVA record mixed
    with VQA questions), are left as they are."""
    from gpt2mm.data.samples import Sample

    by_image: dict[Any, list] = {}
    for s in samples:
        single = len(s.images) == 1 and len(s.turns) == 2
        by_image.setdefault(s.image if single else None, []).append(s)
    rng = random.Random(seed)
    packed = []
    for image, group in by_image.items():
        if image is None:
            packed += group
            continue
        rng.shuffle(group)
        for start in range(0, len(group), k):
            chunk = group[start : start + k]
            turns = [t for s in chunk for t in s.turns]
            packed.append(
                Sample(
                    id="+".join(s.id for s in chunk),
                    image=image,
                    turns=turns,
                    image_id=chunk[0].image_id,
                    difficulty=_hardest(s.difficulty for s in chunk),
                )
            )
    return packed


def _hardest(levels) -> float | None:
    """A packed sample's difficulty: its hardest question's (None when any has none)."""
    levels = list(levels)
    return None if any(x is None for x in levels) else max(levels)


def ensure_synthetic_world(root: Path, synth_args: dict, log=print, write: bool = True) -> None:
    """Render the synthetic world into `root` unless it is there; a folder holding other files, or a world
    rendered with other arguments (another layout, say), is refused (checked by every process of a run;
    `write` on the main one only)."""
    from gpt2mm.data.synthetic import world_mismatch, world_params, write_world

    try:
        wanted = world_params(**synth_args)
    except TypeError as e:
        raise UsageError(f"data.synth_args: {e}") from None
    if (root / "world.json").is_file():
        try:
            differ = world_mismatch(root, wanted)
        except (ValueError, KeyError, TypeError) as e:  # not JSON, or not a world's manifest
            raise UsageError(
                f"data.root {root}: world.json is not a synthetic world's manifest ({e})"
            ) from None
        if differ:
            name, written, asked = differ
            raise UsageError(
                f"data.root {root} holds a synthetic world with {name} {written!r} where data.synth_args asks "
                f"for {asked!r}; give another --data.root, --data.synth false to train on it as it is, or "
                "remove that folder to render it again"
            )
        return
    if root.exists() and any(root.iterdir()):
        raise UsageError(
            f"data.root {root} holds files but no synthetic world (world.json); "
            "for your own data set data.synth: false"
        )
    if not write:
        return
    log(f"rendering the synthetic world into {root}")
    write_world(root, **synth_args)
