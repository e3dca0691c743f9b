"""Agent state: what each session of one OpenCode server is doing, from its events and snapshots.

:class:`AgentState` holds one backend's sessions: status (``working``, ``retrying``, ``idle``,
``error``), the permission requests and questions waiting for a person, the last error, todo
progress and the time of last activity. It is fed the payloads of ``/global/event``
(:meth:`AgentState.apply`) and rebuilt from the snapshot endpoints after every (re)connect
(:meth:`AgentState.load`); it never holds message text. Everything in it came from a backend,
so every string is cut to a bounded length, ids must look like ids, and at most
``max_sessions`` sessions are kept (those needing a person or working first, then the most recent).

Facts it relies on (OpenCode 1.18.33): a session stays ``busy`` while a permission or a question
waits, so a pending request whose session is not busy is stale (the server keeps such requests
after an abort or a deletion); ``busy``, ``idle`` and ``session.idle`` repeat within a turn;
after an error the session goes ``idle`` (twice), which must not hide the error.
"""

from __future__ import annotations

import base64
import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .responses import rfc3339

#: Sessions kept per backend; message text is never kept.
MAX_SESSIONS = 20
#: Pending permission requests plus questions kept per session.
MAX_PENDING = 10
#: A session idle for longer than this (seconds) is not looked at for an error after a restart.
RECENT = 86400.0
#: Directories (other than the project's) whose snapshots are asked for after a reconnect.
MAX_DIRECTORIES = 8
_MAX_TITLE = 200
_MAX_TEXT = 300
_MAX_LABEL = 80
_MAX_PATTERNS = 5
_MAX_QUESTIONS = 4
_MAX_OPTIONS = 10
_MAX_PATH = 4096
#: Ids a backend sends (``ses_…``, ``per_…``, ``que_…``) go into URLs: nothing else is accepted.
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
#: A user's abort ends a turn with this error: that is not a failure to report.
_ABORTED = "MessageAbortedError"


class SessionStatus(str, enum.Enum):
    """What one session is doing."""

    WORKING = "working"
    RETRYING = "retrying"
    IDLE = "idle"
    ERROR = "error"


class BackendState(str, enum.Enum):
    """One backend's summary, most urgent first."""

    NEEDS_YOU = "needs_you"
    ERROR = "error"
    WORKING = "working"
    IDLE = "idle"
    UNKNOWN = "unknown"


class Change(enum.IntEnum):
    """How much an event changed: nothing, only the time of last activity, or something a person sees."""

    NONE = 0
    ACTIVITY = 1
    STATE = 2


def web_path(directory: str, session_id: str) -> str:
    """The OpenCode web UI's path of a session: ``/<base64url(directory), no padding>/session/<id>``."""
    encoded = base64.urlsafe_b64encode(directory.encode("utf-8", "surrogateescape")).rstrip(b"=").decode("ascii")
    return f"/{encoded}/session/{session_id}"


def _text(value: Any, limit: int = _MAX_TEXT) -> str:
    """A backend's string, cut to ``limit`` characters ("" for anything that is not a string)."""
    if not isinstance(value, str):
        return ""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _ident(value: Any) -> str | None:
    return value if isinstance(value, str) and _ID.match(value) else None


def _directory(value: Any) -> str | None:
    return value if isinstance(value, str) and value.startswith("/") and len(value) <= _MAX_PATH else None


def _epoch(value: Any) -> float | None:
    """OpenCode's epoch milliseconds as seconds."""
    return value / 1000.0 if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(slots=True)
class Permission:
    """A permission request waiting for a reply."""

    id: str
    tool: str
    patterns: tuple[str, ...]
    command: str
    always: tuple[str, ...]
    asked_at: float

    @classmethod
    def parse(cls, props: dict[str, Any], now: float) -> Permission | None:
        """From a ``permission.asked`` payload (or a ``GET /permission`` entry)."""
        request_id = _ident(props.get("id"))
        if request_id is None:
            return None
        patterns = props.get("patterns")
        always = props.get("always")
        return cls(
            id=request_id,
            tool=_text(props.get("permission"), _MAX_LABEL) or "permission",
            patterns=tuple(_text(p) for p in (patterns if isinstance(patterns, list) else [])[:_MAX_PATTERNS]),
            command=_text(_dict(props.get("metadata")).get("command")),
            always=tuple(_text(p) for p in (always if isinstance(always, list) else [])[:_MAX_PATTERNS]),
            asked_at=now,
        )

    def asking(self) -> str:
        """What is asked, for people: ``bash: rm -rf build/``."""
        what = self.command or ", ".join(p for p in self.patterns if p)
        return f"{self.tool}: {what}" if what else self.tool

    def to_json(self) -> dict[str, Any]:
        """The API's view."""
        return {"id": self.id, "tool": self.tool, "asking": self.asking(), "patterns": list(self.patterns),
                "always": list(self.always), "asked_at": rfc3339(self.asked_at)}


