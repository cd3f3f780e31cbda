"""Checkpoints without gpt2mm: the remote code, the chat template, the model card and `gpt2mm push`.

The remote-code tests load a saved checkpoint in a subprocess where gpt2mm cannot be imported (a meta-path
blocker, no src on the path, offline) with transformers' Auto classes and `trust_remote_code=True`, and compare
its greedy answers token for token with the answers `gpt2mm ask`'s engine gives in this process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_image, wide_tiny_model
from gpt2mm import hub
from gpt2mm.card import LOCAL_MODEL_ID, usage_snippet
from gpt2mm.cli import main
from gpt2mm.errors import UsageError

MAX_NEW_TOKENS = 6

# --- the chat template: its ids are gpt2mm's own for every conversation shape the API accepts ----------------

# A conversation as OpenAI messages, images named by their index: ("image", k). Each case is encoded three
# ways: the API's path (parse_request -> messages_to_turns -> encode_turns), the processor's chat template
# with PIL images, and (in the subprocess) the template of a checkpoint loaded without gpt2mm.
CONVERSATIONS = {
    "single question": [{"role": "user", "content": [("image", 0), "What color is the circle?"]}],
    "system + question": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [("image", 0), "How many shapes are there?"]},
    ],
    "multi-turn with earlier answers": [
        {"role": "user", "content": [("image", 0), "How many shapes?"]},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "What color is the left one?"},
        {"role": "assistant", "content": [" red "]},
        {"role": "user", "content": "And the right one?"},
    ],
    "two images in one turn": [
        {"role": "user", "content": ["Compare", ("image", 0), "and", ("image", 1), "."]},
    ],
    "two images before the text": [{"role": "user", "content": [("image", 0), ("image", 1), "Same shapes?"]}],
    "image after the text": [{"role": "user", "content": ["What is in this picture?", ("image", 0)]}],
    "image-less conversation": [{"role": "user", "content": "What is two plus two?"}],
    "image-less later turn": [
        {"role": "user", "content": [("image", 0), "Describe it."]},
        {"role": "assistant", "content": "A red circle on the left."},
        {"role": "user", "content": "Is it large?"},
    ],
    "images in two turns": [
        {"role": "user", "content": [("image", 0), "What shape?"]},
        {"role": "assistant", "content": "circle"},
        {"role": "user", "content": ["And here?", ("image", 1)]},
    ],
    "consecutive messages merged, developer skipped": [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [("image", 0)]},
        {"role": "user", "content": "  What colour\nis it?  "},
    ],
}


def image_ids(conversation) -> list[int]:
    return [
        p[1]
        for m in conversation
        if isinstance(m["content"], list)
        for p in m["content"]
        if isinstance(p, tuple)
    ]


def openai_messages(conversation, url) -> list[dict]:
    """The conversation as an OpenAI request's messages; `url(k)` is image k's URL."""
    out = []
    for m in conversation:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": url(p[1])}}
                if isinstance(p, tuple)
                else {"type": "text", "text": p}
                for p in content
            ]
        out.append({"role": m["role"], "content": content})
    return out


def hf_messages(conversation, image) -> list[dict]:
    """The conversation as transformers chat messages; `image(k)` is image k's part (PIL image or path)."""
    out = []
    for m in conversation:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {"type": "image", **image(p[1])} if isinstance(p, tuple) else {"type": "text", "text": p}
                for p in content
            ]
        out.append({"role": m["role"], "content": content})
    return out


def data_url(im) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGES = [make_image(10, 40), make_image(11, 56)]


def api_encoding(processor, conversation) -> tuple[list[int], torch.Tensor | None]:
    """What the server feeds the model for these messages: its ids and pixel values."""
    from gpt2mm.serve.prepare import messages_to_turns
    from gpt2mm.serve.schema import parse_request

    chat = parse_request({"messages": openai_messages(conversation, lambda k: data_url(IMAGES[k]))})
    turns, urls = messages_to_turns(chat.messages)
    assert len(urls) == len(image_ids(conversation))
    ids = processor.encode_turns(turns, generation_prompt=True)["input_ids"]
    images = [IMAGES[k] for k in image_ids(conversation)]
    return ids, processor.preprocess_images(images) if images else None


