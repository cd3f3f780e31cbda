"""`gpt2mm tag`: the store, the JSON API, several taggers at once, least-sure ordering, the page in a real
browser (headless Chromium driven by Playwright) and the command (`tag`, `tag export`, bad inputs).

Everything runs in-process on a tiny synthetic world (a few 48 px images) and a tiny random model saved to
a temp dir; nothing is trained or fetched. The reward model is a fake put in `sys.modules`, so these tests
do not depend on `gpt2mm.reward`'s code.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import sys
import threading
import time
import types
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import launch_chromium, needs_browser, running, sync_playwright, wide_tiny_model  # noqa: E402
from gpt2mm.cli import main  # noqa: E402
from gpt2mm.data.synthetic import write_world  # noqa: E402
from gpt2mm.errors import DataError  # noqa: E402
from gpt2mm.tag import app as tag_app  # noqa: E402
from gpt2mm.tag import store  # noqa: E402

# --- fixtures and helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """2 validation images x 5 questions, with annotations (10 human answers each)."""
    out = tmp_path_factory.mktemp("world")
    write_world(out, n_train=0, n_val=2, n_test=0, seed=3)
    return out


def world_args(world: Path) -> list[str]:
    return ["--questions", str(world / "val_questions.json"), "--images", str(world / "images" / "val")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny preset, weights drawn wide enough that greedy answers differ from question to question."""

    out = tmp_path_factory.mktemp("model")
    model, processor = wide_tiny_model()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_db(path: Path, world: Path, n: int) -> Path:
    """A tag DB of n items with distinct questions and answers, on the world's images."""
    images = sorted((world / "images" / "val").glob("*.png"))
    conn = store.open_db(path)
    store.add_items(
        conn,
        [
            store.Item(
                question_id=str(100 + k),
                image=str(images[k % len(images)].resolve()),
                question=f"Question number {k}?",
                answer=f"answer-{k}",
                references=[f"answer-{k}"] * 3 + ["other"] if k % 2 else [],
            )
            for k in range(n)
        ],
    )
    conn.close()
    return path


def db_tags(path: Path) -> dict[tuple[int, str], str]:
    """(item_id, tagger) -> label, every row of the tags table."""
    conn = sqlite3.connect(str(path))
    try:
        rows = conn.execute("SELECT item_id, tagger, label FROM tags").fetchall()
    finally:
        conn.close()
    assert len(rows) == len({(i, t) for i, t, _ in rows})
    return {(i, t): label for i, t, label in rows}


