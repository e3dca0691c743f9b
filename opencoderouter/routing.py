"""Where a request goes, decided once: :func:`Router.classify` → :class:`Route`, and the root resource.

The decision reads the ``Host`` header, the request target and the registry, in this order:

1. a Host that is not visible ASCII (raw UTF-8, control bytes) → ``BAD_HOST`` (400);
2. a Host the router does not serve (DNS rebinding) → ``FOREIGN_HOST`` (421);
3. ``/_router/login`` when the router has a sign-in form → ``LOGIN``;
4. ``{slug}-{user}.local`` / ``.localhost`` → that backend, path untouched (``HOST`` mode), or
   ``UNKNOWN_PROJECT`` (404) when no backend has that name;
5. the router's own routes: ``/`` (dashboard), ``/api/...``, ``/metrics``, ``/_router/...``;
6. a browser navigating to a project's path-mode root (``/{slug}/`` or ``/{slug}``) →
   ``WEB_UI_REDIRECT``: the OpenCode web UI works only under its own origin, so the browser is sent
   to the host-mode URL that works from where it came (:mod:`.links`), or, from the LAN without
   mDNS, to a page explaining the two ways in;
7. ``/{slug}/rest?query`` → that backend with the prefix stripped (``PATH`` mode); ``/{slug}`` →
   ``SLASH_REDIRECT`` (308 to ``/{slug}/``); an unknown slug → ``UNKNOWN_PROJECT``.

The channel computes the Route when a request head is complete (the body limit depends on it),
and the guard and the root resource read that same value.
"""

from __future__ import annotations

import enum
import html
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, unquote_to_bytes

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from .hosts import HOST_SUFFIXES, HostPolicy, is_authority, is_visible_ascii, split_host
from .links import tunnel_url, web_url
from .registry import RESERVED_SLUGS, Backend, Registry
from .responses import JSONAnswer, error_body, json_response

#: The sign-in form's path (on every host name, so a cookie can be set for each).
LOGIN_PATH = b"/_router/login"
#: The router's own files; ``_`` never appears in a slug, so no project can shadow them.
ASSETS_SEGMENT = b"_router"


class Mode(enum.Enum):
    """How a request names its backend."""

    HOST = "host"
    PATH = "path"


class RouteKind(enum.Enum):
    """What answers a request."""

    FOREIGN_HOST = "foreign_host"
    LOGIN = "login"
    BAD_HOST = "bad_host"
    DASHBOARD = "dashboard"
    ROUTER_ASSET = "router_asset"
    API = "api"
    METRICS = "metrics"
    BACKEND = "backend"
    SLASH_REDIRECT = "slash_redirect"
    WEB_UI_REDIRECT = "web_ui_redirect"
    UNKNOWN_PROJECT = "unknown_project"


#: First path segments the router serves itself, and what they are.
OWN_SEGMENTS = {b"api": RouteKind.API, b"metrics": RouteKind.METRICS, ASSETS_SEGMENT: RouteKind.ROUTER_ASSET}
assert {s.decode() for s in OWN_SEGMENTS if not s.startswith(b"_")} <= RESERVED_SLUGS, "slugs must not shadow routes"


@dataclass(frozen=True)
class Route:
    """The routing decision for one request."""

    kind: RouteKind
    backend: Backend | None = None
    mode: Mode | None = None
    #: BACKEND: the path and query to send; SLASH_REDIRECT, WEB_UI_REDIRECT: the Location
    #: (empty for a WEB_UI_REDIRECT that has no working name: the page explains instead).
    target: bytes = b""
    #: PATH mode: the prefix that was stripped (``/{slug}``).
    prefix: bytes = b""
    #: UNKNOWN_PROJECT: the slug or host label asked for.
    name: str = ""

    @property
    def to_backend(self) -> bool:
        """True when the request is forwarded to a backend (rather than answered by the router)."""
        return self.kind is RouteKind.BACKEND


_FOREIGN = Route(RouteKind.FOREIGN_HOST)
_LOGIN = Route(RouteKind.LOGIN)
_BAD_HOST = Route(RouteKind.BAD_HOST)
_DASHBOARD = Route(RouteKind.DASHBOARD)
_OWN = {segment: Route(kind) for segment, kind in OWN_SEGMENTS.items()}


def split_first_segment(uri: bytes) -> tuple[bytes, bytes, bytes]:
    """Split a raw request URI into (first segment, rest of the path, query with its ``?``)."""
    path, question, query = uri.partition(b"?")
    without_slash = path[1:] if path.startswith(b"/") else path
    first, slash, rest = without_slash.partition(b"/")
    return first, slash + rest, question + query


