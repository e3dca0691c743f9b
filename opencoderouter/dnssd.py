"""Wide-area (unicast) DNS-SD, RFC 6763 over ordinary DNS: the LAN directory beyond one link.

``--dnssd-domain example.org`` browses ``_opencode._tcp.example.org`` (PTR → SRV + TXT → A/AAAA) every
``--dnssd-interval`` from the system resolver or ``--dnssd-server``, and feeds the same LAN view as
mDNS (``source="dnssd"``). With ``--dnssd-update-key FILE`` (a BIND ``key`` statement, as
``tsig-keygen`` writes it) the router also registers its own projects there with RFC 2136 DNS UPDATE
signed with TSIG, and deletes them when it stops.

dnspython is synchronous; each browse or update runs in one of the reactor's pool threads. Every
query is bounded (:data:`QUERY_TIMEOUT`, :data:`QUERY_LIFETIME`) and one browse reads at most
``MAX_ENTRIES`` instances, so a thread is never held for long; only one browse and one update run
at a time (``PeriodicService`` does not overlap runs).

Names: an instance is registered under the same label as over mDNS (``{slug}-{user}``), with SRV
target ``{label}.{domain}`` and that name's A/AAAA records set to the router's addresses. A name
someone else already holds is left alone (an RFC 2136 prerequisite: the name must not exist), unless
its SRV and addresses are ours (a registration left behind by a crash of this router), which is taken over.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from .interfaces import InterfaceAddress, system_addresses
from .lan import MAX_ENTRIES, MAX_TEXT_BYTES, Announcement, LanView, capped_txt
from .mdns import plan_addresses, txt_records, txt_value
from .periodic import PeriodicService
from .registry import Backend, Registry
from .web import tcp_address

log = Logger()

SERVICE = "_opencode._tcp"
#: TTL of the records we register (seconds); the same as mDNS's SRV and address records.
RECORD_TTL = 120
#: One query's time limit, and one name's total (retries included), in seconds.
QUERY_TIMEOUT = 2.0
QUERY_LIFETIME = 5.0
#: A browsed entry lives at least this many browse intervals, so a short TTL does not make it flap.
KEEP_INTERVALS = 2.5

_KEY = re.compile(r'key\s+"?(?P<name>[^"\s{]+)"?\s*\{(?P<body>.*?)\}\s*;', re.S)
_ALGORITHM = re.compile(r'algorithm\s+"?(?P<alg>[A-Za-z0-9.-]+)"?\s*;')
_SECRET = re.compile(r'secret\s+"(?P<secret>[A-Za-z0-9+/=\s]+)"\s*;')
_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?$")


# -- settings ------------------------------------------------------------------------------------------------


def parse_domain(text: str) -> str:
    """``example.org`` (a trailing dot is dropped); a ValueError naming the text otherwise."""
    domain = text.strip().rstrip(".").lower()
    if not domain or not _DOMAIN.match(domain):
        raise ValueError(f"{text!r} is not a DNS domain (e.g. example.org)")
    return domain


def parse_server(text: str) -> tuple[str, int]:
    """``10.0.0.53``, ``10.0.0.53:5353`` or ``[2001:db8::53]:53`` → (address, port)."""
    import ipaddress

    value = text.strip()
    host, port = value, 53
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"{text!r} is not an address[:port] (e.g. 10.0.0.53 or 10.0.0.53:5353)")
            port = int(rest[1:])
    elif value.count(":") == 1:
        host, _, number = value.partition(":")
        if not number.isdigit():
            raise ValueError(f"{text!r} is not an address[:port] (e.g. 10.0.0.53 or 10.0.0.53:5353)")
        port = int(number)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address of a DNS server (e.g. 10.0.0.53 or 10.0.0.53:5353)") from None
    if not 0 < port < 65536:
        raise ValueError(f"the port in {text!r} is outside 1-65535")
    return host, port


def parse_tsig_key(text: str, path: str = "the key file") -> Any:
    """A ``dns.tsig.Key`` from a BIND ``key "name" { algorithm ...; secret "..."; };`` statement."""
    import dns.tsig

    cleaned = re.sub(r"(#|//)[^\n]*", "", text)
    found = _KEY.search(cleaned)
    algorithm = _ALGORITHM.search(found.group("body")) if found else None
    secret = _SECRET.search(found.group("body")) if found else None
    if found is None or algorithm is None or secret is None:
        raise ValueError(f"--dnssd-update-key: {path} holds no key statement with an algorithm and a secret "
                         '(make one with: tsig-keygen -a hmac-sha256 NAME > FILE)')
    name = algorithm.group("alg").lower()
    try:
        return dns.tsig.Key(found.group("name"), "".join(secret.group("secret").split()),
                            name if name.endswith(".") else name + ".")
    except Exception as error:
        raise ValueError(f"--dnssd-update-key: the key in {path} is not usable ({error})") from None


def load_tsig_key(path: str) -> Any:
    """The TSIG key of ``--dnssd-update-key`` (the file's mode is checked; the secret is never logged)."""
    from .credentials import read_secret_file

    return parse_tsig_key(read_secret_file(path, "dnssd-update-key").decode("utf-8", "replace"), path)


@dataclass(frozen=True)
class DnsSdSettings:
    """Where and how to browse and register."""

    domain: str
    #: The DNS server to ask (and to send updates to); None: the system resolver (and the zone's SOA MNAME).
    server: tuple[str, int] | None = None
    interval: float = 30.0
    #: A ``dns.tsig.Key``; None: browse only.
    key: Any = None

    @property
    def service_domain(self) -> str:
        """``_opencode._tcp.{domain}``."""
        return f"{SERVICE}.{self.domain}"


def make_resolver(settings: DnsSdSettings) -> Any:
    """A dnspython resolver for the named server, or the system's (``/etc/resolv.conf``); no cache."""
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=settings.server is None)
    if settings.server is not None:
        resolver.nameservers = [settings.server[0]]
        resolver.port = settings.server[1]
    resolver.timeout = QUERY_TIMEOUT
    resolver.lifetime = QUERY_LIFETIME
    return resolver


