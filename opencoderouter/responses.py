"""JSON answers: the one helper the router uses for its own responses and errors.

Every error the router itself sends is a JSON object with an ``error`` key (a short snake_case
word) and usually a ``message`` sentence; API answers are JSON too. They are never cached and
never sniffed as another type.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

JSON_TYPE = b"application/json"

#: Reason phrases Twisted does not know (it would send "Unknown Status").
PHRASES = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    421: b"Misdirected Request",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
}


def json_bytes(body: Any) -> bytes:
    """``body`` as one line of JSON, newline-terminated (what ``curl`` users expect)."""
    return json.dumps(body).encode("utf-8") + b"\n"


def json_response(request: IRequest, body: Any, code: int = 200) -> bytes:
    """Set the status and JSON headers on ``request`` and return the body to send."""
    request.setResponseCode(code, PHRASES.get(code))
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    return json_bytes(body)


def rfc3339(timestamp: float) -> str:
    """A UTC timestamp such as ``2026-02-28T18:10:00Z`` (how JSON answers write times)."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def error_body(error: str, message: str | None = None, **fields: Any) -> dict[str, Any]:
    """``{"error": error, ...fields, "message": message}`` (message last, left out when None)."""
    body: dict[str, Any] = {"error": error, **fields}
    if message is not None:
        body["message"] = message
    return body


class JSONAnswer(Resource):
    """A leaf that answers every method with one JSON body (errors such as 421, 403, 401, 429)."""

    isLeaf = True

    def __init__(self, code: int, body: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.headers = list(headers)

    def render(self, request: IRequest) -> bytes:
        """Send the answer."""
        for name, value in self.headers:
            request.setHeader(name, value)
        return json_response(request, self.body, self.code)
