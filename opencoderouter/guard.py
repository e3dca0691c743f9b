"""The guard: a resource wrapped around the root that decides whether a routed request may go on.

Routing has already said where the request goes (its :class:`~.routing.Route`); the guard asks
whether it may: a state-changing request from another site's page is refused (403), and with the
router's authentication on, every request but ``GET /api/health`` and CORS preflights needs the
router's credentials (:mod:`.auth`). Requests to a host name the router does not serve, and the
sign-in form, pass straight to the root, which answers them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource, getChildForRequest

from .auth import Authentication, is_authenticated
from .hosts import HostPolicy, split_host
from .responses import JSONAnswer, error_body
from .routing import Route, RouteKind, RouterResource, route_of

HEALTH_PATH = b"/api/health"
#: Methods that do not change state; a foreign Origin on them is harmless (CORS hides the answer).
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})

FORBIDDEN_ORIGIN = JSONAnswer(
    403,
    error_body("forbidden_origin",
               "requests from another site's pages are refused; allow an origin with --cors-origin"),
)


def is_loopback_address(address: object) -> bool:
    """True for a peer on 127.0.0.0/8, ::1 (or IPv4-mapped loopback) or a UNIX socket."""
    host = getattr(address, "host", None)
    if host is None:
        # UNIX sockets (and other non-IP transports) are local by construction.
        return getattr(address, "name", None) is not None or type(address).__name__ == "UNIXAddress"
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def may_change_instances(request: IRequest) -> bool:
    """Launcher endpoints (``POST/DELETE /api/instances``): a loopback peer or an authenticated request."""
    return is_loopback_address(request.getClientAddress()) or is_authenticated(request)


class Guard:
    """Origin check and authentication for routed requests."""

    def __init__(self, hosts: HostPolicy, authentication: Authentication | None = None,
                 cors_origins: Iterable[str] = ()) -> None:
        self.hosts = hosts
        self.authentication = authentication
        self.cors_origins = frozenset(cors_origins)

    def origin_allowed(self, request: IRequest) -> bool:
        """True when a request's Origin (if any) is the router's own or listed with ``--cors-origin``."""
        origin = request.getHeader(b"origin")
        if origin is None:
            return True
        text = origin.decode("latin-1").strip().lower().rstrip("/")
        if text in self.cors_origins:
            return True
        parts = urlsplit(text)
        try:
            hostname, port = parts.hostname, parts.port
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not hostname:
            return False  # "null" (sandboxed frames, file://) and oddities are foreign
        host_header = request.getHeader(b"host")
        if host_header is None:
            return False
        origin_port = str(port or (443 if parts.scheme == "https" else 80))
        _, own_port = split_host(host_header.decode("latin-1"))
        if origin_port != (own_port or "80"):
            return False
        local = getattr(request.getHost(), "host", None)
        return self.hosts.allows_name(hostname.rstrip("."), local)

    def check(self, request: IRequest, route: Route, proceed: Callable[[], IResource]) -> IResource | None:
        """None to let the root answer; else what answers instead (``proceed()`` routes it once accepted)."""
        if route.kind is RouteKind.FOREIGN_HOST:
            return None  # the root answers 421, whoever asks
        if _state_changing(request) and not self.origin_allowed(request):
            return FORBIDDEN_ORIGIN
        if route.kind is RouteKind.LOGIN:
            return None
        authentication = self.authentication
        if authentication is None or not authentication.authenticator.enabled or _exempt(request, route):
            return None
        return authentication.check(request, proceed)


def _state_changing(request: IRequest) -> bool:
    if request.method not in SAFE_METHODS:
        return True
    upgrade = (request.getHeader(b"upgrade") or b"").lower()
    return b"websocket" in upgrade


def _exempt(request: IRequest, route: Route) -> bool:
    if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
        return True  # CORS preflights never carry credentials
    return route.kind is RouteKind.API and request.path == HEALTH_PATH and request.method in (b"GET", b"HEAD")


class GuardedRoot(Resource):
    """The Site's root resource: the guard in front of the router's root."""

    def __init__(self, root: RouterResource, guard: Guard) -> None:
        super().__init__()
        self.root = root
        self.guard = guard

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        """The guard's answer, or the routed resource."""
        route = route_of(request, self.root.router)

        def proceed() -> IResource:
            return getChildForRequest(self.root.getChildWithDefault(name, request), request)

        answer = self.guard.check(request, route, proceed)
        if answer is not None:
            return answer
        return self.root.getChildWithDefault(name, request)
