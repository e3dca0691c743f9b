"""Command-line configuration: typed options, Go-style durations, validation."""

from __future__ import annotations

import getpass
import os
import re
from typing import Callable, Sequence

from twisted.python import usage

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_TRUE_WORDS = {"true", "yes", "1", "on"}
_FALSE_WORDS = {"false", "no", "0", "off"}


def parse_duration(text: str) -> float:
    """Parse a Go duration (``800ms``, ``5s``, ``1m30s``) or plain seconds into seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(f"{text!r} is not a duration (use e.g. 800ms, 5s, 1m30s or plain seconds)")
    return total


def parse_bool(text: str) -> bool:
    """Parse true/false/yes/no/1/0/on/off, case-insensitively."""
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def _flag_coercer(flag: str, parse: Callable[[str], object]) -> Callable[[str], object]:
    """Wrap a parser so its error names the flag (twistd shows only the message)."""

    def coerce(text: str) -> object:
        try:
            return parse(text)
        except ValueError as error:
            raise ValueError(f"--{flag}: {error}") from None

    coerce.coerceDoc = ""  # type: ignore[attr-defined]
    return coerce


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is outside 0-65535")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{value} must be at least 1")
    return value


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return value


def default_username() -> str:
    """The name of the OS user running the router."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _username(text: str) -> str:
    if not _USERNAME.match(text):
        raise ValueError(f"{text!r} is not usable in a host name (letters, digits, '-', '_', '.')")
    return text


class Options(usage.Options):
    """Options of ``twistd opencoderouter [flags] [project directories...]``."""

    synopsis = "[flags] [project directory ...]"
    longdesc = (
        "Scans a localhost port range for OpenCode servers, proxies to them by host name "
        "({slug}-{username}.local) and by path prefix (/{slug}/), advertises them over mDNS "
        "and serves a dashboard and a JSON API. Project directories given as arguments are "
        "validated and handed to the launcher."
    )

    optParameters: list[Sequence[object]] = [
        ["port", None, 8080, "Port for the router to listen on.", _flag_coercer("port", _port)],
        ["hostname", None, "0.0.0.0", "Bind address."],
        [
            "listen",
            None,
            None,
            "Twisted endpoint string to listen on (e.g. tcp:31000:interface=127.0.0.1, "
            "unix:/run/ocr.sock); replaces --port/--hostname.",
        ],
        ["username", None, None, "Username embedded in domain names [default: OS user].",
         _flag_coercer("username", _username)],
        ["scan-start", None, 30000, "Start of the port scan range (inclusive).", _flag_coercer("scan-start", _port)],
        ["scan-end", None, 31000, "End of the port scan range (inclusive).", _flag_coercer("scan-end", _port)],
        ["scan-interval", None, 5.0, "How often to scan for instances (e.g. 5s).",
         _flag_coercer("scan-interval", _positive_duration)],
        ["scan-concurrency", None, 20, "Maximum concurrent port probes per scan.",
         _flag_coercer("scan-concurrency", _positive_int)],
        ["probe-timeout", None, 0.8, "Time limit for one whole health-check probe (e.g. 800ms).",
         _flag_coercer("probe-timeout", _positive_duration)],
        ["stale-after", None, 30.0, "Remove backends not seen for this long (e.g. 30s).",
         _flag_coercer("stale-after", _positive_duration)],
        ["mdns", None, True, "Advertise projects over mDNS (true/false).", _flag_coercer("mdns", parse_bool)],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["projects"] = []
        self["mdns-interface"] = []

    def opt_mdns_interface(self, value: str) -> None:
        """Advertise over mDNS only on this interface name or address (repeatable) [default: all non-loopback]."""
        if not value.strip() or any(c.isspace() for c in value):
            raise usage.UsageError(f"--mdns-interface: {value!r} is not an interface name or address")
        self["mdns-interface"].append(value)

    def parseArgs(self, *directories: str) -> None:
        """Take the positional arguments as project directories."""
        self["projects"] = list(directories)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Parse, and turn any usage error into one line on stderr and exit status 1."""
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            message = str(error).replace("Parameter type enforcement failed: ", "")
            raise SystemExit(f"opencoderouter: {message}") from None

    def postOptions(self) -> None:
        """Check values that depend on each other, and the project directories."""
        if self["username"] is None:
            self["username"] = default_username()
        if self["scan-start"] > self["scan-end"]:
            raise usage.UsageError(
                f"--scan-start {self['scan-start']} is greater than --scan-end {self['scan-end']}"
            )
        for argument in self["projects"]:
            if argument.startswith("-"):
                raise usage.UsageError(
                    f"flag {argument} comes after a project directory; put every flag before the directories"
                )
        directories = []
        for argument in self["projects"]:
            path = os.path.abspath(os.path.expanduser(argument))
            if not os.path.exists(path):
                raise usage.UsageError(f"project directory {argument} does not exist")
            if not os.path.isdir(path):
                raise usage.UsageError(f"project directory {argument} is not a directory")
            directories.append(os.path.realpath(path))
        self["projects"] = directories
        if self["listen"] is None:
            self["listen"] = listen_endpoint(self["port"], self["hostname"])
        else:
            _check_endpoint(self["listen"])


def _escape_endpoint(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def listen_endpoint(port: int, hostname: str) -> str:
    """The endpoint description for ``--port``/``--hostname``."""
    return f"tcp:{port}:interface={_escape_endpoint(hostname)}"


def _check_endpoint(description: str) -> None:
    """Check the syntax and the endpoint type, without listening or touching inherited sockets."""
    from twisted.internet.endpoints import _parseServer

    try:
        _parseServer(description, None)
    except (ValueError, TypeError, KeyError) as error:
        raise usage.UsageError(f"--listen: {description!r} is not an endpoint ({error})") from None
