"""The whole pipeline against the real ``opencode serve`` (npm ``opencode-ai``), through one router.

One router and the instances are shared by the module (start-up is the slow part). The instances are
started by the router's launcher when it exists (``opencoderouter.launcher``), else by this module
(one isolated HOME each); either way the router's scan range covers only this module's ports.
Everything talks to 127.0.0.1 only: the model is :class:`tests.real_opencode.FakeModelServer`.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .real_opencode import (
    BASH_COMMAND,
    MODE_BASH,
    MODE_ERROR,
    MODE_SLOW,
    REPLY_TEXT,
    FakeModelServer,
    OpenCodeInstance,
    git_init,
    opencode_binary,
    opencode_env,
    run_dispatch,
    seed_home,
)
from .support import REPO, RouterProcess, free_port_block, http_json, subprocess_env, wait_for

pytestmark = [
    pytest.mark.real_opencode,
    pytest.mark.skipif(opencode_binary() is None, reason="real opencode not installed (run tests/setup/install-opencode.sh)"),
]

BLOCK = 8  # ports: two project instances, the victim, and room for the launcher's retries


def launcher_available() -> bool:
    """True once the launcher has landed: the router then starts the project instances itself."""
    if importlib.util.find_spec("opencoderouter.launcher") is None:
        return False
    from opencoderouter.config import Options

    return any(flag[0] == "opencode-bin" for flag in getattr(Options, "optParameters", []))


class Pipeline:
    """Everything the module shares: the fake model, the router, the instances, the projects."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.model = FakeModelServer(slow_duration=130.0, slow_interval=5.0).start()
        self.git_project = base / "work" / "webapp"
        self.plain_project = base / "scratch" / "webapp"
        self.victim_project = base / "victim" / "doomed"
        for directory in (self.git_project, self.plain_project, self.victim_project):
            directory.mkdir(parents=True)
        git_init(self.git_project)
        self.instances: list[OpenCodeInstance] = []
        self.router: RouterProcess | None = None
        try:
            first = free_port_block(BLOCK)
            ports = list(range(first, first + BLOCK))
            # A generous probe timeout: on a loaded 2-core machine a busy opencode answers its health probe
            # late, and a backend pruned for that would fail tests that have nothing to do with probing.
            scan = ["--scan-start", str(first), "--scan-end", str(first + BLOCK - 1), "--scan-interval", "1s",
                    "--probe-timeout", "3s", "--stale-after", "60s"]
            self.launched = launcher_available()
            if self.launched:
                # The launcher's children inherit the router's environment: one seeded HOME for both.
                # The victim first, so that the launcher never picks its port.
                self.victim = self._start(self.victim_project, "home-victim", ports[-1])
                home = seed_home(base / "home-router")
                self.router_env: dict[str, str] = opencode_env(home, self.model.url)
                self.router_args = [*scan, "--opencode-bin", str(opencode_binary()), str(self.git_project),
                                    str(self.plain_project)]
            else:
                self._start(self.git_project, "home-git", ports[0])
                self._start(self.plain_project, "home-plain", ports[1])
                self.victim = self._start(self.victim_project, "home-victim", ports[2])
                self.router_env, self.router_args = {}, scan
            self.start_router()
        except BaseException:
            self.close()  # what started before the failure
            raise

    def start_router(self, port: int | None = None) -> None:
        """Start the router and wait until it lists all three projects (again, after a restart)."""
        self.router = RouterProcess(*self.router_args, env=self.router_env, port=port)
        wanted = {str(self.git_project), str(self.plain_project), str(self.victim_project)}
        self.backends = wait_for(
            lambda: (lambda b: {x["project_path"] for x in b} == wanted and b)(http_json(self.router.url + "/api/backends")),
            timeout=60, interval=0.3, what=f"the router to list {sorted(wanted)}")
        self.by_path = {b["project_path"]: b for b in self.backends}

    def _start(self, directory: Path, home: str, port: int) -> OpenCodeInstance:
        instance = OpenCodeInstance(directory, self.base / home, self.model.url, port=port)
        self.instances.append(instance)
        return instance

    def close(self) -> None:
        if self.router is not None:
            self.router.stop()
        for instance in self.instances:
            instance.stop()
        self.model.stop()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    made = Pipeline(tmp_path_factory.mktemp("real-opencode"))
    try:
        yield made
    finally:
        made.close()


