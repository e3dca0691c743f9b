"""The test helpers that other tests lean on: ports handed out once per run, a router that is ours."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from . import support
from .support import PORT_CLAIMS, RouterProcess, free_port, free_port_block


def test_a_port_another_process_was_handed_is_never_handed_out_again(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PORT_CLAIMS, str(tmp_path))
    monkeypatch.setattr(support, "_claimed_here", set())
    first = free_port()
    assert (tmp_path / str(first)).exists()
    # Another worker starting from the same offset (a fresh process: nothing claimed in memory).
    monkeypatch.setattr(support, "_claimed_here", set())
    second = free_port()
    assert second != first and second < support.ephemeral_port_start()
    block = free_port_block(3)
    assert {first, second}.isdisjoint(range(block, block + 3))


def test_a_port_something_listens_on_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PORT_CLAIMS, str(tmp_path))
    monkeypatch.setattr(support, "_claimed_here", set())
    probe = free_port()
    monkeypatch.setattr(support, "_claimed_here", set())
    (tmp_path / str(probe)).unlink()  # as if never handed out, but now taken by a listener
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", probe))
        listener.listen()
        assert free_port() != probe


def test_a_router_whose_port_another_server_answers_on_is_not_taken_for_ours(tmp_path: Path) -> None:
    from .support import FakeOpenCodeProcess

    imposter = FakeOpenCodeProcess(tmp_path / "project")
    try:
        # The router cannot bind the port; the fake OpenCode there answers /api/health with its web UI.
        with pytest.raises(RuntimeError, match="router exited|something else answers"):
            RouterProcess("--scan-start", "1", "--scan-end", "1", port=imposter.port)
    finally:
        imposter.stop()


def test_an_opencode_style_health_answer_is_not_taken_for_our_router() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class OpenCodeHealth(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's name
            body = b'{"healthy":true}'  # what the real OpenCode 1.18.33 answers on /api/health
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), OpenCodeHealth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(RuntimeError, match="router exited|something else answers"):
            RouterProcess("--scan-start", "1", "--scan-end", "1", port=server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
