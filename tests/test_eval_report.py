"""`gpt2mm eval` and `gpt2mm report` end to end on a tiny synthetic world and two tiny random models.

Random models answer nonsense (score 0), which would make "the same number" checks trivially true. So the
`answers` fixture wraps the real `answer_questions`: it still generates, then swaps in the right answer for
the questions whose generated answer (with the question id, or the sample id) hashes even. The hash depends on the model, so the two models get
different, non-zero scores, and every command that answers through `answer_questions` sees the same ones.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import pytest
import torch

from gpt2mm.cli import main

LIMIT = 8  # questions (and described images) in the report test


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from gpt2mm.data.synthetic import write_world

    out = tmp_path_factory.mktemp("world")
    write_world(out, n_train=1, n_val=1, n_test=4, seed=0)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny random models (seeds 1 and 2), the second also as the last checkpoint of a training run."""
    import shutil

    from gpt2mm import build_model

    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("stage1", 1), ("stage2", 2)):
        torch.manual_seed(seed)
        model, processor = build_model("tiny")
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        out[name] = root / name
    run = root / "run"
    shutil.copytree(out["stage1"], run / "checkpoint-2")  # older checkpoint: must not be picked
    shutil.copytree(out["stage2"], run / "checkpoint-10")
    out["run"] = run
    return out


@pytest.fixture
def answers(monkeypatch):
    """Half-oracle answers through the real generation path (see the module docstring)."""
    import gpt2mm.eval.evaluate as ev

    real = ev.answer_questions

    def patched(model, processor, samples, *args, **kwargs):
        out = real(model, processor, samples, *args, **kwargs)
        return [
            s.turns[1].text if len(s.turns) > 1 and zlib.crc32(f"{_key(s)}:{a}".encode()) % 2 == 0 else a
            for s, a in zip(samples, out)
        ]

    monkeypatch.setattr(ev, "answer_questions", patched)


def _key(sample) -> str:
    """The question id (official files, Hugging Face rows that have one), else the sample id (a CSV line)."""
    return str(sample.question_id if sample.question_id is not None else sample.id)


def _vqa_args(world: Path) -> list[str]:
    return [
        "--questions",
        str(world / "test_questions.json"),
        "--annotations",
        str(world / "test_annotations.json"),
        "--images",
        str(world / "images" / "test"),
    ]


def _overall(printed: str) -> str:
    return re.search(r"^VQA accuracy: (\S+)  \((\d+) questions\)", printed, re.M).group(1, 2)


def _eval(model: Path, world: Path, tmp_path: Path, capsys, *extra: str) -> tuple[list, dict, str]:
    return _eval_on(model, _vqa_args(world), tmp_path, capsys, *extra)


def _eval_on(model: Path, split: list[str], tmp_path: Path, capsys, *extra: str) -> tuple[list, dict, str]:
    """`gpt2mm eval` of `model` on the split its arguments name: (results, scores, printed)."""
    res, scores = tmp_path / f"{model.name}_results.json", tmp_path / f"{model.name}_scores.json"
    argv = ["eval", str(model), *split, "--out", str(res), "--json", str(scores), *extra]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    return json.loads(res.read_text()), json.loads(scores.read_text()), printed


def test_eval_results_and_scores_match_vqa_score(world, models, tmp_path, capsys, answers):
    results, scores, printed = _eval(models["stage1"], world, tmp_path, capsys, "--batch-size", "7")
    qids = [q["question_id"] for q in json.loads((world / "test_questions.json").read_text())["questions"]]
    assert sorted(r["question_id"] for r in results) == sorted(qids)
    assert all(set(r) == {"question_id", "answer"} and isinstance(r["answer"], str) for r in results)
    assert scores["overall"] > 0
    assert "questions/s" in printed and "throughput" in printed
    assert scores["eval"]["questions"] == len(qids)

    official = tmp_path / "official.json"
    argv = ["vqa-score", *_vqa_args(world)[:4], "--results", str(tmp_path / "stage1_results.json")]
    assert main([*argv, "--json", str(official)]) == 0
    vqa_printed = capsys.readouterr().out
    assert _overall(printed) == _overall(vqa_printed) == (f"{scores['overall']:.2f}", str(len(qids)))
    expected = json.loads(official.read_text())
    assert {k: v for k, v in scores.items() if k != "eval"} == expected
    # the same report as vqa-score's, followed by the throughput
    assert printed.split("VQA accuracy:", 1)[1].startswith(
        vqa_printed.split("VQA accuracy:", 1)[1].split("\nwrote")[0]
    )


