"""The router's own authentication: a token (Bearer or sign-in cookie) and/or bcrypt user lines.

Credential files are read by :mod:`.credentials`. Credentials are checked through ``twisted.cred``:
a :class:`~twisted.cred.portal.Portal` with one checker per kind (session cookie, Bearer token, HTTP
Basic against bcrypt hashes); Basic values are decoded by twisted.web's ``BasicCredentialFactory``.
What twisted.cred does not do is ours: a per-address slow-down of wrong credentials
(:class:`FailureThrottle`), the sign-in form that sets the cookie, and keeping the router's
credentials away from backends (they are removed from a request once accepted). A bcrypt check runs
in a thread; everything else is decided at once.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import secrets
import time
from collections.abc import Callable
from typing import Any

from twisted.cred import credentials as cred_credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.guard import BasicCredentialFactory
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import Attribute, Interface, implementer

from .backoff import doubling_backoff
from .channel import RouterRequest, server_request
from .responses import JSONAnswer, error_body
from .routing import LOGIN_PATH

log = Logger()

COOKIE_NAME = b"ocr_session"
COOKIE_LIFETIME = 30 * 24 * 3600.0
REALM = b"OpenCodeRouter"


# -- credentials and checkers ------------------------------------------------------------------------
class IBearerToken(cred_credentials.ICredentials):
    """``Authorization: Bearer TOKEN``."""

    token = Attribute("the presented token (bytes)")


class ISessionCookie(cred_credentials.ICredentials):
    """The router's sign-in cookie."""

    value = Attribute("the cookie's value (bytes)")


@implementer(IBearerToken)
class BearerToken:
    """A presented Bearer token."""

    def __init__(self, token: bytes) -> None:
        self.token = token


@implementer(ISessionCookie)
class SessionCookie:
    """A presented sign-in cookie."""

    def __init__(self, value: bytes) -> None:
        self.value = value


class _IRouterUser(Interface):
    """The avatar of an authenticated client: nothing but its name."""


@implementer(IRealm)
class _Realm:
    """Every accepted credential is just "an authenticated client"."""

    def requestAvatar(
        self, avatarId: Any, mind: object, *interfaces: Any  # noqa: N803 - IRealm's name
    ) -> tuple[Any, object, Callable[[], None]]:
        """The avatar id itself (the router only needs to know the check passed)."""
        return _IRouterUser, avatarId, lambda: None


class Authenticator:
    """The router's credentials (a token and/or bcrypt user lines) and the Portal that checks them."""

    def __init__(self, token: bytes | None = None, users: dict[str, bytes] | None = None,
                 clock: IReactorTime | None = None,
                 in_thread: Callable[[Callable[[], bool]], Deferred[bool]] = deferToThread) -> None:
        self.token = token
        self.users = users or {}
        self._clock = clock
        #: Runs a bcrypt check off the reactor thread.
        self.in_thread = in_thread
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
        self.basic = BasicCredentialFactory(REALM)
        self.portal = Portal(_Realm(), [_CookieChecker(self), _TokenChecker(self), _BcryptChecker(self)])

    @property
    def enabled(self) -> bool:
        """True when any credential is configured."""
        return self.token is not None or bool(self.users)

    def cookie_flag(self) -> bool:
        """True when the sign-in form may set a cookie (a token is configured)."""
        return self.token is not None

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

    def _cache_digest(self, user: bytes, password: bytes) -> bytes:
        return hmac.new(self._cache_key, user + b"\0" + password, hashlib.sha256).digest()

    def basic_cached(self, user: bytes, password: bytes) -> bool:
        """True when this user/password pair was verified before (no bcrypt needed)."""
        return self._cache_digest(user, password) in self._verified

    def check_basic(self, user: bytes, password: bytes) -> bool:
        """bcrypt check (slow: the checker runs it in a thread); successes are cached."""
        import bcrypt

        hashed = self.users.get(user.decode("utf-8", "replace"))
        try:
            ok = bcrypt.checkpw(password, hashed or self._dummy_hash) and hashed is not None
        except ValueError:
            ok = False
        if ok:
            if len(self._verified) > 256:
                self._verified.clear()
            self._verified[self._cache_digest(user, password)] = None
        return ok

    def now(self) -> float:
        """The clock's time (for cookie expiry)."""
        if self._clock is None:
            return time.time()
        return self._clock.seconds()

    def authorization_credentials(self, authorization: bytes) -> cred_credentials.ICredentials | None:
        """The credentials an ``Authorization`` value presents to the router, or None (another scheme)."""
        scheme, _, value = authorization.strip().partition(b" ")
        value = value.strip()
        if scheme.lower() == b"bearer":
            return BearerToken(value)
        if scheme.lower() == b"basic" and self.users:
            try:
                decoded: cred_credentials.ICredentials = self.basic.decode(value, None)
                return decoded
            except LoginFailed:
                return None
        return None

    def accepts_at_once(self, presented: object) -> bool:
        """True when ``presented`` is a router credential known good without a bcrypt check."""
        if isinstance(presented, BearerToken):
            return self.check_token(presented.token)
        if isinstance(presented, SessionCookie):
            return self.check_cookie(presented.value, self.now())
        if isinstance(presented, cred_credentials.UsernamePassword):
            return self.basic_cached(presented.username, presented.password)
        return False