@dataclass(frozen=True, slots=True)
class QuestionItem:
    """One question of a ``question`` tool call."""

    header: str
    question: str
    options: tuple[str, ...]
    multiple: bool


@dataclass(slots=True)
class Question:
    """A question (one or more items) waiting for an answer."""

    id: str
    items: tuple[QuestionItem, ...]
    asked_at: float

    @classmethod
    def parse(cls, props: dict[str, Any], now: float) -> Question | None:
        """From a ``question.asked`` payload (or a ``GET /question`` entry)."""
        request_id = _ident(props.get("id"))
        if request_id is None:
            return None
        raw = props.get("questions")
        items = []
        for entry in (raw if isinstance(raw, list) else [])[:_MAX_QUESTIONS]:
            entry = _dict(entry)
            options = entry.get("options")
            labels = tuple(_text(_dict(o).get("label"), _MAX_LABEL)
                           for o in (options if isinstance(options, list) else [])[:_MAX_OPTIONS])
            items.append(QuestionItem(_text(entry.get("header"), _MAX_LABEL), _text(entry.get("question")),
                                      labels, entry.get("multiple") is True))
        return cls(request_id, tuple(items), now)

    def asking(self) -> str:
        """What is asked, for people: the first question's text."""
        first = self.items[0] if self.items else None
        if first is None:
            return "question"
        more = f" (+{len(self.items) - 1} more)" if len(self.items) > 1 else ""
        return f"question: {first.question or first.header}{more}"

    def to_json(self) -> dict[str, Any]:
        """The API's view."""
        return {"id": self.id, "asking": self.asking(), "asked_at": rfc3339(self.asked_at),
                "questions": [{"header": i.header, "question": i.question, "options": list(i.options),
                               "multiple": i.multiple} for i in self.items]}


