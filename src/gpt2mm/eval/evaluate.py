"""Answering VQA questions in batches, and scoring the answers (the official metric; exact match for samples
with a single reference answer).

The same `answer_questions` serves training-time evaluation, `gpt2mm eval` and the demo, so a number
printed anywhere in the project comes from one code path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


@torch.no_grad()
def answer_questions(
    model: Any,
    processor: Any,
    samples: Sequence[Any],
    batch_size: int = 64,
    pixel_source: Callable[[str], torch.Tensor] | None = None,
    max_new_tokens: int = 8,
    progress: bool = False,
    image_key: str = "pixel_values",
) -> list[str]:
    """Greedy answers to the first user turn of each sample, batched with left padding: the turn's prompt
    is `processor.encode_turns`'s, with its images (several, where its `<image>` placeholders stand).

    Answers are post-processed as documented in `MultimodalGPT2Processor.postprocess_answer`: the text
    up to the end-of-text token (or a new `Q:`), stripped.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tok = processor.tokenizer
    answers: list[str] = []
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].turns[0].text))  # less padding
    by_index: dict[int, str] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples), desc="answer", dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        firsts = [samples[i].encoder_turns()[0] for i in idx]  # (role, question, number of images)
        prompts = [processor.encode_turns([turn])["input_ids"] for turn in firsts]
        enc = left_padded(prompts, tok.pad_token_id)
        kwargs = {k: v.to(device) for k, v in enc.items()}
        # the first turn's images are the first ones: images are in the order of their <image> runs
        images = [p for i, (_, _, n) in zip(idx, firsts) for p in samples[i].images[:n]]
        if images:
            if pixel_source is None:
                from gpt2mm.data.images import load_image

                pixels = processor.preprocess_images([load_image(p) for p in images])
            else:
                pixels = torch.stack([pixel_source(p) for p in images])
            kwargs[image_key if pixel_source is not None else "pixel_values"] = pixels.to(device)
        out = model.generate(
            **kwargs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=False)
        for i, text in zip(idx, texts):
            by_index[i] = processor.postprocess_answer(text)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    answers = [by_index[i] for i in range(len(samples))]
    model.train(was_training)
    return answers


def left_padded(prompts: Sequence[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Token id lists -> `input_ids` and `attention_mask` (B, T), padded on the left (for generation)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def score_samples(samples: Sequence[Any], answers: Sequence[str]) -> float:
    """Mean score, in percent, of answers against each sample's human answers (its answer when it has none):
    `answer_score`, the official VQA accuracy with human answers, normalized exact match with one."""
    from gpt2mm.eval.vqa_metric import answer_score

    if not samples:
        return 0.0
    total = 0.0
    for s, a in zip(samples, answers, strict=True):
        total += answer_score(a, references(s))
    return 100.0 * total / len(samples)


def references(sample: Any) -> list[str]:
    """What a sample's answer is scored against: its human answers, else its (first) answer."""
    return list(sample.answers) if sample.answers else [sample.turns[1].text]


def score_split(samples: Sequence[Any], answers: Sequence[str]) -> dict[str, Any]:
    """`gpt2mm eval`'s scores of answers to samples that have no official records (a Hugging Face dataset, a
    CSV), in percent, rounded as the official tool rounds: each sample by `answer_score` (VQA accuracy with
    human answers, normalized exact match with a single reference), and `scoring` says which ("vqa accuracy",
    "exact match", or both "vqa accuracy + exact match", then each has its own figure as well).

    Returns {"scoring", "overall", "questions", "by_scoring": {scoring: {"overall", "questions"}},
    "perAnswerType" (the samples that have an answer type), "perQuestion" (sample id -> score)}.
    """
    from gpt2mm.eval.vqa_metric import answer_score, round_half_away, scoring_for

    if not samples:
        raise ValueError("no samples to score")
    values, per_question = [], {}
    by_scoring: dict[str, list[float]] = {}
    by_type: dict[str, list[float]] = {}
    for s, a in zip(samples, answers, strict=True):
        refs = references(s)
        v = answer_score(a, refs)
        values.append(v)
        by_scoring.setdefault(scoring_for(refs), []).append(v)
        if s.answer_type is not None:
            by_type.setdefault(s.answer_type, []).append(v)
        per_question[s.id] = round_half_away(100 * v, 2)

    def percent(vs: list[float]) -> float:
        return round_half_away(100 * sum(vs) / len(vs), 2)

    return {
        "scoring": " + ".join(sorted(by_scoring, reverse=True)),  # "vqa accuracy + exact match"
        "overall": percent(values),
        "questions": len(values),
        "by_scoring": {
            k: {"overall": percent(v), "questions": len(v)}
            for k, v in sorted(by_scoring.items(), reverse=True)
        },
        "perAnswerType": {t: percent(v) for t, v in sorted(by_type.items())},
        "perQuestion": per_question,
    }
