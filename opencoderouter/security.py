"""Protections in front of the router: host allow-list, origin check, authentication, limits.

Everything here sits *before* routing and forwarding, so it does not depend on how the proxy
works: :class:`GuardedSite` asks the :class:`Guard` about each request before it walks the
resource tree, and :class:`GuardedChannel` enforces size and time limits on request heads.

Hooks for other modules:

* :func:`may_change_instances` (``api.py``, launcher endpoints): loopback peer or authenticated.
* :meth:`BackendCredentials.credentials_for` (``proxy.py``): the ``Authorization`` value to add
  when forwarding to a password-protected backend, or None.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import ipaddress
import json
import os
import pwd
import re
import secrets
import socket
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource as _resource
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site

from .routing import _HOST_SUFFIXES, split_host

log = Logger()

COOKIE_NAME = b"ocr_session"
LOGIN_PATH = b"/_router/login"
HEALTH_PATH = b"/api/health"
#: Methods that do not change state; a foreign Origin on them is harmless (CORS hides the answer).
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
COOKIE_LIFETIME = 30 * 24 * 3600.0


# -- small helpers ----------------------------------------------------------------------------
_PHRASES = {421: b"Misdirected Request", 429: b"Too Many Requests"}


def _json_body(request: IRequest, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code, _PHRASES.get(code))
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    return json.dumps(body).encode("utf-8") + b"\n"


class JSONRefusal(Resource):
    """A leaf that answers every method with one JSON error (421, 403, 401, 429...)."""

    isLeaf = True

    def __init__(self, code: int, body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.headers = list(headers)

    def render(self, request: IRequest) -> bytes:
        """Send the error."""
        for name, value in self.headers:
            request.setHeader(name, value)
        return _json_body(request, self.code, self.body)


def is_loopback_address(address: Any) -> bool:
    """True for a peer on 127.0.0.0/8, ::1 (or IPv4-mapped loopback) or a UNIX socket."""
    host = getattr(address, "host", None)
    if host is None:
        # UNIX sockets (and other non-IP transports) are local by construction.
        return getattr(address, "name", None) is not None or type(address).__name__ == "UNIXAddress"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _endpoint_params(description: str) -> tuple[str, list[str], dict[str, str]]:
    """Split a Twisted endpoint string into (type, positional args, keyword args)."""
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
    kind, args, kwargs = parts[0].lower(), [], {}
    for part in parts[1:]:
        key, equals, value = part.partition("=")
        if equals:
            kwargs[key] = value
        else:
            args.append(part)
    return kind, args, kwargs


def listen_interface(description: str) -> str | None:
    """The address a ``tcp:``/``tcp6:``/``ssl:`` endpoint binds ("" = every address), else None."""
    kind, _, kwargs = _endpoint_params(description)
    if kind in ("tcp", "tcp6", "ssl"):
        return kwargs.get("interface", "")
    return None


def listens_beyond_loopback(description: str) -> bool:
    """True unless the endpoint only accepts loopback (or UNIX socket) connections."""
    kind, _, _ = _endpoint_params(description)
    if kind == "unix":
        return False
    interface = listen_interface(description)
    if interface is None:
        return True  # systemd sockets and other endpoints: we cannot tell, assume the worst
    if interface.lower() == "localhost":
        return False
    try:
        return not ipaddress.ip_address(interface.strip("[]")).is_loopback
    except ValueError:
        return True


# -- hosts (DNS rebinding) ----------------------------------------------------------------------
def machine_host_names() -> set[str]:
    """This machine's host name, its short form, and both under ``.local``/``.localhost``."""
    names = {"localhost"}
    full = socket.gethostname().lower().rstrip(".")
    if full:
        short = full.split(".")[0]
        names |= {full, short, f"{short}.local", f"{short}.localhost"}
    return names


def machine_addresses(proc_net: str = "/proc/net") -> set[str]:
    """Every address configured on this machine (from /proc; loopback always included)."""
    addresses = {"127.0.0.1", "::1"}
    try:
        with open(os.path.join(proc_net, "fib_trie"), encoding="ascii", errors="replace") as trie:
            previous = ""
            for line in trie:
                stripped = line.strip()
                if stripped.startswith("/32 host LOCAL") and previous.startswith("|--"):
                    addresses.add(previous[3:].strip())
                previous = stripped
    except OSError:
        pass
    try:
        with open(os.path.join(proc_net, "if_inet6"), encoding="ascii", errors="replace") as table:
            for line in table:
                raw = line.split()[0] if line.split() else ""
                if len(raw) == 32:
                    addresses.add(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    except (OSError, ValueError):
        pass
    return addresses


_HOST_NAME = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_])?|[0-9a-f:.]{2,45})$")


