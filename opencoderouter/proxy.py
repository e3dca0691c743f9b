"""The per-backend proxy resource: where a routed request is handed to forwarding.

:class:`BackendResource` is a ``ReverseProxyResource`` (same constructor: host, port, path) whose
``render`` sends the request through the router's shared :class:`~.forwarding.Forwarder` instead of
Twisted's HTTP/1.0 client; what stays the same for a backend is built once per backend
(:class:`~.forwarding.BackendTarget`), so a resource per request costs next to nothing.
:class:`BackendProxyFactory` is what the root resource calls with a backend :class:`~.routing.Route`.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET

from .channel import server_request
from .forwarding import BackendTarget, Forwarder, error_answer
from .headers import is_websocket_upgrade
from .routing import Mode, Route

#: What goes out as a request target (origin-form, visible ASCII); anything else is a 400.
_VALID_TARGET = re.compile(rb"\A/[\x21-\x7e]*\Z")


class BackendResource(ReverseProxyResource):
    """Forwards one request to ``host:port`` + ``path`` (Twisted's constructor, the router's forwarder)."""

    isLeaf = True

    def __init__(
        self,
        host: str,
        port: int,
        path: bytes,
        reactor: Any = None,
        *,
        forwarder: Forwarder,
        target: BackendTarget,
        prefix: bytes = b"",
        mode: str = "path",
    ) -> None:
        # ReverseProxyResource.__init__ also runs Resource.__init__.
        super().__init__(host, port, path, reactor or forwarder.reactor)
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"backends listen on the loopback (127.0.0.1 or ::1), not {host!r}")
        self.forwarder = forwarder
        self.target = target
        self.prefix = prefix
        self.mode = mode

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        """A leaf: the whole remaining path is already in ``self.path``."""
        return self

    def render(self, request: IRequest) -> Any:
        """Forward the request; the response is written when the backend answers."""
        target = self.path
        if not _VALID_TARGET.match(target):
            error_answer(
                request, 400, "bad_request",
                f"request target {target[:200]!r} is not an origin-form path of visible ASCII", self.target.slug,
            )
            return NOT_DONE_YET
        # Responses carry the backend's headers only: no text/html default, no Twisted Server header.
        server_request(request).defaultContentType = None
        self.forwarder.forward(request, self.target, target, self.prefix, self.mode,
                               upgrade=is_websocket_upgrade(request))
        return NOT_DONE_YET


class BackendProxyFactory:
    """Builds the forwarding resource for a backend Route; owns the shared Forwarder."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def __call__(self, route: Route) -> IResource:
        """The resource forwarding ``route.target`` to ``route.backend`` (``route.prefix`` was stripped)."""
        backend = route.backend
        assert backend is not None and route.mode is not None, "only backend routes are forwarded"
        path_mode = route.mode is Mode.PATH
        return BackendResource(
            backend.address, backend.port, route.target, forwarder=self.forwarder,
            target=self.forwarder.target(backend), prefix=route.prefix if path_mode else b"",
            mode=route.mode.value,
        )

    def close(self) -> Deferred[None]:
        """Close the idle backend connections; fires when they are closed."""
        return self.forwarder.close()
