"""The official VQA v2 accuracy, reproduced bit for bit from the published evaluation rules.

Every number the project reports (training-time eval, `gpt2mm vqa-score`, `gpt2mm eval`) and the RL
reward come from `vqa_accuracy`, so they agree with the leaderboard's evaluation. Samples with a single
reference answer (a CSV's or a Hugging Face dataset's `answer`) are scored by `exact_match` after the same
normalization; `answer_score` picks one of the two per sample. Pure Python, no I/O.

The rules, in the official order, for one question with a prediction and its human answers:

1. Newlines and tabs become spaces and the text is stripped (prediction and every answer, always).
2. Only when the stripped human answers are NOT all identical, the prediction and every answer go through
   `process_punctuation` then `process_digit_article` (lower-case, number words to digits, articles
   dropped, contractions restored). When the humans are unanimous nothing more is done: the comparison
   is exact and case-sensitive (answers all "Yes." never match a prediction "yes").
3. Accuracy = the mean, over the leave-one-out subsets of the answers (one left out in turn), of
   min(1, #answers in the subset equal to the prediction / 3).

Details that matter for bit-exactness and differ from a naive re-reading of the official Python 2 code:

* the period regex `(?!<=\\d)(\\.)(?!\\d)` starts with a negative *lookahead* (not a lookbehind): at a period
  it always passes, so the rule is "delete every period not followed by a digit" (`2.5` and `.5` keep
  theirs, `2.` loses it);
* the official call `periodStrip.sub("", text, re.UNICODE)` passes `re.UNICODE` (32) as the *count*, so at
  most the first 32 such periods are deleted;
* the regexes were compiled without `re.UNICODE` under Python 2, so `\\d` is ASCII `[0-9]` only;
* Python 2 `unicode.lower()` uses simple case mapping (no final sigma, one code point per code point);
* sums are plain left-to-right float additions (Python >= 3.12's builtin `sum` compensates; Python 2's
  did not), and `round(x, 2)` is Python 2's: ties (exact binary halves) go away from zero.

Fewer than 4 answers (the official data always has 10): the leave-one-out rule cannot give a correct
answer full credit there (one answer: always 0), so `vqa_accuracy` then returns the fraction of answers
that equal the prediction, both always normalized (one reference answer: normalized exact match). From
4 answers on, the official rule is applied as is, whatever the count.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from typing import Any

from gpt2mm.errors import DataError

# The official punctuation list. Its order does not matter: each mark's test looks at the input text, never
# at the partly replaced one.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# Number words (and "none") to digits, applied word by word after lower-casing.
NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Apostrophe-less contractions restored, word by word, after the articles are dropped. This is the
# official table entry for entry, including its oddities: the keys with capitals ("Im", "Ive", "Id've",
# "I'dve") can never match (words are lower-cased first), "somebody'd" maps to "somebodyd" (inverted in
# the official table), and "let's"/"she's" map to themselves.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

# The official regexes verbatim; re.ASCII because Python 2 compiled them without re.UNICODE.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)", re.ASCII)
_PERIOD_STRIP_COUNT = 32  # the official passes re.UNICODE (== 32) where `sub` takes its count

MIN_OFFICIAL_ANSWERS = 4  # below this the leave-one-out rule cannot reach 1.0: see the module docstring


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip: applied to every prediction and answer, always."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official punctuation rule: a mark is deleted when it touches a space somewhere in the text, or
    when the text holds a digit-comma-digit anywhere; otherwise every copy of it becomes a space. Then
    (at most 32) periods not followed by a digit are deleted. The tests look at the input text, never at
    the partly replaced one."""
    out = text
    comma_in_number = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if p not in out:
            continue
        if comma_in_number or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _py2_lower(text: str) -> str:
    """`unicode.lower()` of Python 2: simple (one-to-one) case mapping, no final-sigma rule."""
    if text.isascii():
        return text.lower()
    return "".join(c.lower()[0] for c in text)  # a lone char: no context rules; U+0130 -> "i" + U+0307