class HostPolicy:
    """Which ``Host`` values the router serves; any other is a DNS-rebinding attempt."""

    def __init__(
        self,
        backend_for_host: Callable[[str], Any],
        extra: Iterable[str] = (),
        listen_host: str | None = None,
        names: Callable[[], set[str]] = machine_host_names,
        addresses: Callable[[], set[str]] = machine_addresses,
        clock: IReactorTime | None = None,
        refresh: float = 30.0,
        own_label_suffix: str | None = None,
    ) -> None:
        self._backend_for_host = backend_for_host
        #: ``-{username}``: the router's own naming scheme; such a ``.local`` name that matches no
        #: backend (a mistyped project) gets the routing 404 listing the projects, not a 421.
        self._own_label_suffix = own_label_suffix
        self._exact: set[str] = set()
        self._suffixes: list[str] = []
        for entry in extra:
            entry = entry.strip().lower().rstrip(".")
            if entry.startswith("*."):
                self._suffixes.append(entry[1:])
            elif entry:
                self._exact.add(split_host(entry)[0])
        if listen_host and listen_host not in ("0.0.0.0", "::", ""):
            self._exact.add(listen_host.strip("[]").lower())
        self._names = names
        self._addresses = addresses
        self._clock = clock
        self._refresh = refresh
        self._machine: set[str] = set()
        self._machine_at: float | None = None

    def _machine_names(self) -> set[str]:
        # Addresses change (DHCP, VPNs): re-read them now and then, never per request.
        now = self._clock.seconds() if self._clock is not None else 0.0
        if self._machine_at is None or (self._clock is not None and now - self._machine_at > self._refresh):
            self._machine = self._names() | self._addresses()
            self._machine_at = now
        return self._machine

    def allows(self, request: IRequest) -> bool:
        """True when the request's Host is one the router serves (or there is no Host at all)."""
        header = request.getHeader(b"host")
        if header is None:
            return True  # HTTP/1.0 without Host: not a browser, so not a rebinding page
        name, _ = split_host(header.decode("latin-1"))
        return self.allows_name(name, request)

    def allows_name(self, name: str, request: IRequest | None = None) -> bool:
        """True when ``name`` (lower-case, no port) is served by the router."""
        if not _HOST_NAME.match(name):
            return False  # not a host name or address at all
        if name == "localhost" or name.endswith(".localhost"):
            # Browsers resolve *.localhost to the loopback themselves: no page can rebind it.
            return True
        if name in self._exact or any(name.endswith(suffix) for suffix in self._suffixes):
            return True
        if request is not None:
            local = getattr(request.getHost(), "host", None)
            if local is not None and name == local.lower().split("%", 1)[0]:
                return True
        if name in self._machine_names():
            return True
        if not name.endswith(".local"):
            return False
        if self._own_label_suffix and name[: -len(".local")].endswith(self._own_label_suffix):
            return True
        return self._backend_for_host(name) is not None


# -- owners -----------------------------------------------------------------------------------
class OwnerFilter:
    """``--owners``: whose discovered instances are registered and routed."""

    def __init__(self, spec: str, os_user: str) -> None:
        self.spec = spec
        self.os_user = os_user
        words = [w.strip() for w in spec.split(",") if w.strip()]
        if not words:
            raise ValueError(f"{spec!r} names no owner (use self, all, or user names separated by commas)")
        self.everyone = "all" in words
        if self.everyone and len(words) > 1:
            raise ValueError(f"{spec!r} mixes 'all' with names; use just all")
        names: set[str] = set()
        for word in words:
            if word == "all":
                continue
            if word == "self":
                names.add(os_user)
                continue
            try:
                names.add(pwd.getpwuid(int(word)).pw_name if word.isdigit() else pwd.getpwnam(word).pw_name)
            except (KeyError, ValueError):
                if word.isdigit():
                    names.add(word)  # a uid without a passwd entry is reported as its number
                else:
                    raise ValueError(f"{word!r} is not a user on this machine") from None
        self.names = frozenset(names)

    def is_self(self, owner: str | None) -> bool:
        """True for the router's own user, or an owner that could not be known."""
        return owner is None or owner == self.os_user

    def admits(self, owner: str | None) -> bool:
        """True when an instance owned by ``owner`` may be registered."""
        if self.everyone:
            return True
        return (self.os_user if owner is None else owner) in self.names


# -- credentials files --------------------------------------------------------------------------
_BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$")


