"""The LAN directory: every other router's projects (and plain ``opencode serve --mdns`` servers) on the network.

What it is, and what it is not
------------------------------
A directory. Entries are what other machines announce: a host, owner, project, path, version, the
other router's address and port, and the URLs a client uses to reach the project *through that
router*. Our router never forwards a request to another host because of an entry (the proxy only
knows its own localhost backends), so a spoofed announcement can at worst add a wrong link.
Every TXT value is untrusted: size-capped, decoded leniently (invalid UTF-8 becomes U+FFFD, control
and formatting characters are dropped) and reaches the page only as text. Addresses that point back
at the client (loopback, unspecified, multicast, link-local IPv6 without a zone) are not listed.

Feeds
-----
- mDNS (:class:`LanBrowser`): python-zeroconf browses ``_opencode._tcp.local.`` (routers) and
  ``_http._tcp.local.`` limited to instances named ``opencode-<port>`` (what ``opencode serve --mdns``
  1.18.33 announces, with TXT ``path=/`` only). Like mdns.py, zeroconf runs on its own loop thread and
  results come back to the reactor with ``callFromThread``. It has its own ``Zeroconf`` instance on the
  interfaces ``--mdns-interface`` selects (IPv4), not the advertiser's: the advertiser opens its sockets
  only when the router listens beyond loopback, and the two lifecycles stay independent. Because two
  instances on one machine share UDP port 5353 (SO_REUSEPORT, where the kernel hands a unicast datagram
  to just one of them), the browser only asks QM questions: answers come by multicast, which every socket sees.
- Wide-area DNS-SD (dnssd.py) feeds the same view with ``source="dnssd"``.

Time to live
------------
python-zeroconf raises every PTR TTL below 1125 s to 1125 s in its cache, so a peer that dies without
a goodbye would stay listed for about 19 minutes (75 with the usual 4500 s). The view therefore keeps
its own expiry from the SRV and address records' TTLs (120 s for routers and opencode): at 80 % and
90 % of it the records are asked for again (RFC 6762 §5.2), and an entry whose records were not renewed
goes when they expire. A goodbye (TTL 0) removes an entry at once.

Bounds
------
At most :data:`MAX_ENTRIES` entries in all, :data:`MAX_PER_HOST` from one address, :data:`MAX_TRACKED`
names followed per service type, and :data:`MAX_RESOLVING` resolutions at a time; TXT values are cut
at :data:`MAX_TEXT_BYTES` bytes and only the known keys are kept. Changes reach the dashboard batched,
at most one ``lan`` event per :data:`PUBLISH_DELAY`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import posixpath
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from .interfaces import InterfaceAddress, machine_addresses, system_addresses
from .mdns import SERVICE_TYPE, _selected
from .periodic import PeriodicService
from .registry import slugify

log = Logger()

#: What ``opencode serve --mdns`` announces (bonjour-service ``type: "http"``).
PLAIN_TYPE = "_http._tcp.local."
_PLAIN_NAME = re.compile(r"^opencode-(\d{1,5})\._http\._tcp\.local\.$")

#: Entries in the whole view.
MAX_ENTRIES = 256
#: Entries from one address (one machine): a host announcing 1,000 services gets 64 listed.
MAX_PER_HOST = 64
#: Names the mDNS side follows per service type; more are ignored until some go away.
MAX_TRACKED = 1024
#: Resolutions (SRV/TXT/A queries) in flight at once.
MAX_RESOLVING = 8
#: A TXT value is cut to this many bytes before decoding (one DNS TXT string holds 255 at most).
MAX_TEXT_BYTES = 255
#: Instance and host names longer than this are cut (a DNS name is 253 characters at most).
MAX_NAME = 253
#: How long one resolution may wait for answers (milliseconds).
RESOLVE_MS = 3000
#: How long a renewal query waits for answers before the cache is read again (seconds).
RENEW_WAIT = 1.0
#: Changes are published at most this often (seconds): bursts become one event.
PUBLISH_DELAY = 0.2
#: How often expiry and renewal are checked (seconds).
SWEEP_INTERVAL = 1.0
#: An entry lives at least this long when its records say less (seconds).
MIN_TTL = 1.0

_SLUG = re.compile(r"^/([a-z0-9][a-z0-9-]{0,62})/$")
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*$")
_ROUTER_KEYS = (b"project", b"path", b"owner", b"version", b"path_prefix")

_TYPE_A, _TYPE_TXT, _TYPE_AAAA, _TYPE_SRV, _CLASS_IN = 1, 16, 28, 33, 1


# -- what is announced ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Announcement:
    """One resolved service as received (names decoded, TXT raw but capped), from mDNS or unicast DNS-SD."""

    source: str
    #: ``_opencode._tcp.local.``, ``_http._tcp.local.``, or ``_opencode._tcp.<domain>.``.
    service_type: str
    #: The full instance name, ``{instance}.{service_type}``.
    name: str
    server: str
    port: int
    addresses: tuple[str, ...]
    txt: tuple[tuple[bytes, bytes], ...]
    #: Seconds from now its SRV and address records stay valid.
    ttl: float


def clean_text(raw: bytes | str, limit: int = MAX_TEXT_BYTES) -> str:
    """Untrusted bytes as displayable text: cut, decoded leniently, control/format characters dropped."""
    text = raw[: limit * 4] if isinstance(raw, str) else raw[:limit].decode("utf-8", "replace")
    kept = "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf", "Cs"))
    return kept[:limit].strip()


def capped_txt(properties: dict[bytes, bytes | None], keys: Iterable[bytes]) -> tuple[tuple[bytes, bytes], ...]:
    """The wanted keys of a TXT record, each value cut to MAX_TEXT_BYTES (other keys are not kept)."""
    out = []
    for key in keys:
        value = properties.get(key)
        if value is not None:
            out.append((key, bytes(value[:MAX_TEXT_BYTES])))
    return tuple(out)


def usable_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    """The addresses a client elsewhere could use, IPv4 first (no loopback, multicast, zone-less link-local)."""
    kept = set()
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if ip.is_loopback or ip.is_unspecified or ip.is_multicast or (ip.version == 6 and ip.is_link_local):
            continue
        kept.add(ip)
    return tuple(str(ip) for ip in sorted(kept, key=lambda ip: (ip.version, ip)))


def _authority(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(frozen=True)
class LanEntry:
    """One project (or plain OpenCode server) announced by another machine, as the directory lists it."""

    id: str
    source: str
    #: True for ``_opencode._tcp`` services (a router's projects); False for plain ``opencode serve --mdns``.
    behind_router: bool
    instance: str
    host: str | None
    addresses: tuple[str, ...]
    port: int
    project_name: str | None
    project_path: str | None
    owner: str | None
    version: str | None
    slug: str | None
    first_seen: float
    last_seen: float
    expires_at: float
    #: When to ask for the records again (RFC 6762 §5.2: at 80 % of the TTL, then 90 %).
    renew_at: float

    @property
    def group(self) -> str:
        """The machine it is on: its first address."""
        return self.addresses[0]

    @property
    def url(self) -> str:
        """The URL clients use everywhere: the other router's path-mode URL (or the plain server's root)."""
        base = f"http://{_authority(self.addresses[0], self.port)}/"
        return f"{base}{self.slug}/" if self.behind_router and self.slug else base

    @property
    def host_url(self) -> str | None:
        """``http://{slug}-{user}.local:{port}/``, for clients that resolve mDNS host names."""
        if not self.behind_router or self.host is None:
            return None
        return f"http://{self.host}:{self.port}/"

    def to_json(self) -> dict[str, Any]:
        """The entry as ``/api/lan``, ``/api/resolve?scope=lan`` and the ``lan`` event show it."""
        return {
            "id": self.id,
            "source": self.source,
            "kind": "router" if self.behind_router else "opencode",
            "behind_router": self.behind_router,
            "instance": self.instance,
            "host": self.host,
            "addresses": list(self.addresses),
            "port": self.port,
            "project_name": self.project_name,
            "project_path": self.project_path,
            "owner": self.owner,
            "version": self.version,
            "slug": self.slug,
            "path_prefix": f"/{self.slug}/" if self.slug else None,
            "url": self.url,
            "host_url": self.host_url,
            "first_seen_unix": self.first_seen,
            "last_seen_unix": self.last_seen,
            "expires_unix": self.expires_at,
        }


