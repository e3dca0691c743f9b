"""Forwarding to backends (first version: Twisted's stock reverse proxy, HTTP/1.0)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import IResource

from .registry import Backend


class _ForwardRaw(ReverseProxyResource):
    """A ReverseProxyResource that forwards one raw path as it is."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        request.uri = self.path
        request.postpath = []
        self.path = b""
        return super().render(request)


class BackendProxyFactory:
    """Builds the per-request forwarding resource for a backend."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def __call__(self, backend: Backend, path: bytes, prefix: bytes, mode: str) -> IResource:
        return _ForwardRaw("127.0.0.1", backend.port, path, self.reactor)

    def close(self) -> Deferred[None]:
        """Nothing is cached yet."""
        return defer.succeed(None)
