"""Parity of MultimodalGPT2ForConditionalGeneration with the transformers modules it wraps."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, GPT2LMHeadModel

from conftest import make_image
from gpt2mm import MultimodalGPT2Config, MultimodalGPT2ForConditionalGeneration, MultimodalGPT2Processor
from gpt2mm.config import IGNORE_INDEX
from gpt2mm.loading import from_backbones


def reference_gpt2(model: MultimodalGPT2ForConditionalGeneration) -> GPT2LMHeadModel:
    """A plain GPT2LMHeadModel holding our language model's weights."""
    ref = GPT2LMHeadModel(model.config.text_config)
    missing, unexpected = (
        ref.transformer.load_state_dict(model.language_model.state_dict(), strict=True),
        None,
    )
    ref.tie_weights()
    assert torch.equal(ref.lm_head.weight, model.lm_head.weight)
    del missing, unexpected
    return ref.eval()


def batch(processor, questions, images, **kw):
    texts = [processor.format_prompt(q) for q in questions]
    return processor(text=texts, images=images, **kw)


def test_from_backbones_copies_weights_and_adds_image_token(backbone_dirs, tiny_pair):
    model, processor = tiny_pair
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(backbone_dirs[0])
    gpt2 = GPT2LMHeadModel.from_pretrained(backbone_dirs[1])
    base_vocab = gpt2.config.vocab_size
    assert model.config.image_token_id == base_vocab  # the first id after the base vocabulary
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == base_vocab
    assert model.config.text_config.vocab_size == base_vocab + 1
    for key, value in clip.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[key], value), key
    for key, value in gpt2.transformer.state_dict().items():
        ours = model.language_model.state_dict()[key]
        if key == "wte.weight":
            assert torch.equal(ours[:base_vocab], value)
        else:
            assert torch.equal(ours, value), key
    assert model.lm_head.weight.data_ptr() == model.language_model.wte.weight.data_ptr()  # tied
    assert model.config.num_image_tokens == 5  # 32 px / patch 16 -> 4 patches + CLS


