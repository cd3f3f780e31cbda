"""The frozen-vision feature cache: same features as the tower, computed once, invalidated by changes."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_image
from gpt2mm.data.features import FeatureCache


@pytest.fixture()
def images(tmp_path):
    paths = []
    for i in range(5):
        p = tmp_path / f"img{i}.png"
        make_image(i).save(p)
        paths.append(p)
    return paths


def test_cache_returns_the_towers_features_and_trains_the_same(tiny_pair, images, tmp_path):
    model, processor = tiny_pair
    cache = FeatureCache(tmp_path / "cache", model, processor)
    assert cache.build(images[:3]) == 3
    assert cache.build(images) == 2  # only what is missing
    from gpt2mm.data.images import load_image

    with torch.no_grad():
        direct = model.get_vision_hidden_states(processor.preprocess_images([load_image(p) for p in images]))
    cached = torch.stack([cache[p] for p in images])
    torch.testing.assert_close(cached, direct, rtol=1e-3, atol=2e-3)  # stored as float16
    # a reopened cache reads the same rows from disk (memory-mapped)
    again = FeatureCache(tmp_path / "cache", model, processor)
    assert all(torch.equal(again[p], cache[p]) for p in images)
    assert again.build(images) == 0


def test_cache_is_invalidated_by_new_weights_preprocessing_or_image(tiny_pair, images, tmp_path):
    model, processor = tiny_pair
    cache = FeatureCache(tmp_path / "cache", model, processor)
    cache.build(images)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.vision_tower.embeddings.patch_embedding.weight.add_(0.01)
    assert FeatureCache(tmp_path / "cache", other, processor).dir != cache.dir
    proc2 = copy.deepcopy(processor)
    proc2.image_processor.image_mean = [0.5, 0.5, 0.5]
    assert FeatureCache(tmp_path / "cache", model, proc2).dir != cache.dir
    make_image(99).save(images[0])  # the file changed: its features are recomputed
    assert images[0] not in cache and cache.build(images) == 1


def test_cache_needs_a_frozen_tower(tmp_path):
    from gpt2mm import build_model

    model, processor = build_model("tiny")  # the tiny preset trains its vision tower
    with pytest.raises(ValueError, match="frozen"):
        FeatureCache(tmp_path, model, processor)


def test_generate_from_vision_states_equals_generate_from_pixels(tiny_pair):
    """Precomputed vision states (the feature cache's output) go in with the prompt only; every step's scores
    equal those of generating from pixels, greedy and with beams."""
    model, processor = tiny_pair
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    prompts = [processor.format_prompt(q) for q in ("what colour is it?", "how many?")]
    enc = processor(text=prompts, padding_side="left")
    with torch.no_grad():
        states = model.get_vision_hidden_states(pixels)
    kw = dict(max_new_tokens=4, min_new_tokens=4, output_scores=True, return_dict_in_generate=True)
    a = model.generate(**enc, pixel_values=pixels, do_sample=False, **kw)
    b = model.generate(**enc, vision_hidden_states=states, do_sample=False, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sa, sb)
    beams_a = model.generate(**enc, pixel_values=pixels, num_beams=2, max_new_tokens=4)
    beams_b = model.generate(**enc, vision_hidden_states=states, num_beams=2, max_new_tokens=4)
    assert torch.equal(beams_a, beams_b)