def _read_secret_file(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            data = handle.read(1 << 20)
    except OSError as error:
        raise ValueError(f"--{flag}: cannot read {path}: {error.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warn("--{flag}: {path} is readable by other users; chmod 600 it", flag=flag, path=path)
    return data


def load_token(path: str) -> bytes:
    """The router token from ``--auth-token-file`` (first non-empty line; 16+ characters)."""
    data = _read_secret_file(path, "auth-token-file")
    lines = [line.strip() for line in data.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--auth-token-file: {path} is empty; put one token (16+ characters) in it")
    token = lines[0]
    if len(token) < 16 or any(c < 0x21 or c > 0x7E for c in token):
        raise ValueError(
            f"--auth-token-file: the token in {path} must be at least 16 printable characters without spaces"
        )
    return token


def load_basic_users(path: str) -> dict[str, bytes]:
    """``user:bcrypt-hash`` lines from ``--basic-auth-file`` (``#`` comments, blank lines ignored)."""
    data = _read_secret_file(path, "basic-auth-file")
    users: dict[str, bytes] = {}
    for number, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        user, colon, hashed = line.partition(b":")
        if not colon or not user or not hashed.startswith(_BCRYPT_PREFIXES) or len(hashed) != 60:
            raise ValueError(
                f"--basic-auth-file: line {number} of {path} is not 'user:bcrypt-hash' "
                "(make one with: python -c \"import bcrypt;print(bcrypt.hashpw(b'PASSWORD', bcrypt.gensalt()).decode())\")"
            )
        users[user.decode("utf-8", "replace")] = hashed
    if not users:
        raise ValueError(f"--basic-auth-file: {path} has no 'user:bcrypt-hash' line")
    return users


def load_password(path: str) -> str:
    """The backends' ``OPENCODE_SERVER_PASSWORD`` from ``--opencode-password-file`` (first line)."""
    data = _read_secret_file(path, "opencode-password-file")
    lines = [line.strip() for line in data.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--opencode-password-file: {path} is empty")
    return lines[0].decode("utf-8", "replace")


def basic_header(username: str, password: str) -> bytes:
    """``Basic base64(user:password)``."""
    return b"Basic " + base64.b64encode(f"{username}:{password}".encode("utf-8"))


# -- router authentication ----------------------------------------------------------------------
class Authenticator:
    """The router's own credentials: a token (Bearer or cookie) and/or bcrypt user lines."""

    def __init__(self, token: bytes | None = None, users: dict[str, bytes] | None = None) -> None:
        self.token = token
        self.users = users or {}
        material = b"ocr-cookie\0" + (token or b"") + b"\0" + b"\0".join(
            u.encode() + b":" + h for u, h in sorted(self.users.items())
        )
        # Derived from the credentials: stable across restarts, invalid once they change.
        self._cookie_key = hashlib.sha256(material).digest()
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[bytes, None] = {}
        #: Unknown users are checked against this hash (same cost) so they take as long as known ones.
        self._dummy_hash = b""
        if self.users:
            import bcrypt

            rounds = int(next(iter(self.users.values()))[4:6])
            self._dummy_hash = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds))

    @property
    def enabled(self) -> bool:
        """True when any credential is configured."""
        return self.token is not None or bool(self.users)

    def check_token(self, presented: bytes) -> bool:
        """Constant-time comparison with the token."""
        return self.token is not None and hmac.compare_digest(presented, self.token)

    def make_cookie(self, now: float) -> bytes:
        """A session cookie value valid for :data:`COOKIE_LIFETIME`."""
        expiry = str(int(now + COOKIE_LIFETIME)).encode()
        return expiry + b"." + hmac.new(self._cookie_key, expiry, hashlib.sha256).hexdigest().encode()

    def check_cookie(self, value: bytes, now: float) -> bool:
        """True for a cookie this router issued that has not expired."""
        expiry, dot, mac = value.partition(b".")
        if not dot or not expiry.isdigit():
            return False
        wanted = hmac.new(self._cookie_key, expiry, hashlib.sha256).hexdigest().encode()
        return hmac.compare_digest(mac, wanted) and int(expiry) > now

    def _cache_digest(self, user: str, password: bytes) -> bytes:
        return hmac.new(self._cache_key, user.encode("utf-8") + b"\0" + password, hashlib.sha256).digest()

    def basic_cached(self, user: str, password: bytes) -> bool:
        """True when this user/password pair was verified before (no bcrypt needed)."""
        return self._cache_digest(user, password) in self._verified

    def check_basic(self, user: str, password: bytes) -> bool:
        """bcrypt check (slow: call it in a thread); successes are cached."""
        import bcrypt

        hashed = self.users.get(user)
        try:
            ok = bcrypt.checkpw(password, hashed or self._dummy_hash) and hashed is not None
        except ValueError:
            ok = False
        if ok:
            if len(self._verified) > 256:
                self._verified.clear()
            self._verified[self._cache_digest(user, password)] = None
        return ok

    def cookie_flag(self) -> bool:
        """True when the login form may set a cookie (a token is configured)."""
        return self.token is not None


class FailureThrottle:
    """Per-address slow-down of wrong credentials: answers are spaced by a growing delay."""

    def __init__(
        self,
        clock: IReactorTime,
        base: float = 0.25,
        maximum: float = 8.0,
        forget_after: float = 900.0,
        max_backlog: float = 60.0,
    ) -> None:
        self._clock = clock
        self.base = base
        self.maximum = maximum
        self.forget_after = forget_after
        self.max_backlog = max_backlog
        #: address → (failures, time before which nothing from it is looked at, last failure)
        self._state: dict[str, tuple[int, float, float]] = {}

    def wait(self, address: str) -> float:
        """Seconds to hold a new attempt from ``address`` before looking at it (0: none)."""
        state = self._state.get(address)
        if state is None:
            return 0.0
        now = self._clock.seconds()
        if now - state[2] > self.forget_after:
            del self._state[address]
            return 0.0
        return max(0.0, state[1] - now)

    def failed(self, address: str) -> float:
        """Record a failure; return the delay before answering it."""
        now = self._clock.seconds()
        failures, free_at, last = self._state.get(address, (0, now, now))
        if now - last > self.forget_after:
            failures, free_at = 0, now
        failures += 1
        delay = min(self.base * 2 ** (failures - 1), self.maximum)
        free_at = max(free_at, now) + delay
        self._state[address] = (failures, free_at, now)
        if len(self._state) > 10000:
            self._forget_old(now)
        return free_at - now

    def succeeded(self, address: str) -> None:
        """Forget the address's failures."""
        self._state.pop(address, None)

    def _forget_old(self, now: float) -> None:
        for address, (_, _, last) in list(self._state.items()):
            if now - last > self.forget_after:
                del self._state[address]


def _peer_key(request: IRequest) -> str:
    peer = request.getClientAddress()
    return str(getattr(peer, "host", "local"))


class _Later(Resource):
    """Answers NOT_DONE_YET now and lets ``work`` render the request later (or never, if it went)."""

    isLeaf = True

    def __init__(self, start: Callable[[IRequest], Any]) -> None:
        super().__init__()
        self._start = start

    def render(self, request: IRequest) -> object:
        """Start the deferred work."""
        self._start(request)
        return NOT_DONE_YET


def _render_now(request: IRequest, target: IResource) -> None:
    """Render ``target`` for a request whose first render returned NOT_DONE_YET."""
    if getattr(request, "_disconnected", False) or getattr(request, "finished", False):
        return
    try:
        request.render(target)
    except Exception:
        request.processingFailed(Failure())


_LOGIN_PAGE = """<!doctype html><meta charset=utf-8><title>OpenCodeRouter: sign in</title>
<h1>OpenCodeRouter</h1><p>This router needs a token.</p>
<form method=post action="{action}"><input type=hidden name=next value="{next}">
<label>Token <input type=password name=token autocomplete=current-password autofocus></label>
<button type=submit>Sign in</button></form>
"""


def _safe_next(value: bytes | None) -> bytes:
    # Only same-site relative paths: an open redirect would help phishing.
    if not value or not value.startswith(b"/") or value.startswith(b"//") or b"\\" in value:
        return b"/"
    if any(c < 0x21 for c in value):
        return b"/"
    return value


# -- the guard ----------------------------------------------------------------------------------
@dataclass
class Guard:
    """Decides, before routing, whether a request may go on (None) or what refuses it."""

    clock: IReactorTime
    hosts: HostPolicy
    authenticator: Authenticator = field(default_factory=Authenticator)
    cors_origins: frozenset[str] = frozenset()
    throttle: FailureThrottle | None = None
    #: (Host header, path) → True when the request goes to a backend rather than the router itself.
    goes_to_backend: Callable[[bytes | None, bytes], bool] = lambda host, path: False
    thread_pool: Any = None

    def __post_init__(self) -> None:
        if self.throttle is None:
            self.throttle = FailureThrottle(self.clock)

    # -- origins --
    def origin_allowed(self, request: IRequest) -> bool:
        """True when a state-changing request's Origin (if any) is the router's own or listed."""
        origin = request.getHeader(b"origin")
        if origin is None:
            return True
        text = origin.decode("latin-1").strip().lower().rstrip("/")
        if text in self.cors_origins:
            return True
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False  # "null" (sandboxed frames, file://) and oddities are foreign
        host_header = request.getHeader(b"host")
        if host_header is None:
            return False
        origin_port = str(parts.port or (443 if parts.scheme == "https" else 80))
        _, own_port = split_host(host_header.decode("latin-1"))
        if origin_port != (own_port or "80"):
            return False
        return self.hosts.allows_name(parts.hostname.rstrip("."), request)

    def _state_changing(self, request: IRequest) -> bool:
        if request.method not in SAFE_METHODS:
            return True
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        return b"websocket" in upgrade

    # -- the decision --
    def check(self, request: IRequest) -> IResource | None:
        """None to route the request normally, else the resource that answers it instead."""
        if not self.hosts.allows(request):
            return JSONRefusal(
                421,
                {
                    "error": "misdirected_request",
                    "message": "this router does not serve that host name; "
                    "add it with --allowed-host if it is really this machine",
                },
            )
        if self._state_changing(request) and not self.origin_allowed(request):
            return JSONRefusal(
                403,
                {
                    "error": "forbidden_origin",
                    "message": "requests from another site's pages are refused; "
                    "allow an origin with --cors-origin",
                },
            )
        path = request.path
        if path == LOGIN_PATH and self.authenticator.cookie_flag():
            return _LoginForm(self)
        if not self.authenticator.enabled or self._exempt(request):
            return None
        return self._authenticate(request)

    def _exempt(self, request: IRequest) -> bool:
        if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
            return True  # CORS preflights never carry credentials
        if request.path == HEALTH_PATH and request.method in (b"GET", b"HEAD"):
            return not self.goes_to_backend(request.getHeader(b"host"), request.path)
        return False

    def _authenticate(self, request: IRequest) -> IResource | None:
        authorization = request.getHeader(b"authorization")
        cookie = (getattr(request, "received_cookies", None) or {}).get(COOKIE_NAME)
        if authorization is None and cookie is None:
            return self._unauthorised(request)
        wait = self.throttle.wait(_peer_key(request))  # type: ignore[union-attr]
        if wait > self.throttle.max_backlog:  # type: ignore[union-attr]
            return JSONRefusal(
                429, {"error": "too_many_attempts"}, [(b"retry-after", str(int(wait) + 1).encode())]
            )
        if wait > 0:
            return _Later(lambda req: self._hold(req, wait))
        outcome = self._check_credentials(request, authorization, cookie)
        if outcome is None:
            return _Later(self._check_in_thread)
        return self._conclude(request, outcome, immediate=True)

    def _hold(self, request: IRequest, wait: float) -> None:
        call = self.clock.callLater(wait, self._after_hold, request)
        request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)

    def _after_hold(self, request: IRequest) -> None:
        target = self._authenticate(request)
        if isinstance(target, _Later):
            target._start(request)
        else:
            _render_now(request, target or self._route(request))

    def _route(self, request: IRequest) -> IResource:
        site = request.site
        return _resource.getChildForRequest(site.resource, request)

    def _check_credentials(self, request: IRequest, authorization: bytes | None, cookie: bytes | None) -> bool | None:
        """True/False when known at once, None when a bcrypt check must run in a thread."""
        if cookie is not None and self.authenticator.check_cookie(cookie, self.clock.seconds()):
            self._strip_cookie(request)
            if authorization is not None and self._router_authorization(authorization) is True:
                request.requestHeaders.removeHeader(b"authorization")
            return True
        if authorization is None:
            return False
        return self._router_authorization(authorization, request)

    def _router_authorization(self, authorization: bytes, request: IRequest | None = None) -> bool | None:
        scheme, _, value = authorization.strip().partition(b" ")
        value = value.strip()
        if scheme.lower() == b"bearer":
            ok = self.authenticator.check_token(value)
        elif scheme.lower() == b"basic" and self.authenticator.users:
            user, password = _decode_basic(value)
            if user is None:
                return False
            if self.authenticator.basic_cached(user, password):
                ok = True
            elif request is None:
                return False
            else:
                return None
        else:
            return False
        if ok and request is not None:
            request.requestHeaders.removeHeader(b"authorization")
        return ok

    def _check_in_thread(self, request: IRequest) -> None:
        from twisted.internet import reactor

        user, password = _decode_basic(request.getHeader(b"authorization").strip().partition(b" ")[2].strip())
        pool = self.thread_pool or reactor.getThreadPool()  # type: ignore[attr-defined]
        checking = deferToThreadPool(self.clock, pool, self.authenticator.check_basic, user or "", password)

        def done(ok: bool) -> None:
            if ok:
                request.requestHeaders.removeHeader(b"authorization")
            target = self._conclude(request, ok, immediate=False)
            if isinstance(target, _Later):
                target._start(request)
            else:
                _render_now(request, target or self._route(request))

        def broken(failure: Failure) -> None:
            log.failure("password check failed", failure)
            done(False)

        checking.addCallbacks(done, broken)
        checking.addErrback(lambda failure: log.failure("answering after the password check failed", failure))

    def _conclude(self, request: IRequest, ok: bool, immediate: bool) -> IResource | None:
        peer = _peer_key(request)
        if ok:
            self.throttle.succeeded(peer)  # type: ignore[union-attr]
            request._ocr_authenticated = True  # type: ignore[attr-defined]
            return None
        delay = self.throttle.failed(peer)  # type: ignore[union-attr]
        log.info("wrong credentials from {peer}; answering in {delay:.2f}s", peer=peer, delay=delay)
        refusal = self._unauthorised(request)

        def answer_later(req: IRequest) -> None:
            call = self.clock.callLater(delay, _render_now, req, refusal)
            req.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)

        return _Later(answer_later)

    def _unauthorised(self, request: IRequest) -> IResource:
        challenges = []
        if self.authenticator.users:
            challenges.append((b"www-authenticate", b'Basic realm="OpenCodeRouter", charset="UTF-8"'))
        elif self.authenticator.token is not None:
            challenges.append((b"www-authenticate", b'Bearer realm="OpenCodeRouter"'))
        accept = (request.getHeader(b"accept") or b"").lower()
        if b"text/html" in accept and self.authenticator.cookie_flag():
            return _LoginPage(401, challenges, request.uri)
        return JSONRefusal(401, {"error": "unauthorized"}, challenges)

    def _strip_cookie(self, request: IRequest) -> None:
        # The router's session cookie is for the router: backends never see it.
        (getattr(request, "received_cookies", None) or {}).pop(COOKIE_NAME, None)
        kept = []
        for header in request.requestHeaders.getRawHeaders(b"cookie", []):
            parts = [p for p in header.split(b";") if p.strip().partition(b"=")[0] != COOKIE_NAME]
            if parts:
                kept.append(b";".join(parts).strip())
        if kept:
            request.requestHeaders.setRawHeaders(b"cookie", kept)
        else:
            request.requestHeaders.removeHeader(b"cookie")

    def is_authenticated(self, request: IRequest) -> bool:
        """True when this request passed the router's authentication."""
        return self.authenticator.enabled and bool(getattr(request, "_ocr_authenticated", False))