def _request(router: RouterProcess, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", router.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


# -- discovery -------------------------------------------------------------------------------------
def test_both_projects_are_listed_with_exact_paths_and_distinct_slugs(pipeline):
    git = pipeline.by_path[str(pipeline.git_project)]
    plain = pipeline.by_path[str(pipeline.plain_project)]
    assert git["slug"] != plain["slug"]
    assert {git["slug"], plain["slug"]} & {"webapp"}, "one of the two keeps the plain folder name"
    assert git["version"] == plain["version"] == "1.18.33"


# -- path mode -------------------------------------------------------------------------------------
def test_path_mode_reaches_health_session_and_event_stream(pipeline):
    router = pipeline.router
    for project in (pipeline.git_project, pipeline.plain_project):
        slug = pipeline.by_path[str(project)]["slug"]
        code, headers, body = _request(router, "GET", f"/{slug}/global/health")
        assert code == 200 and json.loads(body) == {"healthy": True, "version": "1.18.33"}
        code, headers, body = _request(router, "POST", f"/{slug}/session", b'{"title":"through the router"}',
                                       {"content-type": "application/json"})
        session = json.loads(body)
        assert code == 200 and session["id"].startswith("ses_") and session["directory"] == str(project)
        connection = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
        try:
            connection.request("GET", f"/{slug}/event")
            response = connection.getresponse()
            assert response.status == 200
            assert response.getheader("content-type", "").startswith("text/event-stream")
            first = response.readline()
            assert first.startswith(b"data: ") and json.loads(first[6:])["type"] == "server.connected"
        finally:
            connection.close()


# -- host mode -------------------------------------------------------------------------------------
def test_host_mode_serves_the_web_ui_and_every_asset_it_references(pipeline):
    backend = pipeline.by_path[str(pipeline.git_project)]
    host = backend["domain"].removesuffix(".local") + f".localhost:{pipeline.router.port}"
    code, headers, page = _request(pipeline.router, "GET", "/", headers={"Host": host, "Accept": "text/html"})
    assert code == 200 and headers["content-type"].startswith("text/html")
    assets = sorted(set(re.findall(rb'(?:src|href)="(/assets/[^"]+)"', page)))
    assert assets, f"the web UI page references no /assets/: {page[:300]!r}"
    for asset in assets:
        code, _, body = _request(pipeline.router, "GET", asset.decode(), headers={"Host": host}, timeout=30)
        assert code == 200 and body, f"{asset!r} through Host {host} answered {code}"


# -- WebSocket terminal ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["path", "host"])
def test_pty_websocket_echoes_through_the_router(pipeline, mode):
    websocket = pytest.importorskip("websocket")
    backend = pipeline.by_path[str(pipeline.plain_project)]
    slug = backend["slug"]
    host = backend["domain"].removesuffix(".local") + f".localhost:{pipeline.router.port}"
    prefix, headers = (f"/{slug}", {}) if mode == "path" else ("", {"Host": host})
    code, _, body = _request(pipeline.router, "POST", f"{prefix}/pty", b"{}",
                             {"content-type": "application/json", **headers})
    assert code == 200, body[:300]
    pty = json.loads(body)
    try:
        socket = websocket.create_connection(f"ws://127.0.0.1:{pipeline.router.port}{prefix}/pty/{pty['id']}/connect",
                                             timeout=10, **({"host": host} if mode == "host" else {}))
        try:
            socket.send("echo hi-$((40+2))\r")  # the shell computes 42: the answer is not our own echo
            received = ""
            deadline = time.monotonic() + 10
            while "hi-42" not in received and time.monotonic() < deadline:
                message = socket.recv()
                received += message.decode("utf-8", "replace") if isinstance(message, bytes) else message
            assert "hi-42" in received
        finally:
            socket.close()
    finally:
        _request(pipeline.router, "DELETE", f"{prefix}/pty/{pty['id']}", headers=headers)


# -- dispatch --------------------------------------------------------------------------------------
def _dispatch(pipeline: Pipeline, task: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_dispatch(pipeline.base, pipeline.router.url, task, *args, timeout=timeout)


@pytest.mark.parametrize("which", ["git_project", "plain_project"])
def test_dispatch_prints_the_models_answer_and_exits_0(pipeline, which):
    project = getattr(pipeline, which)
    done = _dispatch(pipeline, f"---\nproject: {project}\nmodel: fake/fake-model\n---\nSay hello.\n")
    assert done.returncode == 0, done.stderr
    assert REPLY_TEXT in done.stdout
    assert "ses_" in done.stderr


def test_dispatch_json_result_for_bots(pipeline):
    done = _dispatch(pipeline, f"---\nproject: {pipeline.git_project}\n---\nSay hello.\n", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "done" and result["text"] == REPLY_TEXT and result["error"] is None


def test_dispatch_with_a_failing_model_exits_1_with_api_error(pipeline):
    done = _dispatch(pipeline, f"---\nproject: {pipeline.plain_project}\n---\n{MODE_ERROR} please fail\n")
    assert done.returncode == 1, done.stderr
    assert "APIError" in done.stderr


def test_dispatch_permission_once_lets_the_tool_run(pipeline):
    proof = pipeline.git_project / "proof.txt"
    done = _dispatch(pipeline, f"---\nproject: {pipeline.git_project}\n---\n{MODE_BASH} write the proof\n",
                     "--permissions", "once", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["permissions"] == [{"permission": "bash", "patterns": [BASH_COMMAND], "reply": "once"}]
    assert result["text"] == REPLY_TEXT, "the text of the turn's every assistant message (tool call, then answer)"
    assert f"permission asked: bash {BASH_COMMAND} → once" in done.stderr
    assert proof.read_text() == "permitted\n"


def test_dispatch_rejects_permissions_by_default(pipeline):
    proof = pipeline.plain_project / "proof.txt"
    done = _dispatch(pipeline, f"---\nproject: {pipeline.plain_project}\n---\n{MODE_BASH} write the proof\n")
    assert done.returncode == 0, done.stderr
    assert f"permission asked: bash {BASH_COMMAND} → reject" in done.stderr
    assert "tool bash error" in done.stderr
    assert not proof.exists()


def test_dispatch_to_an_unknown_project_exits_3(pipeline):
    done = _dispatch(pipeline, "---\nproject: no-such-project\n---\nhello\n")
    assert done.returncode == 3 and "no such project 'no-such-project'" in done.stderr


def test_turn_that_ends_while_the_router_is_down_is_reported_after_it_returns(pipeline):
    """Reconnect + reconcile against the real server: the stream drops, the turn ends unseen, exit 0.

    It uses the victim instance (started by this module, not by the router's launcher, so it survives
    the router's restart); it runs before the test that kills that instance.
    """
    router = pipeline.router
    slow_before = sum(r["mode"] == "slow" for r in pipeline.model.requests)
    child = subprocess.Popen(
        [sys.executable, "-m", "opencoderouter.dispatch", "--router", router.url, "--project",
         str(pipeline.victim_project), "--json", "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
    try:
        child.stdin.write("[fake-model:slow=3] finish while nobody watches\n")
        child.stdin.close()
        wait_for(lambda: sum(r["mode"] == "slow" for r in pipeline.model.requests) > slow_before, timeout=30,
                 what="the slow model call to start")
        router.stop()
        time.sleep(6)  # the 3 s answer ends while no router is there
        pipeline.start_router(port=router.port)
        code = child.wait(60)
        result = json.loads(child.stdout.read())
        stderr = child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert code == 0, stderr
    assert "event stream lost" in stderr and "ended while the event stream was down" in stderr
    assert result["status"] == "done" and "slow done." in result["text"]


def test_killing_the_backend_mid_dispatch_exits_4_with_a_clear_message(pipeline):
    child = subprocess.Popen(
        [sys.executable, "-m", "opencoderouter.dispatch", "--router", pipeline.router.url, "--project",
         str(pipeline.victim_project), "--reconnect-timeout", "5s", "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
    slow_before = sum(r["mode"] == "slow" for r in pipeline.model.requests)
    try:
        child.stdin.write(f"{MODE_SLOW} this backend is about to die\n")
        child.stdin.close()
        wait_for(lambda: sum(r["mode"] == "slow" for r in pipeline.model.requests) > slow_before, timeout=30,
                 what="the slow model call to start")
        pipeline.victim.kill()
        # Exiting at all before the 130 s turn ends means it gave up (the wait is a hang guard); that
        # it keeps trying for its reconnect budget and no longer is shown on a Clock in test_dispatch.
        code = child.wait(30)
        stderr = child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert code == 4, stderr
    assert "lost the backend of project" in stderr and "may still be running" in stderr
    assert "for 5s:" in stderr, "it gave up after the --reconnect-timeout it was given"


def test_dispatch_timeout_aborts_the_session_and_exits_124(pipeline):
    done = _dispatch(pipeline, f"---\nproject: {pipeline.plain_project}\n---\n{MODE_SLOW} never mind\n", "--timeout", "4s",
                     "--json")
    assert done.returncode == 124, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "timeout"
    slug = pipeline.by_path[str(pipeline.plain_project)]["slug"]
    statuses = http_json(f"{pipeline.router.url}/{slug}/session/status?directory={pipeline.plain_project}")
    assert result["session_id"] not in statuses, "the aborted session is no longer busy"


def test_sigint_aborts_the_session_before_exiting_130(pipeline):
    child = subprocess.Popen(
        [sys.executable, "-m", "opencoderouter.dispatch", "--router", pipeline.router.url, "--project",
         str(pipeline.git_project), "--json", "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
    try:
        child.stdin.write(f"{MODE_SLOW} interrupt me\n")
        child.stdin.close()
        for line in child.stderr:
            if "following events" in line:
                break
        child.send_signal(signal.SIGINT)
        code = child.wait(30)
        result = json.loads(child.stdout.read())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert code == 130 and result["status"] == "interrupted"
    slug = pipeline.by_path[str(pipeline.git_project)]["slug"]
    statuses = http_json(f"{pipeline.router.url}/{slug}/session/status?directory={pipeline.git_project}")
    assert result["session_id"] not in statuses, "the interrupted session is no longer busy"

