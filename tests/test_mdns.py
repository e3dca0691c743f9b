"""Unit tests of the mDNS advertiser: addresses, records, and following the registry (fake responder)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from opencoderouter.api import RouterAPI
from opencoderouter.config import Options
from opencoderouter.hosts import HostPolicy
from opencoderouter.mdns import (
    SERVICE_TYPE,
    InterfaceAddress,
    MdnsAdvertiser,
    NameTaken,
    make_advert,
    plan_addresses,
    service_info,
)
from opencoderouter.registry import Naming, Registry, Sighting
from opencoderouter.routing import Router

ETH = [
    InterfaceAddress("lo", 1, "127.0.0.1"),
    InterfaceAddress("lo", 1, "::1"),
    InterfaceAddress("eth0", 2, "192.168.1.20"),
    InterfaceAddress("eth0", 2, "2001:db8::20"),
    InterfaceAddress("eth0", 2, "fe80::1"),
    InterfaceAddress("docker0", 3, "172.17.0.1"),
    InterfaceAddress("tun0", 4, "10.8.0.5"),
]


class FakeResponder:
    """Records what would be sent; operations finish when the test says so (or at once)."""

    def __init__(self, interfaces: Sequence[str | int], immediate: bool = True) -> None:
        self.interfaces = list(interfaces)
        self.immediate = immediate
        self.registered: dict[str, Any] = {}
        self.calls: list[tuple[str, str]] = []
        self.pending: list[Deferred[Any]] = []
        self.taken_names: set[str] = set()
        self.taken_hosts: set[str] = set()
        self.closed = False

    def _finish(self, value: Any = None) -> Deferred[Any]:
        if self.immediate:
            return defer.succeed(value)
        waiting: Deferred[Any] = Deferred()
        self.pending.append(waiting)
        return waiting

    def release_all(self) -> None:
        """Finish the operations pending now (not the ones they start)."""
        waiting, self.pending = self.pending, []
        for operation in waiting:
            operation.callback(None)

    def register(self, info: Any) -> Deferred[None]:
        self.calls.append(("register", info.name))
        if info.name in self.taken_names:
            return defer.fail(NameTaken(info.name))
        self.registered[info.name] = info
        return self._finish()

    def update(self, info: Any) -> Deferred[None]:
        self.calls.append(("update", info.name))
        self.registered[info.name] = info
        return self._finish()

    def unregister(self, info: Any) -> Deferred[None]:
        self.calls.append(("unregister", info.name))
        del self.registered[info.name]
        return self._finish()

    def host_taken(self, host: str, own_addresses: frozenset[str]) -> Deferred[bool]:
        return defer.succeed(host in self.taken_hosts)

    def update_interfaces(self, interfaces: Sequence[str | int]) -> Deferred[None]:
        self.calls.append(("interfaces", ",".join(map(str, interfaces))))
        self.interfaces = list(interfaces)
        return defer.succeed(None)

    def close(self) -> Deferred[None]:
        self.closed = True
        return defer.succeed(None)


class Harness:
    """An advertiser on a Clock, a Registry, and one FakeResponder it creates."""

    def __init__(self, bind: Any = None, entries: list[InterfaceAddress] | None = None,
                 selectors: Sequence[str] = (), immediate: bool = True) -> None:
        self.clock = Clock()
        self.registry = Registry(self.clock, stale_after=30, naming=Naming(username="alice", os_user="alice"))
        self.entries = list(ETH if entries is None else entries)
        self.responders: list[FakeResponder] = []
        self.listening: Deferred[Any] = Deferred()
        self.bind = bind if bind is not None else IPv4Address("TCP", "0.0.0.0", 8080)
        self.immediate = immediate

        def factory(reactor: Any, interfaces: Sequence[str | int]) -> Deferred[FakeResponder]:
            responder = FakeResponder(interfaces, immediate=self.immediate)
            self.responders.append(responder)
            return defer.succeed(responder)

        self.advertiser = MdnsAdvertiser(
            self.registry, self.clock, listening=lambda: self.listening, interfaces=selectors,
            refresh_interval=5.0, addresses=lambda: list(self.entries), responder_factory=factory,
        )

    def start(self) -> None:
        self.advertiser.startService()
        self.listening.callback(self.bind)

    def release_all(self) -> None:
        self.responder.release_all()

    @property
    def responder(self) -> FakeResponder:
        assert len(self.responders) == 1
        return self.responders[0]

    def see(self, path: str, port: int, version: str = "1.0", owner: str | None = None) -> None:
        self.registry.record(Sighting(port=port, project_path=path, version=version, owner=owner))


def txt(info: Any) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in info.properties.items()}


# -- addresses ---------------------------------------------------------------------------------------------


def test_wildcard_ipv4_advertises_every_non_loopback_ipv4_address():
    plan = plan_addresses("0.0.0.0", ETH)
    assert plan.addresses == ("10.8.0.5", "172.17.0.1", "192.168.1.20")
    assert plan.interfaces == ("10.8.0.5", "172.17.0.1", "192.168.1.20")
    assert plan.reason == ""


def test_wildcard_ipv6_adds_global_ipv6_but_not_link_local():
    plan = plan_addresses("::", ETH)
    assert plan.addresses == ("10.8.0.5", "172.17.0.1", "192.168.1.20", "2001:db8::20")
    assert 2 in plan.interfaces and "fe80::1" not in plan.addresses


def test_specific_hostname_advertises_only_that_address():
    plan = plan_addresses("192.168.1.20", ETH)
    assert plan.addresses == ("192.168.1.20",)
    assert plan.interfaces == ("192.168.1.20",)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "127.0.0.2"])
def test_loopback_listener_advertises_nothing_and_says_why(host):
    plan = plan_addresses(host, ETH)
    assert plan.addresses == () and plan.interfaces == ()
    assert "loopback" in plan.reason and host in plan.reason


def test_mdns_interface_by_name_or_address_limits_the_addresses():
    assert plan_addresses("0.0.0.0", ETH, ["eth0"]).addresses == ("192.168.1.20",)
    assert plan_addresses("0.0.0.0", ETH, ["eth0", "10.8.0.5"]).addresses == ("10.8.0.5", "192.168.1.20")


def test_mdns_interface_matching_nothing_advertises_nothing_and_names_the_flag():
    plan = plan_addresses("0.0.0.0", ETH, ["wlan9"])
    assert plan.addresses == ()
    assert "--mdns-interface wlan9" in plan.reason


def test_specific_hostname_outside_mdns_interface_is_not_advertised():
    plan = plan_addresses("172.17.0.1", ETH, ["eth0"])
    assert plan.addresses == ()
    assert "172.17.0.1" in plan.reason


# -- records -----------------------------------------------------------------------------------------------


def test_service_info_carries_name_host_port_addresses_and_every_txt_key():
    clock = Clock()
    registry = Registry(clock, stale_after=30, naming=Naming(username="alice", os_user="alice"))
    backend = registry.record(Sighting(port=30001, project_path="/home/alice/My App", version="1.2.3"))
    advert = make_advert(backend, 8080, ("192.168.1.20",))
    info = service_info(advert, advert.label)
    assert info.type == SERVICE_TYPE
    assert info.name == "my-app-alice._opencode._tcp.local."
    assert info.server == backend.domain + "." == "my-app-alice.local."
    assert info.port == 8080
    assert info.parsed_addresses() == ["192.168.1.20"]
    assert txt(info) == {
        "project": "My App",
        "path": "/home/alice/My App",
        "backend": "127.0.0.1:30001",
        "owner": "alice",
        "version": "1.2.3",
        "path_prefix": "/my-app/",
    }


def test_overlong_txt_value_is_cut_to_fit_one_txt_string():
    clock = Clock()
    registry = Registry(clock, stale_after=30, naming=Naming(username="alice", os_user="alice"))
    backend = registry.record(Sighting(port=30001, project_path="/p/" + "é" * 300, version="1"))
    info = service_info(make_advert(backend, 8080, ("10.0.0.1",)), "x-alice")
    assert len(b"path=" + info.properties[b"path"]) <= 255
    info.properties[b"path"].decode("utf-8")  # cut on a character boundary


# -- following the registry ---------------------------------------------------------------------------------


def test_nothing_happens_before_the_router_listens():
    h = Harness()
    h.advertiser.startService()
    h.see("/src/alpha", 30001)
    assert h.responders == []
    h.listening.callback(h.bind)
    assert list(h.responder.registered) == ["alpha-alice._opencode._tcp.local."]


def test_own_backends_are_registered_with_the_listening_port_and_addresses():
    h = Harness(bind=IPv4Address("TCP", "0.0.0.0", 31999), entries=ETH[:3])
    h.start()
    h.see("/src/alpha", 30001)
    h.see("/src/beta", 30002, owner="alice")
    assert h.responder.interfaces == ["192.168.1.20"]
    infos = h.responder.registered
    assert sorted(infos) == ["alpha-alice._opencode._tcp.local.", "beta-alice._opencode._tcp.local."]
    assert all(i.port == 31999 and i.parsed_addresses() == ["192.168.1.20"] for i in infos.values())
    assert advertised_names(h.registry) == {"alpha": "alpha-alice", "beta": "beta-alice"}


def test_backends_found_before_start_are_registered_at_start():
    h = Harness()
    h.see("/src/alpha", 30001)
    h.start()
    assert list(h.responder.registered) == ["alpha-alice._opencode._tcp.local."]


def test_another_users_backend_is_not_advertised():
    h = Harness()
    h.start()
    h.see("/src/theirs", 30003, owner="bob")
    assert h.responder.registered == {}
    assert advertised_names(h.registry) == {}


def test_backend_changing_owner_to_another_user_is_withdrawn():
    h = Harness()
    h.start()
    h.see("/src/alpha", 30001, owner="alice")
    h.see("/src/alpha", 30001, owner="bob")
    assert h.responder.registered == {}
    assert h.responder.calls[-1] == ("unregister", "alpha-alice._opencode._tcp.local.")


def test_version_change_updates_the_txt_record():
    h = Harness()
    h.start()
    h.see("/src/alpha", 30001, version="1.0")
    h.see("/src/alpha", 30001, version="2.0")
    assert h.responder.calls == [
        ("register", "alpha-alice._opencode._tcp.local."),
        ("update", "alpha-alice._opencode._tcp.local."),
    ]
    assert txt(h.responder.registered["alpha-alice._opencode._tcp.local."])["version"] == "2.0"


def test_backend_port_change_updates_the_backend_txt_key():
    h = Harness()
    h.start()
    h.see("/src/alpha", 30001)
    h.see("/src/alpha", 30005)
    assert txt(h.responder.registered["alpha-alice._opencode._tcp.local."])["backend"] == "127.0.0.1:30005"


def test_liveness_change_alone_sends_nothing():
    h = Harness()
    h.start()
    h.see("/src/alpha", 30001)
    h.registry.record_scan([], complete=True)  # marked down, not pruned: still routed, still advertised
    assert h.responder.calls == [("register", "alpha-alice._opencode._tcp.local.")]


def test_pruned_backend_is_unregistered():
    h = Harness()
    h.start()
    h.see("/src/alpha", 30001)
    h.clock.advance(31)
    h.registry.prune_stale()
    assert h.responder.registered == {}
    assert h.responder.calls[-1] == ("unregister", "alpha-alice._opencode._tcp.local.")
    assert advertised_names(h.registry) == {}


def test_changes_during_a_registration_are_applied_after_it():
    h = Harness(immediate=False)
    h.start()
    h.see("/src/alpha", 30001, version="1.0")
    h.see("/src/alpha", 30001, version="2.0")
    h.see("/src/alpha", 30001, version="3.0")
    assert h.responder.calls == [("register", "alpha-alice._opencode._tcp.local.")]
    h.release_all()
    assert h.responder.calls[-1] == ("update", "alpha-alice._opencode._tcp.local.")
    assert len(h.responder.calls) == 2  # the two changes coalesced into one update
    h.release_all()
    assert txt(h.responder.registered["alpha-alice._opencode._tcp.local."])["version"] == "3.0"


def test_name_taken_on_the_network_moves_to_the_next_free_name_deterministically():
    h = Harness()
    h.start()
    h.responder.taken_names.add("alpha-alice._opencode._tcp.local.")
    h.responder.taken_hosts.add("alpha-alice-2.local.")
    h.see("/src/alpha", 30001)
    assert list(h.responder.registered) == ["alpha-alice-3._opencode._tcp.local."]
    info = h.responder.registered["alpha-alice-3._opencode._tcp.local."]
    assert info.server == "alpha-alice-3.local."
    assert advertised_names(h.registry) == {"alpha": "alpha-alice-3"}
    assert h.registry.by_host_label("alpha-alice-3").slug == "alpha"


def test_advertised_name_is_in_api_backends_and_routes_by_host():
    h = Harness()
    h.start()
    h.responder.taken_names.add("alpha-alice._opencode._tcp.local.")
    h.see("/src/alpha", 30001)
    h.see("/src/theirs", 30002, owner="bob")
    api = RouterAPI(h.registry, mdns=True)
    stub = StubTreq(api.resource())
    response = pytest_twisted_result(stub.get("http://router/backends"))
    body = json.loads(pytest_twisted_result(response.content()))
    assert {b["slug"]: b["mdns_name"] for b in body} == {"alpha": "alpha-alice-2", "theirs": None}
    router = Router(h.registry, HostPolicy(lambda name: None, names=set, addresses=set))
    assert router.backend_for_host("alpha-alice-2.local").slug == "alpha"
    assert router.backend_for_host("alpha-alice.local").slug == "alpha"


def test_api_has_no_mdns_name_when_mdns_is_off():
    h = Harness()
    h.see("/src/alpha", 30001)
    stub = StubTreq(RouterAPI(h.registry).resource())
    body = json.loads(pytest_twisted_result(pytest_twisted_result(stub.get("http://router/backends")).content()))
    assert "mdns_name" not in body[0]


def advertised_names(registry: Registry) -> dict[str, str]:
    """``{slug: advertised name}`` as the registry records them."""
    return {b.slug: b.mdns_name for b in registry.backends() if b.mdns_name}


def pytest_twisted_result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred did not fire"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_address_change_moves_sockets_and_updates_records():
    h = Harness(entries=ETH[:3])
    h.start()
    h.see("/src/alpha", 30001)
    h.entries = ETH[:2] + [InterfaceAddress("eth0", 2, "192.168.1.77")]
    h.clock.advance(5)
    assert ("interfaces", "192.168.1.77") in h.responder.calls
    assert h.responder.calls[-1] == ("update", "alpha-alice._opencode._tcp.local.")
    assert h.responder.registered["alpha-alice._opencode._tcp.local."].parsed_addresses() == ["192.168.1.77"]


def test_losing_every_address_withdraws_and_regaining_one_readvertises():
    h = Harness(entries=ETH[:3])
    h.start()
    h.see("/src/alpha", 30001)
    h.entries = ETH[:2]
    h.clock.advance(5)
    assert h.responder.registered == {}
    h.entries = ETH[:3]
    h.clock.advance(5)
    assert list(h.responder.registered) == ["alpha-alice._opencode._tcp.local."]


def test_loopback_listener_never_opens_zeroconf():
    h = Harness(bind=IPv4Address("TCP", "127.0.0.1", 8080))
    h.start()
    h.see("/src/alpha", 30001)
    h.clock.advance(5)
    assert h.responders == []
    assert h.advertiser.stopService().called


def test_unix_socket_listener_advertises_nothing():
    h = Harness(bind=UNIXAddress("/tmp/x.sock"))
    h.start()
    h.see("/src/alpha", 30001)
    assert h.responders == []


def test_stop_unregisters_everything_then_closes_and_fires_when_done():
    h = Harness(immediate=False)
    h.start()
    h.see("/src/alpha", 30001)
    h.see("/src/beta", 30002)
    h.release_all()
    stopped = h.advertiser.stopService()
    assert not stopped.called
    assert sorted(c for c in h.responder.calls if c[0] == "unregister") == [
        ("unregister", "alpha-alice._opencode._tcp.local."),
        ("unregister", "beta-alice._opencode._tcp.local."),
    ]
    assert not h.responder.closed
    h.release_all()
    assert stopped.called and h.responder.closed
    assert h.responder.registered == {}
    h.see("/src/gamma", 30003)  # no longer following the registry
    assert h.responder.registered == {}


def test_stop_during_a_registration_waits_for_it_then_withdraws_it():
    h = Harness(immediate=False)
    h.start()
    h.see("/src/alpha", 30001)
    stopped = h.advertiser.stopService()
    h.release_all()
    h.release_all()
    assert stopped.called
    assert h.responder.calls == [
        ("register", "alpha-alice._opencode._tcp.local."),
        ("unregister", "alpha-alice._opencode._tcp.local."),
    ]


def test_failed_registration_is_logged_and_retried_on_the_next_refresh():
    h = Harness()
    h.start()
    original = h.responder.register
    attempts: list[str] = []

    def flaky(info: Any) -> Deferred[None]:
        attempts.append(info.name)
        if len(attempts) == 1:
            return defer.fail(OSError("network unreachable"))
        return original(info)

    h.responder.register = flaky  # type: ignore[method-assign]
    h.see("/src/alpha", 30001)
    assert h.responder.registered == {}
    h.clock.advance(5)
    assert list(h.responder.registered) == ["alpha-alice._opencode._tcp.local."]


def test_zeroconf_that_cannot_open_its_sockets_is_logged_once_and_retried():
    from twisted.logger import globalLogPublisher

    h = Harness()
    failures = [OSError(19, "No such device")] * 2
    real_factory = h.advertiser._responder_factory

    def flaky(reactor: Any, interfaces: Sequence[str | int]) -> Deferred[Any]:
        if failures:
            return defer.fail(failures.pop())
        return real_factory(reactor, interfaces)

    h.advertiser._responder_factory = flaky
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        h.start()
        h.see("/src/alpha", 30001)
        h.clock.advance(5)
        assert h.responders == []
        h.clock.advance(5)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [e for e in seen if "cannot send on" in e.get("log_format", "")]
    assert len(warnings) == 1 and "No such device" in warnings[0]["error"]
    assert list(h.responder.registered) == ["alpha-alice._opencode._tcp.local."]


# -- options ----------------------------------------------------------------------------------------------


def test_mdns_interface_flag_is_repeatable():
    options = Options()
    options.parseOptions(["--mdns-interface", "eth0", "--mdns-interface", "192.168.1.20"])
    assert options["mdns-interface"] == ["eth0", "192.168.1.20"]


def test_mdns_interface_defaults_to_every_interface():
    options = Options()
    options.parseOptions([])
    assert options["mdns-interface"] == []


def test_blank_mdns_interface_is_refused_with_a_sentence():
    with pytest.raises(SystemExit) as error:
        Options().parseOptions(["--mdns-interface", " "])
    assert "--mdns-interface" in str(error.value)


# -- wiring ------------------------------------------------------------------------------------------------


def test_make_service_has_an_mdns_child_only_when_mdns_is_on():
    from twisted.application.service import IServiceCollection

    from opencoderouter.tap import makeService

    on, off = Options(), Options()
    on.parseOptions(["--port", "0", "--mdns=true", "--mdns-interface", "eth0"])
    off.parseOptions(["--port", "0", "--mdns=false"])
    advertiser = makeService(on).getServiceNamed("mdns")
    assert isinstance(advertiser, MdnsAdvertiser) and advertiser._selectors == ["eth0"]
    with pytest.raises(KeyError):
        IServiceCollection(makeService(off)).getServiceNamed("mdns")


@pytest_twisted.ensureDeferred
async def test_web_service_tells_the_advertiser_its_listening_port():
    from opencoderouter.tap import makeService

    options = Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--mdns=false"])
    web = makeService(options).getServiceNamed("web")
    early = web.when_listening()
    web.privilegedStartService()
    try:
        port = await early
        late = await web.when_listening()
        assert late is port and port.getHost().port > 0
    finally:
        await web.stopService()