def _decode_basic(value: bytes) -> tuple[str | None, bytes]:
    try:
        decoded = base64.b64decode(value, validate=True)
    except ValueError:
        return None, b""
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None, b""
    return user.decode("utf-8", "replace"), password


class _LoginPage(Resource):
    """The sign-in form (as a 401 body for browsers, or 200 at ``/_router/login``)."""

    isLeaf = True

    def __init__(self, code: int, headers: list[tuple[bytes, bytes]], next_uri: bytes, message: str = "") -> None:
        super().__init__()
        self.code = code
        self.headers = headers
        self.next_uri = next_uri
        self.message = message

    def render(self, request: IRequest) -> bytes:
        """Send the form; every value is escaped."""
        import html

        request.setResponseCode(self.code)
        for name, value in self.headers:
            request.setHeader(name, value)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-frame-options", b"DENY")
        page = _LOGIN_PAGE.format(
            action=html.escape(LOGIN_PATH.decode()),
            next=html.escape(_safe_next(self.next_uri).decode("latin-1")),
        )
        if self.message:
            page += f"<p>{html.escape(self.message)}</p>"
        return page.encode("utf-8")


class _LoginForm(Resource):
    """``/_router/login``: GET shows the form; POST with the right token sets the session cookie."""

    isLeaf = True

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self.guard = guard

    def render_GET(self, request: IRequest) -> bytes:
        """The form."""
        next_uri = (request.args.get(b"next") or [b"/"])[0]
        return _LoginPage(200, [], next_uri).render(request)

    def render_POST(self, request: IRequest) -> object:
        """Check the token; 303 to ``next`` with a cookie, or 401 (slowed down when repeated)."""
        guard = self.guard
        peer = _peer_key(request)
        wait = guard.throttle.wait(peer)  # type: ignore[union-attr]
        if wait > guard.throttle.max_backlog:  # type: ignore[union-attr]
            return JSONRefusal(429, {"error": "too_many_attempts"}).render(request)
        if wait > 0:
            call = guard.clock.callLater(wait, _render_now, request, _LoginForm(guard))
            request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
            return NOT_DONE_YET
        # The Site does not parse form bodies (the proxy forwards them untouched): parse this one.
        form = parse_qs(request.content.read(4096) if request.content is not None else b"")
        token = (form.get(b"token") or request.args.get(b"token") or [b""])[0].strip()
        next_uri = _safe_next((form.get(b"next") or request.args.get(b"next") or [b"/"])[0])
        if guard.authenticator.check_token(token):
            guard.throttle.succeeded(peer)  # type: ignore[union-attr]
            cookie = guard.authenticator.make_cookie(guard.clock.seconds())
            request.addCookie(
                COOKIE_NAME, cookie, path=b"/", httpOnly=True, sameSite="strict", max_age=str(int(COOKIE_LIFETIME))
            )
            request.setResponseCode(303)
            request.setHeader(b"location", next_uri)
            request.setHeader(b"cache-control", b"no-store")
            return b""
        delay = guard.throttle.failed(peer)  # type: ignore[union-attr]
        page = _LoginPage(401, [], next_uri, "That token is not right.")
        call = guard.clock.callLater(delay, _render_now, request, page)
        request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
        return NOT_DONE_YET


