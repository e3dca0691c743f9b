"""The router's JSON API, a Klein app mounted at ``/api``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from . import __version__
from .agents import AgentWatcher, agents_entry, summary_json
from .config import ProjectDirectoryError, project_directory
from .guard import may_change_instances
from .launcher import Instance, Launcher, LauncherError, LauncherState
from .registry import Backend, Registry
from .responses import error_body, json_response, rfc3339

_HOST_HEADER = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$")


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


def backend_json(backend: Backend, authority: str, mdns: bool = False) -> dict[str, Any]:
    """The spec's backend object, plus ``owner``; with mDNS on, ``mdns_name`` (advertised name or null)."""
    body = {
        "slug": backend.slug,
        "project_name": backend.project_name,
        "project_path": backend.project_path,
        "port": backend.port,
        "version": backend.version,
        "domain": backend.domain,
        "path_prefix": f"/{backend.slug}/",
        "url": f"http://{authority}/{backend.slug}/",
        "last_seen": rfc3339(backend.last_seen),
        "owner": backend.owner_name if backend.owner is None else backend.owner,
        "locked": backend.locked,
    }
    if mdns:
        body["mdns_name"] = backend.mdns_name
    return body


class RouterAPI:
    """``/api/health``, ``/api/backends`` and ``/api/resolve``."""

    app = Klein()

    def __init__(
        self,
        registry: Registry,
        extra_health: Callable[[], dict[str, Any]] | None = None,
        launcher: Launcher | None = None,
        mdns: bool = False,
        events: Any = None,
        agents: AgentWatcher | None = None,
    ) -> None:
        self.registry = registry
        self._extra_health = extra_health or dict
        self.launcher = launcher
        #: With mDNS on, every backend object carries ``mdns_name``.
        self.mdns = mdns
        #: The ``/api/events`` SSE resource (``opencoderouter.events.EventStream``), if any.
        self._events = events
        #: The agent watcher: with it, backend objects carry their ``agents`` summary.
        self.agents = agents

    def resource(self) -> Any:
        """The twisted.web resource serving this app."""
        return self.app.resource()

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        """Router health and backend count."""
        body = {
            "healthy": True,
            "username": self.registry.naming.username,
            "backends": len(self.registry),
            "version": __version__,
        }
        body.update(self._extra_health())
        return json_response(request, body)

    @app.route("/backends", methods=["GET"])
    def backends(self, request: IRequest) -> bytes:
        """Every backend, sorted by slug."""
        authority = request_authority(request)
        return json_response(request, [self._backend_json(b, authority) for b in self.registry.backends()])

    def _backend_json(self, backend: Backend, authority: str) -> dict[str, Any]:
        body = backend_json(backend, authority, self.mdns)
        if self.agents is not None:
            body["agents"] = summary_json(self.agents.state_of(backend.slug))
        return body

    @app.route("/agents", methods=["GET"])
    def agents_list(self, request: IRequest) -> bytes:
        """Every backend with its agent summary and sessions (most urgent first)."""
        authority = request_authority(request)
        return json_response(request, [self._agents_json(b, authority) for b in self.registry.backends()])

    @app.route("/agents/<string:slug>", methods=["GET"])
    def agents_of(self, request: IRequest, slug: str) -> bytes:
        """One backend's agent summary and sessions."""
        backend = self.registry.by_slug(slug)
        if backend is None:
            known = [b.slug for b in self.registry.backends()]
            return json_response(request, error_body("not_found", slug=slug, known=known), 404)
        return json_response(request, self._agents_json(backend, request_authority(request)))

    def _agents_json(self, backend: Backend, authority: str) -> dict[str, Any]:
        if self.agents is None:
            body = agents_entry(backend, None, authority)
            body["agents"]["reason"] = "the router does not follow agents (it was started with --agents=false)"
            return body
        return agents_entry(backend, self.agents.state_of(backend.slug), authority)

    @app.route("/events", methods=["GET"])
    def events(self, request: IRequest) -> Any:
        """The registry's changes as Server-Sent Events (the dashboard's live feed)."""
        if self._events is None:
            return json_response(request, {"error": "not_found", "path": "/api/events"}, 404)
        return self._events

    @app.route("/resolve", methods=["GET"])
    def resolve(self, request: IRequest) -> bytes:
        """One backend by project path (``?path=``) or folder name (``?name=``)."""
        args = request.args
        paths, names = args.get(b"path", []), args.get(b"name", [])
        if len(paths) + len(names) != 1:
            return json_response(
                request,
                {"error": "bad_request", "message": "give exactly one of ?path= or ?name="},
                400,
            )
        raw = (paths or names)[0]
        try:
            query = raw.decode("utf-8")
        except UnicodeDecodeError:
            return json_response(request, {"error": "bad_request", "message": "the query is not UTF-8"}, 400)
        if "\x00" in query or len(query) > 4096:
            return json_response(request, error_body("bad_request", "the query is not a usable path or name"), 400)
        backend = self.registry.resolve_path(query) if paths else self.registry.resolve_name(query)
        if backend is None:
            return json_response(request, {"error": "not_found", "query": query}, 404)
        return json_response(request, self._backend_json(backend, request_authority(request)))

    # -- managed instances (the launcher) ----------------------------------
    def _instance_json(self, instance: Instance) -> dict[str, Any]:
        body = instance.describe()
        if body["started_at"] is not None:
            body["started_at"] = rfc3339(body["started_at"])
        return body

    @app.route("/instances", methods=["GET"])
    def instances(self, request: IRequest) -> bytes:
        """The instances the launcher manages or adopted."""
        listed = self.launcher.instances() if self.launcher is not None else []
        return json_response(request, [self._instance_json(i) for i in listed])

    @app.route("/instances", methods=["POST"])
    def start_instance(self, request: IRequest) -> bytes | Deferred[bytes]:
        """Start ``opencode serve`` for ``{"directory": ...}`` (loopback clients only)."""
        refused = self._refuse_write(request)
        if refused is not None or self.launcher is None:
            return refused or b""
        launcher = self.launcher
        try:
            body = json.loads(request.content.read(65536) or b"null")
        except ValueError:
            body = None
        directory = body.get("directory") if isinstance(body, dict) else None
        if not isinstance(directory, str) or not directory:
            return json_response(request, {"error": "bad_request",
                                   "message": 'send a JSON object {"directory": "/path/to/project"}'}, 400)
        try:
            known = launcher.by_directory(project_directory(directory))
        except ProjectDirectoryError as error:
            return json_response(request, {"error": "bad_request", "message": str(error)}, 400)
        was_running = known is not None and known.state not in (LauncherState.STOPPED, LauncherState.FAILED)

        def started(instance: Instance) -> bytes:
            return json_response(request, self._instance_json(instance), 200 if was_running else 201)

        def refused_add(failure: Failure) -> bytes:
            failure.trap(LauncherError)
            return json_response(request, {"error": "bad_request", "message": str(failure.value)}, 400)

        return launcher.add(directory).addCallbacks(started, refused_add)

    @app.route("/instances/<string:slug>", methods=["DELETE"])
    def stop_instance(self, request: IRequest, slug: str) -> bytes | Deferred[bytes]:
        """Stop one managed instance; answers once its processes have exited (loopback clients only)."""
        refused = self._refuse_write(request)
        if refused is not None or self.launcher is None:
            return refused or b""
        launcher = self.launcher
        instance = launcher.find(slug)
        if instance is None:
            return json_response(request, {"error": "not_found", "slug": slug,
                                   "message": f"no instance {slug} is managed by this router"}, 404)
        return launcher.stop_instance(instance.slug).addCallback(
            lambda stopped: json_response(request, self._instance_json(stopped)))

    def _refuse_write(self, request: IRequest) -> bytes | None:
        """Why a write request is refused, as a JSON answer, or None when it may go ahead."""
        if self.launcher is None:
            return json_response(request, {"error": "not_available", "message": "this router has no launcher"}, 503)
        if not may_change_instances(request):
            return json_response(request, {"error": "forbidden",
                                   "message": "starting and stopping instances needs the loopback or the router's "
                                              "credentials"}, 403)
        if request.method == b"POST":
            content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
            # Demanding JSON forces a CORS preflight, so a web page cannot make a browser post here.
            if content_type != b"application/json":
                return json_response(request, {"error": "unsupported_media_type",
                                       "message": "send the body as Content-Type: application/json"}, 415)
        return None

    @app.handle_errors(HTTPException)
    def http_error(self, request: IRequest, failure: Failure) -> bytes:
        """Werkzeug's routing errors (404, 405) as JSON, not HTML."""
        error = failure.value
        assert isinstance(error, HTTPException)
        if error.code == 405:
            allowed = sorted(getattr(error, "valid_methods", None) or [])
            if allowed:
                request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
            return json_response(request, {"error": "method_not_allowed", "allowed": allowed}, 405)
        name = "not_found" if error.code == 404 else "bad_request"
        return json_response(request, {"error": name, "path": request.path.decode("latin-1")}, error.code or 400)
