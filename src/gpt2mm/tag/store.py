"""Answer tags: whether a model's answer to a question about an image is correct, as judged by a person.

The tagging app (`gpt2mm tag`) writes them to SQLite; `gpt2mm tag export` writes JSONL; the reward model
(`gpt2mm reward train`) reads either. One record type and one reader serve all three.

SQLite schema (WAL journal, so that several taggers and a reader work at once):

    items(item_id INTEGER PRIMARY KEY, question_id TEXT UNIQUE, image TEXT, question TEXT,
          answer TEXT, references_json TEXT, added_at TEXT)
    tags(tag_id INTEGER PRIMARY KEY, item_id INTEGER REFERENCES items, tagger TEXT,
         label TEXT CHECK(label IN ('correct', 'incorrect', 'skip')), tagged_at TEXT,
         UNIQUE(item_id, tagger))
    claims(item_id INTEGER PRIMARY KEY REFERENCES items, tagger TEXT, expires_at REAL)  -- the app's leases
    scores(item_id INTEGER PRIMARY KEY REFERENCES items, p_correct REAL, sureness REAL, scorer TEXT,
           scored_at TEXT)  -- a reward model's P(correct), for least-sure-first ordering

An item is *done* once anyone tagged it correct or incorrect; a skip only takes it off that tagger's list.

JSONL, one object per line: {"question_id", "image", "question", "answer", "label" (true = correct),
"tagger", "tagged_at", "references" (list, possibly empty)}.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpt2mm.errors import DataError

LABELS = ("correct", "incorrect", "skip")

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    item_id INTEGER PRIMARY KEY,
    question_id TEXT UNIQUE NOT NULL,
    image TEXT NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    references_json TEXT NOT NULL DEFAULT '[]',
    added_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS tags (
    tag_id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(item_id),
    tagger TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('correct', 'incorrect', 'skip')),
    tagged_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (item_id, tagger)
);
CREATE INDEX IF NOT EXISTS tags_item ON tags(item_id);
CREATE TABLE IF NOT EXISTS claims (
    item_id INTEGER PRIMARY KEY REFERENCES items(item_id),
    tagger TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS scores (
    item_id INTEGER PRIMARY KEY REFERENCES items(item_id),
    p_correct REAL NOT NULL,
    sureness REAL NOT NULL,
    scorer TEXT NOT NULL DEFAULT '',
    scored_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS scores_sureness ON scores(sureness, item_id);
"""


@dataclass
class TagRecord:
    question_id: str
    image: str
    question: str
    answer: str
    label: bool  # True: the answer is correct
    tagger: str = ""
    tagged_at: str = ""
    references: list[str] = field(default_factory=list)


def open_db(path: str | Path) -> sqlite3.Connection:
    """A connection to the tag database (created with the schema if absent), in WAL mode."""
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.executescript(SCHEMA)
    return conn