def may_change_instances(request: IRequest) -> bool:
    """Launcher endpoints (``POST/DELETE /api/instances``): a loopback peer or an authenticated request."""
    if is_loopback_address(request.getClientAddress()):
        return True
    guard = getattr(getattr(request, "site", None), "guard", None)
    return guard is not None and guard.is_authenticated(request)


# -- backend credentials (OPENCODE_SERVER_PASSWORD) ---------------------------------------------
class BackendCredentials:
    """The password of our own password-protected OpenCode servers, and when to use it."""

    def __init__(self, username: str = "opencode", password: str | None = None, may_inject: bool = False) -> None:
        self.username = username
        self.password = password
        #: Adding our password to forwarded requests is safe only when the router itself is
        #: protected (its own auth, or loopback only); otherwise anyone on the LAN would get in.
        self.may_inject = may_inject

    def probe_header(self) -> bytes | None:
        """The Authorization value the scanner sends to our own locked servers, or None."""
        if self.password is None:
            return None
        return basic_header(self.username, self.password)

    def credentials_for(self, backend: Any) -> bytes | None:
        """The Authorization value to add when forwarding to ``backend``, or None to leave the client's."""
        if self.password is None or not self.may_inject:
            return None
        if not getattr(backend, "locked", False) or not getattr(backend, "router_credentials", False):
            return None
        return basic_header(self.username, self.password)


