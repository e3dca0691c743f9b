"""One session of an OpenCode server as the router follows it: status, pending requests, error, todo.

Everything in it came from a backend, so every string is cut to a bounded length, ids must look
like ids (they go into URLs), and no message text is kept. :mod:`.agent_state` keeps these per backend.
"""

from __future__ import annotations

import base64
import enum
import re
from dataclasses import dataclass, field
from typing import Any

from .responses import rfc3339

#: Pending permission requests plus questions kept per session.
MAX_PENDING = 10
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


def web_path(directory: str, session_id: str) -> str:
    """The OpenCode web UI's path of a session: ``/<base64url(directory), no padding>/session/<id>``."""
    encoded = base64.urlsafe_b64encode(directory.encode("utf-8", "surrogateescape")).rstrip(b"=").decode("ascii")
    return f"/{encoded}/session/{session_id}"


def _text(value: Any, limit: int = _MAX_TEXT) -> str:
    """A backend's string, cut to ``limit`` characters ("" for anything that is not a string)."""
    if not isinstance(value, str):
        return ""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def ident_of(value: Any) -> str | None:
    """``value`` if it looks like an OpenCode id (it may go into a URL), else None."""
    return value if isinstance(value, str) and _ID.match(value) else None


def directory_of(value: Any) -> str | None:
    """``value`` if it is an absolute path of a sane length, else None."""
    return value if isinstance(value, str) and value.startswith("/") and len(value) <= _MAX_PATH else None


def epoch_seconds(value: Any) -> float | None:
    """OpenCode's epoch milliseconds as seconds (None for anything else)."""
    return value / 1000.0 if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a dict, else an empty one (a backend's JSON may be anything)."""
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
        request_id = ident_of(props.get("id"))
        if request_id is None:
            return None
        patterns = props.get("patterns")
        always = props.get("always")
        return cls(
            id=request_id,
            tool=_text(props.get("permission"), _MAX_LABEL) or "permission",
            patterns=tuple(_text(p) for p in (patterns if isinstance(patterns, list) else [])[:_MAX_PATTERNS]),
            command=_text(as_dict(props.get("metadata")).get("command")),
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
        request_id = ident_of(props.get("id"))
        if request_id is None:
            return None
        raw = props.get("questions")
        items = []
        for entry in (raw if isinstance(raw, list) else [])[:_MAX_QUESTIONS]:
            entry = as_dict(entry)
            options = entry.get("options")
            labels = tuple(_text(as_dict(o).get("label"), _MAX_LABEL)
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
        self.directory = directory_of(info.get("directory")) or self.directory
        self.parent_id = ident_of(info.get("parentID")) or self.parent_id
        times = as_dict(info.get("time"))
        self.created = epoch_seconds(times.get("created")) or self.created
        updated = epoch_seconds(times.get("updated"))
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
                          _text(status.get("message")), epoch_seconds(status.get("next")))
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
        message = _text(as_dict(error.get("data")).get("message") or error.get("message"))
        self.status, self.error, self.retry = SessionStatus.ERROR, (name, message), None
        self.permissions.clear()
        self.questions.clear()

    def set_todo(self, todos: Any) -> bool:
        """Count a todo list (cancelled items do not count); True when the counts changed."""
        before = self.todo
        items = [as_dict(t) for t in todos] if isinstance(todos, list) else []
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
