"""A human study in one SQLite file: its items, its annotators (each one's link token kept only as a
SHA-256 hash), the order every annotator sees the items in and the side each response is shown on,
and every vote ever cast. Changing a vote adds a row: an annotator's latest row for an item is
their vote, the earlier rows are its history.

The file is in WAL mode with synchronous=FULL, and `record_vote` returns after its transaction has
committed, so a vote the page was told about survives the server being killed. Every call opens
its own connection: the web server's threads never share one, and SQLite's lock orders the writers.
A connection never creates the file: if it disappears under a running server, calls raise
StudyUnavailable (an empty database in its place would hide the loss and lose the next votes).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import random
import re
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pdpo_jax.annotation.errors import StudyError, StudyUnavailable
from pdpo_jax.evaluate.judge_pairs import PairItem
from pdpo_jax.evaluate.judge_prompts import PROMPTS

SCHEMA_VERSION = "1"
DRAW = "draw"
CHOICES = ("1", "2", DRAW)  # response 1 or response 2 as shown, or a draw
LANGUAGES = tuple(sorted(PROMPTS))
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{32,64}")  # what secrets.token_urlsafe(32) makes
MAX_NAME_LENGTH = 64

SCHEMA = """
CREATE TABLE study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    item INTEGER PRIMARY KEY,
    example_id TEXT NOT NULL,
    persona TEXT NOT NULL,
    history TEXT NOT NULL,
    model_a TEXT NOT NULL,
    response_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    response_b TEXT NOT NULL,
    UNIQUE (example_id, model_a, model_b)
);
CREATE TABLE annotators (
    annotator INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    added TEXT NOT NULL
);
CREATE TABLE assignments (
    annotator INTEGER NOT NULL REFERENCES annotators,
    position INTEGER NOT NULL,
    item INTEGER NOT NULL REFERENCES items,
    a_first INTEGER NOT NULL CHECK (a_first IN (0, 1)),
    PRIMARY KEY (annotator, position),
    UNIQUE (annotator, item)
);
CREATE TABLE votes (
    vote INTEGER PRIMARY KEY,
    annotator INTEGER NOT NULL,
    item INTEGER NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('1', '2', 'draw')),
    winner TEXT NOT NULL,
    time TEXT NOT NULL,
    FOREIGN KEY (annotator, item) REFERENCES assignments (annotator, item)
);
CREATE INDEX votes_of_annotator_item ON votes (annotator, item, vote);
"""

@dataclass(frozen=True)
class Annotator:
    id: int
    name: str


@dataclass(frozen=True)
class ShownItem:
    """One item as one annotator sees it: at `position` (from 1) of their sequence, with model A's
    response on side 1 when `a_first`, and their current vote (None before they voted)."""

    position: int
    number: int  # the study's item number
    item: PairItem
    a_first: bool
    choice: str | None

    @property
    def shown_models(self) -> tuple[str, str]:
        item = self.item
        return (item.model_a, item.model_b) if self.a_first else (item.model_b, item.model_a)

    @property
    def shown_responses(self) -> tuple[str, str]:
        item = self.item
        return (item.response_a, item.response_b) if self.a_first else (item.response_b, item.response_a)

    def winner(self, choice: str) -> str:
        """The model a choice names, or "draw"."""
        return DRAW if choice == DRAW else self.shown_models[int(choice) - 1]


@dataclass(frozen=True)
class Progress:
    done: int  # items this annotator has voted on
    total: int
    next_open: int | None  # the position to go to next (the first not voted on), None when all are done


@dataclass(frozen=True)
class VoteRecord:
    """One row of the vote history: who voted what on which item, shown in which order, and when."""

    vote: int
    item: int
    example_id: str
    annotator: str
    shown: tuple[str, str]
    winner: str  # a model name or "draw"
    time: str
    current: bool  # the annotator's latest vote on the item


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise StudyError(f"annotator name {name!r}: give a non-empty name without surrounding spaces")
    if len(name) > MAX_NAME_LENGTH or any(not ch.isprintable() for ch in name):
        raise StudyError(f"annotator name {name!r}: at most {MAX_NAME_LENGTH} printable characters")
    return name


class Study:
    """An existing study database; `Study.create` makes one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise StudyError(f"{self.path}: no study database here; create one with `pdpo annotate init`")
        try:
            with self._connect() as db:
                settings = dict(db.execute("SELECT key, value FROM study").fetchall())
        except sqlite3.DatabaseError as err:
            raise StudyError(f"{self.path}: not a study database ({err})") from None
        if settings.get("schema_version") != SCHEMA_VERSION:
            raise StudyError(f"{self.path}: a study database of another version ({settings.get('schema_version')!r}, "
                             f"this is {SCHEMA_VERSION!r})")
        self.language = settings["language"]
        self.seed = int(settings["seed"])

    @classmethod
    def create(cls, path: str | os.PathLike, items: Sequence[PairItem], *, language: str = "en",
               seed: int = 0) -> "Study":
        """A new study of `items`, written under a temporary name and renamed into place."""
        path = Path(path)
        if path.exists():
            raise StudyError(f"{path}: exists already; a study is created once (give another --db)")
        if not items:
            raise StudyError("a study needs at least one item")
        if language not in LANGUAGES:
            raise StudyError(f"language must be one of {list(LANGUAGES)}, got {language!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            db = sqlite3.connect(tmp, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")  # kept in the file: every later connection uses it
                db.executescript("BEGIN;" + SCHEMA)
                db.executemany("INSERT INTO study VALUES (?, ?)", [
                    ("schema_version", SCHEMA_VERSION), ("language", language), ("seed", str(seed)), ("created", _now())])
                db.executemany(
                    "INSERT INTO items (item, example_id, persona, history, model_a, response_a, model_b, response_b)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(number, item.id, json.dumps(list(item.persona), ensure_ascii=False),
                      json.dumps(list(item.history), ensure_ascii=False), item.model_a, item.response_a,
                      item.model_b, item.response_b) for number, item in enumerate(items, start=1)])
                db.execute("COMMIT")
            finally:
                db.close()
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return cls(path)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:  # mode=rw: open the existing file, never create an empty one in its place
            db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=rw", uri=True, timeout=30.0,
                                 isolation_level=None)
        except sqlite3.OperationalError as err:
            state = "is gone" if not self.path.exists() else f"cannot be opened ({err})"
            raise StudyUnavailable(f"{self.path}: the study database {state}; put it back to go on") from None
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the write lock from its start, so read-then-write is atomic."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------------------- items, annotators

    def items(self) -> list[tuple[int, PairItem]]:
        with self._connect() as db:
            rows = db.execute("SELECT item, example_id, persona, history, model_a, response_a, model_b, response_b "
                              "FROM items ORDER BY item").fetchall()
        return [(row[0], _pair_item(row[1:])) for row in rows]

    def annotator_names(self) -> list[str]:
        with self._connect() as db:
            return self._names(db)

    def add_annotator(self, name: str, *, reissue: bool = False) -> str:
        """A new annotator's link token (or, with `reissue`, a new token for an existing one: the old
        link stops working, the votes stay). Only the token's hash is stored; the token is returned once.

        Each annotator sees every item, in an order and with sides drawn from (study seed, name)."""
        name = _check_name(name)
        token = secrets.token_urlsafe(32)
        with self._transaction() as db:
            row = db.execute("SELECT annotator FROM annotators WHERE name = ?", (name,)).fetchone()
            if reissue:
                if row is None:
                    raise StudyError(f"no annotator named {name!r} to reissue a link for; known: {self._names(db)}")
                db.execute("UPDATE annotators SET token_sha256 = ? WHERE annotator = ?", (token_digest(token), row[0]))
                return token
            if row is not None:
                raise StudyError(f"annotator {name!r} exists already; --reissue gives them a new link "
                                 "(the old one stops working, their votes stay)")
            annotator = db.execute("INSERT INTO annotators (name, token_sha256, added) VALUES (?, ?, ?)",
                                   (name, token_digest(token), _now())).lastrowid
            numbers = [number for (number,) in db.execute("SELECT item FROM items ORDER BY item")]
            rng = random.Random(f"{self.seed}\0{name}")
            rng.shuffle(numbers)
            db.executemany("INSERT INTO assignments VALUES (?, ?, ?, ?)",
                           [(annotator, position, number, int(rng.random() < 0.5))
                            for position, number in enumerate(numbers, start=1)])
        return token

    @staticmethod
    def _names(db: sqlite3.Connection) -> list[str]:
        return [name for (name,) in db.execute("SELECT name FROM annotators ORDER BY annotator")]

    def annotator_for_token(self, token: str) -> Annotator | None:
        """The annotator whose link carries `token`, or None."""
        if not TOKEN_PATTERN.fullmatch(token):
            return None
        with self._connect() as db:
            row = db.execute("SELECT annotator, name FROM annotators WHERE token_sha256 = ?",
                             (token_digest(token),)).fetchone()
        return None if row is None else Annotator(*row)

    # ------------------------------------------------------------------------- one annotator's view

    def shown_item(self, annotator: Annotator, position: int) -> ShownItem | None:
        """The item at `position` of the annotator's sequence, or None past its ends."""
        with self._connect() as db:
            return self._shown_item(db, annotator, position)

    def _shown_item(self, db: sqlite3.Connection, annotator: Annotator, position: int) -> ShownItem | None:
        row = db.execute(
            "SELECT s.item, s.a_first, i.example_id, i.persona, i.history, i.model_a, i.response_a, i.model_b, "
            "i.response_b FROM assignments s JOIN items i ON i.item = s.item "
            "WHERE s.annotator = ? AND s.position = ?", (annotator.id, position)).fetchone()
        if row is None:
            return None
        choice = db.execute("SELECT choice FROM votes WHERE annotator = ? AND item = ? ORDER BY vote DESC LIMIT 1",
                            (annotator.id, row[0])).fetchone()
        return ShownItem(position, row[0], _pair_item(row[2:]), bool(row[1]), None if choice is None else choice[0])

    def progress(self, annotator: Annotator, after: int = 0) -> Progress:
        """How far the annotator is; `next_open` is the first position without a vote after `after`,
        else the first one overall."""
        with self._connect() as db:
            return self._progress(db, annotator, after)

    @staticmethod
    def _progress(db: sqlite3.Connection, annotator: Annotator, after: int) -> Progress:
        open_positions = [position for (position,) in db.execute(
            "SELECT position FROM assignments s WHERE annotator = ? AND NOT EXISTS "
            "(SELECT 1 FROM votes v WHERE v.annotator = s.annotator AND v.item = s.item) ORDER BY position",
            (annotator.id,))]
        (total,) = db.execute("SELECT COUNT(*) FROM assignments WHERE annotator = ?", (annotator.id,)).fetchone()
        following = [p for p in open_positions if p > after] or open_positions
        return Progress(done=total - len(open_positions), total=total, next_open=following[0] if following else None)

    def record_vote(self, annotator: Annotator, position: int, choice: str) -> tuple[ShownItem, Progress] | None:
        """Stores the annotator's vote on the item at `position` (committed when this returns); the
        same choice as their current vote changes nothing. Returns the item as voted and the
        progress after it, or None when there is no such position."""
        if choice not in CHOICES:
            raise StudyError(f"choice must be one of {list(CHOICES)}, got {choice!r}")
        with self._transaction() as db:
            shown = self._shown_item(db, annotator, position)
            if shown is None:
                return None
            if shown.choice != choice:
                db.execute("INSERT INTO votes (annotator, item, choice, winner, time) VALUES (?, ?, ?, ?, ?)",
                           (annotator.id, shown.number, choice, shown.winner(choice), _now()))
            progress = self._progress(db, annotator, after=position)
        return ShownItem(shown.position, shown.number, shown.item, shown.a_first, choice), progress

    # ------------------------------------------------------------------------- all votes

    def votes(self, *, history: bool = False) -> list[VoteRecord]:
        """Every annotator's current vote on every item they voted on, in the order cast; with
        `history`, the votes they replaced as well (current=False)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT v.vote, v.item, i.example_id, n.name, s.a_first, i.model_a, i.model_b, v.winner, v.time, "
                "v.vote = (SELECT MAX(vote) FROM votes w WHERE w.annotator = v.annotator AND w.item = v.item) "
                "FROM votes v JOIN items i ON i.item = v.item JOIN annotators n ON n.annotator = v.annotator "
                "JOIN assignments s ON s.annotator = v.annotator AND s.item = v.item ORDER BY v.vote").fetchall()
        return [VoteRecord(vote, item, example_id, name, (model_a, model_b) if a_first else (model_b, model_a),
                           winner, time, bool(current))
                for vote, item, example_id, name, a_first, model_a, model_b, winner, time, current in rows
                if history or current]


def _pair_item(row: Sequence) -> PairItem:
    example_id, persona, history, model_a, response_a, model_b, response_b = row
    return PairItem(id=example_id, persona=tuple(json.loads(persona)), history=tuple(json.loads(history)),
                    model_a=model_a, response_a=response_a, model_b=model_b, response_b=response_b)