def entry_from(announcement: Announcement, now: float, first_seen: float | None = None) -> LanEntry | None:
    """The directory entry an announcement makes, or None when it gives no usable address or port."""
    addresses = usable_addresses(announcement.addresses)
    if not addresses or not 0 < announcement.port < 65536:
        return None
    suffix = "." + announcement.service_type
    name = announcement.name
    instance = clean_text(name[: -len(suffix)] if name.lower().endswith(suffix.lower()) else name, MAX_NAME)
    server = announcement.server.rstrip(".")
    host = server if _HOST.match(server) else None
    behind_router = announcement.service_type.lower().startswith("_opencode._tcp.")
    txt = dict(announcement.txt)
    project_path = project_name = owner = version = slug = None
    if behind_router:
        project_path = clean_text(txt[b"path"]) if b"path" in txt else None
        project_name = clean_text(txt[b"project"]) if b"project" in txt else None
        if not project_name and project_path:
            project_name = posixpath.basename(project_path.rstrip("/")) or None
        owner = clean_text(txt[b"owner"]) if b"owner" in txt else None
        version = clean_text(txt[b"version"]) if b"version" in txt else None
        prefix = _SLUG.match(clean_text(txt.get(b"path_prefix", b"")))
        slug = prefix.group(1) if prefix else None
    ttl = max(announcement.ttl, MIN_TTL)
    return LanEntry(
        id=f"{announcement.source}:{clean_text(name, MAX_NAME)}",
        source=announcement.source,
        behind_router=behind_router,
        instance=instance,
        host=host,
        addresses=addresses,
        port=announcement.port,
        project_name=project_name or None,
        project_path=project_path or None,
        owner=owner or None,
        version=version or None,
        slug=slug,
        first_seen=now if first_seen is None else first_seen,
        last_seen=now,
        expires_at=now + ttl,
        renew_at=now + 0.8 * ttl,
    )


