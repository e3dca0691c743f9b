"""The task service: tasks from sources → the project's OpenCode (found in the registry) → the outcome back.

Each source (a folder, TickTick) is polled on its own interval; what it finds is journaled before
anything else happens, then queued. A queued task starts once its project is in the registry,
at most ``per_project`` at a time per project (in arrival order) and ``max_running`` in all, and
runs with :class:`opencoderouter.dispatcher.Dispatcher`, the same code as ``opencoderouter-dispatch``,
talking to the backend directly (no HTTP call to the router itself).

Exactly once: the session id is journaled before the prompt goes out, so after a restart (or a
crash) a task that was prompted is only followed again (``Dispatcher.resume``), never prompted a
second time; a task that was not prompted yet simply starts again. Outcomes are written back to
their source until that lands (a down API only delays it).
"""

from __future__ import annotations

import os
import secrets
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..backoff import doubling_backoff
from ..dispatcher import Dispatcher, Options, Result, Target, error_text
from ..forwarding import BackendCredentials
from ..loopback_http import loopback_url
from ..periodic import PeriodicService
from ..registry import Backend, Registry
from ..responses import rfc3339
from ..task_file import PERMISSION_REPLIES, DispatchError, parse_task
from .journal import DONE, FAILED, PROMPTED, QUEUED, STARTING, Journal, TaskRecord

log = Logger()

#: A task bigger than this is refused (it is a prompt, not a data file): 1 MiB.
MAX_TASK_BYTES = 1 << 20
#: Answers longer than this are cut in listings and events (``GET /api/tasks/{id}`` has all of it).
LISTED_TEXT = 4000
#: Tasks submitted with ``POST /api/tasks``: their outcome is reported nowhere but the API.
API_SOURCE = "api"


def too_big(size: int) -> str:
    """The sentence for a task over :data:`MAX_TASK_BYTES`."""
    return (f"the task is {size / 1e6:.1f} MB; a task may be at most 1 MiB (write the prompt, "
            "and point to files in the project for the rest)")


@dataclass
class Incoming:
    """A task a source found: its text, or the sentence saying why it cannot be run."""

    #: Where the source keeps it (file name in ``running/``; ``projectId/taskId``).
    ref: str | None
    text: str | None = None
    problem: str | None = None
    #: The source's own id, never taken twice (TickTick's task id); None when ``ref`` is enough.
    key: str | None = None
    title: str | None = None


class SourceError(Exception):
    """A source could not be asked (down, refused, over its budget); a sentence. It is asked again later.

    ``retry_after``: when the source knows when asking again makes sense (its budget, a pause), in seconds.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TaskSource(Protocol):
    """Where tasks come from and where their outcome goes."""

    #: Short name, journaled with each task (``folder``, ``ticktick``).
    name: str
    #: Seconds between polls.
    interval: float

    def poll(self, known_refs: set[str]) -> Deferred[list[Incoming]] | list[Incoming]:
        """New tasks; ``known_refs`` are this source's tasks the journal holds and has not reported yet."""

    def report(self, record: TaskRecord, save: Callable[[TaskRecord], None]) -> Deferred[None] | None:
        """Write the outcome back (idempotent: it may be called again after a crash); raise to retry later."""

    def close(self) -> Deferred[None] | None:
        """Stop: cancel requests in flight (a Deferred when closing takes a moment)."""


@dataclass
class TaskSettings:
    """How the service runs tasks."""

    per_project: int = 1
    max_running: int = 4
    #: The answer to permission requests, unless the task's front matter says ``permissions:``.
    permissions: str = "reject"
    #: Abort a task's session after this long (the task's ``timeout:`` wins); None: never.
    timeout: float | None = 3600.0
    #: How long a task waits for its project to appear in the registry before it fails.
    wait: float = 1800.0
    #: Seconds between scheduling passes (waiting tasks, retries, write-backs).
    tick: float = 5.0
    reconnect_timeout: float = 60.0
    #: Starts (and resumes) of one task before it fails for good.
    max_attempts: int = 5
    #: Finished tasks kept in memory for the API and the dashboard (all stay in the journal).
    keep_finished: int = 100

    def __post_init__(self) -> None:
        if self.permissions not in PERMISSION_REPLIES:
            raise ValueError(f"permissions {self.permissions!r} is not one of {', '.join(PERMISSION_REPLIES)}")