# -- browsing (in a pool thread) ------------------------------------------------------------------------------


def _label_text(label: bytes) -> str:
    return label[:MAX_TEXT_BYTES].decode("utf-8", "replace")


def browse(resolver: Any, settings: DnsSdSettings, limit: int = MAX_ENTRIES) -> list[Announcement]:
    """Every ``_opencode._tcp`` instance in the domain: PTR, then SRV + TXT, then the targets' addresses."""
    import dns.name
    import dns.resolver

    def answer(name: Any, rdtype: str) -> Any:
        try:
            return resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            return None

    service_name = dns.name.from_text(settings.service_domain)
    service_type = service_name.to_text()
    ptrs = answer(service_name, "PTR")
    if ptrs is None or ptrs.rrset is None:
        return []
    found = []
    for ptr in list(ptrs.rrset)[:limit]:
        instance = ptr.target
        if not instance.is_subdomain(service_name) or len(instance.labels) != len(service_name.labels) + 1:
            continue
        srv, txt = answer(instance, "SRV"), answer(instance, "TXT")
        if srv is None or srv.rrset is None:
            continue  # a stale PTR
        best = min(srv.rrset, key=lambda r: (r.priority, -r.weight))
        ttls = [ptrs.rrset.ttl, srv.rrset.ttl]
        addresses: list[str] = []
        for rdtype in ("A", "AAAA"):
            got = answer(best.target, rdtype)
            if got is not None and got.rrset is not None:
                addresses += [r.address for r in got.rrset]
                ttls.append(got.rrset.ttl)
        properties: dict[bytes, bytes | None] = {}
        if txt is not None and txt.rrset is not None:
            for record in txt.rrset:
                for string in record.strings:
                    key, equals, value = bytes(string).partition(b"=")
                    properties.setdefault(key.lower(), value if equals else None)
        name = ".".join([_label_text(instance.labels[0]), service_type])
        keep = max(min(ttls), KEEP_INTERVALS * settings.interval)
        found.append(Announcement("dnssd", service_type, name, best.target.to_text(), int(best.port),
                                  tuple(addresses), capped_txt(properties, (b"project", b"path", b"owner",
                                                                            b"version", b"path_prefix")),
                                  float(keep)))
    return found


