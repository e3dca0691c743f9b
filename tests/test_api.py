"""The JSON API through the routing root, with treq's StubTreq (no sockets)."""

from __future__ import annotations

import json

import pytest
from pytest_twisted import ensureDeferred
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from opencoderouter.api import RouterAPI
from opencoderouter.hosts import HostPolicy
from opencoderouter.registry import Naming, Registry, Sighting
from opencoderouter.routing import Router, RouterResource


class Forwarded(Resource):
    isLeaf = True

    def __init__(self, route):
        super().__init__()
        self.details = (route.backend.slug, route.target, route.prefix, route.mode.value)

    def render(self, request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.details, default=lambda b: b.decode()).encode()


@pytest.fixture
def router(tmp_path):
    clock = Clock()
    clock.advance(1_772_302_200)  # 2026-02-28T18:10:00Z
    registry = Registry(clock, stale_after=30, naming=Naming(username="al", os_user="alice"))
    project = tmp_path / "Archer"
    project.mkdir()
    registry.record_scan([Sighting(30000, str(project), "1.18.33", owner="alice"),
                          Sighting(30001, "/srv/other/api", "1.18.33", owner="bob")])
    api = RouterAPI(registry)
    hosts = HostPolicy(registry.by_host_label, extra=["devbox"], own_label_suffix="-al")
    root = RouterResource(Router(registry, hosts), Forwarded, own_routes={b"api": api.resource()}, dashboard=Resource())
    return StubTreq(root), project


async def get_json(client, url, **kwargs):
    response = await client.get(url, **kwargs)
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    return response.code, json.loads(await response.content())


@pytest.mark.parametrize("method", ["post", "put", "delete", "patch"])
@ensureDeferred
async def test_other_methods_get_json_405(router, method):
    client, _ = router
    response = await getattr(client, method)("http://localhost:8080/api/health")
    assert response.code == 405
    assert json.loads(await response.content())["error"] == "method_not_allowed"


@pytest.mark.parametrize("path", ["/api/backends", "/api/resolve?name=x"])
@ensureDeferred
async def test_405_on_every_route(router, path):
    client, _ = router
    response = await client.post("http://localhost:8080" + path)
    assert response.code == 405 and "GET" in response.headers.getRawHeaders("allow")[0]


@ensureDeferred
async def test_health(router):
    client, _ = router
    code, body = await get_json(client, "http://localhost:8080/api/health")
    assert code == 200
    assert body == {"healthy": True, "username": "al", "backends": 2, "version": body["version"]}


@ensureDeferred
async def test_backends_have_exactly_the_spec_fields_plus_owner(router):
    client, project = router
    code, body = await get_json(client, "http://devbox:31000/api/backends")
    assert code == 200
    assert [b["slug"] for b in body] == ["api-other", "archer"]
    assert body[1] == {
        "slug": "archer",
        "project_name": "Archer",
        "project_path": str(project),
        "port": 30000,
        "version": "1.18.33",
        "domain": "archer-al.local",
        "path_prefix": "/archer/",
        "url": "http://devbox:31000/archer/",
        "last_seen": "2026-02-28T18:10:00Z",
        "owner": "alice",
        "locked": False,
    }
    assert body[0]["domain"] == "api-other-bob.local" and body[0]["owner"] == "bob"


@ensureDeferred
async def test_url_follows_the_host_the_client_used(router):
    client, _ = router
    _, body = await get_json(client, "http://127.0.0.1:9999/api/resolve?name=archer")
    assert body["url"] == "http://127.0.0.1:9999/archer/"
    code, body = await get_json(client, "http://127.0.0.1:9999/api/resolve?name=archer",
                                headers={"Host": "evil\r\nx: y"})
    assert code == 400 and "url" not in body


@pytest.mark.parametrize("query", ["path={project}", "path={project}/", "path=Archer", "name=archer", "name=ARCHER",
                                   "path=%7E%2Fnope%2FArcher"])
@ensureDeferred
async def test_resolve_finds_the_project(router, query):
    client, project = router
    code, body = await get_json(client, "http://localhost:8080/api/resolve?" + query.format(project=project))
    assert code == 200 and body["slug"] == "archer"


@ensureDeferred
async def test_resolve_unknown_is_json_404(router):
    client, _ = router
    code, body = await get_json(client, "http://localhost:8080/api/resolve?name=nothing")
    assert (code, body) == (404, {"error": "not_found", "query": "nothing"})


