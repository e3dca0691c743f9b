"""Host- and path-based routing through a real router subprocess, and its 404/502/504 answers."""

from __future__ import annotations

import json

import pytest

from .proxy_stack import USERNAME, raw_exchange, running_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A router (``--backend-timeout 1s``) with backends ``alpha`` and ``beta``."""
    with running_stack(tmp_path_factory.mktemp("routing"), "--backend-timeout", "1s",
                       backends=("alpha", "beta")) as stack:
        yield stack


def echo(stack, path: str, **kwargs) -> dict:
    status, _, body = stack.request("GET", path, **kwargs)
    assert status == 200, body
    return json.loads(body)


def test_path_mode_strips_prefix_and_keeps_query_and_encoding_byte_for_byte(stack):
    raw = "/echo/a%2Fb/%7Euser/%E2%9C%93?q=a%20b&x=%2B+&empty=&=&k=%3D#"[:-1]
    seen = echo(stack, "/alpha" + raw)
    assert seen["uri"] == raw
    assert dict(seen["headers"])["X-Forwarded-Prefix"] == "/alpha"


def test_path_mode_reaches_the_right_backend(stack):
    for slug in ("alpha", "beta"):
        health = json.loads(stack.request("GET", f"/{slug}/path")[2])
        assert health["directory"].endswith("/" + slug)


@pytest.mark.parametrize(
    "host",
    [
        f"alpha-{USERNAME}.local",
        f"alpha-{USERNAME}.localhost",
        f"ALPHA-{USERNAME.upper()}.LOCAL",
        f"Alpha-{USERNAME}.LocalHost",
        f"alpha-{USERNAME}.local:8080",
        f"alpha-{USERNAME}.localhost:1",
        f"alpha-{USERNAME}.local.",
    ],
)
def test_host_mode_routes_whole_path_untouched(stack, host):
    seen = echo(stack, "/echo/x%2Fy?z=1", headers={"Host": host})
    assert seen["uri"] == "/echo/x%2Fy?z=1"
    headers = dict(seen["headers"])
    assert headers["Host"] == f"127.0.0.1:{stack.backends['alpha'].port}"
    assert headers["X-Forwarded-Host"] == host
    assert "X-Forwarded-Prefix" not in headers


def test_host_mode_wins_over_router_routes(stack):
    # /api/health on a backend's host name is the backend's path, not the router's API.
    seen = echo(stack, "/echo/api/health", headers={"Host": f"beta-{USERNAME}.localhost"})
    assert seen["uri"] == "/echo/api/health"
    status, _, body = stack.request("GET", "/global/health", headers={"Host": f"beta-{USERNAME}.local"})
    assert status == 200 and json.loads(body)["healthy"] is True


# (A foreign name such as alpha-tester.local.evil.com gets 421 from the security layer: test_security.)
@pytest.mark.parametrize("host", ["[::1]:8080", "[::1]", "127.0.0.1", "localhost:9"])
def test_ipv6_literal_and_other_hosts_fall_through_to_router_routes(stack, host):
    status, headers, body = stack.request("GET", "/api/health", headers={"Host": host})
    assert status == 200 and json.loads(body)["healthy"] is True
    seen = echo(stack, "/alpha/echo", headers={"Host": host})
    assert seen["uri"] == "/echo"


def test_missing_host_header_falls_through_to_path_routing(stack):
    answer = raw_exchange(stack.router.port, b"GET /alpha/echo?h=0 HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 200") or answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b'"uri": "/echo?h=0"' in answer


def test_slug_without_slash_redirects_308_keeping_query(stack):
    status, headers, _ = stack.request("GET", "/alpha?x=1&y=%20")
    assert status == 308
    assert headers["Location"] == "/alpha/?x=1&y=%20"


def test_unknown_slug_gets_json_404_listing_known(stack):
    status, headers, body = stack.request("GET", "/nope/x", headers={"Accept": "application/json"})
    assert status == 404
    assert headers["Content-Type"].startswith("application/json")
    answer = json.loads(body)
    assert answer["error"] == "not_found" and answer["slug"] == "nope"
    assert {"alpha", "beta"} <= set(answer["known"])


def test_unknown_slug_gets_html_404_for_browsers(stack):
    status, headers, body = stack.request("GET", "/nope/", headers={"Accept": "text/html,*/*;q=0.8"})
    assert status == 404
    assert headers["Content-Type"].startswith("text/html")
    assert b'href="/alpha/"' in body and b"nope" in body


def test_unknown_local_host_gets_404_not_dashboard(stack):
    status, headers, body = stack.request("GET", "/", headers={"Host": f"ghost-{USERNAME}.local"})
    assert status == 404
    assert json.loads(body)["error"] == "not_found"
    status, headers, body = stack.request("GET", "/", headers={"Host": "ghost.localhost", "Accept": "text/html"})
    assert status == 404 and headers["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PUT", "PATCH", "DELETE", "POST"])
def test_methods_are_forwarded(stack, method):
    body = b'{"k": 1}' if method in ("PUT", "PATCH", "POST") else None
    status, headers, answer = stack.request(method, "/alpha/echo/m", body=body,
                                            headers={"Content-Type": "application/json"})
    assert status == 200
    if method == "HEAD":
        assert answer == b""
        assert int(headers["Content-Length"]) > 0  # the backend's length for the GET body
        return
    seen = json.loads(answer)
    assert seen["method"] == method
    assert seen["body_size"] == (len(body) if body else 0)


def test_form_post_body_is_forwarded_not_parsed(stack):
    form = b"a=1&b=" + b"x" * 300_000
    status, _, answer = stack.request("POST", "/alpha/echo/form", body=form,
                                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and json.loads(answer)["body_size"] == len(form)


def test_silent_backend_gets_504_json_after_the_bound(stack):
    # /hang never answers: only the router's --backend-timeout bound can end the request, and the
    # answer names it. That the bound is kept, no sooner and no later, is shown on a Clock in
    # test_forwarding; the real figure is bench/timing_bounds.py's.
    status, headers, body = stack.request("GET", "/alpha/hang")
    assert status == 504
    answer = json.loads(body)
    assert answer["error"] == "gateway_timeout" and answer["backend"] == "alpha"
    assert "alpha" in answer["message"] and "1s" in answer["message"]


def test_refused_backend_gets_502_json_naming_it(stack):
    gamma = stack.start_backend("gamma")
    gamma.stop()
    status, headers, body = stack.request("GET", "/gamma/global/health")
    assert status == 502
    assert headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    assert answer["error"] == "bad_gateway" and answer["backend"] == "gamma"
    assert "refused" in answer["message"] and str(gamma.port) in answer["message"]
    # A request on the same keep-alive connection still works afterwards.
    connection = stack.connect()
    try:
        for path in ("/gamma/x", "/alpha/global/health"):
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
        assert response.status == 200
    finally:
        connection.close()


def test_absolute_form_target_on_a_backend_host_is_rejected_cleanly(stack):
    answer = raw_exchange(
        stack.router.port,
        f"GET http://evil.example/x HTTP/1.1\r\nHost: alpha-{USERNAME}.local\r\nConnection: close\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
