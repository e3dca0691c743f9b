"""Wide-area DNS-SD in memory: the key file, the UPDATE messages, registering and browsing with fakes."""

from __future__ import annotations

from typing import Any

import dns.name
import dns.tsig
import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from opencoderouter.dnssd import (
    DnsSdSettings,
    Registration,
    WideAreaDirectory,
    WideAreaRegistrar,
    parse_tsig_key,
    register_update,
    withdraw_update,
)
from opencoderouter.interfaces import InterfaceAddress
from opencoderouter.lan import Announcement, LanView
from opencoderouter.registry import Naming, Registry, Sighting

KEY_FILE = """# made by tsig-keygen
key "ocr-key" {
\talgorithm hmac-sha256;
\tsecret "QQ6MTPWqkB0Dr/4eGH/zKldqE0l9KcjYaBTe9t1uo6Q=";
};
"""
ZONE = dns.name.from_text("example.org")


def settings() -> DnsSdSettings:
    return DnsSdSettings("example.org", ("10.0.0.53", 53), 30.0, parse_tsig_key(KEY_FILE))


def test_a_bind_key_file_is_read_as_a_tsig_key():
    key = parse_tsig_key(KEY_FILE)
    assert key.name == dns.name.from_text("ocr-key") and key.algorithm == dns.tsig.HMAC_SHA256
    with pytest.raises(ValueError, match="holds no key statement"):
        parse_tsig_key('key "x" { secret "abc="; };', "/etc/k")


def test_registering_replaces_srv_txt_and_addresses_and_adds_our_ptr():
    registration = Registration("alpha-alice", 8080, ("10.0.0.1",), (("project", "alpha"), ("owner", "alice")))
    text = register_update(settings(), ZONE, registration, exclusive=True).to_text()
    # (rdata names are shown relative to the zone)
    assert ";PREREQ\nalpha-alice._opencode._tcp.example.org. NONE ANY\n" in text  # the name must be free
    assert "alpha-alice._opencode._tcp.example.org. ANY SRV\n" in text
    assert "alpha-alice._opencode._tcp.example.org. 120 IN SRV 0 0 8080 alpha-alice\n" in text
    assert 'alpha-alice._opencode._tcp.example.org. 120 IN TXT "project=alpha" "owner=alice"' in text
    assert "_opencode._tcp.example.org. 120 IN PTR alpha-alice._opencode._tcp\n" in text
    assert "alpha-alice.example.org. ANY A\n" in text and "alpha-alice.example.org. 120 IN A 10.0.0.1" in text
    assert "_services._dns-sd._udp.example.org. 120 IN PTR _opencode._tcp\n" in text
    assert "NONE ANY" not in register_update(settings(), ZONE, registration, exclusive=False).to_text()


def test_withdrawing_deletes_only_our_ptr_and_our_names():
    text = withdraw_update(settings(), ZONE, "alpha-alice").to_text()
    assert "_opencode._tcp.example.org. 0 NONE PTR alpha-alice._opencode._tcp\n" in text
    assert "alpha-alice._opencode._tcp.example.org. ANY ANY\n" in text
    assert "alpha-alice.example.org. ANY ANY\n" in text


class FakeUpdater:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.answers: list[str] = []
        self.holders: dict[str, tuple[int | None, set[str]]] = {}

    def send(self, make: Any) -> str:
        self.sent.append(make(ZONE).to_text())
        return self.answers.pop(0) if self.answers else "NOERROR"

    def holder(self, label: str) -> tuple[int | None, set[str]]:
        return self.holders.get(label, (None, set()))