def test_eval_limit_scores_the_answered_subset(world, models, tmp_path, capsys, answers):
    from gpt2mm.eval.vqa_files import load_annotations, load_questions
    from gpt2mm.eval.vqa_metric import evaluate

    results, scores, printed = _eval(models["stage2"], world, tmp_path, capsys, "--limit", "3")
    questions = load_questions(world / "test_questions.json")[:3]
    assert [r["question_id"] for r in results] == [q["question_id"] for q in questions]
    ids = {q["question_id"] for q in questions}
    annotations = [a for a in load_annotations(world / "test_annotations.json") if a["question_id"] in ids]
    assert _overall(printed)[1] == "3"
    expected = json.loads(json.dumps(evaluate(questions, annotations, results)))  # int ids -> JSON keys
    assert {k: v for k, v in scores.items() if k != "eval"} == expected


def test_eval_bad_model_path_is_a_usage_error(world, tmp_path, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    for model, message in ((empty, "is not a gpt2mm model directory"), (tmp_path / "absent", "cannot load")):
        with pytest.raises(SystemExit) as e:
            main(["eval", str(model), *_vqa_args(world)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "gpt2mm eval: error:" in err and message in err and "Traceback" not in err
        if model.name == "absent":  # a path that does not exist is named as such, not taken for a hub id
            assert "no such model directory" in err


def test_resolve_checkpoint_and_labels(tmp_path):
    from gpt2mm.errors import UsageError
    from gpt2mm.eval.report import labels_for, resolve_checkpoint

    run = tmp_path / "run"
    for name in ("checkpoint-9", "checkpoint-10", "checkpoint-11.tmp"):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
    assert resolve_checkpoint(run) == run / "checkpoint-10"
    (run / "best").mkdir()
    (run / "best" / "config.json").write_text("{}")
    assert resolve_checkpoint(run) == run / "best"
    assert resolve_checkpoint(run / "checkpoint-9") == run / "checkpoint-9"
    assert resolve_checkpoint("someone/some-model") == "someone/some-model"  # left to the hub
    with pytest.raises(UsageError, match="neither a gpt2mm model directory"):
        resolve_checkpoint(tmp_path)
    assert labels_for(["runs/stage1/", "a/best", "b/best"]) == ["stage1", "a/best", "b/best"]


def _table(markdown: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return {r[0]: dict(zip(header, r)) for r in rows}


def test_report_compares_checkpoints_with_description_f1(
    world, models, tmp_path, capsys, answers, monkeypatch
):
    from PIL import Image

    import gpt2mm.eval.report as report
    from gpt2mm.data.synthetic import describe, load_scenes, score_description

    # record the generated descriptions; for the second model, swap in the true one for half the images
    scenes = {s["image_id"]: s for s in load_scenes(world, "test")}
    generated: list[list[str]] = []
    real = report.generate_descriptions

    def recording(model, processor, samples, *args, **kwargs):
        texts = real(model, processor, samples, *args, **kwargs)
        if generated:
            texts = [
                describe(scenes[int(s.id)]) if i % 2 == 0 else t
                for i, (s, t) in enumerate(zip(samples, texts))
            ]
        generated.append(texts)
        return texts

    monkeypatch.setattr(report, "generate_descriptions", recording)
    md, png, js = tmp_path / "r" / "report.md", tmp_path / "report.png", tmp_path / "report.json"
    argv = ["report", str(models["stage1"]), str(models["run"]), *_vqa_args(world), "--limit", str(LIMIT)]
    argv += ["--world", str(world), "--split", "test", "--out", str(md), "--png", str(png), "--json", str(js)]
    argv += ["--describe-max-new-tokens", "24"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = _table(md.read_text())
    assert md.read_text() in printed
    assert set(table) == {"stage1", "run"}
    rows = {r["label"]: r for r in json.loads(js.read_text())}
    assert rows["run"]["model"].endswith("checkpoint-10")
    with Image.open(png) as im:
        im.verify()

    # VQA columns: the numbers `gpt2mm eval` gives for each model on the same questions
    for label, model in (("stage1", models["stage1"]), ("run", models["run"] / "checkpoint-10")):
        _, scores, _ = _eval(model, world, tmp_path, capsys, "--limit", str(LIMIT))
        assert table[label]["VQA overall"] == f"{scores['overall']:.2f}"
        for a_type, acc in scores["perAnswerType"].items():
            assert table[label][f"VQA {a_type}"] == f"{acc:.2f}"
    assert table["stage1"]["VQA overall"] != table["run"]["VQA overall"]

    # description columns: the mean of score_description over the very texts generated
    test_scenes = load_scenes(world, "test")[:LIMIT]
    assert len(generated) == 2 and all(len(t) == len(test_scenes) for t in generated)
    for label, texts in zip(("stage1", "run"), generated):
        for key in ("precision", "recall", "f1"):
            mean = 100 * sum(score_description(t, s)[key] for t, s in zip(texts, test_scenes)) / len(texts)
            assert rows[label]["description"][key] == pytest.approx(mean)
            assert table[label][f"desc {key}"] == f"{mean:.2f}"
    assert float(table["run"]["desc f1"]) > 0


def test_report_without_world_has_no_description_columns(world, models, tmp_path, capsys):
    md = tmp_path / "report.md"
    argv = ["report", str(models["stage1"]), str(models["stage2"]), *_vqa_args(world), "--limit", "2"]
    assert main([*argv, "--out", str(md)]) == 0
    table = _table(md.read_text())
    assert set(table) == {"stage1", "stage2"}
    assert all("VQA overall" in r and not any(k.startswith("desc") for k in r) for r in table.values())


# --- other formats: a Hugging Face dataset, a CSV, a recipe's data: section -----------------------------------


@pytest.fixture(scope="module")
def sources(world, tmp_path_factory) -> Path:
    """The world's test split as the seed's CSV (test.csv: image, "Q: ... A: {multiple-choice answer}") and as
    parquet data files (pq/test-*.parquet: image path, question, answer, the 10 human answers, ids, types)."""
    import csv

    datasets = pytest.importorskip("datasets")
    from gpt2mm.data.vqa import load_vqa

    samples, _ = load_vqa(
        world / "test_questions.json", world / "test_annotations.json", world / "images" / "test"
    )
    root = tmp_path_factory.mktemp("sources")
    with open(root / "test.csv", "w", newline="") as f:
        csv.writer(f).writerows([(s.image, f"Q: {s.turns[0].text} A: {s.turns[1].text}") for s in samples])
    columns = {
        "image": [s.image for s in samples],
        "question": [s.turns[0].text for s in samples],
        "answer": [s.turns[1].text for s in samples],
        "answers": [s.answers for s in samples],
        "question_id": [s.question_id for s in samples],
        "answer_type": [s.answer_type for s in samples],
    }
    (root / "pq").mkdir()
    datasets.Dataset.from_dict(columns).to_parquet(str(root / "pq" / "test-00000-of-00001.parquet"))
    return root


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _csv_args(root: Path, name: str = "test.csv") -> list[str]:
    return ["--data.format", "csv", "--data.root", str(root), "--data.csv_val", name]


def test_eval_on_a_csv_is_exact_match_equal_to_a_naive_recomputation(
    sources, models, tmp_path, capsys, answers
):
    """A CSV has one answer per question: eval scores exact match after the official normalization, says so,
    and the score is the mean of (normalized answer == normalized CSV answer) over the answers it wrote.
    A recipe's data: section (`--recipe`, training keys and all) names the same split."""
    import csv

    from gpt2mm.eval.vqa_metric import normalize_answer, round_half_away

    results, scores, printed = _eval_on(models["stage1"], _csv_args(sources), tmp_path, capsys)
    rows = list(csv.reader(open(sources / "test.csv", newline="")))
    assert [r["id"] for r in results] == [str(i) for i in range(1, len(rows) + 1)]  # CSV line numbers
    refs = [r[1].rsplit(" A: ", 1)[1] for r in rows]
    assert [r["references"] for r in results] == [[a] for a in refs]
    hits = [normalize_answer(r["answer"]) == normalize_answer(a) for r, a in zip(results, refs)]
    assert 0 < sum(hits) < len(hits)  # the half-oracle answers: a score that is not trivially 0 or 100
    assert scores["overall"] == round_half_away(100 * sum(hits) / len(hits), 2)
    assert scores["scoring"] == scores["eval"]["scoring"] == "exact match"
    assert f"exact match: {scores['overall']:.2f}  ({len(rows)} questions; " in printed
    assert "VQA accuracy" not in printed

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{preset: tiny}}\ntrain: {{max_steps: 3}}\n"
        f"data: {{format: csv, root: {sources}, csv_val: test.csv, csv_train: absent.csv, pack_questions: 4}}\n"
    )
    again, again_scores, _ = _eval_on(models["stage1"], ["--recipe", str(recipe)], tmp_path, capsys)
    assert again == results and again_scores["overall"] == scores["overall"]


def test_eval_on_hf_data_files_with_10_answers_is_the_official_vqa_accuracy(
    world, sources, models, tmp_path, capsys, answers, hf_cache
):
    """The world's test split as parquet files with an `answers` column: eval scores the official VQA accuracy
    (the number it gives on the official files of the same questions), read at once or streamed."""
    official_results, official, _ = _eval(models["stage2"], world, tmp_path, capsys)
    args = ["--data.format", "hf", "--data.root", str(sources), "--data.hf_dataset", "pq"]
    args += ["--data.hf_val_split", "test"]
    for streaming in ("false", "true"):
        results, scores, printed = _eval_on(
            models["stage2"], [*args, "--data.hf_streaming", streaming], tmp_path, capsys
        )
        assert scores["scoring"] == "vqa accuracy" and f"vqa accuracy: {scores['overall']:.2f}" in printed
        assert scores["overall"] == official["overall"] > 0
        assert scores["perAnswerType"] == official["perAnswerType"]
        answered = {r["question_id"]: r["answer"] for r in official_results}
        assert {r["question_id"]: r["answer"] for r in results} == answered


def test_eval_on_llava_records_scores_each_first_reply_with_its_images(world, models, tmp_path, capsys):
    """LLaVA records with two images each, placeholders where they stand (both in the first question, or one
    in a later question that is not asked): eval answers each record's first user turn with that turn's
    images, and its exact-match score is the mean of (normalized answer == normalized first reply); the
    answers are those of `answer_questions` on first exchanges built by hand."""
    from gpt2mm.data.samples import Sample, Turn
    from gpt2mm.eval.evaluate import answer_questions
    from gpt2mm.eval.vqa_metric import normalize_answer, round_half_away
    from gpt2mm.loading import load_model

    folder = world / "images" / "test"
    images = sorted(p.name for p in folder.iterdir())
    records, expected = [], []
    for i in range(len(images)):
        pair = [images[i], images[(i + 1) % len(images)]]
        first = f"Is <image> the same as <image> ? ({i})" if i % 2 == 0 else f"Is <image> round? ({i})"
        later = "Why?" if i % 2 == 0 else "And <image> ?"
        reply = "yes" if i % 2 else "no"
        records.append({"id": f"r{i}", "image": pair, "conversations": [
            {"from": "human", "value": first}, {"from": "gpt", "value": reply},
            {"from": "human", "value": later}, {"from": "gpt", "value": "colour"}]})  # fmt: skip
        shown = [str(folder / p) for p in (pair if i % 2 == 0 else pair[:1])]
        expected.append(Sample(id=f"r{i}", image=shown[0], more_images=shown[1:],
                               turns=[Turn("user", first), Turn("assistant", reply)]))  # fmt: skip
    (tmp_path / "val_llava.json").write_text(json.dumps(records))
    args = ["--data.format", "llava", "--data.root", str(tmp_path), "--data.llava_images", str(folder)]
    results, scores, printed = _eval_on(models["stage1"], args, tmp_path, capsys)
    assert [r["id"] for r in results] == [r["id"] for r in records]
    refs = [r["conversations"][1]["value"] for r in records]
    hits = [normalize_answer(r["answer"]) == normalize_answer(a) for r, a in zip(results, refs)]
    assert scores["scoring"] == "exact match"
    assert scores["overall"] == round_half_away(100 * sum(hits) / len(hits), 2)
    model, processor = load_model(models["stage1"])
    assert [r["answer"] for r in results] == answer_questions(model, processor, expected, max_new_tokens=8)


@pytest.mark.parametrize("fmt", ["csv", "hf"])
def test_eval_skip_bad_counts_a_bad_record_of_a_csv_or_hf_split(
    sources, models, tmp_path, capsys, hf_cache, fmt
):
    """A bad record: without --skip-bad a one-line error naming the file and the line (row); with it, the
    record is counted in the printed load report and in the scores' `eval.skipped`."""
    import shutil

    datasets = pytest.importorskip("datasets")
    if fmt == "csv":
        text = (sources / "test.csv").read_text()
        (tmp_path / "bad.csv").write_text(text + "x.png,a caption, not a question\n")
        n = len(text.splitlines())
        args, where, reason = (
            _csv_args(tmp_path, "bad.csv"),
            rf"bad\.csv: line {n + 1}: expected 2 fields",
            "bad row",
        )
    else:
        shutil.copytree(sources / "pq", tmp_path / "pq")
        rows = {"image": [None], "question": ["how many?"], "answer": [""]}
        datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "pq" / "test-00001-of-00001.parquet"))
        n = len(_eval_rows(sources))
        args = ["--data.format", "hf", "--data.root", str(tmp_path), "--data.hf_dataset", "pq"]
        args += ["--data.hf_val_split", "test"]
        where, reason = rf"pq: row {n}: empty question or answer", "bad schema"
    with pytest.raises(SystemExit) as e:
        main(["eval", str(models["stage1"]), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # one line after the usage
    assert last.startswith("gpt2mm eval: error: ") and re.search(where, last) and "Traceback" not in err
    results, scores, printed = _eval_on(models["stage1"], [*args, "--skip-bad"], tmp_path, capsys)
    assert f"{n} samples; skipped 1 record: 1 {reason}" in printed
    assert scores["eval"]["skipped"] == {reason: 1} and len(results) == n


def _eval_rows(sources: Path) -> list[str]:
    return (sources / "test.csv").read_text().splitlines()


def test_report_on_a_csv_names_its_columns_by_the_scoring(sources, models, tmp_path, capsys, answers):
    md = tmp_path / "report.md"
    argv = ["report", str(models["stage1"]), str(models["stage2"]), *_csv_args(sources), "--limit", "4"]
    assert main([*argv, "--out", str(md)]) == 0
    printed = capsys.readouterr().out
    assert "Exact match (%) on test.csv: 4 questions" in printed
    table = _table(md.read_text())
    _, scores, _ = _eval_on(models["stage1"], _csv_args(sources), tmp_path, capsys, "--limit", "4")
    assert table["stage1"]["exact match overall"] == f"{scores['overall']:.2f}"


# --- bad input: unreadable images, outputs over inputs, devices ---------------------------------------------


@pytest.fixture
def broken_world(world, tmp_path) -> tuple[Path, str, set[int]]:
    """A copy of the world whose first test image is text: (world, that image's path, its question ids)."""
    import shutil

    copy = tmp_path / "broken_world"
    shutil.copytree(world, copy)
    questions = json.loads((copy / "test_questions.json").read_text())["questions"]
    image_id = questions[0]["image_id"]
    (bad,) = (copy / "images" / "test").glob(f"*_{image_id:012d}.png")
    bad.write_text("not an image, just text")
    return copy, str(bad), {q["question_id"] for q in questions if q["image_id"] == image_id}


def test_eval_skip_bad_skips_the_questions_of_an_unreadable_image(broken_world, models, tmp_path, capsys):
    from gpt2mm.eval.vqa_files import load_annotations, load_questions
    from gpt2mm.eval.vqa_metric import evaluate

    world, bad, bad_ids = broken_world
    all_ids = [q["question_id"] for q in load_questions(world / "test_questions.json")]
    assert 0 < len(bad_ids) < len(all_ids)

    # without --skip-bad: a usage error naming the file (and the way out), no traceback
    with pytest.raises(SystemExit) as e:
        main(["eval", str(models["stage1"]), *_vqa_args(world)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}: not an image file" in err and "--skip-bad" in err and "Traceback" not in err

    results, scores, printed = _eval(models["stage1"], world, tmp_path, capsys, "--skip-bad")
    kept = [i for i in all_ids if i not in bad_ids]
    assert [r["question_id"] for r in results] == kept
    n = len(bad_ids)
    assert f"skipped {n} record{'s' if n != 1 else ''}: {n} unreadable image" in printed
    assert f"skipped {n} question{'s' if n != 1 else ''} ({n} unreadable image)" in printed
    assert _overall(printed)[1] == str(len(kept))
    assert scores["eval"]["skipped"] == {"unreadable image": n} and scores["eval"]["questions"] == len(kept)
    questions = [q for q in load_questions(world / "test_questions.json") if q["question_id"] in set(kept)]
    annotations = [
        a for a in load_annotations(world / "test_annotations.json") if a["question_id"] in set(kept)
    ]
    expected = json.loads(json.dumps(evaluate(questions, annotations, results)))
    assert {k: v for k, v in scores.items() if k != "eval"} == expected

    # skipped questions do not count towards --limit: the first 2 readable ones are answered
    results, scores, printed = _eval(models["stage1"], world, tmp_path, capsys, "--skip-bad", "--limit", "2")
    assert [r["question_id"] for r in results] == kept[:2]
    assert scores["eval"]["skipped"] == {"unreadable image": n}


def test_report_skip_bad_skips_unreadable_images(broken_world, models, tmp_path, capsys):
    world, bad, bad_ids = broken_world
    argv = ["report", str(models["stage1"]), *_vqa_args(world), "--world", str(world)]
    argv += ["--describe-max-new-tokens", "4", "--json", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}: not an image file" in err and "Traceback" not in err

    assert main([*argv, "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    n_questions = len(json.loads((world / "test_questions.json").read_text())["questions"])
    n = len(bad_ids)
    assert f"{n_questions - n} questions ({n} skipped: {n} unreadable image)" in printed
    assert "skipped 1 unreadable test images" in printed
    (row,) = json.loads((tmp_path / "r.json").read_text())
    assert row["questions"] == n_questions - n


@pytest.mark.parametrize("flag", ["--out", "--json"])
@pytest.mark.parametrize("target", ["test_questions.json", "test_annotations.json"])
def test_eval_refuses_to_write_over_an_input(world, models, tmp_path, capsys, flag, target):
    import shutil

    copy = tmp_path / "w"
    shutil.copytree(world, copy, ignore=shutil.ignore_patterns("images"))
    before = (copy / target).read_bytes()
    args = [
        "--questions",
        str(copy / "test_questions.json"),
        "--annotations",
        str(copy / "test_annotations.json"),
        "--images",
        str(world / "images" / "test"),
    ]
    (tmp_path / "link.json").symlink_to(copy / target)
    for path in (copy / target, copy / "nodir" / ".." / target, tmp_path / "link.json"):  # one file
        with pytest.raises(SystemExit) as e:
            main(["eval", str(models["stage1"]), *args, flag, str(path)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        which = "--questions" if "questions" in target else "--annotations"
        assert f"{flag} {path}: is the {which} file" in err and "Traceback" not in err
        assert (copy / target).read_bytes() == before  # nothing lost
    with pytest.raises(SystemExit):
        main(
            [
                "eval",
                str(models["stage1"]),
                *args,
                "--out",
                str(tmp_path / "x.json"),
                "--json",
                str(tmp_path / "x.json"),
            ]
        )
    assert "--json" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_report_refuses_to_write_over_an_input(world, models, tmp_path, capsys):
    import shutil

    copy = tmp_path / "w"
    shutil.copytree(world, copy, ignore=shutil.ignore_patterns("images"))
    before = (copy / "test_annotations.json").read_bytes()
    args = [
        "--questions",
        str(copy / "test_questions.json"),
        "--annotations",
        str(copy / "test_annotations.json"),
    ]
    args += ["--images", str(world / "images" / "test")]
    for flag in ("--out", "--png", "--json"):
        with pytest.raises(SystemExit) as e:
            main(["report", str(models["stage1"]), *args, flag, str(copy / "test_annotations.json")])
        assert e.value.code == 2
        assert (
            f"{flag} {copy / 'test_annotations.json'}: is the --annotations file" in capsys.readouterr().err
        )
    assert (copy / "test_annotations.json").read_bytes() == before


def test_eval_refuses_an_unknown_device(world, models, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in (("gpu", "not a device name"), ("cuda", "CUDA is not available on this machine")):
        with pytest.raises(SystemExit) as e:
            main(["eval", str(models["stage1"]), *_vqa_args(world), "--device", device])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"--device {device}: {message}" in err and "Traceback" not in err


# --- gpt2mm plot --out --------------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "val_accuracy": 20.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _png_written(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"


def test_plot_out_directory_missing_parent_and_default(run_dir, tmp_path, capsys):
    out_dir = tmp_path / "plots"
    out_dir.mkdir()
    cases = [
        (str(out_dir), out_dir / "curves.png"),  # an existing directory: the default name inside it
        (str(tmp_path / "new") + "/", tmp_path / "new" / "curves.png"),  # a directory to create
        (str(tmp_path / "a" / "b" / "x.png"), tmp_path / "a" / "b" / "x.png"),  # missing parents
        (None, run_dir / "curves.png"),
    ]
    for out, written in cases:
        assert main(["plot", str(run_dir), *(["--out", out] if out else [])]) == 0
        assert capsys.readouterr().out == f"wrote {written}\n"
        _png_written(written)
    assert not (tmp_path / "plots.png").exists()
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "c.PDF")]) == 0
    assert (tmp_path / "c.PDF").read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize(
    "name, message", [("x.txt", ".txt is not a format"), ("curves", "no file extension")]
)
def test_plot_out_with_a_bad_extension_is_a_usage_error(run_dir, tmp_path, capsys, name, message):
    with pytest.raises(SystemExit) as e:
        main(["plot", str(run_dir), "--out", str(tmp_path / name)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"gpt2mm plot: error: --out {tmp_path / name}: {message}" in err and ".png" in err and ".pdf" in err
    )
    assert (
        "Traceback" not in err
        and not list(tmp_path.glob(name + "*"))
        and not (tmp_path / "curves.png").exists()
    )
