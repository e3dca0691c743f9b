"""The folder source (``--tasks-dir DIR``): each ``DIR/*.md`` is a task; ``running/``, then ``done/`` or ``failed/``.

A file is taken once it looks the same (size, modification time) on two polls in a row, so a task
still being written is left alone. Taking it is a rename into ``running/`` (atomic: a file is
taken once); a file found in ``running/`` that the journal does not know was taken just before
a crash, before anything was sent, and is taken again. The outcome is written next to the task
in ``done/`` or ``failed/`` as a new file (written, synced, renamed into place), so a crash
mid-write never leaves half an outcome, and writing it again finds it already there.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.logger import Logger

from .journal import DONE, TaskRecord
from .outcome import marker, outcome_block
from .service import MAX_TASK_BYTES, Incoming, too_big

log = Logger()

RUNNING, DONE_DIR, FAILED_DIR = "running", "done", "failed"
_VANISHED = ("\n\n> The task file disappeared from running/ while the task ran; above is the task as it was "
             "read when it was taken.\n")


class FolderSource:
    """Tasks as Markdown files in a folder."""

    name = "folder"

    def __init__(self, directory: str, interval: float = 2.0) -> None:
        self.directory = os.path.realpath(os.path.expanduser(directory))
        self.interval = interval
        #: name → (size, mtime) at the last poll: a file is taken when it has not changed since.
        self._last_look: dict[str, tuple[int, int]] = {}
        for sub in (RUNNING, DONE_DIR, FAILED_DIR):
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)

    def close(self) -> None:
        """Nothing in flight: the folder is read synchronously."""

    def _path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    # -- taking tasks --------------------------------------------------------------
    def poll(self, known_refs: set[str]) -> list[Incoming]:
        """Files in ``running/`` nobody knows (taken before a crash), then new files that stopped changing."""
        found: list[Incoming] = []
        for name in _task_files(self._path(RUNNING)):
            if name not in known_refs:
                log.info("taking {name} again: it was in running/ but never journaled", name=name)
                found += self._read(name)
        looks: dict[str, tuple[int, int]] = {}
        for name in _task_files(self.directory):
            try:
                info = os.stat(self._path(name))
            except OSError:
                continue  # gone already
            look = (info.st_size, info.st_mtime_ns)
            if self._last_look.get(name) != look:
                looks[name] = look
                continue
            running = _free_name(self._path(RUNNING), name)
            try:
                os.rename(self._path(name), self._path(RUNNING, running))
            except FileNotFoundError:
                continue  # removed between the listing and now: nothing to do
            found += self._read(running)
        self._last_look = looks
        return found

    def _read(self, name: str) -> list[Incoming]:
        """The task in ``running/name`` (bounded read), or why it cannot run; nothing if it vanished."""
        path = self._path(RUNNING, name)
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size > MAX_TASK_BYTES:
                    return [Incoming(ref=name, problem=too_big(size))]
                data = handle.read(MAX_TASK_BYTES + 1)
        except FileNotFoundError:
            return []
        except OSError as error:
            return [Incoming(ref=name, problem=f"cannot read the task file {name}: {error.strerror}")]
        if len(data) > MAX_TASK_BYTES:
            return [Incoming(ref=name, problem=too_big(len(data)))]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            return [Incoming(ref=name, problem=f"the task file {name} is not UTF-8 text (byte {error.start})")]
        return [Incoming(ref=name, text=text)]

    # -- writing the outcome ---------------------------------------------------------
    def report(self, record: TaskRecord, save: Callable[[TaskRecord], None]) -> None:
        """Write ``done/NAME`` or ``failed/NAME``: the task, then its outcome; remove it from ``running/``."""
        folder = self._path(DONE_DIR if record.state == DONE else FAILED_DIR)
        if record.report_ref is None:
            # Chosen once and journaled, so that writing again after a crash finds the same file.
            record.report_ref = _free_name(folder, record.ref or f"{record.id}.md")
            save(record)
        target = os.path.join(folder, record.report_ref)
        source = self._path(RUNNING, record.ref) if record.ref else None
        if not os.path.exists(target):
            self._write_outcome(record, source, target)
        if source is not None:
            try:
                os.unlink(source)
            except FileNotFoundError:
                pass

    def _write_outcome(self, record: TaskRecord, source: str | None, target: str) -> None:
        block = outcome_block(record).encode("utf-8")
        try:
            size = os.stat(source).st_size if source is not None else None
        except FileNotFoundError:
            size = None
        if source is None or size is None:
            if source is not None:
                log.warn("task {task_id}: {name} disappeared from running/ while it ran; writing its outcome to "
                         "{target} anyway", task_id=record.id, name=record.ref, target=target)
            task = (record.body or "").encode("utf-8") + (_VANISHED.encode("utf-8") if source is not None else b"")
            _write_new(target, task + block)
            return
        if size > MAX_TASK_BYTES:
            # Too big to copy on the reactor: the outcome goes on its end (once), then the file moves.
            with open(source, "rb+") as handle:
                handle.seek(max(0, size - len(block)))
                if marker(record).encode("utf-8") not in handle.read():
                    handle.seek(0, os.SEEK_END)
                    handle.write(block)
                    handle.flush()
                    os.fsync(handle.fileno())
            os.rename(source, target)
            _sync_folder(os.path.dirname(target))
            return
        with open(source, "rb") as handle:
            task = handle.read(MAX_TASK_BYTES + 1)
        if not task.endswith(b"\n"):
            task += b"\n"
        _write_new(target, task + block)


def _task_files(folder: str) -> list[str]:
    """``*.md`` regular files in ``folder``, by name (hidden and temporary files are not tasks)."""
    try:
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if e.name.endswith(".md") and not e.name.startswith(".")
                     and e.is_file()]
    except FileNotFoundError:
        return []
    return sorted(names)


def _free_name(folder: str, name: str) -> str:
    """``name``, or ``stem-2.md``, ``stem-3.md``... whichever is not taken in ``folder``."""
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    candidate, number = name, 2
    while os.path.lexists(os.path.join(folder, candidate)):
        candidate = f"{stem}-{number}.{suffix}" if suffix else f"{stem}-{number}"
        number += 1
    return candidate


def _write_new(target: str, data: bytes) -> None:
    """Write ``target`` whole or not at all: a hidden temporary file, synced, then renamed into place."""
    folder, name = os.path.split(target)
    temporary = os.path.join(folder, f".{name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(temporary, target)
    _sync_folder(folder)


def _sync_folder(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
