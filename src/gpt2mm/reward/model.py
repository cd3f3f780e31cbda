"""RewardModel: the multimodal model with a scalar head that predicts P(answer is correct).

    Q: <image> {question} A: {answer}<|endoftext|>       the stage-1 prompt + answer (`encode_example`)
      -> token embeddings, image features fused in        (B, T, C)      as in generation
      -> GPT-2 (position ids from the attention mask)    (B, T, C)      `model.hidden_states`; any padding side
      -> hidden state of the last real token              (B, C)         the end-of-text after the answer
      -> Linear(C, 1)                                     (B,)           the logit of P(correct)
      [+ lm_scale * log P_LM(answer + end-of-text | image, question)]    with `lm_prior=True`

The language model head is kept (it is tied to the embeddings) and, by default, unused. With `lm_prior`,
the logit also gets the model's own log-likelihood of the answer, from the same forward pass (the LM head
on the answer positions only): the stage-1 model already knows which answers are likely, and this term
hands that knowledge to the reward model from step 0 instead of making the head rediscover it through
the last token (docs/experiments.md: it is what takes the synthetic world's held-out accuracy past 95%).

A saved reward model is a self-contained directory:

    config.json  model.safetensors  generation_config.json   the multimodal backbone (a gpt2mm model dir)
    tokenizer*.json  processor_config.json                    the processor
    reward_head.safetensors                                   head.weight (1, C), head.bias (1,) [, lm_scale]
    reward_config.json                                        {"format": "gpt2mm-reward", "lm_prior": ...}

`RewardScorer` is the inference side: P(correct) for (image, question, answer) triples, batched, no grad;
PPO calls it as its reward (`reward: model:DIR`) and the tagging app orders items with it.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2mm.config import IGNORE_INDEX

REWARD_CONFIG = "reward_config.json"
REWARD_HEAD = "reward_head.safetensors"
FORMAT = "gpt2mm-reward"
FORMAT_VERSION = 1


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (B, T) mask, whatever the padding side: (B,)."""
    t = attention_mask.shape[1]
    return t - 1 - attention_mask.long().flip(-1).argmax(-1)


def answer_start(seq: Sequence[int], marker: Sequence[int]) -> int:
    """Index of the first answer token: the one after the last `marker` (the tokens of " A:")."""
    m = len(marker)
    for i in range(len(seq) - m, -1, -1):
        if list(seq[i : i + m]) == list(marker):
            return i + m
    raise ValueError(f"no answer marker {list(marker)} in the token ids {list(seq)[:12]}...")


def answer_starts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, marker: Sequence[int]
) -> torch.Tensor:
    """`answer_start` of each row of a padded batch (either side): (B,)."""
    b, t = input_ids.shape
    m = len(marker)
    hit = attention_mask[:, : t - m + 1].bool()
    for k, tok in enumerate(marker):
        hit = hit & (input_ids[:, k : t - m + 1 + k] == tok) & attention_mask[:, k : t - m + 1 + k].bool()
    if not bool(hit.any(-1).all()):
        raise ValueError(f"a row has no answer marker {list(marker)} (the ' A:' of the prompt)")
    last_hit = t - m - hit.long().flip(-1).argmax(-1)  # (B,): where the last marker starts
    return last_hit + m


def is_reward_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / REWARD_CONFIG).is_file()