class SyncPool:
    """deferToThreadPool with this pool runs the call at once (no threads in unit tests)."""

    def callInThreadWithCallback(self, on_result: Any, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            on_result(True, fn(*args, **kwargs))
        except Exception as error:
            from twisted.python.failure import Failure

            on_result(False, Failure(error))


class ThreadlessClock(Clock):
    def getThreadPool(self) -> SyncPool:
        return SyncPool()

    def callFromThread(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        fn(*args, **kwargs)


def make_registrar() -> tuple[Registry, WideAreaRegistrar, FakeUpdater, ThreadlessClock]:
    clock = ThreadlessClock()
    registry = Registry(clock, stale_after=1000, naming=Naming(username="alice", os_user="alice"))
    updater = FakeUpdater()
    registrar = WideAreaRegistrar(
        registry, clock, settings(), listening=lambda: defer.succeed(IPv4Address("TCP", "0.0.0.0", 8080)),
        addresses=lambda: [InterfaceAddress("eth0", 2, "10.0.0.1")], updater=updater)
    return registry, registrar, updater, clock


def test_the_registrar_registers_own_projects_follows_changes_and_withdraws_on_stop():
    registry, registrar, updater, clock = make_registrar()
    registry.record_scan([Sighting(30001, "/home/alice/alpha", "1.0", "alice"),
                          Sighting(30002, "/home/bob/theirs", "1.0", "bob")])
    registrar.startService()
    assert registrar.names() == {"alpha-alice"}  # only the router's own user's projects
    assert len(updater.sent) == 1 and "alpha-alice._opencode._tcp.example.org. NONE ANY" in updater.sent[0]
    clock.advance(30)
    assert len(updater.sent) == 1  # nothing changed: nothing sent
    registry.record_scan([Sighting(30001, "/home/alice/alpha", "2.0", "alice")])
    clock.advance(30)
    assert len(updater.sent) == 2 and '"version=2.0"' in updater.sent[1] and "NONE ANY" not in updater.sent[1]
    stopped = registrar.stopService()
    assert stopped.called and registrar.names() == set()
    assert "0 NONE PTR alpha-alice._opencode._tcp\n" in updater.sent[2]


def test_a_name_held_by_another_host_is_left_alone_but_our_own_leftover_is_taken_over():
    registry, registrar, updater, clock = make_registrar()
    registry.record_scan([Sighting(30001, "/home/alice/alpha", "1.0", "alice")])
    updater.answers = ["YXDOMAIN"]
    updater.holders["alpha-alice"] = (8080, {"10.9.9.9"})
    registrar.startService()
    assert registrar.names() == set() and len(updater.sent) == 1
    updater.answers = ["YXDOMAIN"]
    updater.holders["alpha-alice"] = (8080, {"10.0.0.1"})  # left by a crash of this router
    clock.advance(30)
    assert registrar.names() == {"alpha-alice"} and len(updater.sent) == 3
    registrar.stopService()


def test_a_refused_update_is_retried_on_the_next_interval():
    registry, registrar, updater, clock = make_registrar()
    registry.record_scan([Sighting(30001, "/home/alice/alpha", "1.0", "alice")])
    updater.answers = ["REFUSED"]
    registrar.startService()
    assert registrar.names() == set()
    clock.advance(30)
    assert registrar.names() == {"alpha-alice"}
    registrar.stopService()


def test_the_wide_area_directory_replaces_its_entries_each_browse_and_keeps_them_when_a_browse_fails():
    clock = ThreadlessClock()
    view = LanView(clock)
    found = [Announcement("dnssd", "_opencode._tcp.example.org.", "beta-bob._opencode._tcp.example.org.",
                          "beta-bob.example.org.", 8080, ("10.0.0.2",), ((b"project", b"beta"),
                                                                          (b"path_prefix", b"/beta/")), 75.0)]
    answers: list[Any] = [found, RuntimeError("timed out"), []]

    def browse(_: DnsSdSettings) -> list[Announcement]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    directory = WideAreaDirectory(view, clock, settings(), browse_fn=browse)
    directory.startService()
    assert [e.url for e in view.entries()] == ["http://10.0.0.2:8080/beta/"]
    assert view.feeds == {"dnssd": "example.org"}
    clock.advance(30)
    assert len(view) == 1  # the failed browse keeps what was listed
    clock.advance(30)
    assert len(view) == 0  # gone from the zone
    directory.stopService()
