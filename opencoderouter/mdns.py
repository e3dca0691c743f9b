"""The mDNS advertiser: one ``_opencode._tcp`` service and ``.local`` host per project of the router's user.

How it stays off the reactor thread
-----------------------------------
python-zeroconf's coroutine API (``async_register_service``, ``async_update_service``,
``async_unregister_service``) runs on zeroconf's own loop thread, bridged to Deferreds by
:mod:`.zeroconf_loop` (why not the sync calls in pool threads, or the asyncio reactor, is said there).
The reactor thread itself only builds records and reads interface addresses (``getifaddrs``, well
under a millisecond).

Names
-----
The Registry owns names. The advertiser asks it which names to try for a backend
(:meth:`Registry.mdns_candidates`: the host label ``{slug}-{user}``, then ``{label}-2``, ``-3``, ...);
when another host on the link already owns the instance name (found by zeroconf's probe) or the host
name (found by asking for its addresses first), the next one is tried and the choice is logged. The
name finally advertised is recorded back with :meth:`Registry.set_mdns_name`, so routing, the API and
the event stream read it from the registry like every other name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .interfaces import InterfaceAddress, reachable_from_elsewhere, selected, system_addresses
from .periodic import PeriodicService
from .registry import Backend, Registry
from .web import tcp_address
from .zeroconf_loop import ZeroconfLoop

log = Logger()

SERVICE_TYPE = "_opencode._tcp.local."
#: DNS labels (instance names, host labels) are at most 63 bytes.
MAX_LABEL = 63
#: How many suffixed names (``-2`` ...) to try before giving up on a conflicting name.
MAX_NAME_ATTEMPTS = 20
#: Bound on one zeroconf operation; a registration normally takes about two seconds.
OPERATION_TIMEOUT = 30.0
#: How long to ask the link whether a host name is taken before claiming it (milliseconds).
HOST_CHECK_MS = 200


# -- addresses -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddressPlan:
    """What to advertise for the router's listening address: addresses, and the interfaces to send on."""

    addresses: tuple[str, ...]
    #: zeroconf's interface list: IPv4 addresses and IPv6 interface indexes.
    interfaces: tuple[str | int, ...]
    #: Why nothing is advertised, when nothing is.
    reason: str = ""


def plan_addresses(bind_host: str, entries: Iterable[InterfaceAddress], selectors: Sequence[str] = ()) -> AddressPlan:
    """The addresses the router really listens on, limited to ``--mdns-interface``, for A/AAAA records."""
    entries = list(entries)
    try:
        bound = ipaddress.ip_address(bind_host)
    except ValueError:
        return AddressPlan((), (), f"the router listens on {bind_host!r}, which is not an IP address")
    if bound.is_loopback:
        return AddressPlan((), (), f"the router listens on loopback only ({bind_host}); no other machine can reach it")
    if bound.is_unspecified:
        # 0.0.0.0 is IPv4 only; a socket on :: also takes IPv4 (Linux's default dual stack).
        versions = {4} if bound.version == 4 else {4, 6}
        chosen = [e for e in entries
                  if e.ip.version in versions and reachable_from_elsewhere(e.ip) and selected(e, selectors)]
        if not chosen:
            where = f" matching --mdns-interface {', '.join(selectors)}" if selectors else ""
            return AddressPlan((), (), f"no non-loopback interface address{where} is up")
    else:
        chosen = [e for e in entries if e.ip == bound]
        if selectors and not any(selected(e, selectors) for e in chosen):
            return AddressPlan((), (), f"the router listens on {bind_host}, which --mdns-interface "
                               f"{', '.join(selectors)} does not include")
        if not chosen:
            return AddressPlan((), (), f"the router listens on {bind_host}, which no interface has now")
    addresses = tuple(sorted({e.address for e in chosen}, key=lambda a: (ipaddress.ip_address(a).version, a)))
    interfaces: list[str | int] = sorted({e.address for e in chosen if e.ip.version == 4})
    interfaces += sorted({e.index for e in chosen if e.ip.version == 6 and e.index is not None})
    return AddressPlan(addresses, tuple(interfaces))


# -- records ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Advert:
    """Everything one backend's advertisement says, independent of the name finally used."""

    slug: str
    label: str
    port: int
    addresses: tuple[str, ...]
    txt: tuple[tuple[str, str], ...]


def txt_records(backend: Backend) -> tuple[tuple[str, str], ...]:
    """The TXT keys: project, path, backend, owner, version, path_prefix."""
    return (
        # A locked server the router cannot open has no known project.
        ("project", backend.project_name if backend.path_known else ""),
        ("path", backend.project_path if backend.path_known else ""),
        ("backend", backend.endpoint),
        ("owner", backend.owner_name),
        ("version", backend.version),
        ("path_prefix", f"/{backend.slug}/"),
    )


