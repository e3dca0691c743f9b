"""The LAN directory's mDNS feed: python-zeroconf browsing ``_opencode._tcp`` and plain OpenCode servers.

See :mod:`.lan` for the directory itself (what an entry is, its bounds, its time to live); this
module finds the announcements. python-zeroconf runs on its own loop thread and results come back
to the reactor through :mod:`.zeroconf_loop`, as for the advertiser.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .interfaces import InterfaceAddress, selected, system_addresses
from .lan import (
    MAX_NAME,
    MAX_RESOLVING,
    MAX_TRACKED,
    PLAIN_TYPE,
    RENEW_WAIT,
    RESOLVE_MS,
    SWEEP_INTERVAL,
    Announcement,
    LanView,
    capped_txt,
    clean_text,
)
from .mdns import SERVICE_TYPE
from .periodic import PeriodicService
from .zeroconf_loop import ZeroconfLoop

log = Logger()

_PLAIN_NAME = re.compile(r"^opencode-(\d{1,5})\._http\._tcp\.local\.$")
_ROUTER_KEYS = (b"project", b"path", b"owner", b"version", b"path_prefix")
_TYPE_A, _TYPE_TXT, _TYPE_AAAA, _TYPE_SRV, _CLASS_IN = 1, 16, 28, 33, 1


class BrowseReport(Protocol):
    """Where the mDNS side reports; called on the reactor thread."""

    def seen(self, announcement: Announcement) -> None:
        """A service was resolved (or its records renewed)."""

    def gone(self, name: str) -> None:
        """A service said goodbye (or zeroconf's cache dropped its PTR)."""


class Browsing(Protocol):
    """What the LAN browser needs from an mDNS browser; every method returns a Deferred."""

    def renew(self, service_type: str, name: str) -> Deferred[None]:
        """Ask the link for a service's records again; report them if they came back."""

    def update_interfaces(self, interfaces: Sequence[str | int]) -> Deferred[None]:
        """Listen on these interfaces from now on."""

    def close(self) -> Deferred[None]:
        """Stop browsing, close the sockets and the loop thread."""


def _mdns_announcement(info: Any, zc: Any, service_type: str) -> Announcement | None:
    """What zeroconf's cache holds for a resolved ServiceInfo (on zeroconf's loop)."""
    from zeroconf import current_time_millis

    if info.port is None or info.server is None:
        return None
    now = current_time_millis()
    srv = [r.get_remaining_ttl(now) for r in zc.cache.get_all_by_details(info.name, _TYPE_SRV, _CLASS_IN)]
    addresses = [r.get_remaining_ttl(now) for kind in (_TYPE_A, _TYPE_AAAA)
                 for r in zc.cache.get_all_by_details(info.server, kind, _CLASS_IN)]
    if not srv:
        return None
    ttl = min(max(srv), max(addresses)) if addresses else max(srv)
    keys = _ROUTER_KEYS if service_type == SERVICE_TYPE else (b"path",)
    return Announcement("mdns", service_type, info.name, info.server, int(info.port),
                        tuple(info.parsed_addresses()), capped_txt(info.properties or {}, keys), float(ttl))


class ZeroconfBrowsing:
    """python-zeroconf browsers on their own loop thread, reporting to the reactor (see the module docstring)."""

    def __init__(self, loop: ZeroconfLoop, report: BrowseReport) -> None:
        self._loop = loop
        self._zc = loop.zeroconf
        self._run = loop.run
        self._report = report
        self._tracked: dict[str, set[str]] = {SERVICE_TYPE: set(), PLAIN_TYPE: set()}
        self._resolving: set[str] = set()
        self._browser: Any = None
        self._semaphore: asyncio.Semaphore | None = None
        self._overflow_warned = False

    @classmethod
    def start(cls, reactor: Any, interfaces: Sequence[str | int], report: BrowseReport) -> Deferred[ZeroconfBrowsing]:
        """Open the sockets on ``interfaces`` and start browsing both service types."""
        from zeroconf import IPVersion

        async def browse() -> ZeroconfBrowsing:
            loop = await ZeroconfLoop.open(reactor, interfaces, ip_version=IPVersion.V4Only)
            browsing = cls(loop, report)
            try:
                await browsing._run(browsing._start_browser)
            except BaseException:
                # Do not leave the sockets and the loop thread behind.
                await defer.DeferredList([loop.close()])
                raise
            return browsing

        return defer.ensureDeferred(browse())

    async def _start_browser(self) -> None:
        from zeroconf import DNSQuestionType
        from zeroconf.asyncio import AsyncServiceBrowser

        self._semaphore = asyncio.Semaphore(MAX_RESOLVING)
        self._browser = AsyncServiceBrowser(self._zc, [SERVICE_TYPE, PLAIN_TYPE], handlers=[self._on_change],
                                            question_type=DNSQuestionType.QM)

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        """zeroconf's handler (on its loop; must not block)."""
        from zeroconf import ServiceStateChange

        tracked = self._tracked.get(service_type)
        if tracked is None or (service_type == PLAIN_TYPE and not _PLAIN_NAME.match(name.lower())):
            return
        if state_change is ServiceStateChange.Removed:
            tracked.discard(name)
            self._loop.call_from_loop(self._report.gone, name)
            return
        if name not in tracked:
            if len(tracked) >= MAX_TRACKED:
                if not self._overflow_warned:
                    self._overflow_warned = True
                    self._loop.call_from_loop(log.warn, "LAN: more than {count} {type} services on the network; "
                                                 "the rest are ignored", count=MAX_TRACKED, type=service_type)
                return
            tracked.add(name)
        self._spawn(service_type, name, renew=False)

    def _spawn(self, service_type: str, name: str, renew: bool) -> None:
        if name in self._resolving:
            return
        self._resolving.add(name)
        task = asyncio.ensure_future(self._resolve(service_type, name, renew))
        task.add_done_callback(lambda _: self._resolving.discard(name))

    async def _resolve(self, service_type: str, name: str, renew: bool) -> None:
        from zeroconf import DNSOutgoing, DNSQuestion, DNSQuestionType
        from zeroconf.asyncio import AsyncServiceInfo

        assert self._semaphore is not None
        async with self._semaphore:
            info = AsyncServiceInfo(service_type, name)
            if renew:
                # The cache still answers (the records have not expired), so ask the link directly.
                out = DNSOutgoing(0)
                out.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
                out.add_question(DNSQuestion(name, _TYPE_TXT, _CLASS_IN))
                cached = self._zc.cache.get_all_by_details(name, _TYPE_SRV, _CLASS_IN)
                if cached:
                    out.add_question(DNSQuestion(cached[0].server, _TYPE_A, _CLASS_IN))
                self._zc.async_send(out)
                await asyncio.sleep(RENEW_WAIT)
                if not info.load_from_cache(self._zc):
                    return
            elif not await info.async_request(self._zc, RESOLVE_MS, question_type=DNSQuestionType.QM):
                return
            try:
                announcement = _mdns_announcement(info, self._zc, service_type)
            except Exception as error:  # a malformed record must not stop the browser
                self._loop.call_from_loop(log.warn, "LAN: could not read {name}: {error}", name=name,
                                             error=repr(error))
                return
            if announcement is not None:
                self._loop.call_from_loop(self._report.seen, announcement)

    def renew(self, service_type: str, name: str) -> Deferred[None]:
        """Ask again for a service's SRV/TXT/A records (answers land in the cache, then are reported)."""

        async def go() -> None:
            self._spawn(service_type, name, renew=True)

        return self._run(go)

    def update_interfaces(self, interfaces: Sequence[str | int]) -> Deferred[None]:
        """Add and drop sockets to match ``interfaces``."""
        return self._loop.update_interfaces(interfaces)

    def close(self) -> Deferred[None]:
        """Cancel the browser, then close zeroconf (which waits for its loop thread, hence in a pool thread)."""

        async def cancel() -> None:
            if self._browser is not None:
                await self._browser.async_cancel()

        return self._run(cancel).addBoth(lambda _: self._loop.close())


def browse_interfaces(entries: Iterable[InterfaceAddress], selectors: Sequence[str] = ()) -> tuple[str, ...]:
    """The IPv4 addresses to browse on: every non-loopback one that ``--mdns-interface`` selects."""
    chosen = {e.address for e in entries if e.ip.version == 4 and not e.ip.is_loopback and selected(e, selectors)}
    return tuple(sorted(chosen))


# -- the service ---------------------------------------------------------------------------------------------------


class LanBrowser(Service):
    """Keeps the LAN view fed from mDNS: browses, renews before TTL expiry, expires, follows interface changes."""

    def __init__(
        self,
        view: LanView,
        reactor: Any,
        interfaces: Sequence[str] = (),
        refresh_interval: float = 5.0,
        addresses: Callable[[], list[InterfaceAddress]] = system_addresses,
        browsing_factory: Callable[[Any, Sequence[str | int], BrowseReport], Deferred[Browsing]] | None = None,
    ) -> None:
        self.view = view
        self._reactor = reactor
        self._selectors = list(interfaces)
        self._refresh_interval = refresh_interval
        self._addresses = addresses
        self._factory = browsing_factory or ZeroconfBrowsing.start
        self._browsing: Browsing | None = None
        self._interfaces: tuple[str, ...] = ()
        self._loops: list[PeriodicService] = []
        self._starting: Deferred[Any] | None = None
        self._stopping = False
        self._last_problem = ""
        #: The service type and full name each mDNS entry came from (for renewals).
        self._types: dict[str, tuple[str, str]] = {}

    # -- BrowseReport ---------------------------------------------------------------------------------------------
    def seen(self, announcement: Announcement) -> None:
        """A resolved service: into the view."""
        if self._stopping:
            return
        entry = self.view.saw(announcement)
        if entry is not None:
            self._types[entry.id] = (announcement.service_type, announcement.name)

    def gone(self, name: str) -> None:
        """A goodbye: out of the view at once."""
        entry_id = f"mdns:{clean_text(name, MAX_NAME)}"
        self._types.pop(entry_id, None)
        self.view.remove(entry_id)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def startService(self) -> None:
        """Open zeroconf on the selected interfaces (when there are any) and start the sweep."""
        super().startService()
        self._stopping = False
        self.view.feeds["mdns"] = True
        self._loops = [
            PeriodicService(self._refresh_interval, self.refresh_interfaces, "LAN interface refresh", self._reactor,
                            log),
            PeriodicService(SWEEP_INTERVAL, self.sweep, "LAN expiry sweep", self._reactor, log),
        ]
        for loop in self._loops:
            loop.startService()

    def stopService(self) -> Deferred[None]:
        """Stop the loops and the browsers; fires once zeroconf is closed."""
        super().stopService()
        self._stopping = True
        return defer.ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        loops, self._loops = self._loops, []
        for loop in loops:
            if loop.running:
                await loop.stopService()
        if self._starting is not None and not self._starting.called:
            await defer.DeferredList([self._starting])  # fires whatever the outcome; failures are logged by start
        browsing, self._browsing = self._browsing, None
        if browsing is not None:
            try:
                await browsing.close()
            except Exception:
                log.failure("LAN: closing zeroconf failed")
        log.info("LAN: stopped browsing")

    # -- periodic work ----------------------------------------------------------------------------------------------
    def refresh_interfaces(self) -> Deferred[None]:
        """Follow the interfaces: open zeroconf on the first usable one, move its sockets afterwards."""
        return defer.ensureDeferred(self._refresh_interfaces())

    async def _refresh_interfaces(self) -> None:
        if self._stopping:
            return
        wanted = browse_interfaces(self._addresses(), self._selectors)
        if not wanted or wanted == self._interfaces:
            if not wanted:
                self._say_once("no IPv4 interface" + (f" matching --mdns-interface {', '.join(self._selectors)}"
                                                     if self._selectors else "") + " is up; not browsing")
            return
        try:
            if self._browsing is None:
                self._starting = self._factory(self._reactor, wanted, self)
                browsing = await self._starting
                if self._stopping:
                    await browsing.close()
                    return
                self._browsing = browsing
                log.info("LAN: browsing {types} on {interfaces}", types=f"{SERVICE_TYPE} {PLAIN_TYPE}",
                         interfaces=", ".join(wanted))
            else:
                await self._browsing.update_interfaces(wanted)
        except Exception as error:  # e.g. no multicast route yet: say so once, retry on the next refresh
            self._say_once(f"cannot browse on {', '.join(wanted)} ({type(error).__name__}: {error}); retrying "
                           f"every {self._refresh_interval:g}s")
            return
        self._last_problem = ""
        self._interfaces = wanted

    def _say_once(self, problem: str) -> None:
        if problem != self._last_problem:
            log.warn("LAN: {problem}", problem=problem)
        self._last_problem = problem

    def sweep(self) -> None:
        """Drop expired entries; ask again for the records of those near expiry."""
        for entry in self.view.expire():
            self._types.pop(entry.id, None)
        if self._browsing is None:
            return
        for entry in self.view.due_for_renewal():
            origin = self._types.get(entry.id)
            if entry.source == "mdns" and origin is not None:
                renewal = self._browsing.renew(*origin)
                renewal.addErrback(lambda failure: log.failure("LAN: renewing a record failed", failure))

