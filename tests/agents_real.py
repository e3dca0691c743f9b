"""The agent-awareness scene on the real ``opencode serve`` 1.18.33: a router following two real servers.

Shared by tests/test_agents_real_opencode.py (which state the router shows) and bench/agents_latency.py
(how soon it shows it)::

    scene = Agents(base)                                   # the fake model, servers alpha and beta, a router
    tap = EventTap(scene.servers["alpha"].port)            # alpha's own /global/event, not through the router
    session_id = scene.prompt("alpha", f"{MODE_BASH} go", "a title")
    asked_at, frame = tap.wait("permission.asked", lambda p: p.get("sessionID") == session_id)
    shown_at, session = scene.until("alpha", session_id, lambda entry, s: bool(s["permissions"]))
    tap.close(); scene.close()

The model is :class:`tests.real_opencode.FakeModelServer` (bash and question tool calls, a 400, slow
streams); each server has its own HOME and project folder. Everything talks to 127.0.0.1 only, and
``close()`` stops every child the scene started.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from .real_opencode import MODE_BASH, MODE_ERROR, FakeModelServer, OpenCodeInstance
from .support import RouterProcess, free_port_block, http_get, wait_for

#: How long any wait of the scene may take before it counts as hung (a guard, not a figure).
HANG_GUARD = 30.0

Check = Callable[[dict[str, Any], dict[str, Any]], bool]


class EventTap:
    """Reads one backend's ``/global/event`` directly (not through the router), keeping every frame with its time."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.connection.request("GET", "/global/event")
        self.response = self.connection.getresponse()
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fp = self.response.fp  # held here: close() sets the response's fp to None while this thread reads
        if fp is None:
            return
        try:
            while True:
                line = fp.readline()
                if not line:
                    return
                if line.startswith(b"data: "):
                    self.frames.append((time.monotonic(), json.loads(line[6:])))
        except (OSError, ValueError):
            return

    def wait(self, kind: str, match: Callable[[dict[str, Any]], bool] = lambda p: True,
             timeout: float = HANG_GUARD) -> tuple[float, dict[str, Any]]:
        """The first frame of payload type ``kind`` whose properties ``match``: (when it was read, the frame)."""
        def found() -> tuple[float, dict[str, Any]] | None:
            for at, frame in list(self.frames):
                payload = frame.get("payload", {})
                if payload.get("type") == kind and match(payload.get("properties", {})):
                    return at, frame
            return None
        return wait_for(found, timeout=timeout, interval=0.01, what=f"{kind} on the backend's stream")

    def close(self) -> None:
        """Cut the stream and end the reading thread."""
        try:
            self.connection.sock.shutdown(2)
        except (OSError, AttributeError):
            pass
        self._thread.join(5)  # the read ends at the shutdown; then the file can be closed under no reader
        self.connection.close()


class MidTurn(NamedTuple):
    """Three sessions caught mid-turn: what a restart must not lose or invent."""

    #: On alpha: a turn waiting for a person to allow ``bash``.
    waiting: str
    #: On beta: a turn streaming slowly.
    busy: str
    #: On beta: a turn whose model failed (HTTP 400).
    failed: str