def make_advert(backend: Backend, port: int, addresses: tuple[str, ...]) -> Advert:
    """The advertisement for ``backend`` reached through the router's ``port`` on ``addresses``."""
    return Advert(backend.slug, backend.host_label, port, addresses, txt_records(backend))


def txt_value(key: str, value: str) -> bytes:
    """``value`` in UTF-8, cut on a character boundary so that ``key=value`` fits one 255-byte TXT string."""
    room = 255 - len(key) - 1
    return value.encode("utf-8")[:room].decode("utf-8", "ignore").encode("utf-8")


def service_info(advert: Advert, name: str) -> Any:
    """The zeroconf ServiceInfo for ``advert`` under instance and host label ``name``."""
    from zeroconf import ServiceInfo

    return ServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        port=advert.port,
        properties={key: txt_value(key, value) for key, value in advert.txt},
        server=f"{name}.local.",
        parsed_addresses=list(advert.addresses),
    )


# -- the zeroconf side -----------------------------------------------------------------------------------


class NameTaken(Exception):
    """Another host on the link already answers for this instance or host name."""


class Responder(Protocol):
    """What the advertiser needs from an mDNS responder; every method returns a Deferred."""

    def register(self, info: Any) -> Deferred[None]:
        """Probe for ``info.name`` and announce it; fails with NameTaken on a conflict."""

    def update(self, info: Any) -> Deferred[None]:
        """Announce changed records of a registered service."""

    def unregister(self, info: Any) -> Deferred[None]:
        """Send goodbyes for a registered service."""

    def host_taken(self, host: str, own_addresses: frozenset[str]) -> Deferred[bool]:
        """True when some other machine answers for ``host``."""

    def update_interfaces(self, interfaces: Sequence[str | int]) -> Deferred[None]:
        """Send on these interfaces from now on."""

    def close(self) -> Deferred[None]:
        """Close the sockets and the loop thread."""


class ZeroconfResponder:
    """The advertiser's calls on python-zeroconf, on its own loop thread (see :mod:`.zeroconf_loop`)."""

    def __init__(self, loop: ZeroconfLoop) -> None:
        self._loop = loop
        self._zc = loop.zeroconf
        self._run = loop.run

    @classmethod
    def start(cls, reactor: Any, interfaces: Sequence[str | int]) -> Deferred[ZeroconfResponder]:
        """Open the sockets on ``interfaces``."""
        return ZeroconfLoop.open(reactor, interfaces).addCallback(cls)

    def register(self, info: Any) -> Deferred[None]:
        """Probe (no automatic renaming: the advertiser picks names) and announce."""
        from zeroconf import NonUniqueNameException

        async def go() -> None:
            try:
                announced = await self._zc.async_register_service(info, allow_name_change=False)
            except NonUniqueNameException:
                raise NameTaken(info.name) from None
            await announced

        return self._run(go)

    def update(self, info: Any) -> Deferred[None]:
        """Re-announce with the new records (sent with cache-flush, so old ones are replaced)."""

        async def go() -> None:
            await (await self._zc.async_update_service(info))

        return self._run(go)

    def unregister(self, info: Any) -> Deferred[None]:
        """Goodbye packets (TTL 0) for the service and its host's addresses."""

        async def go() -> None:
            await (await self._zc.async_unregister_service(info))

        return self._run(go)

    def host_taken(self, host: str, own_addresses: frozenset[str]) -> Deferred[bool]:
        """Ask the link for ``host``'s addresses; taken when someone answers with an address not ours."""
        from zeroconf import AddressResolver

        async def go() -> bool:
            resolver = AddressResolver(host)
            if not await resolver.async_request(self._zc, HOST_CHECK_MS):
                return False
            return any(address not in own_addresses for address in resolver.parsed_addresses())

        return self._run(go)

    def update_interfaces(self, interfaces: Sequence[str | int]) -> Deferred[None]:
        """Add and drop sockets to match ``interfaces``."""
        return self._loop.update_interfaces(interfaces)

    def close(self) -> Deferred[None]:
        """Close the sockets and the loop thread."""
        return self._loop.close()


# -- the service -------------------------------------------------------------------------------------------


@dataclass
class _Registration:
    advert: Advert
    name: str
    info: Any = field(repr=False)


