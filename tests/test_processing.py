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
        if k in ("architectures", "transformers_version", "dtype", "auto_map")  # auto_map: gpt2mm.hub
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


# --- several images per sample ----------------------------------------------------------------------------


def test_two_images_encode_where_their_placeholders_stand(tiny_processor):
    p = tiny_processor
    run, eos = [p.image_token_id] * p.num_image_tokens, p.tokenizer.eos_token_id
    enc = p.encode_turns([("user", "Compare<image>and \n<image>.", 2), ("assistant", "same", 0)])
    # naive: the text pieces tokenized on their own, an image run at each placeholder, one space either side
    prompt = p._tokens("Q: Compare ") + run + p._tokens(" and ") + run + p._tokens(" . A:")
    answer = p._tokens(" same") + [eos]
    assert enc["input_ids"] == prompt + answer
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    starts = [
        i for i, t in enumerate(enc["input_ids"]) if t == p.image_token_id and enc["input_ids"][i - 1] != t
    ]
    assert starts == [
        len(p._tokens("Q: Compare ")),
        len(p._tokens("Q: Compare ")) + 10 + len(p._tokens(" and ")),
    ]
    assert (
        p.decode(enc["input_ids"][: len(prompt)])
        == "Q: Compare " + "<image>" * 10 + " and " + "<image>" * 10 + " . A:"
    )
    # placeholders at the start are the images-before-the-question encoding (a record without placeholders)
    assert p.encode_turns([("user", "<image>\n<image> Which?", 2)]) == p.encode_turns([("user", "Which?", 2)])
    with pytest.raises(ValueError, match="turn 0: the question holds 2 <image> placeholders but 3 images"):
        p.encode_turns([("user", "<image> or <image>?", 3)])
    with pytest.raises(ValueError, match="turn 1: assistant turns cannot hold images"):
        p.encode_turns([("user", "<image> or <image>?", 2), ("assistant", "the <image>", 0)])
    with pytest.raises(ValueError, match="turn 0: the question is empty"):
        p.encode_turns([("user", "<image> <image>", 2)], generation_prompt=True)


def test_single_image_encodings_are_unchanged(tiny_processor):
    """One image (a plain path, or a list of one, wherever its placeholder stood) encodes as the seed's
    format string, token for token."""
    from gpt2mm.data.collate import encode_samples
    from gpt2mm.data.samples import Sample, Turn

    p = tiny_processor
    img = "<image>" * p.num_image_tokens
    samples = [
        Sample("vqa", "a.png", [Turn("user", "What color is it?"), Turn("assistant", "red")]),
        Sample(
            "chat",
            "a.png",
            [
                Turn("user", "Describe."),
                Turn("assistant", "A red circle."),
                Turn("user", "How many?"),
                Turn("assistant", "1"),
            ],
        ),
        Sample("text", None, [Turn("user", "Say hi."), Turn("assistant", "Hi!")]),
    ]
    expected = [
        f"Q: {img} What color is it? A: red<|endoftext|>",
        f"Q: {img} Describe. A: A red circle.<|endoftext|>Q: How many? A: 1<|endoftext|>",
        "Q: Say hi. A: Hi!<|endoftext|>",
    ]
    encoded, report = encode_samples(samples, p, max_length=200)
    assert report.kept == 3
    for e, text in zip(encoded, expected):
        assert e.input_ids == p._tokens(text)
    assert [e.images for e in encoded] == [["a.png"], ["a.png"], []]
    assert p.format_prompt("<image>\nWhat?") == p.format_prompt("What?") == "Q: <image> What? A:"


def test_a_data_set_encodes_as_each_sample_alone(tiny_processor):
    """`encode_samples` tokenizes each distinct question, answer and prompt once (its memo); every example is
    still the sample's own encoding, token for token, however often its parts repeat."""
    from gpt2mm.data.collate import encode_samples
    from gpt2mm.data.samples import Sample, Turn

    p = tiny_processor
    questions = ["What color is it?", "How many?", "Is there a red circle?"]
    samples = [
        Sample(
            str(i),
            f"{i % 3}.png" if i % 5 else None,
            [
                turn
                for j in range(1 + i % 3)
                for turn in (Turn("user", questions[(i + j) % 3]), Turn("assistant", ["red", "2", "yes"][j]))
            ],
        )
        for i in range(12)
    ]
    encoded, report = encode_samples(samples, p, max_length=200)
    assert report.kept == len(samples)
    for e, s in zip(encoded, samples):
        alone = p.encode_turns(s.encoder_turns())
        assert (e.input_ids, e.labels) == (alone["input_ids"], alone["labels"])
    memo: dict = {}
    first = p.encode_turns(samples[4].encoder_turns(), memo=memo)
    again = p.encode_turns(samples[4].encoder_turns(), memo=memo)
    assert first == again and {k: p._tokens(k) for k in memo} == memo  # nothing remembered was changed


