"""The router's JSON API, a Klein app mounted at ``/api``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from . import __version__
from .agent_state import AgentState
from .agents import AgentWatcher, summary_json
from .child import Instance, LauncherError, LauncherState
from .config import ProjectDirectoryError, project_directory
from .guard import may_change_instances
from .hosts import authority, is_authority
from .launcher import Launcher
from .links import offered_url
from .registry import Backend, Registry
from .responses import error_body, json_response, rfc3339

if TYPE_CHECKING:
    from .tasks.service import TaskService

_TASKS_OFF = "autodispatch is off: start the router with --tasks-dir DIR or --ticktick-token-file FILE"


def request_authority(request: IRequest) -> str:
    """``host:port`` as the client reached the router (its Host header if sane, else the socket)."""
    header = request.getHeader(b"host")
    if header:
        text = header.decode("latin-1").strip()
        if is_authority(text) and not text.endswith("."):
            return text
    address = request.getHost()
    host = getattr(address, "host", "localhost")
    port = getattr(address, "port", None)
    if port:
        return authority(host, port)
    return f"[{host}]" if ":" in host else host


def backend_json(backend: Backend, authority: str, mdns: bool = False) -> dict[str, Any]:
    """The spec's backend object, plus ``owner`` and ``locked``; with mDNS on, ``mdns_name``.

    A locked server the router cannot open has ``project_name`` and ``project_path`` null: its
    project is unknown (clients must not take a made-up string for a path).
    """
    known = backend.path_known
    body = {
        "slug": backend.slug,
        "project_name": backend.project_name if known else None,
        "project_path": backend.project_path if known else None,
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


def agents_entry(backend: Backend, state: AgentState | None, authority: str, mdns: bool = False) -> dict[str, Any]:
    """One backend in ``/api/agents``: who it is (as :func:`backend_json` says), its summary, its sessions.

    Sessions come most urgent first; a session's ``web_url`` is its web UI page under the host-mode
    name :func:`~.links.offered_url` gives.
    """
    known = backend_json(backend, authority, mdns)
    sessions = []
    for session in state.ordered() if state is not None else []:
        body = session.to_json()
        body["web_url"] = offered_url(backend, authority, mdns, body["web_path"]) if body["web_path"] else None
        sessions.append(body)
    return {
        "slug": known["slug"],
        "project_name": known["project_name"],
        "project_path": known["project_path"],
        "up": backend.up,
        "url": known["url"],
        "agents": summary_json(state),
        "sessions": sessions,
    }


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
        lan: Any = None,
        tasks: TaskService | None = None,
        agents: AgentWatcher | None = None,
    ) -> None:
        self.registry = registry
        self._extra_health = extra_health or dict
        self.launcher = launcher
        #: With mDNS on, every backend object carries ``mdns_name``.
        self.mdns = mdns
        #: The ``/api/events`` SSE resource (``opencoderouter.events.EventStream``), if any.
        self._events = events
        #: The LAN directory (``opencoderouter.lan.LanView``), for ``/api/lan`` and ``?scope=lan``.
        self.lan = lan
        #: The autodispatch service (``/api/tasks``), when a task source is configured.
        self.tasks = tasks
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
            body = agents_entry(backend, None, authority, self.mdns)
            body["agents"]["reason"] = "the router does not follow agents (it was started with --agents=false)"
            return body
        return agents_entry(backend, self.agents.state_of(backend.slug), authority, self.mdns)

    @app.route("/events", methods=["GET"])
    def events(self, request: IRequest) -> Any:
        """The registry's changes as Server-Sent Events (the dashboard's live feed)."""
        if self._events is None:
            return json_response(request, {"error": "not_found", "path": "/api/events"}, 404)
        return self._events

    @app.route("/lan", methods=["GET"])
    def lan_directory(self, request: IRequest) -> bytes:
        """Every project other routers (and plain opencode --mdns servers) announce, grouped by host."""
        if self.lan is None:
            return json_response(request, {"feeds": {}, "count": 0, "hosts": []})
        return json_response(request, self.lan.to_json())

    @app.route("/resolve", methods=["GET"])
    def resolve(self, request: IRequest) -> bytes:
        """One backend by project path (``?path=``) or folder name (``?name=``); ``&scope=lan``: or on the LAN."""
        args = request.args
        paths, names = args.get(b"path", []), args.get(b"name", [])
        scopes = args.get(b"scope", [b"local"])
        if len(scopes) != 1 or scopes[0] not in (b"local", b"lan"):
            shown = b",".join(scopes).decode("utf-8", "replace")[:40]
            return json_response(request, error_body("bad_request", f"scope {shown!r} is not local or lan"), 400)
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
        if backend is None and scopes[0] == b"lan" and self.lan is not None:
            # A local match always wins; on the LAN, only one match is an answer.
            remote = self.lan.matches(path=query) if paths else self.lan.matches(name=query)
            if len(remote) == 1:
                return json_response(request, {**remote[0].to_json(), "scope": "lan"})
            if remote:
                where = ", ".join(f"{e.project_name or e.instance} at {e.url}" for e in remote[:10])
                return json_response(request, error_body(
                    "ambiguous", f"{len(remote)} projects on the network match {query!r}: {where}; "
                    "ask by ?path= or ask their router", query=query, matches=[e.to_json() for e in remote]), 409)
        if backend is None:
            return json_response(request, {"error": "not_found", "query": query}, 404)
        authority = request_authority(request)
        body = self._backend_json(backend, authority)
        # ``url`` stays path mode (automation); a person opens the host-mode name (the web UI needs it).
        body["web_url"] = offered_url(backend, authority, self.mdns)
        return json_response(request, body)

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

    # -- autodispatch (opencoderouter.tasks) ----------------------------------
    @app.route("/tasks", methods=["GET"])
    def list_tasks(self, request: IRequest) -> bytes:
        """Queued, running and the last finished tasks, with their outcomes."""
        if self.tasks is None:
            return json_response(request, error_body("not_available", _TASKS_OFF), 503)
        return json_response(request, self.tasks.tasks_json())

    @app.route("/tasks/<string:task_id>", methods=["GET"])
    def one_task(self, request: IRequest, task_id: str) -> bytes:
        """One task with its whole answer."""
        if self.tasks is None:
            return json_response(request, error_body("not_available", _TASKS_OFF), 503)
        record = self.tasks.find(task_id)
        if record is None:
            return json_response(request, error_body("not_found", f"no task {task_id}", id=task_id), 404)
        return json_response(request, self.tasks.task_json(record, whole=True))

    @app.route("/tasks", methods=["POST"])
    def submit_task(self, request: IRequest) -> bytes:
        """Queue ``{"task": "---\\nproject: ...\\n---\\nprompt"}`` (loopback clients or the router's credentials)."""
        from .task_file import DispatchError

        if self.tasks is None:
            return json_response(request, error_body("not_available", _TASKS_OFF), 503)
        refused = self._refuse_unsafe_post(request, "submitting tasks")
        if refused is not None:
            return refused
        try:
            body = json.loads(request.content.read() or b"null")
        except ValueError:
            body = None
        text = body.get("task") if isinstance(body, dict) else None
        title = body.get("title") if isinstance(body, dict) else None
        if not isinstance(text, str) or (title is not None and not isinstance(title, str)):
            return json_response(request, error_body(
                "bad_request", 'send a JSON object {"task": "---\\nproject: NAME\\n---\\nthe prompt"} '
                               '(and optionally "title")'), 400)
        try:
            record = self.tasks.submit(text, title)
        except DispatchError as error:
            return json_response(request, error_body("bad_task", error.message), 400)
        return json_response(request, self.tasks.task_json(record), 201)

    def _refuse_unsafe_post(self, request: IRequest, what: str) -> bytes | None:
        """Why a state-changing POST is refused (not loopback nor authenticated; not JSON), or None."""
        if not may_change_instances(request):
            return json_response(request, error_body(
                "forbidden", f"{what} needs the loopback or the router's credentials"), 403)
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        # Demanding JSON forces a CORS preflight, so a web page cannot make a browser post here.
        if content_type != b"application/json":
            return json_response(request, error_body(
                "unsupported_media_type", "send the body as Content-Type: application/json"), 415)
        return None

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
