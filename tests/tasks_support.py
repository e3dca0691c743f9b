"""Helpers for the task service's tests: scripted OpenCode backends in a registry, a service over a journal."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, maybeDeferred

from opencoderouter.forwarding import BackendCredentials
from opencoderouter.loopback_http import loopback_agent
from opencoderouter.registry import Naming, Registry, Sighting
from opencoderouter.tasks.journal import Journal
from opencoderouter.tasks.service import TaskService, TaskSettings, TaskSource

from .dispatch_fakes import ScriptedOpenCode


def later(seconds: float = 0.02) -> Deferred[None]:
    """Let the reactor run for ``seconds``."""
    return task.deferLater(reactor, seconds, lambda: None)


async def until(predicate: Any, timeout: float = 10.0, what: str = "the condition") -> Any:
    """Wait (on the reactor) until ``predicate()`` is truthy."""
    waited = 0.0
    while waited < timeout:
        value = predicate()
        if value:
            return value
        await later(0.02)
        waited += 0.02
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Backends:
    """ScriptedOpenCode servers on loopback ports, known to a Registry as running projects."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.registry = Registry(reactor, stale_after=1e9, naming=Naming(username="alice", os_user="alice"))
        self.servers: dict[str, ScriptedOpenCode] = {}
        self._ports: dict[str, Any] = {}

    def start(self, name: str, behaviour: str = "reply", address: str = "127.0.0.1",
              password: str | None = None, opened: bool = True) -> ScriptedOpenCode:
        """A project folder ``root/name`` with a server on ``address`` that answers with ``behaviour``, in the registry.

        With ``password`` it is locked, and ``opened`` says whether the router's password opened it.
        """
        directory = str(self.root / name)
        os.makedirs(directory, exist_ok=True)
        server = ScriptedOpenCode(directory, behaviour=behaviour, heartbeat=0.2, password=password)
        port = server.listen(reactor, 0, interface=address)
        self.servers[name], self._ports[name] = server, port
        self.registry.record(Sighting(port=port.getHost().port, project_path=directory, version="fake",
                                      address=address, locked=password is not None,
                                      router_credentials=password is not None and opened))
        return server

    async def close(self) -> None:
        for name, server in self.servers.items():
            server.close_streams()
            await maybeDeferred(self._ports[name].stopListening)


class Harness:
    """A TaskService over a journal in ``state``, its backends, and the events it published."""

    def __init__(self, tmp_path: Path, backends: Backends) -> None:
        self.tmp_path = tmp_path
        self.backends = backends
        self.state_dir = str(tmp_path / "state")
        self.events: list[dict[str, Any]] = []
        self.service: TaskService | None = None

    def start(self, sources: list[TaskSource], credentials: BackendCredentials | None = None,
              **settings: Any) -> TaskService:
        """Start a service (a fresh one each time: a restart)."""
        values: dict[str, Any] = {"tick": 0.05, "reconnect_timeout": 2.0, "timeout": 30.0}
        values.update(settings)
        self.service = TaskService(Journal(self.state_dir), self.backends.registry, reactor,
                                   HTTPClient(loopback_agent(reactor, 5.0)), sources, TaskSettings(**values),
                                   credentials=credentials,
                                   publish=lambda event, data: self.events.append({"event": event, **data}),
                                   session_link=lambda backend, sid: f"http://{backend.host_label}.localhost:1/x/session/{sid}")
        self.service.startService()
        return self.service

    async def stop(self) -> None:
        if self.service is not None and self.service.running:
            await self.service.stopService()
        self.service = None

    def tasks(self) -> list[dict[str, Any]]:
        assert self.service is not None
        return self.service.tasks_json()

    def states(self) -> list[str]:
        return [t["state"] for t in self.tasks()]