@implementer(ICredentialsChecker)
class _CookieChecker:
    credentialInterfaces = (ISessionCookie,)

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def requestAvatarId(self, credentials: SessionCookie) -> Deferred[bytes | tuple[()]]:
        """The cookie is this router's and has not expired."""
        if self.authenticator.check_cookie(credentials.value, self.authenticator.now()):
            return defer.succeed(b"cookie")
        return defer.fail(UnauthorizedLogin())


@implementer(ICredentialsChecker)
class _TokenChecker:
    credentialInterfaces = (IBearerToken,)

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def requestAvatarId(self, credentials: BearerToken) -> Deferred[bytes | tuple[()]]:
        """Constant-time comparison with the configured token."""
        if self.authenticator.check_token(credentials.token):
            return defer.succeed(b"token")
        return defer.fail(UnauthorizedLogin())


@implementer(ICredentialsChecker)
class _BcryptChecker:
    credentialInterfaces = (cred_credentials.IUsernamePassword,)

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def requestAvatarId(self, credentials: cred_credentials.UsernamePassword) -> Deferred[bytes | tuple[()]]:
        """A pair verified before passes at once; any other is checked with bcrypt in a thread."""
        user, password = credentials.username, credentials.password
        if self.authenticator.basic_cached(user, password):
            return defer.succeed(user)

        def verdict(ok: bool) -> bytes | tuple[()]:
            if not ok:
                raise UnauthorizedLogin()
            return user

        checking = self.authenticator.in_thread(lambda: self.authenticator.check_basic(user, password))
        return checking.addCallback(verdict)


# -- throttling wrong credentials -----------------------------------------------------------------
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
        #: The delay after the n-th failure in a row (n from 0): ``base`` doubling up to ``maximum``.
        self._delay = doubling_backoff(base, maximum)
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
        delay = self._delay(failures - 1)
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


def peer_key(request: IRequest) -> str:
    """The address a request came from, as the throttle counts it."""
    peer = request.getClientAddress()
    return str(getattr(peer, "host", "local"))


# -- answering later -------------------------------------------------------------------------------
class Later(Resource):
    """Answers NOT_DONE_YET now and lets ``start`` render the request later (or never, if it went)."""

    isLeaf = True

    def __init__(self, start: Callable[[IRequest], object]) -> None:
        super().__init__()
        self.start = start

    def render(self, request: IRequest) -> object:
        """Start the deferred work."""
        self.start(request)
        return NOT_DONE_YET


def render_later(request: Request, clock: IReactorTime, delay: float, target: Callable[[], IResource]) -> None:
    """Render ``target()`` for ``request`` after ``delay`` seconds, unless the client left first."""
    call = clock.callLater(delay, render_now, request, target)
    request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)


