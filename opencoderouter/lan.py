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
- mDNS (:class:`~.lan_mdns.LanBrowser`): python-zeroconf browses ``_opencode._tcp.local.`` (routers) and
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

import ipaddress
import posixpath
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .hosts import authority, is_host_name
from .interfaces import machine_addresses, reachable_from_elsewhere
from .registry import slugify

log = Logger()

#: What ``opencode serve --mdns`` announces (bonjour-service ``type: "http"``).
PLAIN_TYPE = "_http._tcp.local."

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
        if not reachable_from_elsewhere(ip):
            continue
        kept.add(ip)
    return tuple(str(ip) for ip in sorted(kept, key=lambda ip: (ip.version, ip)))


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
        base = f"http://{authority(self.addresses[0], self.port)}/"
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
    host = server if is_host_name(server) else None
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