@pytest.fixture(scope="module")
def tiny_processor():
    from gpt2mm import build_model

    return build_model("tiny")[1]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_gives_the_api_encoding(tiny_processor, name):
    conversation = CONVERSATIONS[name]
    ids, pixels = api_encoding(tiny_processor, conversation)
    messages = hf_messages(conversation, lambda k: {"image": IMAGES[k]})
    out = tiny_processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert out["input_ids"][0].tolist() == ids
    if pixels is None:
        assert "pixel_values" not in out
    else:
        assert torch.equal(out["pixel_values"], pixels)
    # tokenize=True is the rendered text through the processor: the same string, placeholders unexpanded
    text = tiny_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert tiny_processor(text=text)["input_ids"][0].tolist() == ids


def test_chat_template_renders_the_training_format(tiny_processor):
    """Without a generation prompt a conversation ending with an answer renders as training encodes it."""
    p = tiny_processor
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "How many?"},
        {"role": "assistant", "content": "1"},
    ]
    text = p.apply_chat_template(conversation)
    assert text == "Q: <image> Describe it. A: A red circle.<|endoftext|>Q: How many? A: 1<|endoftext|>"
    expected = p.encode_conversation(
        [("user", "Describe it."), ("assistant", "A red circle."), ("user", "How many?"), ("assistant", "1")]
    )
    assert p(text=text)["input_ids"][0].tolist() == expected["input_ids"]
    # a last user turn without the generation prompt has no ` A:` yet
    assert p.apply_chat_template(conversation[:1]) == "Q: <image> Describe it."


@pytest.mark.parametrize(
    "messages, add_generation_prompt, error",
    [
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], True, "last message"),
        (
            [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}],
            True,
            "start with a user",
        ),
        ([{"role": "user", "content": [{"type": "image"}]}], True, "question is empty"),
        ([{"role": "user", "content": "look at <image>"}], True, "may not hold <image>"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "image"}]}],
            False,
            "only user",
        ),
        ([{"role": "tool", "content": "42"}], True, "not tool"),
    ],
)
def test_chat_template_refuses_what_the_api_refuses(tiny_processor, messages, add_generation_prompt, error):
    with pytest.raises(Exception, match=error):
        tiny_processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


# --- remote code ----------------------------------------------------------------------------------------------


def test_remote_code_is_generated_from_the_package():
    files = hub.remote_code()
    assert set(files) == {
        "configuration_gpt2mm.py",
        "modeling_gpt2mm.py",
        "processing_gpt2mm.py",
        "layers_gpt2mm.py",
        "presets_gpt2mm.py",
    }, "the remote code grew: keep what the model does not need out of config/modeling/processing"
    src = Path(hub.__file__).parent
    for name, module in [("configuration_gpt2mm.py", "config"), ("modeling_gpt2mm.py", "modeling")]:
        original = (src / f"{module}.py").read_text()
        # the module itself, its gpt2mm imports made relative, after a two-line header
        body = files[name].split("\n", 2)[2]
        assert body == re.sub(
            r"^(\s*)from gpt2mm\.(\w+) import",
            lambda m: f"{m.group(1)}from .{hub.remote_module_name(m.group(2))} import",
            original,
            flags=re.M,
        )
    for source in files.values():
        assert not re.search(r"^\s*(from|import) gpt2mm\b", source, re.M)
        assert "AutoConfig.register" not in source  # registering is the package's, not the checkpoint's


def test_every_save_goes_through_save_model():
    """The CLI's writers (init, convert-seed, train, ppo, reward, and so demo) save only via hub.save_model."""
    src = Path(hub.__file__).parent
    for file in src.rglob("*.py"):
        if file.name == "hub.py":
            continue
        text = file.read_text()
        calls = re.findall(r"\b(model|processor|policy)\.save_pretrained\(", text)
        assert not calls, f"{file.relative_to(src)} saves with save_pretrained, not gpt2mm.hub.save_model"