def render_now(request: Request, target: Callable[[], IResource]) -> None:
    """Render ``target()`` for a request whose first render returned NOT_DONE_YET (if it is still open)."""
    if request.finished or request.channel is None:
        return  # finished already, or the client went away
    try:
        request.render(target())
    except Exception:
        request.processingFailed(Failure())


# -- the authentication step -----------------------------------------------------------------------------
class Authentication:
    """Checks the router's credentials on a request: go on (None), or the resource that answers instead."""

    def __init__(self, clock: IReactorTime, authenticator: Authenticator,
                 throttle: FailureThrottle | None = None) -> None:
        self.clock = clock
        self.authenticator = authenticator
        self.throttle = throttle or FailureThrottle(clock)

    def check(self, request: IRequest, proceed: Callable[[], IResource]) -> IResource | None:
        """None when the request may go on now; else its answer (``proceed()`` routes it once accepted later)."""
        authorization = request.getHeader(b"authorization")
        cookie = (getattr(request, "received_cookies", None) or {}).get(COOKIE_NAME)
        if authorization is None and cookie is None:
            return self.unauthorised(request)
        wait = self.throttle.wait(peer_key(request))
        if wait > self.throttle.max_backlog:
            return JSONAnswer(429, error_body("too_many_attempts"), [(b"retry-after", str(int(wait) + 1).encode())])
        if wait > 0:
            def hold(req: IRequest) -> None:
                render_later(server_request(req), self.clock, wait, lambda: self.check(req, proceed) or proceed())

            return Later(hold)
        verdict = self._verify(request, authorization, cookie)
        outcome: list[object] = []
        verdict.addBoth(outcome.append)
        if outcome:
            return self._conclude(request, outcome[0] is True, proceed)

        def later(req: IRequest) -> None:
            def decided(ok: object) -> None:
                answer = self._conclude(req, ok is True, proceed)
                if isinstance(answer, Later):
                    answer.start(req)
                else:
                    render_now(server_request(req), lambda: answer or proceed())

            verdict.addBoth(decided)

        return Later(later)

    def _verify(self, request: IRequest, authorization: bytes | None, cookie: bytes | None) -> Deferred[bool]:
        """True when the request carries a router credential (removed from it once accepted)."""
        authenticator = self.authenticator
        presented = authenticator.authorization_credentials(authorization) if authorization is not None else None
        if cookie is not None and authenticator.accepts_at_once(SessionCookie(cookie)):
            _strip_cookie(request)
            if authenticator.accepts_at_once(presented):
                request.requestHeaders.removeHeader(b"authorization")
            return defer.succeed(True)
        if presented is None:
            return defer.succeed(False)

        def accepted(_: object) -> bool:
            request.requestHeaders.removeHeader(b"authorization")
            return True

        def refused(failure: Failure) -> bool:
            if not failure.check(UnauthorizedLogin, LoginFailed):
                log.failure("password check failed", failure)
            return False

        return self.authenticator.portal.login(presented, None, _IRouterUser).addCallbacks(accepted, refused)

    def _conclude(self, request: IRequest, ok: bool, proceed: Callable[[], IResource]) -> IResource | None:
        peer = peer_key(request)
        if ok:
            self.throttle.succeeded(peer)
            if isinstance(request, RouterRequest):
                request.authenticated = True
            return None
        delay = self.throttle.failed(peer)
        log.info("wrong credentials from {peer}; answering in {delay:.2f}s", peer=peer, delay=delay)
        refusal = self.unauthorised(request)
        return Later(lambda req: render_later(server_request(req), self.clock, delay, lambda: refusal))

    def unauthorised(self, request: IRequest) -> IResource:
        """401 with the challenge: the sign-in form for browsers (with a token), JSON otherwise."""
        challenges = []
        if self.authenticator.users:
            challenges.append((b"www-authenticate", b'Basic realm="' + REALM + b'", charset="UTF-8"'))
        elif self.authenticator.token is not None:
            challenges.append((b"www-authenticate", b'Bearer realm="' + REALM + b'"'))
        accept = (request.getHeader(b"accept") or b"").lower()
        if b"text/html" in accept and self.authenticator.cookie_flag():
            return LoginPage(401, challenges, request.uri)
        return JSONAnswer(401, error_body("unauthorized"), challenges)


