"""What vLLM's Transformers backend does with a gpt2mm checkpoint, replayed on CPU without vLLM.

vLLM (0.19 and later; read in its 0.34.0 source) builds the checkpoint's `AutoModel` class with its own
attention registered as "vllm", calls the processor on placeholder text for the images (asking for
`text_replacement_offsets` or, before 0.33, `mm_token_type_ids`) and `_get_num_multimodal_tokens`, puts
`get_image_features(pixel_values, return_dict=True).pooler_output` IN PLACE of the `<image>` token embeddings,
runs `forward(inputs_embeds=..., position_ids=..., use_cache=False, return_dict=False)[0]` and applies its own
LM head (the tied `lm_head.weight`). Its attention returns (tokens, heads * head_dim). These tests replay
those steps with a stand-in for that attention and check that the greedy answers are `gpt2mm ask`'s.
`vllm serve` itself needs a GPU and its own torch build: not run here.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from conftest import make_image, wide_tiny_model
from gpt2mm.modeling import (
    GPT2AttentionAnyLayout,
    MultimodalGPT2ForConditionalGeneration,
    MultimodalGPT2Model,
)

CALLS: list[tuple[int, ...]] = []


def vllm_like_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """vLLM's contract: causal attention over the one sequence, output (tokens, heads * head_dim), 2-D."""
    CALLS.append(tuple(query.shape))
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)  # (1, H, T, D)
    return out.transpose(1, 2).reshape(query.shape[-2], -1), None


ALL_ATTENTION_FUNCTIONS.register("vllm", vllm_like_attention)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from gpt2mm.hub import save_model

    path = tmp_path_factory.mktemp("vllm") / "checkpoint"
    model, processor = wide_tiny_model()
    save_model(model, processor, path, stage="init", random_init=True)
    return path


def load_as_vllm(path) -> tuple[MultimodalGPT2Model, torch.Tensor]:
    """AutoModel with the "vllm" attention, and the LM head vLLM would load (tied to the embeddings)."""
    model = AutoModel.from_pretrained(path, attn_implementation={"text_config": "vllm", "": "sdpa"}).eval()
    full = MultimodalGPT2ForConditionalGeneration.from_pretrained(path)
    return model, full.lm_head.weight.detach()


