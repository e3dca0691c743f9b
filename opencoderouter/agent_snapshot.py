"""Reading one OpenCode server's state from its snapshot endpoints (after every (re)connect of its stream).

Per directory the server ran sessions in (its project first): ``GET /session/status``,
``/permission`` and ``/question`` (they answer per directory); then the project's newest sessions
(``GET /session?directory=…&roots=true&limit=N``), the sessions the first answers name but the
list lacks (``GET /session/{id}``), the todo lists of busy sessions, and the last message of a few
idle ones (an error there is the session's state). Every answer is bounded in size and time and
must have the JSON shape OpenCode sends; anything else is a :class:`SnapshotError`.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from .agent_state import AgentState, Snapshot
from .inflight import InFlight
from .loopback_http import loopback_url, read_body

#: A snapshot answer bigger than this is refused.
MAX_SNAPSHOT_BYTES = 2 * 1024 * 1024
#: Sessions per snapshot whose last message (for an error) or todo list is read, or that are looked up.
_LAST_MESSAGES = 5
_TODOS = 5
_MISSING_SESSIONS = 10


class SnapshotError(Exception):
    """A snapshot endpoint answered something OpenCode does not send."""


class BackendReader:
    """Bounded HTTP requests to one backend, all cancelled at once by :meth:`cancel_all`."""

    def __init__(self, client: HTTPClient, clock: IReactorTime, address: str, port: int,
                 authorization: bytes | None, timeout: float) -> None:
        self.client = client
        self.clock = clock
        #: The loopback address the backend listens on (``::1`` for an IPv6-only server).
        self.address = address
        self.port = port
        self.authorization = authorization
        self.timeout = timeout
        self._requests = InFlight(clock)

    def url(self, path: str, **query: str) -> str:
        """``http://ADDRESS:PORT{path}?{query}`` (``::1`` through :func:`~.loopback_http.loopback_url`'s stand-in)."""
        url = loopback_url(self.address, self.port, path)
        if query:
            url += "?" + "&".join(f"{key}={quote(value, safe='')}" for key, value in query.items())
        return url

    def headers(self, accept: bytes) -> Headers:
        """Accept, and the backend's password when it has one."""
        headers = Headers({b"accept": [accept]})
        if self.authorization is not None:
            headers.setRawHeaders(b"authorization", [self.authorization])
        return headers

    def track(self, request: Deferred[Any], timeout: float | None = None) -> Deferred[Any]:
        """Bound ``request`` in time and remember it until it ends, so that :meth:`cancel_all` can cancel it."""
        return self._requests.track(request, self.timeout if timeout is None else timeout)

    def cancel_all(self) -> None:
        """Cancel every request still running."""
        self._requests.cancel_all()

    @inlineCallbacks
    def get_json(self, path: str, kind: type, **query: str) -> Any:
        """One GET whose answer must be 200 and JSON of type ``kind``."""
        response = yield self.track(self.client.get(self.url(path, **query), headers=self.headers(b"application/json")))
        body = yield self.track(read_body(response, MAX_SNAPSHOT_BYTES))
        if response.code != 200:
            raise SnapshotError(f"GET {path} answered {response.code}")
        try:
            answer = json.loads(body)
        except ValueError:
            raise SnapshotError(f"GET {path} answered something that is not JSON") from None
        if not isinstance(answer, kind):
            raise SnapshotError(f"GET {path} answered JSON that OpenCode does not send")
        return answer

    @inlineCallbacks
    def snapshot(self, state: AgentState, max_sessions: int) -> Any:
        """The first look for ``state``'s backend: statuses, pending requests, the newest sessions."""
        snapshot = Snapshot()
        project = state.project_path
        calls: list[Deferred[Any]] = []
        for directory in ([project] if project else [None]) + list(state.directories):
            query = {"directory": directory} if directory else {}
            calls += [self.get_json("/session/status", dict, **query), self.get_json("/permission", list, **query),
                      self.get_json("/question", list, **query)]
        listed = {"roots": "true", "limit": str(max_sessions), **({"directory": project} if project else {})}
        calls.append(self.get_json("/session", list, **listed))
        answers = yield _all(calls)
        for index in range(0, len(answers) - 1, 3):
            snapshot.statuses.update(answers[index])
            snapshot.permissions.extend(answers[index + 1])
            snapshot.questions.extend(answers[index + 2])
        snapshot.sessions = [s for s in answers[-1] if isinstance(s, dict)]
        return snapshot

    @inlineCallbacks
    def details(self, state: AgentState, snapshot: Snapshot) -> Any:
        """The second look, once ``snapshot`` is loaded: sessions it named but did not list, busy sessions'
        todo lists, and the last message of sessions that failed before and of the newest idle ones."""
        listed_ids = {s.get("id") for s in snapshot.sessions}
        waiting = [e.get("sessionID") for e in snapshot.permissions + snapshot.questions if isinstance(e, dict)]
        missing = [i for i in dict.fromkeys([*snapshot.statuses, *waiting])
                   if isinstance(i, str) and i not in listed_ids][:_MISSING_SESSIONS]
        busy = list(snapshot.statuses)[:_TODOS]
        last = state.wanted_last_messages(snapshot, _LAST_MESSAGES, self.clock.seconds())
        answers = yield _all([self.get_json(f"/session/{quote(i, safe='')}", dict) for i in missing]
                             + [self.get_json(f"/session/{quote(i, safe='')}/todo", list) for i in busy]
                             + [self.get_json(f"/session/{quote(i, safe='')}/message", list, limit="1")
                                for i in last],
                             tolerant=True)
        infos, todos, messages = answers[:len(missing)], answers[len(missing):len(missing) + len(busy)], \
            answers[len(missing) + len(busy):]
        details = Snapshot(sessions=[info for info in infos if isinstance(info, dict)])
        details.todos = {ident: todo for ident, todo in zip(busy, todos, strict=True) if todo is not None}
        for ident, answer in zip(last, messages, strict=True):
            if answer and isinstance(answer[-1], dict) and isinstance(answer[-1].get("info"), dict):
                details.last_messages[ident] = answer[-1]["info"]
        return details


def _all(calls: list[Deferred[Any]], tolerant: bool = False) -> Deferred[list[Any]]:
    """Every result, in order; the first failure fails the whole (``tolerant``: a failure gives None)."""
    if tolerant:
        return defer.gatherResults([call.addErrback(lambda _: None) for call in calls])
    gathered = defer.gatherResults(calls, consumeErrors=True)

    def first(failure: Failure) -> Failure:
        error = failure.value
        return error.subFailure if isinstance(error, defer.FirstError) else failure

    return gathered.addErrback(first)
