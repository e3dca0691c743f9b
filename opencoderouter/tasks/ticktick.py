"""The TickTick source: active tasks tagged ``autocode`` via the Open API (``/open/v1``, OAuth2 bearer token).

What the official Open API documentation says (checked against its text): the base URL
``https://api.ticktick.com/open/v1``; ``Authorization: Bearer <token>``; ``GET /project`` (the
user's projects), ``GET /project/{id}/data`` (the project and its *undone* tasks),
``GET /project/{pid}/task/{tid}``, ``POST /task/{tid}`` (update; ``id`` and ``projectId``
required) and ``POST /project/{pid}/task/{tid}/complete``; task ``status`` 0 (normal) or 2 (done).

What only client code and notes say (not in the documentation; treated carefully here): the limits
of 100 requests a minute and 300 per 5 minutes (kept as a client-side budget); the limit being
signalled by HTTP 500 with ``errorCode: "exceed_query_limit"`` (or 429), so both pause for 5
minutes unless ``Retry-After`` says otherwise; the Inbox missing from ``GET /project`` but readable
as project ``inbox``; ``tags`` on tasks (in the doc's examples, not its field table); partial
updates being accepted but not saved (so an update posts the whole task, read just before); an
empty answer to an update meaning nothing changed.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from ..backoff import doubling_backoff
from ..inflight import InFlight
from .budget import RateBudget
from .journal import DONE, TaskRecord
from .outcome import marker, outcome_block
from .service import MAX_TASK_BYTES, Incoming, SourceError, too_big

log = Logger()

DEFAULT_API = "https://api.ticktick.com/open/v1"
INBOX = "inbox"
#: How long to pause after a rate-limit signal without a Retry-After: TickTick's window, 5 minutes.
LIMIT_PAUSE = 300.0
#: Longest answer written into a TickTick task (the rest stays in the journal and /api/tasks).
MAX_WRITTEN_TEXT = 16000
#: A Retry-After longer than this is taken as this.
_MAX_RETRY_AFTER = 3600.0


class TickTickError(SourceError):
    """A TickTick request that did not work: the HTTP status (None: not sent or no answer) and a sentence."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after)
        self.status = status


class TickTickClient:
    """The Open API calls the source needs, within a request budget, pausing after errors.

    It never waits for its budget or a pause: a request that may not go now fails at once
    (``TickTickError``) and the caller tries again on its next round, so stopping never waits.
    """

    def __init__(self, http: HTTPClient, clock: IReactorTime, token: str, api: str = DEFAULT_API,
                 budget: RateBudget | None = None, timeout: float = 30.0, backoff_start: float = 5.0,
                 pool: HTTPConnectionPool | None = None) -> None:
        self.http = http
        self.clock = clock
        self._token = token
        self.api = api.rstrip("/")
        self.budget = budget or RateBudget(clock)
        self.timeout = timeout
        self._backoff = doubling_backoff(backoff_start, LIMIT_PAUSE)
        self._failures = 0
        #: No request before this time (after a rate-limit signal or errors).
        self.paused_until = 0.0
        self._inflight = InFlight(clock)
        self._closed = False
        #: Closed by ``close`` (the client's own kept-alive connections).
        self._pool = pool

    def get(self, path: str, spare: int = 0) -> Deferred[Any]:
        """``GET {api}{path}`` → decoded JSON; with ``spare``, only if that many requests stay in the budget."""
        return self._call("GET", path, spare=spare)

    def post(self, path: str, body: Any = None) -> Deferred[Any]:
        """``POST {api}{path}`` with a JSON body (or none) → decoded JSON, or None for an empty answer."""
        return self._call("POST", path, body)

    def close(self) -> Deferred[None] | None:
        """Cancel the requests in flight; fires once kept-alive connections are closed."""
        self._closed = True
        self._inflight.cancel_all()
        return self._pool.closeCachedConnections() if self._pool is not None else None

    def check_room(self, requests: int = 1) -> None:
        """Raise TickTickError (with ``retry_after``) unless ``requests`` requests may go now, one after another."""
        if self._closed:
            raise TickTickError("the TickTick client is closed (stopping)")
        now = self.clock.seconds()
        if now < self.paused_until:
            pause = self.paused_until - now
            raise TickTickError(f"TickTick is paused for {pause:.0f}s more (after the last error)", retry_after=pause)
        wait = self.budget.wait_time(requests - 1)
        if wait > 0:
            raise TickTickError(f"the TickTick request budget is used up for {wait:.1f}s more", retry_after=wait)

    @inlineCallbacks
    def _call(self, method: str, path: str, body: Any = None, spare: int = 0) -> Any:
        self.check_room(1 + spare)
        self.budget.take()
        headers = Headers({b"authorization": [b"Bearer " + self._token.encode("latin-1")],
                           b"accept": [b"application/json"]})
        kwargs: dict[str, Any] = {"headers": headers, "timeout": self.timeout}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode("utf-8")
            headers.addRawHeader(b"content-type", b"application/json")
        where = f"{method} {path}"
        try:
            response = yield self._inflight.track(self.http.request(method, self.api + path, **kwargs))
            raw = yield self._inflight.track(treq.content(response))
        except Exception as error:
            if self._closed:
                raise TickTickError(f"{where}: cancelled (stopping)") from None
            self._pause_after_error()
            why = f"no answer in {self.timeout:g}s" if isinstance(error, defer.CancelledError) else _why(error)
            raise TickTickError(f"{where}: cannot reach TickTick at {self.api}: {why}") from None
        code = response.code
        decoded = _decode(raw)
        if code == 429 or (code >= 500 and _error_code(decoded) == "exceed_query_limit"):
            pause = _retry_after(response.headers, self.clock.seconds())
            self.paused_until = self.clock.seconds() + (LIMIT_PAUSE if pause is None else pause)
            raise TickTickError(f"{where}: TickTick's rate limit ({code}); pausing for "
                                f"{self.paused_until - self.clock.seconds():.0f}s", code)
        if code >= 500:
            self._pause_after_error()
            raise TickTickError(f"{where}: TickTick answered {code}; trying again later", code)
        if code == 401:
            raise TickTickError(f"{where}: TickTick refused the token (401); authorise again and put the new access "
                                "token in --ticktick-token-file", code)
        if code >= 400:
            raise TickTickError(f"{where}: TickTick answered {code} {_error_message(decoded)}".rstrip(), code)
        self._failures = 0
        return decoded

    def _pause_after_error(self) -> None:
        self.paused_until = self.clock.seconds() + self._backoff(self._failures)
        self._failures += 1



