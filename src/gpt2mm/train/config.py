"""The recipe's dataclasses. `RunConfig` and `VQADataConfig` hold what every stage shares (the output folder,
step counts, schedule, evaluation, checkpoints, trackers; the VQA files); SFT (stages 1 and 3), PPO (stage 2)
and the reward trainer extend them. `gpt2mm.train.args` builds them from YAML and `--section.key value`."""

from __future__ import annotations

from dataclasses import dataclass, field

TRACKERS_HELP = "metrics trackers through accelerate: tensorboard, wandb, mlflow, ... ([] for none)"


@dataclass
class RunConfig:
    """What every training run has: where it writes, how long it runs, its schedule, evaluation and saving."""

    output_dir: str = "runs/demo-sft"
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "replace an earlier run in output_dir (its checkpoints, best, metrics) without --resume"
        },
    )
    seed: int = 0
    max_steps: int = 1000
    max_minutes: float | None = field(default=None, metadata={"help": "stop after this much training time"})
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 50
    schedule: str = field(
        default="cosine",
        metadata={
            "help": "cosine | linear | constant | wsd (constant, then linear over train.decay_fraction)"
        },
    )
    min_lr_ratio: float = 0.0
    decay_fraction: float = field(
        default=0.2, metadata={"help": "wsd: the last share of the run (after warmup) that decays"}
    )
    precision: str = field(
        default="fp32", metadata={"help": "fp32 | bf16 | fp16 | auto (SFT: bf16 where native, else fp32)"}
    )
    eval_every: int = 200
    eval_batch_size: int = 128
    save_every: int = 500
    keep_last: int = 2
    early_stopping_patience: int = field(default=0, metadata={"help": "evals without improvement (0: off)"})
    log_every: int = 10
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={"help": TRACKERS_HELP})
    progress: bool = True

    def check(self, precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")) -> None:
        """Step counts, intervals, rates and choices that make sense (ValueError naming the option)."""
        if self.precision not in precisions:
            choices = f"{', '.join(precisions[:-1])} or {precisions[-1]}"
            raise ValueError(f"train.precision must be {choices}, got {self.precision!r}")
        if self.schedule not in ("cosine", "linear", "constant", "wsd"):
            raise ValueError(f"train.schedule must be cosine, linear, constant or wsd, got {self.schedule!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        for name in ("max_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "keep_last", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be 0 or more, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"train.max_minutes must be positive (or left out), got {self.max_minutes}")


@dataclass
class VQADataConfig:
    """Official VQA v2-format files (questions, annotations, an image folder) for training and validation."""

    root: str = field(default="data/synth", metadata={"help": "relative paths resolve against it"})
    train_questions: str = "train_questions.json"
    train_annotations: str = "train_annotations.json"
    train_images: str = "images/train"
    val_questions: str = "val_questions.json"
    val_annotations: str = "val_annotations.json"
    val_images: str = "images/val"
    image_pattern: str | None = field(
        default=None,
        metadata={
            "help": "image file names in the image folders, over {image_id} and {subtype}, e.g. '{image_id}.png' "
            "(default: COCO's, COCO_{subtype}_{image_id:012d}.jpg)"
        },
    )
    limit: int | None = field(default=None, metadata={"help": "first N training questions (seed: 100000)"})
    val_limit: int = 500
    skip_bad: bool = False
    cache_pixels: bool = field(default=True, metadata={"help": "keep preprocessed images in memory"})
    feature_cache: str | None = field(
        default=None, metadata={"help": "dir of the frozen-vision feature cache (frozen tower only)"}
    )


# --- stages 1 and 3 (SFT) ----------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    r: int = field(default=0, metadata={"help": "LoRA rank on the language model (0: off; needs peft)"})
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])


@dataclass
class ModelConfig:
    preset: str = field(default="tiny", metadata={"help": "tiny | small | seed"})
    init_from: str | None = field(default=None, metadata={"help": "a gpt2mm model dir (e.g. a stage-1 run)"})
    pretrained: bool | None = field(default=None, metadata={"help": "load the preset's backbones"})
    overrides: dict = field(default_factory=dict, metadata={"help": "MultimodalGPT2Config fields"})
    freeze_lm: bool = field(default=False, metadata={"help": "train the projector (and vision) only"})
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "eager | sdpa | flash_attention_2 ... (transformers'; default: the model's, sdpa) | "
            "gpt2mm_eager (eager attention in the inputs' dtype); auto: gpt2mm_eager on a CPU in bf16, sdpa "
            "on a CPU in fp32, the default on a GPU"
        },
    )
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        if any(isinstance(v, (str, dict)) for v in self.overrides.values()):  # command-line strings
            from gpt2mm.train.model import typed_overrides

            self.overrides = typed_overrides(self.overrides)


