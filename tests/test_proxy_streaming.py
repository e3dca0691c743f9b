"""Streaming through the router: SSE without buffering, disconnects both ways, 50 MB bodies (the 150 s stream: _long)."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import time
from pathlib import Path

import pytest

from .proxy_backend import pattern
from .proxy_stack import SSEReader, open_stream, rss_kib, running_stack, server_connections
from .support import http_get, wait_for

MB = 1024 * 1024


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A router with backend ``alpha`` (1 s heartbeats)."""
    with running_stack(tmp_path_factory.mktemp("streaming")) as stack:
        yield stack


def test_sse_event_reaches_client_before_the_backend_writes_the_next(stack):
    # Lock-step: the backend writes event n+1 only when asked (straight, not through the router), and we
    # ask only once event n has come through the router. A proxy that held events back for more data
    # (or for the end of the stream) would never deliver one, and the read would time out.
    # How fast an event comes through is measured by bench/run.py (SSE fan-out, event latency).
    backend = stack.backends["alpha"]
    sock = open_stream(stack.router.port, "/alpha/lockstep/one")
    try:
        reader = SSEReader(sock)
        assert reader.next_event() == {"n": 0}
        for n in range(1, 21):
            status, _, body = http_get(f"http://127.0.0.1:{backend.port}/lockstep/one/next")
            assert status == 200 and json.loads(body) == {"n": n}
            assert reader.next_event() == {"n": n}
    finally:
        sock.close()


def test_closing_200_streams_leaves_backend_without_router_connections(stack):
    backend = stack.backends["alpha"]
    sockets = []
    try:
        for _ in range(200):
            sock = open_stream(stack.router.port, "/alpha/event")
            sockets.append(sock)
        for sock in sockets:
            assert SSEReader(sock).next_event()["type"] == "server.connected"
        assert server_connections(backend.port) >= 200
    finally:
        for sock in sockets:
            sock.close()
    # How soon they close is measured by bench/timing_bounds.py.
    wait_for(lambda: server_connections(backend.port) == 0, interval=0.02,
             what="backend connections from the router to close")


def test_backend_killed_mid_stream_ends_client_stream_visibly(stack):
    victim = stack.start_backend("victim", heartbeat=0.2)
    sock = open_stream(stack.router.port, "/victim/event")
    try:
        reader = SSEReader(sock)
        reader.next_event()
        reader.next_event()
        victim.process.send_signal(signal.SIGKILL)
        # The router ends the client's stream (EOF); a stream left open would time out instead (the
        # timeout only guards against a hang: how soon the end comes is bench/timing_bounds.py's).
        sock.settimeout(10)
        with pytest.raises(EOFError):
            while True:
                reader.next_event()
        # The chunked body never got its terminating zero-length chunk: the truncation is visible.
        assert not reader.raw.endswith(b"0\r\n\r\n")
    finally:
        sock.close()
        victim.stop()


def test_backend_killed_mid_download_closes_client_short_of_content_length(stack):
    victim = stack.start_backend("victim2")
    connection = stack.connect(timeout=5)
    try:
        connection.request("GET", f"/victim2/download?size={200 * MB}")
        response = connection.getresponse()
        assert int(response.headers["Content-Length"]) == 200 * MB
        response.read(MB)
        victim.process.send_signal(signal.SIGKILL)
        received = MB
        while True:
            chunk = response.read1(MB) if hasattr(response, "read1") else response.read(MB)
            if not chunk:
                break
            received += len(chunk)
        assert received < 200 * MB
    except Exception as error:  # http.client reports the short body as IncompleteRead
        assert "IncompleteRead" in type(error).__name__ or isinstance(error, ConnectionError), error
    finally:
        connection.close()
        victim.stop()


def reset_peak(pid: int) -> None:
    """Reset the kernel's peak-RSS counter so VmHWM measures from now."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS of the router (no write access to /proc/PID/clear_refs)")


class Upload:
    """A 50 MB request body generated on the fly (never held in the test's memory either)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sha256 = hashlib.sha256()

    def __iter__(self):
        sent = 0
        while sent < self.size:
            piece = pattern(sent, min(65536, self.size - sent))
            self.sha256.update(piece)
            sent += len(piece)
            yield piece


def test_50mb_upload_streams_without_growing_router_rss(stack):
    pid = stack.router.process.pid
    before, _ = rss_kib(pid)
    reset_peak(pid)
    body = Upload(50 * MB)
    status, _, answer = stack.request(
        "POST", "/alpha/upload", body=iter(body), headers={"Content-Length": str(body.size)}, timeout=60
    )
    assert status == 200
    result = json.loads(answer)
    assert result == {"size": body.size, "sha256": body.sha256.hexdigest()}
    _, peak = rss_kib(pid)
    growth_mib = (peak - before) / 1024
    print(f"router RSS before {before / 1024:.1f} MiB, peak during 50 MB upload +{growth_mib:.1f} MiB")
    assert growth_mib < 10


def test_50mb_chunked_upload_streams_without_growing_router_rss(stack):
    pid = stack.router.process.pid
    before, _ = rss_kib(pid)
    reset_peak(pid)
    body = Upload(50 * MB)
    status, _, answer = stack.request(
        "PUT", "/alpha/upload", body=iter(body), headers={}, timeout=60  # no length: http.client sends chunks
    )
    assert status == 200
    assert json.loads(answer) == {"size": body.size, "sha256": body.sha256.hexdigest()}
    _, peak = rss_kib(pid)
    assert (peak - before) / 1024 < 10


@pytest.mark.parametrize("chunked", [False, True])
def test_50mb_download_streams_without_growing_router_rss(stack, chunked):
    pid = stack.router.process.pid
    before, _ = rss_kib(pid)
    reset_peak(pid)
    size = 50 * MB
    connection = stack.connect(timeout=30)
    try:
        connection.request("GET", f"/alpha/download?size={size}" + ("&chunked=1" if chunked else ""))
        response = connection.getresponse()
        assert response.status == 200
        if not chunked:
            assert int(response.headers["Content-Length"]) == size
        digest, received = hashlib.sha256(), 0
        while True:
            piece = response.read(MB)
            if not piece:
                break
            digest.update(piece)
            received += len(piece)
    finally:
        connection.close()
    expected = hashlib.sha256()
    offset = 0
    while offset < size:
        piece = pattern(0, 65536)[: min(65536, size - offset)]
        expected.update(piece)
        offset += len(piece)
    assert received == size
    assert digest.hexdigest() == expected.hexdigest()
    _, peak = rss_kib(pid)
    growth_mib = (peak - before) / 1024
    print(f"router RSS before {before / 1024:.1f} MiB, peak during 50 MB download +{growth_mib:.1f} MiB")
    assert growth_mib < 10


def test_slow_client_pauses_backend_instead_of_buffering(stack):
    pid = stack.router.process.pid
    before, _ = rss_kib(pid)
    reset_peak(pid)
    size = 50 * MB
    sock = socket.create_connection(("127.0.0.1", stack.router.port), timeout=30)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(f"GET /alpha/download?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(2)  # the client reads nothing: only socket buffers and the router's may fill
        _, peak = rss_kib(pid)
        assert (peak - before) / 1024 < 10
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % size in head
        received = len(rest)
        while received < size:
            chunk = sock.recv(MB)
            if not chunk:
                break
            received += len(chunk)
        assert received == size
    finally:
        sock.close()