class MdnsAdvertiser(Service):
    """Keeps one ``_opencode._tcp`` service per own backend registered, in step with the Registry.

    Each backend has at most one zeroconf operation in flight; when it ends, the backend is brought to
    the latest wanted state (registered, updated, or gone), so bursts of registry events coalesce.
    """

    def __init__(
        self,
        registry: Registry,
        reactor: Any,
        listening: Callable[[], Deferred[Any]],
        interfaces: Sequence[str] = (),
        refresh_interval: float = 5.0,
        addresses: Callable[[], list[InterfaceAddress]] = system_addresses,
        responder_factory: Callable[[Any, Sequence[str | int]], Deferred[Responder]] | None = None,
    ) -> None:
        self.registry = registry
        self._reactor = reactor
        self._listening = listening
        self._selectors = list(interfaces)
        self._refresh_interval = refresh_interval
        self._addresses = addresses
        self._responder_factory = responder_factory or ZeroconfResponder.start
        self._responder: Responder | None = None
        self._responder_interfaces: tuple[str | int, ...] = ()
        self._bind: tuple[str, int] | None = None
        self._plan = AddressPlan((), ())
        self._own_addresses: frozenset[str] = frozenset()
        self._backends: dict[str, Backend] = {}
        self._current: dict[str, _Registration] = {}
        self._workers: dict[str, Deferred[None]] = {}
        #: Re-reads the interface addresses every ``refresh_interval`` once the router listens.
        self._refresher: PeriodicService | None = None
        self._started: Deferred[None] | None = None
        self._stopping = False
        self._last_reason = ""
        self._last_socket_error = ""

    # -- lifecycle -------------------------------------------------------------------------------------------
    def startService(self) -> None:
        """Wait for the router's listening address, then follow the registry."""
        super().startService()
        self._stopping = False
        started = self._listening()
        started.addCallback(self._begin)
        started.addErrback(lambda failure: failure.trap(defer.CancelledError))
        started.addErrback(lambda failure: log.failure("mDNS advertiser could not start", failure))
        self._started = started

    def _begin(self, port: object) -> None:
        if self._stopping:
            return
        bind = tcp_address(port)
        if bind is None:
            log.info("mDNS: nothing advertised: the router does not listen on TCP ({address})", address=port)
            return
        self._bind = bind
        self.registry.subscribe(self)
        for backend in self.registry.backends():
            self._track(backend)
        self._refresher = PeriodicService(self._refresh_interval, self.refresh, "mDNS address refresh",
                                          self._reactor, log)
        self._refresher.startService()

    def stopService(self) -> Deferred[None]:
        """Unregister everything (goodbyes sent) and close zeroconf; fires when that is done."""
        super().stopService()
        self._stopping = True
        self.registry.unsubscribe(self)
        refresher, self._refresher = self._refresher, None
        refreshing = refresher.stopService() if refresher is not None and refresher.running else None
        if self._started is not None and not self._started.called:
            self._started.cancel()
        return defer.ensureDeferred(self._shutdown(refreshing))

    async def _shutdown(self, refreshing: Deferred[None] | None) -> None:
        if refreshing is not None:
            await defer.DeferredList([refreshing])  # never fails: the loop logs its own errors
        for slug in list(self._current):
            self._kick(slug)
        while self._workers:
            await defer.DeferredList(list(self._workers.values()))
        if self._responder is not None:
            responder, self._responder = self._responder, None
            try:
                await responder.close()
            except Exception:
                log.failure("mDNS: closing zeroconf failed")
        log.info("mDNS: stopped; every advertisement withdrawn")

    # -- registry observer -------------------------------------------------------------------------------
    def added(self, backend: Backend) -> None:
        """Advertise a new backend of ours."""
        self._track(backend)

    def updated(self, backend: Backend) -> None:
        """Re-announce a changed backend (or withdraw it if it is no longer ours)."""
        self._track(backend)

    def removed(self, backend: Backend) -> None:
        """Withdraw a pruned backend, with goodbye packets."""
        self._backends.pop(backend.slug, None)
        self._kick(backend.slug)

    def _track(self, backend: Backend) -> None:
        if self.registry.naming.is_own(backend.owner):
            self._backends[backend.slug] = backend
        else:
            self._backends.pop(backend.slug, None)
        self._kick(backend.slug)

    # -- addresses -------------------------------------------------------------------------------------------
    def refresh(self) -> Deferred[None]:
        """Re-read the interface addresses; move zeroconf's sockets and the A/AAAA records with them."""
        return defer.ensureDeferred(self._refresh())

    async def _refresh(self) -> None:
        """Re-read the interface addresses; move zeroconf's sockets and the A/AAAA records with them."""
        if self._bind is None or self._stopping:
            return
        entries = self._addresses()
        self._own_addresses = frozenset(e.address for e in entries)
        plan = plan_addresses(self._bind[0], entries, self._selectors)
        if plan.reason and plan.reason != self._last_reason:
            log.info("mDNS: nothing advertised: {reason}", reason=plan.reason)
        elif not plan.reason and plan.addresses != self._plan.addresses:
            log.info("mDNS: advertising projects at {addresses} port {port}",
                     addresses=", ".join(plan.addresses), port=self._bind[1])
        self._last_reason = plan.reason
        if plan.interfaces and plan.interfaces != self._responder_interfaces:
            try:
                if self._responder is None:
                    self._responder = await self._responder_factory(self._reactor, plan.interfaces)
                    if self._stopping:
                        return
                else:
                    await self._responder.update_interfaces(plan.interfaces)
            except Exception as error:  # e.g. no multicast route: say so once, retry on the next refresh
                message = f"{type(error).__name__}: {error}"
                if message != self._last_socket_error:
                    log.warn("mDNS: cannot send on {interfaces} ({error}); retrying every {interval:g}s",
                             interfaces=", ".join(map(str, plan.interfaces)), error=message,
                             interval=self._refresh_interval)
                self._last_socket_error = message
                return
            self._last_socket_error = ""
            self._responder_interfaces = plan.interfaces
        self._plan = plan
        for slug in set(self._backends) | set(self._current):
            self._kick(slug)

    # -- one backend -------------------------------------------------------------------------------------------
    def _wanted(self, slug: str) -> Advert | None:
        backend = self._backends.get(slug)
        if backend is None or self._stopping or self._bind is None or not self._plan.addresses:
            return None
        return make_advert(backend, self._bind[1], self._plan.addresses)

    def _kick(self, slug: str) -> None:
        """Start bringing ``slug`` to its wanted state, unless that is already under way."""
        if slug in self._workers or self._responder is None:
            return
        worker = defer.ensureDeferred(self._converge(slug))
        worker.addErrback(lambda failure: log.failure("mDNS: advertising {slug} failed; retrying on the next "
                                                      "refresh", failure, slug=slug))
        if not worker.called:
            self._workers[slug] = worker

            def ended(_: object) -> None:
                self._workers.pop(slug, None)

            worker.addBoth(ended)

    async def _converge(self, slug: str) -> None:
        while True:
            responder = self._responder
            want, have = self._wanted(slug), self._current.get(slug)
            if responder is None or (have is None and want is None) or (have is not None and want == have.advert):
                return
            if have is not None and (want is None or want.label != have.advert.label):
                await _bounded(responder.unregister(have.info), self._reactor)
                del self._current[slug]
                self.registry.set_mdns_name(slug, None)
                log.info("mDNS: withdrew {name}", name=have.name)
            elif have is not None and want is not None:
                info = service_info(want, have.name)
                await _bounded(responder.update(info), self._reactor)
                self._current[slug] = _Registration(want, have.name, info)
                log.info("mDNS: updated {name}", name=have.name)
            elif want is not None:
                await self._register(slug, want, responder)

    async def _register(self, slug: str, want: Advert, responder: Responder) -> None:
        if len(want.label.encode("utf-8")) > MAX_LABEL:
            raise ValueError(f"the name {want.label!r} is longer than the {MAX_LABEL} bytes a DNS label allows")
        # Registrations still under way for other backends are not in the registry yet.
        in_use = {reg.name for s, reg in self._current.items() if s != slug}
        for name in self.registry.mdns_candidates(slug, MAX_NAME_ATTEMPTS):
            if name in in_use or len(name.encode("utf-8")) > MAX_LABEL:
                continue
            if await _bounded(responder.host_taken(f"{name}.local.", self._own_addresses), self._reactor):
                log.warn("mDNS: another machine already answers for {host}; trying the next name",
                         host=f"{name}.local")
                continue
            info = service_info(want, name)
            try:
                await _bounded(responder.register(info), self._reactor)
            except NameTaken:
                log.warn("mDNS: another machine already advertises {name}; trying the next name", name=name)
                continue
            self._current[slug] = _Registration(want, name, info)
            self.registry.set_mdns_name(slug, name)
            if name != want.label:
                log.warn("mDNS: {label} was taken on the network; advertising {slug} as {name} "
                         "(http://{name}.local:{port}/)", label=want.label, slug=slug, name=name, port=want.port)
            else:
                log.info("mDNS: advertised {name} (http://{name}.local:{port}/)", name=name, port=want.port)
            return
        raise NameTaken(f"every name from {want.label} to {want.label}-{MAX_NAME_ATTEMPTS} is taken")


async def _bounded(operation: Deferred[Any], clock: Any) -> Any:
    """Await a responder operation, cancelling it after OPERATION_TIMEOUT so shutdown cannot hang."""
    operation.addTimeout(OPERATION_TIMEOUT, clock)
    return await operation