class WideAreaDirectory(Service):
    """Browses the domain every interval into the LAN view; a failed browse keeps entries until their TTL."""

    def __init__(self, view: LanView, reactor: Any, settings: DnsSdSettings,
                 browse_fn: Callable[[DnsSdSettings], list[Announcement]] | None = None) -> None:
        self.view = view
        self._reactor = reactor
        self.settings = settings
        self._browse = browse_fn or (lambda s: browse(make_resolver(s), s))
        self._loop: PeriodicService | None = None
        self._last_error = ""

    def startService(self) -> None:
        """Browse now and every interval."""
        super().startService()
        self.view.feeds["dnssd"] = self.settings.domain
        self._loop = PeriodicService(self.settings.interval, self.browse_once, "wide-area DNS-SD browse",
                                     self._reactor, log)
        self._loop.startService()

    def stopService(self) -> Deferred[None]:
        """Fires once a browse in progress has ended."""
        super().stopService()
        loop, self._loop = self._loop, None
        return loop.stopService() if loop is not None and loop.running else defer.succeed(None)

    def browse_once(self) -> Deferred[None]:
        """One browse in a pool thread; its result replaces the view's wide-area entries."""
        self.view.expire()
        pool = self._reactor.getThreadPool()
        done = deferToThreadPool(self._reactor, pool, self._browse, self.settings)

        def found(announcements: list[Announcement]) -> None:
            if not self.running:
                return
            if self._last_error:
                log.info("DNS-SD: browsing {domain} works again", domain=self.settings.service_domain)
            self._last_error = ""
            self.view.replace_source("dnssd", announcements)

        def failed(failure: Any) -> None:
            message = f"{type(failure.value).__name__}: {failure.value}"
            if message != self._last_error:
                log.warn("DNS-SD: browsing {domain} failed ({error}); entries stay until their TTL; retrying "
                         "every {interval:g}s", domain=self.settings.service_domain, error=message,
                         interval=self.settings.interval)
            self._last_error = message

        return done.addCallbacks(found, failed)


# -- registering (RFC 2136 + TSIG) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """One project as registered: instance label, port, addresses, TXT."""

    label: str
    port: int
    addresses: tuple[str, ...]
    txt: tuple[tuple[str, str], ...]


def _names(settings: DnsSdSettings, label: str) -> tuple[Any, Any, Any]:
    import dns.name

    domain = dns.name.from_text(settings.domain)
    service = dns.name.Name((b"_opencode", b"_tcp", *domain.labels))
    instance = dns.name.Name((label.encode("utf-8"), *service.labels))
    host = dns.name.Name((label.encode("utf-8"), *domain.labels))
    return service, instance, host


def _txt_strings(txt: Sequence[tuple[str, str]]) -> list[bytes]:
    strings = [f"{key}=".encode() + txt_value(key, value) for key, value in txt]
    return strings or [b""]


def register_update(settings: DnsSdSettings, zone: Any, registration: Registration, exclusive: bool) -> Any:
    """The UPDATE message that registers one project (with ``exclusive``: only if its name is free)."""
    import dns.rdata
    import dns.rdataclass
    import dns.rdataset
    import dns.rdatatype
    import dns.update
    from dns.rdtypes.ANY.TXT import TXT

    service, instance, host = _names(settings, registration.label)
    update = dns.update.UpdateMessage(zone, keyring=settings.key)
    if exclusive:
        update.absent(instance)
    update.replace(instance, RECORD_TTL, "SRV", f"0 0 {registration.port} {host.to_text()}")
    txt = TXT(dns.rdataclass.IN, dns.rdatatype.TXT, _txt_strings(registration.txt))
    update.replace(instance, dns.rdataset.from_rdata(RECORD_TTL, txt))
    update.add(service, RECORD_TTL, "PTR", instance.to_text())  # add: other instances share this RRset
    update.delete(host, "A")
    update.delete(host, "AAAA")
    for address in registration.addresses:
        update.add(host, RECORD_TTL, "AAAA" if ":" in address else "A", address)
    update.add(dns.name.Name((b"_services", b"_dns-sd", b"_udp", *zone.labels)), RECORD_TTL, "PTR",
               service.to_text())
    return update


