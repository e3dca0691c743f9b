"""In-process stand-ins for dispatch tests: a scripted OpenCode (built on the project's fake) and a stub router.

Also runnable as a process (``python -m tests.dispatch_fakes --behaviour hang``) for CLI tests that
send signals: it prints ``router http://127.0.0.1:PORT`` when ready and ``abort ses_...`` when a
session is aborted.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import ServerFactory
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from opencoderouter.testing import FakeOpenCode, opencode_json


class ScriptedOpenCode(FakeOpenCode):
    """The project's fake OpenCode plus what dispatch tests need to script.

    ``behaviour``: ``reply`` (the fake's normal turn, after a foreign session's events), ``error``
    (session.error then idle), ``hang`` (busy forever), ``drop`` (cut every event stream mid-turn,
    finish while nobody listens), ``lost`` (cut the streams, then idle with an unfinished answer),
    ``permission`` (ask, finish once answered), ``reasoning``
    (a reasoning part's deltas must not reach stdout).
    """

    def __init__(self, directory: str, behaviour: str = "reply", **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self.behaviour = behaviour
        self.aborted: list[str] = []
        self.permission_replies: list[tuple[str, Any]] = []
        self.prompts: list[dict[str, Any]] = []
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.on_abort: Any = None
        self._waiting_permission = ""
        #: While set, ``GET /event`` answers 503 (the backend is "away").
        self.refuse_events = False

        self.route("GET", "/event", self._event_unless_away)
        self.route("GET", "/agent", lambda request: opencode_json(request, [
            {"name": "build", "mode": "primary"}, {"name": "plan", "mode": "primary"},
            {"name": "general", "mode": "subagent"}]))
        self.route("GET", "/config", lambda request: opencode_json(request, {}))
        self.route("GET", "/session/{session_id}/message",
                   lambda request, session_id: opencode_json(request, self.messages.get(session_id, [])))
        self.route("POST", "/permission/{permission_id}/reply", self._permission_reply)
        self.route("POST", "/session/{session_id}/abort", self._abort)
        self.route("POST", "/session/{session_id}/prompt_async", self._prompt_route)

    def _event_unless_away(self, request: Request) -> bytes | int:
        if self.refuse_events:
            return opencode_json(request, {"name": "Unavailable"}, 503)
        return self.event_stream(request, wrapped=False)

    def _permission_reply(self, request: IRequest, permission_id: str) -> bytes:
        body = json.loads(request.content.read() or b"{}")
        self.permission_replies.append((permission_id, body.get("reply")))
        self.clock.callLater(0, self._finish_turn, self._waiting_permission)
        return opencode_json(request, True)

    def _abort(self, request: IRequest, session_id: str) -> bytes | int:
        self.aborted.append(session_id)
        if self.on_abort is not None:
            self.on_abort(session_id)
        if session_id in self.busy:
            # Like the real server: the aborted turn reports an error, then idle, before the answer.
            self.emit("session.error", {"sessionID": session_id, "error": {
                "name": "MessageAbortedError", "data": {"message": "Aborted"}}})
            self.busy.discard(session_id)
            self.emit("session.idle", {"sessionID": session_id})
            # The answer comes later than the events, so a client must not take them as the outcome.
            self.clock.callLater(0.2, self._answer_later, request, b"true")
            return NOT_DONE_YET
        return self.abort(request, session_id)

    def _prompt_route(self, request: IRequest, session_id: str) -> bytes:
        session = self.sessions.get(session_id)
        if session is None:
            return self.prompt_async(request, session_id)  # the fake's 404
        return self._prompt_async(request, session)

    def _answer_later(self, request: IRequest, body: bytes) -> None:
        request.setHeader(b"content-type", b"application/json")
        request.write(body)
        request.finish()

    def _prompt_async(self, request: IRequest, session: dict[str, Any]) -> bytes:
        """Record the prompt, then answer as the fake does (a test wraps this to see the moment of the prompt)."""
        self.prompts.append(json.loads(request.content.getvalue() or b"{}"))
        return self.prompt_async(request, session["id"])

    def run_turn(self, session_id: str) -> None:
        """The turn ``behaviour`` asks for."""
        if self.behaviour == "reply":
            # Another session's turn in the same directory must not leak into this dispatch.
            self.emit("message.part.delta", {"sessionID": "ses_other", "messageID": "m", "partID": "p",
                                             "field": "text", "delta": "NOT MINE"})
            self.emit("session.idle", {"sessionID": "ses_other"})
            super().run_turn(session_id)
        elif self.behaviour == "reasoning":
            self.emit("session.status", {"sessionID": session_id, "status": {"type": "busy"}})
            self.emit("message.part.updated", {"sessionID": session_id, "part": {
                "id": "prt_r", "messageID": "msg_a", "sessionID": session_id, "type": "reasoning", "text": ""}})
            self.emit("message.part.delta", {"sessionID": session_id, "messageID": "msg_a", "partID": "prt_r",
                                             "field": "text", "delta": "SECRET THOUGHTS"})
            self.emit("message.part.updated", {"sessionID": session_id, "part": {
                "id": "prt_t", "messageID": "msg_a", "sessionID": session_id, "type": "tool", "tool": "bash",
                "state": {"status": "running", "input": {"command": "ls"}}}})
            self._finish_turn(session_id)
        elif self.behaviour == "error":
            self.emit("session.status", {"sessionID": session_id, "status": {"type": "busy"}})
            self.emit("session.error", {"sessionID": session_id, "error": {
                "name": "APIError", "data": {"message": "Bad Request: fake model refuses", "statusCode": 400}}})
            self.busy.discard(session_id)
            self.emit("session.idle", {"sessionID": session_id})
        elif self.behaviour == "hang":
            self.emit("session.status", {"sessionID": session_id, "status": {"type": "busy"}})
        elif self.behaviour == "drop":
            self.emit("session.status", {"sessionID": session_id, "status": {"type": "busy"}})
            self.refuse_events = True
            self.close_streams()
            self.clock.callLater(0.3, self._finish_quietly, session_id)
        elif self.behaviour == "lost":
            self.emit("session.status", {"sessionID": session_id, "status": {"type": "busy"}})
            self.refuse_events = True
            self.close_streams()
            self.clock.callLater(0.3, self._lose_turn, session_id)
        elif self.behaviour == "permission":
            self.emit("session.status", {"sessionID": session_id, "status": {"type": "busy"}})
            self._waiting_permission = session_id
            self.emit("permission.asked", {"id": "per_fake1", "sessionID": session_id, "permission": "bash",
                                           "patterns": ["rm -rf build"], "metadata": {}, "always": ["rm *"]})

    def _finish_turn(self, session_id: str) -> None:
        self.emit("message.part.delta", {"sessionID": session_id, "messageID": "msg_a", "partID": "prt_x",
                                         "field": "text", "delta": self.reply_text})
        self.busy.discard(session_id)
        self.emit("session.idle", {"sessionID": session_id})

    def _lose_turn(self, session_id: str) -> None:
        """A restarted server: the turn is gone, the answer stays unfinished, nobody says so."""
        self.busy.discard(session_id)
        self.refuse_events = False
        self.messages[session_id] = [
            {"info": {"id": "msg_u", "role": "user"}, "parts": [{"type": "text", "text": "prompt"}]},
            {"info": {"id": "msg_a", "role": "assistant", "time": {"created": 1}}, "parts": [{"type": "step-start"}]},
        ]

    def _finish_quietly(self, session_id: str) -> None:
        """The turn ends while no stream is open: only the stored messages tell."""
        self.busy.discard(session_id)
        self.refuse_events = False
        self.messages[session_id] = [
            {"info": {"id": "msg_u", "role": "user"}, "parts": [{"type": "text", "text": "prompt"}]},
            {"info": {"id": "msg_a", "role": "assistant", "time": {"created": 1, "completed": 2}},
             "parts": [{"type": "step-start"}, {"type": "text", "text": "Finished while you were away."}]},
        ]


class StubRouter(Resource):
    """Answers ``/api/resolve`` and ``/api/backends`` for one project, like the router's API."""

    isLeaf = True

    def __init__(self, name: str, project_path: str, backend_url: str) -> None:
        super().__init__()
        self.name = name
        self.project_path = project_path
        self.backend_url = backend_url
        self.queries: list[bytes] = []
        #: When set, every request must carry exactly this Authorization header (else 401).
        self.required_authorization: bytes | None = None

    def _backend(self) -> dict[str, Any]:
        return {"slug": self.name.lower(), "project_name": self.name, "project_path": self.project_path,
                "url": self.backend_url, "port": 0, "version": "fake"}

    def render_GET(self, request: IRequest) -> bytes:  # noqa: N802 - twisted.web's name
        """Resolve by name (case-insensitive) or path; 404 JSON otherwise."""
        request.setHeader(b"content-type", b"application/json")
        self.queries.append(request.uri)
        if self.required_authorization and request.getHeader(b"authorization") != self.required_authorization:
            request.setResponseCode(401)
            return b'{"error": "unauthorized"}'
        if request.path == b"/api/backends":
            return json.dumps([self._backend()]).encode()
        name = (request.args.get(b"name") or [b""])[0].decode()
        path = (request.args.get(b"path") or [b""])[0].decode()
        if request.path == b"/api/resolve" and (name.lower() == self.name.lower() or path == self.project_path):
            return json.dumps(self._backend()).encode()
        request.setResponseCode(404)
        return json.dumps({"error": "not_found", "query": name or path}).encode()


def main() -> None:
    """Serve a scripted OpenCode and a stub router for it until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--behaviour", default="reply")
    parser.add_argument("--directory", default="/tmp/project")
    args = parser.parse_args()
    from twisted.internet import reactor

    opencode = ScriptedOpenCode(args.directory, behaviour=args.behaviour)
    opencode.on_abort = lambda sid: print(f"abort {sid}", flush=True)
    backend = opencode.listen(reactor, 0).getHost()
    assert isinstance(backend, IPv4Address)
    stub = StubRouter("project", args.directory, f"http://127.0.0.1:{backend.port}/")
    site = Site(stub)
    site.noisy = False
    # A Site is a ServerFactory; Twisted's generic parameters for the two do not line up.
    router = reactor.listenTCP(0, cast(ServerFactory, site), interface="127.0.0.1").getHost()
    assert isinstance(router, IPv4Address)
    print(f"router http://127.0.0.1:{router.port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