def _strip_cookie(request: IRequest) -> None:
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


def is_authenticated(request: IRequest) -> bool:
    """True when this request passed the router's authentication."""
    return isinstance(request, RouterRequest) and request.authenticated


# -- the sign-in form --------------------------------------------------------------------------------
_LOGIN_PAGE = """<!doctype html><meta charset=utf-8><title>OpenCodeRouter: sign in</title>
<h1>OpenCodeRouter</h1><p>This router needs a token.</p>
<form method=post action="{action}"><input type=hidden name=next value="{next}">
<label>Token <input type=password name=token autocomplete=current-password autofocus></label>
<button type=submit>Sign in</button></form>
"""


def safe_next(value: bytes | None) -> bytes:
    """Where to go after signing in: a same-site relative path only (an open redirect would help phishing)."""
    if not value or not value.startswith(b"/") or value.startswith(b"//") or b"\\" in value:
        return b"/"
    if any(c < 0x21 for c in value):
        return b"/"
    return value


class LoginPage(Resource):
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
        request.setResponseCode(self.code)
        for name, value in self.headers:
            request.setHeader(name, value)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-frame-options", b"DENY")
        page = _LOGIN_PAGE.format(
            action=html.escape(LOGIN_PATH.decode()),
            next=html.escape(safe_next(self.next_uri).decode("latin-1")),
        )
        if self.message:
            page += f"<p>{html.escape(self.message)}</p>"
        return page.encode("utf-8")


class LoginForm(Resource):
    """``/_router/login``: GET shows the form; POST with the right token sets the session cookie."""

    isLeaf = True

    def __init__(self, authentication: Authentication) -> None:
        super().__init__()
        self.authentication = authentication

    def render_GET(self, request: IRequest) -> bytes:
        """The form."""
        next_uri = (request.args.get(b"next") or [b"/"])[0]
        return LoginPage(200, [], next_uri).render(request)

    def render_POST(self, request: IRequest) -> object:
        """Check the token; 303 to ``next`` with a cookie, or 401 (slowed down when repeated)."""
        from urllib.parse import parse_qs

        throttle, clock = self.authentication.throttle, self.authentication.clock
        authenticator = self.authentication.authenticator
        peer = peer_key(request)
        wait = throttle.wait(peer)
        if wait > throttle.max_backlog:
            return JSONAnswer(429, error_body("too_many_attempts")).render(request)
        if wait > 0:
            render_later(server_request(request), clock, wait, lambda: self)
            return NOT_DONE_YET
        # The Site does not parse form bodies (the proxy forwards them untouched): parse this one.
        form = parse_qs(request.content.read(4096) if request.content is not None else b"")
        token = (form.get(b"token") or request.args.get(b"token") or [b""])[0].strip()
        next_uri = safe_next((form.get(b"next") or request.args.get(b"next") or [b"/"])[0])
        if authenticator.check_token(token):
            throttle.succeeded(peer)
            cookie = authenticator.make_cookie(clock.seconds())
            server_request(request).addCookie(
                COOKIE_NAME, cookie, path=b"/", httpOnly=True, sameSite="strict", max_age=str(int(COOKIE_LIFETIME))
            )
            request.setResponseCode(303)
            request.setHeader(b"location", next_uri)
            request.setHeader(b"cache-control", b"no-store")
            return b""
        delay = throttle.failed(peer)
        page = LoginPage(401, [], next_uri, "That token is not right.")
        render_later(server_request(request), clock, delay, lambda: page)
        return NOT_DONE_YET