# The subprocess: gpt2mm blocked, then the checkpoint loaded by transformers alone.
LOADER = r"""
import importlib.abc, json, os, sys

class NoGpt2mm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "gpt2mm" or name.startswith("gpt2mm."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoGpt2mm())
args = json.loads(sys.stdin.read())
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

torch.set_num_threads(args["threads"])  # as in the test process: the same sums, the same greedy tokens
path = args["path"]
model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
out = {"classes": [type(model).__module__, type(processor).__module__], "answers": [], "chats": {}}
for question, images in args["questions"]:
    content = []
    pieces = question.split("<image>")
    if len(pieces) == 1:
        content = [{"type": "image", "path": p} for p in images] + [{"type": "text", "text": question}]
    else:
        for i, piece in enumerate(pieces):
            content += [{"type": "text", "text": piece}] + ([{"type": "image", "path": images[i]}] if i < len(images) else [])
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=args["max_new_tokens"], do_sample=False)
    new = ids[0, inputs["input_ids"].shape[1]:].tolist()
    text = processor.postprocess_answer(processor.decode(new))
    out["answers"].append({"prompt": inputs["input_ids"][0].tolist(), "new": new, "text": text})
for name, messages in args["chats"].items():
    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    out["chats"][name] = ids["input_ids"][0].tolist()
if args["snippet"]:
    import contextlib, io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(args["snippet"], "README.md", "exec"), {"__name__": "__main__"})
    out["snippet_output"] = buf.getvalue()
out["gpt2mm_imported"] = any(m == "gpt2mm" or m.startswith("gpt2mm.") for m in sys.modules)
print("RESULT " + json.dumps(out))
"""


def run_without_gpt2mm(tmp: Path, args: dict) -> dict:
    """Run LOADER in a fresh interpreter without gpt2mm: no src on the path, imports of gpt2mm blocked,
    offline, its own module cache; returns its result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "HF_", "TRANSFORMERS_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp / "hf-home"),
        HF_MODULES_CACHE=str(tmp / "hf-modules"),
        TRANSFORMERS_VERBOSITY="error",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "-c", LOADER],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        cwd=tmp,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def card_snippet(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 1, "the card has one Python example"
    return blocks[0]


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A saved checkpoint, gpt2mm's own answers (`gpt2mm ask`'s engine) and the no-gpt2mm subprocess's."""
    from gpt2mm.hub import save_model
    from gpt2mm.serve.engine import Engine, SamplingParams

    tmp = tmp_path_factory.mktemp("remote")
    model, processor = wide_tiny_model()
    path = tmp / "checkpoint"
    save_model(model, processor, path, stage="init", random_init=True)
    paths = []
    for i, im in enumerate([*IMAGES, make_image(12, 48)]):
        paths.append(str(tmp / f"im{i}.png"))
        im.save(paths[-1])
    make_image(13, 48).save(tmp / "image.png")  # the card's example asks about image.png
    questions = [
        ("What color is the circle?", [paths[0]]),
        ("How many shapes are there?", [paths[1]]),
        ("What shape is on the left?", [paths[2]]),
        ("Compare <image> and <image> .", [paths[0], paths[1]]),
        ("What is two plus two?", []),
        ("What is in the picture?", [str(tmp / "image.png")]),
    ]
    engine = Engine.from_pretrained(path, device="cpu")
    ours = []
    for question, images in questions:
        from PIL import Image

        request = engine.ask(
            question, [Image.open(p) for p in images], SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
        )
        prompt = engine.prepare([("user", question, len(images))], [Image.open(p) for p in images]).input_ids
        ours.append({"prompt": prompt, "new": request.choices[0].token_ids, "text": request.choices[0].text,
                     "finish": request.choices[0].finish_reason})  # fmt: skip
    snippet = card_snippet((path / "README.md").read_text()).replace(LOCAL_MODEL_ID, str(path))
    snippet = snippet.replace("max_new_tokens=32", f"max_new_tokens={MAX_NEW_TOKENS}")
    chats = {name: hf_messages(c, lambda k: {"path": paths[k]}) for name, c in CONVERSATIONS.items()}
    theirs = run_without_gpt2mm(
        tmp,
        {
            "path": str(path),
            "questions": questions,
            "max_new_tokens": MAX_NEW_TOKENS,
            "chats": chats,
            "snippet": snippet,
            "threads": torch.get_num_threads(),
        },
    )
    return {"path": path, "ours": ours, "theirs": theirs, "processor": engine.processor}