def read_tags(path: str | Path) -> list[TagRecord]:
    """Every correct/incorrect tag in a tag database (`.sqlite`, `.db`) or a JSONL export; skips are left
    out. Raises DataError naming the file and line of anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no tag file at {path}")
    with open(path, "rb") as f:
        is_sqlite = f.read(16) == b"SQLite format 3\x00"
    return _read_sqlite(path) if is_sqlite else _read_jsonl(path)


def _read_sqlite(path: Path) -> list[TagRecord]:
    conn = open_db(path)
    try:
        rows = conn.execute(
            "SELECT i.question_id, i.image, i.question, i.answer, i.references_json, t.tagger, t.label, "
            "t.tagged_at FROM tags t JOIN items i USING (item_id) WHERE t.label != 'skip' ORDER BY t.tag_id"
        ).fetchall()
    finally:
        conn.close()
    return [
        TagRecord(
            question_id=r["question_id"],
            image=r["image"],
            question=r["question"],
            answer=r["answer"],
            label=r["label"] == "correct",
            tagger=r["tagger"],
            tagged_at=r["tagged_at"],
            references=json.loads(r["references_json"]),
        )
        for r in rows
    ]


def _read_jsonl(path: Path) -> list[TagRecord]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                label = row["label"]
                if label == "skip":
                    continue
                if isinstance(label, str):
                    if label not in ("correct", "incorrect"):
                        raise ValueError(f"label {label!r} is not correct / incorrect / skip")
                    label = label == "correct"
                elif not isinstance(label, bool) and label not in (0, 1):
                    raise ValueError(f"label {label!r} is not a boolean")
                records.append(
                    TagRecord(
                        question_id=str(row["question_id"]),
                        image=str(row["image"]),
                        question=str(row["question"]),
                        answer=str(row["answer"]),
                        label=bool(label),
                        tagger=str(row.get("tagger", "")),
                        tagged_at=str(row.get("tagged_at", "")),
                        references=[str(a) for a in row.get("references", [])],
                    )
                )
            except (ValueError, KeyError, TypeError) as e:
                what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
                raise DataError(f"{path}, line {n}: {what}") from None
    return records


def write_jsonl(records: Iterable[TagRecord], path: str | Path) -> int:
    """Write records as JSONL (to a temporary name, then renamed into place: an earlier export is replaced
    only by a whole new one); returns the count. A failure is a one-line `WriteError`."""
    from gpt2mm.outputs import atomic_file, writing

    path = Path(path)
    n = 0
    with writing(path, "the tag export"):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "the tag export") as tmp, open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(asdict(r)) + "\n")
                n += 1
    return n


# --- the tagging app's side: items, claims, labels, reward scores -------------------------------------------

SQLITE_MAGIC = b"SQLite format 3\x00"
_REQUIRED_COLUMNS = {
    "items": {"item_id", "question_id", "image", "question", "answer", "references_json"},
    "tags": {"item_id", "tagger", "label", "tagged_at"},
}
# An item is open for a tagger while nobody tagged it correct/incorrect and this tagger did not skip it.
_OPEN_FOR = (
    "NOT EXISTS (SELECT 1 FROM tags t WHERE t.item_id = i.item_id AND (t.label != 'skip' OR t.tagger = ?))"
)


@dataclass
class Item:
    """A question about an image and the model's answer, waiting for people to judge it."""

    question_id: str
    image: str  # absolute path of the image file
    question: str
    answer: str
    references: list[str] = field(default_factory=list)  # human answers, when annotations were given
    item_id: int | None = None  # set by the database


