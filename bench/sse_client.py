"""Hold N ``/event`` streams open and time stamped events (a separate process from the router).

Talks to the orchestrator over stdin/stdout, one JSON object a line:
- prints ``{"ready": ..., "connected": N, "failed": F}`` once every stream got its first event;
- on stdin ``{"emit": K, "gap": S, "emit_url": URL}``: POSTs ``URL`` K times, S seconds apart, and
  prints ``{"latencies_us": [...], "expected": K*N}`` (backend write -> client read, monotonic clock);
- on stdin ``{"quit": true}`` (or EOF): closes every stream and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from functools import partial
from typing import cast
from urllib.parse import urlsplit

_STAMP = re.compile(rb'"type": "bench\.stamp", "properties": \{"t": (\d+)\}')


class EventStream(asyncio.Protocol):
    """One HTTP/1.1 GET of an event stream; de-chunks the body and records stamped events."""

    def __init__(self, request: bytes, latencies: list[float], connected: asyncio.Future) -> None:
        self.request = request
        self.latencies = latencies
        self.connected = connected
        self.raw = b""
        self.headers_done = False
        self.chunked = False
        self.body = b""  # de-chunked bytes not yet parsed into events
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # create_connection makes a stream transport
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()  # first, before any parsing cost
        self.raw += data
        if not self.headers_done:
            head, sep, rest = self.raw.partition(b"\r\n\r\n")
            if not sep:
                return
            status = head.split(b"\r\n", 1)[0]
            if b" 200" not in status:
                self._fail(f"answered {status.decode(errors='replace')}")
                return
            self.headers_done = True
            self.chunked = b"transfer-encoding: chunked" in head.lower()
            self.raw = rest
        if self.chunked:
            self._dechunk()
        else:
            self.body += self.raw
            self.raw = b""
        while True:
            event, sep, rest = self.body.partition(b"\n\n")
            if not sep:
                break
            self.body = rest
            if not self.connected.done():
                self.connected.set_result(True)
            match = _STAMP.search(event)
            if match:
                self.latencies.append((now - int(match.group(1))) / 1000.0)

    def _dechunk(self) -> None:
        while True:
            line, sep, rest = self.raw.partition(b"\r\n")
            if not sep:
                return
            size = int(line.split(b";")[0] or b"0", 16)
            if len(rest) < size + 2:
                return
            self.body += rest[:size]
            self.raw = rest[size + 2:]

    def _fail(self, why: str) -> None:
        if not self.connected.done():
            self.connected.set_exception(RuntimeError(why))
        if self.transport:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connected.done():
            self.connected.set_exception(RuntimeError(f"closed before the first event ({exc})"))


async def post(url: str) -> None:
    """One POST with an empty body; the answer is read and ignored."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: 0\r\n"
                 "Connection: close\r\n\r\n".encode())
    await writer.drain()
    await reader.read()
    writer.close()


async def main(url: str, count: int, host_header: str | None, batch: int, timeout: float) -> int:
    """Open the streams, then obey stdin."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = (f"GET {target} HTTP/1.1\r\nHost: {host_header or parts.netloc}\r\n"
               "Accept: text/event-stream\r\n\r\n").encode()
    latencies: list[float] = []
    transports, failed = [], 0
    deadline = time.monotonic() + timeout
    for start in range(0, count, batch):  # batches: the listen backlog is small
        futures = []
        for _ in range(min(batch, count - start)):
            connected = loop.create_future()
            futures.append(connected)
            try:
                transport, _ = await loop.create_connection(
                    partial(EventStream, request, latencies, connected), host, port)
                transports.append(transport)
            except OSError:
                failed += 1
                connected.cancel()
        left = max(0.1, deadline - time.monotonic())
        done, pending = await asyncio.wait([f for f in futures if not f.cancelled()], timeout=left)
        failed += len(pending) + sum(1 for f in done if f.exception() is not None)
    print(json.dumps({"ready": True, "connected": count - failed, "failed": failed}), flush=True)

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line)
        if command.get("quit"):
            break
        latencies.clear()
        for _ in range(int(command["emit"])):
            await post(command["emit_url"])
            await asyncio.sleep(float(command["gap"]))
        expected = int(command["emit"]) * (count - failed)
        wait_until = time.monotonic() + 10  # bounded wait for stragglers
        while len(latencies) < expected and time.monotonic() < wait_until:
            await asyncio.sleep(0.05)
        print(json.dumps({"latencies_us": latencies, "expected": expected}), flush=True)
    for transport in transports:
        transport.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--host-header")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.url, args.count, args.host_header, args.batch, args.timeout)))
