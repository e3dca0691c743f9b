"""The router's JSON API, a Klein app mounted at ``/api``."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any, Callable

from klein import Klein
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from . import __version__
from .registry import Backend, Naming, Registry

_HOST_HEADER = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$")


def rfc3339(timestamp: float) -> str:
    """A UTC timestamp such as ``2026-02-28T18:10:00Z``."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def request_authority(request: IRequest) -> str:
    """``host:port`` as the client reached the router (its Host header if sane, else the socket)."""
    header = request.getHeader(b"host")
    if header:
        text = header.decode("latin-1").strip()
        if _HOST_HEADER.match(text):
            return text
    address = request.getHost()
    host = getattr(address, "host", "localhost")
    port = getattr(address, "port", None)
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def backend_json(
    backend: Backend, naming: Naming, authority: str, mdns_names: dict[str, str] | None = None
) -> dict[str, Any]:
    """The spec's backend object, plus ``owner``; with mDNS on, ``mdns_name`` (advertised name or null)."""
    body = {
        "slug": backend.slug,
        "project_name": backend.project_name,
        "project_path": backend.project_path,
        "port": backend.port,
        "version": backend.version,
        "domain": naming.domain(backend),
        "path_prefix": f"/{backend.slug}/",
        "url": f"http://{authority}/{backend.slug}/",
        "last_seen": rfc3339(backend.last_seen),
        "owner": naming.owner_name(backend) if backend.owner is None else backend.owner,
    }
    if mdns_names is not None:
        body["mdns_name"] = mdns_names.get(backend.slug)
    return body


def _json(request: IRequest, body: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8") + b"\n"


class RouterAPI:
    """``/api/health``, ``/api/backends`` and ``/api/resolve``."""

    app = Klein()

    def __init__(
        self,
        registry: Registry,
        naming: Naming,
        extra_health: Callable[[], dict[str, Any]] | None = None,
        mdns_names: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self.registry = registry
        self.naming = naming
        self._extra_health = extra_health or dict
        #: ``{slug: advertised mDNS name}`` from the advertiser, when mDNS is on.
        self._mdns_names = mdns_names

    def resource(self) -> Any:
        """The twisted.web resource serving this app."""
        return self.app.resource()

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        """Router health and backend count."""
        body = {
            "healthy": True,
            "username": self.naming.username,
            "backends": len(self.registry),
            "version": __version__,
        }
        body.update(self._extra_health())
        return _json(request, body)

    @app.route("/backends", methods=["GET"])
    def backends(self, request: IRequest) -> bytes:
        """Every backend, sorted by slug."""
        authority = request_authority(request)
        names = self._mdns_names() if self._mdns_names else None
        return _json(request, [backend_json(b, self.naming, authority, names) for b in self.registry.backends()])

    @app.route("/resolve", methods=["GET"])
    def resolve(self, request: IRequest) -> bytes:
        """One backend by project path (``?path=``) or folder name (``?name=``)."""
        args = request.args
        paths, names = args.get(b"path", []), args.get(b"name", [])
        if len(paths) + len(names) != 1:
            return _json(
                request,
                {"error": "bad_request", "message": "give exactly one of ?path= or ?name="},
                400,
            )
        raw = (paths or names)[0]
        try:
            query = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _json(request, {"error": "bad_request", "message": "the query is not UTF-8"}, 400)
        if "\x00" in query or len(query) > 4096:
            return _json(request, {"error": "bad_request", "message": "the query is not a usable path or name"}, 400)
        backend = self.registry.resolve_path(query) if paths else self.registry.resolve_name(query)
        if backend is None:
            return _json(request, {"error": "not_found", "query": query}, 404)
        names = self._mdns_names() if self._mdns_names else None
        return _json(request, backend_json(backend, self.naming, request_authority(request), names))

    @app.handle_errors(HTTPException)
    def http_error(self, request: IRequest, failure: Any) -> bytes:
        """Werkzeug's routing errors (404, 405) as JSON, not HTML."""
        error = failure.value
        if error.code == 405:
            allowed = sorted(getattr(error, "valid_methods", None) or [])
            if allowed:
                request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
            return _json(request, {"error": "method_not_allowed", "allowed": allowed}, 405)
        name = "not_found" if error.code == 404 else "bad_request"
        return _json(request, {"error": name, "path": request.path.decode("latin-1")}, error.code or 400)
