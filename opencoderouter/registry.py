"""The registry of discovered backends: slugs, owners, liveness, pruning and lookups.

It knows nothing about HTTP, mDNS or processes; consumers subscribe to its changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .hosts import authority

_NOT_SLUG = re.compile(r"[^a-z0-9-]+")

#: First path segments the router serves itself; a project may not take them as its slug.
RESERVED_SLUGS = frozenset({"api", "metrics"})


def slugify(name: str) -> str:
    """Lower-case, turn each run of characters outside ``[a-z0-9-]`` into ``-``, trim ``-``."""
    slug = _NOT_SLUG.sub("-", name.lower()).strip("-")
    return slug or "default"


@dataclass(frozen=True)
class Sighting:
    """One scan's evidence that an OpenCode server for a project listens on a port."""

    port: int
    project_path: str
    version: str
    owner: str | None = None
    #: The server asks for a password (401 + WWW-Authenticate: Basic).
    locked: bool = False
    #: The router's --opencode-password-file opens it (the scanner got in with it).
    router_credentials: bool = False
    #: The loopback address it listens on (``::1`` for a server on the IPv6 loopback only).
    address: str = "127.0.0.1"


@dataclass(frozen=True)
class Backend:
    """A discovered OpenCode server, as the router routes to it (immutable: the registry replaces it)."""

    slug: str
    project_path: str
    port: int
    version: str
    owner: str | None
    first_seen: float
    last_seen: float
    up: bool = True
    locked: bool = False
    router_credentials: bool = False
    #: The user name its host names carry (``--username`` for the router's own user).
    owner_name: str = ""
    #: ``{slug}-{owner_name}``: the first label of its host names.
    host_label: str = ""
    #: The name it is advertised under over mDNS (None when it is not advertised).
    mdns_name: str | None = None
    #: The loopback address it listens on (``::1`` for a server on the IPv6 loopback only).
    address: str = "127.0.0.1"

    @property
    def project_name(self) -> str:
        """The project's folder name."""
        return posixpath.basename(self.project_path.rstrip("/")) or self.project_path

    @property
    def path_known(self) -> bool:
        """False for a password-protected server the router cannot open: its project is unknown."""
        return not self.locked or self.router_credentials

    @property
    def endpoint(self) -> str:
        """``address:port`` as a URL authority (IPv6 in brackets)."""
        return authority(self.address, self.port)

    @property
    def domain(self) -> str:
        """Its mDNS host name, ``{slug}-{owner}.local``."""
        return f"{self.host_label}.local"


class Naming:
    """The rule for host names: ``{slug}-{name}``, name being ``--username`` for the router's own user."""

    def __init__(self, username: str, os_user: str) -> None:
        self.username = username
        self.os_user = os_user

    def owner_name(self, owner: str | None) -> str:
        """The user name a backend owned by ``owner`` carries in its host names."""
        if owner is None or owner == self.os_user:
            return self.username
        return owner

    def is_own(self, owner: str | None) -> bool:
        """True for the router's own user (an owner that could not be known counts as own)."""
        return owner is None or owner == self.os_user

    def host_label(self, slug: str, owner: str | None) -> str:
        """``{slug}-{name}``."""
        return f"{slug}-{slugify(self.owner_name(owner))}"


class RegistryObserver(Protocol):
    """Something that follows the registry's changes."""

    def added(self, backend: Backend) -> None:
        """A backend appeared."""

    def updated(self, backend: Backend) -> None:
        """A backend's port, version, owner or liveness changed."""

    def removed(self, backend: Backend) -> None:
        """A backend was pruned."""