def check_tag_db(path: str | Path) -> None:
    """Refuse a file that is not a tag database *before* `open_db` would add our tables to it. An absent or
    empty file is fine (a new database); so is an SQLite file with no tables."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a tag database")
    if path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        if f.read(16) != SQLITE_MAGIC:
            raise DataError(
                f"{path}: not an SQLite file, so not a tag database (give a new path to start one)"
            )
    conn = sqlite3.connect(str(path), timeout=30.0)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t in _REQUIRED_COLUMNS}
    except sqlite3.DatabaseError as e:
        raise DataError(f"{path}: cannot read it as SQLite ({e})") from None
    finally:
        conn.close()
    if not tables:
        return
    for table, wanted in _REQUIRED_COLUMNS.items():
        if table not in tables:
            raise DataError(
                f"{path}: not a gpt2mm tag database (no '{table}' table; tables: {', '.join(sorted(tables))})"
            )
        if missing := wanted - columns[table]:
            raise DataError(
                f"{path}: not a gpt2mm tag database ('{table}' lacks {', '.join(sorted(missing))})"
            )


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection to an existing tag database (made by `open_db`, which sets WAL): one per request or
    thread, in autocommit mode, waiting up to 30 s for a writer instead of failing with 'locked'."""
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """`BEGIN IMMEDIATE` ... `COMMIT`: takes the write lock up front, so a read-then-write (pick an item,
    then claim it) cannot interleave with another writer's."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _item(row: sqlite3.Row) -> Item:
    return Item(
        question_id=row["question_id"],
        image=row["image"],
        question=row["question"],
        answer=row["answer"],
        references=json.loads(row["references_json"]),
        item_id=row["item_id"],
    )


def question_ids(conn: sqlite3.Connection) -> set[str]:
    """The question ids already in the database (their answers are never recomputed)."""
    return {r[0] for r in conn.execute("SELECT question_id FROM items")}


def add_items(conn: sqlite3.Connection, items: Iterable[Item]) -> int:
    """Insert items whose question id is new, in one transaction; existing ones are left untouched.
    Returns the number inserted."""
    n = 0
    with write_transaction(conn):
        for it in items:
            cur = conn.execute(
                "INSERT OR IGNORE INTO items (question_id, image, question, answer, references_json) "
                "VALUES (?, ?, ?, ?, ?)",
                (it.question_id, it.image, it.question, it.answer, json.dumps(it.references)),
            )
            n += cur.rowcount
    return n


def get_item(conn: sqlite3.Connection, item_id: int) -> Item | None:
    row = conn.execute("SELECT * FROM items WHERE item_id = ?", (item_id,)).fetchone()
    return None if row is None else _item(row)


def open_items(conn: sqlite3.Connection) -> list[Item]:
    """Items nobody has tagged correct/incorrect yet, in insertion order."""
    rows = conn.execute(
        "SELECT * FROM items i WHERE NOT EXISTS "
        "(SELECT 1 FROM tags t WHERE t.item_id = i.item_id AND t.label != 'skip') ORDER BY item_id"
    ).fetchall()
    return [_item(r) for r in rows]


def claim_next(
    conn: sqlite3.Connection, tagger: str, now: float, ttl_s: float, least_sure: bool = False
) -> Item | None:
    """The next item for `tagger`, claimed until `now + ttl_s` so that nobody else gets it meanwhile.

    A tagger holds one claim: asking again (a page reload) returns the item it holds while that is still
    open. Otherwise the first open item that nobody holds: in insertion order, or with `least_sure` the
    one whose reward score is nearest 0.5 (see `tagging_order`; unscored items come last). None when
    nothing is left for this tagger.
    """
    with write_transaction(conn):
        conn.execute("DELETE FROM claims WHERE expires_at <= ?", (now,))
        row = conn.execute(
            f"SELECT i.* FROM claims c JOIN items i USING (item_id) WHERE c.tagger = ? AND {_OPEN_FOR} "
            "ORDER BY i.item_id LIMIT 1",
            (tagger, tagger),
        ).fetchone()
        if row is None:
            order = "s.sureness IS NULL, s.sureness, i.item_id" if least_sure else "i.item_id"
            row = conn.execute(
                "SELECT i.* FROM items i LEFT JOIN scores s USING (item_id) "
                f"WHERE NOT EXISTS (SELECT 1 FROM claims c WHERE c.item_id = i.item_id) AND {_OPEN_FOR} "
                f"ORDER BY {order} LIMIT 1",
                (tagger,),
            ).fetchone()
        conn.execute("DELETE FROM claims WHERE tagger = ?", (tagger,))
        if row is None:
            return None
        conn.execute(
            "INSERT INTO claims (item_id, tagger, expires_at) VALUES (?, ?, ?)",
            (row["item_id"], tagger, now + ttl_s),
        )
    return _item(row)


def release_claims(conn: sqlite3.Connection, tagger: str) -> None:
    """Give back what `tagger` holds (the page calls it when the tagger's name changes)."""
    conn.execute("DELETE FROM claims WHERE tagger = ?", (tagger,))


def tag_item(conn: sqlite3.Connection, item_id: int, tagger: str, label: str) -> None:
    """Record `tagger`'s label for an item; a second label from the same tagger replaces the first.
    Raises ValueError for a label outside LABELS, LookupError for an unknown item."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}, not {label!r}")
    with write_transaction(conn):
        if conn.execute("SELECT 1 FROM items WHERE item_id = ?", (item_id,)).fetchone() is None:
            raise LookupError(f"no item {item_id}")
        conn.execute(
            "INSERT INTO tags (item_id, tagger, label) VALUES (?, ?, ?) ON CONFLICT (item_id, tagger) "
            "DO UPDATE SET label = excluded.label, tagged_at = excluded.tagged_at",
            (item_id, tagger, label),
        )
        conn.execute("DELETE FROM claims WHERE item_id = ? AND tagger = ?", (item_id, tagger))


def undo_last(conn: sqlite3.Connection, tagger: str, now: float, ttl_s: float) -> Item | None:
    """Delete `tagger`'s latest tag and claim that item for them again; None when they have no tag."""
    with write_transaction(conn):
        row = conn.execute(
            "SELECT tag_id, item_id FROM tags WHERE tagger = ? ORDER BY tagged_at DESC, tag_id DESC LIMIT 1",
            (tagger,),
        ).fetchone()
        if row is None:
            return None
        conn.execute("DELETE FROM tags WHERE tag_id = ?", (row["tag_id"],))
        conn.execute("DELETE FROM claims WHERE tagger = ? OR item_id = ?", (tagger, row["item_id"]))
        conn.execute(
            "INSERT INTO claims (item_id, tagger, expires_at) VALUES (?, ?, ?)",
            (row["item_id"], tagger, now + ttl_s),
        )
        return get_item(conn, row["item_id"])


def tag_stats(conn: sqlite3.Connection, tagger: str | None = None) -> dict[str, int]:
    """Counts for the page: items, done (tagged correct/incorrect by anyone), tags by label, and with a
    tagger their own tags, skips and what is left for them."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM items) AS total, "
        "(SELECT count(DISTINCT item_id) FROM tags WHERE label != 'skip') AS done, "
        "(SELECT count(*) FROM tags WHERE label = 'correct') AS correct, "
        "(SELECT count(*) FROM tags WHERE label = 'incorrect') AS incorrect, "
        "(SELECT count(*) FROM tags WHERE label = 'skip') AS skipped, "
        "(SELECT count(DISTINCT tagger) FROM tags) AS taggers"
    ).fetchone()
    stats = dict(row)
    stats["remaining"] = stats["total"] - stats["done"]
    if tagger is not None:
        mine = conn.execute(
            "SELECT count(*) FILTER (WHERE label != 'skip'), count(*) FILTER (WHERE label = 'skip') "
            "FROM tags WHERE tagger = ?",
            (tagger,),
        ).fetchone()
        stats["mine"], stats["mine_skipped"] = mine[0], mine[1]
        stats["left_for_me"] = conn.execute(
            f"SELECT count(*) FROM items i WHERE {_OPEN_FOR}", (tagger,)
        ).fetchone()[0]
    return stats


def sureness(p_correct: float) -> float:
    """How sure a reward model is: |p - 0.5|, 0 for a coin toss, 0.5 for certainty either way."""
    return abs(p_correct - 0.5)


def tagging_order(item_ids: Iterable[int], scores: Mapping[int, float]) -> list[int]:
    """The order `claim_next(least_sure=True)` hands items out: least sure first, ties and unscored items
    (last) by insertion order. The reference for the SQL, and what a tagger's hour is best spent on."""
    return sorted(item_ids, key=lambda i: (i not in scores, sureness(scores[i]) if i in scores else 0.0, i))


def set_scores(conn: sqlite3.Connection, scores: Mapping[int, float], scorer: str = "") -> None:
    """Store reward-model scores P(correct) (replacing earlier ones of those items), in one transaction.
    Raises DataError for a score that is not a number in [0, 1]."""
    for item_id, p in scores.items():
        if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p <= 1.0):
            raise DataError(f"reward score of item {item_id} is {p!r}, not a probability in [0, 1]")
    with write_transaction(conn):
        conn.executemany(
            "INSERT OR REPLACE INTO scores (item_id, p_correct, sureness, scorer) VALUES (?, ?, ?, ?)",
            [(i, float(p), sureness(float(p)), scorer) for i, p in scores.items()],
        )


def read_scores(conn: sqlite3.Connection) -> dict[int, float]:
    return {r[0]: r[1] for r in conn.execute("SELECT item_id, p_correct FROM scores")}
