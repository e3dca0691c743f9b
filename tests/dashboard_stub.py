"""A router stand-in for the dashboard's launcher, mDNS and agent views.

Serves the real page, assets and event stream over a real Registry, plus ``/api/instances`` in the
shape the launcher issue specifies and an ``mdns_name`` on each backend as the mDNS issue specifies:

    python -m tests.dashboard_stub PORT

With ``--agents N``: N backends with agent state instead (see :class:`AgentScenario`): one waits
for a permission (a hostile command), one for a question, one works, one failed, the rest are
idle. Answers the page sends (``POST /{slug}/permission/{id}/reply``, ``/question/{id}/...``) are
recorded (``GET /api/stub/calls``) and move that session on; ``POST /api/stub/ask?slug=S`` makes
S ask for a permission, ``POST /api/stub/finish?slug=S`` ends its sessions' turns. With ``--agents N
--lan`` too: as a router with mDNS on, listening beyond the loopback (each backend advertised).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import reactor
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site

from opencoderouter.agent_state import AgentState, Snapshot
from opencoderouter.dashboard import Dashboard, DashboardAssets, load_assets
from opencoderouter.events import EventStream
from opencoderouter.registry import Naming, Registry, Sighting

INSTANCES = [
    {
        "directory": "/home/alice/alpha", "slug": "alpha", "pid": 4242, "port": 30001, "state": "running",
        "restarts": 2, "started_at": "2026-11-25T12:00:00Z", "last_exit": None,
        "logs": ["opencode server listening on http://127.0.0.1:30001", "<b>not bold</b>"],
    },
    {
        "directory": "/home/alice/broken <i>x", "slug": "broken-i-x", "pid": None, "port": None,
        "state": "failed", "restarts": 5, "started_at": None, "last_exit": 1,
        "reason": "exited 5 times within 60 s", "logs": ["Error: <script>boom</script>"],
    },
]


class Instances(Resource):
    """``/api/instances``: the list; writes are refused (403), as for a request that may not use them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []
        self.polls = 0

    def render_GET(self, request: IRequest) -> bytes:
        if request.postpath == [b"calls"]:
            return json.dumps(self.calls).encode()
        request.setHeader(b"content-type", b"application/json")
        # The running instance keeps logging, so every poll changes the list (and re-renders rows).
        self.polls += 1
        INSTANCES[0]["logs"] = INSTANCES[0]["logs"][:2] + [f"poll {self.polls}"]
        return json.dumps(INSTANCES).encode()

    def _refuse(self, request: IRequest) -> bytes:
        self.calls.append([request.method.decode(), b"/".join(request.postpath).decode()])
        request.setResponseCode(403)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": "forbidden", "message": "Only loopback clients may manage instances."}).encode()

    render_DELETE = _refuse
    render_POST = _refuse


HOSTILE_COMMAND = 'rm -rf "<b>build</b>" && echo <img src=x onerror="window.__xss=3">'
HOSTILE_TITLE = "Deploy <script>window.__xss=4</script>"


class AgentScenario:
    """The agent states of ``count`` backends, and the answers the page sent."""

    def __init__(self, registry: Registry, count: int) -> None:
        self.registry = registry
        self.calls: list[dict[str, Any]] = []
        self.states: dict[str, AgentState] = {}
        self.stream: EventStream | None = None
        sightings = [Sighting(30100 + n, f"/home/alice/work/project-{n:02d}", "1.18.33", "alice") for n in range(count)]
        registry.record_scan(sightings)
        now = reactor.seconds()
        for n, backend in enumerate(registry.backends()):
            state = self.states[backend.slug] = AgentState(backend.project_path)
            sid = f"ses_{n:02d}"
            info = {"id": sid, "title": f"Task {n}", "directory": backend.project_path,
                    "time": {"created": (now - 600) * 1000, "updated": (now - 60) * 1000}}
            statuses: dict[str, Any] = {}
            permissions: list[dict[str, Any]] = []
            questions: list[dict[str, Any]] = []
            if n == 7:
                info["title"] = HOSTILE_TITLE
                statuses[sid] = {"type": "busy"}
                permissions.append({"id": "per_07", "sessionID": sid, "permission": "bash",
                                    "patterns": [HOSTILE_COMMAND], "metadata": {"command": HOSTILE_COMMAND}})
            elif n == 12:
                statuses[sid] = {"type": "busy"}
                questions.append({"id": "que_12", "sessionID": sid, "questions": [
                    {"question": "Which colour?", "header": "Colour", "options": [{"label": "Red"}, {"label": "Blue"}]}]})
            elif n in (3, 4):
                statuses[sid] = {"type": "busy"}
            state.load(Snapshot(statuses=statuses, permissions=permissions, questions=questions, sessions=[info]), now)
            if n == 3:
                state.enrich(Snapshot(todos={sid: [{"status": "completed"}, {"status": "in_progress"}]}))
            if n == 20:
                state.enrich(Snapshot(last_messages={sid: {"role": "assistant", "error": {
                    "name": "APIError", "data": {"message": "the model refused"}}}}))

    def feed(self, slugs: list[str] | None = None) -> dict[str, Any]:
        """The watcher's dashboard JSON for these slugs (all by default)."""
        chosen = list(self.states) if slugs is None else slugs
        return {"agents": [{"slug": slug, "agents": self.states[slug].summary().to_json(),
                            "sessions": [s.to_json() for s in self.states[slug].ordered()]} for slug in chosen],
                "server_time": reactor.seconds()}

    def apply(self, slug: str, kind: str, **properties: Any) -> None:
        """Apply one OpenCode event to ``slug`` and send the change, as the watcher does."""
        self.states[slug].apply({"type": kind, "properties": properties}, None, reactor.seconds())
        if self.stream is not None:
            self.stream.publish("agents", self.feed([slug]))


