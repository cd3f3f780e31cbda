"""`gpt2mm export onnx`: the graphs against the PyTorch model, and `run_onnx.py` (run where torch, transformers
and gpt2mm cannot be imported) against `gpt2mm ask`'s engine, token for token."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gpt2mm
from conftest import launch_chromium, make_image, needs_browser, wide_tiny_model
from gpt2mm.cli import main

ort = pytest.importorskip(
    "onnxruntime", reason="gpt2mm export onnx needs pip install 'gpt2-multimodal[onnx]'"
)

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint with answers that differ from question to question, exported with `gpt2mm export onnx`
    (and what the command printed)."""
    import contextlib
    import io

    from gpt2mm.hub import save_model

    tmp = tmp_path_factory.mktemp("onnx")
    model, processor = wide_tiny_model()
    save_model(model, processor, tmp / "checkpoint", stage="init", random_init=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", "onnx", str(tmp / "checkpoint"), str(tmp / "onnx"), "--check", "12"]) == 0
    (tmp / "printed.txt").write_text(printed.getvalue())
    return tmp / "checkpoint", tmp / "onnx", tmp


def test_export_writes_a_checked_export(exported):
    checkpoint, out, tmp = exported
    printed = (tmp / "printed.txt").read_text()
    assert "checked: 12/12 synthetic test questions" in printed
    assert {p.name for p in out.iterdir()} >= {
        "vision.onnx",
        "decoder.onnx",
        "tokenizer.json",
        "gpt2mm_onnx.json",
        "run_onnx.py",
        "manifest.json",
    }
    # the runner is the package's module, not a second copy
    assert (out / "run_onnx.py").read_text() == (Path(gpt2mm.__file__).parent / "onnx_runner.py").read_text()


def _vlm(out: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_onnx_test", out / "run_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OnnxVLM(out, threads=1)


def test_graphs_give_the_models_logits_with_padding_and_cache(exported):
    """vision.onnx + decoder.onnx against the PyTorch forward: a left-padded batch of two prompts with an image
    each (prefill), then one step from the cache."""
    from gpt2mm.loading import load_model

    checkpoint, out, _ = exported
    model, processor = load_model(checkpoint)
    model.eval()
    images = [make_image(3, 48), make_image(4, 48)]
    batch = processor(
        text=["Q: <image> What color is the circle? A:", "Q: <image> How many? A:"],
        images=images,
        padding_side="left",
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any(), "the shorter prompt should be padded"
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate gives them
    with torch.no_grad():
        ref = model(**batch, position_ids=positions, use_cache=True)
        next_ids = ref.logits[:, -1].argmax(-1, keepdim=True)
        step_mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        ref_step = model(
            input_ids=next_ids, attention_mask=step_mask, position_ids=positions[:, -1:] + 1, cache=ref.cache
        )

    vision = ort.InferenceSession(str(out / "vision.onnx"))
    decoder = ort.InferenceSession(str(out / "decoder.onnx"))
    (features,) = vision.run(None, {"pixel_values": batch["pixel_values"].numpy()})
    image_embeds = np.zeros((*ids.shape, model.config.text_config.n_embd), dtype=np.float32)
    image_embeds[(ids == model.config.image_token_id).numpy()] = features.reshape(-1, features.shape[-1])
    text = model.config.text_config
    names = [i.name for i in decoder.get_inputs() if i.name.startswith("past_key_values.")]
    empty = np.zeros((2, text.n_head, 0, text.n_embd // text.n_head), dtype=np.float32)
    logits, *present = decoder.run(
        None,
        {
            "input_ids": ids.numpy(),
            "image_embeds": image_embeds,
            "attention_mask": mask.numpy(),
            "position_ids": positions.numpy(),
            **{n: empty for n in names},
        },
    )
    real = mask.bool().numpy()
    np.testing.assert_allclose(logits[real], ref.logits.numpy()[real], atol=1e-4)
    step, *_ = decoder.run(
        None,
        {
            "input_ids": next_ids.numpy(),
            "image_embeds": np.zeros((2, 1, text.n_embd), dtype=np.float32),
            "attention_mask": step_mask.numpy(),
            "position_ids": positions[:, -1:].numpy() + 1,
            **dict(zip(names, present)),
        },
    )
    np.testing.assert_allclose(step, ref_step.logits.numpy(), atol=1e-4)


def test_export_traces_a_model_whose_image_token_ends_the_vocabulary(tmp_path):
    """GPT-2 checkpoints put `<image>` at the last id (50257 of 50258): the traced ids must stay in range."""
    from gpt2mm import MultimodalGPT2Config, MultimodalGPT2ForConditionalGeneration
    from gpt2mm.export_onnx import export_graphs

    config = MultimodalGPT2Config.from_preset("tiny")
    config.image_token_id = config.text_config.vocab_size - 1
    torch.manual_seed(0)
    model = MultimodalGPT2ForConditionalGeneration(config).eval()
    export_graphs(model, tmp_path)
    assert not any(m.training for m in model.modules()), "the export left the model in training mode"
    decoder = ort.InferenceSession(str(tmp_path / "decoder.onnx"))
    ids = torch.tensor([[5, 9, 3, 7]])
    text = config.text_config
    empty = np.zeros((1, text.n_head, 0, text.n_embd // text.n_head), dtype=np.float32)
    feeds = {"input_ids": ids.numpy(), "image_embeds": np.zeros((1, 4, text.n_embd), dtype=np.float32)}
    feeds.update(attention_mask=np.ones((1, 4), dtype=np.int64), position_ids=np.arange(4)[None])
    feeds.update({i.name: empty for i in decoder.get_inputs() if i.name.startswith("past_key_values.")})
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(decoder.run(["logits"], feeds)[0], ref, atol=1e-4)


def test_runner_prepares_pixels_as_the_processor(exported):
    from gpt2mm.loading import load_model

    checkpoint, out, _ = exported
    _, processor = load_model(checkpoint)
    vlm = _vlm(out)
    rng = np.random.default_rng(0)
    for size, mode in [((48, 48), "RGB"), ((40, 40), "RGB"), ((64, 50), "RGBA"), ((30, 71), "L")]:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        image = Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)
        ours = vlm.pixel_values([image])
        theirs = processor.preprocess_images([image]).numpy()
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


# The subprocess: torch, transformers and gpt2mm blocked; the export answered with run_onnx.py alone.
RUNNER = r"""
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "gpt2mm"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocked())
args = json.loads(sys.stdin.read())
sys.path.insert(0, args["out"])
from PIL import Image
from run_onnx import OnnxVLM

vlm = OnnxVLM(args["out"], threads=1)
answers = []
for question, paths in args["questions"]:
    images = [Image.open(p) for p in paths]
    ids = vlm.encode(question, len(images))
    new, text, finish = vlm.generate(ids, images, args["max_new_tokens"])
    answers.append({"prompt": ids, "new": new, "text": text, "finish": finish})
import contextlib, io
question, paths = args["questions"][0]
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    argv = [args["out"], question, *[a for p in paths for a in ("--image", p)], "--max-new-tokens", str(args["max_new_tokens"])]
    code = __import__("run_onnx").main(argv)
blocked = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "gpt2mm")]
print("RESULT " + json.dumps({"answers": answers, "imported": blocked, "cli": [code, printed.getvalue()]}))
"""


def test_run_onnx_answers_as_gpt2mm_ask_without_torch(exported):
    from gpt2mm.serve.engine import Engine, SamplingParams

    checkpoint, out, tmp = exported
    paths = []
    for i, image in enumerate(
        [make_image(20, 48), make_image(21, 40), make_image(22, 64), make_image(23, 48)]
    ):
        paths.append(str(tmp / f"q{i}.png"))
        image.save(paths[-1])
    questions = [
        ("What color is the circle?", [paths[0]]),
        ("How many shapes are there?", [paths[1]]),
        ("What shape is on the left?", [paths[2]]),
        ("Compare <image> and <image> .", [paths[3], paths[0]]),
        ("What is two plus two?", []),
    ]
    engine = Engine.from_pretrained(checkpoint, device="cpu")
    ours = []
    for question, image_paths in questions:
        images = [Image.open(p) for p in image_paths]
        choice = engine.ask(question, images, SamplingParams(max_new_tokens=MAX_NEW_TOKENS)).choices[0]
        prompt = engine.prepare([("user", question, len(images))], images).input_ids
        ours.append(
            {"prompt": prompt, "new": choice.token_ids, "text": choice.text, "finish": choice.finish_reason}
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps({"out": str(out), "questions": questions, "max_new_tokens": MAX_NEW_TOKENS}),
        capture_output=True,
        text=True,
        cwd=tmp,
        env={**env, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(
        next(x for x in proc.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT ")
    )
    assert result["imported"] == []
    assert result["cli"] == [0, ours[0]["text"] + "\n"]  # `python run_onnx.py OUT --image ... QUESTION`
    assert len({a["text"] for a in ours}) > 1, "the answers should differ from question to question"
    for a, b in zip(ours, result["answers"], strict=True):
        assert b["prompt"] == a["prompt"]
        assert b["new"][: len(a["new"])] == a["new"]  # the engine may stop earlier, at a stop string
        assert b["text"] == a["text"]
        assert b["finish"] == a["finish"]


def test_export_refuses_a_used_directory_and_keeps_it(exported, tmp_path, capsys):
    checkpoint, _, _ = exported
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["export", "onnx", str(checkpoint), str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err
        == f"gpt2mm export: error: {out} exists and is not an empty directory; choose another path or pass --overwrite"
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_failed_check_writes_nothing_and_keeps_the_earlier_export(exported, monkeypatch, capsys):
    """A runner that formats prompts unlike the processor fails the check: OUT keeps the earlier export."""
    import gpt2mm.export_onnx as export_onnx

    checkpoint, out, _ = exported
    before = (out / "manifest.json").read_text()
    config = export_onnx.runner_config
    monkeypatch.setattr(export_onnx, "runner_config", lambda *a: {**config(*a), "user_prefix": "Question:"})
    with pytest.raises(SystemExit) as e:
        main(["export", "onnx", str(checkpoint), str(out), "--overwrite", "--check", "4"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "answers 4 of 4 check questions differently from PyTorch" in err and "the prompts' ids differ" in err
    )
    assert (out / "manifest.json").read_text() == before
    assert not out.with_name(out.name + ".tmp").exists()


# --- the web page: onnxruntime-web in Chromium -----------------------------------------------------------------

# the version index.html loads (the Makefile's setup-browser fetches the same)
ORT_WEB_VERSION = re.search(
    r"onnxruntime-web@([\d.]+)/", (Path(gpt2mm.__file__).parent / "onnx_web" / "index.html").read_text()
).group(1)
ORT_WEB = Path(
    os.environ.get("GPT2MM_ORT_WEB", Path.home() / ".cache" / "gpt2mm" / f"onnxruntime-web-{ORT_WEB_VERSION}")
)
CDN = f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_WEB_VERSION}/dist/"
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
         ".html": "text/html", ".onnx": "application/octet-stream"}  # fmt: skip


def _serve_from(folder: Path):
    """A Playwright route handler answering a URL with the file of that name in `folder` (CORS allowed)."""

    def handle(route):
        name = route.request.url.split("?")[0].rsplit("/", 1)[-1]
        file = folder / name
        if not file.is_file():
            return route.fulfill(status=404, body=f"{name}: not here")
        headers = {
            "Access-Control-Allow-Origin": "*",
            "Content-Type": TYPES.get(file.suffix, "application/octet-stream"),
        }
        return route.fulfill(status=200, headers=headers, body=file.read_bytes())

    return handle


@needs_browser
@pytest.mark.skipif(
    not (ORT_WEB / "ort.wasm.min.js").is_file(),
    reason=f"the page test needs onnxruntime-web {ORT_WEB_VERSION} in {ORT_WEB} (`make setup-browser` fetches it "
    "with npm; or set GPT2MM_ORT_WEB to its dist folder)",
)
def test_web_page_answers_as_run_onnx(exported, tmp_path):
    """The exported index.html in Chromium (onnxruntime-web from a local copy of the CDN's files, the export
    served as a site): its tokenizer gives tokenizers' ids, and at the model's image size its greedy answers
    are run_onnx.py's, token for token, through the API and through the form."""
    from playwright.sync_api import sync_playwright

    _, out, _ = exported
    vlm = _vlm(out)
    texts = [
        "Q: <image><image> What color is the circle? A:",
        "héllo wörld's 12 ,.!  two  spaces\nQ:",
        "<|endoftext|>x",
    ]
    cases = []
    for i, question in enumerate(
        ["What color is the circle?", "How many shapes are there?", "What is on the left?"]
    ):
        path = tmp_path / f"page{i}.png"
        make_image(30 + i, 48).save(path)
        new, text, finish = vlm.generate(vlm.encode(question, 1), [Image.open(path)], MAX_NEW_TOKENS)
        form = vlm.generate(vlm.encode(question, 1), [Image.open(path)], 64)[
            1
        ]  # the page asks for 64 at most
        cases.append((question, path, {"ids": new, "text": text, "finish": finish}, form))
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route(CDN + "**", _serve_from(ORT_WEB))
        page.route("http://export.test/**", _serve_from(out))
        page.goto("http://export.test/index.html")
        page.wait_for_function("window.gpt2mm && window.gpt2mm.vlm !== undefined", timeout=60_000)
        assert page.evaluate("ts => ts.map(t => window.gpt2mm.vlm.tokenizer.encode(t))", texts) == [
            vlm.tokenizer.encode(t, add_special_tokens=False).ids for t in texts
        ]
        ids = [vlm.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
        assert page.evaluate("ids => ids.map(i => window.gpt2mm.vlm.tokenizer.decode(i))", ids) == [
            vlm.decode(i) for i in ids
        ]
        for question, path, expected, form in cases:
            page.set_input_files("#image", str(path))
            page.fill("#question", question)
            page.press("#question", "Enter")
            page.wait_for_function("document.getElementById('answer').dataset.done === '1'", timeout=60_000)
            assert page.text_content("#answer") == form
            got = page.evaluate(
                """async ([q, n]) => { const v = window.gpt2mm.vlm, img = document.getElementById('preview');
                   return await v.generate(v.encode(q, 1), [img], n); }""",
                [question, MAX_NEW_TOKENS],
            )
            assert got == expected
        browser.close()
    assert errors == []
