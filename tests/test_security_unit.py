"""Unit tests of the guard's parts (hosts, auth, owners, limits, exposure) and the scanner's owner/lock handling.

No sockets: Clock, StubTreq, StringTransport.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyChannel

from opencoderouter.auth import Authentication, Authenticator, FailureThrottle
from opencoderouter.channel import Limits, RouterRequest, RouterSite
from opencoderouter.exposure import log_startup_warnings, parse_endpoint
from opencoderouter.forwarding import BackendCredentials
from opencoderouter.guard import Guard, may_change_instances
from opencoderouter.hosts import HostPolicy
from opencoderouter.listeners import Listener
from opencoderouter.owners import OwnerFilter
from opencoderouter.registry import Backend, Registry, Sighting
from opencoderouter.routing import Route, RouteKind
from opencoderouter.scanner import Prober, Scanner
from opencoderouter.testing import FakeOpenCode


# -- item 7: launcher endpoints --------------------------------------------------------------------
def _request(peer: Any, method: bytes = b"POST", headers: dict[bytes, bytes] | None = None) -> RouterRequest:
    request = RouterRequest(DummyChannel())
    request.method = method
    request.uri = request.path = b"/api/instances"
    request.client = peer
    request.requestHeaders.setRawHeaders(b"host", [b"localhost:8080"])
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    return request


def _guard(token: bytes | None = None) -> Guard:
    clock = Clock()
    return Guard(HostPolicy(lambda name: None), Authentication(clock, Authenticator(token, clock=clock)))


API_ROUTE = Route(RouteKind.API)


@pytest.mark.parametrize("peer", [IPv4Address("TCP", "127.0.0.1", 5555), IPv4Address("TCP", "::1", 5555),
                                  UNIXAddress(b"/run/ocr.sock")])
def test_launcher_endpoints_allow_loopback_peers(peer):
    request = _request(peer)
    assert _guard().check(request, API_ROUTE, Resource) is None
    assert may_change_instances(request)


def test_launcher_endpoints_refuse_remote_peers_without_auth():
    request = _request(IPv4Address("TCP", "192.0.2.7", 5555), headers={b"x-forwarded-for": b"127.0.0.1"})
    assert _guard().check(request, API_ROUTE, Resource) is None  # auth is off: the guard lets it through...
    assert not may_change_instances(request)  # ...but the launcher refuses a remote peer


def test_launcher_endpoints_allow_remote_peers_that_authenticated():
    token = b"t" * 24
    guard = _guard(token)
    request = _request(IPv4Address("TCP", "192.0.2.7", 5555), headers={b"authorization": b"Bearer " + token})
    assert guard.check(request, API_ROUTE, Resource) is None
    assert may_change_instances(request)
    assert request.requestHeaders.getRawHeaders(b"authorization") is None  # never forwarded to a backend


# -- item 4: warnings, throttle --------------------------------------------------------------------
@pytest.mark.parametrize(
    "listen,beyond",
    [
        ("tcp:8080:interface=127.0.0.1", False),
        ("tcp:8080:interface=\\:\\:1", False),
        ("tcp:8080:interface=localhost", False),
        ("unix:/run/ocr.sock", False),
        ("tcp:8080:interface=0.0.0.0", True),
        ("tcp:8080", True),
        ("tcp6:8080:interface=\\:\\:", True),
        ("tcp:8080:interface=192.168.1.5", True),
        ("systemd:domain=INET:index=0", True),
    ],
)
def test_listens_beyond_loopback(listen, beyond):
    assert parse_endpoint(listen).beyond_loopback is beyond


def _captured(action: Any) -> list[str]:
    from twisted.logger import formatEvent

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        action()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [formatEvent(e) for e in events]


def test_startup_warns_when_exposed_without_auth():
    lines = _captured(lambda: log_startup_warnings("tcp:8080:interface=0.0.0.0", False, False, False))
    assert any("SECURITY WARNING" in line and "--auth-token-file" in line for line in lines)
    quiet = _captured(lambda: log_startup_warnings("tcp:8080:interface=127.0.0.1", False, False, False))
    assert not any("SECURITY WARNING" in line for line in quiet)
    with_auth = _captured(lambda: log_startup_warnings("tcp:8080", Authenticator(b"t" * 20).enabled, False, False))
    assert not any("SECURITY WARNING" in line for line in with_auth)


def test_throttle_spaces_failures_from_one_address_and_forgets_them():
    clock = Clock()
    throttle = FailureThrottle(clock, base=0.25, maximum=8.0, forget_after=900)
    delays = [throttle.failed("192.0.2.7") for _ in range(3)]
    # Answers queue up: 0.25, then 0.25+0.5, then 0.75+1.
    assert delays == [0.25, 0.75, 1.75]
    assert throttle.wait("192.0.2.7") == 1.75
    assert throttle.wait("198.51.100.1") == 0.0  # other addresses are not affected
    clock.advance(10)
    assert throttle.wait("192.0.2.7") == 0.0
    for _ in range(10):
        throttle.failed("192.0.2.8")
    clock.advance(100)
    assert throttle.failed("192.0.2.8") == 8.0  # capped
    clock.advance(1000)
    assert throttle.failed("192.0.2.8") == 0.25  # forgotten after a quiet spell
    throttle.succeeded("192.0.2.8")
    assert throttle.wait("192.0.2.8") == 0.0


def test_cookie_is_bound_to_the_credentials_and_expires():
    first = Authenticator(b"a" * 20)
    cookie = first.make_cookie(now=1000.0)
    assert first.check_cookie(cookie, now=2000.0)
    assert not first.check_cookie(cookie, now=1000.0 + 31 * 24 * 3600)
    assert not Authenticator(b"b" * 20).check_cookie(cookie, now=2000.0)  # a new token revokes old cookies
    assert not first.check_cookie(b"9999999999." + b"0" * 64, now=2000.0)


# -- item 2: hosts ---------------------------------------------------------------------------------
def test_host_policy_names():
    backends = {"proj-alice"}
    policy = HostPolicy(lambda name: object() if name in backends else None, extra=["router.example.org", "*.corp.example"],
                        names=lambda: {"localhost", "devbox", "devbox.local"}, addresses=lambda: {"127.0.0.1", "10.1.2.3"})
    for good in ("localhost", "devbox", "devbox.local", "10.1.2.3", "127.0.0.1",
                 "proj-alice.local", "anything.localhost", "router.example.org", "a.corp.example"):
        assert policy.allows_name(good), good
    for bad in ("evil.example", "other-bob.local", "10.1.2.4", "corp.example", "<script>.localhost", "", "a b"):
        assert not policy.allows_name(bad), bad


def test_unknown_names_in_the_routers_own_scheme_reach_the_routing_404():
    policy = HostPolicy(lambda name: None, names=set, addresses=set, own_label_suffix="-alice")
    assert policy.allows_name("mistyped-alice.local")
    for bad in ("other-bob.local", "evil.local", "x-alice.local.evil.example", "x-alice.example"):
        assert not policy.allows_name(bad), bad


# -- item 5: backend credentials -------------------------------------------------------------------
def _backend(**kwargs: Any) -> Backend:
    return Backend(slug="p", project_path="/p", port=1, version="v", owner=None, first_seen=0, last_seen=0, **kwargs)


def test_backend_credentials_are_added_only_when_safe():
    safe = BackendCredentials("opencode", "pw", may_inject=True)
    assert safe.credentials_for(_backend(locked=True, router_credentials=True)) == b"Basic b3BlbmNvZGU6cHc="
    assert safe.credentials_for(_backend(locked=False)) is None  # never leak it to an unlocked server
    assert safe.credentials_for(_backend(locked=True, router_credentials=False)) is None
    exposed = BackendCredentials("opencode", "pw", may_inject=False)  # open router on the LAN
    assert exposed.credentials_for(_backend(locked=True, router_credentials=True)) is None
    assert BackendCredentials().credentials_for(_backend(locked=True, router_credentials=True)) is None


def test_the_routers_own_requests_get_the_password_for_its_opened_servers_only():
    exposed = BackendCredentials("opencode", "pw", may_inject=False)  # nothing is forwarded: no LAN client gets in
    assert exposed.header_for(_backend(locked=True, router_credentials=True)) == b"Basic b3BlbmNvZGU6cHc="
    assert exposed.header_for(_backend(locked=False)) is None
    assert exposed.header_for(_backend(locked=True, router_credentials=False)) is None
    assert BackendCredentials().header_for(_backend(locked=True, router_credentials=True)) is None


def _stub_prober(fake: FakeOpenCode, **kwargs: Any) -> Prober:
    return Prober(StubTreq(fake), Clock(), timeout=5, **kwargs)


def _result(deferred: Any) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the probe did not finish"
    return results[0]


def test_prober_lists_a_locked_server_by_port_without_credentials(tmp_path):
    fake = FakeOpenCode(str(tmp_path), password="pw", clock=Clock())
    sighting = _result(_stub_prober(fake).probe(30001, "alice"))
    assert sighting == Sighting(port=30001, project_path="locked-30001", version="unknown", owner="alice", locked=True)


def test_prober_opens_our_locked_server_with_the_password(tmp_path):
    fake = FakeOpenCode(str(tmp_path), password="pw", clock=Clock())
    prober = _stub_prober(fake, credentials=b"Basic b3BlbmNvZGU6cHc=", trusts=lambda owner: owner == "alice")
    sighting = _result(prober.probe(30001, "alice"))
    assert sighting.project_path == str(tmp_path) and sighting.locked and sighting.router_credentials


def test_prober_never_sends_the_password_to_another_users_server(tmp_path):
    fake = FakeOpenCode(str(tmp_path), password="pw", clock=Clock())
    prober = _stub_prober(fake, credentials=b"Basic b3BlbmNvZGU6cHc=", trusts=lambda owner: owner == "alice")
    sighting = _result(prober.probe(30001, "mallory"))
    assert sighting.locked and not sighting.router_credentials
    assert all(b"Authorization" not in headers for _, _, headers in fake.requests_seen)


# -- item 1: owners ------------------------------------------------------------------------------------
def test_owner_filter_words():
    assert OwnerFilter("self", "alice").admits("alice") and OwnerFilter("self", "alice").admits(None)
    assert not OwnerFilter("self", "alice").admits("bob")
    assert OwnerFilter("all", "alice").admits("bob")
    assert OwnerFilter("self,root", "alice").admits("root")
    assert OwnerFilter("0", "alice").admits("root")  # a uid names its user
    with pytest.raises(ValueError, match="no-such-user"):
        OwnerFilter("no-such-user", "alice")
    with pytest.raises(ValueError):
        OwnerFilter("all,bob", "alice")
    with pytest.raises(ValueError):
        OwnerFilter(" , ", "alice")


class _FixedProber:
    """Answers each port with a sighting owned by whoever the scanner says."""

    def probe(self, port: int, owner: str | None = None, address: str | None = None) -> Any:
        return succeed(Sighting(port=port, project_path=f"/p{port}", version="v", owner=owner))


def test_scanner_registers_only_admitted_owners_and_counts_the_others():
    clock = Clock()
    registry = Registry(clock, stale_after=30)
    listeners = {1: Listener(1, 1000, 11), 2: Listener(2, 1001, 12), 3: Listener(3, 1001, 13)}
    scanner = Scanner(
        registry, _FixedProber(), clock, port_range=(1, 3), interval=5, concurrency=5,
        list_listeners=lambda start, end: listeners, owner_name=lambda uid: {1000: "alice", 1001: "bob"}[uid],
        admit_owner=OwnerFilter("self", "alice").admits,
    )
    _result(ensureDeferred(scanner.scan()))
    assert [b.project_path for b in registry.backends()] == ["/p1"]
    assert scanner.ignored_other_owners == 2


# -- item 6: limits with a fake clock ------------------------------------------------------------------
class _Stream(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        request.write(b"data: hi\n\n")
        return NOT_DONE_YET


def _channel(limits: Limits) -> tuple[Any, StringTransport, Clock]:
    clock = Clock()
    site = RouterSite(_Stream(), limits=limits, reactor=clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 2))
    channel.makeConnection(transport)
    return channel, transport, clock


def test_slow_request_head_gets_408_after_the_bound():
    channel, transport, clock = _channel(Limits(header_timeout=10))
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
    for _ in range(9):
        clock.advance(1)
        channel.dataReceived(b"X")  # each byte would reset an idle timeout; not this bound
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting


def test_a_long_response_is_never_cut_by_the_head_bound():
    channel, transport, clock = _channel(Limits(header_timeout=10))
    channel.dataReceived(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(3600)
    assert not transport.disconnecting
    assert b"data: hi" in transport.value()


def test_idle_connection_is_closed_quietly():
    channel, transport, clock = _channel(Limits(header_timeout=10))
    clock.advance(10.5)
    assert transport.disconnecting and transport.value() == b""


def test_limits_answer_json():
    channel, transport, _ = _channel(Limits(max_url=100))
    channel.dataReceived(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 414 ") and json.loads(body)["error"] == "uri_too_long"


class _Upgrade(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(101)
        request.setHeader(b"upgrade", b"websocket")
        request.setHeader(b"connection", b"Upgrade")
        return b""


def test_an_upgraded_connection_is_never_cut_by_head_or_idle_timeouts():
    clock = Clock()
    site = RouterSite(_Upgrade(), limits=Limits(header_timeout=10), reactor=clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 2))
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /pty/1/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 101 ")
    clock.advance(3600)
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--allowed-host", "http://devbox"], "--allowed-host"),
        (["--cors-origin", "evil.example"], "--cors-origin"),
        (["--owners", "all,root"], "--owners"),
        (["--auth-token-file", "/nonexistent/token"], "--auth-token-file"),
        (["--header-timeout", "0s"], "--header-timeout"),
    ],
)
def test_bad_security_flags_stop_with_a_sentence_naming_the_flag(argv, flag):
    from opencoderouter.config import Options

    with pytest.raises(SystemExit) as raised:
        Options().parseOptions(argv)
    assert flag in str(raised.value)
