"""Hostile Host headers and paths never crash or wedge the router: each gets a well-formed answer."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .proxy_stack import USERNAME, raw_exchange, running_stack

STATUS_LINE = re.compile(rb"\AHTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A router with backend ``alpha``."""
    with running_stack(tmp_path_factory.mktemp("fuzz"), "--backend-timeout", "2s") as stack:
        yield stack


def ask(stack, path: bytes, host: bytes | None) -> int:
    """Send one request with raw bytes; return its status (the answer must be well-formed HTTP)."""
    lines = [b"GET " + path + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [b"Connection: close", b"", b""]
    answer = raw_exchange(stack.router.port, b"\r\n".join(lines), timeout=5)
    match = STATUS_LINE.match(answer)
    assert match, f"no status line for path={path!r} host={host!r}: {answer[:200]!r}"
    status = int(match.group(1))
    assert 200 <= status < 500, f"{status} for path={path!r} host={host!r}: {answer[:300]!r}"
    return status


def still_serving(stack) -> None:
    status, _, body = stack.request("GET", "/api/health")
    assert status == 200 and json.loads(body)["healthy"] is True
    status, _, body = stack.request("GET", "/alpha/global/health")
    assert status == 200 and json.loads(body)["healthy"] is True


NASTY_PATHS = [
    b"/..", b"/../../etc/passwd", b"/alpha/../../etc/passwd", b"/%2e%2e/%2e%2e/etc/passwd",
    b"/alpha/%2e%2e/api/health", b"//", b"//alpha//x", b"///api", b"/alpha%2Fx", b"/alpha%00/x",
    b"/alpha/\x00", b"/\x00", b"/alpha/\xff\xfe", b"/\xc3\xa9t\xc3\xa9", b"/%ff%fe/", b"/alpha/%",
    b"/alpha/%zz", b"/alpha?%", b"/?", b"/alpha?" + b"q" * 8000, b"/" + b"a" * 9000, b"/alpha/" + b"x/" * 3000,
    b"*", b"http://alpha/x", b"alpha", b"/alpha#frag", b"/api/../alpha/", b"/API/health", b"/Alpha/",
    b"/alpha/\x7f", b"/alpha/\t", b"/\\alpha\\x",
]
NASTY_HOSTS = [
    None, b"", b" ", b"alpha-tester.local.evil.com", b"evil.com", b"alpha-tester.local:99999", b"alpha-tester.local:",
    b"alpha-tester.local:abc", b"[::1]", b"[::1]:80", b"[", b"]", b"[alpha-tester.local]", b"..local", b".local",
    b".localhost", b"local", b"localhost", b"ALPHA-TESTER.LOCAL", b"alpha-tester.local..", b"\xc3\xa9.local",
    b"\xff.localhost", b"a" * 5000 + b".local", b"alpha-tester.local\x00evil", b"alpha-tester.local, evil.local",
    b"user@alpha-tester.local", b"alpha-tester.local/x", b"%61lpha-tester.local", b"127.0.0.1:1", b"0",
    b"x" * 64 + b".evil.com", b"a..b", b"\xb2\xff", b"host\x01name", b"-.local",
]


@pytest.mark.parametrize("path", NASTY_PATHS, ids=lambda p: repr(p)[:40])
def test_nasty_path_gets_a_well_formed_answer(stack, path):
    ask(stack, path, b"127.0.0.1")
    ask(stack, path, f"alpha-{USERNAME}.local".encode())


@pytest.mark.parametrize("host", NASTY_HOSTS, ids=lambda h: repr(h)[:40])
def test_nasty_host_gets_a_well_formed_answer(stack, host):
    ask(stack, b"/alpha/global/health", host)
    ask(stack, b"/", host)
    ask(stack, b"/api/health", host)
    ask(stack, b"/api/backends", host)


def test_router_still_serves_after_the_table(stack):
    still_serving(stack)


_PATH_BYTES = st.binary(min_size=0, max_size=80).map(lambda b: b.replace(b" ", b"%20").replace(b"\r", b"").replace(b"\n", b""))
_SEGMENTS = st.lists(
    st.one_of(st.sampled_from([b"alpha", b"api", b"..", b"%2e%2e", b"", b".", b"%2F", b"health", b"global"]), _PATH_BYTES),
    max_size=6,
)
_HOSTS = st.one_of(
    st.none(),
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.builds(lambda label, suffix, port: label + suffix + port,
              st.sampled_from([b"alpha-tester", b"ALPHA-Tester", b"beta-tester", b"alpha", b"x" * 70, b""]),
              st.sampled_from([b".local", b".localhost", b".LOCAL.", b".local.evil.com", b""]),
              st.sampled_from([b"", b":1", b":65536", b":", b":x"])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=_SEGMENTS, query=st.one_of(st.none(), _PATH_BYTES), host=_HOSTS)
def test_fuzzed_host_and_path_get_well_formed_answers(stack, segments, query, host):
    path = b"/" + b"/".join(segments)
    if query is not None:
        path += b"?" + query
    ask(stack, path, host)


def test_router_still_serves_after_fuzzing(stack):
    still_serving(stack)
