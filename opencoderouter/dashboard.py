"""The dashboard: the page at ``/`` and its assets under ``/_router/``, served from package files.

The page holds no backend data: its script fills the table from ``GET /api/events`` with DOM
text nodes, so a hostile project name can never become markup. ``_router`` can never be a
project's slug (slugs have no ``_``), so the assets never shadow a project.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

_CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
}

# The page runs only our own script and style, so injected markup could not run even if it got in.
_CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class _Asset:
    """One package file held in memory, with its validator."""

    def __init__(self, name: str, body: bytes) -> None:
        self.body = body
        suffix = name[name.rfind(".") :] if "." in name else ""
        self.content_type = _CONTENT_TYPES.get(suffix, b"application/octet-stream")
        self.etag = b'"' + hashlib.sha256(body).hexdigest()[:16].encode("ascii") + b'"'


def load_assets() -> dict[str, _Asset]:
    """Every file in ``opencoderouter/static`` (read once: they never change while running)."""
    folder = resources.files("opencoderouter") / "static"
    return {entry.name: _Asset(entry.name, entry.read_bytes()) for entry in folder.iterdir() if entry.is_file()}


def _serve(request: IRequest, asset: _Asset, cache: bytes) -> bytes:
    request.setHeader(b"content-type", asset.content_type)
    request.setHeader(b"etag", asset.etag)
    request.setHeader(b"cache-control", cache)
    request.setHeader(b"x-content-type-options", b"nosniff")
    if asset.content_type.startswith(b"text/html"):
        request.setHeader(b"content-security-policy", _CSP)
        request.setHeader(b"referrer-policy", b"no-referrer")
    if request.setETag(asset.etag) is not None:  # CACHED: 304, no body
        return b""
    return asset.body


def _not_found(request: IRequest) -> bytes:
    request.setResponseCode(404)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return b"Not found: no such dashboard file.\n"


class Dashboard(Resource):
    """``GET /``: the dashboard page (``index.html``)."""

    isLeaf = True

    def __init__(self, assets: dict[str, _Asset] | None = None) -> None:
        super().__init__()
        self.assets = assets if assets is not None else load_assets()

    def render_GET(self, request: IRequest) -> bytes:
        """The page; any deeper path is a 404 (the root resource sends only ``/`` here)."""
        if request.postpath not in ([], [b""]):
            return _not_found(request)
        # Revalidate each time so that a router upgrade shows its new page at once.
        return _serve(request, self.assets["index.html"], b"no-cache")


class DashboardAssets(Resource):
    """``GET /_router/{file}``: the page's script, style and icon."""

    isLeaf = True

    def __init__(self, assets: dict[str, _Asset] | None = None) -> None:
        super().__init__()
        self.assets = assets if assets is not None else load_assets()

    def render_GET(self, request: IRequest) -> bytes:
        """One file by exact name; no directory listing, no subfolders."""
        if len(request.postpath) != 1:
            return _not_found(request)
        name = request.postpath[0].decode("utf-8", "replace")
        asset = self.assets.get(name)
        if asset is None or name == "index.html":
            return _not_found(request)
        return _serve(request, asset, b"no-cache")
