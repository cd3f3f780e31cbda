"""gpt2mm in lmms-eval, offline: `lmms-eval --model gpt2mm` (the entry-point plugin) on a task written from the
synthetic world's test split gives `gpt2mm eval`'s answers and VQA accuracy; so does the zero-code route,
lmms-eval's OpenAI-compatible model pointed at `gpt2mm serve`.

lmms-eval is run as a user runs it, in a subprocess, and judged by the files it writes: it exits 0 even when
the evaluation raised. The annotations are rewritten after the model has answered so that its answers are
right for some questions and partly right for others (a random model is otherwise always wrong, and 0 = 0
would prove nothing); the answers themselves do not depend on the annotations.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from conftest import running, wide_tiny_model
from gpt2mm.cli import main

pytest.importorskip(
    "lmms_eval", reason="lmms-eval is installed by `make setup` (pip install --no-deps lmms-eval)"
)
if not any(e.name == "gpt2mm" for e in entry_points(group="lmms_eval.models")):
    pytest.skip(
        "gpt2mm's lmms_eval.models entry point is not installed: pip install -e .", allow_module_level=True
    )

TASK = "gpt2mm_synth_test"


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A checkpoint, the world's test split with annotations that credit some of its answers, the task
    written from it, and `gpt2mm eval`'s answers and scores on it."""
    from gpt2mm.data.synthetic import write_world
    from gpt2mm.eval.lmms import write_task
    from gpt2mm.hub import save_model

    tmp = tmp_path_factory.mktemp("lmms")
    write_world(tmp / "world", n_train=2, n_val=2, n_test=6, seed=3)
    model, processor = wide_tiny_model()
    save_model(model, processor, tmp / "checkpoint", stage="init", random_init=True)
    files = {
        "questions": tmp / "world" / "test_questions.json",
        "annotations": tmp / "world" / "test_annotations.json",
        "images": tmp / "world" / "images" / "test",
    }

    def gpt2mm_eval(annotations: Path, name: str) -> tuple[dict, dict]:
        args = ["eval", str(tmp / "checkpoint"), "--device", "cpu", "--batch-size", "8"]
        args += ["--questions", str(files["questions"]), "--annotations", str(annotations)]
        args += ["--images", str(files["images"]), "--out", str(tmp / f"{name}.json")]
        assert main([*args, "--json", str(tmp / f"{name}_scores.json")]) == 0
        answers = {r["question_id"]: r["answer"] for r in json.loads((tmp / f"{name}.json").read_text())}
        return answers, json.loads((tmp / f"{name}_scores.json").read_text())

    answers, _ = gpt2mm_eval(files["annotations"], "first")
    data = json.loads(files["annotations"].read_text())
    for i, ann in enumerate(data["annotations"]):  # 0, 1, 2 or 3 of the 10 humans gave the model's answer
        for j in range(i % 4):
            ann["answers"][j]["answer"] = answers[ann["question_id"]]
    credited = tmp / "credited_annotations.json"
    credited.write_text(json.dumps(data))
    answers_again, scores = gpt2mm_eval(credited, "reference")
    assert answers_again == answers
    assert 0 < scores["overall"] < 100, scores
    write_task(files["questions"], credited, files["images"], tmp / "tasks", TASK)
    return {"tmp": tmp, "answers": answers, "scores": scores}


def run_lmms_eval(tmp: Path, name: str, model: str, model_args: str) -> tuple[float, dict]:
    """`lmms-eval` in a subprocess, offline -> (the task's vqa_accuracy, {question_id: answer})."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OPENAI_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp / "hf"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    out = tmp / name
    args = [
        "--model",
        model,
        "--model_args",
        model_args,
        "--batch_size",
        "8",
        "--include_path",
        str(tmp / "tasks"),
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmms_eval",
            *args,
            "--tasks",
            TASK,
            "--output_path",
            str(out),
            "--log_samples",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=600,
    )
    results = sorted(glob.glob(f"{out}/**/*_results.json", recursive=True))
    samples = sorted(glob.glob(f"{out}/**/*_samples_{TASK}.jsonl", recursive=True))
    assert results and samples, f"lmms-eval wrote no results (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    score = json.loads(Path(results[-1]).read_text())["results"][TASK]["vqa_accuracy,none"]
    lines = [json.loads(line)["vqa_accuracy"] for line in Path(samples[-1]).read_text().splitlines()]
    return score, {x["question_id"]: x["answer"] for x in lines}


def test_lmms_eval_model_gives_gpt2mm_evals_answers_and_score(split):
    score, answers = run_lmms_eval(
        split["tmp"], "plugin", "gpt2mm", f"pretrained={split['tmp'] / 'checkpoint'}"
    )
    assert answers == split["answers"]
    assert score == split["scores"]["overall"]


def test_lmms_eval_openai_model_against_gpt2mm_serve(split):
    pytest.importorskip("openai", reason="lmms-eval's OpenAI-compatible model needs the openai package")
    from gpt2mm.serve.api import create_app
    from gpt2mm.serve.engine import Engine

    engine = Engine.from_pretrained(split["tmp"] / "checkpoint", device="cpu")
    with running(create_app(engine)) as url:
        score, answers = run_lmms_eval(
            split["tmp"], "openai", "openai", f"model=gpt2mm,base_url={url}/v1,api_key=EMPTY"
        )
    assert answers == split["answers"]
    assert score == split["scores"]["overall"]
