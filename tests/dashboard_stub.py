"""A router stand-in for the dashboard's launcher and mDNS views, until those branches are merged.

Serves the real page, assets and event stream over a real Registry, plus ``/api/instances`` in the
shape the launcher issue specifies and an ``mdns_name`` on each backend as the mDNS issue specifies:

    python -m tests.dashboard_stub PORT
"""

from __future__ import annotations

import json
import sys

from twisted.internet import reactor
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site

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
    main(int(sys.argv[1]))
