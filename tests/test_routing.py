"""The one routing decision: Router.classify for every kind of request, and the channel that carries it."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from opencoderouter.channel import ChannelState, Limits, RouterChannel, RouterRequest, RouterSite
from opencoderouter.hosts import HostPolicy
from opencoderouter.registry import RESERVED_SLUGS, Naming, Registry, Sighting
from opencoderouter.routing import OWN_SEGMENTS, Mode, RouteKind, Router, WebUIRedirect, is_navigation


@pytest.fixture
def router() -> Router:
    registry = Registry(Clock(), 30, naming=Naming("alice", "alice"))
    registry.record_scan([Sighting(30001, "/p/alpha", "1"), Sighting(30002, "/p/beta", "1", owner="bob")])
    registry.set_mdns_name("alpha", "alpha-alice-2")
    hosts = HostPolicy(registry.by_host_label, extra=["router.example"], names=lambda: {"localhost", "devbox",
                       "devbox.local", "devbox.localhost"}, addresses=lambda: {"127.0.0.1", "::1"},
                       own_label_suffix="-alice")
    return Router(registry, hosts, login_enabled=True)


@pytest.mark.parametrize(
    "host, uri, kind, slug, mode, target, prefix",
    [
        (b"localhost:8080", b"/", RouteKind.DASHBOARD, None, None, b"", b""),
        (None, b"/", RouteKind.DASHBOARD, None, None, b"", b""),
        (b"127.0.0.1", b"/api/health", RouteKind.API, None, None, b"", b""),
        (b"127.0.0.1", b"/metrics", RouteKind.METRICS, None, None, b"", b""),
        (b"127.0.0.1", b"/_router/dashboard.js", RouteKind.ROUTER_ASSET, None, None, b"", b""),
        (b"127.0.0.1", b"/_router/login", RouteKind.LOGIN, None, None, b"", b""),
        (b"alpha-alice.local", b"/_router/login?next=/", RouteKind.LOGIN, None, None, b"", b""),
        (b"127.0.0.1", b"/alpha/session?x=%2F", RouteKind.BACKEND, "alpha", Mode.PATH, b"/session?x=%2F", b"/alpha"),
        (b"127.0.0.1", b"/%61lpha/x", RouteKind.BACKEND, "alpha", Mode.PATH, b"/x", b"/%61lpha"),
        (b"127.0.0.1", b"/alpha", RouteKind.SLASH_REDIRECT, "alpha", None, b"/alpha/", b""),
        (b"127.0.0.1", b"/alpha?q=1", RouteKind.SLASH_REDIRECT, "alpha", None, b"/alpha/?q=1", b""),
        (b"127.0.0.1", b"/nope/x", RouteKind.UNKNOWN_PROJECT, None, None, b"", b""),
        (b"alpha-alice.local:8080", b"/api/health", RouteKind.BACKEND, "alpha", Mode.HOST, b"/api/health", b""),
        (b"ALPHA-ALICE.LOCALHOST.", b"/x?y", RouteKind.BACKEND, "alpha", Mode.HOST, b"/x?y", b""),
        (b"alpha-alice-2.local", b"/", RouteKind.BACKEND, "alpha", Mode.HOST, b"/", b""),
        (b"beta-bob.local", b"/", RouteKind.BACKEND, "beta", Mode.HOST, b"/", b""),
        (b"mistyped-alice.local", b"/", RouteKind.UNKNOWN_PROJECT, None, None, b"", b""),
        (b"whatever.localhost", b"/", RouteKind.UNKNOWN_PROJECT, None, None, b"", b""),
        (b"devbox.local", b"/alpha/x", RouteKind.BACKEND, "alpha", Mode.PATH, b"/x", b"/alpha"),
        (b"[::1]:8080", b"/api/health", RouteKind.API, None, None, b"", b""),
        (b"evil.example", b"/alpha/x", RouteKind.FOREIGN_HOST, None, None, b"", b""),
        (b"other-bob.local", b"/", RouteKind.FOREIGN_HOST, None, None, b"", b""),
        (b"\xc3\xa9.local", b"/", RouteKind.BAD_HOST, None, None, b"", b""),
        (b"router.example", b"/api/" + b"a" * 70, RouteKind.API, None, None, b"", b""),
        (b"a" * 64 + b".localhost", b"/api/health", RouteKind.FOREIGN_HOST, None, None, b"", b""),
    ],
)
def test_classify(router, host, uri, kind, slug, mode, target, prefix):
    route = router.classify(host, uri)
    assert route.kind is kind
    assert (route.backend.slug if route.backend else None) == slug
    assert route.mode is mode
    if kind in (RouteKind.BACKEND, RouteKind.SLASH_REDIRECT):
        assert route.target == target
    assert route.prefix == prefix
    assert route.to_backend is (kind is RouteKind.BACKEND)


def test_unknown_projects_name_what_was_asked_for(router):
    assert router.classify(b"127.0.0.1", b"/nope/x").name == "nope"
    assert router.classify(b"mistyped-alice.local", b"/").name == "mistyped-alice"


def test_login_route_exists_only_with_a_sign_in_form(router):
    router.login_enabled = False
    assert router.classify(b"127.0.0.1", b"/_router/login").kind is RouteKind.ROUTER_ASSET
    assert router.classify(b"alpha-alice.local", b"/_router/login").kind is RouteKind.BACKEND


def test_the_address_the_connection_reached_is_an_own_name(router):
    assert router.classify(b"10.9.8.7", b"/").kind is RouteKind.FOREIGN_HOST
    assert router.classify(b"10.9.8.7", b"/", local_host="10.9.8.7").kind is RouteKind.DASHBOARD


def test_no_slug_can_shadow_the_routers_own_routes():
    assert {s.decode() for s in OWN_SEGMENTS if b"_" not in s} <= RESERVED_SLUGS


# -- the channel decides once and carries it --------------------------------------------------------
class _Recorder(Resource):
    isLeaf = True
    seen: list[Any] = []

    def render(self, request: Any) -> bytes:
        _Recorder.seen.append(request.route)
        return b"ok"


def _connect(site: RouterSite) -> tuple[RouterChannel, StringTransport]:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 2),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    channel.makeConnection(transport)
    return channel, transport


def test_the_channel_puts_the_route_on_the_request(router):
    _Recorder.seen.clear()
    site = RouterSite(_Recorder(), router=router, reactor=Clock())
    channel, transport = _connect(site)
    channel.dataReceived(b"GET /alpha/x?y=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    channel.dataReceived(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    kinds = [(r.kind, r.target) for r in _Recorder.seen]
    assert kinds == [(RouteKind.BACKEND, b"/x?y=1"), (RouteKind.API, b"")]
    assert isinstance(site.requestFactory(channel), RouterRequest)


def test_body_limit_applies_to_the_routers_own_endpoints_only(router):
    site = RouterSite(_Recorder(), router=router, limits=Limits(max_body=10), reactor=Clock())
    channel, transport = _connect(site)
    channel.dataReceived(b"POST /alpha/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 20\r\n\r\n" + b"x" * 20)
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    channel, transport = _connect(site)
    channel.dataReceived(b"POST /api/instances HTTP/1.1\r\nHost: localhost\r\nContent-Length: 20\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    channel, transport = _connect(site)
    channel.dataReceived(b"POST /api/instances HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")


class _Held(Resource):
    """Answers later (like the proxy waiting for a backend's 101), and hands the connection over."""

    isLeaf = True
    pending: list[Any] = []

    def render(self, request: Any) -> Any:
        _Held.pending.append(request)
        return NOT_DONE_YET


class _Splice(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


def test_hand_over_gives_held_and_later_bytes_to_the_splice_never_to_http(router):
    _Held.pending.clear()
    site = RouterSite(_Held(), router=router, limits=Limits(header_timeout=5), reactor=Clock())
    channel, transport = _connect(site)
    channel.dataReceived(b"GET /alpha/pty/1/connect HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\n\x81\x05early")
    request = _Held.pending[0]
    splice = _Splice()
    channel.hand_over(splice)
    assert channel.state is ChannelState.SPLICED
    assert splice.received == b"\x81\x05early"
    channel.dataReceived(b"GET / HTTP/1.1\r\n\r\n")  # not HTTP any more: just bytes for the splice
    assert splice.received.endswith(b"GET / HTTP/1.1\r\n\r\n")
    site.reactor.advance(3600)
    assert not transport.disconnecting
    finished: list[Any] = []
    request.notifyFinish().addBoth(finished.append)
    channel.connectionLost(Failure(ConnectionDone()))
    assert splice.lost and finished


def test_pipelined_requests_wait_for_the_answer_in_front_of_them(router):
    _Held.pending.clear()
    site = RouterSite(_Held(), router=router, reactor=Clock())
    channel, transport = _connect(site)
    channel.dataReceived(b"GET /alpha/a HTTP/1.1\r\nHost: localhost\r\n\r\n"
                         b"GET /alpha/b HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert [r.uri for r in _Held.pending] == [b"/alpha/a"]
    first = _Held.pending.pop()
    first.write(b"A")
    first.finish()
    assert [r.uri for r in _Held.pending] == [b"/alpha/b"]


# -- browsers at a path-mode root go to the host-mode name --------------------------------------------
@pytest.mark.parametrize(
    "host, uri, mdns, location",
    [
        (b"localhost:8080", b"/alpha/", False, b"http://alpha-alice.localhost:8080/"),
        (b"127.0.0.1:9", b"/alpha", False, b"http://alpha-alice.localhost:9/"),
        (b"[::1]:8080", b"/alpha/?x=1", False, b"http://alpha-alice.localhost:8080/?x=1"),
        (b"devbox:8080", b"/alpha/", True, b"http://alpha-alice-2.local:8080/"),  # the advertised name
        (b"devbox:8080", b"/alpha/", False, b""),  # no name works from the LAN: the page explains
        (b"devbox:8080", b"/beta/", True, b""),  # not advertised (another user's)
    ],
)
def test_a_browser_at_a_path_mode_root_goes_to_the_host_mode_name(router, host, uri, mdns, location):
    router.mdns = mdns
    route = router.classify(host, uri, navigating=True)
    assert route.kind is RouteKind.WEB_UI_REDIRECT and route.target == location


@pytest.mark.parametrize("uri", [b"/alpha/session", b"/alpha/assets/x.js", b"/alpha//"])
def test_deep_paths_stay_path_mode_for_browsers_too(router, uri):
    assert router.classify(b"localhost:8080", uri, navigating=True).kind is RouteKind.BACKEND


@pytest.mark.parametrize(
    "method, mode, accept, navigating",
    [
        (b"GET", b"navigate", None, True),
        (b"GET", None, b"text/html,application/xhtml+xml", True),
        (b"HEAD", None, b"text/html", True),
        (b"GET", b"cors", b"text/html", False),  # a page's fetch(): API client behaviour
        (b"GET", None, b"*/*", False),  # curl
        (b"GET", None, None, False),  # the SDK, dispatch
        (b"GET", None, b"text/event-stream", False),
        (b"POST", b"navigate", b"text/html", False),  # a form post is forwarded as it is
    ],
)
def test_what_counts_as_a_browser_navigation(method, mode, accept, navigating):
    assert is_navigation(method, mode, accept) is navigating


def test_the_channel_sends_navigating_browsers_to_host_mode_and_api_clients_to_the_backend(router):
    _Recorder.seen.clear()
    site = RouterSite(_Recorder(), router=router, reactor=Clock())
    channel, transport = _connect(site)
    channel.dataReceived(b"GET /alpha/ HTTP/1.1\r\nHost: localhost:8080\r\nSec-Fetch-Mode: navigate\r\n\r\n")
    channel.dataReceived(b"GET /alpha/ HTTP/1.1\r\nHost: localhost:8080\r\nAccept: */*\r\n\r\n")
    assert [r.kind for r in _Recorder.seen] == [RouteKind.WEB_UI_REDIRECT, RouteKind.BACKEND]


def test_the_redirect_and_the_explaining_page(router):
    from twisted.web.test.requesthelper import DummyRequest

    redirect = WebUIRedirect(router.classify(b"localhost:8080", b"/alpha/", navigating=True))
    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(b"host", [b"localhost:8080"])
    redirect.render(request)
    assert request.responseCode == 307 and request.responseHeaders.getRawHeaders(b"location") == [
        b"http://alpha-alice.localhost:8080/"]
    page = WebUIRedirect(router.classify(b"devbox:8080", b"/alpha/", navigating=True))
    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(b"host", [b"devbox:8080"])
    body = page.render(request).decode()
    assert request.responseCode == 200 and "ssh -L 8080:localhost:8080" in body
    assert "http://alpha-alice.localhost:8080/" in body and "alpha-alice.local:8080" in body