def _rfc3339(timestamp: float | None) -> str | None:
    return None if timestamp is None else rfc3339(timestamp)


def public_state(record: TaskRecord) -> str:
    """``queued``, ``running``, ``done`` or ``failed``."""
    return "running" if record.state in (STARTING, PROMPTED) else record.state


def _is_path(project: str) -> bool:
    return "/" in project or project.startswith("~")


class TaskService(MultiService):
    """Polls the sources, journals, schedules and dispatches tasks, and writes their outcomes back.

    It owns ``journal`` from here on (closed by ``stopService``). ``stopService`` fires once
    nothing more will be written: running tasks are not aborted, only left, journaled as they
    are, to be followed again by the next start.
    """

    def __init__(
        self,
        journal: Journal,
        registry: Registry,
        clock: IReactorTime,
        http: HTTPClient,
        sources: Iterable[TaskSource] = (),
        settings: TaskSettings | None = None,
        credentials: BackendCredentials | None = None,
        publish: Callable[[str, Any], None] | None = None,
        session_link: Callable[[Backend, str], str | None] | None = None,
    ) -> None:
        super().__init__()
        self.journal = journal
        self.registry = registry
        self.clock = clock
        self.http = http
        self.sources = {source.name: source for source in sources}
        self.settings = settings or TaskSettings()
        self.credentials = credentials
        self._publish = publish
        #: ``(backend, session id) → link`` to the session in the web UI (set once the router knows its port).
        self.session_link = session_link
        #: Every open task and the last finished ones, by id (insertion order is arrival order).
        self.records: dict[str, TaskRecord] = {}
        self._running: dict[str, tuple[Dispatcher, str]] = {}
        self._runs: dict[str, Deferred[None]] = {}
        self._reports: dict[str, Deferred[None]] = {}
        self._waiting: dict[str, str] = {}
        self._waiting_since: dict[str, float] = {}
        self._not_before: dict[str, float] = {}
        self._report_failures: Counter[str] = Counter()
        self._kick_call: IDelayedCall | None = None
        self._stopping = False
        self._retry_delay = doubling_backoff(self.settings.tick, 300.0)
        for source in self.sources.values():
            poller = PeriodicService(source.interval, partial(self._poll, source), f"polling the {source.name} tasks",
                                     clock, log)
            poller.setName(f"tasks-{source.name}")
            poller.setServiceParent(self)
        PeriodicService(self.settings.tick, self._work, "scheduling tasks", clock, log).setServiceParent(self)

    # -- lifecycle ---------------------------------------------------------------
    def startService(self) -> None:
        """Load the journal (a task that was starting starts again: it was not prompted), then poll."""
        for record in self.journal.recent(self.settings.keep_finished) + self.journal.open_tasks():
            if record.state == STARTING:
                record.state = QUEUED
                self.journal.save(record)
            self.records[record.id] = record
        resumed = sum(r.state == PROMPTED for r in self.records.values())
        if resumed:
            log.info("{count} task(s) were running when the router stopped; following their sessions again",
                     count=resumed, event="tasks_resumed")
        self.registry.subscribe(self)
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Stop polling, leave running tasks (journaled), wait for writes in flight, close the journal."""
        self._stopping = True
        if self._kick_call is not None and self._kick_call.active():
            self._kick_call.cancel()
        self.registry.unsubscribe(self)
        closing = [defer.maybeDeferred(source.close) for source in self.sources.values()]
        stopped: Deferred[Any] = defer.maybeDeferred(super().stopService)

        def leave(_: Any) -> Deferred[Any]:
            for dispatcher, _slug in list(self._running.values()):
                dispatcher.detach()
            return defer.DeferredList(list(self._runs.values()) + list(self._reports.values()) + closing)

        def close(_: Any) -> None:
            self.journal.close()

        return stopped.addCallback(leave).addCallback(close)

    # -- registry observer: a project that appears may unblock tasks ---------------------
    def added(self, backend: Backend) -> None:
        """Schedule soon."""
        self._kick()

    def updated(self, backend: Backend) -> None:
        """Schedule soon (a backend back up)."""
        self._kick()

    def removed(self, backend: Backend) -> None:
        """Nothing to do: a running task notices by itself."""

    def _kick(self) -> None:
        if self._stopping or (self._kick_call is not None and self._kick_call.active()):
            return
        self._kick_call = self.clock.callLater(0, self._work)

    def _work(self) -> None:
        if self._stopping:
            return
        self._schedule()
        self._report_pending()

    # -- taking tasks in ------------------------------------------------------------
    @defer.inlineCallbacks
    def _poll(self, source: TaskSource) -> Any:
        if self._stopping:
            return
        known = {r.ref for r in self.records.values() if r.source == source.name and not r.reported and r.ref}
        try:
            found = yield defer.maybeDeferred(source.poll, known)
        except SourceError as error:
            log.warn("{source} tasks: {message}", source=source.name, message=str(error), event="task_source_error")
            return
        if self._stopping:
            return
        for incoming in found:
            self._admit(source.name, incoming)
        self._work()

    def _admit(self, source: str, incoming: Incoming) -> TaskRecord | None:
        """Journal a task a source found (failed at once if it cannot run); None when it was known."""
        if incoming.key is not None and self.journal.knows(incoming.key):
            return None
        record = TaskRecord(id=_new_id(), source=source, created=self.clock.seconds(), source_key=incoming.key,
                            ref=incoming.ref, title=incoming.title)
        problem = incoming.problem
        if problem is None:
            record.body = incoming.text or ""
            try:
                task = parse_task(record.body)
            except DispatchError as error:
                problem = error.message
            else:
                record.project, record.title = task.project, task.title or incoming.title or _first_line(task.prompt)
        if problem is not None:
            record.state, record.status, record.error, record.finished = FAILED, "bad_input", problem, record.created
        if not self.journal.insert(record):
            return None
        self.records[record.id] = record
        log.info("task {task_id} from {source}{ref}: {state}", task_id=record.id, source=source,
                 ref=f" ({record.ref})" if record.ref else "", state=record.state if problem is None else
                 f"failed: {problem}", event="task_taken")
        self._changed(record)
        return record

    def submit(self, text: str, title: str | None = None) -> TaskRecord:
        """Queue a task given directly (``POST /api/tasks``); DispatchError (a sentence) when it cannot run."""
        size = len(text.encode("utf-8"))
        if size > MAX_TASK_BYTES:
            raise DispatchError(2, too_big(size), "bad_input")
        task = parse_task(text)
        record = self._admit(API_SOURCE, Incoming(ref=None, text=text, title=title or task.title))
        assert record is not None, "API tasks have no source key"
        self._kick()
        return record

    # -- scheduling -----------------------------------------------------------------
    def _schedule(self) -> None:
        now = self.clock.seconds()
        busy = Counter(slug for _dispatcher, slug in self._running.values())
        for record in list(self.records.values()):
            if record.state not in (QUEUED, PROMPTED) or record.id in self._running:
                continue
            if self._not_before.get(record.id, 0.0) > now:
                continue
            if len(self._running) >= self.settings.max_running:
                self._set_waiting(record, f"waiting: {len(self._running)} tasks are running (the most at once)")
                continue
            backend = self._backend_for(record)
            if backend is None:
                self._wait_for_project(record, now)
                continue
            if backend.locked and self._authorization(backend) is None:
                self._fail(record, "bad_input",
                           f"project {backend.slug} ({backend.project_path}) is password-protected and the router "
                           "has no --opencode-password-file that opens it")
                continue
            if busy[backend.slug] >= self.settings.per_project:
                self._set_waiting(record, f"waiting for {busy[backend.slug]} task(s) of {backend.slug} to finish")
                continue
            busy[backend.slug] += 1
            self._start(record, backend)

    def _backend_for(self, record: TaskRecord) -> Backend | None:
        if record.state == PROMPTED and record.directory:
            # The session lives on that very project's server.
            backend = self.registry.by_path(record.directory)
        elif record.project:
            project = record.project
            backend = self.registry.resolve_path(project) if _is_path(project) else self.registry.resolve_name(project)
        else:
            return None
        return backend if backend is not None and backend.up else None

    def _wait_for_project(self, record: TaskRecord, now: float) -> None:
        since = self._waiting_since.setdefault(record.id, now)
        project = record.project or "?"
        if record.state == QUEUED and _is_path(project):
            expanded = os.path.expanduser(project)
            if os.path.isabs(expanded) and not os.path.isdir(expanded):
                self._fail(record, "bad_input", f"project directory {project} does not exist")
                return
        if now - since >= self.settings.wait:
            if record.state == PROMPTED:
                self._fail(record, "unreachable", f"the server of {record.directory} did not come back within "
                                                  f"{self.settings.wait:g}s; session {record.session_id} may still be "
                                                  "running there")
            else:
                known = ", ".join(sorted(b.project_name for b in self.registry.backends())) or "none"
                self._fail(record, "not_found", f"no project {project!r} appeared within {self.settings.wait:g}s "
                                                f"(running: {known})")
            return
        if record.state == PROMPTED:
            self._set_waiting(record, f"waiting for the server of {record.directory} to come back")
        else:
            self._set_waiting(record, f"project {project!r} is not running yet")

    def _set_waiting(self, record: TaskRecord, message: str) -> None:
        if self._waiting.get(record.id) != message:
            self._waiting[record.id] = message
            self._changed(record)

    def _authorization(self, backend: Backend) -> str | None:
        """Our password for one of our own locked backends it opens (in process: nothing is forwarded)."""
        header = self.credentials.header_for(backend) if self.credentials is not None else None
        return header.decode("latin-1") if header is not None else None

    def _start(self, record: TaskRecord, backend: Backend) -> None:
        try:
            task = parse_task(record.body or "")
        except DispatchError as error:
            self._fail(record, "bad_input", error.message)
            return
        if task.title is None and record.title != _first_line(task.prompt):
            task.title = record.title  # the source's own title (TickTick's, the API's); else dispatch's default
        resuming = record.state == PROMPTED and record.session_id is not None
        now = self.clock.seconds()
        timeout = task.timeout if task.timeout is not None else self.settings.timeout
        if timeout is not None and resuming and record.started is not None:
            timeout = max(1.0, timeout - (now - record.started))  # the task's time, not each run's
        task.timeout = timeout
        target = Target(base_url=loopback_url(backend.address, backend.port, "/"), directory=backend.project_path,
                        slug=backend.slug, authorization=self._authorization(backend))
        options = Options(quiet=True, permissions=self.settings.permissions,
                          reconnect_timeout=self.settings.reconnect_timeout, say=partial(self._say, record))
        dispatcher = Dispatcher(self.clock, task, options, client=self.http, resolve=lambda _task: target,
                                before_prompt=partial(self._prompting, record, backend))
        self._waiting.pop(record.id, None)
        self._waiting_since.pop(record.id, None)
        record.attempts += 1
        if not resuming:
            record.state = STARTING
            record.started = record.started or now
            record.slug, record.directory = backend.slug, backend.project_path
        self.journal.save(record)
        self._running[record.id] = (dispatcher, backend.slug)
        self._changed(record)
        session_id = record.session_id
        run: Deferred[Any] = dispatcher.resume(session_id) if resuming and session_id else dispatcher.run()
        self._runs[record.id] = run  # before the callbacks: they may run at once
        run.addCallback(self._ended, record)
        run.addErrback(lambda failure: log.failure("task {task_id} could not be recorded", failure,
                                                   task_id=record.id))

    def _prompting(self, record: TaskRecord, backend: Backend, dispatcher: Dispatcher) -> None:
        """Journal the session before the prompt goes out: after a crash it is followed, never sent again."""
        previous = (record.state, record.session_id, record.link)
        record.state, record.session_id = PROMPTED, dispatcher.session_id
        if self.session_link is not None and dispatcher.session_id:
            record.link = self.session_link(backend, dispatcher.session_id)
        try:
            self.journal.save(record)
        except Exception:
            record.state, record.session_id, record.link = previous
            raise
        self._changed(record)

    def _say(self, record: TaskRecord, message: str) -> None:
        log.info("task {task_id}: {message}", task_id=record.id, message=message, event="task_activity")

    def _ended(self, result: Result, record: TaskRecord) -> None:
        self._running.pop(record.id, None)
        self._runs.pop(record.id, None)
        if self._stopping or result.status == "detached":
            return  # journaled as it is; the next start follows it again
        if result.status == "done":
            self._finish(record, DONE, result)
        elif result.status in ("error", "timeout", "bad_input", "interrupted"):
            self._finish(record, FAILED, result)
        else:
            # Unreachable (or gone from the registry meanwhile): try again later, never prompting twice.
            message = _result_error(result) or result.status
            if record.attempts >= self.settings.max_attempts:
                self._finish(record, FAILED, result)
            else:
                if record.state == STARTING:
                    record.state = QUEUED  # it was not prompted: it may simply start again
                self.journal.save(record)
                self._not_before[record.id] = self.clock.seconds() + self._retry_delay(record.attempts - 1)
                self._set_waiting(record, f"will try again: {message}")
        self._kick()

    def _finish(self, record: TaskRecord, state: str, result: Result) -> None:
        record.state, record.status = state, result.status
        record.session_id = result.session_id or record.session_id
        record.error = _result_error(result) if state == FAILED else None
        record.text = result.text or None
        record.finished = self.clock.seconds()
        self._closed(record)

    def _fail(self, record: TaskRecord, status: str, message: str) -> None:
        record.state, record.status, record.error = FAILED, status, message
        record.finished = self.clock.seconds()
        self._closed(record)

    def _closed(self, record: TaskRecord) -> None:
        self._waiting.pop(record.id, None)
        self._waiting_since.pop(record.id, None)
        self._not_before.pop(record.id, None)
        self.journal.save(record)
        log.info("task {task_id} {state} ({status}){detail}", task_id=record.id, state=record.state,
                 status=record.status, detail=f": {record.error}" if record.error else "", event="task_finished")
        self._changed(record)
        self._kick()

    # -- writing outcomes back ----------------------------------------------------------
    def _report_pending(self) -> None:
        now = self.clock.seconds()
        for record in list(self.records.values()):
            if not record.finished_state or record.reported or record.id in self._reports:
                continue
            if self._not_before.get(record.id, 0.0) > now:
                continue
            source = self.sources.get(record.source)
            if source is None:
                if record.source == API_SOURCE:
                    self._reported(None, record)
                continue  # its source is not configured now: its outcome waits in the journal
            report: Deferred[Any] = defer.maybeDeferred(source.report, record, self.journal.save)
            self._reports[record.id] = report  # before the callbacks: they may run at once
            report.addCallbacks(self._reported, self._report_failed, callbackArgs=(record,), errbackArgs=(record,))
            report.addBoth(self._report_ended, record.id)

    def _report_ended(self, _: Any, task_id: str) -> None:
        self._reports.pop(task_id, None)

    def _reported(self, _: Any, record: TaskRecord) -> None:
        # Recorded even while stopping: the write landed.
        record.reported, record.report_error = True, None
        self._report_failures.pop(record.id, None)
        self._not_before.pop(record.id, None)
        self.journal.save(record)
        self._changed(record)
        self._forget_old()

    def _report_failed(self, failure: Failure, record: TaskRecord) -> None:
        if self._stopping:
            return
        value = failure.value
        message = str(value) if isinstance(value, (SourceError, OSError)) else failure.getErrorMessage()
        if not isinstance(value, (SourceError, OSError)):
            log.failure("writing back task {task_id} failed", failure, task_id=record.id)
        else:
            log.warn("writing back task {task_id} failed, will try again: {message}", task_id=record.id,
                     message=message, event="task_report_failed")
        if isinstance(value, SourceError) and value.retry_after is not None:
            # Not a failure of the write itself (a budget, a pause): no reason to back off further.
            delay = value.retry_after
        else:
            delay = self._retry_delay(self._report_failures[record.id])
            self._report_failures[record.id] += 1
        self._not_before[record.id] = self.clock.seconds() + delay
        if record.report_error != message:
            record.report_error = message
            self.journal.save(record)
            self._changed(record)

    def _forget_old(self) -> None:
        finished = [r for r in self.records.values() if r.reported and r.finished_state]
        for record in finished[: max(0, len(finished) - self.settings.keep_finished)]:
            del self.records[record.id]

    # -- what the API and the dashboard see ------------------------------------------------
    def task_json(self, record: TaskRecord, whole: bool = False) -> dict[str, Any]:
        """A task for ``/api/tasks`` and the dashboard (the answer cut unless ``whole``)."""
        text, cut = record.text, False
        if text is not None and not whole and len(text) > LISTED_TEXT:
            text, cut = text[:LISTED_TEXT], True
        duration = None
        if record.started is not None:
            end = record.finished if record.finished is not None else self.clock.seconds()
            duration = round(max(0.0, end - record.started), 3)
        return {
            "id": record.id,
            "source": record.source,
            "ref": record.ref,
            "title": record.title,
            "project": record.project,
            "state": public_state(record),
            "status": record.status,
            "waiting": self._waiting.get(record.id) if not record.finished_state else None,
            "slug": record.slug,
            "directory": record.directory,
            "session_id": record.session_id,
            "link": record.link,
            "error": record.error,
            "text": text,
            "text_cut": cut,
            "created": _rfc3339(record.created),
            "started": _rfc3339(record.started),
            "finished": _rfc3339(record.finished),
            "duration_s": duration,
            "attempts": record.attempts,
            "reported": record.reported,
            "report_error": record.report_error,
        }

    def tasks_json(self) -> list[dict[str, Any]]:
        """Every open task and the last finished ones, in arrival order."""
        return [self.task_json(r) for r in sorted(self.records.values(), key=lambda r: r.seq)]

    def find(self, task_id: str) -> TaskRecord | None:
        """One task by id (from memory, else from the journal)."""
        record = self.records.get(task_id)
        if record is None and not self._stopping:
            record = self.journal.get(task_id)
        return record

    def _changed(self, record: TaskRecord) -> None:
        if self._publish is not None:
            self._publish("task", {"task": self.task_json(record), "server_time": self.clock.seconds()})


def _new_id() -> str:
    return "t" + secrets.token_hex(5)


def _first_line(prompt: str) -> str:
    first = next((line.strip() for line in prompt.splitlines() if line.strip()), "task")
    return first if len(first) <= 80 else first[:77] + "..."


def _result_error(result: Result) -> str | None:
    if result.error is None:
        return None
    if result.error.get("name") == "DispatchError":
        return str(result.error.get("message") or "")
    return error_text(result.error)