class _WithBackendCredentials(Resource):
    """Wraps a backend's forwarding resource; adds our password to the request first."""

    isLeaf = True

    def __init__(self, inner: IResource, authorization: bytes) -> None:
        super().__init__()
        self.inner = inner
        self.authorization = authorization

    def render(self, request: IRequest) -> Any:
        """Set Authorization, then let the proxy render."""
        request.requestHeaders.setRawHeaders(b"authorization", [self.authorization])
        return self.inner.render(request)


def with_backend_credentials(proxy_factory: Any, credentials: BackendCredentials) -> Any:
    """A proxy factory that adds :meth:`BackendCredentials.credentials_for` to forwarded requests."""

    def build(backend: Any, path: bytes, prefix: bytes, mode: str) -> IResource:
        inner = proxy_factory(backend, path, prefix, mode)
        authorization = credentials.credentials_for(backend)
        if authorization is None or not getattr(inner, "isLeaf", False):
            return inner
        return _WithBackendCredentials(inner, authorization)

    build.close = getattr(proxy_factory, "close", None)  # type: ignore[attr-defined]
    return build


# -- limits on request heads and bodies ---------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may send."""

    max_url: int = 8192
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body: int = 1 << 20
    header_timeout: float = 20.0


_REASONS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


class GuardedChannel(HTTPChannel):
    """An HTTPChannel with 414/431/413 answers and a deadline on receiving each request head.

    The deadline runs only while a request head is awaited or arriving (from the connection's
    start, or the end of the previous response); it stops once the head is complete, so long
    event streams and WebSockets are never cut by it. HTTPChannel's own ``timeOut`` is an idle
    timeout reset by every byte, which a client sending one byte every few seconds never trips.
    """

    limits = Limits()
    goes_to_backend: Callable[[bytes | None, bytes], bool] = staticmethod(lambda host, path: False)  # type: ignore[assignment]
    _head_call: Any = None
    _in_head = False
    _head_bytes = 0
    _head_lines = 0
    _refused = False
    _head_seen = False
    _upgraded = False

    def connectionMade(self) -> None:
        """Start the head deadline for the first request."""
        # Twisted checks the whole head against this; ours is stricter and answers 431 first.
        self.totalHeadersSize = self.limits.max_url + self.limits.max_header_bytes + 1024
        self.maxHeaders = self.limits.max_headers + 1
        self.MAX_LENGTH = max(self.limits.max_url + 64, self.limits.max_header_bytes)
        super().connectionMade()
        self._start_head_deadline()

    def _start_head_deadline(self) -> None:
        if self._head_call is None and self.limits.header_timeout > 0:
            self._head_seen = False
            self._head_call = self.callLater(self.limits.header_timeout, self._head_too_slow)

    def _stop_head_deadline(self) -> None:
        if self._head_call is not None:
            if self._head_call.active():
                self._head_call.cancel()
            self._head_call = None

    def _head_too_slow(self) -> None:
        self._head_call = None
        # An upgraded connection (its dataReceived replaced by a WebSocket splice) is never cut.
        if self._refused or self.transport is None or self._upgraded or "dataReceived" in self.__dict__:
            return
        peer = self.transport.getPeer()
        if self._head_seen or self._in_head:
            log.info("dropping {peer}: request head not complete after {limit:g}s", peer=str(peer),
                     limit=self.limits.header_timeout)
            self._refuse(408, "request_timeout", "the request head took too long to arrive")
        else:
            # An idle connection (nothing of a new request sent): close quietly, as keep-alive ends.
            self._refused = True
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """Note that a head is arriving; start its deadline after an idle keep-alive gap."""
        if self._refused:
            return
        if self.line_mode and not self._handlingRequest:
            self._start_head_deadline()
            if data.strip(b"\r\n"):
                self._head_seen = True
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        """Check the request line's URL length and the headers' size and count."""
        if self._refused:
            return
        if not self._in_head:
            if line:
                self._in_head = True
                self._head_bytes = 0
                self._head_lines = 0
                parts = line.split(b" ")
                if len(parts) >= 2 and len(parts[1]) > self.limits.max_url:
                    self._refuse(414, "uri_too_long", f"the URL is longer than {self.limits.max_url} bytes")
                    return
        elif line:
            self._head_bytes += len(line) + 2
            self._head_lines += 1
            if self._head_bytes > self.limits.max_header_bytes or self._head_lines > self.limits.max_headers:
                self._refuse(
                    431,
                    "request_header_fields_too_large",
                    f"send at most {self.limits.max_headers} header lines and {self.limits.max_header_bytes} bytes",
                )
                return
        else:
            self._in_head = False
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """One line longer than any limit: 414 for a request line, else 431."""
        if not self._in_head:
            self._refuse(414, "uri_too_long", f"the URL is longer than {self.limits.max_url} bytes")
        else:
            self._refuse(431, "request_header_fields_too_large",
                         f"a header line is longer than {self.limits.max_header_bytes} bytes")

    def allHeadersReceived(self) -> None:
        """The head is complete: stop the deadline; refuse an oversized body for our own endpoints."""
        self._stop_head_deadline()
        request = self.requests[-1]
        host = request.requestHeaders.getRawHeaders(b"host", [None])[0]
        path = self._path.split(b"?", 1)[0]
        if not self.goes_to_backend(host, path):
            limit = self.limits.max_body
            if self.length is not None and self.length > limit:
                self._refuse(413, "content_too_large", f"the router's own endpoints take at most {limit} bytes")
                return
            if self.length is None and self._transferDecoder is not None:
                self._limit_chunked(limit)
        super().allHeadersReceived()

    def _limit_chunked(self, limit: int) -> None:
        decoder = self._transferDecoder
        deliver = decoder.dataCallback
        received = [0]

        def counted(data: bytes) -> None:
            received[0] += len(data)
            if received[0] > limit:
                self._refuse(413, "content_too_large", f"the router's own endpoints take at most {limit} bytes")
                decoder.dataCallback = lambda data: None
                return
            deliver(data)

        decoder.dataCallback = counted

    def rawDataReceived(self, data: bytes) -> None:
        """Drop a refused request's body instead of parsing it."""
        if not self._refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        """A refused request is never handed to the resources."""
        if not self._refused:
            super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        """After a response on a kept-alive connection, wait for the next head with a deadline."""
        if getattr(request, "code", None) == 101:
            # Switched protocols (WebSocket): the connection no longer carries request heads.
            self._upgraded = True
        super().requestDone(request)
        if self._upgraded or "dataReceived" in self.__dict__:
            self.setTimeout(None)  # nor by HTTPChannel's idle timeout, which requestDone re-armed
            return
        if self.persistent and self.line_mode and not self._handlingRequest and not self._refused:
            if self.transport is not None and not self.transport.disconnecting:
                self._start_head_deadline()

    def connectionLost(self, reason: Failure) -> None:
        """Cancel the deadline."""
        self._stop_head_deadline()
        super().connectionLost(reason)

    def _refuse(self, code: int, error: str, message: str) -> None:
        """Answer with a JSON error and close, ignoring anything else the client sends."""
        self._refused = True
        self._stop_head_deadline()
        body = json.dumps({"error": error, "message": message}).encode() + b"\n"
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (code, _REASONS[code], len(body))
        )
        self.transport.write(head + body)
        self.loseConnection()