def withdraw_update(settings: DnsSdSettings, zone: Any, label: str) -> Any:
    """The UPDATE message that deletes one project's records (only our PTR in the shared RRset)."""
    import dns.update

    service, instance, host = _names(settings, label)
    update = dns.update.UpdateMessage(zone, keyring=settings.key)
    update.delete(service, "PTR", instance.to_text())
    update.delete(instance)
    update.delete(host)
    return update


class DnsUpdater:
    """Sends updates to the zone's primary server (blocking: call it in a pool thread)."""

    def __init__(self, settings: DnsSdSettings) -> None:
        self.settings = settings
        self._zone: Any = None
        self._server: tuple[str, int] | None = None

    def _target(self) -> tuple[Any, tuple[str, int]]:
        import dns.name
        import dns.resolver

        if self._zone is None or self._server is None:
            resolver = make_resolver(self.settings)
            zone = dns.resolver.zone_for_name(dns.name.from_text(self.settings.domain), resolver=resolver)
            if self.settings.server is not None:
                server = self.settings.server
            else:  # RFC 2136 §4: the primary named in the zone's SOA
                soa = resolver.resolve(zone, "SOA", search=False)
                primary = soa.rrset[0].mname
                server = (resolver.resolve(primary, "A", search=False).rrset[0].address, 53)
            self._zone, self._server = zone, server
        return self._zone, self._server

    def send(self, make: Callable[[Any], Any]) -> str:
        """Build an update for the zone with ``make(zone)``, send it over TCP; the rcode's name."""
        import dns.query
        import dns.rcode

        zone, (address, port) = self._target()
        response = dns.query.tcp(make(zone), address, port=port, timeout=QUERY_LIFETIME)
        return str(dns.rcode.to_text(response.rcode()))

    def holder(self, label: str) -> tuple[int | None, set[str]]:
        """The SRV port and the addresses a name has now (to recognise our own leftovers)."""
        import dns.resolver

        resolver = make_resolver(self.settings)
        _, instance, host = _names(self.settings, label)
        port = None
        addresses: set[str] = set()
        try:
            srv = resolver.resolve(instance, "SRV", search=False, raise_on_no_answer=False)
            if srv.rrset is not None:
                port = int(srv.rrset[0].port)
            for rdtype in ("A", "AAAA"):
                got = resolver.resolve(host, rdtype, search=False, raise_on_no_answer=False)
                if got.rrset is not None:
                    addresses |= {r.address for r in got.rrset}
        except dns.resolver.NXDOMAIN:
            pass
        return port, addresses


