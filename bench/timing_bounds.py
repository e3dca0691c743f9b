"""How long the router takes for what the tests check without a clock: teardowns, bounds, the throttle.

    PYTHONPATH=. python bench/timing_bounds.py

The tests show that each of these happens (and, on a Clock, that the bounds are kept); this prints
how long each takes on this machine against a real router subprocess, next to the bound the router
was given, so that a slow machine shows up as a figure instead of a flaky test:

- 504 from a backend that never answers, under ``--backend-timeout 1s``;
- 200 client SSE streams closed: until the backend holds no connection from the router;
- a backend killed mid-stream: until the client's stream ends;
- a backend closing a WebSocket: until the router closes the client's TCP connection;
- ``--header-timeout 2s``: a client sending its head one byte every 0.1 s, and one sending nothing;
- wrong tokens: the answer times of four failures in a row (the throttle's 0.25/0.5/1/2 s).

SSE event latency is bench/run.py's (SSE fan-out). Not measured here, since they need network
namespaces, Chromium or the real OpenCode: how soon a new backend is advertised over mDNS and how
fast the API answers meanwhile, how soon the dashboard shows a row change, how soon dispatch gives
up on a killed backend.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.proxy_stack import SSEReader, make_stack, open_stream, server_connections  # noqa: E402
from tests.support import RouterProcess, http_get, wait_for  # noqa: E402

TOKEN = "bench-token-for-timing-bounds-0123456789"


def _timed(action: Callable[[], object]) -> float:
    began = time.monotonic()
    action()
    return time.monotonic() - began


def _report(name: str, seconds: float, bound: str) -> None:
    print(f"{name:58s} {seconds * 1000:9.1f} ms   ({bound})")


def stream_teardowns(root: Path) -> None:
    """504, stream close, backend kill, WebSocket close and the head bound, on one router."""
    stack = make_stack(root, "--backend-timeout", "1s", "--header-timeout", "2s")
    try:
        backend = stack.start_backend("alpha")
        _report("504 from a silent backend", _timed(lambda: stack.request("GET", "/alpha/hang")), "--backend-timeout 1s")

        sockets = [open_stream(stack.router.port, "/alpha/event") for _ in range(200)]
        for sock in sockets:
            SSEReader(sock).next_event()
        began = time.monotonic()
        for sock in sockets:
            sock.close()
        wait_for(lambda: server_connections(backend.port) == 0, interval=0.005, what="backend connections to close")
        _report("200 streams closed -> backend connections gone", time.monotonic() - began, "no bound")

        victim = stack.start_backend("victim", heartbeat=0.2)
        sock = open_stream(stack.router.port, "/victim/event", timeout=10)
        reader = SSEReader(sock)
        reader.next_event()
        victim.process.send_signal(signal.SIGKILL)
        began = time.monotonic()
        try:
            while True:
                reader.next_event()
        except EOFError:
            pass
        _report("backend killed mid-stream -> client stream ends", time.monotonic() - began, "no bound")
        sock.close()
        victim.stop()

        _websocket_close(stack.router.port)
        _head_bounds(stack.router.port)
    finally:
        stack.close()


def _websocket_close(port: int) -> None:
    import websocket

    request = urllib.request.Request(f"http://127.0.0.1:{port}/alpha/pty", data=b"{}",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        pty = json.loads(answer.read())["id"]
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/alpha/pty/{pty}/connect", timeout=5)
    ws.send("__close__")
    began = time.monotonic()
    ws.recv_data_frame(control_frame=True)
    sock = ws.sock
    assert sock is not None, "the client's socket went away before the backend closed it"
    sock.settimeout(10)
    sock.recv(1)
    _report("backend closes a WebSocket -> client TCP closed", time.monotonic() - began, "no bound")
    sock.close()


def _head_bounds(port: int) -> None:
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n")
    slow.settimeout(0.1)
    began = time.monotonic()
    while time.monotonic() - began < 10:
        try:
            slow.sendall(b"X")
            slow.recv(4096)  # the 408 answer, or b"" once closed
            break
        except TimeoutError:
            continue
        except OSError:
            break
    _report("head sent one byte every 0.1 s -> dropped", time.monotonic() - began, "--header-timeout 2s")
    slow.close()
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    _report("connection sending nothing -> closed", _timed(lambda: idle.recv(100)), "--header-timeout 2s")
    idle.close()


def throttle(root: Path) -> None:
    """Four wrong tokens in a row."""
    token = root / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    router = RouterProcess("--auth-token-file", str(token), "--scan-start", "1", "--scan-end", "1")
    try:
        wrong = {"Authorization": "Bearer wrong-token-123456"}
        for attempt, schedule in enumerate((0.25, 0.5, 1, 2), start=1):
            took = _timed(lambda: http_get(router.url + "/api/backends", headers=wrong, timeout=10))
            _report(f"wrong token, attempt {attempt}", took, f"throttle {schedule:g} s")
        waiting = threading.Thread(target=http_get, args=(router.url + "/api/backends",), kwargs={"headers": wrong})
        waiting.start()
        time.sleep(0.2)
        _report("/api/health while a fifth wrong token waits", _timed(lambda: http_get(router.url + "/api/health")),
                "not throttled")
        waiting.join(15)
    finally:
        router.stop()


def main() -> None:
    """Print every figure."""
    with tempfile.TemporaryDirectory(prefix="ocr-timing-bounds-") as folder:
        stream_teardowns(Path(folder))
        throttle(Path(folder))


if __name__ == "__main__":
    main()