class Router:
    """Decides where each request goes, from its Host, its target and the registry."""

    def __init__(self, registry: Registry, hosts: HostPolicy, login_enabled: bool = False, mdns: bool = False) -> None:
        self.registry = registry
        self.hosts = hosts
        #: The router has a sign-in form (a token is configured).
        self.login_enabled = login_enabled
        #: Backends are advertised over mDNS (``.local`` names work on the LAN).
        self.mdns = mdns

    def backend_for_host(self, name: str) -> Backend | None:
        """The backend whose ``.local``/``.localhost`` name (host label or advertised name) is ``name``."""
        for suffix in HOST_SUFFIXES:
            if name.endswith(suffix):
                return self.registry.by_host_label(name[: -len(suffix)])
        return None

    def classify(self, host: bytes | None, uri: bytes, local_host: str | None = None,
                 navigating: bool = False) -> Route:
        """The Route for a request with this Host header and raw target.

        ``local_host`` is the address the connection arrived on; ``navigating`` says a browser is
        loading a page (see :func:`is_navigation`).
        """
        if host and not is_visible_ascii(host):
            return _BAD_HOST
        name: str | None = None
        if host is not None:
            # The Host header is split once: for the rebinding guard and for host-mode routing.
            split_name, _port = split_host(host.decode("latin-1"))
            if not self.hosts.allows_name(split_name, local_host):
                return _FOREIGN
            if split_name and not host.strip().startswith(b"["):
                name = split_name
        path = uri.split(b"?", 1)[0]
        if self.login_enabled and path == LOGIN_PATH:
            return _LOGIN
        if name is not None and name.endswith(HOST_SUFFIXES) and not self.hosts.is_machine_name(name):
            backend = self.backend_for_host(name)
            if backend is None:
                return Route(RouteKind.UNKNOWN_PROJECT, name=name.rsplit(".", 1)[0])
            return Route(RouteKind.BACKEND, backend, Mode.HOST, target=uri)
        # The first segment as Twisted's resource traversal sees it (after the first byte, percent-decoded).
        first = unquote_to_bytes(path[1:].split(b"/", 1)[0])
        if first == b"":
            return _DASHBOARD
        own = _OWN.get(first)
        if own is not None:
            # Klein (werkzeug) answers 500 to a Host it cannot IDNA-encode (a 64-character label).
            if host and not is_authority(host.strip().decode("ascii")):
                return _BAD_HOST
            return own
        slug = first.decode("utf-8", "replace")
        backend = self.registry.by_slug(slug)
        if backend is None:
            return Route(RouteKind.UNKNOWN_PROJECT, name=slug)
        raw_first, rest, query = split_first_segment(uri)
        prefix = b"/" + raw_first
        if navigating and rest in (b"", b"/") and host:
            url = web_url(backend, host.strip().decode("ascii"), self.mdns)
            location = url.encode("ascii") + query if url is not None else b""
            return Route(RouteKind.WEB_UI_REDIRECT, backend, target=location, name=backend.slug)
        if not rest:
            return Route(RouteKind.SLASH_REDIRECT, backend, target=prefix + b"/" + query)
        return Route(RouteKind.BACKEND, backend, Mode.PATH, target=rest + query, prefix=prefix)

    def classify_request(self, request: IRequest) -> Route:
        """:meth:`classify` for a complete request."""
        local = getattr(request.getHost(), "host", None)
        navigating = is_navigation(request.method, request.getHeader(b"sec-fetch-mode"), request.getHeader(b"accept"))
        return self.classify(request.getHeader(b"host"), request.uri, local, navigating)


def is_navigation(method: bytes, fetch_mode: bytes | None, accept: bytes | None) -> bool:
    """True when a browser loads a page (``Sec-Fetch-Mode: navigate``, or it accepts HTML and is not a fetch()).

    API and SSE clients (curl, the SDK, dispatch) send neither, so they keep path mode exactly.
    """
    if method not in (b"GET", b"HEAD"):
        return False
    mode = (fetch_mode or b"").strip().lower()
    if mode == b"navigate":
        return True
    return mode != b"cors" and b"text/html" in (accept or b"").lower()


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
        if wants_html(request):
            request.setResponseCode(404)
            request.setHeader(b"cache-control", b"no-store")
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
        return json_response(request, error_body("not_found", slug=self.slug, known=self.known), 404)