# -- who we are ----------------------------------------------------------------------------------------------


class OwnIdentity:
    """How the view recognises our own advertisements (they come back to us over multicast)."""

    def __init__(
        self,
        names: Callable[[], set[str]],
        port: Callable[[], int | None],
        addresses: Callable[[], set[str]] = machine_addresses,
    ) -> None:
        #: The instance labels we advertise now (mDNS names, wide-area registrations).
        self.names = names
        #: The port the router listens on (None before it listens).
        self.port = port
        self._read_addresses = addresses
        self._addresses: set[str] | None = None

    def refresh(self) -> None:
        """Re-read this machine's addresses (the view does it once per sweep, not once per entry)."""
        self._addresses = None

    def is_own(self, entry: LanEntry) -> bool:
        """True for our own services: from this machine's addresses, on our port."""
        if not entry.behind_router or entry.port != self.port():
            return False
        if self._addresses is None:
            self._addresses = self._read_addresses()
        return set(entry.addresses) <= self._addresses

    def claims_us(self, entry: LanEntry) -> bool:
        """True for another machine's service using a name we advertise."""
        return entry.behind_router and entry.instance in self.names()


# -- the view --------------------------------------------------------------------------------------------------


class LanView:
    """Every remote entry, bounded; the changes are published in batches to ``subscribe``\\ d callbacks."""

    def __init__(self, clock: IReactorTime, own: OwnIdentity | None = None, max_entries: int = MAX_ENTRIES,
                 max_per_host: int = MAX_PER_HOST) -> None:
        self.clock = clock
        self.own = own
        self.max_entries = max_entries
        self.max_per_host = max_per_host
        self._entries: dict[str, LanEntry] = {}
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self._pending_upsert: dict[str, LanEntry] = {}
        self._pending_remove: set[str] = set()
        self._flush_call: IDelayedCall | None = None
        self._warned: set[str] = set()
        #: Sources that feed the view, for ``/api/lan`` (e.g. ``{"mdns": True, "dnssd": "example.org"}``).
        self.feeds: dict[str, Any] = {}

    # -- reading ----------------------------------------------------------------------------------------------
    def entries(self) -> list[LanEntry]:
        """Every entry, by address, port and instance."""
        return sorted(self._entries.values(), key=lambda e: (e.group, e.port, e.instance.lower(), e.id))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, entry_id: str) -> LanEntry | None:
        """The entry with this id."""
        return self._entries.get(entry_id)

    def to_json(self) -> dict[str, Any]:
        """``/api/lan``: the entries grouped by host (address), with the bounds in force."""
        groups: dict[str, list[LanEntry]] = {}
        for entry in self.entries():
            groups.setdefault(entry.group, []).append(entry)
        return {
            "feeds": dict(self.feeds),
            "count": len(self._entries),
            "max_entries": self.max_entries,
            "max_per_host": self.max_per_host,
            "hosts": [
                {
                    "address": address,
                    "names": sorted({e.host for e in listed if e.host}),
                    "entries": [e.to_json() for e in listed],
                }
                for address, listed in groups.items()
            ],
        }

    def matches(self, name: str | None = None, path: str | None = None) -> list[LanEntry]:
        """Router entries for a project folder name (case-insensitive, or slug) or a project path."""
        routed = [e for e in self.entries() if e.behind_router]
        if path is not None:
            wanted = posixpath.normpath(path.strip()) if path.strip() else ""
            exact = [e for e in routed if e.project_path and posixpath.normpath(e.project_path) == wanted]
            if exact or not wanted:
                return exact
            name = posixpath.basename(wanted.rstrip("/"))
        wanted_name = (name or "").strip()
        if not wanted_name:
            return []
        named = [e for e in routed if e.project_name and e.project_name.lower() == wanted_name.lower()]
        return named or [e for e in routed if e.slug == slugify(wanted_name)]

    # -- changes ------------------------------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback({"upsert": [...], "remove": [...], "count": n})`` after each batch of changes."""
        self._subscribers.append(callback)

    def saw(self, announcement: Announcement) -> LanEntry | None:
        """Add or renew the entry an announcement makes (if it is admitted); returns it."""
        now = self.clock.seconds()
        entry_id = f"{announcement.source}:{clean_text(announcement.name, MAX_NAME)}"
        known = self._entries.get(entry_id)
        entry = entry_from(announcement, now, known.first_seen if known else None)
        if entry is None:
            if known is not None:
                self.remove(entry_id)
            return None
        if not self._admit(entry, known):
            if known is not None:
                self.remove(entry_id)
            return None
        self._entries[entry.id] = entry
        if known is None or _shown(known) != _shown(entry):
            self._changed(entry)
        return entry

    def _admit(self, entry: LanEntry, known: LanEntry | None) -> bool:
        if self.own is not None:
            if self.own.is_own(entry):
                return False
            if self.own.claims_us(entry):
                self._warn_once(f"claim:{entry.instance}:{entry.group}",
                                "LAN: {address} announces {name}, a name this router advertises; not listed",
                                address=entry.group, name=entry.instance)
                return False
        if known is not None and known.group == entry.group:
            return True
        if len(self._entries) >= self.max_entries:
            self._warn_once("max_entries", "LAN: {count} entries listed already (the most the view keeps); "
                            "{name} from {address} is not listed", count=self.max_entries, name=entry.instance,
                            address=entry.group)
            return False
        if sum(1 for e in self._entries.values() if e.group == entry.group) >= self.max_per_host:
            self._warn_once(f"host:{entry.group}", "LAN: {address} announces more than {count} services; only the "
                            "first {count} are listed", address=entry.group, count=self.max_per_host)
            return False
        return True

    def _warn_once(self, key: str, message: str, **fields: Any) -> None:
        if key in self._warned:
            return
        if len(self._warned) < 4 * self.max_entries:  # the memory of warnings is bounded too
            self._warned.add(key)
        log.warn(message, **fields)

    def remove(self, entry_id: str) -> None:
        """Drop an entry (goodbye, expiry, or gone from a wide-area browse)."""
        if self._entries.pop(entry_id, None) is not None:
            self._pending_upsert.pop(entry_id, None)
            self._pending_remove.add(entry_id)
            self._schedule()

    def replace_source(self, source: str, announcements: Sequence[Announcement]) -> None:
        """A complete fresh listing of ``source`` (a wide-area browse): what it lacks goes."""
        seen = {e.id for e in (self.saw(a) for a in announcements) if e is not None}
        for entry_id in [i for i, e in self._entries.items() if e.source == source and i not in seen]:
            self.remove(entry_id)

    def due_for_renewal(self) -> list[LanEntry]:
        """Entries whose records should be asked for again now; each is asked once per renewal point."""
        now = self.clock.seconds()
        due = [e for e in self._entries.values() if e.renew_at <= now < e.expires_at]
        for entry in due:
            # The next point is half-way to expiry (80 % → 90 % → 95 % ...), never past it.
            self._entries[entry.id] = replace(entry, renew_at=now + max((entry.expires_at - now) / 2, 0.5))
        return due

    def expire(self) -> list[LanEntry]:
        """Drop entries whose records' TTL has run out (and our own, once we know them); returns them."""
        now = self.clock.seconds()
        if self.own is not None:
            self.own.refresh()
        gone = [e for e in self._entries.values() if e.expires_at <= now or (self.own is not None
                                                                             and self.own.is_own(e))]
        for entry in gone:
            self.remove(entry.id)
        return gone

    def _changed(self, entry: LanEntry) -> None:
        self._pending_remove.discard(entry.id)
        self._pending_upsert[entry.id] = entry
        self._schedule()

    def _schedule(self) -> None:
        if self._flush_call is None or not self._flush_call.active():
            self._flush_call = self.clock.callLater(PUBLISH_DELAY, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        upsert = [self._entries[i].to_json() for i in self._pending_upsert if i in self._entries]
        remove = sorted(self._pending_remove)
        self._pending_upsert, self._pending_remove = {}, set()
        if not upsert and not remove:
            return
        payload = {"upsert": upsert, "remove": remove, "count": len(self._entries),
                   "server_time": self.clock.seconds()}
        for callback in list(self._subscribers):
            try:
                callback(payload)
            except Exception:
                log.failure("LAN change subscriber failed")

    def close(self) -> None:
        """Cancel a pending publication (the router is stopping)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None


def _shown(entry: LanEntry) -> tuple[object, ...]:
    """What a subscriber hears about when it changes (renewed TTLs alone are not a change)."""
    return (entry.host, entry.addresses, entry.port, entry.project_name, entry.project_path, entry.owner,
            entry.version, entry.slug)


# -- the zeroconf side ------------------------------------------------------------------------------------------


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

    def __init__(self, reactor: Any, zeroconf: Any, report: BrowseReport) -> None:
        self._reactor = reactor
        self._zc = zeroconf
        self._report = report
        self._tracked: dict[str, set[str]] = {SERVICE_TYPE: set(), PLAIN_TYPE: set()}
        self._resolving: set[str] = set()
        self._browser: Any = None
        self._semaphore: asyncio.Semaphore | None = None
        self._overflow_warned = False

    @classmethod
    def start(cls, reactor: Any, interfaces: Sequence[str | int], report: BrowseReport) -> Deferred[ZeroconfBrowsing]:
        """Open the sockets on ``interfaces`` and start browsing both service types."""
        from zeroconf import IPVersion, Zeroconf

        made = deferToThreadPool(reactor, reactor.getThreadPool(), Zeroconf, interfaces=list(interfaces),
                                 ip_version=IPVersion.V4Only, use_asyncio=False)

        def browse(zc: Any) -> Deferred[ZeroconfBrowsing]:
            browsing = cls(reactor, zc, report)

            def failed(failure: Any) -> Any:
                # Do not leave the sockets and the loop thread behind.
                closing = deferToThreadPool(reactor, reactor.getThreadPool(), zc.close)
                return closing.addBoth(lambda _: failure)

            return browsing._run(browsing._start_browser).addCallbacks(lambda _: browsing, failed)

        return made.addCallback(browse)

    def _run(self, make: Callable[[], Any]) -> Deferred[Any]:
        """Run a coroutine on zeroconf's loop; the Deferred fires on the reactor thread."""
        future = asyncio.run_coroutine_threadsafe(make(), self._zc.loop)

        def cancel(_: Deferred[Any]) -> None:
            future.cancel()

        result: Deferred[Any] = Deferred(cancel)

        def finished(done: Any) -> None:
            if result.called:
                return
            if done.cancelled():
                result.errback(defer.CancelledError())
            elif done.exception() is not None:
                result.errback(done.exception())
            else:
                result.callback(done.result())

        future.add_done_callback(lambda done: self._reactor.callFromThread(finished, done))
        return result

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
            self._reactor.callFromThread(self._report.gone, name)
            return
        if name not in tracked:
            if len(tracked) >= MAX_TRACKED:
                if not self._overflow_warned:
                    self._overflow_warned = True
                    self._reactor.callFromThread(log.warn, "LAN: more than {count} {type} services on the network; "
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
                self._reactor.callFromThread(log.warn, "LAN: could not read {name}: {error}", name=name,
                                             error=repr(error))
                return
            if announcement is not None:
                self._reactor.callFromThread(self._report.seen, announcement)

    def renew(self, service_type: str, name: str) -> Deferred[None]:
        """Ask again for a service's SRV/TXT/A records (answers land in the cache, then are reported)."""

        async def go() -> None:
            self._spawn(service_type, name, renew=True)

        return self._run(go)

    def update_interfaces(self, interfaces: Sequence[str | int]) -> Deferred[None]:
        """Add and drop sockets to match ``interfaces``."""
        return self._run(lambda: self._zc.async_update_interfaces(list(interfaces)))

    def close(self) -> Deferred[None]:
        """Cancel the browser, then close zeroconf (which waits for its loop thread, hence in a pool thread)."""

        async def cancel() -> None:
            if self._browser is not None:
                await self._browser.async_cancel()

        def closed(_: object) -> Deferred[None]:
            return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._zc.close)

        return self._run(cancel).addBoth(closed)


def browse_interfaces(entries: Iterable[InterfaceAddress], selectors: Sequence[str] = ()) -> tuple[str, ...]:
    """The IPv4 addresses to browse on: every non-loopback one that ``--mdns-interface`` selects."""
    chosen = {e.address for e in entries if e.ip.version == 4 and not e.ip.is_loopback and _selected(e, selectors)}
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
            await _settled(self._starting)
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


async def _settled(waiting: Deferred[Any]) -> None:
    """Wait for ``waiting`` to fire, whatever the outcome (failures are handled where it is awaited)."""
    done: Deferred[None] = Deferred()

    def passed(result: object) -> object:
        if not done.called:
            done.callback(None)
        return result

    waiting.addBoth(passed)
    await done