class GuardedSite(Site):
    """A Site whose requests pass the :class:`Guard` before routing and whose channels enforce :class:`Limits`."""

    protocol = GuardedChannel  # type: ignore[assignment]

    def __init__(self, resource: IResource, guard: Guard | None = None, limits: Limits = Limits(), **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.guard = guard
        self.limits = limits

    def buildProtocol(self, addr: Any) -> Any:
        """A GuardedChannel carrying this site's limits."""
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        if self.guard is not None:
            channel.goes_to_backend = self.guard.goes_to_backend
        return channel

    def getResourceFor(self, request: IRequest) -> IResource:
        """The guard's refusal, or the routed resource."""
        request.site = self
        request.sitepath = copy.copy(request.prepath)
        if self.guard is not None:
            refusal = self.guard.check(request)
            if refusal is not None:
                return refusal
        return _resource.getChildForRequest(self.resource, request)


def log_startup_warnings(listen: str, authenticator: Authenticator, backend_credentials: BackendCredentials) -> None:
    """Say clearly when the router is exposed without authentication, or will not use the backend password."""
    beyond = listens_beyond_loopback(listen)
    if beyond and not authenticator.enabled:
        log.warn(
            "SECURITY WARNING: listening on {listen}, beyond the loopback, without authentication: anyone who "
            "can reach this port can drive your OpenCode agents (which run shell commands as you). Use "
            "--auth-token-file or --basic-auth-file, or --hostname 127.0.0.1 and an SSH tunnel.",
            listen=listen,
        )
    if backend_credentials.password is not None and not backend_credentials.may_inject:
        log.warn(
            "--opencode-password-file: the password is used to find locked instances but is not added to "
            "forwarded requests, because the router listens beyond the loopback without its own authentication; "
            "clients must send the instance's password themselves."
        )


def goes_to_backend_for(router: Any) -> Callable[[bytes | None, bytes], bool]:
    """For a RouterResource: does (Host, path) reach a backend rather than the router's own pages?"""
    def goes(host: bytes | None, path: bytes) -> bool:
        if host:
            name, _ = split_host(host.decode("latin-1"))
            if name.endswith(_HOST_SUFFIXES) and name not in router.own_host_names:
                return path != LOGIN_PATH
        first = path.lstrip(b"/").split(b"/", 1)[0]
        if not first or first in router.own_routes:
            return False
        try:
            slug = unquote_to_bytes(first).decode("utf-8")
        except UnicodeDecodeError:
            return False
        return router.registry.by_slug(slug) is not None

    return goes


__all__ = [
    "Authenticator",
    "BackendCredentials",
    "FailureThrottle",
    "Guard",
    "GuardedChannel",
    "GuardedSite",
    "HostPolicy",
    "Limits",
    "OwnerFilter",
    "may_change_instances",
    "listens_beyond_loopback",
    "with_backend_credentials",
]
