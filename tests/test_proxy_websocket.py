"""WebSockets through both routing modes with a real client (websocket-client)."""

from __future__ import annotations

import json

import pytest
import websocket

from .proxy_stack import USERNAME, running_stack, server_connections
from .support import http_get, wait_for


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A router with backend ``alpha``."""
    with running_stack(tmp_path_factory.mktemp("websocket"), "--backend-timeout", "2s") as stack:
        yield stack


def new_pty(stack) -> str:
    status, _, body = stack.request("POST", "/alpha/pty", body=b"{}", headers={"Content-Type": "application/json"})
    assert status == 200
    return json.loads(body)["id"]


def pty_count(stack) -> int:
    return json.loads(http_get(f"http://127.0.0.1:{stack.backends['alpha'].port}/__stats")[2])["ptys"]


def connect(stack, mode: str, pty: str) -> websocket.WebSocket:
    """Open the terminal WebSocket through the router by path or by host name."""
    if mode == "path":
        return websocket.create_connection(f"ws://127.0.0.1:{stack.router.port}/alpha/pty/{pty}/connect", timeout=5)
    return websocket.create_connection(
        f"ws://127.0.0.1:{stack.router.port}/pty/{pty}/connect", timeout=5,
        host=f"alpha-{USERNAME}.localhost:{stack.router.port}",
    )


@pytest.mark.parametrize("mode", ["path", "host"])
def test_websocket_echo_through_router(stack, mode):
    ws = connect(stack, mode, new_pty(stack))
    try:
        assert ws.getstatus() == 101
        ws.send("ls -la\r")
        assert ws.recv() == "ls -la\r"
        big = bytes(range(256)) * 1000
        ws.send_binary(big)
        assert ws.recv() == big
        for index in range(50):
            ws.send(f"line {index}")
        assert [ws.recv() for _ in range(50)] == [f"line {index}" for index in range(50)]
        ws.ping(b"are you there")
    finally:
        ws.close()


@pytest.mark.parametrize("mode", ["path", "host"])
def test_client_close_closes_backend_side(stack, mode):
    pty = new_pty(stack)
    # The POST above may leave an idle pooled connection; the WebSocket's own must go away.
    before = server_connections(stack.backends["alpha"].port)
    ws = connect(stack, mode, pty)
    ws.send("x")
    assert ws.recv() == "x"
    assert pty_count(stack) == 1
    ws.close()  # close handshake, then TCP close
    # The waits guard against a hang only; how soon each side closes is bench/timing_bounds.py's.
    wait_for(lambda: pty_count(stack) == 0, what="backend WebSocket to close")
    wait_for(lambda: server_connections(stack.backends["alpha"].port) <= before, what="backend connection to close")


def test_client_dropping_tcp_closes_backend_side(stack):
    ws = connect(stack, "path", new_pty(stack))
    ws.send("x")
    assert ws.recv() == "x"
    ws.sock.close()  # no close frame: just the TCP connection going away
    wait_for(lambda: pty_count(stack) == 0, what="backend WebSocket to close")


@pytest.mark.parametrize("mode", ["path", "host"])
def test_backend_close_closes_client(stack, mode):
    ws = connect(stack, mode, new_pty(stack))
    ws.send("__close__")  # the fake terminal sends a close frame and hangs up
    frame = ws.recv_data_frame(control_frame=True)[1]
    assert frame.opcode == websocket.ABNF.OPCODE_CLOSE
    # The router closes the client's TCP connection as well: EOF, where a connection left open would
    # time out (a hang guard; how soon it closes is bench/timing_bounds.py's).
    ws.sock.settimeout(10)
    assert ws.sock.recv(1) == b""
    ws.sock.close()


def test_non_101_answer_is_relayed_as_a_normal_response(stack):
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        websocket.create_connection(f"ws://127.0.0.1:{stack.router.port}/alpha/pty/pty_unknown/connect", timeout=5)
    assert caught.value.status_code == 404
    assert b"PTY not found" in caught.value.resp_body
    # The router is fine afterwards and the backend holds no leftover connection.
    assert stack.request("GET", "/alpha/global/health")[0] == 200


def test_websocket_to_unknown_slug_gets_404(stack):
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        websocket.create_connection(f"ws://127.0.0.1:{stack.router.port}/nobody/pty/x/connect", timeout=5)
    assert caught.value.status_code == 404
