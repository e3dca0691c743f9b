"""The root resource: host-based routing, the router's own routes, path-based routing, 404s."""

from __future__ import annotations

import html
import json
import re
from typing import Callable, Protocol
from urllib.parse import quote

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from .registry import Backend, Registry

_HOST_SUFFIXES = (".local", ".localhost")


class ProxyFactory(Protocol):
    """Builds the resource that forwards one request to a backend."""

    def __call__(self, backend: Backend, path: bytes, prefix: bytes, mode: str) -> IResource:
        """Forward to ``backend`` the raw ``path`` (with query); ``prefix`` was stripped (path mode)."""


_VALID_HOST = re.compile(rb"\A[\x21-\x7e]*\Z")
_LABEL = rb"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
#: A host name (labels of at most 63 characters) or an IP literal, with an optional port.
_STRICT_HOST = re.compile(
    rb"\A(?:" + _LABEL + rb"(?:\." + _LABEL + rb")*\.?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{0,5})?\Z"
)


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


def host_name(request: IRequest) -> str | None:
    """The Host header's name, lower-cased, without port or trailing dot; None for IPv6 literals."""
    header = request.getHeader(b"host")
    if not header or header.strip().startswith(b"["):
        return None
    name, _port = split_host(header.decode("latin-1"))
    return name or None


def split_first_segment(uri: bytes) -> tuple[bytes, bytes, bytes]:
    """Split a raw request URI into (first segment, rest of the path, query with its ``?``)."""
    path, question, query = uri.partition(b"?")
    without_slash = path[1:] if path.startswith(b"/") else path
    first, slash, rest = without_slash.partition(b"/")
    return first, slash + rest, question + query


def wants_html(request: IRequest) -> bool:
    """True when the client prefers a page (a browser) to JSON."""
    accept = (request.getHeader(b"accept") or b"").decode("latin-1").lower()
    return "text/html" in accept


class NotFound(Resource):
    """404 for an unknown project: JSON for API clients, a small page for browsers."""

    isLeaf = True

    def __init__(self, slug: str, known: list[str]) -> None:
        super().__init__()
        self.slug = slug
        self.known = known

    def render(self, request: IRequest) -> bytes:
        """Answer 404 in the representation the client accepts."""
        request.setResponseCode(404)
        request.setHeader(b"cache-control", b"no-store")
        if wants_html(request):
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            items = "".join(
                f'<li><a href="/{quote(slug)}/">{html.escape(slug)}</a></li>' for slug in self.known
            ) or "<li>none yet</li>"
            page = (
                "<!doctype html><meta charset=utf-8><title>No such project</title>"
                f"<h1>No project {html.escape(self.slug)!s}</h1>"
                f"<p>Known projects:</p><ul>{items}</ul><p><a href=\"/\">Dashboard</a></p>"
            )
            return page.encode("utf-8")
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": "not_found", "slug": self.slug, "known": self.known}).encode("utf-8") + b"\n"


class BadHost(Resource):
    """400 for a Host header no client could mean (raw non-ASCII or control bytes)."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        """Say which header was wrong."""
        request.setResponseCode(400)
        request.setHeader(b"content-type", b"application/json")
        host = (request.getHeader(b"host") or b"").decode("latin-1")[:200]
        message = f"Host header {host!r} is not a host name (use ASCII; IDNs in punycode)"
        return json.dumps({"error": "bad_request", "message": message}).encode("utf-8") + b"\n"


class RedirectToSlash(Resource):
    """``/{slug}`` → 308 ``/{slug}/``, query kept."""

    isLeaf = True

    def __init__(self, location: bytes) -> None:
        super().__init__()
        self.location = location

    def render(self, request: IRequest) -> bytes:
        """Send the permanent redirect."""
        request.setResponseCode(308)
        request.setHeader(b"location", self.location)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Moved to " + self.location + b"\n"


class RouterResource(Resource):
    """The twisted.web root: host-based, then the router's own routes, then path-based."""

    def __init__(
        self,
        registry: Registry,
        proxy_factory: ProxyFactory,
        own_routes: dict[bytes, IResource],
        dashboard: IResource,
        own_host_names: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.registry = registry
        self.proxy_factory = proxy_factory
        self.own_routes = own_routes
        self.dashboard = dashboard
        #: Names of the router's own machine (``devbox.local``): they reach the router, not a backend.
        self.own_host_names = own_host_names

    def backend_for_host(self, name: str) -> Backend | None:
        """The backend whose ``.local``/``.localhost`` name (or advertised alias) is ``name``."""
        for suffix in _HOST_SUFFIXES:
            if name.endswith(suffix):
                label = name[: -len(suffix)]
                break
        else:
            return None
        return self.registry.by_host_label(label)

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        """Pick the resource for this request (``name`` is the first path segment)."""
        raw_host = request.getHeader(b"host")
        if raw_host and not _VALID_HOST.match(raw_host.strip()):
            return BadHost()
        host = host_name(request)
        if host is not None and host.endswith(_HOST_SUFFIXES) and host not in self.own_host_names:
            backend = self.backend_for_host(host)
            if backend is None:
                label = host.rsplit(".", 1)[0]
                return NotFound(label, [b.slug for b in self.registry.backends()])
            request.postpath.insert(0, request.prepath.pop())
            return self.proxy_factory(backend, request.uri, b"", "host")
        if name == b"":
            return self.dashboard
        if name in self.own_routes:
            # Klein (werkzeug) answers 500 to a Host it cannot IDNA-encode (a 64-character label).
            if raw_host and (len(raw_host) > 260 or not _STRICT_HOST.match(raw_host.strip())):
                return BadHost()
            return self.own_routes[name]
        slug = name.decode("utf-8", "replace")
        backend = self.registry.by_slug(slug)
        if backend is None:
            return NotFound(slug, [b.slug for b in self.registry.backends()])
        first, rest, query = split_first_segment(request.uri)
        prefix = b"/" + first
        if not rest:
            return RedirectToSlash(prefix + b"/" + query)
        return self.proxy_factory(backend, rest + query, prefix, "path")
