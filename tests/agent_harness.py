"""An agent watcher over fake OpenCode servers, all in memory: a Clock, a Registry, one fake per port."""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IRequest, IResponse
from twisted.web.resource import Resource
from zope.interface import implementer

from opencoderouter.agents import AgentWatcher
from opencoderouter.forwarding import BackendCredentials
from opencoderouter.registry import Registry, Sighting
from opencoderouter.testing import FakeOpenCode


class _ByPort(Resource):
    """Hands each request to the fake on the port of its Host header."""

    isLeaf = True

    def __init__(self, fakes: dict[int, FakeOpenCode]) -> None:
        super().__init__()
        self.fakes = fakes

    def render(self, request: IRequest) -> Any:
        port = int((request.getHeader(b"host") or b":0").rsplit(b":", 1)[1])
        return self.fakes[port].render(request)


@implementer(IAgent)
class FakeLoopback:
    """The loopback: ports with a fake answer in memory, every other port refuses the connection."""

    def __init__(self) -> None:
        self.fakes: dict[int, FakeOpenCode] = {}
        self.traversal = RequestTraversalAgent(_ByPort(self.fakes))
        self.requests: list[tuple[bytes, bytes, Headers]] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        self.requests.append((method, uri, headers or Headers()))
        if URI.fromBytes(uri).port not in self.fakes:
            return defer.fail(ConnectionRefusedError())
        return self.traversal.request(method, uri, headers, bodyProducer)


class Harness:
    """The watcher, its registry and clock, and the fakes it follows."""

    def __init__(self, credentials: BackendCredentials | None = None, **watcher_options: Any) -> None:
        self.clock = Clock()
        self.loopback = FakeLoopback()
        self.registry = Registry(self.clock, stale_after=30)
        self.changes: list[list[str]] = []
        self.watcher = AgentWatcher(self.registry, self.clock, HTTPClient(self.loopback),
                                    credentials or BackendCredentials(), on_change=self.changes.append,
                                    **watcher_options)
        self.watcher.startService()

    def serve(self, name: str, port: int = 30000, sighting: dict[str, Any] | None = None,
              fake: FakeOpenCode | None = None, **fake_options: Any) -> FakeOpenCode:
        """A fake OpenCode for ``/home/alice/{name}`` on ``port``, sighted by the registry."""
        directory = f"/home/alice/{name}"
        if fake is None:
            fake = FakeOpenCode(directory, clock=self.clock, **fake_options)
        self.loopback.fakes[port] = fake
        self.registry.record(Sighting(port, directory, "1.18.33", **(sighting or {})))
        self.pump()
        return fake

    def session(self, fake: FakeOpenCode, title: str = "Fix the tests", session_id: str = "ses_a") -> str:
        """A session on ``fake`` as the real server lists it."""
        now = int(self.clock.seconds() * 1000) + 1
        fake.sessions[session_id] = {"id": session_id, "directory": fake.directory, "title": title,
                                     "time": {"created": now, "updated": now}}
        return session_id

    def stop_serving(self, port: int) -> None:
        """The server on ``port`` is gone: its streams end, new connections are refused."""
        fake = self.loopback.fakes.pop(port)
        fake.close_streams()
        self.pump()

    def pump(self, rounds: int = 20) -> None:
        """Move bytes between the watcher and the fakes until nothing is left to move."""
        for _ in range(rounds):
            self.loopback.traversal.flush()
            self.clock.advance(0)

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Let ``seconds`` pass, moving bytes along the way."""
        target = self.clock.seconds() + seconds
        while self.clock.seconds() < target - 1e-9:
            self.clock.advance(min(step, target - self.clock.seconds()))
            self.pump(3)

    def state(self, slug: str) -> Any:
        state = self.watcher.state_of(slug)
        assert state is not None, f"{slug} is not followed"
        return state

    def requested(self, port: int) -> list[str]:
        """The paths (with query) the watcher asked the backend on ``port`` for."""
        return [URI.fromBytes(uri).originForm.decode() for _, uri, _ in self.loopback.requests
                if URI.fromBytes(uri).port == port]

    def stop(self) -> Deferred[Any]:
        stopped = self.watcher.stopService()
        self.pump()
        return stopped