def process_digit_article(text: str) -> str:
    """The official word rule: lower-case, split on whitespace, number words to digits, drop articles,
    restore contractions, join with single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in _py2_lower(text).split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


@lru_cache(maxsize=1 << 16)
def normalize_answer(text: str) -> str:
    """The full official normalization of one answer (whitespace, punctuation, then words). Note that the
    official evaluation applies it only to questions whose human answers disagree: see `vqa_accuracy`."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


@lru_cache(maxsize=1 << 16)
def _prepare(answers: tuple[str, ...]) -> tuple[bool, tuple[str, ...]]:
    """(normalize predictions?, reference answers as compared): cached, since the RL reward scores many
    predictions against the same answers."""
    cleaned = tuple(clean_whitespace(a) for a in answers)
    normalize = len(set(cleaned)) > 1 or len(cleaned) < MIN_OFFICIAL_ANSWERS
    if normalize:
        cleaned = tuple(normalize_answer(a) for a in cleaned)
    return normalize, cleaned


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy (0..1) of one predicted answer against the human answers.

    With n >= 4 answers (VQA v2 has 10): the mean over the n leave-one-out subsets of
    min(1, matches in the subset / 3), after the official normalization (skipped when the humans are
    unanimous). With 10 answers and m matches that gives 0, 0.3, 0.6, 0.9, then 1.0 from m = 4.
    With 1 to 3 answers: the fraction of (normalized) answers equal to the (normalized) prediction.
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not one string")
    n = len(answers)
    if n == 0:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    normalize, refs = _prepare(tuple(answers))
    pred = normalize_answer(prediction) if normalize else clean_whitespace(prediction)
    matches = refs.count(pred)
    if n < MIN_OFFICIAL_ANSWERS:
        return matches / n
    if matches == 0:
        return 0.0
    total = 0.0  # left-to-right, as the official (Python 2) sum: the last bits match
    for ref in refs:
        others = matches - 1 if ref == pred else matches
        total += others / 3 if others < 3 else 1.0
    return total / n