@dataclass
class QuestionDataConfig(VQADataConfig):
    """Questions with short answers: official VQA files (the fields above), a Hugging Face dataset, the seed's
    CSV, or LLaVA records (training: their conversations; `gpt2mm eval`: their first exchange). What `gpt2mm
    ppo` trains on (not LLaVA) and `gpt2mm eval` scores; `DataConfig` adds the shaping of SFT samples."""

    format: str = field(
        default="vqa",
        metadata={
            "help": "vqa (official files) | hf (a Hugging Face dataset) | csv (the seed's) | llava (eval: each "
            "record's first exchange; not ppo)"
        },
    )
    hf_dataset: str | None = field(
        default=None,
        metadata={
            "help": "format hf: a datasets.save_to_disk folder, a folder (or file) of parquet/JSON/CSV data files "
            "(relative to root), or a hub id (online)"
        },
    )
    hf_config: str | None = field(
        default=None, metadata={"help": "format hf: the dataset's configuration name"}
    )
    hf_train_split: str = "train"
    hf_val_split: str | None = field(
        default="validation", metadata={"help": "format hf (None: no validation)"}
    )
    hf_columns: dict = field(
        default_factory=dict, metadata={"help": "format hf: field -> column (gpt2mm.data.sources.HF_FIELDS)"}
    )
    hf_image_cache: str = field(
        default="hf_images", metadata={"help": "format hf: where image data held in the dataset is written"}
    )
    hf_streaming: bool = field(
        default=False,
        metadata={
            "help": "format hf: read rows one at a time (IterableDataset): no conversion to Arrow first, and only "
            "the rows up to limit / val_limit samples are read"
        },
    )
    csv_train: str = field(
        default="train.csv", metadata={"help": "format csv: rows of image, 'Q: ... A: ...'"}
    )
    csv_val: str = "val.csv"
    llava_train: str = "train_llava.json"
    llava_val: str = field(
        default="val_llava.json",
        metadata={"help": "format llava, for gpt2mm eval: each record's first reply scored (exact match)"},
    )
    llava_images: str = "images"

    def check(self, formats: tuple[str, ...] = ("vqa", "hf", "csv")) -> None:
        """A known format, with what it needs (ValueError naming the option)."""
        if self.format not in formats:
            choices = f"{', '.join(formats[:-1])} or {formats[-1]}"
            raise ValueError(f"data.format must be {choices}, got {self.format!r}")
        if self.format == "hf" and not self.hf_dataset:
            raise ValueError(
                "data.format hf needs data.hf_dataset (a save_to_disk folder, data files or a hub id)"
            )


@dataclass
class DataConfig(QuestionDataConfig):
    format: str = field(
        default="vqa",
        metadata={
            "help": "vqa (official files) | llava (JSON) | hf (a Hugging Face dataset) | csv (the seed's)"
        },
    )
    synth: bool = field(
        default=True, metadata={"help": "render the synthetic world into root if it is absent"}
    )
    synth_args: dict = field(
        default_factory=dict, metadata={"help": "gpt2mm.data.synthetic.write_world args"}
    )
    conversation_mix: bool = field(
        default=False,
        metadata={
            "help": "format vqa: also train on the LLaVA conversations of llava_train (after packing), each with "
            "its first exchange (the synthetic world's detailed description) moved after its questions, or, with "
            "independent_turns, left first"
        },
    )
    vqa_mix: int = field(
        default=0,
        metadata={
            "help": "format llava: also train on the first N VQA questions (train_questions etc.), so that "
            "stage 3 keeps stage 1's short answers (-1: all of them)"
        },
    )
    answer_mode: str = field(default="multiple_choice", metadata={"help": "multiple_choice | sample"})
    max_length: int = 256
    pack_questions: int = field(
        default=1, metadata={"help": "train on up to N questions about one image as one multi-turn sample"}
    )
    independent_turns: bool = field(
        default=False,
        metadata={
            "help": "each exchange of a training sample sees only the image and itself, at the positions it "
            "would have alone (for packed questions and other turns that do not depend on each other)"
        },
    )
    difficulty: str | None = field(
        default=None,
        metadata={
            "help": "for train.curriculum_steps: answer_length | question_length (words; any data) | objects "
            "(the synthetic world's object count)"
        },
    )
    grounding: str | None = field(
        default=None,
        metadata={
            "help": "objects: each question's phrases that name an object of the synthetic world's scene learn "
            "its position (train.grounding_weight; gpt2mm.train.grounding)"
        },
    )


