"""Host names: reading ``Host`` headers, and which names this router serves (the DNS-rebinding guard).

A web page can point its own domain at 127.0.0.1 and then talk to the router from the user's
browser. The router serves only names that really mean this machine or one of its backends;
:class:`HostPolicy` says which, and every other name is refused before anything is routed.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable

from twisted.internet.interfaces import IReactorTime

from .interfaces import machine_addresses

#: Host-mode suffixes: ``{slug}-{user}.local`` (mDNS) and ``{slug}-{user}.localhost`` (SSH tunnels).
HOST_SUFFIXES = (".local", ".localhost")

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
#: The one host grammar of the package: a DNS name (labels of at most 63 characters, an optional
#: trailing dot) or a bracketed IP literal, then an optional port.
AUTHORITY = re.compile(
    r"\A(?:(?P<name>" + _LABEL + r"(?:\." + _LABEL + r")*\.?)|\[(?P<literal>[0-9A-Fa-f:.]{2,45})\])"
    r"(?::(?P<port>[0-9]{0,5}))?\Z"
)
#: Bytes a Host header may hold at all (visible ASCII); anything else is a malformed request.
_VISIBLE_ASCII = re.compile(rb"\A[\x21-\x7e]*\Z")
#: Longest Host header routed to the router's own pages (Klein cannot IDNA-encode longer names).
MAX_AUTHORITY = 260


def authority(host: str, port: int) -> str:
    """``host:port`` as a URL authority (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host(header: str) -> tuple[str, str | None]:
    """``Host``/authority text → (lower-case name or address without brackets, port or None)."""
    text = header.strip().lower()
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        return address, port
    name, colon, port = text.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        return name.rstrip("."), port
    return text.rstrip("."), None


def is_visible_ascii(header: bytes) -> bool:
    """True when a Host header holds only visible ASCII (no raw UTF-8, no control bytes)."""
    return bool(_VISIBLE_ASCII.match(header.strip()))


def is_authority(text: str) -> bool:
    """True for ``name[:port]`` or ``[literal][:port]`` in the package's host grammar."""
    return len(text) <= MAX_AUTHORITY and AUTHORITY.match(text) is not None


def is_host_name(name: str) -> bool:
    """True for a DNS name in the package's grammar or an IP address (IPv6 without brackets)."""
    if not name:
        return False
    match = AUTHORITY.match(name)
    if match is not None and match.group("name") is not None and match.group("port") is None:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def machine_host_names() -> set[str]:
    """This machine's host name, its short form, and both under ``.local``/``.localhost``."""
    names = {"localhost"}
    full = socket.gethostname().lower().rstrip(".")
    if full:
        short = full.split(".")[0]
        names |= {full, short, f"{short}.local", f"{short}.localhost"}
    return names


class HostPolicy:
    """Which ``Host`` values the router serves; any other is a DNS-rebinding attempt."""

    def __init__(
        self,
        backend_for_label: Callable[[str], object | None],
        extra: Iterable[str] = (),
        listen_host: str | None = None,
        names: Callable[[], set[str]] = machine_host_names,
        addresses: Callable[[], set[str]] = machine_addresses,
        clock: IReactorTime | None = None,
        refresh: float = 30.0,
        own_label_suffix: str | None = None,
    ) -> None:
        #: ``{slug}-{user}`` → the backend with that host label or advertised name (the registry knows).
        self._backend_for_label = backend_for_label
        #: ``-{username}``: the router's own naming scheme; such a ``.local`` name that matches no
        #: backend (a mistyped project) gets the routing 404 listing the projects, not a 421.
        self._own_label_suffix = own_label_suffix
        self._exact: set[str] = set()
        self._suffixes: list[str] = []
        for entry in extra:
            entry = entry.strip().lower().rstrip(".")
            if entry.startswith("*."):
                self._suffixes.append(entry[1:])
            elif entry:
                self._exact.add(split_host(entry)[0])
        if listen_host and listen_host not in ("0.0.0.0", "::", ""):
            self._exact.add(listen_host.strip("[]").lower())
        self._names = names
        self._addresses = addresses
        self._clock = clock
        self._refresh = refresh
        self._machine: set[str] = set()
        self._own_names: frozenset[str] = frozenset()
        self._machine_at: float | None = None

    def _machine_names(self) -> set[str]:
        # Addresses change (DHCP, VPNs): re-read them now and then, never per request.
        now = self._clock.seconds() if self._clock is not None else 0.0
        if self._machine_at is None or (self._clock is not None and now - self._machine_at > self._refresh):
            names = self._names()
            self._machine = names | self._addresses()
            self._own_names = frozenset(name for name in names if name.endswith(HOST_SUFFIXES))
            self._machine_at = now
        return self._machine

    def is_machine_name(self, name: str) -> bool:
        """True for this machine's own ``.local``/``.localhost`` names: they reach the router, not a backend."""
        self._machine_names()
        return name in self._own_names

    def allows_header(self, header: bytes | None, local_host: str | None = None) -> bool:
        """True when a request's Host header is one the router serves (or there is none at all)."""
        if header is None:
            return True  # HTTP/1.0 without Host: not a browser, so not a rebinding page
        name, _ = split_host(header.decode("latin-1"))
        return self.allows_name(name, local_host)

    def allows_name(self, name: str, local_host: str | None = None) -> bool:
        """True when ``name`` (lower-case, no port) is served; ``local_host`` is the address the connection reached."""
        if not is_host_name(name):
            return False  # not a host name or address at all
        if name == "localhost" or name.endswith(".localhost"):
            # Browsers resolve *.localhost to the loopback themselves: no page can rebind it.
            return True
        if name in self._exact or any(name.endswith(suffix) for suffix in self._suffixes):
            return True
        if local_host is not None and name == local_host.lower().split("%", 1)[0]:
            return True
        if name in self._machine_names():
            return True
        if not name.endswith(".local"):
            return False
        if self._own_label_suffix and name[: -len(".local")].endswith(self._own_label_suffix):
            return True
        return self._backend_for_label(name[: -len(".local")]) is not None
