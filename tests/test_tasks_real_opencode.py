"""Autodispatch end to end: ``twistd opencoderouter --tasks-dir`` with the real ``opencode serve`` and the fake model.

One router, one model and the instances are shared by the module (start-up is the slow part). The
instances are started by this module (one isolated HOME each), so they outlive the router when it
is killed; the router's scan range covers only this module's ports. Everything is on 127.0.0.1.
"""

from __future__ import annotations

import base64
import http.client
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .real_opencode import MODE_ERROR, REPLY_TEXT, FakeModelServer, OpenCodeInstance, opencode_binary
from .support import RouterProcess, free_port_block, http_json, wait_for

pytestmark = [
    pytest.mark.real_opencode,
    pytest.mark.skipif(opencode_binary() is None, reason="real opencode not installed (run tests/setup/install-opencode.sh)"),
]


class Autodispatch:
    """The model, one project's instance, a router with a task folder; a second project is started later."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.model = FakeModelServer(slow_duration=30.0, slow_interval=1.0).start()
        self.archer = base / "work" / "Archer"
        self.later = base / "work" / "Later"
        for directory in (self.archer, self.later):
            directory.mkdir(parents=True)
        self.tasks = base / "tasks"
        self.first = free_port_block(3)
        self.instances = [OpenCodeInstance(self.archer, base / "home-archer", self.model.url, port=self.first)]
        self.router_args = ["--scan-start", str(self.first), "--scan-end", str(self.first + 2), "--scan-interval", "1s",
                            "--probe-timeout", "3s", "--stale-after", "60s", "--tasks-dir", str(self.tasks),
                            "--state-dir", str(base / "state")]
        self.router: RouterProcess | None = None
        self.start_router()

    def start_router(self, port: int | None = None) -> None:
        self.router = RouterProcess(*self.router_args, port=port)
        wait_for(lambda: any(b["project_path"] == str(self.archer) for b in http_json(self.router.url + "/api/backends")),
                 timeout=60, interval=0.3, what="the router to list Archer")

    def start_later(self) -> None:
        self.instances.append(OpenCodeInstance(self.later, self.base / "home-later", self.model.url, port=self.first + 1))

    def drop(self, name: str, text: str) -> None:
        (self.tasks / name).write_text(text)

    def outcome(self, name: str, timeout: float = 90) -> tuple[str, str]:
        """(``done`` or ``failed``, the file's text) once the task's outcome file exists."""

        def ended() -> tuple[str, str] | None:
            for kind in ("done", "failed"):
                path = self.tasks / kind / name
                if path.exists():
                    return kind, path.read_text()
            return None

        return wait_for(ended, timeout=timeout, interval=0.3, what=f"the outcome of {name}\n{self.router.log()[-3000:]}")

    def close(self) -> None:
        if self.router is not None:
            self.router.stop()
        for instance in self.instances:
            instance.stop()
        self.model.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Autodispatch]:
    made = Autodispatch(tmp_path_factory.mktemp("autodispatch"))
    try:
        yield made
    finally:
        made.close()


def _prompts_with(model: FakeModelServer, marker: str) -> int:
    """How many model calls (not title calls) carried ``marker`` in their last user message."""
    count = 0
    for request in model.requests:
        users = [m for m in request["body"].get("messages") or [] if m.get("role") == "user"]
        content = users[-1].get("content") if users else ""
        text = content if isinstance(content, str) else json.dumps(content)
        if request["mode"] != "title" and marker in text:
            count += 1
    return count


def test_a_task_file_ends_in_done_with_the_models_answer_and_a_working_link(world):
    world.drop("hello.md", "---\nproject: Archer\n---\nSay hello. [marker-hello]\n")
    kind, text = world.outcome("hello.md")
    assert kind == "done", text
    assert text.startswith("---\nproject: Archer\n---\nSay hello. [marker-hello]\n")
    assert f"### Answer\n\n{REPLY_TEXT}" in text and "- session: ses_" in text
    link = next(line[len("- open: "):] for line in text.splitlines() if line.startswith("- open: "))
    parts = urlsplit(link)
    encoded = parts.path.split("/")[1]
    assert base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode() == str(world.archer)
    assert parts.port == world.router.port and parts.hostname.endswith(".localhost")
    # The link opens the web UI through the router's host mode.
    connection = http.client.HTTPConnection("127.0.0.1", world.router.port, timeout=10)
    try:
        connection.request("GET", parts.path, headers={"Host": parts.netloc, "Accept": "text/html"})
        response = connection.getresponse()
        assert response.status == 200 and b"<title>OpenCode</title>" in response.read()
    finally:
        connection.close()
    tasks = http_json(world.router.url + "/api/tasks")
    [task] = [t for t in tasks if t["ref"] == "hello.md"]
    assert task["state"] == "done" and task["text"] == REPLY_TEXT and task["reported"]
    assert _prompts_with(world.model, "[marker-hello]") == 1
    assert list((world.tasks / "running").iterdir()) == []


def test_a_failing_model_ends_in_failed_with_the_error(world):
    world.drop("fail.md", f"---\nproject: Archer\n---\n{MODE_ERROR} please fail\n")
    kind, text = world.outcome("fail.md")
    assert kind == "failed", text
    assert "### Error\n\nAPIError: fake model refuses this request" in text


def test_a_task_for_a_project_that_starts_later_is_picked_up_once_it_appears(world):
    world.drop("later.md", "---\nproject: Later\n---\nHello when you are up. [marker-later]\n")
    wait_for(lambda: any(t["ref"] == "later.md" and t["waiting"] == "project 'Later' is not running yet"
                         for t in http_json(world.router.url + "/api/tasks")), timeout=30, what="the task to wait")
    world.start_later()
    kind, text = world.outcome("later.md")
    assert kind == "done" and REPLY_TEXT in text, text
    assert _prompts_with(world.model, "[marker-later]") == 1


def test_kill_9_of_the_router_mid_task_then_restart_sends_the_prompt_once(world):
    marker = "[marker-crash]"
    world.drop("crash.md", f"---\nproject: Archer\n---\n[fake-model:slow=8] {marker} take a while\n")
    wait_for(lambda: _prompts_with(world.model, marker) >= 1, timeout=60, what="the slow model call to start")
    port = world.router.port
    assert world.router.stop(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(1)
    world.start_router(port=port)
    kind, text = world.outcome("crash.md")
    assert kind == "done", text
    assert "slow done." in text
    assert _prompts_with(world.model, marker) == 1, "the prompt reached the model once"
    [task] = [t for t in http_json(world.router.url + "/api/tasks") if t["ref"] == "crash.md"]
    assert task["attempts"] == 2 and task["state"] == "done"
    assert "following their sessions again" in world.router.log()
