"""The registry of discovered backends: slugs, owners, liveness, pruning and lookups.

It knows nothing about HTTP, mDNS or processes; consumers subscribe to its changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Iterable, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

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


@dataclass
class Backend:
    """A discovered OpenCode server, as the router routes to it."""

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

    @property
    def project_name(self) -> str:
        """The project's folder name."""
        return posixpath.basename(self.project_path.rstrip("/")) or self.project_path

    def snapshot(self) -> "Backend":
        """An independent copy, safe to hand to observers."""
        return dataclasses.replace(self)


class RegistryObserver(Protocol):
    """Something that follows the registry's changes."""

    def added(self, backend: Backend) -> None:
        """A backend appeared."""

    def updated(self, backend: Backend) -> None:
        """A backend's port, version, owner or liveness changed."""

    def removed(self, backend: Backend) -> None:
        """A backend was pruned."""


class Registry:
    """Backends keyed by slug; one entry per project path; the single source of truth."""

    log = Logger()

    def __init__(self, clock: IReactorTime, stale_after: float, reserved: Iterable[str] = RESERVED_SLUGS) -> None:
        self._clock = clock
        self._stale_after = stale_after
        self._reserved = frozenset(reserved)
        self._by_slug: dict[str, Backend] = {}
        self._observers: list[RegistryObserver] = []

    # -- observers -------------------------------------------------------
    def subscribe(self, observer: RegistryObserver) -> None:
        """Tell ``observer`` about every later change."""
        self._observers.append(observer)

    def unsubscribe(self, observer: RegistryObserver) -> None:
        """Stop telling ``observer`` about changes."""
        if observer in self._observers:
            self._observers.remove(observer)

    def _notify(self, event: str, backend: Backend) -> None:
        for observer in list(self._observers):
            try:
                getattr(observer, event)(backend.snapshot())
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
                    backend.up = False
                    self.log.info(
                        "backend {slug} on port {port} stopped answering", slug=backend.slug, port=backend.port
                    )
                    self._notify("updated", backend)

    def record(self, sighting: Sighting) -> Backend:
        """Apply a single sighting (e.g. from a quick check between full scans)."""
        return self._record(sighting, self._clock.seconds()).snapshot()

    def _record(self, sighting: Sighting, now: float) -> Backend:
        # A port now serving a different project replaces the old entry.
        previous_on_port = self.by_port(sighting.port)
        if previous_on_port is not None and previous_on_port.project_path != sighting.project_path:
            self._remove(previous_on_port, "its port now serves another project")
        backend = self._by_path_entry(sighting.project_path)
        if backend is None:
            slug = self._free_slug(sighting.project_path)
            backend = Backend(
                slug=slug,
                project_path=sighting.project_path,
                port=sighting.port,
                version=sighting.version,
                owner=sighting.owner,
                first_seen=now,
                last_seen=now,
                locked=sighting.locked,
                router_credentials=sighting.router_credentials,
            )
            self._by_slug[slug] = backend
            self.log.info(
                "backend {slug} appeared on port {port} for {path}",
                slug=slug,
                port=backend.port,
                path=backend.project_path,
                event="backend_added",
            )
            self._notify("added", backend)
            return backend
        changed = (backend.port, backend.version, backend.owner, backend.up, backend.locked,
                   backend.router_credentials) != (
            sighting.port,
            sighting.version,
            sighting.owner,
            True,
            sighting.locked,
            sighting.router_credentials,
        )
        backend.port, backend.version, backend.owner = sighting.port, sighting.version, sighting.owner
        backend.locked, backend.router_credentials = sighting.locked, sighting.router_credentials
        backend.up = True
        backend.last_seen = now
        if changed:
            self._notify("updated", backend)
        return backend

    def prune_stale(self) -> list[Backend]:
        """Remove backends not seen for ``stale_after`` seconds; return what was removed."""
        deadline = self._clock.seconds() - self._stale_after
        stale = [b for b in self._by_slug.values() if b.last_seen < deadline]
        for backend in stale:
            self._remove(backend, f"not seen for {self._stale_after:g}s")
        return [b.snapshot() for b in stale]

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

    # -- lookups ---------------------------------------------------------
    def backends(self) -> list[Backend]:
        """Every backend, sorted by slug."""
        return [self._by_slug[slug].snapshot() for slug in sorted(self._by_slug)]

    def __len__(self) -> int:
        return len(self._by_slug)

    def by_slug(self, slug: str) -> Backend | None:
        """The backend with this slug."""
        backend = self._by_slug.get(slug)
        return backend.snapshot() if backend else None

    def by_port(self, port: int) -> Backend | None:
        """The backend listening on this port."""
        for backend in self._by_slug.values():
            if backend.port == port:
                return backend.snapshot()
        return None

    def _by_path_entry(self, project_path: str) -> Backend | None:
        for backend in self._by_slug.values():
            if backend.project_path == project_path:
                return backend
        return None

    def by_path(self, project_path: str) -> Backend | None:
        """The backend serving exactly this project path."""
        backend = self._by_path_entry(project_path)
        return backend.snapshot() if backend else None

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


class Naming:
    """Host names of backends: ``{slug}-{name}``, name being ``--username`` for the router's own user."""

    def __init__(self, username: str, os_user: str) -> None:
        self.username = username
        self.os_user = os_user

    def owner_name(self, backend: Backend) -> str:
        """The user name a backend's host name carries."""
        if backend.owner is None or backend.owner == self.os_user:
            return self.username
        return backend.owner

    def host_label(self, backend: Backend) -> str:
        """``{slug}-{name}``: the first label of the backend's host names."""
        return f"{backend.slug}-{slugify(self.owner_name(backend))}"

    def domain(self, backend: Backend) -> str:
        """The backend's mDNS host name, ``{slug}-{name}.local``."""
        return f"{self.host_label(backend)}.local"
