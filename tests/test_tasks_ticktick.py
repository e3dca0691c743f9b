"""The TickTick source against a local imitation of the Open API (tests/ticktick_fake.py), and its budget."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent

from opencoderouter.tasks.budget import RateBudget
from opencoderouter.tasks.ticktick import LIMIT_PAUSE, TickTickClient, TickTickError, TickTickSource

from .tasks_support import Backends, Harness, later, until
from .ticktick_fake import FakeTickTick

WORK = "6226ff9877acee87727f6bca"
#: A small budget, so that a test can run into it: 8 a second, 20 per 3 seconds.
WINDOWS = ((8, 1.0), (20, 3.0))


class TickTickWorld:
    def __init__(self, tmp_path: Any) -> None:
        self.api = FakeTickTick()
        self.url = self.api.listen()
        self.backends = Backends(tmp_path / "projects")
        self.harness = Harness(tmp_path, self.backends)

    def source(self, project: str | None = None, token: str | None = None) -> TickTickSource:
        client = TickTickClient(HTTPClient(Agent(reactor)), reactor, token or self.api.token, self.url,
                                RateBudget(reactor, WINDOWS, margin=0.5), timeout=5.0, backoff_start=0.1)
        return TickTickSource(client, project, "autocode", interval=0.3)

    def start(self, project: str | None = None, **settings: Any) -> Any:
        return self.harness.start([self.source(project)], **settings)

    async def close(self) -> None:
        await self.harness.stop()
        await self.backends.close()
        await maybeDeferred(self.api.stop)


@pytest.fixture
def tt(tmp_path):
    world = TickTickWorld(tmp_path)
    yield world
    pytest_twisted.blockon(Deferred.fromCoroutine(world.close()))


def task_text(project: str, prompt: str = "Fix the login timeout") -> str:
    return f"---\nproject: {project}\n---\n{prompt}\n"


def assert_within_budget(api: FakeTickTick) -> None:
    for limit, window in WINDOWS:
        assert api.most_in_any_window(window) <= limit, f"more than {limit} requests in {window}s"


# -- polling and writing back ------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_tagged_tasks_run_and_are_completed_with_the_answer(tt):
    archer = tt.backends.start("Archer")
    zeus = tt.backends.start("Zeus")
    tt.api.add_task("t1", WORK, task_text("Archer"), title="Fix login")
    tt.api.add_task("t2", WORK, task_text("Archer", "untagged"), tags=["work"])
    tt.api.add_task("t3", tt.api.inbox_id, task_text("Zeus", "from the inbox"))
    tt.api.add_task("t4", WORK, task_text("Archer", "failed before"), tags=["autocode", "autocode-failed"])
    tt.start()
    await until(lambda: set(tt.api.completed) == {"t1", "t3"}, what="t1 and t3 to be completed")
    t1 = tt.api.tasks["t1"]
    assert t1["status"] == 2 and "): done" in t1["content"] and "Hello from the fake model." in t1["content"]
    assert t1["content"].startswith(task_text("Archer")) and t1["title"] == "Fix login"
    assert tt.api.tasks["t2"]["content"] == task_text("Archer", "untagged")
    assert tt.api.tasks["t4"]["status"] == 0
    await later(0.5)  # more polls: nothing is taken twice
    assert [p["parts"][0]["text"] for p in archer.prompts] == ["Fix the login timeout"]
    assert [p["parts"][0]["text"] for p in zeus.prompts] == ["from the inbox"]
    assert archer.sessions[next(iter(archer.sessions))]["title"] == "Fix login"
    assert {t["ref"] for t in tt.harness.tasks()} == {f"{WORK}/t1", f"{tt.api.inbox_id}/t3"}
    assert_within_budget(tt.api)


@pytest_twisted.ensureDeferred
async def test_a_failed_task_gets_the_error_and_the_failed_tag_and_is_not_taken_again(tt):
    archer = tt.backends.start("Archer", behaviour="error")
    tt.api.add_task("t1", WORK, task_text("Archer"))
    tt.start()
    await until(lambda: "autocode-failed" in tt.api.tasks["t1"]["tags"], what="the failed tag")
    t1 = tt.api.tasks["t1"]
    assert t1["status"] == 0 and "APIError: Bad Request: fake model refuses" in t1["content"]
    assert t1["tags"] == ["autocode", "autocode-failed"] and tt.api.completed == []
    await later(0.5)
    assert len(archer.prompts) == 1


@pytest_twisted.ensureDeferred
async def test_a_malformed_task_is_failed_with_a_sentence_and_never_sent(tt):
    archer = tt.backends.start("Archer")
    tt.api.add_task("t1", WORK, "please just fix it (no front matter)")
    tt.api.add_task("t2", WORK, "---\nproject: Archer\n" + "x" * 1_100_000 + "\n---\nhuge\n")
    tt.start()
    await until(lambda: all("autocode-failed" in tt.api.tasks[t]["tags"] for t in ("t1", "t2")),
                what="both tasks to be marked failed")
    assert "no project: put 'project: NAME' in the front matter" in tt.api.tasks["t1"]["content"]
    assert "a task may be at most 1 MiB" in tt.api.tasks["t2"]["content"]
    assert archer.prompts == []


@pytest_twisted.ensureDeferred
async def test_only_the_chosen_project_is_read_and_an_unknown_one_is_named(tt):
    tt.backends.start("Archer")
    tt.api.projects.append({"id": "other", "name": "Other", "closed": False, "kind": "TASK"})
    tt.api.add_task("t1", WORK, task_text("Archer"))
    tt.api.add_task("t2", "other", task_text("Archer", "elsewhere"))
    tt.start(project="work")
    await until(lambda: tt.api.completed == ["t1"], what="t1")
    await later(0.3)
    assert tt.api.completed == ["t1"] and not any("/project/other" in p for _, _, p in tt.api.requests)
    # The project list is read once, not per poll.
    assert sum(1 for _, m, p in tt.api.requests if p == "/open/v1/project") == 1
    source = tt.source(project="Nowhere")
    with pytest.raises(TickTickError) as caught:
        await source.poll(set())
    assert "no TickTick project is named or has the id 'Nowhere' (projects: Other, Work, and inbox)" in str(caught.value)


# -- rate limits, errors, the API down ---------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_429_with_retry_after_is_honoured(tt):
    tt.backends.start("Archer")
    tt.api.add_task("t1", WORK, task_text("Archer"))
    tt.api.fault("429", "GET", r"/data$", "1")
    tt.start(project="Work")
    await until(lambda: tt.api.completed == ["t1"], what="t1 after the pause")
    limited = next(t for t, _, p in tt.api.requests if p.endswith("/data"))
    after = [t for t, _, _ in tt.api.requests if t > limited]
    assert after and min(after) - limited >= 1.0, "no request before Retry-After ran out"


@pytest_twisted.ensureDeferred
async def test_500s_and_a_dropped_connection_delay_the_write_back_but_it_lands_once(tt):
    archer = tt.backends.start("Archer")
    tt.api.add_task("t1", WORK, task_text("Archer"))
    tt.api.fault("500", "POST", r"^/task/t1$")
    tt.api.fault("drop", "POST", r"^/task/t1$")
    tt.api.fault("500", "POST", r"/complete$")
    tt.start(project="Work")
    await until(lambda: tt.api.completed == ["t1"], what="t1 completed")
    content = tt.api.tasks["t1"]["content"]
    assert content.count("OpenCodeRouter outcome (task ") == 1, "the outcome is written once"
    assert len(archer.prompts) == 1 and tt.harness.tasks()[0]["reported"]
    assert_within_budget(tt.api)


@pytest_twisted.ensureDeferred
async def test_an_outcome_waits_while_the_api_is_down_even_across_a_restart(tt):
    archer = tt.backends.start("Archer", behaviour="hang")
    tt.api.add_task("t1", WORK, task_text("Archer"))
    tt.start(project="Work")
    await until(lambda: archer.busy, what="the turn")
    tt.api.down = True
    archer._finish_turn(next(iter(archer.busy)))
    await until(lambda: tt.harness.tasks()[0]["report_error"], what="a failed write-back")
    assert "TickTick answered 503" in tt.harness.tasks()[0]["report_error"]
    await tt.harness.stop()
    tt.api.down = False
    tt.start(project="Work")
    await until(lambda: tt.api.completed == ["t1"], what="the write-back after the restart")
    await later(0.3)
    assert len(archer.prompts) == 1, "the task is still active in TickTick until then, and is not run again"


@pytest_twisted.ensureDeferred
async def test_a_burst_of_tasks_never_exceeds_the_budget(tt):
    archer = tt.backends.start("Archer")
    for number in range(12):
        tt.api.add_task(f"t{number}", WORK, task_text("Archer", f"task {number}"))
    tt.start(project="Work", per_project=4, max_running=4)
    await until(lambda: len(tt.api.completed) == 12, timeout=30, what="every task completed")
    # 12 tasks x (read, update, complete) + polls: well over the 20 per 3 s the budget allows.
    assert len(tt.api.requests) > 36
    assert_within_budget(tt.api)
    assert sorted(p["parts"][0]["text"] for p in archer.prompts) == sorted(f"task {n}" for n in range(12))


@pytest_twisted.ensureDeferred
async def test_every_request_carries_the_bearer_token_and_a_wrong_one_is_a_sentence(tt):
    tt.backends.start("Archer")
    source = tt.source(token="wrong-token")
    with pytest.raises(TickTickError) as caught:
        await source.poll(set())
    assert "TickTick refused the token (401)" in str(caught.value) and "--ticktick-token-file" in str(caught.value)
    assert caught.value.status == 401


@pytest_twisted.ensureDeferred
async def test_the_token_is_never_logged(tt):
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        tt.backends.start("Archer")
        tt.api.add_task("t1", WORK, task_text("Archer"))
        tt.api.fault("drop", "GET", r"/data$")
        tt.api.fault("500", "POST", r"/complete$")
        tt.start(project="Work")
        await until(lambda: tt.api.completed == ["t1"], what="t1")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    from twisted.logger import formatEvent

    assert seen and not any(tt.api.token in formatEvent(event) + repr(event) for event in seen)


# -- the client's pauses and the budget, on a Clock ----------------------------------------------
class _Answers:
    """An HTTPClient stand-in answering each request with the next scripted (code, headers, body)."""

    def __init__(self, *answers: tuple[int, dict[bytes, list[bytes]], bytes]) -> None:
        self.answers = list(answers)
        self.sent = 0

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        from treq.testing import StubTreq
        from twisted.web.resource import Resource

        code, headers, body = self.answers.pop(0)
        self.sent += 1

        class One(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                request.setResponseCode(code)
                for name, values in headers.items():
                    request.responseHeaders.setRawHeaders(name, values)
                return body

        stub = StubTreq(One())
        return stub.request(method, url)


@pytest_twisted.ensureDeferred
async def test_rate_limit_signals_pause_the_client_on_the_clock():
    clock = Clock()
    limit_body = b'{"errorCode": "exceed_query_limit", "errorMessage": "exceed query limit"}'
    http = _Answers((500, {}, limit_body), (429, {b"retry-after": [b"7"]}, b""), (429, {}, b""), (200, {}, b"[]"))
    client = TickTickClient(http, clock, "token", "http://127.0.0.1:1/open/v1", RateBudget(clock))
    with pytest.raises(TickTickError, match="rate limit"):
        await client.get("/project")
    assert client.paused_until == LIMIT_PAUSE
    with pytest.raises(TickTickError, match="paused for 300s more"):
        await client.get("/project")
    assert http.sent == 1, "nothing is sent while paused"
    clock.advance(LIMIT_PAUSE)
    with pytest.raises(TickTickError):
        await client.get("/project")
    assert client.paused_until == LIMIT_PAUSE + 7, "Retry-After wins"
    clock.advance(7)
    with pytest.raises(TickTickError):
        await client.get("/project")  # a 429 without Retry-After: TickTick's 5-minute window
    assert client.paused_until == LIMIT_PAUSE + 7 + LIMIT_PAUSE
    clock.advance(LIMIT_PAUSE)
    assert await client.get("/project") == []


@pytest_twisted.ensureDeferred
async def test_server_errors_back_off_doubling():
    clock = Clock()
    http = _Answers(*[(502, {}, b"bad gateway")] * 3, (200, {}, b"[]"))
    client = TickTickClient(http, clock, "token", "http://127.0.0.1:1/open/v1", RateBudget(clock), backoff_start=5.0)
    pauses = []
    for _ in range(3):
        with pytest.raises(TickTickError, match="answered 502"):
            await client.get("/project")
        pauses.append(client.paused_until - clock.seconds())
        clock.advance(pauses[-1])
    assert pauses == [5.0, 10.0, 20.0]
    assert await client.get("/project") == []


def test_the_default_budget_is_100_a_minute_and_300_per_5_minutes():
    clock = Clock()
    budget = RateBudget(clock)
    for _ in range(100):
        assert budget.wait_time() == 0
        budget.take()
    assert budget.wait_time() == 62.0  # a minute, and 2 s for requests that arrive closer than they were sent
    sent = 100
    while sent < 300:
        clock.advance(budget.wait_time())
        assert budget.wait_time() == 0
        budget.take()
        sent += 1
    # 300 went out in about 2 minutes: the 301st waits for the first to leave the 5-minute window.
    assert clock.seconds() == 124.0 and budget.wait_time() == 178.0
    clock.advance(178)
    assert budget.wait_time() == 0


def test_a_budget_needs_sensible_windows():
    with pytest.raises(ValueError):
        RateBudget(Clock(), [(0, 60.0)])
