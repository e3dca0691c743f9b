"""Command-line configuration: typed options, Go-style durations, validation."""

from __future__ import annotations

import getpass
import os
import re
import shutil
from collections.abc import Callable, Sequence

from twisted.python import usage

from .exposure import check_endpoint, listen_endpoint

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


def _dnssd_domain(text: str) -> str:
    from .dnssd import parse_domain

    return parse_domain(text)


def _dnssd_server(text: str) -> tuple[str, int]:
    from .dnssd import parse_server

    return parse_server(text)


def _duration_or_never(text: str) -> float | None:
    """A positive duration, or None for ``0``/``none``/``never``."""
    if text.strip().lower() in ("0", "none", "never"):
        return None
    return _positive_duration(text)


def _permissions(text: str) -> str:
    if text not in ("reject", "once", "always"):
        raise ValueError(f"{text!r} is not reject, once or always")
    return text


class ProjectDirectoryError(ValueError):
    """A project directory argument that is not a usable directory; the message says why."""


def project_directory(argument: str) -> str:
    """The absolute, symlink-free path of a project directory, or a ProjectDirectoryError saying what is wrong.

    The one check for the router's arguments, ``POST /api/instances`` and ``oc``.
    """
    if not argument.strip() or "\x00" in argument:
        raise ProjectDirectoryError(f"{argument!r} is not a directory path")
    path = os.path.realpath(os.path.abspath(os.path.expanduser(argument)))
    if not os.path.exists(path):
        raise ProjectDirectoryError(f"project directory {argument} does not exist")
    if not os.path.isdir(path):
        raise ProjectDirectoryError(f"project directory {argument} is not a directory")
    return path


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
        ["backend-timeout", None, 30.0, "Answer 504 when a backend sends no response headers within this long.",
         _flag_coercer("backend-timeout", _positive_duration)],
        ["mdns", None, True, "Advertise projects over mDNS (true/false).", _flag_coercer("mdns", parse_bool)],
        # -- the LAN directory (see lan.py, dnssd.py) --
        ["lan-browse", None, None, "List other routers' projects and opencode --mdns servers on the LAN "
         "(true/false) [default: the value of --mdns].", _flag_coercer("lan-browse", parse_bool)],
        ["dnssd-domain", None, None, "Wide-area DNS-SD domain to browse for _opencode._tcp (e.g. example.org).",
         _flag_coercer("dnssd-domain", _dnssd_domain)],
        ["dnssd-server", None, None, "DNS server for --dnssd-domain, address[:port] [default: the system resolver].",
         _flag_coercer("dnssd-server", _dnssd_server)],
        ["dnssd-interval", None, 30.0, "How often to browse --dnssd-domain (e.g. 30s).",
         _flag_coercer("dnssd-interval", _positive_duration)],
        ["dnssd-update-key", None, None, "TSIG key file (tsig-keygen's format): register our projects in "
         "--dnssd-domain with DNS UPDATE."],
        # -- security (see guard.py, auth.py, hosts.py, owners.py, channel.py) --
        ["owners", None, "self", "Whose instances to route: self, all, or user names (comma-separated)."],
        ["auth-token-file", None, None, "File holding a token clients must send (Bearer or login cookie)."],
        ["basic-auth-file", None, None, "File of 'user:bcrypt-hash' lines for HTTP Basic authentication."],
        ["opencode-password-file", None, None, "File holding OPENCODE_SERVER_PASSWORD of your locked instances."],
        ["opencode-username", None, "opencode", "User name of locked instances (OPENCODE_SERVER_USERNAME)."],
        ["max-url-bytes", None, 8192, "Longest request URL accepted (longer: 414).",
         _flag_coercer("max-url-bytes", _positive_int)],
        ["max-header-bytes", None, 16384, "Largest request header block accepted (larger: 431).",
         _flag_coercer("max-header-bytes", _positive_int)],
        ["max-headers", None, 100, "Most request header lines accepted (more: 431).",
         _flag_coercer("max-headers", _positive_int)],
        ["max-body-bytes", None, 1048576, "Largest request body for the router's own endpoints (larger: 413).",
         _flag_coercer("max-body-bytes", _positive_int)],
        ["header-timeout", None, 20.0, "Time a client has to send a whole request head (e.g. 20s).",
         _flag_coercer("header-timeout", _positive_duration)],
        ["opencode-bin", None, "opencode", "OpenCode executable the launcher runs (a path, or a name on PATH)."],
        ["startup-timeout", None, 30.0, "A launched opencode must print its listening line within this (e.g. 30s).",
         _flag_coercer("startup-timeout", _positive_duration)],
        ["stop-timeout", None, 5.0, "Grace after SIGTERM before a launched opencode's group gets SIGKILL (e.g. 5s).",
         _flag_coercer("stop-timeout", _positive_duration)],
        # -- autodispatch (see opencoderouter/tasks/) --
        ["tasks-dir", None, None, "Run every *.md task file dropped in this folder; outcomes go to done/ or failed/."],
        ["ticktick-token-file", None, None, "File holding a TickTick Open API access token."],
        ["ticktick-project", None, None, "The TickTick project (name, id or inbox) to take tasks from [default: all]."],
        ["ticktick-api", None, "https://api.ticktick.com/open/v1", "TickTick Open API base URL."],
        ["tasks-interval", None, 300.0, "How often to poll TickTick for tasks (e.g. 5m).",
         _flag_coercer("tasks-interval", _positive_duration)],
        ["tasks-tag", None, "autocode", "The TickTick tag that marks a task for the router."],
        ["tasks-per-project", None, 1, "Most tasks running at once in one project (the others wait in order).",
         _flag_coercer("tasks-per-project", _positive_int)],
        ["tasks-max", None, 4, "Most tasks running at once in all.", _flag_coercer("tasks-max", _positive_int)],
        ["tasks-permissions", None, "reject", "Answer to agents' permission requests (reject, once, always) unless "
         "the task says 'permissions:'.", _flag_coercer("tasks-permissions", _permissions)],
        ["tasks-timeout", None, 3600.0, "Abort a task's session after this long unless the task says 'timeout:' "
         "(0: never).", _flag_coercer("tasks-timeout", _duration_or_never)],
        ["tasks-wait", None, 1800.0, "How long a task waits for its project to be running before it fails.",
         _flag_coercer("tasks-wait", _positive_duration)],
        ["state-dir", None, None, "Folder for the task journal [default: $XDG_STATE_HOME/opencoderouter]."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["projects"] = []
        self["allowed-hosts"] = []
        self["cors-origins"] = []
        self["mdns-interface"] = []

    def opt_allowed_host(self, name: str) -> None:
        """Also serve this Host name (repeatable; '*.example.org' for subdomains)."""
        text = name.strip().lower()
        if not re.match(r"^(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$|^\[?[0-9a-f:.]+\]?$", text):
            raise usage.UsageError(f"--allowed-host {name!r} is not a host name or address (e.g. devbox.example.org)")
        self["allowed-hosts"].append(text)

    def opt_cors_origin(self, origin: str) -> None:
        """Also accept state-changing requests from this origin, e.g. https://app.example (repeatable)."""
        text = origin.strip().lower().rstrip("/")
        if not re.match(r"^https?://[^/\s]+$", text):
            raise usage.UsageError(f"--cors-origin {origin!r} is not an origin like https://app.example.org")
        self["cors-origins"].append(text)

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
            try:
                directories.append(project_directory(argument))
            except ProjectDirectoryError as error:
                raise usage.UsageError(str(error)) from None
        self["projects"] = directories
        self["opencode-bin"] = _find_opencode(self["opencode-bin"], required=bool(directories))
        self._check_tasks()
        if self["listen"] is None:
            self["listen"] = listen_endpoint(self["port"], self["hostname"])
        else:
            _check_endpoint(self["listen"])
        self._load_security()
        self._check_lan()

    def _check_lan(self) -> None:
        """--lan-browse follows --mdns unless given; the --dnssd-* flags need --dnssd-domain; read the key now."""
        if self["lan-browse"] is None:
            self["lan-browse"] = self["mdns"]
        for flag in ("dnssd-server", "dnssd-update-key"):
            if self[flag] is not None and self["dnssd-domain"] is None:
                raise usage.UsageError(f"--{flag} needs --dnssd-domain (the domain to browse and register in)")
        self["dnssd-key"] = None
        if self["dnssd-update-key"] is not None:
            from .dnssd import load_tsig_key

            try:
                self["dnssd-key"] = load_tsig_key(self["dnssd-update-key"])
            except ValueError as error:
                raise usage.UsageError(str(error)) from None

    def _load_security(self) -> None:
        """Read the credential files and check --owners now, so that a mistake stops start-up."""
        from .credentials import load_basic_users, load_password, load_token
        from .owners import OwnerFilter

        try:
            self["owner-filter"] = OwnerFilter(self["owners"], default_username())
        except ValueError as error:
            raise usage.UsageError(f"--owners: {error}") from None
        try:
            self["auth-token"] = load_token(self["auth-token-file"]) if self["auth-token-file"] else None
            self["basic-users"] = load_basic_users(self["basic-auth-file"]) if self["basic-auth-file"] else {}
            self["opencode-password"] = (
                load_password(self["opencode-password-file"]) if self["opencode-password-file"] else None
            )
        except ValueError as error:
            raise usage.UsageError(str(error)) from None


    def _check_tasks(self) -> None:
        """The task folder (created if missing), the state folder and the TickTick token, now rather than later."""
        from .credentials import read_secret_file

        if self["tasks-dir"] is not None:
            folder = os.path.realpath(os.path.expanduser(self["tasks-dir"]))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as error:
                raise usage.UsageError(f"--tasks-dir: cannot use {self['tasks-dir']}: {error.strerror}") from None
            if not os.access(folder, os.W_OK):
                raise usage.UsageError(f"--tasks-dir: {self['tasks-dir']} is not writable (tasks move into it)")
            self["tasks-dir"] = folder
        if self["state-dir"] is None:
            state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
            self["state-dir"] = os.path.join(state, "opencoderouter")
        self["state-dir"] = os.path.realpath(os.path.expanduser(self["state-dir"]))
        self["ticktick-token"] = None
        if self["ticktick-token-file"] is not None:
            try:
                data = read_secret_file(self["ticktick-token-file"], "ticktick-token-file")
            except ValueError as error:
                raise usage.UsageError(str(error)) from None
            lines = [line.strip() for line in data.splitlines() if line.strip()]
            token = lines[0] if lines else b""
            if not token or any(c < 0x21 or c > 0x7E for c in token):
                raise usage.UsageError(f"--ticktick-token-file: {self['ticktick-token-file']} must hold the access "
                                       "token on its first line (printable, no spaces)")
            self["ticktick-token"] = token.decode("ascii")
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", self["ticktick-api"]):
            raise usage.UsageError(f"--ticktick-api {self['ticktick-api']!r} is not a URL like "
                                   "https://api.ticktick.com/open/v1")


def _find_opencode(name: str, required: bool) -> str | None:
    """The absolute path of the OpenCode executable; a UsageError when projects need it and it is missing."""
    found = shutil.which(os.path.expanduser(name))
    if found is None and required:
        raise usage.UsageError(
            f"--opencode-bin: {name} is not an executable file or a command on PATH; install opencode "
            "(npm install -g opencode-ai) or pass --opencode-bin /path/to/opencode"
        )
    return os.path.abspath(found) if found else None


def _check_endpoint(description: str) -> None:
    """Check the syntax and the endpoint type, without listening or touching inherited sockets."""
    try:
        check_endpoint(description)
    except ValueError as error:
        raise usage.UsageError(f"--listen: {description!r} is not an endpoint ({error})") from None