class RewardModel(nn.Module):
    """A `MultimodalGPT2ForConditionalGeneration` + a scalar head on the last real token's hidden state
    (+ with `lm_prior`, the scaled log-likelihood of the answer).

    `forward(input_ids, attention_mask, pixel_values | vision_hidden_states) -> logits (B,)`.
    """

    def __init__(self, model: Any, processor: Any = None, lm_prior: bool = False):
        super().__init__()
        self.model = model  # the multimodal backbone
        self.processor = processor  # saved with the weights, so a reward dir is self-contained
        d = model.config.text_config.hidden_size
        self.head = nn.Linear(d, 1)
        nn.init.normal_(self.head.weight, std=model.config.initializer_range)
        nn.init.zeros_(self.head.bias)
        self.lm_prior = lm_prior
        self.answer_marker: list[int] = []
        if lm_prior:
            if processor is None:
                raise ValueError("lm_prior needs the processor (to find where the answer starts)")
            from gpt2mm.processing import ASSISTANT_PREFIX

            self.answer_marker = processor.tokenizer(ASSISTANT_PREFIX, add_special_tokens=False)["input_ids"]
            probe = processor.encode_example("Is it?", "yes", with_image=False)
            first = next(i for i, label in enumerate(probe["labels"]) if label != IGNORE_INDEX)
            if answer_start(probe["input_ids"], self.answer_marker) != first:
                raise ValueError(
                    "lm_prior: the prompt does not end with the tokens of ' A:' in this tokenizer"
                )
            self.lm_scale = nn.Parameter(torch.ones(()))

    @property
    def config(self):
        return self.model.config

    @classmethod
    def from_base(cls, path: str | os.PathLike, lm_prior: bool = False) -> RewardModel:
        """A fresh head on a gpt2mm model directory (a stage-1 checkpoint), with its processor."""
        from gpt2mm.loading import load_model

        model, processor = load_model(path)
        return cls(model, processor, lm_prior=lm_prior)

    def _answer_logprob(self, hidden_prev: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n: int):
        """Sum over each row's answer tokens of log P(token | prefix): hidden_prev (M, C) predicts targets
        (M,), which belong to rows (M,) of n."""
        logprobs = torch.log_softmax(self.model.lm_head(hidden_prev).float(), dim=-1)  # (M, vocab)
        picked = logprobs.gather(-1, targets[:, None]).squeeze(-1)  # (M,)
        return torch.zeros(n, device=picked.device).index_add_(0, rows, picked)  # (n,)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.model.hidden_states(input_ids, attention_mask, pixel_values, vision_hidden_states)
        b, t = input_ids.shape
        last = last_token_index(attention_mask)  # (B,)
        pooled = hidden[torch.arange(b, device=hidden.device), last]  # (B, C)
        logits = self.head(pooled).squeeze(-1).float()  # (B,)
        if self.lm_prior:
            start = answer_starts(input_ids, attention_mask, self.answer_marker)  # (B,)
            span = torch.arange(t, device=input_ids.device)
            in_answer = (span[None] >= start[:, None]) & (span[None] <= last[:, None])  # (B, T): answer + eos
            rows, pos = in_answer.nonzero(as_tuple=True)  # (M,), (M,)
            lm = self._answer_logprob(hidden[rows, pos - 1], input_ids[rows, pos], rows, b)
            logits = logits + self.lm_scale * lm
        return logits

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_bias: torch.Tensor,
        read_index: torch.Tensor,
        answer_index: torch.Tensor | None = None,
        answer_prev: torch.Tensor | None = None,
        answer_row: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The logits of many answers that share prefixes, from prefix trees (see `pack_prefix_trees`):
        the same numbers as `forward` on each answer alone, with each shared prefix (the image, a question
        asked with several answers) computed once. Needs the eager or SDPA attention (a 4D mask).
        `return_parts` (lm_prior only): (head logits, answer log-likelihoods) instead of their sum."""
        # attention_bias (B, 1, T, T): 0 on a node's ancestors, -inf off them
        hidden = self.model.hidden_states(
            input_ids, attention_bias, pixel_values, vision_hidden_states, position_ids=position_ids
        )  # (B, T, C)
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B * T, C)
        logits = self.head(flat[read_index]).squeeze(-1).float()  # (N,)
        if not self.lm_prior:
            return logits
        if answer_index is None or answer_prev is None or answer_row is None:
            raise ValueError("lm_prior: pack with pack_prefix_trees(..., answer_marker=...)")
        targets = input_ids.reshape(-1)[answer_index]  # (M,)
        lm = self._answer_logprob(flat[answer_prev], targets, answer_row, len(read_index))  # (N,)
        return logits + self.lm_scale * lm if not return_parts else (logits, lm)

    # --- saving and loading ---------------------------------------------------------------------------

    def write_files(self, path: str | os.PathLike, base: str | os.PathLike | None = None) -> None:
        """Write the model (self-contained, with its card: `gpt2mm.hub.save_model`; `base` is the checkpoint
        it was trained from), processor, head and marker into an existing directory (not atomic: see
        `save_pretrained`, and `gpt2mm.reward.train`, which writes metrics.json first, for the card)."""
        from safetensors.torch import save_file

        from gpt2mm.hub import save_model

        if self.processor is None:
            raise ValueError(
                "RewardModel.save_pretrained needs the processor (RewardModel(model, processor))"
            )
        path = Path(path)
        save_model(self.model, self.processor, path, stage="reward", init_from=base)
        save_file(self._head_state(), str(path / REWARD_HEAD), metadata={"format": "pt"})
        marker = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "prompt": "Q: <image> {question} A: {answer}<|endoftext|>",
            "pooling": "last real token",
            "lm_prior": self.lm_prior,
            "output": "logit of P(correct)",
        }
        (path / REWARD_CONFIG).write_text(json.dumps(marker, indent=2) + "\n")

    def _head_state(self) -> dict[str, torch.Tensor]:
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if self.lm_prior:
            state["lm_scale"] = self.lm_scale.data
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the directory under a temporary name, then rename it into place."""
        from gpt2mm.train.checkpoints import atomic_save_dir

        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_dir(final, self.write_files, what="the reward model")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> RewardModel:
        from safetensors.torch import load_file

        from gpt2mm.loading import load_model

        path = Path(path)
        if not is_reward_dir(path):
            raise FileNotFoundError(
                f"{path} is not a gpt2mm reward model directory: it has no {REWARD_CONFIG}"
            )
        marker = json.loads((path / REWARD_CONFIG).read_text())
        if marker.get("format") != FORMAT or marker.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path / REWARD_CONFIG}: expected format {FORMAT} v{FORMAT_VERSION}, got {marker}"
            )
        model, processor = load_model(path)
        reward = cls(model, processor, lm_prior=bool(marker.get("lm_prior", False)))
        head = load_file(str(path / REWARD_HEAD))
        expected = reward._head_state()
        if set(head) != set(expected):
            raise ValueError(f"{path / REWARD_HEAD}: keys {sorted(head)}, expected {sorted(expected)}")
        for key, value in head.items():
            if value.shape != expected[key].shape:
                raise ValueError(
                    f"{path / REWARD_HEAD}: {key} has shape {tuple(value.shape)}, "
                    f"expected {tuple(expected[key].shape)}"
                )
        reward.head.load_state_dict(
            {k.removeprefix("head."): v for k, v in head.items() if k.startswith("head.")}
        )
        if reward.lm_prior:
            reward.lm_scale.data.copy_(head["lm_scale"])
        return reward


