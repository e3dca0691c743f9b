"""Find OpenCode servers on localhost: probe the listening sockets, feed the registry."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeGuard
from typing import Protocol as TypingProtocol

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers

from .listeners import Listener, list_listeners, username_for_uid
from .logs import router_observer
from .loopback_http import BodyTooLarge, loopback_url, read_body
from .periodic import PeriodicService, logging_errors
from .registry import Registry, Sighting

# Probes log at debug level; router_observer keeps that out of twistd's log unless asked for.
log = Logger(observer=router_observer)

#: How often a quick check probes a new listener before leaving it to the full scans.
QUICK_CHECK_ATTEMPTS = 3


class ScanMetrics(TypingProtocol):
    """What the scanner reports to (``opencoderouter.metrics.RouterMetrics`` implements it)."""

    def scan_finished(self, kind: str, duration: float) -> None:
        """A ``full`` or ``quick`` scan ended."""

    def probe_finished(self, outcome: str) -> None:
        """A probe ended: ``opencode``, ``not_opencode``, ``timeout``, ``refused`` or ``error``."""


class NotOpenCode(Exception):
    """The port answered, but not as an OpenCode server."""


class Locked(NotOpenCode):
    """The port answered 401 with a Basic challenge: an OpenCode server with a password."""


_PROBE_HEADERS = Headers({b"Accept": [b"application/json"]})


class Prober:
    """Asks one port whether it is an OpenCode server and for which project.

    It talks through a treq ``HTTPClient``: ``loopback_http.probe_client`` in the router (bodies
    capped after gzip decoding, bombs inflated a piece at a time), ``treq.testing.StubTreq`` in
    tests. The whole probe, body reads included, is bounded by ``timeout``.
    """

    def __init__(
        self,
        client: HTTPClient,
        clock: IReactorTime,
        timeout: float,
        host: str = "127.0.0.1",
        credentials: bytes | None = None,
        trusts: Callable[[str | None], bool] = lambda owner: True,
        metrics: ScanMetrics | None = None,
    ) -> None:
        self._client = client
        self._clock = clock
        self._timeout = timeout
        self._host = host
        #: ``Authorization`` value for our own locked servers (--opencode-password-file).
        self._credentials = credentials
        #: Whether a server owned by this user may see that password (only our own may).
        self._trusts = trusts
        self._metrics = metrics

    def probe(self, port: int, owner: str | None = None, address: str | None = None) -> Deferred[Sighting | None]:
        """Fire with a Sighting, or None when the port is not (or not yet) OpenCode.

        ``address`` is the loopback address the listener takes (``::1`` for an IPv6-only one).
        """
        attempt = defer.ensureDeferred(self._identify(port, owner, address or self._host))
        # The bound covers the whole probe, body reads included; cancelling aborts the connection.
        attempt.addTimeout(self._timeout, self._clock)
        attempt.addCallbacks(self._count, self._not_opencode, errbackArgs=(port,))
        return attempt

    def _count(self, sighting: Sighting) -> Sighting:
        if self._metrics is not None:
            self._metrics.probe_finished("opencode")
        return sighting

    def _not_opencode(self, failure: Failure, port: int) -> None:
        log.debug("port {port} is not OpenCode: {why}", port=port, why=failure.getErrorMessage())
        if self._metrics is not None:
            self._metrics.probe_finished(_probe_outcome(failure))
        return None

    async def _get_json(self, address: str, port: int, path: str, authorization: bytes | None = None) -> Any:
        headers = _PROBE_HEADERS.copy()
        if authorization is not None:
            headers.setRawHeaders(b"authorization", [authorization])
        url = loopback_url(address, port, path)
        # A redirect is not OpenCode's answer, and could point the probe anywhere.
        response = await self._client.get(url, headers=headers, allow_redirects=False, unbuffered=True)
        try:
            body = await read_body(response)
        except BodyTooLarge as error:
            raise NotOpenCode(str(error)) from None
        challenge = b"".join(response.headers.getRawHeaders(b"www-authenticate", [])).lower()
        if response.code == 401 and challenge.startswith(b"basic"):
            raise Locked(f"{path} asks for a password")
        if response.code != 200:
            raise NotOpenCode(f"{path} answered {response.code}")
        try:
            return json.loads(body)
        except ValueError:
            raise NotOpenCode(f"{path} did not answer JSON") from None

    async def _identify(self, port: int, owner: str | None, address: str) -> Sighting | None:
        try:
            return await self._identify_with(address, port, owner, None)
        except Locked:
            pass
        # Only our own servers get our password: another user's server could be a trap.
        if self._credentials is not None and self._trusts(owner):
            try:
                sighting = await self._identify_with(address, port, owner, self._credentials)
                return dataclasses.replace(sighting, locked=True, router_credentials=True)
            except Locked:
                log.info("port {port}: the --opencode-password-file password is refused", port=port)
        # Without /path we cannot know the project: the port names it (documented in the README).
        return Sighting(port=port, project_path=f"locked-{port}", version="unknown", owner=owner, locked=True,
                        address=address)

    async def _identify_with(self, address: str, port: int, owner: str | None,
                             authorization: bytes | None) -> Sighting:
        health = await self._get_json(address, port, "/global/health", authorization)
        if not isinstance(health, dict) or health.get("healthy") is not True:
            raise NotOpenCode("/global/health is not OpenCode's")
        version = health.get("version")
        version = version if isinstance(version, str) else "unknown"
        directory = await self._project_directory(address, port, authorization)
        return Sighting(port=port, project_path=directory, version=version[:64], owner=owner, address=address)

    async def _project_directory(self, address: str, port: int, authorization: bytes | None = None) -> str:
        try:
            paths = await self._get_json(address, port, "/path", authorization)
            directory = paths.get("directory") if isinstance(paths, dict) else None
            if _usable_project_path(directory):
                return directory
        except defer.CancelledError:
            raise
        except Exception as error:  # the fallback below is the point; say why we needed it
            log.debug("port {port}: /path failed ({error}); trying /project/current", port=port, error=error)
        project = await self._get_json(address, port, "/project/current", authorization)
        worktree = project.get("worktree") if isinstance(project, dict) else None
        if _usable_project_path(worktree):
            return worktree
        raise NotOpenCode("neither /path nor /project/current names a project directory")


def _probe_outcome(failure: Failure) -> str:
    """The metrics outcome of a failed probe."""
    if failure.check(NotOpenCode):
        return "not_opencode"
    if failure.check(defer.TimeoutError, defer.CancelledError, net_error.TimeoutError):
        return "timeout"
    # The probe's time limit cancels a request in flight: the Agent reports that wrapped.
    reasons = failure.value.reasons if isinstance(failure.value, ResponseFailed) else []
    if any(reason.check(defer.CancelledError) for reason in reasons):
        return "timeout"
    if failure.check(net_error.ConnectionRefusedError):
        return "refused"
    return "error"


def _usable_project_path(value: object) -> TypeGuard[str]:
    # "/" is what /project/current says for every non-git folder: it identifies nothing.
    return (isinstance(value, str) and value.startswith("/") and value != "/" and len(value) < 4096
            and "\x00" not in value)


class Scanner(Service):
    """Periodically finds OpenCode servers in a port range and records them in the registry.

    Between full scans a cheap check of the kernel's socket table (Linux) probes new
    listeners at once, so a new server is routable well before the next full scan.
    """

    def __init__(
        self,
        registry: Registry,
        prober: Prober,
        clock: IReactorTime,
        port_range: tuple[int, int],
        interval: float,
        concurrency: int,
        quick_interval: float = 0.5,
        list_listeners: Callable[[int, int], dict[int, Listener] | None] = list_listeners,
        owner_name: Callable[[int], str] = username_for_uid,
        admit_owner: Callable[[str | None], bool] = lambda owner: True,
        metrics: ScanMetrics | None = None,
    ) -> None:
        self.registry = registry
        self._prober = prober
        self._clock = clock
        self._start, self._end = port_range
        self._semaphore = defer.DeferredSemaphore(concurrency)
        self._list_listeners = list_listeners
        self._owner_name = owner_name
        #: --owners: sightings of other users' servers never reach the registry.
        self._admit_owner = admit_owner
        #: Port → owner of OpenCode servers left out by --owners (as of the last full scan).
        self._ignored: dict[int, str | None] = {}
        self._full_scans = PeriodicService(interval, self.scan_safely, "scan", clock, log)
        self._quick_checks = (PeriodicService(quick_interval, self.quick_check_safely, "quick check", clock, log)
                              if quick_interval else None)
        #: The full scan or quick check in progress (its errors already logged): they never overlap.
        self._running_scan: Deferred[None] | None = None
        #: Listening sockets (by inode) already probed, so quick checks only probe new ones.
        self._probed_inodes: set[int] = set()
        self._quick_failures: dict[int, int] = {}
        self.scans_completed = 0
        self.last_scan_duration: float | None = None
        self._metrics = metrics

    def startService(self) -> None:
        """Start the full scans (the first at once) and, where the socket table is readable, the quick checks."""
        super().startService()
        self._full_scans.startService()
        if self._quick_checks is not None and self._list_listeners(self._start, self._end) is not None:
            self._quick_checks.startService()

    def stopService(self) -> Deferred[None]:
        """Stop both loops; fires once any scan in progress has ended."""
        super().stopService()
        stopping = [loop.stopService() for loop in (self._full_scans, self._quick_checks)
                    if loop is not None and loop.running]
        stopping.append(self._when_idle())
        return defer.gatherResults(stopping).addCallback(lambda _: None)

    def scan_safely(self) -> Deferred[None]:
        """One full scan (unless a scan is running: then its end); errors are logged, never raised."""
        if self._running_scan is None:
            self._begin(self.scan, "scan")
        return self._when_idle()

    def _begin(self, work: Callable[[], Coroutine[Any, Any, None]], what: str) -> None:
        """Start ``work`` as the scan in progress, its errors logged as ``what`` failed."""
        self._running_scan = logging_errors(lambda: defer.ensureDeferred(work()), what, log)()
        self._running_scan.addBoth(self._scan_ended)

    def _scan_ended(self, _: object) -> None:
        self._running_scan = None

    def _when_idle(self) -> Deferred[None]:
        """A Deferred of the caller's own that fires once the scan in progress (if any) has ended."""
        running = self._running_scan
        if running is None:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()

        def ended(result: object) -> object:
            waiter.callback(None)
            return result

        running.addBoth(ended)
        return waiter

    async def scan(self) -> None:
        """Probe every candidate port once, record the sightings and prune stale backends."""
        began = self._clock.seconds()
        listeners = self._list_listeners(self._start, self._end)
        if listeners is None:
            candidates: Iterable[tuple[int, str | None, str | None]] = (
                (p, None, None) for p in range(self._start, self._end + 1))
        else:
            candidates = [(found.port, self._owner_name(found.uid), found.address) for found in listeners.values()]
            self._probed_inodes = {found.inode for found in listeners.values()}
            self._quick_failures.clear()
        sightings = self._admitted(await self._probe_all(candidates), replace=True)
        self.registry.record_scan(sightings, complete=True)
        self.registry.prune_stale()
        self.scans_completed += 1
        self.last_scan_duration = self._clock.seconds() - began
        if self._metrics is not None:
            self._metrics.scan_finished("full", self.last_scan_duration)

    async def _probe_all(self, candidates: Iterable[tuple[int, str | None, str | None]]) -> list[Sighting]:
        probes = [self._semaphore.run(self._probe_safely, port, owner, address) for port, owner, address in candidates]
        results = await defer.gatherResults(probes, consumeErrors=True)
        return [s for s in results if s is not None]

    def _probe_safely(self, port: int, owner: str | None, address: str | None) -> Deferred[Sighting | None]:
        """One probe whose unexpected error is logged and counts as 'not OpenCode'."""

        def failed(failure: Failure) -> None:
            log.failure("probe of port {port} failed", failure, port=port)
            return None

        return defer.maybeDeferred(self._prober.probe, port, owner, address).addErrback(failed)

    def _admitted(self, sightings: list[Sighting], replace: bool) -> list[Sighting]:
        """The sightings --owners lets through; the others are counted, once logged."""
        admitted, ignored = [], {}
        for sighting in sightings:
            if self._admit_owner(sighting.owner):
                admitted.append(sighting)
            else:
                ignored[sighting.port] = sighting.owner
                if self._ignored.get(sighting.port, "") != sighting.owner:
                    log.info("not routing the OpenCode server on port {port}: it belongs to {owner} (--owners)",
                             port=sighting.port, owner=sighting.owner)
        if replace:
            self._ignored = ignored
        else:
            self._ignored.update(ignored)
            for sighting in admitted:
                self._ignored.pop(sighting.port, None)
        return admitted

    @property
    def ignored_other_owners(self) -> int:
        """How many OpenCode servers --owners leaves out."""
        return len(self._ignored)

    def quick_check_safely(self) -> Deferred[None] | None:
        """Probe listeners that appeared since the last look (not while a scan runs); errors are logged."""
        if self._running_scan is not None:
            return None
        self._begin(self.quick_check, "quick check")
        return self._when_idle()

    async def quick_check(self) -> None:
        """Probe only listening sockets not probed before (new servers)."""
        listeners = self._list_listeners(self._start, self._end)
        if listeners is None:
            return
        fresh = [found for found in listeners.values() if found.inode not in self._probed_inodes]
        if not fresh:
            return
        began = self._clock.seconds()
        sightings = await self._probe_all((found.port, self._owner_name(found.uid), found.address) for found in fresh)
        found_ports = {s.port for s in sightings}
        for listener in fresh:
            # A server that accepts before it answers (OpenCode does, ~350 ms) is retried a few
            # times; a neighbour that is not OpenCode is then left to the full scans.
            failures = 0 if listener.port in found_ports else self._quick_failures.get(listener.inode, 0) + 1
            if failures == 0 or failures >= QUICK_CHECK_ATTEMPTS:
                self._probed_inodes.add(listener.inode)
                self._quick_failures.pop(listener.inode, None)
            else:
                self._quick_failures[listener.inode] = failures
        self.registry.record_scan(self._admitted(sightings, replace=False), complete=False)
        if self._metrics is not None:
            self._metrics.scan_finished("quick", self._clock.seconds() - began)
