"""Agent state: what each session of one OpenCode server is doing, from its events and snapshots.

:class:`AgentState` holds one backend's sessions: status (``working``, ``retrying``, ``idle``,
``error``), the permission requests and questions waiting for a person, the last error, todo
progress and the time of last activity. It is fed the payloads of ``/global/event``
(:meth:`AgentState.apply`) and rebuilt from the snapshot endpoints after every (re)connect
(:meth:`AgentState.load`, then :meth:`AgentState.enrich`); it never holds message text. The
sessions themselves (:mod:`.agent_sessions`) bound every string a backend sends; at most
``max_sessions`` are kept (those needing a person or working first, then the most recent).

Facts it relies on (OpenCode 1.18.33): a session stays ``busy`` while a permission or a question
waits, so a pending request whose session is not busy is stale (the server keeps such requests
after an abort or a deletion); ``busy``, ``idle`` and ``session.idle`` repeat within a turn;
after an error the session goes ``idle`` (twice), which must not hide the error.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .agent_sessions import (
    Permission,
    Question,
    Session,
    SessionStatus,
    as_dict,
    directory_of,
    epoch_seconds,
    ident_of,
)

#: Sessions kept per backend; message text is never kept.
MAX_SESSIONS = 20
#: A session idle for longer than this (seconds) is not looked at for an error after a restart.
RECENT = 86400.0
#: Directories (other than the project's) whose snapshots are asked for after a reconnect.
MAX_DIRECTORIES = 8


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
        self.project_path = directory_of(project_path)
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
        return handler(props, directory_of(directory), now)

    def _session(self, session_id: Any, directory: str | None, now: float, create: bool = True) -> Session | None:
        ident = ident_of(session_id)
        if ident is None:
            return None
        session = self.sessions.get(ident)
        if session is None and create:
            session = self.sessions[ident] = Session(ident, directory=directory, last_activity=now)
            self._notedirectory_of(directory)
            self._trim()
            session = self.sessions.get(ident)
        if session is not None and session.directory is None:
            session.directory = directory
        return session

    def _shared(self, session: Session) -> None:
        """Sessions of the project's directory share its string (a thousand sessions, one copy)."""
        if session.directory is not None and session.directory == self.project_path:
            session.directory = self.project_path

    def _notedirectory_of(self, directory: str | None) -> None:
        if directory is None or directory == self.project_path:
            return
        if directory in self.directories:
            self.directories.remove(directory)
        self.directories.append(directory)
        del self.directories[:-MAX_DIRECTORIES]

    def _on_info(self, props: dict[str, Any], directory: str | None, now: float) -> Change:
        info = as_dict(props.get("info"))
        is_new = ident_of(info.get("id") or props.get("sessionID")) not in self.sessions
        session = self._session(info.get("id") or props.get("sessionID"), directory, now)
        if session is None:
            return Change.NONE
        changed = session.update_info(info)
        self._shared(session)
        session.last_activity = max(session.last_activity, now)
        return Change.STATE if changed or is_new else Change.ACTIVITY

    def _on_deleted(self, props: dict[str, Any], directory: str | None, now: float) -> Change:
        ident = ident_of(as_dict(props.get("info")).get("id") or props.get("sessionID"))
        return Change.STATE if ident is not None and self.sessions.pop(ident, None) is not None else Change.NONE

    def _on_status(self, props: dict[str, Any], directory: str | None, now: float) -> Change:
        status = as_dict(props.get("status"))
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
        session.failed(as_dict(props.get("error")))
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
        ident = props.get("sessionID") or as_dict(props.get("part")).get("sessionID") \
            or as_dict(props.get("info")).get("sessionID")
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
            ident = ident_of(session_id)
            if ident is not None:
                self.sessions.setdefault(ident, Session(ident, last_activity=now)).set_status(as_dict(status))
        for info in map(as_dict, snapshot.sessions):
            ident = ident_of(info.get("id"))
            if ident is None:
                continue
            session = self.sessions.setdefault(ident, Session(ident))
            session.update_info(info)
            self._shared(session)
            self._notedirectory_of(session.directory)
            old = previous.get(ident)
            if old is not None:
                session.last_activity = max(session.last_activity, old.last_activity)
        for ident, session in self.sessions.items():
            old = previous.get(ident)
            # An error seen before stays until the second look reads the session's last message.
            if old is not None and old.status is SessionStatus.ERROR and session.status is SessionStatus.IDLE:
                session.status, session.error = SessionStatus.ERROR, old.error
        for entries, parse in ((snapshot.permissions, Permission.parse), (snapshot.questions, Question.parse)):
            for entry in map(as_dict, entries):
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
        for info in map(as_dict, details.sessions):
            session = self.sessions.get(str(info.get("id")))
            if session is not None:
                changed = session.update_info(info) or changed
                self._notedirectory_of(session.directory)
        for session_id, info in details.last_messages.items():
            ended = self.sessions.get(session_id)
            if ended is None or ended.status not in (SessionStatus.IDLE, SessionStatus.ERROR):
                continue  # it started a turn since: it has moved on
            error = as_dict(as_dict(info).get("error")) if as_dict(info).get("role") == "assistant" else {}
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
        recent = [ident_of(as_dict(info).get("id")) for info in snapshot.sessions
                  if now is None or (_updated(info) or now) >= now - RECENT]
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


def _updated(info: Any) -> float | None:
    return epoch_seconds(as_dict(as_dict(info).get("time")).get("updated"))


def _pending(session: Session | None, request_id: str) -> Permission | Question | None:
    if session is None:
        return None
    return session.permissions.get(request_id) or session.questions.get(request_id)