@dataclass(slots=True)
class Session:
    """One session as the dashboard shows it."""

    id: str
    directory: str | None = None
    title: str = ""
    parent_id: str | None = None
    status: SessionStatus = SessionStatus.IDLE
    #: ``(attempt, message, next try as unix time)`` while retrying.
    retry: tuple[int, str, float | None] | None = None
    #: ``(name, message)`` of the last turn's error while the status is ``error``.
    error: tuple[str, str] | None = None
    #: ``(done, total)`` of the session's todo list.
    todo: tuple[int, int] | None = None
    permissions: dict[str, Permission] = field(default_factory=dict)
    questions: dict[str, Question] = field(default_factory=dict)
    last_activity: float = 0.0
    created: float | None = None

    @property
    def needs_you(self) -> int:
        """Requests waiting for a person."""
        return len(self.permissions) + len(self.questions)

    def update_info(self, info: dict[str, Any]) -> bool:
        """Take title, directory, parent and times from a Session object; True when something visible changed."""
        before = (self.title, self.directory, self.parent_id)
        if isinstance(info.get("title"), str):
            self.title = _text(info["title"], _MAX_TITLE)
        self.directory = _directory(info.get("directory")) or self.directory
        self.parent_id = _ident(info.get("parentID")) or self.parent_id
        times = _dict(info.get("time"))
        self.created = _epoch(times.get("created")) or self.created
        updated = _epoch(times.get("updated"))
        if updated is not None and updated > self.last_activity:
            self.last_activity = updated
        return before != (self.title, self.directory, self.parent_id)

    def set_status(self, status: dict[str, Any]) -> bool:
        """Apply a ``session.status`` object; True when the status (or retry details) changed."""
        kind = status.get("type")
        before = (self.status, self.retry)
        if kind == "busy":
            self.status, self.retry, self.error = SessionStatus.WORKING, None, None
        elif kind == "retry":
            attempt = status.get("attempt")
            self.status, self.error = SessionStatus.RETRYING, None
            self.retry = (attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 0,
                          _text(status.get("message")), _epoch(status.get("next")))
        elif kind == "idle":
            self.went_idle()
        return before != (self.status, self.retry)

    def went_idle(self) -> None:
        """The turn ended: requests still listed are stale; an error stays shown."""
        if self.status is not SessionStatus.ERROR:
            self.status = SessionStatus.IDLE
        self.retry = None
        self.permissions.clear()
        self.questions.clear()

    def failed(self, error: dict[str, Any]) -> None:
        """The turn ended with ``error`` (an OpenCode error object)."""
        name = _text(error.get("name"), _MAX_LABEL) or "Error"
        if name == _ABORTED:
            self.went_idle()
            return
        message = _text(_dict(error.get("data")).get("message") or error.get("message"))
        self.status, self.error, self.retry = SessionStatus.ERROR, (name, message), None
        self.permissions.clear()
        self.questions.clear()

    def set_todo(self, todos: Any) -> bool:
        """Count a todo list (cancelled items do not count); True when the counts changed."""
        before = self.todo
        items = [_dict(t) for t in todos] if isinstance(todos, list) else []
        live = [t for t in items if t.get("status") != "cancelled"]
        self.todo = (sum(1 for t in live if t.get("status") == "completed"), len(live)) if live else None
        return before != self.todo

    def add_request(self, request: Permission | Question) -> bool:
        """Record a pending request (bounded); True when it is new."""
        pending: dict[str, Any] = self.permissions if isinstance(request, Permission) else self.questions
        if request.id in pending or self.needs_you >= MAX_PENDING:
            return False
        pending[request.id] = request
        return True

    def urgency(self) -> int:
        """Sort key: needing a person first, then failed, working, idle."""
        if self.needs_you:
            return 0
        return {SessionStatus.ERROR: 1, SessionStatus.WORKING: 2, SessionStatus.RETRYING: 2}.get(self.status, 3)

    def to_json(self) -> dict[str, Any]:
        """The API's view of the session."""
        retry = None
        if self.retry is not None:
            attempt, message, next_try = self.retry
            retry = {"attempt": attempt, "message": message, "next": rfc3339(next_try) if next_try else None}
        return {
            "id": self.id,
            "title": self.title,
            "directory": self.directory,
            "parent_id": self.parent_id,
            "status": self.status.value,
            "needs_you": self.needs_you,
            "permissions": [p.to_json() for p in self.permissions.values()],
            "questions": [q.to_json() for q in self.questions.values()],
            "retry": retry,
            "last_error": {"name": self.error[0], "message": self.error[1]} if self.error else None,
            "todo": {"done": self.todo[0], "total": self.todo[1]} if self.todo else None,
            "last_activity": rfc3339(self.last_activity) if self.last_activity else None,
            "created": rfc3339(self.created) if self.created else None,
            "web_path": web_path(self.directory, self.id) if self.directory else None,
        }


@dataclass
class Snapshot:
    """What the snapshot endpoints answered, merged over the directories asked about."""

    #: ``GET /session/status``: session id → status object (busy and retrying ones only).
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``GET /permission`` and ``GET /question`` entries.
    permissions: list[dict[str, Any]] = field(default_factory=list)
    questions: list[dict[str, Any]] = field(default_factory=list)
    #: Session objects (``GET /session``, newest first, and ``GET /session/{id}``).
    sessions: list[dict[str, Any]] = field(default_factory=list)
    #: The second look (:meth:`AgentState.enrich`): session id → the ``info`` of its last message
    #: (``GET /session/{id}/message?limit=1``).
    last_messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Session id → its todo list (``GET /session/{id}/todo``).
    todos: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    """One backend at a glance."""

    state: BackendState
    working: int = 0
    needs_you: int = 0
    errors: int = 0
    sessions: int = 0
    reason: str | None = None

    def label(self) -> str:
        """``needs you (1) · working (2)``, ``idle``, ``unknown``…"""
        if self.state is BackendState.UNKNOWN:
            return "unknown"
        parts = []
        if self.needs_you:
            parts.append(f"needs you ({self.needs_you})")
        if self.errors:
            parts.append("error" if self.errors == 1 else f"error ({self.errors})")
        if self.working:
            parts.append(f"working ({self.working})")
        return " · ".join(parts) or "idle"

    def to_json(self) -> dict[str, Any]:
        """The summary on ``/api/backends`` entries and ``/api/agents``."""
        return {"state": self.state.value, "label": self.label(), "working": self.working,
                "needs_you": self.needs_you, "errors": self.errors, "sessions": self.sessions,
                "reason": self.reason}


