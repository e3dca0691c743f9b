"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from .support import PORT_CLAIMS, FakeOpenCodeProcess, RouterProcess, checkout_reachable_by_other_users

_session_resources = ExitStack()


def pytest_configure(config: pytest.Config) -> None:
    """Claim ports in one folder for the whole run; under ``-n N --dist loadgroup``, schedule as tests/scheduling.py says."""
    if not hasattr(config, "workerinput"):
        # Set before the workers start: they inherit it (support.free_port_block claims ports there).
        claims = _session_resources.enter_context(tempfile.TemporaryDirectory(prefix="ocr-test-ports-"))
        os.environ[PORT_CLAIMS] = claims
        _session_resources.callback(os.environ.pop, PORT_CLAIMS, None)
    if (config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput")
            and config.getoption("dist", "no") == "loadgroup"):
        from .scheduling import SchedulingPlugin

        config.pluginmanager.register(SchedulingPlugin(), "opencoderouter-scheduling")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker (after ``-k`` and ``-m`` have deselected): order the tests and publish their units."""
    if hasattr(config, "workerinput"):
        from .scheduling import order_and_publish

        order_and_publish(items)


def pytest_sessionstart(session: pytest.Session) -> None:
    """In the main process (not in xdist workers, which come and go): let other uids reach this checkout."""
    if not hasattr(session.config, "workerinput"):
        _session_resources.enter_context(checkout_reachable_by_other_users())


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Put the checkout's folder modes back once every worker has finished."""
    if not hasattr(session.config, "workerinput"):
        _session_resources.close()


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
def other_users_reach_checkout() -> None:
    """For tests that run a server as another uid: the checkout must be reachable by it.

    The main process grants that for the whole run (pytest_sessionstart): a grant per xdist worker
    would be taken back by the first worker to finish while another still runs such a test.
    """