def run_cli(argv: list[str]) -> int:
    """`gpt2mm ...` in-process; a SystemExit (argparse errors, UsageError) becomes its code."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


# --- the store: export round trip, claims, resume -----------------------------------------------------------


def test_export_round_trip_and_retag_updates(tmp_path, world, capsys):
    db = make_db(tmp_path / "tags.sqlite", world, 4)
    conn = store.connect(db)
    store.tag_item(conn, 1, "alice", "correct")
    store.tag_item(conn, 2, "bob", "incorrect")
    store.tag_item(conn, 3, "alice", "skip")
    store.tag_item(conn, 1, "bob", "incorrect")
    store.tag_item(conn, 2, "bob", "correct")  # bob changes his mind: an update, not a second row
    with pytest.raises(ValueError, match="label"):
        store.tag_item(conn, 1, "alice", "maybe")
    with pytest.raises(LookupError):
        store.tag_item(conn, 99, "alice", "correct")
    conn.close()
    assert db_tags(db) == {
        (1, "alice"): "correct",
        (2, "bob"): "correct",
        (3, "alice"): "skip",
        (1, "bob"): "incorrect",
    }

    out = tmp_path / "sub" / "tags.jsonl"
    assert run_cli(["tag", "export", "--db", str(db), "--out", str(out)]) == 0
    assert "wrote 3 tags (2 correct, 1 incorrect" in capsys.readouterr().out
    from_db, from_jsonl = store.read_tags(db), store.read_tags(out)
    assert from_jsonl == from_db
    assert {(r.question_id, r.tagger, r.label) for r in from_jsonl} == {
        ("100", "alice", True),
        ("101", "bob", True),
        ("100", "bob", False),
    }
    first = json.loads(out.read_text().splitlines()[0])
    assert first["question"] == "Question number 0?" and first["answer"] == "answer-0"
    assert Path(first["image"]).is_file() and first["tagged_at"]


def test_claims_expire_and_skips_stay_with_others(tmp_path, world):
    conn = store.connect(make_db(tmp_path / "tags.sqlite", world, 3))
    assert store.claim_next(conn, "a", now=0.0, ttl_s=10).item_id == 1
    assert store.claim_next(conn, "a", now=1.0, ttl_s=10).item_id == 1  # a reload: the same item back
    assert store.claim_next(conn, "b", now=2.0, ttl_s=10).item_id == 2
    assert store.claim_next(conn, "c", now=3.0, ttl_s=10).item_id == 3
    assert store.claim_next(conn, "d", now=4.0, ttl_s=10) is None  # everything is held
    assert store.claim_next(conn, "d", now=11.5, ttl_s=10).item_id == 1  # a's claim ran out
    store.tag_item(conn, 1, "d", "skip")
    assert store.claim_next(conn, "d", now=12.5, ttl_s=10).item_id == 2  # b's ran out too; 1 was skipped
    assert store.claim_next(conn, "a", now=13.0, ttl_s=10).item_id == 1  # d's skip leaves it to a
    store.tag_item(conn, 1, "a", "incorrect")
    assert store.claim_next(conn, "e", now=14.0, ttl_s=10).item_id == 3  # 1 is done, 2 held by d
    stats = store.tag_stats(conn, "d")
    assert (stats["total"], stats["done"], stats["skipped"], stats["mine"], stats["mine_skipped"]) == (
        3,
        1,
        1,
        0,
        1,
    )
    assert stats["left_for_me"] == 2
    conn.close()


def test_sync_items_adds_only_new_questions(tmp_path, world):
    questions, images = world / "val_questions.json", world / "images" / "val"
    calls: list[list[str]] = []

    def fake_answer(tag: str):
        def answer(samples):
            calls.append([s.id for s in samples])
            return [f"{tag}-{s.id}" for s in samples]

        return answer

    conn = store.open_db(tmp_path / "tags.sqlite")
    first = tag_app.read_questions(questions, images, world / "val_annotations.json", limit=4)
    assert tag_app.sync_items(conn, first, fake_answer("old")) == 4
    store.tag_item(conn, 1, "alice", "correct")
    store.tag_item(conn, 2, "bob", "skip")
    before = db_tags(tmp_path / "tags.sqlite")

    everything = tag_app.read_questions(questions, images, limit=None)  # questions-only: no references
    assert len(everything) == 10
    assert tag_app.sync_items(conn, everything, fake_answer("new"), chunk=4) == 6
    assert calls[1:] == [[s.id for s in everything[4:8]], [s.id for s in everything[8:]]]
    assert tag_app.sync_items(conn, everything, fake_answer("again")) == 0 and len(calls) == 3

    items = [store.get_item(conn, i) for i in range(1, 11)]
    assert [it.question_id for it in items] == [s.id for s in everything]
    assert [it.answer.split("-")[0] for it in items] == ["old"] * 4 + ["new"] * 6  # never recomputed
    assert all(len(it.references) == 10 for it in items[:4]) and all(not it.references for it in items[4:])
    assert db_tags(tmp_path / "tags.sqlite") == before
    conn.close()


# --- the JSON API -------------------------------------------------------------------------------------------


def test_api_next_tag_skip_stats_undo(tmp_path, world):
    db = make_db(tmp_path / "tags.sqlite", world, 5)
    with TestClient(tag_app.create_app(db)) as c:
        first = c.get("/api/next", params={"tagger": "alice"}).json()
        assert first["item"]["item_id"] == 1 and first["item"]["answer"] == "answer-0"
        assert first["stats"]["total"] == 5 and first["stats"]["mine"] == 0
        assert c.get("/api/next", params={"tagger": "alice"}).json()["item"]["item_id"] == 1
        assert c.get("/api/next", params={"tagger": "bob"}).json()["item"]["item_id"] == 2  # 1 is alice's

        r = c.post("/api/tag", json={"item_id": 1, "tagger": "alice", "label": "correct"})
        assert r.status_code == 200 and r.json()["stats"]["done"] == 1 and r.json()["stats"]["mine"] == 1
        assert c.get("/api/next", params={"tagger": "alice"}).json()["item"]["item_id"] == 3
        assert c.post("/api/tag", json={"item_id": 2, "tagger": "bob", "label": "skip"}).status_code == 200
        assert c.get("/api/next", params={"tagger": "bob"}).json()["item"]["item_id"] == 4
        assert (
            c.post("/api/tag", json={"item_id": 3, "tagger": "alice", "label": "incorrect"}).status_code
            == 200
        )
        nxt = c.get("/api/next", params={"tagger": "alice"}).json()["item"]
        assert nxt["item_id"] == 2 and nxt["references"] == ["answer-1"] * 3 + ["other"]  # bob's skip

        # Re-tagging updates: still one row per (item, tagger).
        assert (
            c.post("/api/tag", json={"item_id": 1, "tagger": "alice", "label": "incorrect"}).status_code
            == 200
        )
        assert db_tags(db) == {(1, "alice"): "incorrect", (2, "bob"): "skip", (3, "alice"): "incorrect"}
        stats = c.get("/api/stats").json()
        assert (stats["total"], stats["done"], stats["remaining"], stats["skipped"]) == (5, 2, 3, 1)
        assert c.get("/api/stats", params={"tagger": "bob"}).json()["mine_skipped"] == 1

        # Undo takes back alice's latest label (the re-tag of item 1) and hands her that item again.
        undone = c.post("/api/undo", json={"tagger": "alice"}).json()
        assert undone["item"]["item_id"] == 1 and (1, "alice") not in db_tags(db)
        assert c.get("/api/next", params={"tagger": "alice"}).json()["item"]["item_id"] == 1
        assert c.post("/api/undo", json={"tagger": "carol"}).status_code == 404

        # Release gives alice's item back at once.
        assert c.post("/api/release", json={"tagger": "alice"}).status_code == 200
        assert c.get("/api/next", params={"tagger": "dave"}).json()["item"]["item_id"] == 1


@pytest.mark.parametrize(
    "method, path, body, status, words",
    [
        ("post", "/api/tag", {"item_id": 1, "tagger": "a", "label": "maybe"}, 400, "label"),
        ("post", "/api/tag", {"item_id": 1, "tagger": "a"}, 400, "label"),
        ("post", "/api/tag", {"item_id": 999, "tagger": "a", "label": "correct"}, 404, "999"),
        ("post", "/api/tag", {"item_id": "1", "tagger": "a", "label": "correct"}, 400, "item_id"),
        ("post", "/api/tag", {"item_id": True, "tagger": "a", "label": "correct"}, 400, "item_id"),
        ("post", "/api/tag", {"item_id": 1, "label": "correct"}, 400, "tagger"),
        ("post", "/api/tag", {"item_id": 1, "tagger": "  ", "label": "correct"}, 400, "tagger"),
        ("post", "/api/tag", {"item_id": 1, "tagger": "x" * 65, "label": "correct"}, 400, "at most 64"),
        ("post", "/api/tag", {"item_id": 1, "tagger": "a\x00b", "label": "correct"}, 400, "control"),
        ("post", "/api/tag", [1, 2], 400, "JSON object"),
        ("post", "/api/tag", b"{not json", 400, "not valid JSON"),
        ("post", "/api/tag", b"x" * (70 * 1024), 413, "limit"),
        ("post", "/api/undo", {}, 400, "tagger"),
        ("get", "/api/next", None, 400, "tagger"),
        ("get", "/api/next?tagger=", None, 400, "tagger"),
        ("get", "/api/nope", None, 404, "Not Found"),
        ("get", "/images/999", None, 404, "no item 999"),
        ("get", "/images/1.png", None, 404, "item id"),
        ("get", "/images/-1", None, 404, "item id"),
        ("get", "/images/..%2F..%2Fstore.py", None, 404, ""),
        ("get", "/images/%2e%2e", None, 404, ""),
        ("get", "/images/1/../../tags.sqlite", None, 404, ""),
    ],
)
def test_bad_requests_get_4xx_json_and_the_server_stays_up(
    tmp_path, world, method, path, body, status, words
):
    db = make_db(tmp_path / "tags.sqlite", world, 2)
    with TestClient(tag_app.create_app(db)) as c:
        if body is None:
            r = getattr(c, method)(path)
        elif isinstance(body, bytes):
            r = c.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = c.post(path, json=body)
        assert r.status_code == status, r.text
        assert words in r.json()["error"]["message"]
        assert c.get("/api/next", params={"tagger": "a"}).status_code == 200
    assert not db_tags(db)


def test_images_only_of_items_in_the_db(tmp_path, world):
    db = make_db(tmp_path / "tags.sqlite", world, 2)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for you")
    with TestClient(tag_app.create_app(db)) as c:
        r = c.get("/images/1")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        conn = store.connect(db)
        assert r.content == Path(store.get_item(conn, 1).image).read_bytes()
        for raw in (
            "/images/../secret.png",
            "/images/%2E%2E/secret.png",
            "/images/..%2fsecret.png",
            "/secret.png",
        ):
            r = c.get(raw)
            assert r.status_code == 404 and b"not for you" not in r.content
        # An item whose image went missing: a clean 404, not a traceback.
        conn.execute("UPDATE items SET image = ? WHERE item_id = 2", (str(tmp_path / "gone.png"),))
        conn.close()
        r = c.get("/images/2")
        assert r.status_code == 404 and "missing" in r.json()["error"]["message"]


# --- several taggers at once --------------------------------------------------------------------------------


def test_eight_threads_four_taggers_lose_and_duplicate_nothing(tmp_path, world):
    n_items, taggers = 40, ["t0", "t1", "t2", "t3"]
    db = make_db(tmp_path / "tags.sqlite", world, n_items)

    def label_for(item_id: int, t: int) -> str:
        if t > 0 and (item_id * 7 + t) % 3 == 0:  # t0 never skips, so everything ends done
            return "skip"
        return "correct" if (item_id + t) % 2 == 0 else "incorrect"

    events: list[tuple[int, str, float, float]] = []  # (item, tagger, got it at, sent the label at)
    posted: dict[tuple[int, str], str] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def worker(base: str, t: int) -> None:
        tagger = taggers[t]
        deadline = time.monotonic() + 20
        with httpx.Client(base_url=base, timeout=30) as client:
            while time.monotonic() < deadline:
                r = client.get("/api/next", params={"tagger": tagger})
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                got_at, data = time.monotonic(), r.json()
                if data["item"] is None:
                    if data["stats"]["remaining"] == 0:
                        return
                    time.sleep(0.01)
                    continue
                item_id = data["item"]["item_id"]
                label = label_for(item_id, t)
                sent_at = time.monotonic()
                r = client.post("/api/tag", json={"item_id": item_id, "tagger": tagger, "label": label})
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                with lock:
                    events.append((item_id, tagger, got_at, sent_at))
                    posted[(item_id, tagger)] = label
        errors.append(f"{tagger}: not finished in time")

    with running(tag_app.create_app(db)) as base:
        threads = [threading.Thread(target=worker, args=(base, i % 4)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        stats = httpx.get(base + "/api/stats").json()

    assert not errors, errors[:3]
    rows = db_tags(db)
    assert rows == posted  # no lost tag, no extra one (and one row per (item, tagger): see db_tags)
    labelled = [i for (i, _), label in rows.items() if label != "skip"]
    assert sorted(labelled) == list(range(1, n_items + 1))  # every item done exactly once
    assert sum(label == "skip" for label in rows.values()) > 0  # the skip path was exercised
    assert (stats["done"], stats["remaining"]) == (n_items, 0)
    # While one tagger held an item (from getting it to sending its label), no other tagger got it.
    held: dict[tuple[int, str], tuple[float, float]] = {}
    for item_id, tagger, got, sent in events:
        a, b = held.get((item_id, tagger), (got, sent))
        held[(item_id, tagger)] = (min(a, got), min(b, sent))
    for (item_id, tagger), (got, sent) in held.items():
        for (other_item, other), (got2, sent2) in held.items():
            if other_item == item_id and other != tagger:
                assert sent < got2 or sent2 < got, f"item {item_id} held by {tagger} and {other} at once"


# --- least sure first ---------------------------------------------------------------------------------------


def test_tagging_order_is_least_sure_first():
    scores = {1: 0.9, 2: 0.45, 3: 0.1, 4: 0.55, 6: 0.5}
    assert store.tagging_order([1, 2, 3, 4, 5, 6], scores) == [6, 2, 4, 1, 3, 5]  # unscored 5 last
    assert store.tagging_order([3, 1], {}) == [1, 3]
    assert store.sureness(0.5) == 0 and store.sureness(0.0) == store.sureness(1.0) == 0.5


class FakeScorer:
    """Stands in for `gpt2mm.reward.model.RewardScorer`: P(correct) from a fixed table by question text."""

    made: list[tuple[str, str]] = []
    calls: list[tuple[list[str], list[str], list[str]]] = []

    def __init__(self, path: str, device: str = "cpu") -> None:
        FakeScorer.made.append((path, device))

    @staticmethod
    def p(question: str) -> float:
        return [0.95, 0.3, 0.52, 0.05, 0.7, 0.49, 0.99, 0.6, 0.1, 0.4][sum(map(ord, question)) % 10]

    def __call__(self, images: list[str], questions: list[str], answers: list[str]) -> list[float]:
        FakeScorer.calls.append((images, questions, answers))
        return [self.p(q) for q in questions]


def test_reward_model_orders_items_least_sure_first(tmp_path, world, monkeypatch):
    FakeScorer.made, FakeScorer.calls = [], []
    fake = types.ModuleType("gpt2mm.reward.model")
    fake.RewardScorer = FakeScorer
    monkeypatch.setitem(sys.modules, "gpt2mm.reward.model", fake)
    served = []
    monkeypatch.setattr(tag_app, "serve", lambda app, sock, log_level="warning": served.append(app))
    db = tmp_path / "tags.sqlite"
    conn = store.open_db(db)
    samples = tag_app.read_questions(world / "val_questions.json", world / "images" / "val")
    tag_app.sync_items(conn, samples, lambda s: [f"a{i}" for i in range(len(s))])  # all in: no model load
    store.tag_item(conn, 1, "earlier", "correct")  # done: not scored, never handed out
    conn.close()
    reward_dir = tmp_path / "reward"
    reward_dir.mkdir()

    argv = ["tag", "--model", str(tmp_path / "unused"), *world_args(world), "--db", str(db), "--port", "0"]
    assert run_cli([*argv, "--reward-model", str(reward_dir), "--device", "cpu"]) == 0
    assert FakeScorer.made == [(str(reward_dir), "cpu")]
    conn = store.connect(db)
    items = {i: store.get_item(conn, i) for i in range(1, 11)}
    scores = store.read_scores(conn)
    conn.close()
    assert sorted(scores) == list(range(2, 11))
    assert all(scores[i] == FakeScorer.p(items[i].question) for i in scores)
    images, questions, answers = FakeScorer.calls[0]
    assert questions == [items[i].question for i in range(2, 11)] and answers == [
        items[i].answer for i in range(2, 11)
    ]
    assert images == [items[i].image for i in range(2, 11)]

    def order(app) -> list[int]:
        seen = []
        with TestClient(app) as c:
            while (item := c.get("/api/next", params={"tagger": "z"}).json()["item"]) is not None:
                seen.append(item["item_id"])
                c.post("/api/tag", json={"item_id": item["item_id"], "tagger": "z", "label": "skip"})
        return seen

    expected = store.tagging_order(range(2, 11), scores)
    assert order(served[0]) == expected and expected != sorted(expected)
    # Without --reward-model the stored scores are ignored: insertion order.
    assert run_cli(argv) == 0
    conn = store.connect(db)
    conn.execute("DELETE FROM tags WHERE tagger = 'z'")
    conn.close()
    assert order(served[1]) == list(range(2, 11))
    conn = store.connect(db)  # a reward model that does not give probabilities is refused, by name
    with pytest.raises(DataError, match="not a probability"):
        tag_app.score_items(conn, lambda images, questions, answers: [1.5] * len(questions), "bad")
    with pytest.raises(DataError, match="reward model bad: 0 scores for 9 items"):
        tag_app.score_items(conn, lambda images, questions, answers: [], "bad")
    conn.close()


# --- the command --------------------------------------------------------------------------------------------


def test_tag_command_answers_with_the_model_and_resumes(tmp_path, world, model_dir, monkeypatch, capsys):
    from gpt2mm.eval.evaluate import answer_questions
    from gpt2mm.loading import load_model

    served = []
    monkeypatch.setattr(
        tag_app, "serve", lambda app, sock, log_level="warning": served.append(sock.getsockname())
    )
    db = tmp_path / "tags.sqlite"
    argv = [
        "tag",
        "--model",
        str(model_dir),
        *world_args(world),
        "--annotations",
        str(world / "val_annotations.json"),
    ]
    argv += ["--db", str(db), "--port", "0", "--device", "cpu"]
    assert run_cli([*argv, "--limit", "2"]) == 0
    assert "2 items (2 new" in capsys.readouterr().out and len(served) == 1
    conn = store.connect(db)
    store.tag_item(conn, 2, "alice", "incorrect")

    assert run_cli([*argv, "--limit", "4"]) == 0
    assert "4 items (2 new" in capsys.readouterr().out
    items = [store.get_item(conn, i) for i in range(1, 5)]
    assert store.get_item(conn, 5) is None
    conn.close()
    samples = tag_app.read_questions(
        world / "val_questions.json", world / "images" / "val", world / "val_annotations.json", limit=4
    )
    model, processor = load_model(model_dir)
    expected = answer_questions(model, processor, samples, batch_size=8)
    assert [it.answer for it in items] == expected and len(set(expected)) > 1
    assert [it.question for it in items] == [s.turns[0].text for s in samples]
    assert all(len(it.references) == 10 for it in items)
    assert db_tags(db) == {(2, "alice"): "incorrect"}

    # Nothing new: the model is not even loaded.
    monkeypatch.setattr("gpt2mm.loading.load_model", lambda *a, **k: pytest.fail("model loaded on resume"))
    assert run_cli([*argv, "--limit", "4"]) == 0
    assert "4 items (nothing new)" in capsys.readouterr().out


def test_bad_inputs_exit_2_with_a_message(tmp_path, world, capsys):
    (tmp_path / "m").mkdir()  # a directory, but not a model's
    base = ["tag", "--model", str(tmp_path / "m"), *world_args(world), "--port", "0"]

    def fails(argv: list[str], words: str) -> None:
        assert run_cli(argv) == 2
        err = capsys.readouterr().err
        assert words in err, err

    missing = tmp_path / "nope.json"
    fails(
        ["tag", "--model", "m", "--questions", str(missing), "--images", str(world)],
        f"{missing}: no such file",
    )
    fails(["tag", "--questions", str(world / "val_questions.json")], "needs --model, --images")
    fails([*base[:-2], "--images", str(tmp_path / "noimg")], "no such directory")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    fails([*base, "--db", str(text)], "not an SQLite file")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(str(other)).executescript(
        "CREATE TABLE people (name TEXT); INSERT INTO people VALUES ('x');"
    )
    fails([*base, "--db", str(other)], "not a gpt2mm tag database")
    fails(
        ["tag", "export", "--db", str(other), "--out", str(tmp_path / "o.jsonl")], "not a gpt2mm tag database"
    )
    assert not (tmp_path / "o.jsonl").exists()
    fails(
        ["tag", "export", "--db", str(tmp_path / "absent.sqlite"), "--out", str(tmp_path / "o.jsonl")],
        "no such file",
    )
    fails(["tag", "export", "--db", str(other)], "needs --out")
    fails(["tag", "bogus"], "invalid choice")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        db = tmp_path / "fresh.sqlite"
        fails([*base[:-2], "--port", str(port), "--db", str(db)], f"--port {port}")
        assert not db.exists()  # refused before touching anything
    # A model directory that is not one: a message, not a traceback (the port is taken and given back).
    fails([*base, "--db", str(tmp_path / "t.sqlite"), "--limit", "1"], "cannot load the model")


# --- the page in a real browser -----------------------------------------------------------------------------


@needs_browser
def test_page_tags_with_clicks_and_keys(tmp_path, world):
    db = make_db(tmp_path / "tags.sqlite", world, 5)
    conn = store.connect(db)
    store.tag_item(conn, 4, "bob", "skip")  # someone else's skip changes nothing for alice
    conn.close()

    def shown_item(page) -> int:
        return int(page.get_attribute("#item", "data-item-id"))

    def wait_for_item(page, item_id: int) -> None:
        page.wait_for_function(
            f"document.body.dataset.state === 'ready' && document.getElementById('item').dataset.itemId === '{item_id}'",
            timeout=15_000,
        )

    with running(tag_app.create_app(db)) as base, sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_function("document.body.dataset.state === 'name'")
            assert page.locator("#item").is_hidden()
            page.fill("#tagger", "alice")
            page.press("#tagger", "Enter")
            wait_for_item(page, 1)
            assert page.text_content("#question") == "Question number 0?"
            assert page.text_content("#answer") == "answer-0"
            page.click("#correct")
            wait_for_item(page, 2)
            assert "answer-1 ×3" in page.text_content("#refs")  # references shown when known
            # the image loads after the text is shown: wait for it (a busy machine may take a moment)
            page.wait_for_function("document.getElementById('image').complete", timeout=15_000)
            assert page.evaluate("document.getElementById('image').naturalWidth") == 48  # the image loaded
            page.keyboard.press("i")
            wait_for_item(page, 3)
            page.click("#skip")
            wait_for_item(page, 4)
            page.wait_for_function("document.getElementById('counts').dataset.mine === '2'")
            counts = page.text_content("#counts")
            question, answer = page.text_content("#question"), page.text_content("#answer")
            remembered = page.evaluate("localStorage.getItem('gpt2mm-tagger')")
        finally:
            browser.close()

    assert db_tags(db) == {
        (1, "alice"): "correct",
        (2, "alice"): "incorrect",
        (3, "alice"): "skip",
        (4, "bob"): "skip",
    }
    conn = store.connect(db)
    item = store.get_item(conn, 4)
    stats = store.tag_stats(conn, "alice")
    conn.close()
    assert (question, answer) == (item.question, item.answer)
    assert f"done {stats['done']} / {stats['total']}" in counts and "2 tagged, 1 skipped" in counts
    assert remembered == "alice"