@pytest.mark.parametrize("query", ["", "?path=a&name=b", "?path=a&path=b", "?other=1", "?name=%00", "?name=%ff"])
@ensureDeferred
async def test_resolve_needs_exactly_one_good_parameter(router, query):
    client, _ = router
    code, body = await get_json(client, "http://localhost:8080/api/resolve" + query)
    assert code == 400 and body["error"] == "bad_request"


@ensureDeferred
async def test_unknown_api_path_is_json_404(router):
    client, _ = router
    code, body = await get_json(client, "http://localhost:8080/api/nothing")
    assert code == 404 and body["error"] == "not_found"


@ensureDeferred
async def test_unknown_project_is_json_404_listing_known(router):
    client, _ = router
    code, body = await get_json(client, "http://localhost:8080/nothing/session")
    assert (code, body) == (404, {"error": "not_found", "slug": "nothing", "known": ["api-other", "archer"]})


@ensureDeferred
async def test_unknown_project_page_for_browsers(router):
    client, _ = router
    response = await client.get("http://localhost:8080/nothing/", headers={"Accept": "text/html"})
    assert response.code == 404
    assert b'href="/archer/"' in await response.content()


@ensureDeferred
async def test_path_mode_strips_the_prefix_byte_for_byte(router):
    client, _ = router
    response = await client.get("http://localhost:8080/archer/a%2Fb/c?x=%20y&z")
    assert json.loads(await response.content()) == ["archer", "/a%2Fb/c?x=%20y&z", "/archer", "path"]


@ensureDeferred
async def test_bare_slug_redirects_with_308_keeping_the_query(router):
    client, _ = router
    response = await client.get("http://localhost:8080/archer?x=1", allow_redirects=False)
    assert response.code == 308 and response.headers.getRawHeaders("location") == ["/archer/?x=1"]


@pytest.mark.parametrize("host", ["archer-al.local", "ARCHER-AL.LOCAL:8080", "archer-al.localhost:31000", "archer-al.local."])
@ensureDeferred
async def test_host_mode_keeps_the_whole_path(router, host):
    client, _ = router
    response = await client.get("http://localhost:8080/api/health?x=1", headers={"Host": host})
    assert json.loads(await response.content()) == ["archer", "/api/health?x=1", "", "host"]


@ensureDeferred
async def test_unknown_local_host_is_404(router):
    client, _ = router
    code, body = await get_json(client, "http://localhost:8080/x", headers={"Host": "nobody-al.local"})
    assert code == 404 and body["slug"] == "nobody-al"


@ensureDeferred
async def test_ipv6_literal_host_falls_through_to_the_router(router):
    client, _ = router
    code, _ = await get_json(client, "http://localhost:8080/api/health", headers={"Host": "[::1]:8080"})
    assert code == 200


@ensureDeferred
async def test_resolve_gives_the_path_mode_url_and_the_host_mode_web_url(router):
    client, _ = router
    _, body = await get_json(client, "http://localhost:31000/api/resolve?name=archer")
    assert body["url"] == "http://localhost:31000/archer/"
    assert body["web_url"] == "http://archer-al.localhost:31000/"
    # From the LAN without mDNS only a tunnel's .localhost name works: that is what is offered.
    _, body = await get_json(client, "http://devbox:31000/api/resolve?name=archer")
    assert body["url"] == "http://devbox:31000/archer/" and body["web_url"] == "http://archer-al.localhost:31000/"


@ensureDeferred
async def test_a_locked_server_the_router_cannot_open_has_no_project_path():
    registry = Registry(Clock(), stale_after=30, naming=Naming(username="al", os_user="alice"))
    registry.record_scan([Sighting(30005, "locked-30005", "unknown", owner="alice", locked=True),
                          Sighting(30006, "/srv/opened", "1", owner="alice", locked=True, router_credentials=True)])
    client = StubTreq(RouterAPI(registry).resource())
    _, body = await get_json(client, "http://localhost:31000/backends")
    locked, opened = body
    assert (locked["slug"], locked["locked"], locked["project_path"], locked["project_name"]) == (
        "locked-30005", True, None, None)
    assert opened["project_path"] == "/srv/opened" and opened["locked"] is True
