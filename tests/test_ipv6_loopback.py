"""A server listening only on the IPv6 loopback (``opencode serve --hostname ::1``) is found and routed."""

from __future__ import annotations

import json
import socket

import pytest

from .support import FakeOpenCodeProcess, RouterProcess, http_get, http_json, wait_for


def _ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _ipv6_loopback_works(), reason="no IPv6 loopback on this machine")


def test_a_server_on_the_ipv6_loopback_only_is_listed_and_routed_in_both_modes(tmp_path):
    backend = FakeOpenCodeProcess(tmp_path / "sixer", extra=("--hostname", "::1"))
    router = None
    try:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", backend.port), timeout=1).close()  # really ::1 only
        router = RouterProcess("--scan-start", str(backend.port), "--scan-end", str(backend.port),
                               "--username", "tester")
        [listed] = wait_for(lambda: http_json(router.url + "/api/backends"), timeout=15, what="the ::1 server")
        assert listed["slug"] == "sixer" and listed["port"] == backend.port
        status, _, body = http_get(router.url + "/sixer/global/health")
        assert status == 200 and json.loads(body)["healthy"] is True
        status, _, body = http_get(router.url + "/path", headers={"Host": "sixer-tester.localhost"})
        assert status == 200 and json.loads(body)["directory"] == str(tmp_path / "sixer")
    finally:
        if router is not None:
            router.stop()
        backend.stop()
