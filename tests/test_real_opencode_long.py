"""A real OpenCode turn whose model streams for 130 s, through the router (marker ``long``).

It has its own small set-up (one instance, one router) so that it runs on a worker of its own while
test_real_opencode.py's pipeline serves the other real-server tests beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .real_opencode import MODE_SLOW, FakeModelServer, OpenCodeInstance, git_init, opencode_binary, run_dispatch
from .support import RouterProcess, free_port_block, http_json, wait_for

pytestmark = [
    pytest.mark.real_opencode,
    pytest.mark.skipif(opencode_binary() is None, reason="real opencode not installed (run tests/setup/install-opencode.sh)"),
]

#: The fake model's slow answer: longer than the 120 s after which the original router cut every stream.
SLOW_STREAM = 130.0


class SlowTurn:
    """The fake model, a git project served by one real opencode, and a router that scans only its port."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.model = FakeModelServer(slow_duration=SLOW_STREAM, slow_interval=5.0).start()
        self.project = base / "work" / "webapp"
        self.project.mkdir(parents=True)
        git_init(self.project)
        self.instance: OpenCodeInstance | None = None
        self.router: RouterProcess | None = None
        try:
            port = free_port_block(1)
            self.instance = OpenCodeInstance(self.project, base / "home", self.model.url, port=port)
            # A generous probe timeout: a busy opencode on a loaded machine answers its health probe late.
            self.router = router = RouterProcess("--scan-start", str(port), "--scan-end", str(port),
                                                 "--scan-interval", "1s", "--probe-timeout", "3s", "--stale-after", "60s")
            wait_for(lambda: [b["project_path"] for b in http_json(router.url + "/api/backends")] == [str(self.project)],
                     timeout=60, interval=0.3, what="the router to list the project")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.router is not None:
            self.router.stop()
        if self.instance is not None:
            self.instance.stop()
        self.model.stop()


@pytest.fixture
def slow_turn(tmp_path: Path) -> Iterator[SlowTurn]:
    made = SlowTurn(tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.mark.slow
@pytest.mark.long
def test_dispatch_sees_session_idle_after_a_stream_longer_than_120s(slow_turn):
    assert slow_turn.model.slow_duration > 120, "the scenario: a model stream longer than 120 s"
    done = run_dispatch(slow_turn.base, slow_turn.router.url,
                        f"---\nproject: {slow_turn.project}\n---\n{MODE_SLOW} take your time\n", timeout=240)
    assert done.returncode == 0, done.stderr
    # The fake model writes "slow done." only once its 130 s stream has run to the end.
    assert "slow done." in done.stdout
    assert "event stream lost" not in done.stderr