def test_auto_model_is_the_base_model_and_the_checkpoint_says_so(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_gpt2mm.MultimodalGPT2Model"
    model = AutoModel.from_pretrained(checkpoint)
    assert type(model) is MultimodalGPT2Model and not hasattr(model, "lm_head")
    assert model._supports_attention_backend
    assert all(type(block.attn) is GPT2AttentionAnyLayout for block in model.language_model.h)


def test_no_stored_weight_matches_the_patterns_vllm_drops(checkpoint):
    """vLLM drops, before loading, every stored name that one of the model's `_keys_to_ignore_on_load_unexpected`
    patterns matches (`re.search`). GPT-2's own ("attn.bias", for old checkpoints' causal-mask buffers) matched
    every `c_attn.bias`, and vLLM 0.26 refused the checkpoint ("weights were not initialized"; seen on a lent
    H200). No stored weight may match; the buffers' names still do."""
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert any(name.endswith(".attn.c_attn.bias") for name in names)
    for cls in (AutoModel, MultimodalGPT2ForConditionalGeneration):
        patterns = [re.compile(p) for p in cls.from_pretrained(checkpoint)._keys_to_ignore_on_load_unexpected]
        assert patterns and not [name for name in names if any(p.search(name) for p in patterns)]
        for buffer in ("language_model.h.0.attn.bias", "language_model.h.0.crossattention.bias"):
            assert any(p.search(buffer) for p in patterns), buffer


def test_base_model_hidden_states_are_the_full_models(checkpoint):
    """`forward` with pixels (images merged by replacement) = the full model's additive fusion, bit for bit."""
    full = MultimodalGPT2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    base = AutoModel.from_pretrained(checkpoint).eval()
    from gpt2mm.loading import load_model

    _, processor = load_model(checkpoint)
    for side in ("right", "left"):
        enc = processor(
            text=["Q: <image> What color is it? A:", "Q: Compare <image> and <image> . A:"],
            images=[make_image(1, 48), make_image(2, 48), make_image(3, 40)],
            padding_side=side,
        )
        assert not enc["attention_mask"].all()
        with torch.no_grad():
            ref = full.hidden_states(
                enc["input_ids"], enc["attention_mask"], pixel_values=enc["pixel_values"]
            )
            got = base(**enc).last_hidden_state
        real = enc["attention_mask"].bool()
        assert torch.equal(got[real], ref[real]), side


def test_processor_answers_vllms_questions(checkpoint):
    from gpt2mm.loading import load_model

    _, processor = load_model(checkpoint)
    n = processor.num_image_tokens
    images = [make_image(4, 48), make_image(5, 100)]
    data = processor._get_num_multimodal_tokens(image_sizes=[(48, 48), (100, 70)])
    assert data.num_image_tokens == [n, n] and data.num_image_patches == [1, 1]
    # vLLM 0.33+: the processor on placeholder text, asked where each placeholder went
    out = processor(
        text="<image><image>", images=images, return_text_replacement_offsets=True, truncation=False
    )
    offsets = out["text_replacement_offsets"][0]
    assert [o["type"] for o in offsets] == ["image", "image"]
    assert all(o["replacement"] == "<image>" * n for o in offsets)
    assert out["input_ids"].tolist() == [[processor.image_token_id] * 2 * n] and len(out["pixel_values"]) == 2
    # vLLM 0.19-0.32: the prompt itself, asked which tokens are image tokens
    out = processor(text="Q: <image> What is it? A:", images=images[:1], return_mm_token_type_ids=True)
    assert out["mm_token_type_ids"].tolist() == [
        [int(t == processor.image_token_id) for t in out["input_ids"][0]]
    ]
    plain = processor(text="Q: <image> What is it? A:", images=images[:1])
    assert set(plain) == {"input_ids", "attention_mask", "pixel_values"}  # nothing extra unless asked


def test_vllm_steps_give_gpt2mm_asks_answers(checkpoint):
    """The steps vLLM takes, greedy, recomputing the whole sequence each step (vLLM's cache is its own), with
    the 2-D attention stand-in: the same new tokens as `gpt2mm ask`."""
    from gpt2mm.serve.engine import Engine, SamplingParams

    engine = Engine.from_pretrained(checkpoint, device="cpu")
    model, lm_head = load_as_vllm(checkpoint)
    processor = engine.processor
    questions = [("What color is the circle?", make_image(6, 48)), ("How many shapes?", make_image(7, 48))]
    answers = []
    for question, image in questions:
        ours = engine.ask(question, [image], SamplingParams(max_new_tokens=5)).choices[0]
        prompt = engine.prepare([("user", question, 1)], [image]).input_ids
        pixels = processor(text="<image>", images=[image], return_text_replacement_offsets=True)[
            "pixel_values"
        ]
        with torch.no_grad():
            features = model.get_image_features(pixels, return_dict=True).pooler_output
            ids, new = list(prompt), []
            for _ in range(len(ours.token_ids)):
                tokens = torch.tensor(ids)
                embeds = model.get_input_embeddings()(tokens)
                embeds[tokens == processor.image_token_id] = features.reshape(-1, features.shape[-1])
                CALLS.clear()
                hidden = model(
                    inputs_embeds=embeds[None],
                    position_ids=torch.arange(len(ids))[None],
                    use_cache=False,
                    return_dict=False,
                )[0]
                assert len(CALLS) == model.config.text_config.n_layer  # the "vllm" attention ran
                new.append(int((hidden[0, -1] @ lm_head.T).argmax()))
                ids.append(new[-1])
        assert new == ours.token_ids, question
        answers.append(ours.text)
    assert len(set(answers)) > 1
