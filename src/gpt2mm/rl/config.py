"""Stage 2's recipe: the policy to start from, the questions (`train.config.QuestionDataConfig`: official VQA
files, a Hugging Face dataset or the seed's CSV), the rollouts, the
PPO / RLOO / GRPO hyper-parameters on top of the run layer's `RunConfig`, and the reward.

`gpt2mm ppo RECIPE.yaml --section.key value` builds a `PPORecipe` (see `gpt2mm.train.args`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpt2mm.rl.reward import parse_reward
from gpt2mm.train.config import QuestionDataConfig, RunConfig


@dataclass
class PolicyConfig:
    init_from: str = field(
        default="runs/demo-sft/best", metadata={"help": "the stage-1 checkpoint (policy and reference)"}
    )
    freeze_projector: bool = False


@dataclass
class RolloutConfig:
    prompts: int = field(default=64, metadata={"help": "questions per rollout"})
    samples_per_prompt: int = field(default=1, metadata={"help": "answers per question (rloo/grpo: >= 2)"})
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = field(default=0, metadata={"help": "0: off (sample from the whole distribution)"})
    top_p: float = 1.0


@dataclass
class PPOTrainConfig(RunConfig):
    """`RunConfig` with PPO's defaults (a few hundred updates, a small constant learning rate, frequent logging)
    and PPO's own fields: the algorithm, the clipped losses, GAE and the KL penalty."""

    # the shared fields whose default differs for PPO
    output_dir: str = "runs/tiny-ppo"
    max_steps: int = field(default=200, metadata={"help": "updates (one rollout each)"})
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    schedule: str = field(default="constant", metadata={"help": "constant | linear | cosine"})
    precision: str = field(default="fp32", metadata={"help": "fp32 | bf16"})
    eval_every: int = 50
    eval_batch_size: int = 256
    save_every: int = 50
    log_every: int = 1
    # PPO's own
    algo: str = field(default="ppo", metadata={"help": "ppo | rloo | grpo"})
    value_lr: float | None = field(default=None, metadata={"help": "the value head's (default: lr)"})
    ppo_epochs: int = 2
    minibatch_size: int = 32
    clip_range: float = 0.2
    clip_range_value: float | None = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_target: float | None = field(default=None, metadata={"help": "adaptive KL coefficient (None: fixed)"})
    kl_horizon: int = 10000
    kl_estimator: str = field(default="k1", metadata={"help": "k1 | k2 | k3, in the reward"})
    whiten_advantages: bool = True

    def check(self, precisions: tuple[str, ...] = ("fp32", "bf16")) -> None:
        """The run layer's checks (fp32 or bf16 only: no loss scaling here), then PPO's own."""
        if self.algo not in ("ppo", "rloo", "grpo"):
            raise ValueError(f"train.algo must be ppo, rloo or grpo, got {self.algo!r}")
        super().check(precisions=precisions)
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"train.kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")


@dataclass
class PPORecipe:
    model: PolicyConfig = field(default_factory=PolicyConfig)
    data: QuestionDataConfig = field(default_factory=QuestionDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    reward: str = field(
        default="vqa", metadata={"help": "vqa | model:DIR | a weighted sum, e.g. 0.5*vqa+0.5*model:DIR"}
    )

    def __post_init__(self):
        t, r = self.train, self.rollout
        t.check()
        self.data.check(formats=("vqa", "hf", "csv"))
        if t.algo != "ppo" and r.samples_per_prompt < 2:
            raise ValueError(f"train.algo {t.algo} needs rollout.samples_per_prompt >= 2")
        if r.prompts < 1 or r.max_new_tokens < 1 or t.minibatch_size < 1 or t.ppo_epochs < 1:
            raise ValueError(
                "rollout.prompts, rollout.max_new_tokens, train.minibatch_size and ppo_epochs must be >= 1"
            )
        if r.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0, got {r.temperature}")
        parse_reward(self.reward)
