"""The bridge from the reactor to python-zeroconf's loop thread, with a real asyncio loop in a thread.

No sockets: a stand-in for the ``Zeroconf`` object carries only what the bridge touches (its
``loop`` and ``close``), so these run anywhere without sending a packet.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from opencoderouter.zeroconf_loop import ZeroconfLoop


class LoopOnly:
    """Just the parts of ``Zeroconf`` that the bridge uses: its event loop thread and ``close``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.closed_in: str | None = None

    def close(self) -> None:
        self.closed_in = threading.current_thread().name
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def zeroconf() -> Iterator[LoopOnly]:
    stand_in = LoopOnly()
    yield stand_in
    if stand_in.thread.is_alive():
        stand_in.loop.call_soon_threadsafe(stand_in.loop.stop)
        stand_in.thread.join(5)


@pytest_twisted.ensureDeferred
async def test_a_coroutine_result_arrives_on_the_reactor_thread(zeroconf: LoopOnly) -> None:
    bridge = ZeroconfLoop(reactor, zeroconf)
    ran_in: list[str] = []

    async def work() -> int:
        ran_in.append(threading.current_thread().name)
        return 42

    seen_on: list[str] = []
    answer = bridge.run(work)
    answer.addCallback(lambda value: seen_on.append(threading.current_thread().name) or value)
    assert await answer == 42
    assert ran_in and ran_in[0] != threading.main_thread().name
    assert seen_on == [threading.main_thread().name]


@pytest_twisted.ensureDeferred
async def test_an_exception_on_the_loop_becomes_a_failure(zeroconf: LoopOnly) -> None:
    bridge = ZeroconfLoop(reactor, zeroconf)

    async def broken() -> None:
        raise ValueError("no such record")

    with pytest.raises(ValueError, match="no such record"):
        await bridge.run(broken)


@pytest_twisted.ensureDeferred
async def test_cancelling_from_the_reactor_cancels_the_coroutine(zeroconf: LoopOnly) -> None:
    bridge = ZeroconfLoop(reactor, zeroconf)
    started = threading.Event()
    cancelled = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    waiting = bridge.run(forever)
    assert started.wait(5)
    waiting.cancel()
    with pytest.raises(defer.CancelledError):
        await waiting
    assert cancelled.wait(5)


@pytest_twisted.ensureDeferred
async def test_close_waits_in_a_pool_thread(zeroconf: LoopOnly) -> None:
    bridge = ZeroconfLoop(reactor, zeroconf)
    await bridge.close()
    assert zeroconf.closed_in is not None and zeroconf.closed_in != threading.main_thread().name
    assert not zeroconf.thread.is_alive()


@pytest_twisted.ensureDeferred
async def test_update_interfaces_passes_a_list(zeroconf: LoopOnly) -> None:
    asked: list[Any] = []

    async def update(interfaces: Any) -> None:
        asked.append(interfaces)

    zeroconf.async_update_interfaces = update  # type: ignore[attr-defined]
    await ZeroconfLoop(reactor, zeroconf).update_interfaces(("10.0.0.1", 3))
    assert asked == [["10.0.0.1", 3]]
