"""What the router relies on from twisted.web beyond its interfaces, checked against the installed Twisted.

The channel and the forwarder read and set attributes that twisted.web's HTTPChannel and Request
carry without declaring them in IRequest (no private names: these are plain public attributes).
pyproject.toml states the Twisted range this was checked against; a Twisted that renames one of
these fails here first, loudly, instead of in the middle of a proxied request.
"""

from __future__ import annotations

from twisted.web.http import HTTPChannel
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

CHANNEL_ATTRIBUTES = ("length", "persistent", "requests", "line_mode", "totalHeadersSize", "maxHeaders", "MAX_LENGTH")
REQUEST_ATTRIBUTES = ("startedWriting", "chunked", "code", "code_message", "sentLength", "producer", "finished",
                      "clientproto", "defaultContentType", "channel")


def test_http_channel_has_the_attributes_the_router_channel_uses():
    channel = HTTPChannel()
    missing = [name for name in CHANNEL_ATTRIBUTES if not hasattr(channel, name)]
    assert not missing, f"twisted.web.http.HTTPChannel lost {missing}"
    for hook in ("allHeadersReceived", "allContentReceived", "requestDone", "rawDataReceived", "lineReceived",
                 "lineLengthExceeded", "checkPersistence"):
        assert callable(getattr(HTTPChannel, hook, None)), hook


def test_request_has_the_attributes_the_forwarder_uses():
    request = Request(DummyChannel())
    missing = [name for name in REQUEST_ATTRIBUTES if not hasattr(request, name)]
    assert not missing, f"twisted.web.server.Request lost {missing}"
    assert callable(getattr(Request, "handleContentChunk", None))


def test_a_request_with_head_written_by_us_writes_body_bytes_unchanged():
    """The forwarder writes the response head itself, then relies on write() passing bytes on as they are."""
    channel = DummyChannel()
    request = Request(channel)
    request.clientproto = b"HTTP/1.1"
    request.startedWriting = 1
    request.write(b"5\r\nhello\r\n")
    assert channel.transport.written.getvalue() == b"5\r\nhello\r\n"
    assert request.sentLength == 10


def test_a_tcp_connection_keeps_the_write_queue_attributes_write_now_reads():
    """opencoderouter.write_now decides "nothing is queued" from these FileDescriptor attributes."""
    from twisted.internet.abstract import FileDescriptor
    from twisted.internet.tcp import Connection

    descriptor = FileDescriptor()
    assert descriptor.dataBuffer == b""
    assert descriptor._tempDataLen == 0
    assert descriptor._writeDisconnected is False
    assert not descriptor.disconnecting
    assert Connection.TLS is False
    assert callable(Connection.writeSomeData)
    descriptor.connected = 1
    descriptor.startWriting = lambda: None  # type: ignore[method-assign]
    descriptor.write(b"queued")
    assert descriptor._tempDataLen == 6, "FileDescriptor.write no longer counts queued bytes in _tempDataLen"