class WideAreaRegistrar(Service):
    """Keeps the router's own projects registered in the domain; deletes them on stop.

    Every interval it compares what should be registered (its own backends, at the router's addresses)
    with what it registered, and sends an UPDATE for each difference; a failed update is retried on the
    next interval.
    """

    def __init__(
        self,
        registry: Registry,
        reactor: Any,
        settings: DnsSdSettings,
        listening: Callable[[], Deferred[Any]],
        interfaces: Sequence[str] = (),
        addresses: Callable[[], list[InterfaceAddress]] = system_addresses,
        updater: DnsUpdater | None = None,
    ) -> None:
        self.registry = registry
        self._reactor = reactor
        self.settings = settings
        self._listening = listening
        self._selectors = list(interfaces)
        self._addresses = addresses
        self.updater = updater or DnsUpdater(settings)
        self._bind: tuple[str, int] | None = None
        #: label → what is registered under it now.
        self.registered: dict[str, Registration] = {}
        self._refused: set[str] = set()
        self._loop: PeriodicService | None = None
        self._started: Deferred[Any] | None = None
        self._last_reason = ""

    def names(self) -> set[str]:
        """The instance labels registered now (the LAN view does not list them)."""
        return set(self.registered)

    def startService(self) -> None:
        """Wait for the router's listening address, then register every interval."""
        super().startService()
        started = self._listening()
        started.addCallback(self._begin)
        started.addErrback(lambda failure: failure.trap(defer.CancelledError))
        started.addErrback(lambda failure: log.failure("DNS-SD registration could not start", failure))
        self._started = started

    def _begin(self, port: object) -> None:
        bind = tcp_address(port)
        if bind is None:
            log.info("DNS-SD: nothing registered: the router does not listen on TCP ({address})", address=port)
            return
        self._bind = bind
        self._loop = PeriodicService(self.settings.interval, self.reconcile, "DNS-SD registration", self._reactor, log)
        self._loop.startService()

    def stopService(self) -> Deferred[None]:
        """Delete every registration; fires when the server has answered (or the updates failed)."""
        super().stopService()
        if self._started is not None and not self._started.called:
            self._started.cancel()
        return defer.ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            await loop.stopService()
        for label in sorted(self.registered):
            try:
                await self._withdraw(label)
            except Exception as error:
                log.warn("DNS-SD: could not delete {label} from {domain} ({error})", label=label,
                         domain=self.settings.domain, error=f"{type(error).__name__}: {error}")
        if self._bind is not None:
            log.info("DNS-SD: stopped; registrations in {domain} withdrawn", domain=self.settings.domain)

    def wanted(self) -> dict[str, Registration]:
        """What should be registered now: each own backend at the router's addresses and port."""
        if self._bind is None:
            return {}
        plan = plan_addresses(self._bind[0], self._addresses(), self._selectors)
        if plan.reason != self._last_reason and plan.reason:
            log.info("DNS-SD: nothing registered: {reason}", reason=plan.reason)
        self._last_reason = plan.reason
        if not plan.addresses:
            return {}
        out = {}
        for backend in self.registry.backends():
            if self.registry.naming.is_own(backend.owner):
                label = _label(backend)
                out[label] = Registration(label, self._bind[1], plan.addresses, txt_records(backend))
        return out

    def reconcile(self) -> Deferred[None]:
        """Send the updates that bring the zone to ``wanted()``."""
        return defer.ensureDeferred(self._reconcile())

    async def _reconcile(self) -> None:
        wanted = self.wanted()
        for label in sorted(set(self.registered) - set(wanted)):
            await self._withdraw(label)
        for label, registration in sorted(wanted.items()):
            if self.registered.get(label) != registration:
                await self._register(registration)

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), fn, *args)

    async def _register(self, registration: Registration) -> None:
        label = registration.label
        ours = label in self.registered
        rcode = await self._in_thread(self.updater.send,
                                      lambda zone: register_update(self.settings, zone, registration, not ours))
        if rcode == "YXDOMAIN":
            port, addresses = await self._in_thread(self.updater.holder, label)
            if port == registration.port and addresses and addresses <= set(registration.addresses):
                rcode = await self._in_thread(self.updater.send,
                                              lambda zone: register_update(self.settings, zone, registration, False))
            else:
                if label not in self._refused:
                    log.warn("DNS-SD: {name} is registered by another host ({addresses} port {port}); not "
                             "registering it", name=f"{label}.{self.settings.service_domain}",
                             addresses=", ".join(sorted(addresses)) or "no address", port=port)
                    self._refused.add(label)
                return
        if rcode != "NOERROR":
            raise RuntimeError(f"the DNS server answered {rcode} to the registration of {label} in "
                               f"{self.settings.domain} (check the key and the zone's allow-update)")
        self._refused.discard(label)
        if not ours:
            log.info("DNS-SD: registered {name} at {addresses} port {port}",
                     name=f"{label}.{self.settings.service_domain}", addresses=", ".join(registration.addresses),
                     port=registration.port)
        self.registered[label] = registration

    async def _withdraw(self, label: str) -> None:
        rcode = await self._in_thread(self.updater.send, lambda zone: withdraw_update(self.settings, zone, label))
        if rcode != "NOERROR":
            raise RuntimeError(f"the DNS server answered {rcode} to the deletion of {label} in {self.settings.domain}")
        del self.registered[label]
        log.info("DNS-SD: withdrew {name}", name=f"{label}.{self.settings.service_domain}")


def _label(backend: Backend) -> str:
    """The instance label: the mDNS name when advertised (it may carry ``-2``), else the host label."""
    return backend.mdns_name or backend.host_label