VQA_ANSWERS = (
    2  # a question with several human answers is scored by the VQA metric, one answer by exact match
)
VQA_SCORING, EXACT_MATCH = "vqa accuracy", "exact match"


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the prediction equals one of the answers after the full official normalization of both
    (`normalize_answer`: "Two." == "2", "the dog" == "dog"), else 0.0."""
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not one string")
    if not answers:
        raise ValueError("exact_match needs at least one reference answer")
    return float(normalize_answer(prediction) in {normalize_answer(a) for a in answers})


def scoring_for(answers: Sequence[str]) -> str:
    """`VQA_SCORING` for a question with several human answers (VQA v2: 10), `EXACT_MATCH` for one: the
    official tool scores any list of human answers by its rule, so official files score the same here."""
    return VQA_SCORING if len(answers) >= VQA_ANSWERS else EXACT_MATCH


def answer_score(prediction: str, answers: Sequence[str]) -> float:
    """A sample's score (0..1), the one `gpt2mm eval`, training-time evaluation and the RL reward give: the
    official `vqa_accuracy` with human answers (VQA's 10), `exact_match` with a single reference answer
    (what a CSV or a Hugging Face dataset's `answer` column gives, normalized on both sides)."""
    return (
        vqa_accuracy(prediction, answers)
        if scoring_for(answers) == VQA_SCORING
        else exact_match(prediction, answers)
    )


def round_half_away(x: float, ndigits: int = 2) -> float:
    """Python 2's `round(x, ndigits)`: correctly rounded, ties (exact binary halves such as 3.125) away
    from zero, where Python 3's `round` goes to even. The official scores are Python 2 rounded."""
    quantum = Decimal(1).scaleb(-ndigits)
    return float(Decimal(x).quantize(quantum, rounding=ROUND_HALF_UP))


def _percent(values: Iterable[float]) -> float:
    """round(100 * sum / count, 2) as the official `setAccuracy`: plain float sum, then scale, then divide."""
    total, count = 0.0, 0
    for v in values:
        total += v
        count += 1
    return round_half_away(100 * total / count, 2)


def _ids_summary(ids: Iterable[Any], limit: int = 10) -> str:
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... and {len(ids) - limit} more" if len(ids) > limit else "")


def _index_by_id(records: Sequence[Mapping[str, Any]], name: str, what: str) -> dict[int, Mapping[str, Any]]:
    by_id: dict[int, Mapping[str, Any]] = {}
    for i, rec in enumerate(records):
        try:
            qid = rec["question_id"]
        except (KeyError, TypeError):
            raise DataError(f"{name}: {what} {i} has no question_id") from None
        if qid in by_id:
            raise DataError(f"{name}: {what} {i} repeats question_id {qid}")
        by_id[qid] = rec
    return by_id


def evaluate(
    questions: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    *,
    names: tuple[str, str, str] = ("questions", "annotations", "results"),
) -> dict[str, Any]:
    """Official scores of `results` ([{question_id, answer}]) on a question set, in percent.

    `questions` and `annotations` are the records of the official files (the `questions` and
    `annotations` lists); they must describe the same question ids, and the results must answer exactly
    those (a `DataError` lists the missing and the unknown ids otherwise). `names` label the three inputs
    in error messages (the CLI passes the file paths).

    Returns {"overall", "perAnswerType", "perQuestionType", "perQuestion"}, each rounded to 2 decimals as
    the official tool does; the sums run in annotation order, as the official tool's do.
    """
    q_name, a_name, r_name = names
    q_by_id = _index_by_id(questions, q_name, "question")
    a_by_id = _index_by_id(annotations, a_name, "annotation")
    r_by_id = _index_by_id(results, r_name, "result")

    no_annotation = [q for q in q_by_id if q not in a_by_id]
    if no_annotation:
        raise DataError(
            f"{a_name}: no annotation for {len(no_annotation)} question(s) of {q_name}: question_id {_ids_summary(no_annotation)}"
        )
    no_question = [q for q in a_by_id if q not in q_by_id]
    if no_question:
        raise DataError(
            f"{a_name}: {len(no_question)} annotation(s) for question ids not in {q_name}: question_id {_ids_summary(no_question)}"
        )

    missing = [q for q in a_by_id if q not in r_by_id]
    unknown = [q for q in r_by_id if q not in a_by_id]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} question(s) without a result (question_id {_ids_summary(missing)})")
        if unknown:
            parts.append(
                f"{len(unknown)} result(s) for unknown questions (question_id {_ids_summary(unknown)})"
            )
        raise DataError(
            f"{r_name}: the results must answer exactly the {len(a_by_id)} questions of {a_name}: "
            + "; ".join(parts)
        )
    if not a_by_id:
        raise DataError(f"{a_name}: no questions to score")

    per_question: dict[int, float] = {}
    accs: list[float] = []
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for qid, ann in a_by_id.items():
        try:
            refs = [a["answer"] for a in ann["answers"]]
            acc = vqa_accuracy(r_by_id[qid]["answer"], refs)
            a_type, q_type = ann["answer_type"], ann["question_type"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(
                f"{a_name}/{r_name}: question_id {qid}: malformed record ({type(e).__name__}: {e})"
            ) from None
        accs.append(acc)
        by_answer_type.setdefault(a_type, []).append(acc)
        by_question_type.setdefault(q_type, []).append(acc)
        per_question[qid] = round_half_away(100 * acc, 2)

    return {
        "overall": _percent(accs),
        "perAnswerType": {t: _percent(v) for t, v in sorted(by_answer_type.items())},
        "perQuestionType": {t: _percent(v) for t, v in sorted(by_question_type.items())},
        "perQuestion": per_question,
    }
