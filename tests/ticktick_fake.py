"""A local imitation of the TickTick Open API (``/open/v1``) for tests, on 127.0.0.1.

It answers the documented calls the router uses (``GET /project``, ``GET /project/{id}/data``,
``GET /project/{pid}/task/{tid}``, ``POST /task/{tid}``, ``POST /project/{pid}/task/{tid}/complete``)
in the documented shapes, checks the bearer token on every request (401 otherwise), and imitates
what client code reports: the Inbox is not in ``GET /project`` but answers as project ``inbox``;
an update without ``title`` is acknowledged but not saved; an update with the wrong ``projectId``
gets an empty 200. Faults are scripted per request: ``429`` (with ``Retry-After``), ``500``,
``limit`` (500 with ``errorCode: exceed_query_limit``) and ``drop`` (the connection is cut).
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

PREFIX = "/open/v1"


class FakeTickTick(Resource):
    """The imitation: projects, tasks, the requests it saw (with times) and scripted faults."""

    isLeaf = True

    def __init__(self, token: str = "tt-secret-token-0123456789") -> None:
        super().__init__()
        self.token = token
        self.inbox_id = "inbox127524840"
        self.projects: list[dict[str, Any]] = [
            {"id": "6226ff9877acee87727f6bca", "name": "Work", "color": "#F18181", "closed": False,
             "groupId": None, "viewMode": "list", "permission": "write", "kind": "TASK"},
        ]
        self.tasks: dict[str, dict[str, Any]] = {}
        #: ``(reactor time, method, path)`` of every request.
        self.requests: list[tuple[float, str, str]] = []
        #: Faults for the next matching requests: ``(kind, method or None, path regex or None, value)``.
        self.faults: list[tuple[str, str | None, str | None, str | None]] = []
        #: While set, every request answers 503 (the API is down).
        self.down = False
        self.completed: list[str] = []
        self.updates: list[dict[str, Any]] = []
        self._port: IListeningPort | None = None

    # -- set-up ------------------------------------------------------------------------
    def add_task(self, task_id: str, project_id: str, content: str, tags: list[str] | None = None,
                 title: str = "A task", status: int = 0) -> dict[str, Any]:
        """A task as the API stores it."""
        task = {"id": task_id, "projectId": project_id, "title": title, "content": content, "desc": "",
                "isAllDay": False, "priority": 0, "status": status, "sortOrder": 1, "items": [],
                "tags": tags if tags is not None else ["autocode"], "etag": f"e{task_id}", "kind": "TEXT"}
        self.tasks[task_id] = task
        return task

    def fault(self, kind: str, method: str | None = None, path: str | None = None, value: str | None = None) -> None:
        """The next request matching ``method`` and ``path`` (a regex on the path after /open/v1) gets ``kind``."""
        self.faults.append((kind, method, path, value))

    def listen(self) -> str:
        """Listen on 127.0.0.1; returns the API base URL."""
        site = Site(self)
        site.noisy = False
        self._port = reactor.listenTCP(0, site, interface="127.0.0.1")
        address = self._port.getHost()
        assert isinstance(address, IPv4Address)
        return f"http://127.0.0.1:{address.port}{PREFIX}"

    def stop(self) -> Any:
        return self._port.stopListening() if self._port is not None else None

    # -- what the tests check ------------------------------------------------------------
    def most_in_any_window(self, window: float) -> int:
        """The most requests seen in any ``window`` seconds (a window starting at each request)."""
        times = sorted(t for t, _, _ in self.requests)
        return max((sum(1 for u in times if t <= u < t + window) for t in times), default=0)

    # -- answers ------------------------------------------------------------------------
    def render(self, request: IRequest) -> bytes | int:
        method = request.method.decode()
        path = request.path.decode()
        self.requests.append((reactor.seconds(), method, path))
        if request.getHeader(b"authorization") != f"Bearer {self.token}".encode():
            request.setResponseCode(401)
            return b""
        if self.down:
            request.setResponseCode(503)
            return b"<html>Service Unavailable</html>"
        if not path.startswith(PREFIX):
            request.setResponseCode(404)
            return b""
        path = path[len(PREFIX):]
        for index, (kind, fault_method, pattern, value) in enumerate(self.faults):
            if (fault_method is None or fault_method == method) and (pattern is None or re.search(pattern, path)):
                del self.faults[index]
                return self._fault(request, kind, value)
        body = json.loads(request.content.read() or b"null")
        return self._route(request, method, path, body)

    def _fault(self, request: IRequest, kind: str, value: str | None) -> bytes | int:
        if kind == "drop":
            request.channel.transport.abortConnection()
            return NOT_DONE_YET
        if kind == "429":
            request.setResponseCode(429)
            if value is not None:
                request.setHeader(b"retry-after", value.encode())
            return b""
        if kind == "limit":
            return self._json(request, {"errorId": "x", "errorCode": "exceed_query_limit",
                                        "errorMessage": "exceed query limit", "data": None}, 500)
        return self._json(request, {"errorId": "y", "errorCode": "internal", "errorMessage": "oops", "data": None}, 500)

    def _route(self, request: IRequest, method: str, path: str, body: Any) -> bytes:
        parts = [p for p in path.split("/") if p]
        if method == "GET" and parts == ["project"]:
            return self._json(request, self.projects)
        if method == "GET" and len(parts) == 3 and parts[0] == "project" and parts[2] == "data":
            project_id = self.inbox_id if parts[1] == "inbox" else parts[1]
            project = next((p for p in self.projects if p["id"] == project_id), {"id": project_id, "name": "Inbox"})
            undone = [t for t in self.tasks.values() if t["projectId"] == project_id and t["status"] == 0]
            return self._json(request, {"project": project, "tasks": undone, "columns": []})
        if method == "GET" and len(parts) == 4 and parts[0] == "project" and parts[2] == "task":
            task = self.tasks.get(parts[3])
            if task is None or task["projectId"] != parts[1]:
                request.setResponseCode(404)
                return b""
            return self._json(request, task)
        if method == "POST" and len(parts) == 2 and parts[0] == "task":
            task = self.tasks.get(parts[1])
            if task is None:
                request.setResponseCode(404)
                return b""
            if not isinstance(body, dict) or body.get("id") != parts[1] or body.get("projectId") != task["projectId"]:
                return b""  # 200, empty: nothing changed (as clients report for a wrong projectId)
            self.updates.append(body)
            if "title" in body:  # clients report that updates without the title are not saved
                task.update({k: v for k, v in body.items() if k not in ("id", "projectId")})
            return self._json(request, task)
        if method == "POST" and len(parts) == 5 and parts[0] == "project" and parts[4] == "complete":
            task = self.tasks.get(parts[3])
            if task is None or task["projectId"] != parts[1]:
                request.setResponseCode(404)
                return b""
            task["status"] = 2
            self.completed.append(parts[3])
            return b""
        request.setResponseCode(404)
        return b""

    def _json(self, request: IRequest, body: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()
