"""The dashboard at ``/``: a page listing every backend with its links."""

from __future__ import annotations

import html
from urllib.parse import quote

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from .api import request_authority
from .registry import Naming, Registry


class Dashboard(Resource):
    """A table of the discovered backends (every value from a backend is escaped)."""

    isLeaf = True

    def __init__(self, registry: Registry, naming: Naming) -> None:
        super().__init__()
        self.registry = registry
        self.naming = naming

    def render_GET(self, request: IRequest) -> bytes:
        """Render the page."""
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"not found\n"
        authority = request_authority(request)
        _, colon, tail = authority.rpartition(":")
        port = tail if colon and tail.isdigit() else "80"
        rows = []
        for backend in self.registry.backends():
            label = self.naming.host_label(backend)
            path_url = f"/{quote(backend.slug)}/"
            rows.append(
                "<tr>"
                f"<td>{'up' if backend.up else 'down'}</td>"
                f"<td>{html.escape(backend.project_name)}<br><small>{html.escape(backend.project_path)}</small></td>"
                f"<td>{html.escape(backend.slug)}</td><td>{html.escape(backend.version)}</td>"
                f"<td>{backend.port}</td>"
                f'<td><a href="{html.escape(path_url)}">{html.escape(path_url)}</a><br>'
                f'<a href="http://{html.escape(label)}.localhost:{port}/">{html.escape(label)}.localhost:{port}</a></td>'
                "</tr>"
            )
        body = "".join(rows) or '<tr><td colspan="6">No OpenCode servers found yet.</td></tr>'
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return (
            "<!doctype html><meta charset=utf-8><title>OpenCodeRouter</title>"
            "<h1>OpenCodeRouter</h1><table><tr><th>Status</th><th>Project</th><th>Slug</th>"
            f"<th>Version</th><th>Port</th><th>Links</th></tr>{body}</table>"
        ).encode("utf-8")
