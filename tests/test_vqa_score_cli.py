"""`gpt2mm vqa-score` end to end on tiny official-format files, and its refusals of bad input (exit code 2,
a message naming the file and the record)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt2mm.cli import main

ANSWERS = {
    1: ("yes/no", "is the", ["yes"] * 10, "yes"),  # 100
    2: ("other", "what color is the", ["red"] + ["blue"] * 9, "Red."),  # 30
    3: ("yes/no", "is the", ["no"] * 10, "yes"),  # 0
    4: ("number", "how many", ["two"] * 3 + ["2"] * 5 + ["3"] * 2, "2"),  # normalized: 8 matches -> 100
}


def _questions(ids=ANSWERS) -> dict:
    return {
        "info": {"description": "tiny"},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "data_subtype": "val2014",
        "license": {"name": "test"},
        "questions": [{"image_id": 100 + q, "question": f"question {q}?", "question_id": q} for q in ids],
    }


def _annotations(ids=ANSWERS) -> dict:
    anns = []
    for q in ids:
        a_type, q_type, answers, _ = ANSWERS[q]
        anns.append(
            {
                "image_id": 100 + q,
                "question_id": q,
                "question_type": q_type,
                "answer_type": a_type,
                "multiple_choice_answer": answers[0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(answers)
                ],
            }
        )
    return {"info": {}, "license": {}, "data_subtype": "val2014", "annotations": anns}


def _results(ids=ANSWERS) -> list:
    return [{"question_id": q, "answer": ANSWERS[q][3]} for q in ids]


def _write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    return {
        "q": _write(tmp_path / "questions.json", _questions()),
        "a": _write(tmp_path / "annotations.json", _annotations()),
        "r": _write(tmp_path / "results.json", _results()),
    }


def _argv(files, *extra) -> list[str]:
    return [
        "vqa-score",
        "--questions",
        str(files["q"]),
        "--annotations",
        str(files["a"]),
        "--results",
        str(files["r"]),
        *extra,
    ]


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "gpt2mm vqa-score: error: " in err
    assert "Traceback" not in err
    return err


def test_scores_and_json(files, tmp_path, capsys):
    out = tmp_path / "out" / "scores.json"
    assert main(_argv(files, "--json", str(out))) == 0
    printed = capsys.readouterr().out
    # (1 + 0.3 + 0 + 1) / 4 = 57.5
    assert "VQA accuracy: 57.50  (4 questions)" in printed
    assert "answer type" in printed and "question type" in printed
    lines = {line.split("  ")[0].strip(): line.split() for line in printed.splitlines() if line.strip()}
    assert lines["yes/no"][-2:] == ["2", "50.00"]
    assert lines["number"][-2:] == ["1", "100.00"]
    assert lines["what color is the"][-2:] == ["1", "30.00"]
    scores = json.loads(out.read_text())
    assert scores == {
        "overall": 57.5,
        "perAnswerType": {"number": 100.0, "other": 30.0, "yes/no": 50.0},
        "perQuestionType": {"how many": 100.0, "is the": 50.0, "what color is the": 30.0},
        "perQuestion": {"1": 100.0, "2": 30.0, "3": 0.0, "4": 100.0},
    }


def test_results_order_does_not_matter(files, capsys):
    _write(files["r"], list(reversed(_results())))
    assert main(_argv(files)) == 0
    assert "VQA accuracy: 57.50" in capsys.readouterr().out


def test_missing_and_unknown_ids_are_refused(files, capsys):
    results = [r for r in _results() if r["question_id"] != 2] + [{"question_id": 99, "answer": "x"}]
    _write(files["r"], results)
    err = _refused(_argv(files), capsys)
    assert str(files["r"]) in err
    assert "1 question(s) without a result (question_id 2)" in err
    assert "1 result(s) for unknown questions (question_id 99)" in err


def test_long_id_lists_are_truncated(files, capsys):
    _write(files["r"], _results() + [{"question_id": 1000 + i, "answer": "x"} for i in range(30)])
    err = _refused(_argv(files), capsys)
    assert "30 result(s) for unknown questions (question_id 1000, 1001" in err
    assert "... and 20 more" in err


def test_duplicate_results_are_refused(files, capsys):
    _write(files["r"], _results() + [{"question_id": 3, "answer": "no"}])
    err = _refused(_argv(files), capsys)
    assert f"{files['r']}: results[4] repeats question_id 3 (first at results[2])" in err


@pytest.mark.parametrize(
    ("which", "content", "expected"),
    [
        ("r", None, "no such file"),
        ("q", "{not json", "not valid JSON"),
        ("a", "", "not valid JSON"),
        ("r", {"question_id": 1, "answer": "yes"}, "expected a JSON list of records, got dict"),
        (
            "r",
            [{"question_id": "1", "answer": "yes"}],
            "results[0] (question_id 1): 'question_id' must be int, got str",
        ),
        ("r", [{"question_id": 1, "answer": 2}], "results[0] (question_id 1): 'answer' must be str, got int"),
        ("r", [{"question_id": 1}], "results[0] (question_id 1): missing 'answer'"),
        ("r", ["yes"], "results[0] must be an object, got str"),
        ("q", {"info": {}}, "no 'questions' key (keys: info)"),
        ("q", [], "expected a JSON object with a 'questions' list, got list"),
        ("a", {"annotations": {}}, "'annotations' must be a list, got dict"),
    ],
)
def test_bad_files_are_refused(files, capsys, which, content, expected):
    if content is None:
        files[which].unlink()
    else:
        _write(files[which], content)
    err = _refused(_argv(files), capsys)
    assert str(files[which]) in err
    assert expected in err


def test_bad_annotation_records_are_refused(files, capsys):
    anns = _annotations()
    del anns["annotations"][1]["answer_type"]
    _write(files["a"], anns)
    err = _refused(_argv(files), capsys)
    assert f"{files['a']}: annotations[1] (question_id 2): missing 'answer_type'" in err

    anns = _annotations()
    anns["annotations"][2]["answers"][4] = {"answer": None}
    _write(files["a"], anns)
    err = _refused(_argv(files), capsys)
    assert (
        f"{files['a']}: annotations[2] (question_id 3): answers[4] must be an object with a string 'answer'"
        in err
    )

    anns = _annotations()
    anns["annotations"][0]["answers"] = []
    _write(files["a"], anns)
    assert "annotations[0] (question_id 1): 'answers' is empty" in _refused(_argv(files), capsys)


def test_question_without_annotation_is_refused(files, capsys):
    _write(files["a"], _annotations(ids=[1, 2, 4]))
    err = _refused(_argv(files), capsys)
    assert f"{files['q']}: questions[2] (question_id 3) has no annotation in {files['a']}" in err


def test_annotation_without_question_is_refused(files, capsys):
    _write(files["q"], _questions(ids=[1, 2, 3]))
    err = _refused(_argv(files), capsys)
    assert f"{files['a']}: annotations[3] (question_id 4) is not a question of {files['q']}" in err


def test_duplicate_questions_and_image_mismatch_are_refused(files, capsys):
    qs = _questions()
    qs["questions"].append(dict(qs["questions"][0]))
    _write(files["q"], qs)
    assert "questions[4] repeats question_id 1 (first at questions[0])" in _refused(_argv(files), capsys)

    qs = _questions()
    qs["questions"][1]["image_id"] = 7
    _write(files["q"], qs)
    assert "question_id 2: image_id 102 but" in _refused(_argv(files), capsys)


def test_unwritable_json_output_is_refused(files, tmp_path, capsys):
    blocker = _write(tmp_path / "blocker", "x")
    err = _refused(_argv(files, "--json", str(blocker / "scores.json")), capsys)
    assert "cannot write" in err


def test_missing_arguments_exit_2(files, capsys):
    with pytest.raises(SystemExit) as e:
        main(["vqa-score", "--questions", str(files["q"])])
    assert e.value.code == 2
    assert "--annotations" in capsys.readouterr().err
