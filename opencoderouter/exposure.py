"""Where the router listens and who can reach it: the endpoint string, and the warnings when it is exposed.

``--listen`` takes a Twisted endpoint string (``tcp:31000:interface=127.0.0.1``, ``unix:/run/ocr.sock``,
``systemd:domain=INET:index=0``); ``--port``/``--hostname`` make one. :func:`parse_endpoint` is the one
parser of those strings in the package; :func:`check_endpoint` validates one without listening.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from twisted.logger import Logger

log = Logger()

_SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")


@dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint string: its type, positional arguments and keyword arguments."""

    kind: str
    args: tuple[str, ...] = ()
    kwargs: dict[str, str] = field(default_factory=dict)

    @property
    def interface(self) -> str | None:
        """The address a ``tcp:``/``tcp6:``/``ssl:`` endpoint binds (``""``: every address), else None."""
        if self.kind in ("tcp", "tcp6", "ssl"):
            return self.kwargs.get("interface", "")
        return None

    @property
    def beyond_loopback(self) -> bool:
        """True unless the endpoint only accepts loopback (or UNIX socket) connections."""
        if self.kind == "unix":
            return False
        interface = self.interface
        if interface is None:
            return True  # systemd sockets and other endpoints: we cannot tell, assume the worst
        if interface.lower() == "localhost":
            return False
        try:
            return not ipaddress.ip_address(interface.strip("[]")).is_loopback
        except ValueError:
            return True


def parse_endpoint(description: str) -> Endpoint:
    """Split an endpoint string as Twisted does: ``:`` separates arguments, ``\\`` escapes, ``k=v`` is a keyword."""
    parts: list[str] = []
    current, escaped = "", False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in parts[1:]:
        key, equals, value = part.partition("=")
        if equals:
            kwargs[key] = value
        else:
            args.append(part)
    return Endpoint(parts[0].lower(), tuple(args), kwargs)


def check_endpoint(description: str) -> None:
    """Raise ValueError (a sentence) unless ``description`` is an endpoint the router can listen on.

    Nothing is bound: Twisted builds the endpoint object on a memory reactor. A ``systemd:`` endpoint
    is checked by its arguments only, since its socket exists only when systemd starts the router.
    """
    endpoint = parse_endpoint(description)
    if endpoint.kind == "systemd":
        domain = endpoint.kwargs.get("domain")
        if domain not in _SYSTEMD_DOMAINS:
            raise ValueError(f"systemd endpoints need domain={'|'.join(_SYSTEMD_DOMAINS)}")
        if "index" in endpoint.kwargs and not endpoint.kwargs["index"].isdigit():
            raise ValueError("index must be a number")
        if "index" not in endpoint.kwargs and "name" not in endpoint.kwargs:
            raise ValueError("systemd endpoints need index=N or name=NAME")
        return
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        serverFromString(MemoryReactor(), description)
    except (ValueError, TypeError, KeyError, IndexError, OSError) as error:
        raise ValueError(str(error) or type(error).__name__) from None


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def listen_endpoint(port: int, hostname: str) -> str:
    """The endpoint string for ``--port``/``--hostname``."""
    return f"tcp:{port}:interface={_escape(hostname)}"


def log_startup_warnings(listen: str, authentication_on: bool, password_configured: bool,
                         password_forwarded: bool) -> None:
    """Say clearly when the router is exposed without authentication, or will not use the backend password."""
    if parse_endpoint(listen).beyond_loopback and not authentication_on:
        log.warn(
            "SECURITY WARNING: listening on {listen}, beyond the loopback, without authentication: anyone who "
            "can reach this port can drive your OpenCode agents (which run shell commands as you). Use "
            "--auth-token-file or --basic-auth-file, or --hostname 127.0.0.1 and an SSH tunnel.",
            listen=listen,
        )
    if password_configured and not password_forwarded:
        log.warn(
            "--opencode-password-file: the password is used to find locked instances but is not added to "
            "forwarded requests, because the router listens beyond the loopback without its own authentication; "
            "clients must send the instance's password themselves."
        )
