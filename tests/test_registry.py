"""Registry: slugs, collisions, reserved names, pruning, port reuse, resolve, observers."""

from __future__ import annotations

import dataclasses
import os

import pytest
from twisted.internet.task import Clock

from opencoderouter.registry import Naming, Registry, Sighting, slugify


def make_registry(stale_after: float = 30.0) -> tuple[Registry, Clock]:
    clock = Clock()
    clock.advance(1_700_000_000)
    return Registry(clock, stale_after=stale_after), clock


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, bool]] = []

    def added(self, backend):
        self.events.append(("added", backend.slug, backend.port, backend.up))

    def updated(self, backend):
        self.events.append(("updated", backend.slug, backend.port, backend.up))

    def removed(self, backend):
        self.events.append(("removed", backend.slug, backend.port, backend.up))


@pytest.mark.parametrize(
    "name, slug",
    [("myproject", "myproject"), ("My Project", "my-project"), ("Archer", "archer"), ("a__b..c", "a-b-c"),
     ("--x--", "x"), ("!!!", "default"), ("", "default"), ("été", "t"), ("proj_v2.1", "proj-v2-1")],
)
def test_slugify(name, slug):
    assert slugify(name) == slug


def test_same_named_projects_get_distinct_slugs_stable_across_rescans():
    registry, clock = make_registry()
    sightings = [Sighting(30001, "/home/a/work/api2", "1"), Sighting(30002, "/home/a/play/api2", "1")]
    seen = []
    for _ in range(10):
        registry.record_scan(list(reversed(sightings)) if len(seen) % 2 else sightings)
        seen.append({b.project_path: b.slug for b in registry.backends()})
        clock.advance(5)
    assert seen[0] == {"/home/a/play/api2": "api2", "/home/a/work/api2": "api2-work"}
    assert all(snapshot == seen[0] for snapshot in seen)


def test_a_project_keeps_its_slug_when_its_port_changes():
    registry, clock = make_registry()
    registry.record_scan([Sighting(30001, "/w/api2", "1"), Sighting(30002, "/x/api2", "1")])
    before = {b.project_path: b.slug for b in registry.backends()}
    clock.advance(5)
    registry.record_scan([Sighting(30007, "/w/api2", "1"), Sighting(30002, "/x/api2", "1")])
    assert {b.project_path: b.slug for b in registry.backends()} == before
    assert registry.by_path("/w/api2").port == 30007


def test_names_of_the_routers_own_routes_are_disambiguated():
    registry, _ = make_registry()
    registry.record_scan([Sighting(30001, "/srv/api", "1"), Sighting(30002, "/srv/metrics", "1")])
    assert {b.slug for b in registry.backends()} == {"api-srv", "metrics-srv"}


def test_third_same_named_project_in_same_parent_name_falls_back_to_a_hash():
    registry, _ = make_registry()
    registry.record_scan(
        [Sighting(30001, "/a/x/p", "1"), Sighting(30002, "/b/x/p", "1"), Sighting(30003, "/c/y/p", "1")]
    )
    slugs = {b.project_path: b.slug for b in registry.backends()}
    assert slugs["/a/x/p"] == "p" and slugs["/b/x/p"] != slugs["/a/x/p"] and len(set(slugs.values())) == 3
    assert slugs["/c/y/p"] == "p-y"


def test_stale_backends_are_pruned_after_stale_after():
    registry, clock = make_registry(stale_after=30)
    recorder = Recorder()
    registry.subscribe(recorder)
    registry.record_scan([Sighting(30001, "/p/one", "1")])
    clock.advance(29)
    registry.record_scan([])
    assert registry.prune_stale() == [] and registry.by_slug("one").up is False
    clock.advance(2)
    assert [b.slug for b in registry.prune_stale()] == ["one"]
    assert registry.backends() == []
    assert recorder.events == [
        ("added", "one", 30001, True), ("updated", "one", 30001, False), ("removed", "one", 30001, False)
    ]


def test_a_backend_seen_again_comes_back_up():
    registry, clock = make_registry()
    registry.record_scan([Sighting(30001, "/p/one", "1")])
    registry.record_scan([])
    clock.advance(5)
    registry.record_scan([Sighting(30001, "/p/one", "2")])
    backend = registry.by_slug("one")
    assert backend.up and backend.version == "2" and backend.last_seen == clock.seconds()


def test_a_port_reused_by_another_project_replaces_the_old_entry():
    registry, _ = make_registry()
    recorder = Recorder()
    registry.subscribe(recorder)
    registry.record_scan([Sighting(30001, "/p/one", "1")])
    registry.record_scan([Sighting(30001, "/p/two", "1")])
    assert [b.slug for b in registry.backends()] == ["two"]
    assert ("removed", "one", 30001, True) in recorder.events


def test_two_ports_for_one_project_keep_the_first():
    registry, _ = make_registry()
    registry.record_scan([Sighting(30005, "/p/one", "1")])
    registry.record_scan([Sighting(30002, "/p/one", "1"), Sighting(30005, "/p/one", "1")])
    assert registry.by_slug("one").port == 30005


def test_partial_scans_do_not_mark_others_down():
    registry, _ = make_registry()
    registry.record_scan([Sighting(30001, "/p/one", "1")])
    registry.record_scan([Sighting(30002, "/p/two", "1")], complete=False)
    assert all(b.up for b in registry.backends())


