"""The web server service: listens on the router's endpoint and says where, or stops start-up with a sentence."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

log = Logger()


def tcp_address(listening: object) -> tuple[str, int] | None:
    """The (host, port) a listening port (or its address) is bound to; None when it is not TCP (a UNIX socket)."""
    get_host = getattr(listening, "getHost", None)
    address = get_host() if callable(get_host) else listening
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    return host, port


class WebService(Service):
    """Listens for the web root when twistd starts (with privileges): a port in use aborts start-up."""

    def __init__(self, description: str, site: Site, banner: dict[str, Any], reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.description = description
        self.endpoint = serverFromString(reactor, description)
        self.site = site
        self.banner = banner
        self.listening_port: IListeningPort | None = None
        self._listening_waiters: list[Deferred[IListeningPort]] = []

    def when_listening(self) -> Deferred[IListeningPort]:
        """Fire with the listening port once the router listens (at once if it already does)."""
        if self.listening_port is not None:
            return defer.succeed(self.listening_port)
        waiter: Deferred[IListeningPort] = Deferred()
        self._listening_waiters.append(waiter)
        return waiter

    def privilegedStartService(self) -> None:
        """Listen now, so that a port in use stops twistd before it runs."""
        super().privilegedStartService()
        outcome: list[IListeningPort | Failure] = []
        self.endpoint.listen(self.site).addBoth(outcome.append)
        # TCP, UNIX and inherited (systemd) endpoints listen at once; anything slower is waited for.
        if not outcome:
            raise SystemExit(f"opencoderouter: {self.description} did not start listening at once")
        result = outcome[0]
        if isinstance(result, Failure):
            error = result.value
            if isinstance(error, CannotListenError):
                reason = getattr(error.socketError, "strerror", None) or error.socketError
            else:
                reason = result.getErrorMessage()
            raise SystemExit(f"opencoderouter: cannot listen on {self.description}: {reason}") from None
        self._listening(result)

    def startService(self) -> None:
        """Listen now unless twistd already did (tests start services without privileges first)."""
        if self.listening_port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Stop listening; fires once the port is closed."""
        super().stopService()
        port, self.listening_port = self.listening_port, None
        if port is None:
            return defer.succeed(None)
        stopped = port.stopListening()
        return stopped if isinstance(stopped, Deferred) else defer.succeed(None)

    def _listening(self, port: IListeningPort) -> None:
        self.listening_port = port
        address = port.getHost()
        where = f"{getattr(address, 'host', '')}:{getattr(address, 'port', '')}"
        shown_port = getattr(address, "port", "")
        host = getattr(address, "host", "")
        shown_host = "localhost" if host in ("0.0.0.0", "::", "127.0.0.1") else host
        log.info(
            "OpenCodeRouter listening on {where}: dashboard http://{host}:{port}/ , API http://{host}:{port}/api/ , "
            "projects at http://{{slug}}-{username}.local:{port}/ and http://{host}:{port}/{{slug}}/ ; "
            "scanning 127.0.0.1 ports {scan_start}-{scan_end} every {interval:g}s",
            where=where if getattr(address, "port", None) is not None else str(address),
            host=shown_host,
            port=shown_port,
            **self.banner,
        )
        waiters, self._listening_waiters = self._listening_waiters, []
        for waiter in waiters:
            waiter.callback(port)