class BackendPaths(Resource):
    """``/{slug}/...`` as the proxy would forward it: the answers to permissions and questions."""

    def __init__(self, scenario: AgentScenario) -> None:
        super().__init__()
        self.scenario = scenario

    def getChild(self, name: bytes, request: IRequest) -> Resource:
        return _Answer(self.scenario, name.decode())


class _Answer(Resource):
    isLeaf = True

    def __init__(self, scenario: AgentScenario, slug: str) -> None:
        super().__init__()
        self.scenario = scenario
        self.slug = slug

    def render_POST(self, request: IRequest) -> bytes:
        body = json.loads(request.content.read() or b"null")
        path = [p.decode() for p in request.postpath]
        self.scenario.calls.append({"slug": self.slug, "path": "/" + "/".join(path),
                                    "query": {k.decode(): v[0].decode() for k, v in request.args.items()},
                                    "body": body, "origin": (request.getHeader(b"origin") or b"").decode(),
                                    "content_type": (request.getHeader(b"content-type") or b"").decode()})
        request.setHeader(b"content-type", b"application/json")
        state = self.scenario.states.get(self.slug)
        if state is None or len(path) != 3 or path[0] not in ("permission", "question"):
            request.setResponseCode(404)
            return b'{"name": "NotFoundError", "data": {"message": "no such request"}}'
        session = next((s for s in state.sessions.values() if path[1] in s.permissions or path[1] in s.questions), None)
        if session is None:
            request.setResponseCode(404)
            return b'{"name": "NotFoundError", "data": {"message": "no such request"}}'
        kind = "permission.replied" if path[0] == "permission" else "question.replied"
        # The server's events come after its answer, as with the real one.
        reactor.callLater(0.1, self.scenario.apply, self.slug, kind, sessionID=session.id, requestID=path[1])
        return b"true"


class StubControl(Resource):
    """``/api/stub/...``: what the test drives and reads."""

    isLeaf = True

    def __init__(self, scenario: AgentScenario) -> None:
        super().__init__()
        self.scenario = scenario

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.scenario.calls).encode()

    def render_POST(self, request: IRequest) -> bytes:
        slug = request.args[b"slug"][0].decode()
        sid = next(iter(self.scenario.states[slug].sessions))
        if request.postpath == [b"ask"]:
            self.scenario.apply(slug, "session.status", sessionID=sid, status={"type": "busy"})
            self.scenario.apply(slug, "permission.asked", id=f"per_{slug}", sessionID=sid, permission="edit",
                                patterns=["src/app.py"], metadata={})
        elif request.postpath == [b"finish"]:
            for session_id in list(self.scenario.states[slug].sessions):
                self.scenario.apply(slug, "session.idle", sessionID=session_id)
        return b"{}"


def main_agents(port: int, count: int, lan: bool = False) -> None:
    """Serve the agent scenario until killed; ``lan``: as a router advertising over mDNS and reachable from the LAN."""
    registry = Registry(reactor, stale_after=3600, naming=Naming(username="alice", os_user="alice"))
    scenario = AgentScenario(registry, count)
    if lan:
        for backend in registry.backends():
            registry.set_mdns_name(backend.slug, f"{backend.slug}-alice")
    info = {"version": "0.1.0", "username": "alice", "listen": f"{'0.0.0.0' if lan else '127.0.0.1'}:{port}", "listen_port": port,
            "scan_start": 30100, "scan_end": 30199, "scan_interval": 5.0, "stale_after": 30.0,
            "mdns": lan, "lan_links": lan, "launcher": False, "agents": True}
    assets = load_assets()
    root = BackendPaths(scenario)
    root.putChild(b"", Dashboard(assets))
    root.putChild(b"_router", DashboardAssets(assets))
    api = Resource()
    scenario.stream = EventStream(registry, reactor, router_info=lambda: info, snapshot_extras=scenario.feed, mdns=lan)
    api.putChild(b"events", scenario.stream)
    api.putChild(b"stub", StubControl(scenario))
    root.putChild(b"api", api)
    reactor.listenTCP(port, Site(root), interface="127.0.0.1")
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


def main(port: int) -> None:
    """Serve until killed."""
    registry = Registry(reactor, stale_after=3600, naming=Naming(username="alice", os_user="alice"))
    registry.record_scan([Sighting(30001, "/home/alice/alpha", "1.18.33", "alice")])
    # As the mDNS advertiser records it after a name conflict.
    registry.set_mdns_name("alpha", "alpha-alice-2")
    info = {"version": "0.1.0", "username": "alice", "listen": f"127.0.0.1:{port}", "listen_port": port,
            "scan_start": 30000, "scan_end": 30010, "scan_interval": 5.0, "stale_after": 30.0,
            "mdns": True, "lan_links": True, "launcher": True}
    assets = load_assets()
    root = Resource()
    root.putChild(b"", Dashboard(assets))
    root.putChild(b"_router", DashboardAssets(assets))
    api = Resource()
    api.putChild(b"events", EventStream(registry, reactor, router_info=lambda: info, mdns=True))
    api.putChild(b"instances", Instances())
    root.putChild(b"api", api)
    reactor.listenTCP(port, Site(root), interface="127.0.0.1")
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[2] == "--agents":
        main_agents(int(sys.argv[1]), int(sys.argv[3]), lan="--lan" in sys.argv[4:])
    else:
        main(int(sys.argv[1]))