def test_collator_stacks_every_image_in_order(tiny_pair):
    """The examples' images in order, each example's in its own order: the order of the `<image>` runs,
    which the model checks against the image count."""
    from gpt2mm.data.collate import Collator, encode_samples
    from gpt2mm.data.samples import Sample, Turn

    model, p = tiny_pair
    samples = [
        Sample(
            "pair",
            "1",
            [Turn("user", "Is <image> like <image> ?"), Turn("assistant", "no")],
            more_images=["2"],
        ),
        Sample("text", None, [Turn("user", "Hi?"), Turn("assistant", "hi")]),
        Sample("one", "3", [Turn("user", "What?"), Turn("assistant", "red")]),
        Sample("bare", "4", [Turn("user", "Which?"), Turn("assistant", "left")], more_images=["5", "6"]),
    ]
    encoded, _ = encode_samples(samples, p, max_length=200)
    pixels = {str(i): p.preprocess_images([make_image(i, size=32)])[0] for i in range(1, 7)}
    batch = Collator(p.tokenizer.pad_token_id, pixels.__getitem__)(encoded)
    assert torch.equal(batch["pixel_values"], torch.stack([pixels[str(i)] for i in range(1, 7)]))
    per_row = (batch["input_ids"] == p.image_token_id).sum(1) // p.num_image_tokens
    assert per_row.tolist() == [2, 0, 1, 3]
    out = model(**batch)  # the model takes them (tokens and images agree)
    assert torch.isfinite(out.loss)


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["eager", "sdpa", "gpt2mm_eager"])
def test_independent_turns_answer_each_packed_question_as_if_asked_alone(tiny_pair, implementation):
    """`data.independent_turns`: in a pack of questions about one image, every answer gets the logits that the
    question encoded as a sample of its own gives (the reference: plain causal attention on that sample);
    rows it does not apply to (no image, an image in a later turn) keep plain causal attention."""
    from gpt2mm.data.collate import Collator, encode_samples
    from gpt2mm.data.samples import Sample, Turn
    from gpt2mm.data.splits import pack_by_image

    model, p = tiny_pair
    model.set_attn_implementation(implementation)
    qa = [("What color is it?", "red"), ("How many are there?", "3"), ("Is the cross left of it?", "no")]
    singles = [Sample(f"a{k}", "1", [Turn("user", q), Turn("assistant", a)]) for k, (q, a) in enumerate(qa)]
    singles += [
        Sample(f"b{k}", "2", [Turn("user", q), Turn("assistant", a)]) for k, (q, a) in enumerate(qa[:2])
    ]
    packs = pack_by_image(singles, k=8, seed=0)
    later_image = Sample(  # its one image is in the second user turn
        "later",
        "3",
        [
            Turn("user", "Hi?"),
            Turn("assistant", "hi"),
            Turn("user", "And <image> ?"),
            Turn("assistant", "blue"),
        ],
    )
    text_only = Sample(
        "text",
        None,
        [Turn("user", "Hi?"), Turn("assistant", "hi"), Turn("user", "Why?"), Turn("assistant", "so")],
    )
    rows = [*packs, text_only]
    pixels = {str(i): p.preprocess_images([make_image(i, size=32)])[0] for i in range(1, 4)}
    turns = (p.image_token_id, p.tokenizer.eos_token_id)
    encoded, _ = encode_samples(rows, p, max_length=200)
    batch = Collator(p.tokenizer.pad_token_id, pixels.__getitem__, independent_turns=turns)(encoded)
    assert batch["attention_mask"].shape[1:] == (1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    packed = model(**batch).logits
    for r, pack in enumerate(packs):
        assert len(pack.turns) > 2  # a pack of several questions
        ids, labels = batch["input_ids"][r], batch["labels"][r]
        starts = [t for t in range(1, len(ids)) if labels[t] != -100 and labels[t - 1] == -100]
        for k, start in enumerate(starts):
            alone = Sample("one", pack.image, pack.turns[2 * k : 2 * k + 2])
            one = Collator(p.tokenizer.pad_token_id, pixels.__getitem__)(encode_samples([alone], p, 200)[0])
            first = int((one["labels"][0] != -100).nonzero()[0])
            n = int((one["labels"][0] != -100).sum())
            assert torch.equal(ids[start : start + n], one["input_ids"][0, first : first + n])
            expected = model(**one).logits[0, first - 1 : first - 1 + n]
            torch.testing.assert_close(packed[r, start - 1 : start - 1 + n], expected, atol=1e-5, rtol=1e-5)
    # a text-only row is left causal: the same logits as without the option
    plain = Collator(p.tokenizer.pad_token_id, pixels.__getitem__)(encode_samples([text_only], p, 200)[0])
    n = plain["input_ids"].shape[1]
    torch.testing.assert_close(packed[len(packs), :n], model(**plain).logits[0], atol=1e-5, rtol=1e-5)
    # a row whose image is in a later turn: causal attention, positions 0, 1, 2, ... (beside a pack)
    both = Collator(p.tokenizer.pad_token_id, pixels.__getitem__, independent_turns=turns)(
        encode_samples([packs[0], later_image], p, 200)[0]
    )
    n = len(encode_samples([later_image], p, 200)[0][0].input_ids)
    assert torch.equal(both["attention_mask"][1, 0, :n, :n], torch.ones(n, n, dtype=torch.bool).tril())
    assert both["position_ids"][1, :n].tolist() == list(range(n))
    # single questions only: nothing to change, so the plain (B, T) mask that keeps SDPA's fused causal kernel
    alone = Collator(p.tokenizer.pad_token_id, pixels.__getitem__, independent_turns=turns)(
        encode_samples(singles[:2], p, 200)[0]
    )
    assert alone["attention_mask"].dim() == 2 and "position_ids" not in alone
    model.set_attn_implementation("sdpa")


def naive_independent_turns(input_ids, labels, attention_mask, image_token_id, end_token_id):
    """`gpt2mm.data.collate.independent_turns` row by row and exchange by exchange, as its docstring says."""
    batch, width = input_ids.shape
    allowed = torch.ones(width, width, dtype=torch.bool).tril().repeat(batch, 1, 1)  # causal to start with
    positions = torch.arange(width).repeat(batch, 1)
    changed = False
    for b in range(batch):
        n = int(attention_mask[b].sum())
        ids, labs = input_ids[b, :n].tolist(), labels[b, :n].tolist()
        images = [t for t, i in enumerate(ids) if i == image_token_id]
        ends = [t for t, (i, lab) in enumerate(zip(ids, labs, strict=True)) if i == end_token_id and lab == i]
        if not images or not ends or images[-1] > ends[0]:
            continue
        prefix, lead = images[-1] + 1, ids[: images[0]]  # the image prefix; the first turn's tokens before it
        starts = [e + 1 for e in ends if e + 1 < n]
        changed |= bool(starts)
        for s, e in zip(starts, [*ends[1:], n - 1], strict=False):
            # its opening tokens in common with `lead` (`Q:`) are hidden: a single question has them before
            # the image
            hidden = next((j for j in range(len(lead)) if s + j > e or ids[s + j] != lead[j]), len(lead))
            block = slice(s, e + 1)
            allowed[b, block, prefix:s] = False  # earlier exchanges
            allowed[b, block, s : s + hidden] = False
            positions[b, block] = torch.arange(prefix - hidden, prefix - hidden + e + 1 - s)
        allowed[b, :, n:] = False  # padding, seen by nothing but itself
    if not changed:
        return None
    allowed |= torch.eye(width, dtype=torch.bool)
    return allowed.unsqueeze(1), positions.masked_fill(attention_mask == 0, 0)


def test_independent_turns_mask_and_positions_equal_a_row_by_row_reference():
    """The batched `independent_turns` gives the reference's mask and positions exactly, on random rows: packs of
    exchanges that open with all, part or none of the tokens before the image, unlabelled end tokens, a pack cut
    mid-exchange, an image in a later exchange, no image, no end, empty rows, padding with the end token as the
    collator pads; and None where no row changes."""
    from gpt2mm.data.collate import independent_turns

    image, end, q, colon = 9, 0, 5, 6
    g = torch.Generator().manual_seed(0)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    def row():
        ids = [q, colon][: pick([0, 1, 2, 2])]
        if pick([True, True, True, False]):
            ids += [image] * pick([1, 3])
        labels = [-100] * len(ids)
        for k in range(pick([0, 1, 2, 4])):
            opening = pick([[q, colon], [q, colon], [q], [colon], [q, 7], [7], []]) if k else []
            question = torch.randint(5, 9, (pick([1, 3]),), generator=g).tolist() + [image] * pick(
                [0] * 9 + [1]
            )
            answer = torch.randint(1, 9, (pick([1, 2]),), generator=g).tolist()
            ids += opening + question + answer + [end]
            labels += [-100] * (len(opening) + len(question)) + answer + [pick([end, end, end, -100])]
        cut = pick([len(ids), len(ids), max(1, len(ids) - pick([1, 2, 4]))])
        return ids[:cut], labels[:cut]

    changed = 0
    for _ in range(300):
        rows = [row() for _ in range(pick([1, 2, 4]))]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), end, dtype=torch.long)  # padded as the collator pads
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, labs) in enumerate(rows):
            input_ids[r, : len(ids)], labels[r, : len(ids)], mask[r, : len(ids)] = (
                torch.tensor(ids),
                torch.tensor(labs),
                1,
            )
        expected = naive_independent_turns(input_ids, labels, mask, image, end)
        got = independent_turns(input_ids, labels, mask, image, end)
        if expected is None:
            assert got is None
            continue
        changed += 1
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert 50 < changed < 300  # both outcomes were tested
    empty = torch.zeros(2, 0, dtype=torch.long)  # a batch of empty rows: nothing to change
    assert independent_turns(empty, empty, empty, image, end) is None
    assert naive_independent_turns(empty, empty, empty, image, end) is None