def _why(error: Exception) -> str:
    # Never the request itself: its headers carry the token.
    return error.__class__.__name__ + (f" ({error})" if isinstance(error, OSError) else "")


def _decode(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw[:200].decode("utf-8", "replace")


def _error_code(body: Any) -> Any:
    return body.get("errorCode") if isinstance(body, dict) else None


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("errorMessage") or body.get("errorCode") or "")
    return "" if body is None else str(body)[:200]


def _retry_after(headers: Headers, now: float) -> float | None:
    """Seconds from a ``Retry-After`` header (a number or an HTTP date), capped at an hour; None without one."""
    values = headers.getRawHeaders(b"retry-after") or []
    if not values:
        return None
    text = values[0].decode("latin-1").strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(text).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


class TickTickSource:
    """Active TickTick tasks with the tag, from one project (``--ticktick-project``) or all of them and the Inbox.

    Success: the outcome is added to the task's content and the task is completed. Failure: the
    outcome is added and the task gets the tag ``autocode-failed``, so it is not picked again.
    """

    name = "ticktick"
    #: Requests a poll leaves in the budget, so that polling never starves the write-backs (read, update, complete).
    reserve = 3

    def __init__(self, client: TickTickClient, project: str | None = None, tag: str = "autocode",
                 interval: float = 300.0, failed_tag: str | None = None, project_list_ttl: float = 3600.0) -> None:
        self.client = client
        #: One write-back at a time: several at once would each read, then none find room to write.
        self._writing = DeferredLock()
        self.project = project
        self.tag = tag
        self.failed_tag = failed_tag or f"{tag}-failed"
        self.interval = interval
        self.project_list_ttl = project_list_ttl
        self._project_ids: list[str] | None = None
        self._listed_at = 0.0

    def close(self) -> Deferred[None] | None:
        """Cancel requests in flight."""
        return self.client.close()

    # -- polling ---------------------------------------------------------------------
    @inlineCallbacks
    def poll(self, known_refs: set[str]) -> Any:
        """One ``GET /project/{id}/data`` per watched project; what was read before an error still counts."""
        project_ids = yield self._watched()
        found: list[Incoming] = []
        for project_id in project_ids:
            try:
                data = yield self.client.get(f"/project/{quote(project_id, safe='')}/data", spare=self.reserve)
            except TickTickError as error:
                if found:
                    log.warn("ticktick tasks: {message}; the rest next time", message=str(error))
                    break
                raise
            tasks = data.get("tasks") if isinstance(data, dict) else None
            for task in tasks if isinstance(tasks, list) else []:
                if isinstance(task, dict) and self._wanted(task):
                    found.append(self._incoming(task, project_id))
        return found

    @inlineCallbacks
    def _watched(self) -> Any:
        """The project ids to read: the one asked for (found once by name or id), else every open one and the Inbox."""
        now = self.client.clock.seconds()
        fresh = now - self._listed_at < self.project_list_ttl
        if self._project_ids is not None and (self.project is not None or fresh):
            return self._project_ids
        if self.project is not None and self.project.lower() == INBOX:
            self._project_ids = [INBOX]
            return self._project_ids
        projects = yield self.client.get("/project", spare=self.reserve)
        if not isinstance(projects, list):
            raise TickTickError(f"GET /project answered {str(projects)[:100]!r}, not a list of projects")
        listed = [p for p in projects if isinstance(p, dict) and isinstance(p.get("id"), str)]
        if self.project is not None:
            wanted = self.project.lower()
            match = [p["id"] for p in listed if p["id"] == self.project or str(p.get("name", "")).lower() == wanted]
            if not match:
                names = ", ".join(sorted(str(p.get("name")) for p in listed)) or "none"
                raise TickTickError(f"--ticktick-project: no TickTick project is named or has the id {self.project!r} "
                                    f"(projects: {names}, and inbox)")
            self._project_ids = match[:1]
        else:
            open_ids = [p["id"] for p in listed if not p.get("closed") and p.get("kind", "TASK") != "NOTE"]
            self._project_ids = [*open_ids, INBOX]
        self._listed_at = now
        return self._project_ids

    def _wanted(self, task: dict[str, Any]) -> bool:
        tags = task.get("tags")
        names = {str(t).casefold() for t in tags} if isinstance(tags, list) else set()
        return (isinstance(task.get("id"), str) and task.get("status", 0) == 0
                and self.tag.casefold() in names and self.failed_tag.casefold() not in names)

    def _incoming(self, task: dict[str, Any], listed_in: str) -> Incoming:
        project_id = task.get("projectId") if isinstance(task.get("projectId"), str) else listed_in
        ref = f"{project_id}/{task['id']}"
        title = str(task.get("title") or "") or None
        content = task.get("content")
        text = content if isinstance(content, str) else ""
        size = len(text.encode("utf-8"))
        if size > MAX_TASK_BYTES:
            return Incoming(ref=ref, key=f"ticktick:{task['id']}", title=title, problem=too_big(size))
        return Incoming(ref=ref, key=f"ticktick:{task['id']}", title=title, text=text)

    # -- writing back ------------------------------------------------------------------
    def report(self, record: TaskRecord, save: Callable[[TaskRecord], None]) -> Deferred[None]:
        """Add the outcome to the task (once), then complete it (done) or tag it failed; safe to repeat."""
        return self._writing.run(self._report, record)

    @inlineCallbacks
    def _report(self, record: TaskRecord) -> Any:
        # Read, update, complete: start only when all three fit, or the read is wasted.
        self.client.check_room(3)
        project_id, _, task_id = (record.ref or "").partition("/")
        if not project_id or not task_id:
            log.warn("task {task_id} has no TickTick reference; its outcome stays in the journal", task_id=record.id)
            return
        where = f"/project/{quote(project_id, safe='')}/task/{quote(task_id, safe='')}"
        try:
            current = yield self.client.get(where)
        except TickTickError as error:
            if error.status == 404:
                log.warn("TickTick task {ref} is gone (deleted?); the outcome of task {task_id} stays in the journal "
                         "and /api/tasks", ref=record.ref, task_id=record.id)
                return
            raise
        if not isinstance(current, dict) or not current.get("id"):
            raise TickTickError(f"GET {where} answered {str(current)[:100]!r}, not a task")
        changes: dict[str, Any] = {}
        content = current.get("content")
        content = content if isinstance(content, str) else ""
        if marker(record) not in content:
            changes["content"] = content + outcome_block(record, max_text=MAX_WRITTEN_TEXT)
        tags = [str(t) for t in current.get("tags") or [] if isinstance(t, str)]
        done = record.state == DONE
        if not done and self.failed_tag.casefold() not in {t.casefold() for t in tags}:
            changes["tags"] = [*tags, self.failed_tag]
        if changes:
            # The whole task, as read, with the changes: TickTick is said to drop partial updates.
            payload = {**current, **changes, "id": task_id, "projectId": current.get("projectId") or project_id}
            answer = yield self.client.post(f"/task/{quote(task_id, safe='')}", payload)
            if not isinstance(answer, dict) or not answer:
                raise TickTickError(f"TickTick accepted the update of task {task_id} but answered nothing, so nothing "
                                    "changed (is its projectId right?)")
        if done and current.get("status") != 2:
            yield self.client.post(where + "/complete")
