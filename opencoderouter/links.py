"""The URL a person should open for a backend: its host-mode name, as reachable from where they are.

The OpenCode web UI uses root-absolute URLs and has no base-path setting, so it works only under its
own origin: a host-mode name. Path mode (``/{slug}/``) is for API and SSE clients. Which host-mode
name works depends on how the client reached the router:

- through the loopback (``localhost``, ``127.0.0.1``, ``[::1]``, any port: typically an SSH tunnel),
  ``{slug}-{user}.localhost`` — browsers resolve ``*.localhost`` to the loopback themselves;
- from the LAN with mDNS on and the backend advertised, ``{name}.local`` (its advertised name);
- from the LAN without mDNS, no name works by itself (:func:`web_url` is None): the API then offers
  the ``.localhost`` name (open it through an SSH tunnel; :func:`offered_url`) and the browser
  redirect shows a page explaining the two ways in.
The port is the one the client used, which is right through a tunnel and on the LAN alike.
"""

from __future__ import annotations

import ipaddress

from .hosts import split_host
from .registry import Backend


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, ``*.localhost`` and loopback addresses (a tunnel's local end)."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _port_suffix(port: str | None) -> str:
    return f":{port}" if port and port != "80" else ""


def web_url(backend: Backend, authority: str, mdns: bool) -> str | None:
    """The host-mode URL for ``backend`` as seen from a client that used ``authority`` (None: no name works)."""
    host, port = split_host(authority)
    suffix = _port_suffix(port)
    if is_loopback_host(host):
        return f"http://{backend.host_label}.localhost{suffix}/"
    if mdns and backend.mdns_name:
        return f"http://{backend.mdns_name}.local{suffix}/"
    return None


def tunnel_url(backend: Backend, authority: str) -> str:
    """The ``.localhost`` URL for ``backend`` (what works through an SSH tunnel to the router)."""
    _, port = split_host(authority)
    return f"http://{backend.host_label}.localhost{_port_suffix(port)}/"


def offered_url(backend: Backend, authority: str, mdns: bool, path: str = "/") -> str:
    """The URL the API offers a person for ``path`` of the web UI: :func:`web_url`'s name, else :func:`tunnel_url`'s."""
    base = web_url(backend, authority, mdns) or tunnel_url(backend, authority)
    return base[:-1] + path
