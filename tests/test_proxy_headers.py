"""Headers through the proxy: hop-by-hop stripped both ways, duplicates kept, X-Forwarded-*, gzip untouched."""

from __future__ import annotations

import http.client
import json
from urllib.parse import quote

import pytest

from .proxy_backend import GZIP_BODY
from .proxy_stack import USERNAME, raw_exchange, running_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A router with backend ``alpha``."""
    with running_stack(tmp_path_factory.mktemp("headers")) as stack:
        yield stack


def raw_request(stack, lines: list[str]) -> tuple[bytes, bytes]:
    """Send a hand-written request (``Connection: close`` appended unless given); return (head, body)."""
    if not any(line.lower().startswith("connection:") for line in lines):
        lines = [*lines, "Connection: close"]
    request = "\r\n".join([*lines, "", ""]).encode("latin-1")
    answer = raw_exchange(stack.router.port, request)
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def header_names(head: bytes) -> list[str]:
    return [line.split(b":", 1)[0].decode().lower() for line in head.split(b"\r\n")[1:]]


def test_hop_by_hop_request_headers_are_stripped(stack):
    head, body = raw_request(stack, [
        "GET /alpha/echo HTTP/1.1",
        "Host: router.example:8080",
        "Connection: X-Secret-Hop, close",
        "X-Secret-Hop: do-not-forward",
        "Keep-Alive: timeout=5",
        "TE: trailers",
        "Trailer: X-Checksum",
        "Upgrade: h2c",
        "Proxy-Authorization: Basic Zm9vOmJhcg==",
        "Proxy-Connection: keep-alive",
        "X-End-To-End: kept",
    ])
    assert head.startswith(b"HTTP/1.1 200"), head
    seen = {name.lower() for name, _ in json.loads(body)["headers"]}
    for hop in ("connection", "x-secret-hop", "keep-alive", "te", "trailer", "upgrade",
                "proxy-authorization", "proxy-connection"):
        assert hop not in seen, hop
    assert "x-end-to-end" in seen


def test_duplicate_request_headers_are_kept_in_order(stack):
    head, body = raw_request(stack, [
        "GET /alpha/echo HTTP/1.1", "Host: x", "X-Multi: one", "X-Multi: two", "Cookie: a=1", "Cookie: b=2",
    ])
    headers = json.loads(body)["headers"]
    assert [v for n, v in headers if n == "X-Multi"] == ["one", "two"]
    assert [v for n, v in headers if n == "Cookie"] == ["a=1", "b=2"]


def test_forwarded_headers_are_added_and_host_rewritten(stack):
    port = stack.backends["alpha"].port
    head, body = raw_request(stack, [
        "GET /alpha/echo HTTP/1.1", "Host: devbox:8080",
        "X-Forwarded-For: 203.0.113.7", "X-Forwarded-For: 198.51.100.2",
        "X-Forwarded-Proto: gopher", "X-Forwarded-Prefix: /spoofed",
    ])
    headers = json.loads(body)["headers"]
    values = {}
    for name, value in headers:
        values.setdefault(name, []).append(value)
    assert values["Host"] == [f"127.0.0.1:{port}"]
    assert values["X-Forwarded-For"] == ["203.0.113.7, 198.51.100.2, 127.0.0.1"]
    assert values["X-Forwarded-Proto"] == ["http"]
    assert values["X-Forwarded-Host"] == ["devbox:8080"]
    assert values["X-Forwarded-Prefix"] == ["/alpha"]


def test_host_mode_adds_forwarded_headers_without_prefix(stack):
    host = f"alpha-{USERNAME}.localhost:1234"
    head, body = raw_request(stack, ["GET /echo HTTP/1.1", f"Host: {host}", "X-Forwarded-Prefix: /spoofed"])
    values = dict(json.loads(body)["headers"])
    assert values["X-Forwarded-For"] == "127.0.0.1"
    assert values["X-Forwarded-Host"] == host
    assert "X-Forwarded-Prefix" not in values


def test_hop_by_hop_response_headers_are_stripped(stack):
    sets = ["Connection: X-Backend-Hop", "X-Backend-Hop: internal", "Keep-Alive: timeout=9",
            "Proxy-Authenticate: Basic", "Trailer: X-Sum", "Upgrade: h2c", "X-Kept: yes"]
    query = "&".join("set=" + quote(item) for item in sets)
    head, body = raw_request(stack, [f"GET /alpha/echo?{query} HTTP/1.1", "Host: x"])
    assert head.startswith(b"HTTP/1.1 200"), head
    names = header_names(head)
    for hop in ("x-backend-hop", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
        assert hop not in names, hop
    assert "x-kept" in names
    # The only Connection header is the router's own (the client asked to close).
    assert [line for line in head.split(b"\r\n") if line.lower().startswith(b"connection:")] == [b"Connection: close"]


def test_two_set_cookie_headers_survive(stack):
    status, headers, body = stack.request("GET", "/alpha/cookies")
    assert status == 200
    assert headers.get_all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]


def test_gzip_body_bytes_are_identical_to_direct(stack):
    direct = http.client.HTTPConnection("127.0.0.1", stack.backends["alpha"].port, timeout=5)
    try:
        direct.request("GET", "/gzip", headers={"Accept-Encoding": "gzip"})
        direct_response = direct.getresponse()
        direct_body = direct_response.read()
    finally:
        direct.close()
    status, headers, body = stack.request("GET", "/alpha/gzip", headers={"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert body == direct_body == GZIP_BODY
    assert int(headers["Content-Length"]) == len(GZIP_BODY)


def test_response_without_content_type_gets_none_added(stack):
    status, headers, body = stack.request("POST", "/alpha/session/ses_missing/prompt_async", body=b"{}")
    # A 404 JSON from the backend keeps exactly its own content type.
    assert status == 404 and headers["Content-Type"] == "application/json"
    status, headers, body = stack.request("OPTIONS", "/alpha/echo?status=204")
    assert status == 204 and body == b""
    assert headers.get("Content-Type") in (None, "application/json")


def test_backend_server_and_date_headers_pass_through(stack):
    status, headers, _ = stack.request("GET", "/alpha/global/health")
    assert len(headers.get_all("Server")) == 1
    assert len(headers.get_all("Date")) == 1
