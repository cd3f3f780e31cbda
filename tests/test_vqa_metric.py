"""The official VQA v2 accuracy: every normalization rule by hand-computed cases, the leave-one-out mean,
the aggregation and its Python 2 rounding, and a naive re-implementation compared on random answer sets."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from gpt2mm.errors import DataError
from gpt2mm.eval.vqa_metric import (
    CONTRACTIONS,
    clean_whitespace,
    evaluate,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    round_half_away,
    vqa_accuracy,
)

# ---------------------------------------------------------------- whitespace


def test_newlines_tabs_and_strip():
    assert clean_whitespace("  yes\n") == "yes"
    assert clean_whitespace("red\tball") == "red ball"
    assert clean_whitespace("a\nb\tc ") == "a b c"


# ---------------------------------------------------------------- punctuation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a mark touching a space is deleted (everywhere in the text)
        ("yes, it is", "yes it is"),
        ("left -right", "left right"),
        ("why?! ", "why  "),  # "! " touches: deleted; "?" does not: a space
        ("red-white -blue", "redwhite blue"),
        # a digit-comma-digit anywhere deletes every mark
        ("1,000", "1000"),
        ("10,000 x-ray", "10000 xray"),
        ("1,2 (x)", "12 x"),
        # otherwise the mark becomes a space
        ("x-ray", "x ray"),
        ("red/white", "red white"),
        ("(yes)", " yes "),
        ("1, 2", "1 2"),  # comma touching a space, no digit-comma-digit
        ("a,b", "a b"),
        # the tests look at the input text, not at the partly replaced one: ";" becomes a space first, yet
        # "?" (which only then touches a space) is still replaced by a space, not deleted
        ("x;?y?z", "x  y z"),
        # characters outside the official list are kept
        ("it's", "it's"),
        ("50%", "50%"),
        ("a:b", "a:b"),
    ],
)
def test_punctuation_rule(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.5", "2.5"),  # a period followed by a digit is kept
        (".5", ".5"),
        ("3.14.", "3.14"),
        ("2.", "2"),
        ("yes.", "yes"),
        ("Mr.Smith", "MrSmith"),
        ("a.b.c", "abc"),
        ("1.5.2", "1.5.2"),
    ],
)
def test_period_rule(text, expected):
    assert process_punctuation(text) == expected


def test_period_rule_deletes_at_most_32():
    # the official passes re.UNICODE (32) as the count of `sub`
    assert process_punctuation("." * 40) == "." * 8
    assert process_punctuation("x." * 33) == "x" * 32 + "x."


def test_digits_are_ascii_only():
    # Python 2 compiled the official regexes without re.UNICODE: `\d` is [0-9]
    assert process_punctuation("\u0661,\u0662") == "\u0661 \u0662"  # Arabic-Indic digits: no number comma
    assert process_punctuation("\u0661.") == "\u0661"


# ---------------------------------------------------------------- words


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("YES", "yes"),
        ("Two", "2"),
        ("one dog", "1 dog"),
        ("ten", "10"),
        ("zero", "0"),
        ("none", "0"),
        ("None", "0"),
        ("eleven", "eleven"),
        ("the red ball", "red ball"),
        ("a dog", "dog"),
        ("An apple", "apple"),
        ("theater", "theater"),
        ("dont", "don't"),
        ("youre", "you're"),
        ("i dont know", "i don't know"),
        ("Im", "im"),  # the official "Im" key can never match: words are lower-cased first
        ("somebody'd", "somebodyd"),  # the official table's inverted entry
        ("its", "its"),
        ("  many   spaces ", "many spaces"),
    ],
)
def test_digit_article_rule(text, expected):
    assert process_digit_article(text) == expected


def test_contractions_table():
    assert len(CONTRACTIONS) == 120
    for key, value in [("aint", "ain't"), ("wont", "won't"), ("yall'd've", "y'all'd've"), ("twas", "'twas")]:
        assert CONTRACTIONS[key] == value
    assert all("'" in v for k, v in CONTRACTIONS.items() if k != "somebody'd")


def test_lower_case_is_python2_simple_mapping():
    assert process_digit_article("\u039f\u0394\u039f\u03a3") == "\u03bf\u03b4\u03bf\u03c3"  # no final sigma
    assert process_digit_article("\u0130") == "i"


def test_normalize_answer_full_chain():
    assert normalize_answer(" The Two dogs.\n") == "2 dogs"
    assert normalize_answer("Yes.") == "yes"
    assert normalize_answer("none, really") == "0 really"


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    ("m", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)]
)
def test_leave_one_out_ten_answers(m, expected):
    answers = ["yes"] * m + ["no"] * (10 - m)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected, abs=1e-15)
    # hand formula: m leave-outs drop a match, 10 - m do not
    by_hand = (m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10
    assert vqa_accuracy("yes", answers) == pytest.approx(by_hand, abs=1e-15)


def test_leave_one_out_exact_floats():
    assert vqa_accuracy("yes", ["yes"] + ["no"] * 9) == 0.3
    assert vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == 0.6
    assert vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == 0.9
    assert vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == 1.0


def test_other_answer_counts():
    # 5 answers, 2 matches: (2 * 1/3 + 3 * 2/3) / 5
    assert vqa_accuracy("yes", ["yes", "yes", "no", "no", "no"]) == pytest.approx(8 / 15)
    # 4 answers all matching: each subset of 3 has 3 matches
    assert vqa_accuracy("x", ["x", "x", "x", "x"]) == 1.0
    # fewer than 4: the fraction of normalized answers that match (official rule cannot reach 1 there)
    assert vqa_accuracy("Yes", ["yes"]) == 1.0
    assert vqa_accuracy("the dog", ["Dog."]) == 1.0
    assert vqa_accuracy("no", ["yes"]) == 0.0
    assert vqa_accuracy("yes", ["yes", "no"]) == 0.5
    assert vqa_accuracy("yes", ["Yes", "yes", "no"]) == pytest.approx(2 / 3)


def test_unanimous_answers_skip_normalization():
    answers = ["Yes."] * 10
    assert vqa_accuracy("yes", answers) == 0.0  # no lower-casing, no punctuation rule
    assert vqa_accuracy("Yes.", answers) == 1.0
    assert vqa_accuracy(" Yes.\n", answers) == 1.0  # whitespace is always cleaned
    # unanimous after stripping: still no normalization
    assert vqa_accuracy("YES", [" yes"] * 5 + ["yes"] * 5) == 0.0
    assert vqa_accuracy("yes", [" yes"] * 5 + ["yes"] * 5) == 1.0
    # one dissenting answer: everything is normalized, the nine "Yes." now match "yes"
    assert vqa_accuracy("yes", ["Yes."] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 9 + ["3"]) == 1.0


def test_accuracy_rejects_bad_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError):
        vqa_accuracy("yes", "yes")  # type: ignore[arg-type]


def test_round_half_away_is_python2_round():
    assert round_half_away(3.125) == 3.13  # an exact binary half: Python 3's round gives 3.12
    assert round(3.125, 2) == 3.12
    assert round_half_away(-3.125) == -3.13
    assert round_half_away(2.675) == 2.67  # 2.675 is really 2.67499999...
    assert round_half_away(30.000000000000004) == 30.0
    assert round_half_away(43.333333333333336) == 43.33


# ---------------------------------------------------------------- aggregation


def _q(qid: int) -> dict:
    return {"image_id": qid * 10, "question": f"q{qid}?", "question_id": qid}


def _ann(qid: int, answers: list[str], a_type: str = "other", q_type: str = "what") -> dict:
    return {
        "image_id": qid * 10,
        "question_id": qid,
        "question_type": q_type,
        "answer_type": a_type,
        "multiple_choice_answer": answers[0],
        "answers": [
            {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
        ],
    }


def test_evaluate_by_hand():
    questions = [_q(1), _q(2), _q(3)]
    annotations = [
        _ann(1, ["yes"] * 10, "yes/no", "is the"),
        _ann(2, ["red"] + ["blue"] * 9, "other", "what color is the"),
        _ann(3, ["no"] * 10, "yes/no", "is the"),
    ]
    results = [
        {"question_id": 3, "answer": "yes"},
        {"question_id": 1, "answer": "yes"},
        {"question_id": 2, "answer": "Red"},
    ]
    scores = evaluate(questions, annotations, results)
    assert scores == {
        "overall": 43.33,  # 100 * (1 + 0.3 + 0) / 3 = 43.333...
        "perAnswerType": {"other": 30.0, "yes/no": 50.0},
        "perQuestionType": {"is the": 50.0, "what color is the": 30.0},
        "perQuestion": {1: 100.0, 2: 30.0, 3: 0.0},
    }


def test_evaluate_rounds_ties_away_from_zero():
    questions = [_q(i) for i in range(32)]
    annotations = [_ann(i, ["yes"] * 10) for i in range(32)]
    results = [{"question_id": i, "answer": "yes" if i == 0 else "no"} for i in range(32)]
    assert evaluate(questions, annotations, results)["overall"] == 3.13  # 100 / 32 = 3.125 exactly


def test_evaluate_refuses_missing_and_unknown_ids():
    questions = [_q(i) for i in range(3)]
    annotations = [_ann(i, ["yes"] * 10) for i in range(3)]
    results = [{"question_id": 0, "answer": "yes"}, {"question_id": 7, "answer": "no"}]
    with pytest.raises(DataError) as e:
        evaluate(questions, annotations, results, names=("Q.json", "A.json", "R.json"))
    msg = str(e.value)
    assert msg.startswith("R.json: ")
    assert "2 question(s) without a result (question_id 1, 2)" in msg
    assert "1 result(s) for unknown questions (question_id 7)" in msg
    assert isinstance(e.value, ValueError)


def test_evaluate_truncates_long_id_lists():
    questions = [_q(i) for i in range(25)]
    annotations = [_ann(i, ["yes"] * 10) for i in range(25)]
    with pytest.raises(
        DataError,
        match=r"25 question\(s\) without a result \(question_id 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\. and 15 more\)",
    ):
        evaluate(questions, annotations, [])


def test_evaluate_refuses_duplicates_and_unpaired_records():
    questions = [_q(1), _q(2)]
    annotations = [_ann(1, ["yes"] * 10), _ann(2, ["yes"] * 10)]
    dup = [
        {"question_id": 1, "answer": "yes"},
        {"question_id": 2, "answer": "x"},
        {"question_id": 1, "answer": "no"},
    ]
    with pytest.raises(DataError, match="result 2 repeats question_id 1"):
        evaluate(questions, annotations, dup)
    ok = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "yes"}]
    with pytest.raises(DataError, match=r"no annotation for 1 question\(s\).*question_id 2"):
        evaluate(questions, annotations[:1], ok)
    with pytest.raises(
        DataError, match=r"1 annotation\(s\) for question ids not in questions: question_id 2"
    ):
        evaluate(questions[:1], annotations, ok)
    with pytest.raises(DataError, match="no questions to score"):
        evaluate([], [], [])


def test_evaluate_does_not_mutate_inputs():
    annotations = [_ann(1, ["Yes."] * 9 + ["no"])]
    before = repr(annotations)
    evaluate([_q(1)], annotations, [{"question_id": 1, "answer": "yes"}])
    assert repr(annotations) == before


# ---------------------------------------------------------------- naive re-implementation, random sets

NAIVE_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
DIGITS = "0123456789"
NAIVE_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
NAIVE_NUMBERS |= {"six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def naive_clean(s: str) -> str:
    return s.replace("\n", " ").replace("\t", " ").strip()


def naive_punctuation(s: str) -> str:
    number_comma = any(
        s[i - 1] in DIGITS and s[i] == "," and s[i + 1] in DIGITS for i in range(1, len(s) - 1)
    )
    out = s
    for p in NAIVE_PUNCT:
        touches = (p + " ") in s or (" " + p) in s
        out = out.replace(p, "" if touches or number_comma else " ")
    kept, deleted = [], 0
    for i, c in enumerate(out):
        followed_by_digit = i + 1 < len(out) and out[i + 1] in DIGITS
        if c == "." and not followed_by_digit and deleted < 32:
            deleted += 1
            continue
        kept.append(c)
    return "".join(kept)


def naive_words(s: str) -> str:
    words = []
    for w in s.lower().split():
        w = NAIVE_NUMBERS.get(w, w)
        if w in ("a", "an", "the"):
            continue
        words.append(w)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def naive_accuracy(pred: str, answers: list[str]) -> float:
    """The official loop, record by record (n >= 4)."""
    records = [{"answer": naive_clean(a), "answer_id": i} for i, a in enumerate(answers)]
    pred = naive_clean(pred)
    if len({r["answer"] for r in records}) > 1:
        for r in records:
            r["answer"] = naive_words(naive_punctuation(r["answer"]))
        pred = naive_words(naive_punctuation(pred))
    accs = []
    for r in records:
        others = [o for o in records if o != r]
        matching = [o for o in others if o["answer"] == pred]
        accs.append(min(1, float(len(matching)) / 3))
    total = 0
    for a in accs:
        total = total + a
    return float(total) / len(accs)


def naive_round2(x: float) -> float:
    exact = Fraction(x) * 100
    low = math.floor(exact)
    return float(Fraction(low + (1 if exact - low >= Fraction(1, 2) else 0), 100))


POOL = [
    "yes", "Yes", "YES", "yes.", "Yes!", " yes ", "yes\n", "no", "No.", "nope",
    "2", "two", "Two", "2.5", "2.", ".5", "1,000", "1000", "1, 000", "ten", "10", "none", "0", "zero",
    "the dog", "a dog", "dog", "Dog!", "dogs", "an apple", "apple", "The Apple.",
    "dont", "don't", "youre", "you're", "its", "it's", "somebody'd",
    "red-white", "red white", "red - white", "x-ray", "xray", "(yes)", "red/blue", "3.14.", "Mr. Smith",
    "mr smith", "x;?y?z", "left -right", "a,b", "...", "?", "",
]  # fmt: skip
CHARS = "ab1 2,.-;?!'(A"


def _random_answer(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.6:
        return rng.choice(POOL)
    if r < 0.8:
        return rng.choice(POOL) + rng.choice([" ", "-", ", ", ".", ""]) + rng.choice(POOL)
    return "".join(rng.choice(CHARS) for _ in range(rng.randint(1, 8)))


def _random_question(rng: random.Random) -> tuple[str, list[str]]:
    candidates = [_random_answer(rng) for _ in range(rng.randint(1, 4))]
    n = 10 if rng.random() < 0.8 else rng.randint(4, 12)
    answers = [rng.choice(candidates) for _ in range(n)]
    pred = rng.choice(candidates) if rng.random() < 0.6 else _random_answer(rng)
    return pred, answers


def test_matches_naive_reimplementation_on_random_sets():
    rng = random.Random(0)
    seen = set()
    for _ in range(600):
        pred, answers = _random_question(rng)
        got = vqa_accuracy(pred, answers)
        assert got == naive_accuracy(pred, answers), (pred, answers)
        seen.add(round(got, 6))
    assert {0.0, 0.3, 0.6, 0.9, 1.0} <= seen  # the random sets hit every level


def test_evaluate_matches_naive_aggregation_on_random_sets():
    rng = random.Random(0)
    n = 300
    questions, annotations, results, naive = [], [], [], []
    for qid in rng.sample(range(10_000), n):
        pred, answers = _random_question(rng)
        a_type = rng.choice(["yes/no", "number", "other"])
        q_type = rng.choice(["what is", "how many", "is the", "what color is the"])
        questions.append(_q(qid))
        annotations.append(_ann(qid, answers, a_type, q_type))
        results.append({"question_id": qid, "answer": pred})
        naive.append((qid, a_type, q_type, naive_accuracy(pred, answers)))
    rng.shuffle(results)
    scores = evaluate(questions, annotations, results)

    def pct(values):
        total = 0
        for v in values:
            total = total + v
        return naive_round2(100 * float(total) / len(values))

    assert scores["overall"] == pct([acc for *_, acc in naive])
    for t in {a for _, a, _, _ in naive}:
        assert scores["perAnswerType"][t] == pct([acc for _, a, _, acc in naive if a == t])
    for t in {q for _, _, q, _ in naive}:
        assert scores["perQuestionType"][t] == pct([acc for _, _, q, acc in naive if q == t])
    assert scores["perQuestion"] == {qid: naive_round2(100 * acc) for qid, *_, acc in naive}
    assert list(scores["perQuestion"]) == [a["question_id"] for a in annotations]


# ---------------------------------------------------------------- exact match, and which scoring a sample gets


def test_exact_match_normalizes_both_sides():
    from gpt2mm.eval.vqa_metric import exact_match

    assert exact_match("Two", ["2"]) == 1.0 and exact_match("2", ["two."]) == 1.0
    assert exact_match("the Dog!", ["dog"]) == 1.0 and exact_match("dogs", ["dog"]) == 0.0
    assert exact_match("red", ["blue", "Red"]) == 1.0  # any reference answer
    with pytest.raises(TypeError):
        exact_match("a", "a")
    with pytest.raises(ValueError):
        exact_match("a", [])


def test_answer_score_is_vqa_accuracy_with_human_answers_and_exact_match_with_one():
    """Any list of human answers is scored as the official tool scores it (so official files with fewer than
    10 answers score the same in training, the reward and `gpt2mm eval`); a single reference by exact match."""
    from gpt2mm.eval.vqa_metric import EXACT_MATCH, VQA_SCORING, answer_score, exact_match, scoring_for

    ten = ["red"] * 2 + ["dark red"] * 8
    five = ["red", "red", "dark red", "maroon", "red"]
    for answers in (ten, five):
        for pred in ("red", "Dark red.", "maroon", "blue"):
            assert answer_score(pred, answers) == vqa_accuracy(pred, answers)
        assert scoring_for(answers) == VQA_SCORING
    assert answer_score("red", ten) == pytest.approx(0.6)
    assert scoring_for(["x"]) == EXACT_MATCH
    for pred in ("Two", "2", "three"):
        assert answer_score(pred, ["2"]) == exact_match(pred, ["2"])
    assert answer_score("Two.", ["2"]) == 1.0


def test_score_split_equals_a_naive_recomputation_and_names_its_scoring():
    """`gpt2mm eval`'s per-sample scoring: the mean of VQA accuracy (10 answers) or exact match (fewer), each
    scoring's own mean, and the answer types, against a recomputation by hand."""
    from gpt2mm.data.samples import Sample, Turn
    from gpt2mm.eval.evaluate import score_samples, score_split

    def sample(i, answer, answers=None, answer_type=None):
        turns = [Turn("user", f"q{i}?"), Turn("assistant", answer)]
        return Sample(id=f"s{i}", image=None, turns=turns, answers=answers, answer_type=answer_type)

    ten = ["2"] * 3 + ["3"] * 7
    samples = [
        sample(0, "2"),
        sample(1, "yes"),
        sample(2, "3", ten, "number"),
        sample(3, "cat", None, "other"),
    ]
    preds = ["Two", "no", "2", "the cat"]
    scores = score_split(samples, preds)
    naive = [1.0, 0.0, vqa_accuracy("2", ten), 1.0]
    assert scores["scoring"] == "vqa accuracy + exact match" and scores["questions"] == 4
    assert scores["overall"] == round_half_away(100 * sum(naive) / 4, 2)
    assert scores["by_scoring"] == {
        "vqa accuracy": {"overall": round_half_away(100 * naive[2], 2), "questions": 1},
        "exact match": {"overall": round_half_away(100 * 2 / 3, 2), "questions": 3},
    }
    assert scores["perAnswerType"] == {"number": round_half_away(100 * naive[2], 2), "other": 100.0}
    assert scores["perQuestion"]["s0"] == 100.0 and scores["perQuestion"]["s1"] == 0.0
    assert score_samples(samples, preds) == pytest.approx(100 * sum(naive) / 4)  # training-time evaluation
    only_em = score_split(samples[:2], preds[:2])
    assert only_em["scoring"] == "exact match" and only_em["overall"] == 50.0