class Registry:
    """Backends keyed by slug; one entry per project path; the single source of truth for names.

    It owns slugs, host labels and advertised mDNS names: the launcher asks it which slug a
    directory has, the mDNS advertiser asks it for names to try and records the one it got, and
    everyone else (routing, the guard, the API, the event stream) only reads ``Backend`` values.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        stale_after: float,
        reserved: Iterable[str] = RESERVED_SLUGS,
        naming: Naming | None = None,
    ) -> None:
        self._clock = clock
        self._stale_after = stale_after
        self._reserved = frozenset(reserved)
        if naming is None:
            from .config import default_username

            naming = Naming(username=default_username(), os_user=default_username())
        self.naming = naming
        self._by_slug: dict[str, Backend] = {}
        self._observers: list[RegistryObserver] = []
        #: host label or mDNS name → slug; rebuilt after a change, not per lookup.
        self._labels: dict[str, str] | None = None

    # -- observers -------------------------------------------------------
    def subscribe(self, observer: RegistryObserver) -> None:
        """Tell ``observer`` about every later change."""
        self._observers.append(observer)

    def unsubscribe(self, observer: RegistryObserver) -> None:
        """Stop telling ``observer`` about changes."""
        if observer in self._observers:
            self._observers.remove(observer)

    def _notify(self, event: str, backend: Backend) -> None:
        self._labels = None
        for observer in list(self._observers):
            try:
                getattr(observer, event)(backend)
            except Exception:
                self.log.failure("registry observer {observer!r} failed on {event}", observer=observer, event=event)

    # -- updates ---------------------------------------------------------
    def record_scan(self, sightings: Iterable[Sighting], complete: bool = True) -> None:
        """Apply one scan's sightings; with ``complete``, backends not sighted are marked down."""
        now = self._clock.seconds()
        by_path: dict[str, list[Sighting]] = {}
        for sighting in sightings:
            by_path.setdefault(sighting.project_path, []).append(sighting)
        seen_slugs: set[str] = set()
        # Sorted so that two same-named projects found in one scan always get the same slugs.
        for path in sorted(by_path):
            candidates = sorted(by_path[path], key=lambda s: s.port)
            existing = self.by_path(path)
            if existing is not None:
                chosen = next((s for s in candidates if s.port == existing.port), candidates[0])
            else:
                chosen = candidates[0]
            backend = self._record(chosen, now)
            seen_slugs.add(backend.slug)
        if complete:
            for backend in list(self._by_slug.values()):
                if backend.slug not in seen_slugs and backend.up:
                    down = self._by_slug[backend.slug] = dataclasses.replace(backend, up=False)
                    self.log.info(
                        "backend {slug} on port {port} stopped answering",
                        slug=down.slug,
                        port=down.port,
                        event="backend_down",
                    )
                    self._notify("updated", down)

    def record(self, sighting: Sighting) -> Backend:
        """Apply a single sighting (e.g. from a quick check between full scans)."""
        return self._record(sighting, self._clock.seconds())

    def _record(self, sighting: Sighting, now: float) -> Backend:
        # A port now serving a different project replaces the old entry.
        previous_on_port = self.by_port(sighting.port)
        if previous_on_port is not None and previous_on_port.project_path != sighting.project_path:
            self._remove(previous_on_port, "its port now serves another project")
        existing = self.by_path(sighting.project_path)
        slug = existing.slug if existing is not None else self._free_slug(sighting.project_path)
        backend = Backend(
            slug=slug,
            project_path=sighting.project_path,
            port=sighting.port,
            version=sighting.version,
            owner=sighting.owner,
            first_seen=existing.first_seen if existing is not None else now,
            last_seen=now,
            locked=sighting.locked,
            router_credentials=sighting.router_credentials,
            address=sighting.address,
            owner_name=self.naming.owner_name(sighting.owner),
            host_label=self.naming.host_label(slug, sighting.owner),
            # A new owner is a new host name: the advertiser asks for a name again.
            mdns_name=existing.mdns_name if existing is not None and existing.owner == sighting.owner else None,
        )
        self._by_slug[slug] = backend
        if existing is None:
            self.log.info(
                "backend {slug} appeared on port {port} for {path}",
                slug=slug,
                port=backend.port,
                path=backend.project_path,
                event="backend_added",
            )
            self._notify("added", backend)
        elif _routing_fields(existing) != _routing_fields(backend):
            self._notify("updated", backend)
        return backend

    def prune_stale(self) -> list[Backend]:
        """Remove backends not seen for ``stale_after`` seconds; return what was removed."""
        deadline = self._clock.seconds() - self._stale_after
        stale = [b for b in self._by_slug.values() if b.last_seen < deadline]
        for backend in stale:
            self._remove(backend, f"not seen for {self._stale_after:g}s")
        return stale

    def _remove(self, backend: Backend, reason: str) -> None:
        del self._by_slug[backend.slug]
        self.log.info(
            "backend {slug} on port {port} removed: {reason}",
            slug=backend.slug,
            port=backend.port,
            reason=reason,
            event="backend_removed",
        )
        self._notify("removed", backend)

    def _free_slug(self, project_path: str) -> str:
        """The plain slug if free, else slug-parent, else slug-<hash of the path>."""
        base = slugify(posixpath.basename(project_path.rstrip("/")) or "root")
        parent = posixpath.basename(posixpath.dirname(project_path.rstrip("/")))
        digest = hashlib.sha256(project_path.encode("utf-8", "surrogateescape")).hexdigest()[:6]
        candidates = [base, f"{base}-{slugify(parent)}" if parent else None, f"{base}-{digest}"]
        for candidate in candidates:
            if candidate and candidate not in self._reserved and candidate not in self._by_slug:
                return candidate
        counter = 2
        while f"{base}-{digest}-{counter}" in self._by_slug:
            counter += 1
        return f"{base}-{digest}-{counter}"

    # -- names -----------------------------------------------------------
    def slug_for_path(self, project_path: str) -> str:
        """The slug of the project at ``project_path``: its own when registered, else the one it would get now."""
        existing = self.by_path(project_path)
        return existing.slug if existing is not None else self._free_slug(project_path)

    def mdns_candidates(self, slug: str, attempts: int) -> list[str]:
        """Names to try, in order, for advertising ``slug``: its host label, then ``-2``, ``-3``, ...

        Names another backend uses (its host label or advertised name) are left out.
        """
        backend = self._by_slug.get(slug)
        if backend is None:
            return []
        taken = {b.host_label for b in self._by_slug.values() if b.slug != slug}
        taken |= {b.mdns_name for b in self._by_slug.values() if b.slug != slug and b.mdns_name}
        names = [backend.host_label] + [f"{backend.host_label}-{n}" for n in range(2, attempts + 1)]
        return [name for name in names if name not in taken]

    def set_mdns_name(self, slug: str, name: str | None) -> None:
        """Record the name ``slug`` is advertised under (None: withdrawn); observers see an update."""
        backend = self._by_slug.get(slug)
        if backend is None or backend.mdns_name == name:
            return
        changed = self._by_slug[slug] = dataclasses.replace(backend, mdns_name=name)
        self._notify("updated", changed)

    # -- lookups ---------------------------------------------------------
    def backends(self) -> list[Backend]:
        """Every backend, sorted by slug."""
        return [self._by_slug[slug] for slug in sorted(self._by_slug)]

    def __len__(self) -> int:
        return len(self._by_slug)

    def by_slug(self, slug: str) -> Backend | None:
        """The backend with this slug."""
        return self._by_slug.get(slug)

    def by_host_label(self, label: str) -> Backend | None:
        """The backend whose host label (``{slug}-{user}``) or advertised mDNS name is ``label``."""
        labels = self._labels
        if labels is None:
            labels = {}
            for backend in self._by_slug.values():
                if backend.mdns_name:
                    labels[backend.mdns_name] = backend.slug
            # Host labels win over a conflicting advertised name (they are what the API reports as domain).
            labels.update({backend.host_label: backend.slug for backend in self._by_slug.values()})
            self._labels = labels
        slug = labels.get(label)
        return self._by_slug.get(slug) if slug is not None else None

    def by_port(self, port: int) -> Backend | None:
        """The backend listening on this port."""
        for backend in self._by_slug.values():
            if backend.port == port:
                return backend
        return None

    def by_path(self, project_path: str) -> Backend | None:
        """The backend serving exactly this project path."""
        for backend in self._by_slug.values():
            if backend.project_path == project_path:
                return backend
        return None

    def resolve_path(self, query: str) -> Backend | None:
        """Exact normalised path, else a trailing-segments match, else the basename's slug."""
        cleaned = query.strip()
        if not cleaned:
            return None
        expanded = os.path.expanduser(cleaned)
        if expanded.startswith("/"):
            normal = posixpath.normpath(expanded)
            for candidate in (normal, os.path.realpath(normal)):
                exact = self.by_path(candidate)
                if exact is not None:
                    return exact
        segments = [s for s in posixpath.normpath(expanded).split("/") if s not in ("", ".")]
        if segments and ".." not in segments:
            suffix = "/" + "/".join(segments)
            matches = [b for b in self.backends() if b.project_path.rstrip("/").endswith(suffix)]
            if matches:
                return min(matches, key=lambda b: (len(b.project_path), b.slug))
        if segments:
            return self.resolve_name(segments[-1])
        return None

    def resolve_name(self, name: str) -> Backend | None:
        """A backend by folder basename, case-insensitively (``Archer`` finds ``archer``)."""
        wanted = name.strip()
        if not wanted:
            return None
        named = [b for b in self.backends() if b.project_name.lower() == wanted.lower()]
        if named:
            return min(named, key=lambda b: (b.first_seen, b.slug))
        return self.by_slug(slugify(wanted))


def _routing_fields(backend: Backend) -> tuple[object, ...]:
    """What observers hear about when it changes (``last_seen`` alone is not a change)."""
    return (backend.port, backend.version, backend.owner, backend.up, backend.locked, backend.router_credentials,
            backend.mdns_name, backend.address)