@dataclass
class TrainConfig(RunConfig):
    batch_size: int = field(default=64, metadata={"help": "samples per optimizer step, all processes"})
    grad_accum: int = 1
    projector_lr: float | None = None
    vision_lr: float | None = None
    loss_average: str = field(
        default="tokens",
        metadata={
            "help": "tokens | answers: the loss is the mean over answer tokens, or over answers (each answer's "
            "tokens share one weight: a one-word answer counts as much as a paragraph)"
        },
    )
    length_grouping: bool = field(
        default=True,
        metadata={
            "help": "batches of samples of similar lengths (less padding); the curriculum's too, drawn up to 50 "
            "steps (a 20th of it) at a time without replacement; false: shuffled batches, each curriculum step its "
            "own draw"
        },
    )
    curriculum_steps: int = field(
        default=0,
        metadata={"help": "widen batches from the easiest samples to all over N steps (data.difficulty)"},
    )
    grounding_weight: float = field(
        default=1.0, metadata={"help": "the weight of data.grounding's loss beside the answers' loss"}
    )
    grounding_layer: int = field(
        default=3,
        metadata={"help": "data.grounding reads the positions after this GPT-2 block (1 = the first)"},
    )
    grounding_lr: float = field(
        default=2.5e-4,
        metadata={"help": "the learning rate of data.grounding's linear heads (train.schedule's)"},
    )
    centres_weight: float = field(
        default=0.0,
        metadata={
            "help": "with data.grounding: the weight of each patch's count of the objects centred in it (0: off)"
        },
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile each transformer block (pays on a GPU; compiling takes ~20 s)"},
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "with several processes, shard parameters, gradients and optimizer state with FSDP2 "
            "(what accelerate launch --use_fsdp --fsdp_version 2 also selects)"
        },
    )

    def check(self, precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")) -> None:
        super().check(precisions)
        if self.loss_average not in ("tokens", "answers"):
            raise ValueError(f"train.loss_average must be tokens or answers, got {self.loss_average!r}")
        if not self.grounding_weight > 0 or not self.grounding_lr > 0 or self.grounding_layer < 1:
            raise ValueError(
                "train.grounding_weight and grounding_lr must be more than 0 and grounding_layer 1 or more, got "
                f"{self.grounding_weight}, {self.grounding_lr}, {self.grounding_layer}"
            )
        if not self.centres_weight >= 0:
            raise ValueError(f"train.centres_weight must be 0 or more, got {self.centres_weight}")
        for name in ("projector_lr", "vision_lr"):  # none: train.lr; 0 keeps that part as it is
            rate = getattr(self, name)
            if rate is not None and not rate >= 0:
                raise ValueError(f"train.{name} must be 0 or more (or none: train.lr), got {rate}")


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        t, d = self.train, self.data
        t.check(precisions=("fp32", "bf16", "fp16", "auto"))  # auto: resolved at run set-up (train.fast)
        if t.batch_size < 1 or t.grad_accum < 1 or t.batch_size % t.grad_accum:
            raise ValueError(
                f"train.batch_size {t.batch_size} must be a positive multiple of grad_accum {t.grad_accum}"
            )
        from gpt2mm.presets import PRESETS

        if self.model.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {', '.join(PRESETS)}, got {self.model.preset!r}")
        d.check(formats=("vqa", "llava", "hf", "csv"))
        from gpt2mm.data.splits import DIFFICULTIES

        if d.difficulty is not None and d.difficulty not in DIFFICULTIES:
            raise ValueError(
                f"data.difficulty must be one of {', '.join(DIFFICULTIES)}, got {d.difficulty!r}"
            )
        from gpt2mm.train.grounding import GROUNDINGS

        if d.grounding is not None and d.grounding not in GROUNDINGS:
            raise ValueError(f"data.grounding must be one of {', '.join(GROUNDINGS)}, got {d.grounding!r}")
        if d.grounding is not None and t.precision == "fp16":  # its head steps outside the loss scaler
            raise ValueError("data.grounding needs train.precision fp32, bf16 or auto, not fp16")
        if d.conversation_mix and d.format != "vqa":
            raise ValueError(
                "data.conversation_mix adds conversations to VQA questions: it needs format: vqa"
            )
        if d.vqa_mix and d.format != "llava":
            raise ValueError(
                "data.vqa_mix mixes VQA questions into LLaVA conversations: it needs format: llava"
            )
        if d.vqa_mix < -1:
            raise ValueError(f"data.vqa_mix must be a number of questions, or -1 for all; got {d.vqa_mix}")
