"""``/api/instances``: listing, starting and stopping through the Klein app (StubTreq, fake processes)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from opencoderouter.api import RouterAPI
from opencoderouter.guard import is_loopback_address
from opencoderouter.registry import Naming, Registry, Sighting

from .test_launcher_unit import FakeProcessReactor, make_launcher


class FromAddress(Resource):
    """Serves ``inner`` as if the client had connected from ``address`` (no packet goes anywhere)."""

    def __init__(self, inner: Any, address: Any) -> None:
        super().__init__()
        self.inner, self.address = inner, address

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:
        request.client = self.address
        request.postpath.insert(0, request.prepath.pop())
        return self.inner


def make_api(tmp_path: Path, names: tuple[str, ...] = ("alpha",)) -> tuple[Any, Any, Any, Registry]:
    reactor = FakeProcessReactor()
    registry = Registry(reactor, stale_after=30, naming=Naming("alice", "alice"))
    launcher, reactor, directories = make_launcher(tmp_path, names=names, reactor=reactor,
                                                   slug_for=registry.slug_for_path)
    api = RouterAPI(registry, launcher=launcher)
    launcher.startService()
    return api, launcher, reactor, registry


def start_call(client: StubTreq, method: str, url: str, body: Any = None,
               content_type: str = "application/json") -> list[tuple[int, Any]]:
    """Send a request; the returned list gets (status, decoded JSON) once the answer is complete."""
    headers = {"Content-Type": [content_type]}
    data = json.dumps(body).encode() if body is not None else None
    answers: list[tuple[int, Any]] = []
    d = client.request(method, "http://127.0.0.1:8080" + url, data=data, headers=headers)
    d.addCallback(lambda response: client.content(response).addCallback(
        lambda text: answers.append((response.code, json.loads(text)))))
    client.flush()
    return answers


def call(client: StubTreq, method: str, url: str, body: Any = None,
         content_type: str = "application/json") -> tuple[int, Any]:
    """Send a request that must be answered at once."""
    answers = start_call(client, method, url, body, content_type)
    assert answers, f"{method} {url} was not answered"
    return answers[0]


def test_instances_lists_state_port_pid_start_time_and_log(tmp_path: Path) -> None:
    api, launcher, reactor, registry = make_api(tmp_path)
    reactor.last.listening()
    client = StubTreq(api.resource())
    status, body = call(client, "GET", "/instances")
    assert status == 200
    (entry,) = body
    assert entry["directory"] == str(tmp_path / "alpha") and entry["slug"] == "alpha"
    assert (entry["state"], entry["pid"], entry["port"], entry["restarts"]) == ("running", reactor.last.pid, 30100, 0)
    assert entry["started_at"] == "1970-01-01T00:00:00Z"
    assert entry["log"] == ["opencode server listening on http://127.0.0.1:30100"]
    assert entry["last_exit"] is None


def test_listed_slug_is_the_one_the_router_routes_by(tmp_path: Path) -> None:
    api, launcher, reactor, registry = make_api(tmp_path)
    # Another project took the plain slug first: the API shows the slug that routes to this one.
    registry.record(Sighting(port=30200, project_path="/elsewhere/alpha", version="1"))
    registry.record(Sighting(port=30100, project_path=str(tmp_path / "alpha"), version="1"))
    client = StubTreq(api.resource())
    (entry,) = call(client, "GET", "/instances")[1]
    routed = registry.by_path(str(tmp_path / "alpha")).slug
    assert entry["slug"] == routed != "alpha"
    answers = start_call(client, "DELETE", f"/instances/{routed}")
    reactor.last.exit(sig=signal.SIGTERM)
    client.flush()
    assert answers and answers[0][0] == 200 and answers[0][1]["state"] == "stopped"


def test_post_starts_a_directory_and_delete_stops_it(tmp_path: Path) -> None:
    api, launcher, reactor, registry = make_api(tmp_path, names=())
    (tmp_path / "beta").mkdir()
    client = StubTreq(api.resource())
    status, body = call(client, "POST", "/instances", {"directory": str(tmp_path / "beta")})
    assert status == 201 and body["state"] == "starting" and body["slug"] == "beta"
    assert reactor.last.path == str(tmp_path / "beta")
    answers = start_call(client, "DELETE", "/instances/beta")
    assert answers == [], "DELETE answers only once the process group has exited"
    assert (reactor.last.pid, signal.SIGTERM) in reactor.group_signals
    reactor.last.exit(sig=signal.SIGTERM)
    client.flush()
    assert answers[0][0] == 200 and answers[0][1]["state"] == "stopped" and answers[0][1]["pid"] is None


def test_bad_requests_get_json_400_and_unknown_slugs_404(tmp_path: Path) -> None:
    api, launcher, reactor, registry = make_api(tmp_path, names=())
    (tmp_path / "file").write_text("x")
    client = StubTreq(api.resource())
    for body, words in (
        ({"directory": str(tmp_path / "missing")}, "does not exist"),
        ({"directory": str(tmp_path / "file")}, "is not a directory"),
        ({"directory": 7}, '{"directory": "/path/to/project"}'),
        (["not", "an", "object"], '{"directory": "/path/to/project"}'),
    ):
        status, answer = call(client, "POST", "/instances", body)
        assert status == 400 and answer["error"] == "bad_request" and words in answer["message"]
    status, answer = call(client, "DELETE", "/instances/nope")
    assert status == 404 and answer == {
        "error": "not_found", "slug": "nope", "message": "no instance nope is managed by this router"}
    status, answer = call(client, "POST", "/instances", {"directory": str(tmp_path)}, content_type="text/plain")
    assert status == 415
    assert reactor.processes == []


def test_write_endpoints_are_refused_unless_the_client_is_on_the_loopback(tmp_path: Path) -> None:
    api, launcher, reactor, registry = make_api(tmp_path)
    client = StubTreq(FromAddress(api.resource(), IPv4Address("TCP", "192.0.2.7", 40000)))
    status, body = call(client, "POST", "/instances", {"directory": str(tmp_path)})
    assert status == 403 and body["error"] == "forbidden"
    status, body = call(client, "DELETE", "/instances/alpha")
    assert status == 403
    assert len(reactor.processes) == 1 and reactor.group_signals == []
    status, body = call(client, "GET", "/instances")
    assert status == 200 and len(body) == 1, "reading stays open"


def test_loopback_test_accepts_only_loopback_and_unix_clients() -> None:
    def request_from(address: Any) -> DummyRequest:
        request = DummyRequest([b""])
        request.client = address
        return request

    for address in (IPv4Address("TCP", "127.0.0.1", 1), IPv4Address("TCP", "127.3.4.5", 1),
                    IPv6Address("TCP", "::1", 1), IPv6Address("TCP", "::ffff:127.0.0.1", 1), UNIXAddress(b"/s")):
        assert is_loopback_address(request_from(address).getClientAddress()), address
    for address in (IPv4Address("TCP", "192.0.2.7", 1), IPv6Address("TCP", "2001:db8::1", 1),
                    IPv6Address("TCP", "::ffff:192.0.2.7", 1), IPv4Address("TCP", "0.0.0.0", 1)):
        assert not is_loopback_address(request_from(address).getClientAddress()), address