def test_a_failing_observer_does_not_stop_the_others():
    registry, _ = make_registry()

    class Broken:
        def added(self, backend):
            raise RuntimeError("boom")

    recorder = Recorder()
    registry.subscribe(Broken())
    registry.subscribe(recorder)
    registry.record_scan([Sighting(30001, "/p/one", "1")])
    assert recorder.events == [("added", "one", 30001, True)]


def test_backends_handed_out_cannot_change_the_registry():
    registry, _ = make_registry()
    registry.record_scan([Sighting(30001, "/p/one", "1")])
    with pytest.raises(dataclasses.FrozenInstanceError):
        registry.by_slug("one").port = 1  # type: ignore[misc]
    assert registry.by_slug("one").port == 30001


@pytest.fixture
def resolving(tmp_path, monkeypatch):
    registry, _ = make_registry()
    real = tmp_path / "home" / "alice" / "Archer"
    real.mkdir(parents=True)
    other = tmp_path / "srv" / "work" / "api"
    other.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "alice"))
    registry.record_scan([Sighting(30001, str(real), "1"), Sighting(30002, str(other), "1")])
    return registry, tmp_path


def test_resolve_exact_path(resolving):
    registry, root = resolving
    assert registry.resolve_path(str(root / "home/alice/Archer")).slug == "archer"


def test_resolve_tilde_trailing_slash_and_dotdot(resolving):
    registry, root = resolving
    assert registry.resolve_path("~/Archer/").slug == "archer"
    assert registry.resolve_path(str(root / "srv/work/../work/api")).slug == "api-work"


def test_resolve_symlinked_path(resolving):
    registry, root = resolving
    assert registry.resolve_path(str(root / "link")).slug == "archer"


def test_resolve_partial_suffix(resolving):
    registry, _ = resolving
    assert registry.resolve_path("work/api").slug == "api-work"
    assert registry.resolve_path("alice/Archer").slug == "archer"


def test_resolve_falls_back_to_the_basename(resolving):
    registry, _ = resolving
    assert registry.resolve_path("/somewhere/else/Archer").slug == "archer"


def test_resolve_by_name_is_case_insensitive(resolving):
    registry, _ = resolving
    assert registry.resolve_name("ARCHER").slug == "archer"
    assert registry.resolve_name("api").slug == "api-work"


def test_resolve_unknown(resolving):
    registry, _ = resolving
    assert registry.resolve_path("/nope/nothing") is None
    assert registry.resolve_name("nothing") is None
    assert registry.resolve_name("") is None and registry.resolve_path("") is None


def test_domains_use_username_for_own_backends_and_the_owner_for_others():
    registry, _ = make_registry()
    me = os.environ.get("USER", "root")
    registry = Registry(Clock(), stale_after=30.0, naming=Naming(username="alice", os_user=me))
    registry.record_scan([Sighting(30001, "/p/one", "1", owner=me), Sighting(30002, "/p/two", "1", owner="bob"),
                          Sighting(30003, "/p/three", "1", owner=None)])
    domains = {b.slug: b.domain for b in registry.backends()}
    assert domains == {"one": "one-alice.local", "two": "two-bob.local", "three": "three-alice.local"}


def test_registry_names_backends_host_labels_and_advertised_names():
    registry = Registry(Clock(), stale_after=30.0, naming=Naming(username="alice", os_user="alice"))
    registry.record_scan([Sighting(30001, "/p/alpha", "1", owner="alice"), Sighting(30002, "/p/beta", "1", owner="bob")])
    alpha = registry.by_slug("alpha")
    assert (alpha.owner_name, alpha.host_label, alpha.domain, alpha.mdns_name) == (
        "alice", "alpha-alice", "alpha-alice.local", None)
    assert registry.by_host_label("beta-bob").slug == "beta"
    assert registry.by_host_label("alpha-alice-2") is None
    registry.set_mdns_name("alpha", "alpha-alice-2")
    assert registry.by_slug("alpha").mdns_name == "alpha-alice-2"
    assert registry.by_host_label("alpha-alice-2").slug == "alpha"
    assert registry.by_host_label("alpha-alice").slug == "alpha"


def test_mdns_candidates_skip_names_other_backends_use():
    registry = Registry(Clock(), stale_after=30.0, naming=Naming(username="alice", os_user="alice"))
    registry.record_scan([Sighting(30001, "/p/alpha", "1"), Sighting(30002, "/q/alpha", "1")])
    registry.set_mdns_name("alpha-q", "alpha-alice-2")
    assert registry.mdns_candidates("alpha", 4) == ["alpha-alice", "alpha-alice-3", "alpha-alice-4"]
    assert registry.mdns_candidates("nope", 4) == []


def test_setting_an_mdns_name_is_an_update_observers_see_once():
    registry, _ = make_registry()
    recorder = Recorder()
    registry.record_scan([Sighting(30001, "/p/one", "1")])
    registry.subscribe(recorder)
    registry.set_mdns_name("one", "one-x")
    registry.set_mdns_name("one", "one-x")
    registry.set_mdns_name("gone", "gone-x")
    assert recorder.events == [("updated", "one", 30001, True)]


def test_slug_for_path_is_the_registered_slug_or_the_one_it_would_get():
    registry, _ = make_registry()
    registry.record_scan([Sighting(30001, "/w/api2", "1")])
    assert registry.slug_for_path("/w/api2") == "api2"
    assert registry.slug_for_path("/x/api2") == "api2-x"
    assert registry.slug_for_path("/x/api") == "api-x"