# --- batching ---------------------------------------------------------------------------------------------


def encode(processor: Any, question: str, answer: str, with_image: bool = True) -> list[int]:
    """The stage-1 prompt + answer + end-of-text, as token ids: what the reward model reads."""
    return processor.encode_example(question, answer, with_image=with_image)["input_ids"]


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask), both (B, T_max), right-padded."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pack_prefix_trees(
    groups: Sequence[Sequence[Sequence[int]]], pad_id: int, answer_marker: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Token sequences that share prefixes -> one prefix tree (trie) per group, flattened into a row.

    Each distinct prefix becomes one node; a node attends to its ancestors and itself and sits at position
    depth, so its hidden state is the one it has in every sequence through it (a parity test checks it).
    Nodes come after their parents, so the mask is also causal. Returns `forward_packed`'s arguments:
    input_ids (B, T), position_ids (B, T), attention_bias (B, 1, T, T) (0 = attend, -inf = not) and
    read_index (N,): the flat index b * T + t of each sequence's last token, sequences in group order.
    Padding attends to itself only. With `answer_marker` (for lm_prior), also each answer token's flat
    index, its predecessor's and its sequence: answer_index, answer_prev, answer_row (M,).
    """
    import numpy as np

    trees = []
    for rows in groups:
        tokens: list[int] = []
        parent: list[int] = []
        depth: list[int] = []
        paths: list[list[int]] = []
        child: dict[tuple[int, int], int] = {}
        for seq in rows:
            node, path = -1, []
            for tok in seq:
                nxt = child.get((node, tok))
                if nxt is None:
                    nxt = child[(node, tok)] = len(tokens)
                    tokens.append(tok)
                    parent.append(node)
                    depth.append(depth[node] + 1 if node >= 0 else 0)
                node = nxt
                path.append(node)
            paths.append(path)
        trees.append((tokens, parent, depth, paths))
    b, t = len(trees), max(len(tree[0]) for tree in trees)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    pos = np.zeros((b, t), dtype=np.int64)
    allowed = np.zeros((b, t, t), dtype=bool)
    allowed[:, np.arange(t), np.arange(t)] = True
    read: list[int] = []
    answer_index: list[int] = []
    answer_prev: list[int] = []
    answer_row: list[int] = []
    for i, (tokens, parent, depth, paths) in enumerate(trees):
        ids[i, : len(tokens)] = tokens
        pos[i, : len(tokens)] = depth
        for node, up in enumerate(parent):
            if up >= 0:
                allowed[i, node] |= allowed[i, up]  # the parent's ancestors (and the parent)
        for path, seq in zip(paths, groups[i]):
            if answer_marker is not None:
                start = answer_start(seq, answer_marker)
                answer_index += [i * t + n for n in path[start:]]
                answer_prev += [i * t + n for n in path[start - 1 : -1]]
                answer_row += [len(read)] * (len(path) - start)
            read.append(i * t + path[-1])
    bias = torch.zeros((b, 1, t, t)).masked_fill_(~torch.from_numpy(allowed)[:, None], float("-inf"))
    out = {
        "input_ids": torch.from_numpy(ids),
        "position_ids": torch.from_numpy(pos),
        "attention_bias": bias,
        "read_index": torch.tensor(read, dtype=torch.long),
    }
    if answer_marker is not None:
        for key, value in (
            ("answer_index", answer_index),
            ("answer_prev", answer_prev),
            ("answer_row", answer_row),
        ):
            out[key] = torch.tensor(value, dtype=torch.long)
    return out


class RewardScorer:
    """P(correct) for (image, question, answer) triples from a saved reward model, batched, no grad.

        scorer = RewardScorer("runs/reward", device="cuda")
        scorer(["a.png", None], ["What color is the circle?", "Is it?"], ["red", "yes"])  # -> [0.97, 0.41]

    Images are file paths (or None for a text-only question). The vision states of the last
    `max_cached_images` images are kept (PPO scores many answers about the same image); an image is
    identified by its path, size and modification time.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        max_cached_images: int = 4096,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = RewardModel.from_pretrained(path).to(self.device).eval()
        self.processor = self.model.processor
        self.batch_size = batch_size
        self.max_cached_images = max_cached_images
        self._vision: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _vision_states(self, images: Sequence[Any]) -> torch.Tensor:
        """(N, T_img, C_vision) for the images, computed for those not in the cache."""
        from gpt2mm.data.features import image_identity
        from gpt2mm.data.images import load_image
        from gpt2mm.errors import DataError

        keys = []
        for p in images:
            try:
                keys.append(image_identity(p) if isinstance(p, (str, os.PathLike)) else None)
            except OSError:
                raise DataError(f"{p}: no such image file") from None
        todo = [i for i, k in enumerate(keys) if k is None or k not in self._vision]
        fresh: dict[int, torch.Tensor] = {}
        for i, k in enumerate(keys):  # the cached ones first: adding the new ones may evict them
            if k is not None and k in self._vision and i not in fresh:
                self._vision.move_to_end(k)
                fresh[i] = self._vision[k]
        if todo:
            pil = [load_image(images[i]) if keys[i] is not None else images[i] for i in todo]
            pixels = self.processor.preprocess_images(pil).to(self.device)
            states = self.model.model.get_vision_hidden_states(pixels)  # (n, T_img, C_vision)
            for i, s in zip(todo, states):
                fresh[i] = s
                if keys[i] is not None and self.max_cached_images > 0:
                    self._vision[keys[i]] = s.clone()  # not a view that would keep the whole batch alive
                    if len(self._vision) > self.max_cached_images:
                        self._vision.popitem(last=False)
        return torch.stack([fresh[i] for i in range(len(keys))])

    @torch.no_grad()
    def __call__(
        self, images: Sequence[str | None], questions: Sequence[str], answers: Sequence[str]
    ) -> list[float]:
        if not len(images) == len(questions) == len(answers):
            raise ValueError(
                f"images, questions and answers differ in length: {len(images)}, {len(questions)}, {len(answers)}"
            )
        ids = [
            encode(self.processor, q, a, with_image=im is not None)
            for im, q, a in zip(images, questions, answers)
        ]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
        pad = self.processor.tokenizer.pad_token_id
        scores: list[float] = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            input_ids, mask = pad_right([ids[i] for i in idx], pad)
            batch_images = [images[i] for i in idx if images[i] is not None]
            states = self._vision_states(batch_images) if batch_images else None
            logits = self.model(input_ids.to(self.device), mask.to(self.device), vision_hidden_states=states)
            for i, p in zip(idx, torch.sigmoid(logits).tolist()):
                scores[i] = p
        return scores
