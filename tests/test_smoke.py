"""End to end: a router subprocess finds fake OpenCode servers and answers its API."""

from __future__ import annotations

from .support import http_json, wait_for


def test_router_finds_fake_servers(tmp_path, fake_opencode_factory, router_factory):
    first = fake_opencode_factory(tmp_path / "alpha")
    second = fake_opencode_factory(tmp_path / "Beta")
    low, high = sorted((first.port, second.port))
    router = router_factory("--scan-start", str(low), "--scan-end", str(high), "--scan-interval", "1s")
    backends = wait_for(lambda: len(http_json(router.url + "/api/backends")) == 2 and http_json(router.url + "/api/backends"))
    assert [b["slug"] for b in backends] == ["alpha", "beta"]
    assert {b["project_path"] for b in backends} == {str(tmp_path / "alpha"), str(tmp_path / "Beta")}
