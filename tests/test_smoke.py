"""End to end: a router subprocess finds fake OpenCode servers and answers its API."""

from __future__ import annotations

from .support import free_port_block, http_json, wait_for


def test_router_finds_fake_servers(tmp_path, fake_opencode_factory, router_factory):
    low = free_port_block(2)
    fake_opencode_factory(tmp_path / "alpha", port=low)
    fake_opencode_factory(tmp_path / "Beta", port=low + 1)
    # A scan range holding only this test's servers, so parallel runs never see each other's.
    router = router_factory("--scan-start", str(low), "--scan-end", str(low + 1), "--scan-interval", "1s")
    backends = wait_for(lambda: len(http_json(router.url + "/api/backends")) == 2
                        and http_json(router.url + "/api/backends"))
    assert [b["slug"] for b in backends] == ["alpha", "beta"]
    assert {b["project_path"] for b in backends} == {str(tmp_path / "alpha"), str(tmp_path / "Beta")}
    # Probe connections are not news: the log has no line per connection.
    assert "Starting factory" not in router.log() and "Stopping factory" not in router.log()