class Agents:
    """The scene: the fake model, two real servers (``alpha``, ``beta``) and a router following both.

    ``router_env``: extra environment for the router (the benchmark's ``--code`` points PYTHONPATH elsewhere).
    """

    def __init__(self, base: Path, router_env: dict[str, str] | None = None) -> None:
        self.base = base
        self.router_env = router_env
        self.model = FakeModelServer(slow_duration=30.0, slow_interval=0.25).start()
        self.router: RouterProcess | None = None
        self.servers: dict[str, OpenCodeInstance] = {}
        try:
            self.first = free_port_block(4)
            self.dirs = {"alpha": base / "alpha", "beta": base / "beta"}
            for directory in self.dirs.values():
                directory.mkdir(parents=True)
            for name in self.dirs:
                self.servers[name] = self.start_server(name)
            self.start_router()
        except BaseException:
            self.close()
            raise

    def start_server(self, name: str) -> OpenCodeInstance:
        """Start the real server ``name`` on its port of the block (it listens when this returns)."""
        port = self.first + list(self.dirs).index(name)
        return OpenCodeInstance(self.dirs[name], self.base / f"home-{name}", self.model.url, port=port)

    def _router_args(self) -> tuple[str, ...]:
        return ("--scan-start", str(self.first), "--scan-end", str(self.first + 3),
                "--scan-interval", "1s", "--probe-timeout", "3s", "--stale-after", "60s")

    def start_router(self, port: int | None = None) -> None:
        """Start the router and wait until it follows both servers."""
        self.router = RouterProcess(*self._router_args(), port=port, env=self.router_env)
        wait_for(lambda: {a["slug"] for a in self.agents()} >= set(self.dirs)
                 and all(a["agents"]["state"] != "unknown" for a in self.agents()),
                 timeout=HANG_GUARD, interval=0.1, what="both backends followed")

    def restart_router(self) -> float:
        """Stop the router, start a new one on the same port; when its first ``/api/health`` answered (monotonic)."""
        assert self.router is not None
        port = self.router.port
        self.router.stop()
        self.router = router = RouterProcess(*self._router_args(), port=port, env=self.router_env, wait=False)

        def healthy() -> float | None:
            if router.process.poll() is not None:
                raise RuntimeError(f"router exited with {router.process.returncode}:\n{router.log()}")
            return time.monotonic() if http_get(router.url + "/api/health", timeout=1)[0] == 200 else None

        return wait_for(healthy, timeout=HANG_GUARD, interval=0.01, what="the new router's health")

    # -- talking to the router -------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                timeout: float = 15) -> tuple[int, Any]:
        """One request to the router: (status, decoded JSON body or None)."""
        assert self.router is not None
        connection = http.client.HTTPConnection("127.0.0.1", self.router.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            connection.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                                  **(headers or {})})
            response = connection.getresponse()
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
        finally:
            connection.close()

    def agents(self) -> list[dict[str, Any]]:
        """``GET /api/agents``."""
        return self.request("GET", "/api/agents")[1]

    def agent(self, slug: str) -> dict[str, Any]:
        """``GET /api/agents/{slug}``."""
        return self.request("GET", f"/api/agents/{slug}")[1]

    def session_of(self, slug: str, session_id: str) -> dict[str, Any] | None:
        """The router's entry for one session, or None."""
        return next((s for s in self.agent(slug)["sessions"] if s["id"] == session_id), None)

    def until(self, slug: str, session_id: str, wanted: Check, timeout: float = HANG_GUARD,
              what: str = "the session's state", interval: float = 0.02) -> tuple[float, dict[str, Any]]:
        """Poll /api/agents/{slug} until ``wanted(backend entry, session)``: (when the answer was read, session)."""
        def check() -> tuple[float, dict[str, Any]] | None:
            entry = self.agent(slug)
            session = next((s for s in entry["sessions"] if s["id"] == session_id), None)
            return (time.monotonic(), session) if session is not None and wanted(entry, session) else None
        return wait_for(check, timeout=timeout, interval=interval, what=what)

    def prompt(self, slug: str, text: str, title: str) -> str:
        """Create a session through the router and start a turn in it; the session's id."""
        code, session = self.request("POST", f"/{slug}/session", {"title": title})
        assert code == 200, session
        code, answer = self.request("POST", f"/{slug}/session/{session['id']}/prompt_async",
                                    {"parts": [{"type": "text", "text": text}]})
        assert code in (200, 204), answer
        return session["id"]

    def browser_origin(self) -> dict[str, str]:
        """What a browser on the dashboard sends with a state-changing fetch."""
        assert self.router is not None
        return {"Origin": self.router.url, "Host": f"127.0.0.1:{self.router.port}"}

    def reject(self, slug: str, permission_id: str) -> None:
        """Reject a pending permission through the router, as the dashboard's button does."""
        code, body = self.request("POST", f"/{slug}/permission/{permission_id}/reply", {"reply": "reject"},
                                  headers=self.browser_origin())
        assert (code, body) == (200, True), (code, body)

    def abort(self, slug: str, session_id: str) -> None:
        """Abort a session's turn through the router."""
        code, body = self.request("POST", f"/{slug}/session/{session_id}/abort", headers=self.browser_origin())
        assert code == 200, (code, body)

    # -- restarts mid-turn -------------------------------------------------------------------------
    def start_mid_turn(self, slow: float = 12) -> MidTurn:
        """Alpha waiting for a permission, beta streaming for ``slow`` seconds and beta failed, as the router shows."""
        waiting = self.prompt("alpha", f"{MODE_BASH} wait for me", "waits across a restart")
        self.until("alpha", waiting, lambda e, s: bool(s["permissions"]), what="the permission before the restart")
        busy = self.prompt("beta", f"[fake-model:slow={slow:g}] keep going", "runs across a restart")
        self.until("beta", busy, lambda e, s: s["status"] == "working", what="working before the restart")
        failed = self.prompt("beta", f"{MODE_ERROR} fail before the restart", "fails before a restart")
        self.until("beta", failed, lambda e, s: s["status"] == "error", what="error before the restart")
        return MidTurn(waiting, busy, failed)

    def shows_mid_turn(self, turn: MidTurn) -> bool:
        """True when /api/agents shows ``turn`` as it is: alpha needs you (the permission), busy working, failed error."""
        alpha, beta = self.agent("alpha"), self.agent("beta")
        by_id = {s["id"]: s for s in alpha["sessions"] + beta["sessions"]}
        return (alpha["agents"]["state"] == "needs_you" and bool(by_id.get(turn.waiting, {}).get("permissions"))
                and by_id.get(turn.busy, {}).get("status") == "working"
                and by_id.get(turn.failed, {}).get("status") == "error")

    def shows_lost_turn(self, slug: str, session_id: str, seen: list[Any] | None = None) -> bool:
        """True when a restarted server's lost turn shows right: the backend known, nothing working, the session idle.

        ``seen`` gets the last backend entry read (for the message when it never comes right).
        """
        entry = self.agent(slug)
        if seen is not None:
            seen[:] = [entry]
        session = next((s for s in entry["sessions"] if s["id"] == session_id), None)
        return entry["agents"]["state"] != "unknown" and entry["agents"]["working"] == 0 \
            and session is not None and session["status"] == "idle"

    def close(self) -> None:
        """Stop the router, the servers and the model."""
        if self.router is not None:
            self.router.stop()
        for server in self.servers.values():
            server.stop()
        self.model.stop()

