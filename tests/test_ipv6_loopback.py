"""A server listening only on the IPv6 loopback (``opencode serve --hostname ::1``) is found, routed, watched
and given tasks."""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred

from opencoderouter.agents import AgentWatcher, agent_client
from opencoderouter.forwarding import BackendCredentials
from opencoderouter.registry import Registry, Sighting
from opencoderouter.testing import FakeOpenCode

from .support import FakeOpenCodeProcess, RouterProcess, http_get, http_json, wait_for
from .tasks_support import Backends, Harness, until


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


# -- in process: the agent watcher and the task service talk to [::1] itself -------------------------
@pytest_twisted.ensureDeferred
async def test_the_agent_watcher_follows_a_server_on_the_ipv6_loopback_only():
    fake = FakeOpenCode("/home/alice/sixer", heartbeat=0.2)
    listening = fake.listen(reactor, 0, interface="::1")
    registry = Registry(reactor, stale_after=1e9)
    client, pool = agent_client(reactor)
    watcher = AgentWatcher(registry, reactor, client, BackendCredentials(), pool=pool)
    try:
        registry.record(Sighting(listening.getHost().port, fake.directory, "fake", address="::1"))
        watcher.startService()
        state = watcher.state_of("sixer")
        assert state is not None
        await until(lambda: state.known, what="the watcher to read the ::1 server")
        assert len(fake.streams) == 1
    finally:
        await watcher.stopService()
        fake.close_streams()
        await maybeDeferred(listening.stopListening)


@pytest_twisted.ensureDeferred
async def test_a_task_for_a_server_on_the_ipv6_loopback_only_is_dispatched_there(tmp_path):
    backends = Backends(tmp_path / "projects")
    harness = Harness(tmp_path, backends)
    try:
        sixer = backends.start("Sixer", address="::1")
        service = harness.start([])
        record = service.submit("---\nproject: Sixer\n---\nSay hello\n")
        await until(lambda: record.state in ("done", "failed"), what="the task to finish")
        assert (record.state, record.error) == ("done", None)
        assert record.text == "Hello from the fake model." and len(sixer.prompts) == 1
    finally:
        await harness.stop()
        await backends.close()


def test_messages_name_a_server_on_the_ipv6_loopback_by_its_address_not_the_stand_in_name():
    from opencoderouter.loopback_http import loopback_url, shown_url

    assert shown_url(loopback_url("::1", 4096, "/")) == "http://[::1]:4096/"
    assert shown_url(loopback_url("127.0.0.1", 4096, "/x")) == "http://127.0.0.1:4096/x"
