"""A router subprocess in front of test backends on a private block of ports, for the proxy tests."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .support import FakeOpenCodeProcess, RouterProcess, free_port_block, http_json, wait_for

BACKEND_MODULE = "tests.proxy_backend"
USERNAME = "tester"
BLOCK = 10  # ports: backends at block+0 .. block+9, all inside the router's scan range


@dataclass
class Stack:
    """A router scanning only ``block .. block+BLOCK-1`` and the backends started there."""

    root: Path
    block: int
    router: RouterProcess
    backends: dict[str, FakeOpenCodeProcess] = field(default_factory=dict)
    next_index: int = 0

    def start_backend(self, name: str, heartbeat: float = 1.0) -> FakeOpenCodeProcess:
        """Start a test backend for project ``name`` on the next port of the block; wait until routed."""
        index = self.next_index
        self.next_index += 1
        assert index < BLOCK, "the test port block is used up"
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        backend = FakeOpenCodeProcess(directory, port=self.block + index, heartbeat=heartbeat, module=BACKEND_MODULE)
        self.backends[name] = backend
        wait_for(
            lambda: any(b["slug"] == name and b["port"] == backend.port for b in http_json(self.router.url + "/api/backends")),
            timeout=15, what=f"router to find backend {name}",
        )
        return backend

    def connect(self, timeout: float = 10) -> http.client.HTTPConnection:
        """A keep-alive HTTP connection to the router."""
        return http.client.HTTPConnection("127.0.0.1", self.router.port, timeout=timeout)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: Any = None,
                timeout: float = 10) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request through the router on a fresh connection; returns (status, headers, body)."""
        connection = self.connect(timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def close(self) -> None:
        """Stop the router and every backend; fail if the router logged a traceback."""
        self.router.stop()
        for backend in self.backends.values():
            backend.stop()
        log = self.router.log()
        assert "Traceback" not in log and "Unhandled error" not in log, log[-5000:]


def make_stack(root: Path, *router_args: str) -> Stack:
    """A router over a fresh block of ports (nothing else in its scan range)."""
    block = free_port_block(BLOCK)
    router = RouterProcess(
        "--scan-start", str(block), "--scan-end", str(block + BLOCK - 1), "--scan-interval", "20s",
        "--stale-after", "10m", "--username", USERNAME,
        # Host names some tests send as a client elsewhere would; the security layer answers 421 to others.
        "--allowed-host", "router.example", "--allowed-host", "devbox", "--allowed-host", "x",
        # These tests count the router's connections to a backend and its memory per stream; the agent
        # watcher's own /global/event stream (tests/test_agents*.py) would be counted with them.
        "--agents=false",
        *router_args,
    )
    return Stack(root=root, block=block, router=router)


@contextmanager
def running_stack(root: Path, *router_args: str, backends: tuple[str, ...] = ("alpha",),
                  heartbeat: float = 1.0) -> Iterator[Stack]:
    """A router with these backends started and routed; everything stopped afterwards."""
    stack = make_stack(root, *router_args)
    try:
        for name in backends:
            stack.start_backend(name, heartbeat=heartbeat)
        yield stack
    finally:
        stack.close()


def open_stream(port: int, path: str, timeout: float = 5.0) -> socket.socket:
    """Send a GET for an event stream and return the socket after the response head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"stream closed before its head: {head!r}")
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower()
    return sock


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port and read until the peer closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


_TCP_STATES = {"01": "ESTABLISHED", "08": "CLOSE_WAIT", "09": "LAST_ACK"}


def server_connections(port: int) -> int:
    """Open connections the listener on ``port`` holds (established or half-closed, not TIME_WAIT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] in _TCP_STATES:
                count += 1
    return count


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


class SSEReader:
    """Reads ``data:`` events from a chunked SSE response on a raw socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = b""
        self.closed = False

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            self.closed = True
            raise EOFError
        self.raw += chunk

    def next_event(self) -> dict:
        """The next event's JSON (chunk framing is ignored: events are whole lines)."""
        while True:
            start = self.raw.find(b"data: ")
            end = self.raw.find(b"\n\n", start) if start >= 0 else -1
            if end >= 0:
                line = self.raw[start + 6 : end]
                self.raw = self.raw[end + 2 :]
                return json.loads(line)
            self._fill()
