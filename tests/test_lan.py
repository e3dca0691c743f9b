"""The LAN directory in memory: entries from announcements, hostile data, caps, TTLs, the API, the stream."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from pytest_twisted import ensureDeferred
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource

from opencoderouter.api import RouterAPI
from opencoderouter.config import Options
from opencoderouter.events import EventStream
from opencoderouter.hosts import HostPolicy
from opencoderouter.interfaces import InterfaceAddress
from opencoderouter.lan import (
    MAX_PER_HOST,
    MAX_TEXT_BYTES,
    PLAIN_TYPE,
    PUBLISH_DELAY,
    Announcement,
    LanView,
    OwnIdentity,
    capped_txt,
    clean_text,
    entry_from,
)
from opencoderouter.lan_mdns import BrowseReport, LanBrowser, browse_interfaces
from opencoderouter.mdns import SERVICE_TYPE
from opencoderouter.registry import Naming, Registry, Sighting
from opencoderouter.routing import Router, RouterResource

from .test_dashboard_events import open_stream, parse_sse

OWN_ADDRESSES = {"127.0.0.1", "::1", "10.0.0.1"}


def router_txt(project: str = "beta", path: str = "/home/bob/beta", owner: str = "bob", version: str = "1.18.33",
               prefix: str | None = None) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"project", project.encode()), (b"path", path.encode()), (b"owner", owner.encode()),
            (b"version", version.encode()), (b"path_prefix", (prefix or f"/{project}/").encode()))


def announce(instance: str = "beta-bob", address: str = "10.0.0.2", port: int = 8080, ttl: float = 120.0,
             txt: Any = None, server: str | None = None, service_type: str = SERVICE_TYPE,
             source: str = "mdns") -> Announcement:
    return Announcement(source, service_type, f"{instance}.{service_type}", server or f"{instance}.local.", port,
                        (address,), router_txt() if txt is None else txt, ttl)


def make_view(clock: Clock, names: set[str] | None = None, port: int | None = 8080, **kwargs: Any) -> LanView:
    own = OwnIdentity(lambda: names or set(), lambda: port, lambda: OWN_ADDRESSES)
    return LanView(clock, own, **kwargs)


@pytest.fixture
def warnings() -> Any:
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") is not None and event["log_level"].name == "warn":
            from twisted.logger import formatEvent

            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


# -- entries ---------------------------------------------------------------------------------------------------


def test_a_routers_announcement_becomes_an_entry_with_its_urls():
    entry = entry_from(announce(), now=100.0)
    assert entry is not None
    body = entry.to_json()
    assert body["kind"] == "router" and body["behind_router"] is True
    assert (body["instance"], body["host"], body["addresses"], body["port"]) == ("beta-bob", "beta-bob.local",
                                                                                 ["10.0.0.2"], 8080)
    assert (body["project_name"], body["project_path"], body["owner"], body["version"], body["slug"]) == (
        "beta", "/home/bob/beta", "bob", "1.18.33", "beta")
    assert body["url"] == "http://10.0.0.2:8080/beta/"
    assert body["host_url"] == "http://beta-bob.local:8080/"
    assert body["expires_unix"] == 220.0


def test_a_plain_opencode_server_is_listed_as_not_behind_a_router():
    entry = entry_from(announce("opencode-14200", port=14200, txt=((b"path", b"/"),), server="opencode.local.",
                                service_type=PLAIN_TYPE), now=0.0)
    assert entry is not None
    body = entry.to_json()
    assert body["kind"] == "opencode" and body["behind_router"] is False
    assert body["url"] == "http://10.0.0.2:14200/"
    assert body["host_url"] is None and body["project_name"] is None and body["slug"] is None


def test_ipv6_addresses_are_bracketed_and_unusable_addresses_are_not_listed():
    v6 = announce(address="2001:db8::2")
    assert entry_from(v6, 0.0).url == "http://[2001:db8::2]:8080/beta/"
    for address in ("127.0.0.1", "::1", "0.0.0.0", "fe80::1", "224.0.0.251", "not-an-ip"):
        assert entry_from(announce(address=address), 0.0) is None, address
    assert entry_from(announce(port=0), 0.0) is None


def test_hostile_txt_values_are_capped_decoded_leniently_and_stripped_of_control_characters():
    huge = b"x" * 8192
    raw = {b"project": b"<script>alert(1)</script>", b"path": b"/home/\xff\xfe/bad\x00\x1b[31m\xe2\x80\xaeevil",
           b"owner": huge, b"version": b"1\n2", b"path_prefix": b"/../", b"other": huge}
    txt = capped_txt(raw, (b"project", b"path", b"owner", b"version", b"path_prefix"))
    assert b"other" not in dict(txt) and len(dict(txt)[b"owner"]) == MAX_TEXT_BYTES
    entry = entry_from(announce(txt=txt), 0.0)
    assert entry is not None
    assert entry.project_name == "<script>alert(1)</script>"  # kept as text; JSON and textContent escape it
    assert entry.project_path == "/home/\ufffd\ufffd/bad[31mevil"
    assert entry.owner == "x" * MAX_TEXT_BYTES
    assert entry.version == "12"
    assert entry.slug is None and entry.url == "http://10.0.0.2:8080/"
    assert clean_text("a\u202eb\x07c") == "abc"


def test_a_hostile_instance_and_host_name_are_text_and_get_no_host_link():
    entry = entry_from(announce(instance="<img src=x onerror=alert(1)>", server="<b>.local."), 0.0)
    assert entry is not None
    assert entry.instance == "<img src=x onerror=alert(1)>"
    assert entry.host is None and entry.host_url is None
    assert "<img" in json.dumps(entry.to_json())  # data, not markup: the page sets it with textContent


# -- the view ----------------------------------------------------------------------------------------------------


def test_our_own_advertisements_and_claims_to_be_us_are_not_listed(warnings):
    clock = Clock()
    view = make_view(clock, names={"alpha-alice"})
    assert view.saw(announce("alpha-alice", address="10.0.0.1")) is None  # our own echo
    assert view.saw(announce("other-alice", address="10.0.0.1")) is None  # ours, not yet named
    assert view.saw(announce("alpha-alice", address="10.0.0.66")) is None  # another machine claiming our name
    assert view.saw(announce("alpha-alice", address="10.0.0.66")) is None
    assert len(view) == 0
    assert [w for w in warnings if "alpha-alice" in w] == [
        "LAN: 10.0.0.66 announces alpha-alice, a name this router advertises; not listed"]
    # A second router on this machine (another port) is listed.
    assert view.saw(announce("gamma-alice", address="10.0.0.1", port=9090)) is not None


def test_one_host_announcing_a_thousand_services_gets_the_per_host_cap(warnings):
    clock = Clock()
    view = make_view(clock)
    for n in range(1000):
        view.saw(announce(f"flood-{n}", address="10.0.0.9", txt=router_txt(project=f"p{n}")))
    assert len(view) == MAX_PER_HOST
    assert view.saw(announce("beta-bob", address="10.0.0.2")) is not None  # other hosts still get in
    assert sum("more than 64 services" in w for w in warnings) == 1
    # An entry already listed is still renewed and updated.
    assert view.saw(announce("flood-0", address="10.0.0.9", txt=router_txt(version="2"))).version == "2"


def test_the_view_holds_at_most_max_entries(warnings):
    clock = Clock()
    view = make_view(clock, max_entries=10, max_per_host=5)
    for host in range(5):
        for n in range(5):
            view.saw(announce(f"s{host}-{n}", address=f"10.0.1.{host + 1}"))
    assert len(view) == 10
    assert sum("10 entries listed already" in w for w in warnings) == 1


def test_entries_expire_with_their_records_ttl_and_are_renewed_at_80_and_90_percent():
    clock = Clock()
    view = make_view(clock)
    view.saw(announce(ttl=10))
    clock.advance(7.9)
    assert view.due_for_renewal() == []
    clock.advance(0.1)
    assert [e.instance for e in view.due_for_renewal()] == ["beta-bob"]
    assert view.due_for_renewal() == []  # asked once per renewal point
    clock.advance(1.0)
    assert [e.instance for e in view.due_for_renewal()] == ["beta-bob"]  # 90 %
    assert view.expire() == []
    clock.advance(1.0)
    assert [e.instance for e in view.expire()] == ["beta-bob"]
    assert len(view) == 0


def test_a_renewal_answer_extends_the_entry():
    clock = Clock()
    view = make_view(clock)
    view.saw(announce(ttl=10))
    clock.advance(8)
    view.saw(announce(ttl=10))
    clock.advance(5)
    assert view.expire() == [] and len(view) == 1


def test_changes_are_published_in_batches():
    clock = Clock()
    view = make_view(clock)
    published: list[dict[str, Any]] = []
    view.subscribe(published.append)
    for n in range(20):
        view.saw(announce(f"s{n}", address="10.0.0.3"))
    view.remove("mdns:s0._opencode._tcp.local.")
    assert published == []
    clock.advance(PUBLISH_DELAY)
    [batch] = published
    assert len(batch["upsert"]) == 19 and batch["remove"] == ["mdns:s0._opencode._tcp.local."] and batch["count"] == 19
    view.saw(announce("s1", address="10.0.0.3"))  # the same records again: no change to publish
    clock.advance(PUBLISH_DELAY)
    assert len(published) == 1


def test_a_fresh_wide_area_listing_replaces_that_source_only():
    clock = Clock()
    view = make_view(clock)
    view.saw(announce("mdns-one"))
    view.replace_source("dnssd", [announce("a", source="dnssd", service_type="_opencode._tcp.example.org."),
                                  announce("b", source="dnssd", service_type="_opencode._tcp.example.org.")])
    view.replace_source("dnssd", [announce("b", source="dnssd", service_type="_opencode._tcp.example.org.")])
    assert sorted(e.instance for e in view.entries()) == ["b", "mdns-one"]


def test_resolving_on_the_lan_matches_names_slugs_and_paths():
    clock = Clock()
    view = make_view(clock)
    view.saw(announce("beta-bob", address="10.0.0.2"))
    view.saw(announce("beta-carol", address="10.0.0.3", txt=router_txt(owner="carol", path="/home/carol/beta")))
    view.saw(announce("My-Tool-bob", address="10.0.0.2", txt=router_txt(project="My Tool", prefix="/my-tool/",
                                                                         path="/home/bob/My Tool")))
    assert len(view.matches(name="BETA")) == 2
    assert [e.owner for e in view.matches(path="/home/carol/beta")] == ["carol"]
    assert [e.instance for e in view.matches(name="my tool")] == ["My-Tool-bob"]
    assert [e.instance for e in view.matches(name="my-tool")] == ["My-Tool-bob"]  # by slug
    assert view.matches(name="nothing") == [] and view.matches(name=" ") == []


def test_the_json_view_groups_entries_by_host():
    clock = Clock()
    view = make_view(clock)
    view.saw(announce("beta-bob", address="10.0.0.2"))
    view.saw(announce("gamma-bob", address="10.0.0.2", txt=router_txt(project="gamma")))
    view.saw(announce("opencode-4096", address="10.0.0.3", port=4096, txt=((b"path", b"/"),),
                      server="opencode.local.", service_type=PLAIN_TYPE))
    body = view.to_json()
    assert body["count"] == 3 and body["max_entries"] == 256 and body["max_per_host"] == MAX_PER_HOST
    assert [(h["address"], h["names"], [e["instance"] for e in h["entries"]]) for h in body["hosts"]] == [
        ("10.0.0.2", ["beta-bob.local", "gamma-bob.local"], ["beta-bob", "gamma-bob"]),
        ("10.0.0.3", ["opencode.local"], ["opencode-4096"]),
    ]


# -- the API -------------------------------------------------------------------------------------------------------


@pytest.fixture
def api_client(tmp_path):
    clock = Clock()
    registry = Registry(clock, stale_after=30, naming=Naming(username="alice", os_user="alice"))
    registry.record_scan([Sighting(30000, "/home/alice/alpha", "1.18.33", owner="alice")])
    view = make_view(clock)
    view.saw(announce("alpha-bob", address="10.0.0.2", txt=router_txt(project="alpha", path="/home/bob/alpha")))
    view.saw(announce("beta-bob", address="10.0.0.2"))
    view.saw(announce("beta-carol", address="10.0.0.3", txt=router_txt(owner="carol", path="/home/carol/beta")))
    view.saw(announce("gamma-bob", address="10.0.0.2", txt=router_txt(project="gamma", path="/home/bob/gamma")))
    api = RouterAPI(registry, lan=view)
    hosts = HostPolicy(registry.by_host_label, own_label_suffix="-alice")
    root = RouterResource(Router(registry, hosts), lambda route: Resource(), own_routes={b"api": api.resource()},
                          dashboard=Resource())
    return StubTreq(root)


async def get(client: StubTreq, path: str) -> tuple[int, Any]:
    response = await client.get("http://localhost:8080" + path)
    return response.code, json.loads(await response.content())


@ensureDeferred
async def test_api_lan_lists_every_remote_entry_grouped_by_host(api_client):
    code, body = await get(api_client, "/api/lan")
    assert code == 200 and body["count"] == 4
    assert [h["address"] for h in body["hosts"]] == ["10.0.0.2", "10.0.0.3"]


@ensureDeferred
async def test_resolve_on_the_lan_a_local_match_wins_one_remote_answers_several_are_a_conflict(api_client):
    code, local = await get(api_client, "/api/resolve?name=alpha&scope=lan")
    assert code == 200 and local["url"] == "http://localhost:8080/alpha/" and "scope" not in local
    code, remote = await get(api_client, "/api/resolve?name=gamma&scope=lan")
    assert code == 200 and remote["scope"] == "lan" and remote["url"] == "http://10.0.0.2:8080/gamma/"
    assert remote["project_path"] == "/home/bob/gamma"
    code, remote = await get(api_client, "/api/resolve?path=/home/carol/beta&scope=lan")
    assert code == 200 and remote["owner"] == "carol"
    code, conflict = await get(api_client, "/api/resolve?name=beta&scope=lan")
    assert code == 409 and conflict["error"] == "ambiguous"
    assert sorted(m["owner"] for m in conflict["matches"]) == ["bob", "carol"]
    assert "2 projects on the network match 'beta'" in conflict["message"]
    assert (await get(api_client, "/api/resolve?name=gamma"))[0] == 404  # scope=local by default
    assert (await get(api_client, "/api/resolve?name=nothing&scope=lan"))[0] == 404


@ensureDeferred
async def test_resolve_with_an_unknown_scope_is_a_400_naming_it(api_client):
    code, body = await get(api_client, "/api/resolve?name=alpha&scope=world")
    assert code == 400 and body["message"] == "scope 'world' is not local or lan"


# -- the event stream ----------------------------------------------------------------------------------------------


def test_the_stream_snapshot_carries_the_lan_view_and_lan_events_follow():
    clock = Clock()
    registry = Registry(clock, stale_after=30, naming=Naming(username="alice", os_user="alice"))
    view = make_view(clock)
    view.saw(announce("beta-bob"))
    clock.advance(1)
    stream = EventStream(registry, clock, snapshot_extras=lambda: {"lan": view.to_json()})
    view.subscribe(lambda change: stream.publish("lan", change))
    request = open_stream(stream)
    view.saw(announce("gamma-bob", txt=router_txt(project="gamma")))
    view.remove("mdns:beta-bob._opencode._tcp.local.")
    clock.advance(PUBLISH_DELAY)
    events = parse_sse(request.written)
    assert events[1][0] == "snapshot"
    assert [e["instance"] for h in events[1][1]["lan"]["hosts"] for e in h["entries"]] == ["beta-bob"]
    name, change = events[2]
    assert name == "lan" and [e["instance"] for e in change["upsert"]] == ["gamma-bob"]
    assert change["remove"] == ["mdns:beta-bob._opencode._tcp.local."]


# -- the mDNS service (a fake browser) -------------------------------------------------------------------------------


class FakeBrowsing:
    def __init__(self, interfaces: Sequence[str | int], report: BrowseReport) -> None:
        self.interfaces = list(interfaces)
        self.report = report
        self.renewed: list[str] = []
        self.closed = False

    def renew(self, service_type: str, name: str) -> Deferred[None]:
        self.renewed.append(name)
        return defer.succeed(None)

    def update_interfaces(self, interfaces: Sequence[str | int]) -> Deferred[None]:
        self.interfaces = list(interfaces)
        return defer.succeed(None)

    def close(self) -> Deferred[None]:
        self.closed = True
        return defer.succeed(None)


def make_browser(clock: Clock, addresses: list[InterfaceAddress], selectors: Sequence[str] = ()
                 ) -> tuple[LanBrowser, list[FakeBrowsing]]:
    made: list[FakeBrowsing] = []

    def factory(reactor: Any, interfaces: Sequence[str | int], report: BrowseReport) -> Deferred[FakeBrowsing]:
        made.append(FakeBrowsing(interfaces, report))
        return defer.succeed(made[-1])

    browser = LanBrowser(make_view(clock), clock, interfaces=selectors, refresh_interval=5,
                         addresses=lambda: addresses, browsing_factory=factory)
    return browser, made


ETH = [InterfaceAddress("lo", 1, "127.0.0.1"), InterfaceAddress("eth0", 2, "10.0.0.1"),
       InterfaceAddress("eth0", 2, "fe80::1"), InterfaceAddress("docker0", 3, "172.17.0.1")]


def test_browsing_uses_the_ipv4_interfaces_mdns_interface_selects():
    assert browse_interfaces(ETH) == ("10.0.0.1", "172.17.0.1")
    assert browse_interfaces(ETH, ["eth0"]) == ("10.0.0.1",)
    assert browse_interfaces(ETH, ["wlan9"]) == ()


def test_the_browser_feeds_the_view_renews_before_expiry_and_drops_goodbyes():
    clock = Clock()
    browser, made = make_browser(clock, ETH, ["eth0"])
    browser.startService()
    [browsing] = made
    assert browsing.interfaces == ["10.0.0.1"]
    browsing.report.seen(announce("beta-bob", ttl=10))
    browsing.report.seen(announce("gamma-bob", ttl=100, txt=router_txt(project="gamma")))
    assert len(browser.view) == 2
    clock.advance(8)
    assert browsing.renewed == ["beta-bob._opencode._tcp.local."]
    browsing.report.gone("gamma-bob._opencode._tcp.local.")
    assert [e.instance for e in browser.view.entries()] == ["beta-bob"]
    clock.advance(3)  # not renewed: its records expired
    assert len(browser.view) == 0
    stopped = browser.stopService()
    assert stopped.called and browsing.closed


def test_without_a_usable_interface_nothing_is_opened_until_one_comes_up(warnings):
    clock = Clock()
    addresses = [InterfaceAddress("lo", 1, "127.0.0.1")]
    browser, made = make_browser(clock, addresses)
    browser.startService()
    clock.advance(5)
    assert made == [] and sum("no IPv4 interface is up; not browsing" in w for w in warnings) == 1
    addresses.append(InterfaceAddress("eth0", 2, "10.0.0.1"))
    clock.advance(5)
    assert [m.interfaces for m in made] == [["10.0.0.1"]]
    addresses.append(InterfaceAddress("eth1", 3, "10.9.0.1"))
    clock.advance(5)
    assert made[0].interfaces == ["10.0.0.1", "10.9.0.1"]
    browser.stopService()


# -- flags -------------------------------------------------------------------------------------------------------------


def options(*argv: str) -> Options:
    parsed = Options()
    parsed.parseOptions(list(argv))
    return parsed


def test_lan_browse_follows_mdns_unless_given():
    assert options()["lan-browse"] is True
    assert options("--mdns=false")["lan-browse"] is False
    assert options("--mdns=false", "--lan-browse=true")["lan-browse"] is True
    assert options("--lan-browse", "false")["lan-browse"] is False


def test_dnssd_flags_are_checked_with_sentences(tmp_path):
    parsed = options("--dnssd-domain", "Example.ORG.", "--dnssd-server", "10.0.0.53:5353", "--dnssd-interval", "1m")
    assert (parsed["dnssd-domain"], parsed["dnssd-server"], parsed["dnssd-interval"]) == (
        "example.org", ("10.0.0.53", 5353), 60.0)
    with pytest.raises(SystemExit, match="--dnssd-server needs --dnssd-domain"):
        options("--dnssd-server", "10.0.0.53")
    with pytest.raises(SystemExit, match="--dnssd-domain: 'not a domain' is not a DNS domain"):
        options("--dnssd-domain", "not a domain")
    with pytest.raises(SystemExit, match="--dnssd-server: 'ns1.example.org' is not an IP address"):
        options("--dnssd-domain", "example.org", "--dnssd-server", "ns1.example.org")
    key = tmp_path / "bad.key"
    key.write_text("nothing here\n")
    key.chmod(0o600)
    with pytest.raises(SystemExit, match="holds no key statement"):
        options("--dnssd-domain", "example.org", "--dnssd-update-key", str(key))