def test_checkpoint_loads_without_gpt2mm(remote):
    theirs = remote["theirs"]
    assert not theirs["gpt2mm_imported"]
    assert all(m.startswith("transformers_modules.") for m in theirs["classes"]), theirs["classes"]
    config = json.loads((remote["path"] / "config.json").read_text())
    assert (
        config["auto_map"]["AutoModelForImageTextToText"]
        == "modeling_gpt2mm.MultimodalGPT2ForConditionalGeneration"
    )
    assert json.loads((remote["path"] / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_gpt2mm.MultimodalGPT2Processor"
    }
    assert (remote["path"] / "chat_template.jinja").is_file()


def test_answers_without_gpt2mm_match_gpt2mm_ask_token_for_token(remote):
    ours, theirs = remote["ours"], remote["theirs"]["answers"]
    assert len({a["text"] for a in ours}) > 1, "the answers should differ from question to question"
    for a, b in zip(ours, theirs, strict=True):
        assert a["prompt"] == b["prompt"]
        # gpt2mm's engine also stops at a new `Q:`: up to there the tokens are the same, then the texts
        assert b["new"][: len(a["new"])] == a["new"]
        if a["finish"] == "length" or a["new"][-1:] == [remote["processor"].tokenizer.eos_token_id]:
            assert b["new"] == a["new"]
        assert b["text"] == a["text"]


def test_saved_chat_template_travels_with_the_checkpoint(remote):
    for name, ids in remote["theirs"]["chats"].items():
        assert ids == api_encoding(remote["processor"], CONVERSATIONS[name])[0], name


def test_model_card_snippet_runs_without_gpt2mm(remote):
    card = (remote["path"] / "README.md").read_text()
    assert "trust_remote_code=True" in card and "library_name: transformers" in card
    printed = remote["theirs"]["snippet_output"].strip()
    assert printed == remote["ours"][-1]["text"]  # the snippet asks "What is in the picture?" about image.png


# --- model cards of runs -------------------------------------------------------------------------------------


def test_model_card_reads_the_run(tmp_path, tiny_pair):
    model, processor = tiny_pair
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": 10, "loss": 2.5, "samples_seen": 320},
        {"step": 20, "val_accuracy": 61.0},
        {"step": 30, "loss": 1.25, "samples_seen": 960},
        {"step": 40, "val_accuracy": 58.5},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(
        json.dumps({"test_accuracy": 93.5, "stage_names": "strings are left out"})
    )
    recipe = {
        "model": {"preset": "tiny", "init_from": None},
        "data": {"format": "hf", "hf_dataset": "someone/shapes-vqa"},
        "train": {"max_steps": 40, "lr": 0.001, "output_dir": str(run)},
    }
    hub.save_model(
        model,
        processor,
        run / "checkpoint-40",
        stage="sft",
        recipe=recipe,
        vision_backbone="openai/clip-vit-base-patch32",
        text_backbone=str(tmp_path),  # a directory: named in the text, not as a hub base model
    )
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "checkpoint-40" / "README.md")
    assert card.data.base_model == ["openai/clip-vit-base-patch32"]
    assert card.data.datasets == ["someone/shapes-vqa"]
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.to_dict()["gpt2mm"]["stage"] == "sft"
    text = card.text
    assert (
        "| best_val_accuracy | 61 |" in text
        and "| loss | 1.25 |" in text
        and "| val_accuracy | 58.5 |" in text
    )
    assert "| test_accuracy | 93.5 |" in text and "stage_names" not in text
    assert "`someone/shapes-vqa`" in text and "max_steps 40" in text and "recipe.yaml" in text
    assert "gpt2mm train" in text and LOCAL_MODEL_ID in text
    import yaml

    assert yaml.safe_load((run / "checkpoint-40" / "recipe.yaml").read_text()) == recipe
    # a real run's recipe.yaml is a recipe `gpt2mm train` reads back as it was
    from dataclasses import asdict

    from gpt2mm.train.args import load_config
    from gpt2mm.train.config import SFTConfig

    cfg = load_config(
        SFTConfig, None, ["--data.format", "hf", "--data.hf_dataset", "x/y", "--train.lr", "3e-4"]
    )
    hub.save_model(model, processor, tmp_path / "rt", stage="sft", recipe=asdict(cfg))
    assert load_config(SFTConfig, tmp_path / "rt" / "recipe.yaml", []) == cfg
    # a checkpoint trained from this one inherits its backbones
    hub.save_model(model, processor, tmp_path / "next", stage="ppo", init_from=run / "checkpoint-40")
    about = ModelCard.load(tmp_path / "next" / "README.md").data.to_dict()["gpt2mm"]
    assert about["vision_backbone"] == "openai/clip-vit-base-patch32" and about["stage"] == "ppo"


