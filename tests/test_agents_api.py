"""``/api/agents``, the agent summary on ``/api/backends``, the dashboard feed and ``/metrics`` (in memory)."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq

from opencoderouter.api import RouterAPI
from opencoderouter.events import EventStream
from opencoderouter.metrics import RouterMetrics

from .agent_harness import Harness
from .test_dashboard_events import open_stream, parse_sse
from .test_metrics import value


def answer(stub: StubTreq, url: str, host: str = "127.0.0.1:8080") -> tuple[int, Any]:
    responses: list[Any] = []
    stub.get(url, headers={"Host": host}).addCallback(responses.append)
    stub.flush()
    [response] = responses
    bodies: list[bytes] = []
    stub.content(response).addCallback(bodies.append)
    stub.flush()
    return response.code, json.loads(bodies[0])


def needing_you() -> tuple[Harness, Any]:
    h = Harness()
    fake = h.serve("alpha")
    sid = h.session(fake, "Deploy <script>x</script>")
    fake.emit("session.updated", {"sessionID": sid, "info": fake.sessions[sid]})
    fake.ask_permission(sid, "bash", "rm -rf build/")
    h.serve("beta", port=30001)
    h.serve("locked", port=30002, sighting={"locked": True})
    h.pump()
    return h, fake


def test_api_agents_lists_every_backend_with_summary_and_sessions():
    h, _ = needing_you()
    stub = StubTreq(RouterAPI(h.registry, agents=h.watcher).resource())
    code, body = answer(stub, "http://127.0.0.1:8080/agents")
    assert code == 200
    assert [entry["slug"] for entry in body] == ["alpha", "beta", "locked"]
    alpha, beta, locked = body
    assert alpha["agents"] == {"state": "needs_you", "label": "needs you (1)", "working": 0,
                               "needs_you": 1, "errors": 0, "sessions": 1, "reason": None}
    [session] = alpha["sessions"]
    assert session["title"] == "Deploy <script>x</script>" and session["status"] == "working"
    assert session["permissions"][0]["asking"] == "bash: rm -rf build/"
    assert session["web_url"] == "http://alpha-" + h.registry.by_slug("alpha").host_label.split("-", 1)[1] + \
        f".localhost:8080{session['web_path']}"
    assert alpha["url"] == "http://127.0.0.1:8080/alpha/" and alpha["project_path"] == "/home/alice/alpha"
    assert beta["agents"]["state"] == "idle" and beta["sessions"] == []
    assert locked["agents"]["state"] == "unknown" and "--opencode-password-file" in locked["agents"]["reason"]


def test_session_links_use_the_lan_name_when_the_router_was_reached_by_it():
    h, _ = needing_you()
    label = h.registry.by_slug("alpha").host_label
    h.registry.set_mdns_name("alpha", label)  # what the advertiser records once mDNS has the name
    stub = StubTreq(RouterAPI(h.registry, agents=h.watcher, mdns=True).resource())
    _, body = answer(stub, "http://devbox.local:8080/agents/alpha", host="devbox.local:8080")
    assert body["sessions"][0]["web_url"].startswith(f"http://{label}.local:8080/")


def test_without_mdns_a_session_link_from_the_lan_is_the_tunnel_name_not_a_local_one():
    h, _ = needing_you()
    stub = StubTreq(RouterAPI(h.registry, agents=h.watcher).resource())
    _, body = answer(stub, "http://devbox.local:8080/agents/alpha", host="devbox.local:8080")
    [session] = body["sessions"]
    label = h.registry.by_slug("alpha").host_label
    assert session["web_url"] == f"http://{label}.localhost:8080{session['web_path']}"
    _, resolved = answer(stub, "http://devbox.local:8080/resolve?name=alpha", host="devbox.local:8080")
    assert resolved["web_url"] == f"http://{label}.localhost:8080/"  # the same rule as /api/resolve


def test_a_locked_backend_the_router_cannot_open_has_no_project_in_api_agents_as_in_api_backends():
    h, _ = needing_you()
    h.serve("opened", port=30003, sighting={"locked": True, "router_credentials": True})
    stub = StubTreq(RouterAPI(h.registry, agents=h.watcher).resource())
    _, agents = answer(stub, "http://127.0.0.1:8080/agents")
    _, backends = answer(stub, "http://127.0.0.1:8080/backends")
    shown = {a["slug"]: (a["project_name"], a["project_path"]) for a in agents}
    assert shown["locked"] == (None, None)
    assert shown["opened"] == ("opened", "/home/alice/opened")
    assert shown == {b["slug"]: (b["project_name"], b["project_path"]) for b in backends}


def test_api_agents_of_one_backend_and_an_unknown_slug():
    h, _ = needing_you()
    stub = StubTreq(RouterAPI(h.registry, agents=h.watcher).resource())
    code, body = answer(stub, "http://127.0.0.1:8080/agents/alpha")
    assert code == 200 and body["slug"] == "alpha" and body["agents"]["needs_you"] == 1
    code, body = answer(stub, "http://127.0.0.1:8080/agents/nope")
    assert (code, body) == (404, {"error": "not_found", "slug": "nope", "known": ["alpha", "beta", "locked"]})


def test_backend_entries_carry_the_agent_summary():
    h, _ = needing_you()
    stub = StubTreq(RouterAPI(h.registry, agents=h.watcher).resource())
    _, backends = answer(stub, "http://127.0.0.1:8080/backends")
    assert [b["agents"]["state"] for b in backends] == ["needs_you", "idle", "unknown"]
    _, resolved = answer(stub, "http://127.0.0.1:8080/resolve?name=alpha")
    assert resolved["agents"]["label"] == "needs you (1)"


def test_without_the_watcher_backends_have_no_summary_and_agents_are_unknown():
    h, _ = needing_you()
    stub = StubTreq(RouterAPI(h.registry).resource())
    _, backends = answer(stub, "http://127.0.0.1:8080/backends")
    assert all("agents" not in b for b in backends)
    _, agents = answer(stub, "http://127.0.0.1:8080/agents/alpha")
    assert agents["agents"]["state"] == "unknown" and "--agents=false" in agents["agents"]["reason"]


def test_the_dashboard_feed_has_agents_in_its_snapshot_and_an_agents_event_per_change():
    h, fake = needing_you()
    h.advance(0.1)  # the changes of the set-up went out before the stream opened
    stream = EventStream(h.registry, h.clock, snapshot_extras=h.watcher.dashboard_json, tick=0)
    h.watcher.on_change = lambda slugs: stream.publish("agents", h.watcher.dashboard_json(slugs))
    request = open_stream(stream)
    [(name, snapshot)] = [e for e in parse_sse(request.written) if e[0] == "snapshot"]
    by_slug = {a["slug"]: a for a in snapshot["agents"]}
    assert by_slug["alpha"]["agents"]["state"] == "needs_you"
    assert by_slug["alpha"]["sessions"][0]["permissions"][0]["asking"] == "bash: rm -rf build/"
    request.written.clear()
    [(request_id, _)] = [(k, v) for k, v in fake.permissions.items()]
    fake.permissions.clear()
    fake.emit("permission.replied", {"sessionID": "ses_a", "requestID": request_id, "reply": "once"})
    h.pump()
    h.advance(0.1)
    events = parse_sse(request.written)
    assert [name for name, _ in events] == ["agents"]
    [changed] = events[0][1]["agents"]
    assert changed["slug"] == "alpha" and changed["agents"]["state"] == "working"
    assert isinstance(events[0][1]["server_time"], float)


def test_metrics_gauges_follow_sessions_requests_and_backends():
    h, fake = needing_you()
    metrics = RouterMetrics(h.registry)
    metrics.watch_agents(h.watcher.counts)
    text = metrics.render().decode()
    assert value(text, "opencoderouter_agent_sessions", status="working") == 1
    assert value(text, "opencoderouter_agent_sessions", status="error") == 0
    assert value(text, "opencoderouter_agent_pending", kind="permission") == 1
    assert value(text, "opencoderouter_agent_pending", kind="question") == 0
    assert value(text, "opencoderouter_agent_backends", state="needs_you") == 1
    assert value(text, "opencoderouter_agent_backends", state="unknown") == 1
    assert value(text, "opencoderouter_agent_streams") == 2
    fake.ask_question("ses_a", [{"question": "Why?", "header": "Why", "options": [{"label": "Because"}]}])
    h.pump()
    assert value(metrics.render().decode(), "opencoderouter_agent_pending", kind="question") == 1
