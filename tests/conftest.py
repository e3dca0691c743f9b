"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import FakeOpenCodeProcess, RouterProcess, checkout_reachable_by_other_users


@pytest.fixture
def fake_opencode_factory(tmp_path: Path) -> Iterator:
    """Start fake OpenCode servers (subprocesses) in directories; all stopped afterwards."""
    started: list[FakeOpenCodeProcess] = []

    def start(directory: str | Path, **kwargs: object) -> FakeOpenCodeProcess:
        Path(directory).mkdir(parents=True, exist_ok=True)
        server = FakeOpenCodeProcess(directory, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def router_factory() -> Iterator:
    """Start routers (twistd subprocesses); all stopped afterwards."""
    started: list[RouterProcess] = []

    def start(*args: str, **kwargs: object) -> RouterProcess:
        router = RouterProcess(*args, **kwargs)  # type: ignore[arg-type]
        started.append(router)
        return router

    yield start
    for router in started:
        router.stop()


@pytest.fixture(scope="session")
def other_users_reach_checkout() -> Iterator[None]:
    """For tests that run a server as another uid: the checkout must be reachable by it."""
    with checkout_reachable_by_other_users():
        yield
