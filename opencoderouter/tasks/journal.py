"""The task journal: task id → source, session, state and outcome, kept in SQLite so that nothing runs twice.

SQLite (standard library) rather than a JSON-lines file: each change is one small transaction that
either happened or did not (WAL, ``synchronous=FULL``: committed means on disk, even after a kill -9
or a power cut), records are updated in place by id instead of replayed and compacted, and the
uniqueness of a source's own task id (a TickTick task id) is a constraint, not a scan. A lock file
(``flock``) keeps a second router from using the same journal: two routers could claim one task.

Writes are a few kilobytes at most (texts are capped) and run on the reactor thread.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import sqlite3
from dataclasses import dataclass
from typing import Any

#: Longest answer or error text kept (the rest is cut, with a note).
MAX_STORED_TEXT = 1 << 20
#: Internal states; ``starting`` and ``prompted`` are "running" to the outside.
QUEUED, STARTING, PROMPTED, DONE, FAILED = "queued", "starting", "prompted", "done", "failed"
FINISHED = (DONE, FAILED)

_COLUMNS = (
    "id", "source", "source_key", "ref", "title", "project", "body", "state", "slug", "directory", "session_id",
    "link", "status", "error", "text", "created", "started", "finished", "attempts", "reported", "report_ref",
    "report_error",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    source_key TEXT UNIQUE,
    ref TEXT, title TEXT, project TEXT, body TEXT,
    state TEXT NOT NULL,
    slug TEXT, directory TEXT, session_id TEXT, link TEXT,
    status TEXT, error TEXT, text TEXT,
    created REAL NOT NULL, started REAL, finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reported INTEGER NOT NULL DEFAULT 0,
    report_ref TEXT, report_error TEXT
);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks (reported, state);
"""


class JournalError(Exception):
    """The journal cannot be used (another router holds it, or the folder is not writable); a sentence."""


@dataclass
class TaskRecord:
    """One task as the journal keeps it."""

    id: str
    source: str
    created: float
    state: str = QUEUED
    #: The source's own id of the task (a TickTick task id), unique: the same task is never taken twice.
    source_key: str | None = None
    #: Where the source keeps it (the file name in ``running/``, ``projectId/taskId`` in TickTick).
    ref: str | None = None
    title: str | None = None
    project: str | None = None
    #: The task text (front matter + prompt), None when it could not be read.
    body: str | None = None
    slug: str | None = None
    directory: str | None = None
    session_id: str | None = None
    link: str | None = None
    #: How the dispatch ended (``done``, ``error``, ``timeout``, ``bad_input``, ``not_found``, ...).
    status: str | None = None
    error: str | None = None
    text: str | None = None
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    #: The outcome has reached the source (file moved, TickTick task completed or marked).
    reported: bool = False
    #: The source's name for the reported copy (the file name in ``done/`` or ``failed/``).
    report_ref: str | None = None
    report_error: str | None = None
    #: Set by the journal: the order tasks arrived in.
    seq: int = 0

    @property
    def finished_state(self) -> bool:
        """True once done or failed."""
        return self.state in FINISHED


def _cap(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_STORED_TEXT:
        return text
    return text[:MAX_STORED_TEXT] + "\n\n[… cut: the text was longer than 1 MiB]"


class Journal:
    """The task journal in ``directory/tasks.sqlite3`` (created with mode 0700), held by one router."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "tasks.sqlite3")
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._lock = open(os.path.join(directory, "tasks.lock"), "a+")  # noqa: SIM115 - held until close()
        except OSError as error:
            raise JournalError(f"--state-dir: cannot use {directory}: {error.strerror}") from None
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise JournalError(f"--state-dir: another router already uses the task journal in {directory}; "
                               "give this one its own --state-dir") from None
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as error:
            self._lock.close()
            raise JournalError(f"--state-dir: the task journal {self.path} cannot be used: {error}") from None

    def insert(self, record: TaskRecord) -> bool:
        """Add a new task; False (and nothing written) when its ``source_key`` is known already."""
        values = self._values(record)
        names = ", ".join(_COLUMNS)
        marks = ", ".join("?" for _ in _COLUMNS)
        try:
            cursor = self._db.execute(f"INSERT INTO tasks ({names}) VALUES ({marks})", values)
        except sqlite3.IntegrityError:
            return False
        record.seq = cursor.lastrowid or 0
        return True

    def save(self, record: TaskRecord) -> None:
        """Write every field of a known task (one durable transaction)."""
        assignments = ", ".join(f"{name} = ?" for name in _COLUMNS[1:])
        values = self._values(record)
        self._db.execute(f"UPDATE tasks SET {assignments} WHERE id = ?", (*values[1:], record.id))

    def knows(self, source_key: str) -> bool:
        """True when a task with this source key was ever taken."""
        row = self._db.execute("SELECT 1 FROM tasks WHERE source_key = ?", (source_key,)).fetchone()
        return row is not None

    def open_tasks(self) -> list[TaskRecord]:
        """Tasks not finished, or finished but not reported yet, oldest first."""
        return self._select("WHERE reported = 0 OR state NOT IN (?, ?) ORDER BY seq", FINISHED)

    def recent(self, limit: int) -> list[TaskRecord]:
        """The last ``limit`` finished and reported tasks, oldest first."""
        rows = self._select("WHERE reported = 1 AND state IN (?, ?) ORDER BY seq DESC LIMIT ?", (*FINISHED, limit))
        return rows[::-1]

    def get(self, task_id: str) -> TaskRecord | None:
        """One task by id."""
        rows = self._select("WHERE id = ?", (task_id,))
        return rows[0] if rows else None

    def close(self) -> None:
        """Close the database and release the lock."""
        self._db.close()
        self._lock.close()

    # -- rows ------------------------------------------------------------------
    @staticmethod
    def _values(record: TaskRecord) -> tuple[Any, ...]:
        fields = dataclasses.asdict(record)
        fields["text"] = _cap(record.text)
        fields["error"] = _cap(record.error)
        fields["reported"] = 1 if record.reported else 0
        return tuple(fields[name] for name in _COLUMNS)

    def _select(self, clause: str, parameters: tuple[Any, ...]) -> list[TaskRecord]:
        cursor = self._db.execute(f"SELECT seq, {', '.join(_COLUMNS)} FROM tasks {clause}", parameters)
        records = []
        for row in cursor.fetchall():
            fields = dict(zip(("seq", *_COLUMNS), row, strict=True))
            fields["reported"] = bool(fields["reported"])
            records.append(TaskRecord(**fields))
        return records