def _manual_logits(model, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The model's logits for one row, its image features put in by hand, run by run."""
    cfg = model.config
    embeds = model.get_input_embeddings()(ids)  # (1, T, C)
    features = model.get_image_features(pixels)  # (N, T_img, C)
    positions = (ids[0] == cfg.image_token_id).nonzero().flatten().tolist()
    for k in range(len(pixels)):
        run = positions[k * cfg.num_image_tokens : (k + 1) * cfg.num_image_tokens]
        assert run == list(range(run[0], run[0] + cfg.num_image_tokens))  # each run is contiguous
        if cfg.fusion == "add":
            embeds[0, run] = embeds[0, run] + features[k]
        else:
            embeds[0, run] = features[k]
    hidden = model.language_model(inputs_embeds=embeds).last_hidden_state
    return model.lm_head(hidden)


@torch.no_grad()
def test_two_images_forward_equals_features_put_in_by_hand(tiny_pair):
    model, p = tiny_pair
    ids = torch.tensor([p.encode_turns([("user", "Is <image> bigger than <image> ?", 2)])["input_ids"]])
    a, b = (p.preprocess_images([make_image(seed, size=32)]) for seed in (1, 2))
    logits = model(input_ids=ids, pixel_values=torch.cat([a, b])).logits
    torch.testing.assert_close(logits, _manual_logits(model, ids, torch.cat([a, b])))
    assert torch.equal(logits, model(input_ids=ids, pixel_values=torch.cat([a, b])).logits)  # deterministic
    swapped = model(input_ids=ids, pixel_values=torch.cat([b, a])).logits
    assert not torch.allclose(logits[0, -1], swapped[0, -1])  # the order of the images matters
    with pytest.raises(ValueError, match="1 images were given"):
        model(input_ids=ids, pixel_values=a)


def test_batched_answers_pass_several_images_per_sample(tmp_path):
    """`answer_questions` (training-time eval, `gpt2mm eval`): a two-image sample in a batch with others
    gets the answer `generate` gives it alone, from its prompt and both its images."""
    from conftest import wide_tiny_model
    from gpt2mm.data.samples import Sample, Turn
    from gpt2mm.eval.evaluate import answer_questions

    model, p = wide_tiny_model()
    paths = []
    for i in range(3):
        make_image(40 + i).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    samples = [
        Sample(
            "pair",
            paths[0],
            [Turn("user", "Is <image> like <image> ?"), Turn("assistant", "no")],
            more_images=[paths[1]],
        ),
        Sample("one", paths[2], [Turn("user", "What color is it?"), Turn("assistant", "red")]),
        Sample("text", None, [Turn("user", "How many?"), Turn("assistant", "2")]),
        # images in a later turn are not the first question's
        Sample(
            "later",
            paths[0],
            [
                Turn("user", "<image> What?"),
                Turn("assistant", "x"),
                Turn("user", "And <image> ?"),
                Turn("assistant", "y"),
            ],
            more_images=[paths[2]],
        ),
    ]
    answers = answer_questions(model, p, samples, batch_size=4, max_new_tokens=4)
    from gpt2mm.data.images import load_image

    for s, answer in zip(samples, answers):
        role, text, n = s.encoder_turns()[0]
        ids = torch.tensor([p.encode_turns([(role, text, n)])["input_ids"]])
        kw = {"pixel_values": p.preprocess_images([load_image(x) for x in s.images[:n]])} if n else {}
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, **kw)
        assert answer == p.postprocess_answer(p.decode(out[0, ids.shape[1] :]))
    assert len(set(answers)) > 1  # the equality is not vacuous