def test_text_only_logits_equal_gpt2(tiny_pair):
    model, processor = tiny_pair
    ref = reference_gpt2(model)
    enc = processor.tokenizer(
        ["Q: What color is the circle? A: red", "Q: How many? A:"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        ours = model(**enc).logits
        theirs = ref(**enc).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_image_logits_equal_gpt2_on_embeddings_plus_features(tiny_pair):
    model, processor = tiny_pair
    ref = reference_gpt2(model)
    images = [make_image(1), make_image(2)]
    enc = batch(processor, ["What color is it?", "How many circles are there?"], images)
    with torch.no_grad():
        ours = model(**enc).logits
        feats = model.get_image_features(enc["pixel_values"])  # (2, 5, C)
        assert feats.shape == (2, model.config.num_image_tokens, model.config.text_config.n_embd)
        embeds = ref.transformer.wte(enc["input_ids"]).clone()
        for b in range(2):  # naive: find each sample's <image> positions and add its features
            pos = (enc["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
            embeds[b, pos] += feats[b]
        theirs = ref(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_image_tokens_anywhere_and_several_images_per_sample(tiny_pair):
    model, processor = tiny_pair
    ref = reference_gpt2(model)
    imgs = [make_image(3), make_image(4), make_image(5)]
    texts = ["<image> first then <image> second", "a question about <image> this one"]
    enc = processor(text=texts, images=imgs)
    with torch.no_grad():
        ours = model(**enc).logits
        feats = model.get_image_features(enc["pixel_values"]).flatten(0, 1)  # (3 * 5, C) in order
        embeds = ref.transformer.wte(enc["input_ids"]).clone()
        mask = enc["input_ids"] == model.config.image_token_id
        embeds[mask] += feats
        theirs = ref(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_replace_fusion_puts_features_in_place_of_embeddings(backbone_dirs):
    model, processor = from_backbones(
        *backbone_dirs, fusion="replace", projector_num_heads=4, projector_ffn_dim=64
    )
    model.eval()
    ref = reference_gpt2(model)
    enc = batch(processor, ["What is it?"], [make_image(6)])
    with torch.no_grad():
        feats = model.get_image_features(enc["pixel_values"])[0]
        embeds = ref.transformer.wte(enc["input_ids"]).clone()
        embeds[0, enc["input_ids"][0] == model.config.image_token_id] = feats
        torch.testing.assert_close(
            model(**enc).logits, ref(inputs_embeds=embeds).logits, rtol=1e-5, atol=1e-5
        )


def test_count_mismatch_raises_naming_both_counts(tiny_pair):
    model, processor = tiny_pair
    enc = batch(processor, ["one", "two"], [make_image(7), make_image(8)])
    with pytest.raises(ValueError, match=r"10 <image> tokens but 1 images.*5 = 5"):
        model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"][:1])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=enc["input_ids"])
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        processor(text=["<image> a", "<image> b"], images=[make_image(9)])


def disable_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):  # the projector's attention dropout is a float
            m.dropout = 0.0


def right_padded_batch(processor, examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, labels and attention mask of encoded examples, padded on the right to the longest."""
    width = max(len(e["input_ids"]) for e in examples)
    pad = processor.tokenizer.pad_token_id
    ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in examples])
    attn = (torch.arange(width)[None] < torch.tensor([len(e["input_ids"]) for e in examples])[:, None]).long()
    return ids, labels, attn


def test_loss_on_labelled_positions_only_equals_full_logits_loss(tiny_pair):
    model, processor = tiny_pair
    model = copy.deepcopy(model)
    examples = [
        processor.encode_example("What color is the circle?", "red"),
        processor.encode_example("How many?", "3"),
    ]
    ids, labels, attn = right_padded_batch(processor, examples)
    width = ids.shape[1]
    pixels = processor.preprocess_images([make_image(10), make_image(11)])
    model.train()
    disable_dropout(model)  # the two paths must see the same network
    out = model(input_ids=ids, attention_mask=attn, pixel_values=pixels, labels=labels)
    assert out.logits is None  # training with labels: no (B, T, vocab) logits
    full = model(input_ids=ids, attention_mask=attn, pixel_values=pixels, labels=labels, return_logits=True)
    assert full.logits.shape == (2, width, model.config.text_config.vocab_size)
    naive = torch.nn.functional.cross_entropy(
        full.logits[:, :-1].reshape(-1, full.logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    torch.testing.assert_close(out.loss, naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.loss, naive, rtol=1e-5, atol=1e-6)


def test_answer_weights_make_each_answer_count_once(tiny_pair):
    """`loss_weights=answer_weights(labels)`: the loss is the mean over answers of each answer's mean token
    cross-entropy. Reference: the answers found by walking the labels, the loss summed answer by answer from
    the full logits."""
    from gpt2mm.modeling import answer_weights

    model, processor = tiny_pair
    model = copy.deepcopy(model)
    examples = [  # several answers a sample, of one token (plus end-of-text) and of many
        processor.encode_conversation(
            [
                ("user", "What color?"),
                ("assistant", "red"),
                ("user", "Describe it."),
                ("assistant", "A red circle at the top left, and a small blue square below it."),
            ]
        ),
        processor.encode_conversation(
            [("user", "How many?"), ("assistant", "3"), ("user", "Is it?"), ("assistant", "no")]
        ),
    ]
    ids, labels, attn = right_padded_batch(processor, examples)
    pixels = processor.preprocess_images([make_image(10), make_image(11)])
    model.train()
    disable_dropout(model)
    weights = answer_weights(labels)
    inputs = {"input_ids": ids, "attention_mask": attn, "pixel_values": pixels, "labels": labels}
    out = model(**inputs, loss_weights=weights)
    full = model(**inputs, return_logits=True)
    answers = []  # [(row, [positions])], walking each row
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[row, t] == IGNORE_INDEX:
                continue
            if t == 0 or labels[row, t - 1] == IGNORE_INDEX:
                answers.append((row, []))
            answers[-1][1].append(t)
    assert len(answers) == 4 and sorted(len(a[1]) for a in answers)[-1] > 10
    expected = torch.zeros(labels.shape)
    per_answer = []
    for row, positions in answers:
        expected[row, positions] = 1 / len(positions)
        ce = [
            torch.nn.functional.cross_entropy(full.logits[row, t - 1].float(), labels[row, t])
            for t in positions
        ]
        per_answer.append(torch.stack(ce).mean())
    torch.testing.assert_close(weights, expected)
    naive = torch.stack(per_answer).mean()
    torch.testing.assert_close(out.loss, naive, rtol=1e-5, atol=1e-6)
    weighted_full = model(**inputs, return_logits=True, loss_weights=weights)
    torch.testing.assert_close(weighted_full.loss, naive, rtol=1e-5, atol=1e-6)


def test_frozen_vision_gets_no_gradients(tiny_pair):
    model, processor = tiny_pair
    model = copy.deepcopy(model).train()
    assert model.config.freeze_vision and not model.vision_tower.training  # stays in eval mode
    ex = processor.encode_example("What color?", "red")
    out = model(
        input_ids=torch.tensor([ex["input_ids"]]),
        labels=torch.tensor([ex["labels"]]),
        pixel_values=processor.preprocess_images([make_image(12)]),
    )
    out.loss.backward()
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert model.language_model.wte.weight.grad.abs().sum() > 0


def test_cached_greedy_decoding_equals_uncached(tiny_pair):
    model, processor = tiny_pair
    enc = batch(processor, ["What color is the circle?"], [make_image(13)])
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with torch.no_grad():
        cached = model.generate(**enc, use_cache=True, **kw)
        uncached = model.generate(**enc, use_cache=False, **kw)
        assert torch.equal(cached, uncached)
        # and step by step: the cached step's logits equal a full forward over the whole sequence
        out = model(**enc, use_cache=True)
        full = model(input_ids=cached, pixel_values=enc["pixel_values"]).logits
        torch.testing.assert_close(
            out.logits[:, -1], full[:, enc["input_ids"].shape[1] - 1], rtol=1e-4, atol=1e-5
        )
        step = model(input_ids=cached[:, -8:-7], cache=out.cache)
        torch.testing.assert_close(
            step.logits[:, -1], full[:, enc["input_ids"].shape[1]], rtol=1e-4, atol=1e-5
        )


def test_image_encoded_once_in_prefill(tiny_pair, monkeypatch):
    model, processor = tiny_pair
    calls = []
    original = model.vision_tower.embeddings.forward  # the tower's first step
    monkeypatch.setattr(
        model.vision_tower.embeddings, "forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    enc = batch(processor, ["What?"], [make_image(14)])
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert len(calls) == 1


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_pair):
    model, processor = tiny_pair
    questions = ["What color is the big circle on the left?", "How many?", "Is there a red square?"]
    images = [make_image(20 + i) for i in range(3)]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        enc = batch(processor, questions, images, padding_side="left")
        together = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1] :]
        for i in range(3):
            single = batch(processor, [questions[i]], [images[i]])
            alone = model.generate(**single, **kw)[:, single["input_ids"].shape[1] :]
            assert torch.equal(together[i], alone[0]), i


def test_sampling_and_beam_search(tiny_pair):
    model, processor = tiny_pair
    enc = batch(processor, ["What?", "Where is it?"], [make_image(30), make_image(31)], padding_side="left")
    with torch.no_grad():
        torch.manual_seed(0)
        a = model.generate(**enc, do_sample=True, top_p=0.9, temperature=1.0, max_new_tokens=5)
        torch.manual_seed(0)
        b = model.generate(**enc, do_sample=True, top_p=0.9, temperature=1.0, max_new_tokens=5)
        assert torch.equal(a, b)
        beams = model.generate(**enc, num_beams=3, num_return_sequences=2, max_new_tokens=4, do_sample=False)
        assert beams.shape[0] == 4
        # beam search with one beam is greedy
        greedy = model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        one_beam = model.generate(**enc, num_beams=1, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(greedy, one_beam)
        # several images per sample survive the expansion for beams
        multi = processor(
            text=["<image> and <image> A:", "<image> A:"],
            images=[make_image(1), make_image(2), make_image(3)],
            padding_side="left",
        )
        out = model.generate(**multi, num_beams=2, num_return_sequences=2, max_new_tokens=3)
        assert out.shape[0] == 4
    assert (beams[:, enc["input_ids"].shape[1] :] != model.config.image_token_id).all()


def test_save_load_roundtrip_is_bit_identical_and_auto_classes_find_it(tiny_pair, tmp_path):
    model, processor = tiny_pair
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "gpt2mm"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(loaded, MultimodalGPT2ForConditionalGeneration)
    assert type(AutoModel.from_pretrained(tmp_path)).__name__ == "MultimodalGPT2Model"  # no LM head
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.vision_frozen  # freezing survives loading
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(proc2, MultimodalGPT2Processor) and proc2.num_image_tokens == processor.num_image_tokens
    enc = batch(processor, ["What?"], [make_image(40)])
    enc2 = batch(proc2, ["What?"], [make_image(40)])
    assert torch.equal(enc["input_ids"], enc2["input_ids"]) and torch.equal(
        enc["pixel_values"], enc2["pixel_values"]
    )
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, loaded.eval()(**enc).logits)


def test_vision_hidden_states_stand_in_for_pixels(tiny_pair):
    model, processor = tiny_pair
    enc = batch(processor, ["What?"], [make_image(41)])
    with torch.no_grad():
        states = model.get_vision_hidden_states(enc["pixel_values"])
        a = model(**enc).logits
        b = model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], vision_hidden_states=states
        ).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("layer", [-1, -2, 0, 1, 2])
def test_vision_feature_layer_equals_clips_hidden_states(tiny_pair, layer):
    """The tower runs only up to the chosen layer; what it returns is CLIP's own hidden state there."""
    model, _ = tiny_pair
    pixels = torch.randn(3, 3, 32, 32)
    model = copy.copy(model)  # a shallow copy: its own config, the same weights
    model.config = copy.deepcopy(model.config)
    model.config.vision_feature_layer = layer
    with torch.no_grad():
        ref = model.vision_tower(pixel_values=pixels, output_hidden_states=True)
        ours = model.get_vision_hidden_states(pixels)
    assert len(ref.hidden_states) == 3  # embeddings + 2 layers
    torch.testing.assert_close(ours, ref.hidden_states[layer], rtol=0, atol=0)
    if layer == -1:
        torch.testing.assert_close(ours, ref.last_hidden_state, rtol=0, atol=0)


def test_drop_cls_and_projector_layers_options():
    cfg = MultimodalGPT2Config.from_preset("tiny", vision_drop_cls=True, projector_num_layers=2)
    assert cfg.num_image_tokens == 9
    model = MultimodalGPT2ForConditionalGeneration(cfg)
    assert len(model.projector.layers) == 2
    feats = model.get_image_features(torch.randn(2, 3, 48, 48))
    assert feats.shape == (2, 9, cfg.text_config.n_embd)
    with pytest.raises(ValueError, match="fusion"):
        MultimodalGPT2Config.from_preset("tiny", fusion="concat")


def test_projector_coordinates_add_each_patch_centre_along_two_learned_directions(tmp_path):
    """With `projector_coordinates`, an image feature is the projector's output plus x * u + y * v, (x, y) the
    centre of its patch in [-1, 1] in raster order and the CLS feature unchanged; it is saved and loaded with
    the model. Without it the model has no such parameter."""
    plain = MultimodalGPT2ForConditionalGeneration(MultimodalGPT2Config.from_preset("tiny"))
    assert not any("coord" in name for name, _ in plain.named_parameters())
    cfg = MultimodalGPT2Config.from_preset("tiny", projector_coordinates=True)
    model = MultimodalGPT2ForConditionalGeneration(cfg).eval()
    u, v = model.projector.coord_embedding.detach()
    assert 0.3 < float(u.std()) < 0.7 and 0.3 < float(v.std()) < 0.7  # drawn, not zeros
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        feats = model.get_image_features(pixels)
        learned, model.projector.coord_embedding = model.projector.coord_embedding, None
        expected = model.get_image_features(pixels)  # the projector alone
        model.projector.coord_embedding = learned
    for i in range(9):  # the tiny preset: CLS, then a 3x3 grid of 16 px patches (centres at -1, 0, 1)
        row, col = divmod(i, 3)
        expected[:, 1 + i] += (col - 1) * u + (row - 1) * v
    torch.testing.assert_close(feats, expected)
    model.save_pretrained(tmp_path)
    loaded = MultimodalGPT2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.projector_coordinates
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_image_features(pixels), feats, rtol=0, atol=0)
    from gpt2mm.layers import image_token_coordinates

    with pytest.raises(ValueError, match="not a square grid"):
        image_token_coordinates(12)


def test_the_config_builds_its_sub_configs_as_older_transformers_need(monkeypatch):
    """transformers before 5.20 (what vLLM pins) builds no sub-config from `sub_configs_defaults`, and builds a
    default config to compare with when it saves or prints one: the config builds its sub-configs itself, the
    same as transformers 5.20+ does, and its defaults are valid (GPT-2's vocabulary, grown to hold `<image>`)."""
    from transformers import CLIPVisionConfig, GPT2Config

    kwargs = dict(
        text_config={"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300},
        vision_config={"hidden_size": 32, "num_attention_heads": 4, "image_size": 32, "patch_size": 16},
        image_token_id=299,
    )
    built = MultimodalGPT2Config(**copy.deepcopy(kwargs))
    monkeypatch.setattr(MultimodalGPT2Config, "sub_configs_defaults", {})  # as transformers < 5.20 does
    own = MultimodalGPT2Config(**copy.deepcopy(kwargs))
    assert type(own.text_config) is GPT2Config and type(own.vision_config) is CLIPVisionConfig
    assert own.to_dict() == built.to_dict()
    default = MultimodalGPT2Config()
    assert default.text_config.vocab_size == default.image_token_id + 1 == 50258
    assert MultimodalGPT2Config(image_token_id=5).text_config.vocab_size == 50257  # GPT-2's, when it holds it


@pytest.mark.parametrize("name", ["seed", "small", "tiny"])
def test_presets_offline_and_seed_under_a_billion(name):
    cfg = MultimodalGPT2Config.from_preset(name)
    with torch.device("meta"):
        model = MultimodalGPT2ForConditionalGeneration(cfg)
    n = sum(p.numel() for p in model.parameters())
    if name == "seed":
        assert cfg.num_image_tokens == 50 and cfg.text_config.n_embd == 1280 and cfg.text_config.n_layer == 36
        assert 8e8 < n < 1e9, n  # CLIP ViT-B/32 vision (88M) + GPT-2 large (774M) + projector
    if name == "tiny":
        assert n < 5e6 and not cfg.freeze_vision
        # GPT-2's own activation (gelu_new, the tanh approximation), as one fused kernel
        from transformers.activations import ACT2FN

        x = torch.linspace(-6, 6, 1001)
        act = ACT2FN[cfg.text_config.activation_function]
        torch.testing.assert_close(act(x), ACT2FN["gelu_new"](x), rtol=1e-5, atol=1e-6)


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """`compile_blocks` (regional torch.compile) computes the same function: loss and every gradient."""
    torch.manual_seed(0)
    cfg = MultimodalGPT2Config.from_preset("tiny", attn_implementation="sdpa")
    eager = MultimodalGPT2ForConditionalGeneration(cfg).train()
    disable_dropout(eager)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    t = cfg.num_image_tokens
    for width in (0, 3):  # a second width: the dynamic-shape graph is reused, not recompiled wrong
        ids = torch.tensor([[2] + [cfg.image_token_id] * t + [5, 6, 7, 3, 9] + [8] * width] * 2)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # one padded row
        labels = torch.where(mask.bool(), ids, IGNORE_INDEX)
        labels[:, : t + 4] = IGNORE_INDEX
        pixels = torch.randn(2, 3, 48, 48)
        out = {}
        for name, model in (("eager", eager), ("compiled", compiled)):
            model.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
            loss.backward()
            out[name] = (loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        torch.testing.assert_close(out["compiled"][0], out["eager"][0], rtol=1e-5, atol=1e-6)
        assert out["compiled"][1].keys() == out["eager"][1].keys()
        for name, grad in out["eager"][1].items():
            torch.testing.assert_close(out["compiled"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    compiled.eval()  # generation's KV cache changes every step: eval mode runs the blocks eager
    assert all(block._compiled_call_impl is None for block in compiled._blocks())
    compiled.train()
    assert all(block._compiled_call_impl is not None for block in compiled._blocks())


def test_static_cache_compiled_decoding_equals_the_dynamic_cache():
    """transformers' static KV cache, with the decoding step compiled whole (fullgraph), writes the same
    greedy answers as the default cache, on left-padded batches."""
    from transformers import CompileConfig

    from conftest import wide_tiny_model

    model, processor = wide_tiny_model()
    questions = ["What color is the big circle on the left?", "How many?"]
    enc = batch(processor, questions, [make_image(30), make_image(31)], padding_side="left")
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only by default
    with torch.no_grad():
        dynamic = model.generate(**enc, **kw)
        static = model.generate(**enc, **kw, cache_implementation="static")
        compiled = model.generate(**enc, **kw, cache_implementation="static", compile_config=compile_config)
    assert len(set(dynamic[:, -6:].flatten().tolist())) > 2  # answers that differ: the check can fail
    assert torch.equal(static, dynamic)
    assert torch.equal(compiled, dynamic)


def test_a_loss_forward_builds_no_kv_cache(tiny_pair):
    model, processor = tiny_pair
    enc = processor.encode_example("What color?", "red")
    out = model(
        input_ids=torch.tensor([enc["input_ids"]]),
        labels=torch.tensor([enc["labels"]]),
        pixel_values=processor.preprocess_images([make_image(32)]),
    )
    assert out.cache is None
    assert model(input_ids=torch.tensor([enc["input_ids"][-3:]])).cache is not None  # generation keeps it


def test_right_padded_loss_batches_drop_the_mask_for_the_causal_kernel(tiny_pair, monkeypatch):
    """A right-padded training batch runs GPT-2's attention without the padding mask (causal attention
    already keeps real tokens from the later pads), with the loss and gradients of the masked forward."""
    model, processor = tiny_pair
    model = copy.deepcopy(model).train()
    disable_dropout(model)  # the two forwards must compute the same function
    examples = [
        processor.encode_example("What color is the big circle on the left?", "dark red"),
        processor.encode_example("How many?", "3"),
    ]
    ids, labels, attn = right_padded_batch(processor, examples)
    width = ids.shape[1]
    pixels = processor.preprocess_images([make_image(40), make_image(41)])
    masks_seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if q.shape[-2] == width and q.ndim == 4:  # GPT-2's attention (the vision tower's has other lengths)
            masks_seen.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask, dropout_p, is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    grads = {}
    for name, kw in (("fast", {}), ("masked", {"return_logits": True})):  # logits asked for: mask kept
        model.zero_grad()
        masks_seen.clear()
        loss = model(input_ids=ids, attention_mask=attn, pixel_values=pixels, labels=labels, **kw).loss
        loss.backward()
        grads[name] = (loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert masks_seen and all(
            m == ((True, True) if name == "fast" else (False, False)) for m in masks_seen
        )
    torch.testing.assert_close(grads["fast"][0], grads["masked"][0], rtol=1e-5, atol=1e-6)
    for n, g in grads["masked"][1].items():
        torch.testing.assert_close(grads["fast"][1][n], g, rtol=1e-4, atol=1e-6, msg=n)
    # left padding, or a label on a pad, keeps the mask
    from gpt2mm.modeling import right_padded

    assert right_padded(attn, labels)
    assert not right_padded(attn.flip(1), labels.flip(1))
    bad = labels.clone()
    bad[1, -1] = 5
    assert not right_padded(attn, bad)


def test_what_cannot_be_loaded_is_one_clear_error(tmp_path, capsys):
    """Offline (the tests set HF_HUB_OFFLINE) or mistyped: a name that is no local directory and not on the
    hub, and a preset whose backbones or tokenizer come from the hub, fail with one line naming what was being
    loaded: an OSError for library users (as transformers raises) and a usage error for the CLI (exit 2)."""
    from gpt2mm import build_model, load_model
    from gpt2mm.cli import main
    from gpt2mm.errors import ModelNotFoundError

    with pytest.raises(OSError, match=r"runs/nope: no such directory; as a hub id: cannot be loaded") as e:
        load_model("runs/nope")
    assert isinstance(e.value, ModelNotFoundError)
    with pytest.raises(
        OSError, match=r"preset 'small': its tokenizer openai-community/gpt2 .*cannot be loaded"
    ):
        build_model("small", pretrained=False)
    with pytest.raises(SystemExit) as e:
        main(["init", "--preset", "seed", "--pretrained", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "preset 'seed': its backbones openai/clip-vit-base-patch32 and openai-community/gpt2-large" in err
    assert not (tmp_path / "out").exists()


def test_hidden_states_are_what_the_lm_head_reads(tiny_pair):
    """The public hidden-states method: the LM head on it gives forward's logits (right padding, where
    forward's default positions equal those from the mask), and left padding gives the unpadded rows."""
    model, processor = tiny_pair
    questions = ["What color is the big circle on the left?", "How many?"]
    images = [make_image(30), make_image(31)]
    with torch.no_grad():
        enc = batch(processor, questions, images, padding_side="right")
        hidden = model.hidden_states(enc["input_ids"], enc["attention_mask"], enc["pixel_values"])
        logits = model(**enc).logits
        mask = enc["attention_mask"].bool()
        torch.testing.assert_close(model.lm_head(hidden)[mask], logits[mask], rtol=1e-5, atol=1e-5)
        left = batch(processor, questions, images, padding_side="left")
        vision = model.get_vision_hidden_states(left["pixel_values"])
        padded = model.hidden_states(left["input_ids"], left["attention_mask"], vision_hidden_states=vision)
        for i in range(2):
            single = batch(processor, [questions[i]], [images[i]])
            alone = model.hidden_states(single["input_ids"], single["attention_mask"], single["pixel_values"])
            n = alone.shape[1]
            torch.testing.assert_close(padded[i, -n:], alone[0], rtol=1e-5, atol=1e-5)


def test_conv_stem_is_a_stack_of_strided_convolutions_on_clips_grid(tmp_path):
    """vision_stem="conv": CLIP's patch embedding becomes 3x3 stride-2 convolutions down to the same patch
    grid; the tower's embeddings equal a naive re-computation (F.conv2d + GELU, CLS and positions added),
    and the model saves and loads bit-identically."""
    import torch.nn.functional as F

    cfg = MultimodalGPT2Config.from_preset(
        "tiny", vision_stem="conv", vision_config={"patch_size": 8}, vision_feature_layer=0
    )
    assert cfg.num_image_tokens == 37
    model = MultimodalGPT2ForConditionalGeneration(cfg).eval()
    emb = model.vision_tower.embeddings
    pixels = torch.randn(2, 3, 48, 48)
    x = pixels
    convs = [m for m in emb.patch_embedding if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    for i, conv in enumerate(convs):
        x = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
        if i < len(convs) - 1:
            x = F.gelu(x)
    patches = x.flatten(2).transpose(1, 2)  # (2, 36, 128)
    ref = torch.cat([emb.class_embedding.expand(2, 1, -1), patches], 1) + emb.position_embedding.weight
    with torch.no_grad():
        ours = model.get_vision_hidden_states(pixels)
        torch.testing.assert_close(ours, model.vision_tower.pre_layrnorm(ref))
    model.save_pretrained(tmp_path)
    loaded = MultimodalGPT2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="power of 2"):
        MultimodalGPT2Config.from_preset("tiny", vision_stem="conv", vision_config={"patch_size": 12})
    with pytest.raises(ValueError, match="vision_stem"):
        MultimodalGPT2Config.from_preset("tiny", vision_stem="resnet")


def test_cnn_stem_is_a_batch_norm_cnn_on_clips_grid_and_its_statistics_freeze_with_the_tower(tmp_path):
    """vision_stem="cnn": the tower's embeddings equal a naive re-computation (3x3 convolutions, batch norm,
    GELU, 2x2 max pooling, a 1x1 convolution; CLS and positions added) with the batch's statistics in training
    and the running ones in evaluation; a frozen tower's statistics stay put through `.train()`; the model
    saves and loads bit-identically (statistics included)."""
    import torch.nn.functional as F

    cfg = MultimodalGPT2Config.from_preset(
        "tiny", vision_stem="cnn", vision_config={"patch_size": 8}, vision_feature_layer=0
    )
    model = MultimodalGPT2ForConditionalGeneration(cfg)
    emb = model.vision_tower.embeddings
    layers = list(emb.patch_embedding)
    assert [m.out_channels for m in layers if isinstance(m, torch.nn.Conv2d)] == [32, 64, 128, 128, 128]
    pixels = torch.randn(4, 3, 48, 48)

    def naive(training: bool) -> torch.Tensor:
        x = pixels
        for m in layers:
            if isinstance(m, torch.nn.Conv2d):
                x = F.conv2d(x, m.weight, m.bias, padding=m.padding)
            elif isinstance(m, torch.nn.BatchNorm2d):
                if training:
                    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
                else:
                    mean, var = m.running_mean, m.running_var
                x = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + m.eps)
                x = x * m.weight[:, None, None] + m.bias[:, None, None]
            elif isinstance(m, torch.nn.GELU):
                x = F.gelu(x)
            else:
                x = F.max_pool2d(x, 2)
        patches = x.flatten(2).transpose(1, 2)  # (4, 36, 128)
        ref = torch.cat([emb.class_embedding.expand(4, 1, -1), patches], 1) + emb.position_embedding.weight
        return model.vision_tower.pre_layrnorm(ref)

    with torch.no_grad():
        model.train()
        expected = naive(training=True)
        torch.testing.assert_close(model.get_vision_hidden_states(pixels), expected, rtol=1e-4, atol=1e-4)
        model.eval()
        torch.testing.assert_close(
            model.get_vision_hidden_states(pixels), naive(training=False), rtol=1e-4, atol=1e-4
        )
        model.freeze_vision()
        before = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
        model.train()
        model.get_vision_hidden_states(pixels)
        after = model.vision_tower.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    model.save_pretrained(tmp_path)
    loaded = MultimodalGPT2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert any("running_mean" in k for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="power of 2"):
        MultimodalGPT2Config.from_preset("tiny", vision_stem="cnn", vision_config={"patch_size": 6})


def test_cpu_layout_gives_the_default_layouts_loss_and_gradients(monkeypatch):
    """On a CPU the CNN stem runs on channels-last tensors (`gpt2mm.layers.cpu_layout`), for speed only: the loss
    and every gradient equal those of PyTorch's default layout (the reference: the same model with `cpu_layout`
    off), and the stem's convolutions do receive channels-last input."""
    from gpt2mm import layers

    cfg = MultimodalGPT2Config.from_preset(
        "tiny",
        vision_stem="cnn",
        vision_config={"patch_size": 8},
        vision_feature_layer=0,
        projector_coordinates=True,
    )
    torch.manual_seed(0)
    model = MultimodalGPT2ForConditionalGeneration(cfg).train()
    n_img = cfg.num_image_tokens
    ids = torch.randint(2, cfg.text_config.vocab_size, (4, n_img + 12))
    ids[:, 1 : 1 + n_img] = cfg.image_token_id
    labels = ids.clone()
    labels[:, : 1 + n_img] = IGNORE_INDEX
    pixels = torch.randn(4, 3, 48, 48)
    seen = []
    first = model.vision_tower.embeddings.patch_embedding[0]
    first.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last))
    )

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast, fast_grads = loss_and_grads()
    with monkeypatch.context() as m:
        m.setattr(layers, "cpu_layout", lambda x: False)
        ref, ref_grads = loss_and_grads()
    assert seen == [True, False]
    torch.testing.assert_close(fast, ref)
    assert fast_grads.keys() == ref_grads.keys() and any("projector.layers" in n for n in ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_text_options_drop_ln_f_init_like_nn_linear_and_scale_the_embeddings(tmp_path):
    """text_final_norm=False: the logits equal GPT-2's (transformers' GPT2LMHeadModel, same weights) with its
    final LayerNorm made the identity; text_init="pytorch": every GPT-2 matrix and bias is drawn as nn.Linear
    draws it (uniform in +-1/sqrt(fan_in)); text_embedding_std: the token embeddings' spread, the LM head still
    tied to them; all three survive save/load bit-identically; bad values are one-line errors."""
    cfg = MultimodalGPT2Config.from_preset(
        "tiny", text_final_norm=False, text_init="pytorch", text_embedding_std=0.3
    )
    torch.manual_seed(0)
    model = MultimodalGPT2ForConditionalGeneration(cfg).eval()
    lm = model.language_model
    assert "ln_f.weight" not in lm.state_dict()
    ref = GPT2LMHeadModel(cfg.text_config)
    ref.transformer.ln_f = torch.nn.Identity()
    ref.transformer.load_state_dict(lm.state_dict(), strict=True)
    ref.tie_weights()
    ids = torch.randint(2, cfg.text_config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, ref.eval()(input_ids=ids).logits, rtol=0, atol=0
        )
    matrices = [m for m in lm.modules() if type(m).__name__ == "Conv1D"]
    assert len(matrices) == 4 * cfg.text_config.n_layer
    for m in matrices:
        bound = m.weight.shape[0] ** -0.5
        for p in (m.weight, m.bias):
            assert p.abs().max() <= bound
        # uniform on [-b, b]: standard deviation b / sqrt(3) (GPT-2's own init is N(0, 0.02))
        assert abs(m.weight.std().item() - bound / 3**0.5) < 0.05 * bound
    assert abs(lm.wte.weight.std().item() - 0.3) < 0.01 and model.lm_head.weight is lm.wte.weight
    default = MultimodalGPT2ForConditionalGeneration(MultimodalGPT2Config.from_preset("tiny"))
    assert abs(default.language_model.wte.weight.std().item() - 0.02) < 0.002
    assert isinstance(default.language_model.ln_f, torch.nn.LayerNorm)
    model.save_pretrained(tmp_path)
    loaded = MultimodalGPT2ForConditionalGeneration.from_pretrained(tmp_path)
    assert isinstance(loaded.language_model.ln_f, torch.nn.Identity)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="text_init must be"):
        MultimodalGPT2Config.from_preset("tiny", text_init="xavier")
    with pytest.raises(ValueError, match="text_final_norm: for a GPT-2 built from scratch"):
        from_backbones("unused-clip", "unused-gpt2", text_final_norm=False)  # checked before anything loads
    with pytest.raises(ValueError, match="text_embedding_std must be positive"):
        MultimodalGPT2Config.from_preset("tiny", text_embedding_std=0)


def test_gpt2mm_eager_attention_is_transformers_eager_attention_in_the_inputs_dtype():
    """`gpt2mm.layers.eager_attention` (`attn_implementation: gpt2mm_eager`, what `auto` picks on a CPU in bf16)
    against transformers' eager attention, the function it replaces: in fp32 the same outputs and gradients; under
    bf16 autocast as close to the fp32 reference as transformers' is (it skips transformers' fp32 softmax, not
    precision: the scores are bf16 either way); boolean and additive masks alike; a row that may attend to nothing
    gets uniform weights, in fp16 too (where the lowest value plus a score overflows to -inf)."""
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    from gpt2mm.layers import eager_attention

    torch.manual_seed(0)
    b, h, t, d = 3, 2, 20, 16
    q, k, v = (torch.randn(b, t, h, d).transpose(1, 2) for _ in range(3))  # (B, H, T, D) views, as GPT-2's
    allow = (torch.rand(b, 1, t, t) < 0.5) | torch.eye(t, dtype=torch.bool)
    allow[0, 0, 3] = False  # nothing to attend to,
    q[0, :, 3] *= 30  # with scores far from 0 (in fp16 the lowest value plus -20 is -inf)
    additive = torch.zeros(b, 1, t, t).masked_fill(~allow, torch.finfo(torch.float32).min)
    module = torch.nn.Module().train()  # what an attention function reads from its layer: `training`

    def run(fn, mask, dtype, autocast=False):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, weights = fn(module, *leaves, mask, scaling=d**-0.5)
        (out.float() * torch.linspace(-1, 1, d)).sum().backward()
        return [out.float()] + [x.grad.float() for x in leaves], weights

    ref, ref_weights = run(eager_attention_forward, additive, torch.float32)
    assert torch.allclose(ref_weights[0, :, 3], torch.full((h, t), 1 / t))  # transformers': uniform
    theirs_bf16, _ = run(eager_attention_forward, additive, torch.bfloat16, autocast=True)
    for mask in (additive, allow):
        ours, weights = run(eager_attention, mask, torch.float32)
        assert torch.equal(weights[0, :, 3], ref_weights[0, :, 3])
        for a, r in zip(ours, ref):  # the output and the query, key and value gradients
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        ours_bf16, weights = run(eager_attention, mask, torch.bfloat16, autocast=True)
        assert weights.dtype == torch.bfloat16
        torch.testing.assert_close(weights[0, :, 3].float(), ref_weights[0, :, 3], rtol=0, atol=1e-3)
        for name, a, x, r in zip(("output", "query", "key", "value"), ours_bf16, theirs_bf16, ref):
            mine, theirs = (a - r).abs().mean(), (x - r).abs().mean()
            assert mine <= 1.5 * theirs, (name, mine, theirs)
        ours_fp16, weights = run(eager_attention, mask, torch.float16)
        torch.testing.assert_close(weights[0, :, 3].float(), ref_weights[0, :, 3], rtol=0, atol=1e-3)
        for a, r in zip(ours_fp16, ref):
            torch.testing.assert_close(a, r, rtol=0.02, atol=0.02)


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """The (shared) model with `name` as its attention implementation, then the one it had."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


@pytest.mark.parametrize("implementation", ["eager", "gpt2mm_eager"])
def test_eager_attentions_give_sdpas_logits_and_generations(tiny_pair, implementation):
    """The whole model with either eager attention, against SDPA (the model's default): the same logits on a
    left-padded batch and the same generated tokens (KV cache, padding masks built by transformers)."""
    model, processor = tiny_pair
    questions = ["What color is the big circle on the left?", "How many?"]
    enc = batch(processor, questions, [make_image(30), make_image(31)], padding_side="left")
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    out = {}
    for name in ("sdpa", implementation):
        with attention_implementation(model, name), torch.no_grad():
            out[name] = model(**enc).logits, model.generate(**enc, **kw)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(out[implementation][0][real], out["sdpa"][0][real], rtol=1e-4, atol=1e-4)
    assert torch.equal(out[implementation][1], out["sdpa"][1])


def test_gpt2mm_eager_under_bf16_autocast_is_as_close_to_fp32_as_transformers_eager(tiny_pair):
    """The path `auto` picks on a CPU with native bf16, on the whole model (GPT-2's attention and the CLIP tower's,
    which `set_attn_implementation` switches too): under bf16 autocast its logits are as close to the fp32 logits
    as those of transformers' eager attention under the same autocast."""
    model, processor = tiny_pair
    questions = ["What color is the big circle on the left?", "How many?"]
    enc = batch(processor, questions, [make_image(32), make_image(33)], padding_side="left")
    real = enc["attention_mask"].bool()
    logits = {}
    for name, bf16 in (("sdpa", False), ("eager", True), ("gpt2mm_eager", True)):
        with attention_implementation(model, name), torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits[name] = model(**enc).logits.float()[real]
    mine, theirs = ((logits[n] - logits["sdpa"]).abs().mean() for n in ("gpt2mm_eager", "eager"))
    assert 0 < mine <= 1.5 * theirs, (mine, theirs)