def test_init_writes_a_self_contained_checkpoint(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["init", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert set(hub.remote_code()) <= names and {"README.md", "chat_template.jinja"} <= names
    assert "auto_map" in json.loads((out / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert "gpt2mm init" in card and "| backbones | none: random initial weights |" in card


# --- gpt2mm push ----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi's network calls replaced: each records its arguments, and upload_folder what the folder holds."""
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict]] = []

    def record(name):
        def call(self, *args, **kwargs):
            calls.append((name, {"args": args, **kwargs}))
            if name == "upload_folder":
                folder = Path(kwargs["folder_path"])
                kwargs["files"] = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
                calls[-1] = (name, {"args": args, **kwargs})
                return type(
                    "CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/1"}
                )()
            return None

        return call

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, record(name))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return calls


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_pair):
    model, processor = tiny_pair
    path = tmp_path_factory.mktemp("push") / "best"
    hub.save_model(model, processor, path, stage="sft")
    (path / "trainer_state.pt").write_bytes(b"optimizer state")
    return path


def test_push_uploads_the_checkpoint_and_its_card(saved, fake_hub, capsys):
    assert main(["push", str(saved), "me/tiny-vqa", "--private", "--revision", "v1"]) == 0
    names = [name for name, _ in fake_hub]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (kw for _, kw in fake_hub)
    assert create["args"] == ("me/tiny-vqa",) and create["private"] is True and create["exist_ok"] is True
    assert branch["branch"] == "v1"
    assert upload["repo_id"] == "me/tiny-vqa" and upload["revision"] == "v1"
    assert "trainer_state.pt" in upload["ignore_patterns"]
    files = upload["files"]
    assert set(hub.remote_code()) | {
        "config.json",
        "model.safetensors",
        "README.md",
        "chat_template.jinja",
    } <= set(files)
    card = files["README.md"].decode()
    assert 'model_id = "me/tiny-vqa"' in card and LOCAL_MODEL_ID not in card
    assert card_snippet(card) == usage_snippet("me/tiny-vqa") + "\n"
    assert "gpt2mm train" in card  # the card keeps what the checkpoint's own card said made it
    assert "https://huggingface.co/me/tiny-vqa/commit/1" in capsys.readouterr().out


def test_push_needs_a_token(saved, fake_hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(SystemExit) as e:
        main(["push", str(saved), "me/tiny-vqa"])
    assert e.value.code == 2 and not fake_hub
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "gpt2mm push: error: no Hugging Face token: log in with `hf auth login` or set HF_TOKEN"


def test_push_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, fake_hub):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UsageError, match="is not a gpt2mm checkpoint"):
        hub.push(tmp_path, "me/x")
    with pytest.raises(UsageError, match="no such directory"):
        hub.push(tmp_path / "missing", "me/x")
    assert not fake_hub


def test_readme_documents_loading_without_gpt2mm():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "trust_remote_code=True" in readme and "gpt2mm push" in readme


def test_push_keeps_a_checkpoints_manifest_true(saved, fake_hub, tmp_path):
    """push refreshes the code and card in place; a checkpoint that carries a manifest must still verify after
    it (and a damaged one is not published)."""
    import shutil

    from gpt2mm.errors import DamagedFileError
    from gpt2mm.outputs import verify_manifest, write_manifest

    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved, ckpt)
    write_manifest(ckpt)
    hub.push(ckpt, "me/tiny-vqa", token="x", log=lambda *_: None)
    assert verify_manifest(ckpt)
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(DamagedFileError, match="model.safetensors"):
        hub.push(ckpt, "me/tiny-vqa", token="x", log=lambda *_: None)