class BadHost(Resource):
    """400 for a Host header no client could mean (raw non-ASCII or control bytes)."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        """Say which header was wrong."""
        host = (request.getHeader(b"host") or b"").decode("latin-1")[:200]
        message = f"Host header {host!r} is not a host name (use ASCII; IDNs in punycode)"
        return json_response(request, error_body("bad_request", message), 400)


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


class WebUIRedirect(Resource):
    """A browser at a project's path-mode root: 307 to its host-mode URL, or a page saying how to get one."""

    isLeaf = True

    def __init__(self, route: Route) -> None:
        super().__init__()
        self.route = route

    def render(self, request: IRequest) -> bytes:
        """Redirect (temporarily: the right name depends on where the browser is), or explain."""
        request.setHeader(b"cache-control", b"no-store")
        if self.route.target:
            request.setResponseCode(307)
            request.setHeader(b"location", self.route.target)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"The OpenCode web UI needs its own host name: " + self.route.target + b"\n"
        backend = self.route.backend
        assert backend is not None
        authority = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        tunnel = tunnel_url(backend, authority)
        host, port = split_host(authority)
        port_text = port or "80"
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        page = (
            "<!doctype html><meta charset=utf-8><title>Open the project's web UI</title>"
            f"<h1>{html.escape(backend.slug)}: open it by its own name</h1>"
            "<p>The OpenCode web UI needs its own host name; under a path like this one it cannot load.</p>"
            "<ol><li>Through an SSH tunnel to this machine "
            f"(<code>ssh -L {html.escape(port_text)}:localhost:{html.escape(port_text)} "
            f"USER@{html.escape(host)}</code>), "
            f"open <a href=\"{html.escape(tunnel)}\">{html.escape(tunnel)}</a>.</li>"
            "<li>Or have the router advertise its projects on the LAN: start it with <code>--mdns=true</code> "
            "(the default), then open <code>http://"
            f"{html.escape(backend.host_label)}.local:{html.escape(port_text)}/</code>.</li></ol>"
            f"<p>API and event-stream clients keep using <code>/{html.escape(backend.slug)}/</code>.</p>"
        )
        return page.encode("utf-8")


MISDIRECTED = JSONAnswer(
    421,
    error_body("misdirected_request", "this router does not serve that host name; "
               "add it with --allowed-host if it is really this machine"),
)


class ProxyFactory(Protocol):
    """Builds (or looks up) the resource that forwards requests on a Route to its backend."""

    def __call__(self, route: Route) -> IResource:
        """The forwarding resource for ``route`` (its backend, mode, target and prefix)."""


def route_of(request: IRequest, router: Router) -> Route:
    """The request's Route: the one its channel decided, or decided now for requests made elsewhere."""
    from .channel import RouterRequest

    if isinstance(request, RouterRequest):
        if request.route is None:
            request.route = router.classify_request(request)
        return request.route
    return router.classify_request(request)


class RouterResource(Resource):
    """The twisted.web root: answers each request the way its Route says."""

    def __init__(
        self,
        router: Router,
        proxy_factory: ProxyFactory,
        own_routes: dict[bytes, IResource],
        dashboard: IResource,
        login: IResource | None = None,
    ) -> None:
        super().__init__()
        self.router = router
        self.registry = router.registry
        self.proxy_factory = proxy_factory
        self.own_routes = own_routes
        self.dashboard = dashboard
        self.login = login

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        """The resource for this request (``name``, its first path segment, is already in the Route)."""
        route = route_of(request, self.router)
        kind = route.kind
        if kind is RouteKind.BACKEND:
            return self.proxy_factory(route)
        if kind is RouteKind.DASHBOARD:
            return self.dashboard
        if kind in (RouteKind.API, RouteKind.METRICS, RouteKind.ROUTER_ASSET):
            own = self.own_routes.get(name)
            if own is not None:
                return own
        if kind is RouteKind.SLASH_REDIRECT:
            return RedirectToSlash(route.target)
        if kind is RouteKind.WEB_UI_REDIRECT:
            return WebUIRedirect(route)
        if kind is RouteKind.BAD_HOST:
            return BadHost()
        if kind is RouteKind.FOREIGN_HOST:
            return MISDIRECTED
        if kind is RouteKind.LOGIN and self.login is not None:
            return self.login
        return NotFound(route.name or name.decode("utf-8", "replace"), [b.slug for b in self.registry.backends()])
