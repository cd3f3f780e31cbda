"""The processor: placeholder expansion, the seed's prompt format and its answer-only labels."""

from __future__ import annotations

import pytest
import torch

from conftest import make_image
from gpt2mm import (
    MultimodalGPT2Config,
    MultimodalGPT2ForConditionalGeneration,
    MultimodalGPT2Processor,
    build_model,
)
from gpt2mm.cli import main
from gpt2mm.config import IGNORE_INDEX
from gpt2mm.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_processor():
    return build_model("tiny")[1]


def test_placeholder_expands_to_num_image_tokens(tiny_processor):
    p = tiny_processor
    enc = p(text=["Q: <image> What color? A:", "no image here"], images=[make_image(0)])
    ids = enc["input_ids"]
    assert (ids[0] == p.image_token_id).sum() == p.num_image_tokens == 10
    assert (ids[1] == p.image_token_id).sum() == 0
    assert enc["pixel_values"].shape == (1, 3, 48, 48)
    # the expanded run is contiguous
    pos = (ids[0] == p.image_token_id).nonzero().flatten()
    assert torch.equal(pos, torch.arange(pos[0], pos[0] + 10))


def test_answer_only_labels(tiny_processor):
    p = tiny_processor
    ex = p.encode_example("What color is the circle?", "dark red")
    ids, labels = ex["input_ids"], ex["labels"]
    answer = p.tokenizer(" dark red", add_special_tokens=False)["input_ids"] + [p.tokenizer.eos_token_id]
    n = len(answer)
    assert ids[-n:] == answer and labels[-n:] == answer
    assert labels[:-n] == [IGNORE_INDEX] * (len(ids) - n)
    # the prompt part is exactly what inference feeds the model
    prompt_ids = p(text=p.format_prompt("What color is the circle?"))["input_ids"][0].tolist()
    assert ids[:-n] == prompt_ids
    assert p.decode(ids) == "Q: " + "<image>" * 10 + " What color is the circle? A: dark red<|endoftext|>"


def test_conversation_labels_cover_assistant_turns_only(tiny_processor):
    p = tiny_processor
    turns = [
        ("user", "Describe it."),
        ("assistant", "A red circle."),
        ("user", "How many?"),
        ("assistant", "1"),
    ]
    ex = p.encode_conversation(turns)
    kept = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    eos = p.tokenizer.eos_token_id
    expected = p._tokens(" A red circle.") + [eos] + p._tokens(" 1") + [eos]
    assert kept == expected
    assert ex["input_ids"].count(p.image_token_id) == 10  # the image goes in the first turn only
    with pytest.raises(ValueError, match="alternate"):
        p.encode_conversation([("assistant", "hi")])


def test_postprocess_answer(tiny_processor):
    p = tiny_processor
    assert p.postprocess_answer(" red<|endoftext|>Q: more") == "red"
    assert p.postprocess_answer(" 3\nQ: next") == "3"


def test_init_command_writes_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["init", "--preset", "tiny", str(out)]) == 0
    model = MultimodalGPT2ForConditionalGeneration.from_pretrained(out)
    proc = MultimodalGPT2Processor.from_pretrained(out)
    assert model.config.num_image_tokens == proc.num_image_tokens == 10
    assert proc.tokenizer.get_vocab() == build_tiny_tokenizer().get_vocab()  # deterministic, offline
    assert MultimodalGPT2Config.from_pretrained(out).to_dict() == MultimodalGPT2Config.from_preset(
        "tiny"
    ).to_dict() | {
        k: v
        for k, v in model.config.to_dict().items()
        if k in ("architectures", "transformers_version", "dtype")
    }
    with pytest.raises(SystemExit):  # never writes over what is there
        main(["init", "--preset", "tiny", str(out)])
    assert "not an empty directory" in capsys.readouterr().err


def test_training_and_serving_encode_a_multi_image_conversation_alike(tiny_processor):
    """One prompt format: the processor's training encoding of a conversation (several turns, several
    images per turn) starts with exactly the ids the serving engine feeds the model for its prompt."""
    from gpt2mm.serve.engine import Engine

    p = tiny_processor
    model = MultimodalGPT2ForConditionalGeneration(MultimodalGPT2Config.from_preset("tiny"))
    engine = Engine(model, p, device="cpu")
    turns = [
        ("user", "What is in these two?", 2),
        ("assistant", "two circles", 0),
        ("user", " And in this one? ", 1),
        ("assistant", "a red square", 0),
        ("user", "How many shapes in all?", 0),
    ]
    train = p.encode_turns([*turns, ("assistant", "3", 0)])
    prompt = engine.prepare(turns, [make_image(i) for i in range(3)])
    assert prompt.num_images == 3
    assert prompt.input_ids == engine.encode_turns(turns) == p.encode_turns(turns)["input_ids"]
    n = len(prompt.input_ids)
    assert train["input_ids"][:n] == prompt.input_ids
    assert prompt.input_ids.count(p.image_token_id) == 3 * p.num_image_tokens
    answer = p._tokens(" 3") + [p.tokenizer.eos_token_id]
    assert train["input_ids"][n:] == train["labels"][n:] == answer
    kept = [t for t, lab in zip(train["input_ids"][:n], train["labels"][:n]) if lab != IGNORE_INDEX]
    eos = p.tokenizer.eos_token_id
    assert kept == p._tokens(" two circles") + [eos] + p._tokens(" a red square") + [eos]
    # the image only in the first turn: encode_conversation (training) and the engine (serving) agree
    first_only = [("user", "What color?", 1), ("assistant", "red", 0), ("user", "Why?", 0)]
    assert engine.encode_turns(first_only) == p.encode_conversation([t[:2] for t in first_only])["input_ids"]
    # a prompt to answer must end with a question, and a question needs text; training data need not
    with pytest.raises(ValueError, match="end with a user turn"):
        engine.encode_turns(turns[:2])
    with pytest.raises(ValueError, match="turn 2: the question is empty"):
        engine.encode_turns([*turns[:2], ("user", "  ", 1)])
    with pytest.raises(ValueError, match="assistant turns cannot hold images"):
        p.encode_turns([("user", "Hi", 0), ("assistant", "hello", 1)])


def test_stop_strings_are_shared_by_postprocessing_and_serving(tiny_processor):
    from gpt2mm.processing import STOP_STRINGS
    from gpt2mm.serve.engine import Choice, GenerationRequest, Prompt, SamplingParams, _Row

    request = GenerationRequest(Prompt([0]), SamplingParams(stop=("zz",)))
    assert _Row(request, Choice(0), 4, ("zz",)).stops == (*STOP_STRINGS, "zz")
    for stop in STOP_STRINGS:
        assert tiny_processor.postprocess_answer(f" red{stop}more") == "red"
