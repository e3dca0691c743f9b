"""Header rules for forwarding: what a proxy drops (hop-by-hop), keeps (end-to-end) and adds (X-Forwarded-*).

Hop-by-hop headers describe one connection, not the message (RFC 9110 7.6.1): ``Connection`` and
every header it names, ``Keep-Alive``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade`` and
``Proxy-*``. They are dropped in both directions; repeated end-to-end headers (two ``Set-Cookie``)
are kept in order. The backend sees ``Host: 127.0.0.1:PORT``, ``X-Forwarded-For`` (appended to the
client's own), ``X-Forwarded-Proto``, ``X-Forwarded-Host`` (the Host the client used) and, in path
mode only, ``X-Forwarded-Prefix``; client-supplied values of the last three are replaced.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

from .channel import RouterChannel, server_request

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
#: Request headers the proxy writes itself (or must drop because the body was already received).
REQUEST_OWN = frozenset(
    {
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-prefix",
    }
)
REQUEST_SKIP = HOP_BY_HOP | REQUEST_OWN
RESPONSE_SKIP = HOP_BY_HOP | {b"content-length"}


def connection_tokens(values: Iterable[bytes] | None) -> frozenset[bytes]:
    """Lower-cased header names listed in ``Connection`` header values (they are hop-by-hop too)."""
    if not values:
        return frozenset()
    return frozenset(token.strip().lower() for value in values for token in value.split(b","))


def client_ip(request: IRequest) -> bytes:
    """The client's address for ``X-Forwarded-For`` (``unknown`` for UNIX sockets)."""
    host = getattr(request.getClientAddress(), "host", None)
    return host.encode("ascii", "replace") if host else b"unknown"


def end_to_end(headers: Headers, skip: frozenset[bytes]) -> list[tuple[bytes, list[bytes]]]:
    """``headers``' (name, values) pairs in order, without ``skip``, ``Proxy-*`` or what ``Connection`` names."""
    named = connection_tokens(headers.getRawHeaders(b"connection"))
    kept = []
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in skip or lower in named or lower.startswith(b"proxy-"):
            continue
        kept.append((name, list(values)))
    return kept


def forwarded_fields(request: IRequest, scheme: bytes, prefix: bytes) -> list[tuple[bytes, bytes]]:
    """The ``X-Forwarded-*`` fields for the backend (``prefix`` only in path mode)."""
    source = request.requestHeaders
    forwarded_for = source.getRawHeaders(b"x-forwarded-for")
    client = client_ip(request)
    fields = [
        (b"X-Forwarded-For", b", ".join([*forwarded_for, client]) if forwarded_for else client),
        (b"X-Forwarded-Proto", scheme),
    ]
    original_host = source.getRawHeaders(b"host")
    if original_host:
        fields.append((b"X-Forwarded-Host", original_host[-1]))
    if prefix:
        fields.append((b"X-Forwarded-Prefix", prefix))
    return fields


def is_websocket_upgrade(request: IRequest) -> bool:
    """True for an HTTP/1.1 ``GET`` asking to switch to the WebSocket protocol."""
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade")
    if not upgrade or request.method != b"GET" or server_request(request).clientproto != b"HTTP/1.1":
        return False
    tokens = {token.strip().lower() for value in upgrade for token in value.split(b",")}
    connection = connection_tokens(request.requestHeaders.getRawHeaders(b"connection"))
    return b"websocket" in tokens and b"upgrade" in connection


def channel_scheme(request: IRequest) -> bytes:
    """``http`` or ``https`` as the client's connection is (decided once per connection by the channel)."""
    channel = getattr(request, "channel", None)
    if isinstance(channel, RouterChannel):
        return channel.scheme
    return b"https" if request.isSecure() else b"http"