class AgentState:
    """The sessions of one backend, and whether the router currently knows them (its stream is live)."""

    def __init__(self, project_path: str | None, max_sessions: int = MAX_SESSIONS) -> None:
        self.project_path = _directory(project_path)
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}
        #: Other directories this server ran sessions in (bounded, most recent last).
        self.directories: list[str] = []
        self.known = False
        self.reason: str | None = "not connected yet"
        self._handlers: dict[str, Callable[[dict[str, Any], str | None, float], Change]] = {
            "session.created": self._on_info,
            "session.updated": self._on_info,
            "session.deleted": self._on_deleted,
            "session.status": self._on_status,
            "session.idle": self._on_idle,
            "session.error": self._on_error,
            "permission.asked": self._on_asked,
            "question.asked": self._on_asked,
            "permission.replied": self._on_answered,
            "question.replied": self._on_answered,
            "question.rejected": self._on_answered,
            "todo.updated": self._on_todo,
            "message.updated": self._on_activity,
            "message.part.updated": self._on_activity,
            "message.part.delta": self._on_activity,
            "session.diff": self._on_activity,
        }

    # -- known or not ---------------------------------------------------------
    def mark_unknown(self, reason: str) -> bool:
        """The stream is down (or the backend cannot be read); True when that is news."""
        changed = self.known or self.reason != reason
        self.known, self.reason = False, reason
        return changed

    # -- events -----------------------------------------------------------------
    def apply(self, payload: dict[str, Any], directory: str | None, now: float) -> Change:
        """Apply one event payload (``{"type", "properties"}``) from ``directory``; says what changed."""
        kind = payload.get("type")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        props = payload.get("properties")
        if handler is None or not isinstance(props, dict):
            return Change.NONE
        return handler(props, _directory(directory), now)

    def _session(self, session_id: Any, directory: str | None, now: float, create: bool = True) -> Session | None:
        ident = _ident(session_id)
        if ident is None:
            return None
        session = self.sessions.get(ident)
        if session is None and create:
            session = self.sessions[ident] = Session(ident, directory=directory, last_activity=now)
            self._note_directory(directory)
            self._trim()
            session = self.sessions.get(ident)
        if session is not None and session.directory is None:
            session.directory = directory
        return session

    def _shared(self, session: Session) -> None:
        """Sessions of the project's directory share its string (a thousand sessions, one copy)."""
        if session.directory is not None and session.directory == self.project_path:
            session.directory = self.project_path

    def _note_directory(self, directory: str | None) -> None:
        if directory is None or directory == self.project_path:
            return
        if directory in self.directories:
            self.directories.remove(directory)
        self.directories.append(directory)
        del self.directories[:-MAX_DIRECTORIES]

    def _on_info(self, props: dict[str, Any], directory: str | None, now: float) -> Change:
        info = _dict(props.get("info"))
        is_new = _ident(info.get("id") or props.get("sessionID")) not in self.sessions
        session = self._session(info.get("id") or props.get("sessionID"), directory, now)
        if session is None:
            return Change.NONE
        changed = session.update_info(info)
        self._shared(session)
        session.last_activity = max(session.last_activity, now)
        return Change.STATE if changed or is_new else Change.ACTIVITY

    def _on_deleted(self, props: dict[str, Any], directory: str | None, now: float) -> Change:
        ident = _ident(_dict(props.get("info")).get("id") or props.get("sessionID"))
        return Change.STATE if ident is not None and self.sessions.pop(ident, None) is not None else Change.NONE

    def _on_status(self, props: dict[str, Any], directory: str | None, now: float) -> Change:
        status = _dict(props.get("status"))
        busy = status.get("type") in ("busy", "retry")
        # An idle status for a session we never saw is no news; a busy one is.
        session = self._session(props.get("sessionID"), directory, now, create=busy)
        if session is None:
            return Change.NONE
        session.last_activity = max(session.last_activity, now)
        return Change.STATE if session.set_status(status) else Change.ACTIVITY

    def _on_idle(self, props: dict[str, Any], directory: str | None, now: float) -> Change:
        return self._on_status({"sessionID": props.get("sessionID"), "status": {"type": "idle"}}, directory, now)

    def _on_error(self, props: dict[str, Any], directory: str | None, now: float) -> Change:
        session = self._session(props.get("sessionID"), directory, now)
        if session is None:
            return Change.NONE
        session.failed(_dict(props.get("error")))
        session.last_activity = max(session.last_activity, now)
        return Change.STATE

    def _on_asked(self, props: dict[str, Any], directory: str | None, now: float) -> Change:
        request = Question.parse(props, now) if "questions" in props else Permission.parse(props, now)
        session = self._session(props.get("sessionID"), directory, now)
        if request is None or session is None:
            return Change.NONE
        if session.status not in (SessionStatus.WORKING, SessionStatus.RETRYING):
            session.status = SessionStatus.WORKING  # a tool is waiting: the turn is running
        session.last_activity = max(session.last_activity, now)
        return Change.STATE if session.add_request(request) else Change.NONE

    def _on_answered(self, props: dict[str, Any], directory: str | None, now: float) -> Change:
        request_id = props.get("requestID")
        if not isinstance(request_id, str):
            return Change.NONE
        for session in self.sessions.values():
            if session.permissions.pop(request_id, None) or session.questions.pop(request_id, None):
                session.last_activity = max(session.last_activity, now)
                return Change.STATE
        return Change.NONE

    def _on_todo(self, props: dict[str, Any], directory: str | None, now: float) -> Change:
        session = self._session(props.get("sessionID"), directory, now)
        if session is None:
            return Change.NONE
        return Change.STATE if session.set_todo(props.get("todos")) else Change.ACTIVITY

    def touch(self, session_id: str, now: float) -> bool:
        """A sign of life from ``session_id`` (a text delta); True when it is a session we follow."""
        session = self.sessions.get(session_id)
        if session is None:
            return False
        session.last_activity = now
        return True

    def _on_activity(self, props: dict[str, Any], directory: str | None, now: float) -> Change:
        ident = props.get("sessionID") or _dict(props.get("part")).get("sessionID") \
            or _dict(props.get("info")).get("sessionID")
        session = self.sessions.get(ident) if isinstance(ident, str) else None
        if session is None:
            return Change.NONE
        session.last_activity = now
        return Change.ACTIVITY

    # -- snapshots --------------------------------------------------------------------
    def load(self, snapshot: Snapshot, now: float) -> None:
        """Replace every session with what the snapshot says (the router is then up to date)."""
        previous, self.sessions = self.sessions, {}
        for session_id, status in snapshot.statuses.items():
            ident = _ident(session_id)
            if ident is not None:
                self.sessions.setdefault(ident, Session(ident, last_activity=now)).set_status(_dict(status))
        for info in map(_dict, snapshot.sessions):
            ident = _ident(info.get("id"))
            if ident is None:
                continue
            session = self.sessions.setdefault(ident, Session(ident))
            session.update_info(info)
            self._shared(session)
            self._note_directory(session.directory)
            old = previous.get(ident)
            if old is not None:
                session.last_activity = max(session.last_activity, old.last_activity)
        for ident, session in self.sessions.items():
            old = previous.get(ident)
            # An error seen before stays until the second look reads the session's last message.
            if old is not None and old.status is SessionStatus.ERROR and session.status is SessionStatus.IDLE:
                session.status, session.error = SessionStatus.ERROR, old.error
        for entries, parse in ((snapshot.permissions, Permission.parse), (snapshot.questions, Question.parse)):
            for entry in map(_dict, entries):
                owner = self.sessions.get(str(entry.get("sessionID")))
                # A request whose session is not running is stale (kept after an abort or a deletion).
                if owner is None or owner.status not in (SessionStatus.WORKING, SessionStatus.RETRYING):
                    continue
                request = parse(entry, now)
                if request is None:
                    continue
                earlier = _pending(previous.get(owner.id), request.id)
                if earlier is not None:
                    request.asked_at = earlier.asked_at
                owner.add_request(request)
        self._trim()
        self.known, self.reason = True, None

    def enrich(self, details: Snapshot) -> bool:
        """Add what the second look found: titles of sessions the lists named, errors, todo lists; True if any."""
        changed = False
        for info in map(_dict, details.sessions):
            session = self.sessions.get(str(info.get("id")))
            if session is not None:
                changed = session.update_info(info) or changed
                self._note_directory(session.directory)
        for session_id, info in details.last_messages.items():
            ended = self.sessions.get(session_id)
            if ended is None or ended.status not in (SessionStatus.IDLE, SessionStatus.ERROR):
                continue  # it started a turn since: it has moved on
            error = _dict(_dict(info).get("error")) if _dict(info).get("role") == "assistant" else {}
            before = (ended.status, ended.error)
            if error:
                ended.failed(error)
            else:
                ended.status, ended.error = SessionStatus.IDLE, None
            changed = changed or before != (ended.status, ended.error)
        for session_id, todos in details.todos.items():
            listed = self.sessions.get(session_id)
            if listed is not None:
                changed = listed.set_todo(todos) or changed
        return changed

    def wanted_last_messages(self, snapshot: Snapshot, limit: int, now: float | None = None) -> list[str]:
        """Idle sessions whose last message should be read for an error: the ones failed before, then the
        newest (with ``now``: only those active within the last day)."""
        busy = set(snapshot.statuses)
        failed = [s.id for s in self.sessions.values() if s.status is SessionStatus.ERROR and s.id not in busy]
        recent = [_ident(_dict(info).get("id")) for info in snapshot.sessions
                  if now is None or (_epoch(_dict(_dict(info).get("time")).get("updated")) or now) >= now - RECENT]
        wanted: list[str] = []
        for ident in failed + [r for r in recent if r]:
            if ident not in wanted and ident not in busy:
                wanted.append(ident)
        return wanted[:limit]

    # -- bounds -------------------------------------------------------------------------
    def _trim(self) -> None:
        excess = len(self.sessions) - self.max_sessions
        if excess <= 0:
            return
        # Drop the least interesting: idle before busy, then the longest quiet.
        ranked = sorted(self.sessions.values(), key=lambda s: (-s.urgency(), s.last_activity))
        for session in ranked[:excess]:
            del self.sessions[session.id]

    # -- views ------------------------------------------------------------------------
    def ordered(self) -> list[Session]:
        """Sessions, most urgent first, then by last activity."""
        return sorted(self.sessions.values(), key=lambda s: (s.urgency(), -s.last_activity, s.id))

    def summary(self) -> Summary:
        """The backend's summary."""
        if not self.known:
            return Summary(BackendState.UNKNOWN, sessions=len(self.sessions), reason=self.reason)
        sessions = self.sessions.values()
        # A session waiting for a person counts as needing you, not as working.
        working = sum(1 for s in sessions
                      if s.status in (SessionStatus.WORKING, SessionStatus.RETRYING) and not s.needs_you)
        needs_you = sum(s.needs_you for s in sessions)
        errors = sum(1 for s in sessions if s.status is SessionStatus.ERROR)
        state = (BackendState.NEEDS_YOU if needs_you else BackendState.ERROR if errors
                 else BackendState.WORKING if working else BackendState.IDLE)
        return Summary(state, working=working, needs_you=needs_you, errors=errors, sessions=len(self.sessions))

    def counts(self, into: dict[str, int]) -> None:
        """Add this backend's sessions by status, and its pending requests, to ``into``."""
        for session in self.sessions.values():
            key = f"sessions:{session.status.value}"
            into[key] = into.get(key, 0) + 1
            into["pending:permission"] = into.get("pending:permission", 0) + len(session.permissions)
            into["pending:question"] = into.get("pending:question", 0) + len(session.questions)


def _pending(session: Session | None, request_id: str) -> Permission | Question | None:
    if session is None:
        return None
    return session.permissions.get(request_id) or session.questions.get(request_id)


def sessions_json(sessions: Iterable[Session]) -> list[dict[str, Any]]:
    """The API's list of sessions."""
    return [session.to_json() for session in sessions]
